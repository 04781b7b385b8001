import MQLiteBroker
import MQTTCore
import MQLiteTestSupport
import NIOCore
import Testing

extension HeavyBrokerTests {
    @Suite("Retained store")
    struct RetainedStoreTests {
        @Test("100,000 retained: a SUBSCRIBE of 1,000 filters is answered in well under a second, and a retained publish on another connection meanwhile is served")
        func subscribeCostsWhatItMatches() async throws {
            try await withBroker { b in
                // Seeded through the broker's own publish API (what plugins use): r/<0..99>/<0..999>.
                for i in 0..<100_000 {
                    try b.broker.publish(
                        topic: "r/\(i / 1000)/\(i % 1000)", payload: ByteBuffer(string: "\(i)"), qos: .atMostOnce, retain: true, worker: i)
                }
                try await eventually("100,000 retained", timeout: .seconds(60)) { b.broker.retainedCount == 100_000 }
                let sub = try await b.client("sub")
                let other = try await b.client("other")
                // 1,000 filters, each matching exactly one retained message (r/k%100/k).
                let filters = (0..<1000).map { ("r/\($0 % 100)/\($0)", QoS.atMostOnce) }
                let clock = ContinuousClock()
                let start = clock.now
                sub.send(.subscribe(SubscribePacket(packetID: 7, subscriptions: filters.map { Subscription(filter: $0.0, qos: $0.1) })))
                // Meanwhile, on the other connection: a retained publish and a round trip.
                try await other.publish("r/other", "x", qos: .atLeastOnce, retain: true)
                let otherServed = clock.now - start
                guard case .suback(let suback) = try await sub.expectPacket(timeout: .seconds(10)) else { throw TestFailure("no SUBACK") }
                let answered = clock.now - start
                #expect(suback.value.returnCodes.count == 1000)
                var payloads: Set<String> = []
                for _ in 0..<1000 {
                    let p = try await sub.expectPublish()
                    #expect(p.retain)
                    payloads.insert(String(buffer: p.payload))
                }
                #expect(payloads == Set((0..<1000).map { k in "\((k % 100) * 1000 + k)" }))
                #expect(answered < .seconds(1), "SUBACK after \(answered)")
                #expect(otherServed < .seconds(1), "other connection served after \(otherServed)")
                #expect(b.broker.retainedCount == 100_001)
            }
        }

        @Test("retained messages come parent first: a, a/b, a/b/c published in reverse order, then a/#")
        func treeOrder() async throws {
            try await withBroker { b in
                let pub = try await b.client("pub")
                for topic in ["a/b/c", "a/b", "a"] { try await pub.publish(topic, topic, qos: .atLeastOnce, retain: true) }
                let sub = try await b.client("sub")
                try await sub.subscribe("a/#")
                var topics: [String] = []
                for _ in 0..<3 { topics.append(String(buffer: try await sub.expectPublish().topic)) }
                #expect(topics == ["a", "a/b", "a/b/c"])
                try await sub.expectNothing()
            }
        }

        @Test("$ topics are not sent for filters starting with a wildcard")
        func dollarTopics() async throws {
            try await withBroker { b in
                let pub = try await b.client("pub")
                try await pub.publish("$app/x", "d", qos: .atLeastOnce, retain: true)
                try await pub.publish("app/x", "n", qos: .atLeastOnce, retain: true)
                let sub = try await b.client("sub")
                #expect(try await sub.subscribe([("#", .atMostOnce), ("+/x", .atMostOnce)]) == [.granted(.atMostOnce), .granted(.atMostOnce)])
                #expect(String(buffer: try await sub.expectPublish().topic) == "app/x")
                #expect(String(buffer: try await sub.expectPublish().topic) == "app/x")
                try await sub.expectNothing()
                try await sub.subscribe("$app/+")
                #expect(String(buffer: try await sub.expectPublish().topic) == "$app/x")
            }
        }

        @Test("retaining then clearing 10,000 distinct deep topics leaves no node behind")
        func clearingPrunes() async throws {
            try await withBroker { b in
                let pub = try await b.client("pub")
                let topics = (0..<10_000).map { "p/\($0 % 10)/\($0)/x/y/z" }
                // One write of 10,000 PUBLISH packets (not 10,000 tasks on the shared client loop).
                func sendAll(payload: String) async throws {
                    var batch = ByteBuffer()
                    for topic in topics { batch.writeMQTTPacket(.publish(PublishPacket(topic: topic, payload: payload, retain: true))) }
                    try await pub.channel.writeAndFlush(batch)
                    try await pub.ping(timeout: .seconds(60))  // (over 5 s under TSan on a busy machine)
                }
                try await sendAll(payload: "v")
                try await eventually("10,000 retained") { b.broker.retainedCount == 10_000 }
                #expect(b.broker.retainedNodeCount == 1 + 10 + 10_000 * 4)
                try await sendAll(payload: "")
                try await eventually("all cleared") { b.broker.retainedCount == 0 }
                #expect(b.broker.retainedNodeCount == 0)
            }
        }
    }
}
