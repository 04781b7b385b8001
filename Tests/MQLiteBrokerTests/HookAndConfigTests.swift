import Foundation
import MQLiteBroker
import MQTTCore
import NIOCore
import MQLiteTestSupport
import Testing

/// Hooks with fixed rules, to show that each hook point changes what clients see.
final class RuleHooks: BrokerHooks {
    func authenticate(_ request: ConnectRequest, worker: Int) -> HookAnswer<ConnectDecision> { .now(authenticateNow(request)) }
    func authenticatesClients(worker: Int) -> Bool { true }

    func authenticateNow(_ request: ConnectRequest) -> ConnectDecision {
        switch request.username {
        case "wrong": return .refuse(.badUsernameOrPassword)
        case "banned": return .refuse(.notAuthorized)
        case "vip": return .accept
        default: return .pass
        }
    }

    func authorizeSubscribe(_ request: SubscribeRequest, worker: Int) -> HookAnswer<SubscribeDecision> { .now(subscribeNow(request)) }

    func subscribeNow(_ request: SubscribeRequest) -> SubscribeDecision {
        if request.filter.hasPrefix("secret/") { return .deny }
        if request.filter == "old/+" { return .rewrite(filter: "new/+", qos: .atMostOnce) }
        return .allow
    }

    func isPublishHooked(topic: TopicName, worker: Int) -> Bool {
        topic.bytes.readableBytesView.starts(with: "hooked/".utf8)
    }

    func interceptPublish(_ message: HookedMessage, from client: ClientInfo, worker: Int) -> HookAnswer<PublishDecision> {
        .now(interceptNow(message, from: client))
    }

    func interceptNow(_ message: HookedMessage, from client: ClientInfo) -> PublishDecision {
        switch message.topic {
        case "hooked/drop": return .drop
        case "hooked/split":
            return .replace([
                HookedMessage(topic: "out/1", payload: message.payload, qos: message.qos, retain: false),
                HookedMessage(topic: "out/2", payload: ByteBuffer(string: "by \(client.clientID)"), qos: .atMostOnce, retain: false),
            ])
        default: return .deliver
        }
    }
}

@Suite("Hook points")
struct HookTests {
    @Test("connect hook: CONNACK 4, CONNACK 5, accept despite allow_anonymous, or pass to the default")
    func connectHook() async throws {
        try await withBroker(hooks: RuleHooks(), configure: { $0.allowAnonymous = false }) { b in
            for (user, code) in [("wrong", ConnectReturnCode.badUsernameOrPassword), ("banned", .notAuthorized)] {
                let c = try await TestClient.open(port: b.port)
                #expect(try await c.connect(ConnectPacket(clientID: user, username: user)).returnCode == code)
                try await c.expectClosed()
            }
            _ = try await b.client("v", username: "vip")
            _ = try await b.client("someone", username: "other")
            let anon = try await TestClient.open(port: b.port)
            #expect(try await anon.connect(ConnectPacket(clientID: "anon")).returnCode == .notAuthorized)
        }
    }

    @Test("subscribe hook: SUBACK 0x80 per refused filter, and rewritten filters")
    func subscribeHook() async throws {
        try await withBroker(hooks: RuleHooks()) { b in
            let c = try await b.client("c")
            let codes = try await c.subscribe([("public/#", .atLeastOnce), ("secret/x", .atLeastOnce), ("old/+", .exactlyOnce)])
            #expect(codes == [.granted(.atLeastOnce), .failure, .granted(.atMostOnce)])
            let pub = try await b.client("pub")
            try await pub.publish("new/a", "rewritten")
            #expect(String(buffer: try await c.expectPublish().payload) == "rewritten")
            try await pub.publish("secret/x", "no")
            try await c.expectNothing()
        }
    }

