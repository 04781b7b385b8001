import Foundation
import MQTTCore
import Logging
import NIOCore

/// Everything the broker needs to run, as a value. The config file (`ConfigFile`) and the command
/// line build one of these; tests build one directly.
public struct BrokerConfiguration: Sendable {
    /// Event loops (worker threads); 0 means one per core.
    public var workers: Int
    public var logLevel: Logger.Level
    public var listeners: [ListenerConfiguration]
    public var limits: Limits
    /// With false and no hook to check credentials, clients without a user name get CONNACK 5.
    public var allowAnonymous: Bool
    /// Lua plugins, in load order (`[[plugin]]`).
    public var plugins: [PluginConfiguration]
    public var scripting: ScriptingConfiguration
    /// Folder of the config file: relative paths in plugin options are resolved against it.
    public var baseDirectory: String
    /// Seconds between two publications of the `$SYS/broker/...` topics; 0 = none
    /// (`[server] sys_interval`, as Mosquitto's).
    public var sysInterval: Int
    /// `[persistence]`: nil keeps everything in memory only.
    public var persistence: PersistenceConfiguration?
    /// `[[bridge]]`: links to other brokers.
    public var bridges: [BridgeConfiguration] = []

    public init(
        workers: Int = 0, logLevel: Logger.Level = .info,
        listeners: [ListenerConfiguration] = [ListenerConfiguration(ListenAddress(host: "0.0.0.0", port: 1883))],
        limits: Limits = Limits(), allowAnonymous: Bool = true,
        plugins: [PluginConfiguration] = [], scripting: ScriptingConfiguration = ScriptingConfiguration(),
        baseDirectory: String = ".", sysInterval: Int = 10
    ) {
        self.sysInterval = sysInterval
        self.workers = workers
        self.logLevel = logLevel
        self.listeners = listeners
        self.limits = limits
        self.allowAnonymous = allowAnonymous
        self.plugins = plugins
        self.scripting = scripting
        self.baseDirectory = baseDirectory
    }

    /// Accepted values of `sys_interval` (seconds; 0 = off).
    public static let sysIntervalRange = 0...86_400

    /// Accepted values of `workers` (the config file's and `-t`).
    public static let workerRange = 0...1024

    /// The number of event loops this configuration asks for, with 0 resolved to the core count.
    public var resolvedWorkers: Int { workers > 0 ? workers : System.coreCount }
}

/// `[persistence]`: where the store is and when what it is given reaches the disk.
public struct PersistenceConfiguration: Sendable, Equatable {
    public enum Sync: String, Sendable, CaseIterable {
        /// A change is committed as soon as the writer takes it (changes that arrive together
        /// share one commit), with fsync; an acknowledgement that depends on it waits for it.
        case full
        /// Committed every `flush_interval` seconds, with fsync of the WAL at checkpoints only.
        case batch
        /// Committed every `flush_interval` seconds, without fsync (the OS writes it when it likes).
        case off
    }

    public var path: String
    public var sync: Sync
    public var flushInterval: Double

    public static let flushIntervalRange = 0.01...60.0

    public init(path: String, sync: Sync = .full, flushInterval: Double = 1.0) {
        self.path = path
        self.sync = sync
        self.flushInterval = flushInterval
    }
}

/// One `[[listener]]`: where to listen and what is spoken there. Each listener has its kind (the
/// protocol on top of TCP) and, optionally, TLS.
public struct ListenerConfiguration: Sendable, Equatable {
    /// What a listener speaks (`protocol` in the config file).
    public enum Kind: String, Sendable, CaseIterable {
        /// MQTT straight over TCP (or TLS).
        case mqtt
        /// MQTT over WebSocket (RFC 6455, subprotocol `mqtt`), over TCP or TLS (`ws://`, `wss://`).
        case websockets
        /// Plain HTTP/1.1 for operators: `GET /metrics` (Prometheus text format) and `GET /health`.
        /// No MQTT, no TLS, no PROXY header.
        case http
    }

