import CoreMetrics
import Foundation
import MQTTCore
import NIOCore
import Prometheus
import Synchronization

// Metrics (docs/METRICS.md). The hot path only adds to plain integers that belong to one worker
// and are touched on its loop alone (`WorkerStats`): no atomics, no locks, no metrics library.
// A scrape (or the `$SYS` timer) asks every worker, on its loop, for a copy of its counters and
// sums them (`Broker.collectStats`); only then are the sums handed to swift-metrics, whose backend
// here is swift-prometheus over a registry the broker owns (so that many brokers can live in one
// process, as in the tests).

// MARK: - Per-worker counters

/// Counts per QoS level.
public struct PerQoS: Sendable, Equatable {
    public var qos0 = 0
    public var qos1 = 0
    public var qos2 = 0

    @inline(__always)
    mutating func add(_ qos: QoS, _ n: Int = 1) {
        switch qos {
        case .atMostOnce: qos0 &+= n
        case .atLeastOnce: qos1 &+= n
        case .exactlyOnce: qos2 &+= n
        }
    }

    public var total: Int { qos0 + qos1 + qos2 }

    subscript(level: Int) -> Int { level == 0 ? qos0 : level == 1 ? qos1 : qos2 }

    static func + (a: PerQoS, b: PerQoS) -> PerQoS {
        PerQoS(qos0: a.qos0 + b.qos0, qos1: a.qos1 + b.qos1, qos2: a.qos2 + b.qos2)
    }
}

/// What one worker counted since start. Touched only on the worker's loop.
struct WorkerStats {
    /// PUBLISH packets received from clients, and their payload bytes.
    var messagesReceived = PerQoS()
    var bytesReceived = PerQoS()
    /// PUBLISH packets written to clients (at the QoS they went out at), and their payload bytes.
    var messagesSent = PerQoS()
    var bytesSent = PerQoS()
    /// Messages of clients dropped by the publish ACL, and by a publish hook (its answer, or its failure).
    var droppedACL = 0
    var droppedHook = 0
    /// Messages from a bridge's remote whose local topic is not one (over `max_topic_levels`, or
    /// past a topic's length once a prefix is added).
    var droppedTopic = 0
    /// Connections accepted and open, by listener index.
    var connectionsTotal: [Int]
    var connectionsOpen: [Int]
    /// Connections closed over max_connections, and CONNECTs refused by CONNACK return code (1 to 5).
    var refusedMaxConnections = 0
    var refusedByCode = [Int](repeating: 0, count: 6)

    init(listeners: Int) {
        connectionsTotal = Array(repeating: 0, count: listeners)
        connectionsOpen = Array(repeating: 0, count: listeners)
    }
}

/// One script's hook of one kind, as the hooks count it (`BrokerHooks.hookCallStats`).
public struct HookCallStats: Sendable, Equatable {
    /// The script's file name.
    public var script: String
    /// `on_connect`, `on_publish`, ...
    public var hook: String
    public var calls: Int
    /// Failed calls by kind (`error`, `instruction_limit`, `time_limit`, `memory_limit`, `bad_return`).
    public var failures: [String: Int]

    public init(script: String, hook: String, calls: Int, failures: [String: Int]) {
        self.script = script
        self.hook = hook
        self.calls = calls
        self.failures = failures
    }
}

// MARK: - Snapshot

/// The broker's counters summed over the workers, at one moment (each worker's part is read on its
/// loop, so the parts are consistent each; the sum is a few microseconds wide).
/// One bridge's state and counts since start.
public struct BridgeStats: Sendable {
    public var name: String
    public var connected: Bool
    public var messagesOut: Int
    public var messagesIn: Int
    public var bytesOut: Int
    public var bytesIn: Int
    /// Messages waiting in its local session's queue.
    public var queued: Int
    /// Connection attempts after the first.
    public var reconnects: Int
}

