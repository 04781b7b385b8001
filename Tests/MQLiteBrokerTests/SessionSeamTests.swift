import Dispatch
import Foundation
import Logging
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Synchronization
import Testing

@testable import MQLiteBroker

/// An outbound that only records: a session's behaviour (window, queue, packet ids, re-sending)
/// is checked here without a socket.
final class RecordingOutbound: SessionOutbound {
    struct Sent: Equatable {
        var topic: String
        var payload: String
        var qos: QoS
        var packetID: UInt16?
        var retain: Bool
        var dup: Bool
    }

    var writable = true
    var sent: [Sent] = []
    var pubrels: [UInt16] = []
    var takeovers: [Bool] = []
    var pumpRequests = 0

    var canWrite: Bool { writable }

    func writePublish(_ message: Message, qos: QoS, packetID: UInt16?, retain: Bool, dup: Bool) {
        sent.append(Sent(topic: message.topic.string, payload: String(buffer: message.payload), qos: qos, packetID: packetID, retain: retain, dup: dup))
    }

    func writeQoS0(frame: ByteBuffer, message: Message) {
        let payload = message.payload
        var frame = frame
        var decoder = MQTTDecoder()
        guard case .publish(let p)? = try? decoder.decode(buffer: &frame) else {
            Issue.record("not a PUBLISH frame")
            return
        }
        let body = p.payload.readableBytes == 0 ? payload : p.payload
        sent.append(Sent(topic: String(buffer: p.topic), payload: String(buffer: body), qos: p.qos, packetID: nil, retain: p.retain, dup: p.dup))
    }

    func writePubrel(packetID: UInt16) { pubrels.append(packetID) }
    func pumpSoon() { pumpRequests += 1 }
    func takenOver(publishWill: Bool) { takeovers.append(publishWill) }
    func disconnect(reason: String) {}
    func reauthorize() {}
    func interceptDelivery(_ message: Message) -> Message? { message }
}

/// Records every session event, in order, as text.
final class RecordingObserver: SessionObserver {
    let events = Mutex<[String]>([])

    func session(_ session: Session, _ event: SessionEvent) {
        let text: String
        switch event {
        case .attached: text = "attached"
        case .subscribed(let filter, let grant, _): text = "subscribed \(filter) \(grant.qos.rawValue)"
        case .unsubscribed(let filter): text = "unsubscribed \(filter)"
        case .renamed: text = "renamed"
        case .queued(let d): text = "queued \(String(buffer: d.message.payload)) #\(d.seq)"
        case .inflightAdded(let id, let d, _): text = "inflight \(id) \(String(buffer: d.message.payload)) #\(d.seq)"
        case .released(let id, let seq): text = "released \(id) #\(seq)"
        case .acknowledged(let id, let seq): text = "acknowledged \(id) #\(seq)"
        case .discarded(let seq): text = "discarded #\(seq)"
        case .handedOver(let seq): text = "handed over #\(seq)"
        case .inboundQoS2(let id, let awaiting): text = "inbound \(id) \(awaiting)"
        case .detached: text = "detached"
        case .expired: text = "expired"
        case .ended: text = "ended"
        }
        events.withLock { $0.append("\(session.clientID): \(text)") }
    }

    func of(_ client: String) -> [String] {
        events.withLock { $0.filter { $0.hasPrefix(client + ": ") }.map { String($0.dropFirst(client.count + 2)) } }
    }
}

/// A broker without listeners whose worker 0 runs `body` on its loop, where sessions live. The
/// test awaits it (no thread of the test pool blocks meanwhile).
private func onWorker<T: Sendable>(
    configure: (inout Limits) -> Void = { _ in }, observer: (any SessionObserver)? = nil,
    _ body: @escaping @Sendable (Broker) throws -> T
) async throws -> T {
    var configuration = BrokerConfiguration(workers: 1, listeners: [])
    configure(&configuration.limits)
    var logger = Logger(label: "test")
    logger.logLevel = .critical
    let broker = Broker(configuration: configuration, hooks: NoHooks(), sessionObserver: observer, logger: logger)
    do {
        let result = try await broker.workers[0].loop.submit { try body(broker) }.get()
        await broker.shutdown()
        return result
    } catch {
        await broker.shutdown()
        throw error
    }
}

/// A context of its own for sessions made by a test: no broker, no loops (the owner is not
/// checked), a log that stays quiet.
private func standaloneContext(configure: (inout Limits) -> Void = { _ in }, observer: (any SessionObserver)? = nil) -> SessionContext {
    var limits = BrokerConfiguration(workers: 1, listeners: []).limits
    configure(&limits)
    var logger = Logger(label: "test")
    logger.logLevel = .critical
    return SessionContext(limits: limits, logger: logger, observer: observer)
}

private func delivery(_ payload: String, qos: QoS, topic: TopicName = "t") -> Delivery {
    Delivery(message: Message(topic: topic, payload: ByteBuffer(string: payload), qos: qos, retain: false), qos: qos, retain: false, frame: nil)
}

