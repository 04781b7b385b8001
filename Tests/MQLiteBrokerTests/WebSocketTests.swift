import Logging
@testable import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOPosix
import NIOWebSocket
import Synchronization
import Testing

/// MQTT over WebSocket (`protocol = "websockets"`): the handshake's answers, the frame bridge on
/// an EmbeddedChannel, and the MQTT byte stream across frame boundaries on a real broker.
@Suite("WebSocket listeners")
struct WebSocketTests {
    // MARK: - Handshake

    func head(_ headers: [(String, String)], method: HTTPMethod = .GET) -> HTTPRequestHead {
        HTTPRequestHead(version: .http1_1, method: method, uri: "/mqtt", headers: HTTPHeaders(headers))
    }

    static let upgrade = [("Host", "x"), ("Upgrade", "websocket"), ("Connection", "keep-alive, Upgrade"),
                          ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]

    @Test("the accept value is RFC 6455's; mqtt is chosen when offered, nothing when nothing is")
    func accepted() {
        // RFC 6455 section 1.3's example key and accept value.
        #expect(WebSocketUpgradeHandler.answer(to: head(Self.upgrade)) == .upgrade(accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", subprotocol: nil))
        #expect(WebSocketUpgradeHandler.answer(to: head(Self.upgrade + [("Sec-WebSocket-Protocol", "chat, mqtt")]))
            == .upgrade(accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", subprotocol: "mqtt"))
        #expect(WebSocketUpgradeHandler.answer(to: head(Self.upgrade + [("Sec-WebSocket-Protocol", "mqttv3.1")]))
            == .upgrade(accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", subprotocol: "mqttv3.1"))
    }

    @Test("refusals: 426 for a request that is not an upgrade, 400 for one that cannot be served")
    func refused() {
        func status(_ answer: WebSocketUpgradeHandler.Answer) -> HTTPResponseStatus? {
            if case .refuse(let status, _, _) = answer { return status }
            return nil
        }
        #expect(status(WebSocketUpgradeHandler.answer(to: head([("Host", "x")]))) == .upgradeRequired)
        #expect(status(WebSocketUpgradeHandler.answer(to: head(Self.upgrade + [("Sec-WebSocket-Protocol", "chat")]))) == .badRequest)
        #expect(status(WebSocketUpgradeHandler.answer(to: head(Self.upgrade, method: .POST))) == .badRequest)
        #expect(status(WebSocketUpgradeHandler.answer(to: head(Self.upgrade.filter { $0.0 != "Sec-WebSocket-Key" }))) == .badRequest)
        #expect(status(WebSocketUpgradeHandler.answer(to: head(Self.upgrade.map { $0.0 == "Sec-WebSocket-Key" ? ($0.0, "c2hvcnQ=") : $0 }))) == .badRequest)
        #expect(status(WebSocketUpgradeHandler.answer(to: head(Self.upgrade.map { $0.0 == "Sec-WebSocket-Version" ? ($0.0, "8") : $0 }))) == .upgradeRequired)
    }

    // MARK: - Bridge

    final class Bytes: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        var received: [[UInt8]] = []
        var errors: [String] = []
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { received.append(Array(unwrapInboundIn(data).readableBytesView)) }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { errors.append("\(error)") }
        var inputClosed = false
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if event as? ChannelEvent == .inputClosed { inputClosed = true }
        }
    }

    func masked(_ opcode: WebSocketOpcode, _ bytes: [UInt8], fin: Bool = true) -> WebSocketFrame {
        let key: WebSocketMaskingKey = [1, 2, 3, 4]
        var data = ByteBuffer(bytes: bytes)
        data.webSocketMask(key)
        return WebSocketFrame(fin: fin, opcode: opcode, maskKey: key, data: data)
    }

    func bridge() throws -> (EmbeddedChannel, Bytes) {
        let bytes = Bytes()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers([WebSocketMQTTBridge(maxFrameSize: 1000), bytes])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return (channel, bytes)
    }

