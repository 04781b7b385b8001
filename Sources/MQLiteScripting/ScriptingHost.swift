import AsyncHTTPClient
import CLua
import CoreMetrics
import Logging
import MQLiteBroker
import MQTTCore
import NIOCore
import Synchronization

/// The Lua scripting layer as the broker sees it: `BrokerHooks` backed by one Lua VM per worker.
///
/// Each hook runs on the calling worker's loop, in that worker's VM: there is no lock around Lua.
/// Reload builds a complete new set of VMs off the loops and publishes it; each worker adopts its
/// new VM at its next hook call, so no call ever sees half-loaded scripts or hooks registered twice.
public final class ScriptingHost: BrokerHooks, @unchecked Sendable {
    let plugins: [PluginConfiguration]
    let scripting: ScriptingConfiguration
    let baseDirectory: String
    let allowAnonymous: Bool
    let logger: Logger
    let workers: Int
    /// `mqlite.kv`, shared by every VM.
    let kv: SharedKV

    private let slots: [Slot]
    private let generation = Atomic<Int>(0)
    private let pending = Mutex<[LuaVM?]>([])
    /// Set by `bind(to:)` before the broker starts. Not retained (the broker holds this host), and
    /// not weak: a weak reference would put the broker's refcounts on the slow path. Unowned,
    /// checked: the broker outlives the hooks it runs, and a use after it would trap.
    private let boundBroker = Mutex<UnownedBroker?>(nil)
    private struct UnownedBroker: Sendable {
        unowned let broker: Broker
    }

    /// The broker this host serves, once bound (read by `mqlite.publish`, off the hot path).
    var broker: Broker? { boundBroker.withLock { $0?.broker } }
    private let failures = Atomic<Int>(0)
    /// The failure log's rate limit: per script and hook, when it last logged and how many
    /// failures it has not logged since. One entry per script and hook, whatever the messages.
    private let failureLog = Mutex<[String: FailureLog]>([:])
    private struct FailureLog {
        var logged: ContinuousClock.Instant
        var suppressed: Int
    }
    static let failureLogInterval: Duration = .seconds(10)

    /// Every hook's counters, per worker, script and kind; kept across reloads (a reloaded VM's
    /// hooks count on in the same objects). The map is read under its lock; the counters in it
    /// belong to their worker's loop.
    private let stats = Mutex<[HookStatsKey: HookStats]>([:])
    private struct HookStatsKey: Hashable {
        var worker: Int
        var script: String
        var kind: String
    }
    /// The broker's metrics factory, once bound: hook durations are recorded through it.
    private let metricsFactory = Mutex<(any MetricsFactory)?>(nil)

    /// A worker's current VM; touched only on that worker's loop (after creation).
    private final class Slot {
        var vm: LuaVM?
        var generation = 0
        /// Hook calls of this worker waiting on an HTTP request (whatever VM they run in).
        var waiting = 0
        /// Requests of on_connect calls, by connection: cancelled if it goes away first.
        var owned: [ObjectIdentifier: [ObjectIdentifier: @Sendable () -> Void]] = [:]
    }

    // MARK: - Hook calls that wait

    /// The scripts' HTTP clients, one per worker, on that worker's event loop alone (its own
    /// connection pool: one worker's stuck requests cannot hold another's): made at the worker's
    /// first `mqlite.http.request`, shut down with the broker (`shutdown`).
    private let http = Mutex<(clients: [Int: HTTPClient], stopped: Bool)>(([:], false))

    func httpClient(worker: Int) -> HTTPClient? {
        guard let loop = broker?.eventLoop(ofWorker: worker) else { return nil }
        return http.withLock { state in
            if state.stopped { return nil }
            if let client = state.clients[worker] { return client }
            var configuration = HTTPClient.Configuration(redirectConfiguration: .disallow, timeout: .init(connect: .seconds(10)))
            // `http_connections` per host, not AHC's 8 (an auth service answering in 100 ms would
            // serve 80 CONNECTs a second), nor one per waiting call: the pool's bookkeeping costs
            // in proportion to its connections on every connection event, and a storm of a
            // thousand new connections held a worker for a quarter of a second at a time.
            configuration.connectionPool = .init(
                idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: min(scripting.httpConnections, scripting.maxPendingCalls))
            // A service that refuses connections fails the requests at once (the hooks' on_error
            // applies), rather than each waiting out its timeout while the pool retries.
            configuration.connectionPool.retryConnectionEstablishment = false
            let client = HTTPClient(eventLoopGroup: loop, configuration: configuration, backgroundActivityLogger: logger)
            state.clients[worker] = client
            return client
        }
    }

    /// Counts a call that starts to wait on `worker`; false (and nothing counted) past
    /// `max_pending_calls`. On that worker's loop.
    func beginWaiting(worker: Int) -> Bool {
        let slot = slots[worker]
        guard slot.waiting < scripting.maxPendingCalls else { return false }
        slot.waiting += 1
        return true
    }

    func endWaiting(worker: Int) {
        slots[worker].waiting -= 1
    }

    /// Remembers how to cancel a request made for the connection `owner`, until `disown`.
    func own(_ id: ObjectIdentifier, owner: ObjectIdentifier, worker: Int, cancel: @escaping @Sendable () -> Void) {
        slots[worker].owned[owner, default: [:]][id] = cancel
    }

    func disown(_ id: ObjectIdentifier, owner: ObjectIdentifier, worker: Int) {
        let slot = slots[worker]
        slot.owned[owner]?[id] = nil
        if slot.owned[owner]?.isEmpty == true { slot.owned[owner] = nil }
    }

    public func abandoned(connection: ObjectIdentifier, worker: Int) {
        guard let cancels = slots[worker].owned.removeValue(forKey: connection) else { return }
        for cancel in cancels.values { cancel() }
    }

    /// Hook calls waiting on `worker` (for tests and metrics; on that worker's loop).
    public func waitingCalls(worker: Int) -> Int { slots[worker].waiting }

    /// Closes the HTTP clients (their requests still running fail, and the hooks waiting on them go
    /// on and end). After the connections have closed, before the loops stop.
    public func shutdown() async {
        let clients = http.withLock { state in
            state.stopped = true
            defer { state.clients = [:] }
            return Array(state.clients.values)
        }
        for client in clients { try? await client.shutdown() }
    }

    /// Loads every plugin of `configuration` into one VM per worker. A script that fails to load
    /// throws, naming its path, line and Lua's message.
    public init(configuration: BrokerConfiguration, logger: Logger) throws(ScriptError) {
        self.plugins = configuration.plugins
        self.scripting = configuration.scripting
        self.baseDirectory = configuration.baseDirectory
        self.allowAnonymous = configuration.allowAnonymous
        self.logger = logger
        self.workers = configuration.resolvedWorkers
        self.kv = SharedKV(maxBytes: configuration.scripting.kvMaxBytes)
        self.slots = (0..<workers).map { _ in Slot() }
        for (index, slot) in slots.enumerated() {
            slot.vm = try LuaVM(worker: index, host: self)
        }
    }

