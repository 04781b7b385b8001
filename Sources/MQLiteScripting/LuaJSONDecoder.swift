import CLua
import Foundation

/// `mqlite.json.decode`: JSON text (RFC 8259, any value at the top) straight into Lua values, in
/// one pass without recursion (a stack of open arrays and objects, at most `LuaJSON.maxDepth`).
/// It replaced Foundation's parser, which took about half a second a megabyte here (a client's
/// 1 MB JSON payload, decoded by a script, held its worker that long) and built its objects
/// outside the script's `memory_limit`. Bounded as a Lua call is: every `checkEvery` values it
/// asks whether the call is over `time_limit` and whether the state is over `memory_limit`.
///
/// Arrays become tables 1...n, objects tables by key (the last of a repeated key wins), null
/// nil (a hole in an array, an absent key), numbers integers when written without fraction or
/// exponent and within Lua's integers, floats otherwise.
struct LuaJSONDecoder {
    private let L: LuaState
    private let text: UnsafeRawBufferPointer
    private let control: UnsafeMutablePointer<mqlite_control>
    private var i = 0
    private var values = 0
    private static let checkEvery = 1024

    private struct Frame {
        let isArray: Bool
        var count: lua_Integer = 0
    }

    /// A message for the script: what is wrong, and where.
    struct Failure: Error {
        let message: String
    }

    /// Pushes the value `text` holds (one slot), or throws with the stack as it was.
    static func decode(_ L: LuaState, _ text: UnsafeRawBufferPointer) throws(Failure) {
        let top = lua_gettop(L)
        var decoder = LuaJSONDecoder(L: L, text: text, control: mqlite_control_of(L)!)
        do {
            try decoder.run()
        } catch {
            lua_settop(L, top)
            throw error
        }
    }

    private mutating func fail(_ what: String) -> Failure {
        Failure(message: "invalid JSON: \(what) at byte \(i)")
    }

    private mutating func run() throws(Failure) {
        var frames: [Frame] = []
        skipSpace()
        while true {
            // A value.
            guard i < text.count else { throw fail("unexpected end") }
            values &+= 1
            if values % Self.checkEvery == 0 { try checkLimits() }
            switch text[i] {
            case UInt8(ascii: "["), UInt8(ascii: "{"):
                guard frames.count < LuaJSON.maxDepth else { throw Failure(message: "nesting deeper than \(LuaJSON.maxDepth)") }
                // The table, and for an object a key and its value above it.
                guard lua_checkstack(L, 4) != 0 else { throw Failure(message: "Lua stack exhausted") }
                let isArray = text[i] == UInt8(ascii: "[")
                lua_createtable(L, 0, 0)
                frames.append(Frame(isArray: isArray))
                i += 1
                skipSpace()
                if i < text.count, text[i] == UInt8(ascii: isArray ? "]" : "}") {
                    i += 1
                    frames.removeLast()
                } else {
                    if !isArray { try key() }
                    continue
                }
            case UInt8(ascii: "\""):
                try string()
            case UInt8(ascii: "t"): try literal("true") { lua_pushboolean($0, 1) }
            case UInt8(ascii: "f"): try literal("false") { lua_pushboolean($0, 0) }
            case UInt8(ascii: "n"): try literal("null") { lua_pushnil($0) }
            default:
                try number()
            }
            // A value is on the stack: into the open array or object, then what follows it.
            while true {
                guard !frames.isEmpty else {
                    skipSpace()
                    guard i == text.count else { throw fail("text after the value") }
                    return
                }
                if frames[frames.count - 1].isArray {
                    frames[frames.count - 1].count += 1
                    lua_rawseti(L, -2, frames[frames.count - 1].count)
                } else {
                    lua_rawset(L, -3)
                }
                skipSpace()
                guard i < text.count else { throw fail("unexpected end") }
                let isArray = frames[frames.count - 1].isArray
                if text[i] == UInt8(ascii: ",") {
                    i += 1
                    skipSpace()
                    if !isArray { try key() }
                    break
                }
                guard text[i] == UInt8(ascii: isArray ? "]" : "}") else { throw fail(isArray ? "expected , or ]" : "expected , or }") }
                i += 1
                frames.removeLast()
                // The closed table is the value now.
            }
        }
    }

    /// An object's key and the colon after it; the key is pushed.
    private mutating func key() throws(Failure) {
        guard i < text.count, text[i] == UInt8(ascii: "\"") else { throw fail("expected a string key") }
        try string()
        skipSpace()
        guard i < text.count, text[i] == UInt8(ascii: ":") else { throw fail("expected :") }
        i += 1
        skipSpace()
    }

    private mutating func checkLimits() throws(Failure) {
        if mqlite_overdue(control) != 0 { throw Failure(message: "time limit exceeded") }
        if mqlite_memory_remaining(control) == 0 { throw Failure(message: "over the script's memory_limit") }
    }

    private mutating func skipSpace() {
        while i < text.count {
            switch text[i] {
            case 0x20, 0x09, 0x0A, 0x0D: i += 1
            default: return
            }
        }
    }

