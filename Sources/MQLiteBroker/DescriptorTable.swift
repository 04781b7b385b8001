#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The process's file descriptor table, grown once, when the broker starts.
///
/// Linux grows the table by doubling it when a new descriptor does not fit, and in a process with
/// more than one thread each growth waits for an RCU grace period (`synchronize_rcu` in
/// `expand_files`): 10-30 ms in which the thread that accepted or opened a socket (an event loop,
/// with every client on it) sleeps, and any other thread opening a descriptor waits as well. A
/// connect storm crosses 256, 512, 1024, 2048 descriptors one after the other; each crossing
/// stopped the worker that got there (seen with `perf` as the loop thread in `D` state in
/// `accept4`). Growing the table at start, to what the broker may use, takes those pauses out of
/// the storm. The table's memory is the kernel's: 8 bytes a descriptor.
enum DescriptorTable {
    /// Descriptors reserved for a broker without `max_connections`, within the soft limit.
    static let defaultReserve = 65536
    /// Beyond `max_connections`: listeners, the HTTP client's connections, files, the loops' own.
    static let margin = 1024

    /// Makes room in the table for `count` descriptors (at most the soft `RLIMIT_NOFILE`): one
    /// descriptor is duplicated to the highest number and closed again. Returns the number the
    /// table now holds at least (0: nothing done).
    @discardableResult
    static func reserve(_ count: Int) -> Int {
        #if os(Linux)
            var limit = rlimit()
            guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 0 }
            let target = Int(min(UInt64(count), UInt64(limit.rlim_cur)))
            guard target > 64 else { return 0 }
            let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
            guard null >= 0 else { return 0 }
            defer { close(null) }
            let high = fcntl(null, F_DUPFD_CLOEXEC, Int32(target - 1))
            guard high >= 0 else { return 0 }
            close(high)
            return target
        #else
            return 0
        #endif
    }

    /// What a broker with `maxConnections` (0: no limit) reserves.
    @discardableResult
    static func reserve(maxConnections: Int) -> Int {
        reserve(maxConnections > 0 ? maxConnections + margin : defaultReserve)
    }
}
