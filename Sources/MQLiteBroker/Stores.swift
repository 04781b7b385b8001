import MQTTCore
import NIOCore
import Synchronization

// The state the workers share, each behind a small protocol so that another implementation (one
// kept in SQLite, say) can stand in for the in-memory one the broker makes by default. Every
// method is thread-safe and short; none does I/O while holding a lock that the publish path takes.

/// Client id → session. The broker's takeover rules run inside `update`, atomically for the
/// registry as a whole, so that racing CONNECTs for one client id see each other.
protocol SessionRegistry: Sendable {
    /// Runs `body` with the session registered for `clientID` (nil if none); what `body` leaves
    /// there is registered.
    func update<T>(clientID: String, _ body: (inout Session?) -> T) -> T
    /// The session registered for `clientID`.
    func session(for clientID: String) -> Session?
    /// Sessions registered (online and offline).
    var count: Int { get }
}

/// What a subscription was granted: its QoS and, from MQTT 5, its options. Five bytes: a
/// route's (session, grant) pair stays 16 bytes.
struct Grant: Sendable, Equatable {
    var qos: QoS
    /// MQTT 5 No Local: not the subscriber's own messages.
    var noLocal = false
    /// MQTT 5 Retain As Published: live messages keep the RETAIN flag their publisher set.
    var retainAsPublished = false
    /// What applies to the subscriber's own messages (unless `noLocal`): the same as `qos` and
    /// `retainAsPublished` for one subscription; merged, what the subscriptions without No Local
    /// grant, since one with it does not forward them at all (MQTT-3.8.3-3).
    private(set) var localQoS: QoS
    private(set) var localRetainAsPublished: Bool

    init(qos: QoS, noLocal: Bool = false, retainAsPublished: Bool = false) {
        self.qos = qos
        self.noLocal = noLocal
        self.retainAsPublished = retainAsPublished
        localQoS = qos
        localRetainAsPublished = retainAsPublished
    }

    /// Two subscriptions of one session that match the same topic, as one (the message goes to
    /// the session once): the higher QoS; its own messages unless both say No Local, and then as
    /// the one without it grants; the publisher's RETAIN flag if either asks for it.
    func merged(with other: Grant) -> Grant {
        var merged = Grant(qos: max(qos, other.qos), noLocal: noLocal && other.noLocal, retainAsPublished: retainAsPublished || other.retainAsPublished)
        switch (noLocal, other.noLocal) {
        case (false, false):
            merged.localQoS = max(localQoS, other.localQoS)
            merged.localRetainAsPublished = localRetainAsPublished || other.localRetainAsPublished
        case (true, false):
            (merged.localQoS, merged.localRetainAsPublished) = (other.localQoS, other.localRetainAsPublished)
        case (false, true):
            (merged.localQoS, merged.localRetainAsPublished) = (localQoS, localRetainAsPublished)
        case (true, true):
            break  // its own messages do not go
        }
        return merged
    }
}

/// Filters → the sessions subscribed and their granted QoS. A change here must be told to the
/// workers' route caches (`Worker.subscriptionsChanged`); the broker does that.
protocol SubscriptionIndex: Sendable {
    /// A shared subscription's filter (`$share/GROUP/FILTER`, checked when subscribed) adds
    /// `session` to that group; removing it takes the session out, and a group left without
    /// members goes.
    func insert(filter: TopicFilter, session: Session, grant: Grant)
    func remove(filters: [TopicFilter], session: Session)
    /// Every session whose filters match `topic`, once each, with its matching subscriptions'
    /// grants merged (`Grant.merged`).
    func matches(topic: TopicName) -> [(session: Session, grant: Grant)]
    /// The shared subscription groups whose filter matches `topic`.
    func sharedGroups(matching topic: TopicName) -> [SharedGroup]
    /// Nodes of the index (tests: emptied branches are pruned).
    var nodeCount: Int { get }
}

