import CLua
import CoreMetrics
import Foundation
import MQLiteBroker
import MQTTCore
import NIOCore

typealias LuaState = OpaquePointer

/// A script that could not be loaded: its path and Lua's message (which names the line).
public struct ScriptError: Error, CustomStringConvertible, Sendable {
    public var script: String
    /// (At most `maxMessageBytes`: a script's error value may be any string, of any size.)
    public var message: String
    public var description: String { "\(script): \(message)" }
    static let maxMessageBytes = 1024

    init(script: String, message: String) {
        self.script = script
        let bytes = message.utf8.count
        self.message = bytes <= Self.maxMessageBytes
            ? message : String(decoding: message.utf8.prefix(Self.maxMessageBytes), as: UTF8.self) + "... (\(bytes) bytes)"
    }
}

/// What one script sees while it loads and runs: its own `mqlite` table and `_ENV`. The C
/// functions of the host library find it through their upvalue.
final class ScriptContext {
    /// The VM owns its contexts and outlives them (checked: a context used after its VM traps).
    unowned let vm: LuaVM
    let script: String
    /// Short name for logs (the file name).
    let name: String

    init(vm: LuaVM, script: String) {
        self.vm = vm
        self.script = script
        self.name = URL(fileURLWithPath: script).lastPathComponent
    }
}

/// One Lua 5.4 state with every configured script loaded, and the hooks they registered.
///
/// A VM belongs to one worker and is used only on that worker's event loop (hence
/// `@unchecked Sendable`: it is created on another thread and then handed over whole).
final class LuaVM: @unchecked Sendable {
    struct Hook {
        let context: ScriptContext
        let ref: Int32
        /// Its calls, failures and durations on this worker (shared with the VMs that replace
        /// this one on reload).
        let stats: HookStats
    }

    enum Kind: String, CaseIterable {
        case connect = "on_connect", authorize = "on_authorize", subscribe = "on_subscribe"
        case publish = "on_publish", connected = "on_connected", disconnected = "on_disconnected"
        case unsubscribe = "on_unsubscribe"
        /// `mqlite.every` and `mqlite.after` (not hooks, but called and failing as they do).
        case timer = "timer"
        case deliver = "on_deliver"
        case auth = "on_auth"

        var slot: Int {
            switch self {
            case .connect: 0
            case .authorize: 1
            case .subscribe: 2
            case .publish: 3
            case .connected: 4
            case .disconnected: 5
            case .unsubscribe: 6
            case .timer: 7
            case .deliver: 8
            case .auth: 9
            }
        }
    }

    /// Field names of the hot on_publish tables, interned once and kept at the bottom of the
    /// VM's stack (slots 1...6, never popped; `Repeating` strings follow), so that pushing one
    /// is a copy of a stack slot.
    enum Field: Int, CaseIterable {
        case clientID, username, topic, payload, qos, retain

        var name: String {
            switch self {
            case .clientID: "client_id"
            case .username: "username"
            case .topic: "topic"
            case .payload: "payload"
            case .qos: "qos"
            case .retain: "retain"
            }
        }
    }

    let L: LuaState
    let worker: Int
    /// The host owns its VMs and outlives them (checked: a VM used after its host traps).
    unowned let host: ScriptingHost
    private var contexts: [ScriptContext] = []
    /// Registered hooks per kind (indexed by `Kind.slot`), in load order.
    private var hookLists: [[Hook]] = Array(repeating: [], count: Kind.allCases.count)
    /// on_publish filters → index into `hooks[.publish]`.
    private let publishFilters = TopicTrie<[Int: Void]>()
    /// on_deliver filters → index into `hooks[.deliver]`.
    private let deliverFilters = TopicTrie<[Int: Void]>()
    /// on_auth methods → indices into `hooks[.auth]`, in load order.
    private var authMethods: [String: [Int]] = [:]
    /// Topic → indices of the on_publish hooks that match it, in load order.
    private var publishMatches: [ByteText: [Int]] = [:]
    /// The last topic asked for and its hooks: publishers send runs of one topic.
    private var lastTopic = ""
    private var lastMatches: [Int] = []
    /// Set while a script's main chunk runs: hooks may be registered only then.
    var loading: ScriptContext?
    /// Set while a hook or timer runs (`call`).
    private var inCall = false
    var isCalling: Bool { inCall }