@Suite("Session seam: a session without a socket")
struct SessionSeamTests {
    @Test("inbound QoS 2: an id awaiting PUBREL makes a PUBLISH again a duplicate, until PUBREL or until the peer says it kept no session (a bridge's remote)")
    func inboundQoS2() {
        let session = Session(clientID: "in", persistent: true, owner: 0, context: standaloneContext())
        #expect(session.receivedQoS2(7))
        #expect(!session.receivedQoS2(7), "sent again before PUBREL: not delivered twice")
        session.released(inbound: 7)
        #expect(session.receivedQoS2(7), "after PUBREL the id is free")
        #expect(session.receivedQoS2(8))
        session.forgetInboundQoS2()
        #expect(session.receivedQoS2(7) && session.receivedQoS2(8), "a peer without a session sends new messages")
    }

    @Test("packet ids run 1...65535, wrap to 1 (never 0), and skip an id still in flight")
    func packetIDWrap() async throws {
        try await offThePool { () throws in
            let (first, ids, skipped) = {
                let session = Session(clientID: "wrap", persistent: false, owner: 0, context: standaloneContext { $0.maxInflight = 2 })
                let out = RecordingOutbound()
                session.outbound = out
                session.deliver(delivery("held", qos: .atLeastOnce))  // id 1, never acknowledged
                let held = out.sent[0].packetID!
                var ids: [UInt16] = []
                for i in 0..<(65535 + 10) {
                    session.deliver(delivery("m\(i)", qos: .atLeastOnce))
                    let id = out.sent.last!.packetID!
                    ids.append(id)
                    session.puback(id)
                }
                return (held, ids, ids.contains(held))
            }()
            #expect(first == 1)
            #expect(!ids.contains(0))
            #expect(!skipped, "an id in flight was given out again")
            #expect(ids.first == 2)
            let wrapAt = try #require(ids.firstIndex(of: 65535))
            #expect(wrapAt == 65533)
            #expect(ids[wrapAt + 1] == 2, "after 65535 comes 1, which is in flight, so 2")
            #expect(Set(ids[0...wrapAt]).count == wrapAt + 1)
        }
    }

    @Test("offline, a persistent session queues QoS 1/2 up to max_queued, drops the rest and QoS 0, and sends the queue in order on resume")
    func offlineQueueOverflow() throws {
        let observer = RecordingObserver()
        let context = standaloneContext(configure: { $0.maxQueued = 5; $0.maxInflight = 3 }, observer: observer)
        let (sent, dropped, events) = {
            let session = Session(clientID: "offline", persistent: true, owner: 0, context: context)
            session.isStored = true  // (as a store would: its owed messages are numbered)
            for i in 0..<8 { session.deliver(delivery("q\(i)", qos: i % 2 == 0 ? .atLeastOnce : .exactlyOnce)) }
            session.deliver(delivery("zero", qos: .atMostOnce))
            let out = RecordingOutbound()
            session.outbound = out
            session.resume()
            #expect(out.sent.count == 3, "the window is max_inflight")
            // Acknowledging opens the window for the rest of the queue.
            var acknowledged = 0
            while acknowledged < out.sent.count {
                let s = out.sent[acknowledged]
                if s.qos == .atLeastOnce {
                    session.puback(s.packetID!)
                } else {
                    session.pubrec(s.packetID!)
                    session.pubcomp(s.packetID!)
                }
                acknowledged += 1
            }
            return (out.sent, context.droppedMessages.load(ordering: .relaxed), observer.of("offline"))
        }()
        #expect(sent.map(\.payload) == ["q0", "q1", "q2", "q3", "q4"])
        #expect(sent.map(\.qos) == [.atLeastOnce, .exactlyOnce, .atLeastOnce, .exactlyOnce, .atLeastOnce])
        #expect(sent.allSatisfy { !$0.dup })
        #expect(dropped == 3)
        #expect(events.prefix(5) == ["queued q0 #1", "queued q1 #2", "queued q2 #3", "queued q3 #4", "queued q4 #5"])
        #expect(events.contains("inflight 1 q0 #1") && events.contains("released 2 #2") && events.contains("acknowledged 5 #5"))
        #expect(events.filter { $0.hasPrefix("inflight") }.count == 5)
        #expect(events.filter { $0.hasPrefix("acknowledged") }.count == 5)
        #expect(events.filter { $0.hasPrefix("released") }.count == 2)
    }

