import Logging
import NIOCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// On a listener: when `accept` fails for want of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM),
/// stops accepting for `backoff`, then tries again; logs the first failure of an episode and
/// the recovery (the first connection accepted after it), at most one episode per 10 s.
///
/// Why not NIO's `AcceptBackoffHandler`: it delays the listener's next `read()`, but when every
/// `accept` of a read cycle fails, NIO's server channel keeps its read pending and its interest
/// in the socket registered, so no new `read()` is ever asked for: the listening socket stays
/// readable (the connection waits in the backlog), and the loop calls `accept` again at once,
/// at 100% of a core (seen: ~11,000 failing `accept4` calls a second). Turning `autoRead` off
/// unregisters the socket from epoll; turning it back on after `backoff` registers it again.
/// `ServerBootstrap.bind` installs no back-off at all.
final class AcceptBackoff: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = any Channel
    typealias InboundOut = any Channel

    private let logger: Logger
    private let backoff: TimeAmount
    /// Inside an episode of failing accepts (logged once, when it starts).
    private var failing = false
    private var failures = 0
    private var resume: Scheduled<Void>?
    /// When an episode was last logged: at the fd limit, one freed descriptor ends an episode and
    /// the next accept starts another, so episodes are logged at most once per `logInterval`.
    private var lastLogged: NIODeadline?
    private var episodeLogged = false
    private static let logInterval = TimeAmount.seconds(10)

    init(logger: Logger, backoff: TimeAmount) {
        self.logger = logger
        self.backoff = backoff
    }

    static func isResourceError(_ error: any Error) -> Bool {
        guard let error = error as? IOError else { return false }
        switch error.errnoCode {
        case EMFILE, ENFILE, ENOBUFS, ENOMEM: return true
        default: return false
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if failing {
            failing = false
            if episodeLogged { logger.notice("accepting connections again, after \(failures) failed accepts") }
        }
        context.fireChannelRead(data)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard Self.isResourceError(error) else {
            context.fireErrorCaught(error)
            return
        }
        failures = failing ? failures + 1 : 1
        if !failing {
            failing = true
            let now = NIODeadline.now()
            episodeLogged = lastLogged.map { now - $0 >= Self.logInterval } ?? true
            if episodeLogged {
                lastLogged = now
                logger.error(
                    "cannot accept connections: \(error) (out of file descriptors? raise `ulimit -n`); pausing accepts, retrying every \(backoff.nanoseconds / 1_000_000) ms"
                )
            }
        }
        guard resume == nil, let options = context.channel.syncOptions else { return }
        try? options.setOption(.autoRead, value: false)
        let channel = context.channel
        resume = context.eventLoop.assumeIsolated().scheduleTask(in: backoff) { [self] in
            resume = nil
            try? channel.syncOptions?.setOption(.autoRead, value: true)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        resume?.cancel()
        resume = nil
        context.fireChannelInactive()
    }
}
