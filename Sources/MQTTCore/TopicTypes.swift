import NIOCore

// MARK: - TopicName

/// A validated MQTT topic name (§4.7): non-empty, well-formed UTF-8, no U+0000, no wildcard, at
/// most 65,535 bytes. It carries its bytes (a `ByteBuffer`, possibly a slice of a read buffer),
/// its level count and a hash, both computed once, when it is validated: a route cache or ACL
/// verdict keyed by it hashes four bytes, not the whole topic.
///
/// Equality and hashing are byte for byte (MQTT-4.7.3-4), never Unicode equivalence.
///
/// Laid out in 30 bytes (the buffer, a 32-bit hash, a 16-bit count of `/`), so a `Message`
/// holding one and a payload stays within 56 bytes.
public struct TopicName: Hashable, Sendable, CustomStringConvertible {
    /// The topic's bytes (readable bytes only).
    public let bytes: ByteBuffer
    @usableFromInline let hashBits: UInt32
    @usableFromInline let slashes: UInt16

    /// The longest topic MQTT can carry (a two-byte length prefix).
    public static let maxLength = 65_535

    /// Validates `bytes` as a topic name with at most `maxLevels` levels. Keeps the buffer as it
    /// is (no copy): a slice of a read buffer stays one. Pure ASCII is checked without allocating.
    public init(validating bytes: ByteBuffer, maxLevels: Int = .max) throws(MQTTProtocolError) {
        if bytes.readableBytes > Self.maxLength { throw .invalidTopicName("topic of \(bytes.readableBytes) bytes") }
        let levels = try Topic.validateName(bytes, maxLevels: maxLevels)
        self.init(trusted: bytes, levels: levels)
    }

    /// Validates `string` as a topic name with at most `maxLevels` levels.
    public init(_ string: String, maxLevels: Int = .max) throws(MQTTProtocolError) {
        try self.init(validating: ByteBuffer(string: string), maxLevels: maxLevels)
    }

    /// A topic the decoder has already validated and whose levels it counted (a PUBLISH's
    /// topic, `PublishPacket.topicLevels`): only the hash is computed.
    package init(alreadyValidated bytes: ByteBuffer, levels: Int) {
        self.init(trusted: bytes, levels: levels)
    }

    /// A topic already validated: only the level count and hash are computed. `bytes` must be a
    /// valid topic name.
    package init(alreadyValidated bytes: ByteBuffer) {
        let slashes = bytes.withUnsafeReadableBytes { raw in
            var n = 0
            for byte in raw where byte == UInt8(ascii: "/") { n &+= 1 }
            return n
        }
        self.init(trusted: bytes, levels: slashes + 1)
    }

    /// No topic: what an MQTT 5 PUBLISH carries in place of one whose topic alias the receiver
    /// knows (§3.3.2.3.4). Not a valid name; only for encoding such a PUBLISH.
    public static let aliased = TopicName(trusted: ByteBuffer(), levels: 1)

    private init(trusted bytes: ByteBuffer, levels: Int) {
        self.bytes = bytes
        self.slashes = UInt16(truncatingIfNeeded: levels - 1)
        self.hashBits = bytes.withUnsafeReadableBytes { raw in
            var hasher = Hasher()
            hasher.combine(bytes: raw)
            return UInt32(truncatingIfNeeded: hasher.finalize())
        }
    }

    /// Number of levels (one more than the number of `/`).
    @inlinable public var levelCount: Int { Int(slashes) + 1 }
    /// Number of bytes.
    @inlinable public var count: Int { bytes.readableBytes }
    /// The topic as a `String` (allocates; not for the fast path).
    public var string: String { String(buffer: bytes) }
    public var description: String { string }
    /// Whether the topic starts with `$` (then wildcards at the first level do not match it).
    public var isDollar: Bool { bytes.readableBytes > 0 && bytes.getInteger(at: bytes.readerIndex, as: UInt8.self) == UInt8(ascii: "$") }

    /// The same topic in a buffer of its own: keeping it does not pin the buffer it was read from.
    public func copied() -> TopicName {
        var copy = self
        copy.replaceBytes(ByteBuffer(bytes: bytes.readableBytesView))
        return copy
    }

    /// The same topic held in `bytes` (which must hold the same bytes): a compacted message
    /// points its topic into its own storage.
    package func rebased(onto bytes: ByteBuffer) -> TopicName {
        var copy = self
        copy.replaceBytes(bytes)
        return copy
    }