    /// A function `mqlite.every` (repeating) or `mqlite.after` registered.
    struct Timer {
        let hook: Hook
        let interval: TimeAmount
        let repeats: Bool
    }
    /// Timers, in load order; only worker 0's VM runs them (`ScriptingHost`).
    private(set) var timers: [Timer] = []
    /// Most timers one VM may register (a script registering them in a loop is a mistake).
    static let maxTimers = 1000

    private static let matchCacheLimit = 10_000
    /// Bytes the match cache may hold, counted by `matchCost`.
    static let matchCacheByteLimit = 1 << 20
    private var publishMatchBytes = 0

    /// The state's budgets (memory, instructions) and its link to the watchdog (time). Allocated
    /// here and freed after `lua_close`, since the state's allocator uses it to the end.
    let control: UnsafeMutablePointer<mqlite_control>

    init(worker: Int, host: ScriptingHost) throws(ScriptError) {
        let control = UnsafeMutablePointer<mqlite_control>.allocate(capacity: 1)
        guard let state = mqlite_newstate(control, host.scripting.memoryLimit, Int64(host.scripting.instructionLimit)) else {
            control.deallocate()
            throw ScriptError(script: "-", message: "cannot create a Lua state")
        }
        self.control = control
        self.L = state
        self.worker = worker
        self.host = host
        LuaWatchdog.shared.register(control, owner: ObjectIdentifier(host), timeLimit: host.scripting.timeLimit)
        mqlite_gc_generational(state)
        for field in Field.allCases {
            L.push(field.name)
            precondition(lua_gettop(L) == Int32(field.rawValue + 1))
        }
        for _ in Repeating.allCases { L.push("") }
        openSafeLibraries()
        for plugin in host.plugins {
            try load(plugin)
        }
    }

    deinit {
        LuaWatchdog.shared.unregister(control)
        lua_close(L)
        control.deallocate()
    }

    // MARK: - Loading

    /// base, string, table, math, utf8, coroutine, and a few harmless parts of os; no io, no
    /// package, no debug, and no way to load code from files or bytecode.
    private func openSafeLibraries() {
        let libraries: [(String, lua_CFunction)] = [
            ("_G", luaopen_base), ("string", luaopen_string), ("table", luaopen_table), ("math", luaopen_math),
            ("utf8", luaopen_utf8), ("coroutine", luaopen_coroutine), ("os", luaopen_os),
        ]
        for (name, open) in libraries {
            luaL_requiref(L, name, open, 1)
            mqlite_pop(L, 1)
        }
        for name in ["dofile", "loadfile", "load", "require"] {
            lua_pushnil(L)
            lua_setglobal(L, name)
        }
        // Pattern functions with a bounded worst case, and no finalizers (see shim.h).
        lua_getglobal(L, "string")
        mqlite_bound_patterns(L, -1)
        mqlite_pop(L, 1)
        mqlite_guard_setmetatable(L)
        mqlite_guard_coroutines(L)
        mqlite_guard_xpcall(L)
        // A full collection is one instruction: the time limit is checked after it.
        mqlite_guard_collectgarbage(L)
        lua_getglobal(L, "os")
        for name in ["execute", "exit", "remove", "rename", "tmpname", "getenv", "setlocale"] {
            lua_pushnil(L)
            lua_setfield(L, -2, name)
        }
        mqlite_pop(L, 1)
    }

    /// Largest script loaded.
    static let maxScriptBytes = 16 << 20

