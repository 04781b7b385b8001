import AsyncHTTPClient
import CLua
import Crypto
import Foundation
import Logging
import MQLiteBroker
import MQTTCore
import NIOCore
import NIOHTTP1
import NIOPosix

/// The `mqlite` table each script gets. Every function here is a C-callable Swift function run
/// through the C trampoline: it never raises a Lua error itself (that would unwind Swift frames);
/// it pushes the message and returns -1, and the trampoline raises it.
enum HostLibrary {
    typealias Function = @convention(c) (OpaquePointer?) -> Int32

    /// Pushes the `mqlite` table of one script. Throws if the options cannot be handed over
    /// (nested deeper than `LuaJSON.maxDepth`).
    static func push(into L: LuaState, context: ScriptContext, options: [String: ConfigValue]) throws(HookResultError) {
        let owner = Unmanaged.passUnretained(context).toOpaque()
        func function(_ name: String, _ fn: Function) {
            mqlite_pushfunction(L, fn, owner)
            lua_setfield(L, -2, name)
        }
        mqlite_newtable(L)
        do { try L.push(.table(options)) } catch { mqlite_pop(L, 1); throw error }
        lua_setfield(L, -2, "options")
        L.setField("config_dir", context.vm.host.baseDirectory)
        L.setField("worker", context.vm.worker)
        function("on_connect", onConnect)
        function("on_authorize", onAuthorize)
        function("on_subscribe", onSubscribe)
        function("on_publish", onPublish)
        function("on_connected", onConnected)
        function("on_disconnected", onDisconnected)
        function("on_unsubscribe", onUnsubscribe)
        function("on_deliver", onDeliver)
        function("on_auth", onAuth)
        function("every", every)
        function("after", after)
        function("log", log)
        function("publish", publish)
        function("disconnect", disconnect)
        function("reauthorize", reauthorize)
        function("topic_matches", topicMatches)
        function("time", time)
        function("sha256", sha256)
        function("hmac_sha256", hmacSHA256)
        function("check_password", checkPassword)
        function("read_file", readFile)
        mqlite_newtable(L)
        function("get", kvGet)
        function("set", kvSet)
        function("incr", kvIncr)
        function("delete", kvDelete)
        lua_setfield(L, -2, "kv")
        mqlite_newtable(L)
        function("encode", jsonEncode)
        function("decode", jsonDecode)
        lua_setfield(L, -2, "json")
        mqlite_newtable(L)
        function("request", httpRequest)
        lua_setfield(L, -2, "http")
    }

    // MARK: - Helpers

    static func context(_ L: LuaState) -> ScriptContext {
        Unmanaged<ScriptContext>.fromOpaque(mqlite_owner(L)!).takeUnretainedValue()
    }

    /// Pushes `message` for the trampoline to raise.
    static func fail(_ L: LuaState, _ message: String) -> Int32 {
        L.push(message)
        return -1
    }

    static func string(_ L: LuaState, _ index: Int32) -> String? {
        L.string(at: index)
    }

    static func bytes(_ L: LuaState, _ index: Int32) -> [UInt8]? {
        L.rawBytes(at: index).map { Array($0) }
    }

    /// Pushes `digest` as lowercase hex. Written out: `String(format:)` per byte took a fifth of
    /// a worker's time in a connect storm with `http_auth.lua` (two hashes per CONNECT).
    static func pushHex(_ L: LuaState, _ digest: some Sequence<UInt8>) {
        let digits: StaticString = "0123456789abcdef"
        var hex: [UInt8] = []
        hex.reserveCapacity(64)
        digits.withUTF8Buffer { digits in
            for byte in digest {
                hex.append(digits[Int(byte >> 4)])
                hex.append(digits[Int(byte & 0x0F)])
            }
        }
        hex.withUnsafeBytes { L.push(bytes: $0) }
    }

    // MARK: - Hook registration

