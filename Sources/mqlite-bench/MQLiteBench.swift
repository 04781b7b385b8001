import ArgumentParser
import Foundation
import MQTTCore
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// `mqlite-bench`: drives any MQTT 3.1.1 (or, with --mqtt 5, 5.0) broker on 127.0.0.1 and prints one JSON line of results.
@main
struct MQLiteBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mqlite-bench",
        abstract: "Load generator for MQTT brokers (fan-in, fan-out, pairs, latency, connections, storm).",
        discussion: """
            Throughput scenarios report deliveries per second over the measured interval, then stop \
            sending, wait for every outstanding message and report loss; a run that lost messages \
            exits 1. Publishers keep at most --window deliveries outstanding (and, at QoS 1, at most \
            100 unacknowledged messages each). `bare-nio-server` is no load: it serves --port with a \
            SwiftNIO server that holds its sockets and answers each read with 4 bytes (a CONNACK), \
            until stopped, so that `connections` (with or without --tcp-only) can measure what NIO \
            itself keeps per socket. `bare-nio-relay` is no load either: it serves --port with the \
            least a broker on SwiftNIO does for `latency`'s clients (CONNECT, SUBSCRIBE to one exact \
            topic, QoS 0 PUBLISH forwarded as read), so that `latency --pid` can measure what NIO and \
            the kernel cost a message under any broker built on them.
            """
    )

    enum Scenario: String, ExpressibleByArgument, CaseIterable {
        case fanIn = "fan-in", fanOut = "fan-out", pairs, latency, connections, storm, bareNIOServer = "bare-nio-server"
        case bareNIORelay = "bare-nio-relay"
    }

    @Argument(help: "fan-in, fan-out, pairs, latency, connections, storm, bare-nio-server or bare-nio-relay")
    var scenario: Scenario
    @Option var host = "127.0.0.1"
    @Option var port = 1883
    @Option(help: "QoS of publishes and subscriptions (0 or 1; latency always uses 0)") var qos = 0
    @Option(help: "Payload bytes") var payload = 16
    @Option(help: "Publishers (fan-in, pairs, latency) or subscribers (fan-out)") var clients = 10
    @Option(help: "Seconds before measuring") var warmup = 1.0
    @Option(help: "Seconds measured") var duration = 3.0
    @Option(help: "Most deliveries outstanding per subscriber (default: by payload size and QoS; keep it under the broker's max_queued + max_inflight)") var window: Int?
    @Option(help: "latency: messages per second per publisher") var rate = 2000
    @Option(help: "connections: how many idle clients; storm: how many clients connect at once") var connections = 10_000
    @Option(help: "connections: broker pid, for its resident memory; latency: for its CPU time per message") var pid: Int?
    @Option(help: "Topic prefix") var prefix = "bench"
    @Option(help: "fan-in, fan-out, pairs: this many more clients connect, subscribe (one exact and one wildcard filter) and disconnect in a loop meanwhile, on a loop of their own") var churn = 0
    @Option(help: "Milliseconds each churning client waits between its cycles") var churnPause = 100
    @Flag(help: "connections: open TCP sockets without sending CONNECT (the transport's share of the memory)") var tcpOnly = false
    @Option(help: "fan-in, fan-out, pairs: the MQTT version the clients speak, 4 (3.1.1) or 5") var mqtt = 4
    @Flag(help: "pairs with --mqtt 5: publishers name their topic once, then send only a topic alias") var topicAlias = false
    @Flag(help: "fan-in, fan-out, pairs: subscribers keep a persistent session (clean session 0; MQTT 5: a session expiry)") var persistent = false
    @Option(help: "fan-in, fan-out, pairs: subscribers connect to this port instead (a broker the first one bridges to)") var subscribePort: Int?
    @Option(help: ArgumentHelp("Connect over TLS, trusting the CA certificates in this PEM file (the broker's certificate is checked against them, not against the host name)", valueName: "file")) var tlsCa: String?

    /// The client TLS context for every connection of the run (nil: plain TCP). TLS 1.2 or 1.3 as
    /// the broker offers, BoringSSL's default cipher preferences.
    private func makeTLSContext() throws -> NIOSSLContext? {
        guard let tlsCa else { return nil }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .file(tlsCa)
        configuration.certificateVerification = .noHostnameVerification
        return try NIOSSLContext(configuration: configuration)
    }

    func run() async throws {
        let tls = try makeTLSContext()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let result: [String: Any]
        do {
            switch scenario {
            case .fanIn, .fanOut, .pairs:
                result = try await throughput(loop: loop, shape: Shape(rawValue: scenario.rawValue)!, tls: tls)
            case .latency:
                result = try await latency(loop: loop, tls: tls)
            case .connections:
                result = try await idleConnections(loop: loop, tls: tls)
            case .storm:
                result = try await storm(loop: loop, tls: tls)
            case .bareNIOServer:
                try await BareServers.serve(group: group, host: host, port: port, receiveBuffer: FixedSizeRecvByteBufferAllocator(capacity: 64)) {
                    BareServers.Answerer()
                }
                result = ["scenario": "bare-nio-server", "lost": 0]
            case .bareNIORelay:
                let routes = BareServers.Routes()
                try await BareServers.serve(group: group, host: host, port: port) { BareServers.Relay(routes: routes) }
                result = ["scenario": "bare-nio-relay", "lost": 0]
            }
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
        try? await group.shutdownGracefully()
        let data = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
        if let lost = result["lost"] as? Int, lost != 0 {
            FileHandle.standardError.write(Data("mqlite-bench: \(lost) messages lost\n".utf8))
            throw ExitCode(1)
        }
    }

    private func connect(
        _ loop: any EventLoop, _ id: String, timestamps: Bool = false, tls tlsContext: NIOSSLContext?, version: ProtocolVersion = .v3_1_1,
        cleanSession: Bool = true, port: Int? = nil
    ) async throws -> BenchConnection {
        try await BenchConnection.connect(
            on: loop, host: host, port: port ?? self.port, clientID: "\(prefix)-\(id)-\(UInt32.random(in: 0...UInt32.max))", readTimestamps: timestamps,
            tls: tlsContext, version: version, cleanSession: cleanSession
        ).get()
    }

    private func makePayload(_ size: Int) -> ByteBuffer {
        ByteBuffer(bytes: (0..<max(size, 8)).map { UInt8(truncatingIfNeeded: $0) })
    }

    private func throughput(loop: any EventLoop, shape: Shape, tls: NIOSSLContext?) async throws -> [String: Any] {
        let q = QoS(rawValue: UInt8(qos)) ?? .atMostOnce
        let body = ByteBuffer(bytes: (0..<payload).map { UInt8(truncatingIfNeeded: $0) })
        guard mqtt == 4 || mqtt == 5 else { throw ValidationError("--mqtt is 4 or 5") }
        guard !topicAlias || (mqtt == 5 && shape == .pairs) else { throw ValidationError("--topic-alias is for pairs with --mqtt 5") }
        let version: ProtocolVersion = mqtt == 5 ? .v5 : .v3_1_1
        func connect(_ loop: any EventLoop, _ id: String, tls: NIOSSLContext?) async throws -> BenchConnection {
            let subscriber = id.hasPrefix("sub")
            return try await self.connect(
                loop, id, tls: tls, version: version, cleanSession: !(persistent && subscriber), port: subscriber ? subscribePort : nil)
        }
        var publishers: [Publisher] = []
        var subscribers: [BenchConnection] = []
        switch shape {
        case .fanIn:
            let sub = try await connect(loop, "sub", tls: tls)
            try await sub.subscribe("\(prefix)/in/+", qos: q).get()
            subscribers = [sub]
            for i in 0..<clients {
                publishers.append(Publisher(connection: try await connect(loop, "pub\(i)", tls: tls), topic: "\(prefix)/in/\(i)", payload: body, qos: q))
            }
        case .fanOut:
            for i in 0..<clients {
                let sub = try await connect(loop, "sub\(i)", tls: tls)
                try await sub.subscribe("\(prefix)/out", qos: q).get()
                subscribers.append(sub)
            }
            publishers = [Publisher(connection: try await connect(loop, "pub", tls: tls), topic: "\(prefix)/out", payload: body, qos: q)]
        case .pairs:
            for i in 0..<clients {
                let publisher = Publisher(
                    connection: try await connect(loop, "pub\(i)", tls: tls), topic: "\(prefix)/pair/\(i)", payload: body, qos: q, alias: topicAlias)
                if let setup = publisher.aliasSetup {
                    // The alias is named before anyone subscribes (the SUBACK after it says the
                    // broker read it), so that the setup message goes to nobody.
                    try await loop.submit { publisher.connection.write(setup) }.get()
                    try await publisher.connection.subscribe("\(prefix)/alias-sync/\(i)", qos: .atMostOnce).get()
                }
                let sub = try await connect(loop, "sub\(i)", tls: tls)
                try await sub.subscribe("\(prefix)/pair/\(i)", qos: q).get()
                subscribers.append(sub)
                publishers.append(publisher)
            }
        }
        // Enough in flight to keep the pipe full, not so much that a broker must queue megabytes or
        // go past its queue limit (1000 queued + in flight in `make bench`).
        let defaultWindow = payload >= 32 * 1024 ? 64 : q == .atMostOnce ? 1000 : 500
        let windowSize = window ?? defaultWindow
        let (pubs, subs) = (publishers, subscribers)
        let run = try await loop.submit {
            ThroughputRun(loop: loop, shape: shape, qos: q, publishers: pubs, subscribers: subs, window: windowSize)
        }.get()
        if churn > 0 {
            // One CPU serves both: the measured clients yield to the churning ones, so that the
            // churn happens at the pace asked whatever the broker's throughput (a fast broker
            // would otherwise starve the churn of the load generator's CPU, and get less of it).
            try await loop.submit { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10) }.get()  // 0: this thread (Linux keeps nice per thread)
        }
        let churning = churn > 0 ? Churn(clients: churn, pause: .milliseconds(Int64(churnPause)), host: host, port: port, prefix: prefix, tls: tls) : nil
        let result = try await loop.flatSubmit {
            run.run(warmup: .nanoseconds(Int64(warmup * 1e9)), duration: .nanoseconds(Int64(duration * 1e9)), drain: .seconds(10))
        }.get()
        let churnCycles = try await churning?.stop() ?? 0
        try await loop.submit {
            for c in subs { c.close() }
            for p in pubs { p.connection.close() }
        }.get()
        return [
            "scenario": shape.rawValue, "qos": qos, "payload": payload, "clients": clients,
            "rate": result.deliveriesPerSecond.rounded(), "published": result.published,
            "expected": result.expected, "delivered": result.delivered, "lost": result.lost, "tls": tls != nil,
            "churn": churn, "churn_cycles_per_second": (Double(churnCycles) / (warmup + duration)).rounded(),
        ]
    }

    private func latency(loop: any EventLoop, tls: NIOSSLContext?) async throws -> [String: Any] {
        var pairs: [(Publisher, BenchConnection)] = []
        for i in 0..<clients {
            let sub = try await connect(loop, "lsub\(i)", timestamps: true, tls: tls)
            try await sub.subscribe("\(prefix)/lat/\(i)", qos: .atMostOnce).get()
            let pub = Publisher(connection: try await connect(loop, "lpub\(i)", tls: tls), topic: "\(prefix)/lat/\(i)", payload: makePayload(payload), qos: .atMostOnce)
            pairs.append((pub, sub))
        }
        let runPairs = pairs
        let run = try await loop.submit { LatencyRun(loop: loop, pairs: runPairs, ratePerPublisher: rate) }.get()
        let r = try await loop.flatSubmit {
            run.run(warmup: .nanoseconds(Int64(warmup * 1e9)), duration: .nanoseconds(Int64(duration * 1e9)), drain: .seconds(1), brokerPID: pid)
        }.get()
        let (cpu, received) = try await loop.submit { (run.brokerCPU, run.samples.count) }.get()
        try await loop.submit { for (p, s) in runPairs { p.connection.close(); s.close() } }.get()
        var result: [String: Any] = [
            "scenario": "latency", "clients": clients, "rate_per_client": rate, "payload": payload,
            "p50_us": r.p50, "p99_us": r.p99, "max_us": r.max, "lost": r.lost, "received": received,
        ]
        if let cpu, received > 0 {
            result["broker_cpu_seconds"] = cpu
            result["cpu_seconds_per_100k"] = cpu / Double(received) * 100_000
        }
        return result
    }

    /// `connections` clients connect at once (TCP, CONNECT, CONNACK), at most `window` of them
    /// under way at a time (a new one starts as one is done): the seconds until the last CONNACK,
    /// as after a broker restart or a network outage.
    private func storm(loop: any EventLoop, tls: NIOSSLContext?) async throws -> [String: Any] {
        #if canImport(Glibc)
        if tls == nil, let storm = RawStorm(host: host, port: port, total: connections, inFlight: 1000, prefix: prefix) {
            let start = ContinuousClock.now
            storm.run()
            let elapsed = ContinuousClock.now - start
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            let connected = storm.open.count
            if let error = storm.firstError {
                FileHandle.standardError.write(Data("mqlite-bench: \(connections - connected) clients failed to connect, the first: \(error)\n".utf8))
            }
            storm.closeAll()
            try await Task.sleep(for: .seconds(1))  // let the broker see them go before the next scenario
            return ["scenario": "storm", "connections": connections, "connected": connected, "seconds": seconds, "lost": connections - connected]
        }
        #endif
        final class Storm: @unchecked Sendable {  // loop-only
            var next = 0
            var done = 0
            var open: [BenchConnection] = []
            var firstError: String?
        }
        let total = connections
        let state = Storm()
        let finished = loop.makePromise(of: Void.self)
        let start = ContinuousClock.now
        let (host, port, prefix) = (self.host, self.port, self.prefix)
        loop.execute {
            @Sendable func startOne() {
                let i = state.next
                state.next += 1
                BenchConnection.connect(on: loop, host: host, port: port, clientID: "\(prefix)-storm-\(i)", tls: tls).whenComplete { result in
                    switch result {
                    case .success(let c): state.open.append(c)
                    case .failure(let error): if state.firstError == nil { state.firstError = "\(error)" }
                    }
                    state.done += 1
                    if state.next < total { startOne() } else if state.done == total { finished.succeed(()) }
                }
            }
            for _ in 0..<min(1000, total) { startOne() }
        }
        try await finished.futureResult.get()
        let elapsed = ContinuousClock.now - start
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let (open, firstError) = try await loop.submit { (state.open, state.firstError) }.get()
        let failed = total - open.count
        if let firstError { FileHandle.standardError.write(Data("mqlite-bench: \(failed) clients failed to connect, the first: \(firstError)\n".utf8)) }
        try await loop.submit { for c in open { c.close() } }.get()
        try await Task.sleep(for: .seconds(1))  // let the broker see them go before the next scenario
        return ["scenario": "storm", "connections": connections, "connected": open.count, "seconds": seconds, "lost": failed]
    }

    private func idleConnections(loop: any EventLoop, tls: NIOSSLContext?) async throws -> [String: Any] {
        guard let pid, let before = residentBytes(pid: pid) else { throw ValidationError("connections needs --pid of the broker") }
        var open: [BenchConnection] = []
        let batch = 250
        var index = 0
        while index < connections {
            let count = min(batch, connections - index)
            let futures = (0..<count).map { i in
                BenchConnection.connect(on: loop, host: host, port: port, clientID: "\(prefix)-idle-\(index + i)", sendConnect: !tcpOnly, tls: tls)
            }
            for f in futures { open.append(try await f.get()) }
            index += count
        }
        try await Task.sleep(for: .seconds(1))
        let after = residentBytes(pid: pid) ?? before
        let snapshot = open
        try await loop.submit { for c in snapshot { c.close() } }.get()
        return ["scenario": "connections", "connections": connections, "rss_before": before, "rss_after": after,
                "bytes_per_connection": Double(after - before) / Double(connections), "lost": 0]
    }
}

