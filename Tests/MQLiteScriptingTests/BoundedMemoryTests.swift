import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

@Suite("Lua layer: bounded memory")
struct BoundedMemoryTests {
    @Test("the on_publish match cache stays within 1 MiB over many long topics, and does not keep topics that match no hook")
    func matchCacheBounded() async throws {
        let script = #"mqlite.on_publish("hooked/#", function(m) return nil end)"#
        try await withScripts([script], configure: { $0.workers = 1 }) { b, host, _ in
            let c = try await b.client("c")
            let long = String(repeating: "x", count: 16 * 1024)
            // 300 distinct topics of 16 KiB: 4.8 MiB of topics, all hooked.
            for i in 0..<300 {
                try await c.publish("hooked/\(i)/\(long)", "p", qos: .atLeastOnce)  // PUBACK once the hook ran
            }
            let hooked = host.publishMatchCacheBytes(worker: 0)
            #expect(hooked > 0 && hooked <= 1 << 20, "\(hooked) bytes")
            // Topics no hook matches are never kept.
            for i in 0..<100 {
                try await c.publish("other/\(i)/\(long)", "p", qos: .atLeastOnce)
            }
            #expect(host.publishMatchCacheBytes(worker: 0) == hooked)
            #expect(host.failureCount == 0)
        }
    }

    @Test("a hook whose error holds the payload, failing 1,000 times: one log line per 10 s with the suppressed count next, truncated, one rate-limit entry")
    func failureLogRateLimited() async throws {
        let script = #"mqlite.on_publish("err/#", function(m) error("bad payload: " .. m.payload) end)"#
        try await withScripts([script], configure: { $0.workers = 1 }) { b, host, _ in
            let c = try await b.client("c")
            let filler = String(repeating: "y", count: 4000)
            for i in 0..<1000 {
                try await c.publish("err/x", "payload-\(i)-\(filler)")
            }
            try await c.ping()
            #expect(host.failureCount == 1000)
            var lines = b.logMessages.filter { $0.contains("Lua hook failed") }
            #expect(lines.count == 1, "\(lines.count) lines")
            #expect(lines.allSatisfy { $0.utf8.count < 1024 }, "\(lines.map(\.utf8.count))")
            #expect(host.failureLogEntries <= 1, "\(host.failureLogEntries)")
            // Ten seconds later the next failure is logged, with the count of those suppressed.
            try await Task.sleep(for: .milliseconds(10_200))
            try await c.publish("err/x", "last")
            try await c.ping()
            lines = b.logMessages.filter { $0.contains("Lua hook failed") }
            #expect(lines.count == 2, "\(lines.count) lines")
            #expect(lines.last?.contains("999") == true, "\(lines.last ?? "")")
            #expect(host.failureLogEntries <= 1)
        }
    }

    @Test("mqlite.log truncates the script's message to 4 KB")
    func scriptLogTruncated() async throws {
        let script = #"mqlite.on_publish("log", function(m) mqlite.log("warning", "echo " .. string.rep(m.payload, 100000)) end)"#
        try await withScripts([script], configure: { $0.workers = 1 }) { b, host, _ in
            let c = try await b.client("c")
            try await c.publish("log", "ab", qos: .atLeastOnce)
            let lines = b.logMessages.filter { $0.contains("echo abab") }
            #expect(lines.count == 1)
            #expect(lines.allSatisfy { $0.utf8.count < 5000 }, "\(lines.map(\.utf8.count))")
            #expect(host.failureCount == 0)
        }
    }

    static let kvScript = """
        local big = string.rep("v", 1024 * 1024)
        mqlite.on_publish("kv/#", function(m)
          local op = m.topic:sub(4)
          local ok, err
          if op == "big" then ok, err = pcall(mqlite.kv.set, m.payload, big)
          elseif op == "fill" then
            local n = 0
            repeat n = n + 1; ok, err = pcall(mqlite.kv.set, "small" .. n, "x") until not ok or n > 100000
            return { topic = "res/fill", payload = tostring(n) .. " " .. tostring(err) }
          elseif op == "incr" then ok, err = pcall(mqlite.kv.incr, m.payload)
          elseif op == "delete" then ok, err = pcall(mqlite.kv.delete, m.payload)
          elseif op == "raw" then mqlite.kv.set(m.payload, big); ok = true
          elseif op == "ttl" then
            for i = 1, 20 do mqlite.kv.set(m.payload .. i, big, 0.001) end
            ok = true
          end
          return { topic = "res/" .. op, payload = ok and "ok" or tostring(err) }
        end)
        """