    private static func register(_ L: LuaState, _ kind: LuaVM.Kind, filtered: Bool = false) -> Int32 {
        let context = context(L)
        guard context.vm.loading === context else {
            return fail(L, "mqlite.\(kind.rawValue): hooks can only be registered while the script loads")
        }
        var filter: String?
        if kind == .auth {
            guard let method = string(L, 1), !method.isEmpty, method.utf8.count <= 256 else {
                return fail(L, "mqlite.on_auth: first argument must be an authentication method name (1 to 256 bytes)")
            }
            filter = method
        } else if filtered {
            guard let f = L.text(at: 1), (try? Topic.validateFilter(f)) != nil else {
                return fail(L, "mqlite.\(kind.rawValue): first argument must be a valid topic filter")
            }
            filter = f
        }
        let functionIndex: Int32 = filter != nil ? 2 : 1
        guard lua_type(L, functionIndex) == LUA_TFUNCTION else {
            return fail(L, "mqlite.\(kind.rawValue): expects a function")
        }
        context.vm.register(kind, functionAt: functionIndex, filter: filter, context: context)
        return 0
    }

    static let onConnect: Function = { L in register(L!, .connect) }
    static let onAuthorize: Function = { L in register(L!, .authorize) }
    static let onSubscribe: Function = { L in register(L!, .subscribe) }
    static let onPublish: Function = { L in register(L!, .publish, filtered: true) }
    static let onConnected: Function = { L in register(L!, .connected) }
    static let onDisconnected: Function = { L in register(L!, .disconnected) }
    static let onUnsubscribe: Function = { L in register(L!, .unsubscribe) }
    static let onDeliver: Function = { L in register(L!, .deliver, filtered: true) }
    static let onAuth: Function = { L in register(L!, .auth) }

    /// `mqlite.every(seconds, fn)` and `mqlite.after(seconds, fn)`: registered while the script
    /// loads, run on worker 0's state (`ScriptingHost.startTimers`).
    private static func registerTimer(_ L: LuaState, repeats: Bool) -> Int32 {
        let name = repeats ? "mqlite.every" : "mqlite.after"
        let context = context(L)
        guard context.vm.loading === context else { return fail(L, "\(name): timers can only be registered while the script loads") }
        var isNumber: Int32 = 0
        let seconds = lua_tonumberx(L, 1, &isNumber)
        guard isNumber != 0, seconds >= 0.01, seconds <= 31_536_000 else {
            return fail(L, "\(name)(seconds, function): seconds must be a number from 0.01 to 31536000")
        }
        guard lua_type(L, 2) == LUA_TFUNCTION else { return fail(L, "\(name)(seconds, function): expects a function") }
        guard context.vm.timers.count < LuaVM.maxTimers else { return fail(L, "\(name): more than \(LuaVM.maxTimers) timers") }
        context.vm.registerTimer(functionAt: 2, interval: .nanoseconds(Int64(seconds * 1e9)), repeats: repeats, context: context)
        return 0
    }

    static let every: Function = { L in registerTimer(L!, repeats: true) }
    static let after: Function = { L in registerTimer(L!, repeats: false) }

    // MARK: - Functions

    /// `mqlite.log(level, message)`; level is "debug", "info", "warning" or "error". The message is
    /// logged up to 4 KB (marked with its full size when longer).
    static let log: Function = { L in
        let L = L!
        guard let level = string(L, 1), let message = string(L, 2) else { return fail(L, "mqlite.log(level, message)") }
        let levels: [String: Logger.Level] = ["trace": .trace, "debug": .debug, "info": .info, "notice": .notice, "warning": .warning, "error": .error]
        guard let parsed = levels[level] else { return fail(L, "mqlite.log: unknown level \"\(level)\"") }
        let ctx = context(L)
        // The script's own text, which may quote what clients send: cut to 4 KB.
        ctx.vm.host.logger.log(level: parsed, "\(LogText(message, limit: 4096))", metadata: ["script": "\(ctx.name)"])
        return 0
    }

    // MARK: - HTTP

    /// Largest response body `mqlite.http.request` reads unless the call asks for more
    /// (`max_body`, up to `httpMaxBody`); a larger one fails the request. Every waiting call may
    /// hold that much: `max_pending_calls` x this per worker at worst.
    static let httpDefaultMaxBody = 64 << 10
    static let httpMaxBody = 1 << 20
    static let httpMethods: Set<String> = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    static let httpTimeouts = 0.001...300.0

