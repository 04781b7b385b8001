import MQTTCore

/// MQTT 5: the Subscription Identifiers of one session's subscriptions (§3.8.2.1.2), and which of
/// them a copy of a message carries (§3.3.4): one sent through a shared subscription carries that
/// subscription's; any other, those of every plain subscription of the session that matches its
/// topic, each once. Plain ones are matched once per topic: the answers are cached (at most
/// `cacheLimit` identifiers and topic bytes' worth, emptied when a subscription changes), so a
/// client with thousands of matching subscriptions costs one lookup per message, not a walk.
final class SubscriptionIdentifiers {
    private let plain = TopicTrie<[TopicFilter: UInt32]>()
    private var shared: [SharedFilter: UInt32] = [:]
    private var cache: [TopicName: [UInt32]] = [:]
    private var cacheCost = 0
    static let cacheLimit = 256 * 1024

    var isEmpty: Bool { plain.count == 0 && shared.isEmpty }

    /// The subscription `filter` has `identifier` (nil: none) from now on.
    func set(_ identifier: UInt32?, for filter: TopicFilter) {
        cache.removeAll()
        cacheCost = 0
        if SharedFilter.isShared(filter), let parsed = try? SharedFilter.parse(filter) {
            shared[parsed] = identifier
        } else if let identifier {
            plain.insert(filter: filter.string, key: filter, value: identifier)
        } else {
            plain.remove(filter: filter.string, key: filter)
        }
    }

    /// The identifiers a copy of a message on `topic` carries, sorted: through `group`'s shared
    /// subscription, or through the plain ones.
    func identifiers(for topic: TopicName, group: SharedGroup?) -> [UInt32] {
        if let group { return shared[group.shared].map { [$0] } ?? [] }
        if let cached = cache[topic] { return cached }
        var found: [UInt32] = []
        plain.forEachMatch(topic: topic.string) { (_: TopicFilter, identifier: UInt32) in found.append(identifier) }
        found.sort()
        var unique = found
        if found.count > 1 {
            unique.removeAll(keepingCapacity: true)
            for identifier in found where unique.last != identifier { unique.append(identifier) }
        }
        let cost = topic.count + 4 * unique.count + 64
        if cacheCost + cost > Self.cacheLimit {
            cache.removeAll()
            cacheCost = 0
        }
        if cost <= Self.cacheLimit {
            cache[topic.copied()] = unique
            cacheCost += cost
        }
        return unique
    }
}
