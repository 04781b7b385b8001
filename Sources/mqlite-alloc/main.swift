// mqlite-alloc: allocation counts of the hot path (decode → route → encode of a QoS 0 PUBLISH to
// one and to ten subscribers), checked against thresholds kept in the repository.
//
// The broker runs in this process with one worker; the clients use plain blocking sockets and
// buffers allocated up front, so in the measured window they allocate nothing and every counted
// malloc is the broker's (and NIO's). Counting is done by ordo-one/malloc-interposer, which must
// be preloaded: `make bench` runs
//   LD_PRELOAD=.build/release/libMallocInterposerSwift.so .build/release/mqlite-alloc bench/allocations.json
// and `make test` the same from .build/debug. The thresholds file has one set per build ("release",
// "debug"): an unoptimized build allocates more, but as repeatably, so a new allocation per
// message shows in either.
import Foundation
import Logging
import MQLiteBroker
import MQTTCore
import MallocInterposerSwift
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// A blocking MQTT client on a raw socket.
final class RawClient {
    let fd: Int32

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard result == 0 else { throw Failure("connect: errno \(errno)") }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    func send(_ bytes: UnsafeRawBufferPointer) throws {
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.send(fd, bytes.baseAddress! + offset, bytes.count - offset, 0)
            guard n > 0 else { throw Failure("send: errno \(errno)") }
            offset += n
        }
    }

    func read(exactly count: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        var offset = 0
        while offset < count {
            let n = recv(fd, buffer.baseAddress! + offset, count - offset, 0)
            guard n > 0 else { throw Failure("recv: errno \(errno)") }
            offset += n
        }
    }

    func request(_ packet: MQTTPacket, replyLength: Int, scratch: UnsafeMutableRawBufferPointer) throws {
        var buffer = ByteBuffer()
        buffer.writeMQTTPacket(packet)
        try buffer.withUnsafeReadableBytes { try send($0) }
        try read(exactly: replyLength, into: scratch)
    }

    deinit { close(fd) }
}

struct Failure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Allocations per published message with `subscribers` subscribers, averaged over `batches` batches.
func measure(port: Int, subscribers count: Int, batches: Int, batch: Int) throws -> Double {
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    defer { scratch.deallocate() }
    let topic = "alloc/\(count)"
    var subscribers: [RawClient] = []
    for i in 0..<count {
        let c = try RawClient(port: port)
        try c.request(.connect(ConnectPacket(clientID: "alloc-sub-\(count)-\(i)")), replyLength: 4, scratch: scratch)
        try c.request(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: topic, qos: .atMostOnce)])), replyLength: 5, scratch: scratch)
        subscribers.append(c)
    }
    let publisher = try RawClient(port: port)
    try publisher.request(.connect(ConnectPacket(clientID: "alloc-pub-\(count)")), replyLength: 4, scratch: scratch)

    // One batch of identical 16-byte QoS 0 frames, encoded once.
    var frames = ByteBuffer()
    for _ in 0..<batch { frames.writeMQTTPacket(.publish(PublishPacket(topic: topic, payload: "0123456789abcdef"))) }
    let batchBytes = frames.readableBytes
    let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: batchBytes, alignment: 16)
    defer { raw.deallocate() }
    frames.withUnsafeReadableBytes { raw.copyMemory(from: $0) }
    let framesBytes = UnsafeRawBufferPointer(raw)

    func run(_ n: Int) throws {
        for _ in 0..<n {
            try publisher.send(framesBytes)
            for s in subscribers { try s.read(exactly: batchBytes, into: scratch) }
        }
    }
    try run(batches / 2)  // warm up: route cache, buffers, NIO's allocators
    MallocInterposerSwift.initialize()
    MallocInterposerSwift.hook()
    try run(batches)
    MallocInterposerSwift.unhook()
    let stats = MallocInterposerSwift.getStatistics()
    return Double(stats.mallocCount) / Double(batches * batch)
}

@main
struct AllocationCheck {
    static func main() async {
        do {
            try await run()
        } catch {
            FileHandle.standardError.write(Data("mqlite-alloc: \(error)\n".utf8))
            exit(2)
        }
    }

    static func run() async throws {
        let arguments = CommandLine.arguments
        guard arguments.count == 2 else { throw Failure("usage: mqlite-alloc THRESHOLDS.json") }
        #if DEBUG
        let build = "debug"
        #else
        let build = "release"
        #endif
        let file = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: arguments[1]))) as? [String: [String: Double]]
        guard let thresholds = file?[build] else { throw Failure("\(arguments[1]) has no \"\(build)\" thresholds") }

        // Is the interposer loaded? A counted window around a real allocation must see it.
        MallocInterposerSwift.initialize()
        MallocInterposerSwift.hook()
        let probe = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 8)
        MallocInterposerSwift.unhook()
        probe.deallocate()
        guard MallocInterposerSwift.getStatistics().mallocCount > 0 else {
            throw Failure("malloc-interposer is not loaded: run with LD_PRELOAD=.build/\(build)/libMallocInterposerSwift.so")
        }

        var logger = Logger(label: "mqlite-alloc")
        logger.logLevel = .error
        // No $SYS rounds: only the publish path's allocations are counted.
        let config = BrokerConfiguration(
            workers: 1, logLevel: .error, listeners: [ListenerConfiguration(ListenAddress(host: "127.0.0.1", port: 0))], sysInterval: 0)
        let broker = Broker(configuration: config, logger: logger)
        guard let port = try await broker.start().first?.port else { throw Failure("no port") }

        var failed = false
        for subscribers in [1, 10] {
            let key = "qos0_publish_to_\(subscribers)_subscribers"
            let perMessage = try measure(port: port, subscribers: subscribers, batches: 2000, batch: 10)
            let limit = thresholds[key]
            let verdict = limit.map { perMessage <= $0 ? "ok (threshold \($0))" : "OVER THRESHOLD \($0)" } ?? "no threshold"
            print(String(format: "%@ (%@ build): %.2f allocations per message, %@", key, build, perMessage, verdict))
            if let limit, perMessage > limit { failed = true }
        }
        await broker.shutdown()
        if failed { exit(1) }
    }
}
