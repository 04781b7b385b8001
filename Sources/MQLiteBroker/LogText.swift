/// Client-supplied text (client ids, topics, filters, user names, script errors) as it goes into a
/// log line: at most `limit` bytes, cut on a character boundary and marked with the full size, so
/// that a client sending a 64 KB client id cannot make every log line 64 KB.
public struct LogText: CustomStringConvertible, Sendable {
    public static let defaultLimit = 128

    public let description: String

    public init(_ text: some StringProtocol, limit: Int = LogText.defaultLimit) {
        let string = String(text)
        let utf8 = string.utf8
        guard utf8.count > limit else {
            description = string
            return
        }
        var end = utf8.index(utf8.startIndex, offsetBy: limit)
        // Back off to the start of a UTF-8 sequence.
        while end > utf8.startIndex, utf8[end] & 0xC0 == 0x80 { end = utf8.index(before: end) }
        description = String(string[..<end]) + "…(\(utf8.count) bytes)"
    }
}
