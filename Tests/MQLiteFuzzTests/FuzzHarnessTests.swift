import Foundation
@testable import MQLiteFuzzing
import MQTTCore
import NIOCore
import XCTest

/// The fuzz harnesses (Sources/MQLiteFuzzing) outside libFuzzer: that they really reach what they
/// claim to, and every input in Fuzz/regressions/<target>/ (crashes and hangs the fuzzer found)
/// replayed through its target. A regression that comes back crashes this test process.
final class FuzzHarnessTests: XCTestCase {
    static let regressions = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/regressions")

    func bytes(_ packets: MQTTPacket...) -> [UInt8] {
        var buffer = ByteBuffer()
        for packet in packets { buffer.writeMQTTPacket(packet) }
        return Array(buffer.readableBytesView)
    }

    func connect(_ id: String) -> MQTTPacket { .connect(ConnectPacket(clientID: id)) }

    func testDecoderHarnessSeesTheSamePacketsInAnyReadSizes() {
        let stream = bytes(
            connect("c"), .publish(PublishPacket(topic: "a/b", payload: "x", qos: .exactlyOnce, packetID: 3)),
            .pubrel(packetID: 3), .subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "a/#", qos: .atLeastOnce)])),
            .pingreq, .disconnect)
        stream.withUnsafeBytes { raw in
            for sizes in [[0], [1], [2, 5], [7, 1]] {
                let outcome = DecoderFuzzer.decode(sizes, raw)
                XCTAssertEqual(outcome.packets.count, 6, "reads of \(sizes)")
                XCTAssertNil(outcome.error)
            }
        }
        ([UInt8(0x21)] + stream).withUnsafeBytes { DecoderFuzzer.run($0) }
        let truncated = Array(stream.dropLast(3))
        truncated.withUnsafeBytes { XCTAssertEqual(DecoderFuzzer.decode([3], $0).packets.count, 4) }
    }

    func testConnectionHarnessDeliversFromOneClientToAnother() {
        let fuzzer = try! ConnectionFuzzer()
        let subscriber = [UInt8(0x00)] + bytes(connect("sub"), .subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "t/#", qos: .atMostOnce)])))
        // The publisher writes 3 bytes at a time, on the second worker.
        let publisher = [UInt8(0x23)] + bytes(connect("pub"), .publish(PublishPacket(topic: "t/x", payload: "hello")), .disconnect)
        let input = subscriber + ConnectionFuzzer.separator + publisher
        let received = input.withUnsafeBytes { fuzzer.run($0) }
        XCTAssertEqual(received.count, 2)
        XCTAssertEqual(received[0].map(\.type), [.connack, .suback, .publish])
        if case .publish(let p) = received[0].last {
            XCTAssertEqual(p.topicString, "t/x")
            XCTAssertEqual(String(buffer: p.payload), "hello")
        }
        XCTAssertEqual(received[1].map(\.type), [.connack])
    }

    func testConnectionHarnessRunsTheHooks() {
        let fuzzer = try! ConnectionFuzzer()
        let refused = [UInt8(0x00)] + bytes(.connect(ConnectPacket(clientID: "r", username: "refused")))
        let subscriber = [UInt8(0x00)] + bytes(
            connect("s"),
            .subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "deny/x", qos: .atMostOnce), Subscription(filter: "hooked/#", qos: .atMostOnce)])))
        // 3 bytes per turn, so that the subscriber's SUBSCRIBE (all in the first turn) is in place
        // before this PUBLISH: within one turn the order between clients is up to the kernel.
        let publisher = [UInt8(0x03)] + bytes(connect("p"), .publish(PublishPacket(topic: "hook/a", payload: "text")), .disconnect)
        let input = refused + ConnectionFuzzer.separator + subscriber + ConnectionFuzzer.separator + publisher
        let received = input.withUnsafeBytes { fuzzer.run($0) }
        guard case .connack(let ack) = received[0].first else { return XCTFail("no CONNACK: \(received)") }
        XCTAssertEqual(ack.returnCode, .badUsernameOrPassword)
        guard received[1].count == 3, case .suback(let suback) = received[1][1], case .publish(let p) = received[1][2] else {
            return XCTFail("subscriber got \(received[1])")
        }
        XCTAssertEqual(suback.value.returnCodes, [.failure, .granted(.atMostOnce)])
        XCTAssertEqual(p.topicString, "hooked/a")
        XCTAssertEqual(String(buffer: p.payload), "text!")
    }

    func testJSONAndConfigHarnessesAcceptValidInput() throws {
        let json = try JSONFuzzer()
        for text in [#"{"a": [1, 2.5, "x", null, {"b": true}]}"#, "[]", "null", "not json"] {
            Array(text.utf8).withUnsafeBytes { json.run($0) }
        }
        let config = try String(contentsOf: Self.regressions.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("config/mqlite.conf"), encoding: .utf8)
        Array(config.utf8).withUnsafeBytes { ConfigFuzzer.run($0) }
    }

    /// Replays Fuzz/regressions/<target>/*; returns how many inputs there were.
    @discardableResult
    func replay(_ target: String) throws -> Int {
        let fuzzer = try FuzzTarget(name: target)
        let folder = Self.regressions.appendingPathComponent(target)
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? []).filter { !$0.hasPrefix(".") }.sorted()
        for name in names {
            let data = try Data(contentsOf: folder.appendingPathComponent(name))
            data.withUnsafeBytes { fuzzer.run($0) }
        }
        return names.count
    }

    func testDecoderRegressions() throws { try replay("decoder") }
    func testConnectionRegressions() throws { try replay("connection") }
    func testJSONRegressions() throws { try replay("json") }
    func testConfigRegressions() throws { try replay("config") }
    func testProxyRegressions() throws { try replay("proxy") }

    func testProxyHarnessAcceptsHeadersAndRefusals() {
        let connect = bytes(connect("c"))
        for input in [Array("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".utf8) + connect, Array("PROXY TCP4 1.2.3.4".utf8), connect,
                      [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0x00, 0x00] + connect] {
            input.withUnsafeBytes { ProxyFuzzer.run($0) }
        }
    }
}
