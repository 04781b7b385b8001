import NIOCore

/// The size of each connection's receive buffer: NIO's `AdaptiveRecvByteBufferAllocator` rule
/// (a read that fills the buffer doubles the next one; two in a row that use half or less halve
/// it), from 64 bytes to 256 KiB, in one word. NIO keeps a copy per channel, inside an
/// existential: NIO's own type (five words) does not fit the existential's three and is boxed,
/// and each channel's first read copies the box, 64 bytes of heap on every connection.
struct ReceiveAllocator: RecvByteBufferAllocator {
    static let minimum: UInt32 = 64
    static let maximum: UInt32 = 256 * 1024

    private var size = ReceiveAllocator.minimum
    private var decreaseNow = false

    func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
        allocator.buffer(capacity: Int(size))
    }

    func nextBufferSize() -> Int? { Int(size) }

    mutating func record(actualReadBytes: Int) -> Bool {
        let half = size / 2
        if actualReadBytes <= Int(half) && half >= Self.minimum {
            if decreaseNow { size = half }
            decreaseNow.toggle()
            return false
        }
        decreaseNow = false
        guard actualReadBytes >= Int(size), size < Self.maximum else { return false }
        size *= 2
        return true
    }
}
