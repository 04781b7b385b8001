import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// Behaviours Mosquitto users count on, where MQTT leaves room.
@Suite("Mosquitto's behaviours")
struct MosquittoBehaviourTests {
    @Test("PUBACK and PUBREC go out before the message is forwarded: a client subscribed to its own topic reads the ack first")
    func acknowledgeBeforeForwarding() async throws {
        try await withBroker { b in
            let c = try await b.client("self")
            try await c.subscribe("echo", qos: .atMostOnce)
            c.send(.publish(PublishPacket(topic: ByteBuffer(string: "echo"), payload: ByteBuffer(string: "1"), qos: .atLeastOnce, packetID: 3)))
            #expect(try await c.expectPacket() == .puback(packetID: 3))
            #expect(String(buffer: try await c.expectPublish().payload) == "1")
            c.send(.publish(PublishPacket(topic: ByteBuffer(string: "echo"), payload: ByteBuffer(string: "2"), qos: .exactlyOnce, packetID: 4)))
            #expect(try await c.expectPacket() == .pubrec(packetID: 4))
            #expect(String(buffer: try await c.expectPublish().payload) == "2")
        }
    }

    @Test("PUBREC for a packet id not in flight is answered with PUBREL")
    func pubrecUnknownID() async throws {
        try await withBroker { b in
            let c = try await b.client("lost")
            c.send(.pubrec(packetID: 77))
            #expect(try await c.expectPacket() == .pubrel(packetID: 77))
            c.send(.pubcomp(packetID: 77))
            try await c.ping()
        }
    }

    @Test("clean session 0 taking over clean session 0: the session goes on and the old connection's will is not published")
    func persistentTakeoverKeepsWill() async throws {
        try await withBroker { b in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("wills/#")
            let will = Will(topic: "wills/p", payload: ByteBuffer(string: "gone"), qos: .atMostOnce, retain: false)
            let old = try await TestClient.open(port: b.port)
            _ = try await old.connect(ConnectPacket(cleanSession: false, clientID: "p", will: will))
            let new = try await TestClient.open(port: b.port)
            #expect(try await new.connect(ConnectPacket(cleanSession: false, clientID: "p", will: will)).sessionPresent)
            try await old.expectClosed()
            try await watcher.expectNothing()
        }
    }

    @Test("a clean session 1 on either side of a takeover publishes the old connection's will")
    func cleanTakeoverPublishesWill() async throws {
        for (oldClean, newClean) in [(true, false), (false, true), (true, true)] {
            try await withBroker { b in
                let watcher = try await b.client("watcher")
                try await watcher.subscribe("wills/#")
                let will = Will(topic: "wills/q", payload: ByteBuffer(string: "gone"), qos: .atMostOnce, retain: false)
                let old = try await TestClient.open(port: b.port)
                _ = try await old.connect(ConnectPacket(cleanSession: oldClean, clientID: "q", will: will))
                let new = try await TestClient.open(port: b.port)
                _ = try await new.connect(ConnectPacket(cleanSession: newClean, clientID: "q"))
                try await old.expectClosed()
                #expect(String(buffer: try await watcher.expectPublish().payload) == "gone", "old clean \(oldClean), new clean \(newClean)")
            }
        }
    }
}

@Suite("Memory that follows the client")
struct BoundedMemoryTests {
    @Test("max_queued_bytes caps an offline session's queue by size, counting the drops")
    func maxQueuedBytes() async throws {
        try await withBroker(configure: { $0.limits.maxQueuedBytes = 1000 }) { b in
            let c = try await TestClient.open(port: b.port)
            _ = try await c.connect(ConnectPacket(cleanSession: false, clientID: "offline"))
            try await c.subscribe("q", qos: .atLeastOnce)
            await c.disconnect()
            let pub = try await b.client("pub")
            // 99 bytes of payload + 1 of topic: ten fit in 1000 bytes.
            for i in 0..<20 {
                try await pub.publish("q", ByteBuffer(string: String(repeating: "\(i % 10)", count: 99)), qos: .atLeastOnce, id: UInt16(i + 1))
            }
            try await eventually("drops counted") { b.broker.droppedMessageCount == 10 }
            let back = try await TestClient.open(port: b.port)
            _ = try await back.connect(ConnectPacket(cleanSession: false, clientID: "offline"))
            var got = 0
            while let event = await back.nextEvent(timeout: .milliseconds(500)), case .packet(.publish(let p)) = event {
                back.send(.puback(packetID: p.packetID!))
                got += 1
            }
            #expect(got == 10)
        }
    }

