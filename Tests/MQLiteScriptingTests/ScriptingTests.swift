import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// Writes `scripts` into a fresh folder and returns it.
func scriptFolder(_ scripts: [String], files: [String: String] = [:]) throws -> URL {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mqlite-test-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    for (i, script) in scripts.enumerated() {
        try script.write(to: dir.appendingPathComponent("s\(i).lua"), atomically: true, encoding: .utf8)
    }
    for (name, text) in files {
        try text.write(to: dir.appendingPathComponent(name), atomically: true, encoding: .utf8)
    }
    return dir
}

/// A broker running `scripts` (in order, with their options) on two workers.
func withScripts(
    _ scripts: [String], options: [[String: ConfigValue]] = [], files: [String: String] = [:],
    configure: (inout BrokerConfiguration) -> Void = { _ in },
    _ body: (BrokerFixture, ScriptingHost, URL) async throws -> Void
) async throws {
    let dir = try scriptFolder(scripts, files: files)
    defer { try? FileManager.default.removeItem(at: dir) }
    var host: ScriptingHost?
    try await withBroker(
        configure: { config in
            config.baseDirectory = dir.path
            config.plugins = scripts.indices.map {
                PluginConfiguration(script: dir.appendingPathComponent("s\($0).lua").path, options: $0 < options.count ? options[$0] : [:])
            }
            configure(&config)
        },
        makeHooks: { config, logger in
            host = try ScriptingHost(configuration: config, logger: logger)
            return host!
        },
        prepare: { host?.bind(to: $0) }
    ) { b in
        try await body(b, host!, dir)
    }
}

func payload(_ p: PublishPacket) -> String { String(buffer: p.payload) }

@Suite("Lua hooks")
struct HookReturnTests {
    @Test("on_connect: true accepts, false is CONNACK 5, false,4 is CONNACK 4, nil passes to the next script and then to allow_anonymous")
    func onConnect() async throws {
        let first = """
            mqlite.on_connect(function(c)
              if c.username == "ok" then return true end
              if c.username == "no" then return false end
              if c.username == "bad" then return false, 4 end
              return nil
            end)
            """
        let second = """
            mqlite.on_connect(function(c)
              if c.username == "second" and c.password == "pw" and c.client_id == "me" and c.clean_session and c.keep_alive == 30 then
                return true
              end
              return nil
            end)
            """
        try await withScripts([first, second], configure: { $0.allowAnonymous = false }) { b, _, _ in
            let cases: [(String?, String?, ConnectReturnCode)] = [
                ("ok", nil, .accepted), ("no", nil, .notAuthorized), ("bad", nil, .badUsernameOrPassword),
                ("second", "pw", .accepted), ("other", nil, .accepted), (nil, nil, .notAuthorized),
            ]
            for (user, password, code) in cases {
                let c = try await TestClient.open(port: b.port)
                let ack = try await c.connect(ConnectPacket(keepAlive: 30, clientID: "me", username: user, password: password.map { ByteBuffer(string: $0) }))
                #expect(ack.returnCode == code, "user \(String(describing: user))")
                await c.abort()
            }
        }
    }

    @Test("on_authorize: ACLs with %c and %u enforced natively for publish and subscribe; every table must allow")
    func onAuthorize() async throws {
        let acl = """
            mqlite.on_authorize(function(c)
              if c.username == "free" then return nil end
              return { publish = {"devices/%c/#", "users/%u/out"}, subscribe = {"cmd/%u/#", "devices/+/status"}, deny = {"devices/%c/private"} }
            end)
            """
        let second = """
            mqlite.on_authorize(function(c)
              if c.username == "free" then return nil end
              return { publish = {"devices/#", "users/#"} }
            end)
            """
        try await withScripts([acl, second]) { b, _, _ in
            let watcher = try await b.client("watcher", username: "free")
            try await watcher.subscribe("#")
            let dev = try await b.client("d1", username: "u1")
            // Publish: allowed, denied (other client's topic), denied by deny, allowed by %u.
            try await dev.publish("devices/d1/temp", "ok", qos: .atLeastOnce)  // still acknowledged when denied, too
            try await dev.publish("devices/d2/temp", "not mine", qos: .atLeastOnce)
            try await dev.publish("devices/d1/private", "denied")
            try await dev.publish("users/u1/out", "by user")
            try await dev.publish("users/u2/out", "other user")
            var got: [String] = []
            for _ in 0..<2 { got.append(try await watcher.expectPublish().topicString) }
            #expect(got.sorted() == ["devices/d1/temp", "users/u1/out"])
            try await watcher.expectNothing()
            // Subscribe: within cmd/u1/#, within devices/+/status, outside.
            let codes = try await dev.subscribe([("cmd/u1/#", .atLeastOnce), ("cmd/u1/a/b", .atMostOnce), ("devices/d7/status", .atMostOnce), ("cmd/u2/#", .atMostOnce), ("#", .atMostOnce)])
            #expect(codes == [.granted(.atLeastOnce), .granted(.atMostOnce), .granted(.atMostOnce), .failure, .failure])
        }
    }

