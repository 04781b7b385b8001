import MQTTCore

/// One source's access rules for a client (one script's `on_authorize` answer). Patterns may use
/// `%c` (client id) and `%u` (user name) as whole topic levels.
public struct ACLTable: Sendable, Equatable {
    /// Topics the client may publish to; nil = this table says nothing about publishing.
    public var publish: [String]?
    /// Filters the client may subscribe to (a filter must lie within one of them); nil = nothing said.
    public var subscribe: [String]?
    /// Denied for both publish and subscribe, whatever the allow lists say.
    public var deny: [String]

    public init(publish: [String]? = nil, subscribe: [String]? = nil, deny: [String] = []) {
        self.publish = publish
        self.subscribe = subscribe
        self.deny = deny
    }

    /// A table that allows nothing: what a failed authorisation call means when failing closed.
    public static let denyAll = ACLTable(publish: [], subscribe: [])
}

/// The access rules a client holds for the life of its connection, enforced in Swift on every
/// PUBLISH and SUBSCRIBE: an action must be allowed by every table that lists it, and denied by none.
public struct ClientACL: Sendable {
    /// One list of patterns, `%c`/`%u` substituted: in the topic trie for matching topics, and
    /// as filters for "does this pattern cover that subscription".
    struct Patterns: Sendable {
        let filters: [TopicFilter]
        /// Immutable once built (shared read-only by copies of the ACL).
        let trie: TopicTrie<Bool>

        init(_ filters: [TopicFilter]) {
            self.filters = filters
            let trie = TopicTrie<Bool>()
            for filter in filters { trie.set(filter.string, true) }
            self.trie = trie
        }

        var isEmpty: Bool { filters.isEmpty }
        func matches(_ topic: TopicName) -> Bool { !filters.isEmpty && trie.hasMatch(name: topic.string) }
        func covers(_ filter: TopicFilter) -> Bool { filters.contains { $0.covers(filter) } }
    }

    private struct Compiled: Sendable {
        var publish: Patterns?
        var subscribe: Patterns?
        var deny: Patterns
    }

    private let tables: [Compiled]

    /// Substitutes `%c` and `%u` once. A pattern whose substitution is impossible (no user name,
    /// or an id holding `/`, `+` or `#`) is left out: it matches nothing.
    public init(_ tables: [ACLTable], clientID: String, username: String?) {
        func substitute(_ patterns: [String]) -> Patterns {
            Patterns(
                patterns.compactMap { pattern in
                    var levels: [String] = []
                    for level in Topic.levels(pattern) {
                        switch level {
                        case "%c": levels.append(clientID)
                        case "%u":
                            guard let username else { return nil }
                            levels.append(username)
                        default: levels.append(String(level))
                        }
                        if level == "%c" || level == "%u" {
                            let value = levels.last!
                            if value.isEmpty || value.contains(where: { $0 == "/" || $0 == "+" || $0 == "#" }) { return nil }
                        }
                    }
                    return try? TopicFilter(levels.joined(separator: "/"))
                })
        }
        self.tables = tables.map {
            Compiled(publish: $0.publish.map(substitute), subscribe: $0.subscribe.map(substitute), deny: substitute($0.deny))
        }
    }

    /// Whether the client may publish to `topic`.
    public func allowsPublish(topic: TopicName) -> Bool {
        for table in tables {
            if table.deny.matches(topic) { return false }
            if let allowed = table.publish, !allowed.matches(topic) { return false }
        }
        return true
    }

    /// Whether the client may publish to `topic` (false for an invalid topic name).
    public func allowsPublish(topic: String) -> Bool {
        guard let name = try? TopicName(topic) else { return false }
        return allowsPublish(topic: name)
    }

    /// Whether the client may subscribe to `filter`: it must lie within an allowed pattern, and
    /// not wholly within a denied one (denied topics under a wider filter are held back on
    /// delivery, see `allowsReceive`).
    /// A shared subscription (`$share/GROUP/FILTER`) is judged by the filter inside it.
    public func allowsSubscribe(filter: TopicFilter) -> Bool {
        let filter = SharedFilter.matching(filter)
        for table in tables {
            if table.deny.covers(filter) { return false }
            if let allowed = table.subscribe, !allowed.covers(filter) { return false }
        }
        return true
    }

    /// Whether the client may subscribe to `filter` (false for an invalid filter).
    public func allowsSubscribe(filter: String) -> Bool {
        guard let filter = try? TopicFilter(filter) else { return false }
        return allowsSubscribe(filter: filter)
    }

    /// Whether any table limits what the client may receive (only then do deliveries need checking).
    public var restrictsReceiving: Bool { tables.contains { !$0.deny.isEmpty || $0.subscribe != nil } }

    /// Whether a message on `topic` may be delivered to the client: every table that lists what
    /// it may subscribe to has a pattern matching the topic, and no deny pattern matches it.
    /// Checked on every delivery (as Mosquitto checks read access), not only at SUBSCRIBE: a
    /// persistent session's subscriptions outlive the connection, and the next client to take
    /// the session over may have other rights.
    public func allowsReceive(topic: TopicName) -> Bool {
        for table in tables {
            if table.deny.matches(topic) { return false }
            if let allowed = table.subscribe, !allowed.matches(topic) { return false }
        }
        return true
    }

    /// Whether a message on `topic` may be delivered to the client (false for an invalid name).
    public func allowsReceive(topic: String) -> Bool {
        guard let name = try? TopicName(topic) else { return false }
        return allowsReceive(topic: name)
    }
}
