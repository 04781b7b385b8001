import InMemoryLogging
import Logging
import MQLiteBroker
import MQTTCore
import NIOCore
import NIOPosix
import Synchronization

/// Test helpers shared by the test targets: a broker fixture on an ephemeral port and a minimal
/// MQTT client. Assertion failures are thrown as `TestFailure`.
public struct TestFailure: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Shared by every test: client connections only.
let clientGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)

/// A running broker on 127.0.0.1 with an ephemeral port, and the log lines it wrote.
public struct BrokerFixture {
    public let broker: Broker
    public let port: Int
    public let logs: InMemoryLogHandler
    public let hooks: any BrokerHooks

    /// Log messages at info or above, as text.
    public var logMessages: [String] { logs.entries.map { "\($0.message) \($0.metadata)" } }

    public func client(_ id: String, clean: Bool = true, keepAlive: UInt16 = 0, will: Will? = nil,
                username: String? = nil, password: String? = nil) async throws -> TestClient {
        let c = try await TestClient.open(port: port)
        let connack = try await c.connect(
            ConnectPacket(cleanSession: clean, keepAlive: keepAlive, clientID: id, will: will, username: username,
                          password: password.map { ByteBuffer(string: $0) }))
        guard connack.returnCode == .accepted else { throw TestFailure("CONNACK \(connack.returnCode) for \(id)") }
        return c
    }

    /// An MQTT 5 client, connected with these CONNECT properties; the CONNACK is returned too.
    public func client5(
        _ id: String, cleanStart: Bool = true, keepAlive: UInt16 = 0, will: Will? = nil, willProperties: MQTTProperties = MQTTProperties(),
        properties: MQTTProperties = MQTTProperties()
    ) async throws -> (TestClient, ConnackPacket) {
        let c = try await TestClient.open(port: port, version: .v5)
        let connack = try await c.connect(
            ConnectPacket(protocolLevel: 5, cleanSession: cleanStart, keepAlive: keepAlive, clientID: id, will: will,
                          properties: properties, willProperties: willProperties))
        guard connack.reasonCode == .success else { throw TestFailure("CONNACK \(connack.reasonCode) for \(id)") }
        return (c, connack)
    }
}

/// Starts a broker (two workers unless told otherwise), runs `body`, and stops it. `makeHooks`
/// builds the hooks from the final configuration and the test logger; `prepare` sees the broker
/// before it starts.
public func withBroker(
    workers: Int = 2, hooks: any BrokerHooks = NoHooks(), configure: (inout BrokerConfiguration) -> Void = { _ in },
    makeHooks: ((BrokerConfiguration, Logger) throws -> any BrokerHooks)? = nil,
    prepare: (Broker) -> Void = { _ in },
    _ body: (BrokerFixture) async throws -> Void
) async throws {
    var config = BrokerConfiguration(workers: workers, listeners: [ListenerConfiguration(ListenAddress(host: "127.0.0.1", port: 0))])
    // No $SYS rounds unless a test asks (they would add retained messages and deliveries).
    config.sysInterval = 0
    configure(&config)
    let logs = InMemoryLogHandler()
    let logger = Logger(label: "mqlite-test", factory: { _ in logs })
    let hooks = try makeHooks?(config, logger) ?? hooks
    // `[persistence]`: the store opens (and loads) first, as the executable does.
    let store = try config.persistence.map { try PersistentStore(configuration: $0, logger: logger) }
    let broker = Broker(configuration: config, hooks: hooks, logger: logger, store: store)
    prepare(broker)
    let addresses = try await broker.start()
    guard let port = addresses.first?.port else { throw TestFailure("no port bound") }
    do {
        try await body(BrokerFixture(broker: broker, port: port, logs: logs, hooks: hooks))
    } catch {
        await broker.shutdown()
        throw error
    }
    await broker.shutdown()
}

