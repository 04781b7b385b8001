import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import MQTTCore
import NIOCore

/// Fuzz target `json`: the input is the payload of a PUBLISH that a real `ScriptingHost` hands to
/// an `on_publish` hook, and the hook (below) runs `mqlite.json.decode` on it, then
/// `mqlite.json.encode` on what came out, and checks that encoding is stable from then on:
/// decode(encode(v)) encodes to the same text. A hook that fails (a Lua error, the instruction
/// limit) is a finding: the harness stops with the hook's message.
public final class JSONFuzzer {
    static let script = #"""
    -- Installed by the json fuzz target (Sources/MQLiteFuzzing/JSONFuzzer.swift).
    mqlite.on_publish("#", function(m)
      local value, err = mqlite.json.decode(m.payload)
      if value == nil then
        -- The two documented answers to bad input: invalid JSON (with what and where), or
        -- nesting past the limit.
        if err ~= nil and err:sub(1, 12) ~= "invalid JSON" and err ~= "nesting deeper than 64" then
          error("decode: unexpected second result " .. tostring(err))
        end
        return false
      end
      local ok, text = pcall(mqlite.json.encode, value)
      if not ok then
        -- The documented limit of encode (a cycle guard); decode accepts deeper documents.
        if string.find(text, "nesting deeper than 64", 1, true) then return false end
        error("encode of a decoded value failed: " .. tostring(text))
      end
      local again, err2 = mqlite.json.decode(text)
      if again == nil and text ~= "null" then error("decode(encode(v)) failed: " .. tostring(err2) .. " for " .. text) end
      local text2 = mqlite.json.encode(again)
      -- Stable up to the last digits of floats (Foundation prints 17 significant digits and
      -- does not always read them back to the same double) and the sign of a zero (-0.0
      -- encodes as -0, which decodes as the integer 0).
      local function same(a, b)
        if type(a) == "number" and type(b) == "number" then
          return a == b or math.abs(a - b) <= 1e-12 * math.max(math.abs(a), math.abs(b))
        end
        if type(a) ~= type(b) then return false end
        if type(a) ~= "table" then return a == b end
        for k, v in pairs(a) do if not same(v, b[k]) then return false end end
        for k in pairs(b) do if a[k] == nil then return false end end
        return true
      end
      if text2 ~= text and not same(mqlite.json.decode(text2), again) then
        error("encoding is not stable: " .. text .. " then " .. text2)
      end
      return false
    end)
    """#

    let host: ScriptingHost
    let client = ClientInfo(clientID: "fuzz", username: nil, address: "fuzz")
    let directory: String

    public init() throws {
        directory = NSTemporaryDirectory() + "mqlite-fuzz-json-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = directory + "/json_roundtrip.lua"
        try Self.script.write(toFile: path, atomically: true, encoding: .utf8)
        var configuration = BrokerConfiguration(workers: 1, listeners: [])
        configuration.plugins = [PluginConfiguration(script: path)]
        configuration.baseDirectory = directory
        var logger = Logger(label: "mqlite-fuzz")
        logger.logLevel = .warning
        host = try ScriptingHost(configuration: configuration, logger: logger)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: directory)
    }

    public func run(_ data: UnsafeRawBufferPointer) {
        let before = host.failureCount
        let message = HookedMessage(topic: "fuzz/json", payload: ByteBuffer(bytes: data), qos: .atMostOnce, retain: false)
        let decision = host.interceptPublish(message, from: client, worker: 0)
        precondition(host.failureCount == before, "the json round-trip hook failed (its message is logged above)")
        precondition(decision == .now(.drop), "the hook returns false, the host answered \(decision)")
    }
}
