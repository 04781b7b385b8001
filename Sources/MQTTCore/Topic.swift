import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Topic name and topic filter rules of MQTT 3.1.1 §4.7.
public enum Topic {
    /// Validates a topic name given as raw bytes, as it sits in a PUBLISH: non-empty, well-formed
    /// UTF-8, no U+0000, no wildcard, and at most `maxLevels` levels. Pure ASCII (the usual case)
    /// is checked without allocating, in one pass that also counts the levels. Returns the level count.
    @discardableResult
    public static func validateName(_ bytes: ByteBuffer, maxLevels: Int = .max) throws(MQTTProtocolError) -> Int {
        let count = bytes.readableBytes
        if count == 0 { throw .invalidTopicName("") }
        var levels = 1
        let verdict: UInt8 = bytes.withUnsafeReadableBytes { raw in
            var high = false
            var slashes = 0
            defer { levels = slashes + 1 }
            for byte in raw {
                switch byte {
                case UInt8(ascii: "/"): slashes &+= 1
                case 0: return 1
                case UInt8(ascii: "+"), UInt8(ascii: "#"): return 2
                case 0x80...: high = true
                default: continue
                }
            }
            return high ? 3 : 0
        }
        switch verdict {
        case 0: break
        case 1: throw .nullCharacter
        case 2: throw .invalidTopicName(String(buffer: bytes))
        default:
            if String(validating: bytes.readableBytesView, as: UTF8.self) == nil { throw .invalidUTF8 }
        }
        if levels > maxLevels { throw .tooManyTopicLevels(levels: levels, limit: maxLevels) }
        return levels
    }

    /// Validates a topic name held as a `String`. Returns the level count.
    @discardableResult
    public static func validateName(_ name: String, maxLevels: Int = .max) throws(MQTTProtocolError) -> Int {
        try validateName(ByteBuffer(string: name), maxLevels: maxLevels)
    }

    /// Validates a topic filter: non-empty, no U+0000, `#` only as the whole last level, `+`
    /// only as a whole level, and at most `maxLevels` levels. Returns the level count and whether
    /// a level is a wildcard.
    @discardableResult
    public static func validateFilter(_ filter: String, maxLevels: Int = .max) throws(MQTTProtocolError) -> (levels: Int, wildcards: Bool) {
        if filter.isEmpty { throw .invalidTopicFilter(filter) }
        if filter.utf8.contains(0) { throw .nullCharacter }
        let levels = filter.utf8.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false)
        if levels.count > maxLevels { throw .tooManyTopicLevels(levels: levels.count, limit: maxLevels) }
        var wildcards = false
        for (index, level) in levels.enumerated() {
            let hasHash = level.contains(UInt8(ascii: "#"))
            let hasPlus = level.contains(UInt8(ascii: "+"))
            if hasHash && (level.count != 1 || index != levels.count - 1) { throw .invalidTopicFilter(filter) }
            if hasPlus && level.count != 1 { throw .invalidTopicFilter(filter) }
            if hasHash || hasPlus { wildcards = true }
        }
        return (levels.count, wildcards)
    }

    /// Whether `filter` matches `topic` (both valid). See `TopicFilter.matches(_:)`.
    public static func matches(filter: String, topic: String) -> Bool {
        var f = filter
        var t = topic
        return f.withUTF8 { f in t.withUTF8 { t in matches(filter: UnsafeRawBufferPointer(f), name: UnsafeRawBufferPointer(t)) } }
    }

    /// MQTT's matching rule, the one implementation of it: whether the filter bytes match the
    /// topic name bytes (both valid). `+` matches one whole level (an empty one too), `#` the
    /// rest including the parent level ("a/#" matches "a"), and a filter starting with a wildcard
    /// does not match a topic starting with `$` (§4.7.1, §4.7.2). One loop over the bytes: no
    /// recursion, no allocation.
    public static func matches(filter: UnsafeRawBufferPointer, name: UnsafeRawBufferPointer) -> Bool {
        let slash = UInt8(ascii: "/")
        let plus = UInt8(ascii: "+")
        let hash = UInt8(ascii: "#")
        let fc = filter.count
        let nc = name.count
        if nc > 0, name[0] == UInt8(ascii: "$"), fc > 0, filter[0] == plus || filter[0] == hash { return false }
        var f = 0
        var n = 0
        while true {
            // f and n are at the start of a level of each.
            if f < fc && filter[f] == hash { return true }
            if f < fc && filter[f] == plus && (f + 1 == fc || filter[f + 1] == slash) {
                f += 1
                while n < nc && name[n] != slash { n += 1 }
            } else {
                while f < fc && filter[f] != slash {
                    if n >= nc || name[n] != filter[f] { return false }
                    f += 1
                    n += 1
                }
                if n < nc && name[n] != slash { return false }
            }
            // Both at the end of a level.
            let filterEnded = f == fc
            let nameEnded = n == nc
            if filterEnded { return nameEnded }
            if nameEnded { return f + 2 == fc && filter[f + 1] == hash }
            f += 1
            n += 1
        }
    }

    /// Calls `body` with each level of `bytes` (split at `/`, empty levels kept), in order.
    public static func forEachLevel(_ bytes: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) throws -> Void) rethrows {
        var start = 0
        var i = 0
        let count = bytes.count
        while i <= count {
            if i == count || bytes[i] == UInt8(ascii: "/") {
                try body(UnsafeRawBufferPointer(rebasing: bytes[start..<i]))
                start = i + 1
            }
            i += 1
        }
    }

    /// Splits a topic or filter into its levels (empty levels kept).
    public static func levels(_ topic: String) -> [Substring] {
        topic.split(separator: "/", omittingEmptySubsequences: false)
    }
}

