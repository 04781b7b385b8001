import Foundation
@testable import MQLiteBroker
import MQTTCore
import NIOCore
import Testing

@Suite("Bridges: configuration and echo filter")
struct BridgeTests {
    @Test("[[bridge]] and its topics are read with their defaults; mistakes name file, key and problem")
    func configuration() throws {
        let config = try ConfigFile.parse("""
            [[bridge]]
            name = "cloud"
            address = "broker.example.com:8883"
            client_id = "edge-1"
            username = "edge"
            password = "pw"
            clean_session = true
            keep_alive = 30
            protocol_version = 5
            max_inflight = 500
            max_queued = 5000
            max_queued_bytes = 1000000
            reconnect_delay = { min = 0.5, max = 10 }
            [[bridge.topic]]
            pattern = "sensors/#"
            qos = 1
            remote_prefix = "site1/"
            [[bridge.topic]]
            pattern = "cmd/+"
            direction = "in"
            local_prefix = "edge/"
            [[bridge]]
            name = "other"
            address = "10.0.0.1:1883"
            [[bridge.topic]]
            pattern = "#"
            direction = "both"
            """, file: "/etc/mqlite.conf")
        #expect(config.bridges.count == 2)
        let cloud = config.bridges[0]
        #expect(cloud.name == "cloud" && cloud.address == ListenAddress(host: "broker.example.com", port: 8883) && cloud.clientID == "edge-1")
        #expect(cloud.username == "edge" && cloud.password == "pw" && cloud.cleanSession && cloud.keepAlive == 30 && cloud.protocolVersion == .v5)
        #expect(cloud.maxInflight == 500 && cloud.maxQueued == 5000 && cloud.maxQueuedBytes == 1_000_000 && cloud.reconnectMin == .milliseconds(500) && cloud.reconnectMax == .seconds(10))
        #expect(cloud.topics.map(\.direction) == [.out, .in] && cloud.topics[0].qos == .atLeastOnce && cloud.topics[1].qos == .atMostOnce)
        #expect(cloud.topics[0].remoteFilter == "site1/sensors/#" && cloud.topics[0].localFilter == "sensors/#")
        #expect(cloud.topics[1].localFilter == "edge/cmd/+" && cloud.topics[1].remoteFilter == "cmd/+")
        let other = config.bridges[1]
        #expect(other.clientID == BridgeConfiguration.defaultClientID(name: "other") && !other.cleanSession && other.protocolVersion == .v3_1_1)
        #expect(other.localClientID == "$bridge/other")
        #expect(other.maxQueued == 100_000 && other.maxQueuedBytes == 256 << 20, "a bridge queues more than one client by default, bounded in bytes")

        func problem(_ text: String) -> String {
            do {
                _ = try ConfigFile.parse(text, file: "/etc/mqlite.conf")
                return "accepted"
            } catch {
                return error.description
            }
        }
        let head = "[[bridge]]\nname = \"x\"\naddress = \"127.0.0.1:1883\"\n"
        #expect(problem(head + "[[bridge.topic]]\npattern = \"a/#\"\nqos = 3\n").contains("bridge[0].topic[0].qos"))
        #expect(problem(head + "[[bridge.topic]]\npattern = \"a\"\nremote_prefix = \"+/\"\n").contains("bridge[0].topic[0].remote_prefix"))
        #expect(problem(head + "[[bridge.topic]]\npattern = \"$share/g/a\"\n").contains("bridge[0].topic[0].pattern"))
        #expect(problem("[[bridge]]\nname = \"a/b\"\naddress = \"h:1\"\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].name"))
        #expect(problem(head + "password = \"p\"\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].password"))
        #expect(problem(head + "certfile = \"/etc/hostname\"\nkeyfile = \"/etc/hostname\"\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].cafile"))
        // TLS files are read at the check: not PEM, or a FIFO (reading it on a worker hung the broker).
        #expect(problem(head + "cafile = \"/etc/hostname\"\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].cafile: no PEM CA certificate"))
        let fifo = FileManager.default.temporaryDirectory.appendingPathComponent("mqlite-fifo-\(UUID().uuidString)").path
        #expect(mkfifo(fifo, 0o600) == 0)
        defer { unlink(fifo) }
        #expect(problem(head + "cafile = \"\(fifo)\"\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].cafile: \(fifo) is not a regular file"))
        #expect(problem(head + "reconnect_delay = { min = 5, max = 1 }\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].reconnect_delay.max"))
        #expect(problem(head + "[[bridge.topic]]\npattern = \"a\"\n" + head + "[[bridge.topic]]\npattern = \"b\"\n").contains("names another bridge"))
        // Past what an MQTT string holds (the encoder would trap on the first connect).
        let long = String(repeating: "u", count: 65536)
        #expect(problem(head + "username = \"\(long)\"\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].username: must be at most 65,535 bytes"))
        #expect(problem(head + "username = \"u\"\npassword = \"\(long)\"\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].password: must be at most 65,535 bytes"))
        #expect(problem(head + "client_id = \"\(long)\"\n[[bridge.topic]]\npattern = \"a\"\n").contains("bridge[0].client_id: must be 1 to 65,535 bytes"))
        // One client id for two links to one remote: they would take each other's session there.
        let twice = head + "client_id = \"edge\"\n[[bridge.topic]]\npattern = \"a\"\n"
            + "[[bridge]]\nname = \"y\"\naddress = \"127.0.0.1:1883\"\nclient_id = \"edge\"\n[[bridge.topic]]\npattern = \"b\"\n"
        #expect(problem(twice).contains("bridge[1].client_id"))
        #expect(problem(twice.replacingOccurrences(of: "name = \"y\"\naddress = \"127.0.0.1:1883\"", with: "name = \"y\"\naddress = \"127.0.0.2:1883\"")) == "accepted")
    }

    @Test("the echo filter drops each message sent once when it comes back, and forgets the oldest past its capacity")
    func echoFilter() {
        var filter = EchoFilter()
        let t = ByteBuffer(string: "chat/a")
        filter.add(topic: t, payload: ByteBuffer(string: "hi"))
        filter.add(topic: t, payload: ByteBuffer(string: "hi"))
        let taken1 = filter.take(topic: t, payload: ByteBuffer(string: "other"))
        #expect(!taken1)
        let taken2 = filter.take(topic: ByteBuffer(string: "chat/b"), payload: ByteBuffer(string: "hi"))
        #expect(!taken2)
        let taken3 = filter.take(topic: t, payload: ByteBuffer(string: "hi"))
        #expect(taken3)
        let taken4 = filter.take(topic: t, payload: ByteBuffer(string: "hi"))
        #expect(taken4)
        let taken5 = filter.take(topic: t, payload: ByteBuffer(string: "hi"))
        #expect(!taken5, "each echo is dropped once")
        filter.add(topic: t, payload: ByteBuffer(string: "first"))
        for i in 0..<EchoFilter.capacity { filter.add(topic: t, payload: ByteBuffer(string: "n\(i)")) }
        let taken6 = filter.take(topic: t, payload: ByteBuffer(string: "first"))
        #expect(!taken6, "forgotten past the capacity")
        let taken7 = filter.take(topic: t, payload: ByteBuffer(string: "n\(EchoFilter.capacity - 1)"))
        #expect(taken7)
    }
}
