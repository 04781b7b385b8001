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
    private struct Compiled: Sendable {
        var publish: [String]?
        var subscribe: [String]?
        var deny: [String]
    }

    private let tables: [Compiled]

    /// Substitutes `%c` and `%u` once. A pattern whose substitution is impossible (no user name,
    /// or an id holding `/`, `+` or `#`) is left out: it matches nothing.
    public init(_ tables: [ACLTable], clientID: String, username: String?) {
        func substitute(_ patterns: [String]) -> [String] {
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
                let result = levels.joined(separator: "/")
                return (try? Topic.validateFilter(result)) == nil ? nil : result
            }
        }
        self.tables = tables.map {
            Compiled(publish: $0.publish.map(substitute), subscribe: $0.subscribe.map(substitute), deny: substitute($0.deny))
        }
    }

    /// Whether the client may publish to `topic`.
    public func allowsPublish(topic: String) -> Bool {
        for table in tables {
            if table.deny.contains(where: { Topic.matches(filter: $0, topic: topic) }) { return false }
            if let allowed = table.publish, !allowed.contains(where: { Topic.matches(filter: $0, topic: topic) }) {
                return false
            }
        }
        return true
    }

    /// Whether the client may subscribe to `filter`: it must lie within an allowed pattern, and
    /// not wholly within a denied one (denied topics under a wider filter are held back on
    /// delivery, see `allowsReceive`).
    public func allowsSubscribe(filter: String) -> Bool {
        for table in tables {
            if table.deny.contains(where: { ClientACL.covers($0, filter) }) { return false }
            if let allowed = table.subscribe, !allowed.contains(where: { ClientACL.covers($0, filter) }) {
                return false
            }
        }
        return true
    }

    /// Whether any table limits what the client may receive (only then do deliveries need checking).
    public var restrictsReceiving: Bool { tables.contains { !$0.deny.isEmpty || $0.subscribe != nil } }

    /// Whether a message on `topic` may be delivered to the client: every table that lists what
    /// it may subscribe to has a pattern matching the topic, and no deny pattern matches it.
    /// Checked on every delivery (as Mosquitto checks read access), not only at SUBSCRIBE: a
    /// persistent session's subscriptions outlive the connection, and the next client to take
    /// the session over may have other rights.
    public func allowsReceive(topic: String) -> Bool {
        for table in tables {
            if table.deny.contains(where: { Topic.matches(filter: $0, topic: topic) }) { return false }
            if let allowed = table.subscribe, !allowed.contains(where: { Topic.matches(filter: $0, topic: topic) }) { return false }
        }
        return true
    }

    /// Whether every topic that `filter` matches is matched by `pattern`. As in matching, a
    /// pattern starting with a wildcard says nothing about `$` topics (§4.7.2).
    static func covers(_ pattern: String, _ filter: String) -> Bool {
        let p = Topic.levels(pattern)
        let f = Topic.levels(filter)
        // Levels compared byte for byte (Substring == is Unicode canonical equivalence).
        func same(_ a: Substring, _ b: Substring) -> Bool { a.hasSameUTF8(as: b) }
        if filter.utf8.first == UInt8(ascii: "$"), let first = p.first, same(first, "+") || same(first, "#") { return false }
        for (i, level) in p.enumerated() {
            if same(level, "#") { return true }
            guard i < f.count else { return false }
            if same(f[i], "#") { return false }
            if same(level, "+") { continue }
            if same(f[i], "+") || !same(f[i], level) { return false }
        }
        return p.count == f.count
    }
}
