import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// Hooks that answer later, from the worker's loop, as a script waiting on an HTTP call does.
private final class LaterHooks: BrokerHooks {
    /// Milliseconds before each answer.
    let connectDelay: Int64
    /// The answers for user name "slow": given only when the test opens the gate.
    private let gate = Mutex<[EventLoopPromise<ConnectDecision>]>([])

    init(connectDelay: Int64 = 20) {
        self.connectDelay = connectDelay
    }

    /// Accepts every "slow" client whose CONNECT waits.
    func openGate() {
        for promise in gate.withLock({ $0 }) { promise.succeed(.accept) }
    }

    var waitingAtGate: Int { gate.withLock { $0.count } }

    private func later<Value: Sendable>(_ milliseconds: Int64, _ value: Value) -> HookAnswer<Value> {
        let loop = MultiThreadedEventLoopGroup.currentEventLoop!
        return .later(loop.scheduleTask(in: .milliseconds(milliseconds)) { value }.futureResult)
    }

    func authenticate(_ request: ConnectRequest, worker: Int) -> HookAnswer<ConnectDecision> {
        if request.username == "slow" {
            let promise = MultiThreadedEventLoopGroup.currentEventLoop!.makePromise(of: ConnectDecision.self)
            gate.withLock { $0.append(promise) }
            return .later(promise.futureResult)
        }
        return later(connectDelay, request.username == "bad" ? .refuse(.notAuthorized) : .accept)
    }

    func authorize(_ client: ClientInfo, worker: Int) -> HookAnswer<[ACLTable]> {
        later(10, client.clientID.hasPrefix("limited") ? [ACLTable(publish: ["mine/#"], subscribe: ["mine/#"])] : [])
    }

    func authorizeSubscribe(_ request: SubscribeRequest, worker: Int) -> HookAnswer<SubscribeDecision> {
        if request.filter.hasPrefix("now/") { return .now(.allow) }
        return later(request.filter.hasPrefix("slow/") ? 80 : 5, request.filter.hasPrefix("secret/") ? .deny : .allow)
    }

    func isPublishHooked(topic: TopicName, worker: Int) -> Bool {
        topic.bytes.readableBytesView.starts(with: "later/".utf8)
    }

    /// Message n of a run waits (12 - n) x 4 ms: without ordering, later ones would overtake.
    func interceptPublish(_ message: HookedMessage, from client: ClientInfo, worker: Int) -> HookAnswer<PublishDecision> {
        let n = Int64(String(buffer: message.payload)) ?? 0
        var changed = message
        changed.payload = ByteBuffer(string: "hooked \(n)")
        return later(max(0, 12 - n) * 4, n == 7 ? .drop : .change(changed))
    }
}