public struct BrokerStats: Sendable {
    public var messagesReceived = PerQoS()
    public var bytesReceived = PerQoS()
    public var messagesSent = PerQoS()
    public var bytesSent = PerQoS()
    public var droppedQueueFull = 0
    public var droppedACL = 0
    public var droppedHook = 0
    public var droppedTopic = 0
    /// Messages not sent for being over the receiver's Maximum Packet Size.
    public var droppedTooLarge = 0
    /// By listener index.
    public var connectionsTotal: [Int] = []
    public var connectionsOpen: [Int] = []
    public var refusedMaxConnections = 0
    /// By CONNACK return code (index 1 to 5).
    public var refusedByCode = [Int](repeating: 0, count: 6)
    /// Sessions with a connection attached, and the others (persistent sessions offline).
    public var sessionsOnline = 0
    public var sessionsTotal = 0
    public var sessionsOffline: Int { max(0, sessionsTotal - sessionsOnline) }
    public var subscriptions = 0
    public var retained = 0
    /// What the retained messages hold as `max_retained_bytes` counts it, and those not kept.
    public var retainedBytes = 0
    public var retainedRefused = 0
    public var inflight = 0
    public var queued = 0
    /// Most connections open at once since start.
    public var maximumConnections = 0
    public var uptimeSeconds = 0
    /// `[[bridge]]`s, in config order.
    public var bridges: [BridgeStats] = []
    /// `[persistence]`: commits that wrote something, and commits that failed (nil: no store).
    public var storeCommits: (done: Int, failed: Int)?
    /// Summed over workers: one entry per script and hook.
    public var hooks: [HookCallStats] = []

    fileprivate mutating func add(_ w: WorkerPart) {
        let s = w.stats
        messagesReceived = messagesReceived + s.messagesReceived
        bytesReceived = bytesReceived + s.bytesReceived
        messagesSent = messagesSent + s.messagesSent
        bytesSent = bytesSent + s.bytesSent
        droppedACL += s.droppedACL
        droppedHook += s.droppedHook
        droppedTopic += s.droppedTopic
        if connectionsTotal.count < s.connectionsTotal.count {
            connectionsTotal += Array(repeating: 0, count: s.connectionsTotal.count - connectionsTotal.count)
            connectionsOpen += Array(repeating: 0, count: s.connectionsOpen.count - connectionsOpen.count)
        }
        for i in s.connectionsTotal.indices {
            connectionsTotal[i] += s.connectionsTotal[i]
            connectionsOpen[i] += s.connectionsOpen[i]
        }
        refusedMaxConnections += s.refusedMaxConnections
        for i in refusedByCode.indices { refusedByCode[i] += s.refusedByCode[i] }
        sessionsOnline += w.online
        inflight += w.inflight
        queued += w.queued
        for hook in w.hooks {
            if let i = hooks.firstIndex(where: { $0.script == hook.script && $0.hook == hook.hook }) {
                hooks[i].calls += hook.calls
                hooks[i].failures.merge(hook.failures, uniquingKeysWith: +)
            } else {
                hooks.append(hook)
            }
        }
    }
}

/// One worker's contribution, made on its loop.
private struct WorkerPart: Sendable {
    var stats: WorkerStats
    var online = 0
    var inflight = 0
    var queued = 0
    var hooks: [HookCallStats] = []
}


extension Worker {
    /// A copy of this worker's counters and what its sessions hold now. On the loop.
    fileprivate func statsPart() -> WorkerPart {
        assertOnLoop()
        var part = WorkerPart(stats: stats)
        for link in broker.bridges where link.worker === self { link.refreshQueued() }
        for connection in connections {
            guard let held = connection.handler.sessionLoad() else { continue }
            part.online += 1
            part.inflight += held.inflight
            part.queued += held.queued
        }
        for session in offlineSessions.values {
            part.inflight += session.inflight.count
            part.queued += session.queue.count
        }
        for (id, session) in lastingSessions {
            // (One that moved to another worker, came back online or ended is no longer here.)
            guard session.owner == index, !session.isOnline, !session.ended else {
                lastingSessions[id] = nil
                continue
            }
            part.inflight += session.inflight.count
            part.queued += session.queue.count
        }
        part.hooks = broker.hooks.hookCallStats(worker: index)
        return part
    }
}