    @Test("publish hook: only hooked topics are intercepted; drop, or one in and many out")
    func publishHook() async throws {
        try await withBroker(hooks: RuleHooks()) { b in
            let c = try await b.client("c")
            try await c.subscribe("#")
            try await c.publish("hooked/drop", "x", qos: .atLeastOnce)  // still acknowledged
            try await c.publish("hooked/split", "payload")
            let first = try await c.expectPublish()
            let second = try await c.expectPublish()
            #expect(first.topicString == "out/1" && String(buffer: first.payload) == "payload")
            #expect(second.topicString == "out/2" && String(buffer: second.payload) == "by c")
            try await c.publish("hooked/keep", "k")
            #expect(try await c.expectPublish().topicString == "hooked/keep")
            try await c.publish("plain", "p")
            #expect(try await c.expectPublish().topicString == "plain")
            try await c.expectNothing()
        }
    }
}

@Suite("Config file")
struct ConfigFileTests {
    func parse(_ text: String) throws(ConfigError) -> BrokerConfiguration {
        try ConfigFile.parse(text, file: "test.conf")
    }

    @Test("every key is read")
    func fullFile() throws {
        let config = try parse(
            """
            [server]
            workers = 3
            log_level = "debug"
            [[listener]]
            bind = "127.0.0.1:0"
            [[listener]]
            bind = "[::1]:1884"
            [limits]
            max_packet_size = 2048
            max_connections = 10
            max_inflight = 5
            max_queued = 7
            max_keep_alive = 120
            connect_timeout = 2.5
            max_topic_alias = 0
            max_retained = 5
            max_retained_bytes = 0
            [auth]
            allow_anonymous = false
            """)
        #expect(config.workers == 3)
        #expect(config.logLevel == .debug)
        #expect(config.listeners.map(\.address) == [ListenAddress(host: "127.0.0.1", port: 0), ListenAddress(host: "::1", port: 1884)])
        #expect(config.limits.maxPacketSize == 2048)
        #expect(config.limits.maxConnections == 10)
        #expect(config.limits.maxInflight == 5)
        #expect(config.limits.maxQueued == 7)
        #expect(config.limits.maxKeepAlive == 120)
        #expect(config.limits.connectTimeout == .milliseconds(2500))
        #expect(config.limits.maxTopicAlias == 0)
        #expect(config.limits.maxRetained == 5 && config.limits.maxRetainedBytes == 0)
        #expect(config.allowAnonymous == false)
    }

    @Test("a config path that is not a regular file, or a file over 4 MiB, is refused before it is read")
    func notAFile() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("mqlite-conf-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        #expect(mkfifo(folder + "/fifo.conf", 0o600) == 0)
        let big = folder + "/big.conf"
        FileManager.default.createFile(atPath: big, contents: Data(repeating: UInt8(ascii: "\n"), count: ConfigFile.maxFileBytes + 1))
        let latin1 = folder + "/latin1.conf"
        FileManager.default.createFile(atPath: latin1, contents: Data("[server]\nworkers = 1\n# caf".utf8) + Data([0xE9, 0x0A]))
        for (path, problem) in [
            (folder + "/fifo.conf", "is not a regular file"), (folder, "is not a regular file"), (big, "more than a config file may be"),
            (latin1, "is not UTF-8 text (an invalid byte at line 3)"), (folder + "/missing.conf", "cannot read file (No such file or directory)"),
        ] {
            #expect(throws: ConfigError.self) { try ConfigFile.load(path: path) }
            do {
                _ = try ConfigFile.load(path: path)
            } catch {
                #expect(error.description.contains(problem), "\(error)")
            }
        }
    }

    @Test("defaults when the file is empty")
    func defaults() throws {
        let config = try parse("")
        #expect(config.listeners.map(\.address) == [ListenAddress(host: "0.0.0.0", port: 1883)])
        #expect(config.limits.maxPacketSize == 1 << 20 && config.limits.maxInflight == 32 && config.limits.maxQueued == 1000)
        #expect(config.limits.maxTopicAlias == 10)
        #expect(config.limits.maxRetained == 1_000_000 && config.limits.maxRetainedBytes == 1 << 30)
        #expect(config.allowAnonymous)
        #expect(config.workers == 0)
    }

