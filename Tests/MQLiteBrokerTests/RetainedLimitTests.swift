import Foundation
@testable import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// `[limits] max_retained` and `max_retained_bytes`: no client grows the retained store at will.
@Suite("Retained limits")
struct RetainedLimitTests {
    private func message(_ topic: String, _ payload: String) throws -> (TopicName, Message) {
        let name = try TopicName(topic)
        return (name, Message(topic: name, payload: ByteBuffer(string: payload), qos: .atMostOnce, retain: true))
    }

    @Test("the store: past max_retained a new topic is refused, a replacement is taken; a removal makes room; the broker's $SYS topics are not limited")
    func count() throws {
        let store = TreeRetainedStore()
        let limits = RetainedLimits(maxCount: 2, maxBytes: 0)
        for topic in ["a", "b"] {
            let (name, m) = try message(topic, "1")
            #expect(store.set(topic: name, m, within: limits) == .kept)
        }
        let (c, mc) = try message("c", "1")
        #expect(store.set(topic: c, mc, within: limits) == .refused(cleared: false))
        // The broker's own topics are neither limited nor counted; a client's $SYS/... one is.
        let (sys, ms) = try message("$SYS/broker/uptime", "1")
        #expect(store.set(topic: sys, ms, within: limits) == .kept)
        let (forged, mf) = try message("$SYS/broker/connection/x/state", "1")
        #expect(store.set(topic: forged, mf, within: limits) == .refused(cleared: false))
        store.remove(topic: sys)
        let (a, ma) = try message("a", "replaced")
        #expect(store.set(topic: a, ma, within: limits) == .kept)
        #expect(store.count == 2 && store.nodeCount == 2)
        store.remove(topic: a)
        #expect(store.set(topic: c, mc, within: limits) == .kept)
        #expect(store.count == 2)
    }

    @Test("the store: max_retained_bytes counts bytes and tree nodes; a replacement that does not fit clears the topic; all back to 0 once removed")
    func bytes() throws {
        let store = TreeRetainedStore()
        let node = RetainedLimits.nodeBytes
        let (a, small) = try message("a", "x")
        #expect(store.set(topic: a, small, within: .none) == .kept)
        #expect(store.heldBytes == small.size + node)
        // Room for one more node and about 100 bytes.
        let limits = RetainedLimits(maxCount: 0, maxBytes: store.heldBytes + node + 100)
        let (b, fits) = try message("b", String(repeating: "y", count: 90))
        #expect(store.set(topic: b, fits, within: limits) == .kept)
        // A deep topic: one node per level, whatever its few bytes.
        let (deep, tiny) = try message(Array(repeating: "d", count: 10).joined(separator: "/"), "z")
        #expect(store.set(topic: deep, tiny, within: limits) == .refused(cleared: false))
        #expect(store.nodeCount == 2, "the refused topic's nodes are pruned")
        // b replaced by more than fits: b is gone (no stale message left), its bytes given back.
        let (_, big) = try message("b", String(repeating: "y", count: 400))
        #expect(store.set(topic: b, big, within: limits) == .refused(cleared: true))
        #expect(store.count == 1 && store.heldBytes == small.size + node)
        store.remove(topic: a)
        #expect(store.count == 0 && store.heldBytes == 0 && store.nodeCount == 0)
    }

    @Test("the store: at a limit, messages whose expiry passed are dropped (nobody gets them) before a new one is refused")
    func expiredMakeRoom() throws {
        let store = TreeRetainedStore()
        let limits = RetainedLimits(maxCount: 2, maxBytes: 0)
        for topic in ["old/a", "old/b"] {
            var (name, m) = try message(topic, "1")
            m.properties.messageExpiresAt = NIODeadline.now().uptimeNanoseconds - 1
            #expect(store.set(topic: name, m, within: limits) == .kept)
        }
        let (c, mc) = try message("new", "1")
        #expect(store.set(topic: c, mc, within: limits) == .kept)
        #expect(store.count == 1 && store.heldBytes == mc.size + RetainedLimits.nodeBytes)
    }

