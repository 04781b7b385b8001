/// A topic tree: one node per level, a `Value` on the node where its path (a topic filter or a
/// topic name) ends. The one trie of the broker, walked in both directions:
///
/// - Filters stored, a name given (subscriptions, publish hooks, ACL patterns):
///   `forEachMatch(name:)` visits the values of every stored filter that matches the name.
/// - Names stored, a filter given (retained messages): `scan(matching:)` / `continueScan` visit
///   the values of every stored name the filter matches, walking only what the filter can reach
///   (an exact level follows one child, `+` every child, `#` the whole subtree), in chunks.
///
/// Both follow MQTT's rules for `+`, `#` and topics starting with `$` (§4.7), agreeing with
/// `Topic.matches(filter:name:)`. Every walk is a loop with an explicit worklist, never a
/// recursion per level, so a path of any depth cannot overflow the stack (the broker bounds
/// depth with `max_topic_levels`, but the trie does not rely on it). Removing a value prunes the
/// nodes left empty, so memory comes back.
///
/// Not thread-safe: the owner keeps it behind a lock or on one thread. It is `@unchecked
/// Sendable` so that it can live in a `Mutex`; its state must only be touched under that lock.
public final class TopicTrie<Value>: @unchecked Sendable {
    final class Node {
        /// Children by level, wildcards apart: one lookup per level on the match path, and the
        /// `+` and `#` children without hashing. A trie of names has no wildcard children.
        var children: [ByteText: Node] = [:]
        var plus: Node?
        var hash: Node?
        var value: Value?
        var isEmpty: Bool { value == nil && children.isEmpty && plus == nil && hash == nil }

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
            } else if let node {
                // The key holds only this level's bytes, not the whole path string.
                children[ByteText(String(level))] = node
            } else {
                children[key] = nil
            }
        }
    }

    private let root = Node()
    /// Number of values held.
    public private(set) var count = 0
    /// Number of nodes below the root (tests: removing every value brings it back to 0).
    public private(set) var nodeCount = 0

    public init() {}

    /// Frees the nodes from the leaves up: letting the root go would release a deep branch one
    /// `deinit` inside another, a recursion per level.
    deinit {
        var stack = [root]
        while let node = stack.popLast() {
            stack.append(contentsOf: node.children.values)
            node.children = [:]
            if let plus = node.plus { stack.append(plus) }
            if let hash = node.hash { stack.append(hash) }
            node.plus = nil
            node.hash = nil
        }
    }

    private static func levels(_ path: String) -> [Substring] {
        path.split(separator: "/", omittingEmptySubsequences: false)
    }

    // MARK: - Values by path

    /// The value stored at exactly `path`.
    public func value(at path: String) -> Value? {
        var node = root
        for level in Self.levels(path) {
            guard let next = node.child(level) else { return nil }
            node = next
        }
        return node.value
    }

    /// Runs `body` on the value at `path` (nil if none), creating the path's nodes; if `body`
    /// leaves nil there, the nodes left empty are pruned.
    @discardableResult
    public func update<R>(_ path: String, _ body: (inout Value?) -> R) -> R {
        let levels = Self.levels(path)
        var node = root
        for level in levels {
            if let next = node.child(level) {
                node = next
            } else {
                let next = Node()
                node.setChild(level, next)
                nodeCount += 1
                node = next
            }
        }
        let had = node.value != nil
        let result = body(&node.value)
        let has = node.value != nil
        if had != has { count += has ? 1 : -1 }
        if node.isEmpty { prune(levels) }
        return result
    }

    /// Sets the value at `path`, replacing the one it had.
    public func set(_ path: String, _ value: Value) {
        update(path) { $0 = value }
    }

    /// Removes the value at `path`, pruning the nodes left empty. Returns the value removed.
    @discardableResult
    public func removeValue(at path: String) -> Value? {
        let levels = Self.levels(path)
        var node = root
        for level in levels {
            guard let next = node.child(level) else { return nil }
            node = next
        }
        guard let old = node.value else { return nil }
        node.value = nil
        count -= 1
        if node.isEmpty { prune(levels) }
        return old
    }

    /// Calls `body` with every value held, in no particular order. A loop over a worklist.
    public func forEachValue(_ body: (Value) -> Void) {
        var stack = [root]
        while let node = stack.popLast() {
            if let value = node.value { body(value) }
            stack.append(contentsOf: node.children.values)
            if let plus = node.plus { stack.append(plus) }
            if let hash = node.hash { stack.append(hash) }
        }
    }

    /// Detaches the empty nodes at the end of `levels`: the path down, then back up while nodes
    /// are empty. No recursion.
    private func prune(_ levels: [Substring]) {
        var path: [(parent: Node, level: Substring)] = []
        path.reserveCapacity(levels.count)
        var node = root
        for level in levels {
            guard let next = node.child(level) else { return }
            path.append((node, level))
            node = next
        }
        while node.isEmpty, let (parent, level) = path.popLast() {
            parent.setChild(level, nil)
            nodeCount -= 1
            node = parent
        }
    }

    // MARK: - Filters stored, a name given

    /// Calls `body` with the value of every stored filter that matches `name` (a topic name),
    /// once per matching filter, in depth-first order with the exact level before `+` at each
    /// level.
    ///
    /// A loop over the name's levels; a worklist is needed only where both an exact child and a
    /// `+` child match, and it is allocated only then (a trie without `+` filters never does).
    public func forEachMatch(name topic: String, _ body: (Value) -> Void) {
        let utf8 = topic.utf8
        // Wildcards at the first level do not match topics starting with '$' (§4.7.2).
        let dollar = utf8.first == UInt8(ascii: "$")
        // Branches not taken yet: a node and where its level starts in the topic (nil: past the end).
        var pending: [(node: Node, start: String.Index?)] = []
        var node = root
        var start: String.Index? = topic.startIndex
        while true {
            let wildcards = !(dollar && node === root)
            if wildcards, let hash = node.hash, let value = hash.value {
                // "a/#" also matches "a" itself: the parent level (§4.7.1.2).
                body(value)
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
            } else if let value = node.value {
                body(value)
            }
            guard let branch = pending.popLast() else { return }
            node = branch.node
            start = branch.start
        }
    }

    /// As `forEachMatch(name:_:)`, for a validated name.
    public func forEachMatch(_ name: TopicName, _ body: (Value) -> Void) {
        forEachMatch(name: name.string, body)
    }

    /// Whether any stored filter matches `name`.
    public func hasMatch(name: String) -> Bool {
        var found = false
        forEachMatch(name: name) { _ in found = true }
        return found
    }

    // MARK: - Names stored, a filter given

    /// The walk of one filter over a trie of names, resumable: the nodes still to visit. Between
    /// two chunks the trie may change (the owner's lock is released); a scan then sees each node
    /// as it is when the scan reaches it, and a branch pruned meanwhile is walked as it was when
    /// it was detached. Each chunk is done under the owner's lock: a `Scan` must only be
    /// continued under it, like any other access to the trie.
    public struct Scan: @unchecked Sendable {
        enum Step {
            /// `node` is reached by the filter's first `index` levels.
            case match(Node, index: Int)
            /// `node` and everything below it match (a `#`).
            case subtree(Node)
        }

        let levels: [Substring]
        /// The nodes still to visit, in a box: a copy of the scan kept anywhere (a queue of
        /// scans, a tuple) would otherwise make each step copy them, as many as the tree is wide
        /// (quadratic: "+/nomatch" over 200,000 retained topics took seconds). Copies of a scan
        /// share it.
        let pending: Pending
        /// Whether the scan has more to visit.
        public var isDone: Bool { pending.isEmpty }
    }

    /// A stack of steps that only its own methods touch (the array is never shared, so never
    /// copied on a change).
    final class Pending {
        private var steps: [Scan.Step]
        init(_ steps: [Scan.Step]) { self.steps = steps }
        var isEmpty: Bool { steps.isEmpty }
        func pop() -> Scan.Step? { steps.popLast() }
        func push(_ step: Scan.Step) { steps.append(step) }
    }

    /// Starts the walk of `filter` (a valid topic filter) over the stored names. Nothing is
    /// visited yet.
    public func scan(matching filter: String) -> Scan {
        Scan(levels: Self.levels(filter), pending: Pending([.match(root, index: 0)]))
    }

    /// Visits up to `limit` nodes of the scan, appending the values that match, parent before
    /// children; siblings in the order of their node's dictionary (stable while the trie is
    /// unchanged).
    public func continueScan(_ scan: inout Scan, limit: Int, into out: inout [Value]) {
        let pending = scan.pending
        var visited = 0
        while visited < limit, let step = pending.pop() {
            visited += 1
            switch step {
            case .subtree(let node):
                if let value = node.value { out.append(value) }
                for child in node.children.values { pending.push(.subtree(child)) }
            case .match(let node, let index):
                if index == scan.levels.count {
                    if let value = node.value { out.append(value) }
                    continue
                }
                let level = ByteText(scan.levels[index])
                // Wildcards at the first level do not match topics starting with '$' (§4.7.2).
                let atRoot = node === root
                switch level {
                case _ where level.isExactly("#"):
                    // "a/#" also matches "a" itself: the parent level (§4.7.1.2).
                    if let value = node.value { out.append(value) }
                    for (key, child) in node.children where !(atRoot && key.text.utf8.first == UInt8(ascii: "$")) {
                        pending.push(.subtree(child))
                    }
                case _ where level.isExactly("+"):
                    for (key, child) in node.children where !(atRoot && key.text.utf8.first == UInt8(ascii: "$")) {
                        pending.push(.match(child, index: index + 1))
                    }
                default:
                    if let child = node.children[level] { pending.push(.match(child, index: index + 1)) }
                }
            }
        }
    }

    /// The value of every stored name that `filter` matches, in tree order, in one go.
    public func values(matching filter: String) -> [Value] {
        var scan = scan(matching: filter)
        var out: [Value] = []
        while !scan.isDone { continueScan(&scan, limit: .max, into: &out) }
        return out
    }
}