    /// `mqlite.http.request{ url=, method=, headers=, body=, timeout=, max_body= }` → `status, body,
    /// headers`, or `nil, message` (connection refused, timeout, a body over `max_body`, too many
    /// calls waiting, cancelled).
    /// The hook that calls it waits for the answer, as a coroutine; the worker serves everyone
    /// else meanwhile (`LuaVM.Call`). Errors in the arguments raise Lua errors.
    static let httpRequest: Function = { L in
        let L = L!
        let ctx = context(L)
        let vm = ctx.vm
        guard let call = vm.running, call.thread == L, call.mayWait, lua_isyieldable(L) != 0 else {
            return fail(L, "mqlite.http.request: only in a hook (not on_deliver) or a timer, outside coroutines the script makes and callbacks of C functions (string.gsub, table.sort)")
        }
        guard lua_type(L, 1) == LUA_TTABLE else { return fail(L, "mqlite.http.request{ url=, method=, headers=, body=, timeout=, max_body= }") }
        func field(_ name: String) -> Int32 {
            L.push(name)
            return lua_rawget(L, 1)
        }
        // Checked here, not left to the HTTP library: a port past 65535 traps in it, and a URL
        // is often built from what a client sent.
        guard field("url") == LUA_TSTRING, let url = string(L, -1), let parts = URLComponents(string: url),
            parts.scheme == "http" || parts.scheme == "https", let hostName = parts.host, !hostName.isEmpty,
            (parts.port.map { (1...65535).contains($0) } ?? (parts.rangeOfPort == nil))  // a port too big for an Int is none
        else {
            return fail(L, "mqlite.http.request: url must be an http:// or https:// URL with a host (and a port from 1 to 65535)")
        }
        var method = "GET"
        if field("method") != LUA_TNIL {
            guard let m = string(L, -1), httpMethods.contains(m) else {
                return fail(L, "mqlite.http.request: method must be one of \(httpMethods.sorted().joined(separator: ", "))")
            }
            method = m
        }
        var headers = HTTPHeaders()
        switch field("headers") {
        case LUA_TNIL: break
        case LUA_TTABLE:
            let table = lua_gettop(L)
            lua_pushnil(L)
            while lua_next(L, table) != 0 {
                guard lua_type(L, -2) == LUA_TSTRING, lua_type(L, -1) == LUA_TSTRING, let name = string(L, -2), let value = string(L, -1) else {
                    return fail(L, "mqlite.http.request: headers must map strings to strings")
                }
                headers.add(name: name, value: value)
                mqlite_pop(L, 1)
            }
        default:
            return fail(L, "mqlite.http.request: headers must be a table")
        }
        var body: ByteBuffer?
        switch field("body") {
        case LUA_TNIL: break
        case LUA_TSTRING: body = ByteBuffer(bytes: L.rawBytes(at: -1)!)
        default: return fail(L, "mqlite.http.request: body must be a string")
        }
        var maxBody = httpDefaultMaxBody
        if field("max_body") != LUA_TNIL {
            var isInteger: Int32 = 0
            let value = lua_tointegerx(L, -1, &isInteger)
            guard isInteger != 0, (0...lua_Integer(httpMaxBody)).contains(value) else {
                return fail(L, "mqlite.http.request: max_body must be a number of bytes from 0 to \(httpMaxBody)")
            }
            maxBody = Int(value)
        }
        var timeout = 5.0
        if field("timeout") != LUA_TNIL {
            var isNumber: Int32 = 0
            timeout = lua_tonumberx(L, -1, &isNumber)
            guard isNumber != 0, httpTimeouts.contains(timeout) else {
                return fail(L, "mqlite.http.request: timeout must be a number of seconds from 0.001 to 300")
            }
        }
        let request: HTTPClient.Request
        do {
            request = try HTTPClient.Request(url: url, method: HTTPMethod(rawValue: method), headers: headers, body: body.map { .byteBuffer($0) })
        } catch {
            return fail(L, "mqlite.http.request: \(error)")
        }
        let host = vm.host
        guard let loop = host.broker?.eventLoop(ofWorker: vm.worker), let client = host.httpClient(worker: vm.worker) else {
            lua_pushnil(L)
            L.push("mqlite.http.request: not available (the broker is not running)")
            return 2
        }
        // Calls already waiting on this worker: past http_connections, this request may wait for
        // a connection (its timeout running), which a timeout's message then says.
        let ahead = host.waitingCalls(worker: vm.worker)
        guard host.beginWaiting(worker: vm.worker) else {
            lua_pushnil(L)
            L.push("mqlite.http.request: too many hook calls waiting (scripting.max_pending_calls = \(host.scripting.maxPendingCalls))")
            return 2
        }
        let task = client.execute(
            request: request, delegate: ResponseAccumulator(request: request, maxBodySize: maxBody),
            eventLoop: .delegate(on: loop), deadline: .now() + .nanoseconds(Int64(timeout * 1e9)), logger: nil)
        call.waiting = true
        let id = ObjectIdentifier(task)
        if let owner = call.owner { host.own(id, owner: owner, worker: vm.worker, cancel: { task.cancel() }) }
        let waiting = NIOLoopBound((vm, call), eventLoop: loop)
        task.futureResult.whenComplete { result in
            let resume: @Sendable () -> Void = {
                let (vm, call) = waiting.value
                vm.host.endWaiting(worker: vm.worker)
                if let owner = call.owner { vm.host.disown(id, owner: owner, worker: vm.worker) }
                let queued = ahead >= vm.host.scripting.httpConnections
                vm.resume(call) { T in pushHTTPResult(T, result, queuedBehind: queued ? ahead : nil, connections: vm.host.scripting.httpConnections) }
            }
            // In a storm of answers, a later tick takes it (`Broker.runPaced`).
            let paced: @Sendable () -> Void = {
                let vm = waiting.value.0
                guard let broker = vm.host.broker else { return resume() }
                broker.runPaced(onWorker: vm.worker, resume)
            }
            // On the worker's loop (the task's futures are), but never inside a running call (a
            // request that fails at once completes before this call has yielded).
            if loop.inEventLoop, !waiting.value.0.isCalling { paced() } else { loop.execute(paced) }
        }
        return MQLITE_YIELD
    }