    /// Lets `mqlite.publish` reach the broker. Call before the broker starts; the broker must
    /// outlive its hooks (it does: it owns them).
    public func bind(to broker: Broker) {
        boundBroker.withLock { $0 = UnownedBroker(broker: broker) }
        // `mqlite.kv` keys set with `persist = true` are kept in the broker's store, if it has one.
        if let store = broker.store {
            let (keys, bytes) = kv.keep(in: store)
            if bytes > scripting.kvMaxBytes {
                logger.warning("mqlite.kv: the \(keys) kept keys loaded from the store hold \(bytes) bytes, past [scripting] kv_max_bytes = \(scripting.kvMaxBytes): all are kept, and kv.set of a new key or a bigger value fails until they are back under")
            }
        }
        let factory = broker.metrics.factory
        metricsFactory.withLock { $0 = factory }
        stats.withLock { stats in
            for stat in stats.values where stat.timer == nil { stat.timer = Self.makeTimer(stat, factory: factory) }
        }
        startTimers()
    }

    private static func makeTimer(_ stat: HookStats, factory: any MetricsFactory) -> CoreMetrics.Timer {
        CoreMetrics.Timer(label: BrokerMetrics.hookDurationLabel, dimensions: [("script", stat.script), ("hook", stat.hook)], factory: factory)
    }

    /// The counters of `context`'s hooks of `kind` on `worker` (made on first use).
    func hookStats(worker: Int, context: ScriptContext, kind: LuaVM.Kind) -> HookStats {
        let key = HookStatsKey(worker: worker, script: context.script, kind: kind.rawValue)
        let factory = metricsFactory.withLock { $0 }
        return stats.withLock { stats in
            if let existing = stats[key] { return existing }
            let made = HookStats(script: context.name, hook: kind.rawValue)
            if let factory { made.timer = Self.makeTimer(made, factory: factory) }
            stats[key] = made
            return made
        }
    }

    public func hookCallStats(worker: Int) -> [HookCallStats] {
        let mine = stats.withLock { stats in stats.filter { $0.key.worker == worker }.map(\.value) }
        return mine.map { HookCallStats(script: $0.script, hook: $0.hook, calls: $0.calls, failures: $0.failures) }
    }

    // MARK: - Timers

    /// The timers of worker 0's state (replaced on worker 0's loop; stopped by `stop`).
    private let timerWheel = Mutex<(wheel: TimerWheel?, stopped: Bool)>((nil, false))

    /// Schedules the timers (`mqlite.every`, `mqlite.after`) of worker 0's current state on its
    /// loop, stopping those of a state it replaces. Timers run in that one state, whatever the
    /// number of workers (every worker's state registers them; only worker 0's run).
    private func startTimers() {
        guard let loop = broker?.eventLoop(ofWorker: 0) else { return }
        loop.execute { self.scheduleTimers(on: loop) }
    }

    private func scheduleTimers(on loop: any EventLoop) {
        let wheel = vm(0).flatMap { $0.timers.isEmpty ? nil : TimerWheel(vm: $0, host: self, loop: loop) }
        let (previous, stopped) = timerWheel.withLock { state in
            defer { if !state.stopped { state.wheel = wheel } }
            return (state.wheel, state.stopped)
        }
        previous?.stop()
        if stopped { wheel?.stop() } else { wheel?.start() }
    }

    /// Whether `vm` is worker 0's running state (a reload replaces it).
    fileprivate func isTimerState(_ vm: LuaVM) -> Bool { vm === slots[0].vm }

    /// Stops every timer (shutdown).
    private func stopTimers() {
        let wheel = timerWheel.withLock { state in
            state.stopped = true
            defer { state.wheel = nil }
            return state.wheel
        }
        wheel?.stop()
    }

    /// Makes every hook call, running now or later, fail at its next check (within 1000 VM
    /// instructions, or between two start positions of a pattern search): for shutdown, so that no
    /// script keeps a worker loop busy. There is no way back.
    public func stop() {
        stopTimers()
        LuaWatchdog.shared.stopAll(owner: ObjectIdentifier(self))
    }

    /// Bytes allocated by the Lua state of `worker` (0 if it has none); for tests and logs.
    public func memoryUsed(worker: Int) -> Int {
        slots[worker].vm.map { Int(mqlite_memory_used($0.control)) } ?? 0
    }

    /// Bytes held by the on_publish match cache of `worker`'s Lua state (topics, index arrays and
    /// a fixed overhead per entry); for tests. Read it while that worker runs no hook.
    public func publishMatchCacheBytes(worker: Int) -> Int {
        slots[worker].vm?.matchCacheBytes ?? 0
    }

    /// Entries of the failure log's rate limit (one per script and hook); for tests.
    public var failureLogEntries: Int { failureLog.withLock { $0.count } }

    /// Bytes held by `mqlite.kv` (keys, values and a fixed overhead per entry).
    public var kvBytes: Int { kv.bytes }

    /// Hook calls that failed (errors, instruction limit, bad return values) since start.
    public var failureCount: Int { failures.load(ordering: .relaxed) }

    /// Loads every script into fresh VMs; if all load, they replace the running ones (each worker
    /// switches at its next hook call), and every connected client's `on_authorize` runs again
    /// in them. If any fails, the running scripts stay and the error is thrown.
    public func reload() throws(ScriptError) {
        var fresh: [LuaVM?] = []
        for index in 0..<workers {
            fresh.append(try LuaVM(worker: index, host: self))
        }
        pending.withLock { $0 = fresh }
        generation.add(1, ordering: .releasing)
        logger.info("scripts reloaded (\(plugins.count) plugins)")
        // Connected clients get the access rules of the new scripts (live revocation), and the
        // old state's timers stop as the new state's start.
        broker?.reauthorizeAll()
        startTimers()
    }

    /// The VM of `worker`, switching to a reloaded one first if there is one.
    private func vm(_ worker: Int) -> LuaVM? {
        let slot = slots[worker]
        let current = generation.load(ordering: .acquiring)
        if slot.generation != current {
            if let next = pending.withLock({ vms -> LuaVM? in
                let vm = vms[worker]
                vms[worker] = nil
                return vm
            }) {
                slot.vm = next
            }
            slot.generation = current
        }
        return slot.vm
    }

