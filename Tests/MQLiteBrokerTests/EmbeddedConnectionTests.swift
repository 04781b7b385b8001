import Logging
import MQLiteTestSupport
import MQTTCore
import NIOCore
import NIOEmbedded
import Testing

@testable import MQLiteBroker

/// Connections on `EmbeddedChannel`s of one `EmbeddedEventLoop`, the broker's only worker: the
/// protocol as the handler runs it, with no socket and no thread.
private struct EmbeddedBroker {
    let loop = EmbeddedEventLoop()
    let broker: Broker

    init(configure: (inout BrokerConfiguration) -> Void = { _ in }) {
        var configuration = BrokerConfiguration(workers: 1, listeners: [])
        configure(&configuration)
        var logger = Logger(label: "embedded")
        logger.logLevel = .critical
        broker = Broker(configuration: configuration, hooks: NoHooks(), sessionObserver: nil, logger: logger, group: loop)
    }

    func connection() throws -> EmbeddedChannel {
        let handler = ConnectionHandler(worker: broker.workers[0], listener: RunningListener(unboundNamed: "embedded"))
        let channel = EmbeddedChannel(handler: handler, loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 40000)).wait()
        return channel
    }

    /// A connection of `clientID` subscribed to `filter`, its CONNACK and SUBACK read.
    func subscriber(_ clientID: String, to filter: String, qos: QoS, cleanSession: Bool = true) throws -> EmbeddedChannel {
        let channel = try connection()
        try channel.send(.connect(ConnectPacket(cleanSession: cleanSession, clientID: clientID)))
        try channel.send(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: filter, qos: qos)])))
        _ = try channel.received()
        return channel
    }
}

extension EmbeddedChannel {
    func send(_ packets: MQTTPacket...) throws {
        var buffer = ByteBuffer()
        for packet in packets { buffer.writeMQTTPacket(packet) }
        try writeInbound(buffer)
    }

    /// Every packet the broker wrote since the last call.
    func received() throws -> [MQTTPacket] {
        var bytes = ByteBuffer()
        while var chunk = try readOutbound(as: ByteBuffer.self) { bytes.writeBuffer(&chunk) }
        var decoder = MQTTDecoder()
        var packets: [MQTTPacket] = []
        while let packet = try decoder.decode(buffer: &bytes) { packets.append(packet) }
        return packets
    }
}