    @Test(
        "bad files name the file, the key and the problem",
        arguments: [
            ("[limits]\nmax_inflihgt = 3", "limits.max_inflihgt", "unknown key"),
            ("[limits]\nmax_inflight = \"3\"", "limits.max_inflight", "must be of type int, not string"),
            ("[limits]\nmax_inflight = 0", "limits.max_inflight", "must be from 1 to 65535, not 0"),
            ("[limits]\nmax_topic_alias = 65536", "limits.max_topic_alias", "must be from 0 to 65535, not 65536"),
            ("[[listener]]\nbind = \"nowhere\"", "listener[0].bind", "HOST:PORT"),
            ("[[listener]]\nbind = \"256.1.1.1:1883\"", "listener[0].bind", "valid IPv4"),
            ("[[listener]]\nbind = \"1.2.3:1883\"", "listener[0].bind", "valid IPv4"),
            ("[[listener]]\nbind = \"[1.2.3.4]:1883\"", "listener[0].bind", "valid IPv4"),
            ("[[listener]]\nbind = \"bad_host!:1883\"", "listener[0].bind", "host name"),
            ("[server]\nworkers = 100000", "server.workers", "must be from 0 to 1024"),
            ("[[listener]]\nport = 3", "listener[0].port", "unknown key"),
            ("[server]\nlog_level = \"loud\"", "server.log_level", "must be one of"),
            ("[auth]\nallow_anonymous = 1", "auth.allow_anonymous", "must be of type bool"),
            ("[[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"gopher\"", "listener[0].protocol", "must be one of \"mqtt\", \"websockets\", \"http\", not \"gopher\""),
            ("[[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"WebSockets\"", "listener[0].protocol", "not \"WebSockets\""),
            ("[[listener]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"yes\"", "listener[0].proxy_protocol", "must be of type bool, not string"),
            ("[[listener]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = 1", "listener[0].proxy_protocol", "must be of type bool, not int"),
            ("[[listener]]\nbind = \"127.0.0.1:0\"\nproxy = true", "listener[0].proxy", "unknown key"),
            ("colour = \"red\"", "colour", "unknown key"),
            ("limits = 3", "limits", "must be of type table"),
            ("[[plugin]]\noptions = {}", "plugin[0].script", "is required"),
            ("[[plugin]]\nscript = \"a.lua\"\nopts = 1", "plugin[0].opts", "unknown key"),
            ("[scripting]\non_error = \"maybe\"", "scripting.on_error", "must be \"deny\" or \"allow\""),
            ("[scripting]\ninstruction_limit = 10", "scripting.instruction_limit", "must be from 1000"),
        ])
    func badFiles(text: String, key: String, problem: String) {
        do {
            _ = try parse(text)
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.file == "test.conf")
            #expect(error.key == key)
            #expect(error.problem.contains(problem), "\(error.problem)")
        }
    }

    @Test("listener protocol and proxy_protocol")
    func listenerKinds() throws {
        let config = try parse(
            """
            [[listener]]
            bind = "127.0.0.1:1883"
            [[listener]]
            bind = "127.0.0.1:8080"
            protocol = "websockets"
            [[listener]]
            bind = "127.0.0.1:1884"
            protocol = "mqtt"
            proxy_protocol = true
            [[listener]]
            bind = "127.0.0.1:8081"
            protocol = "websockets"
            proxy_protocol = false
            """)
        #expect(config.listeners.map(\.kind) == [.mqtt, .websockets, .mqtt, .websockets])
        #expect(config.listeners.map(\.proxyProtocol) == [false, false, true, false])
    }

    @Test("hosts: IPv4, IPv6 in brackets, and host names are accepted")
    func goodHosts() {
        for text in ["0.0.0.0:1883", "127.0.0.1:0", "255.255.255.255:1", "[::]:1883", "[::1]:1", "[fe80::1%lo]:1", "localhost:1883", "mqtt-1.example.com:8883"] {
            #expect(ListenAddress(parsing: text) != nil, "\(text)")
        }
    }

    @Test("a NUL byte in the file is an error naming its line, not the end of the file")
    func nulByte() {
        do {
            _ = try parse("[limits]\nmax_inflight = 3\n\u{0}\ncolour = 1")
            Issue.record("accepted a NUL byte")
        } catch {
            #expect(error.file == "test.conf")
            #expect(error.problem.contains("NUL byte at line 3"), "\(error.problem)")
        }
    }

    @Test("a TOML syntax error names the line")
    func syntaxError() {
        #expect(throws: ConfigError.self) { try parse("[limits]\nmax_inflight = = 3") }
        do {
            _ = try parse("[limits]\nmax_inflight = = 3")
        } catch {
            #expect(error.description.contains("test.conf") && error.description.contains("line 2"))
        }
    }

    @Test("a missing file is an error naming it")
    func missingFile() {
        do {
            _ = try ConfigFile.load(path: "/nonexistent/mqlite.conf")
            Issue.record("loaded a missing file")
        } catch {
            #expect(error.file == "/nonexistent/mqlite.conf")
            #expect(error.problem.contains("cannot read"))
        }
    }

    @Test("the shipped config/mqlite.conf parses and matches the built-in defaults")
    func shippedConfig() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../config/mqlite.conf").path
        let config = try ConfigFile.load(path: path)
        let defaults = BrokerConfiguration()
        #expect(config.listeners == defaults.listeners)
        #expect(config.workers == defaults.workers)
        #expect(config.sysInterval == defaults.sysInterval)
        #expect(config.limits.maxPacketSize == defaults.limits.maxPacketSize)
        #expect(config.limits.maxInflight == defaults.limits.maxInflight)
        #expect(config.limits.maxQueued == defaults.limits.maxQueued)
        #expect(config.limits.maxConnections == defaults.limits.maxConnections)
        #expect(config.limits.maxKeepAlive == defaults.limits.maxKeepAlive)
        #expect(config.limits.connectTimeout == defaults.limits.connectTimeout)
        #expect(config.allowAnonymous == defaults.allowAnonymous)
        #expect(config.scripting == defaults.scripting)
        #expect(config.plugins.isEmpty)
        // The shipped file turns persistence on (the built-in default, without a file, is memory only).
        #expect(defaults.persistence == nil)
        #expect(config.persistence == PersistenceConfiguration(path: URL(fileURLWithPath: path).deletingLastPathComponent().path + "/mqlite.db"))
    }

    @Test("[[plugin]] paths are resolved against the config file's folder; options keep their TOML types")
    func plugins() throws {
        let config = try ConfigFile.parse(
            """
            [[plugin]]
            script = "plugins/a.lua"
            options = { file = "passwd", n = 3, ratio = 0.5, on = true, rules = [ { from = "a/+", to = "b/{1}" } ] }
            [[plugin]]
            script = "/abs/b.lua"
            [scripting]
            instruction_limit = 5000
            on_error = "allow"
            """, file: "/etc/mqlite/mqlite.conf")
        #expect(config.plugins.map(\.script) == ["/etc/mqlite/plugins/a.lua", "/abs/b.lua"])
        #expect(config.plugins[0].options == [
            "file": .string("passwd"), "n": .int(3), "ratio": .double(0.5), "on": .bool(true),
            "rules": .array([.table(["from": .string("a/+"), "to": .string("b/{1}")])]),
        ])
        #expect(config.scripting == ScriptingConfiguration(instructionLimit: 5000, onError: .allow))
        #expect(config.baseDirectory == "/etc/mqlite")
    }
}
