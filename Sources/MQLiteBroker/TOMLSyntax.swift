/// A strict check of TOML 1.0 syntax, run on a config file before TOMLKit parses it.
///
/// Why: toml++ 3.4.0 (the parser inside TOMLKit 0.6.0, the only version available) fails
/// assertions on some malformed files (`[#`, `o=[}`, `e=6979-05-27T:`; Fuzz/known/): a debug build
/// aborts and a release build runs into undefined behaviour, where the file deserved a syntax
/// error. Upstream: marzer/tomlplusplus#294. This check follows the grammar of TOML 1.0
/// (toml.abnf) and lets through only well-formed text; toml++ then reads that text and checks
/// what the grammar does not (a key defined twice, a table redefined, integers out of range).
///
/// It reads the UTF-8 bytes once, builds nothing, and keeps an explicit stack for nested arrays
/// and inline tables (no recursion per nesting level). Nesting is bounded: tables (from headers
/// and dotted keys), arrays and inline tables at most `maxDepth` deep, since toml++ frees what it
/// built recursively. It also refuses `\u0000`, valid TOML that TOMLKit would cut short at the
/// NUL (it hands strings over as C strings).
public enum TOMLSyntax {
    public struct Failure: Error, Equatable {
        public var line: Int
        public var column: Int
        public var problem: String
    }

    /// Most tables, arrays and inline tables nested in one another (`a.b = [[1]]` is 3 deep).
    public static let maxDepth = 100

    /// nil if `text` is well-formed TOML 1.0; otherwise where and why it is not.
    public static func check(_ text: String) -> Failure? {
        var scanner = Scanner(Array(text.utf8))
        do {
            try scanner.document()
            return nil
        } catch {
            return scanner.failure(error.problem)
        }
    }
}

private struct SyntaxError: Error {
    var problem: String
}

