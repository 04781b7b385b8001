import Foundation
import MQTTCore
import Logging
import NIOCore
import TOMLKit

/// A config file that cannot be used: names the file, the key and the problem.
public struct ConfigError: Error, Equatable, CustomStringConvertible {
    public var file: String
    /// Dotted key (`limits.max_inflight`, `listener[1].bind`), or nil for the file as a whole.
    public var key: String?
    public var problem: String

    public init(file: String, key: String?, problem: String) {
        self.file = file
        self.key = key
        self.problem = problem
    }

    public var description: String {
        if let key { return "\(file): \(key): \(problem)" }
        return "\(file): \(problem)"
    }
}

/// Reads the TOML config file (`mqlite.conf`) into a `BrokerConfiguration`. Every key is checked:
/// an unknown key, a wrong type or a value out of range is an error, never ignored.
public enum ConfigFile {
    /// Largest config file read: a real one is a few KiB; parsing holds about 80 bytes of memory
    /// per byte of it.
    public static let maxFileBytes = 4 << 20

    /// Loads and checks `path`.
    public static func load(path: String) throws(ConfigError) -> BrokerConfiguration {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw ConfigError(file: path, key: nil, problem: "cannot read file (\(String(cString: strerror(errno))))")
        }
        // (A FIFO or a device would be read for ever; a folder is not a file.)
        guard info.st_mode & S_IFMT == S_IFREG else { throw ConfigError(file: path, key: nil, problem: "is not a regular file") }
        guard info.st_size <= maxFileBytes else {
            throw ConfigError(file: path, key: nil, problem: "is \(info.st_size) bytes, more than a config file may be (\(maxFileBytes))")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(file: path, key: nil, problem: "cannot read file (\(String(cString: strerror(errno))))")
        }
        guard let text = String(validating: data, as: UTF8.self) else {
            throw ConfigError(file: path, key: nil, problem: "is not UTF-8 text (an invalid byte at line \(firstInvalidUTF8Line(data)))")
        }
        return try parse(text, file: path)
    }

    /// The line of `data`'s first byte that is not part of valid UTF-8.
    private static func firstInvalidUTF8Line(_ data: Data) -> Int {
        var bytes = data.makeIterator()
        var parser = Unicode.UTF8.ForwardParser()
        var line = 1
        while true {
            switch parser.parseScalar(from: &bytes) {
            case .valid(let scalar): if scalar.first == UInt8(ascii: "\n") { line += 1 }
            case .error, .emptyInput: return line
            }
        }
    }

    /// Checks `text` as the contents of `file`.
    public static func parse(_ text: String, file: String) throws(ConfigError) -> BrokerConfiguration {
        // TOML forbids control characters; the parser would stop reading at a NUL and silently
        // ignore the rest of the file.
        if let nul = text.utf8.firstIndex(of: 0) {
            let line = text.utf8[..<nul].count(where: { $0 == UInt8(ascii: "\n") }) + 1
            throw ConfigError(file: file, key: nil, problem: "NUL byte at line \(line) (not a text file?)")
        }
        // Only well-formed text reaches toml++: it fails assertions on some malformed files
        // (TOMLSyntax explains).
        if let failure = TOMLSyntax.check(text) {
            throw ConfigError(
                file: file, key: nil, problem: "TOML syntax error at line \(failure.line), column \(failure.column): \(failure.problem)")
        }
        let root: TOMLTable
        do {
            root = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw ConfigError(
                file: file, key: nil,
                problem: "TOML syntax error at line \(error.source.begin.line), column \(error.source.begin.column): \(error.description)")
        } catch {
            throw ConfigError(file: file, key: nil, problem: "TOML syntax error: \(error)")
        }

        var config = BrokerConfiguration()
        let directory = URL(fileURLWithPath: file).deletingLastPathComponent().path
        config.baseDirectory = directory
        let top = Section(table: root, path: nil, file: file)
        try top.allowOnly(["server", "listener", "limits", "auth", "plugin", "scripting", "persistence", "bridge"])

        if let server = try top.table("server") {
            try server.allowOnly(["workers", "log_level", "sys_interval"])
            if let workers = try server.int("workers", in: BrokerConfiguration.workerRange) { config.workers = workers }
            if let v = try server.int("sys_interval", in: BrokerConfiguration.sysIntervalRange) { config.sysInterval = v }
            if let level = try server.string("log_level") {
                guard let parsed = Logger.Level(rawValue: level) else {
                    throw server.error("log_level", "must be one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")), not \"\(level)\"")
                }
                config.logLevel = parsed
            }
        }

        if let listeners = try top.arrayOfTables("listener") {
            config.listeners = []
            for listener in listeners {
                try listener.allowOnly([
                    "bind", "protocol", "proxy_protocol", "certfile", "keyfile", "cafile", "require_certificate", "use_identity_as_username",
                ])
                guard let bind = try listener.string("bind") else { throw listener.error("bind", "is required") }
                guard let address = ListenAddress(parsing: bind) else {
                    throw listener.error("bind", "must be \"HOST:PORT\" with a valid IPv4 or IPv6 address or host name and a port from 0 to 65535, not \"\(bind)\"")
                }
                var kind = ListenerConfiguration.Kind.mqtt
                if let name = try listener.string("protocol") {
                    guard let parsed = ListenerConfiguration.Kind(rawValue: name) else {
                        throw listener.error("protocol", "must be one of \(ListenerConfiguration.Kind.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")), not \"\(name)\"")
                    }
                    kind = parsed
                }
                let proxyProtocol = try listener.bool("proxy_protocol") ?? false
                if kind == .http {
                    // The metrics listener is for a scraper on a trusted network: plain HTTP only.
                    for key in ["certfile", "keyfile", "cafile", "require_certificate", "use_identity_as_username", "proxy_protocol"]
                    where listener.table[key] != nil {
                        throw listener.error(key, "is not allowed on an http listener (plain HTTP only: no TLS, no PROXY protocol)")
                    }
                }
                let tls = try tlsSettings(listener, directory: directory)
                config.listeners.append(ListenerConfiguration(address, kind: kind, tls: tls, proxyProtocol: proxyProtocol))
            }
            if config.listeners.isEmpty { throw top.error("listener", "needs at least one [[listener]]") }
        }

        if let limits = try top.table("limits") {
            try limits.allowOnly([
                "max_packet_size", "max_connections", "max_inflight", "max_queued", "max_queued_bytes", "max_keep_alive", "connect_timeout",
                "session_expiry", "max_topic_levels", "max_subscriptions", "max_topic_alias", "max_retained", "max_retained_bytes",
            ])
            if let v = try limits.int("max_packet_size", in: 2...268_435_455) { config.limits.maxPacketSize = v }
            if let v = try limits.int("max_connections", in: 0...Int(Int32.max)) { config.limits.maxConnections = v }
            if let v = try limits.int("max_inflight", in: 1...65535) { config.limits.maxInflight = v }
            if let v = try limits.int("max_queued", in: 0...Int(Int32.max)) { config.limits.maxQueued = v }
            if let v = try limits.int("max_queued_bytes", in: 0...Int.max) { config.limits.maxQueuedBytes = v }
            if let v = try limits.int("max_keep_alive", in: 0...65535) { config.limits.maxKeepAlive = v }
            if let v = try limits.seconds("connect_timeout") { config.limits.connectTimeout = v }
            if let v = try limits.int("session_expiry", in: 0...(100 * 365 * 86_400)) { config.limits.sessionExpiry = .seconds(Int64(v)) }
            if let v = try limits.int("max_topic_levels", in: 1...65535) { config.limits.maxTopicLevels = v }
            if let v = try limits.int("max_subscriptions", in: 0...Int(Int32.max)) { config.limits.maxSubscriptions = v }
            if let v = try limits.int("max_topic_alias", in: 0...65535) { config.limits.maxTopicAlias = v }
            if let v = try limits.int("max_retained", in: 0...Int.max) { config.limits.maxRetained = v }
            if let v = try limits.int("max_retained_bytes", in: 0...Int.max) { config.limits.maxRetainedBytes = v }
        }

        if let auth = try top.table("auth") {
            try auth.allowOnly(["allow_anonymous"])
            if let v = try auth.bool("allow_anonymous") { config.allowAnonymous = v }
        }

        for plugin in try top.arrayOfTables("plugin") ?? [] {
            try plugin.allowOnly(["script", "options"])
            guard let script = try plugin.string("script") else { throw plugin.error("script", "is required") }
            let path = script.hasPrefix("/") ? script : URL(fileURLWithPath: directory).appendingPathComponent(script).path
            var options: [String: ConfigValue] = [:]
            if let table = try plugin.table("options")?.table {
                for key in table.keys {
                    guard let value = ConfigFile.value(table[key]!, depth: 1) else {
                        throw plugin.error("options.\(key)", "nested deeper than \(ConfigFile.maxOptionDepth) levels")
                    }
                    options[key] = value
                }
            }
            config.plugins.append(PluginConfiguration(script: path, options: options))
        }

        if let bridges = try top.arrayOfTables("bridge") {
            for bridge in bridges {
                let parsed = try Self.bridge(bridge, directory: directory)
                if config.bridges.contains(where: { $0.name == parsed.name }) {
                    throw bridge.error("name", "\"\(parsed.name)\" names another bridge already")
                }
                // Two links with one client id would take each other's session on the remote.
                if config.bridges.contains(where: { $0.clientID == parsed.clientID && $0.address == parsed.address }) {
                    throw bridge.error("client_id", "\"\(LogText(parsed.clientID))\" is another bridge's to the same remote already")
                }
                config.bridges.append(parsed)
            }
        }

        if let persistence = try top.table("persistence") {
            try persistence.allowOnly(["path", "sync", "flush_interval"])
            guard let path = try persistence.string("path") else { throw persistence.error("path", "is required (the store's file)") }
            guard !path.isEmpty else { throw persistence.error("path", "must be a file name, not empty") }
            var store = PersistenceConfiguration(
                path: path.hasPrefix("/") ? path : URL(fileURLWithPath: directory).appendingPathComponent(path).path)
            if let sync = try persistence.string("sync") {
                guard let parsed = PersistenceConfiguration.Sync(rawValue: sync) else {
                    throw persistence.error("sync", "must be one of \(PersistenceConfiguration.Sync.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")), not \"\(sync)\"")
                }
                store.sync = parsed
            }
            if let v = try persistence.number("flush_interval", in: PersistenceConfiguration.flushIntervalRange) { store.flushInterval = v }
            config.persistence = store
        }

        if let scripting = try top.table("scripting") {
            try scripting.allowOnly(["instruction_limit", "time_limit", "memory_limit", "on_error", "kv_max_bytes", "max_pending_calls", "http_connections"])
            if let v = try scripting.int("instruction_limit", in: 1000...Int(Int32.max)) { config.scripting.instructionLimit = v }
            if let v = try scripting.number("time_limit", in: 0.01...3600) { config.scripting.timeLimit = v }
            if let v = try scripting.int("memory_limit", in: (1 << 20)...(64 << 30)) { config.scripting.memoryLimit = v }
            if let v = try scripting.int("kv_max_bytes", in: (1 << 10)...(64 << 30)) { config.scripting.kvMaxBytes = v }
            if let v = try scripting.int("max_pending_calls", in: 1...1_000_000) { config.scripting.maxPendingCalls = v }
            if let v = try scripting.int("http_connections", in: 1...10_000) { config.scripting.httpConnections = v }
            if let v = try scripting.string("on_error") {
                guard let policy = ScriptingConfiguration.OnError(rawValue: v) else {
                    throw scripting.error("on_error", "must be \"deny\" or \"allow\", not \"\(v)\"")
                }
                config.scripting.onError = policy
            }
        }
        return config
    }

    /// One `[[bridge]]` and its `[[bridge.topic]]`s.
    private static func bridge(_ section: Section, directory: String) throws(ConfigError) -> BridgeConfiguration {
        try section.allowOnly([
            "name", "address", "client_id", "username", "password", "clean_session", "keep_alive", "protocol_version", "cafile", "certfile",
            "keyfile", "reconnect_delay", "max_inflight", "max_queued", "max_queued_bytes", "topic",
        ])
        guard let name = try section.string("name") else { throw section.error("name", "is required") }
        guard !name.isEmpty, name.utf8.count <= 64, !name.contains(where: { "/+#\u{0}".contains($0) || $0.isWhitespace }) else {
            throw section.error("name", "must be 1 to 64 characters without /, +, #, spaces or NUL, not \"\(name)\"")
        }
        guard let text = try section.string("address") else { throw section.error("address", "is required (\"HOST:PORT\" of the remote broker)") }
        guard let address = ListenAddress(parsing: text), address.port > 0 else {
            throw section.error("address", "must be \"HOST:PORT\" with a host name or address and a port from 1 to 65535, not \"\(text)\"")
        }
        var bridge = BridgeConfiguration(name: name, address: address)
        if let id = try section.string("client_id") {
            guard !id.isEmpty, id.utf8.count <= 65535 else { throw section.error("client_id", "must be 1 to 65,535 bytes of UTF-8, not \(id.utf8.count)") }
            bridge.clientID = id
        }
        // (An MQTT string: at most 65,535 bytes.)
        func mqttString(_ key: String) throws(ConfigError) -> String? {
            guard let value = try section.string(key) else { return nil }
            guard value.utf8.count <= 65535 else { throw section.error(key, "must be at most 65,535 bytes of UTF-8, not \(value.utf8.count)") }
            return value
        }
        bridge.username = try mqttString("username")
        bridge.password = try mqttString("password")
        if bridge.password != nil && bridge.username == nil { throw section.error("password", "needs username (MQTT 3.1.1 sends no password alone)") }
        if let clean = try section.bool("clean_session") { bridge.cleanSession = clean }
        if let keepAlive = try section.int("keep_alive", in: 0...65535) { bridge.keepAlive = UInt16(keepAlive) }
        if let window = try section.int("max_inflight", in: 1...65535) { bridge.maxInflight = window }
        if let queued = try section.int("max_queued", in: 0...Int(Int32.max)) { bridge.maxQueued = queued }
        if let bytes = try section.int("max_queued_bytes", in: 0...Int.max) { bridge.maxQueuedBytes = bytes }
        if let version = try section.int("protocol_version", in: 4...5) { bridge.protocolVersion = version == 5 ? .v5 : .v3_1_1 }
        func path(_ key: String) throws(ConfigError) -> String? {
            guard let value = try section.string(key) else { return nil }
            guard !value.isEmpty else { throw section.error(key, "must be a file name, not empty") }
            let resolved = value.hasPrefix("/") ? value : directory + "/" + value
            guard FileManager.default.isReadableFile(atPath: resolved) else { throw section.error(key, "cannot read \"\(resolved)\"") }
            return resolved
        }
        bridge.cafile = try path("cafile")
        bridge.certfile = try path("certfile")
        bridge.keyfile = try path("keyfile")
        if (bridge.certfile == nil) != (bridge.keyfile == nil) {
            throw section.error(bridge.certfile == nil ? "certfile" : "keyfile", "is required with \(bridge.certfile == nil ? "keyfile" : "certfile") (a client certificate needs both)")
        }
        if bridge.certfile != nil && bridge.cafile == nil { throw section.error("cafile", "is required with certfile (TLS to the remote is on when cafile is set)") }
        if let cafile = bridge.cafile {
            // Read now, so that a file that is not PEM, a key that does not match, or a FIFO named
            // by mistake stops the check and the start, not a worker once the broker runs.
            do {
                _ = try TLSSettings.makeClientContext(cafile: cafile, certfile: bridge.certfile, keyfile: bridge.keyfile)
            } catch {
                throw section.error(error.key, error.problem)
            }
        }
        if let delay = try section.table("reconnect_delay") {
            try delay.allowOnly(["min", "max"])
            if let v = try delay.seconds("min") { bridge.reconnectMin = v }
            if let v = try delay.seconds("max") { bridge.reconnectMax = v }
            guard bridge.reconnectMin >= .milliseconds(10) else { throw delay.error("min", "must be at least 0.01 seconds") }
            guard bridge.reconnectMin <= bridge.reconnectMax else { throw delay.error("max", "must not be less than min") }
        }
        guard let topics = try section.arrayOfTables("topic"), !topics.isEmpty else {
            throw section.error("topic", "needs at least one [[bridge.topic]] (what crosses the bridge)")
        }
        for topic in topics {
            try topic.allowOnly(["pattern", "direction", "qos", "local_prefix", "remote_prefix"])
            guard let pattern = try topic.string("pattern") else { throw topic.error("pattern", "is required") }
            let directionText = try topic.string("direction") ?? "out"
            guard let direction = BridgeConfiguration.Direction(rawValue: directionText) else {
                throw topic.error("direction", "must be one of \"out\", \"in\", \"both\", not \"\(directionText)\"")
            }
            let qos = QoS(rawValue: UInt8(try topic.int("qos", in: 0...2) ?? 0))!
            let entry = BridgeConfiguration.Topic(
                pattern: pattern, direction: direction, qos: qos, localPrefix: try topic.string("local_prefix") ?? "",
                remotePrefix: try topic.string("remote_prefix") ?? "")
            // Both filters must be valid: the pattern with each prefix (a prefix is a topic's start,
            // so it has no wildcards; "site1/" and "" are the usual ones).
            for (key, prefix) in [("local_prefix", entry.localPrefix), ("remote_prefix", entry.remotePrefix)] {
                guard !prefix.contains("+"), !prefix.contains("#"), !prefix.hasPrefix("$share/") else {
                    throw topic.error(key, "must be the start of a topic name (no wildcards), not \"\(prefix)\"")
                }
            }
            do throws(MQTTProtocolError) {
                _ = try TopicFilter(entry.localFilter)
                _ = try TopicFilter(entry.remoteFilter)
                guard !entry.pattern.hasPrefix("$share/") else { throw .invalidTopicFilter("a shared subscription") }
            } catch {
                throw topic.error("pattern", "must be a valid topic filter (with its prefixes too), not \"\(pattern)\": \(error)")
            }
            bridge.topics.append(entry)
        }
        return bridge
    }

    /// A listener's TLS keys, checked against each other and against the files they name (read
    /// and parsed here, so that `--check` and startup stop on a file that cannot be used).
    private static func tlsSettings(_ listener: Section, directory: String) throws(ConfigError) -> TLSSettings? {
        func path(_ key: String) throws(ConfigError) -> String? {
            guard let value = try listener.string(key) else { return nil }
            guard !value.isEmpty else { throw listener.error(key, "must be a file name, not empty") }
            return value.hasPrefix("/") ? value : URL(fileURLWithPath: directory).appendingPathComponent(value).path
        }
        let certfile = try path("certfile")
        let keyfile = try path("keyfile")
        let cafile = try path("cafile")
        let requireCertificate = try listener.bool("require_certificate") ?? false
        let useIdentity = try listener.bool("use_identity_as_username") ?? false
        guard let certfile, let keyfile else {
            if certfile != nil { throw listener.error("keyfile", "is required with certfile (TLS needs both)") }
            if keyfile != nil { throw listener.error("certfile", "is required with keyfile (TLS needs both)") }
            for key in ["cafile", "require_certificate", "use_identity_as_username"] where listener.table[key] != nil {
                throw listener.error(key, "needs certfile and keyfile (TLS) on this listener")
            }
            return nil
        }
        if requireCertificate && cafile == nil {
            throw listener.error("require_certificate", "needs cafile (the CAs that sign client certificates)")
        }
        if useIdentity && !requireCertificate {
            throw listener.error("use_identity_as_username", "needs require_certificate = true (as in Mosquitto)")
        }
        let settings = TLSSettings(certfile: certfile, keyfile: keyfile, cafile: cafile, requireCertificate: requireCertificate, useIdentityAsUsername: useIdentity)
        do {
            _ = try settings.makeContext()
        } catch {
            throw listener.error(error.key, error.problem)
        }
        return settings
    }

    /// Most nested arrays/tables in a plugin's options (the options table itself is level 1);
    /// the same limit as `mqlite.json`'s.
    public static let maxOptionDepth = 64

    /// A TOML value as plugin options see it (dates and times become their TOML text); nil if it
    /// nests deeper than `maxOptionDepth` (which bounds this recursion).
    static func value(_ v: TOMLValueConvertible, depth: Int) -> ConfigValue? {
        switch v.type {
        case .string: return .string(v.string!)
        case .int: return .int(v.int!)
        case .double: return .double(v.double!)
        case .bool: return .bool(v.bool!)
        case .array:
            guard depth < maxOptionDepth else { return nil }
            let array = v.array!
            var result: [ConfigValue] = []
            for index in 0..<array.count {
                guard let item = value(array[index], depth: depth + 1) else { return nil }
                result.append(item)
            }
            return .array(result)
        case .table:
            guard depth < maxOptionDepth else { return nil }
            let table = v.table!
            var result: [String: ConfigValue] = [:]
            for key in table.keys {
                guard let item = value(table[key]!, depth: depth + 1) else { return nil }
                result[key] = item
            }
            return .table(result)
        default: return .string(v.debugDescription)
        }
    }
}

