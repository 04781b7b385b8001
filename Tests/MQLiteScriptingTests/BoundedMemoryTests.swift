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
}