/// A minimal MQTT client for tests: sends packets as given and reports every packet (or the close)
/// it receives, in order.
public final class TestClient: Sendable {
    public enum Event: Equatable, Sendable {
        case packet(MQTTPacket)
        case closed
    }

    public struct State: Sendable {
        var events: [Event] = []
        var waiter: (id: Int, continuation: CheckedContinuation<Event?, Never>)?
        var nextWaiterID = 0
    }

    public let channel: any Channel
    private let sink: Sink
    /// What this client reads and writes: 3.1.1, or 5.0 (its CONNECT must say so too).
    public let version: ProtocolVersion

    private init(channel: any Channel, sink: Sink, version: ProtocolVersion) {
        self.channel = channel
        self.sink = sink
        self.version = version
    }

    public static func open(port: Int, version: ProtocolVersion = .v3_1_1) async throws -> TestClient {
        let sink = Sink()
        let channel = try await ClientBootstrap(group: clientGroup)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(MQTTDecoder(maxPacketSize: 1 << 24, protocolVersion: version)))
                    try channel.pipeline.syncOperations.addHandler(sink)
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return TestClient(channel: channel, sink: sink, version: version)
    }

    /// The next event, or nil after `timeout`.
    public func nextEvent(timeout: TimeAmount = .seconds(5)) async -> Event? {
        await withCheckedContinuation { (continuation: CheckedContinuation<Event?, Never>) in
            let id: Int? = sink.state.withLock { state in
                if !state.events.isEmpty {
                    continuation.resume(returning: state.events.removeFirst())
                    return nil
                }
                state.nextWaiterID += 1
                state.waiter = (state.nextWaiterID, continuation)
                return state.nextWaiterID
            }
            guard let id else { return }
            channel.eventLoop.scheduleTask(in: timeout) {
                let expired = self.sink.state.withLock { state -> CheckedContinuation<Event?, Never>? in
                    guard let waiter = state.waiter, waiter.id == id else { return nil }
                    state.waiter = nil
                    return waiter.continuation
                }
                expired?.resume(returning: nil)
            }
        }
    }

    public func expectPacket(timeout: TimeAmount = .seconds(5)) async throws -> MQTTPacket {
        switch await nextEvent(timeout: timeout) {
        case .packet(let p): return p
        case .closed: throw TestFailure("connection closed while a packet was expected")
        case nil: throw TestFailure("no packet within \(timeout)")
        }
    }

    public func expectPublish(timeout: TimeAmount = .seconds(5)) async throws -> PublishPacket {
        let packet = try await expectPacket(timeout: timeout)
        guard case .publish(let p) = packet else { throw TestFailure("expected PUBLISH, got \(packet)") }
        return p
    }

    /// Fails if anything arrives within `duration`.
    public func expectNothing(for duration: TimeAmount = .milliseconds(300)) async throws {
        if let event = await nextEvent(timeout: duration) { throw TestFailure("unexpected \(event)") }
    }

    /// Waits for the broker to close the connection; packets before the close are returned.
    @discardableResult
    public func expectClosed(timeout: TimeAmount = .seconds(5)) async throws -> [MQTTPacket] {
        var before: [MQTTPacket] = []
        while true {
            switch await nextEvent(timeout: timeout) {
            case .closed: return before
            case .packet(let p): before.append(p)
            case nil: throw TestFailure("connection still open after \(timeout)")
            }
        }
    }

    public func send(_ packet: MQTTPacket) {
        var buffer = channel.allocator.buffer(capacity: 64)
        buffer.writeMQTTPacket(packet, version: version)
        channel.writeAndFlush(buffer, promise: nil)
    }

    public func sendRaw(_ bytes: [UInt8]) {
        channel.writeAndFlush(channel.allocator.buffer(bytes: bytes), promise: nil)
    }

    /// Sends the client's EOF (a TCP FIN), reading on.
    public func closeOutput() async throws {
        try await channel.close(mode: .output)
    }

    public func connect(_ packet: ConnectPacket) async throws -> ConnackPacket {
        send(.connect(packet))
        let reply = try await expectPacket()
        guard case .connack(let connack) = reply else { throw TestFailure("expected CONNACK, got \(reply)") }
        return connack
    }

    public func subscribe(_ filters: [(String, QoS)], id: UInt16 = 1) async throws -> [SubackReturnCode] {
        send(.subscribe(SubscribePacket(packetID: id, subscriptions: filters.map { Subscription(filter: $0.0, qos: $0.1) })))
        let reply = try await expectPacket()
        guard case .suback(let suback) = reply, suback.value.packetID == id else { throw TestFailure("expected SUBACK, got \(reply)") }
        return suback.value.returnCodes
    }

    public func subscribe(_ filter: String, qos: QoS = .atMostOnce) async throws {
        let codes = try await subscribe([(filter, qos)])
        guard codes == [.granted(qos)] else { throw TestFailure("SUBACK \(codes) for \(filter)") }
    }

    /// Publishes and completes the QoS flow (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    public func publish(_ topic: String, _ payload: String, qos: QoS = .atMostOnce, retain: Bool = false, id: UInt16 = 1) async throws {
        try await publish(topic, ByteBuffer(string: payload), qos: qos, retain: retain, id: id)
    }

    public func publish(_ topic: String, _ payload: ByteBuffer, qos: QoS = .atMostOnce, retain: Bool = false, id: UInt16 = 1) async throws {
        send(.publish(PublishPacket(topic: ByteBuffer(string: topic), payload: payload, qos: qos, retain: retain, packetID: qos == .atMostOnce ? nil : id)))
        switch qos {
        case .atMostOnce:
            return
        case .atLeastOnce:
            let reply = try await expectPacket()
            guard reply == .puback(packetID: id) else { throw TestFailure("expected PUBACK \(id), got \(reply)") }
        case .exactlyOnce:
            let rec = try await expectPacket()
            guard rec == .pubrec(packetID: id) else { throw TestFailure("expected PUBREC \(id), got \(rec)") }
            send(.pubrel(packetID: id))
            let comp = try await expectPacket()
            guard comp == .pubcomp(packetID: id) else { throw TestFailure("expected PUBCOMP \(id), got \(comp)") }
        }
    }

    /// A round trip through the broker: everything sent before is handled once this returns
    /// (`timeout`: longer behind a large batch, for a sanitizer's build).
    public func ping(timeout: TimeAmount = .seconds(5)) async throws {
        send(.pingreq)
        let reply = try await expectPacket(timeout: timeout)
        guard reply == .pingresp else { throw TestFailure("expected PINGRESP, got \(reply)") }
    }

    public func disconnect() async {
        send(.disconnect)
        _ = try? await expectClosed()
    }

    /// Drops the TCP connection without DISCONNECT.
    public func abort() async {
        try? await channel.close()
    }
}

/// Collects what the connection receives, handing each event to a waiting reader or keeping it.
private final class Sink: ChannelInboundHandler, Sendable {
    typealias InboundIn = MQTTPacket
    let state = Mutex(TestClient.State())

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        push(.packet(unwrapInboundIn(data)))
    }

    func channelInactive(context: ChannelHandlerContext) {
        push(.closed)
    }

    private func push(_ event: TestClient.Event) {
        let waiter = state.withLock { state -> CheckedContinuation<TestClient.Event?, Never>? in
            if let waiter = state.waiter {
                state.waiter = nil
                return waiter.continuation
            }
            state.events.append(event)
            return nil
        }
        waiter?.resume(returning: event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Waits until `condition` holds, polling; fails after `timeout`.
public func eventually(_ what: String, timeout: Duration = .seconds(5), _ condition: () -> Bool) async throws {
    let clock = ContinuousClock()
    let deadline = clock.now + timeout
    while !condition() {
        if clock.now > deadline { throw TestFailure("timed out waiting for: \(what)") }
        try await Task.sleep(for: .milliseconds(20))
    }
}
