import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// Loads `script` (with `options`) into a host with two workers, without a broker.
func loadScript(_ script: String, options: [String: ConfigValue] = [:], configure: (inout BrokerConfiguration) -> Void = { _ in }) throws -> ScriptingHost {
    let dir = try scriptFolder([script])
    defer { try? FileManager.default.removeItem(at: dir) }
    var config = BrokerConfiguration(workers: 2)
    config.baseDirectory = dir.path
    config.plugins = [PluginConfiguration(script: dir.appendingPathComponent("s0.lua").path, options: options)]
    configure(&config)
    return try ScriptingHost(configuration: config, logger: Logger(label: "test"))
}

/// `depth` levels of `ConfigValue` arrays around one integer.
private func nested(_ depth: Int) -> ConfigValue {
    var value = ConfigValue.int(7)
    for _ in 0..<depth { value = .array([value]) }
    return value
}

@Suite("Lua hardening: JSON and options nesting")
struct NestingTests {
    @Test("json.decode refuses nesting deeper than 64 with nil and a message (120, 200 and 100,000 levels), and decodes 64 levels")
    func deepDecode() throws {
        let script = """
            for _, depth in ipairs({200, 120, 100000, 65}) do
              local value, message = mqlite.json.decode(string.rep("[", depth) .. string.rep("]", depth))
              assert(value == nil, "decoded " .. depth .. " levels")
              assert(type(message) == "string" and message:find("deeper than 64"), tostring(message))
            end
            -- brackets inside strings do not count
            local s = mqlite.json.decode('["' .. string.rep("[", 1000) .. '"]')
            assert(#s[1] == 1000)
            local value = assert(mqlite.json.decode(string.rep("[", 63) .. "[7]" .. string.rep("]", 63)))
            for _ = 1, 63 do value = value[1] end
            assert(value[1] == 7, "64 levels decode")
            local object = assert(mqlite.json.decode(string.rep('{"a":', 64) .. "1" .. string.rep("}", 64)))
            for _ = 1, 63 do object = object.a end
            assert(object.a == 1)
            """
        _ = try loadScript(script)
    }

    @Test("json.encode of 64 nested tables works (the Lua stack is grown); 65 fail with a message, as does a cycle")
    func deepEncode() throws {
        let script = """
            local function nest(depth)
              local t = {7}
              for _ = 2, depth do t = {t} end
              return t
            end
            local text = mqlite.json.encode(nest(64))
            assert(text == string.rep("[", 64) .. "7" .. string.rep("]", 64), text)
            local objects = {}
            local cur = objects
            for _ = 1, 63 do cur.a = {}; cur = cur.a end
            assert(#mqlite.json.encode(objects) > 0)
            local ok, message = pcall(mqlite.json.encode, nest(65))
            assert(not ok and message:find("deeper than 64"), tostring(message))
            local cycle = {}
            cycle.self = cycle
            ok, message = pcall(mqlite.json.encode, cycle)
            assert(not ok and message:find("deeper than 64"), tostring(message))
            """
        _ = try loadScript(script)
    }

    @Test("plugin options nested 40 levels load; deeper than 64 is a load error naming the script, not a crash")
    func deepOptions() throws {
        let script = """
            local v = mqlite.options.deep
            for _ = 1, 40 do v = v[1] end
            assert(v == 7, "options reach 40 levels down")
            """
        _ = try loadScript(script, options: ["deep": nested(40)])
        do {
            _ = try loadScript("", options: ["deep": nested(100)])
            Issue.record("options 100 levels deep loaded")
        } catch {
            let error = try #require(error as? ScriptError)
            #expect(error.script.hasSuffix("s0.lua"))
            #expect(error.message.contains("deeper than 64"), "\(error.message)")
        }
    }

    @Test("the config file refuses plugin options deeper than 64 levels with the key named")
    func deepOptionsInConfigFile() throws {
        let deep = String(repeating: "[", count: 70) + "1" + String(repeating: "]", count: 70)
        let text = "[[plugin]]\nscript = \"x.lua\"\noptions = { deep = \(deep) }\n"
        #expect(throws: ConfigError.self) { try ConfigFile.parse(text, file: "t.conf") }
        do {
            _ = try ConfigFile.parse(text, file: "t.conf")
        } catch {
            #expect(error.key == "plugin[0].options.deep")
            #expect(error.problem.contains("deeper than 64"))
        }
        let shallow = String(repeating: "[", count: 30) + "1" + String(repeating: "]", count: 30)
        let config = try ConfigFile.parse("[[plugin]]\nscript = \"x.lua\"\noptions = { v = \(shallow) }\n", file: "t.conf")
        #expect(config.plugins.first?.options["v"] == nested(30).replacingInt(with: 1))
    }
}

private extension ConfigValue {
    func replacingInt(with n: Int) -> ConfigValue {
        switch self {
        case .int: return .int(n)
        case .array(let items): return .array(items.map { $0.replacingInt(with: n) })
        default: return self
        }
    }
}