    @Test("a stored session's packet ids follow its messages' numbers: a queued message sent just before a crash the store did not hear of goes again under the id it had; numbers after a restore start half the id space on")
    func numberedPacketIDs() throws {
        let context = standaloneContext { $0.maxInflight = 10 }
        let session = Session(clientID: "numbered", persistent: true, owner: 0, context: context)
        session.isStored = true
        let out = RecordingOutbound()
        session.outbound = out
        for i in 0..<3 { session.deliver(delivery("m\(i)", qos: .exactlyOnce)) }
        #expect(out.sent.map(\.packetID) == [1, 2, 3])
        // After a crash: message 11 was queued (stored), then sent as id 11 (not stored); 12 to
        // 14 went straight out, their records lost. The client holds 11 to 14 awaiting PUBREL.
        let restored = Session(clientID: "numbered", persistent: true, owner: 0, context: context)
        restored.isStored = true
        var queued = delivery("A", qos: .exactlyOnce)
        queued.seq = 11
        restored.restore(inflight: [], queue: [queued], awaitingPubrel: [], lastSeq: 11, spread: 0)
        let again = RecordingOutbound()
        restored.outbound = again
        restored.resume()
        for i in 0..<3 { restored.deliver(delivery("n\(i)", qos: .exactlyOnce)) }
        #expect(again.sent.map(\.payload) == ["A", "n0", "n1", "n2"])
        #expect(again.sent.first?.packetID == 11, "the id it had")
        let after = again.sent.dropFirst().compactMap(\.packetID)
        #expect(after == [UInt16(11 + Session.restoredSeqGap + 1), UInt16(11 + Session.restoredSeqGap + 2), UInt16(11 + Session.restoredSeqGap + 3)])
        // An id still in flight is skipped: number 65,546 would be id 11 again.
        restored.restore(inflight: restored.inflight, queue: [], awaitingPubrel: [], lastSeq: 65_546 - 1 - Session.restoredSeqGap, spread: 0)
        restored.deliver(delivery("wrapped", qos: .atLeastOnce))
        #expect(again.sent.last?.payload == "wrapped" && again.sent.last?.packetID == 12)
        // Restored from the same last number again and again (crashes before anything of the
        // runs between was committed), the numbers start elsewhere each time, within the spread.
        var firstIDs = Set<UInt16>()
        for _ in 0..<10 {
            let again = Session(clientID: "numbered", persistent: true, owner: 0, context: context)
            again.isStored = true
            again.restore(inflight: [], queue: [], awaitingPubrel: [], lastSeq: 11)
            let out = RecordingOutbound()
            again.outbound = out
            again.deliver(delivery("first", qos: .exactlyOnce))
            let id = try #require(out.sent.first?.packetID)
            #expect(UInt64(id) > 11 + Session.restoredSeqGap && UInt64(id) <= 11 + Session.restoredSeqGap + Session.restoredSeqSpread)
            firstIDs.insert(id)
        }
        #expect(firstIDs.count > 1, "the same numbers after every restore")
    }

    @Test("a window full of QoS 1 queues the rest; on a new outbound, in-flight messages go again with DUP and PUBREL for released QoS 2")
    func resumeResends() throws {
        let (before, after, pubrels) = {
            let session = Session(clientID: "resume", persistent: true, owner: 0, context: standaloneContext { $0.maxInflight = 2 })
            let out = RecordingOutbound()
            session.outbound = out
            session.deliver(delivery("two", qos: .exactlyOnce))
            session.deliver(delivery("one", qos: .atLeastOnce))
            session.deliver(delivery("queued", qos: .atLeastOnce))
            session.pubrec(out.sent[0].packetID!)
            let before = out.sent
            session.disconnected()
            let again = RecordingOutbound()
            session.outbound = again
            session.resume()
            return (before, again.sent, again.pubrels)
        }()
        #expect(before.map(\.payload) == ["two", "one"])
        #expect(pubrels == [before[0].packetID!])
        #expect(after.map(\.payload) == ["one"])
        #expect(after.first?.dup == true && after.first?.packetID == before[1].packetID)
    }

    @Test("resume sends no more than the new connection's Receive Maximum (MQTT-4.9.0-2: the quota starts again); the rest, then the queue, go in order as acknowledgements make room; one the client acknowledges before it is sent again is done")
    func resumeWithinTheNewWindow() throws {
        let (first, second, afterAcks, ids) = {
            let session = Session(clientID: "rm", persistent: true, owner: 0, context: standaloneContext { $0.maxInflight = 10 })
            let out = RecordingOutbound()
            session.outbound = out
            for i in 0..<10 { session.deliver(delivery("m\(i)", qos: i == 3 ? .exactlyOnce : .atLeastOnce)) }
            session.deliver(delivery("queued", qos: .atLeastOnce))
            let ids = out.sent.map { $0.packetID! }
            session.disconnected()
            // Back with Receive Maximum 2: two go at once.
            session.setClientLimits(ClientLimits(receiveMaximum: 2))
            let again = RecordingOutbound()
            session.outbound = again
            session.resume()
            let first = again.sent.map(\.payload)
            // m3 (QoS 2) is acknowledged before it is sent again: PUBREC, then it waits for PUBCOMP.
            session.pubrec(ids[3])
            // Each PUBACK makes room for the next owed one, in order.
            session.puback(ids[0])
            let second = again.sent.map(\.payload)
            for i in [1, 2, 4, 5, 6, 7, 8, 9] { session.puback(ids[i]) }
            session.pubcomp(ids[3])
            return (first, second, again.sent, ids)
        }()
        #expect(first == ["m0", "m1"])
        #expect(second == ["m0", "m1"], "m3 holds the window's room while it waits for PUBCOMP: m2 waits for another acknowledgement")
        #expect(afterAcks.map(\.payload) == ["m0", "m1", "m2", "m4", "m5", "m6", "m7", "m8", "m9", "queued"])
        #expect(afterAcks.prefix(9).allSatisfy { $0.dup })
        #expect(afterAcks.prefix(9).map { $0.packetID! } == [0, 1, 2, 4, 5, 6, 7, 8, 9].map { ids[$0] })
        #expect(afterAcks.last?.dup == false)
    }