    @Test("on_subscribe: true/nil allow, false is 0x80, a number caps the QoS, a table rewrites; a rewrite is checked by the ACL")
    func onSubscribe() async throws {
        let script = """
            mqlite.on_authorize(function(c) return { subscribe = {"open/#", "mapped/#"} } end)
            mqlite.on_subscribe(function(s)
              if s.filter == "open/no" then return false end
              if s.filter == "open/capped" then return 1 end
              if s.filter == "open/old" then return { filter = "mapped/new", qos = 0 } end
              if s.filter == "open/escape" then return { filter = "forbidden/#" } end
              if s.filter == "open/yes" then return true end
              return nil
            end)
            """
        try await withScripts([script]) { b, _, _ in
            let c = try await b.client("c")
            let codes = try await c.subscribe([
                ("open/yes", .exactlyOnce), ("open/no", .atMostOnce), ("open/capped", .exactlyOnce),
                ("open/old", .exactlyOnce), ("open/escape", .atMostOnce), ("open/other", .atLeastOnce),
            ])
            #expect(codes == [.granted(.exactlyOnce), .failure, .granted(.atLeastOnce), .granted(.atMostOnce), .failure, .granted(.atLeastOnce)])
            let pub = try await b.client("pub")
            try await pub.publish("mapped/new", "via rewrite")
            #expect(payload(try await c.expectPublish()) == "via rewrite")
        }
    }

    @Test("UNSUBSCRIBE of the filter a client named removes what on_subscribe rewrote it to; on_unsubscribe hears both")
    func unsubscribeRewritten() async throws {
        let script = """
            mqlite.on_subscribe(function(s)
              if s.filter == "mine/#" then return { filter = "tenant/" .. s.client_id .. "/#" } end
            end)
            mqlite.on_unsubscribe(function(u)
              mqlite.publish("log/unsub", u.client_id .. " " .. (u.username or "-") .. " " .. u.filter .. " -> " .. u.subscribed)
            end)
            """
        try await withScripts([script]) { b, _, _ in
            let log = try await b.client("log")
            try await log.subscribe("log/#")
            let c = try await b.client("c1")
            try await c.subscribe("mine/#")
            let pub = try await b.client("pub")
            try await pub.publish("tenant/c1/x", "before")
            #expect(payload(try await c.expectPublish()) == "before")
            let nodes = b.broker.subscriptionNodeCount
            c.send(.unsubscribe(UnsubscribePacket(packetID: 9, filters: ["mine/#"])))
            #expect(try await c.expectPacket() == .unsuback(packetID: 9))
            try await pub.publish("tenant/c1/x", "after")
            try await c.expectNothing()
            #expect(b.broker.subscriptionNodeCount == nodes - 3, "tenant/c1/# is gone from the trie")
            #expect(payload(try await log.expectPublish()) == "c1 - mine/# -> tenant/c1/#")
        }
    }

