import Foundation
import MQTTCore
import NIOCore

// Persistent sessions in the store: what a session that outlives its connection (3.1.1 clean
// session 0, MQTT 5 session expiry over 0) holds is followed through its `SessionEvent`s
// (`SessionPersister`), kept in the journal as the latest change per row, committed by the
// store's writer (`SessionStatements`), and loaded again at startup (`StoredSession`), where the
// broker makes offline sessions of it (`Broker.restoreSessions`).

/// How a message is kept, in `retained` and `session_messages`: its properties as MQTT 5 writes
/// them, without the Message Expiry Interval, which is kept as a deadline instead (wall-clock
/// seconds), so that time spent stopped counts.
enum StoredMessage {
    static func encode(_ message: Message) -> (properties: ByteBuffer?, expiresAt: Int64?) {
        var expiresAt: Int64?
        if let deadline = message.properties.messageExpiresAt {
            let remaining = Int64(deadline) - Int64(NIODeadline.now().uptimeNanoseconds)
            expiresAt = Int64(Date().timeIntervalSince1970) + max(remaining, 0) / 1_000_000_000
        }
        guard !message.properties.isEmpty else { return (nil, expiresAt) }
        var stored = message.properties
        stored.messageExpiryInterval = nil
        stored.messageExpiresAt = nil
        var bytes = ByteBuffer()
        bytes.writeMQTTProperties(stored)
        return (bytes, expiresAt)
    }

    /// The message a row held (nil: it cannot be read). `now`: wall-clock seconds.
    static func decode(
        topic: ByteBuffer, payload: ByteBuffer, qos: Int64, retain: Bool, properties: ByteBuffer?, expiresAt: Int64?, now: Int64
    ) -> Message? {
        guard let topic = try? TopicName(validating: topic), (0...2).contains(qos), let qos = QoS(rawValue: UInt8(qos)) else { return nil }
        var read = MQTTProperties()
        if var bytes = properties {
            guard let decoded = try? MQTTProperties.readPublishProperties(from: &bytes), bytes.readableBytes == 0 else { return nil }
            read = decoded
        }
        if let expiresAt {
            // Expired (rows with such deadlines are not loaded); a deadline past what an interval
            // can say is held to the largest one. (`expiresAt > now`: the difference cannot overflow.)
            guard expiresAt > now else { return nil }
            let remaining = min(expiresAt - now, Int64(UInt32.max))
            read.messageExpiryInterval = UInt32(clamping: remaining)
            read.messageExpiresAt = NIODeadline.now().uptimeNanoseconds + UInt64(remaining) * 1_000_000_000
        }
        return Message(topic: topic, payload: payload, qos: qos, retain: retain, properties: read).compacted()
    }
}

/// The changes of one session on their way to the writer: the latest per row, so that they are
/// bounded by what the session holds (a message queued and acknowledged before the writer got to
/// it is never written at all).
struct SessionChanges {
    /// The session row: how long it may stay offline (nil: `session_expiry`; -1: never), since
    /// when it is offline (wall-clock seconds; nil: online), and its rewritten filters' names.
    struct Row {
        var expiry: Int64?
        var offlineSince: Int64?
        var names: ByteBuffer?
    }

    struct Subscription {
        var grant: Grant
        var identifier: UInt32?
    }

    /// A message owed to the session: queued (no packet id), sent (its id), or released (QoS 2
    /// after PUBREC: the PUBREL is owed, not the message).
    struct OwedMessage {
        enum State: Int64 { case queued = 0, sent = 1, released = 2 }
        var state: State
        var packetID: UInt16?
        var message: Message?
        var retain: Bool
        var qos: QoS
    }

    enum MessageChange {
        /// `fresh`: the row was never committed (so removing it needs no write).
        case set(OwedMessage, fresh: Bool)
        case remove
    }

    /// Every row of the client goes first (the session ended; a new one may follow).
    var cleared = false
    var row: Row?
    /// Filter → its subscription, or nil: removed.
    var subscriptions: [String: Subscription?] = [:]
    var messages: [UInt64: MessageChange] = [:]
    /// Inbound QoS 2 id → awaiting its PUBREL (true) or not any more.
    var awaiting: [UInt16: Bool] = [:]

    mutating func clear() {
        self = SessionChanges()
        cleared = true
    }

    mutating func record(_ seq: UInt64, _ change: MessageChange) {
        switch (messages[seq], change) {
        case (.set(_, fresh: true)?, .remove): messages[seq] = nil
        case (.set(_, fresh: true)?, .set(let owed, _)): messages[seq] = .set(owed, fresh: true)
        default: messages[seq] = change
        }
    }