    @Test("binary payloads (and fragments of a binary message) pass on unmasked; writes go out as binary frames")
    func bridgePayloads() throws {
        let (channel, bytes) = try bridge()
        try channel.writeInbound(masked(.binary, [1, 2, 3]))
        try channel.writeInbound(masked(.binary, [4], fin: false))
        try channel.writeInbound(masked(.continuation, [5, 6], fin: true))
        #expect(bytes.received == [[1, 2, 3], [4], [5, 6]])
        try channel.writeOutbound(ByteBuffer(bytes: [9, 8]))
        let frame = try #require(try channel.readOutbound(as: WebSocketFrame.self))
        #expect(frame.opcode == .binary && frame.fin && frame.maskKey == nil && Array(frame.data.readableBytesView) == [9, 8])
        // A ping is answered with a pong carrying its data.
        try channel.writeInbound(masked(.ping, [7]))
        let pong = try #require(try channel.readOutbound(as: WebSocketFrame.self))
        #expect(pong.opcode == .pong && Array(pong.data.readableBytesView) == [7])
        #expect(bytes.errors.isEmpty)
        _ = try? channel.finish()
    }

    @Test("a close frame is answered with its own code if an endpoint may send it, 1000 for none, 1002 for a short body or a reserved code, 1007 for a reason that is not UTF-8")
    func closeAnswers() {
        func answer(_ bytes: [UInt8]) -> WebSocketErrorCode { WebSocketMQTTBridge.answer(toClose: ByteBuffer(bytes: bytes)) }
        #expect(answer([]) == WebSocketErrorCode(codeNumber: 1000))
        #expect(answer([0x03]) == WebSocketErrorCode(codeNumber: 1002))
        #expect(answer([0x03, 0xE8]) == WebSocketErrorCode(codeNumber: 1000))
        #expect(answer([0x03, 0xE9, 0x62, 0x79, 0x65]) == WebSocketErrorCode(codeNumber: 1001))
        #expect(answer([0x0F, 0xA0]) == WebSocketErrorCode(codeNumber: 4000))
        for reserved: UInt16 in [999, 1004, 1005, 1006, 1015, 2999, 5000] {
            #expect(answer([UInt8(reserved >> 8), UInt8(reserved & 0xFF)]) == WebSocketErrorCode(codeNumber: 1002))
        }
        #expect(answer([0x03, 0xE8, 0xC3, 0x28]) == WebSocketErrorCode(codeNumber: 1007))
    }

    /// The client's close frame ends its input, as an EOF does: the connection handler closes once
    /// what came before is handled, and the answer goes out then, after what it still wrote.
    @Test("a client's close frame is passed on as the end of its input; the answer, with the client's code, follows the last writes")
    func bridgeClientClose() throws {
        let (channel, bytes) = try bridge()
        try channel.writeInbound(masked(.binary, [0xE0, 0x00]))
        try channel.writeInbound(masked(.connectionClose, [0x03, 0xE9]))  // 1001 going away
        try channel.writeInbound(masked(.binary, [0xC0, 0x00]))  // after the close: dropped
        #expect(bytes.received == [[0xE0, 0x00]])
        #expect(bytes.inputClosed && bytes.errors.isEmpty)
        #expect(try channel.readOutbound(as: WebSocketFrame.self) == nil, "the answer before the connection handler wrote what it had")
        try channel.writeOutbound(ByteBuffer(bytes: [0x40, 2, 0, 1]))
        channel.close(promise: nil)
        let data = try #require(try channel.readOutbound(as: WebSocketFrame.self))
        #expect(data.opcode == .binary && Array(data.data.readableBytesView) == [0x40, 2, 0, 1])
        var close = try #require(try channel.readOutbound(as: WebSocketFrame.self))
        #expect(close.opcode == .connectionClose && close.data.readWebSocketErrorCode() == WebSocketErrorCode(codeNumber: 1001))
        _ = try? channel.finish()
    }