/// Retained messages by topic, walked in steps by SUBSCRIBE (`scan`, then `continueScan` until
/// the scan is done), so that neither a lock nor a worker is held for long by a wide filter.
protocol RetainedStore: Sendable {
    typealias Scan = RetainedTree<Message>.Scan
    /// Keeps `message` (already compacted) as the retained message of `topic`, unless that would
    /// take the store past `limits` (then `topic` keeps none: an earlier one is cleared). The
    /// broker's own topics are not limited (`RetainedLimits.exempts`).
    @discardableResult
    func set(topic: TopicName, _ message: Message, within limits: RetainedLimits) -> RetainOutcome
    /// Clears the retained message of `topic`, if any.
    func remove(topic: TopicName)
    func scan(matching filter: TopicFilter) -> Scan
    /// The next retained messages of `scan`, visiting at most `limit` nodes.
    func continueScan(_ scan: inout Scan, limit: Int) -> [Message]
    var count: Int { get }
    var nodeCount: Int { get }
    /// What the retained messages hold, as `max_retained_bytes` counts it (`RetainedLimits`).
    var heldBytes: Int { get }
}

/// `max_retained` and `max_retained_bytes` (0: no limit).
struct RetainedLimits: Sendable {
    var maxCount = 0
    var maxBytes = 0
    static let none = RetainedLimits()
    /// The broker's own topics (`$SYS`, which no client can publish): neither limited nor counted
    /// (their tree nodes, a few dozen, are).
    static func exempts(_ topic: TopicName) -> Bool { ConnectionHandler.isBrokerOnly(topic) }
    /// What `max_retained_bytes` counts for each node of the topic tree (its object, its entry in
    /// the parent's children and the level's name): a topic of many levels no other topic shares
    /// costs that much per level, whatever its bytes.
    static let nodeBytes = 288
}

/// What became of a message given to the retained store.
enum RetainOutcome: Equatable {
    case kept
    /// Not kept: the store is at `max_retained` or would go past `max_retained_bytes`.
    /// `cleared`: the topic's earlier retained message was removed (it would have been stale).
    case refused(cleared: Bool)
}

// MARK: - In memory

final class InMemorySessionRegistry: SessionRegistry {
    /// One reference a client (8 bytes a bucket, where a dictionary from id to session took 24:
    /// ~26 bytes less per connection at 10,000), found by the session's own client id.
    private let sessions = Mutex(Set<Registered>())

    /// A session as the registry's element: hashed and compared by its client id, byte for byte
    /// (as `ClientIDKey`). A lookup makes one of a bare `ClientIdentity` with the id it looks for.
    private struct Registered: Hashable {
        let identity: ClientIdentity

        static func == (a: Registered, b: Registered) -> Bool { a.identity.clientID.hasSameUTF8(as: b.identity.clientID) }
        func hash(into hasher: inout Hasher) { identity.clientID.hashUTF8(into: &hasher) }
        // Only sessions are ever inserted.
        var session: Session { unsafeDowncast(identity, to: Session.self) }
    }

    func update<T>(clientID: String, _ body: (inout Session?) -> T) -> T {
        sessions.withLock { sessions in
            let index = sessions.firstIndex(of: Registered(identity: ClientIdentity(clientID: clientID)))
            let registered = index.map { sessions[$0].session }
            var session = registered
            defer {
                if let session {
                    if session !== registered { sessions.update(with: Registered(identity: session)) }
                } else if let index {
                    sessions.remove(at: index)
                }
            }
            return body(&session)
        }
    }

    func session(for clientID: String) -> Session? {
        sessions.withLock { sessions in
            sessions.firstIndex(of: Registered(identity: ClientIdentity(clientID: clientID))).map { sessions[$0].session }
        }
    }

    var count: Int { sessions.withLock { $0.count } }
}

/// The subscription trie (filters → sessions) behind one lock, and the shared subscriptions'
/// groups in a trie of their own (filters → groups by share name), walked only while there are any.
final class TrieSubscriptionIndex: SubscriptionIndex {
    private let trie = Mutex(TopicTrie<[ObjectIdentifier: (session: Session, grant: Grant)]>())
    private let sharedTrie = Mutex(TopicTrie<[String: SharedGroup]>())
    private let sharedGroupCount = Atomic<Int>(0)