/// One table of the file, with typed, checked accessors.
private struct Section {
    let table: TOMLTable
    let path: String?
    let file: String

    func name(_ key: String) -> String { path.map { "\($0).\(key)" } ?? key }

    func error(_ key: String, _ problem: String) -> ConfigError {
        ConfigError(file: file, key: name(key), problem: problem)
    }

    func allowOnly(_ keys: Set<String>) throws(ConfigError) {
        for key in table.keys.sorted() where !keys.contains(key) {
            throw error(key, "unknown key (known here: \(keys.sorted().joined(separator: ", ")))")
        }
    }

    private func value(_ key: String, _ expected: TOMLType...) throws(ConfigError) -> TOMLValueConvertible? {
        guard let value = table[key] else { return nil }
        guard expected.contains(value.type) else {
            throw error(key, "must be of type \(expected.map(\.rawValue).joined(separator: " or ")), not \(value.type.rawValue)")
        }
        return value
    }

    func table(_ key: String) throws(ConfigError) -> Section? {
        try value(key, .table).map { Section(table: $0.table!, path: name(key), file: file) }
    }

    func arrayOfTables(_ key: String) throws(ConfigError) -> [Section]? {
        guard let array = try value(key, .array)?.array else { return nil }
        var sections: [Section] = []
        for index in 0..<array.count {
            guard let table = array[index].table else {
                throw error("\(key)[\(index)]", "must be a table ([[\(key)]])")
            }
            sections.append(Section(table: table, path: "\(name(key))[\(index)]", file: file))
        }
        return sections
    }

