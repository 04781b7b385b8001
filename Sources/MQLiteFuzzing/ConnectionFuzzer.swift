#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import MQTTCore
import NIOCore
import NIOPosix

/// Fuzz target `connection`: real `ConnectionHandler`s of a real `Broker` (two workers, Lua hooks
/// that authenticate, restrict, rewrite and republish) driven over socketpairs.
///
/// The input is up to four clients separated by `FF FF`. Each client's first byte is a control
/// byte: bits 0-3 pick the size of its writes (`chunkSizes`), bit 4 closes the socket at the end
/// instead of half-closing it, bit 5 puts it on the second worker. The clients' bytes are written
/// in turns, one write each per turn, and after each turn the harness waits until both workers
/// have handled what they had, so one client's SUBSCRIBE is in place before another's PUBLISH.
/// Then every client closes its side (EOF), and the broker must close every connection (a hang
/// is caught by libFuzzer's -timeout), leave none counted as open, and no hook may have failed;
/// what it sent each client that read to the end must decode as server-to-client packets, CONNACK first.
/// A fresh broker per input, so no state leaks from one input to the next.
public final class ConnectionFuzzer {
    public static let separator: [UInt8] = [0xFF, 0xFF]
    static let maxClients = 4
    /// Writes per client beyond which the rest of its bytes go in one write (bounds the time an
    /// input of 1-byte writes takes).
    static let maxWrites = 48
    static let chunkSizes = [0, 1, 2, 3, 5, 7, 11, 16, 24, 32, 48, 64, 100, 128, 200, 256]

