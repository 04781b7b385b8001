import Dispatch
import Foundation
import Logging
import MQTTCore
import NIOCore
import Synchronization

/// A store that cannot be opened: the file, and what is wrong with it.
public struct StoreOpenError: Error, CustomStringConvertible {
    public let path: String
    public let problem: String
    public var description: String { "\(path): \(problem)" }
}

/// Retained messages kept in SQLite (WAL mode), so that they survive a restart and a crash.
///
/// The broker works on the in-memory tree as always; each change is also handed to this store,
/// which a thread of its own (the writer) commits to the database, never an event loop. Changes
/// that arrive together share a transaction, and a topic changed many times before the writer
/// gets to it is written once (the pending changes are kept per topic, so they are bounded by
/// the retained messages themselves). Only retained messages reach it: a broker whose clients
/// publish no retained messages does no disk work at all.
///
/// With `sync = "full"`, an acknowledgement that promises a retained message (PUBACK, PUBREC)
/// waits for `committed(on:)`. A commit that fails (disk full) is logged and counted, and the
/// acknowledgements go out anyway: the broker keeps serving from memory, and the changes of that
/// batch are tried again a second later (with whatever changed since), until a commit succeeds.
public final class PersistentStore: Sendable {
    public let configuration: PersistenceConfiguration
    /// The retained messages: the tree the broker reads, which tells the journal of every change.
    let retained: PersistentRetainedStore
    /// What startup loaded, for its log line.
    public let loaded: (retained: Int, sessions: Int, seconds: Double)
    /// What the retained messages hold, as `max_retained_bytes` counts it.
    public var retainedBytes: Int { retained.heldBytes }
    /// Follows the persistent sessions into the journal (the broker's `SessionObserver`).
    let sessions: SessionPersister
    /// The sessions loaded, until the broker takes them (`takeLoadedSessions`).
    private let loadedSessions: Mutex<[StoredSession]>
    /// The `mqlite.kv` keys kept with `persist = true`, until the scripting layer takes them.
    private let loadedKV: Mutex<[StoredKV]>
    /// Commits that failed since start.
    public var failedCommits: Int { failures.load(ordering: .relaxed) }
    /// Commits that wrote something, since start.
    public var commits: Int { commitCount.load(ordering: .relaxed) }
    /// Changes the last commit, as the store closed, could not write (a full disk): lost. The
    /// process then exits with status 1.
    public var lostAtClose: Int { lost.load(ordering: .relaxed) }

    private let logger: Logger
    private let journal: Journal
    private let failures = Atomic<Int>(0)
    private let commitCount = Atomic<Int>(0)
    private let lost = Atomic<Int>(0)
    /// Tests: milliseconds the writer waits before each commit (a slow disk), to see what waits for
    /// it; and commits made to fail (a full disk).
    let commitDelay = Atomic<Int>(0)
    let failCommits = Atomic<Bool>(false)
    private let failureLog = Mutex((last: NIODeadline.distantPast, unlogged: 0))
    private let fileCheck = Mutex(NIODeadline.distantPast)
    /// The writer's own (only its thread reads and writes it).
    nonisolated(unsafe) private var lastVacuum = NIODeadline.now()
    private let finished = DispatchSemaphore(value: 0)

