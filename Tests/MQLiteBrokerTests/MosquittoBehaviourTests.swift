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