    /// `status, body, headers` (names in lower case; repeated ones joined with ", "), or
    /// `nil, message`.
    private static func pushHTTPResult(
        _ L: LuaState, _ result: Result<HTTPClient.Response, any Error>, queuedBehind: Int?, connections: Int
    ) -> Int32 {
        switch result {
        case .success(let response):
            lua_pushinteger(L, lua_Integer(response.status.code))
            if let body = response.body { L.push(body) } else { L.push("") }
            var merged: [String: String] = [:]
            for (name, value) in response.headers {
                let key = name.lowercased()
                merged[key] = merged[key].map { $0 + ", " + value } ?? value
            }
            lua_createtable(L, 0, Int32(clamping: merged.count))
            for (name, value) in merged { L.setField(name, value) }
            return 3
        case .failure(let error):
            lua_pushnil(L)
            let message: String
            switch error {
            case let e as HTTPClientError where e == .deadlineExceeded || e == .readTimeout || e == .connectTimeout:
                message = queuedBehind.map {
                    "timeout (it came behind \($0) waiting calls on this worker, which opens at most [scripting] http_connections = \(connections) connections to a host: a slow service may need more)"
                } ?? "timeout"
            case let e as HTTPClientError where e == .cancelled: message = "cancelled (the client went away, or the broker is stopping)"
            case let e as ResponseAccumulator.ResponseTooBigError: message = "response body over \(e.maxBodySize) bytes (max_body)"
            case let e as IOError: message = "connection failed: \(String(cString: strerror(e.errnoCode)))"
            case let e as NIOConnectionError:
                let cause = e.connectionErrors.first.map { ($0.error as? IOError).map { String(cString: strerror($0.errnoCode)) } ?? "\($0.error)" }
                message = "connection failed: \(cause ?? e.dnsAAAAError.map { "\($0)" } ?? e.dnsAError.map { "\($0)" } ?? "\(e)")"
            default: message = "\(error)"
            }
            L.push("mqlite.http.request: \(message)")
            return 2
        }
    }

