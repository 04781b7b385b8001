import Logging
import NIOCore

// MARK: - Header

/// What a PROXY protocol header (v1 or v2, HAProxy's `proxy-protocol.txt`) says of a connection.
public struct ProxyHeader: Sendable, Equatable {
    /// The client's address as the proxy saw it; nil when the header says to keep the socket's own
    /// (v2 LOCAL, a health check of the proxy itself; v1 `UNKNOWN`; v2 `UNSPEC` or `AF_UNIX`).
    public var source: SocketAddress?
    /// Bytes the header took (what follows it is the client's own stream).
    public var length: Int

    /// Longest v1 header, `\r\n` included (the specification's limit).
    public static let maxV1Length = 107
    /// The fixed part of a v2 header: signature, version and command, family, length.
    public static let v2FixedLength = 16
    /// Most bytes of a v2 header after its fixed part: addresses (36 bytes for IPv6, 216 for
    /// AF_UNIX) and TLVs (what HAProxy and AWS NLB add is well under 1 KiB). The field allows
    /// 65535; a header longer than this is refused before it is buffered.
    public static let maxV2BodyLength = 4096
    /// `\r\n\r\n\0\r\nQUIT\n`.
    static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    static let v1Prefix = Array("PROXY ".utf8)

    /// Parses the header at the start of `bytes`: nil if more bytes are needed, the header once it
    /// is complete, or an error as soon as the bytes cannot be the start of a valid header (a
    /// byte-at-a-time sender is refused at the first wrong byte, not after the limit).
    public static func parse(_ bytes: ByteBuffer) throws(ProxyHeaderError) -> ProxyHeader? {
        guard let first = bytes.getInteger(at: bytes.readerIndex, as: UInt8.self) else { return nil }
        switch first {
        case v1Prefix[0]: return try parseV1(bytes)
        case v2Signature[0]: return try parseV2(bytes)
        default: throw ProxyHeaderError(.missing)
        }
    }

