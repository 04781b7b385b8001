import Dispatch
import Foundation
import MQLiteBroker
import Synchronization

/// `mqlite.kv`: a small key-value store shared by every script on every worker, with optional
/// expiry and a bound on its size. One lock, held for a dictionary operation and a bounded sweep.
///
/// Memory: every entry counts its key's bytes, its value's bytes (8 for a number or boolean) and
/// `entryOverhead`; past `maxBytes` a set that would add to the total is refused. Expired entries
/// leave without being read: expiries are kept in a min-heap, and every operation removes up to
/// `sweepPerOperation` expired entries from its top (each heap entry is pushed once and popped
/// once: O(log n) per set, amortized), a timer sweeps every second what no operation did, and a
/// set that would go past `maxBytes` first removes every expired entry.
final class SharedKV: @unchecked Sendable {  // the timer is set in init and only cancelled in deinit
    /// A string, number or boolean: the store's own type, so that a kept key goes to it as it is.
    typealias Value = StoredKV.Value

    enum Failure: Error {
        /// `maxBytes` reached.
        case full
        /// `incr` of a key that holds something other than an integer.
        case notInteger
    }

    /// Bytes counted per entry besides its key and value: the dictionary slot, the entry, the
    /// string headers and its expiry in the heap.
    static let entryOverhead = 96
    static let sweepPerOperation = 16
    static let sweepInterval: Duration = .seconds(1)

    let maxBytes: Int

    private struct Entry {
        var value: Value
        var expires: ContinuousClock.Instant?
        var cost: Int
        /// Kept across restarts (`{ persist = true }`): every change goes to the store too.
        var persist = false
    }

    private struct Expiry {
        let at: ContinuousClock.Instant
        let key: [UInt8]
    }

    private struct State {
        /// Keys are the bytes of the Lua string: not decoded (invalid UTF-8 would collide as U+FFFD)
        /// nor compared by Unicode equivalence ("josé" in two spellings are two keys).
        var entries: [[UInt8]: Entry] = [:]
        var bytes = 0
        /// Min-heap of expiries by `at`. An expiry is stale once its key was deleted or set again
        /// (the entry no longer has that `at`); stale ones are skipped when popped, and dropped
        /// all at once when they outnumber the live ones.
        var heap: [Expiry] = []
        /// Entries that have an expiry (live heap entries).
        var expiring = 0

        func isLive(_ expiry: Expiry) -> Bool { entries[expiry.key]?.expires == expiry.at }

        /// An entry as the store keeps it: its expiry as a wall-clock deadline.
        func stored(_ key: [UInt8], _ entry: Entry) -> StoredKV {
            let expiresAt = entry.expires.map { expires -> Int64 in
                let remaining = ContinuousClock.now.duration(to: expires).components.seconds
                return Int64(Date().timeIntervalSince1970) + max(remaining, 0) + 1
            }
            return StoredKV(key: key, value: entry.value, expiresAt: expiresAt)
        }

        /// Where keys kept across restarts go (nil: none are).
        var store: PersistentStore?

        mutating func remove(_ key: [UInt8]) {
            guard let old = entries.removeValue(forKey: key) else { return }
            bytes -= old.cost
            if old.expires != nil { expiring -= 1 }
            if old.persist { store?.recordKV(key, nil) }
        }

        mutating func put(_ key: [UInt8], _ entry: Entry) {
            let old = entries.updateValue(entry, forKey: key)
            if let old {
                bytes -= old.cost
                if old.expires != nil { expiring -= 1 }
            }
            if let store, entry.persist || old?.persist == true { store.recordKV(key, entry.persist ? stored(key, entry) : nil) }
            bytes += entry.cost
            guard let at = entry.expires else { return }
            expiring += 1
            push(Expiry(at: at, key: key))
            if heap.count > 2 * expiring + 64 { compact() }
        }

        /// Removes expired entries from the top of the heap: at most `limit` heap entries are
        /// looked at. Returns how many were.
        @discardableResult
        mutating func removeExpired(now: ContinuousClock.Instant, limit: Int) -> Int {
            var popped = 0
            while popped < limit, let top = heap.first, top.at <= now {
                pop()
                popped += 1
                if isLive(top) { remove(top.key) }
            }
            return popped
        }

        private mutating func compact() {
            let entries = self.entries  // (not copied: only read)
            heap.removeAll { entries[$0.key]?.expires != $0.at }
            var i = heap.count / 2
            while i > 0 {
                i -= 1
                siftDown(i)
            }
        }

        private mutating func push(_ expiry: Expiry) {
            heap.append(expiry)
            var child = heap.count - 1
            while child > 0 {
                let parent = (child - 1) / 2
                guard heap[child].at < heap[parent].at else { break }
                heap.swapAt(child, parent)
                child = parent
            }
        }

        private mutating func pop() {
            let last = heap.removeLast()
            guard !heap.isEmpty else { return }
            heap[0] = last
            siftDown(0)
        }

        private mutating func siftDown(_ start: Int) {
            var parent = start
            while true {
                var smallest = parent
                for child in [2 * parent + 1, 2 * parent + 2] where child < heap.count && heap[child].at < heap[smallest].at {
                    smallest = child
                }
                if smallest == parent { return }
                heap.swapAt(parent, smallest)
                parent = smallest
            }
        }
    }

    private let state = Mutex<State>(State())
    private let timer: DispatchSourceTimer