    /// These changes, then `newer` (a failed commit's changes back in line before what came since).
    func followed(by newer: SessionChanges) -> SessionChanges {
        if newer.cleared { return newer }
        var merged = self
        if let row = newer.row { merged.row = row }
        merged.subscriptions.merge(newer.subscriptions) { _, new in new }
        for (seq, change) in newer.messages { merged.record(seq, change) }
        merged.awaiting.merge(newer.awaiting) { _, new in new }
        return merged
    }
}

/// Follows the persistent sessions' events into the journal (owner loops). A clean session is
/// never stored (`Session.isStored`): its events cost a check and nothing else.
final class SessionPersister: SessionObserver {
    private let journal: Journal

    init(journal: Journal) {
        self.journal = journal
    }

    func session(_ session: Session, _ event: SessionEvent) {
        if case .attached = event {
            if session.persistent {
                session.isStored = true
                journal.record(session.clientID) { $0.row = Self.row(of: session) }
            } else if session.isStored {
                // A persistent session resumed as one that ends with its connection (MQTT 5).
                session.isStored = false
                journal.record(session.clientID) { $0.clear() }
            }
            return
        }
        guard session.isStored else { return }
        switch event {
        case .attached: break
        case .detached, .renamed:
            journal.record(session.clientID) { $0.row = Self.row(of: session) }
        case .subscribed(let filter, let grant, let identifier):
            journal.record(session.clientID) { $0.subscriptions[filter.string] = SessionChanges.Subscription(grant: grant, identifier: identifier) }
        case .unsubscribed(let filter):
            journal.record(session.clientID) { $0.subscriptions[filter.string] = .some(nil) }
        case .queued(let delivery):
            let owed = SessionChanges.OwedMessage(state: .queued, message: delivery.message, retain: delivery.retain, qos: delivery.qos)
            journal.record(session.clientID) { $0.record(delivery.seq, .set(owed, fresh: true)) }
        case .inflightAdded(let packetID, let delivery, let queued):
            let owed = SessionChanges.OwedMessage(
                state: .sent, packetID: packetID, message: delivery.message.compacted(), retain: delivery.retain, qos: delivery.qos)
            journal.record(session.clientID) { $0.record(delivery.seq, .set(owed, fresh: !queued)) }
        case .released(let packetID, let seq):
            let owed = SessionChanges.OwedMessage(state: .released, packetID: packetID, retain: false, qos: .exactlyOnce)
            journal.record(session.clientID) { $0.record(seq, .set(owed, fresh: false)) }
        case .acknowledged(_, let seq), .discarded(let seq), .handedOver(let seq):
            journal.record(session.clientID) { $0.record(seq, .remove) }
        case .inboundQoS2(let packetID, let awaiting):
            journal.record(session.clientID) { $0.awaiting[packetID] = awaiting }
        case .expired:
            break
        case .ended:
            session.isStored = false
            journal.record(session.clientID) { $0.clear() }
        }
    }

    private static func row(of session: Session) -> SessionChanges.Row {
        var names: ByteBuffer?
        if session.hasRenamedSubscriptions {
            var bytes = ByteBuffer()
            for (name, filter) in session.withSubscriptionNames({ $0.pairs }) {
                bytes.writeLengthPrefixed(name.string)
                bytes.writeLengthPrefixed(filter.string)
            }
            names = bytes
        }
        let expiry = session.expiry.map { $0 == Session.neverExpires ? -1 : $0.nanoseconds / 1_000_000_000 }
        return SessionChanges.Row(expiry: expiry, offlineSince: session.isOnline ? nil : Int64(Date().timeIntervalSince1970), names: names)
    }
}

extension ByteBuffer {
    fileprivate mutating func writeLengthPrefixed(_ text: String) {
        writeInteger(UInt16(clamping: text.utf8.count))
        writeString(text)
    }

    fileprivate mutating func readLengthPrefixed() -> String? {
        guard let count = readInteger(as: UInt16.self) else { return nil }
        return readString(length: Int(count))
    }
}

/// A session as the store held it at startup.
struct StoredSession {
    var clientID: String
    var expiry: Int64?
    var offlineSince: Int64?
    var names: [(name: TopicFilter, filter: TopicFilter)] = []
    var subscriptions: [(filter: TopicFilter, subscription: SessionChanges.Subscription)] = []
    /// By number: the queued messages, then the ones in flight (sent or released).
    var queue: [Delivery] = []
    var inflight: [Session.Inflight] = []
    var awaitingPubrel: [UInt16] = []
    var lastSeq: UInt64 = 0