// MARK: - Several entries per filter

extension TopicTrie {
    /// Adds an entry under `filter`, or replaces the value of the same key there (a trie whose
    /// nodes hold a dictionary: subscriptions by session, hooks by index).
    public func insert<Key: Hashable, Entry>(filter: String, key: Key, value: Entry) where Value == [Key: Entry] {
        update(filter) { entries in
            if entries == nil { entries = [key: value] } else { entries![key] = value }
        }
    }

    /// Removes the entry of `key` under `filter`, pruning nodes left empty.
    public func remove<Key: Hashable, Entry>(filter: String, key: Key) where Value == [Key: Entry] {
        guard value(at: filter) != nil else { return }
        update(filter) { entries in
            entries?[key] = nil
            if entries?.isEmpty == true { entries = nil }
        }
    }

    /// Calls `body` for every entry whose filter matches `topic` (a topic name).
    public func forEachMatch<Key: Hashable, Entry>(topic: String, _ body: (Key, Entry) -> Void) where Value == [Key: Entry] {
        forEachMatch(name: topic) { entries in
            for (key, entry) in entries { body(key, entry) }
        }
    }
}

// MARK: - Retained messages

/// Retained messages: a trie of topic names. The same trie as subscriptions, walked the other way.
public typealias RetainedTree<Value> = TopicTrie<Value>

extension TopicTrie {
    /// The value of exactly `topic`.
    public func value(of topic: String) -> Value? { value(at: topic) }

    /// Removes the value of `topic`, pruning. Returns whether there was one.
    @discardableResult
    public func remove(_ topic: String) -> Bool { removeValue(at: topic) != nil }
}