    /// The schema this build writes, and how to get there from each older version.
    static let schemaVersion: Int64 = 3
    private static let migrations: [Int64: String] = [
        0: """
            CREATE TABLE retained (
                topic BLOB PRIMARY KEY,
                payload BLOB NOT NULL,
                qos INTEGER NOT NULL,
                properties BLOB,
                expires_at INTEGER
            ) WITHOUT ROWID;
            """,
        1: """
            CREATE TABLE sessions (
                client_id BLOB PRIMARY KEY,
                expiry INTEGER,
                offline_since INTEGER,
                names BLOB
            ) WITHOUT ROWID;
            CREATE TABLE subscriptions (
                client_id BLOB NOT NULL,
                filter BLOB NOT NULL,
                qos INTEGER NOT NULL,
                options INTEGER NOT NULL,
                identifier INTEGER,
                PRIMARY KEY (client_id, filter)
            ) WITHOUT ROWID;
            CREATE TABLE session_messages (
                client_id BLOB NOT NULL,
                seq INTEGER NOT NULL,
                state INTEGER NOT NULL,
                packet_id INTEGER,
                qos INTEGER NOT NULL,
                retain INTEGER NOT NULL,
                topic BLOB,
                payload BLOB,
                properties BLOB,
                expires_at INTEGER,
                PRIMARY KEY (client_id, seq)
            ) WITHOUT ROWID;
            CREATE TABLE awaiting_pubrel (
                client_id BLOB NOT NULL,
                packet_id INTEGER NOT NULL,
                PRIMARY KEY (client_id, packet_id)
            ) WITHOUT ROWID;
            """,
        2: """
            CREATE TABLE kv (
                key BLOB PRIMARY KEY,
                type INTEGER NOT NULL,
                value,
                expires_at INTEGER
            ) WITHOUT ROWID;
            """,
    ]

    /// Opens (or makes) the store, takes it for this process alone, brings its schema up to date
    /// and loads what it holds; then starts the writer.
    public init(configuration: PersistenceConfiguration, logger: Logger) throws(StoreOpenError) {
        let started = NIODeadline.now()
        let loaded = RetainedTree<Message>()
        let opened: (db: SQLiteDatabase, count: Int, sessions: [StoredSession], kv: [StoredKV])
        do {
            opened = try Self.open(configuration, into: loaded, logger: logger)
        } catch let error as SQLiteError {
            let problem = error.code == 26 /* SQLITE_NOTADB */ ? "is not an mqlite store (not an SQLite database)"
                : error.code == 5 /* SQLITE_BUSY */ ? "is locked by another process (another mqlite on the same store?)"
                : Self.unwritable(configuration.path)
                ?? (error.code == 14 /* SQLITE_CANTOPEN */ ? "cannot open: \(error.description)" : error.description)
            throw StoreOpenError(path: configuration.path, problem: problem)
        } catch {
            throw StoreOpenError(path: configuration.path, problem: "\(error)")
        }
        self.configuration = configuration
        self.logger = logger
        self.loaded = (opened.count, opened.sessions.count, Double((NIODeadline.now() - started).nanoseconds) / 1e9)
        journal = Journal(wakesAtOnce: configuration.sync == .full)
        retained = PersistentRetainedStore(loaded, journal: journal)
        sessions = SessionPersister(journal: journal)
        loadedSessions = Mutex(opened.sessions)
        loadedKV = Mutex(opened.kv)
        let writer = Writer(db: opened.db)
        let thread = Thread { [self] in run(writer) }
        thread.name = "mqlite-store"
        thread.start()
    }

    /// Opens the database, takes it for this process alone, brings its schema up to date and
    /// loads the retained messages into `tree` (dropping what expired while the broker was down).
    private static func open(
        _ configuration: PersistenceConfiguration, into tree: RetainedTree<Message>, logger: Logger
    ) throws -> (SQLiteDatabase, Int, [StoredSession], [StoredKV]) {
        var file = stat()
        if stat(configuration.path, &file) == 0, file.st_mode & S_IFMT == S_IFREG, (1..<100).contains(file.st_size) {
            // (SQLite would take a 1-byte file for a new database and write one over it.)
            throw SQLiteError(code: 0, description: "is \(file.st_size) bytes, shorter than an SQLite database's header (truncated?): left as it is; move it away to start with an empty store")
        }
        let db = try SQLiteDatabase(path: configuration.path)
        do {
            return try load(db, configuration, into: tree, logger: logger)
        } catch {
            // Not checkpointed: SQLite would copy the `-wal` file's pages into the store, which
            // another database's WAL left beside it (a backup restored over an old store) would
            // overwrite for good.
            db.closeWithoutCheckpoint()
            throw error
        }
    }

