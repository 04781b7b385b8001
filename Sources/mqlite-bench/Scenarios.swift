import Foundation
import MQTTCore
import NIOCore
import NIOPosix

/// Shapes of traffic.
enum Shape: String, CaseIterable {
    /// P publishers, each on its own topic, one subscriber on a wildcard.
    case fanIn = "fan-in"
    /// One publisher, S subscribers on the same topic.
    case fanOut = "fan-out"
    /// P publisher/subscriber pairs on their own topics.
    case pairs
}

struct ThroughputResult {
    var deliveriesPerSecond: Double
    var published: Int
    var expected: Int
    var delivered: Int
    var lost: Int { expected - delivered }
}

/// A publisher: its connection, a pre-encoded run of QoS 0 frames, or the parts of a QoS 1 frame.
/// Like every benchmark object, used only on the benchmark's single event loop.
final class Publisher: @unchecked Sendable {
    let connection: BenchConnection
    let topic: String
    /// Indices of the subscribers that receive this publisher's messages.
    var targets: [Int] = []
    var unacked = 0
    var nextID: UInt16 = 0
    /// QoS 0: `chunkFrames` identical frames back to back; a prefix of it is written at once.
    let chunk: ByteBuffer
    let frameSize: Int
    /// QoS 1: fixed header and topic; the packet id, `afterID` and the payload follow.
    let prefix: ByteBuffer
    /// MQTT 5: the properties after the packet id (none, or the topic alias).
    let afterID: ByteBuffer
    let payload: ByteBuffer
    /// MQTT 5 with a topic alias: the PUBLISH that gives the alias its topic (sent before the run).
    let aliasSetup: ByteBuffer?

    static let chunkFrames = 64

    /// `alias` (MQTT 5): every PUBLISH carries topic alias 1 and no topic; `aliasSetup` names it.
    init(connection: BenchConnection, topic: String, payload: ByteBuffer, qos: QoS, alias: Bool = false) {
        self.connection = connection
        self.topic = topic
        self.payload = payload
        let v5 = connection.version == .v5
        let t = alias ? ByteBuffer() : ByteBuffer(string: topic)
        var properties = MQTTProperties()
        if alias { properties.topicAlias = 1 }
        var setup = ByteBuffer()
        setup.writePublishHeader(
            topic: ByteBuffer(string: topic), payloadLength: 0, qos: .atMostOnce, retain: false, dup: false, packetID: nil, properties: properties)
        self.aliasSetup = alias ? setup : nil
        let afterID = ByteBuffer(bytes: v5 ? (alias ? [3, 0x23, 0, 1] : [0]) : [])
        var prefix = ByteBuffer()
        if v5 {
            prefix.writePublishHeader(topic: t, payloadLength: payload.readableBytes, qos: qos, retain: false, dup: false, packetID: 0, properties: properties)
            prefix.moveWriterIndex(to: prefix.writerIndex - (qos == .atMostOnce ? 0 : 2 + afterID.readableBytes))
        } else {
            prefix.writePublishHeader(topic: t, payloadLength: payload.readableBytes, qos: qos, retain: false, dup: false, packetID: 0)
            prefix.moveWriterIndex(to: prefix.writerIndex - (qos == .atMostOnce ? 0 : 2))
        }
        self.prefix = prefix
        self.afterID = afterID
        var frame = ByteBuffer()
        if v5 {
            frame.writePublishHeader(topic: t, payloadLength: payload.readableBytes, qos: .atMostOnce, retain: false, dup: false, packetID: nil, properties: properties)
            frame.writeImmutableBuffer(payload)
        } else {
            frame.writePublish(topic: t, payload: payload, qos: .atMostOnce, retain: false, dup: false, packetID: nil)
        }
        self.frameSize = frame.readableBytes
        var chunk = ByteBuffer()
        if qos == .atMostOnce {
            for _ in 0..<(payload.readableBytes > 4096 ? 1 : Self.chunkFrames) { chunk.writeImmutableBuffer(frame) }
        }
        self.chunk = chunk
    }

    func nextPacketID() -> UInt16 {
        nextID = nextID == UInt16.max ? 1 : nextID + 1
        return nextID
    }
}

/// Runs one throughput scenario on one event loop: publishers send as fast as a closed-loop
/// window allows (at most `window` deliveries outstanding per subscriber, and for QoS 1 at most
/// 100 unacknowledged messages per publisher), so a broker that keeps up never has cause to drop.
final class ThroughputRun: @unchecked Sendable {
    let loop: any EventLoop
    let shape: Shape
    let qos: QoS
    let publishers: [Publisher]
    let subscribers: [BenchConnection]
    let fanout: Int
    let window: Int
    var published = 0
    var delivered = 0
    /// Per subscriber: messages sent towards it, and messages it received.
    private var expectedBy: [Int]
    private var deliveredBy: [Int]
    var sending = true
    private var next = 0