    private mutating func replaceBytes(_ new: ByteBuffer) {
        assert(new.readableBytesView.elementsEqual(bytes.readableBytesView))
        self = TopicName(bytes: new, hashBits: hashBits, slashes: slashes)
    }

    private init(bytes: ByteBuffer, hashBits: UInt32, slashes: UInt16) {
        self.bytes = bytes
        self.hashBits = hashBits
        self.slashes = slashes
    }

    @inlinable
    public static func == (a: TopicName, b: TopicName) -> Bool {
        a.hashBits == b.hashBits && a.slashes == b.slashes && a.bytes == b.bytes
    }

    @inlinable
    public func hash(into hasher: inout Hasher) { hasher.combine(hashBits) }

    /// What a `Dictionary` or `Set` hashes: `hashBits` (already a seeded SipHash of the bytes,
    /// so a client cannot choose topics that collide) spread over the word and mixed with the
    /// table's seed, instead of a second SipHash of those four bytes on every lookup (the route
    /// cache is looked up once per PUBLISH).
    @inlinable
    public func _rawHashValue(seed: Int) -> Int {
        Int(bitPattern: UInt(truncatingIfNeeded: UInt64(hashBits) &* 0x9E37_79B9_7F4A_7C15)) ^ seed
    }

    /// Calls `body` with each level's bytes, in order (a loop: any depth).
    public func forEachLevel(_ body: (UnsafeRawBufferPointer) throws -> Void) rethrows {
        try bytes.withUnsafeReadableBytes { raw in try Topic.forEachLevel(raw, body) }
    }
}

extension TopicName: ExpressibleByStringLiteral {
    /// A topic written in the source (`"sensors/temperature"`): it must be a valid topic name
    /// (checked, a trap otherwise, as for any malformed constant). Topics from outside go
    /// through `init(_:maxLevels:)`, which throws.
    public init(stringLiteral value: String) {
        do {
            try self.init(value)
        } catch {
            preconditionFailure("\"\(value)\" is not a valid topic name: \(error)")
        }
    }
}

// MARK: - TopicFilter

/// A validated MQTT topic filter (§4.7): non-empty, well-formed UTF-8, no U+0000, `#` only as
/// the whole last level, `+` only as a whole level, at most 65,535 bytes. It carries its text,
/// level count, whether it has wildcards, and a hash computed once. Equality and hashing are
/// byte for byte. 24 bytes, smaller than the `ByteText` it replaces as a session's key.
public struct TopicFilter: Hashable, Sendable, CustomStringConvertible {
    /// The filter's text.
    public let string: String
    @usableFromInline let hashBits: UInt32
    @usableFromInline let slashes: UInt16
    /// Whether a level is `+` or `#`.
    public let hasWildcards: Bool

    /// Validates `string` as a topic filter with at most `maxLevels` levels.
    public init(_ string: String, maxLevels: Int = .max) throws(MQTTProtocolError) {
        if string.utf8.count > TopicName.maxLength { throw .invalidTopicFilter("filter of \(string.utf8.count) bytes") }
        let (levels, wildcards) = try Topic.validateFilter(string, maxLevels: maxLevels)
        self.string = string
        self.slashes = UInt16(truncatingIfNeeded: levels - 1)
        self.hasWildcards = wildcards
        var hasher = Hasher()
        string.hashUTF8(into: &hasher)
        self.hashBits = UInt32(truncatingIfNeeded: hasher.finalize())
    }

    /// A filter the decoder has already validated (one of a SUBSCRIBE or UNSUBSCRIBE): only the
    /// level count, the wildcard flag and the hash are computed. `string` must be a valid filter.
    package init(alreadyValidated string: String) {
        var slashes = 0
        var wildcards = false
        for byte in string.utf8 {
            switch byte {
            case UInt8(ascii: "/"): slashes &+= 1
            case UInt8(ascii: "+"), UInt8(ascii: "#"): wildcards = true
            default: continue
            }
        }
        self.string = string
        self.slashes = UInt16(truncatingIfNeeded: slashes)
        self.hasWildcards = wildcards
        var hasher = Hasher()
        string.hashUTF8(into: &hasher)
        self.hashBits = UInt32(truncatingIfNeeded: hasher.finalize())
    }