@Suite("Connections on EmbeddedChannel (no sockets)")
struct EmbeddedConnectionTests {
    @Test("CONNECT, SUBSCRIBE and a QoS 1 PUBLISH between two connections; a second CONNECT closes the connection")
    func publishBetweenConnections() throws {
        let b = EmbeddedBroker()
        defer { try? b.broker.stopLoops() }
        let sub = try b.connection()
        try sub.send(.connect(ConnectPacket(clientID: "sub")))
        #expect(try sub.received() == [.connack(ConnackPacket(sessionPresent: false, returnCode: .accepted))])
        try sub.send(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "a/+", qos: .atLeastOnce)])))
        #expect(try sub.received() == [.suback(SubackPacket(packetID: 1, returnCodes: [.granted(.atLeastOnce)]))])

        let pub = try b.connection()
        try pub.send(.connect(ConnectPacket(clientID: "pub")), .publish(PublishPacket(topic: "a/b", payload: "hello", qos: .atLeastOnce, packetID: 7)))
        #expect(try pub.received() == [.connack(ConnackPacket(sessionPresent: false, returnCode: .accepted)), .puback(packetID: 7)])
        let delivered = try sub.received()
        guard case .publish(let p)? = delivered.first, delivered.count == 1 else {
            Issue.record("expected one PUBLISH, got \(delivered)")
            return
        }
        #expect(String(buffer: p.topic) == "a/b" && String(buffer: p.payload) == "hello" && p.qos == .atLeastOnce && p.packetID == 1)

        try pub.send(.connect(ConnectPacket(clientID: "pub")))
        #expect(!pub.isActive, "a second CONNECT must close the connection")
        #expect(try sub.received().isEmpty)
        _ = try sub.finish()
    }

    @Test("packets before CONNECT close the connection without CONNACK; a bad protocol level gets CONNACK 1 then close")
    func beforeConnect() throws {
        let b = EmbeddedBroker()
        defer { try? b.broker.stopLoops() }
        let early = try b.connection()
        try early.send(.pingreq)
        #expect(!early.isActive)
        #expect(try early.received().isEmpty)

        let old = try b.connection()
        try old.send(.connect(ConnectPacket(protocolName: "MQTT", protocolLevel: 6, clientID: "v6")))
        #expect(try old.received() == [.connack(ConnackPacket(sessionPresent: false, returnCode: .unacceptableProtocolVersion))])
        #expect(!old.isActive)
    }

    @Test("a stream cut anywhere, fixed headers too, reads as it does whole: same packets, same order")
    func streamCutAnywhere() async throws {
        try await offThePool { () throws in
            let b = EmbeddedBroker()
            defer { try? b.broker.stopLoops() }
            let sub = try b.subscriber("sub", to: "t/#", qos: .atLeastOnce)

            // A 3-byte remaining length (20,000 bytes), a 2-byte one, and 1-byte ones.
            let big = String(repeating: "b", count: 20_000), medium = String(repeating: "m", count: 300)
            var rng = SystemRandomNumberGenerator()
            for (n, cut) in [1, 2, 3, 5, 64, 1000, 4097, 0].enumerated() {
                var stream = ByteBuffer()
                for packet: MQTTPacket in [
                    .connect(ConnectPacket(clientID: "pub\(n)")), .publish(PublishPacket(topic: "t/big", payload: big)),
                    .publish(PublishPacket(topic: "t/one", payload: "x", qos: .atLeastOnce, packetID: 5)), .pingreq,
                    .publish(PublishPacket(topic: "t/medium", payload: medium)), .disconnect,
                ] { stream.writeMQTTPacket(packet) }
                let pub = try b.connection()
                while stream.readableBytes > 0 {  // cut 0: random cuts of 1 to 600 bytes
                    let size = cut > 0 ? cut : Int.random(in: 1...600, using: &rng)
                    try pub.writeInbound(stream.readSlice(length: min(size, stream.readableBytes))!)
                }
                #expect(
                    try pub.received() == [.connack(ConnackPacket(sessionPresent: false, returnCode: .accepted)), .puback(packetID: 5), .pingresp],
                    "cut every \(cut) bytes")
                let delivered = try sub.received().compactMap { packet -> String? in
                    guard case .publish(let p) = packet else { return nil }
                    return "\(String(buffer: p.topic)) \(p.payload.readableBytes)"
                }
                #expect(delivered == ["t/big 20000", "t/one 1", "t/medium 300"], "cut every \(cut) bytes")
            }
        }
    }

    @Test("a PUBLISH that comes in two reads is kept as read (no copy); one whole in a read is copied out of it")
    func packetAcrossReadsKeptWithoutCopy() throws {
        let b = EmbeddedBroker()
        defer { try? b.broker.stopLoops() }
        let sub = try b.subscriber("sub", to: "t/#", qos: .atLeastOnce, cleanSession: false)
        try sub.send(.disconnect)  // offline: its QoS 1 messages are queued (kept)
        let pub = try b.connection()
        try pub.send(.connect(ConnectPacket(clientID: "pub")))

        /// Where the queued message's payload starts, counted from its topic's start: right after
        /// the topic in a copy, after the packet id too where it is the PUBLISH's own bytes.
        func payloadOffset() throws -> Int {
            let message = try #require(b.broker.registry.session(for: "sub")?.queue.last?.message)
            #expect(message.isCompact)
            return message.topic.bytes.withUnsafeReadableBytes { t in
                message.payload.withUnsafeReadableBytes { p in t.baseAddress!.distance(to: p.baseAddress!) }
            }
        }
        var packet = ByteBuffer()
        packet.writeMQTTPacket(.publish(PublishPacket(topic: "t/a", payload: String(repeating: "p", count: 5000), qos: .atLeastOnce, packetID: 1)))
        try pub.writeInbound(packet.readSlice(length: 2000)!)
        try pub.writeInbound(packet)
        #expect(try payloadOffset() == 3 + 2)

        try pub.send(.publish(PublishPacket(topic: "t/b", payload: String(repeating: "p", count: 5000), qos: .atLeastOnce, packetID: 2)))
        #expect(try payloadOffset() == 3)
        #expect(b.broker.registry.session(for: "sub")?.queue.count == 2)
    }

    @Test("a fixed header cut between reads is still checked: a remaining length over the limit closes the connection")
    func cutHeaderOverLimit() throws {
        let b = EmbeddedBroker { $0.limits.maxPacketSize = 1000 }
        defer { try? b.broker.stopLoops() }
        let client = try b.connection()
        try client.send(.connect(ConnectPacket(clientID: "big")))
        _ = try client.received()
        try client.writeInbound(ByteBuffer(bytes: [0x30, 0xFF]))
        #expect(client.isActive)
        try client.writeInbound(ByteBuffer(bytes: [0xFF, 0x7F, 0x00, 0x01, 0x61]))  // 2 MiB
        #expect(!client.isActive)
    }

    @Test("a client's EOF (inputClosed) closes the connection, with its will, in a tick that has room for it")
    func inputClosedWaitsForRoom() throws {
        let b = EmbeddedBroker()
        defer { try? b.broker.stopLoops() }
        let watcher = try b.subscriber("watcher", to: "gone/#", qos: .atMostOnce)
        let client = try b.connection()
        try client.send(.connect(ConnectPacket(
            clientID: "leaver", will: Will(topic: "gone/leaver", payload: ByteBuffer(string: "bye"), qos: .atMostOnce, retain: false))))
        _ = try client.received()

        // A tick that has spent its budget (a storm): the close waits...
        let pacing = b.broker.workers[0].pacing
        pacing.spendTheTick()
        client.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(client.isActive, "closed in a tick past its budget")
        #expect(pacing.waitingCount == 1)
        #expect(try watcher.received().isEmpty)

        // ...for the next tick, which closes it: the connection is lost, so the will goes out.
        pacing.tickEnded()
        b.loop.advanceTime(by: .milliseconds(1))
        #expect(!client.isActive)
        let delivered = try watcher.received()
        guard case .publish(let will)? = delivered.first, delivered.count == 1 else {
            Issue.record("expected the will, got \(delivered)")
            return
        }
        #expect(String(buffer: will.topic) == "gone/leaver" && String(buffer: will.payload) == "bye")

        // Without a storm the close is at once.
        // (Each in a tick of its own: on a busy machine 1 ms may pass between the two.)
        let other = try b.connection()
        pacing.tickEnded()
        try other.send(.connect(ConnectPacket(clientID: "other")))
        pacing.tickEnded()
        other.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(!other.isActive)
        _ = try watcher.finish()
    }

    @Test("a client's EOF behind a CONNECT that waits for room: CONNECT, PUBLISH and DISCONNECT are handled before the close")
    func inputClosedAfterPacketsThatWait() throws {
        let b = EmbeddedBroker()
        defer { try? b.broker.stopLoops() }
        let watcher = try b.subscriber("watcher", to: "t/#", qos: .atMostOnce)
        let pacing = b.broker.workers[0].pacing
        let client = try b.connection()
        // A storm: the CONNECT waits for a later tick, and what came behind it waits unread. The
        // client's EOF comes meanwhile; its close would go before the CONNECT (work under way
        // goes before new CONNECTs).
        pacing.spendTheTick()
        try client.send(
            .connect(ConnectPacket(clientID: "fire-and-forget")),
            .publish(PublishPacket(topic: "t/1", payload: "one")),
            .disconnect)
        client.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(client.isActive)
        for _ in 0..<10 where client.isActive {  // (a tick or two; more on a busy machine)
            pacing.tickEnded()
            b.loop.advanceTime(by: .milliseconds(2))
        }
        #expect(!client.isActive)
        #expect(try client.received() == [.connack(ConnackPacket(sessionPresent: false, returnCode: .accepted))])
        let delivered = try watcher.received()
        guard case .publish(let message)? = delivered.first, delivered.count == 1 else {
            Issue.record("expected t/1, got \(delivered)")
            return
        }
        #expect(String(buffer: message.payload) == "one")
        #expect(b.broker.registry.session(for: "fire-and-forget") == nil, "the DISCONNECT ended the session")
        _ = try watcher.finish()
    }
}