/// Text compared and hashed as its UTF-8 bytes. Swift's `String` and `Substring` compare by
/// Unicode canonical equivalence ("é" equals "e" + U+0301, U+212A KELVIN SIGN equals "K"), but
/// MQTT compares topic names, filters and client ids byte for byte, with no normalisation
/// (MQTT-4.7.3-4): every map keyed by them uses this, or two clients could share a session, a
/// subscription or an ACL pattern by sending different bytes.
public struct ByteText: Hashable, Sendable {
    public let text: Substring

    public init(_ text: Substring) { self.text = text }
    public init(_ text: String) { self.text = text[...] }

    public static func == (a: ByteText, b: ByteText) -> Bool { a.text.hasSameUTF8(as: b.text) }

    public func hash(into hasher: inout Hasher) { text.hashUTF8(into: &hasher) }

    /// Whether the text is exactly these ASCII bytes.
    public func isExactly(_ ascii: StaticString) -> Bool {
        ascii.withUTF8Buffer { text.utf8.elementsEqual($0) }
    }
}

extension StringProtocol {
    /// Whether the two hold the same UTF-8 bytes: MQTT's equality for topics, filters and client
    /// ids (`==` on Swift strings is Unicode canonical equivalence; see `ByteText`). Native
    /// strings are compared as memory: `elementsEqual` on the UTF-8 views walks them through
    /// generic index arithmetic, tens of instructions a byte, which three comparisons per hooked
    /// message made a third of the Lua path.
    @inlinable
    public func hasSameUTF8(as other: some StringProtocol) -> Bool {
        let a = utf8
        let b = other.utf8
        guard a.count == b.count else { return false }
        let compared = a.withContiguousStorageIfAvailable { x in
            b.withContiguousStorageIfAvailable { y in
                x.isEmpty || memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0
            }
        }
        if let compared, let same = compared { return same }
        return a.elementsEqual(b)
    }

    /// Hashes the UTF-8 bytes (agrees with `hasSameUTF8`, not with `==`).
    @inlinable
    public func hashUTF8(into hasher: inout Hasher) {
        let hashed: Void? = utf8.withContiguousStorageIfAvailable { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
        if hashed == nil { Array(utf8).withUnsafeBytes { hasher.combine(bytes: $0) } }
    }
}