    /// The close frame goes out when the connection handler closes, after what it still had to
    /// write (a CONNACK of the same read): no data frame after a close frame (RFC 6455 section 5.5.1).
    @Test("text frames, unmasked frames and stray continuations: the error reaches the connection handler, and its close sends the close frame after its last writes", arguments: [
        ("text", "text frame", 1003), ("unmasked", "unmasked", 1002), ("continuation", "continuation frame without a message", 1002),
    ])
    func bridgeFailures(kind: String, problem: String, code: Int) throws {
        let (channel, bytes) = try bridge()
        switch kind {
        case "text": try channel.writeInbound(masked(.text, Array("{}".utf8)))
        case "unmasked": try channel.writeInbound(WebSocketFrame(fin: true, opcode: .binary, data: ByteBuffer(bytes: [1])))
        default: try channel.writeInbound(masked(.continuation, [1]))
        }
        #expect(bytes.received.isEmpty)
        #expect(bytes.errors.count == 1 && bytes.errors[0].contains(problem), "\(bytes.errors)")
        #expect(try channel.readOutbound(as: WebSocketFrame.self) == nil, "a close frame before the connection handler wrote what it had")
        try channel.writeOutbound(ByteBuffer(bytes: [0x20, 2, 0, 0]))
        channel.close(mode: .output, promise: nil)
        let data = try #require(try channel.readOutbound(as: WebSocketFrame.self))
        #expect(data.opcode == .binary && Array(data.data.readableBytesView) == [0x20, 2, 0, 0])
        var close = try #require(try channel.readOutbound(as: WebSocketFrame.self))
        #expect(close.opcode == .connectionClose && close.data.readWebSocketErrorCode() == WebSocketErrorCode(codeNumber: code))
        _ = try? channel.finish()
    }

    // MARK: - Over a real socket

    /// A raw TCP client: sends bytes, collects what comes back.
    final class RawClient: Sendable {
        final class Collector: ChannelInboundHandler, Sendable {
            typealias InboundIn = ByteBuffer
            let bytes = Mutex<[UInt8]>([])
            let closed = Atomic<Bool>(false)
            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                let chunk = unwrapInboundIn(data)
                bytes.withLock { $0 += chunk.readableBytesView }
            }
            func channelInactive(context: ChannelHandlerContext) { closed.store(true, ordering: .relaxed) }
        }

        let channel: any Channel
        let collector: Collector

