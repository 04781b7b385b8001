import MQLiteBroker
import MQTTCore
import NIOCore
import MQLiteTestSupport
import Testing

@Suite("Sessions, takeover and wills")
struct SessionTests {
    func will(_ client: String, qos: QoS = .atMostOnce, retain: Bool = false) -> Will {
        Will(topic: try! TopicName("wills/\(client)"), payload: ByteBuffer(string: "\(client) gone"), qos: qos, retain: retain)
    }

    @Test("clean session 1 starts and ends empty")
    func cleanSession() async throws {
        try await withBroker { b in
            let c = try await TestClient.open(port: b.port)
            #expect(try await c.connect(ConnectPacket(cleanSession: true, clientID: "clean")).sessionPresent == false)
            try await c.subscribe("cs/#", qos: .atLeastOnce)
            await c.disconnect()
            let again = try await TestClient.open(port: b.port)
            #expect(try await again.connect(ConnectPacket(cleanSession: true, clientID: "clean")).sessionPresent == false)
            let pub = try await b.client("pub")
            try await pub.publish("cs/x", "nobody", qos: .atLeastOnce)
            try await again.expectNothing()
        }
    }

    @Test("clean session 0 keeps subscriptions and queues QoS 1/2 while offline, in order, and says session present")
    func persistentSession() async throws {
        try await withBroker { b in
            let c = try await TestClient.open(port: b.port)
            #expect(try await c.connect(ConnectPacket(cleanSession: false, clientID: "keeper")).sessionPresent == false)
            try await c.subscribe("ps/#", qos: .exactlyOnce)
            await c.disconnect()

            let pub = try await b.client("pub")
            try await pub.publish("ps/1", "one", qos: .atLeastOnce, id: 1)
            try await pub.publish("ps/0", "qos0 not queued", qos: .atMostOnce)
            try await pub.publish("ps/2", "two", qos: .exactlyOnce, id: 2)
            try await pub.publish("ps/3", "three", qos: .atLeastOnce, id: 3)

            // Reconnect (lands on the other worker than the first connection did).
            let back = try await TestClient.open(port: b.port)
            #expect(try await back.connect(ConnectPacket(cleanSession: false, clientID: "keeper")).sessionPresent == true)
            var got: [PublishPacket] = []
            for _ in 0..<3 { got.append(try await back.expectPublish()) }
            #expect(got.map { String(buffer: $0.payload) } == ["one", "two", "three"])
            #expect(got.map(\.qos) == [.atLeastOnce, .exactlyOnce, .atLeastOnce])
            back.send(.puback(packetID: got[0].packetID!))
            back.send(.pubrec(packetID: got[1].packetID!))
            #expect(try await back.expectPacket() == .pubrel(packetID: got[1].packetID!))
            back.send(.pubcomp(packetID: got[1].packetID!))
            back.send(.puback(packetID: got[2].packetID!))
            try await back.expectNothing()

            // The subscription is still there for live messages.
            try await pub.publish("ps/live", "live", qos: .atLeastOnce, id: 4)
            #expect(String(buffer: try await back.expectPublish().payload) == "live")

            // A clean session 1 connect discards it.
            await back.disconnect()
            let clean = try await TestClient.open(port: b.port)
            #expect(try await clean.connect(ConnectPacket(cleanSession: true, clientID: "keeper")).sessionPresent == false)
            await clean.disconnect()
            let fresh = try await TestClient.open(port: b.port)
            #expect(try await fresh.connect(ConnectPacket(cleanSession: false, clientID: "keeper")).sessionPresent == false)
        }
    }

    /// Found by a hostile helper: what a CONNECT's read brought after it was decoded into a list
    /// while the session came from the other worker, and past 1,000 packets the connection was
    /// closed without CONNACK (on the session's own worker all were answered).
    @Test("packets sent with a CONNECT whose session is on the other worker are all answered, however many one read brings")
    func pipelinedWhileSessionMoves() async throws {
        try await withBroker { b in
            let first = try await TestClient.open(port: b.port)
            _ = try await first.connect(ConnectPacket(cleanSession: false, clientID: "pipelined"))
            await first.disconnect()
            // Reconnect (lands on the other worker). A large will grows the broker's receive
            // buffer on the CONNECT's first reads, so the last read brings its end and every PINGREQ.
            let back = try await TestClient.open(port: b.port)
            let will = Will(topic: try TopicName("pipelined/will"), payload: ByteBuffer(repeating: 0x57, count: 65_000), qos: .atMostOnce, retain: false)
            var connect = ByteBuffer()
            connect.writeMQTTPacket(.connect(ConnectPacket(cleanSession: false, clientID: "pipelined", will: will)))
            let bytes = Array(connect.readableBytesView)
            back.sendRaw(Array(bytes.dropLast()))
            try await Task.sleep(for: .milliseconds(300))
            let pings = 3_000
            back.sendRaw([bytes.last!] + Array(repeating: [0xC0, 0x00], count: pings).flatMap { $0 })
            guard case .connack(let connack) = try await back.expectPacket() else { throw TestFailure("no CONNACK first") }
            #expect(connack.returnCode == .accepted && connack.sessionPresent)
            var answered = 0
            while answered < pings, let event = await back.nextEvent(timeout: .seconds(2)) {
                guard case .packet(.pingresp) = event else { break }
                answered += 1
            }
            #expect(answered == pings)
            #expect(!b.logMessages.contains { $0.contains("before CONNACK") })
        }
    }

