import MQTTCore
import NIOCore
import NIOPosix
import NIOSSL

/// What the benchmark needs to know of an incoming packet: no topic or payload copies.
enum BenchEvent: Equatable {
    case connack(code: UInt8)
    case suback
    case puback
    /// A PUBLISH; `timestamp` is the first 8 payload bytes (send time, ns) when asked for.
    case publish(qos: UInt8, packetID: UInt16, timestamp: UInt64)
    case other
}

/// A light decoder: reads fixed headers and only the fields the benchmark uses.
struct BenchDecoder {
    let readTimestamps: Bool
    /// MQTT 5: a PUBLISH has properties (their length, then them) after the packet id.
    let v5: Bool

    func decode(buffer: inout ByteBuffer) -> BenchEvent? {
        let start = buffer.readerIndex
        guard let first: UInt8 = buffer.getInteger(at: start) else { return nil }
        var length = 0
        var multiplier = 1
        var offset = 1
        while true {
            guard let byte: UInt8 = buffer.getInteger(at: start + offset) else { return nil }
            length += Int(byte & 0x7F) * multiplier
            offset += 1
            if byte & 0x80 == 0 { break }
            multiplier *= 128
        }
        guard buffer.readableBytes >= offset + length else { return nil }
        defer { buffer.moveReaderIndex(to: start + offset + length) }
        let body = start + offset
        switch first >> 4 {
        case 2: return .connack(code: buffer.getInteger(at: body + 1) ?? 255)
        case 9: return .suback
        case 4: return .puback
        case 3:
            let qos = (first >> 1) & 3
            let topicLength = Int(buffer.getInteger(at: body, as: UInt16.self) ?? 0)
            var cursor = body + 2 + topicLength
            var id: UInt16 = 0
            if qos > 0 {
                id = buffer.getInteger(at: cursor) ?? 0
                cursor += 2
            }
            if v5 {
                var propertiesLength = 0
                var shift = 0
                while let byte: UInt8 = buffer.getInteger(at: cursor) {
                    cursor += 1
                    propertiesLength |= Int(byte & 0x7F) << shift
                    shift += 7
                    if byte & 0x80 == 0 || shift > 21 { break }
                }
                cursor += propertiesLength
            }
            let timestamp: UInt64 = readTimestamps ? (buffer.getInteger(at: cursor) ?? 0) : 0
            return .publish(qos: qos, packetID: id, timestamp: timestamp)
        default: return .other
        }
    }

    /// The whole length of the packet that `buffer` starts, once its fixed header is there.
    static func packetLength(_ buffer: ByteBuffer) -> Int? {
        var length = 0
        var multiplier = 1
        for offset in 1...4 {
            guard let byte: UInt8 = buffer.getInteger(at: buffer.readerIndex + offset) else { return nil }
            length += Int(byte & 0x7F) * multiplier
            if byte & 0x80 == 0 { return 1 + offset + length }
            multiplier *= 128
        }
        return 1 + 4 + length
    }
}

