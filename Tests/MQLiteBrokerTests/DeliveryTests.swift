@testable import MQLiteBroker
import MQTTCore
import NIOCore
import MQLiteTestSupport
import Testing

@Suite("Delivery")
struct DeliveryTests {
    @Test("QoS 0, 1 and 2 in both directions, delivered at the minimum of publish and granted QoS", arguments: QoS.allCases, QoS.allCases)
    func qosMatrix(publishQoS: QoS, subscribeQoS: QoS) async throws {
        try await withBroker { b in
            let sub = try await b.client("sub")
            try await sub.subscribe("q/t", qos: subscribeQoS)
            let pub = try await b.client("pub")
            try await pub.publish("q/t", "m", qos: publishQoS, id: 9)
            let p = try await sub.expectPublish()
            let expected = min(publishQoS, subscribeQoS)
            #expect(p.qos == expected)
            #expect(p.retain == false && p.dup == false)
            #expect(String(buffer: p.payload) == "m")
            switch expected {
            case .atMostOnce:
                #expect(p.packetID == nil)
            case .atLeastOnce:
                sub.send(.puback(packetID: p.packetID!))
            case .exactlyOnce:
                sub.send(.pubrec(packetID: p.packetID!))
                #expect(try await sub.expectPacket() == .pubrel(packetID: p.packetID!))
                sub.send(.pubcomp(packetID: p.packetID!))
            }
            try await sub.ping()
            try await sub.expectNothing()
        }
    }

