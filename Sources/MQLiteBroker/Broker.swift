import CMalloc
import Dispatch
import Foundation
import Logging
import MQTTCore
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOWebSocket
import Synchronization

/// The MQTT broker: a pool of event loops (one `Worker` each), the listeners, and the state
/// shared between workers (client registry, subscription trie, retained messages), each behind
/// its own lock held only for short, I/O-free sections.
public final class Broker: Sendable {
    public let configuration: BrokerConfiguration
    let hooks: any BrokerHooks
    /// What every session is given: limits, log, observer, retained store, hooks, loops.
    let sessionContext: SessionContext
    let logger: Logger
    public let group: any EventLoopGroup
    /// Whether the broker made `group` (then it shuts it down), or was given it.
    let ownsGroup: Bool
    /// Set once in `init`, read-only while the loops run; emptied once they have stopped, which
    /// frees the workers (they hold the broker: see `Worker.broker`).
    nonisolated(unsafe) private(set) var workers: [Worker] = []

    /// Client id (compared byte for byte) → session.
    let registry: any SessionRegistry
    /// Filter → subscribed sessions and their granted QoS.
    private let subscriptions: any SubscriptionIndex
    /// Retained messages by topic (see `retainedMessages(matching:)`).
    let retained: any RetainedStore
    /// Where retained messages, persistent sessions and `mqlite.kv` keys set with `persist` are
    /// kept across restarts (nil: memory only).
    public let store: PersistentStore?
    /// The store when acknowledgements of retained messages wait for its commits (`sync = "full"`).
    var waitingStore: PersistentStore? { store?.acknowledgesAfterCommit == true ? store : nil }
    /// Nodes a retained scan visits per hold of the retained lock.
    static let retainedScanChunk = 512
    private let serverChannels = Mutex<[any Channel]>([])
    /// The listeners started so far (their TLS contexts are replaced on reload).
    private let runningListeners = Mutex<[RunningListener]>([])
    /// Stands for a listener for connections served from a socketpair (the fuzzer's).
    let unboundListener = RunningListener(unboundNamed: "socketpair")
    let connectionCount = Atomic<Int>(0)
    /// When `returnFreedMemory` last trimmed, in uptime nanoseconds.
    private let lastMemoryTrim = Atomic<UInt64>(0)
    /// Set by the first `start()`.
    private let started = Atomic<Bool>(false)
    /// Connection handlers alive (a closed connection's must be freed: tests check it).
    let connectionObjects = Atomic<Int>(0)
    /// The `[[bridge]]` links, made by `start()` (read-only after).
    private let bridgeLinks = Mutex<[BridgeLink]>([])
    var bridges: [BridgeLink] { bridgeLinks.withLock { $0 } }
    /// Connections of `http` listeners open now (`HTTPListenerLimits.maxConnections`).
    let httpConnections = Atomic<Int>(0)
    /// Retained messages not kept (`max_retained`, `max_retained_bytes`), and when the warning
    /// about them was last logged (uptime nanoseconds; at most every 10 s, so that a client
    /// cannot have a log line written per PUBLISH).
    let retainedRefused = Atomic<Int>(0)
    private let retainedWarnedAt = Atomic<UInt64>(0)
    /// Subscriptions held (filters of every session), for metrics and `$SYS`.
    let subscriptionCount = Atomic<Int>(0)
    /// Most connections open at once since start.
    let maximumConnections = Atomic<Int>(0)
    /// When the broker was made (uptime).
    let startTime = NIODeadline.now()
    /// Set when `shutdown()` begins: `/health` answers 503 from then on.
    private let stopping = Atomic<Bool>(false)
    /// The stop is committing the store's last changes (`shutdown`): the process's stop deadline
    /// waits for it, since going before it ends loses what was acknowledged.
    private let committingStore = Atomic<Bool>(false)
    /// The `$SYS` publisher's timer, cancelled on shutdown.
    let sysTask = Mutex<RepeatedTask?>(nil)
    /// The metrics the `http` listeners export (docs/METRICS.md).
    public let metrics = BrokerMetrics()
    /// The version `$SYS/broker/version` announces.
    public static let version = "mqlite 0.1.0"

    /// The generic handler types that several loops create, instantiated once, here, on one
    /// thread (a `static let` runs once). Two loops instantiating `ByteToMessageHandler<
    /// HTTPRequestDecoder>` for the first time at once crashed the Swift runtime (a null
    /// metadata in `swift_checkMetadataState`, seen once under CI with a WebSocket and an http
    /// listener in use at the same moment); once the metadata and its conformance checks are
    /// cached, later instantiations only read them.
    static let handlerTypes: [ObjectIdentifier] = [
        ObjectIdentifier(ByteToMessageHandler<HTTPRequestDecoder>.self),
        ObjectIdentifier(ByteToMessageHandler<WebSocketFrameDecoder>.self),
        ObjectIdentifier(ByteToMessageHandler<MQTTDecoder>.self),
    ]

    /// `store`: where retained messages are kept across restarts (opened, and loaded, by the
    /// caller: see `PersistentStore`); nil keeps them in memory only. The broker closes it as it
    /// stops.
    public convenience init(configuration: BrokerConfiguration, hooks: any BrokerHooks = NoHooks(), logger: Logger, store: PersistentStore? = nil) {
        self.init(
            configuration: configuration, hooks: hooks, sessionObserver: store?.sessions, logger: logger, retained: store?.retained ?? TreeRetainedStore(),
            store: store)
    }