    private func load(_ plugin: PluginConfiguration) throws(ScriptError) {
        let context = ScriptContext(vm: self, script: plugin.script)
        contexts.append(context)
        let base = lua_gettop(L)
        defer { lua_settop(L, base) }
        // Lua shortens long chunk names in messages; the file name is enough there, since the
        // error carries the full path.
        // (A FIFO or a device named by mistake would be read for ever.)
        var info = stat()
        guard stat(plugin.script, &info) == 0 else {
            throw ScriptError(script: plugin.script, message: "cannot read the script (\(String(cString: strerror(errno))))")
        }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw ScriptError(script: plugin.script, message: "cannot read the script (not a regular file)")
        }
        guard info.st_size <= Self.maxScriptBytes else {
            throw ScriptError(script: plugin.script, message: "the script is larger than \(Self.maxScriptBytes) bytes")
        }
        guard let source = FileManager.default.contents(atPath: plugin.script) else {
            throw ScriptError(script: plugin.script, message: "cannot read the script")
        }
        let loaded = source.withUnsafeBytes { bytes in
            mqlite_loadstring(L, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count, "=" + context.name)
        }
        guard loaded == LUA_OK else {
            throw ScriptError(script: plugin.script, message: L.string(at: -1) ?? "cannot load")
        }
        // The script's own environment: its globals persist between calls and are not shared
        // with other scripts; everything standard is reached through _G.
        mqlite_newtable(L)
        do {
            try HostLibrary.push(into: L, context: context, options: plugin.options)
        } catch {
            throw ScriptError(script: plugin.script, message: "options: \(error.message)")
        }
        lua_setfield(L, -2, "mqlite")
        mqlite_newtable(L)
        // The real global table, read raw (a script loaded before may have given _G a metatable).
        lua_rawgeti(L, mqlite_registryindex(), lua_Integer(LUA_RIDX_GLOBALS))
        lua_setfield(L, -2, "__index")
        lua_setmetatable(L, -2)
        _ = lua_setupvalue(L, -2, 1)  // the chunk's _ENV