    /// How long it may stay offline in all (nil: `session_expiry`): what its client asked for,
    /// capped by `configured` (`session_expiry` now, which may be lower than when it was stored)
    /// unless that is 0, as a CONNECT's would be (`Limits.sessionExpiry(for:)`).
    func expiry(configured: TimeAmount) -> TimeAmount? {
        guard let expiry else { return nil }
        let asked = expiry < 0 ? Session.neverExpires : .seconds(min(expiry, Int64(UInt32.max)))
        return configured == .zero ? asked : min(asked, configured)
    }

    /// Loads every stored session. A row that cannot be read is skipped (`skipped` counts them).
    /// Rows go to their session by the bytes of its client id, as the registry tells clients apart:
    /// two ids that are one text spelled differently (`"caf\u{E9}"`, `"cafe\u{301}"`) are two
    /// sessions, which a `String` key would merge (Swift compares strings canonically).
    /// A `session_messages` row's message columns, compared byte for byte.
    private struct RowKey: Hashable {
        var topic: ByteBuffer
        var payload: ByteBuffer
        var properties: ByteBuffer?
        var qos: Int64
        var retain: Bool
        var expiresAt: Int64?
    }

    static func loadAll(from db: SQLiteDatabase, now: Int64, skipped: inout Int) throws -> [StoredSession] {
        var sessions: [ByteBuffer: StoredSession] = [:]
        let rows = try db.prepare("SELECT client_id, expiry, offline_since, names FROM sessions")
        while try rows.step() {
            let id = rows.bytes(0)
            var session = StoredSession(clientID: String(buffer: id), expiry: rows.isNull(1) ? nil : rows.int64(1), offlineSince: rows.isNull(2) ? nil : rows.int64(2))
            if !rows.isNull(3) {
                var bytes = rows.bytes(3)
                while bytes.readableBytes > 0 {
                    guard let name = bytes.readLengthPrefixed().flatMap({ try? TopicFilter($0) }),
                          let filter = bytes.readLengthPrefixed().flatMap({ try? TopicFilter($0) })
                    else {
                        skipped += 1
                        break
                    }
                    session.names.append((name, filter))
                }
            }
            sessions[id] = session
        }
        let subscriptions = try db.prepare("SELECT client_id, filter, qos, options, identifier FROM subscriptions")
        while try subscriptions.step() {
            let id = subscriptions.bytes(0)
            let options = subscriptions.int64(3)
            guard sessions[id] != nil, let filter = try? TopicFilter(String(buffer: subscriptions.bytes(1))),
                  let qos = QoS(rawValue: UInt8(clamping: subscriptions.int64(2))), qos != .exactlyOnce || subscriptions.int64(2) == 2
            else {
                skipped += 1
                continue
            }
            let grant = Grant(qos: qos, noLocal: options & 1 != 0, retainAsPublished: options & 2 != 0)
            let identifier = subscriptions.isNull(4) ? nil : UInt32(exactly: subscriptions.int64(4))
            sessions[id]!.subscriptions.append((filter, SessionChanges.Subscription(grant: grant, identifier: identifier)))
        }
        let messages = try db.prepare(
            "SELECT client_id, seq, state, packet_id, qos, retain, topic, payload, properties, expires_at FROM session_messages ORDER BY client_id, seq")
        // A message queued for many sessions was one copy in memory, and is a row for each: rows
        // alike (of 256 payload bytes or more) are loaded as one message again, not one copy each.
        var alike: [RowKey: Message] = [:]
        while try messages.step() {
            let id = messages.bytes(0)
            // (Numbers start at 1: one below, or one so high that those after it (a restore adds
            // `Session.restoredSeqGap` and its spread) would not fit the column, was not written
            // by mqlite.)
            let seq = UInt64(bitPattern: messages.int64(1))
            guard sessions[id] != nil, (1..<(1 << 62)).contains(seq),
                  let state = SessionChanges.OwedMessage.State(rawValue: messages.int64(2)) else {
                skipped += 1
                continue
            }
            sessions[id]!.lastSeq = max(sessions[id]!.lastSeq, seq)
            // A message whose expiry passed while the broker was down is not owed any more.
            if !messages.isNull(9), messages.int64(9) <= now { continue }
            let packetID = UInt16(exactly: messages.int64(3))
            // (Two rows in flight with one packet id: a hand or a bug made them; the first stays.)
            if state != .queued, let packetID, sessions[id]!.inflight.contains(where: { $0.id == packetID }) {
                skipped += 1
                continue
            }
            if state == .released {
                guard let packetID, packetID != 0 else {
                    skipped += 1
                    continue
                }
                let empty = Message(topic: TopicName(alreadyValidated: ByteBuffer()), payload: ByteBuffer(), qos: .exactlyOnce, retain: false)
                sessions[id]!.inflight.append(Session.Inflight(id: packetID, message: empty, qos: .exactlyOnce, retain: false, released: true, seq: seq))
                continue
            }
            let retain = messages.int64(5) != 0
            var row = RowKey(
                topic: messages.bytes(6), payload: messages.bytes(7), properties: messages.isNull(8) ? nil : messages.bytes(8),
                qos: messages.int64(4), retain: retain, expiresAt: messages.isNull(9) ? nil : messages.int64(9))
            let shares = row.payload.readableBytes >= 256
            let loaded = shares ? alike[row] : nil
            guard let message = loaded ?? StoredMessage.decode(
                topic: row.topic, payload: row.payload, qos: row.qos, retain: retain, properties: row.properties, expiresAt: row.expiresAt, now: now),
                message.qos != .atMostOnce
            else {
                skipped += 1
                continue
            }
            if shares, loaded == nil {
                // Kept by the message's own bytes, not the row's copy of them: a store of distinct
                // messages loads without a second copy of each held until the end.
                row.topic = message.topic.bytes
                row.payload = message.payload
                alike[row] = message
            }
            if state == .sent, let packetID, packetID != 0 {
                sessions[id]!.inflight.append(Session.Inflight(id: packetID, message: message, qos: message.qos, retain: retain, released: false, seq: seq))
            } else {
                sessions[id]!.queue.append(Delivery(message: message, qos: message.qos, retain: retain, frame: nil, seq: seq))
            }
        }
        let awaiting = try db.prepare("SELECT client_id, packet_id FROM awaiting_pubrel")
        while try awaiting.step() {
            let id = awaiting.bytes(0)
            guard sessions[id] != nil, let packetID = UInt16(exactly: awaiting.int64(1)), packetID != 0 else {
                skipped += 1
                continue
            }
            sessions[id]!.awaitingPubrel.append(packetID)
        }
        return Array(sessions.values)
    }
}