    @Test("payloads of 16 B, 1 KiB and 64 KiB arrive intact at QoS 0, 1 and 2", arguments: [16, 1024, 65536])
    func payloadSizes(size: Int) async throws {
        try await withBroker { b in
            let sub = try await b.client("sub")
            try await sub.subscribe("big/+", qos: .exactlyOnce)
            let pub = try await b.client("pub")
            for qos in QoS.allCases {
                let payload = ByteBuffer(bytes: (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(qos.rawValue)) })
                try await pub.publish("big/\(qos.rawValue)", payload, qos: qos, id: 3)
                let p = try await sub.expectPublish()
                #expect(p.payload == payload)
                #expect(p.qos == qos)
                if qos == .atLeastOnce { sub.send(.puback(packetID: p.packetID!)) }
                if qos == .exactlyOnce {
                    sub.send(.pubrec(packetID: p.packetID!))
                    _ = try await sub.expectPacket()
                    sub.send(.pubcomp(packetID: p.packetID!))
                }
            }
        }
    }

    @Test("overlapping subscriptions give one copy at the highest granted QoS")
    func overlapping() async throws {
        try await withBroker { b in
            let sub = try await b.client("sub")
            #expect(try await sub.subscribe([("o/#", .atMostOnce), ("o/+/c", .atLeastOnce), ("o/b/c", .atMostOnce)]) == [.granted(.atMostOnce), .granted(.atLeastOnce), .granted(.atMostOnce)])
            let pub = try await b.client("pub")
            try await pub.publish("o/b/c", "one", qos: .exactlyOnce)
            let p = try await sub.expectPublish()
            #expect(p.qos == .atLeastOnce)
            sub.send(.puback(packetID: p.packetID!))
            try await sub.expectNothing()
        }
    }

    @Test("inbound QoS 2 is exactly once: a re-sent PUBLISH with a pending id is not delivered twice")
    func qos2Duplicate() async throws {
        try await withBroker { b in
            let sub = try await b.client("sub")
            try await sub.subscribe("x")
            let pub = try await b.client("pub")
            let first = PublishPacket(topic: "x", payload: "once", qos: .exactlyOnce, packetID: 5)
            pub.send(.publish(first))
            #expect(try await pub.expectPacket() == .pubrec(packetID: 5))
            var again = first
            again.dup = true
            pub.send(.publish(again))
            #expect(try await pub.expectPacket() == .pubrec(packetID: 5))
            #expect(String(buffer: try await sub.expectPublish().payload) == "once")
            try await sub.expectNothing()
            pub.send(.pubrel(packetID: 5))
            #expect(try await pub.expectPacket() == .pubcomp(packetID: 5))
            // Released: the same id now starts a new message.
            try await pub.publish("x", "second", qos: .exactlyOnce, id: 5)
            #expect(String(buffer: try await sub.expectPublish().payload) == "second")
        }
    }

    @Test("retained messages: last one kept, sent on SUBSCRIBE with RETAIN 1, live with RETAIN 0, cleared by an empty payload")
    func retained() async throws {
        try await withBroker { b in
            let pub = try await b.client("pub")
            try await pub.publish("r/a", "old", qos: .atLeastOnce, retain: true)
            try await pub.publish("r/a", "new", qos: .atLeastOnce, retain: true)
            try await pub.publish("r/b", "b", retain: true)
            try await pub.publish("other", "o", retain: true)
            try await pub.ping()

            let sub = try await b.client("sub")
            try await sub.subscribe("r/+", qos: .atLeastOnce)
            var got: [String: PublishPacket] = [:]
            for _ in 0..<2 {
                let p = try await sub.expectPublish()
                got[p.topicString] = p
                if let id = p.packetID { sub.send(.puback(packetID: id)) }
            }
            #expect(String(buffer: got["r/a"]!.payload) == "new")
            #expect(got["r/a"]!.retain && got["r/a"]!.qos == .atLeastOnce)
            #expect(got["r/b"]!.retain && got["r/b"]!.qos == .atMostOnce)
            try await sub.expectNothing()

            try await pub.publish("r/a", "live", retain: true)
            let live = try await sub.expectPublish()
            #expect(!live.retain && String(buffer: live.payload) == "live")

            try await pub.publish("r/a", "", retain: true)
            _ = try await sub.expectPublish()  // the clearing message itself is delivered
            try await pub.ping()
            let late = try await b.client("late")
            try await late.subscribe("r/#")
            let only = try await late.expectPublish()
            #expect(only.topicString == "r/b")
            try await late.expectNothing()
        }
    }

    @Test("topics starting with $ are not matched by filters starting with a wildcard")
    func dollarTopics() async throws {
        try await withBroker { b in
            let all = try await b.client("all")
            try await all.subscribe("#")
            let plus = try await b.client("plus")
            try await plus.subscribe("+/x")
            let sys = try await b.client("sys")
            try await sys.subscribe("$app/#")
            let pub = try await b.client("pub")
            try await pub.publish("$app/x", "s")  // ($SYS is the broker's own: clients cannot publish there)
            #expect(try await sys.expectPublish().topicString == "$app/x")
            try await all.expectNothing()
            try await plus.expectNothing()
        }
    }

    @Test("UNSUBSCRIBE answers UNSUBACK and stops delivery")
    func unsubscribe() async throws {
        try await withBroker { b in
            let c = try await b.client("c")
            try await c.subscribe("u/#")
            c.send(.unsubscribe(UnsubscribePacket(packetID: 4, filters: ["u/#", "never/subscribed"])))
            #expect(try await c.expectPacket() == .unsuback(packetID: 4))
            try await c.publish("u/x", "gone")
            try await c.expectNothing()
        }
    }

    @Test("subscribers on both workers get every message from publishers on both workers")
    func crossWorker() async throws {
        try await withBroker { b in
            // Connections alternate between the two loops.
            var subs: [TestClient] = []
            for i in 0..<4 {
                let s = try await b.client("s\(i)")
                try await s.subscribe("cw/#", qos: .atLeastOnce)
                subs.append(s)
            }
            let p1 = try await b.client("p1")
            let p2 = try await b.client("p2")
            for i in 0..<50 {
                try await (i % 2 == 0 ? p1 : p2).publish("cw/\(i)", "\(i)", qos: .atLeastOnce, id: UInt16(i + 1))
            }
            for s in subs {
                var seen = Set<String>()
                for _ in 0..<50 {
                    let p = try await s.expectPublish()
                    seen.insert(String(buffer: p.payload))
                    s.send(.puback(packetID: p.packetID!))
                }
                #expect(seen.count == 50)
            }
        }
    }

    @Test("at most max_inflight unacknowledged messages per client; the rest wait in order")
    func maxInflight() async throws {
        try await withBroker(configure: { $0.limits.maxInflight = 2 }) { b in
            let sub = try await b.client("sub")
            try await sub.subscribe("w", qos: .atLeastOnce)
            let pub = try await b.client("pub")
            for i in 1...5 { try await pub.publish("w", "\(i)", qos: .atLeastOnce, id: UInt16(i)) }
            let m1 = try await sub.expectPublish()
            let m2 = try await sub.expectPublish()
            #expect([m1, m2].map { String(buffer: $0.payload) } == ["1", "2"])
            try await sub.expectNothing()
            sub.send(.puback(packetID: m1.packetID!))
            let m3 = try await sub.expectPublish()
            #expect(String(buffer: m3.payload) == "3")
            try await sub.expectNothing()
            sub.send(.puback(packetID: m2.packetID!))
            sub.send(.puback(packetID: m3.packetID!))
            #expect(String(buffer: try await sub.expectPublish().payload) == "4")
            #expect(String(buffer: try await sub.expectPublish().payload) == "5")
        }
    }

    @Test("a subscriber that keeps acknowledging, slowly, holds its publisher back for about a second, not at its own pace for ever")
    func slowAcknowledgerBounded() async throws {
        try await withBroker(configure: { $0.limits.maxQueued = 20; $0.limits.maxInflight = 1 }) { b in
            let slow = try await b.client("slow")
            try await slow.subscribe("pace", qos: .atLeastOnce)
            let fast = try await b.client("fast")
            try await fast.subscribe("pace")
            // 50 acknowledgements a second: it never stalls, so it is congested, not stalled.
            let acking = Task {
                while !Task.isCancelled, let p = try? await slow.expectPublish(timeout: .seconds(10)) {
                    try? await Task.sleep(for: .milliseconds(20))
                    slow.send(.puback(packetID: p.packetID!))
                }
            }
            defer { acking.cancel() }
            let pub = try await b.client("pub")
            let clock = ContinuousClock()
            let start = clock.now
            for i in 0..<1000 {
                pub.send(.publish(PublishPacket(topic: ByteBuffer(string: "pace"), payload: ByteBuffer(string: "\(i)"), qos: .atLeastOnce, packetID: UInt16(i + 1))))
            }
            pub.send(.pingreq)
            while try await pub.expectPacket(timeout: .seconds(30)) != .pingresp {}
            // At the slow one's pace this takes 20 s; held back at most a second in ten, about 1 s.
            #expect(clock.now - start < .seconds(5))
            var got = 0
            while let event = await fast.nextEvent(timeout: .milliseconds(500)), case .packet(.publish) = event { got += 1 }
            #expect(got == 1000)
        }
    }

    @Test("a publisher's allowance: what subscribers on theirs hold it back is charged, up to 2 s in any 10")
    func publisherAllowance() {
        var allowance = HoldBackAllowance()
        let t0 = NIODeadline.now()
        var left = allowance.left(now: t0)
        #expect(left && allowance.isUnused)
        allowance.since = t0
        allowance.charge(now: t0 + .milliseconds(1500))
        left = allowance.left(now: t0 + .milliseconds(1500))
        #expect(left)
        allowance.since = t0 + .milliseconds(1500)
        allowance.charge(now: t0 + .milliseconds(2100))
        left = allowance.left(now: t0 + .seconds(5))
        #expect(!left, "2.1 s used in the window")
        #expect(!allowance.isUnused)
        left = allowance.left(now: t0 + .seconds(10))
        #expect(left, "a new window")
    }

    @Test("a subscriber that stops reading never grows the broker without bound: past max_queued messages are dropped and counted")
    func slowSubscriber() async throws {
        try await withBroker(configure: { $0.limits.maxQueued = 20 }) { b in
            let slow = try await b.client("slow")
            try await slow.subscribe("flood", qos: .atLeastOnce)
            try await slow.channel.setOption(.autoRead, value: false).get()
            let pub = try await b.client("pub")
            let payload = ByteBuffer(repeating: 0x41, count: 16 * 1024)
            // 4000 x 16 KiB = 64 MiB, far more than the socket buffers hold.
            for i in 0..<4000 {
                pub.send(.publish(PublishPacket(topic: ByteBuffer(string: "flood"), payload: payload, qos: i % 2 == 0 ? .atMostOnce : .atLeastOnce, packetID: i % 2 == 0 ? nil : UInt16(i % 60000 + 1))))
            }
            try await eventually("messages dropped", timeout: .seconds(20)) { b.broker.droppedMessageCount > 0 }
            try await eventually("log line") { b.logMessages.contains { $0.contains("cannot keep up") && $0.contains("slow") } }
            // The publisher was never held up or cut off: all its PUBACKs come, then the PINGRESP.
            pub.send(.pingreq)
            var acks = 0
            while true {
                let packet = try await pub.expectPacket(timeout: .seconds(20))
                if packet == .pingresp { break }
                guard case .puback = packet else { throw TestFailure("unexpected \(packet)") }
                acks += 1
            }
            #expect(acks == 2000)
            // The slow subscriber is still connected and gets messages once it reads again.
            try await slow.channel.setOption(.autoRead, value: true).get()
            slow.channel.read()
            let first = try await slow.expectPublish()
            #expect(first.topicString == "flood")
        }
    }
}