    /// Logs a failed hook call (never its arguments) and counts it. At most one line per script and
    /// hook every ten seconds, whatever the message (an error may quote a payload, so keying on it
    /// would log every call); the next line says how many failures were not logged. Lua's message
    /// is cut to 512 bytes.
    func reportFailure(_ context: ScriptContext, hook: LuaVM.Kind, message: String) {
        let total = failures.add(1, ordering: .relaxed).newValue
        let key = "\(context.script)|\(hook.rawValue)"
        let now = ContinuousClock.now
        let suppressed = failureLog.withLock { log -> Int? in
            if var entry = log[key], now - entry.logged < Self.failureLogInterval {
                entry.suppressed += 1
                log[key] = entry
                return nil
            }
            let suppressed = log[key]?.suppressed ?? 0
            log[key] = FailureLog(logged: now, suppressed: 0)
            return suppressed
        }
        guard let suppressed else { return }
        var metadata: Logger.Metadata = [
            "script": "\(context.name)", "hook": "\(hook.rawValue)", "error": "\(LogText(message, limit: 512))", "failures": "\(total)",
        ]
        if suppressed > 0 { metadata["suppressed"] = "\(suppressed)" }
        logger.warning("Lua hook failed", metadata: metadata)
    }

    private var failClosed: Bool { scripting.onError == .deny }

    // MARK: - BrokerHooks

    /// Calls the hooks `items` name in order (`call`), until `decide` makes a result of an
    /// answer (nil: ask the next one), else `otherwise`. A hook that waits (a script's HTTP call)
    /// makes the rest of the chain wait with it: the result comes later, on the worker's loop.
    private func chain<Item, A: Sendable, R: Sendable>(
        _ items: [Item], from first: Int = 0, call: @escaping (Item) -> HookAnswer<A?>, decide: @escaping (Item, A?) -> R?,
        otherwise: @escaping () -> R
    ) -> HookAnswer<R> {
        var index = first
        while index < items.count {
            let item = items[index]
            index += 1
            switch call(item) {
            case .now(let answer):
                if let result = decide(item, answer) { return .now(result) }
            case .later(let future):
                return .later(chain(after: future, of: item, items, from: index, call: call, decide: decide, otherwise: otherwise))
            }
        }
        return .now(otherwise())
    }

    /// The rest of a chain whose hook `item` waits on `future`: its answer, then the hooks from `first`.
    private func chain<Item, A: Sendable, R: Sendable>(
        after future: EventLoopFuture<A?>, of item: Item, _ items: [Item], from first: Int, call: @escaping (Item) -> HookAnswer<A?>,
        decide: @escaping (Item, A?) -> R?, otherwise: @escaping () -> R
    ) -> EventLoopFuture<R> {
        let loop = future.eventLoop
        return future.assumeIsolated().flatMap { answer -> EventLoopFuture<R> in
            if let result = decide(item, answer) { return loop.makeSucceededFuture(result) }
            switch self.chain(items, from: first, call: call, decide: decide, otherwise: otherwise) {
            case .now(let result): return loop.makeSucceededFuture(result)
            case .later(let rest): return rest
            }
        }.nonisolated()
    }

    public func authenticate(_ request: ConnectRequest, worker: Int) -> HookAnswer<ConnectDecision> {
        guard let vm = vm(worker) else { return .now(.pass) }
        return chain(vm.hooks(.connect), call: { hook in
            vm.call(hook, .connect, results: 3, owner: request.connection, push: { L in
                lua_createtable(L, 0, 10)
                L.setField("protocol_version", Int(request.protocolVersion))
                if request.protocolVersion == 5 {
                    lua_createtable(L, 0, 1)
                    pushUserProperties(L, request.userProperties)
                    lua_setfield(L, -2, "properties")
                }
                L.setField("client_id", request.clientID)
                L.setField("username", request.username)
                L.setField("password", request.password)
                L.setField("address", request.address)
                L.setField("clean_session", request.cleanSession)
                L.setField("keep_alive", Int(request.keepAlive))
                L.setField("listener", request.listener)
                if let tls = request.tls { pushTLS(L, tls) }
                return 1
            }, read: { L throws(HookResultError) -> ConnectDecision in
                switch lua_type(L, -3) {
                case LUA_TNIL: return .pass
                case LUA_TBOOLEAN:
                    if lua_toboolean(L, -3) != 0 { return .accept }
                    let reason = try readReasonString(L, -1, "on_connect's reason string")
                    if lua_type(L, -2) == LUA_TNIL { return reason.map { .refuseWithReason(.notAuthorized, $0) } ?? .refuse(.notAuthorized) }
                    var isInteger: Int32 = 0
                    let code = lua_tointegerx(L, -2, &isInteger)
                    // 1 to 5 (3.1.1's return codes), or an MQTT 5 CONNACK reason code from 0x80.
                    if isInteger != 0, (1...5).contains(code), let rc = ConnectReturnCode(rawValue: UInt8(code)) {
                        return reason.map { .refuseWithReason(rc.reasonCode, $0) } ?? .refuse(rc)
                    }
                    guard isInteger != 0, (0x80...0xFF).contains(code), let rc = ReasonCode(rawValue: UInt8(code)), rc.isAllowed(in: .connack) else {
                        throw HookResultError("on_connect's second result must be a CONNACK code from 1 to 5 or an MQTT 5 CONNACK reason code from 0x80")
                    }
                    return .refuseWithReason(rc, reason)
                default:
                    throw HookResultError("on_connect must return true, false or nil, not a \(typeName(L, -3))")
                }
            })
        }, decide: { [failClosed] _, answer in
            guard let answer else { return failClosed ? .refuse(.notAuthorized) : nil }
            return answer == .pass ? nil : answer
        }, otherwise: { .pass })
    }

    public func authenticatesClients(worker: Int) -> Bool {
        vm(worker).map { !$0.hooks(.connect).isEmpty } ?? false
    }

    public func handlesAuthentication(method: String, worker: Int) -> Bool {
        guard let vm = vm(worker) else { return false }
        return !vm.authHooks(for: method).isEmpty
    }

    /// on_auth hooks of the request's method, in load order: the first that answers decides; a
    /// failed call, or none answering, refuses.
    public func authenticate(_ request: AuthRequest, worker: Int) -> HookAnswer<AuthDecision> {
        guard let vm = vm(worker) else { return .now(.failure(.badAuthenticationMethod, nil)) }
        return chain(vm.authHooks(for: request.method), call: { hook in
            vm.call(hook, .auth, results: 3, owner: request.connection, push: { L in
                lua_createtable(L, 0, 10)
                L.setField("client_id", request.clientID)
                L.setField("username", request.username)
                L.setField("address", request.address)
                L.setField("listener", request.listener)
                L.setField("method", request.method)
                L.setField("data", request.data)
                L.setField("step", request.step)
                L.setField("reauthenticating", request.reauthenticating)
                L.setField("state", request.state)
                return 1
            }, read: { L throws(HookResultError) -> AuthDecision? in try readAuthResult(L) })
        }, decide: { _, answer -> AuthDecision? in
            guard let answer else { return .failure(.notAuthorized, nil) }
            return answer
        }, otherwise: { .failure(.notAuthorized, nil) })
    }

