import MQTTCore

/// MQTT 5: the Subscription Identifiers of one session's subscriptions (§3.8.2.1.2), and which of
/// them a copy of a message carries (§3.3.4): one sent through a shared subscription carries that
/// subscription's; any other, those of every plain subscription of the session that matches its
/// topic, each once (but for the subscriber's own messages those of its No Local subscriptions,
/// which do not forward them). Plain ones are matched once per topic: the answers are cached (at most
/// `cacheLimit` identifiers and topic bytes' worth, emptied when a subscription changes), so a
/// client with thousands of matching subscriptions costs one lookup per message, not a walk.
final class SubscriptionIdentifiers {
    private let plain = TopicTrie<[TopicFilter: UInt32]>()
    private var shared: [SharedFilter: UInt32] = [:]
    /// Plain filters with an identifier and No Local.
    private var noLocal: Set<TopicFilter> = []
    /// Answers by topic, and whether for the subscriber's own messages (`local`).
    private var cache: [CacheKey: [UInt32]] = [:]
    private var cacheCost = 0
    static let cacheLimit = 256 * 1024

    var isEmpty: Bool { plain.count == 0 && shared.isEmpty }

    /// The subscription `filter` has `identifier` (nil: none) from now on.
    func set(_ identifier: UInt32?, for filter: TopicFilter, noLocal isNoLocal: Bool = false) {
        cache.removeAll()
        cacheCost = 0
        if SharedFilter.isShared(filter), let parsed = try? SharedFilter.parse(filter) {
            shared[parsed] = identifier
            return
        }
        if let identifier {
            plain.insert(filter: filter.string, key: filter, value: identifier)
        } else {
            plain.remove(filter: filter.string, key: filter)
        }
        if identifier != nil && isNoLocal { noLocal.insert(filter) } else { noLocal.remove(filter) }
    }

    /// The identifiers a copy of a message on `topic` carries, sorted: through `group`'s shared
    /// subscription, or through the plain ones (`local`: the subscriber's own message, not
    /// through its No Local ones).
    func identifiers(for topic: TopicName, group: SharedGroup?, local: Bool = false) -> [UInt32] {
        if let group { return shared[group.shared].map { [$0] } ?? [] }
        // (Without No Local subscriptions the subscriber's own messages get what others' get.)
        let local = local && !noLocal.isEmpty
        if let cached = cache[CacheKey(topic: topic, local: local)] { return cached }
        var found: [UInt32] = []
        plain.forEachMatch(topic: topic.string) { (filter: TopicFilter, identifier: UInt32) in
            if !local || !noLocal.contains(filter) { found.append(identifier) }
        }
        let unique = Self.sortedOnce(found)
        let cost = topic.count + 4 * unique.count + 64
        if cacheCost + cost > Self.cacheLimit {
            cache.removeAll()
            cacheCost = 0
        }
        if cost <= Self.cacheLimit {
            cache[CacheKey(topic: topic.copied(), local: local)] = unique
            cacheCost += cost
        }
        return unique
    }

    private struct CacheKey: Hashable {
        let topic: TopicName
        let local: Bool
    }

    private static func sortedOnce(_ identifiers: [UInt32]) -> [UInt32] {
        var sorted = identifiers
        sorted.sort()
        guard sorted.count > 1 else { return sorted }
        var unique: [UInt32] = []
        unique.reserveCapacity(sorted.count)
        for identifier in sorted where unique.last != identifier { unique.append(identifier) }
        return unique
    }
}
