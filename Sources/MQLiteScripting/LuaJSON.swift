import CLua
import Foundation

/// Lua values ⇄ Foundation JSON objects for `mqlite.json`. A table whose keys are all positive
/// integers is an array, with null for the missing items up to the largest; any other table is an
/// object (its keys must be strings); an empty table is `{}`. JSON null decodes to nil.
enum LuaJSON {
    /// The largest index of a table encoded as an array (its holes become nulls).
    static let maxArrayLength = 1 << 20

    static func toJSON(_ L: LuaState, _ index: Int32, depth: Int) throws(HookResultError) -> Any {
        guard depth < 64 else { throw HookResultError("nesting deeper than 64 (a cycle?)") }
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
                    length = max(length, Int(i))
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

    static func push(_ L: LuaState, _ value: Any) {
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
            lua_createtable(L, Int32(array.count), 0)
            for (i, item) in array.enumerated() {
                push(L, item)
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
        case let object as [String: Any]:
            lua_createtable(L, 0, Int32(object.count))
            for (key, item) in object {
                push(L, item)
                lua_setfield(L, -2, key)
            }
        default:
            lua_pushnil(L)
        }
    }
}
