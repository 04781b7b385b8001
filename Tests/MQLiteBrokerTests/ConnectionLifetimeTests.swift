#if canImport(Glibc)
import Glibc
#endif
import Logging
@testable import MQLiteBroker
import MQTTCore
import NIOCore
import NIOPosix
import Testing

/// Found by the connection fuzz target (its memory grew by ~0.3 MB per input): `ConnectionHandler`
/// kept its `ChannelHandlerContext`, which holds the handler, after the channel closed, so every
/// connection's handler and context, and through the handler the broker, were never freed.
@Suite("Connection lifetime")
struct ConnectionLifetimeTests {
    @Test("a closed connection's handler is freed")
    func handlerIsFreedAfterClose() throws {
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let broker = Broker(configuration: BrokerConfiguration(workers: 1, listeners: []), logger: logger)
        defer { try? broker.stopLoops() }
        weak var handler: ConnectionHandler?
        for connect in [false, true] {
            var fds: [CInt] = [-1, -1]
            #expect(socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue), 0, &fds) == 0)
            let channel = try broker.serveConnectedSocket(fds[0], worker: 0).wait()
            handler = try channel.pipeline.handler(type: ConnectionHandler.self).wait()
            #expect(handler != nil)
            if connect {
                var buffer = ByteBuffer()
                buffer.writeMQTTPacket(.connect(ConnectPacket(clientID: "c")))
                buffer.writeMQTTPacket(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "a/#", qos: .atLeastOnce)])))
                _ = buffer.readableBytesView.withUnsafeBytes { send(fds[1], $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }
            }
            broker.waitForWorkersToSettle()
            close(fds[1])
            try channel.closeFuture.wait()
            broker.waitForWorkersToSettle()
            #expect(broker.openConnections == 0)
            #expect(handler == nil, "the handler of a closed connection is still alive (connect: \(connect))")
        }
    }
}