/// One benchmark connection. Everything runs on the benchmark's single event loop.
///
/// It decodes what it reads in place, packet by packet, without a decoder stage in the pipeline
/// (each packet would be boxed in `NIOAny` and passed on) and without copying the bytes of whole
/// reads: only a packet split between two reads is put together in a buffer of its own. The load
/// generator shares a core with what it measures, so its cost per message counts.
final class BenchConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let loop: any EventLoop
    var context: ChannelHandlerContext?
    var onEvent: (BenchConnection, BenchEvent) -> Void = { _, _ in }
    var onReadComplete: (BenchConnection) -> Void = { _ in }
    var onClose: () -> Void = {}
    /// PUBACKs owed to the broker, written once per read batch.
    var pendingAcks: ByteBuffer?
    /// What this connection speaks (its CONNECT's level).
    let version: ProtocolVersion
    private let decoder: BenchDecoder
    /// The start of a packet that the last read ended in the middle of.
    private var partial: ByteBuffer?

    init(loop: any EventLoop, version: ProtocolVersion, readTimestamps: Bool) {
        self.loop = loop
        self.version = version
        self.decoder = BenchDecoder(readTimestamps: readTimestamps, v5: version == .v5)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if var packet = partial {
            // Complete the split packet with as many bytes as it lacks (its fixed header first).
            partial = nil
            while BenchDecoder.packetLength(packet) == nil {
                guard let byte: UInt8 = buffer.readInteger() else { partial = packet; return }
                packet.writeInteger(byte)
            }
            let length = BenchDecoder.packetLength(packet)!
            var rest = buffer.readSlice(length: min(length - packet.readableBytes, buffer.readableBytes))!
            packet.writeBuffer(&rest)
            guard packet.readableBytes == length else { partial = packet; return }
            if let event = decoder.decode(buffer: &packet) { onEvent(self, event) }
        }
        while let event = decoder.decode(buffer: &buffer) { onEvent(self, event) }
        if buffer.readableBytes > 0 { partial = ByteBuffer(bytes: buffer.readableBytesView) }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if let acks = pendingAcks, acks.readableBytes > 0 {
            context.write(wrapOutboundOut(acks), promise: nil)
            pendingAcks = nil
        }
        onReadComplete(self)
        context.flush()
    }

    func channelInactive(context: ChannelHandlerContext) { onClose() }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }

    func ack(_ id: UInt16) {
        if pendingAcks == nil { pendingAcks = context?.channel.allocator.buffer(capacity: 256) }
        pendingAcks!.writeInteger(UInt8(0x40))
        pendingAcks!.writeInteger(UInt8(2))
        pendingAcks!.writeInteger(id)
    }

    func write(_ buffer: ByteBuffer) {
        context?.write(wrapOutboundOut(buffer), promise: nil)
    }

    func flush() { context?.flush() }

    var isWritable: Bool { context?.channel.isWritable ?? false }

    /// Opens a connection, sends CONNECT and completes on CONNACK 0.
    static func connect(
        on loop: any EventLoop, host: String, port: Int, clientID: String, readTimestamps: Bool = false, sendConnect: Bool = true,
        tls: NIOSSLContext? = nil, version: ProtocolVersion = .v3_1_1, cleanSession: Bool = true
    ) -> EventLoopFuture<BenchConnection> {
        let promise = loop.makePromise(of: BenchConnection.self)
        let handler = BenchConnection(loop: loop, version: version, readTimestamps: readTimestamps)
        ClientBootstrap(group: loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.maxMessagesPerRead, value: 16)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        // The certificate is checked against --tls-ca, not against the host name
                        // (the benchmark connects to an address).
                        try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: tls, serverHostname: nil))
                    }
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(to: address(host, port))
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    promise.fail(error)
                case .success(let channel):
                    let connection = handler
                    guard sendConnect else { return promise.succeed(connection) }
                    // Closed before CONNACK (a failed TLS handshake, a plain port): fail, not hang.
                    connection.onClose = { promise.fail(BenchError("connection closed before CONNACK for \(clientID)")) }
                    connection.onEvent = { c, event in
                        if case .connack(let code) = event {
                            c.onEvent = { _, _ in }
                            c.onClose = {}
                            if code == 0 { promise.succeed(c) } else { promise.fail(BenchError("CONNACK \(code) for \(clientID)")) }
                        }
                    }
                    var buffer = channel.allocator.buffer(capacity: 64)
                    // (MQTT 5: a session that outlives the connection has a Session Expiry Interval.)
                    var properties = MQTTProperties()
                    if !cleanSession && version == .v5 { properties.sessionExpiryInterval = 3600 }
                    buffer.writeMQTTPacket(.connect(ConnectPacket(
                        protocolLevel: version.rawValue, cleanSession: cleanSession, keepAlive: 0, clientID: clientID, properties: properties)))
                    channel.writeAndFlush(buffer, promise: nil)
                }
            }
        return promise.futureResult
    }

    /// Subscribes and completes on SUBACK. Any thread.
    func subscribe(_ filter: String, qos: QoS) -> EventLoopFuture<Void> {
        loop.flatSubmit { self.subscribeOnLoop(filter, qos: qos) }
    }

    private func subscribeOnLoop(_ filter: String, qos: QoS) -> EventLoopFuture<Void> {
        guard let context else { return loop.makeFailedFuture(BenchError("not connected")) }
        let promise = loop.makePromise(of: Void.self)
        let previous = onEvent
        onEvent = { c, event in
            if event == .suback {
                c.onEvent = previous
                promise.succeed(())
            } else {
                previous(c, event)
            }
        }
        var buffer = context.channel.allocator.buffer(capacity: 64)
        buffer.writeMQTTPacket(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: filter, qos: qos)])), version: version)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        return promise.futureResult
    }

    func close() { context?.close(promise: nil) }
}

/// The address to connect to: an IP address as it is (no resolver: a storm of connects would queue
/// a name lookup each), else the name resolved.
private func address(_ host: String, _ port: Int) -> SocketAddress {
    (try? SocketAddress(ipAddress: host, port: port)) ?? (try! SocketAddress.makeAddressResolvingHost(host, port: port))
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
