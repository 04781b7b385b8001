#if canImport(Glibc)
import Glibc
#endif
import MQLiteBroker
import MQTTCore
import NIOCore
import MQLiteTestSupport
import Testing

@Suite("Connections")
struct ConnectionTests {
    @Test("startup logs the address actually bound, with its real port")
    func logsBoundAddress() async throws {
        try await withBroker { b in
            #expect(b.port != 0)
            #expect(b.logMessages.contains { $0.contains("listening on 127.0.0.1:\(b.port)") })
        }
    }

    @Test("a first packet that is not CONNECT closes the connection with one log line")
    func connectFirst() async throws {
        try await withBroker { b in
            let c = try await TestClient.open(port: b.port)
            c.send(.pingreq)
            let before = try await c.expectClosed()
            #expect(before.isEmpty)
            try await eventually("log line") { b.logMessages.contains { $0.contains("first packet is pingreq, not CONNECT (first byte 0xC0)") } }
        }
    }

    @Test("closes before CONNECT (garbage, a malformed or unsupported CONNECT) are logged at most once per 10 s per listener; after CONNECT, each is")
    func closesBeforeConnectAreRateLimited() async throws {
        try await withBroker { b in
            for _ in 0..<10 {
                let c = try await TestClient.open(port: b.port)
                c.send(.pingreq)
                _ = try await c.expectClosed()
            }
            for level: UInt8 in [3, 9] {  // MQTT 3.1 (unsupported); level 9 (unknown)
                let c = try await TestClient.open(port: b.port)
                c.sendRaw([0x10, 0x0C, 0x00, 0x04] + Array("MQTT".utf8) + [level, 0x02, 0x00, 0x3C, 0x00, 0x00])
                _ = try await c.expectClosed()
            }
            for id in ["one", "two"] {
                let c = try await b.client(id)
                c.sendRaw([0xF0, 0x00])  // packet type 15
                _ = try await c.expectClosed()
            }
            try await eventually("log lines") { b.logMessages.filter { $0.contains("invalid packet type") }.count >= 2 }
            let lines = b.logMessages
            #expect(lines.filter { $0.contains("first packet is pingreq") }.count == 1, "\(lines)")
            #expect(!lines.contains { $0.contains("refusing CONNECT") }, "\(lines)")
        }
    }

    @Test("a second CONNECT closes the connection")
    func secondConnect() async throws {
        try await withBroker { b in
            let c = try await b.client("twice")
            c.send(.connect(ConnectPacket(clientID: "twice")))
            try await c.expectClosed()
            try await eventually("log line") { b.logMessages.contains { $0.contains("second CONNECT") && $0.contains("twice") } }
        }
    }

    @Test("a socket that sends no CONNECT within connect_timeout is closed")
    func connectTimeout() async throws {
        try await withBroker(configure: { $0.limits.connectTimeout = .milliseconds(300) }) { b in
            // The clock starts before the socket exists, so the broker's timer cannot have started earlier.
            let clock = ContinuousClock()
            let start = clock.now
            let c = try await TestClient.open(port: b.port)
            try await c.expectClosed(timeout: .seconds(3))
            #expect(clock.now - start >= .milliseconds(300))
        }
    }

    @Test("an empty client id gets one assigned with clean session 1, CONNACK 2 with clean session 0")
    func emptyClientID() async throws {
        try await withBroker { b in
            let ok = try await TestClient.open(port: b.port)
            #expect(try await ok.connect(ConnectPacket(cleanSession: true, clientID: "")).returnCode == .accepted)
            try await ok.subscribe("anon/#")
            try await ok.publish("anon/x", "works")
            #expect(String(buffer: try await ok.expectPublish().payload) == "works")

            let refused = try await TestClient.open(port: b.port)
            #expect(try await refused.connect(ConnectPacket(cleanSession: false, clientID: "")).returnCode == .identifierRejected)
            try await refused.expectClosed()
        }
    }

    @Test("an unsupported protocol level (past 5) gets CONNACK 1 and a close")
    func unsupportedProtocol() async throws {
        try await withBroker { b in
            let c = try await TestClient.open(port: b.port)
            c.send(.connect(ConnectPacket(protocolLevel: 6, clientID: "v6")))
            let packets = try await c.expectClosed()
            #expect(packets == [.connack(ConnackPacket(sessionPresent: false, returnCode: .unacceptableProtocolVersion))])
        }
    }

