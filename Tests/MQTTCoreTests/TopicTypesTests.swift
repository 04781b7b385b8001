import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// MQTT's matching rule written the plain way (levels split into arrays), as the reference the
/// byte matcher and the trie are checked against.
private func referenceMatches(filter: String, topic: String) -> Bool {
    let f = filter.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
    let t = topic.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
    if topic.hasPrefix("$"), f[0] == "+" || f[0] == "#" { return false }
    for i in f.indices {
        if f[i] == "#" { return true }
        if i >= t.count { return false }
        if f[i] != "+" && Array(f[i].utf8) != Array(t[i].utf8) { return false }
    }
    return f.count == t.count
}

@Suite("TopicName")
struct TopicNameTests {
    @Test("valid names: levels counted, bytes kept, $ recognised")
    func valid() throws {
        let name = try TopicName("a/b//c")
        #expect(name.levelCount == 4 && name.count == 6 && name.string == "a/b//c")
        #expect(try TopicName("/").levelCount == 2)
        #expect(try TopicName("x").levelCount == 1)
        let sys = try TopicName("$SYS/broker/load")
        #expect(sys.isDollar && sys.levelCount == 3)
        #expect(!(try TopicName("a/$b")).isDollar)
        #expect(try TopicName("héllo/wörld").levelCount == 2)
    }

    @Test("a decoded PUBLISH carries its topic's level count (the topic is not walked again); a topic set later is not taken for counted")
    func decodedLevels() throws {
        // The longest topic: 65,535 slashes are 65,536 levels, past what the packet's count holds
        // (then 0: counted again by the broker).
        for topic in ["a", "a/b//c", "/", "$SYS/x/y", String(repeating: "/", count: 300), String(repeating: "/", count: 65_535)] {
            var buffer = ByteBuffer()
            buffer.writeMQTTPacket(.publish(PublishPacket(topic: topic, payload: "x")))
            var decoder = MQTTDecoder()
            guard case .publish(var p)? = try decoder.decode(buffer: &buffer) else {
                Issue.record("not decoded as a PUBLISH: \(topic)")
                continue
            }
            let expected = try TopicName(topic)
            let fromPacket: TopicName
            if expected.levelCount > Int(UInt16.max) {
                #expect(p.topicLevels == 0)
                fromPacket = TopicName(alreadyValidated: p.topic)
            } else {
                #expect(Int(p.topicLevels) == expected.levelCount)
                fromPacket = TopicName(alreadyValidated: p.topic, levels: Int(p.topicLevels))
            }
            #expect(fromPacket == expected && fromPacket.levelCount == expected.levelCount)
            #expect(p == PublishPacket(topic: topic, payload: "x"), "the count is not part of equality")
            p.topic = ByteBuffer(string: "q/r")
            #expect(p.topicLevels == 0)
        }
    }

    @Test("invalid names are refused with the rule they break", arguments: [
        ("", MQTTProtocolError.invalidTopicName("")),
        ("a/+", .invalidTopicName("a/+")),
        ("a/#", .invalidTopicName("a/#")),
        ("#", .invalidTopicName("#")),
        ("a\u{0}b", .nullCharacter),
    ])
    func invalid(_ text: String, _ error: MQTTProtocolError) {
        #expect(throws: error) { try TopicName(text) }
    }

    @Test("bytes that are not UTF-8, and names over 65,535 bytes, are refused")
    func invalidBytes() throws {
        #expect(throws: MQTTProtocolError.invalidUTF8) { try TopicName(validating: ByteBuffer(bytes: [0x61, 0xFF, 0x62])) }
        #expect(throws: MQTTProtocolError.self) { try TopicName(String(repeating: "a", count: 65_536)) }
        #expect(try TopicName(String(repeating: "a", count: 65_535)).count == 65_535)
    }

    @Test("deep names: at the level limit accepted, past it refused; 10,000 levels counted")
    func deep() throws {
        let deep = Array(repeating: "a", count: 10_000).joined(separator: "/")
        #expect(try TopicName(deep).levelCount == 10_000)
        #expect(throws: MQTTProtocolError.tooManyTopicLevels(levels: 10_000, limit: 200)) { try TopicName(deep, maxLevels: 200) }
        let limit = Array(repeating: "a", count: 200).joined(separator: "/")
        #expect(try TopicName(limit, maxLevels: 200).levelCount == 200)
    }

    @Test("equal and hashed by bytes: a slice equals a copy; canonically equivalent text does not")
    func equality() throws {
        var buffer = ByteBuffer(string: "xxa/b/c")
        buffer.moveReaderIndex(forwardBy: 2)
        let slice = try TopicName(validating: buffer)
        let copy = try TopicName("a/b/c")
        #expect(slice == copy && slice.hashValue == copy.hashValue)
        #expect(slice.copied() == copy && slice.copied().levelCount == 3)
        #expect(try TopicName("\u{E9}") != TopicName("e\u{301}"))
        let set: Set<TopicName> = [slice, copy, try TopicName("a/b")]
        #expect(set.count == 2)
        #expect(TopicName(alreadyValidated: ByteBuffer(string: "a/b/c")) == copy)
    }
}

