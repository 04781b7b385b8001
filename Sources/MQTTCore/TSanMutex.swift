#if MQLITE_TSAN
import Synchronization

// MARK: - ThreadSanitizer build only (`make test-tsan`, compiled with -DMQLITE_TSAN)

/// `Synchronization.Mutex`, with its hand-offs told to ThreadSanitizer.
///
/// On Linux the standard library's `Mutex` takes an uncontended lock with an atomic
/// compare-and-swap inlined into the caller (TSan sees it), but a contended one in
/// `_lockSlow`/`_unlockSlow`, futex calls inside the uninstrumented Synchronization library (TSan
/// does not see them). Every contended hand-off then looks like a race on the state the lock
/// guards (the mailbox, the retained tree, the test client's events). This type locks the same
/// standard `Mutex` and marks the section with `__tsan_acquire`/`__tsan_release` on an address of
/// its own: what the lock guards is still checked, only its hand-offs stop being reported.
///
/// Each module that uses `Mutex` has `typealias Mutex = TSanMutex` under `#if MQLITE_TSAN`
/// (its `Mutex+TSan.swift`), which shadows `Synchronization.Mutex` in that module. Not in normal
/// builds: there `Mutex` is `Synchronization.Mutex` itself.
public final class TSanMutex<Value: ~Copyable>: Sendable {
    private let lock: Synchronization.Mutex<Value>

    public init(_ initialValue: consuming sending Value) {
        lock = Synchronization.Mutex(initialValue)
    }

    public func withLock<Result: ~Copyable, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        let address = UnsafeRawPointer(Unmanaged.passUnretained(self).toOpaque())
        return try lock.withLock { (value: inout sending Value) throws(E) -> sending Result in
            tsanAcquire(address)
            defer { tsanRelease(address) }
            return try body(&value)
        }
    }
}

/// ThreadSanitizer's annotations for synchronization it cannot see (compiler-rt's
/// `tsan_interface.h`; the runtime is linked into every `--sanitize=thread` binary).
@_silgen_name("__tsan_acquire")
private func tsanAcquire(_ address: UnsafeRawPointer)

@_silgen_name("__tsan_release")
private func tsanRelease(_ address: UnsafeRawPointer)
#endif