    @Test("a CONNECT of another protocol's name, at any level, is closed without an answer (MQTT-3.1.2-1; as Mosquitto)")
    func otherProtocolName() async throws {
        try await withBroker { b in
            for level: UInt8 in [4, 5] {
                let c = try await TestClient.open(port: b.port)
                c.send(.connect(ConnectPacket(protocolName: "hj", protocolLevel: level, clientID: "other-\(level)")))
                let packets = try await c.expectClosed()
                #expect(packets.isEmpty, "level \(level): answered \(packets)")
            }
        }
    }

    @Test("MQIsdp level 3 (MQTT 3.1) is accepted; with an empty client id it gets CONNACK 2 (3.1 assigns none)")
    func mqtt31() async throws {
        try await withBroker { b in
            let c = try await TestClient.open(port: b.port)
            let ack = try await c.connect(ConnectPacket(protocolName: "MQIsdp", protocolLevel: 3, clientID: "old"))
            #expect(ack.returnCode == .accepted)
            let anonymous = try await TestClient.open(port: b.port)
            #expect(try await anonymous.connect(ConnectPacket(protocolName: "MQIsdp", protocolLevel: 3, clientID: "")).returnCode == .identifierRejected)
        }
    }

    @Test("an acknowledgement that does not fit the message in flight under its id closes the connection (PUBACK for QoS 2, PUBCOMP before PUBREC, PUBREC for QoS 1); one for an id not in flight is ignored")
    func acknowledgementOutOfFlow() async throws {
        try await withBroker { b in
            let publisher = try await b.client("pub")
            for (index, (qos, wrong)) in [(QoS.exactlyOnce, "puback"), (.exactlyOnce, "pubcomp"), (.atLeastOnce, "pubrec")].enumerated() {
                let sub = try await b.client("sub\(index)")
                try await sub.subscribe("flow/\(index)", qos: qos)
                sub.send(.puback(packetID: 999))  // not in flight: ignored
                try await sub.ping()
                try await publisher.publish("flow/\(index)", "x", qos: qos)
                let id = try await sub.expectPublish().packetID!
                switch wrong {
                case "puback": sub.send(.puback(packetID: id))
                case "pubcomp": sub.send(.pubcomp(packetID: id))
                default: sub.send(.pubrec(packetID: id))
                }
                try await sub.expectClosed()
                try await eventually("log") { b.logMessages.contains { $0.contains("for packet id \(id) does not fit") } }
            }
        }
    }

    @Test("a stopping broker publishes the wills of the clients still connected, before it closes the connections of their subscribers, on every worker (MQTT-3.1.2-8)")
    func willsOnShutdown() async throws {
        try await withBroker { b in
            // (Connections alternate between the two workers.)
            let watchers = [try await b.client("watcher-0"), try await b.client("watcher-1")]
            for w in watchers { try await w.subscribe("wills/#") }
            for i in 0..<4 {
                _ = try await b.client("dev-\(i)", will: Will(topic: try TopicName("wills/\(i)"), payload: ByteBuffer(string: "offline"), qos: .atLeastOnce, retain: false))
            }
            let polite = try await b.client("polite", will: Will(topic: "wills/polite", payload: ByteBuffer(string: "x"), qos: .atMostOnce, retain: false))
            await polite.disconnect()  // a DISCONNECT discards the will
            await b.broker.shutdown()
            for w in watchers {
                let got = try await w.expectClosed().compactMap { packet -> String? in
                    guard case .publish(let p) = packet else { return nil }
                    return p.topicString
                }
                #expect(Set(got) == Set((0..<4).map { "wills/\($0)" }), "\(got)")
            }
        }
    }

    @Test("a stopping broker: wills queued behind a QoS 1 subscriber's in-flight window reach it as it acknowledges, before its connection closes")
    func willsBehindTheWindowOnShutdown() async throws {
        try await withBroker(configure: { $0.limits.maxInflight = 2 }) { b in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("wills/#", qos: .atLeastOnce)
            for i in 0..<20 {
                _ = try await b.client("dev-\(i)", will: Will(topic: try TopicName("wills/\(i)"), payload: ByteBuffer(string: "offline"), qos: .atLeastOnce, retain: false))
            }
            let broker = b.broker
            let stopping = Task { await broker.shutdown() }
            var got: Set<String> = []
            while let packet = try? await watcher.expectPacket(timeout: .seconds(3)) {
                guard case .publish(let p) = packet else { continue }
                got.insert(p.topicString)
                watcher.send(.puback(packetID: p.packetID!))
            }
            await stopping.value
            #expect(got == Set((0..<20).map { "wills/\($0)" }), "\(got.count) of 20")
        }
    }