    @Test("the store: over a limit lowered since its messages were kept, it takes replacements no larger, and no new topic")
    func loadedOverTheLimit() throws {
        let tree = RetainedTree<Message>()
        for topic in ["a", "b", "c"] {
            let (_, m) = try message(topic, "123")
            tree.set(topic, m)
        }
        let store = TreeRetainedStore(tree)
        #expect(store.heldBytes == 3 * (4 + RetainedLimits.nodeBytes))
        let limits = RetainedLimits(maxCount: 1, maxBytes: 1)
        let (a, same) = try message("a", "456")
        #expect(store.set(topic: a, same, within: limits) == .kept)
        let (_, larger) = try message("a", "4567")
        #expect(store.set(topic: a, larger, within: limits) == .refused(cleared: true))
        let (d, m) = try message("d", "1")
        #expect(store.set(topic: d, m, within: limits) == .refused(cleared: false))
        #expect(store.count == 2)
    }

    @Test("a client past max_retained: its message is delivered and acknowledged but not kept; counted; a cleared topic makes room")
    func broker() async throws {
        try await withBroker(configure: { $0.limits.maxRetained = 2 }) { b in
            let live = try await b.client("live")
            try await live.subscribe("r/#")
            let pub = try await b.client("pub")
            for (i, topic) in ["r/a", "r/b", "r/c"].enumerated() {
                try await pub.publish(topic, topic, qos: .atLeastOnce, retain: true, id: UInt16(i + 1))
                #expect(String(buffer: try await live.expectPublish().topic) == topic)
            }
            #expect(b.broker.retainedCount == 2)
            #expect(b.broker.retainedRefused.load(ordering: .relaxed) == 1)
            let late = try await b.client("late")
            try await late.subscribe("r/#")
            var kept: Set<String> = []
            for _ in 0..<2 { kept.insert(String(buffer: try await late.expectPublish().topic)) }
            try await late.expectNothing()
            #expect(kept == ["r/a", "r/b"])
            // One warning in 10 s, whatever is kept meanwhile (a $SYS topic, a replacement): a
            // client alternating replacements and new topics gets no line per PUBLISH.
            try b.broker.publish(topic: "$SYS/broker/test", payload: ByteBuffer(string: "x"), qos: .atMostOnce, retain: true, worker: 0)
            try await pub.publish("r/b", "again", qos: .atLeastOnce, retain: true, id: 7)
            try await pub.publish("r/d", "r/d", qos: .atLeastOnce, retain: true, id: 8)
            #expect(b.logMessages.filter { $0.contains("retained messages at their limit") }.count == 1)
            try await pub.publish("r/a", "", qos: .atLeastOnce, retain: true, id: 9)
            try await pub.publish("r/c", "r/c", qos: .atLeastOnce, retain: true, id: 10)
            #expect(b.broker.retainedCount == 3 && b.broker.retainedRefused.load(ordering: .relaxed) == 2)
        }
    }

    @Test("with a store, a refused replacement clears the topic on disk too")
    func persisted() async throws {
        try await PersistenceTests.withFolder { folder in
            let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withBroker(configure: { $0.persistence = store; $0.limits.maxRetainedBytes = 2 * RetainedLimits.nodeBytes + 100 }) { b in
                let pub = try await b.client("pub")
                try await pub.publish("a", "kept", qos: .atLeastOnce, retain: true)
                try await pub.publish("b", "x", qos: .atLeastOnce, retain: true, id: 2)
                try await pub.publish("b", String(repeating: "y", count: 200), qos: .atLeastOnce, retain: true, id: 3)
                #expect(b.broker.retainedCount == 1)
            }
            let reopened = try PersistentStore(configuration: store, logger: PersistenceTests.logger)
            defer { reopened.close() }
            #expect(reopened.loaded.retained == 1)
        }
    }
}

extension HeavyBrokerTests {
    @Suite("Retained limits under load")
    struct RetainedLimitLoadTests {
        @Test("500 retained messages on distinct 50-level topics (25,000 tree nodes) against max_retained_bytes = 256 KiB: the store stays within it")
        func deepTopics() async throws {
            try await withBroker(configure: { $0.limits.maxRetainedBytes = 1 << 18 }) { b in
                let pub = try await b.client("pub")
                for i in 0..<500 {
                    let topic = (0..<50).map { "\(i)-\($0)" }.joined(separator: "/")
                    pub.send(.publish(PublishPacket(topic: ByteBuffer(string: topic), payload: ByteBuffer(string: "x"), qos: .atMostOnce, retain: true)))
                }
                try await pub.ping(timeout: .seconds(30))
                #expect(b.broker.retained.heldBytes <= 1 << 18)
                #expect(b.broker.retained.nodeCount <= (1 << 18) / RetainedLimits.nodeBytes)
                #expect(b.broker.retainedCount > 0)
                #expect(b.broker.retainedRefused.load(ordering: .relaxed) == 500 - b.broker.retainedCount)
            }
        }
    }
}
