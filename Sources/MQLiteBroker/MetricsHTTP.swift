import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

// The `http` listener kind: `GET /metrics` (Prometheus text format, version 0.0.4) and
// `GET /health` (200 while the broker accepts connections, 503 while it is stopping); anything
// else 404. One request per connection (answered with `Connection: close`), so that a peer holds
// nothing for long:
//   HTTPRequestLimit, HTTPResponseEncoder, HTTPRequestDecoder, MetricsHTTPHandler
// The request may take at most `HTTPListenerLimits.maxRequestBytes` and must be complete within
// `HTTPListenerLimits.requestTimeout`; a malformed one gets 400 and the connection is closed.

/// Limits of `http` listeners.
enum HTTPListenerLimits {
    /// Bytes of the request (line, headers and any body): a scraper's is a few hundred.
    static let maxRequestBytes = 8 * 1024
    static let maxHeaderFields = 64
    /// Time from accept to a complete request; past it the connection is closed.
    static let requestTimeout = TimeAmount.seconds(10)
    /// Connections of all `http` listeners open at once; past it a new one is closed at once
    /// (a scraper needs one; each held connection costs a socket and, when it asks, a walk of
    /// every worker's connections).
    static let maxConnections = 64
}

extension Broker {
    /// Accepted connections of an `http` listener get the HTTP handlers only: no MQTT, no
    /// connection count, no max_connections.
    func makeHTTPBootstrap() -> ServerBootstrap {
        serverBootstrap(backlog: 64)
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 512, maximum: 16 * 1024))
            // A client that shuts its side after the request (`nc -N`, HTTP/1.0 tools) still gets
            // the answer (RFC 9112 section 9.6), which /metrics sends once every worker reported.
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try MetricsHTTPHandler.addHandlers(to: channel.pipeline.syncOperations, broker: self)
                }
            }
    }

    /// The metrics in the Prometheus text format, from every worker's counters now; the future
    /// completes on `loop`.
    public func metricsText(on loop: any EventLoop) -> EventLoopFuture<String> {
        let listeners = configuration.listeners
        return collectStats(on: loop).map { [metrics] stats in
            metrics.update(stats, listeners: listeners)
            return metrics.render()
        }
    }
}

/// Answers one request of an `http` listener, then closes.
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private enum State {
        case awaitingHead
        /// The head came; answered at the request's end.
        case awaitingEnd(method: HTTPMethod, path: Substring)
        case answering
    }

    private let broker: Broker
    private var state = State.awaitingHead
    private var timeout: Scheduled<Void>?
    /// Counted in `Broker.httpConnections` (until the channel goes inactive).
    private var counted = false

    private init(broker: Broker) {
        self.broker = broker
    }

    static func addHandlers(to pipeline: ChannelPipeline.SynchronousOperations, broker: Broker) throws {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderFieldSize = HTTPListenerLimits.maxRequestBytes
        limits.maxHeaderListSize = HTTPListenerLimits.maxRequestBytes
        limits.maxHeaderFieldCount = HTTPListenerLimits.maxHeaderFields
        let decoder = ByteToMessageHandler(
            HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, informationalResponseStrategy: .drop, limitConfiguration: limits),
            maximumBufferSize: HTTPListenerLimits.maxRequestBytes)
        try pipeline.addHandlers([
            HTTPRequestLimit(maxBytes: HTTPListenerLimits.maxRequestBytes, what: "HTTP request"), HTTPResponseEncoder(), decoder,
            MetricsHTTPHandler(broker: broker),
        ])
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { armTimeout(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        counted = true
        if broker.httpConnections.add(1, ordering: .relaxed).newValue > HTTPListenerLimits.maxConnections {
            state = .answering  // nothing more is read or answered
            context.close(promise: nil)
            return
        }
        armTimeout(context: context)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timeout?.cancel()
        timeout = nil
    }

    private func armTimeout(context: ChannelHandlerContext) {
        guard timeout == nil else { return }
        let channel = context.channel
        timeout = context.eventLoop.scheduleTask(in: HTTPListenerLimits.requestTimeout) { channel.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch (unwrapInboundIn(data), state) {
        case (.head(let head), .awaitingHead):
            // HTTP/1.1 requires exactly one Host header (RFC 9112 section 3.2).
            if head.version.major == 1, head.version.minor >= 1, head.headers["Host"].count != 1 {
                state = .answering
                return respond(context: context, status: .badRequest, contentType: "text/plain; charset=utf-8", body: "400 Bad Request (Host)\n")
            }
            let path = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            state = .awaitingEnd(method: head.method, path: path)
        case (.body, .awaitingEnd):
            break  // ignored (bounded by the request limit)
        case (.end, .awaitingEnd(let method, let path)):
            state = .answering
            answer(context: context, method: method, path: path)
        default:
            break
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A malformed request or one over the limits: 400, then closed.
        guard case .answering = state else {
            state = .answering
            return respond(context: context, status: .badRequest, contentType: "text/plain; charset=utf-8", body: "400 Bad Request\n")
        }
        context.close(promise: nil)
    }

    /// The client shut its side: a request it completed is still answered (the answer closes
    /// the connection); one it did not is closed.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            if case .answering = state { return }
            state = .answering
            return context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        timeout = nil
        if counted { broker.httpConnections.subtract(1, ordering: .relaxed) }
        counted = false
        context.fireChannelInactive()
    }

    private func answer(context: ChannelHandlerContext, method: HTTPMethod, path: Substring) {
        let text = "text/plain; charset=utf-8"
        switch path {
        case "/metrics", "/health":
            guard method == .GET || method == .HEAD else {
                return respond(context: context, status: .methodNotAllowed, contentType: text, body: "405 Method Not Allowed\n", extra: [("Allow", "GET, HEAD")], head: false)
            }
            let headOnly = method == .HEAD
            if path == "/health" {
                let ok = broker.isAccepting
                return respond(context: context, status: ok ? .ok : .serviceUnavailable, contentType: text, body: ok ? "ok\n" : "stopping\n", head: headOnly)
            }
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            broker.metricsText(on: context.eventLoop).whenComplete { result in
                let (handler, context) = bound.value
                switch result {
                case .success(let body):
                    handler.respond(context: context, status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8", body: body, head: headOnly)
                case .failure:
                    // The loops are stopping.
                    handler.respond(context: context, status: .serviceUnavailable, contentType: text, body: "stopping\n", head: headOnly)
                }
            }
        default:
            // (A response to HEAD has no content, RFC 9110 §9.3.2; its Content-Length is the GET's.)
            respond(context: context, status: .notFound, contentType: text, body: "404 Not Found (try /metrics or /health)\n", head: method == .HEAD)
        }
    }

    private func respond(
        context: ChannelHandlerContext, status: HTTPResponseStatus, contentType: String, body: String, extra: [(String, String)] = [],
        head: Bool = false
    ) {
        let buffer = context.channel.allocator.buffer(string: body)
        var headers = HTTPHeaders([("Content-Type", contentType), ("Content-Length", "\(buffer.readableBytes)"), ("Connection", "close")])
        for (name, value) in extra { headers.add(name: name, value: value) }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        if !head { context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil) }
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }
}

@available(*, unavailable)
extension MetricsHTTPHandler: Sendable {}