    private static func load(
        _ db: SQLiteDatabase, _ configuration: PersistenceConfiguration, into tree: RetainedTree<Message>, logger: Logger
    ) throws -> (SQLiteDatabase, Int, [StoredSession], [StoredKV]) {
        try checkIsOurs(db, path: configuration.path)
        // Exclusive locking: the first write below takes the lock for the process's life, so that
        // a second mqlite on the same file stops at startup instead of sharing it.
        // Pages freed by deletions go back to the file system (`vacuumSoon`); only a new store can
        // take this (an older one keeps its free pages for reuse).
        try db.execute("PRAGMA locking_mode = EXCLUSIVE; PRAGMA busy_timeout = 0; PRAGMA auto_vacuum = INCREMENTAL;")
        guard try db.text("PRAGMA journal_mode = WAL") == "wal" else { throw SQLiteError(code: 0, description: "cannot use WAL mode") }
        let synchronous = switch configuration.sync { case .full: "FULL"; case .batch: "NORMAL"; case .off: "OFF" }
        // (The WAL is truncated back to 64 MiB after a checkpoint that let it grow past that.)
        try db.execute("PRAGMA synchronous = \(synchronous); PRAGMA journal_size_limit = 67108864; BEGIN IMMEDIATE;")
        let version = try db.integer("PRAGMA user_version") ?? 0
        guard version <= schemaVersion else {
            throw SQLiteError(code: 0, description: "schema version \(version) is newer than this mqlite's (\(schemaVersion)): use a newer mqlite or another path")
        }
        for from in version..<schemaVersion {
            guard let migration = migrations[from] else { throw SQLiteError(code: 0, description: "no migration from schema version \(from)") }
            try db.execute(migration)
        }
        try db.execute("PRAGMA user_version = \(schemaVersion); COMMIT;")
        let now = Int64(Date().timeIntervalSince1970)
        try db.execute("DELETE FROM retained WHERE expires_at IS NOT NULL AND expires_at <= \(now)")
        let rows = try db.prepare("SELECT topic, payload, qos, properties, expires_at FROM retained")
        var count = 0
        var skipped = 0
        while try rows.step() {
            guard let message = message(from: rows, now: now) else {
                skipped += 1
                continue
            }
            tree.set(message.topic.string, message)
            count += 1
        }
        if skipped > 0 { logger.warning("\(configuration.path): \(skipped) retained messages could not be read and were skipped") }
        skipped = 0
        let sessions = try StoredSession.loadAll(from: db, now: now, skipped: &skipped)
        if skipped > 0 { logger.warning("\(configuration.path): \(skipped) rows of sessions could not be read and were skipped") }
        try db.execute("DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= \(now)")
        let kv = try StoredKV.loadAll(from: db)
        return (db, count, sessions, kv)
    }

    /// Why this process cannot write the store, if that is why it failed (SQLite says only "disk
    /// I/O error" or "attempt to write a readonly database"): the file, or its folder, where
    /// SQLite makes the `-wal` and `-shm` files beside it.
    private static func unwritable(_ path: String) -> String? {
        let files = FileManager.default
        if files.fileExists(atPath: path), !files.isWritableFile(atPath: path) {
            return "cannot write the file (user id \(getuid()) has no write permission)"
        }
        var folder = (path as NSString).deletingLastPathComponent
        if folder.isEmpty { folder = "." }
        guard files.fileExists(atPath: folder) else { return "its folder \(folder) does not exist" }
        if !files.isWritableFile(atPath: folder) {
            return "cannot write its folder \(folder) (user id \(getuid()) has no write permission; SQLite makes the -wal and -shm files beside the store)"
        }
        return nil
    }

    /// The tables each migration makes (`migrations`), by the schema version it starts from.
    private static let tablesMade: [Int64: Set<String>] = [
        0: ["retained"], 1: ["sessions", "subscriptions", "session_messages", "awaiting_pubrel"], 2: ["kv"],
    ]

