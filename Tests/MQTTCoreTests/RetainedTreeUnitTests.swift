import MQLiteTestSupport
import MQTTCore
import Testing

@Suite("RetainedTree")
struct RetainedTreeTests {
    @Test("randomized: a filter finds exactly the topics Topic.matches accepts, once each, parents first, in chunks too")
    func randomizedAgainstMatches() throws {
        var rng = SplitMix64(state: 7)
        for _ in 0..<30 {
            let tree = RetainedTree<String>()
            var topics: Set<String> = []
            for _ in 0..<50 {
                let topic = randomTopic(&rng)
                topics.insert(topic)
                tree.set(topic, topic)
            }
            #expect(tree.count == topics.count)
            for _ in 0..<40 {
                let filter = randomFilter(&rng)
                let found = tree.values(matching: filter)
                #expect(Set(found) == Set(topics.filter { Topic.matches(filter: filter, topic: $0) }), "filter \(filter)")
                #expect(found.count == Set(found).count, "filter \(filter): a value found twice")
                // Parent before child: a topic never comes after a topic it is a prefix level of.
                for (i, topic) in found.enumerated() {
                    for later in found[(i + 1)...] { #expect(!topic.hasPrefix(later + "/"), "\(later) before \(topic)") }
                }
                // Chunks of one node give the same result.
                var scan = tree.scan(matching: filter)
                var chunked: [String] = []
                while !scan.isDone { tree.continueScan(&scan, limit: 1, into: &chunked) }
                #expect(chunked == found)
            }
            for topic in topics.shuffled(using: &rng) { #expect(tree.remove(topic)) }
            #expect(tree.count == 0 && tree.nodeCount == 0)
        }
    }

    @Test("tree order: a, a/b, a/b/c whatever the insertion order; $ topics only for filters not starting with a wildcard")
    func orderAndDollar() {
        let tree = RetainedTree<String>()
        for topic in ["a/b/c", "a/b", "a", "$SYS/x", "b"] { tree.set(topic, topic) }
        #expect(tree.values(matching: "a/#") == ["a", "a/b", "a/b/c"])
        #expect(Set(tree.values(matching: "#")) == ["a", "a/b", "a/b/c", "b"])
        #expect(tree.values(matching: "+/x") == [])
        #expect(tree.values(matching: "$SYS/#") == ["$SYS/x"])
        #expect(tree.values(matching: "+/b") == ["a/b"])
        #expect(tree.value(of: "a/b") == "a/b")
        tree.set("a/b", "new")
        #expect(tree.value(of: "a/b") == "new" && tree.count == 5)
    }

    @Test("clearing prunes emptied branches, keeping shared ones")
    func pruning() {
        let tree = RetainedTree<Int>()
        tree.set("x/y/z", 1)
        tree.set("x/y", 2)
        #expect(tree.nodeCount == 3)
        tree.remove("x/y")
        #expect(tree.nodeCount == 3)  // x/y still leads to x/y/z
        #expect(!tree.remove("x/y"))
        tree.remove("x/y/z")
        #expect(tree.nodeCount == 0 && tree.count == 0)
    }

    @Test("100,000 levels: set, match and remove are loops (no stack overflow)")
    func deep() async throws {
        try await offThePool { () throws in
            let depth = 100_000
            let tree = RetainedTree<Int>()
            let topic = Array(repeating: "a", count: depth).joined(separator: "/")
            tree.set(topic, 1)
            #expect(tree.values(matching: Array(repeating: "+", count: depth).joined(separator: "/")) == [1])
            #expect(tree.values(matching: "#") == [1])
            tree.remove(topic)
            #expect(tree.nodeCount == 0)
        }
    }
}
