import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Client-supplied text (client ids, topics, filters, user names, script errors) as it goes into a
/// log line: at most `limit` bytes, cut on a character boundary and marked with the full size, so
/// that a client sending a 64 KB client id cannot make every log line 64 KB; control characters
/// escaped (`\n`, `\u{1}`), so that a client id with a newline in it cannot forge log lines.
public struct LogText: CustomStringConvertible, Sendable {
    public static let defaultLimit = 128

    public let description: String

    public init(_ text: some StringProtocol, limit: Int = LogText.defaultLimit) {
        let string = String(text)
        let utf8 = string.utf8
        guard utf8.count > limit else {
            description = Self.escaped(string)
            return
        }
        var end = utf8.index(utf8.startIndex, offsetBy: limit)
        // Back off to the start of a UTF-8 sequence.
        while end > utf8.startIndex, utf8[end] & 0xC0 == 0x80 { end = utf8.index(before: end) }
        description = Self.escaped(String(string[..<end])) + "…(\(utf8.count) bytes)"
    }

    /// As a log line's metadata value (`client=...`): in double quotes (with `"` and `\` escaped)
    /// when it is empty or has a space, `=` or a quote in it, so that a client id such as
    /// `a address=10.0.0.1:1883` cannot read as more fields (swift-log's stream handler writes
    /// `key=value` as it is). Plain ids stay as they are.
    public init(value text: some StringProtocol, limit: Int = LogText.defaultLimit) {
        let plain = LogText(text, limit: limit).description
        guard plain.isEmpty || plain.contains(where: { $0 == " " || $0 == "=" || $0 == "\"" }) else {
            description = plain
            return
        }
        var quoted = "\""
        for character in plain {
            if character == "\"" || character == "\\" { quoted.append("\\") }
            quoted.append(character)
        }
        description = quoted + "\""
    }

    /// C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
    private static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value) || scalar.value == 0x2028 || scalar.value == 0x2029
    }

    private static func escaped(_ string: String) -> String {
        guard string.unicodeScalars.contains(where: isControl) else { return string }
        var out = ""
        for scalar in string.unicodeScalars {
            switch scalar {
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where isControl(scalar): out += "\\u{\(String(scalar.value, radix: 16))}"
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}

/// An error as a log line tells it: a system call's error as `strerror`'s text and its number
/// (NIO's own text names its internal function and has an unbalanced parenthesis: "read(descriptor:
/// pointer:size:): Connection reset by peer) (errno: 104)"), any other as it describes itself.
func errorText(_ error: any Error) -> String {
    if let connect = error as? NIOConnectionError, let first = connect.connectionErrors.first { return errorText(first.error) }
    guard let io = error as? IOError else { return "\(error)" }
    return "\(String(cString: strerror(io.errnoCode))) (errno \(io.errnoCode))"
}

/// A log line for something that may repeat at a client's pace: due at most once per `interval`,
/// with how many times it happened since the last one (owner-loop state).
struct LogThrottle {
    var interval = TimeAmount.seconds(10)
    private var logged: NIODeadline?
    private var count = 0

    /// Counts one more; the count since the last line when a line is due now, else nil.
    mutating func due(now: NIODeadline = .now()) -> Int? {
        count += 1
        if let logged, now - logged < interval { return nil }
        defer { (logged, count) = (now, 0) }
        return count
    }
}
