import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import NIOPosix
import Synchronization
import Testing

/// ACL tables for every client, and a publish hook on `hooked/#` that marks the payload.
final class WillHooks: BrokerHooks {
    func authorize(_ client: ClientInfo, worker: Int) -> HookAnswer<[ACLTable]> { .now(authorizeNow(client)) }

    func authorizeNow(_ client: ClientInfo) -> [ACLTable] {
        client.clientID.hasPrefix("limited") ? [ACLTable(publish: ["allowed/#", "hooked/#"], subscribe: ["#"])] : []
    }

    func isPublishHooked(topic: TopicName, worker: Int) -> Bool {
        topic.bytes.readableBytesView.starts(with: "hooked/".utf8)
    }

    func interceptPublish(_ message: HookedMessage, from client: ClientInfo, worker: Int) -> HookAnswer<PublishDecision> {
        .now(interceptNow(message, from: client))
    }

    func interceptNow(_ message: HookedMessage, from client: ClientInfo) -> PublishDecision {
        var changed = message
        changed.payload = ByteBuffer(string: "hooked(\(String(buffer: message.payload))) from \(client.clientID)")
        return .change(changed)
    }
}

@Suite("Hostile clients: takeover races, leaks, will bypasses")
struct HardeningTests {
    @Test("many CONNECTs at once for one persistent client id: exactly one connection stays, and the broker survives")
    func takeoverRace() async throws {
        try await withBroker { b in
            let first = try await TestClient.open(port: b.port)
            _ = try await first.connect(ConnectPacket(cleanSession: false, clientID: "racer"))
            try await first.subscribe("race/#", qos: .atLeastOnce)
            await first.disconnect()
            let publisher = try await b.client("publisher")

            for round in 0..<4 {
                var clients: [TestClient] = []
                for _ in 0..<50 { clients.append(try await TestClient.open(port: b.port)) }
                // All CONNECTs in flight at once, then each client changes the session at once.
                for c in clients { c.send(.connect(ConnectPacket(cleanSession: false, clientID: "racer"))) }
                for c in clients {
                    c.send(.subscribe(SubscribePacket(packetID: 7, subscriptions: [Subscription(filter: "race/\(round)", qos: .atLeastOnce)])))
                    c.send(.unsubscribe(UnsubscribePacket(packetID: 8, filters: ["race/\(round)"])))
                }
                try await eventually("takeovers settle", timeout: .seconds(10)) { b.broker.openConnections == 2 }
                var alive: [TestClient] = []
                for c in clients {
                    // Drain what came; a closed connection ends with .closed (the broker has
                    // closed all but one, so only the survivor waits out the timeout).
                    var closed = false
                    while let event = await c.nextEvent(timeout: .seconds(1)) {
                        if event == .closed { closed = true; break }
                    }
                    if !closed { alive.append(c) }
                }
                #expect(alive.count == 1, "round \(round): \(alive.count) connections hold client id racer")
                // The survivor holds the session: it still gets what its subscription matches.
                if let survivor = alive.first {
                    try await publisher.publish("race/x", "round \(round)", qos: .atLeastOnce)
                    let got = try await survivor.expectPublish()
                    #expect(String(buffer: got.payload) == "round \(round)")
                    survivor.send(.puback(packetID: got.packetID!))
                    await survivor.abort()
                }
                try await eventually("connections closed") { b.broker.openConnections == 1 }
            }
        }
    }