extension Broker {
    /// Every worker's counters, read on its loop and summed; the future completes on `loop`.
    /// Empty once the broker has stopped.
    public func collectStats(on loop: any EventLoop) -> EventLoopFuture<BrokerStats> {
        let parts = workers.map { worker in worker.loop.submit { worker.statsPart() } }
        var base = BrokerStats()
        base.droppedQueueFull = sessionContext.droppedMessages.load(ordering: .relaxed)
        base.droppedTooLarge = sessionContext.droppedTooLarge.load(ordering: .relaxed)
        base.sessionsTotal = registry.count
        base.subscriptions = subscriptionCount.load(ordering: .relaxed)
        base.retained = retainedCount
        base.retainedBytes = retained.heldBytes
        base.retainedRefused = retainedRefused.load(ordering: .relaxed)
        base.maximumConnections = maximumConnections.load(ordering: .relaxed)
        base.uptimeSeconds = Int((NIODeadline.now() - startTime).nanoseconds / 1_000_000_000)
        if let store { base.storeCommits = (store.commits, store.failedCommits) }
        base.connectionsTotal = Array(repeating: 0, count: configuration.listeners.count)
        base.connectionsOpen = base.connectionsTotal
        return EventLoopFuture.reduce(base, parts, on: loop) { sum, part in
            var sum = sum
            sum.add(part)
            return sum
        }.map { [self] stats in
            // (After the parts: each worker refreshed its bridges' queue depth.)
            var stats = stats
            stats.bridges = bridges.map { link in
                let c = link.counters
                return BridgeStats(
                    name: link.configuration.name, connected: c.connected.load(ordering: .relaxed),
                    messagesOut: c.messagesOut.load(ordering: .relaxed), messagesIn: c.messagesIn.load(ordering: .relaxed),
                    bytesOut: c.bytesOut.load(ordering: .relaxed), bytesIn: c.bytesIn.load(ordering: .relaxed),
                    queued: c.queued.load(ordering: .relaxed), reconnects: c.reconnects.load(ordering: .relaxed))
            }
            return stats
        }
    }

    /// Raises `maximumConnections` to `open` if that is more (a connection was just opened).
    func noteOpenConnections(_ open: Int) {
        var seen = maximumConnections.load(ordering: .relaxed)
        while open > seen {
            let (exchanged, original) = maximumConnections.compareExchange(expected: seen, desired: open, ordering: .relaxed)
            if exchanged { return }
            seen = original
        }
    }
}

// MARK: - Export

/// The broker's metrics as swift-metrics values over a Prometheus registry of its own. `update`
/// sets them from a `BrokerStats`; `render` is the Prometheus text format.
public final class BrokerMetrics: Sendable {
    /// The registry /metrics renders.
    public let registry: PrometheusCollectorRegistry
    /// swift-metrics' factory over `registry`: what the broker and the hooks create metrics with.
    /// The executable may also bootstrap `MetricsSystem` with it.
    public let factory: PrometheusMetricsFactory
    /// Label of the Lua hooks' duration timer (a histogram in Prometheus).
    public static let hookDurationLabel = "mqlite_lua_hook_duration_seconds"

    /// Counters already reported, by name and labels: swift-metrics counters only go up, so each
    /// update adds what the sums grew by. Also serialises updates (and renders).
    private let reported = Mutex<[String: Int]>([:])

    init() {
        registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        // Lua hook calls take microseconds: finer buckets than the default (which start at 5 ms).
        factory.durationHistogramBuckets[Self.hookDurationLabel] = [
            .microseconds(10), .microseconds(50), .microseconds(100), .microseconds(500), .milliseconds(1), .milliseconds(5),
            .milliseconds(10), .milliseconds(50), .milliseconds(100), .milliseconds(500), .seconds(1),
        ]
        self.factory = factory
    }

    private static let connackReasons = [
        1: "unacceptable_protocol_version", 2: "identifier_rejected", 3: "server_unavailable", 4: "bad_username_password",
        5: "not_authorized",
    ]

