import Synchronization

/// `mqlite.kv`: a small key-value store shared by every script on every worker, with optional
/// expiry. One lock, held only for a dictionary operation.
final class SharedKV: Sendable {
    enum Value: Sendable, Equatable {
        case string([UInt8])
        case int(Int64)
        case double(Double)
        case bool(Bool)
    }

    private struct Entry {
        var value: Value
        var expires: ContinuousClock.Instant?
    }

    private let entries = Mutex<[String: Entry]>([:])

    func get(_ key: String) -> Value? {
        let now = ContinuousClock.now
        return entries.withLock { entries in
            guard let entry = entries[key] else { return nil }
            if let expires = entry.expires, expires <= now {
                entries[key] = nil
                return nil
            }
            return entry.value
        }
    }

    /// Stores `value` (nil deletes) for `ttl` seconds, or until replaced.
    func set(_ key: String, _ value: Value?, ttl: Double?) {
        let expires = ttl.map { ContinuousClock.now + .milliseconds(Int64($0 * 1000)) }
        entries.withLock { entries in
            entries[key] = value.map { Entry(value: $0, expires: expires) }
        }
    }

    /// Adds `by` to an integer (a missing or expired key counts as 0); nil if the key holds
    /// something else. Keeps the key's expiry.
    func incr(_ key: String, by: Int64) -> Int64? {
        let now = ContinuousClock.now
        return entries.withLock { entries -> Int64? in
            var entry = entries[key] ?? Entry(value: .int(0), expires: nil)
            if let expires = entry.expires, expires <= now { entry = Entry(value: .int(0), expires: nil) }
            guard case .int(let current) = entry.value else { return nil }
            let next = current &+ by
            entry.value = .int(next)
            entries[key] = entry
            return next
        }
    }
}
