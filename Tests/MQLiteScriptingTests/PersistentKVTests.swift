import Foundation
import MQLiteBroker
@testable import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// `mqlite.kv` keys set with `{ persist = true }` survive a restart of the broker (`[persistence]`).
@Suite("mqlite.kv { persist = true }")
struct PersistentKVTests {
    static let script = """
        local keys = {"kept", "kept-ttl", "short", "plain", "counter", "dropped", "unkept", "bytes"}
        mqlite.on_publish("kv/#", function(m)
          local op = m.topic:sub(4)
          if op == "save" then
            mqlite.kv.set("kept", "v1", { persist = true })
            mqlite.kv.set("kept-ttl", 4.5, { ttl = 600, persist = true })
            mqlite.kv.set("short", true, { ttl = 1, persist = true })
            mqlite.kv.set("plain", "not kept")
            mqlite.kv.incr("counter", 5, { persist = true })
            mqlite.kv.incr("counter")
            mqlite.kv.set("dropped", "x", { persist = true })
            mqlite.kv.delete("dropped")
            mqlite.kv.set("unkept", "x", { persist = true })
            mqlite.kv.set("unkept", "y")
            mqlite.kv.set("bytes", "\\0\\255", { persist = true })
          end
          if op == "bad" then
            local ok, err = pcall(mqlite.kv.set, "k", 1, { persist = "yes" })
            local ok2, err2 = pcall(mqlite.kv.incr, "k", 1, 5)
            mqlite.publish("kv-out", tostring(ok) .. " " .. err .. " | " .. tostring(ok2) .. " " .. err2)
          else
            local out = {}
            for _, k in ipairs(keys) do
              local v = mqlite.kv.get(k)
              if k == "bytes" and v then v = #v .. ":" .. v:byte(1) .. ":" .. v:byte(2) end
              out[#out + 1] = k .. "=" .. tostring(v)
            end
            mqlite.publish("kv-out", table.concat(out, ","))
          end
          return false
        end)
        """

    static func run(_ b: BrokerFixture, _ op: String) async throws -> String {
        let sub = try await b.client("reader-\(op)")
        try await sub.subscribe("kv-out")
        let c = try await b.client("writer-\(op)")
        try await c.publish("kv/\(op)", "go", qos: .atLeastOnce)
        guard let p = try? await sub.expectPublish() else { throw TestFailure("no answer: \(b.logMessages.suffix(5))") }
        await c.disconnect()
        await sub.disconnect()
        return String(buffer: p.payload)
    }

    @Test("kept keys come back after a restart with their value, type and remaining ttl; others, expired, deleted and no-longer-kept ones do not; bad options are errors")
    func restart() async throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("mqlite-kv-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        do {
            let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
            try await withScripts([Self.script], configure: { $0.persistence = store }) { b, _, _ in
                #expect(try await Self.run(b, "save") == "kept=v1,kept-ttl=4.5,short=true,plain=not kept,counter=6,dropped=nil,unkept=y,bytes=2:0:255")
                let bad = try await Self.run(b, "bad")
                #expect(bad.hasPrefix("false ") && bad.contains("persist a boolean") && bad.contains("| false ") && bad.contains("{ persist = true }"), "\(bad)")
            }
            try await Task.sleep(for: .milliseconds(1100))  // "short" expires meanwhile
            try await withScripts([Self.script], configure: { $0.persistence = store }) { b, host, _ in
                let read = try await Self.run(b, "read")
                #expect(read == "kept=v1,kept-ttl=4.5,short=nil,plain=nil,counter=6,dropped=nil,unkept=nil,bytes=2:0:255")
                #expect(host.kvBytes > 0)
            }
        }
    }

    static let tokens = """
        mqlite.on_publish("kv/#", function(m)
          local op = m.topic:sub(4)
          if op == "save" then
            for i = 1, 3 do mqlite.kv.set("tok:" .. i, string.rep("x", 1000), { persist = true }) end
          elseif op == "delete" then
            mqlite.kv.delete("tok:2")
          end
          local out = {}
          for i = 1, 3 do out[#out + 1] = tostring(mqlite.kv.get("tok:" .. i) ~= nil) end
          mqlite.publish("kv-out", table.concat(out, ","))
          return false
        end)
        """

    @Test("kept keys past a kv_max_bytes lowered since are all loaded (logged), and a delete of one then stays deleted once the limit rises again")
    func loweredLimit() async throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("mqlite-kv-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let store = PersistenceConfiguration(path: folder + "/mqlite.db", sync: .full)
        try await withScripts([Self.tokens], configure: { $0.persistence = store }) { b, _, _ in
            let saved = try await Self.run(b, "save")
            #expect(saved == "true,true,true")
        }
        try await withScripts([Self.tokens], configure: { $0.persistence = store; $0.scripting.kvMaxBytes = 2048 }) { b, host, _ in
            let read = try await Self.run(b, "read")
            #expect(read == "true,true,true")
            #expect(host.kvBytes > 2048)
            #expect(b.logMessages.contains { $0.contains("kept keys loaded from the store") && $0.contains("kv_max_bytes = 2048") })
            let deleted = try await Self.run(b, "delete")
            #expect(deleted == "true,false,true")
        }
        try await withScripts([Self.tokens], configure: { $0.persistence = store }) { b, _, _ in
            let read = try await Self.run(b, "read")
            #expect(read == "true,false,true", "the deleted key came back")
        }
    }
}
