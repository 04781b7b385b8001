import MQTTCore

/// The filters a client named that an `on_subscribe` hook rewrote, so that UNSUBSCRIBE of the
/// name the client used removes what it was subscribed as (issue: a rewritten subscription
/// could not be unsubscribed, and leaked).
///
/// Only rewrites are kept: a filter subscribed as named has no entry, unless a rewrite also maps
/// to it (then it gets an entry to itself, so that it outlives that rewrite's UNSUBSCRIBE). A
/// subscribed filter is removed when the last name mapping to it goes. One entry per name the
/// client used; the broker refuses new names past `max_subscriptions`. Owner-loop state of a
/// `Session`.
struct SubscriptionNames {
    /// Name the client used → the filter subscribed.
    private var subscribed: [TopicFilter: TopicFilter] = [:]
    /// Filter subscribed → how many names map to it.
    private var references: [TopicFilter: Int] = [:]

    init() {}

    /// The names as `pairs` listed them (a store kept them across a restart).
    init(pairs: [(name: TopicFilter, filter: TopicFilter)]) {
        for (name, filter) in pairs { add(name, filter) }
    }

    /// Each name and the filter it is subscribed as (for a store).
    var pairs: [(name: TopicFilter, filter: TopicFilter)] { subscribed.map { ($0.key, $0.value) } }

    var isEmpty: Bool { subscribed.isEmpty }
    var count: Int { subscribed.count }

    /// The filter the client's `name` is subscribed as (itself when no hook rewrote it).
    func filter(named name: TopicFilter) -> TopicFilter {
        subscribed[name] ?? name
    }

    /// A SUBSCRIBE of `name` was granted as `filter` (equal when not rewritten); `isSubscribed`
    /// tells whether the session holds a filter now. Returns a filter to unsubscribe: the one
    /// `name` stood for before, when that changed and no other name maps to it.
    mutating func subscribed(name: TopicFilter, as filter: TopicFilter, isSubscribed: (TopicFilter) -> Bool) -> TopicFilter? {
        let previous = subscribed[name]
        if previous == filter { return nil }
        // Subscribed as itself until now (no entry, and not only the target of rewrites).
        let wasItself = previous == nil && references[name] == nil && isSubscribed(name)
        if name == filter {
            // Now subscribed as named: an entry only while rewrites share the filter.
            if references[filter] != nil { add(name, filter) } else { subscribed[name] = nil }
        } else {
            // A filter subscribed as named that a rewrite now shares gets an entry to itself.
            if references[filter] == nil, isSubscribed(filter) { add(filter, filter) }
            add(name, filter)
        }
        if let previous { return release(previous) }
        return wasItself && name != filter ? name : nil
    }

    /// The client unsubscribes `name`: the filter to unsubscribe, nil when other names still
    /// map to it (or the client never subscribed `name`, only a rewrite to it).
    mutating func unsubscribed(name: TopicFilter) -> TopicFilter? {
        if let filter = subscribed.removeValue(forKey: name) { return release(filter) }
        return references[name] == nil ? name : nil
    }

    /// `filter` is no longer subscribed (the ACL no longer allows it): every name for it goes.
    mutating func removeAll(subscribedAs filter: TopicFilter) {
        guard references.removeValue(forKey: filter) != nil else { return }
        subscribed = subscribed.filter { $0.value != filter }
    }

    private mutating func add(_ name: TopicFilter, _ filter: TopicFilter) {
        subscribed[name] = filter
        references[filter, default: 0] += 1
    }

    /// One name less for `filter`: returns it when none is left.
    private mutating func release(_ filter: TopicFilter) -> TopicFilter? {
        guard let count = references[filter] else { return filter }
        if count > 1 {
            references[filter] = count - 1
            return nil
        }
        references[filter] = nil
        return filter
    }
}
