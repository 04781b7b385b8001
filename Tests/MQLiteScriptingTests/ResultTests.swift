import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

@Suite("Lua hardening: hostile return values")
struct HostileResultTests {
    @Test("results with metatables (__index that errors or loops, __len, __pairs) are bad returns: logged, counted, on_error applies; nothing crashes or hangs")
    func metatables() async throws {
        let script = """
            local raising = setmetatable({}, { __index = function() error("x") end })
            local looping = setmetatable({}, { __index = function() while true do end end })
            mqlite.on_authorize(function(c)
              if c.client_id == "raise" then return setmetatable({}, { __index = function() error("x") end }) end
              if c.client_id == "loop" then return setmetatable({}, { __index = function() while true do end end }) end
              if c.client_id == "listmeta" then return { publish = setmetatable({}, { __len = function() return 5 end, __index = function() error("x") end }) } end
              return nil
            end)
            mqlite.on_subscribe(function(s)
              if s.filter == "raise" then return raising end
              if s.filter == "loop" then return looping end
              return nil
            end)
            mqlite.on_publish("p/#", function(m)
              if m.topic == "p/raise" then return raising end
              if m.topic == "p/loop" then return looping end
              if m.topic == "p/list" then return { setmetatable({}, { __pairs = function() error("x") end, __index = function() error("y") end }) } end
              return true
            end)
            """
        try await withScripts([script], configure: { $0.scripting.onError = .allow }) { b, host, _ in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("#")
            // on_authorize: a table with a metatable denies everything (a malformed ACL), even with on_error = allow.
            for id in ["raise", "loop", "listmeta"] {
                let c = try await b.client(id)
                #expect(try await c.subscribe([("any/#", .atMostOnce)]) == [.failure], "\(id)")
                try await c.publish("any/topic", "x")
                try await c.ping()
            }
            try await watcher.expectNothing()
            #expect(host.failureCount == 3)
            // on_subscribe and on_publish: bad returns (SUBACK 0x80 would need on_error = deny; with allow it is no opinion).
            let c = try await b.client("c")
            #expect(try await c.subscribe([("raise", .atMostOnce), ("loop", .atMostOnce)]) == [.granted(.atMostOnce), .granted(.atMostOnce)])
            #expect(host.failureCount == 5)
            for topic in ["p/raise", "p/loop", "p/list"] { try await c.publish(topic, "dropped") }
            try await c.publish("p/fine", "delivered")
            let got = try await watcher.expectPublish()
            #expect(got.topicString == "p/fine")
            #expect(host.failureCount == 8)
            try await eventually("log") { b.logMessages.contains { $0.contains("must be a plain table, not one with a metatable") } }
        }
    }
}

@Suite("Lua hardening: malformed ACL tables")
struct MalformedACLTests {
    @Test("a malformed on_authorize table (unknown key, wrong type, invalid filter, not a table) denies everything, even with on_error = allow; a runtime error still follows on_error")
    func malformedDeniesAll() async throws {
        let script = """
            mqlite.on_authorize(function(c)
              if c.client_id == "typo" then return { publsh = { "#" } } end
              if c.client_id == "type" then return { publish = "#" } end
              if c.client_id == "item" then return { subscribe = { 42 } } end
              if c.client_id == "filter" then return { publish = { "a/#/b" } } end
              if c.client_id == "number" then return 42 end
              if c.client_id == "error" then error("runtime failure") end
              return nil
            end)
            """
        for policy in [ScriptingConfiguration.OnError.allow, .deny] {
            try await withScripts([script], configure: { $0.scripting.onError = policy }) { b, host, _ in
                let watcher = try await b.client("watcher")
                try await watcher.subscribe("#")
                for id in ["typo", "type", "item", "filter", "number"] {
                    let c = try await b.client(id)
                    #expect(try await c.subscribe([("#", .atMostOnce), ("a/b", .atMostOnce)]) == [.failure, .failure], "\(id) \(policy)")
                    try await c.publish("a/b", "from \(id)", qos: .atLeastOnce)
                    try await c.publish("\(id)/x", "from \(id)")
                    try await c.ping()
                }
                try await watcher.expectNothing()
                #expect(host.failureCount == 5)
                try await eventually("log") { b.logMessages.contains { $0.contains("publsh") && $0.contains("may do nothing") } }
                // A runtime error follows on_error: allow = no restriction, deny = nothing allowed.
                let failing = try await b.client("error")
                let expected: [SubackReturnCode] = policy == .allow ? [.granted(.atMostOnce)] : [.failure]
                #expect(try await failing.subscribe([("a/b", .atMostOnce)]) == expected, "\(policy)")
                try await failing.publish("a/b", "runtime")
                if policy == .allow {
                    #expect(payload(try await watcher.expectPublish()) == "runtime")
                } else {
                    try await failing.ping()
                    try await watcher.expectNothing()
                }
            }
        }
    }
}