    init(maxBytes: Int) {
        self.maxBytes = maxBytes
        timer = DispatchSource.makeTimerSource(queue: .global(qos: .utility))
        let interval = DispatchTimeInterval.milliseconds(Int(Self.sweepInterval.components.seconds * 1000))
        timer.schedule(deadline: .now() + interval, repeating: interval, leeway: .milliseconds(100))
        timer.setEventHandler { [weak self] in self?.sweep() }
        timer.resume()
    }

    deinit {
        timer.cancel()
    }

    private static func cost(_ key: [UInt8], _ value: Value) -> Int {
        let bytes = if case .string(let bytes) = value { bytes.count } else { 8 }
        return entryOverhead + key.count + bytes
    }

    /// Bytes held: keys, values and `entryOverhead` per entry, expired entries not yet swept included.
    var bytes: Int { state.withLock { $0.bytes } }

    /// Removes every expired entry, a thousand at a time so that the lock is never held long.
    func sweep() {
        let now = ContinuousClock.now
        while state.withLock({ $0.removeExpired(now: now, limit: 1024) }) == 1024 {}
    }

    func get(_ key: [UInt8]) -> Value? {
        let now = ContinuousClock.now
        return state.withLock { state in
            state.removeExpired(now: now, limit: Self.sweepPerOperation)
            guard let entry = state.entries[key] else { return nil }
            if let expires = entry.expires, expires <= now {
                state.remove(key)
                return nil
            }
            return entry.value
        }
    }

    /// Keeps the keys set with `persist` in `store` from now on, and loads the ones it held
    /// (before the scripts' hooks run). All of them, even past `maxBytes` (a limit lowered since
    /// they were kept): a key left out would read as missing, and come back once the limit rose
    /// again, even after the script deleted it. Returns how many were loaded and the bytes held
    /// then (past `maxBytes`, a new key or a bigger value fails until it is back under).
    func keep(in store: PersistentStore) -> (keys: Int, bytes: Int) {
        let loaded = store.takeLoadedKV()
        let now = ContinuousClock.now
        let wallNow = Int64(Date().timeIntervalSince1970)
        return state.withLock { state in
            for kept in loaded {
                // (Clamped as a ttl is: a hand-edited deadline cannot overflow.)
                let expires = kept.expiresAt.map { now + .seconds($0 <= wallNow ? 0 : min($0 - wallNow, 1_000_000_000)) }
                state.put(kept.key, Entry(value: kept.value, expires: expires, cost: Self.cost(kept.key, kept.value), persist: true))
            }
            state.store = store
            return (loaded.count, state.bytes)
        }
    }

    /// Stores `value` for `ttl` seconds (clamped to 0...1e9), or until replaced; `persist`: kept
    /// across restarts (with a store). Fails with `.full` if that would take the store past
    /// `maxBytes`.
    func set(_ key: [UInt8], _ value: Value, ttl: Double?, persist: Bool = false) throws(Failure) {
        let now = ContinuousClock.now
        let expires = ttl.map { now + .nanoseconds(Int64(min(max($0, 0), 1e9) * 1e9)) }
        let entry = Entry(value: value, expires: expires, cost: Self.cost(key, value), persist: persist)
        let stored = state.withLock { state -> Bool in
            state.removeExpired(now: now, limit: Self.sweepPerOperation)
            guard fits(&state, key: key, cost: entry.cost, now: now) else { return false }
            state.put(key, entry)
            return true
        }
        if !stored { throw .full }
    }

    func delete(_ key: [UInt8]) {
        let now = ContinuousClock.now
        state.withLock { state in
            state.removeExpired(now: now, limit: Self.sweepPerOperation)
            state.remove(key)
        }
    }

    /// Adds `by` to an integer (a missing or expired key counts as 0) and returns the new value.
    /// Keeps the key's expiry, and whether it is kept across restarts (a new key: `persist`).
    /// Fails with `.notInteger` if the key holds something else, and with `.full` if the key is
    /// new and would take the store past `maxBytes`.
    func incr(_ key: [UInt8], by: Int64, persist: Bool = false) throws(Failure) -> Int64 {
        let now = ContinuousClock.now
        let result = state.withLock { state -> Result<Int64, Failure> in
            state.removeExpired(now: now, limit: Self.sweepPerOperation)
            if var entry = state.entries[key], entry.expires.map({ $0 > now }) ?? true {
                guard case .int(let current) = entry.value else { return .failure(.notInteger) }
                let next = current &+ by
                entry.value = .int(next)
                state.entries[key] = entry  // same size, same expiry
                if entry.persist { state.store?.recordKV(key, state.stored(key, entry)) }
                return .success(next)
            }
            let entry = Entry(value: .int(by), expires: nil, cost: Self.cost(key, .int(by)), persist: persist)
            guard fits(&state, key: key, cost: entry.cost, now: now) else { return .failure(.full) }
            state.put(key, entry)
            return .success(by)
        }
        return try result.get()
    }

    /// Whether an entry of `cost` bytes can replace `key`'s (if any) within `maxBytes`; if not at
    /// first, after every expired entry has been removed.
    private func fits(_ state: inout State, key: [UInt8], cost: Int, now: ContinuousClock.Instant) -> Bool {
        func fitsNow() -> Bool { state.bytes - (state.entries[key]?.cost ?? 0) + cost <= maxBytes }
        if fitsNow() { return true }
        state.removeExpired(now: now, limit: .max)
        return fitsNow()
    }
}
