import MQLiteBroker
import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// `mqlite.on_deliver`: one publish, a different message per subscriber.
@Suite("Lua: on_deliver")
struct DeliverHookTests {
    static let script = """
        mqlite.on_deliver("per/#", function(d)
          mqlite.kv.incr("deliver_calls")
          if d.client_id == "blocked" then return false end
          if d.client_id == "upper" then return { payload = string.upper(d.payload) } end
          if d.client_id == "moved" then return { topic = "moved/" .. d.topic, payload = d.payload .. " for " .. d.client_id .. "/" .. (d.username or "-") .. " q" .. d.qos } end
          return nil
        end)
        mqlite.on_publish("stats", function(m) return { payload = tostring(mqlite.kv.get("deliver_calls") or 0) } end)
        """

    @Test("two subscribers get two payloads from one publish; false skips one; QoS 0 and 1; retained on SUBSCRIBE too")
    func perSubscriber() async throws {
        try await withScripts([Self.script]) { b, _, _ in
            let plain = try await b.client("plain")
            let upper = try await b.client("upper")
            let moved = try await b.client("moved", username: "mo")
            let blocked = try await b.client("blocked")
            for c in [plain, upper, moved, blocked] { try await c.subscribe("per/#", qos: .atLeastOnce) }
            let pub = try await b.client("pub")
            for qos in [QoS.atMostOnce, .atLeastOnce] {
                try await pub.publish("per/a", "hello", qos: qos, id: 5)  // waits for the PUBACK at QoS 1
                let p1 = try await plain.expectPublish()
                let p2 = try await upper.expectPublish()
                let p3 = try await moved.expectPublish()
                #expect(p1.topicString == "per/a" && payload(p1) == "hello" && p1.qos == qos)
                #expect(p2.topicString == "per/a" && payload(p2) == "HELLO" && p2.qos == qos)
                #expect(p3.topicString == "moved/per/a" && payload(p3) == "hello for moved/mo q\(qos.rawValue)" && p3.qos == qos)
                if qos == .atLeastOnce { for (c, p) in [(plain, p1), (upper, p2), (moved, p3)] { c.send(.puback(packetID: p.packetID!)) } }
            }
            try await blocked.expectNothing()

            // Retained messages sent on SUBSCRIBE pass through it as well.
            try await pub.publish("per/kept", "stay", retain: true)
            for c in [plain, upper, moved] { _ = try await c.expectPublish() }
            let late = try await b.client("upper2")
            try await late.subscribe("per/#")
            let retained = try await late.expectPublish()
            #expect(payload(retained) == "stay" && retained.retain)
            let lateUpper = try await b.client("upper")  // takes over "upper": a new connection
            try await lateUpper.subscribe("per/#")
            let r2 = try await lateUpper.expectPublish()
            #expect(payload(r2) == "STAY" && r2.retain)
        }
    }

    @Test("topics no on_deliver filter matches never enter Lua")
    func unmatchedTopics() async throws {
        try await withScripts([Self.script]) { b, _, _ in
            let sub = try await b.client("sub")
            try await sub.subscribe("#")
            let pub = try await b.client("pub")
            for i in 0..<50 { try await pub.publish("other/\(i % 3)", "x") }
            for _ in 0..<50 { _ = try await sub.expectPublish() }
            try await pub.publish("per/one", "y")
            _ = try await sub.expectPublish()
            try await pub.publish("stats", "")
            #expect(payload(try await sub.expectPublish()) == "1", "one call: the one matched delivery")
        }
    }

    @Test("a hook that publishes to a topic on_deliver hooks: the delivery hook runs after it, with its limits, never inside it")
    func publishFromHookThroughDeliverHook() async throws {
        let script = """
            mqlite.on_connected(function(c)
              if c.client_id == "trigger" then mqlite.publish("per/from-hook", "raw") end
            end)
            mqlite.on_deliver("per/#", function(d) return { payload = d.payload .. " via on_deliver" } end)
            """
        try await withScripts([script], configure: { $0.workers = 1 }) { b, host, _ in
            let sub = try await b.client("sub")
            try await sub.subscribe("per/#")
            _ = try await b.client("trigger")
            #expect(payload(try await sub.expectPublish()) == "raw via on_deliver")
            #expect(host.failureCount == 0)
        }
    }
}