    /// Where to listen (`bind`).
    public var address: ListenAddress
    /// What is spoken there (`protocol`).
    public var kind: Kind
    /// TLS on this listener (nil: plain TCP).
    public var tls: TLSSettings?
    /// Every connection starts with a PROXY protocol (v1 or v2) header naming the real client
    /// (`proxy_protocol`): for listeners behind a load balancer.
    public var proxyProtocol: Bool

    public init(_ address: ListenAddress, kind: Kind = .mqtt, tls: TLSSettings? = nil, proxyProtocol: Bool = false) {
        self.address = address
        self.kind = kind
        self.tls = tls
        self.proxyProtocol = proxyProtocol
    }

    /// The bind string (`HOST:PORT`), as scripts see it in `c.listener`.
    public var bind: String { address.description }
}

/// A `HOST:PORT` to listen on; port 0 asks the kernel for an ephemeral port.
public struct ListenAddress: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses `HOST:PORT` (`[::1]:1883` for IPv6). HOST is an IPv4 address, an IPv6 address in
    /// brackets, or a host name (RFC 1123 letters, digits, hyphens and dots); something that looks
    /// like an IPv4 address but is not one (`256.1.1.1`) is refused.
    public init?(parsing text: String) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (0...65535).contains(port)
        else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") {
            host = String(host.dropFirst().dropLast())
            guard host.contains(":") else { return nil }  // brackets are for IPv6 only
        }
        guard Self.isValidHost(host) else { return nil }
        self.init(host: host, port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// An IPv6 address, an IPv4 address (four numbers each at most 255), or an RFC 1123 host name.
    static func isValidHost(_ host: String) -> Bool {
        if host.contains(":") { return (try? SocketAddress(ipAddress: host, port: 0))?.protocol == .inet6 }
        let digitsAndDots = host.utf8.allSatisfy { $0 == UInt8(ascii: ".") || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }
        if digitsAndDots { return (try? SocketAddress(ipAddress: host, port: 0))?.protocol == .inet }
        func isNameByte(_ b: UInt8) -> Bool {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b | 0x20) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b)
                || b == UInt8(ascii: "-")
        }
        let labels = host.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        return host.utf8.count <= 253
            && labels.allSatisfy { label in
                (1...63).contains(label.count) && label.first != UInt8(ascii: "-") && label.last != UInt8(ascii: "-")
                    && label.allSatisfy(isNameByte)
            }
    }
}

/// Resource limits (`[limits]` in the config file).
public struct Limits: Sendable {
    /// Largest accepted remaining length of a packet, in bytes.
    public var maxPacketSize: Int
    /// MQTT 5's Maximum Packet Size for `maxPacketSize`, as told to a peer (CONNACK, a bridge's
    /// CONNECT): it counts the fixed header too, its first byte and the remaining length's.
    var maximumPacketSizeProperty: UInt32 {
        let lengthBytes = maxPacketSize < 128 ? 1 : maxPacketSize < 16_384 ? 2 : maxPacketSize < 2_097_152 ? 3 : 4
        return UInt32(clamping: 1 + lengthBytes + maxPacketSize)
    }
    /// Most simultaneous client connections; 0 means no limit.
    public var maxConnections: Int
    /// Most unacknowledged outgoing QoS 1/2 messages per client.
    public var maxInflight: Int
    /// Most messages held per client (offline, or waiting behind a full in-flight window or a
    /// socket that cannot take more); past it messages for that client are dropped and counted.
    public var maxQueued: Int
    /// Most topic and payload bytes held per client in the same queue; 0 = no limit (Mosquitto's
    /// `max_queued_bytes`). A message kept by many queues is stored once but counts in each.
    public var maxQueuedBytes: Int
    /// Largest keep-alive a client may ask for; a larger one gets CONNACK 2 (as Mosquitto does).
    public var maxKeepAlive: Int
    /// How long a new socket may take to send CONNECT.
    public var connectTimeout: TimeAmount
    /// How long a persistent session may stay offline before it is removed; zero = forever
    /// (Mosquitto's `persistent_client_expiration`).
    public var sessionExpiry: TimeAmount

