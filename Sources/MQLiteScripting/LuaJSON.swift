import CLua
import Foundation

/// Lua values ⇄ Foundation JSON objects for `mqlite.json`. A table whose keys are all positive
/// integers is an array, with null for the missing items up to the largest; any other table is an
/// object (its keys must be strings); an empty table is `{}`. JSON null decodes to nil.
///
/// Nesting is limited to `maxDepth` levels both ways, which bounds every recursion here (and
/// Foundation's parser, which never sees deeper text); each level makes room on the Lua stack
/// before it pushes (Lua guarantees only LUA_MINSTACK = 20 free slots to a C function).
enum LuaJSON {
    /// Most nested arrays/objects (tables) in a value that is encoded or decoded.
    static let maxDepth = 64
    /// The largest index of a table encoded as an array (its holes become nulls).
    static let maxArrayLength = 1 << 20

    static func toJSON(_ L: LuaState, _ index: Int32, depth: Int) throws(HookResultError) -> Any {
        let index = lua_absindex(L, index)
        switch lua_type(L, index) {
        case LUA_TNIL, LUA_TNONE: return NSNull()
        case LUA_TBOOLEAN: return NSNumber(value: lua_toboolean(L, index) != 0)
        case LUA_TNUMBER:
            if lua_isinteger(L, index) != 0 { return NSNumber(value: lua_tointegerx(L, index, nil)) }
            let d = lua_tonumberx(L, index, nil)
            guard d.isFinite else { throw HookResultError("cannot encode \(d)") }
            return NSNumber(value: d)
        case LUA_TSTRING:
            guard let s = String(validating: L.rawBytes(at: index)!, as: UTF8.self) else {
                throw HookResultError("string is not UTF-8")
            }
            return s
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
                var array: [Any] = []
                array.reserveCapacity(length)
                for i in 1...length {
                    lua_rawgeti(L, index, lua_Integer(i))
                    defer { mqlite_pop(L, 1) }
                    array.append(try toJSON(L, -1, depth: depth + 1))
                }
                return array
            }
            guard allStrings else { throw HookResultError("table mixes list items and non-string keys") }
            var object: [String: Any] = [:]
            lua_pushnil(L)
            while lua_next(L, index) != 0 {
                let key = L.string(at: -2)!
                let value: Any
                do {
                    value = try toJSON(L, -1, depth: depth + 1)
                } catch {
                    mqlite_pop(L, 2)
                    throw error
                }
                object[key] = value
                mqlite_pop(L, 1)
            }
            return object
        default:
            throw HookResultError("cannot encode a \(String(cString: lua_typename(L, lua_type(L, index))))")
        }
    }

    /// The deepest nesting of arrays and objects in JSON `text` (brackets outside strings),
    /// counted without recursion; stops as soon as it passes `limit`.
    static func nestingDepth(_ text: UnsafeRawBufferPointer, limit: Int) -> Int {
        var depth = 0
        var deepest = 0
        var inString = false
        var escaped = false
        for byte in text {
            if inString {
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                }
                continue
            }
            switch byte {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "["), UInt8(ascii: "{"):
                depth += 1
                if depth > deepest {
                    deepest = depth
                    if deepest > limit { return deepest }
                }
            case UInt8(ascii: "]"), UInt8(ascii: "}"): depth -= 1
            default: break
            }
        }
        return deepest
    }

    /// Pushes a decoded value. Its nesting was checked (at most `maxDepth`) before parsing; the
    /// depth is checked again so that the recursion is bounded whatever the parser returned.
    static func push(_ L: LuaState, _ value: Any, depth: Int = 0) throws(HookResultError) {
        switch value {
        case let s as String:
            L.push(s)
        case let n as NSNumber:
            let type = String(cString: n.objCType)
            if type == "c" || type == "B" {
                lua_pushboolean(L, n.boolValue ? 1 : 0)
            } else if type == "d" || type == "f" {
                lua_pushnumber(L, n.doubleValue)
            } else {
                lua_pushinteger(L, n.int64Value)
            }
        case let array as [Any]:
            guard depth < maxDepth else { throw HookResultError("nesting deeper than \(maxDepth)") }
            guard lua_checkstack(L, 3) != 0 else { throw HookResultError("Lua stack exhausted") }
            lua_createtable(L, Int32(clamping: array.count), 0)
            for (i, item) in array.enumerated() {
                do { try push(L, item, depth: depth + 1) } catch { mqlite_pop(L, 1); throw error }
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
        case let object as [String: Any]:
            guard depth < maxDepth else { throw HookResultError("nesting deeper than \(maxDepth)") }
            guard lua_checkstack(L, 3) != 0 else { throw HookResultError("Lua stack exhausted") }
            lua_createtable(L, 0, Int32(clamping: object.count))
            for (key, item) in object {
                L.push(key)
                do { try push(L, item, depth: depth + 1) } catch { mqlite_pop(L, 2); throw error }
                lua_rawset(L, -3)
            }
        default:
            lua_pushnil(L)
        }
    }
}
