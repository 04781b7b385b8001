import Foundation
@testable import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// `[persistence]`: persistent sessions (3.1.1 clean session 0, MQTT 5 session expiry) in
/// SQLite, across a restart of the broker.
@Suite("Persistent sessions (SQLite)")
struct PersistentSessionTests {
    static func connect(_ b: BrokerFixture, _ id: String, clean: Bool = false) async throws -> (TestClient, ConnackPacket) {
        let c = try await TestClient.open(port: b.port)
        let connack = try await c.connect(ConnectPacket(cleanSession: clean, keepAlive: 0, clientID: id))
        guard connack.returnCode == .accepted else { throw TestFailure("CONNACK \(connack.returnCode) for \(id)") }
        return (c, connack)
    }

    @Test("a persistent session survives a restart, for every sync mode: its subscriptions, its queue (QoS 1 and 2, not QoS 0), its messages in flight (re-sent with DUP, or their PUBREL), and inbound QoS 2 ids awaiting PUBREL (a re-sent PUBLISH is not delivered twice)")
    func restart() async throws {
        for sync in PersistenceConfiguration.Sync.allCases {
            try await PersistenceTests.withFolder { folder in
                let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: sync, flushInterval: 0.05)
                var inflightID: UInt16 = 0
                var releasedID: UInt16 = 0
                try await withBroker(configure: { $0.persistence = store }) { b in
                    let (sub, first) = try await Self.connect(b, "sub")
                    #expect(!first.sessionPresent)
                    #expect(try await sub.subscribe([("q/#", .exactlyOnce), ("one/+", .atLeastOnce)]) == [.granted(.exactlyOnce), .granted(.atLeastOnce)])
                    let pub = try await b.client("pub")
                    // In flight to the subscriber: a QoS 1 message it does not acknowledge, and a
                    // QoS 2 message it acknowledges with PUBREC only (PUBREL sent, PUBCOMP owed).
                    try await pub.publish("q/inflight", "i", qos: .atLeastOnce)
                    let p1 = try await sub.expectPublish()
                    inflightID = p1.packetID!
                    try await pub.publish("q/released", "r", qos: .exactlyOnce, id: 2)
                    let p2 = try await sub.expectPublish()
                    releasedID = p2.packetID!
                    sub.send(.pubrec(packetID: releasedID))
                    #expect(try await sub.expectPacket() == .pubrel(packetID: releasedID))
                    await sub.abort()
                    try await eventually("the subscriber is offline") { b.broker.registry.session(for: "sub")?.isOnline == false }
                    // Offline: QoS 1 and 2 are queued, QoS 0 is not.
                    try await pub.publish("q/a", "a", qos: .atLeastOnce, id: 3)
                    try await pub.publish("q/zero", "z", qos: .atMostOnce)
                    try await pub.publish("one/x", "x", qos: .exactlyOnce, id: 4)
                    // A publisher with a persistent session stops between PUBREC and PUBREL.
                    let (p2c, _) = try await Self.connect(b, "pub2")
                    p2c.send(.publish(PublishPacket(topic: ByteBuffer(string: "q/once"), payload: ByteBuffer(string: "once"), qos: .exactlyOnce, retain: false, packetID: 7)))
                    #expect(try await p2c.expectPacket() == .pubrec(packetID: 7))
                    await p2c.abort()
                    try await pub.ping()
                }
                try await withBroker(configure: { $0.persistence = store }) { b in
                    #expect(b.logMessages.contains { $0.contains("restored 2 persistent sessions") })
                    let (sub, connack) = try await Self.connect(b, "sub")
                    #expect(connack.sessionPresent)
                    // In flight first, as it was: the QoS 1 PUBLISH again with DUP, and the PUBREL.
                    let again = try await sub.expectPublish()
                    #expect(again.dup && again.packetID == inflightID && String(buffer: again.topic) == "q/inflight" && again.qos == .atLeastOnce)
                    #expect(try await sub.expectPacket() == .pubrel(packetID: releasedID))
                    sub.send(.puback(packetID: inflightID))
                    sub.send(.pubcomp(packetID: releasedID))
                    var queued: [String] = []
                    for _ in 0..<3 {
                        let p = try await sub.expectPublish()
                        queued.append("\(String(buffer: p.topic)) \(String(buffer: p.payload)) \(p.qos.rawValue)")
                        #expect(!p.dup, "queued, not sent before")
                        if p.qos == .atLeastOnce { sub.send(.puback(packetID: p.packetID!)) }
                        if p.qos == .exactlyOnce {
                            sub.send(.pubrec(packetID: p.packetID!))
                            #expect(try await sub.expectPacket() == .pubrel(packetID: p.packetID!))
                            sub.send(.pubcomp(packetID: p.packetID!))
                        }
                    }
                    #expect(queued == ["q/a a 1", "one/x x 1", "q/once once 2"])
                    // The publisher's QoS 2 id still awaits PUBREL: its PUBLISH again is not delivered again.
                    let (p2c, present) = try await Self.connect(b, "pub2")
                    #expect(present.sessionPresent)
                    p2c.send(.publish(PublishPacket(topic: ByteBuffer(string: "q/once"), payload: ByteBuffer(string: "once"), qos: .exactlyOnce, retain: false, dup: true, packetID: 7)))
                    #expect(try await p2c.expectPacket() == .pubrec(packetID: 7))
                    p2c.send(.pubrel(packetID: 7))
                    #expect(try await p2c.expectPacket() == .pubcomp(packetID: 7))
                    try await sub.expectNothing()
                    // The subscriptions are live again.
                    let pub = try await b.client("pub")
                    try await pub.publish("one/y", "y", qos: .atLeastOnce)
                    let live = try await sub.expectPublish()
                    #expect(String(buffer: live.topic) == "one/y" && live.qos == .atLeastOnce)
                    sub.send(.puback(packetID: live.packetID!))
                    try await sub.ping()
                }
                // What was delivered and acknowledged is owed no longer; the session stays.
                try await withBroker(configure: { $0.persistence = store }) { b in
                    let (sub, connack) = try await Self.connect(b, "sub")
                    #expect(connack.sessionPresent)
                    try await sub.expectNothing()
                    // A clean session 1 ends it: gone after the next restart.
                    await sub.abort()
                    let (clean, _) = try await Self.connect(b, "sub", clean: true)
                    await clean.disconnect()
                }
                try await withBroker(configure: { $0.persistence = store }) { b in
                    let (sub, connack) = try await Self.connect(b, "sub")
                    #expect(!connack.sessionPresent)
                    await sub.abort()
                }
            }
        }
    }

    @Test("MQTT 5: a session's expiry, its subscriptions' options (No Local, Retain As Published) and Subscription Identifiers, and message properties survive a restart")
    func mqtt5() async throws {
        try await PersistenceTests.withFolder { folder in
            let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            var keep = MQTTProperties()
            keep.sessionExpiryInterval = 300
            try await withBroker(configure: { $0.persistence = store }) { b in
                let (c, _) = try await b.client5("five", cleanStart: false, properties: keep)
                var properties = MQTTProperties()
                properties.subscriptionIdentifiers = [42]
                c.send(.subscribe(SubscribePacket(packetID: 1, subscriptions: [
                    Subscription(filter: "five/#", qos: .atLeastOnce, noLocal: true, retainAsPublished: true),
                ], properties: properties)))
                guard case .suback = try await c.expectPacket() else { throw TestFailure("expected SUBACK") }
                c.send(.disconnect)
                try await eventually("offline") { b.broker.registry.session(for: "five")?.isOnline == false }
                let (pub, _) = try await b.client5("pub")
                var user = MQTTProperties()
                user.userProperties = [UserProperty(name: "k", value: "v")]
                user.messageExpiryInterval = 600
                pub.send(.publish(PublishPacket(topic: ByteBuffer(string: "five/a"), payload: ByteBuffer(string: "a"), qos: .atLeastOnce, retain: true, packetID: 1, properties: user)))
                #expect(try await pub.expectPacket() == .puback(packetID: 1))
            }
            try await withBroker(configure: { $0.persistence = store }) { b in
                let (c, connack) = try await b.client5("five", cleanStart: false, properties: keep)
                #expect(connack.sessionPresent && connack.properties.sessionExpiryInterval == nil)
                let p = try await c.expectPublish()
                #expect(String(buffer: p.topic) == "five/a" && p.retain, "Retain As Published")
                #expect(p.properties.subscriptionIdentifiers == [42] && p.properties.userProperties == [UserProperty(name: "k", value: "v")])
                #expect((590...600).contains(p.properties.messageExpiryInterval ?? 0))
                c.send(.puback(packetID: p.packetID!))
                // No Local: its own message does not come back.
                c.send(.publish(PublishPacket(topic: ByteBuffer(string: "five/own"), payload: ByteBuffer(string: "own"), qos: .atMostOnce)))
                try await c.expectNothing()
                // The session ends with this connection now (expiry 0 at DISCONNECT): gone after a restart.
                var end = MQTTProperties()
                end.sessionExpiryInterval = 0
                c.send(.disconnectV5(DisconnectPacket(reasonCode: .normalDisconnection, properties: end)))
                _ = try await c.expectClosed()
            }
            let reopened = try PersistentStore(configuration: store, logger: PersistenceTests.logger)
            #expect(reopened.loaded.sessions == 0)
            reopened.close()
        }
    }

    @Test("a session whose expiry passes is gone: at run time (session_expiry), and while the broker is stopped (MQTT 5 Session Expiry Interval, capped by the session_expiry of the broker that restores it)")
    func expiry() async throws {
        try await PersistenceTests.withFolder { folder in
            let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withBroker(configure: { $0.persistence = store; $0.limits.sessionExpiry = .seconds(1) }) { b in
                let (old, _) = try await Self.connect(b, "old")
                try await old.subscribe("x", qos: .atLeastOnce)
                await old.abort()
                try await eventually("the 3.1.1 session expires at run time", timeout: .seconds(5)) {
                    b.logMessages.contains { $0.contains("session expired") && $0.contains("old") }
                }
            }
            try await withBroker(configure: { $0.persistence = store }) { b in
                let (five, _) = try await b.client5("five", cleanStart: false, properties: { var p = MQTTProperties(); p.sessionExpiryInterval = 1; return p }())
                await five.abort()
                // Asked for never, granted with no session_expiry: capped by the next broker's.
                let (forever, _) = try await b.client5("forever", cleanStart: false, properties: { var p = MQTTProperties(); p.sessionExpiryInterval = .max; return p }())
                await forever.abort()
                // Stopped before it expires here.
            }
            try await Task.sleep(for: .milliseconds(1200))
            try await withBroker(configure: { $0.persistence = store; $0.limits.sessionExpiry = .seconds(1) }) { b in
                // "forever" expires while stopped (capped at 1 s here); "five" (1 s) too, unless the
                // broker before took over a second to stop, on a loaded machine: then at run time.
                #expect(b.logMessages.contains {
                    $0.contains("restored 0 persistent sessions (2 expired while stopped)") || $0.contains("restored 0 persistent sessions (1 expired while stopped)")
                })
                for id in ["old", "five", "forever"] {
                    let (c, connack) = try await Self.connect(b, id)
                    #expect(!connack.sessionPresent)
                    await c.abort()
                }
            }
        }
    }

    @Test("clean sessions, and messages nobody persistent gets, do no disk work at all; a persistent subscriber's messages are committed before their PUBACK (sync full)")
    func noDiskWorkForCleanSessions() async throws {
        try await PersistenceTests.withFolder { folder in
            let configuration = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withBroker(configure: { $0.persistence = configuration }) { b in
                let store = b.broker.store!
                let sub = try await b.client("sub")
                try await sub.subscribe("c/#", qos: .atLeastOnce)
                let pub = try await b.client("pub")
                for i in 0..<50 {
                    try await pub.publish("c/\(i)", "m", qos: i % 2 == 0 ? .atLeastOnce : .exactlyOnce, id: UInt16(i + 1))
                    let p = try await sub.expectPublish()
                    sub.send(p.qos == .atLeastOnce ? .puback(packetID: p.packetID!) : .pubrec(packetID: p.packetID!))
                    if p.qos == .exactlyOnce {
                        #expect(try await sub.expectPacket() == .pubrel(packetID: p.packetID!))
                        sub.send(.pubcomp(packetID: p.packetID!))
                    }
                }
                try await sub.ping()
                #expect(store.commits == 0)
                // A persistent subscriber: what it is owed is on disk when the publisher's PUBACK comes.
                let (keep, _) = try await Self.connect(b, "keep")
                try await keep.subscribe("c/#", qos: .atLeastOnce)
                await keep.abort()
                try await eventually("offline") { b.broker.registry.session(for: "keep")?.isOnline == false }
                let before = store.commits
                try await pub.publish("c/kept", "k", qos: .atLeastOnce, id: 99)
                #expect(store.commits > before)
                // Exported: mqlite_store_commits_total{result="ok"|"failed"}.
                let stats = try await b.broker.collectStats(on: b.broker.group.next()).get()
                b.broker.metrics.update(stats, listeners: b.broker.configuration.listeners)
                let text = b.broker.metrics.render()
                #expect(text.contains("mqlite_store_commits_total{result=\"ok\"} \(store.commits)"), "\(text)")
                #expect(text.contains("mqlite_store_commits_total{result=\"failed\"} 0"))
            }
        }
    }

    @Test("sync full: PUBACKs and PUBRECs keep the order of their PUBLISHes when some wait for the store and others do not, and a burst shares commits instead of taking one each")
    func acknowledgementOrder() async throws {
        try await PersistenceTests.withFolder { folder in
            try await withBroker(configure: { $0.persistence = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full) }) { b in
                let (keep, _) = try await Self.connect(b, "keep")
                try await keep.subscribe("kept/#", qos: .exactlyOnce)
                await keep.abort()
                try await eventually("offline") { b.broker.registry.session(for: "keep")?.isOnline == false }
                let pub = try await b.client("pub")
                let before = b.broker.store!.commits
                // 300 PUBLISHes sent at once: every third waits for the store (a persistent
                // subscriber gets it), the others do not; QoS 1 and 2 mixed.
                for i in 1...300 {
                    let topic = i % 3 == 0 ? "kept/\(i)" : "free/\(i)"
                    pub.send(.publish(PublishPacket(topic: ByteBuffer(string: topic), payload: ByteBuffer(string: "m"), qos: i % 2 == 0 ? .exactlyOnce : .atLeastOnce, packetID: UInt16(i))))
                }
                var order: [UInt16] = []
                while order.count < 300 {
                    switch try await pub.expectPacket() {
                    case .puback(let id): order.append(id)
                    case .pubrec(let id):
                        order.append(id)
                        pub.send(.pubrel(packetID: id))
                    case .pubcomp: continue
                    case let other: throw TestFailure("unexpected \(other)")
                    }
                }
                #expect(order == Array(1...300), "acknowledgements out of order")
                let commits = b.broker.store!.commits - before
                #expect(commits < 100, "\(commits) commits for 100 kept messages sent at once")
            }
        }
    }

    @Test("sync full, QoS 2 with stored sessions: PUBCOMP to a publisher and PUBREL to a subscriber, SUBACK and UNSUBACK wait for the commit (else a kill -9 could leave an id awaiting PUBREL that swallows the client's next message, or send a released message again)")
    func qos2WaitsForTheStore() async throws {
        try await PersistenceTests.withFolder { folder in
            try await withBroker(configure: { $0.persistence = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full) }) { b in
                let store = b.broker.store!
                let (sub, _) = try await Self.connect(b, "q2sub")
                try await sub.subscribe("q2/#", qos: .exactlyOnce)
                let (pub, _) = try await Self.connect(b, "q2pub")
                store.commitDelay.store(300, ordering: .relaxed)
                let clock = ContinuousClock()
                pub.send(.publish(PublishPacket(topic: ByteBuffer(string: "q2/x"), payload: ByteBuffer(string: "m"), qos: .exactlyOnce, packetID: 5)))
                #expect(try await pub.expectPacket() == .pubrec(packetID: 5))
                let p = try await sub.expectPublish()
                var started = clock.now
                pub.send(.pubrel(packetID: 5))
                #expect(try await pub.expectPacket() == .pubcomp(packetID: 5))
                #expect(clock.now - started >= .milliseconds(250), "PUBCOMP before the commit")
                started = clock.now
                sub.send(.pubrec(packetID: p.packetID!))
                #expect(try await sub.expectPacket() == .pubrel(packetID: p.packetID!))
                #expect(clock.now - started >= .milliseconds(250), "PUBREL before the commit")
                sub.send(.pubcomp(packetID: p.packetID!))
                // SUBACK and UNSUBACK too: a session reported present after a crash has what they said.
                started = clock.now
                #expect(try await sub.subscribe([("more/#", .atLeastOnce)], id: 8) == [.granted(.atLeastOnce)])
                #expect(clock.now - started >= .milliseconds(250), "SUBACK before the commit")
                started = clock.now
                sub.send(.unsubscribe(UnsubscribePacket(packetID: 9, filters: ["more/#"])))
                #expect(try await sub.expectPacket() == .unsuback(packetID: 9))
                #expect(clock.now - started >= .milliseconds(250), "UNSUBACK before the commit")
                store.commitDelay.store(0, ordering: .relaxed)
            }
        }
    }

    @Test("while commits fail (a full disk) acknowledgements go out as usual instead of waiting for the retry; once commits succeed again what was owed is on disk, and the log says so")
    func failingCommits() async throws {
        try await PersistenceTests.withFolder { folder in
            let configuration = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withBroker(configure: { $0.persistence = configuration }) { b in
                let store = b.broker.store!
                let (keep, _) = try await Self.connect(b, "keep")
                try await keep.subscribe("f/#", qos: .atLeastOnce)
                await keep.abort()
                try await eventually("offline") { b.broker.registry.session(for: "keep")?.isOnline == false }
                store.failCommits.store(true, ordering: .relaxed)
                let pub = try await b.client("pub")
                let clock = ContinuousClock()
                let started = clock.now
                for i in 1...10 { try await pub.publish("f/\(i)", "m\(i)", qos: .atLeastOnce, id: UInt16(i)) }
                #expect(clock.now - started < .seconds(6), "acknowledgements waited for a failing disk (about 1 s each: 10 s)")
                #expect(store.failedCommits > 0)
                #expect(b.logMessages.contains { $0.contains("commit of") && $0.contains("failed") && $0.contains("serving from memory") })
                store.failCommits.store(false, ordering: .relaxed)
                try await eventually("a commit succeeds", timeout: .seconds(5)) { store.commits > 0 }
                try await eventually("the recovery is logged") { b.logMessages.contains { $0.contains("commits succeed again, after") } }
            }
            let reopened = try PersistentStore(configuration: configuration, logger: PersistenceTests.logger)
            let sessions = reopened.takeLoadedSessions()
            reopened.close()
            #expect(sessions.first { $0.clientID == "keep" }?.queue.count == 10)
        }
    }

    @Test("a message queued for many offline sessions is one copy in memory again after a restart, not one per session")
    func sharedAfterRestart() async throws {
        try await PersistenceTests.withFolder { folder in
            let configuration = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withBroker(configure: { $0.persistence = configuration }) { b in
                for i in 0..<3 {
                    let (c, _) = try await Self.connect(b, "keep-\(i)")
                    try await c.subscribe("big/#", qos: .atLeastOnce)
                    await c.abort()
                    try await eventually("offline") { b.broker.registry.session(for: "keep-\(i)")?.isOnline == false }
                }
                let pub = try await b.client("pub")
                try await pub.publish("big/a", ByteBuffer(repeating: 0x61, count: 4096), qos: .atLeastOnce)
                try await pub.publish("big/b", "small", qos: .atLeastOnce, id: 2)
            }
            let reopened = try PersistentStore(configuration: configuration, logger: PersistenceTests.logger)
            let sessions = reopened.takeLoadedSessions()
            reopened.close()
            let big = sessions.compactMap { $0.queue.first { $0.message.topic.string == "big/a" }?.message.payload }
            #expect(big.count == 3 && big.allSatisfy { $0.readableBytes == 4096 })
            let addresses = Set(big.map { $0.withUnsafeReadableBytes { Int(bitPattern: $0.baseAddress) } })
            #expect(addresses.count == 1, "\(addresses.count) copies of one message")
            #expect(sessions.allSatisfy { $0.queue.count == 2 })
        }
    }

    @Test("a last commit that fails as the store closes (a full disk) says, whatever the rate limit, how many changes are lost, and the store tells the exit status")
    func failingLastCommit() async throws {
        try await PersistenceTests.withFolder { folder in
            let configuration = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .batch)
            var lost = 0
            try await withBroker(configure: { $0.persistence = configuration }) { b in
                let store = b.broker.store!
                store.failCommits.store(true, ordering: .relaxed)
                let pub = try await b.client("pub")
                for i in 1...5 { try await pub.publish("r/\(i)", "m\(i)", qos: .atLeastOnce, retain: true, id: UInt16(i)) }
                try await eventually("a commit failed", timeout: .seconds(5)) { store.failedCommits > 0 }
                #expect(store.lostAtClose == 0)
                await b.broker.shutdown()
                lost = store.lostAtClose
                #expect(b.logMessages.contains { $0.contains("the last commit, as mqlite stops, failed") && $0.contains("5 changes") })
            }
            #expect(lost == 5)
        }
    }

    @Test("rows with deadlines far in the past or future, or message numbers out of range (a hand or a bug), neither crash the broker nor revive what expired")
    func oddTimes() async throws {
        try await PersistenceTests.withFolder { folder in
            let path = folder + "/mqlite.db"
            let configuration = PersistenceConfiguration(path: path, sync: .full)
            try PersistentStore(configuration: configuration, logger: PersistenceTests.logger).close()
            do {
                let db = try SQLiteDatabase(path: path)
                try db.execute("""
                    INSERT INTO sessions VALUES (CAST('past' AS BLOB), 100, -9223372036854775808, NULL);
                    INSERT INTO sessions VALUES (CAST('future' AS BLOB), 9223372036854775807, 9223372036854775807, NULL);
                    INSERT INTO subscriptions VALUES (CAST('future' AS BLOB), CAST('t/#' AS BLOB), 1, 0, NULL);
                    INSERT INTO session_messages VALUES (CAST('future' AS BLOB), 1, 0, NULL, 1, 0, CAST('t/a' AS BLOB), CAST('old' AS BLOB), NULL, -9223372036854775808);
                    INSERT INTO session_messages VALUES (CAST('future' AS BLOB), 2, 0, NULL, 1, 0, CAST('t/b' AS BLOB), CAST('late' AS BLOB), NULL, 9223372036854775807);
                    INSERT INTO session_messages VALUES (CAST('future' AS BLOB), 3, 1, 7, 1, 0, CAST('t/c' AS BLOB), CAST('one' AS BLOB), NULL, NULL);
                    INSERT INTO session_messages VALUES (CAST('future' AS BLOB), 4, 1, 7, 1, 0, CAST('t/d' AS BLOB), CAST('same id' AS BLOB), NULL, NULL);
                    INSERT INTO session_messages VALUES (CAST('future' AS BLOB), -1, 0, NULL, 1, 0, CAST('t/e' AS BLOB), CAST('minus one' AS BLOB), NULL, NULL);
                    INSERT INTO session_messages VALUES (CAST('future' AS BLOB), 9223372036854775807, 0, NULL, 1, 0, CAST('t/f' AS BLOB), CAST('last' AS BLOB), NULL, NULL);
                    INSERT INTO kv VALUES (CAST('k' AS BLOB), 0, CAST('v' AS BLOB), -9223372036854775808);
                    """)
                db.close()
            }
            try await withBroker(configure: { $0.persistence = configuration }) { b in
                let (c, connack) = try await Self.connect(b, "future")
                #expect(connack.sessionPresent)
                let again = try await c.expectPublish()
                #expect(String(buffer: again.payload) == "one" && again.dup && again.packetID == 7)
                let queued = try await c.expectPublish()
                #expect(String(buffer: queued.payload) == "late")
                try await c.expectNothing()
                // The next message is numbered after the last row read (a number of -1 read as
                // the largest one made the next overflow: the broker stopped).
                let pub = try await b.client("pub")
                try await pub.publish("t/new", "new", qos: .atLeastOnce)
                let new = try await c.expectPublish()
                #expect(String(buffer: new.payload) == "new")
            }
        }
    }

    @Test("two client ids that are one text in two spellings (NFC and NFD) are two sessions after a restart too, each with its own subscriptions and queue")
    func clientIDsByBytes() async throws {
        let composed = "caf\u{E9}", decomposed = "cafe\u{301}"
        #expect(composed == decomposed && Array(composed.utf8) != Array(decomposed.utf8))
        try await PersistenceTests.withFolder { folder in
            let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withBroker(configure: { $0.persistence = store }) { b in
                for (id, filter) in [(decomposed, "victim/#"), (composed, "other/#")] {
                    let (c, _) = try await Self.connect(b, id)
                    try await c.subscribe(filter, qos: .atLeastOnce)
                    await c.disconnect()
                }
                let pub = try await b.client("pub")
                try await pub.publish("victim/secret", "for the victim", qos: .atLeastOnce)
            }
            try await withBroker(configure: { $0.persistence = store }) { b in
                #expect(b.logMessages.contains { $0.contains("restored 2 persistent sessions") })
                let (other, present) = try await Self.connect(b, composed)
                #expect(present.sessionPresent)
                try await other.expectNothing(for: .milliseconds(200))
                let (victim, victimPresent) = try await Self.connect(b, decomposed)
                #expect(victimPresent.sessionPresent)
                #expect(String(buffer: try await victim.expectPublish().payload) == "for the victim")
                let pub = try await b.client("pub")
                try await pub.publish("victim/secret", "again", qos: .atMostOnce)
                #expect(String(buffer: try await victim.expectPublish().payload) == "again")
                try await other.expectNothing(for: .milliseconds(200))
            }
        }
    }

    /// Rewrites SUBSCRIBE `mine/+` to `tenant/a/mine/+`, as an `on_subscribe` hook may.
    final class TenantHooks: BrokerHooks {
        func authorizeSubscribe(_ request: SubscribeRequest, worker: Int) -> HookAnswer<SubscribeDecision> {
            .now(request.filter == "mine/+" ? .rewrite(filter: "tenant/a/mine/+", qos: .atLeastOnce) : .allow)
        }
    }

    @Test("a filter an on_subscribe hook rewrote keeps its name across a restart: UNSUBSCRIBE of the name the client used removes it")
    func renamedSubscriptions() async throws {
        try await PersistenceTests.withFolder { folder in
            let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withBroker(hooks: TenantHooks(), configure: { $0.persistence = store }) { b in
                let (c, _) = try await Self.connect(b, "tenant")
                #expect(try await c.subscribe([("mine/+", .atLeastOnce)]) == [.granted(.atLeastOnce)])
                await c.abort()
            }
            try await withBroker(hooks: TenantHooks(), configure: { $0.persistence = store }) { b in
                let (c, connack) = try await Self.connect(b, "tenant")
                #expect(connack.sessionPresent)
                let pub = try await b.client("pub")
                try await pub.publish("tenant/a/mine/x", "1", qos: .atLeastOnce)
                let p = try await c.expectPublish()
                #expect(String(buffer: p.topic) == "tenant/a/mine/x")
                c.send(.puback(packetID: p.packetID!))
                c.send(.unsubscribe(UnsubscribePacket(packetID: 3, filters: ["mine/+"])))
                #expect(try await c.expectPacket() == .unsuback(packetID: 3))
                try await pub.publish("tenant/a/mine/x", "2", qos: .atLeastOnce)
                try await c.expectNothing()
            }
        }
    }
}
