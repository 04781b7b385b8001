import Foundation
import Logging
@testable import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// `[persistence]`: retained messages in SQLite, across a restart of the broker.
@Suite("Persistence (SQLite)")
struct PersistenceTests {
    /// A fresh folder for one test's store, removed afterwards.
    static func withFolder(_ body: (String) async throws -> Void) async throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("mqlite-store-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        try await body(folder)
    }

    static let logger = Logger(label: "mqlite-test")

    @Test("retained messages survive a restart, for every sync mode: QoS, payload, MQTT 5 properties and what remains of their expiry; cleared ones stay cleared; expired ones are gone")
    func restart() async throws {
        for sync in PersistenceConfiguration.Sync.allCases {
            try await Self.withFolder { folder in
                let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: sync, flushInterval: 0.05)
                try await withBroker(configure: { $0.persistence = store }) { b in
                    let c = try await b.client("pub")
                    try await c.publish("r/a", "one", qos: .atLeastOnce, retain: true)
                    try await c.publish("r/b", "two", qos: .exactlyOnce, retain: true, id: 2)
                    try await c.publish("r/gone", "x", qos: .atMostOnce, retain: true)
                    try await c.publish("r/gone", "", qos: .atLeastOnce, retain: true, id: 3)
                    let (v5, _) = try await b.client5("pub5")
                    var properties = MQTTProperties()
                    properties.userProperties = [UserProperty(name: "k", value: "v")]
                    properties.contentType = "text/plain"
                    properties.messageExpiryInterval = 600
                    v5.send(.publish(PublishPacket(topic: ByteBuffer(string: "r/v5"), payload: ByteBuffer(string: "five"), qos: .atMostOnce, retain: true, properties: properties)))
                    var short = MQTTProperties()
                    short.messageExpiryInterval = 1
                    v5.send(.publish(PublishPacket(topic: ByteBuffer(string: "r/short"), payload: ByteBuffer(string: "soon"), qos: .atMostOnce, retain: true, properties: short)))
                    try await v5.ping()
                }
                try await Task.sleep(for: .milliseconds(1100))  // r/short expires meanwhile
                let reopened = try PersistentStore(configuration: store, logger: Self.logger)
                #expect(reopened.loaded.retained == 3)
                reopened.close()
                try await withBroker(configure: { $0.persistence = store }) { b in
                    let (sub, _) = try await b.client5("sub")
                    try await sub.subscribe("r/#", qos: .exactlyOnce)
                    var got: [String: PublishPacket] = [:]
                    for _ in 0..<3 {
                        let p = try await sub.expectPublish()
                        got[String(buffer: p.topic)] = p
                    }
                    try await sub.expectNothing()
                    #expect(String(buffer: got["r/a"]!.payload) == "one" && got["r/a"]!.qos == .atLeastOnce && got["r/a"]!.retain)
                    #expect(String(buffer: got["r/b"]!.payload) == "two" && got["r/b"]!.qos == .exactlyOnce)
                    let v5 = got["r/v5"]!
                    #expect(String(buffer: v5.payload) == "five" && v5.properties.userProperties == [UserProperty(name: "k", value: "v")])
                    #expect(v5.properties.contentType == "text/plain")
                    #expect((590...600).contains(v5.properties.messageExpiryInterval ?? 0))
                }
            }
        }
    }

    @Test("sync full: a client that publishes retained at QoS 1 and shuts its side at once reads its PUBACK (it waits for the commit) before the close")
    func ackAfterCommitBeforeEOF() async throws {
        try await Self.withFolder { folder in
            let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withBroker(configure: { $0.persistence = store }) { b in
                for n in 1...5 {
                    let c = try await TestClient.open(port: b.port)
                    var bytes = ByteBuffer()
                    bytes.writeMQTTPacket(.connect(ConnectPacket(clientID: "eof-\(n)")))
                    bytes.writeMQTTPacket(.publish(PublishPacket(topic: "r/\(n)", payload: "kept", qos: .atLeastOnce, retain: true, packetID: 7)))
                    c.sendRaw(Array(bytes.readableBytesView))
                    try await c.closeOutput()
                    #expect(try await c.expectClosed() == [.connack(ConnackPacket(sessionPresent: false, returnCode: .accepted)), .puback(packetID: 7)])
                }
            }
        }
    }

    @Test("a store of schema 1 (retained messages only) is migrated: its messages stay, sessions and kv keys are kept from then on")
    func migration() async throws {
        try await Self.withFolder { folder in
            let path = folder + "/old.db"
            do {
                let db = try SQLiteDatabase(path: path)
                try db.execute("""
                    CREATE TABLE retained (topic BLOB PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL, properties BLOB, expires_at INTEGER) WITHOUT ROWID;
                    INSERT INTO retained (topic, payload, qos) VALUES (CAST('old/topic' AS BLOB), CAST('kept' AS BLOB), 1);
                    PRAGMA user_version = 1;
                    """)
                db.close()
            }
            let store = PersistenceConfiguration(path: path, sync: .full)
            try await withBroker(configure: { $0.persistence = store }) { b in
                #expect(b.broker.store!.loaded.retained == 1)
                let c = try await TestClient.open(port: b.port)
                _ = try await c.connect(ConnectPacket(cleanSession: false, keepAlive: 0, clientID: "after-migration"))
                // (Its SUBACK waits for the store's commit, sync full; the retained message may
                // come first, §3.8.4.)
                c.send(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "old/#", qos: .atLeastOnce)])))
                var kept: [String] = []
                var subacked = false
                for _ in 0..<2 {
                    switch try await c.expectPacket() {
                    case .publish(let p): kept.append(String(buffer: p.payload))
                    case .suback(let ack): subacked = ack.value.returnCodes == [.granted(.atLeastOnce)]
                    case let other: throw TestFailure("unexpected \(other)")
                    }
                }
                #expect(kept == ["kept"] && subacked)
                await c.abort()
            }
            let reopened = try PersistentStore(configuration: store, logger: Self.logger)
            #expect(reopened.loaded.retained == 1 && reopened.loaded.sessions == 1)
            reopened.close()
            let db = try SQLiteDatabase(path: path)
            #expect(try db.integer("PRAGMA user_version") == PersistentStore.schemaVersion)
            #expect(try db.integer("PRAGMA auto_vacuum") == 0, "an older store keeps its free pages")
            db.close()
            try PersistentStore(configuration: PersistenceConfiguration(path: folder + "/new.db"), logger: Self.logger).close()
            let fresh = try SQLiteDatabase(path: folder + "/new.db")
            #expect(try fresh.integer("PRAGMA auto_vacuum") == 2, "a new store gives free pages back (incremental)")
            fresh.close()
        }
    }

    @Test("a store that cannot be used says which file and why: not a database, locked by another mqlite, a newer schema, a folder that does not exist")
    func openErrors() async throws {
        try await Self.withFolder { folder in
            let junk = folder + "/junk.db"
            try Data(repeating: 0x41, count: 4096).write(to: URL(fileURLWithPath: junk))
            #expect(throws: StoreOpenError.self) { try PersistentStore(configuration: PersistenceConfiguration(path: junk), logger: Self.logger) }
            do {
                _ = try PersistentStore(configuration: PersistenceConfiguration(path: junk), logger: Self.logger)
            } catch {
                #expect("\(error)" == "\(junk): is not an mqlite store (not an SQLite database)")
            }

            let path = folder + "/mqlite.db"
            let first = try PersistentStore(configuration: PersistenceConfiguration(path: path), logger: Self.logger)
            do {
                _ = try PersistentStore(configuration: PersistenceConfiguration(path: path), logger: Self.logger)
                Issue.record("a second store on the same file opened")
            } catch {
                #expect("\(error)" == "\(path): is locked by another process (another mqlite on the same store?)")
            }
            first.close()

            do {
                let db = try SQLiteDatabase(path: path)
                try db.execute("PRAGMA user_version = 99")
            }
            do {
                _ = try PersistentStore(configuration: PersistenceConfiguration(path: path), logger: Self.logger)
                Issue.record("a store of a newer schema opened")
            } catch {
                #expect("\(error)".contains("schema version 99 is newer than this mqlite's (\(PersistentStore.schemaVersion))"))
            }

            let nowhere = folder + "/no/such/folder/mqlite.db"
            do {
                _ = try PersistentStore(configuration: PersistenceConfiguration(path: nowhere), logger: Self.logger)
                Issue.record("a store in a missing folder opened")
            } catch {
                #expect("\(error)" == "\(nowhere): its folder \(folder)/no/such/folder does not exist")
            }
        }
    }

    @Test("another program's SQLite database given as the store is refused and left as it was: not made an mqlite store, not migrated, not switched to WAL")
    func foreignDatabase() async throws {
        try await Self.withFolder { folder in
            for version in [0, 1, 2] {
                let path = folder + "/app\(version).db"
                do {
                    let db = try SQLiteDatabase(path: path)
                    try db.execute("CREATE TABLE users (name TEXT); PRAGMA user_version = \(version)")
                }
                do {
                    _ = try PersistentStore(configuration: PersistenceConfiguration(path: path), logger: Self.logger)
                    Issue.record("another program's database (user_version \(version)) opened")
                } catch {
                    #expect("\(error)".contains("is not an mqlite store (schema version \(version); tables of another program: users"), "\(error)")
                }
                let db = try SQLiteDatabase(path: path)
                #expect(try db.integer("PRAGMA user_version") == Int64(version))
                #expect(try db.text("PRAGMA journal_mode") == "delete")
                #expect(try db.integer("SELECT count(*) FROM sqlite_master WHERE type = 'table'") == 1)
            }
        }
    }

    @Test("a store with another database's -wal file beside it (a backup restored over an old store) is refused, names the -wal, and is not overwritten: without that file it opens with all it held; a file too short for SQLite is refused too, a symbolic link to a store is not")
    func foreignWAL() async throws {
        try await Self.withFolder { folder in
            let path = folder + "/mqlite.db"
            let store = PersistenceConfiguration(path: path, flushInterval: 0.05)
            try await withBroker(configure: { $0.persistence = store }) { b in
                let c = try await b.client("pub")
                for i in 0..<50 { try await c.publish("r/\(i)", "v\(i)", qos: .atLeastOnce, retain: true, id: UInt16(i + 1)) }
            }
            let before = try Data(contentsOf: URL(fileURLWithPath: path))
            // Another program's database in WAL mode, its -wal copied while it is still open.
            let other = folder + "/other.db"
            let db = try SQLiteDatabase(path: other)
            try db.execute("PRAGMA journal_mode = WAL; CREATE TABLE x (v); INSERT INTO x VALUES (randomblob(5000));")
            try FileManager.default.copyItem(atPath: other + "-wal", toPath: path + "-wal")
            db.close()
            do {
                _ = try PersistentStore(configuration: store, logger: Self.logger)
                Issue.record("a store read with another database's -wal opened")
            } catch {
                #expect("\(error)".contains("tables of another program: x"), "\(error)")
                #expect("\(error)".contains("\(path)-wal"), "\(error)")
            }
            #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before, "the store was not touched")
            try FileManager.default.removeItem(atPath: path + "-wal")
            try? FileManager.default.removeItem(atPath: path + "-shm")
            let reopened = try PersistentStore(configuration: store, logger: Self.logger)
            #expect(reopened.loaded.retained == 50)
            reopened.close()
            // A store reached through a symbolic link (whose own size is a few bytes) opens.
            try FileManager.default.createSymbolicLink(atPath: folder + "/link.db", withDestinationPath: "mqlite.db")
            let linked = try PersistentStore(configuration: PersistenceConfiguration(path: folder + "/link.db"), logger: Self.logger)
            #expect(linked.loaded.retained == 50)
            linked.close()

            let short = folder + "/short.db"
            try Data([0x53]).write(to: URL(fileURLWithPath: short))
            do {
                _ = try PersistentStore(configuration: PersistenceConfiguration(path: short), logger: Self.logger)
                Issue.record("a 1-byte store opened")
            } catch {
                #expect("\(error)".contains("is 1 bytes, shorter than an SQLite database's header"), "\(error)")
            }
            #expect(try Data(contentsOf: URL(fileURLWithPath: short)) == Data([0x53]))
        }
    }

    @Test("a topic retained many times keeps its last message (changes between commits are written once); a message without RETAIN is not stored")
    func coalescing() async throws {
        try await Self.withFolder { folder in
            let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .batch, flushInterval: 0.2)
            try await withBroker(configure: { $0.persistence = store }) { b in
                let c = try await b.client("pub")
                for i in 0..<2000 { try await c.publish("same", "v\(i)", retain: true) }
                try await c.publish("plain", "not retained", qos: .atLeastOnce)
                try await c.ping()
            }
            let db = try SQLiteDatabase(path: folder + "/mqlite.db")
            #expect(try db.integer("SELECT count(*) FROM retained") == 1)
            #expect(try db.text("SELECT CAST(payload AS TEXT) FROM retained") == "v1999")
        }
    }

    @Test("rows a hand or a bug put in the store: unreadable ones are skipped (invalid topic, QoS 7, empty payload), a deadline too far away is held to the largest interval")
    func oddRows() async throws {
        try await Self.withFolder { folder in
            let path = folder + "/mqlite.db"
            try PersistentStore(configuration: PersistenceConfiguration(path: path), logger: Self.logger).close()
            do {
                let db = try SQLiteDatabase(path: path)
                try db.execute("""
                    INSERT INTO retained VALUES (CAST('a/+' AS BLOB), X'41', 0, NULL, NULL);
                    INSERT INTO retained VALUES (CAST('q/7' AS BLOB), X'41', 7, NULL, NULL);
                    INSERT INTO retained VALUES (CAST('empty' AS BLOB), X'', 0, NULL, NULL);
                    INSERT INTO retained VALUES (CAST('far' AS BLOB), X'41', 1, NULL, 9223372036854775807);
                    INSERT INTO retained VALUES (CAST('ok' AS BLOB), X'42', 2, NULL, NULL);
                    """)
            }
            let store = try PersistentStore(configuration: PersistenceConfiguration(path: path), logger: Self.logger)
            #expect(store.loaded.retained == 2)
            var scan = store.retained.scan(matching: try TopicFilter("#"))
            let loaded = store.retained.continueScan(&scan, limit: 100)
            store.close()
            #expect(Set(loaded.map(\.topic.string)) == ["far", "ok"])
            #expect(loaded.first { $0.topic.string == "far" }?.properties.messageExpiryInterval == UInt32.max)
        }
    }

    @Test("[persistence] in the config file: path relative to the file, sync and flush_interval checked, with file, key and problem")
    func config() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("mqlite-conf-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        func load(_ text: String) throws -> BrokerConfiguration {
            let file = folder + "/mqlite.conf"
            try text.write(toFile: file, atomically: true, encoding: .utf8)
            return try ConfigFile.load(path: file)
        }
        let config = try load("[persistence]\npath = \"data/mqlite.db\"\nsync = \"batch\"\nflush_interval = 0.5\n")
        #expect(config.persistence == PersistenceConfiguration(path: folder + "/data/mqlite.db", sync: .batch, flushInterval: 0.5))
        #expect(try load("").persistence == nil)
        #expect(throws: ConfigError(file: folder + "/mqlite.conf", key: "persistence.sync", problem: "must be one of \"full\", \"batch\", \"off\", not \"sometimes\"")) {
            try load("[persistence]\npath = \"a.db\"\nsync = \"sometimes\"\n")
        }
        #expect(throws: ConfigError(file: folder + "/mqlite.conf", key: "persistence.path", problem: "is required (the store's file)")) {
            try load("[persistence]\nsync = \"full\"\n")
        }
        #expect(throws: ConfigError(file: folder + "/mqlite.conf", key: "persistence.flush_interval", problem: "must be from 0.01 to 60.0, not 0.0")) {
            try load("[persistence]\npath = \"a.db\"\nflush_interval = 0\n")
        }
    }
}