@Suite("Lua hardening: bytes that are not UTF-8")
struct NotUTF8Tests {
    @Test("a topic or filter from a script that is not UTF-8 is refused (not turned into U+FFFD, where two topics would become one); topic_matches says false")
    func refused() async throws {
        let script = """
            mqlite.on_authorize(function(c)
              if c.client_id == "acl" then return { publish = { "a/\\xff" } } end
              return nil
            end)
            mqlite.on_publish("in/#", function(m)
              if m.topic == "in/rewrite" then return { topic = "out/\\xff", payload = m.payload } end
              if m.topic == "in/publish" then
                local ok, err = pcall(mqlite.publish, "out/\\xfe", "x")
                local matches = mqlite.topic_matches("out/\\xff", "out/\\xfe") or mqlite.topic_matches("out/+", "out/\\xff")
                return { topic = "out/answer", payload = tostring(ok) .. " " .. tostring(matches) .. " " .. tostring(err) }
              end
              return true
            end)
            """
        try await withScripts([script]) { b, host, _ in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("#")
            let c = try await b.client("c")
            try await c.publish("in/rewrite", "dropped")
            try await c.publish("in/publish", "")
            let answer = try await watcher.expectPublish()
            #expect(answer.topicString == "out/answer")
            #expect(payload(answer).hasPrefix("false false "), "\(payload(answer))")
            #expect(payload(answer).contains("not UTF-8"), "\(payload(answer))")
            try await c.ping()
            try await watcher.expectNothing()
            #expect(host.failureCount == 1)
            try await eventually("log") { b.logMessages.contains { $0.contains("topic must be UTF-8 text") } }
            // An ACL with such a filter is malformed: it allows nothing.
            let acl = try await b.client("acl")
            #expect(try await acl.subscribe([("a/b", .atMostOnce)]) == [.failure])
            #expect(host.failureCount == 2)
        }
    }
}

@Suite("Lua hardening: malformed message tables")
struct MalformedMessageTests {
    @Test("an on_publish or on_deliver result with an unknown key (a typo), a key that is not a name, a QoS given as a string, or a list with a hole or a named key is a failed call, not half-read; `return m` still works")
    func refused() async throws {
        let script = """
            mqlite.on_publish("in/#", function(m)
              if m.topic == "in/typo" then return { topc = "out/typo" } end
              if m.topic == "in/numberkey" then return { topic = "out/n", [2.5] = true } end
              if m.topic == "in/qosstring" then return { topic = "out/q", qos = "1" } end
              if m.topic == "in/hole" then return { { topic = "out/1" }, nil, { topic = "out/3" } } end
              if m.topic == "in/named" then return { { topic = "out/1" }, topic = "out/named" } end
              if m.topic == "in/same" then m.topic = "out/same"; return m end
              if m.topic == "in/list" then return { { topic = "out/a" }, { topic = "out/b" } } end
              return true
            end)
            mqlite.on_deliver("d/#", function(d)
              if d.client_id == "typo" then return { paylod = "changed" } end
              return nil
            end)
            """
        try await withScripts([script]) { b, host, _ in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("out/#")
            let c = try await b.client("c")
            for topic in ["in/typo", "in/numberkey", "in/qosstring", "in/hole", "in/named"] { try await c.publish(topic, "x") }
            try await c.publish("in/same", "kept")
            var got = try await watcher.expectPublish()
            #expect(got.topicString == "out/same" && payload(got) == "kept")
            try await c.publish("in/list", "x")
            got = try await watcher.expectPublish()
            #expect(got.topicString == "out/a")
            got = try await watcher.expectPublish()
            #expect(got.topicString == "out/b")
            try await c.ping()
            try await watcher.expectNothing()
            #expect(host.failureCount == 5)
            try await eventually("log") { b.logMessages.contains { $0.contains("unknown key \"topc\"") } }
            // on_deliver: a failed call does not deliver to that subscriber.
            let typo = try await b.client("typo")
            try await typo.subscribe("d/#")
            try await c.publish("d/x", "x")
            try await typo.ping()
            try await typo.expectNothing()
            #expect(host.failureCount == 6)
        }
    }
}
