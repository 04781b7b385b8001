import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// A small deterministic generator, so a failing randomized case can be replayed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Random topics and filters over a few levels, `$` and empty levels included.
func randomTopic(_ rng: inout SplitMix64) -> String {
    let names = ["a", "b", "c", "", "$s"]
    let depth = Int.random(in: 1...4, using: &rng)
    let topic = (0..<depth).map { i in
        let n = names.randomElement(using: &rng)!
        return i > 0 && n == "$s" ? "s" : n
    }.joined(separator: "/")
    return topic.isEmpty ? "/" : topic  // a topic name is never empty
}

func randomFilter(_ rng: inout SplitMix64) -> String {
    let names = ["a", "b", "c", "", "$s", "+", "+", "#"]
    let depth = Int.random(in: 1...4, using: &rng)
    var levels: [String] = []
    for i in 0..<depth {
        var n = names.randomElement(using: &rng)!
        if n == "#" && i != depth - 1 { n = "+" }
        levels.append(n)
    }
    let filter = levels.joined(separator: "/")
    return filter.isEmpty ? "/" : filter
}

@Suite("TopicTrie, iterative")
struct IterativeTopicTrieTests {
    @Test("randomized: matches exactly the filters Topic.matches accepts, each once; removal prunes every node")
    func randomizedAgainstMatches() throws {
        var rng = SplitMix64(state: 42)
        for _ in 0..<30 {
            let trie = TopicTrie<[Int: String]>()
            var filters: [(key: Int, filter: String)] = []
            for key in 0..<40 {
                let filter = randomFilter(&rng)
                try Topic.validateFilter(filter)
                trie.insert(filter: filter, key: key, value: filter)
                filters.append((key, filter))
            }
            #expect(trie.count == Set(filters.map(\.filter)).count)
            for _ in 0..<60 {
                let topic = randomTopic(&rng)
                var seen: [Int: Int] = [:]
                trie.forEachMatch(topic: topic) { key, value in
                    seen[key, default: 0] += 1
                    #expect(value == filters[key].filter)
                }
                let expected = Set(filters.filter { Topic.matches(filter: $0.filter, topic: topic) }.map(\.key))
                #expect(Set(seen.keys) == expected, "topic \(topic)")
                #expect(seen.values.allSatisfy { $0 == 1 }, "topic \(topic): an entry visited twice")
            }
            for (key, filter) in filters.shuffled(using: &rng) { trie.remove(filter: filter, key: key) }
            #expect(trie.count == 0)
            #expect(trie.nodeCount == 0)
        }
    }

    @Test("$ topics: not matched by filters starting with a wildcard; # matches the parent level")
    func dollarAndParent() {
        let trie = TopicTrie<[String: Int]>()
        for filter in ["#", "+/x", "$SYS/#", "a/#", "a/+"] { trie.insert(filter: filter, key: filter, value: 0) }
        func matches(_ topic: String) -> Set<String> {
            var keys: Set<String> = []
            trie.forEachMatch(topic: topic) { key, _ in keys.insert(key) }
            return keys
        }
        #expect(matches("$SYS/x") == ["$SYS/#"])
        #expect(matches("a") == ["#", "a/#"])
        #expect(matches("a/x") == ["#", "+/x", "a/#", "a/+"])
        #expect(matches("a/x/y") == ["#", "a/#"])
    }

    @Test("100,000 levels: insert, match and remove are loops (no stack overflow), and removal prunes")
    func deep() async throws {
        try await offThePool { () throws in
            let depth = 100_000
            let trie = TopicTrie<[Int: Int]>()
            let plusFilter = Array(repeating: "+", count: depth).joined(separator: "/")
            let exactFilter = Array(repeating: "a", count: depth).joined(separator: "/")
            let hashFilter = Array(repeating: "a", count: depth - 1).joined(separator: "/") + "/#"
            trie.insert(filter: plusFilter, key: 1, value: 1)
            trie.insert(filter: exactFilter, key: 2, value: 2)
            trie.insert(filter: hashFilter, key: 3, value: 3)
            var seen: [Int] = []
            trie.forEachMatch(topic: exactFilter) { key, _ in seen.append(key) }
            #expect(seen.sorted() == [1, 2, 3])
            seen = []
            trie.forEachMatch(topic: Array(repeating: "b", count: depth).joined(separator: "/")) { key, _ in seen.append(key) }
            #expect(seen == [1])
            trie.remove(filter: plusFilter, key: 1)
            trie.remove(filter: exactFilter, key: 2)
            #expect(trie.nodeCount == depth)  // a/a/.../# is left
            trie.remove(filter: hashFilter, key: 3)
            #expect(trie.count == 0 && trie.nodeCount == 0)
        }
    }
}

@Suite("Topic levels limit")
struct TopicLevelTests {
    @Test("names and filters over maxLevels are refused, at the limit accepted")
    func limit() throws {
        try Topic.validateName("a/b/c", maxLevels: 3)
        try Topic.validateName(ByteBuffer(string: "a/ü/c"), maxLevels: 3)
        #expect(throws: MQTTProtocolError.tooManyTopicLevels(levels: 4, limit: 3)) { try Topic.validateName("a/b/c/", maxLevels: 3) }
        #expect(throws: MQTTProtocolError.tooManyTopicLevels(levels: 4, limit: 3)) { try Topic.validateName("a/ü/c/d", maxLevels: 3) }
        try Topic.validateFilter("+/+/#", maxLevels: 3)
        #expect(throws: MQTTProtocolError.tooManyTopicLevels(levels: 4, limit: 3)) { try Topic.validateFilter("+/+/+/#", maxLevels: 3) }
    }

    @Test("the decoder refuses PUBLISH, SUBSCRIBE, UNSUBSCRIBE and will topics over maxTopicLevels")
    func decoder() throws {
        let deep = Array(repeating: "x", count: 201).joined(separator: "/")
        let ok = Array(repeating: "x", count: 200).joined(separator: "/")
        let packets: [(MQTTPacket, MQTTPacket)] = [
            (.publish(PublishPacket(topic: deep, payload: "p")), .publish(PublishPacket(topic: ok, payload: "p"))),
            (.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: deep, qos: .atMostOnce)])),
             .subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: ok, qos: .atMostOnce)]))),
            (.unsubscribe(UnsubscribePacket(packetID: 1, filters: [deep])), .unsubscribe(UnsubscribePacket(packetID: 1, filters: [ok]))),
            (.connect(ConnectPacket(clientID: "c", will: Will(topic: try TopicName(deep), payload: ByteBuffer(string: "w"), qos: .atMostOnce, retain: false))),
             .connect(ConnectPacket(clientID: "c", will: Will(topic: try TopicName(ok), payload: ByteBuffer(string: "w"), qos: .atMostOnce, retain: false)))),
        ]
        for (bad, good) in packets {
            var decoder = MQTTDecoder(maxTopicLevels: 200)
            var buffer = ByteBuffer()
            buffer.writeMQTTPacket(bad)
            #expect(throws: MQTTProtocolError.tooManyTopicLevels(levels: 201, limit: 200)) { _ = try decoder.decode(buffer: &buffer) }
            buffer = ByteBuffer()
            buffer.writeMQTTPacket(good)
            #expect(try decoder.decode(buffer: &buffer) != nil)
        }
    }
}
