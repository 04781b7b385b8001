import NIOCore

/// The size of each connection's receive buffer: NIO's `AdaptiveRecvByteBufferAllocator` rule
/// (a read that fills the buffer doubles the next one; two in a row that use half or less halve
/// it), from 64 bytes to 256 KiB, in one word. NIO keeps a copy per channel, inside an
/// existential: NIO's own type (five words) does not fit the existential's three and is boxed,
/// and each channel's first read copies the box, 64 bytes of heap on every connection.
///
/// NIO also keeps one receive buffer per channel for reuse (`NIOPooledRecvBufferAllocator`, its
/// first), grows it in place to the size it is told for the next read, and never shrinks it:
/// with NIO's sizing alone, a connection that once sent a burst held a 256 KiB buffer until it
/// closed (1,000 such connections idle: +370 MB). So NIO is told the size only up to
/// `keptMaximum` (2 KiB: a read of a few small packets, or one of 1 KiB, still goes into the kept
/// buffer without an allocation); past it `nextBufferSize` is nil and `record` says the next read
/// may grow, and NIO then makes a buffer for that one read (`buffer(allocator:)`), freed with the
/// last of what was read from it. A busy connection makes one buffer per read (many packets
/// each); what any connection keeps is at most 2 KiB.
struct ReceiveAllocator: RecvByteBufferAllocator {
    static let minimum: UInt32 = 64
    static let maximum: UInt32 = 256 * 1024
    /// The largest the buffer NIO keeps per channel grows.
    static let keptMaximum: UInt32 = 2048

    private(set) var size = ReceiveAllocator.minimum
    private var decreaseNow = false

    func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
        allocator.buffer(capacity: Int(size))
    }

    /// Nil past `keptMaximum`: NIO grows its kept buffer to the size it is given.
    func nextBufferSize() -> Int? { size <= Self.keptMaximum ? Int(size) : nil }

    /// Whether the next read needs a buffer larger than the kept one may grow (NIO then asks
    /// `buffer` for one of its own).
    mutating func record(actualReadBytes: Int) -> Bool {
        let half = size / 2
        if actualReadBytes <= Int(half) && half >= Self.minimum {
            if decreaseNow { size = half }
            decreaseNow.toggle()
        } else {
            decreaseNow = false
            if actualReadBytes >= Int(size), size < Self.maximum { size *= 2 }
        }
        return size > Self.keptMaximum
    }
}