/// Clients that connect, subscribe to a filter of their own and a wildcard one, and disconnect, over
/// and over, on an event loop of their own: the subscription churn of a broker with devices coming
/// and going, beside the measured traffic.
final class Churn: Sendable {
    private final class State: Sendable {
        let value = Mutex<(running: Bool, cycles: Int, failures: Int)>((true, 0, 0))
        func withLock<T>(_ body: (inout (running: Bool, cycles: Int, failures: Int)) -> T) -> T { value.withLock { body(&$0) } }
    }

    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let state = State()
    private let tasks: [Task<Void, Never>]

    init(clients: Int, pause: TimeAmount, host: String, port: Int, prefix: String, tls: NIOSSLContext?) {
        var tasks: [Task<Void, Never>] = []
        let loop = group.next()
        let state = self.state
        for i in 0..<clients {
            tasks.append(Task {
                while state.withLock({ $0.running }) {
                    do {
                        let c = try await BenchConnection.connect(
                            on: loop, host: host, port: port, clientID: "\(prefix)-churn-\(i)", tls: tls
                        ).get()
                        try await c.subscribe("\(prefix)/churn/\(i)", qos: .atMostOnce).get()
                        try await c.subscribe("\(prefix)/churn/\(i)/+", qos: .atMostOnce).get()
                        try await loop.submit { c.close() }.get()
                        state.withLock { $0.cycles += 1 }
                    } catch {
                        state.withLock { $0.failures += 1 }
                    }
                    try? await Task.sleep(nanoseconds: UInt64(pause.nanoseconds))
                }
            })
        }
        self.tasks = tasks
    }

    /// Stops the clients and returns how many cycles they completed.
    func stop() async throws -> Int {
        state.withLock { $0.running = false }
        for task in tasks { await task.value }
        try await group.shutdownGracefully()
        return state.withLock { $0.cycles }
    }
}
