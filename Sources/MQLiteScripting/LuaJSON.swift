import CLua
import Foundation

/// Lua values ⇄ JSON for `mqlite.json` (encoding writes the text directly; decoding is
/// `LuaJSONDecoder`). A table whose keys are all positive
/// integers is an array, with null for the missing items up to the largest; any other table is an
/// object (its keys must be strings); an empty table is `{}`. JSON null decodes to nil.
///
/// Nesting is limited to `maxDepth` levels both ways, which bounds the recursion here (the
/// decoder does not recurse); each level makes room on the Lua stack before it pushes (Lua guarantees only LUA_MINSTACK = 20 free slots to a C function).
enum LuaJSON {
    /// Most nested arrays/objects (tables) in a value that is encoded or decoded.
    static let maxDepth = 64
    /// The largest index of a table encoded as an array (its holes become nulls).
    static let maxArrayLength = 1 << 20

    /// The JSON text of the value at `index`, written straight from the Lua value (no Foundation
    /// objects on the way: `mqlite.json.encode` is on the publish path of envelope plugins and on
    /// the connect path of HTTP auth). Numbers as Swift prints them (integers as integers, floats
    /// in their shortest form, `1.0` as `1`); strings must be UTF-8 and are escaped as JSON
    /// requires (`"`, `\\`, and control characters; `/` and non-ASCII as they are); object keys
    /// in byte order.
    ///
    /// Bounded as a Lua call is: the text may not outgrow what the script's `memory_limit` has
    /// left (the string it becomes counts there), and the call's `time_limit` ends it. A table
    /// that holds one other table twice, level after level (`t = {t, t}`), doubles the text at
    /// each level: without the bound, 12 levels of 1 MiB strings made 4 GiB outside the budget.
    static func encode(_ L: LuaState, _ index: Int32) throws(HookResultError) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(128)
        let control = mqlite_control_of(L)!
        var bound = Bound(control: control, maxBytes: Int(clamping: mqlite_memory_remaining(control)))
        try write(L, lua_absindex(L, index), depth: 0, into: &out, &bound)
        return out
    }

    /// What one `encode` may still do: text bytes, and (every `checkEvery` values) the clock.
    private struct Bound {
        let control: UnsafeMutablePointer<mqlite_control>
        let maxBytes: Int
        var values = 0
        static let checkEvery = 1024

        mutating func check(_ out: [UInt8]) throws(HookResultError) {
            guard out.count <= maxBytes else {
                throw HookResultError("the text would be over the memory the script has left (\(maxBytes) bytes)")
            }
            values &+= 1
            if values % Self.checkEvery == 0, mqlite_overdue(control) != 0 { throw HookResultError("time limit exceeded") }
        }
    }

    private static func write(_ L: LuaState, _ index: Int32, depth: Int, into out: inout [UInt8], _ bound: inout Bound) throws(HookResultError) {
        try bound.check(out)
        switch lua_type(L, index) {
        case LUA_TNIL, LUA_TNONE:
            out.append(contentsOf: "null".utf8)
        case LUA_TBOOLEAN:
            out.append(contentsOf: (lua_toboolean(L, index) != 0 ? "true" : "false").utf8)
        case LUA_TNUMBER:
            if lua_isinteger(L, index) != 0 {
                out.append(contentsOf: String(lua_tointegerx(L, index, nil)).utf8)
            } else {
                let d = lua_tonumberx(L, index, nil)
                guard d.isFinite else { throw HookResultError("cannot encode \(d)") }
                var text = d.description
                if text.hasSuffix(".0") { text.removeLast(2) }
                out.append(contentsOf: text.utf8)
            }
        case LUA_TSTRING:
            let bytes = L.rawBytes(at: index)!
            guard isUTF8(bytes) else { throw HookResultError("string is not UTF-8") }
            writeString(bytes, into: &out)
        case LUA_TTABLE:
            guard depth < maxDepth else { throw HookResultError("nesting deeper than \(maxDepth) (a cycle?)") }
            // lua_next needs two slots, the recursion one more.
            guard lua_checkstack(L, 4) != 0 else { throw HookResultError("Lua stack exhausted") }
            var count = 0
            var allStrings = true
            // Keys all positive integers: an array, its missing items null (JSON null decodes to
            // nil, so a decoded array with nulls is a table with holes).
            var allPositiveIntegers = true
            var length = 0
            lua_pushnil(L)
            while lua_next(L, index) != 0 {
                count += 1
                if lua_type(L, -2) != LUA_TSTRING { allStrings = false }
                if lua_isinteger(L, -2) != 0, case let i = lua_tointegerx(L, -2, nil), i >= 1 {
                    length = max(length, Int(clamping: i))
                } else {
                    allPositiveIntegers = false
                }
                mqlite_pop(L, 1)
            }
            if count > 0 && allPositiveIntegers {
                guard length <= maxArrayLength else { throw HookResultError("array index \(length) is past \(maxArrayLength)") }
                out.append(UInt8(ascii: "["))
                for i in 1...length {
                    if i > 1 { out.append(UInt8(ascii: ",")) }
                    lua_rawgeti(L, index, lua_Integer(i))
                    defer { mqlite_pop(L, 1) }
                    try write(L, lua_gettop(L), depth: depth + 1, into: &out, &bound)
                }
                out.append(UInt8(ascii: "]"))
                return
            }
            guard allStrings else { throw HookResultError("table mixes list items and non-string keys") }
            var keys: [[UInt8]] = []
            keys.reserveCapacity(count)
            lua_pushnil(L)
            while lua_next(L, index) != 0 {
                keys.append(Array(L.rawBytes(at: -2)!))
                mqlite_pop(L, 1)
            }
            keys.sort { $0.lexicographicallyPrecedes($1) }
            out.append(UInt8(ascii: "{"))
            for (i, key) in keys.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                // A key that is not UTF-8 is written with its bad bytes replaced (U+FFFD).
                key.withUnsafeBytes { bytes in
                    if isUTF8(bytes) {
                        writeString(bytes, into: &out)
                    } else {
                        var repaired = String(decoding: bytes, as: UTF8.self)
                        repaired.withUTF8 { writeString(UnsafeRawBufferPointer($0), into: &out) }
                    }
                    L.push(bytes: bytes)
                }
                out.append(UInt8(ascii: ":"))
                lua_rawget(L, index)
                defer { mqlite_pop(L, 1) }
                try write(L, lua_gettop(L), depth: depth + 1, into: &out, &bound)
            }
            out.append(UInt8(ascii: "}"))
        default:
            throw HookResultError("cannot encode a \(String(cString: lua_typename(L, lua_type(L, index))))")
        }
    }

    static func isUTF8(_ bytes: UnsafeRawBufferPointer) -> Bool {
        if !bytes.contains(where: { $0 >= 0x80 }) { return true }
        return String(validating: bytes, as: UTF8.self) != nil
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)

    /// A JSON string of UTF-8 `bytes`.
    private static func writeString(_ bytes: UnsafeRawBufferPointer, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "\""): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\"")])
            case UInt8(ascii: "\\"): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\")])
            case 0x0A: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "t")])
            case 0x08: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "b")])
            case 0x0C: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "f")])
            case 0..<0x20:
                out.append(contentsOf: "\\u00".utf8)
                out.append(hexDigits[Int(byte >> 4)])
                out.append(hexDigits[Int(byte & 0xF)])
            default: out.append(byte)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}