    /// What one on_authorize call gave.
    private enum AuthorizeResult: Sendable {
        case none
        case table(ACLTable)
        /// Not a table or nil, an unknown key, a wrong type, an invalid filter, a metatable.
        case malformed(String)
    }

    private final class Tables: @unchecked Sendable {
        var tables: [ACLTable] = []
    }

    public func authorize(_ client: ClientInfo, worker: Int) -> HookAnswer<[ACLTable]> {
        guard let vm = vm(worker) else { return .now([]) }
        let gathered = Tables()  // used on the worker's loop only
        return chain(vm.hooks(.authorize), call: { hook in
            vm.call(hook, .authorize, results: 1, push: { L in
                pushClient(L, client)
                return 1
            }, read: { L throws(HookResultError) -> AuthorizeResult in
                do throws(HookResultError) {
                    switch lua_type(L, -1) {
                    case LUA_TNIL: return .none
                    case LUA_TTABLE: return .table(try readACL(L))
                    default: throw HookResultError("on_authorize must return a table or nil, not a \(typeName(L, -1))")
                    }
                } catch {
                    return .malformed(error.message)
                }
            })
        }, decide: { [failClosed] hook, answer -> [ACLTable]? in
            switch answer {
            case .table(let table)?:
                gathered.tables.append(table)
            case .malformed(let message)?:
                // A mistake in the script, not a runtime failure: it denies everything whatever
                // on_error says, so that a typo can never allow everything.
                hook.stats.failures["bad_return", default: 0] &+= 1
                self.reportFailure(hook.context, hook: .authorize, message: "\(message) (the client may do nothing)")
                gathered.tables.append(.denyAll)
            case .none?:
                break
            case nil:
                if failClosed { gathered.tables.append(.denyAll) }
            }
            return nil
        }, otherwise: { gathered.tables })
    }

    public func authorizeSubscribe(_ request: SubscribeRequest, worker: Int) -> HookAnswer<SubscribeDecision> {
        guard let vm = vm(worker) else { return .now(.allow) }
        return chain(vm.hooks(.subscribe), call: { hook in
            vm.call(hook, .subscribe, results: 1, push: { L in
                lua_createtable(L, 0, 4)
                L.setField("client_id", request.clientID)
                L.setField("username", request.username)
                L.setField("filter", request.filter)
                L.setField("qos", Int(request.qos.rawValue))
                return 1
            }, read: { L throws(HookResultError) -> SubscribeDecision? in
                switch lua_type(L, -1) {
                case LUA_TNIL: return nil
                case LUA_TBOOLEAN: return lua_toboolean(L, -1) != 0 ? .allow : .deny
                case LUA_TNUMBER:
                    return .rewrite(filter: request.filter, qos: try readQoS(L, -1, "on_subscribe's QoS"))
                case LUA_TTABLE:
                    try requirePlainTable(L, -1, "on_subscribe's result")
                    rawField(L, -1, "filter")
                    let filter = lua_type(L, -1) == LUA_TNIL ? request.filter : try readString(L, -1, "filter")
                    rawField(L, -2, "qos")
                    let qos = lua_type(L, -1) == LUA_TNIL ? request.qos : try readQoS(L, -1, "qos")
                    return .rewrite(filter: filter, qos: qos)
                default:
                    throw HookResultError("on_subscribe must return a boolean, a number, a table or nil, not a \(typeName(L, -1))")
                }
            })
        }, decide: { [failClosed] _, answer -> SubscribeDecision? in
            guard let answer else { return failClosed ? .deny : .allow }
            return answer
        }, otherwise: { .allow })
    }

    public func unsubscribed(_ request: UnsubscribeRequest, worker: Int) {
        guard let vm = vm(worker) else { return }
        // A notification: every hook is called at once; one that waits goes on by itself.
        for hook in vm.hooks(.unsubscribe) {
            _ = vm.call(hook, .unsubscribe, results: 0, push: { L in
                lua_createtable(L, 0, 4)
                L.setField("client_id", request.clientID)
                L.setField("username", request.username)
                L.setField("filter", request.filter)
                L.setField("subscribed", request.subscribed)
                return 1
            }, read: { _ in () })
        }
    }

    public var publishHookGeneration: Int { generation.load(ordering: .acquiring) }

    public func isPublishHooked(topic: TopicName, worker: Int) -> Bool {
        guard let vm = vm(worker) else { return false }
        // Asked once per topic (the broker caches the answer in its route cache).
        return !vm.publishHooks(for: topic.string).isEmpty
    }

    /// The hot path of the Lua layer (every message on a hooked topic): `chain`'s loop, written
    /// out so that a hook that answers at once costs no closure context and no call object; only
    /// one that waits builds the rest of the chain.
    public func interceptPublish(_ message: HookedMessage, from client: ClientInfo, worker: Int) -> HookAnswer<PublishDecision> {
        guard let vm = vm(worker) else { return .now(.deliver) }
        let all = vm.hooks(.publish)
        let topic = message.topic.string
        func callHook(_ index: Int) -> HookAnswer<PublishDecision??> {
            // The Lua string holding the payload: a result that hands back the same bytes keeps
            // the original buffer, uncopied.
            var payloadString: UnsafePointer<CChar>?
            return vm.call(all[index], .publish, results: 1, push: { L in
                lua_createtable(L, 0, 6)
                func set(_ field: LuaVM.Field, _ push: () -> Void) {
                    vm.pushField(field)
                    push()
                    lua_rawset(L, -3)
                }
                set(.clientID) { vm.push(client.clientID, repeating: .clientID) }
                if let username = client.username { set(.username) { L.push(username) } }
                set(.topic) { vm.push(topic, repeating: .topic) }
                set(.payload) {
                    L.push(message.payload)
                    payloadString = lua_tolstring(L, -1, nil)
                }
                set(.qos) { lua_pushinteger(L, lua_Integer(message.qos.rawValue)) }
                set(.retain) { lua_pushboolean(L, message.retain ? 1 : 0) }
                if !message.properties.isUnset { pushProperties(L, message.properties) }
                return 1
            }, read: { L throws(HookResultError) in
                try readPublishResult(L, message: message, payloadString: payloadString)
            }, later: { [payloadString] in
                { L throws(HookResultError) in try readPublishResult(L, message: message, payloadString: payloadString) }
            })
        }
        // A failed on_publish call drops the message; nil asks the next hook.
        func decide(_ index: Int, _ answer: PublishDecision??) -> PublishDecision? {
            guard let answer else { return .drop }
            return answer
        }
        let indices = vm.publishHooks(for: topic)
        for (position, index) in indices.enumerated() {
            switch callHook(index) {
            case .now(let answer):
                if let decision = decide(index, answer) { return .now(decision) }
            case .later(let future):
                return .later(chain(after: future, of: index, indices, from: position + 1, call: callHook, decide: decide, otherwise: { .deliver }))
            }
        }
        return .now(.deliver)
    }