    private mutating func literal(_ word: StaticString, _ push: (LuaState) -> Void) throws(Failure) {
        let count = word.utf8CodeUnitCount
        guard text.count - i >= count, memcmp(text.baseAddress! + i, word.utf8Start, count) == 0 else { throw fail("unknown word") }
        i += count
        push(L)
    }

    private mutating func number() throws(Failure) {
        let start = i
        var integral = true
        if i < text.count, text[i] == UInt8(ascii: "-") { i += 1 }
        // Digits: one 0, or a run not starting with 0.
        guard i < text.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(text[i]) else { throw fail("unexpected character") }
        if text[i] == UInt8(ascii: "0") { i += 1 } else { skipDigits() }
        if i < text.count, text[i] == UInt8(ascii: ".") {
            integral = false
            i += 1
            guard skipDigits() > 0 else { throw fail("digits expected after .") }
        }
        if i < text.count, text[i] | 0x20 == UInt8(ascii: "e") {
            integral = false
            i += 1
            if i < text.count, text[i] == UInt8(ascii: "+") || text[i] == UInt8(ascii: "-") { i += 1 }
            guard skipDigits() > 0 else { throw fail("digits expected in exponent") }
        }
        let digits = UnsafeRawBufferPointer(rebasing: text[start..<i])
        if integral, let value = Self.integer(digits) {
            lua_pushinteger(L, lua_Integer(value))
        } else {
            // Past Lua's integers, or with a fraction or exponent: a float (strtod, as Lua reads).
            let value = String(decoding: digits, as: UTF8.self).withCString { strtod($0, nil) }
            // (1e309 and beyond: not a number JSON can carry back out; encode refuses infinities.)
            guard value.isFinite else { throw fail("number out of range") }
            lua_pushnumber(L, value)
        }
    }

    /// `-?[0-9]+` as an Int64, or nil past its range.
    private static func integer(_ digits: UnsafeRawBufferPointer) -> Int64? {
        let negative = digits[0] == UInt8(ascii: "-")
        var value: Int64 = 0
        for byte in digits[(negative ? 1 : 0)...] {
            let (times10, o1) = value.multipliedReportingOverflow(by: 10)
            let digit = Int64(byte - UInt8(ascii: "0"))
            let (next, o2) = negative ? times10.subtractingReportingOverflow(digit) : times10.addingReportingOverflow(digit)
            if o1 || o2 { return nil }
            value = next
        }
        return value
    }

    @discardableResult
    private mutating func skipDigits() -> Int {
        let start = i
        while i < text.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(text[i]) { i += 1 }
        return i - start
    }

    /// A string (at its opening quote), pushed as its UTF-8 bytes, escapes resolved.
    private mutating func string() throws(Failure) {
        i += 1
        let start = i
        // The usual string: no escape, pushed from the text itself.
        while i < text.count, text[i] != UInt8(ascii: "\""), text[i] != UInt8(ascii: "\\"), text[i] >= 0x20 { i += 1 }
        guard i < text.count else { throw fail("unterminated string") }
        if text[i] == UInt8(ascii: "\"") {
            let bytes = UnsafeRawBufferPointer(rebasing: text[start..<i])
            guard LuaJSON.isUTF8(bytes) else { throw fail("string is not UTF-8") }
            i += 1
            L.push(bytes: bytes)
            return
        }
        var out = [UInt8](UnsafeRawBufferPointer(rebasing: text[start..<i]))
        while true {
            guard i < text.count else { throw fail("unterminated string") }
            let byte = text[i]
            switch byte {
            case UInt8(ascii: "\""):
                i += 1
                let valid = out.withUnsafeBytes { bytes in
                    guard LuaJSON.isUTF8(bytes) else { return false }
                    L.push(bytes: bytes)
                    return true
                }
                guard valid else { throw fail("string is not UTF-8") }
                return
            case UInt8(ascii: "\\"):
                i += 1
                guard i < text.count else { throw fail("unterminated string") }
                let escape = text[i]
                i += 1
                switch escape {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(escape)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if (0xD800..<0xDC00).contains(scalar) {
                        // A high surrogate: its low one must follow.
                        guard text.count - i >= 6, text[i] == UInt8(ascii: "\\"), text[i + 1] == UInt8(ascii: "u") else { throw fail("lone surrogate") }
                        i += 2
                        let low = try hex4()
                        guard (0xDC00..<0xE000).contains(low) else { throw fail("lone surrogate") }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00..<0xE000).contains(scalar) {
                        throw fail("lone surrogate")
                    }
                    out.append(contentsOf: String(Character(Unicode.Scalar(scalar)!)).utf8)
                default:
                    throw fail("unknown escape")
                }
            case 0..<0x20:
                throw fail("control character in a string")
            default:
                out.append(byte)
                i += 1
            }
        }
    }

    private mutating func hex4() throws(Failure) -> UInt32 {
        guard text.count - i >= 4 else { throw fail("short \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let c = text[i]
            let digit: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = c - UInt8(ascii: "A") + 10
            default: throw fail("bad \\u escape")
            }
            value = value << 4 | UInt32(digit)
            i += 1
        }
        return value
    }
}
