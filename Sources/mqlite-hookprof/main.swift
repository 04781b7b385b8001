import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import MQTTCore
import NIOCore

// Calls the scripting layer's on_publish path in a loop, without sockets, for profiling it:
//   mqlite-hookprof [CALLS] [SCRIPT]
// with the benchmark's trivial transform when no script is given. Under callgrind, the difference
// between two call counts gives instructions per call (see docs/BENCHMARKS.md).
let arguments = Array(CommandLine.arguments.dropFirst())
let calls = arguments.first.flatMap { Int($0) } ?? 1_000_000
var script = arguments.count > 1 ? arguments[1] : ""
if script.isEmpty {
    script = FileManager.default.temporaryDirectory.appendingPathComponent("mqlite-hookprof-\(getpid()).lua").path
    try #"mqlite.on_publish("bench/#", function(m) return { payload = m.payload } end)"#.write(toFile: script, atomically: true, encoding: .utf8)
}
let host = try ScriptingHost(
    configuration: BrokerConfiguration(workers: 1, plugins: [PluginConfiguration(script: script)]),
    logger: Logger(label: "mqlite-hookprof"))
let client = ClientInfo(clientID: "bench-pub-3", username: nil, address: "127.0.0.1:50000")
let message = HookedMessage(topic: "bench/pair/3", payload: ByteBuffer(string: "0123456789abcdef"), qos: .atMostOnce, retain: false)
var changed = 0
let start = ContinuousClock.now
for _ in 0..<calls {
    if case .now(.change) = host.interceptPublish(message, from: client, worker: 0) { changed += 1 }
}
let nanoseconds = (ContinuousClock.now - start) / calls / .nanoseconds(1)
if arguments.count < 2 { try? FileManager.default.removeItem(atPath: script) }
print("\(calls) calls, \(changed) changed the message, \(Int(nanoseconds)) ns per call")