    /// Before anything is written: the file is empty, or an mqlite store of a version this one
    /// knows with the tables that version has and no others. Another program's SQLite database
    /// given as `path` by mistake is refused untouched (it was made an mqlite store, or half
    /// migrated, and switched to WAL mode).
    private static func checkIsOurs(_ db: SQLiteDatabase, path: String) throws(SQLiteError) {
        let version = try db.integer("PRAGMA user_version") ?? 0
        var tables = Set<String>()
        let rows = try db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'")
        while try rows.step() { tables.insert(rows.text(0) ?? "") }
        guard version <= schemaVersion else { return }  // (refused below, with its own message)
        let expected = (0..<max(version, 0)).reduce(into: Set<String>()) { $0.formUnion(tablesMade[$1] ?? []) }
        guard tables != expected else { return }
        let others = tables.subtracting(expected).sorted()
        let missing = expected.subtracting(tables).sorted()
        var problem = "is not an mqlite store (schema version \(version)"
        if !others.isEmpty { problem += "; tables of another program: \(others.prefix(5).joined(separator: ", "))" }
        if !missing.isEmpty { problem += "; missing tables: \(missing.joined(separator: ", "))" }
        problem += "): left as it is; give [persistence] path a file of its own"
        if FileManager.default.fileExists(atPath: path + "-wal") {
            problem += " (SQLite reads \(path)-wal beside it as part of it: if that file is another database's, move it away)"
        }
        throw SQLiteError(code: 0, description: problem)
    }

    /// A row of `retained` as a message (nil: it cannot be read).
    private static func message(from row: SQLiteDatabase.Statement, now: Int64) -> Message? {
        // (An empty payload clears a retained message: such a row is not one.)
        let payload = row.bytes(1)
        guard payload.readableBytes > 0 else { return nil }
        return StoredMessage.decode(
            topic: row.bytes(0), payload: payload, qos: row.int64(2), retain: true, properties: row.isNull(3) ? nil : row.bytes(3),
            expiresAt: row.isNull(4) ? nil : row.int64(4), now: now)
    }