    /// `mqlite.publish(topic, payload[, qos[, retain]])`.
    static let publish: Function = { L in
        let L = L!
        guard let rawTopic = L.rawBytes(at: 1), let payload = bytes(L, 2) else { return fail(L, "mqlite.publish(topic, payload[, qos[, retain]])") }
        guard let topic = String(validating: rawTopic, as: UTF8.self) else { return fail(L, "mqlite.publish: the topic is not UTF-8 text") }
        var qos = QoS.atMostOnce
        if lua_type(L, 3) != LUA_TNONE && lua_type(L, 3) != LUA_TNIL {
            var isInteger: Int32 = 0
            let value = lua_tointegerx(L, 3, &isInteger)
            guard isInteger != 0, value >= 0, let q = QoS(rawValue: UInt8(clamping: value)) else { return fail(L, "mqlite.publish: qos must be 0, 1 or 2") }
            qos = q
        }
        let retain = lua_toboolean(L, 4) != 0
        let ctx = context(L)
        guard let broker = ctx.vm.host.broker else { return fail(L, "mqlite.publish: the broker is not running yet") }
        guard takeAction(L, bytes: topic.utf8.count + payload.count) else { return fail(L, tooManyActions("mqlite.publish")) }
        do {
            try broker.publish(topic: topic, payload: ByteBuffer(bytes: payload), qos: qos, retain: retain, worker: ctx.vm.worker)
        } catch {
            return fail(L, "mqlite.publish: \(error)")
        }
        return 0
    }

    /// `mqlite.disconnect(client_id[, reason])` → whether the client was connected. It is closed
    /// on its own worker once the calling hook has returned; its will is published.
    static let disconnect: Function = { L in
        let L = L!
        guard let clientID = string(L, 1) else { return fail(L, "mqlite.disconnect(client_id[, reason])") }
        let ctx = context(L)
        let reason = string(L, 2).map { "disconnected by \(ctx.name): \($0)" } ?? "disconnected by \(ctx.name)"
        guard let broker = ctx.vm.host.broker else { return fail(L, "mqlite.disconnect: the broker is not running yet") }
        guard takeAction(L, bytes: reason.utf8.count) else { return fail(L, tooManyActions("mqlite.disconnect")) }
        lua_pushboolean(L, broker.disconnect(clientID: clientID, reason: reason) ? 1 : 0)
        return 1
    }

    /// `mqlite.reauthorize(client_id)` → whether the client was connected. Its `on_authorize`
    /// runs again on its own worker (once the calling hook has returned); subscriptions the new
    /// rules do not allow are removed.
    static let reauthorize: Function = { L in
        let L = L!
        guard let clientID = string(L, 1) else { return fail(L, "mqlite.reauthorize(client_id)") }
        guard let broker = context(L).vm.host.broker else { return fail(L, "mqlite.reauthorize: the broker is not running yet") }
        guard takeAction(L, bytes: 0) else { return fail(L, tooManyActions("mqlite.reauthorize")) }
        lua_pushboolean(L, broker.reauthorize(clientID: clientID) ? 1 : 0)
        return 1
    }

    /// Counts a call of mqlite.publish, .disconnect or .reauthorize against what one hook call may
    /// queue (`MQLITE_MAX_ACTIONS` calls, `memory_limit` bytes copied out of Lua in all).
    private static func takeAction(_ L: LuaState, bytes: Int) -> Bool { mqlite_take_action(L, bytes) != 0 }

    private static func tooManyActions(_ name: String) -> String {
        "\(name): more than \(MQLITE_MAX_ACTIONS) calls of mqlite.publish, mqlite.disconnect and mqlite.reauthorize, or more than memory_limit bytes of them, in one hook call"
    }

    /// `mqlite.topic_matches(filter, topic)` → boolean.
    static let topicMatches: Function = { L in
        let L = L!
        guard let filter = L.rawBytes(at: 1), let topic = L.rawBytes(at: 2) else { return fail(L, "mqlite.topic_matches(filter, topic)") }
        // Bytes that are not UTF-8 are no MQTT topic or filter: they match nothing.
        let matches = String(validating: filter, as: UTF8.self).flatMap { filter in
            String(validating: topic, as: UTF8.self).map { Topic.matches(filter: filter, topic: $0) }
        } ?? false
        lua_pushboolean(L, matches ? 1 : 0)
        return 1
    }

    /// `mqlite.time()` → seconds since 1970, with fractions.
    static let time: Function = { L in
        lua_pushnumber(L!, Date().timeIntervalSince1970)
        return 1
    }

