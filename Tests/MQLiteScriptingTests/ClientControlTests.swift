@testable import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// `mqlite.disconnect` and `mqlite.reauthorize`: a script acting on clients of any worker.
@Suite("Lua: disconnect and reauthorize clients")
struct ClientControlTests {
    @Test("mqlite.disconnect closes a client on the other worker, publishes its will, and says whether it was connected")
    func disconnectOnOtherWorker() async throws {
        let script = """
            mqlite.on_publish("admin/kick", function(m)
              local was = mqlite.disconnect(m.payload, "kicked")
              mqlite.publish("admin/result", m.payload .. "=" .. tostring(was))
              return false
            end)
            """
        try await withScripts([script]) { b, _, _ in
            let admin = try await b.client("admin")
            try await admin.subscribe("admin/result")
            try await admin.subscribe("wills/#")
            // A victim on the worker that does not own the admin's session.
            let adminWorker = try #require(b.broker.owner(ofClient: "admin"))
            var victim: TestClient?
            for i in 0..<8 where victim == nil {
                let c = try await b.client("victim", will: Will(topic: "wills/victim", payload: ByteBuffer(string: "gone \(i)"), qos: .atMostOnce, retain: false))
                if b.broker.owner(ofClient: "victim") != adminWorker { victim = c } else { await c.disconnect() }
            }
            let v = try #require(victim, "no connection landed on the other worker")
            try await admin.publish("admin/kick", "victim")
            var seen: [String] = []
            for _ in 0..<2 { seen.append(String(buffer: try await admin.expectPublish().payload)) }
            #expect(seen.contains("victim=true"))
            #expect(seen.contains { $0.hasPrefix("gone ") }, "the will is published, as on a connection loss")
            _ = try await v.expectClosed()
            try await eventually("logged") { b.logMessages.contains { $0.contains("disconnected by s0.lua: kicked") } }
            try await admin.publish("admin/kick", "nobody")
            #expect(String(buffer: try await admin.expectPublish().payload) == "nobody=false")
        }
    }

    @Test("mqlite.reauthorize runs on_authorize again: subscriptions the new rules do not allow are removed")
    func reauthorize() async throws {
        let script = """
            mqlite.on_authorize(function(c)
              if c.client_id == "admin" then return nil end
              if mqlite.kv.get("revoked:" .. c.client_id) then return { subscribe = { "public/#" }, publish = {} } end
              return { subscribe = { "public/#", "private/#" }, publish = {} }
            end)
            mqlite.on_publish("admin/revoke", function(m)
              mqlite.kv.set("revoked:" .. m.payload, true)
              mqlite.publish("admin/result", tostring(mqlite.reauthorize(m.payload)))
              return false
            end)
            """
        try await withScripts([script]) { b, _, _ in
            let admin = try await b.client("admin")
            try await admin.subscribe("admin/result")
            let dev = try await b.client("dev")
            #expect(try await dev.subscribe([("public/#", .atMostOnce), ("private/#", .atMostOnce)]) == [.granted(.atMostOnce), .granted(.atMostOnce)])
            try await admin.publish("private/a", "1")
            #expect(String(buffer: try await dev.expectPublish().payload) == "1")

            try await admin.publish("admin/revoke", "dev")
            #expect(String(buffer: try await admin.expectPublish().payload) == "true")
            try await eventually("subscription removed") { b.logMessages.contains { $0.contains("1 subscriptions removed") } }
            try await admin.publish("private/a", "2")
            try await admin.publish("public/a", "3")
            #expect(String(buffer: try await dev.expectPublish().payload) == "3", "private/# no longer delivered")
            #expect(try await dev.subscribe([("private/#", .atMostOnce)]) == [.failure])
        }
    }
}