extension HeavyBrokerTests {
    @Suite("Delivery under attack")
    struct DeliveryAttackTests {
        @Test("fresh subscribers that never read, one after another, hold a publisher back for at most its allowance (2 s in 10), not for good")
        func nonReadersOneAfterAnother() async throws {
            try await withBroker(configure: { $0.limits.maxQueued = 20 }) { b in
                let pub = try await b.client("pub")
                let payload = ByteBuffer(repeating: 0x41, count: 16 * 1024)
                let clock = ContinuousClock()
                let start = clock.now
                // A new subscriber every 300 ms that reads nothing after its SUBACK: each would hold
                // the publisher back for a second of its own.
                let port = b.port
                let attack = Task {
                    var held: [TestClient] = []
                    for i in 0..<24 where !Task.isCancelled {
                        guard let c = try? await TestClient.open(port: port), (try? await c.connect(ConnectPacket(clientID: "non-reader-\(i)"))) != nil,
                            (try? await c.subscribe("flood")) != nil
                        else { break }
                        try? await c.channel.setOption(.autoRead, value: false).get()
                        held.append(c)
                        try? await Task.sleep(for: .milliseconds(300))
                    }
                    for c in held { await c.abort() }
                }
                defer { attack.cancel() }
                // The publisher: 16 messages (256 KiB), then a round trip, for 7 s; paced, so as not
                // to load the machine for the timing-sensitive tests running beside it.
                var trips: [Duration] = []
                while clock.now - start < .seconds(7) {
                    try await Task.sleep(for: .milliseconds(50))
                    for _ in 0..<16 { pub.send(.publish(PublishPacket(topic: ByteBuffer(string: "flood"), payload: payload, qos: .atMostOnce))) }
                    let sent = clock.now
                    try await pub.ping(timeout: .seconds(10))
                    trips.append(clock.now - sent)
                }
                // A round trip held back by a non-reader takes about the second it holds (its stall
                // timeout). The publisher's allowance (2 s) covers two such; without it, every round
                // trip of the 7 s would be one.
                let held = trips.filter { $0 >= .milliseconds(800) }.count
                #expect(held <= 3, "round trips: \(trips)")
                #expect(trips.count > held + 5)
            }
        }
    }
}
