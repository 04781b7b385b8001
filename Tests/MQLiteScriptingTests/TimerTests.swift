import Foundation
import MQLiteBroker
import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// `mqlite.every` and `mqlite.after`: scripts that act on their own, on worker 0's state.
@Suite("Lua timers")
struct TimerTests {
    /// Timers that keep coming due, each running to its limit: NIO runs the tasks that come due
    /// while it runs tasks before it polls the sockets, so 1,000 such timers held worker 0 for good.
    @Test("300 timers every 10 ms that each run to the instruction limit: worker 0's clients are still served")
    func busyTimersYield() async throws {
        let script = """
            for i = 1, 300 do
              mqlite.every(0.01, function() while true do end end)
              mqlite.after(0.01, function() while true do end end)
            end
            """
        try await withScripts([script], configure: { $0.workers = 1; $0.scripting.instructionLimit = 200_000 }) { b, host, _ in
            try await eventually("the timers run") { host.failureCount > 100 }
            let clock = ContinuousClock()
            let start = clock.now
            let c = try await b.client("c")
            try await c.subscribe("x")
            try await c.publish("x", "served")
            #expect(String(buffer: try await c.expectPublish().payload) == "served")
            for _ in 0..<5 { try await c.ping() }
            // ~0.1 s alone, a few seconds beside the other tests on two cores; never without.
            #expect(clock.now - start < .seconds(15), "\(clock.now - start)")
            let runs = host.failureCount
            try await eventually("the timers still run") { host.failureCount > runs + 100 }
        }
    }

    @Test("every 100 ms publishes in order from one state; after runs once; a failing run keeps the schedule")
    func everyAndAfter() async throws {
        let script = """
            local n, k = 0, 0
            mqlite.every(0.1, function()
              n = n + 1
              mqlite.publish("tick", tostring(n) .. "@" .. mqlite.worker)
            end)
            mqlite.every(0.1, function()
              k = k + 1
              if k == 1 then error("first run fails") end
              if k == 2 then mqlite.publish("tock", "second run", 0, true) end
            end)
            mqlite.after(0.25, function() mqlite.publish("once", "after", 0, true) end)
            """
        try await withScripts([script]) { b, host, _ in  // two workers: the timers run once, on worker 0
            let c = try await b.client("c")
            try await c.subscribe([("tick", .atMostOnce), ("tock", .atMostOnce), ("once", .atMostOnce)])
            var ticks: [String] = []
            var others: [String] = []
            let start = ContinuousClock.now
            // (Retained, as the timers start with the broker, maybe before this client subscribes.)
            for _ in 0..<200 where ticks.count < 6 || others.count < 2 {
                let p = try await c.expectPublish(timeout: .seconds(3))
                if p.topicString == "tick" { ticks.append(String(buffer: p.payload)) } else { others.append(String(buffer: p.payload)) }
            }
            let elapsed = ContinuousClock.now - start
            // Subscribed a little after the first runs: consecutive counts, all from worker 0.
            let counts = ticks.map { Int($0.split(separator: "@")[0])! }
            #expect(zip(counts, counts.dropFirst()).allSatisfy { $1 == $0 + 1 }, "\(ticks)")
            #expect(ticks.allSatisfy { $0.hasSuffix("@0") })
            #expect(elapsed < .seconds(3))
            #expect(others.sorted() == ["after", "second run"])
            #expect(host.failureCount == 1)
            // Nothing but ticks afterwards: "after" ran once, "second run" only once.
            for _ in 0..<5 { #expect(try await c.expectPublish().topicString == "tick") }
        }
    }

    @Test("timers can be registered only while the script loads; bad intervals are refused at load")
    func registration() async throws {
        let late = """
            mqlite.on_publish("late", function() mqlite.every(1, function() end) end)
            """
        try await withScripts([late]) { b, host, _ in
            let c = try await b.client("c")
            try await c.publish("late", "x")
            try await eventually("refused") { host.failureCount == 1 }
            try await eventually("logged") { b.logMessages.contains { $0.contains("timers can only be registered while the script loads") } }
        }
        for bad in ["mqlite.every(0, function() end)", "mqlite.after(-1, function() end)", "mqlite.every(1)", "mqlite.every('x', print)"] {
            let dir = try scriptFolder([bad])
            defer { try? FileManager.default.removeItem(at: dir) }
            var config = BrokerConfiguration(workers: 1, listeners: [])
            config.plugins = [PluginConfiguration(script: dir.appendingPathComponent("s0.lua").path)]
            #expect(throws: ScriptError.self, "\(bad)") { _ = try ScriptingHost(configuration: config, logger: .init(label: "t")) }
        }
    }

    @Test("a reload cancels the old state's timers and starts the new state's")
    func reload() async throws {
        let script = """
            local n = 0
            mqlite.every(0.05, function() n = n + 1; mqlite.publish("tick", tostring(n)) end)
            """
        try await withScripts([script]) { b, host, _ in
            let c = try await b.client("c")
            try await c.subscribe("tick")
            for _ in 0..<5 { _ = try await c.expectPublish() }
            try host.reload()
            // From here on the counts restart at 1 and never mix with the old state's.
            var seen: [Int] = []
            while seen.count < 8 {
                let n = Int(String(buffer: try await c.expectPublish().payload))!
                if seen.isEmpty && n != 1 { continue }  // old state's last runs before the switch
                seen.append(n)
            }
            #expect(seen == Array(1...8))
        }
    }
}