    public func isDeliverHooked(topic: TopicName, worker: Int) -> Bool {
        guard let vm = vm(worker), !vm.hooks(.deliver).isEmpty else { return false }
        return !vm.deliverHooks(for: topic.string).isEmpty
    }

    public func interceptDelivery(_ message: HookedMessage, to client: ClientInfo, worker: Int) -> DeliveryDecision {
        guard let vm = vm(worker) else { return .deliver }
        let all = vm.hooks(.deliver)
        var current = message
        var changed = false
        for index in vm.deliverHooks(for: message.topic.string) {
            var payloadString: UnsafePointer<CChar>?
            let answer = vm.callNow(all[index], .deliver, results: 1, push: { L in
                lua_createtable(L, 0, 6)
                L.setField("client_id", client.clientID)
                L.setField("username", client.username)
                L.setField("topic", current.topic.string)
                L.push("payload")
                L.push(current.payload)
                payloadString = lua_tolstring(L, -1, nil)
                lua_rawset(L, -3)
                L.setField("qos", Int(current.qos.rawValue))
                L.setField("retain", current.retain)
                if !current.properties.isUnset { pushProperties(L, current.properties) }
                return 1
            }, read: { [current, payloadString] L throws(HookResultError) -> HookedMessage? in
                switch lua_type(L, -1) {
                case LUA_TNIL: return current
                case LUA_TBOOLEAN: return lua_toboolean(L, -1) != 0 ? current : nil
                case LUA_TTABLE:
                    try requirePlainTable(L, -1, "on_deliver's result")
                    var result = try readMessage(L, base: current, payloadString: payloadString)
                    // Only topic and payload may change per subscriber.
                    result.qos = current.qos
                    result.retain = current.retain
                    return result
                default:
                    throw HookResultError("on_deliver must return a boolean, a table or nil, not a \(typeName(L, -1))")
                }
            })
            // A failed call does not deliver to this subscriber (as a failed on_publish drops).
            guard let answer, let next = answer else { return .drop }
            if next != current { changed = true }
            current = next
        }
        return changed ? .change(current) : .deliver
    }

    public func connected(_ client: ClientInfo, worker: Int) {
        notify(.connected, client: client, reason: nil, worker: worker)
    }

    public func disconnected(_ client: ClientInfo, reason: String, worker: Int) {
        notify(.disconnected, client: client, reason: reason, worker: worker)
    }

    private func notify(_ kind: LuaVM.Kind, client: ClientInfo, reason: String?, worker: Int) {
        guard let vm = vm(worker) else { return }
        for hook in vm.hooks(kind) {
            _ = vm.call(hook, kind, results: 0, push: { L in
                pushClient(L, client)
                guard let reason else { return 1 }
                L.push(reason)
                return 2
            }, read: { _ in () })
        }
    }
}

// MARK: - Reading hook results

private func typeName(_ L: LuaState, _ index: Int32) -> String {
    String(cString: lua_typename(L, lua_type(L, index)))
}

private func pushClient(_ L: LuaState, _ client: ClientInfo) {
    lua_createtable(L, 0, 6)
    L.setField("client_id", client.clientID)
    L.setField("protocol_version", Int(client.protocolVersion))
    L.setField("username", client.username)
    L.setField("address", client.address)
    L.setField("listener", client.listener)
    if let tls = client.tls { pushTLS(L, tls) }
}

/// Sets `tls` in the table on top of the stack: `{ verified, subject, cn, sans, fingerprint,
/// not_after }`, the certificate's fields absent without one.
private func pushTLS(_ L: LuaState, _ tls: TLSClientInfo) {
    lua_createtable(L, 0, 7)
    L.setField("verified", tls.verified)
    if tls.usernameFromCertificate { L.setField("use_identity_as_username", true) }
    if let certificate = tls.certificate {
        L.setField("subject", certificate.subject)
        L.setField("cn", certificate.commonName)
        L.setField("fingerprint", certificate.fingerprint)
        L.setField("not_after", certificate.notAfter)
        lua_createtable(L, Int32(certificate.subjectAlternativeNames.count), 0)
        for (index, name) in certificate.subjectAlternativeNames.enumerated() {
            L.push(name)
            lua_rawseti(L, -2, lua_Integer(index + 1))
        }
        lua_setfield(L, -2, "sans")
    }
    lua_setfield(L, -2, "tls")
}

/// Results are plain data: a table with a metatable could run Lua code (__index, __len, __pairs,
/// __eq, __tostring, __close, ...) outside the call's limits, so it is refused as a whole. Every
/// result is read with raw access only (lua_rawget, lua_rawgeti, lua_rawlen, lua_next).
private func requirePlainTable(_ L: LuaState, _ index: Int32, _ what: String) throws(HookResultError) {
    if lua_getmetatable(L, index) != 0 {
        mqlite_pop(L, 1)
        throw HookResultError("\(what) must be a plain table, not one with a metatable")
    }
}

/// Pushes `table[key]` (raw) for the table at `index`.
private func rawField(_ L: LuaState, _ index: Int32, _ key: String) {
    let table = lua_absindex(L, index)
    L.push(key)
    lua_rawget(L, table)
}

private func readString(_ L: LuaState, _ index: Int32, _ what: String) throws(HookResultError) -> String {
    guard lua_type(L, index) == LUA_TSTRING else {
        throw HookResultError("\(what) must be a string, not a \(typeName(L, index))")
    }
    guard let string = L.text(at: index) else { throw HookResultError("\(what) must be UTF-8 text") }
    return string
}

private func readQoS(_ L: LuaState, _ index: Int32, _ what: String) throws(HookResultError) -> QoS {
    var isInteger: Int32 = 0
    let value = lua_tointegerx(L, index, &isInteger)  // (which would take "1" too)
    guard lua_type(L, index) == LUA_TNUMBER, isInteger != 0, let qos = QoS(rawValue: UInt8(clamping: value)), value >= 0 else {
        throw HookResultError("\(what) must be 0, 1 or 2")
    }
    return qos
}

/// Messages one on_publish call may return in a list.
let maxListedMessages = 1000