        init(port: Int) async throws {
            let collector = Collector()
            self.collector = collector
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(collector) }
                }
                .connect(host: "127.0.0.1", port: port).get()
        }

        func send(_ bytes: [UInt8]) async throws {
            try await channel.writeAndFlush(ByteBuffer(bytes: bytes))
        }

        /// Waits until the collected bytes hold `count` more than `from`; returns them all.
        func read(atLeast count: Int) async throws -> [UInt8] {
            try await eventually("\(count) bytes") { collector.bytes.withLock { $0.count } >= count }
            return collector.bytes.withLock { $0 }
        }

        func take() -> [UInt8] { collector.bytes.withLock { b in defer { b.removeAll() }; return b } }
    }

    /// A masked binary frame (clients must mask), `fin` and `opcode` as given.
    static func frame(_ payload: [UInt8], opcode: UInt8 = 0x2, fin: Bool = true) -> [UInt8] {
        let mask: [UInt8] = [0x37, 0xFA, 0x21, 0x3D]
        var out: [UInt8] = [(fin ? 0x80 : 0) | opcode]
        if payload.count < 126 {
            out.append(0x80 | UInt8(payload.count))
        } else {
            out += [0x80 | 126, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
        }
        out += mask
        out += payload.enumerated().map { $0.element ^ mask[$0.offset % 4] }
        return out
    }

    /// The payloads of the unmasked server frames in `bytes` (opcode, payload), and what is left.
    static func serverFrames(_ bytes: [UInt8]) -> [(UInt8, [UInt8])] {
        var frames: [(UInt8, [UInt8])] = []
        var i = 0
        while i + 2 <= bytes.count {
            var length = Int(bytes[i + 1] & 0x7F)
            var start = i + 2
            if length == 126 {
                guard i + 4 <= bytes.count else { break }
                length = Int(bytes[i + 2]) << 8 | Int(bytes[i + 3])
                start = i + 4
            }
            guard start + length <= bytes.count else { break }
            frames.append((bytes[i] & 0x0F, Array(bytes[start..<(start + length)])))
            i = start + length
        }
        return frames
    }

    static func encode(_ packet: MQTTPacket) -> [UInt8] {
        var buffer = ByteBuffer()
        buffer.writeMQTTPacket(packet)
        return Array(buffer.readableBytesView)
    }

    /// The MQTT packets carried by the binary frames in `bytes`, decoded as one stream.
    static func packets(_ bytes: [UInt8]) throws -> [MQTTPacket] {
        var stream = ByteBuffer(bytes: serverFrames(bytes).filter { $0.0 == 0x2 }.flatMap(\.1))
        var decoder = MQTTDecoder()
        var packets: [MQTTPacket] = []
        while let packet = try decoder.decode(buffer: &stream) { packets.append(packet) }
        return packets
    }

    func withWebSocketBroker(_ body: (BrokerFixture) async throws -> Void) async throws {
        try await withBroker(configure: { config in
            config.listeners = [ListenerConfiguration(ListenAddress(host: "127.0.0.1", port: 0), kind: .websockets)]
        }, body)
    }

    /// Opens a connection and completes the upgrade (offering `mqtt`).
    func upgraded(port: Int) async throws -> RawClient {
        let client = try await RawClient(port: port)
        try await client.send(Array(("GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").utf8))
        try await eventually("101") { String(decoding: client.collector.bytes.withLock { $0 }, as: UTF8.self).contains("\r\n\r\n") }
        let response = String(decoding: client.take(), as: UTF8.self)
        guard response.hasPrefix("HTTP/1.1 101"), response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            response.contains("Sec-WebSocket-Protocol: mqtt")
        else { throw TestFailure("upgrade answered: \(response)") }
        return client
    }

    @Test("a CONNECT split across two frames is one packet; SUBSCRIBE and PUBLISH in one frame are two")
    func packetsAcrossFrames() async throws {
        try await withWebSocketBroker { fixture in
            let client = try await upgraded(port: fixture.port)
            let connect = Self.encode(.connect(ConnectPacket(cleanSession: true, keepAlive: 0, clientID: "ws-split")))
            try await client.send(Self.frame(Array(connect.prefix(5))))
            try await client.send(Self.frame(Array(connect.dropFirst(5))))
            _ = try await client.read(atLeast: 6)
            #expect(try Self.packets(client.take()) == [.connack(ConnackPacket(sessionPresent: false, returnCode: .accepted))])

            // Two packets, one frame; then the subscribed message comes back in a frame of its own.
            let subscribe = Self.encode(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "ws/#", qos: .atMostOnce)])))
            let publish = Self.encode(.publish(PublishPacket(topic: "ws/t", payload: "over frames")))
            try await client.send(Self.frame(subscribe + publish))
            try await eventually("SUBACK and PUBLISH") { ((try? Self.packets(client.collector.bytes.withLock { $0 })) ?? []).count >= 2 }
            let packets = try Self.packets(client.take())
            #expect(packets.count == 2)
            #expect(packets.first == .suback(SubackPacket(packetID: 1, returnCodes: [.granted(.atMostOnce)])))
            guard case .publish(let received) = packets.last else { throw TestFailure("no PUBLISH: \(packets)") }
            #expect(String(buffer: received.payload) == "over frames")

            // A fragmented binary message (binary + continuation) carrying half a PINGREQ each.
            try await client.send(Self.frame([0xC0], fin: false))
            try await client.send(Self.frame([0x00], opcode: 0x0))
            _ = try await client.read(atLeast: 4)
            #expect(try Self.packets(client.take()) == [.pingresp])
            try await client.channel.close()
        }
    }

    @Test("a CONNECT sent with the upgrade request, without waiting for 101, is answered at once (it was written but not flushed until the client sent more)")
    func connectWithTheRequest() async throws {
        try await withWebSocketBroker { fixture in
            let client = try await RawClient(port: fixture.port)
            let request = Array(("GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").utf8)
            let connect = Self.encode(.connect(ConnectPacket(cleanSession: true, keepAlive: 0, clientID: "ws-eager")))
            try await client.send(request + Self.frame(connect))
            try await eventually("101 and CONNACK") {
                let bytes = client.collector.bytes.withLock { $0 }
                guard let end = bytes.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound else { return false }
                return Self.serverFrames(Array(bytes[end...])).first.map { $0.1 == [0x20, 0x02, 0x00, 0x00] } ?? false
            }
            try await client.channel.close()
        }
    }

    @Test("a text frame closes the connection with a close frame, and the log says why")
    func textFrameCloses() async throws {
        try await withWebSocketBroker { fixture in
            let client = try await upgraded(port: fixture.port)
            try await client.send(Self.frame(Array("hello".utf8), opcode: 0x1))
            try await eventually("closed") { client.collector.closed.load(ordering: .relaxed) }
            let frames = Self.serverFrames(client.take())
            #expect(frames.first?.0 == 0x8)
            #expect(frames.first.map { Array($0.1.prefix(2)) } == [0x03, 0xEB])  // 1003 unacceptable data
            try await eventually("logged") { fixture.logMessages.contains { $0.contains("text frame") } }
        }
    }
}