    /// `mqlite.sha256(data)` → lowercase hex.
    static let sha256: Function = { L in
        let L = L!
        guard let data = bytes(L, 1) else { return fail(L, "mqlite.sha256(string)") }
        pushHex(L, SHA256.hash(data: data))
        return 1
    }

    /// `mqlite.hmac_sha256(key, data)` → lowercase hex.
    static let hmacSHA256: Function = { L in
        let L = L!
        guard let key = bytes(L, 1), let data = bytes(L, 2) else { return fail(L, "mqlite.hmac_sha256(key, data)") }
        pushHex(L, HMAC<SHA256>.authenticationCode(for: data, using: SymmetricKey(data: key)))
        return 1
    }

    /// `mqlite.check_password(hash, password)` → boolean, for Mosquitto password-file hashes.
    static let checkPassword: Function = { L in
        let L = L!
        guard let hash = string(L, 1), let password = bytes(L, 2) else { return fail(L, "mqlite.check_password(hash, password)") }
        lua_pushboolean(L, PasswordHash.verify(hash, password: password) ? 1 : 0)
        return 1
    }

    /// `mqlite.read_file(path)` → contents, or nil and a message. Relative paths are resolved
    /// against the config file's folder.
    static let readFile: Function = { L in
        let L = L!
        guard let path = string(L, 1) else { return fail(L, "mqlite.read_file(path)") }
        let base = context(L).vm.host.baseDirectory
        let full = path.hasPrefix("/") ? path : URL(fileURLWithPath: base).appendingPathComponent(path).path
        // A file larger than what is left of the memory budget would only fail later: refuse it
        // before reading (host code may overdraw the budget, see shim.h, but not by a whole file).
        let remaining = mqlite_memory_remaining(context(L).vm.control)
        if let size = (try? FileManager.default.attributesOfItem(atPath: full))?[.size] as? NSNumber, size.uint64Value > UInt64(remaining) {
            lua_pushnil(L)
            L.push("\(full) is larger (\(size) bytes) than what is left of scripting.memory_limit")
            return 2
        }
        guard let data = FileManager.default.contents(atPath: full) else {
            lua_pushnil(L)
            L.push("cannot read \(full)")
            return 2
        }
        data.withUnsafeBytes { L.push(bytes: $0) }
        return 1
    }

    // MARK: - kv

    /// The error of a set past `[scripting] kv_max_bytes`.
    static let kvFull = "mqlite.kv: kv_max_bytes reached"

    static let kvGet: Function = { L in
        let L = L!
        guard let key = bytes(L, 1) else { return fail(L, "mqlite.kv.get(key)") }
        pushKV(L, context(L).vm.host.kv.get(key))
        return 1
    }

    /// The options of `kv.set` and `kv.incr` at `index`: a number of seconds (the ttl), or a
    /// table `{ ttl = seconds, persist = true }`; nil and none are no options. Nil: not options.
    private static func kvOptions(_ L: LuaState, _ index: Int32) -> (ttl: Double?, persist: Bool)? {
        func seconds(_ at: Int32) -> Double?? {
            // Any number of seconds (clamped to 0...1e9 by the store), but not NaN.
            guard lua_type(L, at) == LUA_TNUMBER, !lua_tonumberx(L, at, nil).isNaN else { return lua_type(L, at) == LUA_TNIL ? .some(nil) : nil }
            return lua_tonumberx(L, at, nil)
        }
        switch lua_type(L, index) {
        case LUA_TNONE, LUA_TNIL:
            return (nil, false)
        case LUA_TTABLE:
            L.push("ttl")
            lua_rawget(L, index)
            let ttl = seconds(-1)
            L.push("persist")
            lua_rawget(L, index)
            let persist = lua_type(L, -1) == LUA_TNIL ? false : lua_type(L, -1) == LUA_TBOOLEAN ? lua_toboolean(L, -1) != 0 : nil
            lua_settop(L, -3)
            guard let ttl, let persist else { return nil }
            return (ttl, persist)
        default:
            guard let ttl = seconds(index), let ttl else { return nil }
            return (ttl, false)
        }
    }

