/// A trie of topic filters, one node per level, with entries (`Key` → `Value`) on the node where
/// their filter ends. Matching a topic visits every entry whose filter matches it, following
/// MQTT's rules for `+`, `#` and topics starting with `$`.
///
/// Not thread-safe: the owner keeps it behind a lock or on one thread.
public final class TopicTrie<Key: Hashable, Value> {
    private final class Node {
        var children: [Substring: Node] = [:]
        var entries: [Key: Value] = [:]
        var isEmpty: Bool { children.isEmpty && entries.isEmpty }
    }

    private let root = Node()
    /// Number of entries.
    public private(set) var count = 0

    public init() {}

    /// Adds an entry, or replaces the value of the same key on the same filter.
    public func insert(filter: String, key: Key, value: Value) {
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
        if node.entries.updateValue(value, forKey: key) == nil { count += 1 }
    }

    /// Removes the entry of `key` on `filter`, pruning nodes left empty.
    public func remove(filter: String, key: Key) {
        remove(levels: Topic.levels(filter)[...], from: root, key: key)
    }

    /// Returns whether `node` became empty (so its parent drops it).
    @discardableResult
    private func remove(levels: ArraySlice<Substring>, from node: Node, key: Key) -> Bool {
        if let level = levels.first {
            if let child = node.children[level], remove(levels: levels.dropFirst(), from: child, key: key) {
                node.children[level] = nil
            }
        } else if node.entries.removeValue(forKey: key) != nil {
            count -= 1
        }
        return node.isEmpty
    }

    /// Calls `body` for every entry whose filter matches `topic` (once per matching filter).
    public func forEachMatch(topic: String, _ body: (Key, Value) -> Void) {
        visit(node: root, levels: Topic.levels(topic)[...], dollar: topic.hasPrefix("$"), body)
    }

    private func visit(node: Node, levels: ArraySlice<Substring>, dollar: Bool, _ body: (Key, Value) -> Void) {
        // Wildcards at the first level do not match topics starting with '$' (§4.7.2).
        let wildcardsAllowed = !(dollar && node === root)
        if wildcardsAllowed, let hash = node.children["#"] {
            // "a/#" also matches "a" itself: the parent level (§4.7.1.2).
            for (key, value) in hash.entries { body(key, value) }
        }
        guard let level = levels.first else {
            for (key, value) in node.entries { body(key, value) }
            return
        }
        let rest = levels.dropFirst()
        if let exact = node.children[level] { visit(node: exact, levels: rest, dollar: dollar, body) }
        if wildcardsAllowed, let plus = node.children["+"] { visit(node: plus, levels: rest, dollar: dollar, body) }
    }
}
