/// A trie of topic filters, one node per level, with entries (`Key` → `Value`) on the node where
/// their filter ends. Matching a topic visits every entry whose filter matches it, following
/// MQTT's rules for `+`, `#` and topics starting with `$`.
///
/// Every walk is a loop, never a recursion per level, so a filter or topic of any depth cannot
/// overflow the stack (the broker bounds depth with `max_topic_levels`, but the trie does not
/// rely on it).
///
/// Not thread-safe: the owner keeps it behind a lock or on one thread.
public final class TopicTrie<Key: Hashable, Value> {
    private final class Node {
        /// Children by level, wildcards apart: one lookup per level on the match path, and the
        /// `+` and `#` children without hashing.
        var children: [ByteText: Node] = [:]
        var plus: Node?
        var hash: Node?
        var entries: [Key: Value] = [:]
        var isEmpty: Bool { entries.isEmpty && children.isEmpty && plus == nil && hash == nil }

        func child(_ level: Substring) -> Node? {
            let key = ByteText(level)
            if key.isExactly("+") { return plus }
            if key.isExactly("#") { return hash }
            return children[key]
        }

        func setChild(_ level: Substring, _ node: Node?) {
            let key = ByteText(level)
            if key.isExactly("+") {
                plus = node
            } else if key.isExactly("#") {
                hash = node
            } else {
                children[key] = node
            }
        }
    }

    private let root = Node()
    /// Number of entries.
    public private(set) var count = 0
    /// Number of nodes below the root (for tests: removing every entry brings it back to 0).
    public private(set) var nodeCount = 0

    public init() {}

    /// Adds an entry, or replaces the value of the same key on the same filter.
    public func insert(filter: String, key: Key, value: Value) {
        var node = root
        for level in filter.split(separator: "/", omittingEmptySubsequences: false) {
            if let next = node.child(level) {
                node = next
            } else {
                let next = Node()
                node.setChild(level, next)
                nodeCount += 1
                node = next
            }
        }
        if node.entries.updateValue(value, forKey: key) == nil { count += 1 }
    }

    /// Removes the entry of `key` on `filter`, pruning nodes left empty.
    public func remove(filter: String, key: Key) {
        // The path down, then back up while nodes are empty: no recursion.
        var path: [(parent: Node, level: Substring)] = []
        var node = root
        for level in filter.split(separator: "/", omittingEmptySubsequences: false) {
            guard let next = node.child(level) else { return }
            path.append((node, level))
            node = next
        }
        guard node.entries.removeValue(forKey: key) != nil else { return }
        count -= 1
        while node.isEmpty, let (parent, level) = path.popLast() {
            parent.setChild(level, nil)
            nodeCount -= 1
            node = parent
        }
    }

    /// Calls `body` for every entry whose filter matches `topic` (once per matching filter), in
    /// depth-first order with the exact level before `+` at each level.
    ///
    /// A loop over the topic's levels; a worklist is needed only where both an exact child and a
    /// `+` child match, and it is allocated only then (a trie without `+` filters never does).
    public func forEachMatch(topic: String, _ body: (Key, Value) -> Void) {
        let utf8 = topic.utf8
        // Wildcards at the first level do not match topics starting with '$' (§4.7.2).
        let dollar = utf8.first == UInt8(ascii: "$")
        // Branches not taken yet: a node and where its level starts in the topic (nil: past the end).
        var pending: [(node: Node, start: String.Index?)] = []
        var node = root
        var start: String.Index? = topic.startIndex
        while true {
            let wildcards = !(dollar && node === root)
            if wildcards, let hash = node.hash {
                // "a/#" also matches "a" itself: the parent level (§4.7.1.2).
                for (key, value) in hash.entries { body(key, value) }
            }
            if let levelStart = start {
                let levelEnd = utf8[levelStart...].firstIndex(of: UInt8(ascii: "/")) ?? utf8.endIndex
                let next: String.Index? = levelEnd == utf8.endIndex ? nil : utf8.index(after: levelEnd)
                let exact = node.children.isEmpty ? nil : node.children[ByteText(topic[levelStart..<levelEnd])]
                let plus = wildcards ? node.plus : nil
                if let exact {
                    if let plus { pending.append((plus, next)) }
                    node = exact
                    start = next
                    continue
                }
                if let plus {
                    node = plus
                    start = next
                    continue
                }
            } else {
                for (key, value) in node.entries { body(key, value) }
            }
            guard let branch = pending.popLast() else { return }
            node = branch.node
            start = branch.start
        }
    }
}
