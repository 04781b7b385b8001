import MQTTCore

/// Topic-filter trie: one node per filter level, subscribers on the node where their filter ends.
/// Not thread-safe; `Broker` keeps it behind a lock and bumps a generation on every change so
/// that workers can cache lookups per topic.
struct SubscriptionTrie {
    final class Node {
        var children: [Substring: Node] = [:]
        var subscribers: [ObjectIdentifier: (session: Session, qos: QoS)] = [:]
        var isEmpty: Bool { children.isEmpty && subscribers.isEmpty }
    }

    private let root = Node()
    private(set) var count = 0

    /// Adds or updates (a second SUBSCRIBE to the same filter replaces the QoS).
    mutating func insert(filter: String, session: Session, qos: QoS) {
        var node = root
        for level in Topic.levels(filter) {
            if let next = node.children[level] {
                node = next
            } else {
                let next = Node()
                node.children[level] = next
                node = next
            }
        }
        if node.subscribers.updateValue((session, qos), forKey: ObjectIdentifier(session)) == nil { count += 1 }
    }

    mutating func remove(filter: String, session: Session) {
        remove(levels: Topic.levels(filter)[...], from: root, session: ObjectIdentifier(session))
    }

    /// Returns whether `node` became empty (so its parent drops it).
    @discardableResult
    private mutating func remove(levels: ArraySlice<Substring>, from node: Node, session: ObjectIdentifier) -> Bool {
        if let level = levels.first {
            if let child = node.children[level], remove(levels: levels.dropFirst(), from: child, session: session) {
                node.children[level] = nil
            }
        } else if node.subscribers.removeValue(forKey: session) != nil {
            count -= 1
        }
        return node.isEmpty
    }

    /// Every session whose filters match `topic`, once each, with the highest QoS among its
    /// matching subscriptions.
    func match(topic: String) -> [(session: Session, qos: QoS)] {
        let levels = Topic.levels(topic)
        var found: [ObjectIdentifier: (session: Session, qos: QoS)] = [:]
        collect(node: root, levels: levels[...], dollar: topic.hasPrefix("$"), into: &found)
        return Array(found.values)
    }

    private func collect(
        node: Node, levels: ArraySlice<Substring>, dollar: Bool,
        into found: inout [ObjectIdentifier: (session: Session, qos: QoS)]
    ) {
        // Wildcards at the first level do not match topics starting with '$' (§4.7.2).
        let wildcardsAllowed = !(dollar && node === root)
        if wildcardsAllowed, let hash = node.children["#"] {
            // "a/#" also matches "a" itself: the parent level (§4.7.1.2).
            add(hash.subscribers, into: &found)
        }
        guard let level = levels.first else {
            add(node.subscribers, into: &found)
            return
        }
        let rest = levels.dropFirst()
        if let exact = node.children[level] { collect(node: exact, levels: rest, dollar: dollar, into: &found) }
        if wildcardsAllowed, let plus = node.children["+"] { collect(node: plus, levels: rest, dollar: dollar, into: &found) }
    }

    private func add(
        _ subscribers: [ObjectIdentifier: (session: Session, qos: QoS)],
        into found: inout [ObjectIdentifier: (session: Session, qos: QoS)]
    ) {
        for (key, entry) in subscribers {
            if let existing = found[key], existing.qos >= entry.qos { continue }
            found[key] = entry
        }
    }
}