    /// A future that succeeds on `loop` once what was recorded before this call is committed
    /// (or its commit failed: see the type's comment).
    func committed(on loop: any EventLoop) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: Void.self)
        journal.wait(promise)
        return promise.futureResult
    }

    /// `promise` succeeds once what was recorded before this call is committed.
    func wait(_ promise: EventLoopPromise<Void>) {
        journal.wait(promise)
    }

    /// See `Journal.hold`.
    func hold(_ count: Int) { journal.hold(count) }
    func release() { journal.release() }

    /// The sessions the store held at startup, once (the broker restores them).
    func takeLoadedSessions() -> [StoredSession] {
        loadedSessions.withLock { sessions in
            defer { sessions = [] }
            return sessions
        }
    }

    /// The `mqlite.kv` keys the store held at startup, once (the scripting layer takes them).
    public func takeLoadedKV() -> [StoredKV] {
        loadedKV.withLock { kv in
            defer { kv = [] }
            return kv
        }
    }

    /// An `mqlite.kv` key kept across restarts changed (nil: it is gone, or no longer kept).
    /// Called under the kv store's lock, so that the last change in memory is the last here.
    public func recordKV(_ key: [UInt8], _ value: StoredKV?) {
        journal.record(kv: key, value)
    }

    /// A session the broker did not restore (it expired while the broker was down): its rows go.
    func forget(session clientID: String) {
        journal.record(clientID) { $0.clear() }
    }

    /// Whether acknowledgements wait for the disk.
    var acknowledgesAfterCommit: Bool { configuration.sync == .full }

    /// Commits what is pending, stops the writer and closes the database. Idempotent.
    public func close() {
        guard journal.close() else { return }
        finished.wait()
    }

    // MARK: - The writer (its own thread)

    /// The database and its statements: made here, then used by the writer thread alone (that
    /// is what makes it Sendable).
    private final class Writer: @unchecked Sendable {
        let db: SQLiteDatabase
        var upsert: SQLiteDatabase.Statement?
        var delete: SQLiteDatabase.Statement?
        var sessions: SessionStatements?
        var upsertKV: SQLiteDatabase.Statement?
        var deleteKV: SQLiteDatabase.Statement?

        init(db: SQLiteDatabase) { self.db = db }

        func close() {
            upsert = nil
            delete = nil
            sessions = nil
            upsertKV = nil
            deleteKV = nil
            db.close()
        }

        /// Writes `batch` in one transaction; whether there was anything to write.
        func commit(_ batch: Journal.Batch) throws(SQLiteError) -> Bool {
            let changes = batch.retained
            guard !changes.isEmpty || !batch.sessions.isEmpty || !batch.kv.isEmpty else { return false }
            if upsert == nil || delete == nil || sessions == nil || upsertKV == nil || deleteKV == nil {
                let preparedUpsert = try db.prepare("INSERT OR REPLACE INTO retained (topic, payload, qos, properties, expires_at) VALUES (?, ?, ?, ?, ?)")
                delete = try db.prepare("DELETE FROM retained WHERE topic = ?")
                sessions = try SessionStatements(db)
                upsertKV = try db.prepare("INSERT OR REPLACE INTO kv (key, type, value, expires_at) VALUES (?, ?, ?, ?)")
                deleteKV = try db.prepare("DELETE FROM kv WHERE key = ?")
                upsert = preparedUpsert
            }
            try db.execute("BEGIN")
            do {
                for (topic, change) in changes {
                    switch change {
                    case .set(let payload, let qos, let properties, let expiresAt):
                        upsert!.bind(1, topic)
                        upsert!.bind(2, payload)
                        upsert!.bind(3, Int64(qos.rawValue))
                        upsert!.bind(4, properties)
                        upsert!.bind(5, expiresAt)
                        try upsert!.run()
                    case .remove:
                        delete!.bind(1, topic)
                        try delete!.run()
                    }
                }
                for (client, changes) in batch.sessions { try sessions!.write(client.id, changes) }
                for (key, stored) in batch.kv {
                    let bytes = ByteBuffer(bytes: key)
                    guard let stored else {
                        deleteKV!.bind(1, bytes)
                        try deleteKV!.run()
                        continue
                    }
                    upsertKV!.bind(1, bytes)
                    stored.bind(to: upsertKV!, type: 2, value: 3)
                    upsertKV!.bind(4, stored.expiresAt)
                    try upsertKV!.run()
                }
                try db.execute("COMMIT")
                return true
            } catch {
                upsert!.reset()
                delete!.reset()
                sessions!.reset()
                upsertKV!.reset()
                deleteKV!.reset()
                try? db.execute("ROLLBACK")
                throw error
            }
        }
    }

    private func run(_ writer: Writer) {
        let interval = configuration.flushInterval
        var retried = false
        var failedCommits = 0  // since the last commit that succeeded
        while true {
            journal.waitForHolds()
            let (changes, waiters, closing) = journal.take()
            var retry = false
            let delay = commitDelay.load(ordering: .relaxed)
            if delay > 0 { Thread.sleep(forTimeInterval: Double(delay) / 1000) }
            do throws(SQLiteError) {
                if failCommits.load(ordering: .relaxed), !changes.retained.isEmpty || !changes.sessions.isEmpty || !changes.kv.isEmpty {
                    throw SQLiteError(code: 13, description: "database or disk is full")
                }
                if try writer.commit(changes) {
                    commitCount.add(1, ordering: .relaxed)
                    if retried { journal.setFailing(false) }
                    if failedCommits > 0 {
                        logger.notice("store \(configuration.path): commits succeed again, after \(failedCommits) failed; what was kept in memory meanwhile is written")
                        failedCommits = 0
                    }
                    checkFile()
                    vacuumSoon(writer)
                }
                retried = false
            } catch {
                failedCommits += 1
                let count = changes.retained.count + changes.sessions.count + changes.kv.count
                if closing {
                    // The last chance: said whatever the rate limit, and the exit status says it too.
                    lost.store(count, ordering: .relaxed)
                    logger.error("store \(configuration.path): the last commit, as mqlite stops, failed: \(error.description); \(count) changes acknowledged while serving from memory (retained messages, sessions, kv keys) are lost")
                }
                failed(error, changes: count)
                // Kept for the next attempt (a change made since goes instead), a second later;
                // meanwhile acknowledgements do not wait for it.
                journal.requeue(changes)
                journal.setFailing(true)
                retry = !closing
                retried = true
            }
            for waiter in waiters { waiter.succeed() }
            if closing { break }
            journal.sleep(timeout: retry ? max(interval, 1) : configuration.sync == .full ? nil : interval)
        }
        try? writer.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        // Closed before `close()` returns: the next mqlite on the file may open it at once.
        writer.close()
        // Waiters that came in meanwhile: nothing more will be written.
        for waiter in journal.closed() { waiter.succeed() }
        finished.signal()
    }

    /// Every 10 s of commits: whether the file is still there (one removed while mqlite runs takes
    /// every later commit with it, into a file no one can open again).
    private func checkFile() {
        let now = NIODeadline.now()
        let due = fileCheck.withLock { last -> Bool in
            guard now - last >= .seconds(10) else { return false }
            last = now
            return true
        }
        guard due, !FileManager.default.fileExists(atPath: configuration.path) else { return }
        logger.error("store \(configuration.path) was removed while mqlite runs: what it commits now is lost when mqlite stops; restart mqlite to make a new store")
    }

    /// Once a minute of commits: up to 2,048 free pages (8 MiB) given back to the file system, so
    /// that the file shrinks after sessions and messages are gone (a step at a time: the writer is
    /// not held long).
    private func vacuumSoon(_ writer: Writer) {
        let now = NIODeadline.now()
        guard now - lastVacuum >= .seconds(60) else { return }
        lastVacuum = now
        try? writer.db.execute("PRAGMA incremental_vacuum(2048)")
    }

    /// A commit failed: counted, and logged at most once per 10 s (with the count since).
    private func failed(_ error: SQLiteError, changes: Int) {
        failures.add(1, ordering: .relaxed)
        let now = NIODeadline.now()
        let suppressed = failureLog.withLock { log -> Int? in
            guard now - log.last >= .seconds(10) else {
                log.unlogged += 1
                return nil
            }
            log.last = now
            defer { log.unlogged = 0 }
            return log.unlogged
        }
        guard let suppressed else { return }
        logger.error(
            "store \(configuration.path): a commit of \(changes) changes failed: \(error.description); serving from memory",
            metadata: suppressed > 0 ? ["suppressed": "\(suppressed)"] : [:])
    }
}

