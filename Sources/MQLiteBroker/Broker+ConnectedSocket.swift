import NIOCore
import NIOPosix

// For the connection fuzzer (Sources/MQLiteFuzzing): serve a socket that is already connected
// (one end of a socketpair) exactly as an accepted client, without a listener.
extension Broker {
    /// Serves `descriptor`, an already connected stream socket, on worker `index`'s loop with the
    /// handler an accepted connection gets. The channel owns the descriptor from then on.
    package func serveConnectedSocket(_ descriptor: CInt, worker index: Int) -> EventLoopFuture<any Channel> {
        let worker = workers[index % workers.count]
        return ClientBootstrap(group: worker.loop)
            .channelOption(.maxMessagesPerRead, value: Self.maxMessagesPerRead)
            .channelOption(.recvAllocator, value: Self.receiveAllocator)
            .channelOption(.writeBufferWaterMark, value: .init(low: 64 * 1024, high: 256 * 1024))
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ConnectionHandler(worker: worker, listener: self.unboundListener))
                }
            }
            .withConnectedSocket(descriptor)
    }

    /// Runs an empty task on every worker's loop and waits for it: whatever the loops had queued
    /// before (reads being handled, mailbox drains, hand-overs) has run by then.
    package func waitForWorkersToSettle() {
        for worker in workers {
            try? worker.loop.submit {}.wait()
        }
    }

    /// Stops the event loops at once, from a thread outside them. For a broker without listeners
    /// whose connections are all closed (the fuzzer's); `shutdown()` is the general one.
    package func stopLoops() throws {
        if ownsGroup { try group.syncShutdownGracefully() }
        loopsStopped()
    }
}