    @Test("on_publish: only hooked topics enter Lua; nil/true deliver, false drops (still acked), a table changes, a list fans out")
    func onPublish() async throws {
        let script = """
            mqlite.on_publish("in/#", function(m)
              mqlite.kv.incr("calls")
              if m.topic == "in/drop" then return false end
              if m.topic == "in/keep" then return true end
              if m.topic == "in/nil" then return nil end
              if m.topic == "in/change" then return { topic = "out/changed", payload = m.payload .. "!", qos = 1, retain = true } end
              if m.topic == "in/many" then
                return { { topic = "out/1" }, { topic = "out/2", payload = m.client_id .. ":" .. (m.username or "-") } }
              end
              if m.topic == "in/forbidden" then return { topic = "secret/x" } end
              if m.topic == "in/count" then return { payload = tostring(mqlite.kv.get("calls")) } end
            end)
            mqlite.on_authorize(function(c) return { publish = {"in/#", "out/#", "plain"} } end)
            """
        try await withScripts([script]) { b, host, _ in
            let sub = try await b.client("sub")
            try await sub.subscribe("#", qos: .atLeastOnce)
            let pub = try await b.client("pub", username: "pat")
            try await pub.publish("plain", "untouched")
            #expect(payload(try await sub.expectPublish()) == "untouched")
            try await pub.publish("in/drop", "x", qos: .atLeastOnce)
            try await pub.publish("in/keep", "kept")
            #expect(try await sub.expectPublish().topicString == "in/keep")
            try await pub.publish("in/nil", "passed")
            #expect(try await sub.expectPublish().topicString == "in/nil")
            try await pub.publish("in/change", "hello")
            let changed = try await sub.expectPublish()
            #expect(changed.topicString == "out/changed" && payload(changed) == "hello!" && changed.qos == .atLeastOnce)
            sub.send(.puback(packetID: changed.packetID!))
            #expect(b.broker.retainedCount == 1)
            try await pub.publish("in/many", "orig")
            let one = try await sub.expectPublish()
            let two = try await sub.expectPublish()
            #expect(one.topicString == "out/1" && payload(one) == "orig")
            #expect(two.topicString == "out/2" && payload(two) == "pub:pat")
            try await pub.publish("in/forbidden", "escape")  // rewritten to a topic the ACL refuses
            try await pub.ping()
            try await sub.expectNothing()
            // Seven hooked publishes (this one included) called Lua; "plain" did not.
            try await pub.publish("in/count", "?")
            #expect(payload(try await sub.expectPublish()) == "7")
            #expect(host.failureCount == 0)
        }
    }

    @Test("on_publish sees each message's own client id and topic, however publishers and topics alternate on one VM")
    func onPublishAlternating() async throws {
        let script = #"mqlite.on_publish("alt/#", function(m) return { payload = m.client_id .. " " .. m.topic .. " " .. m.payload } end)"#
        try await withScripts([script], configure: { $0.workers = 1 }) { b, _, _ in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("alt/#")
            let long = "client-with-an-identifier-longer-than-fifteen-bytes"
            let a = try await b.client(long)
            let c = try await b.client("c")
            var expected: [String] = []
            for i in 0..<8 {
                let (client, id) = i % 3 == 0 ? (a, long) : (c, "c")
                let topic = i % 2 == 0 ? "alt/one" : "alt/a/much/longer/topic/name"
                try await client.publish(topic, "\(i)", qos: .atLeastOnce)
                expected.append("\(id) \(topic) \(i)")
            }
            var got: [String] = []
            for _ in expected { got.append(payload(try await watcher.expectPublish())) }
            #expect(got == expected)
        }
    }

    @Test("on_connected and on_disconnected are called, and mqlite.publish reaches subscribers")
    func notifications() async throws {
        let script = """
            mqlite.on_connected(function(c) mqlite.publish("events/connected", c.client_id, 1) end)
            mqlite.on_disconnected(function(c, reason) mqlite.publish("events/disconnected", c.client_id .. " " .. reason) end)
            """
        try await withScripts([script]) { b, _, _ in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("events/#")
            let c = try await b.client("visitor")
            #expect(payload(try await watcher.expectPublish()) == "visitor")
            await c.disconnect()
            #expect(payload(try await watcher.expectPublish()) == "visitor disconnected")
        }
    }
}