    func int(_ key: String, in range: ClosedRange<Int>) throws(ConfigError) -> Int? {
        guard let v = try value(key, .int)?.int else { return nil }
        guard range.contains(v) else { throw error(key, "must be from \(range.lowerBound) to \(range.upperBound), not \(v)") }
        return v
    }

    func string(_ key: String) throws(ConfigError) -> String? {
        try value(key, .string)?.string
    }

    func bool(_ key: String) throws(ConfigError) -> Bool? {
        try value(key, .bool)?.bool
    }

    /// A number (integer or fractional) within `range`.
    func number(_ key: String, in range: ClosedRange<Double>) throws(ConfigError) -> Double? {
        guard let v = try value(key, .int, .double) else { return nil }
        let number = v.double ?? Double(v.int!)
        guard range.contains(number) else { throw error(key, "must be from \(range.lowerBound) to \(range.upperBound), not \(number)") }
        return number
    }

    /// A positive number of seconds, integer or fractional.
    func seconds(_ key: String) throws(ConfigError) -> TimeAmount? {
        guard let v = try value(key, .int, .double) else { return nil }
        let seconds = v.double ?? Double(v.int!)
        guard seconds > 0 && seconds <= 86_400 else { throw error(key, "must be more than 0 and at most 86400 seconds, not \(seconds)") }
        return .nanoseconds(Int64(seconds * 1e9))
    }
}
