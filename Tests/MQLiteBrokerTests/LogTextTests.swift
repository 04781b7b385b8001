import MQLiteBroker
import Testing

/// Client text in log lines: a client id with a newline in it wrote whole forged lines into the log
/// (found by a hostile helper); control characters are escaped now, after the length limit.
@Suite("Client text in logs")
struct LogTextTests {
    @Test("control characters are escaped, so client text cannot start a log line of its own")
    func controlCharacters() {
        #expect(LogText("dev\n2026-12-01T00:00:00+0000 notice FORGED").description == "dev\\n2026-12-01T00:00:00+0000 notice FORGED")
        #expect(LogText("a\r\tb\u{1}c\u{7F}d\u{85}e\u{2028}f").description == "a\\r\\tb\\u{1}c\\u{7f}d\\u{85}e\\u{2028}f")
        #expect(LogText("plain/topic é 😀").description == "plain/topic é 😀")
    }

    @Test("long text is cut on a character boundary with its size, and what is kept is escaped")
    func truncated() {
        let text = String(repeating: "\n", count: 10) + String(repeating: "é", count: 100)
        #expect(LogText(text, limit: 15).description == String(repeating: "\\n", count: 10) + "éé…(210 bytes)")
    }

    /// Found by a hostile helper: a client id `victim address=10.6.6.6:1883` wrote a second
    /// `address=` field into every line of its connection.
    @Test("as a metadata value, text with a space, = or a quote is quoted, so it cannot read as more fields")
    func metadataValue() {
        #expect(LogText(value: "sensor-17").description == "sensor-17")
        #expect(LogText(value: "victim address=10.6.6.6:1883").description == "\"victim address=10.6.6.6:1883\"")
        #expect(LogText(value: "a\"b c\\").description == "\"a\\\"b c\\\\\"")
        #expect(LogText(value: "").description == "\"\"")
        #expect(LogText(value: "x=\ny").description == "\"x=\\\\ny\"")
        #expect(LogText(value: String(repeating: "a", count: 20), limit: 4).description == "\"aaaa…(20 bytes)\"")
    }
}