@Suite("Lua host library")
struct HostLibraryTests {
    @Test("kv is shared across workers, with incr, delete and ttl; json, topic_matches, sha256, hmac, time, options")
    func library() async throws {
        let script = """
            mqlite.on_publish("lib/#", function(m)
              local out = {}
              if m.topic == "lib/set" then mqlite.kv.set("k", m.payload); mqlite.kv.set("short", "x", 1.5) end
              if m.topic == "lib/get" then out.v = mqlite.kv.get("k"); out.short = mqlite.kv.get("short") or "expired" end
              if m.topic == "lib/incr" then out.n = mqlite.kv.incr("n"); out.n5 = mqlite.kv.incr("n", 5) end
              if m.topic == "lib/delete" then mqlite.kv.delete("k"); out.gone = mqlite.kv.get("k") == nil end
              if m.topic == "lib/misc" then
                local decoded = mqlite.json.decode('{"a":[1,2.5,true,"s"],"b":{"c":null}}')
                out.a2 = decoded.a[2]; out.a3 = decoded.a[3]; out.len = #decoded.a
                out.match = mqlite.topic_matches("a/+/c", "a/b/c") and not mqlite.topic_matches("#", "$SYS/x")
                out.sha = mqlite.sha256("abc")
                out.hmac = mqlite.hmac_sha256("key", "The quick brown fox jumps over the lazy dog")
                out.recent = math.abs(mqlite.time() - os.time()) < 5
                out.opt = mqlite.options.greeting .. " " .. mqlite.options.list[2] .. " " .. tostring(mqlite.options.nested.n)
                local ok, err = pcall(mqlite.kv.incr, "k2")
                -- Keys are bytes: two that are not UTF-8 stay two keys.
                mqlite.kv.set("\\xff", 1); mqlite.kv.set("\\xfe", 2)
                out.binary_keys = mqlite.kv.get("\\xff") == 1 and mqlite.kv.get("\\xfe") == 2
                mqlite.kv.delete("\\xff")
                out.binary_keys = out.binary_keys and mqlite.kv.get("\\xff") == nil and mqlite.kv.get("\\xfe") == 2
                out.worker_is_number = math.type(mqlite.worker) == "integer"
              end
              return { topic = "res/" .. m.topic, payload = mqlite.json.encode(out) }
            end)
            """
        let options: [String: ConfigValue] = ["greeting": .string("hi"), "list": .array([.int(1), .string("two")]), "nested": .table(["n": .int(3)])]
        try await withScripts([script], options: [options]) { b, host, _ in
            let sub = try await b.client("sub")
            try await sub.subscribe("res/#")
            // Alternate between the two workers: connections are spread round-robin.
            let a = try await b.client("a")
            let c = try await b.client("c")
            func ask(_ client: TestClient, _ topic: String, _ body: String = "") async throws -> [String: Any] {
                try await client.publish(topic, body)
                let reply = try await sub.expectPublish()
                return try JSONSerialization.jsonObject(with: Data(payload(reply).utf8)) as! [String: Any]
            }
            _ = try await ask(a, "lib/set", "shared value")
            let got = try await ask(c, "lib/get")
            #expect(got["v"] as? String == "shared value")
            #expect(got["short"] as? String == "x")
            try await Task.sleep(for: .milliseconds(1800))
            #expect(try await ask(a, "lib/get")["short"] as? String == "expired")
            let n1 = try await ask(a, "lib/incr")
            let n2 = try await ask(c, "lib/incr")
            #expect(n1["n"] as? Int == 1 && n1["n5"] as? Int == 6 && n2["n"] as? Int == 7)
            #expect(try await ask(c, "lib/delete")["gone"] as? Bool == true)
            let misc = try await ask(a, "lib/misc")
            #expect(misc["a2"] as? Double == 2.5)
            #expect(misc["a3"] as? Bool == true)
            #expect(misc["len"] as? Int == 4)
            #expect(misc["match"] as? Bool == true)
            #expect(misc["sha"] as? String == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
            #expect(misc["hmac"] as? String == "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")
            #expect(misc["recent"] as? Bool == true)
            #expect(misc["opt"] as? String == "hi two 3")
            #expect(misc["worker_is_number"] as? Bool == true)
            #expect(misc["binary_keys"] as? Bool == true)
            #expect(host.failureCount == 0)
        }
    }