    private static func parseV1(_ bytes: ByteBuffer) throws(ProxyHeaderError) -> ProxyHeader? {
        let view = bytes.readableBytesView
        // The fixed prefix, byte by byte as far as it has come.
        for (offset, byte) in zip(v1Prefix.indices, view) where v1Prefix[offset] != byte {
            throw ProxyHeaderError(offset == 0 ? .missing : .invalidV1("does not start with \"PROXY \""))
        }
        // The line end is looked for only where it may be (bounded work for any input).
        guard let lf = view.prefix(maxV1Length).firstIndex(of: 0x0A) else {
            if view.count >= maxV1Length { throw ProxyHeaderError(.tooLong) }
            return nil
        }
        let length = lf - view.startIndex + 1
        guard length <= maxV1Length else { throw ProxyHeaderError(.tooLong) }
        guard length >= 2, view[lf - 1] == 0x0D else { throw ProxyHeaderError(.invalidV1("line does not end with CRLF")) }
        // Printable US-ASCII only between "PROXY " and CRLF.
        let line = view[(view.startIndex + v1Prefix.count)..<(lf - 1)]
        guard line.allSatisfy({ (0x20...0x7E).contains($0) }) else { throw ProxyHeaderError(.invalidV1("not printable ASCII")) }
        let fields = line.split(separator: 0x20, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        guard let family = fields.first else { throw ProxyHeaderError(.invalidV1("no protocol")) }
        if family == "UNKNOWN" {
            // The proxy does not know the client (a health check): anything after it is ignored.
            return ProxyHeader(source: nil, length: length)
        }
        guard family == "TCP4" || family == "TCP6" else { throw ProxyHeaderError(.invalidV1("unknown protocol \"\(family)\"")) }
        guard fields.count == 5 else { throw ProxyHeaderError(.invalidV1("\(family) needs source, destination and two ports")) }
        guard let source = v1Address(fields[1], port: fields[3], family: family),
            v1Address(fields[2], port: fields[4], family: family) != nil
        else { throw ProxyHeaderError(.invalidV1("bad \(family) address or port")) }
        return ProxyHeader(source: source, length: length)
    }

    private static func v1Address(_ host: String, port: String, family: String) -> SocketAddress? {
        // Ports: decimal, 0 to 65535, no sign and no leading zero.
        guard (1...5).contains(port.utf8.count), port.utf8.allSatisfy({ (0x30...0x39).contains($0) }),
            port == "0" || port.utf8.first != 0x30, let number = Int(port), number <= 65535,
            let address = try? SocketAddress(ipAddress: host, port: number)
        else { return nil }
        switch (family, address.protocol) {
        case ("TCP4", .inet), ("TCP6", .inet6): return address
        default: return nil
        }
    }

    private static func parseV2(_ bytes: ByteBuffer) throws(ProxyHeaderError) -> ProxyHeader? {
        let view = bytes.readableBytesView
        for (offset, byte) in zip(v2Signature.indices, view) where v2Signature[offset] != byte {
            throw ProxyHeaderError(offset == 0 ? .missing : .invalidV2("bad signature"))
        }
        guard view.count >= v2FixedLength else { return nil }
        let start = bytes.readerIndex
        let versionCommand = bytes.getInteger(at: start + 12, as: UInt8.self)!
        let familyTransport = bytes.getInteger(at: start + 13, as: UInt8.self)!
        let bodyLength = Int(bytes.getInteger(at: start + 14, as: UInt16.self)!)
        guard versionCommand >> 4 == 2 else { throw ProxyHeaderError(.invalidV2("version \(versionCommand >> 4), not 2")) }
        let command = versionCommand & 0x0F
        guard command <= 1 else { throw ProxyHeaderError(.invalidV2("unknown command \(command)")) }
        guard bodyLength <= maxV2BodyLength else { throw ProxyHeaderError(.tooLong) }
        // LOCAL: the proxy's own connection (a health check); the socket's address stays, and
        // the block, family included, is skipped whatever it holds ("the receiver must accept
        // this connection as valid and ... discard the protocol block including the family").
        if command == 0 {
            guard view.count >= v2FixedLength + bodyLength else { return nil }
            return ProxyHeader(source: nil, length: v2FixedLength + bodyLength)
        }
        let family = familyTransport >> 4
        let transport = familyTransport & 0x0F
        // Each family's addresses must fit in the announced length (TLVs may follow them).
        let addressLength: Int
        switch family {
        case 0: addressLength = 0  // AF_UNSPEC
        case 1: addressLength = 12  // AF_INET: two addresses, two ports
        case 2: addressLength = 36  // AF_INET6
        case 3: addressLength = 216  // AF_UNIX
        default: throw ProxyHeaderError(.invalidV2("unknown address family \(family)"))
        }
        guard transport <= 2 else { throw ProxyHeaderError(.invalidV2("unknown transport \(transport)")) }
        guard bodyLength >= addressLength else { throw ProxyHeaderError(.invalidV2("length \(bodyLength) too short for its addresses")) }
        guard view.count >= v2FixedLength + bodyLength else { return nil }
        let length = v2FixedLength + bodyLength
        // UNSPEC goes with UNSPEC only: 0x10 or 0x01 is none of the values the protocol defines,
        // which "must be rejected as invalid by receivers".
        guard (family == 0) == (transport == 0) else {
            throw ProxyHeaderError(.invalidV2("address family \(family) with transport \(transport)"))
        }
        // A proxied datagram flow is not a TCP client.
        guard transport != 2 else { throw ProxyHeaderError(.invalidV2("DGRAM transport on a stream listener")) }
        let at = start + v2FixedLength
        switch family {
        case 1:
            let ip = bytes.getBytes(at: at, length: 4)!
            let port = bytes.getInteger(at: at + 8, as: UInt16.self)!
            return ProxyHeader(source: socketAddress(ip, port: port), length: length)
        case 2:
            let ip = bytes.getBytes(at: at, length: 16)!
            let port = bytes.getInteger(at: at + 32, as: UInt16.self)!
            return ProxyHeader(source: socketAddress(ip, port: port), length: length)
        default:
            // UNSPEC, or a UNIX socket client: no IP address to report; the socket's stays.
            return ProxyHeader(source: nil, length: length)
        }
    }

    private static func socketAddress(_ ip: [UInt8], port: UInt16) -> SocketAddress? {
        var packed = ByteBuffer(bytes: ip)
        return try? SocketAddress(packedIPAddress: packed.readSlice(length: ip.count)!, port: Int(port))
    }
}

/// Why a connection's PROXY protocol header was refused.
public struct ProxyHeaderError: Error, Equatable, CustomStringConvertible {
    enum Problem: Equatable {
        case missing
        case tooLong
        case invalidV1(String)
        case invalidV2(String)
        case timeout(Int64)
    }