    @Test("log lines carry at most a bounded part of a client's id and topics")
    func logsTruncateClientText() async throws {
        try await withBroker { b in
            let id = String(repeating: "i", count: 60_000)
            let c = try await b.client(id)
            c.send(.publish(PublishPacket(topic: ByteBuffer(string: String(repeating: "t/", count: 20_000) + "x"), payload: ByteBuffer(), qos: .atMostOnce)))
            c.sendRaw([0x10, 0x00])  // a second CONNECT (truncated): closes with a log line
            try await c.expectClosed()
            try await eventually("close logged") { b.logMessages.contains { $0.contains("closing connection") } }
            for line in b.logMessages {
                #expect(line.utf8.count < 1200, "a log line of \(line.utf8.count) bytes")
            }
            #expect(b.logMessages.contains { $0.contains("(60000 bytes)") })
        }
    }
}

@Suite("Session expiry")
struct SessionExpiryTests {
    @Test("a persistent session offline past session_expiry is removed: no session present, nothing queued")
    func expires() async throws {
        try await withBroker(configure: { $0.limits.sessionExpiry = .seconds(1) }) { b in
            let c = try await TestClient.open(port: b.port)
            _ = try await c.connect(ConnectPacket(cleanSession: false, clientID: "abandoned"))
            try await c.subscribe("ex", qos: .atLeastOnce)
            await c.disconnect()
            try await eventually("expiry logged", timeout: .seconds(5)) { b.logMessages.contains { $0.contains("session expired") } }
            let pub = try await b.client("pub")
            try await pub.publish("ex", "after expiry", qos: .atLeastOnce)
            let back = try await TestClient.open(port: b.port)
            #expect(try await back.connect(ConnectPacket(cleanSession: false, clientID: "abandoned")).sessionPresent == false)
            try await back.expectNothing()
        }
    }

    @Test("a session back before session_expiry is kept, and its clock restarts at the next disconnect")
    func keptWhenBackInTime() async throws {
        // Margins wide enough for a loaded machine: offline briefly twice, online for longer than the expiry.
        try await withBroker(configure: { $0.limits.sessionExpiry = .seconds(4) }) { b in
            let c = try await TestClient.open(port: b.port)
            _ = try await c.connect(ConnectPacket(cleanSession: false, clientID: "returning"))
            try await c.subscribe("kept", qos: .atLeastOnce)
            await c.disconnect()
            try await Task.sleep(for: .milliseconds(300))
            let back = try await TestClient.open(port: b.port)
            #expect(try await back.connect(ConnectPacket(cleanSession: false, clientID: "returning")).sessionPresent)
            try await Task.sleep(for: .milliseconds(4500))  // longer than the expiry, online
            await back.disconnect()
            let again = try await TestClient.open(port: b.port)
            #expect(try await again.connect(ConnectPacket(cleanSession: false, clientID: "returning")).sessionPresent)
            #expect(!b.logMessages.contains { $0.contains("session expired") })
        }
    }
}

@Suite("Subscriptions per client")
struct SubscriptionLimitTests {
    @Test("past max_subscriptions a new filter gets 0x80 and the trie stops growing; held filters can be re-subscribed; unsubscribing makes room")
    func maxSubscriptions() async throws {
        try await withBroker(configure: { $0.limits.maxSubscriptions = 100 }) { b in
            let c = try await b.client("greedy")
            // 2,000 distinct filters in 20 packets: only the first 100 are granted.
            var granted = 0
            for packet in 0..<20 {
                let filters = (0..<100).map { ("greedy/\(packet)/\($0)", QoS.atMostOnce) }
                let codes = try await c.subscribe(filters, id: UInt16(packet + 1))
                granted += codes.filter { $0 != .failure }.count
            }
            #expect(granted == 100)
            let nodes = b.broker.subscriptionNodeCount
            #expect(nodes <= 1 + 1 + 100, "the trie holds the granted filters only: \(nodes) nodes")
            #expect(try await c.subscribe([("greedy/0/5", .atLeastOnce), ("greedy/new", .atMostOnce)], id: 30) == [.granted(.atLeastOnce), .failure])
            c.send(.unsubscribe(UnsubscribePacket(packetID: 31, filters: ["greedy/0/5"])))
            #expect(try await c.expectPacket() == .unsuback(packetID: 31))
            #expect(try await c.subscribe([("greedy/new", .atMostOnce)], id: 32) == [.granted(.atMostOnce)])
            try await eventually("logged") { b.logMessages.contains { $0.contains("max_subscriptions (100)") } }
            // Another client has its own allowance.
            let other = try await b.client("other")
            #expect(try await other.subscribe([("greedy/new", .atMostOnce)], id: 1) == [.granted(.atMostOnce)])
        }
    }
}