    public var description: String { string }
    /// Number of levels (one more than the number of `/`).
    @inlinable public var levelCount: Int { Int(slashes) + 1 }

    /// The topic name this filter is, if it has no wildcards (then it matches that one topic).
    public var exactName: TopicName? {
        hasWildcards ? nil : try? TopicName(string)
    }

    public static func == (a: TopicFilter, b: TopicFilter) -> Bool {
        a.hashBits == b.hashBits && a.string.hasSameUTF8(as: b.string)
    }

    public func hash(into hasher: inout Hasher) { hasher.combine(hashBits) }

    /// Whether this filter matches `name`: the one implementation of MQTT's matching rule
    /// (§4.7.1, §4.7.2), a loop over the bytes (no recursion, no allocation).
    public func matches(_ name: TopicName) -> Bool {
        var filter = string
        return filter.withUTF8 { f in
            name.bytes.withUnsafeReadableBytes { n in Topic.matches(filter: UnsafeRawBufferPointer(f), name: n) }
        }
    }

    /// Whether every topic that `other` matches is matched by this filter (an ACL pattern
    /// "covers" a subscription). As in matching, a filter starting with a wildcard says nothing
    /// about `$` topics (§4.7.2).
    public func covers(_ other: TopicFilter) -> Bool {
        let p = Topic.levels(string)
        let f = Topic.levels(other.string)
        // Levels compared byte for byte (Substring == is Unicode canonical equivalence).
        func same(_ a: Substring, _ b: Substring) -> Bool { a.hasSameUTF8(as: b) }
        if other.string.utf8.first == UInt8(ascii: "$"), let first = p.first, same(first, "+") || same(first, "#") { return false }
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

// MARK: - Shared subscriptions

/// A shared subscription's filter, `$share/GROUP/FILTER` (MQTT 5.0 §4.8.2; the broker accepts it
/// from 3.1.1 clients too, as Mosquitto and EMQX do): each message that `filter` matches goes to
/// one member of `group`.
public struct SharedFilter: Hashable, Sendable {
    /// The share name.
    public let group: String
    /// The filter that messages are matched against (the `$` rule and ACLs apply to it).
    public let filter: TopicFilter

    public init(group: String, filter: TopicFilter) {
        self.group = group
        self.filter = filter
    }

    /// Whether `filter` names a shared subscription (it starts with `$share/`); then `parse`
    /// tells whether it is a valid one.
    public static func isShared(_ filter: TopicFilter) -> Bool {
        filter.string.utf8.first == UInt8(ascii: "$") && filter.string.utf8.starts(with: "$share/".utf8)
    }

    /// The group and filter of `$share/GROUP/FILTER`; nil if `filter` does not start with
    /// `$share/`. Throws if it does but is not a valid shared subscription: the share name must be
    /// at least one character without `/`, `+` or `#`, followed by `/` and a topic filter of at
    /// least one character (§4.8.2).
    public static func parse(_ filter: TopicFilter, maxLevels: Int = .max) throws(MQTTProtocolError) -> SharedFilter? {
        guard isShared(filter) else { return nil }
        let utf8 = filter.string.utf8
        let groupStart = utf8.index(utf8.startIndex, offsetBy: 7)
        guard let slash = utf8[groupStart...].firstIndex(of: UInt8(ascii: "/")) else {
            throw .invalidSharedSubscription(filter.string, reason: "no filter after the share name")
        }
        let group = utf8[groupStart..<slash]
        guard !group.isEmpty, !group.contains(UInt8(ascii: "+")), !group.contains(UInt8(ascii: "#")) else {
            throw .invalidSharedSubscription(filter.string, reason: "the share name is empty or holds a wildcard")
        }
        let rest = filter.string[utf8.index(after: slash)...]
        guard !rest.isEmpty else { throw .invalidSharedSubscription(filter.string, reason: "no filter after the share name") }
        return SharedFilter(group: String(filter.string[groupStart..<slash]), filter: try TopicFilter(String(rest), maxLevels: maxLevels))
    }

    /// The filter that topics are matched against: the one inside a valid shared subscription's
    /// filter, else `filter` itself.
    public static func matching(_ filter: TopicFilter) -> TopicFilter {
        guard isShared(filter), let shared = try? parse(filter) else { return filter }
        return shared.filter
    }
}