@Suite("TopicFilter")
struct TopicFilterTests {
    @Test("valid filters: levels and wildcards")
    func valid() throws {
        let f = try TopicFilter("a/+/#")
        #expect(f.levelCount == 3 && f.hasWildcards && f.exactName == nil)
        let exact = try TopicFilter("a/b")
        #expect(!exact.hasWildcards)
        #expect(try exact.exactName == TopicName("a/b"))
        #expect(try TopicFilter("#").levelCount == 1)
        #expect(try TopicFilter("+/+").hasWildcards)
        #expect(try TopicFilter("$SYS/#").levelCount == 2)
    }

    @Test("invalid filters are refused", arguments: ["", "a/#/b", "a#", "a/b#", "a/b+", "+a", "a\u{0}"])
    func invalid(_ text: String) {
        #expect(throws: MQTTProtocolError.self) { try TopicFilter(text) }
    }

    @Test("deep filters: 10,000 levels counted; over the limit refused")
    func deep() throws {
        let deep = Array(repeating: "+", count: 10_000).joined(separator: "/")
        #expect(try TopicFilter(deep).levelCount == 10_000)
        #expect(throws: MQTTProtocolError.tooManyTopicLevels(levels: 10_000, limit: 200)) { try TopicFilter(deep, maxLevels: 200) }
    }

    @Test("matching: wildcards, the parent level, empty levels and the $ rule")
    func matching() throws {
        let cases: [(String, String, Bool)] = [
            ("a/b", "a/b", true), ("a/b", "a/c", false), ("a/b", "a/b/c", false), ("a/b/c", "a/b", false),
            ("a/+", "a/b", true), ("a/+", "a/", true), ("a/+", "a", false), ("a/+", "a/b/c", false),
            ("+", "a", true), ("+", "/a", false), ("+/+", "/a", true), ("/#", "/a", true),
            ("a/#", "a", true), ("a/#", "a/b/c", true), ("a/+/#", "a/b", true), ("#", "x/y", true),
            ("#", "$SYS/x", false), ("+/x", "$SYS/x", false), ("$SYS/#", "$SYS/x", true), ("$SYS/+", "$SYS/x", true),
            ("a//c", "a//c", true), ("a/+/c", "a//c", true), ("ab", "a", false), ("a", "ab", false),
        ]
        for (filter, topic, expected) in cases {
            #expect(try TopicFilter(filter).matches(try TopicName(topic)) == expected, "\(filter) vs \(topic)")
            #expect(Topic.matches(filter: filter, topic: topic) == expected, "\(filter) vs \(topic)")
        }
    }

    @Test("randomized: the byte matcher agrees with the reference matcher")
    func randomized() throws {
        var rng = SplitMix64(state: 99)
        for _ in 0..<3000 {
            let filter = randomFilter(&rng)
            let topic = randomTopic(&rng)
            #expect(try TopicFilter(filter).matches(try TopicName(topic)) == referenceMatches(filter: filter, topic: topic), "\(filter) vs \(topic)")
        }
    }

    @Test("matching 10,000 levels is a loop")
    func deepMatch() throws {
        let topic = try TopicName(Array(repeating: "a", count: 10_000).joined(separator: "/"))
        #expect(try TopicFilter(Array(repeating: "+", count: 10_000).joined(separator: "/")).matches(topic))
        #expect(!(try TopicFilter(Array(repeating: "+", count: 9_999).joined(separator: "/")).matches(topic)))
        #expect(try TopicFilter(Array(repeating: "a", count: 9_999).joined(separator: "/") + "/#").matches(topic))
    }

    @Test("covers: a pattern covers a filter when it matches every topic the filter matches")
    func covers() throws {
        let cases: [(String, String, Bool)] = [
            ("a/#", "a/b/+", true), ("a/#", "a/#", true), ("a/+", "a/b", true), ("a/+", "a/+", true),
            ("a/+", "a/#", false), ("a/b", "a/+", false), ("#", "x/#", true), ("#", "$SYS/#", false),
            ("+/x", "$SYS/x", false), ("$SYS/#", "$SYS/x", true), ("a/b", "a/b", true), ("a/b", "a/b/c", false),
        ]
        for (pattern, filter, expected) in cases {
            #expect(try TopicFilter(pattern).covers(try TopicFilter(filter)) == expected, "\(pattern) covers \(filter)")
        }
    }
}