    @Test("a full socket queues; pump sends in order once it can write")
    func backPressure() throws {
        let sent = {
            let session = Session(clientID: "bp", persistent: false, owner: 0, context: standaloneContext())
            let out = RecordingOutbound()
            session.outbound = out
            out.writable = false
            for i in 0..<3 { session.deliver(delivery("m\(i)", qos: .atMostOnce)) }
            #expect(out.sent.isEmpty)
            out.writable = true
            session.deliver(delivery("m3", qos: .atMostOnce))  // behind the queue, not ahead of it
            session.pump()
            return out.sent.map(\.payload)
        }()
        #expect(sent == ["m0", "m1", "m2", "m3"])
    }

    @Test("retained messages come from the context's own store on SUBSCRIBE, walked in steps, each once, with RETAIN set")
    func retainedFromTheContext() throws {
        let store = TreeRetainedStore()
        for i in 0..<600 {
            store.set(topic: try TopicName("r/\(i)"), Message(topic: try TopicName("r/\(i)"), payload: ByteBuffer(string: "\(i)"), qos: .atLeastOnce, retain: true), within: .none)
        }
        var limits = BrokerConfiguration(workers: 1, listeners: []).limits
        limits.maxInflight = 1000
        let session = Session(clientID: "r", persistent: false, owner: 0, context: SessionContext(limits: limits, logger: Logger(label: "test"), retained: store))
        let out = RecordingOutbound()
        session.outbound = out
        session.sendRetained(matching: try TopicFilter("r/#"), qos: .atMostOnce)
        #expect(out.sent.count == 600)
        #expect(Set(out.sent.map(\.payload)) == Set((0..<600).map { "\($0)" }))
        #expect(out.sent.allSatisfy { $0.retain && $0.qos == .atMostOnce })
        #expect(!session.hasQueued)
    }
}