/// Changes on their way to the writer: the latest per topic (so that they are bounded by the
/// retained messages themselves, however often a topic changes), and acknowledgements waiting for
/// the next commit. Any thread records; the writer takes.
final class Journal: Sendable {
    enum Change {
        /// The retained message of a topic; `expiresAt`: wall-clock seconds since 1970.
        case set(payload: ByteBuffer, qos: QoS, properties: ByteBuffer?, expiresAt: Int64?)
        case remove
    }

    /// What one commit writes: retained topics, and sessions by client id.
    struct Batch {
        var retained: [ByteBuffer: Change] = [:]
        var sessions: [ClientIDKey: SessionChanges] = [:]
        /// `mqlite.kv` keys: the value to keep, or nil: gone.
        var kv: [[UInt8]: StoredKV?] = [:]
    }

    private struct State {
        var pending = Batch()
        var waiters: [EventLoopPromise<Void>] = []
        var writerAsleep = false
        var closing = false
        var closed = false
        /// The last commit failed: acknowledgements do not wait for the disk until one succeeds.
        var failing = false
        /// Changes recorded on one worker whose other half other workers are still recording
        /// (`hold`): the writer waits a little for them before it takes a batch.
        var holds = 0
    }

    /// Whether a change wakes the writer (`sync = "full"`); else it waits for its timer.
    private let wakesAtOnce: Bool
    private let state = Mutex(State())
    private let wake = DispatchSemaphore(value: 0)

    init(wakesAtOnce: Bool) {
        self.wakesAtOnce = wakesAtOnce
    }

    func record(_ change: Change, topic: TopicName) {
        let wakeWriter = state.withLock { state -> Bool in
            guard !state.closed else { return false }
            state.pending.retained[topic.bytes] = change
            return wakesAtOnce && takeAsleep(&state)
        }
        if wakeWriter { wake.signal() }
    }

    func record(kv key: [UInt8], _ value: StoredKV?) {
        let wakeWriter = state.withLock { state -> Bool in
            guard !state.closed else { return false }
            state.pending.kv[key] = .some(value)
            return wakesAtOnce && takeAsleep(&state)
        }
        if wakeWriter { wake.signal() }
    }

