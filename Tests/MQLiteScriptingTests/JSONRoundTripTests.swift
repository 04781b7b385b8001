import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import MQLiteTestSupport
import MQTTCore
import NIOCore
import Testing

/// Found by the json fuzz target: `mqlite.json.encode` refused what `mqlite.json.decode` made of an
/// array with a null in it (a Lua table with a hole), with "table mixes list items and non-string
/// keys". Tables whose keys are all positive integers now encode as arrays, holes as null.
@Suite("mqlite.json round trips")
struct JSONRoundTripTests {
    /// The payload an on_publish hook that runs `script` on `m.payload` hands back, or nil if the
    /// hook failed (the message is dropped).
    func transform(_ payload: String, _ script: String) throws -> String? {
        let dir = try scriptFolder(["mqlite.on_publish(\"#\", function(m) return { payload = \(script) } end)"])
        defer { try? FileManager.default.removeItem(at: dir) }
        var configuration = BrokerConfiguration(workers: 1, listeners: [])
        configuration.plugins = [PluginConfiguration(script: dir.appendingPathComponent("s0.lua").path)]
        let host = try ScriptingHost(configuration: configuration, logger: Logger(label: "test"))
        let message = HookedMessage(topic: "t", payload: ByteBuffer(string: payload), qos: .atMostOnce, retain: false)
        switch host.interceptPublish(message, from: ClientInfo(clientID: "c", username: nil, address: "-"), worker: 0) {
        case .now(.change(let changed)): return String(buffer: changed.payload)
        case .now(.drop): return nil
        case let other: Issue.record("unexpected \(other)"); return nil
        }
    }

    @Test("arrays with nulls survive decode and encode")
    func nullsInArrays() throws {
        let roundTrip = "mqlite.json.encode(mqlite.json.decode(m.payload))"
        #expect(try transform("[1,null,3]", roundTrip) == "[1,null,3]")
        #expect(try transform(#"{"a":[null,"x"],"b":[[null,null,1]]}"#, roundTrip) == #"{"a":[null,"x"],"b":[[null,null,1]]}"#)
        // Trailing nulls are not kept: nothing in the table says they were there.
        #expect(try transform("[1,null]", roundTrip) == "[1]")
        #expect(try transform("[null]", roundTrip) == "{}")
    }

    @Test("tables with integer keys encode as arrays; other keys still fail")
    func integerKeys() throws {
        #expect(try transform("", #"mqlite.json.encode({ [3] = "c", [1] = "a" })"#) == #"["a",null,"c"]"#)
        #expect(try transform("", #"mqlite.json.encode({ "a", "b" })"#) == #"["a","b"]"#)
        #expect(try transform("", #"mqlite.json.encode({ [1] = "a", x = 1 })"#) == nil)
        #expect(try transform("", #"mqlite.json.encode({ [0] = "a" })"#) == nil)
        #expect(try transform("", #"mqlite.json.encode({ [1.5] = "a" })"#) == nil)
        #expect(try transform("", #"mqlite.json.encode({ [1 << 21] = "far" })"#) == nil)
    }

    @Test("encode writes numbers, escapes and key order exactly (what Foundation wrote, keys now in byte order)")
    func exactText() throws {
        let numbers = #"mqlite.json.encode({1.0, 1.5, 0.1, 1e20, 1e-7, -0.0, 2^53, 2^63, 1/3, math.maxinteger, math.mininteger, -2})"#
        #expect(try transform("", numbers)
            == "[1,1.5,0.1,1e+20,1e-07,-0,9007199254740992,9.223372036854776e+18,0.3333333333333333,9223372036854775807,-9223372036854775808,-2]")
        #expect(try transform("", #"mqlite.json.encode({ "a\"b\\c/d\n\r\t\b\f", "\1\31", "é€😀", "" })"#)
            == #"["a\"b\\c/d\n\r\t\b\f","\u0001\u001f","é€😀",""]"#)
        #expect(try transform("", #"mqlite.json.encode({ b = 1, a = { z = true, y = false }, B = "x", ["10"] = 1, ["9"] = 2, ["é"] = {} })"#)
            == #"{"10":1,"9":2,"B":"x","a":{"y":false,"z":true},"b":1,"é":{}}"#)
        #expect(try transform("", #"mqlite.json.encode("\255")"#) == nil, "not UTF-8")
        #expect(try transform("", #"mqlite.json.encode(0/0)"#) == nil, "not finite")
    }

    @Test("encode of a table that holds one table twice per level stops at the memory the script has left, or its time limit (no abort, no stall)")
    func sharedSubtables() async throws {
        try await offThePool { () throws in
            let clock = ContinuousClock()
            let start = clock.now
            // 2^14 copies of a 1 MiB string: 16 GiB of text, which aborted the broker.
            #expect(try transform("", #"(function() local t = { string.rep("x", 1 << 20) } for i = 1, 14 do t = { t, t } end return mqlite.json.encode(t) end)()"#) == nil)
            // 2^40 small values: the time limit.
            #expect(try transform("", #"(function() local t = { 1 } for i = 1, 40 do t = { t, t } end return mqlite.json.encode(t) end)()"#) == nil)
            #expect(clock.now - start < .seconds(20))  // ~1 s; the margin is for a loaded machine
            // Shared tables themselves are fine.
            #expect(try transform("", #"(function() local t = { 1 } for i = 1, 3 do t = { t, t } end return mqlite.json.encode(t) end)()"#)
                == "[[[[1],[1]],[[1],[1]]],[[[1],[1]],[[1],[1]]]]")
        }
    }

    @Test("decode: integers past Lua's (2^63 and up) are floats, not negative numbers")
    func largeIntegers() throws {
        let echo = #"(function() local v = mqlite.json.decode(m.payload) return math.type(v[1]) .. " " .. string.format("%.0f", v[1]) .. " " .. math.type(v[2]) .. " " .. v[2] end)()"#
        #expect(try transform("[9223372036854775808, 9223372036854775807]", echo) == "float 9223372036854775808 integer 9223372036854775807")
        let sign = #"(function() local v = mqlite.json.decode(m.payload) return tostring(v[1] > 2^63) .. " " .. tostring(v[2] < 0) end)()"#
        #expect(try transform("[18446744073709551615, -9223372036854775807]", sign) == "true true")
    }

    @Test("decode reads RFC 8259 text (escapes, surrogate pairs, numbers, literals, any value at the top) and refuses the rest with a message")
    func decodeGrammar() throws {
        let show = #"(function() local v, e = mqlite.json.decode(m.payload) if e then return "nil: " .. e:match("^[^:]*") end return mqlite.json.encode(v) end)()"#
        #expect(try transform(#" {"a" : "\u00e9\ud83d\ude00\n\/\"\\" , "b":[1,-0,2.5,1e3,-1E-2,true,false,null,3],"a2":{}} "#, show)
            == #"{"a":"é😀\n/\"\\","a2":{},"b":[1,0,2.5,1000,-0.01,true,false,null,3]}"#)
        #expect(try transform(#""top""#, show) == #""top""#)
        #expect(try transform("42", show) == "42")
        #expect(try transform(#"{"k":1,"k":2}"#, show) == #"{"k":2}"#)
        for bad in ["", "[1,]", #"{"a" 1}"#, "01", "1.", "-", #""\ud800""#, #""\udc00x""#, "\"a\u{1}\"", "tru", "[1] x", "[", #"{"a":1"#, #""\x""#, "{1:2}", "[1 2]", "1e309", "[-1e400]"] {
            #expect(try transform(bad, show) == "nil: invalid JSON", "\(bad)")
        }
    }
}