    @Test("a malformed packet closes that connection only, logs client, address and reason, and publishes its will")
    func malformedPacket() async throws {
        try await withBroker { b in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("#")
            let bad = try await b.client("bad", will: Will(topic: "wills/bad", payload: ByteBuffer(string: "bye"), qos: .atMostOnce, retain: false))
            bad.sendRaw([0x30, 0x04, 0, 2, 0x61, 0x00])  // topic with U+0000
            try await bad.expectClosed()
            let will = try await watcher.expectPublish()
            #expect(will.topicString == "wills/bad")
            try await eventually("log line") {
                b.logMessages.contains { $0.contains("U+0000") && $0.contains("bad") && $0.contains("127.0.0.1") }
            }
            // The other client carries on.
            try await watcher.publish("still/here", "yes")
            #expect(try await watcher.expectPublish().topicString == "still/here")
        }
    }

    @Test("a PROXY protocol header on a listener without proxy_protocol closes the connection at once (its first byte is not CONNECT's), not at connect_timeout")
    func proxyHeaderOnAPlainListener() async throws {
        try await withBroker(configure: { $0.limits.connectTimeout = .seconds(30) }) { b in
            let c = try await TestClient.open(port: b.port)
            c.sendRaw(Array("PROXY TCP4 10.66.1.1 127.0.0.1 51000 1883\r\n".utf8))
            _ = try await c.expectClosed(timeout: .seconds(5))
            try await eventually("log line") { b.logMessages.contains { $0.contains("first packet is pubrec, not CONNECT (first byte 0x50) (a PROXY protocol header on a listener without proxy_protocol?)") } }
        }
    }

    @Test("a packet over max_packet_size closes the connection")
    func maxPacketSize() async throws {
        try await withBroker(configure: { $0.limits.maxPacketSize = 1024 }) { b in
            let c = try await b.client("big")
            try await c.publish("ok", String(repeating: "x", count: 900))
            c.sendRaw([0x30, 0xD0, 0x0F])  // header of a 2000-byte PUBLISH, no body sent
            try await c.expectClosed()
            try await eventually("log line") { b.logMessages.contains { $0.contains("max_packet_size 1024") } }
        }
    }

    @Test("max_connections refuses connections past the limit")
    func maxConnections() async throws {
        try await withBroker(configure: { $0.limits.maxConnections = 2 }) { b in
            let c1 = try await b.client("c1")
            let c2 = try await b.client("c2")
            let c3 = try await TestClient.open(port: b.port)
            try await c3.expectClosed()
            try await c1.ping()
            try await c2.ping()
            await c2.disconnect()
            try await eventually("connection count drops") { b.broker.openConnections == 1 }
            _ = try await b.client("c4")
        }
    }

    @Test("a keep-alive over max_keep_alive gets CONNACK 2")
    func maxKeepAlive() async throws {
        try await withBroker(configure: { $0.limits.maxKeepAlive = 60 }) { b in
            let c = try await TestClient.open(port: b.port)
            #expect(try await c.connect(ConnectPacket(keepAlive: 61, clientID: "k")).returnCode == .identifierRejected)
            _ = try await b.client("k2", keepAlive: 60)
        }
    }

    @Test("with allow_anonymous false and nothing that checks user names (no on_connect hook), every client gets CONNACK 5, as with Mosquitto without a password file")
    func anonymousRefused() async throws {
        try await withBroker(configure: { $0.allowAnonymous = false }) { b in
            for (id, user) in [("anon", nil), ("named", "alice")] as [(String, String?)] {
                let c = try await TestClient.open(port: b.port)
                #expect(try await c.connect(ConnectPacket(clientID: id, username: user, password: user.map { _ in ByteBuffer(string: "x") })).returnCode == .notAuthorized)
                try await c.expectClosed()
            }
            try await eventually("log line") { b.logMessages.contains { $0.contains("nothing checks user names") } }
        }
    }