    /// Records a change of the session of `clientID` (`body` changes what is pending for it).
    func record(_ clientID: String, _ body: (inout SessionChanges) -> Void) {
        let wakeWriter = state.withLock { state -> Bool in
            guard !state.closed else { return false }
            body(&state.pending.sessions[ClientIDKey(clientID), default: SessionChanges()])
            return wakesAtOnce && takeAsleep(&state)
        }
        if wakeWriter { wake.signal() }
    }

    /// `promise` succeeds after the next commit (at once once the store is closed, or while its
    /// commits fail: see `PersistentStore`).
    func wait(_ promise: EventLoopPromise<Void>) {
        let (accepted, wakeWriter) = state.withLock { state -> (Bool, Bool) in
            guard !state.closed, !state.failing else { return (false, false) }
            state.waiters.append(promise)
            return (true, wakesAtOnce && takeAsleep(&state))
        }
        if !accepted { promise.succeed() }
        if wakeWriter { wake.signal() }
    }

    private func takeAsleep(_ state: inout State) -> Bool {
        guard state.writerAsleep else { return false }
        state.writerAsleep = false
        return true
    }

    /// The writer's next batch, and whether the store is closing (this is the last one).
    func take() -> (changes: Batch, waiters: [EventLoopPromise<Void>], closing: Bool) {
        state.withLock { state in
            defer {
                state.pending = Batch()
                state.waiters = []
            }
            return (state.pending, state.waiters, state.closing)
        }
    }

    /// A change that other workers complete is being recorded (an inbound QoS 2 id whose message
    /// they deliver): until as many `release`s, the writer waits (at most `holdWait`) before it
    /// takes a batch, so that the two halves land in one commit.
    func hold(_ count: Int) {
        state.withLock { $0.holds += count }
    }

    func release() {
        state.withLock { $0.holds -= 1 }
    }

    static let holdWait = 0.01

    /// The writer, before it takes: waits up to `holdWait` for the holds to be released.
    func waitForHolds() {
        let deadline = Date().addingTimeInterval(Self.holdWait)
        while state.withLock({ $0.holds > 0 }), Date() < deadline {
            usleep(50)
        }
    }

    /// Whether the last commit failed (`wait` then answers at once).
    func setFailing(_ failing: Bool) {
        state.withLock { $0.failing = failing }
    }

    /// Changes whose commit failed, back in line where no newer change of their topic is.
    func requeue(_ changes: Batch) {
        state.withLock { state in
            state.pending.retained.merge(changes.retained) { newer, _ in newer }
            state.pending.sessions.merge(changes.sessions) { newer, older in older.followed(by: newer) }
            state.pending.kv.merge(changes.kv) { newer, _ in newer }
        }
    }

    /// The writer waits for work: a change or a waiter (nil), or `timeout` seconds.
    func sleep(timeout: Double?) {
        guard let timeout else {
            let idle = state.withLock { state -> Bool in
                let pending = state.pending
                guard pending.retained.isEmpty, pending.sessions.isEmpty, pending.kv.isEmpty, state.waiters.isEmpty, !state.closing else { return false }
                state.writerAsleep = true
                return true
            }
            if idle { wake.wait() }
            return
        }
        _ = wake.wait(timeout: .now() + timeout)
    }

    /// Asks the writer to commit what is pending and stop; false if it was asked already.
    func close() -> Bool {
        let first = state.withLock { state -> Bool in
            defer { state.closing = true }
            return !state.closing
        }
        if first { wake.signal() }
        return first
    }

    /// The writer stopped: waiters that came since its last batch (nothing more is recorded).
    func closed() -> [EventLoopPromise<Void>] {
        state.withLock { state in
            state.closed = true
            defer { state.waiters = [] }
            return state.waiters
        }
    }
}

/// The retained tree in memory, with every change also given to the journal.
final class PersistentRetainedStore: RetainedStore {
    private let tree: TreeRetainedStore
    private let journal: Journal
    /// Held across a change to the tree and its record in the journal, so that two workers
    /// retaining on one topic at once leave the same message last in both.
    private let order = Mutex(())