@Suite("TopicTrie, generic")
struct GenericTopicTrieTests {
    @Test("filters stored, names matched; names stored, filters scanned: both agree with the reference")
    func bothDirections() throws {
        var rng = SplitMix64(state: 5)
        for _ in 0..<20 {
            let filters = TopicTrie<String>()
            let names = TopicTrie<String>()
            var filterSet: Set<String> = []
            var nameSet: Set<String> = []
            for _ in 0..<30 {
                let f = randomFilter(&rng)
                filters.set(f, f)
                filterSet.insert(f)
                let n = randomTopic(&rng)
                names.set(n, n)
                nameSet.insert(n)
            }
            #expect(filters.count == filterSet.count && names.count == nameSet.count)
            for n in nameSet {
                var found: [String] = []
                filters.forEachMatch(try TopicName(n)) { found.append($0) }
                #expect(Set(found) == filterSet.filter { referenceMatches(filter: $0, topic: n) } && found.count == Set(found).count, "name \(n)")
                #expect(filters.hasMatch(name: n) == !found.isEmpty)
            }
            for f in filterSet {
                #expect(Set(names.values(matching: f)) == nameSet.filter { referenceMatches(filter: f, topic: $0) }, "filter \(f)")
            }
            for f in filterSet { #expect(filters.removeValue(at: f) == f) }
            for n in nameSet { #expect(names.remove(n)) }
            #expect(filters.count == 0 && filters.nodeCount == 0 && names.count == 0 && names.nodeCount == 0)
        }
    }

    @Test("update creates and prunes: a value set to nil takes its emptied nodes with it")
    func updateAndPrune() {
        let trie = TopicTrie<Int>()
        trie.update("a/b/c") { $0 = 1 }
        trie.set("a/x", 2)
        #expect(trie.count == 2 && trie.nodeCount == 4)
        #expect(trie.value(at: "a/b/c") == 1 && trie.value(at: "a/b") == nil)
        trie.update("a/b/c") { $0 = nil }
        #expect(trie.count == 1 && trie.nodeCount == 2)
        trie.update("never/set") { _ in }
        #expect(trie.nodeCount == 2)
        #expect(trie.removeValue(at: "a/x") == 2 && trie.nodeCount == 0)
        #expect(trie.removeValue(at: "a/x") == nil)
    }

    @Test("deep paths (100,000 and 10,000 levels) in both directions, and a deep trie let go without removing anything")
    func deep() async throws {
        try await offThePool { () throws in
            var depth = 100_000
            var topic = Array(repeating: "a", count: depth).joined(separator: "/")
            do {
                let trie = TopicTrie<Int>()
                trie.set(topic, 1)
                trie.set(Array(repeating: "+", count: depth).joined(separator: "/"), 2)
                var found: [Int] = []
                // (Longer than a TopicName may be: the trie takes any path.)
                trie.forEachMatch(name: topic) { found.append($0) }
                #expect(found.sorted() == [1, 2])
                #expect(trie.values(matching: "#").count == 1)  // names scan: only children, not '+'
                // Going out of scope here frees 200,000 nodes: without an iterative teardown, a
                // recursion per level.
            }
            depth = 10_000
            topic = Array(repeating: "a", count: depth).joined(separator: "/")
            let names = TopicTrie<Int>()
            names.set(topic, 1)
            var found: [Int] = []
            let filters = TopicTrie<Int>()
            filters.set(Array(repeating: "+", count: depth - 1).joined(separator: "/") + "/#", 3)
            filters.forEachMatch(try TopicName(topic)) { found.append($0) }
            #expect(found == [3])
            #expect(names.values(matching: Array(repeating: "+", count: depth).joined(separator: "/")) == [1])
            #expect(names.remove(topic) && names.nodeCount == 0)
        }
    }

    @Test("shared subscriptions: $share/GROUP/FILTER parsed; a bad share name or no filter refused; other filters are not shared")
    func sharedFilters() throws {
        let parsed = try #require(try SharedFilter.parse(TopicFilter("$share/group-1/a/+/#")))
        #expect(parsed.group == "group-1" && parsed.filter.string == "a/+/#")
        #expect(try SharedFilter.parse(TopicFilter("$share/g/$SYS/#"))?.filter.string == "$SYS/#")
        #expect(try SharedFilter.parse(TopicFilter("$share/g//"))?.filter.string == "/")
        for plain in ["a/b", "$share", "$SYS/#", "share/g/t", "$sharex/g/t", "#"] {
            #expect(try SharedFilter.parse(TopicFilter(plain)) == nil, "\(plain)")
        }
        for bad in ["$share/+/t", "$share/g", "$share/g/", "$share//t", "$share/#"] {
            #expect(throws: MQTTProtocolError.self, "\(bad)") { try SharedFilter.parse(TopicFilter(bad)) }
        }
        // The filter inside obeys the level limit.
        #expect(throws: MQTTProtocolError.self) { try SharedFilter.parse(TopicFilter("$share/g/a/b/c"), maxLevels: 2) }
    }
}