    @Test("keep-alive: no packet for 1.5 x keep-alive closes the connection and publishes the will")
    func keepAliveExpiry() async throws {
        try await withBroker { b in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("wills/#")
            let clock = ContinuousClock()
            let start = clock.now
            let idle = try await b.client("idle", keepAlive: 1, will: Will(topic: "wills/idle", payload: ByteBuffer(string: "timeout"), qos: .atLeastOnce, retain: false))
            let connected = clock.now
            try await idle.expectClosed(timeout: .seconds(5))
            // Not before 1.5 s after the CONNECT was sent; not long after its CONNACK came (on a
            // loaded machine the connect itself may take a while).
            #expect(clock.now - start >= .milliseconds(1500), "closed after \(clock.now - start)")
            #expect(clock.now - connected < .milliseconds(3500), "closed \(clock.now - connected) after CONNACK")
            #expect(String(buffer: try await watcher.expectPublish().payload) == "timeout")
        }
    }

    @Test("keep-alive: the bytes of a packet trickled in, one at a time, do not keep the connection open")
    func keepAliveTrickle() async throws {
        try await withBroker { b in
            let clock = ContinuousClock()
            let start = clock.now  // (before CONNECT: the broker counts from it)
            let c = try await b.client("trickle", keepAlive: 1)
            let connected = clock.now
            c.sendRaw([0x30, 100])  // a PUBLISH of 100 bytes, then one byte every 200 ms
            trickle: for _ in 0..<25 {  // 5 s, and still 75 bytes short
                switch await c.nextEvent(timeout: .milliseconds(200)) {
                case .closed: break trickle
                case .packet(let packet): throw TestFailure("unexpected \(packet)")
                case nil: c.sendRaw([0])
                }
            }
            // Not before 1.5 s after CONNECT; not long after CONNACK (a loaded machine's connect is slow).
            #expect(clock.now - start >= .milliseconds(1500), "closed after \(clock.now - start)")
            #expect(clock.now - connected < .milliseconds(4000), "closed \(clock.now - connected) after CONNACK")
        }
    }

    @Test("keep-alive: PINGREQ within the period keeps the connection open")
    func keepAlivePing() async throws {
        try await withBroker { b in
            let c = try await b.client("pinger", keepAlive: 2)
            // 3.6 s in all, past the 3 s limit; each gap well inside it, even on a loaded host.
            for _ in 0..<12 {
                try await Task.sleep(for: .milliseconds(300))
                try await c.ping()
            }
        }
    }

    @Test("keep-alive 0 disables the check")
    func keepAliveZero() async throws {
        try await withBroker { b in
            let c = try await b.client("forever", keepAlive: 0)
            try await c.expectNothing(for: .milliseconds(1600))
            try await c.ping()
        }
    }

    @Test("SIGTERM-style shutdown closes clients")
    func shutdownClosesClients() async throws {
        var client: TestClient?
        try await withBroker { b in client = try await b.client("leaving") }
        try await client?.expectClosed()
    }

    #if os(Linux)
    /// TCP_NODELAY is set on the listening socket only (accepted sockets copy it on Linux): each
    /// small packet goes out at once, not after the client's delayed ACK (Nagle).
    @Test("accepted sockets have TCP_NODELAY")
    func acceptedSocketsHaveNoDelay() async throws {
        try await withBroker { b in
            let client = try await b.client("nodelay")
            // The broker's side of the connection: a socket of this process whose local port is
            // the listener's and which has a peer.
            var checked = 0
            for name in try OpenDescriptors.all() {
                var address = sockaddr_in(), length = socklen_t(MemoryLayout<sockaddr_in>.size)
                var peer = sockaddr_in(), peerLength = length
                let isAccepted = withUnsafeMutablePointer(to: &address) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(name, $0, &length) == 0 }
                } && withUnsafeMutablePointer(to: &peer) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(name, $0, &peerLength) == 0 }
                }
                guard isAccepted, address.sin_family == sa_family_t(AF_INET), Int(UInt16(bigEndian: address.sin_port)) == b.port else { continue }
                var value: CInt = 0
                var size = socklen_t(MemoryLayout<CInt>.size)
                #expect(getsockopt(name, CInt(IPPROTO_TCP), TCP_NODELAY, &value, &size) == 0)
                #expect(value == 1, "an accepted socket without TCP_NODELAY")
                checked += 1
            }
            #expect(checked >= 1, "the broker's side of the connection was not found")
            await client.disconnect()
        }
    }
    #endif
}

#if os(Linux)
/// This process's open file descriptors (from /proc/self/fd).
private enum OpenDescriptors {
    static func all() throws -> [CInt] {
        guard let directory = opendir("/proc/self/fd") else { throw TestFailure("cannot list /proc/self/fd") }
        defer { closedir(directory) }
        var result: [CInt] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let fd = CInt(name) { result.append(fd) }
        }
        return result
    }
}
#endif