    func insert(filter: TopicFilter, session: Session, grant: Grant) {
        if let shared = Self.shared(filter) { return insert(shared: shared, session: session, grant: grant) }
        trie.withLock { $0.insert(filter: filter.string, key: ObjectIdentifier(session), value: (session, grant)) }
    }

    func remove(filters: [TopicFilter], session: Session) {
        var plain = filters
        if filters.contains(where: SharedFilter.isShared) {
            plain.removeAll { filter in
                guard let shared = Self.shared(filter) else { return false }
                remove(shared: shared, session: session)
                return true
            }
        }
        trie.withLock { trie in
            for filter in plain { trie.remove(filter: filter.string, key: ObjectIdentifier(session)) }
        }
    }

    /// The group and filter of a shared subscription's filter; nil for any other.
    private static func shared(_ filter: TopicFilter) -> SharedFilter? {
        (try? SharedFilter.parse(filter)) ?? nil
    }

    func matches(topic: TopicName) -> [(session: Session, grant: Grant)] {
        let name = topic.string
        return trie.withLock { trie in
            var found: [ObjectIdentifier: (session: Session, grant: Grant)] = [:]
            trie.forEachMatch(topic: name) { key, entry in
                if let existing = found[key] {
                    found[key]!.grant = existing.grant.merged(with: entry.grant)
                } else {
                    found[key] = entry
                }
            }
            return Array(found.values)
        }
    }

    private func insert(shared: SharedFilter, session: Session, grant: Grant) {
        sharedTrie.withLock { trie in
            trie.update(shared.filter.string) { groups in
                if let group = groups?[shared.group] { return group.add(session, grant: grant) }
                let group = SharedGroup(shared)
                group.add(session, grant: grant)
                groups = groups ?? [:]
                groups![shared.group] = group
                sharedGroupCount.add(1, ordering: .releasing)
            }
        }
    }

    private func remove(shared: SharedFilter, session: Session) {
        sharedTrie.withLock { trie in
            guard trie.value(at: shared.filter.string)?[shared.group] != nil else { return }
            trie.update(shared.filter.string) { groups in
                guard let group = groups?[shared.group], group.remove(session) else { return }
                groups?[shared.group] = nil
                if groups?.isEmpty == true { groups = nil }
                sharedGroupCount.subtract(1, ordering: .releasing)
            }
        }
    }

    func sharedGroups(matching topic: TopicName) -> [SharedGroup] {
        guard sharedGroupCount.load(ordering: .acquiring) > 0 else { return [] }
        let name = topic.string
        return sharedTrie.withLock { trie in
            var found: [SharedGroup] = []
            trie.forEachMatch(topic: name) { (_: String, group: SharedGroup) in found.append(group) }
            return found
        }
    }

    var nodeCount: Int { trie.withLock { $0.nodeCount } + sharedTrie.withLock { $0.nodeCount } }
}

/// The members of one shared subscription (a share name and a filter), on any worker: each
/// message the filter matches goes to one of them, in turn (round robin), a connected one where
/// there is one. Members change under the index's lock and the group's own; publishes on every
/// worker pick under the group's.
final class SharedGroup: Sendable {
    typealias Member = (session: Session, grant: Grant)
    let shared: SharedFilter
    private let state = Mutex(Members())

    /// The members in two lists, so that a pick walks connected ones only: those connected when
    /// last looked at, and those found offline (persistent sessions). A member is moved to
    /// `offline` when a pick finds it gone, and back when a pick's look at a few offline members
    /// finds it connected: neither a group of thousands of offline sessions nor adding and taking
    /// out members costs a walk of the group.
    private struct Members {
        var online: [Member] = []
        var offline: [Member] = []
        /// Where each member is: its list and index.
        var places: [ObjectIdentifier: (online: Bool, index: Int)] = [:]
        var next = 0
        var nextOffline = 0
        /// Members looked at by picks (tests).
        var looked = 0

