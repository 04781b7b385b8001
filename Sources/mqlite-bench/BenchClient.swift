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

    /// The packet that `buffer` starts, read from its head alone (fixed header; for a PUBLISH the
    /// topic, packet id, properties and, with timestamps, 8 payload bytes), and its whole length;
    /// nil while the head is not all there. The payload's other bytes are never looked at.
    func head(_ buffer: ByteBuffer) -> (event: BenchEvent, length: Int)? {
        let start = buffer.readerIndex
        guard let first: UInt8 = buffer.getInteger(at: start) else { return nil }
        var length = 0
        var multiplier = 1
        var offset = 1
        while true {
            guard let byte: UInt8 = buffer.getInteger(at: start + offset) else { return nil }
            length += Int(byte & 0x7F) * multiplier
            offset += 1
            if byte & 0x80 == 0 || offset > 4 { break }
            multiplier *= 128
        }
        let body = start + offset
        let whole = offset + length
        switch first >> 4 {
        case 2:
            guard let code: UInt8 = buffer.getInteger(at: body + 1) else { return nil }
            return (.connack(code: code), whole)
        case 9: return (.suback, whole)
        case 4: return (.puback, whole)
        case 3:
            let qos = (first >> 1) & 3
            guard let topicLength = buffer.getInteger(at: body, as: UInt16.self) else { return nil }
            var cursor = body + 2 + Int(topicLength)
            var id: UInt16 = 0
            if qos > 0 {
                guard let value: UInt16 = buffer.getInteger(at: cursor) else { return nil }
                id = value
                cursor += 2
            }
            guard readTimestamps else { return (.publish(qos: qos, packetID: id, timestamp: 0), whole) }
            if v5 {
                var propertiesLength = 0
                var shift = 0
                while true {
                    guard let byte: UInt8 = buffer.getInteger(at: cursor) else { return nil }
                    cursor += 1
                    propertiesLength |= Int(byte & 0x7F) << shift
                    shift += 7
                    if byte & 0x80 == 0 || shift > 21 { break }
                }
                cursor += propertiesLength
            }
            guard let timestamp: UInt64 = buffer.getInteger(at: cursor) else { return nil }
            return (.publish(qos: qos, packetID: id, timestamp: timestamp), whole)
        default: return (.other, whole)
        }
    }
}

/// One benchmark connection. Everything runs on the benchmark's single event loop.
///
/// It decodes what it reads in place, packet by packet, without a decoder stage in the pipeline
/// (each packet would be boxed in `NIOAny` and passed on), and reads only each packet's head:
/// payloads are skipped, never copied, even when split between reads (only a split head is put
/// together). The load generator shares a core with what it measures, so its cost per message
/// counts.
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
    /// The start of a packet whose head the last read ended in the middle of.
    private var partial: ByteBuffer?
    /// Bytes of a packet already passed on that are still to come (its payload's rest).
    private var skip = 0

    init(loop: any EventLoop, version: ProtocolVersion, readTimestamps: Bool) {
        self.loop = loop
        self.version = version
        self.decoder = BenchDecoder(readTimestamps: readTimestamps, v5: version == .v5)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if skip > 0 {
            let n = min(skip, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: n)
            skip -= n
            if skip > 0 { return }
        }
        if var packet = partial {
            // A packet whose head the last read split: put the head together (a few bytes at a
            // time), then skip what is left of the packet.
            partial = nil
            while true {
                if let (event, length) = decoder.head(packet) {
                    // Bytes taken past the packet's end belong to the next one: give them back.
                    let rest = length - packet.readableBytes
                    if rest < 0 { buffer.moveReaderIndex(to: buffer.readerIndex + rest) }
                    consume(length: max(rest, 0), of: &buffer, event: event)
                    break
                }
                guard buffer.readableBytes > 0 else { partial = packet; return }
                var more = buffer.readSlice(length: min(64, buffer.readableBytes))!
                packet.writeBuffer(&more)
            }
        }
        while skip == 0, let (event, length) = decoder.head(buffer) {
            consume(length: length, of: &buffer, event: event)
        }
        if skip == 0, buffer.readableBytes > 0 { partial = ByteBuffer(bytes: buffer.readableBytesView) }
    }

    /// Passes `event` on and moves past its packet's `length` bytes: those in `buffer` now, and
    /// the rest (`skip`) as the next reads bring them.
    private func consume(length: Int, of buffer: inout ByteBuffer, event: BenchEvent) {
        let n = min(length, buffer.readableBytes)
        buffer.moveReaderIndex(forwardBy: n)
        skip = length - n
        onEvent(self, event)
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
