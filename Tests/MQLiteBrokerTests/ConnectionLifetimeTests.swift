#if canImport(Glibc)
import Glibc
#endif
import Logging
@testable import MQLiteBroker
import MQTTCore
import NIOCore
import NIOPosix
import Testing

/// Found by the connection fuzz target (its memory grew by ~0.3 MB per input): `ConnectionHandler`
/// kept its `ChannelHandlerContext`, which holds the handler, after the channel closed, so every
/// connection's handler and context, and through the handler the broker, were never freed.
@Suite("Connection lifetime")
struct ConnectionLifetimeTests {
    @Test("a closed connection's handler is freed")
    func handlerIsFreedAfterClose() throws {
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let broker = Broker(configuration: BrokerConfiguration(workers: 1, listeners: []), logger: logger)
        defer { try? broker.stopLoops() }
        weak var handler: ConnectionHandler?
        for connect in [false, true] {
            var fds: [CInt] = [-1, -1]
            #expect(socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue), 0, &fds) == 0)
            let channel = try broker.serveConnectedSocket(fds[0], worker: 0).wait()
            handler = try channel.pipeline.handler(type: ConnectionHandler.self).wait()
            #expect(handler != nil)
            if connect {
                var buffer = ByteBuffer()
                buffer.writeMQTTPacket(.connect(ConnectPacket(clientID: "c")))
                buffer.writeMQTTPacket(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "a/#", qos: .atLeastOnce)])))
                _ = buffer.readableBytesView.withUnsafeBytes { send(fds[1], $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }
            }
            broker.waitForWorkersToSettle()
            close(fds[1])
            try channel.closeFuture.wait()
            broker.waitForWorkersToSettle()
            #expect(broker.openConnections == 0)
            #expect(handler == nil, "the handler of a closed connection is still alive (connect: \(connect))")
        }
    }
}

/// What an idle connection costs mqlite on top of SwiftNIO's channel (`make bench`'s memory row):
/// the handler and the session each stay in one small malloc size class. Rarely used state lives
/// in a side object made on first use (`Session.Occasional`) or a box (the will), and the stored
/// properties are ordered so padding is small; a new field that pushes either object into the
/// next class shows here, not only in the benchmark.
@Suite("Idle connection footprint")
struct IdleFootprintTests {
    #if canImport(Glibc)
    static func mallocSize(_ object: AnyObject) -> Int {
        mallocUsableSize(Unmanaged.passUnretained(object).toOpaque())
    }

    @Test("a session takes at most 104 bytes of heap, and a connection handler at most 168, until used")
    func smallObjects() throws {
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let broker = Broker(configuration: BrokerConfiguration(workers: 1, listeners: []), logger: logger)
        defer { try? broker.stopLoops() }
        // The smallest of many: glibc may hand out a free chunk a little larger than asked for
        // (when what is left would be too small to keep), more often while other threads allocate.
        let sessions = (0..<64).map { _ in Session(clientID: "a-client-id-longer-than-15", persistent: true, owner: 0, context: broker.sessionContext) }
        #expect(sessions.map(Self.mallocSize).min()! <= 104)
        let listener = RunningListener(unboundNamed: "test")
        let handlers = (0..<64).map { _ in ConnectionHandler(worker: broker.workers[0], listener: listener) }
        #expect(handlers.map(Self.mallocSize).min()! <= 168)
    }
    #endif

    @Test("the receive allocator sizes reads as NIO's adaptive one does, lets NIO's kept buffer grow to 2 KiB only, and fits an existential without a box")
    func receiveAllocator() {
        #expect(MemoryLayout<ReceiveAllocator>.size <= 3 * MemoryLayout<Int>.size)
        var ours = ReceiveAllocator()
        var nio = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 64, maximum: 256 * 1024)
        var rng = SystemRandomNumberGenerator()
        for step in 0..<20_000 {
            // Runs of full reads (growth to the maximum) and of small ones (shrinking to the minimum).
            let size = Int(ours.size)
            let read = (step / 500) % 2 == 0 ? size : Int.random(in: 0...size, using: &rng)
            let ownBuffer = ours.record(actualReadBytes: read)
            _ = nio.record(actualReadBytes: read)
            #expect(Int(ours.size) == nio.nextBufferSize(), "after \(step) reads")
            // Told a size, NIO grows the buffer it keeps and never shrinks it: up to 2 KiB only.
            let kept = ours.size <= ReceiveAllocator.keptMaximum
            #expect(ours.nextBufferSize() == (kept ? Int(ours.size) : nil))
            #expect(ownBuffer == !kept)
            if Int(ours.size) != nio.nextBufferSize() { break }
        }
        #expect(ours.buffer(allocator: ByteBufferAllocator()).capacity == Int(ours.size))
    }

    /// Through NIO's own pool, on a real socket with the options every connection gets: after a
    /// burst (reads grown to 256 KiB), small reads come in NIO's kept buffer again, and it is at
    /// most 2 KiB. Told every read's size, NIO grew it to 256 KiB and kept it so until the close.
    @Test("after a burst, reads go back to the buffer NIO keeps per channel, at most 2 KiB")
    func keptReceiveBufferStaysSmall() throws {
        final class Recorder: ChannelInboundHandler, @unchecked Sendable {
            typealias InboundIn = ByteBuffer
            var capacities: [Int] = []
            var total = 0
            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                let buffer = unwrapInboundIn(data)
                capacities.append(buffer.capacity)
                total += buffer.readableBytes
            }
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let recorder = Recorder()
        let server = try ServerBootstrap(group: group)
            .childChannelOption(.maxMessagesPerRead, value: Broker.maxMessagesPerRead)
            .childChannelOption(.recvAllocator, value: Broker.receiveAllocator)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(recorder) }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? server.close().wait() }
        let client = try ClientBootstrap(group: group).connect(to: server.localAddress!).wait()
        defer { try? client.close().wait() }
        func received() throws -> Int { try group.next().submit { recorder.total }.wait() }
        func send(_ count: Int) throws {
            let before = try received()
            try client.writeAndFlush(ByteBuffer(repeating: 0x30, count: count)).wait()
            let deadline = ContinuousClock.now + .seconds(10)
            while try received() < before + count {
                try #require(ContinuousClock.now < deadline, "the server did not read what was sent")
                usleep(1000)
            }
        }
        try send(4 << 20)  // a burst: reads grow to the maximum
        let grown = try group.next().submit { recorder.capacities.max() ?? 0 }.wait()
        #expect(grown >= 64 * 1024, "the burst's reads did not grow (largest buffer \(grown) bytes)")
        // Then small packets, one read each: the size halves every second one (from 256 KiB at
        // most: 24 reads), back to 64 bytes, read into the kept buffer.
        for _ in 0..<40 { try send(10) }
        let last = try group.next().submit { Array(recorder.capacities.suffix(4)) }.wait()
        #expect(last.allSatisfy { $0 <= 2048 }, "small reads after a burst came in buffers of \(last) bytes")
    }
}

#if canImport(Glibc)
/// glibc's `malloc_usable_size` (declared in <malloc.h>, which the Glibc module does not export).
@_silgen_name("malloc_usable_size")
private func mallocUsableSize(_ pointer: UnsafeMutableRawPointer) -> Int
#endif