    @Test("a closed connection frees its handler: sockets that close silently, after CONNECT, or mid-packet")
    func closedConnectionsAreFreed() async throws {
        try await withBroker { b in
            let baseline = b.broker.connectionObjectCount
            for i in 0..<300 {
                let c = try await TestClient.open(port: b.port)
                switch i % 3 {
                case 0:
                    break
                case 1:
                    _ = try await c.connect(ConnectPacket(clientID: "leak-\(i)"))
                default:
                    // Half of a 100 KB PUBLISH, then gone.
                    _ = try await c.connect(ConnectPacket(clientID: "leak-\(i)"))
                    c.sendRaw([0x30, 0xA0, 0x8D, 0x06, 0x00, 0x01, UInt8(ascii: "t")] + [UInt8](repeating: 1, count: 50_000))
                    try await Task.sleep(for: .milliseconds(10))
                }
                await c.abort()
            }
            try await eventually("every handler freed", timeout: .seconds(10)) {
                b.broker.openConnections == 0 && b.broker.connectionObjectCount == baseline
            }
        }
    }

    @Test("a will on a topic the ACL denies is refused at CONNECT (CONNACK 5); an allowed will still goes out")
    func willChecksACL() async throws {
        try await withBroker(hooks: WillHooks()) { b in
            let sub = try await b.client("watcher")
            try await sub.subscribe("#")
            let bad = try await TestClient.open(port: b.port)
            let will = Will(topic: "forbidden/x", payload: ByteBuffer(string: "bypass"), qos: .atMostOnce, retain: true)
            #expect(try await bad.connect(ConnectPacket(clientID: "limited-1", will: will)).returnCode == .notAuthorized)
            try await bad.expectClosed()
            try await sub.expectNothing()
            #expect(b.broker.retainedCount == 0)

            let good = try await b.client("limited-2", will: Will(topic: "allowed/x", payload: ByteBuffer(string: "gone"), qos: .atMostOnce, retain: false))
            await good.abort()
            let got = try await sub.expectPublish()
            #expect(got.topicString == "allowed/x")
            #expect(String(buffer: got.payload) == "gone")
        }
    }

    @Test("a will goes through the publish hooks like any message of its client")
    func willThroughHooks() async throws {
        try await withBroker(hooks: WillHooks()) { b in
            let sub = try await b.client("watcher")
            try await sub.subscribe("hooked/#")
            let c = try await b.client("limited-3", will: Will(topic: "hooked/w", payload: ByteBuffer(string: "bye"), qos: .atMostOnce, retain: false))
            await c.abort()
            let got = try await sub.expectPublish()
            #expect(String(buffer: got.payload) == "hooked(bye) from limited-3")
        }
    }
}

/// Each user may subscribe within its own name only; `+/secret` is denied to everyone.
final class PerUserHooks: BrokerHooks {
    func authorize(_ client: ClientInfo, worker: Int) -> HookAnswer<[ACLTable]> { .now(authorizeNow(client)) }

    func authorizeNow(_ client: ClientInfo) -> [ACLTable] {
        guard let user = client.username else { return [] }
        return [ACLTable(publish: ["#"], subscribe: ["\(user)/#", "$x/#"], deny: ["+/secret"])]
    }
}

@Suite("ACLs on delivery")
struct ACLDeliveryTests {
    @Test("a client taking over another user's persistent session receives nothing its own ACL does not allow")
    func inheritedSessionFollowsNewACL() async throws {
        try await withBroker(hooks: PerUserHooks()) { b in
            let alice = try await TestClient.open(port: b.port)
            _ = try await alice.connect(ConnectPacket(cleanSession: false, clientID: "dashboard", username: "alice"))
            try await alice.subscribe("alice/#", qos: .atLeastOnce)
            await alice.disconnect()
            let bob = try await TestClient.open(port: b.port)
            #expect(try await bob.connect(ConnectPacket(cleanSession: false, clientID: "dashboard", username: "bob")).sessionPresent)
            let phone = try await b.client("phone", username: "alice")
            try await phone.publish("alice/diary", "alice-private", qos: .atLeastOnce)
            try await bob.expectNothing()
            // alice, back on her session, gets what is hers.
            await bob.disconnect()
            let again = try await TestClient.open(port: b.port)
            _ = try await again.connect(ConnectPacket(cleanSession: false, clientID: "dashboard", username: "alice"))
            try await phone.publish("alice/diary", "for alice", qos: .atLeastOnce, id: 2)
            #expect(String(buffer: try await again.expectPublish().payload) == "for alice")
        }
    }

