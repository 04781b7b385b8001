import Foundation
import MQTTCore
import NIOCore

// `$SYS/broker/...` as Mosquitto publishes them: retained, every `[server] sys_interval` seconds,
// through the broker's own publish path (routing, retained store) on worker 0's loop. The $-rule
// (MQTT-4.7.2-1) keeps them from `#` and `+/...` subscribers: the trie and the retained tree do
// not match topics starting with `$` against a leading wildcard.

/// The load averages and the values of the previous round. Made before the loop runs it, then
/// touched only on worker 0's loop (hence `@unchecked Sendable`).
final class SysPublisher: @unchecked Sendable {
    private var last: (at: NIODeadline, received: Int, sent: Int, bytesReceived: Int, bytesSent: Int)?
    /// Per minute, averaged over 1, 5 and 15 minutes: messages received, sent, bytes received, sent.
    private var loads = [[Double]](repeating: [0, 0, 0], count: 4)
    private static let windows: [(name: String, seconds: Double)] = [("1min", 60), ("5min", 300), ("15min", 900)]

    /// The topics and their payloads for `stats`, updating the load averages (Mosquitto's formula:
    /// an exponentially weighted moving average of the rate per minute).
    func topics(for stats: BrokerStats, now: NIODeadline = .now()) -> [(String, String)] {
        let received = stats.messagesReceived.total
        let sent = stats.messagesSent.total
        let bytesReceived = stats.bytesReceived.total
        let bytesSent = stats.bytesSent.total
        if let last {
            let interval = max(Double((now - last.at).nanoseconds) / 1e9, 0.001)
            let rates = [received - last.received, sent - last.sent, bytesReceived - last.bytesReceived, bytesSent - last.bytesSent]
                .map { Double($0) / interval * 60 }
            for (i, rate) in rates.enumerated() {
                for (w, window) in Self.windows.enumerated() {
                    let exponent = exp(-interval / window.seconds)
                    loads[i][w] = rate + exponent * (loads[i][w] - rate)
                }
            }
        }
        last = (now, received, sent, bytesReceived, bytesSent)
        var topics: [(String, String)] = [
            ("version", Broker.version),
            ("uptime", "\(stats.uptimeSeconds) seconds"),
            ("clients/connected", "\(stats.sessionsOnline)"),
            ("clients/active", "\(stats.sessionsOnline)"),
            ("clients/disconnected", "\(stats.sessionsOffline)"),
            ("clients/total", "\(stats.sessionsTotal)"),
            ("clients/maximum", "\(stats.maximumConnections)"),
            ("messages/received", "\(received)"),
            ("messages/sent", "\(sent)"),
            ("publish/messages/received", "\(received)"),
            ("publish/messages/sent", "\(sent)"),
            ("publish/messages/dropped", "\(stats.droppedQueueFull + stats.droppedACL + stats.droppedHook + stats.droppedTopic + stats.droppedTooLarge)"),
            ("messages/inflight", "\(stats.inflight)"),
            ("store/messages/count", "\(stats.queued + stats.inflight)"),
            ("subscriptions/count", "\(stats.subscriptions)"),
            ("retained messages/count", "\(stats.retained)"),
            ("bytes/received", "\(bytesReceived)"),
            ("bytes/sent", "\(bytesSent)"),
        ]
        for bridge in stats.bridges {
            topics.append(("bridges/\(bridge.name)/state", bridge.connected ? "connected" : "disconnected"))
            topics.append(("bridges/\(bridge.name)/messages/sent", "\(bridge.messagesOut)"))
            topics.append(("bridges/\(bridge.name)/messages/received", "\(bridge.messagesIn)"))
            topics.append(("bridges/\(bridge.name)/queued", "\(bridge.queued)"))
        }
        let names = ["messages/received", "messages/sent", "bytes/received", "bytes/sent"]
        for (i, name) in names.enumerated() {
            for (w, window) in Self.windows.enumerated() {
                topics.append(("load/\(name)/\(window.name)", String(format: "%.2f", loads[i][w])))
            }
        }
        return topics.map { ("$SYS/broker/" + $0.0, $0.1) }
    }
}

extension Broker {
    /// Starts publishing `$SYS` every `sys_interval` seconds on worker 0's loop (the first round at
    /// once). Cancelled by `shutdown()`.
    func startSysPublisher() {
        let interval = configuration.sysInterval
        guard interval > 0, let worker = workers.first else { return }
        let publisher = SysPublisher()
        let task = worker.loop.scheduleRepeatedTask(initialDelay: .zero, delay: .seconds(Int64(interval))) { [self] _ in
            collectStats(on: worker.loop).whenSuccess { stats in
                guard self.isAccepting else { return }
                worker.assertOnLoop()
                for (topic, value) in publisher.topics(for: stats) {
                    worker.publish(Message(topic: TopicName(alreadyValidated: ByteBuffer(string: topic)), payload: ByteBuffer(string: value), qos: .atMostOnce, retain: true))
                }
            }
        }
        sysTask.withLock { $0 = task }
    }
}