    /// What an MQTT 5 client's Session Expiry Interval (seconds; 0xFFFFFFFF: never) comes to:
    /// capped by `sessionExpiry` unless that is 0 (no limit), `Session.neverExpires` for never.
    func sessionExpiry(for interval: UInt32) -> TimeAmount {
        if interval == 0 { return .zero }
        let asked = interval == .max ? Session.neverExpires : .seconds(Int64(interval))
        return sessionExpiry == .zero ? asked : min(asked, sessionExpiry)
    }
    /// Most levels in a topic name or filter (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, will, and topics
    /// plugins produce); more is a protocol error. 200 is Mosquitto's limit.
    public var maxTopicLevels: Int
    /// Most subscriptions one client (session) may hold; 0 = no limit. Past it a SUBSCRIBE of a
    /// new filter gets return code 0x80, so that no client grows the broker's memory at will.
    public var maxSubscriptions: Int
    /// MQTT 5: most topic aliases in each direction of a connection (Mosquitto's
    /// `max_topic_alias`): the Topic Alias Maximum announced in CONNACK, and the most the broker
    /// uses towards a client that accepts them. 0 turns them off.
    public var maxTopicAlias: Int
    /// Most retained messages the broker holds, and most bytes they may hold (`RetainedLimits`:
    /// topic, payload and properties, and 288 per node of the topic tree); 0 = no limit. A
    /// retained message past either is delivered but not kept.
    public var maxRetained: Int
    public var maxRetainedBytes: Int
    var retainedLimits: RetainedLimits { RetainedLimits(maxCount: maxRetained, maxBytes: maxRetainedBytes) }

    public init(
        maxPacketSize: Int = 1 << 20, maxConnections: Int = 0, maxInflight: Int = 32, maxQueued: Int = 1000,
        maxQueuedBytes: Int = 0, maxKeepAlive: Int = 65535, connectTimeout: TimeAmount = .seconds(10),
        sessionExpiry: TimeAmount = .zero, maxTopicLevels: Int = 200, maxSubscriptions: Int = 10_000,
        maxTopicAlias: Int = 10, maxRetained: Int = 1_000_000, maxRetainedBytes: Int = 1 << 30
    ) {
        self.maxRetained = maxRetained
        self.maxRetainedBytes = maxRetainedBytes
        self.maxTopicAlias = maxTopicAlias
        self.maxSubscriptions = maxSubscriptions
        self.sessionExpiry = sessionExpiry
        self.maxTopicLevels = maxTopicLevels
        self.maxQueuedBytes = maxQueuedBytes
        self.maxPacketSize = maxPacketSize
        self.maxConnections = maxConnections
        self.maxInflight = maxInflight
        self.maxQueued = maxQueued
        self.maxKeepAlive = maxKeepAlive
        self.connectTimeout = connectTimeout
    }
}

/// A value from the config file handed to a plugin as `mqlite.options`.
public indirect enum ConfigValue: Sendable, Equatable {
    case string(String)
    case int(Int)
    case double(Double)
    case bool(Bool)
    case array([ConfigValue])
    case table([String: ConfigValue])
}

/// One `[[plugin]]`: a Lua script and its options.
public struct PluginConfiguration: Sendable, Equatable {
    /// Path of the script (relative paths in the file are resolved against the file's folder).
    public var script: String
    public var options: [String: ConfigValue]

    public init(script: String, options: [String: ConfigValue] = [:]) {
        self.script = script
        self.options = options
    }
}

/// `[scripting]`: how hook calls are bounded and what a failure means.
public struct ScriptingConfiguration: Sendable, Equatable {
    public enum OnError: String, Sendable, CaseIterable {
        /// A failed auth or ACL call refuses (fail closed).
        case deny
        /// A failed auth or ACL call is treated as no opinion.
        case allow
    }

    /// Lua VM instructions one hook call may run before it fails.
    public var instructionLimit: Int
    /// Seconds one hook call may take (wall clock, time in C functions included) before it fails.
    /// A call that waits (an HTTP request) counts only its running time, per part; the request has
    /// its own timeout.
    public var timeLimit: Double
    /// Bytes each Lua state (one per worker) may allocate; past it the allocation, and the call, fails.
    public var memoryLimit: Int
    public var onError: OnError
    /// Bytes `mqlite.kv` may hold (keys, values and a fixed overhead per entry), shared by every
    /// worker; past it `kv.set` and `kv.incr` of a new key fail.
    public var kvMaxBytes: Int
    /// Hook calls that may wait at once on each worker (`mqlite.http.request`); past it, a new
    /// request fails at once.
    public var maxPendingCalls: Int
    /// HTTP connections each worker opens to one host (scheme, host, port) at most
    /// (`mqlite.http.request`); requests beyond them wait for one to be free, in order.
    public var httpConnections: Int