    @Test("check_password verifies hashes written by mosquitto_passwd ($7$ PBKDF2-SHA512 and $6$ SHA-512)")
    func checkPassword() async throws {
        // Written by `mosquitto_passwd -b` (Mosquitto 2.0.11) and `mosquitto_passwd -H sha512 -b`.
        let pbkdf2 = "$7$101$+zz+Kj084HGRHXLL$sdXjw422DBzCmvYR1QtFcgpej1wQJIO+jwCIvZGhCrZsPO0ytJfXpiCtc6oExuuhF+MsJd5RX/0JQmASebrmJg=="
        let sha512 = "$6$uFK20ns7QQN0hVCp$swWuwaBIO+Q77RKimNQJk3eyeg0a9BbFhYRwyA8oc1EdeLky6U+FNFW5uL3BsXTVJRenIzG/1N4W5yVXfBsBzQ=="
        let script = """
            mqlite.on_connect(function(c)
              local hashes = { alice = [[\(pbkdf2)]], carol = [[\(sha512)]] }
              return mqlite.check_password(hashes[c.username] or "", c.password or "")
            end)
            """
        try await withScripts([script]) { b, _, _ in
            for (user, password, code) in [("alice", "secret", ConnectReturnCode.accepted), ("alice", "Secret", .notAuthorized),
                                           ("carol", "pw6", .accepted), ("carol", "pw7", .notAuthorized), ("dave", "x", .notAuthorized)] {
                let c = try await TestClient.open(port: b.port)
                let ack = try await c.connect(ConnectPacket(clientID: user, username: user, password: ByteBuffer(string: password)))
                #expect(ack.returnCode == code, "\(user)/\(password)")
                await c.abort()
            }
        }
    }

    @Test("check_password refuses, without computing it, a $7$ hash longer than one block or with more than a million iterations")
    func checkPasswordBounds() async throws {
        let salt = "+zz+Kj084HGRHXLL"
        let long = String(repeating: "A", count: 400)  // a 300-byte "digest": 5 blocks of 101 rounds
        let script = """
            mqlite.on_connect(function(c)
              local hashes = { long = "$7$101$\(salt)$\(long)", many = "$7$2000000$\(salt)$sdXjw422DBzCmvYR1QtFcgpej1wQJIO+jwCIvZGhCrZsPO0ytJfXpiCtc6oExuuhF+MsJd5RX/0JQmASebrmJg==" }
              return mqlite.check_password(hashes[c.username], "secret")
            end)
            """
        try await withScripts([script], configure: { $0.scripting.timeLimit = 30 }) { b, _, _ in
            let clock = ContinuousClock()
            for user in ["long", "many"] {
                let c = try await TestClient.open(port: b.port)
                let start = clock.now  // (the CONNECT and its hook, not the TCP connect before it)
                #expect(try await c.connect(ConnectPacket(clientID: user, username: user)).returnCode == .notAuthorized)
                #expect(clock.now - start < .seconds(2), "\(user)")
                await c.abort()
            }
        }
    }
}

@Suite("Lua failures and reload")
struct FailureTests {
    @Test("a hook that errors is logged with script and hook (never the password), counted, and handled by on_error = deny")
    func errorDeny() async throws {
        let script = #"mqlite.on_connect(function(c) error("boom for " .. c.client_id) end)"#
        try await withScripts([script]) { b, host, _ in
            let c = try await TestClient.open(port: b.port)
            #expect(try await c.connect(ConnectPacket(clientID: "x", username: "u", password: ByteBuffer(string: "hunter2"))).returnCode == .notAuthorized)
            #expect(host.failureCount == 1)
            try await eventually("log") { b.logs.entries.contains { $0.message.description.contains("Lua hook failed") } }
            let entry = b.logs.entries.first { $0.message.description.contains("Lua hook failed") }!
            #expect(entry.metadata["script"]?.description == "s0.lua")
            #expect(entry.metadata["hook"]?.description == "on_connect")
            #expect(entry.metadata["error"]?.description.contains("boom for x") == true)
            #expect(!b.logMessages.joined().contains("hunter2"))
            // The broker carries on for everyone else.
            let other = try await TestClient.open(port: b.port)
            _ = try await other.connect(ConnectPacket(clientID: "y"))
        }
    }

    @Test("with on_error = allow a failed auth or subscribe call is treated as no opinion")
    func errorAllow() async throws {
        let script = """
            mqlite.on_connect(function(c) error("broken") end)
            mqlite.on_subscribe(function(s) error("broken too") end)
            """
        try await withScripts([script], configure: { $0.scripting.onError = .allow }) { b, host, _ in
            let c = try await b.client("c")
            #expect(try await c.subscribe([("a", .atLeastOnce)]) == [.granted(.atLeastOnce)])
            #expect(host.failureCount == 2)
        }
    }