/// What an on_publish call returned (on top of the stack): nil asks the next hook.
private func readPublishResult(_ L: LuaState, message: HookedMessage, payloadString: UnsafePointer<CChar>?) throws(HookResultError) -> PublishDecision? {
    switch lua_type(L, -1) {
    case LUA_TNIL: return nil
    case LUA_TBOOLEAN: return lua_toboolean(L, -1) != 0 ? .deliver : .drop
    case LUA_TTABLE:
        try requirePlainTable(L, -1, "on_publish's result")
        // A list of message tables (one in, many out), or one message table.
        let count = lua_rawlen(L, -1)
        if count > 0 {
            // Each item's payload is copied out of Lua (one string in many items, many times):
            // at most `maxListedMessages` items, and their payloads within the state's budget.
            guard count <= maxListedMessages else { throw HookResultError("on_publish returned \(count) messages (at most \(maxListedMessages))") }
            let budget = mqlite_memory_limit(L)
            var bytes = 0
            var messages: [HookedMessage] = []
            for i in 1...count {
                lua_rawgeti(L, -1, lua_Integer(i))
                guard lua_type(L, -1) == LUA_TTABLE else { throw HookResultError("on_publish list item \(i) is not a table") }
                try requirePlainTable(L, -1, "on_publish list item \(i)")
                let item = try readMessage(L, base: message, payloadString: payloadString)
                bytes += item.payload.readableBytes
                guard bytes <= budget else { throw HookResultError("on_publish returned messages of more than memory_limit (\(budget)) bytes in all") }
                messages.append(item)
                mqlite_pop(L, 1)
            }
            // Only items 1...count: a key past a hole, or a named one, would be dropped unseen.
            var entries = 0
            lua_pushnil(L)
            while lua_next(L, -2) != 0 {
                mqlite_pop(L, 1)
                entries += 1
                if entries > count { mqlite_pop(L, 1); break }
            }
            guard entries == count else {
                throw HookResultError("on_publish's list holds something besides its items 1 to \(count) (a hole, or a named key)")
            }
            return .replace(messages)
        }
        return .change(try readMessage(L, base: message, payloadString: payloadString))
    default:
        throw HookResultError("on_publish must return a boolean, a table or nil, not a \(typeName(L, -1))")
    }
}

/// `{ topic=, payload=, qos=, retain= }` on top of the stack; missing fields keep `base`'s.
/// One pass over the table's entries (a returned table usually holds one or two) rather than a
/// lookup per field.
private func readMessage(_ L: LuaState, base: HookedMessage, payloadString: UnsafePointer<CChar>?) throws(HookResultError) -> HookedMessage {
    var message = base
    var changed = false  // its payload or properties
    let table = lua_gettop(L)
    lua_pushnil(L)
    while lua_next(L, table) != 0 {
        defer { mqlite_pop(L, 1) }  // the value; the key stays for lua_next
        guard lua_type(L, -2) == LUA_TSTRING, let key = L.rawBytes(at: -2) else {
            throw HookResultError("a message table's keys are names (topic, payload, ...), not a \(typeName(L, -2))")
        }
        switch key.count {
        case 5 where key.elementsEqual("topic".utf8):
            let topic = try readString(L, -1, "topic")
            do {
                message.topic = try TopicName(topic)
            } catch {
                throw HookResultError("topic \"\(topic)\" is not a valid topic name: \(error.description)")
            }
        case 7 where key.elementsEqual("payload".utf8):
            let type = lua_type(L, -1)
            guard type == LUA_TSTRING || type == LUA_TNUMBER else {
                throw HookResultError("payload must be a string, not a \(typeName(L, -1))")
            }
            // (A number is converted in its value slot; lua_next needs only the key untouched.)
            let bytes = L.rawBytes(at: -1)!
            // The same Lua string as the argument's payload keeps the original buffer. Compared
            // by content too: after a call that waited, the argument may have been collected and
            // another string made at its address.
            let same = bytes.baseAddress == UnsafeRawPointer(payloadString)
                && base.payload.withUnsafeReadableBytes {
                    $0.count == bytes.count && ($0.count == 0 || memcmp($0.baseAddress!, bytes.baseAddress!, bytes.count) == 0)
                }
            if !same { message.payload = ByteBuffer(bytes: bytes); changed = true }
        case 3 where key.elementsEqual("qos".utf8):
            message.qos = try readQoS(L, -1, "qos")
        case 6 where key.elementsEqual("retain".utf8):
            guard lua_type(L, -1) == LUA_TBOOLEAN else { throw HookResultError("retain must be a boolean, not a \(typeName(L, -1))") }
            message.retain = lua_toboolean(L, -1) != 0
        case 10 where key.elementsEqual("properties".utf8):
            message.properties = try readProperties(L, base: base.properties)
            changed = true
        case 9 where key.elementsEqual("client_id".utf8), 8 where key.elementsEqual("username".utf8):
            continue  // the argument's own, handed back (`return m`)
        default:
            // A typo (`topc`) would otherwise keep the original topic without a word.
            throw HookResultError("unknown key \"\(String(decoding: key.prefix(64), as: UTF8.self))\" in a message table (topic, payload, qos, retain, properties)")
        }
    }
    // A payload marked as UTF-8 must be (MQTT-3.3.2-6 for what a client sends).
    if changed, message.properties.payloadFormatIndicator == .utf8, !MQTTDecoder.isValidUTF8(message.payload) {
        throw HookResultError("payload_format is 1 (UTF-8) but the payload is not well-formed UTF-8")
    }
    return message
}

// MARK: - MQTT 5 properties

/// on_auth's results (the three on top of the stack): `true[, data]`, `"continue", data[, state]`,
/// `false[, code[, reason]]`, or nil (no opinion).
private func readAuthResult(_ L: LuaState) throws(HookResultError) -> AuthDecision? {
    func bytes(_ index: Int32, _ what: String) throws(HookResultError) -> ByteBuffer? {
        if lua_type(L, index) == LUA_TNIL { return nil }
        guard lua_type(L, index) == LUA_TSTRING, let raw = L.rawBytes(at: index), raw.count <= 65_535 else {
            throw HookResultError("on_auth's \(what) must be a string of at most 65,535 bytes")
        }
        return ByteBuffer(bytes: raw)
    }
    switch lua_type(L, -3) {
    case LUA_TNIL:
        return nil
    case LUA_TBOOLEAN where lua_toboolean(L, -3) != 0:
        return .success(try bytes(-2, "data"))
    case LUA_TBOOLEAN:
        var code = ReasonCode.notAuthorized
        if lua_type(L, -2) != LUA_TNIL {
            var isInteger: Int32 = 0
            let raw = lua_tointegerx(L, -2, &isInteger)
            guard isInteger != 0, (0x80...0xFF).contains(raw), let given = ReasonCode(rawValue: UInt8(raw)), given.isAllowed(in: .connack) else {
                throw HookResultError("on_auth's second result after false must be an MQTT 5 CONNACK reason code from 0x80")
            }
            code = given
        }
        return .failure(code, try readReasonString(L, -1, "on_auth's reason string"))
    case LUA_TSTRING where L.string(at: -3) == "continue":
        return .continue(try bytes(-2, "data"), state: try bytes(-1, "state"))
    default:
        throw HookResultError("on_auth must return true, false, \"continue\" or nil, not a \(typeName(L, -3))")
    }
}