    public init(instructionLimit: Int = 1_000_000, timeLimit: Double = 0.1, memoryLimit: Int = 64 << 20, onError: OnError = .deny,
                kvMaxBytes: Int = 64 << 20, maxPendingCalls: Int = 1000, httpConnections: Int = 100) {
        self.maxPendingCalls = maxPendingCalls
        self.httpConnections = httpConnections
        self.instructionLimit = instructionLimit
        self.timeLimit = timeLimit
        self.memoryLimit = memoryLimit
        self.onError = onError
        self.kvMaxBytes = kvMaxBytes
    }
}

/// One `[[bridge]]`: a link to another broker, as its MQTT client (docs/CONFIG.md#bridge).
public struct BridgeConfiguration: Sendable {
    public enum Direction: String, CaseIterable, Sendable {
        case out, `in`, both
        var goesOut: Bool { self != .in }
        var comesIn: Bool { self != .out }
    }

    /// One `[[bridge.topic]]`: what crosses, which way, at what QoS, with which prefixes.
    public struct Topic: Sendable {
        public var pattern: String
        public var direction: Direction
        public var qos: QoS
        public var localPrefix: String
        public var remotePrefix: String

        public init(pattern: String, direction: Direction, qos: QoS = .atMostOnce, localPrefix: String = "", remotePrefix: String = "") {
            self.pattern = pattern
            self.direction = direction
            self.qos = qos
            self.localPrefix = localPrefix
            self.remotePrefix = remotePrefix
        }

        /// The filter subscribed to locally (out), or on the remote (in).
        public var localFilter: String { localPrefix + pattern }
        public var remoteFilter: String { remotePrefix + pattern }
    }

    public var name: String
    public var address: ListenAddress
    public var clientID: String
    public var username: String?
    public var password: String?
    /// False: a persistent session on the remote (QoS 1/2 survive link loss there too).
    public var cleanSession = false
    public var keepAlive: UInt16 = 60
    /// 4 (3.1.1) or 5.
    public var protocolVersion: ProtocolVersion = .v3_1_1
    /// TLS to the remote when set: the CAs to trust, and a client certificate.
    public var cafile: String?
    public var certfile: String?
    public var keyfile: String?
    /// QoS 1/2 messages the bridge has unacknowledged on the remote at once (a link carries many
    /// clients' messages: more than one client's `max_inflight`). An MQTT 5 remote's Receive
    /// Maximum lowers it.
    public var maxInflight = 100
    /// Messages the bridge's local session may queue (while the link is down, or behind a slow
    /// remote), in place of `[limits] max_queued`: one link carries every client's messages.
    public var maxQueued = 100_000
    /// And the topic and payload bytes they may hold (0: no limit), in place of `[limits]
    /// max_queued_bytes`: 100,000 messages of up to `max_packet_size` would be far more.
    public var maxQueuedBytes = 256 << 20
    public var reconnectMin = TimeAmount.seconds(1)
    public var reconnectMax = TimeAmount.seconds(60)
    public var topics: [Topic] = []

    public init(name: String, address: ListenAddress, clientID: String? = nil, topics: [Topic] = []) {
        self.name = name
        self.address = address
        self.clientID = clientID ?? Self.defaultClientID(name: name)
        self.topics = topics
    }

    /// `mqlite-<hostname>-<name>`, as the issue says Mosquitto-like bridges name themselves.
    public static func defaultClientID(name: String) -> String {
        "mqlite-\(ProcessInfo.processInfo.hostName)-\(name)"
    }

    /// The client id its local session is known by (`$bridge/NAME`): ACLs and hooks see it; no
    /// client may connect with an id in `$bridge/`.
    public var localClientID: String { "$bridge/\(name)" }
}