    @Test("a hook that loops forever is stopped by instruction_limit; one that returns garbage fails; the broker carries on")
    func loopsAndGarbage() async throws {
        let script = """
            mqlite.on_subscribe(function(s)
              if s.filter == "loop" then while true do end end
              if s.filter == "garbage" then return function() end end
              if s.filter == "badqos" then return 7 end
              return true
            end)
            mqlite.on_publish("p/#", function(m)
              if m.topic == "p/loop" then while true do end end
              if m.topic == "p/garbage" then return 42 end
              if m.topic == "p/badtable" then return { qos = "high" } end
              return true
            end)
            """
        try await withScripts([script], configure: { $0.scripting.instructionLimit = 100_000 }) { b, host, _ in
            let c = try await b.client("c")
            let codes = try await c.subscribe([("loop", .atMostOnce), ("garbage", .atMostOnce), ("badqos", .atMostOnce), ("p/#", .atMostOnce)])
            #expect(codes == [.failure, .failure, .failure, .granted(.atMostOnce)])
            for topic in ["p/loop", "p/garbage", "p/badtable"] { try await c.publish(topic, "x") }
            try await c.publish("p/fine", "ok")
            #expect(try await c.expectPublish().topicString == "p/fine")
            #expect(host.failureCount == 6)
            try await eventually("log") { b.logMessages.contains { $0.contains("instruction limit exceeded") } }
        }
    }

    @Test("hooks can be registered only while the script loads")
    func lateRegistration() async throws {
        let script = """
            mqlite.on_publish("late", function(m)
              mqlite.on_publish("#", function() return false end)
            end)
            """
        try await withScripts([script]) { b, host, _ in
            let c = try await b.client("c")
            try await c.subscribe("#")
            try await c.publish("late", "x")  // the hook fails, so this message is dropped
            try await c.publish("other", "y")
            #expect(try await c.expectPublish().topicString == "other")
            #expect(host.failureCount == 1)
            try await eventually("log") { b.logMessages.contains { $0.contains("only be registered while the script loads") } }
        }
    }

    @Test("a script that fails to load is reported with its path, line and Lua message")
    func loadFailure() throws {
        let dir = try scriptFolder(["local x = 1\nthis is not lua\n", "error('refusing to start')", "error(string.rep('E', 1e6))"])
        defer { try? FileManager.default.removeItem(at: dir) }
        // A FIFO named as a script would be read for ever.
        #expect(mkfifo(dir.appendingPathComponent("s3.lua").path, 0o600) == 0)
        for (index, expected) in [(0, ":2:"), (1, "refusing to start"), (2, "EEEE... (1000010 bytes)"), (3, "not a regular file"), (4, "No such file or directory")] {
            var config = BrokerConfiguration(workers: 2)
            config.plugins = [PluginConfiguration(script: dir.appendingPathComponent("s\(index).lua").path)]
            do {
                _ = try ScriptingHost(configuration: config, logger: Logger(label: "t"))
                Issue.record("loaded a broken script")
            } catch {
                #expect(error.script.hasSuffix("s\(index).lua"))
                #expect(error.message.contains(expected), "\(error.message.prefix(200))")
                #expect(error.message.utf8.count < 1100, "a message of any size is cut")
            }
        }
    }