    /// `mqlite.kv.set(key, value[, ttl_seconds | { ttl = seconds, persist = true }])`; a nil value deletes.
    static let kvSet: Function = { L in
        let L = L!
        let usage = "mqlite.kv.set(key, value[, ttl_seconds | { ttl = seconds, persist = true }])"
        guard let key = bytes(L, 1) else { return fail(L, usage) }
        let value: SharedKV.Value?
        switch lua_type(L, 2) {
        case LUA_TNIL, LUA_TNONE: value = nil
        case LUA_TBOOLEAN: value = .bool(lua_toboolean(L, 2) != 0)
        case LUA_TNUMBER:
            if lua_isinteger(L, 2) != 0 { value = .int(lua_tointegerx(L, 2, nil)) } else { value = .double(lua_tonumberx(L, 2, nil)) }
        case LUA_TSTRING: value = .string(bytes(L, 2)!)
        default: return fail(L, "mqlite.kv.set: values are strings, numbers or booleans")
        }
        guard let options = kvOptions(L, 3) else {
            return fail(L, "mqlite.kv.set: ttl must be a number of seconds, persist a boolean")
        }
        let kv = context(L).vm.host.kv
        guard let value else {
            kv.delete(key)
            return 0
        }
        do throws(SharedKV.Failure) {
            try kv.set(key, value, ttl: options.ttl, persist: options.persist)
        } catch {
            return fail(L, kvFull)
        }
        return 0
    }

    /// `mqlite.kv.incr(key[, by[, { persist = true }]])` → the new integer value.
    static let kvIncr: Function = { L in
        let L = L!
        guard let key = bytes(L, 1) else { return fail(L, "mqlite.kv.incr(key[, by[, { persist = true }]])") }
        var by: Int64 = 1
        if lua_type(L, 2) != LUA_TNONE && lua_type(L, 2) != LUA_TNIL {
            guard lua_isinteger(L, 2) != 0 else { return fail(L, "mqlite.kv.incr: by must be an integer") }
            by = lua_tointegerx(L, 2, nil)
        }
        guard lua_type(L, 3) != LUA_TNUMBER, let options = kvOptions(L, 3), options.ttl == nil else {
            return fail(L, "mqlite.kv.incr: the options are { persist = true } (an existing key keeps its expiry)")
        }
        do throws(SharedKV.Failure) {
            lua_pushinteger(L, try context(L).vm.host.kv.incr(key, by: by, persist: options.persist))
            return 1
        } catch .notInteger {
            return fail(L, "mqlite.kv.incr: \"\(LogText(String(decoding: key, as: UTF8.self)))\" holds a value that is not an integer")
        } catch {
            return fail(L, kvFull)
        }
    }

    static let kvDelete: Function = { L in
        let L = L!
        guard let key = bytes(L, 1) else { return fail(L, "mqlite.kv.delete(key)") }
        context(L).vm.host.kv.delete(key)
        return 0
    }

    private static func pushKV(_ L: LuaState, _ value: SharedKV.Value?) {
        switch value {
        case nil: lua_pushnil(L)
        case .bool(let b): lua_pushboolean(L, b ? 1 : 0)
        case .int(let i): lua_pushinteger(L, i)
        case .double(let d): lua_pushnumber(L, d)
        case .string(let s): s.withUnsafeBytes { L.push(bytes: $0) }
        }
    }

    // MARK: - json

    static let jsonEncode: Function = { L in
        let L = L!
        do throws(HookResultError) {
            let text = try LuaJSON.encode(L, 1)
            text.withUnsafeBytes { L.push(bytes: $0) }
            return 1
        } catch {
            return fail(L, "mqlite.json.encode: \(error.message)")
        }
    }

    static let jsonDecode: Function = { L in
        let L = L!
        guard let text = L.rawBytes(at: 1) else { return fail(L, "mqlite.json.decode(string)") }
        // Text that could not fit what the script's memory_limit has left once decoded (a Lua
        // value takes several times its JSON text) is refused before it is read. (The decoder
        // checks the limits as it goes, every so many values.)
        let room = Int(clamping: mqlite_memory_remaining(mqlite_control_of(L)!)) / 4
        guard text.count <= room else {
            lua_pushnil(L)
            L.push("text of \(text.count) bytes: more than the script's memory_limit leaves room for once decoded")
            return 2
        }
        do throws(LuaJSONDecoder.Failure) {
            try LuaJSONDecoder.decode(L, text)
            return 1
        } catch {
            lua_pushnil(L)
            L.push(error.message)
            return 2
        }
    }
}