        mutating func append(_ member: Member, online isOnline: Bool) {
            if isOnline {
                places[ObjectIdentifier(member.session)] = (true, online.count)
                online.append(member)
            } else {
                places[ObjectIdentifier(member.session)] = (false, offline.count)
                offline.append(member)
            }
        }

        /// Takes out the member at `index` of one list; the list's last member takes its place.
        @discardableResult
        mutating func take(online isOnline: Bool, at index: Int) -> Member {
            func take(_ list: inout [Member]) -> Member {
                list.swapAt(index, list.count - 1)
                let member = list.removeLast()
                if index < list.count { places[ObjectIdentifier(list[index].session)] = (isOnline, index) }
                return member
            }
            let member = isOnline ? take(&online) : take(&offline)
            places[ObjectIdentifier(member.session)] = nil
            return member
        }

        /// Looks at up to `limit` offline members, in turn, and moves the connected ones back.
        mutating func promote(limit: Int) {
            var looked = 0
            while looked < limit, !offline.isEmpty {
                looked += 1
                if nextOffline >= offline.count { nextOffline = 0 }
                if offline[nextOffline].session.isOnline {
                    append(take(online: false, at: nextOffline), online: true)  // (the last one is now here: looked at next)
                } else {
                    nextOffline += 1
                }
            }
            self.looked += looked
        }
    }

    init(_ shared: SharedFilter) { self.shared = shared }

    /// Adds `session` (or changes its grant, if it is a member already).
    func add(_ session: Session, grant: Grant) {
        state.withLock { state in
            if let place = state.places[ObjectIdentifier(session)] {
                if place.online { state.online[place.index].grant = grant } else { state.offline[place.index].grant = grant }
            } else {
                state.append((session, grant), online: true)  // (moved to `offline` by the first pick that finds it gone)
            }
        }
    }

    /// Takes `session` out; whether the group is left empty.
    func remove(_ session: Session) -> Bool {
        state.withLock { state in
            if let place = state.places[ObjectIdentifier(session)] { state.take(online: place.online, at: place.index) }
            return state.online.isEmpty && state.offline.isEmpty
        }
    }

    /// The next member in turn: the next connected one without a backlog (one that cannot keep
    /// up, or a client that stopped reading, is passed over while another can take the message),
    /// else the next connected one, else the next offline one (a persistent session queues the
    /// message). Never `excluding`. A member that has just reconnected may be taken for offline
    /// until a few picks have looked at it again (`promote`).
    func pick(excluding: Session? = nil) -> Member? {
        state.withLock { state in
            state.promote(limit: 2)
            var connected: (member: Member, index: Int)?
            var i = state.next
            var looked = 0
            let limit = state.online.count
            while looked < limit, !state.online.isEmpty {
                looked += 1
                if i >= state.online.count { i = 0 }
                let member = state.online[i]
                if member.session === excluding {
                    i += 1
                } else if !member.session.isOnline {
                    state.append(state.take(online: true, at: i), online: false)  // (the last one is now here)
                } else if !member.session.isBacklogged {
                    state.next = i + 1
                    state.looked += looked
                    return member
                } else {
                    if connected == nil { connected = (member, i) }
                    i += 1
                }
            }
            state.looked += looked
            if let connected {
                state.next = connected.index + 1
                return connected.member
            }
            for _ in 0..<min(state.offline.count, 2) {
                if state.nextOffline >= state.offline.count { state.nextOffline = 0 }
                let member = state.offline[state.nextOffline]
                state.nextOffline += 1
                if member.session !== excluding { return member }
            }
            return nil
        }
    }

    /// Members (tests, introspection).
    var memberCount: Int { state.withLock { $0.online.count + $0.offline.count } }
    /// Members looked at by picks so far (tests: a pick must not walk the offline ones).
    var looked: Int { state.withLock { $0.looked } }
}

