import CSQLite
import NIOCore

/// What went wrong in SQLite: its message, or one of ours.
struct SQLiteError: Error, CustomStringConvertible {
    let code: Int32
    let description: String
}

/// One SQLite connection, used by one thread at a time (the store's writer, or startup before
/// it starts): the few calls the store needs, with statements prepared once and reused.
final class SQLiteDatabase {
    private let handle: OpaquePointer

    init(path: String) throws(SQLiteError) {
        var db: OpaquePointer?
        let code = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nil)
        guard code == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? String(cString: sqlite3_errstr(code))
            sqlite3_close(db)
            throw SQLiteError(code: code, description: message)
        }
        handle = db
    }

    private var isClosed = false

    deinit {
        close()
    }

    /// Closes the connection now (its lock goes with it), once its statements are finalized.
    func close() {
        guard !isClosed else { return }
        isClosed = true
        sqlite3_close_v2(handle)
    }

    /// Closes the connection without the checkpoint SQLite makes on close: the file stays as it
    /// was found, whatever its `-wal` file holds.
    func closeWithoutCheckpoint() {
        guard !isClosed else { return }
        _ = mqlite_sqlite_no_checkpoint_on_close(handle)
        close()
    }

    private func error(_ code: Int32) -> SQLiteError {
        SQLiteError(code: code, description: String(cString: sqlite3_errmsg(handle)))
    }

    /// Runs SQL without results (several statements may be given).
    func execute(_ sql: String) throws(SQLiteError) {
        let code = sqlite3_exec(handle, sql, nil, nil, nil)
        guard code == SQLITE_OK else { throw error(code) }
    }

    func prepare(_ sql: String) throws(SQLiteError) -> Statement {
        var statement: OpaquePointer?
        let code = sqlite3_prepare_v3(handle, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &statement, nil)
        guard code == SQLITE_OK, let statement else { throw error(code) }
        return Statement(statement, database: self)
    }

    /// The first column of the first row of `sql` as an integer (a PRAGMA's answer).
    func integer(_ sql: String) throws(SQLiteError) -> Int64? {
        let statement = try prepare(sql)
        return try statement.step() ? statement.int64(0) : nil
    }

    /// The first column of the first row of `sql` as text.
    func text(_ sql: String) throws(SQLiteError) -> String? {
        let statement = try prepare(sql)
        return try statement.step() ? statement.text(0) : nil
    }

    /// A prepared statement: bind (from 1), step, read columns (from 0), reset.
    final class Statement {
        private let statement: OpaquePointer
        private let database: SQLiteDatabase

        fileprivate init(_ statement: OpaquePointer, database: SQLiteDatabase) {
            self.statement = statement
            self.database = database
        }

        deinit { sqlite3_finalize(statement) }

        func bind(_ index: Int32, _ value: Int64?) {
            if let value { sqlite3_bind_int64(statement, index, value) } else { sqlite3_bind_null(statement, index) }
        }

        func bind(_ index: Int32, _ value: Double) {
            sqlite3_bind_double(statement, index, value)
        }

        /// Binds bytes (SQLite copies them).
        func bind(_ index: Int32, _ bytes: ByteBuffer?) {
            guard let bytes else { sqlite3_bind_null(statement, index); return }
            // (An empty blob, not NULL, for no bytes.)
            guard bytes.readableBytes > 0 else { sqlite3_bind_zeroblob(statement, index, 0); return }
            bytes.withUnsafeReadableBytes { raw in
                sqlite3_bind_blob64(statement, index, raw.baseAddress, UInt64(raw.count), mqlite_sqlite_transient())
            }
        }

        /// Whether a row came (false: done).
        func step() throws(SQLiteError) -> Bool {
            let code = sqlite3_step(statement)
            if code == SQLITE_ROW { return true }
            if code == SQLITE_DONE { return false }
            throw database.error(code)
        }

        /// Runs it to the end and makes it ready again.
        func run() throws(SQLiteError) {
            defer { reset() }
            while try step() {}
        }

        func reset() {
            sqlite3_reset(statement)
            sqlite3_clear_bindings(statement)
        }

        func isNull(_ column: Int32) -> Bool { sqlite3_column_type(statement, column) == SQLITE_NULL }

        func int64(_ column: Int32) -> Int64 { sqlite3_column_int64(statement, column) }

        func double(_ column: Int32) -> Double { sqlite3_column_double(statement, column) }

        func text(_ column: Int32) -> String? {
            guard let text = sqlite3_column_text(statement, column) else { return nil }
            return String(cString: text)
        }

        func bytes(_ column: Int32) -> ByteBuffer {
            // The blob first, then its size (SQLite's order).
            let pointer = sqlite3_column_blob(statement, column)
            let count = Int(sqlite3_column_bytes(statement, column))
            guard count > 0, let pointer else { return ByteBuffer() }
            return ByteBuffer(bytes: UnsafeRawBufferPointer(start: pointer, count: count))
        }
    }
}