    static let qos1Window = 100

    init(loop: any EventLoop, shape: Shape, qos: QoS, publishers: [Publisher], subscribers: [BenchConnection], window: Int) {
        self.loop = loop
        self.shape = shape
        self.qos = qos
        self.publishers = publishers
        self.subscribers = subscribers
        self.fanout = shape == .fanOut ? subscribers.count : 1
        self.window = window
        self.expectedBy = Array(repeating: 0, count: subscribers.count)
        self.deliveredBy = Array(repeating: 0, count: subscribers.count)
        for (i, publisher) in publishers.enumerated() {
            switch shape {
            case .fanIn: publisher.targets = [0]
            case .fanOut: publisher.targets = Array(subscribers.indices)
            case .pairs: publisher.targets = [i]
            }
        }
        for (index, subscriber) in subscribers.enumerated() {
            subscriber.onEvent = { [unowned self] c, event in
                if case .publish(let q, let id, _) = event {
                    self.delivered += 1
                    self.deliveredBy[index] += 1
                    if q == 1 { c.ack(id) }
                }
            }
            subscriber.onReadComplete = { [unowned self] _ in self.pump() }
        }
        for publisher in publishers {
            publisher.connection.onEvent = { [unowned publisher] _, event in
                if event == .puback { publisher.unacked -= 1 }
            }
            publisher.connection.onReadComplete = { [unowned self] _ in self.pump() }
        }
    }

    /// Sends what the windows allow, round-robin over publishers, and flushes once.
    func pump() {
        guard sending else { return }
        var wrote: [Publisher] = []
        var progressed = true
        while progressed {
            progressed = false
            for offset in 0..<publishers.count {
                let p = publishers[(next + offset) % publishers.count]
                var allowed = Publisher.chunkFrames
                for t in p.targets { allowed = min(allowed, window - (expectedBy[t] - deliveredBy[t])) }
                if qos != .atMostOnce { allowed = min(allowed, Self.qos1Window - p.unacked) }
                guard allowed > 0, p.connection.isWritable else { continue }
                send(p, count: allowed)
                published += allowed
                for t in p.targets { expectedBy[t] += allowed }
                if wrote.last !== p { wrote.append(p) }
                progressed = true
            }
            next = (next + 1) % publishers.count
        }
        for p in wrote { p.connection.flush() }
    }

    private func send(_ p: Publisher, count: Int) {
        let large = p.payload.readableBytes > 4096
        if qos == .atMostOnce {
            if large {
                for _ in 0..<count { p.connection.write(p.chunk) }
            } else {
                p.connection.write(p.chunk.getSlice(at: p.chunk.readerIndex, length: count * p.frameSize)!)
            }
            return
        }
        p.unacked += count
        var batch = ByteBuffer()
        batch.reserveCapacity(large ? count * (p.prefix.readableBytes + 3) : count * (p.prefix.readableBytes + 3 + p.payload.readableBytes))
        for _ in 0..<count {
            batch.writeImmutableBuffer(p.prefix)
            batch.writeInteger(p.nextPacketID())
            batch.writeImmutableBuffer(p.afterID)
            if large {
                p.connection.write(batch)
                p.connection.write(p.payload)
                batch = ByteBuffer()
            } else {
                batch.writeImmutableBuffer(p.payload)
            }
        }
        if batch.readableBytes > 0 { p.connection.write(batch) }
    }

    /// Warms up, measures for `duration`, stops sending and waits for what is outstanding.
    func run(warmup: TimeAmount, duration: TimeAmount, drain: TimeAmount) -> EventLoopFuture<ThroughputResult> {
        let promise = loop.makePromise(of: ThroughputResult.self)
        // A slow tick also restarts sending if every window closed while sockets were full.
        let ticker = loop.scheduleRepeatedTask(initialDelay: .milliseconds(1), delay: .milliseconds(1)) { [unowned self] _ in self.pump() }
        pump()
        var startCount = 0
        var startTime = NIODeadline.now()
        // Everything below runs on this run's loop.
        let loop = self.loop.assumeIsolated()
        loop.scheduleTask(in: warmup) {
            startCount = self.delivered
            startTime = .now()
        }
        loop.scheduleTask(in: warmup + duration) {
            let rate = Double(self.delivered - startCount) / Double((NIODeadline.now() - startTime).nanoseconds) * 1e9
            self.sending = false
            ticker.cancel()
            let deadline = NIODeadline.now() + drain
            func check() {
                let expected = self.published * self.fanout
                if self.delivered >= expected || NIODeadline.now() > deadline {
                    promise.succeed(ThroughputResult(deliveriesPerSecond: rate, published: self.published, expected: expected, delivered: self.delivered))
                } else {
                    loop.scheduleTask(in: .milliseconds(10)) { check() }
                }
            }
            check()
        }
        return promise.futureResult
    }
}