@Suite("Session registry")
struct SessionRegistryTests {
    @Test("one entry per client id, compared byte for byte: update inserts, replaces and removes, and a lookup finds a session by its id alone")
    func entries() {
        let registry = InMemorySessionRegistry()
        let context = standaloneContext()
        func session(_ id: String) -> Session { Session(clientID: id, persistent: false, owner: 0, context: context) }
        // Equal as Swift strings, two client ids as bytes.
        let composed = "caf\u{E9}", decomposed = "cafe\u{301}"
        let first = session(composed), other = session(decomposed)
        registry.update(clientID: composed) { #expect($0 == nil); $0 = first }
        registry.update(clientID: decomposed) { #expect($0 == nil); $0 = other }
        #expect(registry.count == 2)
        #expect(registry.session(for: composed) === first && registry.session(for: decomposed) === other)
        // A takeover's new session replaces the old one under the same id.
        let second = session(composed)
        let seen = registry.update(clientID: composed) { registered -> Session? in
            defer { registered = second }
            return registered
        }
        #expect(seen === first && registry.session(for: composed) === second && registry.count == 2)
        // Left as it was: nothing changes.
        registry.update(clientID: composed) { _ in }
        registry.update(clientID: "absent") { _ in }
        #expect(registry.session(for: composed) === second && registry.session(for: "absent") == nil && registry.count == 2)
        registry.update(clientID: decomposed) { $0 = nil }
        #expect(registry.session(for: decomposed) == nil && registry.session(for: composed) === second && registry.count == 1)
        // Many ids: each found, then all removed.
        let many = (0..<1000).map { session("client-\($0)") }
        for s in many { registry.update(clientID: s.clientID) { $0 = s } }
        #expect(many.allSatisfy { registry.session(for: $0.clientID) === $0 } && registry.count == 1001)
        for s in many { registry.update(clientID: s.clientID) { $0 = nil } }
        #expect(registry.count == 1 && registry.session(for: "client-7") == nil)
    }
}

@Suite("Grants")
struct GrantTests {
    @Test("merged in any order: the highest QoS and either Retain As Published for others' messages; for the subscriber's own, only what the subscriptions without No Local grant")
    func merging() {
        let noLocal = Grant(qos: .exactlyOnce, noLocal: true, retainAsPublished: true)
        let plain = Grant(qos: .atMostOnce), plainRAP = Grant(qos: .atLeastOnce, retainAsPublished: true)
        for order in [[noLocal, plain, plainRAP], [plain, noLocal, plainRAP], [plainRAP, plain, noLocal], [noLocal, plainRAP, plain]] {
            let merged = order.dropFirst().reduce(order[0]) { $0.merged(with: $1) }
            #expect(merged.qos == .exactlyOnce && merged.retainAsPublished && !merged.noLocal)
            #expect(merged.localQoS == .atLeastOnce && merged.localRetainAsPublished)
        }
        let mixed = noLocal.merged(with: plain)
        #expect(mixed.qos == .exactlyOnce && mixed.retainAsPublished && !mixed.noLocal)
        #expect(mixed.localQoS == .atMostOnce && !mixed.localRetainAsPublished)
        #expect(noLocal.merged(with: noLocal).noLocal, "only No Local ones: the subscriber's own messages do not go")
        #expect(plain.merged(with: plain) == plain)
    }
}

@Suite("Route cache")
struct RouteCacheTests {
    @Test("a subscription change drops only the cached routes its filter matches")
    func perFilterInvalidation() async throws {
        let cached = try await onWorker { broker in
            let worker = broker.workers[0]
            let a = Session(clientID: "a", persistent: false, owner: 0, context: broker.sessionContext)
            let b = Session(clientID: "b", persistent: false, owner: 0, context: broker.sessionContext)
            for topic in ["a/b", "c/d", "c/e", "$SYS/x"] {
                broker.subscribe(a, filter: try TopicFilter(topic), qos: .atMostOnce)
                _ = worker.route(for: try TopicName(topic))
            }
            var seen: [[String: Bool]] = []
            func snapshot() { seen.append(Dictionary(uniqueKeysWithValues: ["a/b", "c/d", "c/e", "$SYS/x"].map { ($0, worker.hasCachedRoute(for: $0)) })) }
            snapshot()
            broker.subscribe(b, filter: try TopicFilter("c/#"), qos: .atMostOnce)  // c/d and c/e; not $SYS (wildcard first level)
            snapshot()
            for topic in ["c/d", "c/e"] { _ = worker.route(for: try TopicName(topic)) }
            broker.unsubscribe(a, filter: try TopicFilter("a/b"))  // exactly a/b
            snapshot()
            broker.subscribe(b, filter: try TopicFilter("#"), qos: .atMostOnce)  // everything but $SYS/x
            snapshot()
            return seen
        }
        #expect(cached[0] == ["a/b": true, "c/d": true, "c/e": true, "$SYS/x": true])
        #expect(cached[1] == ["a/b": true, "c/d": false, "c/e": false, "$SYS/x": true])
        #expect(cached[2] == ["a/b": false, "c/d": true, "c/e": true, "$SYS/x": true])
        #expect(cached[3] == ["a/b": false, "c/d": false, "c/e": false, "$SYS/x": true])
    }
}

@Suite("Sessions across workers, and route caches")
struct CrossWorkerTests {
    @Test("a takeover on the other worker moves the session with its QoS 1/2 messages in flight and queued: each arrives once, in order")
    func takeoverMovesInflightAndQueue() async throws {
        try await withBroker(workers: 2, configure: { $0.limits.maxInflight = 2 }) { b in
            let pub = try await b.client("pub")
            let old = try await TestClient.open(port: b.port)
            _ = try await old.connect(ConnectPacket(cleanSession: false, clientID: "mover"))
            try await old.subscribe("mv/#", qos: .exactlyOnce)
            let firstOwner = try #require(b.broker.owner(ofClient: "mover"))
            try await pub.publish("mv/a", "a", qos: .atLeastOnce, id: 1)
            try await pub.publish("mv/b", "b", qos: .exactlyOnce, id: 2)
            try await pub.publish("mv/c", "c", qos: .atLeastOnce, id: 3)
            try await pub.publish("mv/d", "d", qos: .exactlyOnce, id: 4)
            let a = try await old.expectPublish()
            let bb = try await old.expectPublish()
            #expect([a, bb].map { String(buffer: $0.payload) } == ["a", "b"])
            old.send(.pubrec(packetID: bb.packetID!))
            #expect(try await old.expectPacket() == .pubrel(packetID: bb.packetID!))
            try await old.expectNothing(for: .milliseconds(100))  // c and d wait: the window is full

            // The next connection is accepted on the other worker (round robin after `old`).
            let new = try await TestClient.open(port: b.port)
            #expect(try await new.connect(ConnectPacket(cleanSession: false, clientID: "mover")).sessionPresent)
            _ = try await old.expectClosed()
            let newOwner = try #require(b.broker.owner(ofClient: "mover"))
            #expect(newOwner != firstOwner, "the session did not move: the test proves nothing")

            // In flight first, in their original order (MQTT-4.4.0-1): the QoS 1 again with DUP,
            // then PUBREL for the released QoS 2.
            let again = try await new.expectPublish()
            #expect(String(buffer: again.payload) == "a" && again.dup && again.packetID == a.packetID)
            #expect(try await new.expectPacket() == .pubrel(packetID: bb.packetID!))
            new.send(.puback(packetID: a.packetID!))
            new.send(.pubcomp(packetID: bb.packetID!))
            let c = try await new.expectPublish()
            let d = try await new.expectPublish()
            #expect([c, d].map { String(buffer: $0.payload) } == ["c", "d"])
            #expect(!c.dup && !d.dup)
            new.send(.puback(packetID: c.packetID!))
            new.send(.pubrec(packetID: d.packetID!))
            #expect(try await new.expectPacket() == .pubrel(packetID: d.packetID!))
            new.send(.pubcomp(packetID: d.packetID!))
            try await new.expectNothing()

            // Live messages reach it on its new worker.
            try await pub.publish("mv/live", "live", qos: .atLeastOnce, id: 5)
            #expect(String(buffer: try await new.expectPublish().payload) == "live")
        }
    }

    @Test("a persistent session taken over on the other worker expires there once its new client goes, not from the old worker's list")
    func takeoverThenExpiry() async throws {
        try await withBroker(workers: 2, configure: { $0.limits.sessionExpiry = .milliseconds(400) }) { b in
            for i in 0..<3 {
                let old = try await b.client("moving\(i)", clean: false)
                let new = try await b.client("moving\(i)", clean: false)  // the other worker: the session moves
                try await old.expectClosed()
                try await Task.sleep(for: .milliseconds(600))  // past the expiry: online, so kept
                #expect(b.broker.registry.session(for: "moving\(i)") != nil)
                await new.disconnect()
            }
            try await eventually("expired", timeout: .seconds(5)) { b.broker.registry.count == 0 }
        }
    }

    @Test("a cached route follows subscription changes on any worker: new exact and wildcard subscribers, unsubscribe, session end, and a flood of changes")
    func routeCacheInvalidation() async throws {
        try await withBroker(workers: 2) { b in
            let pub = try await b.client("pub")
            let s1 = try await b.client("s1")
            try await s1.subscribe("ri/x")
            try await pub.publish("ri/x", "1")  // the route is cached on pub's worker now
            #expect(String(buffer: try await s1.expectPublish().payload) == "1")

            let s2 = try await b.client("s2")
            try await s2.subscribe("ri/x")
            try await pub.publish("ri/x", "2")
            #expect(String(buffer: try await s1.expectPublish().payload) == "2")
            #expect(String(buffer: try await s2.expectPublish().payload) == "2")

            let s3 = try await b.client("s3")
            try await s3.subscribe("ri/+")
            try await pub.publish("ri/x", "3")
            for s in [s1, s2, s3] { #expect(String(buffer: try await s.expectPublish().payload) == "3") }

            s1.send(.unsubscribe(UnsubscribePacket(packetID: 9, filters: ["ri/x"])))
            #expect(try await s1.expectPacket() == .unsuback(packetID: 9))
            try await pub.publish("ri/x", "4")
            for s in [s2, s3] { #expect(String(buffer: try await s.expectPublish().payload) == "4") }
            try await s1.expectNothing(for: .milliseconds(100))

            await s2.disconnect()
            try await eventually("s2 gone") { b.broker.owner(ofClient: "s2") == nil }
            try await pub.publish("ri/x", "5")
            #expect(String(buffer: try await s3.expectPublish().payload) == "5")

            // More changes at once than a worker tracks one by one: its whole cache is dropped.
            let s4 = try await b.client("s4")
            let many = (0..<1500).map { ("many/\($0)", QoS.atMostOnce) } + [("ri/#", .atMostOnce)]
            #expect(try await s4.subscribe(many).count == 1501)
            try await pub.publish("ri/x", "6")
            for s in [s3, s4] { #expect(String(buffer: try await s.expectPublish().payload) == "6") }
            try await s1.expectNothing(for: .milliseconds(100))
        }
    }
}

@Suite("Worker mailbox")
struct MailboxTests {
    @Test("a publisher waiting for a full mailbox is always woken: posts from another thread racing the drains, every wait ends")
    func drainWakesEveryWaiter() async throws {
        var configuration = BrokerConfiguration(workers: 1, listeners: [])
        configuration.limits.maxQueued = 1000  // high water 250, low water 62
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let broker = Broker(configuration: configuration, hooks: NoHooks(), logger: logger)
        let worker = broker.workers[0]
        let session = Session(clientID: "m", persistent: false, owner: 0, context: broker.sessionContext)
        let message = delivery("x", qos: .atMostOnce)
        // Off the loop, as another worker posts: a batch over the low-water mark, then a wait
        // for the drain. A count left stale by a drain racing the post, or a wake-up lost
        // between the check and the registration, would leave a wait unanswered.
        let missed = await withCheckedContinuation { (done: CheckedContinuation<Int, Never>) in
            Thread.detachNewThread {
                var missed = 0
                var batch: [(Session, Delivery)] = []
                for _ in 0..<3000 {
                    for _ in 0..<2 {  // the second lands while the drain the first asked for may run
                        batch.append(contentsOf: repeatElement((session, message), count: 100))
                        worker.post(batch: &batch)
                    }
                    let woken = DispatchSemaphore(value: 0)
                    worker.whenMailboxDrains { woken.signal() }
                    if woken.wait(timeout: .now() + 2) == .timedOut { missed += 1 }
                }
                done.resume(returning: missed)
            }
        }
        #expect(missed == 0)
        #expect(!worker.mailboxIsFull)
        await broker.shutdown()
    }
}

@Suite("Shared subscriptions: one member of a group gets each message")
struct SharedSubscriptionTests {
    private static func member(_ id: String, _ broker: Broker, filter: String, qos: QoS = .atLeastOnce, connected: Bool = true) throws -> (Session, RecordingOutbound) {
        let session = Session(clientID: id, persistent: !connected, owner: 0, context: broker.sessionContext)
        session.isStored = true  // (as a store would: its owed messages are numbered)
        let out = RecordingOutbound()
        if connected { session.outbound = out }
        broker.subscribe(session, filter: try TopicFilter(filter), qos: qos)
        return (session, out)
    }

    private static func publish(_ broker: Broker, _ payload: String, topic: TopicName = "t/x", qos: QoS = .atLeastOnce) {
        broker.workers[0].publish(Message(topic: topic, payload: ByteBuffer(string: payload), qos: qos, retain: false))
    }

    @Test("in turn among the connected members (an offline one gets nothing while one is connected); plain subscribers and each other group get every message")
    func roundRobin() async throws {
        let (members, offlineQueued, plain, other) = try await onWorker { broker in
            let a = try Self.member("a", broker, filter: "$share/g/t/#")
            let b = try Self.member("b", broker, filter: "$share/g/t/+")  // another group: filters differ
            let c = try Self.member("c", broker, filter: "$share/g/t/#")
            let away = try Self.member("away", broker, filter: "$share/g/t/#", connected: false)
            let plain = try Self.member("plain", broker, filter: "t/#")
            for i in 0..<6 { Self.publish(broker, "p\(i)") }
            return ([a.1, c.1].map { $0.sent.map(\.payload) }, away.0.queue.count, plain.1.sent.count, b.1.sent.map(\.payload))
        }
        #expect(members == [["p0", "p2", "p4"], ["p1", "p3", "p5"]])
        #expect(offlineQueued == 0)
        #expect(plain == 6)
        #expect(other == ["p0", "p1", "p2", "p3", "p4", "p5"])
    }

    @Test("a member that goes hands what its client did not acknowledge (in flight before PUBREC, and queued) to another member; a QoS 2 message past PUBREC stays")
    func handOver() async throws {
        let observer = RecordingObserver()
        let (kept, received, qos) = try await onWorker(configure: { $0.maxInflight = 2 }, observer: observer) { broker in
            let (a, outA) = try Self.member("a", broker, filter: "$share/g/t/#", qos: .exactlyOnce)
            let (b, outB) = try Self.member("b", broker, filter: "$share/g/t/#", qos: .atLeastOnce)
            for i in 0..<8 { Self.publish(broker, "p\(i)", qos: .exactlyOnce) }
            // a: p0, p2 in flight, p4, p6 queued; PUBREC for p0.
            #expect(outA.sent.map(\.payload) == ["p0", "p2"])
            a.pubrec(outA.sent[0].packetID!)
            // b acknowledges all it gets (granted QoS 1).
            var acknowledged = 0
            func acknowledge() {
                while acknowledged < outB.sent.count {
                    b.puback(outB.sent[acknowledged].packetID!)
                    acknowledged += 1
                }
            }
            acknowledge()
            a.disconnected()
            broker.handOverShared(from: a, worker: broker.workers[0])
            acknowledge()
            return (a.inflight.map(\.released), outB.sent.map(\.payload), Set(outB.sent.map(\.qos)))
        }
        #expect(kept == [true], "the QoS 2 message past PUBREC stays with its session")
        #expect(received == ["p1", "p3", "p5", "p7", "p2", "p4", "p6"])
        #expect(qos == [.atLeastOnce], "at the QoS the receiving member was granted")
        #expect(observer.of("a").filter { $0.hasPrefix("handed over") } == ["handed over #2", "handed over #3", "handed over #4"])
    }

    @Test("a group goes with its last member: routes are dropped, the index's nodes pruned")
    func groupsGo() async throws {
        let (nodesWith, nodesAfter, delivered) = try await onWorker { broker in
            let (a, outA) = try Self.member("a", broker, filter: "$share/g/deep/a/b/c")
            Self.publish(broker, "before", topic: "deep/a/b/c")
            let nodesWith = broker.subscriptionNodeCount
            broker.unsubscribe(a, filter: try TopicFilter("$share/g/deep/a/b/c"))
            Self.publish(broker, "after", topic: "deep/a/b/c")
            return (nodesWith, broker.subscriptionNodeCount, outA.sent.map(\.payload))
        }
        #expect(nodesWith == 4)
        #expect(nodesAfter == 0)
        #expect(delivered == ["before"])
    }

    @Test("ACLs judge the filter inside the share: allowed as the plain filter would be, denied topics under it held back")
    func acl() throws {
        let acl = ClientACL([ACLTable(subscribe: ["open/#", "$x/#"], deny: ["open/secret"])], clientID: "c", username: nil)
        #expect(acl.allowsSubscribe(filter: try TopicFilter("$share/g/open/+")))
        #expect(acl.allowsSubscribe(filter: try TopicFilter("$share/g/$x/y")))
        #expect(!acl.allowsSubscribe(filter: try TopicFilter("$share/g/closed/#")))
        #expect(!acl.allowsSubscribe(filter: try TopicFilter("$share/open/#")), "share name open, filter #")
        #expect(!acl.allowsSubscribe(filter: try TopicFilter("$share/g/open/secret")))
    }

    @Test("a member with a backlog (a client that stopped reading) is passed over while another can take the message; when it goes, its backlog goes to the others")
    func backlog() async throws {
        let (stuckSent, stuckQueued, other, afterwards) = try await onWorker(configure: { $0.maxInflight = 2 }) { broker in
            let (stuck, outStuck) = try Self.member("stuck", broker, filter: "$share/g/t/#")
            let (_, outOther) = try Self.member("other", broker, filter: "$share/g/t/#", qos: .atMostOnce)
            outStuck.writable = false  // its socket is full: what it gets waits in its queue
            for i in 0..<10 { Self.publish(broker, "p\(i)") }
            let sent = outStuck.sent.count, queued = stuck.queue.count, other = outOther.sent.map(\.payload)
            stuck.disconnected()
            broker.endSession(stuck, worker: broker.workers[0])
            return (sent, queued, other, outOther.sent.map(\.payload))
        }
        #expect(stuckSent == 0 && stuckQueued == 1, "one message, then it has a backlog")
        #expect(other == ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"])
        #expect(afterwards == other + ["p0"])
    }

    @Test("a delivery that reaches a member through the mailbox after its client went goes to another member; a discarded offline member's queue too")
    func goneOnTheWay() async throws {
        var configuration = BrokerConfiguration(workers: 1, listeners: [])
        configuration.limits.maxInflight = 10
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let broker = Broker(configuration: configuration, hooks: NoHooks(), logger: logger)
        let loop = broker.workers[0].loop
        let out = try await loop.submit { () throws -> RecordingOutbound in
            let (gone, _) = try Self.member("gone", broker, filter: "$share/g/t/#")
            let (away, _) = try Self.member("away", broker, filter: "$share/g/t/#", connected: false)
            let (_, out) = try Self.member("here", broker, filter: "$share/g/t/#")
            let group = try #require(broker.sharedGroups(matching: "t/x").first)
            func delivery(_ payload: String) -> Delivery {
                Delivery(message: Message(topic: "t/x", payload: ByteBuffer(string: payload), qos: .atLeastOnce, retain: false),
                         qos: .atLeastOnce, retain: false, frame: nil, group: group)
            }
            // Posted (as from another worker) while "gone" was connected; it goes before the drain.
            broker.workers[0].post(gone, delivery("on its way"))
            gone.disconnected()
            broker.endSession(gone, worker: broker.workers[0])
            // The offline persistent member holds a message, then its session is discarded.
            _ = away.deliver(delivery("queued offline"))
            broker.endSession(away, worker: broker.workers[0])
            return out
        }.get()
        let received = try await loop.submit { out.sent.map(\.payload) }.get()  // after the mailbox's drain
        await broker.shutdown()
        #expect(received.sorted() == ["on its way", "queued offline"])
    }

    @Test("thousands of offline members: a pick does not walk them (a few looked at per pick); the connected member gets every message, one that reconnects is found again, and with none connected the offline ones take turns")
    func manyOffline() throws {
        let context = standaloneContext()
        let group = SharedGroup(SharedFilter(group: "g", filter: try TopicFilter("t")))
        let offline = (0..<10_000).map { Session(clientID: "off\($0)", persistent: true, owner: 0, context: context) }
        let here = Session(clientID: "here", persistent: false, owner: 0, context: context)
        here.outbound = RecordingOutbound()
        for session in offline { group.add(session, grant: Grant(qos: .atLeastOnce)) }
        group.add(here, grant: Grant(qos: .atLeastOnce))
        // The first picks find the offline members gone, once each; after that a pick looks at a few.
        for _ in 0..<2 { _ = group.pick() }
        let before = group.looked
        var picked: [Session] = []
        for _ in 0..<1_000 { picked.append(try #require(group.pick()).session) }
        #expect(picked.allSatisfy { $0 === here })
        #expect(group.looked - before <= 5_000, "a pick walked the offline members: \(group.looked - before) looked at for 1,000 picks")
        // One comes back: within (offline members / looked at per pick) picks it has its turns again.
        offline[1234].outbound = RecordingOutbound()
        var back = 0
        for _ in 0..<12_000 where try #require(group.pick()).session === offline[1234] { back += 1 }
        #expect(back > 1_000, "the reconnected member was not found again (\(back) picks)")
        // None connected: the offline members take turns (each queues what it gets).
        here.outbound = nil
        offline[1234].outbound = nil
        var seen = Set<ObjectIdentifier>()
        for _ in 0..<100 { seen.insert(ObjectIdentifier(try #require(group.pick(excluding: offline[0])).session)) }
        #expect(seen.count == 100)
        #expect(!seen.contains(ObjectIdentifier(offline[0])))
        // Taking members out (from either list) leaves the rest.
        #expect(!group.remove(here))
        #expect(!group.remove(offline[5]))
        #expect(group.memberCount == 9_999)
        for session in offline { _ = group.remove(session) }
        #expect(group.memberCount == 0)
        #expect(group.pick() == nil)
    }
}