    /// Sets every metric from `stats`.
    func update(_ stats: BrokerStats, listeners: [ListenerConfiguration]) {
        reported.withLock { reported in
            func counter(_ name: String, _ labels: [(String, String)], _ value: Int) {
                let key = name + "|" + labels.map { "\($0.0)=\($0.1)" }.joined(separator: ",")
                let delta = value - (reported[key] ?? 0)
                // Always made, so that a counter still at 0 is exported too.
                let c = CoreMetrics.Counter(label: name, dimensions: labels, factory: factory)
                if delta > 0 { c.increment(by: delta) }
                reported[key] = max(value, reported[key] ?? 0)
            }
            func gauge(_ name: String, _ labels: [(String, String)], _ value: Int) {
                CoreMetrics.Gauge(label: name, dimensions: labels, factory: factory).record(value)
            }
            for (i, listener) in listeners.enumerated() where listener.kind != .http && i < stats.connectionsTotal.count {
                let labels = [("listener", listener.bind)]
                gauge("mqlite_connections", labels, stats.connectionsOpen[i])
                counter("mqlite_connections_total", labels, stats.connectionsTotal[i])
            }
            counter("mqlite_connects_refused_total", [("reason", "max_connections")], stats.refusedMaxConnections)
            for (code, reason) in Self.connackReasons.sorted(by: { $0.key < $1.key }) {
                counter("mqlite_connects_refused_total", [("reason", reason)], stats.refusedByCode[code])
            }
            for level in 0...2 {
                let labels = [("qos", "\(level)")]
                counter("mqlite_messages_received_total", labels, stats.messagesReceived[level])
                counter("mqlite_messages_sent_total", labels, stats.messagesSent[level])
                counter("mqlite_bytes_received_total", labels, stats.bytesReceived[level])
                counter("mqlite_bytes_sent_total", labels, stats.bytesSent[level])
            }
            counter("mqlite_messages_dropped_total", [("reason", "queue_full")], stats.droppedQueueFull)
            counter("mqlite_messages_dropped_total", [("reason", "acl")], stats.droppedACL)
            counter("mqlite_messages_dropped_total", [("reason", "hook")], stats.droppedHook)
            counter("mqlite_messages_dropped_total", [("reason", "topic")], stats.droppedTopic)
            counter("mqlite_messages_dropped_total", [("reason", "too_large")], stats.droppedTooLarge)
            gauge("mqlite_retained_messages", [], stats.retained)
            gauge("mqlite_retained_bytes", [], stats.retainedBytes)
            counter("mqlite_retained_refused_total", [], stats.retainedRefused)
            gauge("mqlite_sessions", [("state", "online")], stats.sessionsOnline)
            gauge("mqlite_sessions", [("state", "offline")], stats.sessionsOffline)
            gauge("mqlite_subscriptions", [], stats.subscriptions)
            gauge("mqlite_inflight_messages", [], stats.inflight)
            gauge("mqlite_queued_messages", [], stats.queued)
            gauge("mqlite_uptime_seconds", [], stats.uptimeSeconds)
            for bridge in stats.bridges {
                let name = ("bridge", bridge.name)
                gauge("mqlite_bridge_connected", [name], bridge.connected ? 1 : 0)
                counter("mqlite_bridge_messages_total", [name, ("direction", "out")], bridge.messagesOut)
                counter("mqlite_bridge_messages_total", [name, ("direction", "in")], bridge.messagesIn)
                counter("mqlite_bridge_bytes_total", [name, ("direction", "out")], bridge.bytesOut)
                counter("mqlite_bridge_bytes_total", [name, ("direction", "in")], bridge.bytesIn)
                gauge("mqlite_bridge_queued_messages", [name], bridge.queued)
                counter("mqlite_bridge_reconnects_total", [name], bridge.reconnects)
            }
            if let commits = stats.storeCommits {
                counter("mqlite_store_commits_total", [("result", "ok")], commits.done)
                counter("mqlite_store_commits_total", [("result", "failed")], commits.failed)
            }
            for hook in stats.hooks {
                let labels = [("script", hook.script), ("hook", hook.hook)]
                counter("mqlite_lua_hook_calls_total", labels, hook.calls)
                for kind in ["error", "instruction_limit", "time_limit", "memory_limit", "bad_return"] {
                    counter("mqlite_lua_hook_failures_total", labels + [("kind", kind)], hook.failures[kind] ?? 0)
                }
            }
        }
    }

    /// The Prometheus text format (version 0.0.4) of every metric.
    public func render() -> String {
        reported.withLock { _ in registry.emitToString() }
    }
}