    @Test("on reconnect, unacknowledged messages are re-sent first with DUP set, then the queue")
    func resendInflight() async throws {
        try await withBroker { b in
            let c = try await TestClient.open(port: b.port)
            _ = try await c.connect(ConnectPacket(cleanSession: false, clientID: "forgetful"))
            try await c.subscribe("rs", qos: .exactlyOnce)
            let pub = try await b.client("pub")
            try await pub.publish("rs", "a", qos: .atLeastOnce, id: 1)
            try await pub.publish("rs", "b", qos: .exactlyOnce, id: 2)
            let a = try await c.expectPublish()
            let bMsg = try await c.expectPublish()
            c.send(.pubrec(packetID: bMsg.packetID!))  // b: PUBREC sent, PUBCOMP never
            #expect(try await c.expectPacket() == .pubrel(packetID: bMsg.packetID!))
            await c.abort()
            try await pub.publish("rs", "c", qos: .atLeastOnce, id: 3)
            try await pub.ping()

            let back = try await TestClient.open(port: b.port)
            #expect(try await back.connect(ConnectPacket(cleanSession: false, clientID: "forgetful")).sessionPresent)
            let again = try await back.expectPublish()
            #expect(again.dup && again.packetID == a.packetID && String(buffer: again.payload) == "a")
            #expect(try await back.expectPacket() == .pubrel(packetID: bMsg.packetID!))
            let queued = try await back.expectPublish()
            #expect(!queued.dup && String(buffer: queued.payload) == "c")
        }
    }

    @Test("takeover across workers: the old connection is closed and its will published; the new one works")
    func takeover() async throws {
        try await withBroker { b in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("wills/#")
            let old = try await b.client("dup", will: will("dup"))
            let new = try await b.client("dup")  // the next connection goes to the other worker
            try await old.expectClosed()
            #expect(try await watcher.expectPublish().topicString == "wills/dup")
            try await new.subscribe("t")
            try await new.publish("t", "mine")
            #expect(String(buffer: try await new.expectPublish().payload) == "mine")
            try await eventually("log line") { b.logMessages.contains { $0.contains("taken over") } }
        }
    }

    @Test("takeover of a persistent session keeps its subscriptions")
    func takeoverPersistent() async throws {
        try await withBroker { b in
            let old = try await TestClient.open(port: b.port)
            _ = try await old.connect(ConnectPacket(cleanSession: false, clientID: "p"))
            try await old.subscribe("pt", qos: .atLeastOnce)
            let new = try await TestClient.open(port: b.port)
            #expect(try await new.connect(ConnectPacket(cleanSession: false, clientID: "p")).sessionPresent)
            try await old.expectClosed()
            let pub = try await b.client("pub")
            try await pub.publish("pt", "to new", qos: .atLeastOnce)
            #expect(String(buffer: try await new.expectPublish().payload) == "to new")
        }
    }

    @Test("the will is published when the socket closes without DISCONNECT, with its QoS and retain flag")
    func willOnSocketClose() async throws {
        try await withBroker { b in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("wills/#", qos: .atLeastOnce)
            let c = try await b.client("dropper", will: will("dropper", qos: .atLeastOnce, retain: true))
            await c.abort()
            let p = try await watcher.expectPublish()
            #expect(p.topicString == "wills/dropper" && p.qos == .atLeastOnce && String(buffer: p.payload) == "dropper gone")
            watcher.send(.puback(packetID: p.packetID!))
            // Retained: a later subscriber gets it.
            let late = try await b.client("late")
            try await late.subscribe("wills/dropper")
            #expect(try await late.expectPublish().retain)
        }
    }

    @Test("the will is discarded on DISCONNECT")
    func noWillOnDisconnect() async throws {
        try await withBroker { b in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("wills/#")
            let c = try await b.client("polite", will: will("polite"))
            await c.disconnect()
            try await watcher.expectNothing()
        }
    }
}
