import NIOCore
import NIOPosix

/// SwiftNIO servers that do the least a broker on NIO does for some of the benchmark's clients:
/// references for what NIO and the kernel cost, under any broker built on them. Each runs on one
/// loop with the child options of mqlite's (`Broker.setConnectionOptions`) and serves until stopped.
enum BareServers {
    /// Serves `host`:`port` with one `makeHandler()` per connection, each read one a read event,
    /// into `receiveBuffer`'s buffers (nil: NIO's adaptive ones), TCP_NODELAY from the listening
    /// socket.
    static func serve(
        group: MultiThreadedEventLoopGroup, host: String, port: Int, receiveBuffer: FixedSizeRecvByteBufferAllocator? = nil,
        makeHandler: @escaping @Sendable () -> any ChannelHandler
    ) async throws {
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                // Set at once, as mqlite's, not one future each.
                channel.eventLoop.makeCompletedFuture {
                    try channel.syncOptions?.setOption(.maxMessagesPerRead, value: 1)
                    if let receiveBuffer { try channel.syncOptions?.setOption(.recvAllocator, value: receiveBuffer) }
                    try channel.pipeline.syncOperations.addHandler(makeHandler())
                }
            }
            .bind(host: host, port: port).get()
        try await server.closeFuture.get()
    }

    /// `bare-nio-server`, the reference for memory per socket (with a 64-byte receive buffer, which
    /// NIO keeps once a socket has been read, as mqlite's first one) and for the reconnect storm:
    /// answers every read with a CONNACK's 4 bytes, so that the idle clients of `connections` and
    /// the storm's connect to it as to a broker.
    final class Answerer: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var answer = context.channel.allocator.buffer(capacity: 4)
            answer.writeBytes([0x20, 0x02, 0x00, 0x00])
            context.writeAndFlush(wrapOutboundOut(answer), promise: nil)
        }
    }

    /// The relay's subscribers by exact topic. The loop's only (the relay has one loop).
    final class Routes: @unchecked Sendable {
        var subscribers: [ByteBuffer: [any Channel]] = [:]
    }

    /// `bare-nio-relay`, the reference for CPU per message: the least a broker does for the
    /// `latency` scenario's clients. It answers CONNECT, SUBSCRIBE and PINGREQ, and forwards each
    /// PUBLISH, bytes as read (no copy), to the channels subscribed to exactly its topic: one
    /// dictionary lookup and one `writeAndFlush` per subscriber. No sessions, no validation, no
    /// wildcards, no QoS above 0, no limits: not a broker, a floor.
    final class Relay: ChannelInboundHandler, @unchecked Sendable {  // loop-only
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer

        private let routes: Routes
        /// Bytes of a packet not yet whole.
        private var pending: ByteBuffer?
        private var topics: [ByteBuffer] = []

        init(routes: Routes) { self.routes = routes }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = unwrapInboundIn(data)
            if var kept = pending {
                kept.writeBuffer(&buffer)
                buffer = kept
                pending = nil
            }
            while let (type, body, frame) = Self.nextPacket(&buffer) {
                handle(type: type, body: body, frame: frame, context: context)
            }
            if buffer.readableBytes > 0 { pending = buffer }
        }

        func channelInactive(context: ChannelHandlerContext) {
            for topic in topics {
                routes.subscribers[topic]?.removeAll { $0 === context.channel }
            }
            context.fireChannelInactive()
        }

        private func handle(type: UInt8, body: ByteBuffer, frame: ByteBuffer, context: ChannelHandlerContext) {
            var body = body
            switch type >> 4 {
            case 1:  // CONNECT
                answer([0x20, 0x02, 0x00, 0x00], context: context)
            case 3:  // PUBLISH at QoS 0: forwarded as read
                guard let length = body.readInteger(as: UInt16.self), let topic = body.readSlice(length: Int(length)) else { return }
                for subscriber in routes.subscribers[topic] ?? [] {
                    subscriber.writeAndFlush(frame, promise: nil)
                }
            case 8:  // SUBSCRIBE: one filter, granted QoS 0
                guard let id = body.readInteger(as: UInt16.self), let length = body.readInteger(as: UInt16.self),
                    let filter = body.readSlice(length: Int(length))
                else { return }
                routes.subscribers[filter, default: []].append(context.channel)
                topics.append(filter)
                answer([0x90, 0x03, UInt8(id >> 8), UInt8(id & 0xFF), 0x00], context: context)
            case 12:  // PINGREQ
                answer([0xD0, 0x00], context: context)
            case 14:  // DISCONNECT
                context.close(promise: nil)
            default:
                break
            }
        }

        private func answer(_ bytes: [UInt8], context: ChannelHandlerContext) {
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: bytes)), promise: nil)
        }

        /// The next whole packet in `buffer`: its type byte, its body and the whole frame; nil
        /// (nothing read) until it is all there.
        private static func nextPacket(_ buffer: inout ByteBuffer) -> (UInt8, ByteBuffer, ByteBuffer)? {
            let start = buffer.readerIndex
            guard let type = buffer.getInteger(at: start, as: UInt8.self) else { return nil }
            var length = 0
            var shift = 0
            var offset = start + 1
            while true {
                guard shift <= 21, let byte = buffer.getInteger(at: offset, as: UInt8.self) else { return nil }
                length |= Int(byte & 0x7F) << shift
                offset += 1
                shift += 7
                if byte & 0x80 == 0 { break }
            }
            guard let frame = buffer.readSlice(length: offset - start + length) else { return nil }
            return (type, frame.getSlice(at: frame.readerIndex + offset - start, length: length)!, frame)
        }
    }
}
