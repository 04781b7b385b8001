#if canImport(Glibc)
import Glibc
import MQTTCore
import NIOCore

/// The reconnect storm's clients on plain non-blocking sockets and one epoll set, for a plain TCP
/// storm to an IPv4 address: socket, connect, CONNECT when writable, CONNACK read, with at most
/// `inFlight` under way. Six system calls a client where NIO's client bootstrap makes about
/// twenty (and a channel, a pipeline and futures): on this machine the load generator shares the
/// work of a storm with the broker, and with NIO it was the storm's limit, for both brokers.
/// The connections stay open until `closeAll()`.
///
/// To a loopback address, each client's socket is bound to a source address of its own group of
/// `clientsPerSource` (127.0.0.2, 127.0.0.3, ...; the port still the kernel's choice, made at
/// connect: `IP_BIND_ADDRESS_NO_PORT`). From one source address to one listener, the kernel finds
/// each new connection's ephemeral port by a walk over the ports in use (`__inet_hash_connect`),
/// longer the more there are: with 15,000 clients from 127.0.0.1 that walk was two thirds of the
/// load generator's time, and its core the storm's limit for the second half of it, for both
/// brokers alike.
final class RawStorm {
    private let address: sockaddr_in
    /// Whether to spread the clients over loopback source addresses.
    private var spreadSources: Bool
    static let clientsPerSource = 250
    private let connects: [[UInt8]]
    private let inFlight: Int
    private let epoll: Int32
    /// Per descriptor under way: the client's index, and its CONNACK's bytes so far (nil while
    /// connecting).
    private var clients: [Int32: (index: Int, connack: [UInt8]?)] = [:]
    private(set) var open: [Int32] = []
    private(set) var firstError: String?

    init?(host: String, port: Int, total: Int, inFlight: Int, prefix: String) {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else { return nil }
        self.address = address
        spreadSources = UInt32(bigEndian: address.sin_addr.s_addr) >> 24 == 127
        self.inFlight = inFlight
        self.connects = (0..<total).map { i in
            var buffer = ByteBuffer()
            buffer.writeMQTTPacket(.connect(ConnectPacket(protocolLevel: 4, cleanSession: true, keepAlive: 0, clientID: "\(prefix)-storm-\(i)")))
            return Array(buffer.readableBytesView)
        }
        epoll = epollCreate(Epoll.cloexec)
    }

    deinit { close(epoll) }

