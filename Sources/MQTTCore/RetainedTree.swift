/// Retained messages in a topic tree: one node per level, a value on the node where its topic
/// ends. Finding what a filter matches walks only the part of the tree the filter can reach (an
/// exact level follows one child, `+` every child, `#` the whole subtree), so its cost is what it
/// matches, not the number of values held.
///
/// Values come out in tree order: a parent before its children (`a`, `a/b`, `a/b/c`); siblings in
/// the order of their node's dictionary (stable while the tree is unchanged). Filters starting
/// with a wildcard do not match topics starting with `$` (§4.7.2). Every walk is a loop with an
/// explicit worklist: no recursion per level.
///
/// A scan can be done in chunks (`scan(matching:)`, then `continueScan(_:limit:into:)`), so
/// that an owner behind a lock holds it for a bounded time per chunk; see `Scan`.
///
/// Not thread-safe: the owner keeps it behind a lock. It is `@unchecked Sendable` so that it can
/// live in a `Mutex`; its state must only be touched under that lock.
public final class RetainedTree<Value>: @unchecked Sendable {
    final class Node {
        var children: [ByteText: Node] = [:]
        var value: Value?
    }

    private let root = Node()
    /// Number of values held.
    public private(set) var count = 0
    /// Number of nodes below the root (for tests: clearing everything brings it back to 0).
    public private(set) var nodeCount = 0

    public init() {}

    /// Sets the value of `topic`, replacing the one it had.
    public func set(_ topic: String, _ value: Value) {
        var node = root
        for level in topic.split(separator: "/", omittingEmptySubsequences: false) {
            if let next = node.children[ByteText(level)] {
                node = next
            } else {
                let next = Node()
                // The key holds only this level's bytes, not the whole topic string.
                node.children[ByteText(String(level))] = next
                nodeCount += 1
                node = next
            }
        }
        if node.value == nil { count += 1 }
        node.value = value
    }

    /// Removes the value of `topic`, pruning the nodes left without value or children. Returns
    /// whether there was one.
    @discardableResult
    public func remove(_ topic: String) -> Bool {
        var path: [(parent: Node, level: Substring)] = []
        var node = root
        for level in topic.split(separator: "/", omittingEmptySubsequences: false) {
            guard let next = node.children[ByteText(level)] else { return false }
            path.append((node, level))
            node = next
        }
        guard node.value != nil else { return false }
        node.value = nil
        count -= 1
        while node.value == nil, node.children.isEmpty, let (parent, level) = path.popLast() {
            parent.children[ByteText(level)] = nil
            nodeCount -= 1
            node = parent
        }
        return true
    }

    /// The value of exactly `topic`.
    public func value(of topic: String) -> Value? {
        var node = root
        for level in topic.split(separator: "/", omittingEmptySubsequences: false) {
            guard let next = node.children[ByteText(level)] else { return nil }
            node = next
        }
        return node.value
    }

    /// The walk of one filter over the tree, resumable: the nodes still to visit. Between two
    /// chunks the tree may change (the owner's lock is released); a scan then sees each node as
    /// it is when the scan reaches it, and a branch pruned meanwhile is walked as it was when it
    /// was detached. Each chunk is done under the owner's lock: a `Scan` must only be continued
    /// under it, like any other access to the tree.
    public struct Scan: @unchecked Sendable {
        enum Step {
            /// `node` is reached by the filter's first `index` levels.
            case match(Node, index: Int)
            /// `node` and everything below it match (a `#`).
            case subtree(Node)
        }

        let levels: [Substring]
        var pending: [Step]
        /// Whether the scan has more to visit.
        public var isDone: Bool { pending.isEmpty }
    }

    /// Starts the walk of `filter` (a valid topic filter). Nothing is visited yet.
    public func scan(matching filter: String) -> Scan {
        Scan(levels: filter.split(separator: "/", omittingEmptySubsequences: false), pending: [.match(root, index: 0)])
    }

    /// Visits up to `limit` nodes of the scan, appending the values that match, in tree order.
    public func continueScan(_ scan: inout Scan, limit: Int, into out: inout [Value]) {
        var visited = 0
        while visited < limit, let step = scan.pending.popLast() {
            visited += 1
            switch step {
            case .subtree(let node):
                if let value = node.value { out.append(value) }
                for child in node.children.values { scan.pending.append(.subtree(child)) }
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
                        scan.pending.append(.subtree(child))
                    }
                case _ where level.isExactly("+"):
                    for (key, child) in node.children where !(atRoot && key.text.utf8.first == UInt8(ascii: "$")) {
                        scan.pending.append(.match(child, index: index + 1))
                    }
                default:
                    if let child = node.children[level] { scan.pending.append(.match(child, index: index + 1)) }
                }
            }
        }
    }

    /// Every value whose topic `filter` matches, in tree order, in one go.
    public func values(matching filter: String) -> [Value] {
        var scan = scan(matching: filter)
        var out: [Value] = []
        while !scan.isDone { continueScan(&scan, limit: .max, into: &out) }
        return out
    }
}
