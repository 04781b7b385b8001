import Logging
import MQLiteTestSupport
import MQTTCore
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import MQLiteBroker

/// Sends `request` on a fresh connection to 127.0.0.1:`port` and returns everything read until the
/// server closes.
private func httpExchange(port: Int, _ request: String) async throws -> String {
    final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        var received = ByteBuffer()
        let done: EventLoopPromise<String>
        init(done: EventLoopPromise<String>) { self.done = done }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = unwrapInboundIn(data)
            received.writeBuffer(&buffer)
        }
        func channelInactive(context: ChannelHandlerContext) { done.succeed(String(buffer: received)) }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }
    let loop = httpClientGroup.next()
    let done = loop.makePromise(of: String.self)
    let channel = try await ClientBootstrap(group: loop)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Collector(done: done)) }
        }
        .connect(host: "127.0.0.1", port: port).get()
    try await channel.writeAndFlush(ByteBuffer(string: request)).get()
    return try await done.futureResult.get()
}

private let httpClientGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)

private func get(_ port: Int, _ path: String) async throws -> String {
    try await httpExchange(port: port, "GET \(path) HTTP/1.1\r\nHost: test\r\n\r\n")
}

/// A value of the Prometheus text (`name{labels}` as written there).
private func value(_ text: String, _ series: String) -> Double? {
    for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
        return Double(line.dropFirst(series.count + 1))
    }
    return nil
}

@Suite("Metrics, health and $SYS")
struct MetricsTests {
    private func configure(_ config: inout BrokerConfiguration) {
        config.listeners.append(ListenerConfiguration(ListenAddress(host: "127.0.0.1", port: 0), kind: .http))
        config.sysInterval = 0
    }