    /// Connects every client; returns when each has its CONNACK or failed.
    func run() {
        let total = connects.count
        var next = 0
        var done = 0
        func failed(_ reason: String) {
            if firstError == nil { firstError = reason }
            done += 1
        }
        /// Ends a client's attempt: its descriptor stays open if it got CONNACK 0.
        func finish(_ fd: Int32, failure: String?) {
            clients[fd] = nil
            if let failure {
                close(fd)
                failed(failure)
            } else {
                open.append(fd)
                done += 1
            }
        }
        /// Starts clients until `inFlight` are under way or none is left.
        func refill() {
            while next < total && next - done < inFlight {
                let index = next
                next += 1
                let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else {
                    failed("socket: errno \(errno)")
                    continue
                }
                // (Where binding is refused, as a sandbox may, the clients go from 127.0.0.1.)
                if spreadSources, !bindSource(fd, group: index / Self.clientsPerSource) { spreadSources = false }
                var address = self.address
                let result = withUnsafePointer(to: &address) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
                guard result == 0 || errno == EINPROGRESS else {
                    finish(fd, failure: "connect: errno \(errno)")
                    continue
                }
                clients[fd] = (index, nil)
                watch(fd, Epoll.writable, add: true)
            }
        }
        refill()
        let capacity = 1024
        let events = UnsafeMutableRawPointer.allocate(byteCount: capacity * Epoll.eventSize, alignment: 8)
        defer { events.deallocate() }
        while done < total {
            let n = epollWait(epoll, events, Int32(capacity), 10_000)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                if firstError == nil { firstError = "no progress in 10 s" }
                break
            }
            for i in 0..<Int(n) {
                let kinds = events.loadUnaligned(fromByteOffset: i * Epoll.eventSize, as: UInt32.self)
                let fd = Int32(truncatingIfNeeded: events.loadUnaligned(fromByteOffset: i * Epoll.eventSize + Epoll.dataOffset, as: UInt64.self))
                guard let client = clients[fd] else { continue }
                if kinds & (Epoll.error | Epoll.hangUp) != 0 && kinds & Epoll.readable == 0 {
                    finish(fd, failure: "connection \(client.index) failed or was closed")
                } else if var connack = client.connack {
                    var bytes = [UInt8](repeating: 0, count: 4 - connack.count)
                    let count = recv(fd, &bytes, bytes.count, 0)
                    guard count > 0 else {
                        finish(fd, failure: "connection \(client.index) closed before CONNACK")
                        continue
                    }
                    connack += bytes[0..<count]
                    if connack.count < 4 {
                        clients[fd] = (client.index, connack)
                        watch(fd, Epoll.readable, add: false)
                    } else {
                        finish(fd, failure: connack[0] == 0x20 && connack[3] == 0 ? nil : "CONNACK \(connack) for client \(client.index)")
                    }
                } else {
                    // Connected (or failed: then the send fails): CONNECT, then wait for CONNACK.
                    let packet = connects[client.index]
                    let sent = packet.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    guard sent == packet.count else {
                        finish(fd, failure: "CONNECT \(client.index): errno \(errno)")
                        continue
                    }
                    clients[fd] = (client.index, [])
                    watch(fd, Epoll.readable, add: false)
                }
            }
            refill()
        }
    }

    /// Binds `fd` to 127.0.0.(2 + group) (wrapping within 127.0.0.0/8), the port left to connect.
    private func bindSource(_ fd: Int32, group: Int) -> Bool {
        var yes: Int32 = 1
        guard setsockopt(fd, Int32(IPPROTO_IP), 24 /* IP_BIND_ADDRESS_NO_PORT */, &yes, socklen_t(MemoryLayout<Int32>.size)) == 0 else { return false }
        var source = sockaddr_in()
        source.sin_family = sa_family_t(AF_INET)
        source.sin_addr.s_addr = (UInt32(127) << 24 | UInt32(2 + group % 0xFF_FFF0)).bigEndian
        return withUnsafePointer(to: &source) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }

    /// Arms `fd` for one event of `kind` (one-shot: no further events until armed again).
    private func watch(_ fd: Int32, _ kind: UInt32, add: Bool) {
        withUnsafeTemporaryAllocation(byteCount: Epoll.eventSize, alignment: 8) { event in
            event.storeBytes(of: kind | Epoll.oneShot, toByteOffset: 0, as: UInt32.self)
            // (x86_64's struct epoll_event is packed: its data right after the 4-byte events.)
            UnsafeMutableRawPointer(event.baseAddress!).storeBytes(of: UInt64(UInt32(bitPattern: fd)), toByteOffset: Epoll.dataOffset, as: UInt64.self)
            _ = epollControl(epoll, add ? Epoll.add : Epoll.modify, fd, event.baseAddress)
        }
    }

    func closeAll() {
        for fd in open { close(fd) }
        open.removeAll()
        for fd in clients.keys { close(fd) }
        clients.removeAll()
    }
}

/// epoll(7), which the Glibc module does not export (NIO's own binding is internal to it).
@_silgen_name("epoll_create1") private func epollCreate(_ flags: Int32) -> Int32
@_silgen_name("epoll_ctl") private func epollControl(_ epoll: Int32, _ operation: Int32, _ fd: Int32, _ event: UnsafeMutableRawPointer?) -> Int32
@_silgen_name("epoll_wait") private func epollWait(_ epoll: Int32, _ events: UnsafeMutableRawPointer, _ count: Int32, _ timeout: Int32) -> Int32

private enum Epoll {
    static let cloexec: Int32 = 0o2000000
    static let add: Int32 = 1
    static let modify: Int32 = 3
    static let readable: UInt32 = 0x001
    static let writable: UInt32 = 0x004
    static let error: UInt32 = 0x008
    static let hangUp: UInt32 = 0x010
    static let oneShot: UInt32 = 1 << 30
    #if arch(x86_64)
    static let eventSize = 12
    static let dataOffset = 4
    #else
    static let eventSize = 16
    static let dataOffset = 8
    #endif
}
#endif