/// The retained topic trie (names → messages) behind one lock; a scan holds it for one step at
/// a time.
final class TreeRetainedStore: RetainedStore {
    private struct State {
        let tree: RetainedTree<Message>
        /// Messages held and their `Message.size`, the exempt ones apart.
        var count = 0
        var messageBytes = 0
        var held: Int { messageBytes + tree.nodeCount * RetainedLimits.nodeBytes }

        mutating func account(_ message: Message, _ sign: Int) {
            guard !RetainedLimits.exempts(message.topic) else { return }
            count += sign
            messageBytes += sign * message.size
        }

        /// When expired messages were last dropped (uptime nanoseconds).
        var lastPurge: UInt64 = 0

        /// Drops the messages whose Message Expiry Interval has passed: nobody gets them any
        /// more, but until then they count against the limits. A walk of the whole tree, so done
        /// only when a limit is reached, and at most every `purgeInterval`.
        mutating func purgeExpired(within limits: RetainedLimits, now: UInt64) {
            let full = (limits.maxCount > 0 && count >= limits.maxCount) || (limits.maxBytes > 0 && held >= limits.maxBytes)
            guard full, now >= lastPurge + TreeRetainedStore.purgeInterval else { return }
            lastPurge = now
            var expired: [String] = []
            tree.forEachValue { message in
                if let at = message.properties.messageExpiresAt, at <= now { expired.append(message.topic.string) }
            }
            for path in expired {
                if let old = tree.removeValue(at: path) { account(old, -1) }
            }
        }
    }

    static let purgeInterval: UInt64 = 10_000_000_000

    private let state: Mutex<State>

    init(_ tree: RetainedTree<Message> = RetainedTree()) {
        var state = State(tree: tree)
        tree.forEachValue { state.account($0, 1) }
        self.state = Mutex(state)
    }

    func set(topic: TopicName, _ message: Message, within limits: RetainedLimits) -> RetainOutcome {
        let path = topic.string
        let now = NIODeadline.now().uptimeNanoseconds
        return state.withLock { s in
            s.purgeExpired(within: limits, now: now)
            let (count, held) = (s.count, s.held)
            let old = s.tree.update(path) { value in
                defer { value = message }
                return value
            }
            if let old { s.account(old, -1) }
            s.account(message, 1)
            // Over a limit only by growing past it: a store over a lowered limit (loaded from disk)
            // still takes replacements no larger than what they replace.
            let over = (limits.maxCount > 0 && s.count > max(count, limits.maxCount))
                || (limits.maxBytes > 0 && s.held > max(held, limits.maxBytes))
            guard over, !RetainedLimits.exempts(topic) else { return .kept }
            s.tree.removeValue(at: path)
            s.account(message, -1)
            return .refused(cleared: old != nil)
        }
    }

    func remove(topic: TopicName) {
        _ = removed(topic: topic)
    }

    /// Removes the retained message of `topic`; whether there was one.
    func removed(topic: TopicName) -> Bool {
        let path = topic.string
        return state.withLock { s in
            guard let old = s.tree.removeValue(at: path) else { return false }
            s.account(old, -1)
            return true
        }
    }

    func scan(matching filter: TopicFilter) -> Scan {
        state.withLock { $0.tree.scan(matching: filter.string) }
    }

    func continueScan(_ scan: inout Scan, limit: Int) -> [Message] {
        var found: [Message] = []
        state.withLock { $0.tree.continueScan(&scan, limit: limit, into: &found) }
        return found
    }

    var count: Int { state.withLock { $0.tree.count } }
    var nodeCount: Int { state.withLock { $0.tree.nodeCount } }
    var heldBytes: Int { state.withLock { $0.held } }
}

/// A client id as the registry's key: compared and hashed byte for byte, as `ByteText`, but
/// half its size (a `String`, not a `Substring`): the registry holds one per client.
struct ClientIDKey: Hashable {
    let id: String

    init(_ id: String) { self.id = id }

    static func == (a: ClientIDKey, b: ClientIDKey) -> Bool { a.id.hasSameUTF8(as: b.id) }

    func hash(into hasher: inout Hasher) { id.hashUTF8(into: &hasher) }
}