        loading = context
        defer { loading = nil }
        let status = mqlite_call(L, 0, 0)
        guard status == LUA_OK else {
            if status == LUA_ERRMEM {
                throw ScriptError(script: plugin.script, message: "not enough memory: the script needs more than scripting.memory_limit (\(host.scripting.memoryLimit) bytes)")
            }
            throw ScriptError(script: plugin.script, message: L.string(at: -1) ?? "error while loading")
        }
    }

    /// Registers the function at `index` as a hook (called from `mqlite.on_*`).
    func register(_ kind: Kind, functionAt index: Int32, filter: String?, context: ScriptContext) {
        lua_pushvalue(L, index)
        let ref = luaL_ref(L, mqlite_registryindex())
        hookLists[kind.slot].append(Hook(context: context, ref: ref, stats: host.hookStats(worker: worker, context: context, kind: kind)))
        if kind == .publish, let filter { publishFilters.insert(filter: filter, key: hookLists[kind.slot].count - 1, value: ()) }
        if kind == .deliver, let filter { deliverFilters.insert(filter: filter, key: hookLists[kind.slot].count - 1, value: ()) }
        if kind == .auth, let filter { authMethods[filter, default: []].append(hookLists[kind.slot].count - 1) }
    }

    /// Registers the function at `index` as a timer (called from `mqlite.every`/`mqlite.after`).
    func registerTimer(functionAt index: Int32, interval: TimeAmount, repeats: Bool, context: ScriptContext) {
        lua_pushvalue(L, index)
        let ref = luaL_ref(L, mqlite_registryindex())
        timers.append(Timer(
            hook: Hook(context: context, ref: ref, stats: host.hookStats(worker: worker, context: context, kind: .timer)), interval: interval,
            repeats: repeats))
    }

    /// The hooks of one kind, in load order.
    func hooks(_ kind: Kind) -> [Hook] { hookLists[kind.slot] }

    /// The on_auth hooks of an authentication method, in load order.
    func authHooks(for method: String) -> [Hook] { (authMethods[method] ?? []).map { hookLists[Kind.auth.slot][$0] } }

    /// Pushes a field name (interned at start-up).
    func pushField(_ field: Field) {
        lua_pushvalue(L, Int32(field.rawValue + 1))
    }

    /// Strings that repeat from one on_publish call to the next: the last of each is kept as a
    /// Lua string in a stack slot (after the field names), so that pushing it again is a slot
    /// copy rather than Lua hashing and interning its bytes.
    enum Repeating: Int, CaseIterable { case topic, clientID }
    private var repeated = Array(repeating: "", count: Repeating.allCases.count)

    func push(_ string: String, repeating kind: Repeating) {
        let slot = Int32(Field.allCases.count + 1 + kind.rawValue)
        // Byte for byte: a canonically equivalent string with other bytes must not reuse the slot.
        if !string.hasSameUTF8(as: repeated[kind.rawValue]) {
            L.push(string)
            lua_copy(L, -1, slot)
            repeated[kind.rawValue] = string
        } else {
            lua_pushvalue(L, slot)
        }
    }

    // MARK: - Calling

    /// A hook call in progress. It runs as a coroutine of its own, so that it can wait
    /// (`mqlite.http.request` yields it) while the worker serves everyone else, and go on later.
    /// A call that returns without waiting leaves its object and thread for the next call (most
    /// calls do not wait: the hot path allocates neither).
    final class Call {
        let thread: LuaState
        /// The thread, anchored in the registry while the call needs it.
        let threadRef: Int32
        private(set) var hook: Hook
        private(set) var kind = Kind.publish
        /// Whether it may wait (not on_deliver, which is on every subscriber's delivery path).
        private(set) var mayWait = true
        /// The connection it answers for (on_connect): its requests are cancelled if that
        /// connection goes away first (`ScriptingHost.abandoned`).
        private(set) var owner: ObjectIdentifier?
        /// Instructions left (the budget spans every part of a call that waits).
        var remaining: Int64 = 0
        private(set) var start = NIODeadline.now()
        /// Set by a function that makes the call wait, just before it yields.
        var waiting = false
        /// How the coroutine ended: the number of results on `thread`, or nil if it failed.
        var returned: Int32?
        /// Set when the call waits: run once the coroutine returns or fails (`returned`).
        var finish: (() -> Void)?

        init(thread: LuaState, threadRef: Int32, hook: Hook) {
            self.thread = thread
            self.threadRef = threadRef
            self.hook = hook
        }

        fileprivate func begin(_ hook: Hook, _ kind: Kind, mayWait: Bool, owner: ObjectIdentifier?, budget: Int64) {
            // (Most calls run the same hook as the last: no reference counting then.)
            if hook.ref != self.hook.ref || hook.stats !== self.hook.stats { self.hook = hook }
            self.kind = kind
            self.mayWait = mayWait
            self.owner = owner
            remaining = budget
            start = .now()
            waiting = false
            returned = nil
            finish = nil
        }
    }

    /// The call whose coroutine runs now (a function that waits checks that it is called from it,
    /// not from a coroutine the script made).
    private(set) var running: Call?
    /// A finished call, with its thread, kept for the next one.
    private var spareCall: Call?

    /// Calls a hook with the arguments `push` leaves on the stack; on success `read` sees the
    /// results at the top of the stack. Failures (errors, the limits, and whatever `read` rejects)
    /// are reported once and give nil. A hook that may wait (`mayWait`) and does answers later:
    /// `later` then gives the reader its results go to (so that only a call that waits keeps one).
    func call<T: Sendable>(
        _ hook: Hook, _ kind: Kind, results: Int32, mayWait: Bool = true, owner: ObjectIdentifier? = nil, push: (LuaState) -> Int32,
        read: (LuaState) throws(HookResultError) -> T, later: () -> (LuaState) throws(HookResultError) -> T
    ) -> HookAnswer<T?> {
        // One call at a time per state: a call inside another would turn the outer call's limits
        // off when it returns (the host functions defer whatever could call back into Lua).
        guard !inCall else {
            host.reportFailure(hook.context, hook: kind, message: "\(kind.rawValue) cannot run while another call of this Lua state runs")
            return .now(nil)
        }
        hook.stats.calls &+= 1
        let call: Call
        if let spare = spareCall.take() {
            call = spare
        } else {
            let thread = lua_newthread(L)!
            mqlite_mark_hook_thread(L, -1)
            call = Call(thread: thread, threadRef: luaL_ref(L, mqlite_registryindex()), hook: hook)
        }
        call.begin(hook, kind, mayWait: mayWait, owner: owner, budget: Int64(host.scripting.instructionLimit))
        lua_rawgeti(L, mqlite_registryindex(), lua_Integer(hook.ref))
        let arguments = push(L)
        lua_xmove(L, call.thread, arguments + 1)
        guard run(call, arguments: arguments) else {
            // It waits: what it returns is read when it returns.
            guard let loop = host.broker?.eventLoop(ofWorker: worker) else { return .now(nil) }
            let promise = loop.makePromise(of: T?.self)
            let read = later()
            call.finish = { [unowned self, unowned call] in
                promise.succeed(call.returned.flatMap { self.finish(call, results: $0, want: results, read: read) } ?? nil)
            }
            return .later(promise.futureResult)
        }
        return .now(call.returned.flatMap { finish(call, results: $0, want: results, read: read) } ?? nil)
    }

    /// `call`, with one reader for both cases (for hooks off the hot path).
    func call<T: Sendable>(
        _ hook: Hook, _ kind: Kind, results: Int32, owner: ObjectIdentifier? = nil, push: (LuaState) -> Int32,
        read: @escaping (LuaState) throws(HookResultError) -> T
    ) -> HookAnswer<T?> {
        call(hook, kind, results: results, owner: owner, push: push, read: read, later: { read })
    }

    /// Calls a hook that may not wait, answering at once (on_deliver).
    func callNow<T: Sendable>(
        _ hook: Hook, _ kind: Kind, results: Int32, push: (LuaState) -> Int32, read: (LuaState) throws(HookResultError) -> T
    ) -> T? {
        let answer = call(hook, kind, results: results, mayWait: false, push: push, read: read, later: {
            preconditionFailure("a call that may not wait waited")
        })
        guard case .now(let value) = answer else { return nil }
        return value
    }

    /// Reads what a returned call left on its thread (`results` values, of which the hook wants
    /// `want`, as lua_pcall would adjust them), and keeps the thread for the next call.
    private func finish<T>(_ call: Call, results: Int32, want: Int32, read: (LuaState) throws(HookResultError) -> T) -> T? {
        let base = lua_gettop(L)
        defer { lua_settop(L, base) }
        let thread = call.thread
        let moved = min(results, want)
        if results > moved { mqlite_pop(thread, results - moved) }
        lua_xmove(thread, L, moved)
        for _ in moved..<want { lua_pushnil(L) }
        lua_settop(thread, 0)
        if spareCall == nil {
            call.finish = nil
            spareCall = call
        } else {
            luaL_unref(L, mqlite_registryindex(), call.threadRef)
        }
        // Results are read with raw access only (no metamethod can run outside the call's
        // limits); `read` rejects tables that have a metatable.
        do {
            return try read(L)
        } catch {
            call.hook.stats.failures["bad_return", default: 0] &+= 1
            host.reportFailure(call.hook.context, hook: call.kind, message: error.message)
            return nil
        }
    }

    /// Goes on with a call that waited: `push` leaves the results of the function it waited in on
    /// its thread. Run on the worker's loop, outside any other call (the caller defers it there).
    func resume(_ call: Call, push: (LuaState) -> Int32) {
        precondition(!inCall, "a hook resumed inside another call")
        call.waiting = false
        let arguments = push(call.thread)
        guard run(call, arguments: arguments) else { return }  // waits again
        call.finish?()
    }

    /// Failed calls: their thread is not reused (it may hold to-be-closed variables and a dead
    /// call stack), nor cleared: clearing its stack would close those variables, running their
    /// `__close` here, outside any protected call and any limit (an error there aborted the
    /// process, a loop held the worker). It is let go as it is, for the collector.
    private func failed(_ call: Call, status: Int32) {
        let message = status == LUA_ERRMEM ? "not enough memory (scripting.memory_limit)" : call.thread.string(at: -1) ?? "error"
        let failure: String
        if status == LUA_ERRMEM {
            failure = "memory_limit"
        } else if control.pointee.exhausted != 0 && mqlite_stopping(control) == 0 {
            failure = control.pointee.remaining <= 0 ? "instruction_limit" : "time_limit"
        } else {
            failure = "error"
        }
        call.hook.stats.failures[failure, default: 0] &+= 1
        host.reportFailure(call.hook.context, hook: call.kind, message: message)
        luaL_unref(L, mqlite_registryindex(), call.threadRef)
    }

    /// Runs (or resumes) a call's coroutine with `arguments` values on top of its thread.
    /// Returns false if the call now waits; else `call.returned` tells how it ended.
    private func run(_ call: Call, arguments: Int32) -> Bool {
        running = call
        inCall = true
        defer {
            running = nil
            inCall = false
        }
        var count: Int32 = 0
        var left = call.remaining
        let status = mqlite_resume(L, call.thread, arguments, &count, &left)
        call.remaining = left
        switch status {
        case LUA_OK:
            call.returned = count
        case LUA_YIELD where call.waiting:
            return false
        case LUA_YIELD:
            // coroutine.yield() at the hook's own level, outside any coroutine the script made.
            call.thread.push("coroutine.yield outside a coroutine of the script")
            failed(call, status: LUA_ERRRUN)
        default:
            failed(call, status: status)
        }
        call.hook.stats.timer?.recordNanoseconds((NIODeadline.now() - call.start).nanoseconds)
        return true
    }

    /// Indices (in load order) of the on_publish hooks whose filter matches `topic`, cached per
    /// topic that some hook matches. The cache holds at most `matchCacheLimit` topics and
    /// `matchCacheByteLimit` bytes (topics up to 64 KiB would otherwise let 10,000 entries keep
    /// hundreds of megabytes); past either it starts over. A topic no hook matches is not kept: it
    /// costs a trie walk each time, as the broker's own route cache does for topics that go nowhere.
    func publishHooks(for topic: String) -> [Int] {
        if publishFilters.count == 0 { return [] }
        // Topics compared byte for byte, as the trie matches them.
        if topic.hasSameUTF8(as: lastTopic) { return lastMatches }
        if let cached = publishMatches[ByteText(topic)] {
            (lastTopic, lastMatches) = (topic, cached)
            return cached
        }
        var indices: [Int] = []
        publishFilters.forEachMatch(topic: topic) { index, _ in indices.append(index) }
        indices.sort()
        (lastTopic, lastMatches) = (topic, indices)
        if indices.isEmpty { return indices }
        let cost = Self.matchCost(topic: topic, indices: indices)
        if publishMatches.count >= Self.matchCacheLimit || publishMatchBytes + cost > Self.matchCacheByteLimit {
            publishMatches.removeAll(keepingCapacity: true)
            publishMatchBytes = 0
        }
        publishMatches[ByteText(topic)] = indices
        publishMatchBytes += cost
        return indices
    }

    /// Indices (in load order) of the on_deliver hooks whose filter matches `topic`. Not cached
    /// here: the broker asks once per topic for live messages (its route cache), and once per
    /// retained message sent on SUBSCRIBE.
    func deliverHooks(for topic: String) -> [Int] {
        if deliverFilters.count == 0 { return [] }
        var indices: [Int] = []
        deliverFilters.forEachMatch(topic: topic) { index, _ in indices.append(index) }
        return indices.sorted()
    }

    /// What one match-cache entry costs against `matchCacheByteLimit`: the topic's bytes, the
    /// index array and a fixed overhead.
    static func matchCost(topic: String, indices: [Int]) -> Int {
        64 + topic.utf8.count + indices.count * MemoryLayout<Int>.stride
    }

    /// The match cache's size, counted entry by entry (for tests; run on the VM's worker or while it is idle).
    var matchCacheBytes: Int {
        publishMatches.reduce(0) { $0 + Self.matchCost(topic: String($1.key.text), indices: $1.value) }
    }
}