    @Test("kv: keys set with a 1 ms TTL are swept without being read; the byte count returns to ~0")
    func kvExpirySweep() async throws {
        try await withScripts([Self.kvScript], configure: { $0.workers = 1; $0.scripting.timeLimit = 5 }) { b, host, _ in
            let c = try await b.client("c")
            try await c.subscribe("res/#")
            for prefix in ["a", "b", "c"] {
                try await c.publish("kv/ttl", prefix)
                #expect(payload(try await c.expectPublish()) == "ok")
            }
            // 60 MiB were stored; no key is read again.
            try await eventually("expired keys swept", timeout: .seconds(10)) { host.kvBytes < 1024 }
            #expect(host.failureCount == 0)
        }
    }

    @Test("kv_max_bytes: a set (or an incr creating a key) past it fails with a Lua error; after a delete sets work again")
    func kvMaxBytes() async throws {
        try await withScripts([Self.kvScript], configure: {
            $0.workers = 1
            $0.scripting.timeLimit = 5
            $0.scripting.kvMaxBytes = 4 << 20
        }) { b, host, _ in
            let c = try await b.client("c")
            try await c.subscribe("res/#")
            func run(_ op: String, _ argument: String = "") async throws -> String {
                try await c.publish("kv/\(op)", argument)
                return payload(try await c.expectPublish())
            }
            #expect(try await run("incr", "counter") == "ok")
            for key in ["a", "b", "c"] { #expect(try await run("big", key) == "ok") }
            #expect(try await run("big", "d").contains("mqlite.kv: kv_max_bytes reached"))
            #expect(host.kvBytes <= 4 << 20)
            // Fill what is left with small keys, until refused.
            let fill = try await run("fill")
            #expect(fill.contains("kv_max_bytes reached"), "\(fill)")
            #expect(try await run("incr", "new counter").contains("kv_max_bytes reached"))
            #expect(try await run("incr", "counter") == "ok")  // an existing integer does not grow
            #expect(host.kvBytes <= 4 << 20, "\(host.kvBytes)")
            #expect(host.failureCount == 0)
            // Without pcall the error fails the hook call, as any other.
            try await c.publish("kv/raw", "e", qos: .atLeastOnce)
            #expect(host.failureCount == 1)
            try await eventually("log") { b.logMessages.contains { $0.contains("kv_max_bytes reached") } }
            #expect(try await run("delete", "a") == "ok")
            #expect(try await run("big", "d") == "ok")
        }
    }

    @Test("the config file reads kv_max_bytes (default 64 MiB), with its range")
    func kvConfigKey() throws {
        #expect(try ConfigFile.parse("", file: "t.conf").scripting.kvMaxBytes == 64 << 20)
        #expect(try ConfigFile.parse("[scripting]\nkv_max_bytes = 1048576\n", file: "t.conf").scripting.kvMaxBytes == 1 << 20)
        for bad in ["kv_max_bytes = 10", "kv_max_bytes = \"1\"", "kv_max_bytes = 68719476737"] {
            #expect(throws: ConfigError.self, "\(bad)") { try ConfigFile.parse("[scripting]\n\(bad)\n", file: "t.conf") }
        }
    }

    @Test("the config file reads http_connections (default 100), with its range")
    func httpConnectionsConfigKey() throws {
        #expect(try ConfigFile.parse("", file: "t.conf").scripting.httpConnections == 100)
        #expect(try ConfigFile.parse("[scripting]\nhttp_connections = 8\n", file: "t.conf").scripting.httpConnections == 8)
        for bad in ["http_connections = 0", "http_connections = \"8\"", "http_connections = 10001"] {
            #expect(throws: ConfigError.self, "\(bad)") { try ConfigFile.parse("[scripting]\n\(bad)\n", file: "t.conf") }
        }
    }
}