    @Test("deny patterns starting with a wildcard say nothing about $ topics, for SUBSCRIBE as for delivery")
    func dollarRuleInCovers() async throws {
        try await withBroker(hooks: PerUserHooks()) { b in
            let c = try await b.client("c", username: "carol")
            #expect(try await c.subscribe([("$x/secret", .atMostOnce)]) == [.granted(.atMostOnce)])
            #expect(try await c.subscribe([("carol/secret", .atMostOnce)], id: 2) == [.failure])
        }
    }
}

/// Each client may use only `devices/<its client id>/#`.
final class OwnDeviceHooks: BrokerHooks {
    func authorize(_ client: ClientInfo, worker: Int) -> HookAnswer<[ACLTable]> { .now(authorizeNow(client)) }

    func authorizeNow(_ client: ClientInfo) -> [ACLTable] {
        client.clientID == "backend" ? [] : [ACLTable(publish: ["devices/%c/#"], subscribe: ["devices/%c/#"])]
    }
}

@Suite("Byte-exact client ids and topics (no Unicode normalisation, MQTT-4.7.3-4)")
struct ByteExactTests {
    // "é" precomposed and decomposed, "K" and U+212A KELVIN SIGN: equal as Swift Strings, not as bytes.
    let composed = "jos\u{E9}", decomposed = "jose\u{301}"

    @Test("client ids that differ in bytes are different clients, even when Unicode-equivalent")
    func clientIDs() async throws {
        #expect(composed == decomposed)  // what Swift's String says
        try await withBroker { b in
            let victim = try await TestClient.open(port: b.port)
            _ = try await victim.connect(ConnectPacket(cleanSession: false, clientID: composed))
            try await victim.subscribe("x", qos: .atLeastOnce)
            let attacker = try await TestClient.open(port: b.port)
            #expect(try await attacker.connect(ConnectPacket(cleanSession: false, clientID: decomposed)).sessionPresent == false)
            try await victim.ping()  // not taken over
        }
    }

    @Test("topics and filters match byte for byte: no delivery across equivalent spellings, and no retained message overwritten")
    func topics() async throws {
        try await withBroker { b in
            let sub = try await b.client("sub")
            try await sub.subscribe("devices/Kx/cmd")
            try await sub.subscribe("cafe\u{301}")
            let pub = try await b.client("pub")
            try await pub.publish("devices/\u{212A}x/cmd", "kelvin")
            try await pub.publish("caf\u{E9}", "composed")
            try await sub.expectNothing()
            try await pub.publish("devices/Kx/state", "kept", retain: true)
            try await pub.publish("devices/\u{212A}x/state", "", retain: true)
            try await pub.ping()
            #expect(b.broker.retainedCount == 1)
            // Unsubscribing one spelling leaves the other.
            try await sub.subscribe("caf\u{E9}")
            sub.send(.unsubscribe(UnsubscribePacket(packetID: 9, filters: ["cafe\u{301}"])))
            #expect(try await sub.expectPacket() == .unsuback(packetID: 9))
            try await pub.publish("caf\u{E9}", "still subscribed")
            #expect(String(buffer: try await sub.expectPublish().payload) == "still subscribed")
        }
    }

    @Test("ACL patterns with %c cover only the client's own bytes")
    func aclPatterns() async throws {
        try await withBroker(hooks: OwnDeviceHooks()) { b in
            let attacker = try await b.client(decomposed)
            #expect(try await attacker.subscribe([("devices/\(composed)/#", .atMostOnce)]) == [.failure])
            #expect(try await attacker.subscribe([("devices/\(decomposed)/#", .atMostOnce)], id: 2) == [.granted(.atMostOnce)])
        }
    }
}