@Suite("Hooks that answer later (a script waiting on HTTP)")
struct LaterHookTests {
    @Test("CONNECT, SUBSCRIBE and PUBLISH in one write: the packets after CONNECT wait for its hooks, in order")
    func pipelinedBehindConnect() async throws {
        try await withBroker(hooks: LaterHooks()) { b in
            let c = try await TestClient.open(port: b.port)
            var bytes = ByteBuffer()
            bytes.writeMQTTPacket(.connect(ConnectPacket(clientID: "pipelined")))
            bytes.writeMQTTPacket(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "now/t", qos: .atMostOnce)])))
            bytes.writeMQTTPacket(.publish(PublishPacket(topic: "now/t", payload: "first")))
            c.sendRaw(Array(bytes.readableBytesView))
            guard case .connack(let connack) = try await c.expectPacket() else { throw TestFailure("no CONNACK first") }
            #expect(connack.returnCode == .accepted)
            guard case .suback(let suback) = try await c.expectPacket() else { throw TestFailure("no SUBACK second") }
            #expect(suback.value.returnCodes == [.granted(.atMostOnce)])
            #expect(String(buffer: try await c.expectPublish().payload) == "first")
        }
    }

    @Test("publish hooks that answer later, each sooner than the one before: the client's order is kept")
    func publishOrder() async throws {
        try await withBroker(hooks: LaterHooks()) { b in
            let sub = try await b.client("sub")
            try await sub.subscribe("later/#", qos: .atLeastOnce)
            let pub = try await b.client("pub")
            for n in 1...10 {
                pub.send(.publish(PublishPacket(topic: "later/x", payload: "\(n)", qos: .atLeastOnce, packetID: UInt16(n))))
            }
            var acked: [UInt16] = []
            while acked.count < 10 {
                guard case .puback(let id) = try await pub.expectPacket() else { throw TestFailure("expected PUBACK") }
                acked.append(id)
            }
            #expect(acked == Array(1...10))
            var got: [String] = []
            for _ in 1...9 { got.append(String(buffer: try await sub.expectPublish().payload)) }
            #expect(got == (1...10).filter { $0 != 7 }.map { "hooked \($0)" })
            try await sub.expectNothing()
        }
    }

    @Test("a client's EOF while its publish hooks answer: what it sent before goes out and is acknowledged, then the connection closes")
    func eofBehindHookedPublishes() async throws {
        try await withBroker(hooks: LaterHooks()) { b in
            let sub = try await b.client("sub")
            try await sub.subscribe("later/#", qos: .atMostOnce)
            let pub = try await b.client("pub")
            for n in 1...3 { pub.send(.publish(PublishPacket(topic: "later/x", payload: "\(n)", qos: .atLeastOnce, packetID: UInt16(n)))) }
            try await pub.closeOutput()
            var got: [String] = []
            for _ in 1...3 { got.append(String(buffer: try await sub.expectPublish().payload)) }
            #expect(got == ["hooked 1", "hooked 2", "hooked 3"])
            // Their acknowledgements come before the close (the client only shut its sending side).
            #expect(try await pub.expectClosed() == [.puback(packetID: 1), .puback(packetID: 2), .puback(packetID: 3)])
        }
    }

    @Test("SUBACK waits for every filter's answer and keeps their order")
    func subscribeAnswers() async throws {
        try await withBroker(hooks: LaterHooks()) { b in
            let c = try await b.client("c")
            let codes = try await c.subscribe([("slow/x", .atLeastOnce), ("fast/y", .atMostOnce), ("secret/z", .atMostOnce), ("now/w", .atMostOnce)])
            #expect(codes == [.granted(.atLeastOnce), .granted(.atMostOnce), .failure, .granted(.atMostOnce)])
        }
    }

    @Test("access rules that come later are enforced; a refusal that comes later is a CONNACK 5")
    func laterAuthAndACL() async throws {
        try await withBroker(hooks: LaterHooks()) { b in
            let bad = try await TestClient.open(port: b.port)
            #expect(try await bad.connect(ConnectPacket(clientID: "x", username: "bad")).returnCode == .notAuthorized)
            _ = try await bad.expectClosed()
            let limited = try await b.client("limited-1")
            #expect(try await limited.subscribe([("mine/a", .atMostOnce), ("other/a", .atMostOnce)]) == [.granted(.atMostOnce), .failure])
        }
    }

    @Test("a client that leaves while its connect hook waits is released; others are served meanwhile")
    func leaveWhileWaiting() async throws {
        let hooks = LaterHooks()
        try await withBroker(workers: 1, hooks: hooks) { b in
            let settled = b.broker.connectionObjectCount
            let fast = try await b.client("fast")
            let slow = try await TestClient.open(port: b.port)
            slow.send(.connect(ConnectPacket(clientID: "slow", username: "slow")))
            try await eventually("the slow CONNECT waits") { hooks.waitingAtGate == 1 }
            // The same worker answers another client while the slow hook has not answered (it
            // answers only when the gate opens, below).
            try await fast.ping()
            try await fast.publish("t", "x")
            try await fast.ping()
            await slow.abort()
            hooks.openGate()
            await fast.disconnect()
            try await eventually("every connection object released") { b.broker.connectionObjectCount == settled }
            _ = try await b.client("after")
        }
    }
}
