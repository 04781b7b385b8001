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
}