/// Why a hook's return value was not acceptable.
struct HookResultError: Error {
    var message: String
    init(_ message: String) { self.message = message }
}

// MARK: - Reading and pushing values

extension LuaState {
    /// The bytes of the string (or number, converted in place) at `index`; valid while that
    /// value stays on the stack.
    func rawBytes(at index: Int32) -> UnsafeRawBufferPointer? {
        let type = lua_type(self, index)
        guard type == LUA_TSTRING || type == LUA_TNUMBER else { return nil }
        var length = 0
        guard let pointer = lua_tolstring(self, index, &length) else { return nil }
        return UnsafeRawBufferPointer(start: pointer, count: length)
    }

    /// The string (or number) at `index` as a Swift string.
    func string(at index: Int32) -> String? {
        rawBytes(at: index).map { String(decoding: $0, as: UTF8.self) }
    }

    /// The string at `index` if it is valid UTF-8, else nil: for topics and filters, where
    /// decoding would turn bad bytes into U+FFFD and two different byte strings into one topic.
    func text(at index: Int32) -> String? {
        rawBytes(at: index).flatMap { String(validating: $0, as: UTF8.self) }
    }

    func push(bytes: UnsafeRawBufferPointer) {
        lua_pushlstring(self, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
    }

    func push(_ string: String) {
        var copy = string
        copy.withUTF8 { push(bytes: UnsafeRawBufferPointer($0)) }
    }

    func push(_ buffer: ByteBuffer) {
        buffer.withUnsafeReadableBytes { push(bytes: $0) }
    }

    /// Pushes a config value (plugin options). Nesting deeper than `LuaJSON.maxDepth` is refused:
    /// the recursion is bounded by it, and each level makes room on the Lua stack first.
    func push(_ value: ConfigValue, depth: Int = 0) throws(HookResultError) {
        switch value {
        case .string(let s): push(s)
        case .int(let i): lua_pushinteger(self, lua_Integer(i))
        case .double(let d): lua_pushnumber(self, d)
        case .bool(let b): lua_pushboolean(self, b ? 1 : 0)
        case .array(let items):
            guard depth < LuaJSON.maxDepth else { throw HookResultError("nested deeper than \(LuaJSON.maxDepth) levels") }
            guard lua_checkstack(self, 3) != 0 else { throw HookResultError("Lua stack exhausted") }
            lua_createtable(self, Int32(clamping: items.count), 0)
            for (i, item) in items.enumerated() {
                do { try push(item, depth: depth + 1) } catch { mqlite_pop(self, 1); throw error }
                lua_rawseti(self, -2, lua_Integer(i + 1))
            }
        case .table(let fields):
            guard depth < LuaJSON.maxDepth else { throw HookResultError("nested deeper than \(LuaJSON.maxDepth) levels") }
            guard lua_checkstack(self, 3) != 0 else { throw HookResultError("Lua stack exhausted") }
            lua_createtable(self, 0, Int32(clamping: fields.count))
            for (key, item) in fields {
                push(key)
                do { try push(item, depth: depth + 1) } catch { mqlite_pop(self, 2); throw error }
                lua_rawset(self, -3)
            }
        }
    }

    /// Sets `table[key] = value` for the table on top of the stack.
    func setField(_ key: String, _ value: String?) {
        if let value { push(value) } else { lua_pushnil(self) }
        lua_setfield(self, -2, key)
    }

    func setField(_ key: String, _ value: Int) {
        lua_pushinteger(self, lua_Integer(value))
        lua_setfield(self, -2, key)
    }

    func setField(_ key: String, _ value: Bool) {
        lua_pushboolean(self, value ? 1 : 0)
        lua_setfield(self, -2, key)
    }

    func setField(_ key: String, _ value: ByteBuffer?) {
        if let value { push(value) } else { lua_pushnil(self) }
        lua_setfield(self, -2, key)
    }
}

/// Calls and failures of one script's hooks of one kind on one worker, and the timer their
/// durations go to. Counted on that worker's loop; read there when a scrape asks.
final class HookStats: @unchecked Sendable {
    /// The script's file name, and the hook (`on_publish`, ...).
    let script: String
    let hook: String
    var calls = 0
    /// By kind: `error`, `instruction_limit`, `time_limit`, `memory_limit`, `bad_return`.
    var failures: [String: Int] = [:]
    /// Set once the host is bound to a broker (whose metrics factory makes it).
    var timer: CoreMetrics.Timer?

    init(script: String, hook: String) {
        self.script = script
        self.hook = hook
    }
}