/// Publishers at a fixed rate, each to its own subscriber; the payload carries the send time.
final class LatencyRun: @unchecked Sendable {
    let loop: any EventLoop
    let pairs: [(Publisher, BenchConnection)]
    let perTick: Int
    /// Under 1000 messages a second, a publisher sends once every this many ticks (of 1 ms),
    /// the publishers spread over the ticks.
    let ticksPerMessage: Int
    private var ticks = 0
    var samples: [UInt64] = []
    var recording = false
    var sending = true
    var published = 0
    var delivered = 0

    init(loop: any EventLoop, pairs: [(Publisher, BenchConnection)], ratePerPublisher: Int) {
        self.loop = loop
        self.pairs = pairs
        self.perTick = max(1, ratePerPublisher / 1000)
        self.ticksPerMessage = ratePerPublisher >= 1000 ? 1 : 1000 / max(1, ratePerPublisher)
        samples.reserveCapacity(pairs.count * ratePerPublisher * 10)
        for (_, subscriber) in pairs {
            subscriber.onEvent = { [unowned self] _, event in
                if case .publish(_, _, let sent) = event {
                    self.delivered += 1
                    if self.recording { self.samples.append(NIODeadline.now().uptimeNanoseconds &- sent) }
                }
            }
        }
    }

    private func tick() {
        guard sending else { return }
        if ticksPerMessage == 1 { return send(tick: 0) }
        // Slow publishers keep their rate even when the timer runs late: every tick due so far.
        let now = NIODeadline.now()
        if firstTick == nil { firstTick = now }
        let due = Int((now - firstTick!).nanoseconds / 1_000_000)
        while ticks <= due {
            send(tick: ticks)
            ticks += 1
        }
    }

    private var firstTick: NIODeadline?

    private func send(tick: Int) {
        for (i, (p, _)) in pairs.enumerated() where ticksPerMessage == 1 || (tick + i) % ticksPerMessage == 0 {
            var batch = ByteBuffer()
            for _ in 0..<perTick {
                var payload = p.payload
                payload.setInteger(NIODeadline.now().uptimeNanoseconds, at: payload.readerIndex)
                batch.writePublish(topic: ByteBuffer(string: p.topic), payload: payload, qos: .atMostOnce, retain: false, dup: false, packetID: nil)
            }
            published += perTick
            p.connection.write(batch)
            p.connection.flush()
        }
    }

    /// CPU seconds the broker (`pid`) used while recording, when a pid is given.
    private(set) var brokerCPU: Double?
    private var cpuAtStart: Double?

    func run(warmup: TimeAmount, duration: TimeAmount, drain: TimeAmount, brokerPID: Int? = nil) -> EventLoopFuture<(p50: Double, p99: Double, max: Double, lost: Int)> {
        let promise = loop.makePromise(of: (p50: Double, p99: Double, max: Double, lost: Int).self)
        let ticker = loop.scheduleRepeatedTask(initialDelay: .milliseconds(1), delay: .milliseconds(1)) { [unowned self] _ in self.tick() }
        loop.scheduleTask(in: warmup) {
            self.recording = true
            self.cpuAtStart = brokerPID.flatMap(cpuSeconds(pid:))
        }
        loop.scheduleTask(in: warmup + duration) {
            if let start = self.cpuAtStart, let end = brokerPID.flatMap(cpuSeconds(pid:)) { self.brokerCPU = end - start }
            self.recording = false
            self.sending = false
            ticker.cancel()
            self.loop.scheduleTask(in: drain) {
                let sorted = self.samples.sorted()
                func percentile(_ p: Double) -> Double {
                    sorted.isEmpty ? 0 : Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1000
                }
                promise.succeed((percentile(0.5), percentile(0.99), Double(sorted.last ?? 0) / 1000, self.published - self.delivered))
            }
        }
        return promise.futureResult
    }
}

/// User plus system CPU time of a process so far, in seconds, from /proc (clock ticks of 10 ms).
func cpuSeconds(pid: Int) -> Double? {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
        let end = stat.lastIndex(of: ")")
    else { return nil }
    // After "pid (comm)": state is field 3; utime and stime are fields 14 and 15.
    let fields = stat[stat.index(after: end)...].split(separator: " ")
    guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

/// Resident memory of a process, in bytes, from /proc.
func residentBytes(pid: Int) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        let kb = line.split(separator: " ").compactMap { Int($0) }.first
        return kb.map { $0 * 1024 }
    }
    return nil
}