    @Test("/health answers 200 while accepting and 503 once stopping; other paths 404; bad requests 400")
    func health() async throws {
        try await withBroker(configure: configure) { fixture in
            let http = fixture.broker.boundPorts[1]
            let ok = try await get(http, "/health")
            #expect(ok.hasPrefix("HTTP/1.1 200 OK"))
            #expect(ok.contains("Connection: close"))
            #expect(try await get(http, "/other").hasPrefix("HTTP/1.1 404"))
            // A response to HEAD has no content, whatever its status (RFC 9110 §9.3.2).
            let head = try await httpExchange(port: http, "HEAD /other HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(head.hasPrefix("HTTP/1.1 404") && head.hasSuffix("\r\n\r\n"), "\(head)")
            #expect(try await httpExchange(port: http, "NOT HTTP AT ALL\r\n\r\n").hasPrefix("HTTP/1.1 400"))
            fixture.broker.beginStopping()
            #expect(try await get(http, "/health").hasPrefix("HTTP/1.1 503"))
        }
    }

    @Test("an http listener holds at most 64 connections at once: the next is closed at once; one freed makes room")
    func connectionCap() async throws {
        try await withBroker(configure: configure) { fixture in
            let http = fixture.broker.boundPorts[1]
            // 64 peers that connect and say nothing (each would be closed after 10 s).
            var idle: [any Channel] = []
            for _ in 0..<HTTPListenerLimits.maxConnections {
                idle.append(try await ClientBootstrap(group: httpClientGroup).connect(host: "127.0.0.1", port: http).get())
            }
            try await eventually("all counted") { fixture.broker.httpConnections.load(ordering: .relaxed) == HTTPListenerLimits.maxConnections }
            #expect(((try? await get(http, "/health")) ?? "") == "", "closed without an answer")
            try await idle.removeFirst().close()
            try await eventually("one freed") { fixture.broker.httpConnections.load(ordering: .relaxed) < HTTPListenerLimits.maxConnections }
            #expect(try await get(http, "/health").hasPrefix("HTTP/1.1 200 OK"))
            for channel in idle { try await channel.close() }
            try await eventually("all gone") { fixture.broker.httpConnections.load(ordering: .relaxed) == 0 }
        }
    }

    @Test("/metrics counts messages, bytes and connections exactly, summed over the workers")
    func counts() async throws {
        try await withBroker(configure: configure) { fixture in
            let http = fixture.broker.boundPorts[1]
            let before = try await get(http, "/metrics")
            #expect(before.contains("Content-Type: text/plain; version=0.0.4"))
            let sub = try await fixture.client("sub")
            try await sub.subscribe("m/#", qos: .atLeastOnce)
            let pub = try await fixture.client("pub")
            for _ in 0..<3 { try await pub.publish("m/a", "12345") }
            for id in 1...2 { try await pub.publish("m/b", "1234567", qos: .atLeastOnce, id: UInt16(id)) }
            for _ in 0..<5 {
                let message = try await sub.expectPublish()
                if message.qos == .atLeastOnce { sub.send(.puback(packetID: message.packetID!)) }
            }
            try await sub.ping()
            let text = try await get(http, "/metrics")
            let listener = "listener=\"127.0.0.1:0\""
            #expect(value(text, "mqlite_messages_received_total{qos=\"0\"}") == 3)
            #expect(value(text, "mqlite_messages_received_total{qos=\"1\"}") == 2)
            #expect(value(text, "mqlite_bytes_received_total{qos=\"0\"}") == 15)
            #expect(value(text, "mqlite_bytes_received_total{qos=\"1\"}") == 14)
            #expect(value(text, "mqlite_messages_sent_total{qos=\"0\"}") == 3)
            #expect(value(text, "mqlite_messages_sent_total{qos=\"1\"}") == 2)
            #expect(value(text, "mqlite_connections{\(listener)}") == 2)
            #expect(value(text, "mqlite_connections_total{\(listener)}") == 2)
            #expect(value(text, "mqlite_sessions{state=\"online\"}") == 2)
            #expect(value(text, "mqlite_subscriptions") == 1)
            #expect(value(text, "mqlite_inflight_messages") == 0)
            // A scrape again: counters do not count twice.
            let again = try await get(http, "/metrics")
            #expect(value(again, "mqlite_messages_received_total{qos=\"0\"}") == 3)
            await sub.disconnect()
            await pub.disconnect()
        }
    }

    @Test("mqlite_queued_messages counts what offline sessions hold, those that never expire (no session_expiry) too")
    func queuedOffline() async throws {
        try await withBroker(configure: configure) { fixture in
            let http = fixture.broker.boundPorts[1]
            let kept = try await fixture.client("kept", clean: false)
            try await kept.subscribe("q/#", qos: .atLeastOnce)
            await kept.disconnect()
            try await eventually("offline") { fixture.broker.registry.session(for: "kept")?.isOnline == false }
            let pub = try await fixture.client("pub")
            for id in 1...3 { try await pub.publish("q/a", "x", qos: .atLeastOnce, id: UInt16(id)) }
            #expect(value(try await get(http, "/metrics"), "mqlite_queued_messages") == 3)
            // Back online, it takes them: none queued.
            let back = try await fixture.client("kept", clean: false)
            for _ in 0..<3 { back.send(.puback(packetID: try await back.expectPublish().packetID!)) }
            try await back.ping()
            #expect(value(try await get(http, "/metrics"), "mqlite_queued_messages") == 0)
        }
    }

    @Test("refused CONNECTs and ACL drops are counted by reason")
    func refusals() async throws {
        try await withBroker(configure: configure) { fixture in
            let http = fixture.broker.boundPorts[1]
            let client = try await TestClient.open(port: fixture.port)
            let connack = try await client.connect(ConnectPacket(cleanSession: false, clientID: ""))
            #expect(connack.returnCode == .identifierRejected)
            let text = try await get(http, "/metrics")
            #expect(value(text, "mqlite_connects_refused_total{reason=\"identifier_rejected\"}") == 1)
            #expect(value(text, "mqlite_connects_refused_total{reason=\"not_authorized\"}") == 0)
        }
    }

    @Test("an http listener takes no TLS keys and no proxy_protocol; sys_interval is checked")
    func config() throws {
        for (key, value) in [("certfile", "\"a.crt\""), ("keyfile", "\"a.key\""), ("cafile", "\"ca.crt\""), ("require_certificate", "true"),
                             ("use_identity_as_username", "false"), ("proxy_protocol", "false")] {
            let text = "[[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n\(key) = \(value)\n"
            #expect(throws: ConfigError(file: "m.conf", key: "listener[0].\(key)",
                                        problem: "is not allowed on an http listener (plain HTTP only: no TLS, no PROXY protocol)")) {
                try ConfigFile.parse(text, file: "m.conf")
            }
        }
        let http = try ConfigFile.parse("[server]\nsys_interval = 0\n[[listener]]\nbind = \"127.0.0.1:9883\"\nprotocol = \"http\"\n", file: "m.conf")
        #expect(http.listeners.map(\.kind) == [.http])
        #expect(http.sysInterval == 0)
        #expect(BrokerConfiguration().sysInterval == 10)
        #expect(throws: ConfigError(file: "m.conf", key: "server.sys_interval", problem: "must be from 0 to 86400, not -1")) {
            try ConfigFile.parse("[server]\nsys_interval = -1\n", file: "m.conf")
        }
    }

    @Test("$SYS topics are published retained, to $SYS subscribers and not to #")
    func sysTopics() async throws {
        try await withBroker(configure: { config in config.sysInterval = 1 }) { fixture in
            let all = try await fixture.client("all")
            try await all.subscribe("#")
            let sys = try await fixture.client("sys")
            try await sys.subscribe("$SYS/broker/uptime")
            let uptime = try await sys.expectPublish(timeout: .seconds(5))
            #expect(String(buffer: uptime.topic) == "$SYS/broker/uptime")
            #expect(String(buffer: uptime.payload).hasSuffix(" seconds"))
            try await all.expectNothing(for: .milliseconds(1500))
            #expect(fixture.broker.retainedMessages(matching: TopicFilter(alreadyValidated: "$SYS/broker/version")).count == 1)
        }
    }
}