    /// A broker on the given stores (in memory unless told otherwise), with one worker per loop of
    /// `group` (by default a `MultiThreadedEventLoopGroup` of `workers` threads, which the broker
    /// owns and stops; a group given is left running: tests give an `EmbeddedEventLoop`).
    init(
        configuration: BrokerConfiguration, hooks: any BrokerHooks, sessionObserver: (any SessionObserver)?, logger: Logger,
        registry: any SessionRegistry = InMemorySessionRegistry(), subscriptions: any SubscriptionIndex = TrieSubscriptionIndex(),
        retained: any RetainedStore = TreeRetainedStore(), store: PersistentStore? = nil, group: (any EventLoopGroup)? = nil
    ) {
        precondition(!Self.handlerTypes.isEmpty)
        self.store = store
        self.registry = registry
        self.subscriptions = subscriptions
        self.retained = retained
        self.configuration = configuration
        self.hooks = hooks
        self.logger = logger
        // A group of its own tells each worker of its loop's ticks (`ConnectPacing`).
        let ticks = group == nil ? TickObserver() : nil
        self.group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: configuration.resolvedWorkers, metricsDelegate: ticks!)
        self.ownsGroup = group == nil
        var loops: [any EventLoop] = []
        for loop in self.group.makeIterator() { loops.append(loop) }
        self.sessionContext = SessionContext(
            limits: configuration.limits, logger: logger, observer: sessionObserver, retained: retained, hooks: hooks, loops: loops)
        self.workers = loops.enumerated().map { Worker(index: $0.offset, loop: $0.element, broker: self, workerCount: loops.count) }
        if let ticks { for worker in workers { ticks.observe(worker.pacing, on: worker.loop) } }
    }

    // MARK: - Lifecycle

    /// Binds every configured listener and returns the addresses actually bound (real ports).
    public func start() async throws -> [SocketAddress] {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { throw AlreadyStarted() }
        try await restoreSessions()
        // Timeouts are checked to within this: a quarter of connect_timeout, at most half a second.
        let sweep = TimeAmount.nanoseconds(max(min(configuration.limits.connectTimeout.nanoseconds / 4, 500_000_000), 10_000_000))
        for worker in workers { worker.startTimeoutSweep(every: sweep) }
        DescriptorTable.reserve(maxConnections: configuration.limits.maxConnections)
        var bound: [SocketAddress] = []
        for (index, listenerConfiguration) in configuration.listeners.enumerated() {
            // One TLS context per TLS listener, built before anything listens (file I/O).
            var context: NIOSSLContext?
            if let tls = listenerConfiguration.tls {
                do {
                    context = try tls.makeContext()
                } catch {
                    throw TLSSetupError(index: index, error: error)
                }
            }
            let listener = RunningListener(index: index, configuration: listenerConfiguration, context: context)
            let address = listenerConfiguration.address
            let channel: any Channel
            do {
                let bootstrap = listenerConfiguration.kind == .http ? makeHTTPBootstrap() : makeBootstrap(for: listener)
                channel = try await bootstrap.bind(host: address.host, port: address.port).get()
            } catch {
                throw ListenError(index: index, address: address, underlying: error)
            }
            serverChannels.withLock { $0.append(channel) }
            runningListeners.withLock { $0.append(listener) }
            if let local = channel.localAddress {
                bound.append(local)
                var traits: [String] = []
                if listenerConfiguration.kind == .websockets { traits.append("WebSocket") }
                if listenerConfiguration.kind == .http { traits.append("HTTP: /metrics, /health") }
                if context != nil { traits.append("TLS") }
                if listenerConfiguration.proxyProtocol { traits.append("PROXY protocol") }
                let suffix = traits.isEmpty ? "" : " (\(traits.joined(separator: ", ")))"
                logger.info("listening on \(local.ipAddress ?? address.host):\(local.port ?? address.port)\(suffix)")
            }
        }
        try await startBridges()
        startSysPublisher()
        return bound
    }

    /// What the delivery hooks make of `message` for `client` (a connection's or a bridge's
    /// outbound, as it goes out): it, a changed one (its topic held to `max_topic_levels`, its QoS
    /// and RETAIN the delivery's), or nil for none.
    func interceptDelivery(_ message: Message, to client: ClientInfo, worker: Int, logger: @autoclosure () -> Logger) -> Message? {
        switch hooks.interceptDelivery(message, to: client, worker: worker) {
        case .deliver:
            return message
        case .drop:
            return nil
        case .change(var changed):
            // A hook's topic is a valid name (`TopicName`); the broker's level limit is checked here.
            let limit = configuration.limits.maxTopicLevels
            guard changed.topic.levelCount <= limit else {
                workers[worker].logHookTopicDrop(changed.topic, hook: "delivery", limit: limit, logger: logger())
                return nil
            }
            changed.qos = message.qos
            changed.retain = message.retain
            changed.isCompact = false
            return changed
        }
    }

    // MARK: - Bridges

    /// Starts each `[[bridge]]`'s link, on the worker of its session kept from before (the store
    /// restored it) or on the next worker in turn.
    private func startBridges() async throws {
        for (index, configuration) in configuration.bridges.enumerated() {
            let kept = registry.session(for: configuration.localClientID)
            let worker = workers[kept?.owner ?? index % workers.count]
            var sslContext: NIOSSLContext?
            if let cafile = configuration.cafile {
                do {
                    sslContext = try TLSSettings.makeClientContext(cafile: cafile, certfile: configuration.certfile, keyfile: configuration.keyfile)
                } catch {
                    throw BridgeSetupError(index: index, underlying: error)
                }
            }
            let link = BridgeLink(configuration: configuration, broker: self, worker: worker, logger: logger)
            bridgeLinks.withLock { $0.append(link) }
            try await worker.loop.submit { [sslContext] in link.start(sslContext: sslContext) }.get()
        }
    }

    /// The local session of a bridge (`$bridge/NAME`): the one kept from before, or a new one,
    /// persistent and never expiring (owner loop).
    func bridgeSession(for configuration: BridgeConfiguration, on worker: Worker) -> Session {
        worker.assertOnLoop()
        if let kept = registry.session(for: configuration.localClientID), kept.owner == worker.index, !kept.ended {
            worker.sessionClaimed(kept)
            kept.setExpiry(Session.neverExpires)
            return kept
        }
        let session = Session(clientID: configuration.localClientID, persistent: true, owner: worker.index, context: sessionContext)
        registry.update(clientID: configuration.localClientID) { $0 = session }
        session.setExpiry(Session.neverExpires)
        // A store keeps it from now on: what it is subscribed to, and what queues before the link is up.
        session.report(.attached)
        return session
    }

    /// Re-reads the certificate files of every TLS listener (SIGHUP): new handshakes use them,
    /// connections already open keep theirs. A listener whose files cannot be used keeps its
    /// running context; the log says why. Blocking file I/O: call it off the event loops.
    public func reloadCertificates() {
        for listener in runningListeners.withLock({ $0 }) where listener.tls != nil {
            do {
                try listener.reloadContext()
                logger.info("listener[\(listener.index)] \(listener.bind): certificates reloaded")
            } catch {
                logger.error("listener[\(listener.index)] \(listener.bind): keeping the running certificates: \(error)")
            }
        }
    }

    /// How long a listener waits before accepting again after running out of file descriptors.
    static let acceptBackoff = TimeAmount.milliseconds(250)

    /// The listening socket of every listener kind: out of file descriptors, it pauses accepting
    /// (logged once) instead of retrying at once.
    func serverBootstrap(backlog: Int32) -> ServerBootstrap {
        ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: backlog)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { [logger] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(AcceptBackoff(logger: logger, backoff: Self.acceptBackoff))
                }
            }
    }

    private func makeBootstrap(for listener: RunningListener) -> ServerBootstrap {
        serverBootstrap(backlog: 1024)
            // On the listening socket (NIO's default too), TCP_NODELAY is every accepted socket's
            // from the start (it is a copy of the listener's): no setsockopt per connection.
            .serverChannelOption(.socketOption(.tcp_nodelay), value: 1)
            // The accepted channel's options are set here, synchronously, rather than as
            // `childChannelOption`s, which NIO applies one future at a time (a reconnect storm
            // spent about 7% of the broker's time there).
            .childChannelInitializer { [self] channel in
                let worker = self.worker(for: channel.eventLoop)
                return channel.eventLoop.makeCompletedFuture {
                    try Self.setConnectionOptions(channel)
                    try self.configurePipeline(channel.pipeline.syncOperations, listener: listener, worker: worker)
                }
            }
    }

    /// The options of every client connection. NIO reports the client's EOF
    /// (`ChannelEvent.inputClosed`) instead of closing at once, and `ConnectionHandler` closes it
    /// once what the client sent before is handled, when its worker's tick has room. Behind TLS
    /// too: NIOSSL passes on a close_notify, or an EOF without one, as that event (swift-nio-ssl
    /// 2.37), where it would otherwise close at once and drop what was read but not yet handled.
    /// NIO keeps each channel's first receive buffer for reuse: 64 bytes (most CONNECTs,
    /// SUBSCRIBEs and PINGREQs fit), so an idle connection holds 64 bytes rather than NIO's
    /// default 2 KiB. Each read that fills its buffer asks for twice as much next, up to 256 KiB;
    /// the kept buffer grows to 2 KiB at most, larger reads get buffers of their own, freed once
    /// handled (`ReceiveAllocator`).
    static let receiveAllocator = ReceiveAllocator()
    /// Reads per read event: one. A client that keeps its socket full is read once per loop tick,
    /// like every other ready client, so one read (at most 256 KiB) is the longest anyone waits
    /// behind it: with NIO's loop of up to 16 reads a tick, one client flooding 16-byte PUBLISHes
    /// made every other client on its worker wait ~120 ms for a PINGRESP (~10 ms now), at the
    /// same rate. It is also how many receive buffers NIO keeps per channel: one (with more, NIO
    /// would keep up to that many of the buffers `ReceiveAllocator` makes for one read each).
    static let maxMessagesPerRead: UInt = 1

    private static func setConnectionOptions(_ channel: any Channel) throws {
        guard let options = channel.syncOptions else { return }
        try options.setOption(.allowRemoteHalfClosure, value: true)
        try options.setOption(.maxMessagesPerRead, value: maxMessagesPerRead)
        try options.setOption(.recvAllocator, value: receiveAllocator)
        try options.setOption(.writeBufferWaterMark, value: .init(low: 64 * 1024, high: 256 * 1024))
    }

    /// The handlers of an accepted connection, in order: the PROXY protocol header's reader, TLS,
    /// the HTTP upgrade to WebSocket (each only where the listener has it), then the connection
    /// handler, which sees the MQTT byte stream whatever came before it. Plain MQTT listeners get
    /// nothing but the connection handler.
    private func configurePipeline(_ pipeline: ChannelPipeline.SynchronousOperations, listener: RunningListener, worker: Worker) throws {
        if listener.proxyProtocol {
            try pipeline.addHandler(ProxyProtocolHandler(listener: listener, logger: logger, timeout: proxyHeaderTimeout))
        }
        if listener.tls != nil, let context = listener.currentContext {
            try pipeline.addHandler(NIOSSLServerHandler(context: context))
        }
        if listener.kind == .websockets {
            try WebSocketUpgradeHandler.addHandlers(
                to: pipeline, listener: listener, logger: logger,
                maxFrameSize: WebSocketLimits.maxFrameSize(maxPacketSize: configuration.limits.maxPacketSize))
        }
        try pipeline.addHandler(ConnectionHandler(worker: worker, listener: listener))
    }

    /// How long a connection on a `proxy_protocol` listener may take to send its header:
    /// connect_timeout, at most 10 s (a load balancer sends it at once).
    var proxyHeaderTimeout: TimeAmount { min(configuration.limits.connectTimeout, .seconds(10)) }

    func worker(for loop: any EventLoop) -> Worker {
        workers.first { $0.loop === loop }!
    }

    /// Stops accepting, publishes the wills of the clients still connected (their connections
    /// close without a DISCONNECT from them, MQTT-3.1.2-8), closes every client connection, and
    /// stops the event loops. The hooks are stopped (`BrokerHooks.stop`) once the wills have gone
    /// through them (or after half a second), so that none keeps a loop busy after.
    public func shutdown() async {
        beginStopping()
        sysTask.withLock { task in
            task?.cancel()
            task = nil
        }
        // The MQTT listeners first; the http ones last, so that /health says 503 meanwhile.
        let channels = serverChannels.withLock { channels in
            defer { channels.removeAll() }
            return channels
        }
        let kinds = runningListeners.withLock { $0.map(\.kind) }
        let isHTTP = channels.indices.map { $0 < kinds.count && kinds[$0] == .http }
        // (Closed on their loops; waited for once the hooks are stopped: a loop held by a hook
        // closes them only then.)
        let listenersClosed = channels.indices.filter { !isHTTP[$0] }.map { channels[$0].close() }
        // Every worker routes its clients' wills before any connection closes, so that those
        // still connected get them (deliveries for another worker are in its queue of tasks
        // before that worker's closing below).
        let routed = ShutdownCount()
        let wills = workers.map { worker in
            worker.loop.submit {
                worker.beginBatch()
                for connection in worker.connections { connection.handler.publishWillForShutdown() }
                // And the delayed wills of clients gone already: their sessions end with the
                // process (or, kept in a store, would not have them after it).
                for session in Array(worker.offlineSessions.values) + Array(worker.lastingSessions.values) where session.owner == worker.index {
                    session.publishPendingWill()
                }
                worker.flushDirty()
                routed.count.add(1, ordering: .relaxed)
            }
        }
        // A worker inside a hook that does not end (a runaway script under a generous
        // time_limit) routes its wills only once the hooks are stopped: they are given half a
        // second, then stopped either way.
        let routing = NIODeadline.now() + .milliseconds(500)
        while routed.count.load(ordering: .relaxed) < wills.count, NIODeadline.now() < routing {
            try? await Task.sleep(for: .milliseconds(5))
        }
        hooks.stop()
        for routing in wills { try? await routing.get() }
        await drainQueues(for: .seconds(1))
        for closed in listenersClosed { try? await closed.get() }
        for link in bridges { try? await link.worker.loop.submit { link.stop() }.get() }
        for worker in workers {
            try? await worker.loop.submit {
                for connection in worker.connections { connection.handler.closeForShutdown() }
                worker.pacing.stop()
            }.get()
        }
        // Each connection's output is shut; its client closes in turn once it has read what was
        // written (the wills), or its linger time closes it. Until then the loops read and drop
        // what the clients still send, so that none is reset before it has read.
        let lingerEnds = NIODeadline.now() + ConnectionHandler.lingerTime + .milliseconds(100)
        while connectionCount.load(ordering: .relaxed) > 0, NIODeadline.now() < lingerEnds {
            try? await Task.sleep(for: .milliseconds(5))
        }
        for (i, channel) in channels.enumerated() where isHTTP[i] { try? await channel.close() }
        await hooks.shutdown()
        // What the loops changed last is committed before the process goes, while the loops
        // still run (acknowledgements waiting for it complete on them).
        if let store {
            committingStore.store(true, ordering: .releasing)
            await withCheckedContinuation { done in DispatchQueue.global().async { store.close(); done.resume() } }
            committingStore.store(false, ordering: .releasing)
        }
        if ownsGroup { try? await group.shutdownGracefully() }
        loopsStopped()
        logger.info("stopped")
    }

    /// Wills (and whatever else) queued behind a connected subscriber's in-flight window
    /// (`max_inflight`, or its MQTT 5 Receive Maximum) go out as it acknowledges what is in
    /// flight: `shutdown` waits while the connected clients' queues shrink, until they are empty,
    /// stop shrinking for 250 ms (a subscriber that does not acknowledge), or `limit` passes.
    private func drainQueues(for limit: TimeAmount) async {
        let ends = NIODeadline.now() + limit
        var least = Int.max
        var shrunk = NIODeadline.now()
        while NIODeadline.now() < ends {
            var queued = 0
            for worker in workers {
                queued += (try? await worker.loop.submit {
                    worker.connections.reduce(0) { $0 + ($1.handler.sessionLoad()?.queued ?? 0) }
                }.get()) ?? 0
            }
            if queued == 0 { return }
            let now = NIODeadline.now()
            if queued < least {
                least = queued
                shrunk = now
            } else if now - shrunk >= .milliseconds(250) {
                return
            }
            try? await Task.sleep(for: .milliseconds(10))
        }
    }

    /// Workers done with a step of `shutdown` (any thread).
    private final class ShutdownCount: Sendable {
        let count = Atomic<Int>(0)
    }

    /// From here on the broker counts as stopping (`/health` answers 503). The first step of
    /// `shutdown()`.
    func beginStopping() {
        stopping.store(true, ordering: .releasing)
    }

    /// Whether a stop is committing the store's last changes.
    public var isCommittingStore: Bool { committingStore.load(ordering: .acquiring) }

    /// Whether the broker accepts connections (started, not stopping): what `/health` reports.
    public var isAccepting: Bool { isStarted && !stopping.load(ordering: .acquiring) }

    /// Lets go of the workers once their loops have stopped (nothing reads them any more).
    func loopsStopped() {
        workers = []
    }

    // MARK: - Publishing from outside a connection

    /// Publishes a message as the broker itself (plugins use this). It is routed on `worker`'s
    /// loop, once the caller's current task is done; publish hooks do not see it.
    public func publish(topic: String, payload: ByteBuffer, qos: QoS, retain: Bool, worker index: Int) throws(MQTTProtocolError) {
        let name: TopicName
        do {
            name = try TopicName(topic, maxLevels: configuration.limits.maxTopicLevels)
        } catch {
            logger.info("plugin publish rejected: \(LogText(error.description))")
            throw error
        }
        guard !workers.isEmpty else { return }  // stopped
        let worker = workers[index % workers.count]
        let message = Message(topic: name, payload: payload, qos: qos, retain: retain)
        // A retained message is kept at once, in the order the hooks run: a taken-over
        // connection's `on_disconnected` runs before the new connection's `on_connected`, so its
        // "offline" cannot land after the other's "online" when the two workers' tasks race.
        if retain { self.retain(message) }
        // Routing is a task of its own, even on this loop: a plugin publishes from inside a hook,
        // and routing now could call other hooks (`on_deliver`) in the same Lua state while that
        // hook is still running.
        worker.loop.execute { worker.publish(message, retaining: false) }
    }

    // MARK: - Clients, for plugins

    /// The event loop of worker `index` (plugins schedule their timers there); nil once stopped.
    public func eventLoop(ofWorker index: Int) -> (any EventLoop)? {
        workers.indices.contains(index) ? workers[index].loop : nil
    }

    /// Runs `body` on worker `index`'s loop, where it is called: at once, or, in a storm, in a
    /// later tick (`ConnectPacing`). For a hook call that waited and resumes with its answer: the
    /// rest of the call, and what the broker does with its result (CONNACK, a held PUBLISH).
    public func runPaced(onWorker index: Int, _ body: @escaping () -> Void) {
        guard workers.indices.contains(index) else { return body() }
        workers[index].pacing.run(body)
    }

    /// Closes the connection of `clientID`, on whichever worker holds it; its will is published,
    /// as on any connection loss. Whether it was connected. Any thread; the close happens once
    /// the owner's loop gets to it (never inside the caller's hook).
    public func disconnect(clientID: String, reason: String) -> Bool {
        guard let session = registry.session(for: clientID), session.isOnline else { return false }
        // Not a connection that took the client id over since.
        let claim = session.latestClaim
        onOwner(of: session) { _ in if session.isLatest(claim: claim) { session.outbound?.disconnect(reason: reason) } }
        return true
    }

    /// Asks the hooks for the access rules of `clientID` again (`authorize`), and drops the
    /// subscriptions the new rules no longer allow. Whether it was connected. Any thread.
    public func reauthorize(clientID: String) -> Bool {
        guard let session = registry.session(for: clientID), session.isOnline else { return false }
        onOwner(of: session) { _ in session.outbound?.reauthorize() }  // whichever connection holds it then
        return true
    }

    /// `reauthorize` for every connected client (after a reload of the hooks): as Mosquitto
    /// applies a reloaded acl_file to the clients already connected.
    public func reauthorizeAll() {
        for worker in workers {
            worker.loop.execute {
                for connection in worker.connections { connection.handler.reauthorize() }
            }
        }
    }

    // MARK: - Sessions

    /// Finds or creates the session for a CONNECT accepted on `worker`, detaching (and, for a clean
    /// session or Clean Start, discarding) whatever held that client id before; a new session is
    /// `persistent` or not (3.1.1: clean session 0; 5.0: a session expiry interval). `completion` runs on `worker`'s
    /// loop with the session and whether it was present, or with nil when a newer CONNECT for the
    /// same client id came meanwhile (MQTT-3.1.4-2: only the newest connection may keep it).
    ///
    /// Closing the old connection and attaching the new one happen on the session's owner loop,
    /// the new connection attaching there only while its claim is still the latest; so however
    /// many CONNECTs race for one client id, exactly one connection ends up attached.
    func openSession(
        clientID: String, cleanStart: Bool, persistent: Bool, on worker: Worker,
        completion: @escaping @Sendable (_ session: Session?, _ present: Bool) -> Void
    ) {
        let (session, claim, present, replaced) = registry.update(clientID: clientID) { registered -> (Session, Int, Bool, Session?) in
            let existing = registered
            if let existing, existing.persistent, !cleanStart { return (existing, existing.claim(), true, nil) }
            let fresh = Session(clientID: clientID, persistent: persistent, owner: worker.index, context: sessionContext)
            // A connection still waiting to attach to the replaced session is superseded.
            _ = existing?.claim()
            registered = fresh
            return (fresh, fresh.claim(), false, existing)
        }
        if let replaced {
            // The old connection is closed (its will published, its hooks told) before the new
            // one attaches, so that hooks and wills see the two in the order they happened.
            onOwner(of: replaced) { owner in
                replaced.outbound?.takenOver(publishWill: true)
                self.endSession(replaced, worker: owner)
                if owner === worker { return self.takeOver(session, claim: claim, present: present, on: worker, owner: worker, completion) }
                self.onOwner(of: session) { owner in self.takeOver(session, claim: claim, present: present, on: worker, owner: owner, completion) }
            }
            return
        }
        // A session owned by this worker (a fresh one always is), on whose loop we are: at once.
        if session.owner == worker.index && worker.loop.inEventLoop {
            takeOver(session, claim: claim, present: present, on: worker, owner: worker, completion)
        } else {
            onOwner(of: session) { owner in self.takeOver(session, claim: claim, present: present, on: worker, owner: owner, completion) }
        }
    }

    /// On the session's owner loop: closes the connection that holds the session and hands the
    /// session to the claimant on `worker`, unless a newer claim came meanwhile.
    private func takeOver(
        _ session: Session, claim: Int, present: Bool, on worker: Worker, owner: Worker,
        _ completion: @escaping @Sendable (Session?, Bool) -> Void
    ) {
        guard session.isLatest(claim: claim), !session.ended else {
            if owner === worker { completion(nil, false) } else { worker.loop.execute { completion(nil, false) } }
            return
        }
        // Clean session 0 taking over clean session 0: the session goes on, so the old
        // connection's will is not published (Mosquitto). A clean session 1 on either side
        // replaces the session instead (openSession), and that publishes the will.
        session.outbound?.takenOver(publishWill: false)
        // After the old connection let go (which registered the session as offline, to expire
        // on this worker): the session is claimed, no longer offline, and may move. A will
        // waiting out its delay is cancelled by the client's return (MQTT 5.0 §3.1.3.2.2).
        owner.sessionClaimed(session)
        session.cancelPendingWill()
        if owner === worker { return completion(session, present) }
        session.move(to: worker.index)
        worker.loop.execute {
            // Superseded while moving: the newer claimant, queued on this loop, takes it over.
            guard session.isLatest(claim: claim) else { return completion(nil, false) }
            completion(session, present)
        }
    }

    /// Makes the persistent sessions the store held at startup, offline (as their clients left
    /// them, or as the broker stopped under them), spread over the workers by client id; the
    /// ones whose expiry passed while the broker was down go from the store instead.
    private func restoreSessions() async throws {
        guard let store else { return }
        let stored = store.takeLoadedSessions()
        guard !stored.isEmpty else { return }
        let started = NIODeadline.now()
        let now = Int64(Date().timeIntervalSince1970)
        var byWorker = Array(repeating: [(StoredSession, TimeAmount)](), count: workers.count)
        var expired = 0
        for session in stored {
            let expiry = session.expiry(configured: configuration.limits.sessionExpiry) ?? configuration.limits.sessionExpiry
            // (Online when the broker stopped: its time offline starts now.)
            let since = min(max(session.offlineSince ?? now, 0), now)  // (a row in the future, or far in the past)
            let offline = TimeAmount.seconds(now - since)
            if expiry != .zero, expiry != Session.neverExpires, offline >= expiry {
                store.forget(session: session.clientID)
                expired += 1
                continue
            }
            byWorker[Int(UInt(bitPattern: session.clientID.hashValue) % UInt(workers.count))].append((session, offline))
        }
        for (worker, sessions) in zip(workers, byWorker) where !sessions.isEmpty {
            try await worker.loop.submit {
                for (session, offline) in sessions { self.restore(session, offlineFor: offline, on: worker) }
            }.get()
        }
        let seconds = String(format: "%.3f", Double((NIODeadline.now() - started).nanoseconds) / 1e9)
        logger.info("restored \(stored.count - expired) persistent sessions (\(expired) expired while stopped) in \(seconds) s")
    }

    /// One stored session, offline, on `worker`'s loop. What it does is not told to the store
    /// again (it holds it already).
    private func restore(_ stored: StoredSession, offlineFor offline: TimeAmount, on worker: Worker) {
        let session = Session(clientID: stored.clientID, persistent: true, owner: worker.index, context: sessionContext)
        registry.update(clientID: stored.clientID) { $0 = session }
        if let expiry = stored.expiry(configured: configuration.limits.sessionExpiry) { session.setExpiry(expiry) }
        for (filter, subscription) in stored.subscriptions {
            subscribe(session, filter: filter, grant: subscription.grant, identifier: subscription.identifier)
        }
        if !stored.names.isEmpty { session.withSubscriptionNames { $0 = SubscriptionNames(pairs: stored.names) } }
        session.restore(inflight: stored.inflight, queue: stored.queue, awaitingPubrel: stored.awaitingPubrel, lastSeq: stored.lastSeq)
        session.isStored = true
        worker.sessionWentOffline(session, since: .now() - offline)
    }

    /// Succeeds on `worker`'s loop once the store has committed what `worker` recorded so far and
    /// what the deliveries it has posted to the other workers record: a task queued on each
    /// other loop after `worker`'s posts runs after the drain that delivers them.
    ///
    /// `held`: the caller recorded a change whose other half the deliveries are (an inbound QoS 2
    /// id): the writer waits for each other worker's part (`Journal.hold`) before its next batch.
    func committed(after worker: Worker, held: Bool = false) -> EventLoopFuture<Void> {
        guard let store else { return worker.loop.makeSucceededVoidFuture() }
        guard workers.count > 1 else { return store.committed(on: worker.loop) }
        let futures = workers.map { other -> EventLoopFuture<Void> in
            guard other !== worker else { return store.committed(on: worker.loop) }
            let promise = worker.loop.makePromise(of: Void.self)
            other.loop.execute {
                store.wait(promise)
                if held { store.release() }
            }
            return promise.futureResult
        }
        return EventLoopFuture.andAllSucceed(futures, on: worker.loop)
    }

    /// Runs `body` on the loop of the worker that owns `session`, following it if it moves.
    private func onOwner(of session: Session, _ body: @escaping @Sendable (Worker) -> Void) {
        let owner = workers[session.owner]
        owner.loop.execute {
            if session.owner == owner.index { body(owner) } else { self.onOwner(of: session, body) }
        }
    }

    /// Discards an offline persistent session that expired, unless a CONNECT has claimed it since
    /// it went offline (that connection keeps it). On its owner's loop.
    func expire(_ session: Session, claim: Int, worker: Worker) {
        let expired = registry.update(clientID: session.clientID) { registered -> Bool in
            guard registered === session, session.isLatest(claim: claim), session.outbound == nil else { return false }
            registered = nil
            return true
        }
        guard expired else { return }
        session.report(.expired)
        let expiry = session.expiry ?? configuration.limits.sessionExpiry
        logger.info("session expired after \(expiry.nanoseconds / 1_000_000_000) s offline", metadata: ["client": "\(LogText(value: session.clientID))"])
        endSession(session, worker: worker)
    }

    /// Discards a session: its subscriptions, queue and registry entry. On its owner's loop.
    func endSession(_ session: Session, worker: Worker) {
        worker.assertOnLoop()
        assert(session.owner == worker.index, "a session ended off its owner")
        if session.ended { return }
        worker.sessionClaimed(session)  // no longer waiting to expire
        handOverShared(from: session, worker: worker)
        let filters = Array(session.subscriptions.keys)
        session.subscriptions.removeAll()
        if !filters.isEmpty {
            subscriptionCount.subtract(filters.count, ordering: .relaxed)
            subscriptions.remove(filters: filters, session: session)
            let changed = filters.map(SharedFilter.matching)
            for worker in workers { worker.subscriptionsChanged(changed) }
        }
        session.end()
        registry.update(clientID: session.clientID) { registered in
            if registered === session { registered = nil }
        }
    }

    // MARK: - Subscriptions

    func subscribe(_ session: Session, filter: TopicFilter, qos: QoS) {
        subscribe(session, filter: filter, grant: Grant(qos: qos))
    }

    /// `identifier`: the MQTT 5 Subscription Identifier the SUBSCRIBE gave it (nil: none, which
    /// also removes the one an earlier SUBSCRIBE gave).
    func subscribe(_ session: Session, filter: TopicFilter, grant: Grant, identifier: UInt32? = nil) {
        workers[session.owner].assertOnLoop()
        let qos = grant.qos
        if session.subscriptions.updateValue(qos, forKey: filter) == nil { subscriptionCount.add(1, ordering: .relaxed) }
        session.setSubscriptionIdentifier(identifier, for: filter, noLocal: grant.noLocal)
        subscriptions.insert(filter: filter, session: session, grant: grant)
        // Routes follow the filter that topics are matched against (a shared one's inner filter).
        for worker in workers { worker.subscriptionsChanged(CollectionOfOne(SharedFilter.matching(filter))) }
        session.report(.subscribed(filter: filter, grant: grant, identifier: identifier))
    }

    func unsubscribe(_ session: Session, filter: TopicFilter) {
        workers[session.owner].assertOnLoop()
        guard session.subscriptions.removeValue(forKey: filter) != nil else { return }
        session.setSubscriptionIdentifier(nil, for: filter)
        subscriptionCount.subtract(1, ordering: .relaxed)
        subscriptions.remove(filters: [filter], session: session)
        for worker in workers { worker.subscriptionsChanged(CollectionOfOne(SharedFilter.matching(filter))) }
        session.report(.unsubscribed(filter: filter))
    }

    /// A member of shared subscriptions lost its client (its connection went, or the session is
    /// discarded): the messages of those subscriptions that its client has not acknowledged go to
    /// another member of each group, where the group has one (MQTT 5.0 §4.8.2); the rest stay with
    /// the session. On the session's owner loop, while the session is still a member.
    func handOverShared(from session: Session, worker: Worker) {
        let taken = session.takeShared { $0.memberCount > 1 }
        let now = NIODeadline.now().uptimeNanoseconds
        for var delivery in taken {
            // (One that expired while it waited here is not handed on: its delivery never started.)
            if let expiresAt = delivery.message.properties.messageExpiresAt, expiresAt <= now { continue }
            guard let group = delivery.group, let member = group.pick(excluding: session) else { continue }
            delivery.qos = min(delivery.qos, member.grant.qos)
            worker.deliver(delivery, to: member.session)
        }
    }

    /// A SUBSCRIBE of the client's filter `name`, granted as `filter` (an `on_subscribe` hook may
    /// have rewritten it): the session remembers the name, so that UNSUBSCRIBE of it removes
    /// `filter`; a filter the name stood for before goes when no other name maps to it.
    func subscribe(_ session: Session, named name: TopicFilter, as filter: TopicFilter, grant: Grant, identifier: UInt32? = nil) {
        guard name != filter || session.hasRenamedSubscriptions else {
            return subscribe(session, filter: filter, grant: grant, identifier: identifier)
        }
        let replaced = session.withSubscriptionNames { names in
            names.subscribed(name: name, as: filter) { session.subscriptions[$0] != nil }
        }
        subscribe(session, filter: filter, grant: grant, identifier: identifier)
        if let replaced { unsubscribe(session, filter: replaced) }
        session.report(.renamed)
    }

    /// UNSUBSCRIBE of the client's filter `name`: removes what it was subscribed as (unless
    /// another name of the client still maps to that). Returns that filter.
    @discardableResult
    func unsubscribe(_ session: Session, named name: TopicFilter) -> TopicFilter {
        guard session.hasRenamedSubscriptions else {
            unsubscribe(session, filter: name)
            return name
        }
        let (mapped, removed) = session.withSubscriptionNames { names in (names.filter(named: name), names.unsubscribed(name: name)) }
        if let removed { unsubscribe(session, filter: removed) }
        session.report(.renamed)
        return mapped
    }

    /// Every session whose filters match `topic`, once each, with the highest QoS among its
    /// matching subscriptions.
    func matchSubscribers(topic: TopicName) -> [(session: Session, grant: Grant)] {
        subscriptions.matches(topic: topic)
    }

    /// The shared subscription groups whose filter matches `topic`.
    func sharedGroups(matching topic: TopicName) -> [SharedGroup] {
        subscriptions.sharedGroups(matching: topic)
    }

    // MARK: - Retained messages

    /// Keeps the last retained message of a topic; an empty payload clears it (and prunes the
    /// tree's branch left empty). Past `max_retained` or `max_retained_bytes` a new one is not
    /// kept (and the topic's earlier one is cleared), counted, and logged at most every 10 s.
    func retain(_ message: Message) {
        let topic = message.topic
        guard message.payload.readableBytes > 0 else { return retained.remove(topic: topic) }
        guard case .refused(let cleared) = retained.set(topic: topic, message.compacted(), within: configuration.limits.retainedLimits) else { return }
        let refused = retainedRefused.add(1, ordering: .relaxed).newValue
        let now = NIODeadline.now().uptimeNanoseconds
        let last = retainedWarnedAt.load(ordering: .relaxed)
        guard last == 0 || now - last >= 10_000_000_000,
            retainedWarnedAt.compareExchange(expected: last, desired: now, ordering: .relaxed).exchanged
        else { return }
        let l = configuration.limits
        logger.warning(
            "retained messages at their limit (max_retained = \(l.maxRetained), max_retained_bytes = \(l.maxRetainedBytes); \(retained.heldBytes) bytes held): \"\(LogText(topic.string))\" not kept\(cleared ? ", its earlier retained message cleared" : "") (the message is delivered; \(refused) refused since start; logged at most every 10 s)")
    }

    /// The retained messages `filter` matches, parent topics before their children. The walk
    /// follows the filter through the tree, so it costs what it matches; it is done in chunks
    /// of `retainedScanChunk` nodes, each under the lock, so a wide filter (`#` over many
    /// retained messages) never holds the lock for long and retained publishes on other workers
    /// go on between chunks. A message set or cleared during the walk may or may not be seen.
    /// (A session walks them in steps itself: `Session.sendRetained`.)
    func retainedMessages(matching filter: TopicFilter) -> [Message] {
        var scan = retained.scan(matching: filter)
        var found: [Message] = []
        while !scan.isDone { found += retained.continueScan(&scan, limit: Self.retainedScanChunk) }
        return found
    }

    // MARK: - Introspection (tests, logs)

    /// The worker that owns the session of `clientID`, if there is one.
    func owner(ofClient clientID: String) -> Int? {
        registry.session(for: clientID)?.owner
    }

    /// The ports the listeners bound, in listener order (as `start()` returned them; a broker run
    /// as a `Service` is asked here).
    public var boundPorts: [Int] { serverChannels.withLock { $0.compactMap { $0.localAddress?.port } } }

    /// Whether `start()` has been called.
    public var isStarted: Bool { started.load(ordering: .acquiring) }

    /// Gives memory that the workers freed back to the system, at most every 10 s (a worker's
    /// sweep calls it when something was let go there). glibc keeps what is freed in the middle
    /// of its heaps for reuse: after a burst of large messages, or a storm of connections gone,
    /// the resident size would stay at its peak. `malloc_trim` takes a few milliseconds on the
    /// calling worker. Whether it did (not within 10 s of the last).
    func returnFreedMemory(now: NIODeadline) -> Bool {
        let last = lastMemoryTrim.load(ordering: .relaxed)
        let nanoseconds = now.uptimeNanoseconds
        guard nanoseconds >= last + 10_000_000_000 || last == 0,
            lastMemoryTrim.compareExchange(expected: last, desired: nanoseconds, ordering: .relaxed).exchanged
        else { return false }
        malloc_trim(0)
        return true
    }

    /// Number of client connections open now.
    public var openConnections: Int { connectionCount.load(ordering: .relaxed) }
    /// Connection handlers still in memory: open connections, and closed ones not yet freed.
    public var connectionObjectCount: Int { connectionObjects.load(ordering: .relaxed) }
    /// Messages dropped for slow subscribers since start.
    public var droppedMessageCount: Int { sessionContext.droppedMessages.load(ordering: .relaxed) }
    /// Number of retained messages held.
    public var retainedCount: Int { retained.count }
    /// Nodes of the retained topic tree (tests: cleared branches are pruned).
    public var retainedNodeCount: Int { retained.nodeCount }
    /// Nodes of the subscription trie (tests: emptied branches are pruned).
    public var subscriptionNodeCount: Int { subscriptions.nodeCount }
}

/// A listener that could not be bound (address in use, no such host or interface, no permission).
public struct ListenError: Error, CustomStringConvertible {
    /// Position of the listener in the configuration.
    public var index: Int
    public var address: ListenAddress
    public var underlying: any Error

    public var description: String { "cannot listen on \(address): \(underlying)" }
}