    @Test("reload swaps in new scripts at once without registering hooks twice; a failing reload keeps the running ones")
    func reload() async throws {
        try await withScripts([#"mqlite.on_publish("r", function(m) mqlite.kv.incr("calls"); return { payload = "v1" } end)"#]) { b, host, dir in
            let c = try await b.client("c")
            try await c.subscribe("r")
            try await c.publish("r", "x")
            #expect(payload(try await c.expectPublish()) == "v1")

            let script = dir.appendingPathComponent("s0.lua")
            try #"mqlite.on_publish("r", function(m) mqlite.kv.incr("calls"); return { payload = "v2 " .. mqlite.kv.get("calls") } end)"#
                .write(to: script, atomically: true, encoding: .utf8)
            try host.reload()
            try await c.publish("r", "x")
            // calls went from 1 to 2: the new hook ran once, the old one not at all.
            #expect(payload(try await c.expectPublish()) == "v2 2")

            try "this is not lua".write(to: script, atomically: true, encoding: .utf8)
            #expect(throws: ScriptError.self) { try host.reload() }
            try await c.publish("r", "x")
            #expect(payload(try await c.expectPublish()) == "v2 3")
        }
    }

    @Test("a reload that hooks a topic already routed (and cached as unhooked) takes effect at once; one that unhooks it too")
    func reloadChangesHookedTopics() async throws {
        try await withScripts([#"mqlite.on_publish("other", function(m) return false end)"#]) { b, host, dir in
            let c = try await b.client("c")
            try await c.subscribe("t")
            try await c.publish("t", "plain")
            #expect(payload(try await c.expectPublish()) == "plain")  // routed and cached: unhooked

            let script = dir.appendingPathComponent("s0.lua")
            try #"mqlite.on_publish("t", function(m) return { payload = "hooked" } end)"#.write(to: script, atomically: true, encoding: .utf8)
            try host.reload()
            try await c.publish("t", "plain")
            #expect(payload(try await c.expectPublish()) == "hooked")

            try #"mqlite.on_publish("other", function(m) return false end)"#.write(to: script, atomically: true, encoding: .utf8)
            try host.reload()
            try await c.publish("t", "plain")
            #expect(payload(try await c.expectPublish()) == "plain")
        }
    }

    @Test("hooks run on several workers at once, each in its own VM, with nothing lost")
    func severalWorkers() async throws {
        let script = """
            local seen = 0
            mqlite.on_publish("work/#", function(m)
              seen = seen + 1
              mqlite.kv.incr("total")
              return { topic = "done/" .. m.client_id, payload = m.payload .. ":" .. mqlite.worker }
            end)
            """
        try await withScripts([script]) { b, host, _ in
            let sink = try await b.client("sink")
            try await sink.subscribe("done/#", qos: .atLeastOnce)
            var publishers: [TestClient] = []
            for i in 0..<4 { publishers.append(try await b.client("p\(i)")) }
            let perClient = 200
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (i, p) in publishers.enumerated() {
                    group.addTask {
                        for n in 0..<perClient { try await p.publish("work/\(i)", "\(n)", qos: .atLeastOnce, id: UInt16(n + 1)) }
                    }
                }
                try await group.waitForAll()
            }
            var workers = Set<String>()
            var perPublisher: [String: Int] = [:]
            for _ in 0..<(perClient * publishers.count) {
                let p = try await sink.expectPublish()
                sink.send(.puback(packetID: p.packetID!))
                perPublisher[p.topicString, default: 0] += 1
                workers.insert(String(payload(p).split(separator: ":").last!))
            }
            #expect(perPublisher.count == 4 && perPublisher.values.allSatisfy { $0 == perClient })
            #expect(workers.count == 2)
            #expect(host.failureCount == 0)
        }
    }
}

@Suite("Shipped plugins")
struct ShippedPluginTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..").standardized

    /// config/mqlite.conf with its plugin examples uncommented.
    static func shippedConfigWithPlugins() throws -> BrokerConfiguration {
        let path = root.appendingPathComponent("config/mqlite.conf").path
        let text = try String(contentsOfFile: path, encoding: .utf8)
            .split(separator: "\n", omittingEmptySubsequences: false)
            .map { line -> Substring in
                for prefix in ["# [[plugin]]", "# script =", "# options ="] where line.hasPrefix(prefix) { return line.dropFirst(2) }
                return line
            }
            .joined(separator: "\n")
        var config = try ConfigFile.parse(text, file: path)
        config.workers = 2
        config.listeners = [ListenerConfiguration(ListenAddress(host: "127.0.0.1", port: 0))]
        return config
    }