/// Sets `user` in the table on top of the stack: a list of `{ name, value }` pairs, in order.
private func pushUserProperties(_ L: LuaState, _ properties: [UserProperty]) {
    lua_createtable(L, Int32(properties.count), 0)
    for (index, property) in properties.enumerated() {
        lua_createtable(L, 2, 0)
        L.push(property.name)
        lua_rawseti(L, -2, 1)
        L.push(property.value)
        lua_rawseti(L, -2, 2)
        lua_rawseti(L, -2, lua_Integer(index + 1))
    }
    lua_setfield(L, -2, "user")
}

/// Sets `properties` in the message table on top of the stack: what an MQTT 5 publisher sent
/// with the message (`user`, `content_type`, `response_topic`, `correlation_data`,
/// `payload_format`, `message_expiry`), only the ones it has.
private func pushProperties(_ L: LuaState, _ properties: MQTTProperties) {
    lua_createtable(L, 0, 6)
    if !properties.userProperties.isEmpty { pushUserProperties(L, properties.userProperties) }
    if let contentType = properties.contentType { L.setField("content_type", contentType) }
    if let responseTopic = properties.responseTopic { L.setField("response_topic", responseTopic) }
    if let correlationData = properties.correlationData { L.setField("correlation_data", correlationData) }
    if let format = properties.payloadFormatIndicator { L.setField("payload_format", Int(format.rawValue)) }
    if let expiry = properties.messageExpiryInterval { L.setField("message_expiry", Int(expiry)) }
    lua_setfield(L, -2, "properties")
}

/// A string an MQTT property may carry: UTF-8 (invalid sequences are an error) without U+0000.
private func readPropertyString(_ L: LuaState, _ index: Int32, _ what: String) throws(HookResultError) -> String {
    guard lua_type(L, index) == LUA_TSTRING, let bytes = L.rawBytes(at: index) else {
        throw HookResultError("\(what) must be a string, not a \(typeName(L, index))")
    }
    guard bytes.count <= 65_535, !bytes.contains(0), let string = String(validating: bytes, as: UTF8.self) else {
        throw HookResultError("\(what) must be UTF-8 text of at most 65,535 bytes without NUL")
    }
    return string
}

/// A reason string a hook gives with a refusal (nil: none), cut to 256 bytes: MQTT 5 clients
/// hear it in CONNACK or DISCONNECT.
private func readReasonString(_ L: LuaState, _ index: Int32, _ what: String) throws(HookResultError) -> String? {
    if lua_type(L, index) == LUA_TNIL { return nil }
    let reason = try readPropertyString(L, index, what)
    guard reason.utf8.count > 256 else { return reason }
    // Cut before a character that does not fit whole (a continuation byte is 0b10xxxxxx).
    var end = reason.utf8.index(reason.utf8.startIndex, offsetBy: 256)
    while end > reason.utf8.startIndex, reason.utf8[end] & 0xC0 == 0x80 { reason.utf8.formIndex(before: &end) }
    return String(reason.utf8[..<end])!
}

/// Most bytes the properties a hook gives a message may take, encoded: what a client could send
/// with a message of `max_packet_size`'s default (1 MiB), so that a script cannot make a
/// PUBLISH no client can take.
let maxScriptPropertiesSize = 1 << 20

/// A hook's `properties` table (on top of the stack) in place of the message's: the six kinds
/// it names are what the message carries from now on (a kind left out is removed); nil keeps
/// them as they were. The other properties (set by the broker) stay.
private func readProperties(_ L: LuaState, base: MQTTProperties) throws(HookResultError) -> MQTTProperties {
    if lua_type(L, -1) == LUA_TNIL { return base }
    guard lua_type(L, -1) == LUA_TTABLE else { throw HookResultError("properties must be a table, not a \(typeName(L, -1))") }
    try requirePlainTable(L, -1, "properties")
    var properties = base
    properties.userProperties = []
    properties.contentType = nil
    properties.responseTopic = nil
    properties.correlationData = nil
    properties.payloadFormatIndicator = nil
    let expiry = base.messageExpiryInterval
    properties.messageExpiryInterval = nil
    properties.messageExpiresAt = nil
    let table = lua_gettop(L)
    lua_pushnil(L)
    while lua_next(L, table) != 0 {
        defer { mqlite_pop(L, 1) }
        let key = lua_type(L, -2) == LUA_TSTRING ? L.string(at: -2)! : "?"
        switch key {
        case "user":
            guard lua_type(L, -1) == LUA_TTABLE else { throw HookResultError("properties.user must be a list of { name, value } pairs") }
            try requirePlainTable(L, -1, "properties.user")
            let count = lua_rawlen(L, -1)
            var user: [UserProperty] = []
            var size = 0
            for i in 0..<count {
                lua_rawgeti(L, -1, lua_Integer(i + 1))
                defer { mqlite_pop(L, 1) }
                guard lua_type(L, -1) == LUA_TTABLE else { throw HookResultError("properties.user[\(i + 1)] must be a { name, value } pair") }
                try requirePlainTable(L, -1, "properties.user[\(i + 1)]")
                lua_rawgeti(L, -1, 1)
                lua_rawgeti(L, -2, 2)
                defer { mqlite_pop(L, 2) }
                let pair = UserProperty(
                    name: try readPropertyString(L, -2, "properties.user[\(i + 1)][1]"),
                    value: try readPropertyString(L, -1, "properties.user[\(i + 1)][2]"))
                size += 5 + pair.name.utf8.count + pair.value.utf8.count
                guard size <= maxScriptPropertiesSize else {
                    throw HookResultError("properties.user takes more than \(maxScriptPropertiesSize) bytes")
                }
                user.append(pair)
            }
            properties.userProperties = user
        case "content_type":
            properties.contentType = try readPropertyString(L, -1, "properties.content_type")
        case "response_topic":
            let topic = try readPropertyString(L, -1, "properties.response_topic")
            guard (try? TopicName(topic)) != nil else { throw HookResultError("properties.response_topic \"\(topic)\" is not a valid topic name") }
            properties.responseTopic = topic
        case "correlation_data":
            guard lua_type(L, -1) == LUA_TSTRING, let bytes = L.rawBytes(at: -1), bytes.count <= 65_535 else {
                throw HookResultError("properties.correlation_data must be a string of at most 65,535 bytes")
            }
            properties.correlationData = ByteBuffer(bytes: bytes)
        case "payload_format":
            var isInteger: Int32 = 0
            let value = lua_tointegerx(L, -1, &isInteger)
            guard isInteger != 0, let format = PayloadFormatIndicator(rawValue: UInt8(clamping: value)), value >= 0 else {
                throw HookResultError("properties.payload_format must be 0 or 1")
            }
            properties.payloadFormatIndicator = format
        case "message_expiry":
            var isInteger: Int32 = 0
            let value = lua_tointegerx(L, -1, &isInteger)
            guard isInteger != 0, (1...Int64(UInt32.max)).contains(value) else {
                throw HookResultError("properties.message_expiry must be seconds from 1 to 4294967295")
            }
            properties.messageExpiryInterval = UInt32(value)
            // The same interval keeps the message's deadline; another starts from now.
            properties.messageExpiresAt = UInt32(value) == expiry ? base.messageExpiresAt
                : NIODeadline.now().uptimeNanoseconds + UInt64(value) * 1_000_000_000
        default:
            throw HookResultError("properties has unknown key \"\(key)\" (user, content_type, response_topic, correlation_data, payload_format, message_expiry)")
        }
    }
    guard properties.encodedLength <= maxScriptPropertiesSize else {
        throw HookResultError("properties take \(properties.encodedLength) bytes, more than \(maxScriptPropertiesSize)")
    }
    if properties.isEmpty && properties.messageExpiresAt == nil { return MQTTProperties() }
    return properties
}