    static let script = #"""
    -- Installed by the connection fuzz target (Sources/MQLiteFuzzing/ConnectionFuzzer.swift).
    -- Every hook kind, answering in each of the ways the API allows, keyed on names the seeds use.
    mqlite.on_connect(function(c)
      if c.username == "refused" then return false, 4 end
      if c.username == "nobody" then return false end
      if c.username == "admin" then return c.password == "secret" end
      return nil
    end)
    mqlite.on_authorize(function(c)
      if c.username == "acl" then
        return { publish = { "acl/%c/#", "public/#" }, subscribe = { "acl/#", "public/+" }, deny = { "acl/%c/secret" } }
      end
      return nil
    end)
    mqlite.on_subscribe(function(s)
      if s.filter:sub(1, 5) == "deny/" then return false end
      if s.filter:sub(1, 3) == "q0/" then return 0 end
      if s.filter:sub(1, 3) == "rw/" then return { filter = "rewritten/" .. s.filter:sub(4), qos = 1 } end
      return nil
    end)
    mqlite.on_publish("hook/#", function(m)
      if m.payload == "drop" then return false end
      if m.payload == "keep" then return true end
      if m.payload == "many" then
        return { { topic = "hooked/a" }, { topic = "hooked/b", qos = 0 }, { payload = "", retain = true } }
      end
      if m.payload == "republish" then mqlite.publish("events/republished", m.topic, 1, false) return nil end
      return { topic = "hooked/" .. m.topic:sub(6), payload = m.payload .. "!", retain = false }
    end)
    mqlite.on_connected(function(c) mqlite.kv.incr("online") end)
    mqlite.on_disconnected(function(c, reason) mqlite.kv.incr("online", -1) end)
    """#

    let directory: String
    let configuration: BrokerConfiguration
    let logger: Logger

    public init() throws {
        signal(SIGPIPE, SIG_IGN)
        directory = NSTemporaryDirectory() + "mqlite-fuzz-connection-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = directory + "/hooks.lua"
        try Self.script.write(toFile: path, atomically: true, encoding: .utf8)
        var configuration = BrokerConfiguration(workers: 2, listeners: [])
        // Small limits, so that the paths past them are reachable with short inputs.
        configuration.limits = Limits(maxPacketSize: 64 * 1024, maxInflight: 2, maxQueued: 4)
        configuration.plugins = [PluginConfiguration(script: path)]
        configuration.baseDirectory = directory
        self.configuration = configuration
        var logger = Logger(label: "mqlite-fuzz")
        logger.logLevel = ProcessInfo.processInfo.environment["MQLITE_FUZZ_LOG"].flatMap { Logger.Level(rawValue: $0) } ?? .error
        self.logger = logger
    }

    deinit {
        try? FileManager.default.removeItem(atPath: directory)
    }

    struct Client {
        var fd: CInt
        var channel: any Channel
        var bytes: ArraySlice<UInt8>
        var chunk: Int
        var writes = 0
        var abrupt: Bool
        /// What the broker speaks to it: 5.0 when its first packet is an MQTT 5 CONNECT (even one
        /// that cannot be decoded: the broker answers that with an MQTT 5 CONNACK and its reason
        /// code), else 3.1.1.
        var version: ProtocolVersion
    }

    static func version(of bytes: ArraySlice<UInt8>) -> ProtocolVersion {
        MQTTDecoder.connectProtocolLevel(in: ByteBuffer(bytes: bytes)) == ProtocolVersion.v5.rawValue ? .v5 : .v3_1_1
    }

    /// The input cut into clients at each separator (the last takes whatever is left).
    static func split(_ data: UnsafeRawBufferPointer) -> [ArraySlice<UInt8>] {
        let bytes = Array(data)
        var sections: [ArraySlice<UInt8>] = []
        var start = 0
        var i = 0
        while i + 1 < bytes.count && sections.count < maxClients - 1 {
            if bytes[i] == separator[0] && bytes[i + 1] == separator[1] {
                sections.append(bytes[start..<i])
                i += 2
                start = i
            } else {
                i += 1
            }
        }
        sections.append(bytes[start...])
        return sections.filter { !$0.isEmpty }
    }

    /// Runs one input; returns the packets the broker sent each client that half-closed (the
    /// others closed without reading), in client order.
    @discardableResult
    public func run(_ data: UnsafeRawBufferPointer) -> [[MQTTPacket]] {
        let sections = Self.split(data)
        guard !sections.isEmpty else { return [] }
        let host: ScriptingHost
        do {
            host = try ScriptingHost(configuration: configuration, logger: logger)
        } catch {
            fatalError("the fuzz hooks do not load: \(error)")
        }
        let broker = Broker(configuration: configuration, hooks: host, logger: logger)
        host.bind(to: broker)

        var clients: [Client] = []
        for section in sections {
            let control = section.first!
            var fds: [CInt] = [-1, -1]
            guard socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue), 0, &fds) == 0 else { fatalError("socketpair: \(errno)") }
            let channel: any Channel
            do {
                channel = try broker.serveConnectedSocket(fds[0], worker: Int(control >> 5) & 1).wait()
            } catch {
                fatalError("cannot serve a socketpair: \(error)")
            }
            clients.append(Client(
                fd: fds[1], channel: channel, bytes: section.dropFirst(),
                chunk: Self.chunkSizes[Int(control & 0x0F)], abrupt: control & 0x10 != 0, version: Self.version(of: section.dropFirst())))
        }

        // Turns: one write per client, then let both workers handle it.
        while clients.contains(where: { !$0.bytes.isEmpty }) {
            for i in clients.indices where !clients[i].bytes.isEmpty {
                var count = clients[i].chunk == 0 ? clients[i].bytes.count : min(clients[i].chunk, clients[i].bytes.count)
                clients[i].writes += 1
                if clients[i].writes >= Self.maxWrites { count = clients[i].bytes.count }
                let sent = clients[i].bytes.withUnsafeBytes { send(clients[i].fd, $0.baseAddress, count, CInt(MSG_NOSIGNAL)) }
                if sent <= 0 {
                    clients[i].bytes = []  // the broker closed this connection
                } else {
                    clients[i].bytes = clients[i].bytes.dropFirst(sent)
                }
            }
            // Several rounds: what one client's read starts (a session hand-over, a mailbox
            // drain, reading resumed after CONNACK) may need a loop turn or two more, and under
            // load two rounds were sometimes not enough for one client's SUBSCRIBE to be in
            // place before another's PUBLISH (FuzzHarnessTests failed about 1 run in 12).
            for _ in 0..<6 { broker.waitForWorkersToSettle() }
        }

        // The end of every client: the broker must close each connection.
        for i in clients.indices {
            if clients[i].abrupt {
                close(clients[i].fd)
                clients[i].fd = -1
            } else {
                shutdown(clients[i].fd, CInt(SHUT_WR))
            }
        }
        for client in clients {
            try? client.channel.closeFuture.wait()
        }
        // What the broker sent each client that read to the end: it must be a well-formed stream
        // of server-to-client packets, starting with CONNACK.
        var received: [[MQTTPacket]] = []
        for client in clients where client.fd >= 0 {
            received.append(Self.checkServerStream(Self.readAll(client.fd), version: client.version))
            close(client.fd)
        }
        broker.waitForWorkersToSettle()
        broker.waitForWorkersToSettle()
        precondition(broker.openConnections == 0, "\(broker.openConnections) connections still counted as open after all closed")
        precondition(host.failureCount == 0, "a fuzz hook failed (its message is logged above)")
        do {
            try broker.stopLoops()
        } catch {
            fatalError("cannot stop the broker's loops: \(error)")
        }
        return received
    }

    /// Everything readable from `fd` until EOF (the broker has closed its end by now).
    static func readAll(_ fd: CInt) -> ByteBuffer {
        var buffer = ByteBuffer()
        while true {
            buffer.reserveCapacity(minimumWritableBytes: 4096)
            let count = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 4096) { pointer in
                max(0, recv(fd, pointer.baseAddress, pointer.count, 0))
            }
            if count == 0 { return buffer }
        }
    }

    static func checkServerStream(_ stream: ByteBuffer, version: ProtocolVersion) -> [MQTTPacket] {
        var stream = stream
        let decoder = MQTTDecoder(maxPacketSize: Int.max, acceptedVersions: .all)
        var packets: [MQTTPacket] = []
        do {
            while let packet = try decoder.decode(buffer: &stream, version: version) {
                if case .disconnectV5? = packets.last { preconditionFailure("the broker sent a \(packet.type) after DISCONNECT") }
                switch packet {
                case .connack, .publish, .puback, .pubrec, .pubrel, .pubcomp, .suback, .unsuback, .pingresp:
                    break
                case .connect, .subscribe, .unsubscribe, .pingreq, .disconnect, .auth:
                    preconditionFailure("the broker sent a client a \(packet.type)")
                case .ackV5, .unsubackV5, .disconnectV5:
                    precondition(version == .v5, "the broker sent an MQTT 3.1.1 client an MQTT 5 \(packet.type)")
                }
                if packets.isEmpty, packet.type != .connack {
                    preconditionFailure("the broker's first packet to a client is a \(packet.type), not CONNACK")
                }
                if packet.type == .connack, !packets.isEmpty {
                    preconditionFailure("the broker sent a second CONNACK")
                }
                packets.append(packet)
            }
        } catch {
            preconditionFailure("the broker sent a malformed stream: \(error) after \(packets.count) packets")
        }
        return packets
    }
}