    fileprivate init(_ loaded: RetainedTree<Message>, journal: Journal) {
        tree = TreeRetainedStore(loaded)
        self.journal = journal
    }

    /// `$SYS/...`: the broker's own, made again every `sys_interval`: not kept.
    private static func isSys(_ topic: TopicName) -> Bool {
        topic.bytes.readableBytesView.starts(with: "$SYS/".utf8)
    }

    func set(topic: TopicName, _ message: Message, within limits: RetainedLimits) -> RetainOutcome {
        guard !Self.isSys(topic) else { return tree.set(topic: topic, message, within: limits) }
        let (properties, expiresAt) = StoredMessage.encode(message)
        let change = Journal.Change.set(payload: message.payload, qos: message.qos, properties: properties, expiresAt: expiresAt)
        return order.withLock { _ in
            let outcome = tree.set(topic: topic, message, within: limits)
            switch outcome {
            case .kept: journal.record(change, topic: message.topic)  // (the compacted copy: not a slice of a read buffer)
            case .refused(cleared: true): journal.record(.remove, topic: message.topic)
            case .refused(cleared: false): break
            }
            return outcome
        }
    }

    func remove(topic: TopicName) {
        guard !Self.isSys(topic) else { return tree.remove(topic: topic) }
        order.withLock { _ in
            // A topic that held nothing has nothing on disk either. (Its own copy of the name:
            // the client's may be a slice of a large read buffer.)
            if tree.removed(topic: topic) { journal.record(.remove, topic: topic.copied()) }
        }
    }

    func scan(matching filter: TopicFilter) -> Scan { tree.scan(matching: filter) }
    func continueScan(_ scan: inout Scan, limit: Int) -> [Message] { tree.continueScan(&scan, limit: limit) }
    var count: Int { tree.count }
    var nodeCount: Int { tree.nodeCount }
    var heldBytes: Int { tree.heldBytes }
}

/// `[persistence] sync = "full"`: PUBACKs and PUBRECs waiting for the store's commit, and those
/// of later PUBLISHes queued behind them, so that they go out in the order their PUBLISHes came
/// (MQTT-4.6.0-2, -3) while the client's next packets are read and routed meanwhile (they join the
/// same commit instead of each waiting for one of its own). A connection's, and a bridge link's for
/// what its remote sends. Used on one event loop.
final class StoreAcks {
    /// Each acknowledgement with the ticket of the commit it waits for (0: none).
    var entries: [(ack: MQTTPacket, ticket: UInt64)] = []
    var start = 0
    /// Tickets given, and the latest whose commit came.
    var issued: UInt64 = 0
    var committed: UInt64 = 0
    /// Past this many waiting, the client's packets wait too (a disk that stalls must not let one
    /// client's acknowledgements pile up without a limit).
    static let maxWaiting: UInt64 = 1024

    var isEmpty: Bool { start == entries.count }
    var waiting: UInt64 { issued - committed }

    /// Forgets every acknowledgement (their connection went).
    func reset() {
        entries.removeAll()
        start = 0
        committed = issued
    }

    /// Queues `ack` to go after the commit that follows; returns its ticket (for `committed`).
    func wait(_ ack: MQTTPacket) -> UInt64 {
        issued += 1
        entries.append((ack, issued))
        return issued
    }

    /// Queues `ack` behind those waiting, if any wait: whether it did (else it goes now).
    func queueBehind(_ ack: MQTTPacket) -> Bool {
        guard !isEmpty else { return false }
        entries.append((ack, 0))
        return true
    }

    /// The commit `ticket` waited for came: the acknowledgements whose turn came, in order.
    func committed(_ ticket: UInt64) -> ArraySlice<(ack: MQTTPacket, ticket: UInt64)> {
        committed = max(committed, ticket)
        return takeReady()
    }

    /// The acknowledgements whose turn came, in order.
    private func takeReady() -> ArraySlice<(ack: MQTTPacket, ticket: UInt64)> {
        var end = start
        while end < entries.count, entries[end].ticket <= committed { end += 1 }
        defer {
            start = end
            if start == entries.count {
                entries.removeAll(keepingCapacity: entries.count <= 64)
                start = 0
            }
        }
        return entries[start..<end]
    }
}
