import CLua
import Foundation
import Synchronization

/// One thread for every Lua state of the process that bounds hook calls by the clock.
///
/// A call costs the worker two atomic stores (`mqlite_call` makes the state's call count odd while
/// it runs) and no clock read. Every `interval` the watchdog looks at each state: a call seen
/// running at two scans (the same odd count) for at least the state's time limit is marked
/// expired, and the state's limit hook, which runs every 1000 VM instructions, raises "time limit
/// exceeded" at its next run. The pattern functions check the same flag between start positions
/// (see shim.h). The mark names the call, so a stale one can never hit a later call.
///
/// The watchdog never touches a `lua_State` (no `lua_sethook` from this thread: that would race
/// with the worker's own `lua_sethook` calls); the hook already runs every 1000 instructions.
final class LuaWatchdog: @unchecked Sendable {
    static let shared = LuaWatchdog()

    /// How often states are looked at: a call fails between its time limit and that plus this.
    static let interval: Duration = .milliseconds(5)

    private struct Entry {
        let control: UnsafeMutablePointer<mqlite_control>
        let owner: ObjectIdentifier
        let timeLimit: Duration
        var call: UInt = 0
        var since: ContinuousClock.Instant = .now
    }

    /// Watched states by address; guarded by `lock` (the watchdog scans under it, so a state
    /// is never looked at after `unregister` returns).
    private let lock = NSLock()
    private var entries: [UnsafeMutablePointer<mqlite_control>: Entry] = [:]
    private let started = Atomic<Bool>(false)

    /// Watches `control` (until `unregister`) with `timeLimit` seconds per call; stopped with `owner`'s states.
    func register(_ control: UnsafeMutablePointer<mqlite_control>, owner: ObjectIdentifier, timeLimit: Double) {
        let limit = Duration.nanoseconds(Int64(timeLimit * 1e9))
        lock.withLock { entries[control] = Entry(control: control, owner: owner, timeLimit: limit) }
        if !started.load(ordering: .acquiring), started.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged {
            let thread = Thread { [self] in run() }
            thread.name = "mqlite-lua-watchdog"
            thread.start()
        }
    }

    /// Stops watching `control`; after this returns the watchdog never touches it again.
    func unregister(_ control: UnsafeMutablePointer<mqlite_control>) {
        _ = lock.withLock { entries.removeValue(forKey: control) }
    }

    /// Makes every call of `owner`'s states fail at its next check, now and from now on.
    func stopAll(owner: ObjectIdentifier) {
        lock.withLock {
            for entry in entries.values where entry.owner == owner { mqlite_stop(entry.control) }
        }
    }

    private func run() {
        let clock = ContinuousClock()
        while true {
            Thread.sleep(forTimeInterval: Double(Self.interval.components.attoseconds) / 1e18)
            let now = clock.now
            lock.withLock {
                for (key, var entry) in entries {
                    let call = UInt(mqlite_calls(entry.control))
                    guard call & 1 == 1 else { continue }  // idle
                    if call != entry.call {
                        entry.call = call
                        entry.since = now
                        entries[key] = entry
                    } else if now - entry.since >= entry.timeLimit {
                        mqlite_expire(entry.control, call)
                    }
                }
            }
        }
    }
}
