import InMemoryLogging
import Logging
@testable import MQLiteBroker
import NIOCore
import NIOEmbedded
import Testing

/// The PROXY protocol header reader (`proxy_protocol = true` listeners): the parser, and the
/// handler on an EmbeddedChannel (bytes whole and byte by byte, what follows the header, refusals,
/// the time limit).
@Suite("PROXY protocol")
struct ProxyProtocolTests {
    static let v1TCP4 = Array("PROXY TCP4 192.168.0.1 192.168.0.11 56324 1883\r\n".utf8)
    static let v1TCP6 = Array("PROXY TCP6 2001:db8::1 2001:db8::2 4242 1883\r\n".utf8)
    static let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    /// A v2 header: version 2, `command`, `family`/`transport`, then `body` (addresses and TLVs).
    static func v2(command: UInt8 = 1, familyTransport: UInt8, body: [UInt8]) -> [UInt8] {
        signature + [0x20 | command, familyTransport, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    }

    /// 203.0.113.7:51000 → 10.0.0.1:1883
    static let v2TCP4 = v2(familyTransport: 0x11, body: [203, 0, 113, 7, 10, 0, 0, 1, 0xC7, 0x38, 0x07, 0x5B])
    /// [2001:db8::7]:51000 → [2001:db8::1]:1883, with a TLV (PP2_TYPE_AUTHORITY "mqtt.example") after the addresses.
    static let v2TCP6: [UInt8] = {
        var body: [UInt8] = [0x20, 0x01, 0x0D, 0xB8] + Array(repeating: 0, count: 11) + [7]
        body += [0x20, 0x01, 0x0D, 0xB8] + Array(repeating: 0, count: 11) + [1]
        body += [0xC7, 0x38, 0x07, 0x5B]
        body += [0x02, 0x00, 12] + Array("mqtt.example".utf8)
        return v2(familyTransport: 0x21, body: body)
    }()
    /// LOCAL (a health check of the proxy itself), with INET addresses that must be ignored.
    static let v2Local = v2(command: 0, familyTransport: 0x11, body: [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2])

    static let connect: [UInt8] = [0x10, 0x0C, 0x00, 0x04] + Array("MQTT".utf8) + [0x04, 0x02, 0x00, 0x3C, 0x00, 0x00]

    func parse(_ bytes: [UInt8]) throws(ProxyHeaderError) -> ProxyHeader? {
        try ProxyHeader.parse(ByteBuffer(bytes: bytes))
    }

    // MARK: - Parser

    @Test("v1 and v2 headers, IPv4 and IPv6, give the client's address and the header's length")
    func happyPaths() throws {
        #expect(try parse(Self.v1TCP4) == ProxyHeader(source: try SocketAddress(ipAddress: "192.168.0.1", port: 56324), length: Self.v1TCP4.count))
        #expect(try parse(Self.v1TCP6) == ProxyHeader(source: try SocketAddress(ipAddress: "2001:db8::1", port: 4242), length: Self.v1TCP6.count))
        #expect(try parse(Self.v2TCP4) == ProxyHeader(source: try SocketAddress(ipAddress: "203.0.113.7", port: 51000), length: Self.v2TCP4.count))
        #expect(try parse(Self.v2TCP6) == ProxyHeader(source: try SocketAddress(ipAddress: "2001:db8::7", port: 51000), length: Self.v2TCP6.count))
    }

    @Test("LOCAL, UNKNOWN and UNSPEC keep the socket's address")
    func keepSocketAddress() throws {
        #expect(try parse(Self.v2Local) == ProxyHeader(source: nil, length: Self.v2Local.count))
        let unknown = Array("PROXY UNKNOWN whatever follows\r\n".utf8)
        #expect(try parse(unknown) == ProxyHeader(source: nil, length: unknown.count))
        let unspec = Self.v2(familyTransport: 0x00, body: [])
        #expect(try parse(unspec) == ProxyHeader(source: nil, length: 16))
        // LOCAL's block is skipped whatever its family and length say (the spec: "discard the
        // protocol block including the family").
        for (familyTransport, body) in [(0x11, [UInt8]()), (0x40, []), (0x21, Array(repeating: UInt8(0), count: 12))] as [(UInt8, [UInt8])] {
            let local = Self.v2(command: 0, familyTransport: familyTransport, body: body)
            #expect(try parse(local) == ProxyHeader(source: nil, length: local.count), "family/transport \(familyTransport)")
        }
    }

    static let validHeaders: [[UInt8]] = [v1TCP4, v1TCP6, v2TCP4, v2TCP6, v2Local]

    @Test("every proper prefix needs more bytes; the parser never reads past the header", arguments: ProxyProtocolTests.validHeaders)
    func prefixes(header: [UInt8]) throws {
        for n in 0..<header.count {
            #expect(try parse(Array(header.prefix(n))) == nil, "prefix of \(n) bytes")
        }
        #expect(try parse(header + Self.connect)?.length == header.count)
    }

    static func text(_ s: String) -> [UInt8] { Array(s.utf8) }
    static func header(_ rest: [UInt8]) -> [UInt8] { signature + rest }

    /// Bytes, and what the refusal says.
    static let invalidCases: [([UInt8], String)] = {
        var cases: [([UInt8], String)] = []
        cases.append((connect, "no PROXY protocol header"))
        cases.append((text("GET / HTTP/1.1\r\n"), "no PROXY protocol header"))
        cases.append((text("PROXZ"), "does not start with \"PROXY \""))
        cases.append((text("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"), "unknown protocol"))
        cases.append((text("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), "needs source"))
        cases.append((text("PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"), "bad TCP4 address"))
        cases.append((text("PROXY TCP4 ::1 ::1 1 2\r\n"), "bad TCP4 address"))
        cases.append((text("PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"), "bad TCP6 address"))
        cases.append((text("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"), "bad TCP4 address or port"))
        cases.append((text("PROXY TCP4 1.2.3.4 5.6.7.8 0123 2\r\n"), "bad TCP4 address or port"))
        cases.append((text("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"), "needs source"))
        cases.append((text("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), "CRLF"))
        cases.append((text("PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n"), "printable"))
        cases.append((text("PROXY TCP4 " + String(repeating: "1", count: 96)), "longer than allowed"))
        cases.append((Array(signature.prefix(5)) + [0x0E], "bad signature"))
        cases.append((header([0x12, 0x11, 0, 12]), "version 1"))
        cases.append((header([0x22, 0x11, 0, 12]), "unknown command 2"))
        cases.append((header([0x21, 0x41, 0, 12]), "unknown address family 4"))
        cases.append((header([0x21, 0x13, 0, 12]), "unknown transport 3"))
        cases.append((header([0x21, 0x11, 0, 11]), "too short"))
        cases.append((header([0x21, 0x21, 0, 35]), "too short"))
        cases.append((header([0x21, 0x12, 0, 12] + [UInt8](repeating: 0, count: 12)), "DGRAM"))
        cases.append((header([0x21, 0x10, 0, 12] + [UInt8](repeating: 0, count: 12)), "address family 1 with transport 0"))
        cases.append((header([0x21, 0x01, 0, 0]), "address family 0 with transport 1"))
        // 65535 announced: refused at once, not buffered.
        cases.append((header([0x21, 0x11, 0xFF, 0xFF]), "longer than allowed"))
        return cases
    }()

    @Test("invalid headers are refused as soon as the bytes show it", arguments: ProxyProtocolTests.invalidCases)
    func invalid(bytes: [UInt8], problem: String) {
        do {
            _ = try parse(bytes)
            Issue.record("accepted \(bytes)")
        } catch {
            #expect(error.description.contains(problem), "\(error)")
        }
    }

    @Test("v1 at exactly 107 bytes is accepted; 108 is not")
    func v1Limit() throws {
        // "PROXY TCP6 " + two addresses + two ports + CRLF, padded with leading-zero-free IPv6 text.
        let longest = Array("PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".utf8)
        #expect(longest.count == 104)
        #expect(try parse(longest)?.length == 104)
        let tooLong = Array("PROXY UNKNOWN ".utf8) + Array(repeating: UInt8(ascii: "x"), count: 92) + Array("\r\n".utf8)
        #expect(tooLong.count == 108)
        #expect(throws: ProxyHeaderError.self) { try parse(tooLong) }
        let exact = Array("PROXY UNKNOWN ".utf8) + Array(repeating: UInt8(ascii: "x"), count: 91) + Array("\r\n".utf8)
        #expect(try parse(exact)?.length == 107)
    }

    // MARK: - Handler

    /// Records what the PROXY handler passes on.
    final class Recorder: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        var bytes: [UInt8] = []
        var addresses: [SocketAddress] = []
        var activeCount = 0

        func channelActive(context: ChannelHandlerContext) { activeCount += 1 }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            bytes += unwrapInboundIn(data).readableBytesView
        }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let event = event as? ProxiedAddressEvent { addresses.append(event.address) }
        }
    }

    func makeChannel(timeout: TimeAmount = .seconds(10)) throws -> (EmbeddedChannel, Recorder, InMemoryLogHandler) {
        let logs = InMemoryLogHandler()
        let logger = Logger(label: "proxy-test", factory: { _ in logs })
        let listener = RunningListener(
            index: 0, configuration: ListenerConfiguration(ListenAddress(host: "127.0.0.1", port: 0), proxyProtocol: true), context: nil)
        let recorder = Recorder()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ProxyProtocolHandler(listener: listener, logger: logger, timeout: timeout))
        try channel.pipeline.syncOperations.addHandler(recorder)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 40000)).wait()
        return (channel, recorder, logs)
    }

    func isRemoved(_ channel: EmbeddedChannel) -> Bool {
        (try? channel.pipeline.syncOperations.handler(type: ProxyProtocolHandler.self)) == nil
    }

    @Test("whole, byte by byte, or split anywhere: the address is told, the bytes after the header pass on, the handler leaves",
          arguments: ProxyProtocolTests.validHeaders.dropLast())
    func deliveries(header: [UInt8]) throws {
        let stream = header + Self.connect + Array("more".utf8)
        let expected = try #require(try parse(header)?.source)
        // Whole; byte by byte; and in chunks of 3, 7 and 13 bytes.
        for chunk in [stream.count, 1, 3, 7, 13] {
            let (channel, recorder, _) = try makeChannel()
            for start in stride(from: 0, to: stream.count, by: chunk) {
                try channel.writeInbound(ByteBuffer(bytes: stream[start..<min(start + chunk, stream.count)]))
            }
            #expect(recorder.addresses == [expected], "chunk \(chunk)")
            #expect(recorder.bytes == Self.connect + Array("more".utf8), "chunk \(chunk)")
            #expect(recorder.activeCount == 1)
            #expect(isRemoved(channel))
            #expect(channel.isActive)
            _ = try? channel.finish()
        }
    }

    @Test("LOCAL tells no address and keeps the connection")
    func local() throws {
        let (channel, recorder, _) = try makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: Self.v2Local + Self.connect))
        #expect(recorder.addresses.isEmpty)
        #expect(recorder.bytes == Self.connect)
        #expect(isRemoved(channel) && channel.isActive)
        _ = try? channel.finish()
    }

    static let refusedStreams: [[UInt8]] = [
        connect,
        text("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),
        // Over the v1 limit without a line end, sent a byte at a time below.
        text("PROXY UNKNOWN " + String(repeating: "x", count: 200)),
        header([0x21, 0x11, 0xFF, 0xFF] + [UInt8](repeating: 0, count: 100)),
    ]

    @Test("a connection without a valid header is closed and logged; nothing reaches the handlers behind",
          arguments: ProxyProtocolTests.refusedStreams)
    func refusals(bytes: [UInt8]) throws {
        let (channel, recorder, logs) = try makeChannel()
        for byte in bytes where channel.isActive {
            try channel.writeInbound(ByteBuffer(bytes: [byte]))
        }
        #expect(!channel.isActive)
        #expect(recorder.bytes.isEmpty && recorder.addresses.isEmpty)
        #expect(logs.entries.contains { "\($0.message)".contains("closing connection") && "\($0.message)".contains("PROXY protocol") })
    }

    @Test("a header not complete within the time limit closes the connection")
    func timeout() throws {
        let (channel, recorder, logs) = try makeChannel(timeout: .seconds(10))
        try channel.writeInbound(ByteBuffer(bytes: Array(Self.v1TCP4.prefix(20))))
        channel.embeddedEventLoop.advanceTime(by: .seconds(9))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(!channel.isActive)
        #expect(recorder.bytes.isEmpty)
        #expect(logs.entries.contains { "\($0.message)".contains("not complete within 10000 ms") })
    }

    @Test("a header that came in time cancels the time limit")
    func timerCancelled() throws {
        let (channel, _, _) = try makeChannel(timeout: .seconds(10))
        try channel.writeInbound(ByteBuffer(bytes: Self.v2TCP4))
        channel.embeddedEventLoop.advanceTime(by: .seconds(60))
        #expect(channel.isActive)
        _ = try? channel.finish()
    }
}