    @Test("config/mqlite.conf's commented plugin examples load and work together against real sockets")
    func shippedExamples() async throws {
        var shipped = try Self.shippedConfigWithPlugins()
        // The tour's four, and http_auth.lua shown apart (it needs a service; it loads, though).
        #expect(shipped.plugins.count == 5)
        #expect(shipped.plugins.last?.script.hasSuffix("plugins/http_auth.lua") == true)
        _ = try ScriptingHost(configuration: shipped, logger: Logger(label: "test"))
        shipped.plugins.removeLast()
        var host: ScriptingHost?
        try await withBroker(
            configure: { $0 = shipped },
            makeHooks: { config, logger in
                host = try ScriptingHost(configuration: config, logger: logger)
                return host!
            },
            prepare: { host?.bind(to: $0) }
        ) { b in
            // password_file: unknown user and wrong password refused with CONNACK 4.
            for (user, password) in [("mallory", "x"), ("alice", "wrong")] {
                let c = try await TestClient.open(port: b.port)
                #expect(try await c.connect(ConnectPacket(clientID: user, username: user, password: ByteBuffer(string: password))).returnCode == .badUsernameOrPassword)
            }
            let alice = try await b.client("alice-1", username: "alice", password: "secret")
            let bob = try await b.client("bob-1", username: "bob", password: "hunter2")

            // acl_file: alice reads alice/# but not alice/secret/#; bob may read alice/news only.
            #expect(try await alice.subscribe([("alice/#", .atMostOnce), ("alice/secret/#", .atMostOnce), ("public/#", .atMostOnce)]) == [.granted(.atMostOnce), .failure, .failure])
            #expect(try await bob.subscribe([("alice/news", .atMostOnce), ("alice/#", .atMostOnce)]) == [.granted(.atMostOnce), .failure])
            try await alice.publish("alice/secret/diary", "private")
            try await alice.publish("alice/news", "hello bob")
            #expect(try await alice.expectPublish().topicString == "alice/news")
            #expect(payload(try await bob.expectPublish()) == "hello bob")
            try await bob.publish("alice/news", "bob cannot write here")
            try await bob.ping()
            try await alice.expectNothing()

            // Patterns: devices/%c/# writable, devices/%c/cmd readable by that client.
            let device = try await b.client("dev7", username: "bob", password: "hunter2")
            #expect(try await device.subscribe([("devices/dev7/cmd", .atMostOnce), ("devices/dev8/cmd", .atMostOnce)]) == [.granted(.atMostOnce), .failure])

            #expect(host!.failureCount == 0)
        }
    }

    @Test("topic_rewrite maps wildcard levels into the new topic; json_envelope wraps payloads")
    func rewriteAndEnvelope() async throws {
        let rewrite = try String(contentsOf: Self.root.appendingPathComponent("plugins/topic_rewrite.lua"), encoding: .utf8)
        let envelope = try String(contentsOf: Self.root.appendingPathComponent("plugins/json_envelope.lua"), encoding: .utf8)
        let options: [[String: ConfigValue]] = [
            ["rules": .array([
                .table(["from": .string("legacy/+/temp"), "to": .string("sensors/{1}/temperature")]),
                .table(["from": .string("old/+/x/#"), "to": .string("new/{2}/{1}")]),
            ])],
            ["filters": .array([.string("telemetry/#")])],
        ]
        try await withScripts([rewrite, envelope], options: options) { b, host, _ in
            let sub = try await b.client("sub")
            try await sub.subscribe("#")
            let pub = try await b.client("gateway-7")
            try await pub.publish("legacy/boiler/temp", "71.5")
            let r1 = try await sub.expectPublish()
            #expect(r1.topicString == "sensors/boiler/temperature" && payload(r1) == "71.5")
            try await pub.publish("old/a/x/b/c", "deep")
            #expect(try await sub.expectPublish().topicString == "new/b/c/a")
            try await pub.publish("telemetry/engine", "rpm=900")
            let wrapped = try await sub.expectPublish()
            #expect(wrapped.topicString == "telemetry/engine")
            let json = try JSONSerialization.jsonObject(with: Data(payload(wrapped).utf8)) as! [String: Any]
            #expect(json["client_id"] as? String == "gateway-7")
            #expect(json["topic"] as? String == "telemetry/engine")
            #expect(json["payload"] as? String == "rpm=900")
            #expect(abs((json["time"] as? Double ?? 0) - Date().timeIntervalSince1970) < 5)
            try await pub.publish("other/topic", "untouched")
            #expect(payload(try await sub.expectPublish()) == "untouched")
            // Binary payloads cannot be wrapped in JSON: dropped and counted.
            try await pub.publish("telemetry/bin", ByteBuffer(bytes: [0xFF, 0xFE]))
            try await pub.ping()
            try await sub.expectNothing()
            #expect(host.failureCount == 1)
        }
    }
}