    let problem: Problem

    init(_ problem: Problem) { self.problem = problem }

    /// The connection did not start with a PROXY protocol header at all.
    public var isMissing: Bool { problem == .missing }

    public var description: String {
        switch problem {
        case .missing: "no PROXY protocol header (the connection must start with one on this listener)"
        case .tooLong:
            "PROXY protocol header longer than allowed (v1: \(ProxyHeader.maxV1Length) bytes, v2: \(ProxyHeader.v2FixedLength)+\(ProxyHeader.maxV2BodyLength))"
        case .invalidV1(let why): "invalid PROXY protocol v1 header: \(why)"
        case .invalidV2(let why): "invalid PROXY protocol v2 header: \(why)"
        case .timeout(let ms): "PROXY protocol header not complete within \(ms) ms"
        }
    }
}

/// Told down the pipeline once a PROXY protocol header named the client: the connection's
/// address is this from now on (`c.address`, logs).
struct ProxiedAddressEvent {
    let address: SocketAddress
}

// MARK: - Handler

/// First in the pipeline of a `proxy_protocol` listener (before TLS): reads the PROXY protocol
/// header, tells the handlers behind it the client's address, passes on whatever came after the
/// header, and removes itself. A connection without a valid header within `timeout` is closed,
/// with a log line rate-limited per listener.
final class ProxyProtocolHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let listener: RunningListener
    private let logger: Logger
    private let timeout: TimeAmount
    /// Bytes read so far (at most a header's worth: anything longer is refused first).
    private var buffered: ByteBuffer?
    private var timer: Scheduled<Void>?
    private var done = false

    init(listener: RunningListener, logger: Logger, timeout: TimeAmount) {
        self.listener = listener
        self.logger = logger
        self.timeout = timeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { startTimer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        startTimer(context: context)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        buffered = nil
    }

    private func startTimer(context: ChannelHandlerContext) {
        guard timer == nil, !done else { return }
        let this = NIOLoopBound(self, eventLoop: context.eventLoop)
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: timeout) {
            this.value.refuse(ProxyHeaderError(.timeout(this.value.timeout.nanoseconds / 1_000_000)), context: bound.value)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !done else { return }
        var bytes = unwrapInboundIn(data)
        if var pending = buffered {
            pending.writeBuffer(&bytes)
            bytes = pending
        }
        buffered = nil
        let header: ProxyHeader?
        do {
            header = try ProxyHeader.parse(bytes)
        } catch {
            return refuse(error, context: context)
        }
        guard let header else {
            buffered = bytes
            return
        }
        done = true
        timer?.cancel()
        timer = nil
        if let source = header.source { context.fireUserInboundEventTriggered(ProxiedAddressEvent(address: source)) }
        bytes.moveReaderIndex(forwardBy: header.length)
        if bytes.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(bytes)) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    private func refuse(_ error: ProxyHeaderError, context: ChannelHandlerContext) {
        guard !done else { return }
        done = true
        buffered = nil
        timer?.cancel()
        timer = nil
        var logger = logger
        logger[metadataKey: "address"] = "\(context.channel.remoteAddress.map(\.addressText) ?? "?")"
        listener.logRefusal("closing connection: \(error.description)", logger: logger)
        context.close(promise: nil)
    }
}

// A channel handler lives on its channel's event loop.
@available(*, unavailable)
extension ProxyProtocolHandler: Sendable {}

extension SocketAddress {
    /// `IP:PORT` as connections are named in logs and in `c.address`. (Of a channel's
    /// `remoteAddress`, which NIO keeps from when it accepted the socket: the context's asks the
    /// kernel again, a getpeername call per connection.)
    var addressText: String { "\(ipAddress ?? "?"):\(port ?? 0)" }
}