/// The writer's statements for session rows (writer thread only).
final class SessionStatements {
    private let clear: [SQLiteDatabase.Statement]
    private let upsertSession: SQLiteDatabase.Statement
    private let upsertSubscription: SQLiteDatabase.Statement
    private let deleteSubscription: SQLiteDatabase.Statement
    private let upsertMessage: SQLiteDatabase.Statement
    private let deleteMessage: SQLiteDatabase.Statement
    private let addAwaiting: SQLiteDatabase.Statement
    private let deleteAwaiting: SQLiteDatabase.Statement

    init(_ db: SQLiteDatabase) throws(SQLiteError) {
        clear = try ["sessions", "subscriptions", "session_messages", "awaiting_pubrel"].map { table throws(SQLiteError) in
            try db.prepare("DELETE FROM \(table) WHERE client_id = ?")
        }
        upsertSession = try db.prepare("INSERT OR REPLACE INTO sessions (client_id, expiry, offline_since, names) VALUES (?, ?, ?, ?)")
        upsertSubscription = try db.prepare("INSERT OR REPLACE INTO subscriptions (client_id, filter, qos, options, identifier) VALUES (?, ?, ?, ?, ?)")
        deleteSubscription = try db.prepare("DELETE FROM subscriptions WHERE client_id = ? AND filter = ?")
        upsertMessage = try db.prepare(
            """
            INSERT OR REPLACE INTO session_messages (client_id, seq, state, packet_id, qos, retain, topic, payload, properties, expires_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """)
        deleteMessage = try db.prepare("DELETE FROM session_messages WHERE client_id = ? AND seq = ?")
        addAwaiting = try db.prepare("INSERT OR IGNORE INTO awaiting_pubrel (client_id, packet_id) VALUES (?, ?)")
        deleteAwaiting = try db.prepare("DELETE FROM awaiting_pubrel WHERE client_id = ? AND packet_id = ?")
    }

    /// Statements left half-bound by a failed write, made ready again.
    func reset() {
        for statement in clear + [upsertSession, upsertSubscription, deleteSubscription, upsertMessage, deleteMessage, addAwaiting, deleteAwaiting] {
            statement.reset()
        }
    }

