import MQLiteBroker
import MQTTCore
import MQLiteTestSupport
import NIOCore
import Testing

private func levels(_ level: String, _ count: Int) -> String {
    Array(repeating: level, count: count).joined(separator: "/")
}

/// The tests that load the machine (100,000 retained messages, 20,000 publishes, topics of
/// tens of thousands of levels), one at a time, so that together they do not starve the
/// timing-sensitive tests (keep-alive) that run in parallel with them.
@Suite(.serialized) struct HeavyBrokerTests {}

/// Publish hooks that rewrite `deep/out` to a topic of 201 levels, and a subscribe hook that
/// rewrites `deep/in` to a filter of 201 levels.
final class DeepRewriteHooks: BrokerHooks {
    func authorizeSubscribe(_ request: SubscribeRequest, worker: Int) -> HookAnswer<SubscribeDecision> { .now(subscribeNow(request)) }

    func subscribeNow(_ request: SubscribeRequest) -> SubscribeDecision {
        request.filter == "deep/in" ? .rewrite(filter: levels("+", 201), qos: .atMostOnce) : .allow
    }

    func isPublishHooked(topic: TopicName, worker: Int) -> Bool {
        topic.bytes.readableBytesView.elementsEqual("deep/out".utf8)
    }

    func interceptPublish(_ message: HookedMessage, from client: ClientInfo, worker: Int) -> HookAnswer<PublishDecision> {
        .now(interceptNow(message, from: client))
    }

    func interceptNow(_ message: HookedMessage, from client: ClientInfo) -> PublishDecision {
        .change(HookedMessage(topic: try! TopicName(levels("x", 201)), payload: message.payload, qos: message.qos, retain: false))
    }
}

extension HeavyBrokerTests {
    @Suite("Deep topics")
    struct TopicLimitTests {
        @Test("17,000-level filter with max_topic_levels 100,000: subscribe, publish, deliver; the broker survives")
        func deepFilterDelivers() async throws {
            try await withBroker(configure: { $0.limits.maxTopicLevels = 100_000 }) { b in
                let sub = try await b.client("sub")
                try await sub.subscribe(levels("+", 17_000))
                let pub = try await b.client("pub")
                let topic = levels("a", 17_000)
                try await pub.publish(topic, "deep", qos: .atLeastOnce)
                let p = try await sub.expectPublish(timeout: .seconds(20))
                #expect(p.topic.readableBytes == topic.utf8.count)
                #expect(String(buffer: p.payload) == "deep")
                try await pub.ping()
            }
        }

        @Test("45,000-level filters with max_topic_levels 100,000: unsubscribe and disconnect remove them; the broker survives")
        func deepUnsubscribeAndDisconnect() async throws {
            try await withBroker(configure: { $0.limits.maxTopicLevels = 100_000 }) { b in
                // Empty levels: an MQTT string holds at most 65,535 bytes.
                let filterA = String(repeating: "/", count: 44_999)
                let filterB = "b" + filterA
                let sub = try await b.client("sub")
                #expect(try await sub.subscribe([(filterA, .atMostOnce), (filterB, .atMostOnce)]) == [.granted(.atMostOnce), .granted(.atMostOnce)])
                #expect(b.broker.subscriptionNodeCount == 90_000)
                sub.send(.unsubscribe(UnsubscribePacket(packetID: 2, filters: [filterA])))
                #expect(try await sub.expectPacket(timeout: .seconds(20)) == .unsuback(packetID: 2))
                #expect(b.broker.subscriptionNodeCount == 45_000)
                await sub.abort()
                try await eventually("the session's subscriptions are removed", timeout: .seconds(20)) { b.broker.subscriptionNodeCount == 0 }
                let other = try await b.client("other")
                try await other.subscribe("x")
                try await other.publish("x", "alive")
                #expect(String(buffer: try await other.expectPublish().payload) == "alive")
            }
        }

        @Test("default max_topic_levels 200: PUBLISH, SUBSCRIBE, UNSUBSCRIBE and will over it close the connection, logged; 200 is fine")
        func defaultLimit() async throws {
            try await withBroker { b in
                let watcher = try await b.client("watcher")
                try await watcher.subscribe("#")
                let ok = try await b.client("ok")
                try await ok.subscribe(levels("+", 200))
                try await ok.publish(levels("a", 200), "fine")
                #expect(String(buffer: try await watcher.expectPublish().payload) == "fine")

                let over = levels("a", 201)
                let overFilter = levels("+", 201)
                let offenders: [(String, MQTTPacket)] = [
                    ("p", .publish(PublishPacket(topic: over, payload: "x"))),
                    ("s", .subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: overFilter, qos: .atMostOnce)]))),
                    ("u", .unsubscribe(UnsubscribePacket(packetID: 1, filters: [overFilter]))),
                ]
                for (id, packet) in offenders {
                    let c = try await b.client(id)
                    c.send(packet)
                    let before = try await c.expectClosed()
                    #expect(before.isEmpty, "\(id) got \(before)")
                }
                let w = try await TestClient.open(port: b.port)
                w.send(.connect(ConnectPacket(clientID: "w", will: Will(topic: try TopicName(over), payload: ByteBuffer(string: "w"), qos: .atMostOnce, retain: false))))
                #expect(try await w.expectClosed().isEmpty)
                let logged = b.logMessages.filter { $0.contains("topic of 201 levels is over max_topic_levels 200") }
                #expect(logged.count == 4, "\(b.logMessages)")
                // Nothing got through, and the broker serves the others.
                try await watcher.ping()
                try await watcher.expectNothing()
                try await ok.publish("still/here", "yes")
                #expect(String(buffer: try await watcher.expectPublish().payload) == "yes")
            }
        }

        @Test("topics from hooks respect max_topic_levels: a rewritten publish or subscribe over it is refused and logged")
        func hookTopics() async throws {
            try await withBroker(hooks: DeepRewriteHooks()) { b in
                let watcher = try await b.client("watcher")
                try await watcher.subscribe("#")
                let c = try await b.client("c")
                #expect(try await c.subscribe([("deep/in", .atMostOnce)]) == [.failure])
                try await c.publish("deep/out", "x", qos: .atLeastOnce)
                try await watcher.ping()
                try await watcher.expectNothing()
                #expect(b.logMessages.contains { $0.contains("subscribe hook produced an invalid filter") && $0.contains("over max_topic_levels 200") })
                #expect(b.logMessages.contains { $0.contains("publish hook produced an invalid topic") && $0.contains("over max_topic_levels 200") })
                #expect(throws: MQTTProtocolError.tooManyTopicLevels(levels: 201, limit: 200)) {
                    try b.broker.publish(topic: levels("x", 201), payload: ByteBuffer(string: "p"), qos: .atMostOnce, retain: false, worker: 0)
                }
                #expect(b.logMessages.contains { $0.contains("plugin publish rejected") })
                try await c.ping()
            }
        }
    }
}