/// `{ publish = {...}, subscribe = {...}, deny = {...} }` on top of the stack.
private func readACL(_ L: LuaState) throws(HookResultError) -> ACLTable {
    try requirePlainTable(L, -1, "on_authorize's table")
    func list(_ key: String) throws(HookResultError) -> [String]? {
        rawField(L, -1, key)
        defer { mqlite_pop(L, 1) }
        switch lua_type(L, -1) {
        case LUA_TNIL: return nil
        case LUA_TTABLE:
            try requirePlainTable(L, -1, key)
            var patterns: [String] = []
            let count = lua_rawlen(L, -1)
            if count > 0 {
                for i in 1...count {
                    lua_rawgeti(L, -1, lua_Integer(i))
                    let pattern = try readString(L, -1, "\(key)[\(i)]")
                    mqlite_pop(L, 1)
                    guard (try? Topic.validateFilter(pattern)) != nil else { throw HookResultError("\(key)[\(i)] \"\(pattern)\" is not a valid topic filter") }
                    patterns.append(pattern)
                }
            }
            return patterns
        default:
            throw HookResultError("\(key) must be a list of topic filters, not a \(typeName(L, -1))")
        }
    }
    // An unknown key is a mistake worth failing on: a typo must not silently allow everything.
    lua_pushnil(L)
    while lua_next(L, -2) != 0 {
        let key = lua_type(L, -2) == LUA_TSTRING ? L.string(at: -2)! : "?"
        mqlite_pop(L, 1)
        guard ["publish", "subscribe", "deny"].contains(key) else {
            mqlite_pop(L, 1)
            throw HookResultError("on_authorize table has unknown key \"\(key)\" (publish, subscribe, deny)")
        }
    }
    return ACLTable(publish: try list("publish"), subscribe: try list("subscribe"), deny: try list("deny") ?? [])
}

/// The timers of one state, on worker 0's loop, driven by one scheduled task at the earliest due
/// time. Runs back to back take at most `budget`; then the rest waits a millisecond, for the loop
/// to poll its sockets. With a NIO task per timer, NIO ran every task that came due while it
/// ran tasks before it polled: 1,000 timers whose runs each took their limit held worker 0 for
/// good. A repeating timer's next run counts from the end of the last (slow runs do not pile up);
/// a failing call is reported as a hook failure and keeps its schedule; a run that waits (an HTTP
/// call) goes on by itself, and the timer's runs are skipped until it ends.
private final class TimerWheel: @unchecked Sendable {  // (everything but `stopped` and `task` on `loop`)
    static let budget = TimeAmount.milliseconds(10)

    private weak var vm: LuaVM?
    private unowned let host: ScriptingHost
    private let loop: any EventLoop
    private let stopped = Atomic<Bool>(false)
    /// When each timer runs next; `distantFuture` for a one-off that ran.
    private var due: [NIODeadline]
    /// Whose run waits (an HTTP call).
    private var waiting: [Bool]
    private let task = Mutex<Scheduled<Void>?>(nil)
    /// Over the budget: waiting for the poll.
    private var yielding = false

    init(vm: LuaVM, host: ScriptingHost, loop: any EventLoop) {
        self.vm = vm
        self.host = host
        self.loop = loop
        let now = NIODeadline.now()
        due = vm.timers.map { now + $0.interval }
        waiting = Array(repeating: false, count: vm.timers.count)
    }

    /// On the loop.
    func start() { arm() }

    /// Any thread.
    func stop() {
        stopped.store(true, ordering: .relaxed)
        task.withLock { $0?.cancel() }
    }

    private func arm() {
        guard !stopped.load(ordering: .relaxed), !yielding, let next = due.min(), next != .distantFuture else { return }
        let scheduled = loop.scheduleTask(deadline: next) { self.fire() }
        task.withLock { $0?.cancel(); $0 = scheduled }
    }

    private func fire() {
        guard !stopped.load(ordering: .relaxed), let vm, host.isTimerState(vm) else { return }
        let start = NIODeadline.now()
        while true {
            let now = NIODeadline.now()
            guard let index = due.indices.lazy.filter({ self.due[$0] <= now }).min(by: { self.due[$0] < self.due[$1] }) else { break }
            guard now - start < Self.budget else {
                // A task due later than now: NIO polls the sockets before it (unless other tasks
                // keep it busy that long).
                yielding = true
                let scheduled = loop.scheduleTask(in: .milliseconds(1)) {
                    self.yielding = false
                    self.fire()
                }
                task.withLock { $0 = scheduled }
                return
            }
            let timer = vm.timers[index]
            due[index] = .distantFuture
            if !waiting[index], case .later(let done) = vm.call(timer.hook, .timer, results: 0, push: { _ in 0 }, read: { _ in () }) {
                waiting[index] = true
                done.hop(to: loop).assumeIsolated().whenComplete { _ in self.waiting[index] = false }
            }
            if timer.repeats { due[index] = .now() + timer.interval }
        }
        arm()
    }
}