    /// Writes one session's changes (inside the writer's transaction).
    func write(_ clientID: String, _ changes: SessionChanges) throws(SQLiteError) {
        let id = ByteBuffer(string: clientID)
        if changes.cleared {
            for statement in clear {
                statement.bind(1, id)
                try statement.run()
            }
        }
        if let row = changes.row {
            upsertSession.bind(1, id)
            upsertSession.bind(2, row.expiry)
            upsertSession.bind(3, row.offlineSince)
            upsertSession.bind(4, row.names)
            try upsertSession.run()
        }
        for (filter, subscription) in changes.subscriptions {
            if let subscription {
                let grant = subscription.grant
                upsertSubscription.bind(1, id)
                upsertSubscription.bind(2, ByteBuffer(string: filter))
                upsertSubscription.bind(3, Int64(grant.qos.rawValue))
                upsertSubscription.bind(4, Int64((grant.noLocal ? 1 : 0) | (grant.retainAsPublished ? 2 : 0)))
                upsertSubscription.bind(5, subscription.identifier.map(Int64.init))
                try upsertSubscription.run()
            } else {
                deleteSubscription.bind(1, id)
                deleteSubscription.bind(2, ByteBuffer(string: filter))
                try deleteSubscription.run()
            }
        }
        for (seq, change) in changes.messages {
            switch change {
            case .set(let owed, _):
                upsertMessage.bind(1, id)
                upsertMessage.bind(2, Int64(bitPattern: seq))
                upsertMessage.bind(3, owed.state.rawValue)
                upsertMessage.bind(4, owed.packetID.map(Int64.init))
                upsertMessage.bind(5, Int64(owed.qos.rawValue))
                upsertMessage.bind(6, Int64(owed.retain ? 1 : 0))
                if let message = owed.message {
                    let (properties, expiresAt) = StoredMessage.encode(message)
                    upsertMessage.bind(7, message.topic.bytes)
                    upsertMessage.bind(8, message.payload)
                    upsertMessage.bind(9, properties)
                    upsertMessage.bind(10, expiresAt)
                }
                try upsertMessage.run()
            case .remove:
                deleteMessage.bind(1, id)
                deleteMessage.bind(2, Int64(bitPattern: seq))
                try deleteMessage.run()
            }
        }
        for (packetID, awaiting) in changes.awaiting {
            let statement = awaiting ? addAwaiting : deleteAwaiting
            statement.bind(1, id)
            statement.bind(2, Int64(packetID))
            try statement.run()
        }
    }
}

/// An `mqlite.kv` key kept across restarts (`{ persist = true }`): its value, and when it expires
/// (wall-clock seconds since 1970; nil: never).
public struct StoredKV: Sendable, Equatable {
    public enum Value: Sendable, Equatable {
        case string([UInt8])
        case int(Int64)
        case double(Double)
        case bool(Bool)
    }

    public var key: [UInt8]
    public var value: Value
    public var expiresAt: Int64?

    public init(key: [UInt8], value: Value, expiresAt: Int64?) {
        self.key = key
        self.value = value
        self.expiresAt = expiresAt
    }

    /// Binds the value's type (0 string, 1 integer, 2 double, 3 boolean) and the value itself.
    func bind(to statement: SQLiteDatabase.Statement, type: Int32, value column: Int32) {
        switch value {
        case .string(let bytes):
            statement.bind(type, Int64(0))
            statement.bind(column, ByteBuffer(bytes: bytes))
        case .int(let n):
            statement.bind(type, Int64(1))
            statement.bind(column, n)
        case .double(let d):
            statement.bind(type, Int64(2))
            statement.bind(column, d)
        case .bool(let b):
            statement.bind(type, Int64(3))
            statement.bind(column, Int64(b ? 1 : 0))
        }
    }

    static func loadAll(from db: SQLiteDatabase) throws -> [StoredKV] {
        var loaded: [StoredKV] = []
        let rows = try db.prepare("SELECT key, type, value, expires_at FROM kv")
        while try rows.step() {
            let value: Value
            switch rows.int64(1) {
            case 0: value = .string(Array(rows.bytes(2).readableBytesView))
            case 1: value = .int(rows.int64(2))
            case 2: value = .double(rows.double(2))
            case 3: value = .bool(rows.int64(2) != 0)
            default: continue
            }
            loaded.append(StoredKV(key: Array(rows.bytes(0).readableBytesView), value: value, expiresAt: rows.isNull(3) ? nil : rows.int64(3)))
        }
        return loaded
    }
}