private struct Scanner {
    let bytes: [UInt8]
    var i = 0

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
        // A byte order mark at the very start is not part of the text.
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { i = 3 }
    }

    func failure(_ problem: String) -> TOMLSyntax.Failure {
        let end = min(i, bytes.count)
        var line = 1
        var lineStart = bytes.starts(with: [0xEF, 0xBB, 0xBF]) ? 3 : 0
        for index in 0..<end where bytes[index] == 0x0A {
            line += 1
            lineStart = index + 1
        }
        // Columns count characters, not bytes (UTF-8 continuation bytes are skipped).
        let column = bytes[lineStart..<end].count(where: { $0 & 0xC0 != 0x80 }) + 1
        return TOMLSyntax.Failure(line: line, column: column, problem: problem)
    }

    // MARK: Characters

    var atEnd: Bool { i >= bytes.count }
    var peek: UInt8? { i < bytes.count ? bytes[i] : nil }
    func peek(_ offset: Int) -> UInt8? { i + offset < bytes.count ? bytes[i + offset] : nil }

    func error(_ problem: String) -> SyntaxError { SyntaxError(problem: problem) }

    func describeNext() -> String {
        guard let c = peek else { return "the end of the file" }
        switch c {
        case 0x0A, 0x0D: return "the end of the line"
        case 0x20...0x7E: return "'\(Character(Unicode.Scalar(c)))'"
        default: return c < 0x80 ? "control character 0x\(String(c, radix: 16, uppercase: true))" : "a non-ASCII character"
        }
    }

    func unexpected(_ expected: String) -> SyntaxError {
        error("expected \(expected), found \(describeNext())")
    }

    static func isDigit(_ c: UInt8) -> Bool { c >= 0x30 && c <= 0x39 }
    static func isHexDigit(_ c: UInt8) -> Bool { isDigit(c) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66) }
    static func isBareKey(_ c: UInt8) -> Bool {
        isDigit(c) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2D || c == 0x5F
    }

    mutating func skipSpaces() {
        while let c = peek, c == 0x20 || c == 0x09 { i += 1 }
    }

    /// A line break (LF or CRLF) if one is next.
    mutating func newline() throws(SyntaxError) -> Bool {
        if peek == 0x0A { i += 1; return true }
        if peek == 0x0D {
            guard peek(1) == 0x0A else { i += 1; throw error("a carriage return must be followed by a line feed") }
            i += 2
            return true
        }
        return false
    }

    /// A comment, if one is next, up to (not including) the end of its line.
    mutating func comment() throws(SyntaxError) {
        guard peek == 0x23 else { return }
        i += 1
        while let c = peek, c != 0x0A, c != 0x0D {
            guard c == 0x09 || (c >= 0x20 && c != 0x7F) else { throw unexpected("comment text") }
            i += 1
        }
    }

    /// Blanks, comments and line breaks (inside arrays).
    mutating func skipBlankLines() throws(SyntaxError) {
        while true {
            skipSpaces()
            try comment()
            if try !newline() { return }
        }
    }

    /// After a key/value pair or a table header: blanks, a comment, then the end of the line.
    mutating func endOfLine() throws(SyntaxError) {
        skipSpaces()
        try comment()
        if atEnd { return }
        if try !newline() { throw unexpected("the end of the line") }
    }

    // MARK: Document

    mutating func document() throws(SyntaxError) {
        var tableDepth = 0  // of the last table header
        while !atEnd {
            skipSpaces()
            switch peek {
            case nil: return
            case 0x23, 0x0A, 0x0D: break
            case 0x5B: tableDepth = try tableHeader()
            default: try keyValue(depth: tableDepth)
            }
            try endOfLine()
        }
    }

    /// `[key]` or `[[key]]`; returns how deep the table is.
    mutating func tableHeader() throws(SyntaxError) -> Int {
        i += 1
        let arrayOfTables = peek == 0x5B
        if arrayOfTables { i += 1 }
        skipSpaces()
        let depth = try key()
        try checkDepth(depth)
        skipSpaces()
        guard peek == 0x5D else { throw unexpected("']' to close the table header") }
        i += 1
        if arrayOfTables {
            guard peek == 0x5D else { throw unexpected("']]' to close the array-of-tables header") }
            i += 1
        }
        return depth
    }

    func checkDepth(_ depth: Int) throws(SyntaxError) {
        guard depth <= TOMLSyntax.maxDepth else {
            throw error("tables, arrays and inline tables nested deeper than \(TOMLSyntax.maxDepth)")
        }
    }

    /// `key = value` in a table `depth` deep.
    mutating func keyValue(depth: Int) throws(SyntaxError) {
        let segments = try key()
        try checkDepth(depth + segments - 1)
        skipSpaces()
        guard peek == 0x3D else { throw unexpected("'=' after the key") }
        i += 1
        skipSpaces()
        try value(depth: depth + segments - 1)
    }

    /// A simple or dotted key; returns its number of parts.
    mutating func key() throws(SyntaxError) -> Int {
        var segments = 0
        while true {
            segments += 1
            switch peek {
            case 0x22: try basicString(multiline: false)
            case 0x27: try literalString(multiline: false)
            case let c? where Scanner.isBareKey(c):
                while let c = peek, Scanner.isBareKey(c) { i += 1 }
            default: throw unexpected("a key")
            }
            let save = i
            skipSpaces()
            guard peek == 0x2E else { i = save; return segments }
            i += 1
            skipSpaces()
        }
    }

    // MARK: Values

    private enum Container { case array, inlineTable }

    /// One value, in a table `depth` deep; arrays and inline tables nest through an explicit
    /// stack, each with its depth (an inline table's, for its current key, with the key's parts).
    mutating func value(depth: Int) throws(SyntaxError) {
        var stack: [(container: Container, depth: Int)] = []
        var depth = depth
        expectValue: while true {
            switch peek {
            case 0x5B:  // [
                try checkDepth(depth + 1)
                i += 1
                stack.append((.array, depth))
                depth += 1
                try skipBlankLines()
                if peek != 0x5D { continue expectValue }
                i += 1
                depth = stack.removeLast().depth
            case 0x7B:  // {
                try checkDepth(depth + 1)
                i += 1
                stack.append((.inlineTable, depth))
                skipSpaces()
                if peek != 0x7D {
                    depth = stack[stack.count - 1].depth + 1 + (try inlineKey()) - 1
                    try checkDepth(depth)
                    continue expectValue
                }
                i += 1
                depth = stack.removeLast().depth
            default:
                try scalar()
            }
            // After a value: close containers or go on to the next item.
            while let top = stack.last {
                switch top.container {
                case .array:
                    try skipBlankLines()
                    if peek == 0x2C {
                        i += 1
                        try skipBlankLines()
                        if peek != 0x5D { continue expectValue }
                    }
                    guard peek == 0x5D else { throw unexpected("',' or ']' in the array") }
                    i += 1
                    depth = stack.removeLast().depth
                case .inlineTable:
                    skipSpaces()
                    if peek == 0x2C {
                        i += 1
                        skipSpaces()
                        depth = top.depth + 1 + (try inlineKey()) - 1
                        try checkDepth(depth)
                        continue expectValue
                    }
                    guard peek == 0x7D else { throw unexpected("',' or '}' in the inline table (which must fit on one line)") }
                    i += 1
                    depth = stack.removeLast().depth
                }
            }
            return
        }
    }

    /// `key =` inside an inline table, up to the value; returns the key's number of parts.
    mutating func inlineKey() throws(SyntaxError) -> Int {
        let segments = try key()
        skipSpaces()
        guard peek == 0x3D else { throw unexpected("'=' after the key") }
        i += 1
        skipSpaces()
        return segments
    }

    /// A string, boolean, number, date or time.
    mutating func scalar() throws(SyntaxError) {
        switch peek {
        case 0x22: try basicString(multiline: peek(1) == 0x22 && peek(2) == 0x22)
        case 0x27: try literalString(multiline: peek(1) == 0x27 && peek(2) == 0x27)
        case 0x74, 0x66:  // t, f
            if bytes[i...].starts(with: Array("true".utf8)) { i += 4 }
            else if bytes[i...].starts(with: Array("false".utf8)) { i += 5 }
            else { throw unexpected("a value") }
        case let c? where Scanner.isDigit(c) || c == 0x2B || c == 0x2D || c == 0x69 || c == 0x6E:  // + - i n
            try numberOrDate()
        default:
            throw unexpected("a value")
        }
        // A value ends at a blank, a comment, a line break, or what closes or separates items.
        if let c = peek, ![0x20, 0x09, 0x0A, 0x0D, 0x23, 0x2C, 0x5D, 0x7D].contains(c) {
            throw unexpected("the end of the value")
        }
    }

    // MARK: Strings

    /// One character of a string's text (not a quote, backslash or line break).
    mutating func stringCharacter(literal: Bool) throws(SyntaxError) {
        let c = bytes[i]
        guard c == 0x09 || (c >= 0x20 && c != 0x7F) else {
            throw unexpected(literal ? "the literal string's closing quote" : "the string's closing quote")
        }
        i += 1
    }

    /// `\` and what follows, inside a basic string.
    mutating func escape(multiline: Bool) throws(SyntaxError) {
        i += 1
        guard let c = peek else { throw unexpected("an escape sequence") }
        switch c {
        case 0x62, 0x74, 0x6E, 0x66, 0x72, 0x22, 0x5C: i += 1  // b t n f r " \
        case 0x75, 0x55:  // u U
            let count = c == 0x75 ? 4 : 8
            i += 1
            var scalar: UInt32 = 0
            for _ in 0..<count {
                guard let d = peek, Scanner.isHexDigit(d) else { throw unexpected("\(count) hexadecimal digits after \\\(Character(Unicode.Scalar(c)))") }
                scalar = scalar << 4 | UInt32(d <= 0x39 ? d - 0x30 : (d | 0x20) - 0x61 + 10)
                i += 1
            }
            guard Unicode.Scalar(scalar) != nil else { throw error("\\\(Character(Unicode.Scalar(c))) escape of a value that is not a Unicode scalar") }
            // Valid TOML, but TOMLKit would silently cut the string at the NUL.
            guard scalar != 0 else { throw error("\\\(Character(Unicode.Scalar(c))) escape of NUL (U+0000) is not allowed in mqlite's config") }
        case 0x20, 0x09, 0x0A, 0x0D:
            // A line-ending backslash: blanks, a line break, then blanks and line breaks are skipped.
            guard multiline else { throw error("a backslash must start an escape sequence") }
            skipSpaces()
            guard try newline() else { throw unexpected("a line break after the line-ending backslash") }
            while true {
                skipSpaces()
                if try !newline() { break }
            }
        default:
            throw error("unknown escape sequence \\\(describeNext())")
        }
    }

    mutating func basicString(multiline: Bool) throws(SyntaxError) {
        i += multiline ? 3 : 1
        if multiline { _ = try newline() }
        while true {
            guard let c = peek else { throw unexpected("the string's closing quote") }
            switch c {
            case 0x22:
                if !multiline { i += 1; return }
                if try closesMultiline(quote: 0x22) { return }
            case 0x5C: try escape(multiline: multiline)
            case 0x0A, 0x0D:
                guard multiline, try newline() else { throw unexpected("the string's closing quote before the end of the line") }
            default: try stringCharacter(literal: false)
            }
        }
    }

    mutating func literalString(multiline: Bool) throws(SyntaxError) {
        i += multiline ? 3 : 1
        if multiline { _ = try newline() }
        while true {
            guard let c = peek else { throw unexpected("the literal string's closing quote") }
            switch c {
            case 0x27:
                if !multiline { i += 1; return }
                if try closesMultiline(quote: 0x27) { return }
            case 0x0A, 0x0D:
                guard multiline, try newline() else { throw unexpected("the literal string's closing quote before the end of the line") }
            default: try stringCharacter(literal: true)
            }
        }
    }

    /// A run of quotes inside a multi-line string: one or two are text, three to five close the
    /// string (the first one or two being text), more is an error.
    mutating func closesMultiline(quote: UInt8) throws(SyntaxError) -> Bool {
        var run = 0
        while peek == quote { run += 1; i += 1 }
        if run < 3 { return false }
        guard run <= 5 else { throw error("more than five quotes in a row end the multi-line string") }
        return true
    }

    // MARK: Numbers, dates and times

    /// Digits with single underscores between them (`1_000`); at least one digit.
    mutating func digits(_ isDigit: (UInt8) -> Bool, what: String) throws(SyntaxError) {
        guard let first = peek, isDigit(first) else { throw unexpected(what) }
        i += 1
        while let c = peek {
            if isDigit(c) { i += 1; continue }
            if c == 0x5F, let next = peek(1), isDigit(next) { i += 2; continue }
            if c == 0x5F { i += 1; throw error("an underscore in a number must be between two digits") }
            break
        }
    }

    /// Exactly `count` decimal digits, as a number.
    mutating func fixedDigits(_ count: Int, what: String) throws(SyntaxError) -> Int {
        var n = 0
        for _ in 0..<count {
            guard let c = peek, Scanner.isDigit(c) else { throw unexpected("\(count) digits for the \(what)") }
            n = n * 10 + Int(c - 0x30)
            i += 1
        }
        return n
    }

    func looksLikeDate() -> Bool {
        (0..<4).allSatisfy { peek($0).map(Scanner.isDigit) ?? false } && peek(4) == 0x2D
    }

    mutating func numberOrDate() throws(SyntaxError) {
        if looksLikeDate() { return try dateTime() }
        if looksLikeTime() { return try time() }
        let signed = peek == 0x2B || peek == 0x2D
        if signed { i += 1 }
        if bytes[i...].starts(with: Array("inf".utf8)) || bytes[i...].starts(with: Array("nan".utf8)) {
            i += 3
            return
        }
        if peek == 0x30, let prefix = peek(1), [0x78, 0x6F, 0x62].contains(prefix) {  // 0x 0o 0b
            guard !signed else { throw error("a hexadecimal, octal or binary integer takes no sign") }
            i += 2
            switch prefix {
            case 0x78: try digits(Scanner.isHexDigit, what: "hexadecimal digits")
            case 0x6F: try digits({ $0 >= 0x30 && $0 <= 0x37 }, what: "octal digits")
            default: try digits({ $0 == 0x30 || $0 == 0x31 }, what: "binary digits")
            }
            return
        }
        let start = i
        try digits(Scanner.isDigit, what: "a number")
        if bytes[start] == 0x30 && i - start > 1 { throw error("a decimal number must not start with a zero") }
        if peek == 0x2E {
            i += 1
            try digits(Scanner.isDigit, what: "digits after the decimal point")
        }
        if peek == 0x65 || peek == 0x45 {  // e E
            i += 1
            if peek == 0x2B || peek == 0x2D { i += 1 }
            try digits(Scanner.isDigit, what: "digits of the exponent")
        }
    }

    /// A date, then maybe a time (after `T`, `t` or one space) and an offset.
    mutating func dateTime() throws(SyntaxError) {
        let year = try fixedDigits(4, what: "year")
        i += 1  // '-', checked by looksLikeDate
        let month = try fixedDigits(2, what: "month")
        guard peek == 0x2D else { throw unexpected("'-' after the month") }
        i += 1
        let day = try fixedDigits(2, what: "day")
        guard (1...12).contains(month) else { throw error("month \(month) is not from 01 to 12") }
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
        let days = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1]
        guard (1...days).contains(day) else { throw error("day \(day) is not in month \(month) of \(year)") }
        switch peek {
        case 0x54, 0x74: i += 1  // T t
        case 0x20:
            // A space is the delimiter only when a time follows; otherwise the date ends there.
            guard looksLikeTime(offset: 1) else { return }
            i += 1
        default: return
        }
        try time()
        switch peek {
        case 0x5A, 0x7A: i += 1  // Z z
        case 0x2B, 0x2D:
            i += 1
            let hours = try fixedDigits(2, what: "offset hours")
            guard peek == 0x3A else { throw unexpected("':' in the time offset") }
            i += 1
            let minutes = try fixedDigits(2, what: "offset minutes")
            guard hours <= 23 && minutes <= 59 else { throw error("time offset \(hours):\(minutes) is out of range") }
        default: break
        }
    }

    /// `HH:` from `offset` on.
    func looksLikeTime(offset: Int = 0) -> Bool {
        (peek(offset).map(Scanner.isDigit) ?? false) && (peek(offset + 1).map(Scanner.isDigit) ?? false) && peek(offset + 2) == 0x3A
    }

    /// `HH:MM:SS` with an optional fraction.
    mutating func time() throws(SyntaxError) {
        let hour = try fixedDigits(2, what: "hour")
        guard peek == 0x3A else { throw unexpected("':' after the hour") }
        i += 1
        let minute = try fixedDigits(2, what: "minute")
        guard peek == 0x3A else { throw unexpected("':' after the minute (seconds are required)") }
        i += 1
        let second = try fixedDigits(2, what: "second")
        guard hour <= 23 && minute <= 59 && second <= 59 else { throw error("time \(hour):\(minute):\(second) is out of range") }
        if peek == 0x2E {
            i += 1
            guard let c = peek, Scanner.isDigit(c) else { throw unexpected("digits after the decimal point of the seconds") }
            while let c = peek, Scanner.isDigit(c) { i += 1 }
        }
    }
}
