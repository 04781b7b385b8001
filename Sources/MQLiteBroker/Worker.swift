import Logging
import MQTTCore
import NIOCore
import Synchronization

/// One event loop of the broker and what belongs to it: its connections, its route cache, the
/// set of connections with output waiting for a flush, and a mailbox through which other loops
/// hand it deliveries for sessions it owns.
///
/// Only `post` may be called from other threads; everything else runs on `loop`.
final class Worker: @unchecked Sendable {
    let index: Int
    let loop: any EventLoop
    /// Strong, so that reading it costs nothing on the hot path. The broker and its workers live
    /// and go together: `Broker.shutdown()` (or `stopLoops()`) breaks the cycle once the loops
    /// have stopped.
    let broker: Broker

    /// Deliveries from other loops, and the publishers waiting for them to drain: one lock, so
    /// that a waiter cannot register between a drain and its wake-up and then wait for ever.
    private let mailbox = Mutex<Mailbox>(Mailbox())
    private struct Mailbox: ~Copyable {
        var items: [(Session, Delivery)] = []
        var drainWaiters: [@Sendable () -> Void] = []
    }
    /// Filters whose subscriptions changed since this worker's route cache last looked (another
    /// worker's SUBSCRIBE, UNSUBSCRIBE or session end). Only the routes they match are dropped.
    private let changedFilters = Mutex<ChangedFilters>(ChangedFilters())
    private let hasChangedFilters = Atomic<Bool>(false)

    // MARK: Loop-only state
    private var dirty: [ConnectionHandler] = []
    private var flushScheduled = false
    /// Inside a batch whose end flushes (one connection's reads, or a mailbox drain).
    private var inBatch = false
    private var routeCache: [TopicName: Route] = [:]
    /// The mailbox's items while a drain handles them: swapped with the mailbox's array under
    /// the lock, so that neither is reallocated once both have grown.
    private var draining: [(Session, Delivery)] = []
    /// Deliveries of the current publish for sessions owned by other workers, by worker: posted
    /// once per publish and worker, one lock each, however many sessions they are for.
    private var outgoing: [[(Session, Delivery)]]
    /// Changed filters taken from `changedFilters`, kept for their capacity.
    private var changedScratch = ChangedFilters()
    /// Its open connections: a set of references (one word an entry, where a dictionary by
    /// identifier took two: memory per idle connection).
    var connections = Set<Connection>()
    struct Connection: Hashable {
        let handler: ConnectionHandler
        static func == (a: Self, b: Self) -> Bool { a.handler === b.handler }
        func hash(into hasher: inout Hasher) { hasher.combine(ObjectIdentifier(handler)) }
    }
    /// Memory was let go here since the last sweep (a connection closed):
    /// the sweep may give it back to the system (`Broker.returnFreedMemory`).
    var freedMemory = false
    /// Messages hooks rewrote to a topic over max_topic_levels, dropped: a line at most every 10 s.
    var hookTopicDrops = LogThrottle()

    /// Logs a message a hook rewrote to a topic over max_topic_levels (at most a line every 10 s:
    /// every message of a topic can make one).
    func logHookTopicDrop(_ topic: TopicName, hook: String, limit: Int, logger: @autoclosure () -> Logger) {
        guard let count = hookTopicDrops.due() else { return }
        let error = MQTTProtocolError.tooManyTopicLevels(levels: topic.levelCount, limit: limit)
        logger().info("\(hook) hook produced an invalid topic \"\(LogText(topic.string))\": \(LogText(error.description)); \(count) such messages dropped since the last line")
    }
    /// Persistent sessions owned here with no connection, for `session_expiry`.
    var offlineSessions: [ObjectIdentifier: Session] = [:]
    /// Persistent sessions offline that never expire: not swept, only counted in the stats
    /// (`statsPart`: what they hold queued and in flight).
    var lastingSessions: [ObjectIdentifier: Session] = [:]
    /// This worker's counters for metrics and `$SYS`: plain integers, summed when scraped.
    var stats: WorkerStats

    /// What this worker knows about a topic: its subscribers, and whether publish hooks want
    /// it. Valid until a filter matching the topic changes its subscribers (then the route is
    /// dropped from the cache) or the hooks are reloaded. A class: what each publish gets from
    /// the cache is one reference, not a copy of each of its arrays.
    final class Route: Sendable {
        let hookGeneration: Int
        let targets: [(session: Session, grant: Grant)]
        let hooked: Bool
        /// Shared subscriptions' groups: one member of each gets the message.
        let groups: [SharedGroup]
        /// Delivery hooks want the topic (`BrokerHooks.isDeliverHooked`).
        let deliverHooked: Bool
        /// A store keeps sessions and one of the subscribers may be such a session (persistent,
        /// or in a shared group): with `sync = "full"`, a QoS 1/2 message's acknowledgement
        /// waits for the commit (`Broker.committed(after:)`).
        let persists: Bool

        init(
            hookGeneration: Int, targets: [(session: Session, grant: Grant)], hooked: Bool, groups: [SharedGroup],
            deliverHooked: Bool, persists: Bool
        ) {
            self.hookGeneration = hookGeneration
            self.targets = targets
            self.hooked = hooked
            self.groups = groups
            self.deliverHooked = deliverHooked
            self.persists = persists
        }

        /// A topic nobody subscribes to and no hook wants (not cached: one object for them all).
        static let nowhere = Route(hookGeneration: 0, targets: [], hooked: false, groups: [], deliverHooked: false, persists: false)
    }

    private static let routeCacheLimit = 10_000
    /// Bytes the route cache may hold: its keys are copies of topics, and each route lists its
    /// subscribers, so long topics and crowded ones fill it sooner.
    private static let routeCacheByteLimit = 8 << 20
    private var routeCacheBytes = 0

    private static func routeCost(topic: TopicName, route: Route) -> Int {
        64 + topic.count + route.targets.count * MemoryLayout<(session: Session, grant: Grant)>.stride + route.groups.count * 8
    }

    init(index: Int, loop: any EventLoop, broker: Broker, workerCount: Int) {
        self.index = index
        self.loop = loop
        self.pacing = ConnectPacing(loop: loop)
        self.broker = broker
        self.outgoing = Array(repeating: [], count: workerCount)
        self.stats = WorkerStats(listeners: broker.configuration.listeners.count)
        self.mailboxHighWater = max(4, min(4096, broker.configuration.limits.maxQueued / 4))
        self.decoder = MQTTDecoder(
            maxPacketSize: broker.configuration.limits.maxPacketSize, maxTopicLevels: broker.configuration.limits.maxTopicLevels,
            acceptedVersions: .all)
    }

    /// Spreads a storm of CONNECTs over this loop's ticks.
    let pacing: ConnectPacing

    /// The packet decoder, with the configured limits; it keeps no state between packets, so the
    /// worker's connections share it rather than each holding a copy.
    let decoder: MQTTDecoder

    // MARK: - Mailbox

    /// Hands a delivery for a session owned by this worker. Any thread. The loop is woken once per
    /// batch: only the post that finds the mailbox empty schedules a drain.
    /// Returns whether the mailbox is over its high-water mark (the publisher should hold back).
    @discardableResult
    func post(_ session: Session, _ delivery: Delivery) -> Bool {
        let count = mailbox.withLock { box in
            box.items.append((session, delivery))
            return countChanged(box)
        }
        return posted(count: count, added: 1)
    }

    /// Hands several deliveries at once, under one hold of the lock; empties `batch`, keeping
    /// its capacity. Any thread.
    @discardableResult
    func post(batch: inout [(Session, Delivery)]) -> Bool {
        let added = batch.count
        let count = mailbox.withLock { box in
            box.items.append(contentsOf: batch)
            return countChanged(box)
        }
        batch.removeAll(keepingCapacity: true)
        return posted(count: count, added: added)
    }

    /// Publishes the count for `mailboxIsFull`, under the lock: stored after it, a post's count
    /// could land after the drain that emptied the mailbox, and stay.
    private func countChanged(_ box: borrowing Mailbox) -> Int {
        let count = box.items.count
        mailboxCount.store(count, ordering: .relaxed)
        return count
    }

    private func posted(count: Int, added: Int) -> Bool {
        if count == added { loop.execute { self.drainMailbox() } }
        return count > mailboxHighWater
    }

    /// Deliveries waiting in the mailbox (as of the last post or drain).
    private let mailboxCount = Atomic<Int>(0)
    /// Past this many waiting deliveries publishers on other workers hold back (a quarter of
    /// max_queued, so that one drain cannot overflow a queue), until it is under a quarter of that.
    private let mailboxHighWater: Int
    private var mailboxLowWater: Int { mailboxHighWater / 4 }

    /// Whether the mailbox is over its low-water mark.
    var mailboxIsFull: Bool { mailboxCount.load(ordering: .relaxed) > mailboxLowWater }

    /// Runs `wake` once the mailbox is under its low-water mark: at once (on this thread) if it
    /// is already, else on the draining thread.
    func whenMailboxDrains(_ wake: @escaping @Sendable () -> Void) {
        let lowWater = mailboxLowWater
        let now = mailbox.withLock { box in
            if box.items.count <= lowWater { return true }
            box.drainWaiters.append(wake)
            return false
        }
        if now { wake() }
    }

    private func drainMailbox() {
        beginBatch()
        defer { flushDirty() }
        assertOnLoop()
        let waiters = mailbox.withLock { box in
            swap(&box.items, &draining)
            mailboxCount.store(0, ordering: .relaxed)
            guard !box.drainWaiters.isEmpty else { return [@Sendable () -> Void]() }
            defer { box.drainWaiters.removeAll() }
            return box.drainWaiters
        }
        defer {
            draining.removeAll(keepingCapacity: true)
            // After the deliveries: a publisher woken now sees the queues they filled.
            for wake in waiters { wake() }
        }
        // A publish to several sessions here posts them one after another: the first that
        // queues the message compacts it, and the others share that copy.
        var shared: (source: Message, kept: Message)?
        for (session, var delivery) in draining {
            let owner = session.owner
            if owner == index {
                if delivery.group != nil, handOnShared(delivery, from: session) { continue }
                let original = delivery.message
                if let shared, original.isSame(as: shared.source) { delivery.message = shared.kept }
                if let kept = session.deliver(delivery) { shared = (original, kept) }
            } else {
                // The session moved while this was in the mailbox.
                broker.workers[owner].post(session, delivery)
            }
        }
    }

    /// A shared subscription's delivery that reached its member through the mailbox after the
    /// member's client went (while the delivery was on its way): another member takes it, a
    /// connected one (or any, if the session is discarded). Whether it was handed on.
    private func handOnShared(_ delivery: Delivery, from session: Session) -> Bool {
        guard let group = delivery.group, session.ended || !session.isOnline,
              let member = group.pick(excluding: session), member.session.isOnline || session.ended else { return false }
        var delivery = delivery
        delivery.qos = min(delivery.qos, member.grant.qos)
        deliver(delivery, to: member.session)
        return true
    }

    /// Hands `delivery` to `session`, on this worker or through its owner's mailbox.
    func deliver(_ delivery: Delivery, to session: Session) {
        let owner = session.owner
        if owner == index {
            _ = session.deliver(delivery)
        } else {
            broker.workers[owner].post(session, delivery)
        }
    }

    // MARK: - Timeouts

    /// Checks every connection's connect timeout and keep-alive every `period` (one task per
    /// worker, as Mosquitto checks in its loop, instead of a timer per connection).
    ///
    /// A sweep that runs late (the loop or the process was stalled) closes nothing: the packets
    /// that kept those clients alive may be waiting, unread, behind it. The next one decides.
    func startTimeoutSweep(every period: TimeAmount) {
        var last = NIODeadline.now()
        loop.scheduleRepeatedTask(initialDelay: period, delay: period) { _ in
            let now = NIODeadline.now()
            let late = now - last > period * 2
            last = now
            for connection in self.connections { connection.handler.checkTimeouts(now: now, closing: !late) }
            if !late { self.expireSessions(now: now) }
            // (Still pending while another trim was too recent: a later sweep does it.)
            if self.freedMemory, self.broker.returnFreedMemory(now: now) { self.freedMemory = false }
        }
    }

    // MARK: - Offline sessions

    /// A persistent session lost its connection (owner loop).
    func sessionWentOffline(_ session: Session, since: NIODeadline = .now()) {
        assertOnLoop()
        let expiry = session.expiry ?? broker.configuration.limits.sessionExpiry
        guard expiry != .zero, expiry != Session.neverExpires else {
            lastingSessions[ObjectIdentifier(session)] = session
            return
        }
        session.offline = (since, session.latestClaim)
        offlineSessions[ObjectIdentifier(session)] = session
    }

    /// A session is being taken over by a connection (owner loop, before it moves or attaches).
    func sessionClaimed(_ session: Session) {
        assertOnLoop()
        lastingSessions[ObjectIdentifier(session)] = nil
        guard session.offline != nil else { return }
        session.offline = nil
        offlineSessions[ObjectIdentifier(session)] = nil
    }

    /// Removes persistent sessions offline for longer than `session_expiry` (or their own expiry).
    private func expireSessions(now: NIODeadline) {
        guard !offlineSessions.isEmpty else { return }
        let configured = broker.configuration.limits.sessionExpiry
        for (id, session) in offlineSessions {
            // (A session that moved to another worker is that worker's to expire.)
            guard session.owner == index else {
                offlineSessions[id] = nil
                continue
            }
            guard let offline = session.offline, now - offline.since >= session.expiry ?? configured else { continue }
            offlineSessions[id] = nil
            session.offline = nil
            broker.expire(session, claim: offline.claim, worker: self)
        }
    }

    // MARK: - Output batching

    /// Starts a batch (a connection's reads, a mailbox drain) that ends with `flushDirty()`.
    func beginBatch() {
        assertOnLoop()
        inBatch = true
        hookTurnStart = nil
    }

    /// When this turn's (a read's) first hooked PUBLISH was handled: a client whose packets keep
    /// the publish hooks busy `hookTurnBudget` past it lets the others go first
    /// (`ConnectionHandler.yieldIfHooksTookTheTurn`).
    var hookTurnStart: NIODeadline?
    /// A read of 256 KiB of small PUBLISHes runs thousands of hook calls: at 1 ms each, a client
    /// flooding a hooked topic held its worker for 25 s.
    static let hookTurnBudget = TimeAmount.milliseconds(10)

    /// Registers a connection with unflushed output. Inside a batch, the batch's end flushes it;
    /// output from anywhere else (timers, takeover, a completed session hand-over) is flushed by
    /// one task, once the loop has handled its current events.
    func markDirty(_ connection: ConnectionHandler) {
        assertOnLoop()
        dirty.append(connection)
        if !inBatch && !flushScheduled {
            flushScheduled = true
            loop.execute { self.flushDirty() }
        }
    }

    /// Ends the current batch and flushes every connection with output waiting.
    func flushDirty() {
        inBatch = false
        flushScheduled = false
        if dirty.isEmpty { return }
        let batch = dirty
        dirty.removeAll(keepingCapacity: true)
        for connection in batch { connection.flushOutput() }
    }

    // MARK: - Publishing

    /// Stores or clears a retained message, then routes the message to every matching
    /// subscriber. On this worker's loop.
    /// (`retaining`: false when the retained message was kept already.)
    func publish(_ message: Message, retaining: Bool = true) {
        publish(message, along: route(for: message.topic), retaining: retaining)
    }

    /// As `publish(_:)`, with the route already looked up. Returns whether a subscriber's queue
    /// or a mailbox is filling up (then `isCongested` tells whether to hold the publisher back).
    @discardableResult
    func publish(_ message: Message, along route: Route, from publisher: Session? = nil, retaining: Bool = true) -> Bool {
        assertOnLoop()
        if retaining && message.retain {
            broker.retain(message)
            // A retained message cleared: memory the sweep may give back (without this, only
            // when a connection closed: 1 GB of cleared deep retained messages stayed held).
            if message.payload.readableBytes == 0 { freedMemory = true }
        }
        let targets = route.targets
        if targets.isEmpty && route.groups.isEmpty { return false }
        var filling = false
        // One delivery, changed per subscriber (its QoS, RETAIN flag and frame), rather than one
        // made per subscriber: the message is copied into it once per publish. Once a session
        // queues the message, the others get the compacted copy it kept.
        var delivery = Delivery(message: message, qos: message.qos, retain: false, frame: nil, hooked: route.deliverHooked)
        var qos0Frame: ByteBuffer?
        for target in targets {
            let grant = target.grant
            // The subscriber's own message: not through its No Local subscriptions (MQTT 5).
            let local = target.session === publisher
            if local && grant.noLocal { continue }
            delivery.qos = min(message.qos, local ? grant.localQoS : grant.qos)
            // RETAIN is 0 on live messages, unless the subscription asks for it as published (MQTT 5).
            delivery.retain = (local ? grant.localRetainAsPublished : grant.retainAsPublished) && message.retain
            delivery.local = local
            // One frame shared by all QoS 0 subscribers; a lone subscriber has its frame encoded
            // straight into its batch buffer instead (no frame of its own to allocate).
            if delivery.qos == .atMostOnce && targets.count > 1 && !delivery.retain {
                if qos0Frame == nil { qos0Frame = message.encodeQoS0Frame() }
                if delivery.frame == nil { delivery.frame = qos0Frame }
            } else if delivery.frame != nil {
                delivery.frame = nil
            }
            let owner = target.session.owner
            if owner == index {
                if let kept = target.session.deliver(delivery) { delivery.message = kept }
            } else {
                outgoing[owner].append((target.session, delivery))
            }
            if target.session.mayBeCongested { filling = true }
        }
        for group in route.groups {
            guard let member = group.pick() else { continue }
            let qos = min(message.qos, member.grant.qos)
            // The group goes with the message, so that another member gets it if this one goes
            // (and the member's Subscription Identifier is that subscription's).
            let shared = Delivery(
                message: delivery.message, qos: qos, retain: member.grant.retainAsPublished && message.retain, frame: nil,
                hooked: route.deliverHooked, group: group)
            let owner = member.session.owner
            if owner == index {
                if let kept = member.session.deliver(shared) { delivery.message = kept }
            } else {
                outgoing[owner].append((member.session, shared))
            }
            if member.session.mayBeCongested { filling = true }
        }
        for owner in outgoing.indices where !outgoing[owner].isEmpty {
            if broker.workers[owner].post(batch: &outgoing[owner]) { filling = true }
        }
        return filling
    }

    /// Whether a publisher to `targets` should wait: a mailbox of another worker is over its
    /// low-water mark (always), or one of the subscribers (not its own session) is congested (only
    /// while `subscribers`: `Session.mayBeHeldBack`).
    /// Why a publisher to `targets` should wait: another worker's mailbox full (`firm`), or the
    /// most pressing congestion among the subscribers (those on their allowance only when
    /// `allowance`: the publisher has some of its own budget left).
    func congestion(
        _ targets: [(session: Session, grant: Grant)], excluding own: Session?, subscribers: Bool, allowance: Bool, now: NIODeadline
    ) -> Session.Congestion {
        if broker.workers.contains(where: { $0 !== self && $0.mailboxIsFull }) { return .firm }
        guard subscribers else { return .none }
        var found = Session.Congestion.none
        for target in targets where target.session !== own {
            switch target.session.congestion(now: now) {
            case .firm: return .firm
            case .allowance where allowance: found = .allowance
            default: break
            }
        }
        return found
    }

    /// The route of a topic, from this worker's cache while its subscribers and the hooks are
    /// unchanged: one hash lookup per publish covers both "who subscribes" and "is it hooked".
    /// The lookup hashes the topic's precomputed 32-bit hash, not its bytes.
    func route(for topic: TopicName) -> Route {
        assertOnLoop()
        if hasChangedFilters.load(ordering: .acquiring) { dropChangedRoutes() }
        let hookGeneration = broker.hooks.publishHookGeneration
        if let cached = routeCache[topic], cached.hookGeneration == hookGeneration {
            return cached
        }
        let targets = broker.matchSubscribers(topic: topic)
        let groups = broker.sharedGroups(matching: topic)
        let hooked = broker.hooks.isPublishHooked(topic: topic, worker: index)
        let goesSomewhere = !targets.isEmpty || !groups.isEmpty
        // A topic that goes nowhere is not kept: a client cycling through distinct topics nobody
        // wants would only fill the cache.
        if !goesSomewhere && !hooked { return .nowhere }
        let route = Route(
            hookGeneration: hookGeneration, targets: targets, hooked: hooked, groups: groups,
            deliverHooked: goesSomewhere && broker.hooks.isDeliverHooked(topic: topic, worker: index),
            persists: broker.store != nil && (!groups.isEmpty || targets.contains { $0.session.persistent }))
        let cost = Self.routeCost(topic: topic, route: route)
        if routeCache.count >= Self.routeCacheLimit || routeCacheBytes + cost > Self.routeCacheByteLimit {
            clearRouteCache()
        }
        // The key is copied so that the cache does not pin the read buffer.
        if let replaced = routeCache.updateValue(route, forKey: topic.copied()) {
            routeCacheBytes -= Self.routeCost(topic: topic, route: replaced)
        }
        routeCacheBytes += cost
        return route
    }

    /// Whether the route of `topic` is in the cache (tests).
    func hasCachedRoute(for topic: String) -> Bool {
        if hasChangedFilters.load(ordering: .acquiring) { dropChangedRoutes() }
        guard let name = try? TopicName(topic) else { return false }
        return routeCache[name] != nil
    }

    private func clearRouteCache() {
        routeCache.removeAll(keepingCapacity: true)
        routeCacheBytes = 0
    }

    // MARK: - Route invalidation

    /// Filters whose subscribers changed, as a worker's route cache must hear of them.
    struct ChangedFilters {
        /// Filters without wildcards: the one topic each matches, dropped by one lookup.
        var exact: [TopicName] = []
        /// Filters with wildcards: every cached topic is matched against them.
        var wildcard: [TopicFilter] = []
        /// Too many to handle one by one: drop the whole cache.
        var overflow = false

        static let limit = 1024

        var isEmpty: Bool { exact.isEmpty && wildcard.isEmpty && !overflow }

        mutating func add(_ filter: TopicFilter) {
            guard !overflow else { return }
            if exact.count + wildcard.count >= Self.limit {
                overflow = true
                exact.removeAll()
                wildcard.removeAll()
            } else if let name = filter.exactName {
                exact.append(name)
            } else {
                wildcard.append(filter)
            }
        }

        mutating func removeAll() {
            exact.removeAll(keepingCapacity: true)
            wildcard.removeAll(keepingCapacity: true)
            overflow = false
        }
    }

    /// Tells this worker that the subscribers of `filters` changed: the routes of the topics they
    /// match are stale. Any thread; called after the subscription index changed, so a route
    /// looked up after this worker has dropped them sees the change.
    func subscriptionsChanged<Filters: Sequence<TopicFilter>>(_ filters: Filters) {
        changedFilters.withLock { changed in
            for filter in filters { changed.add(filter) }
        }
        hasChangedFilters.store(true, ordering: .releasing)
    }

    /// Matching a wildcard filter against every cached topic costs this many topic matches at
    /// most per drop; past it the cache is emptied instead.
    private static let wildcardScanLimit = 50_000

    /// Drops the cached routes that changed filters match (on the loop, before a lookup).
    private func dropChangedRoutes() {
        hasChangedFilters.store(false, ordering: .releasing)
        changedFilters.withLock { swap(&$0, &changedScratch) }
        defer { changedScratch.removeAll() }
        if routeCache.isEmpty { return }
        if changedScratch.overflow || changedScratch.wildcard.count * routeCache.count > Self.wildcardScanLimit {
            return clearRouteCache()
        }
        for topic in changedScratch.exact {
            if let dropped = routeCache.removeValue(forKey: topic) { routeCacheBytes -= Self.routeCost(topic: topic, route: dropped) }
        }
        guard !changedScratch.wildcard.isEmpty else { return }
        let filters = changedScratch.wildcard
        let stale = routeCache.keys.filter { topic in filters.contains { $0.matches(topic) } }
        for topic in stale {
            if let dropped = routeCache.removeValue(forKey: topic) { routeCacheBytes -= Self.routeCost(topic: topic, route: dropped) }
        }
    }

    // MARK: - Checks

    /// In debug builds: traps unless called on this worker's loop.
    @inline(__always)
    func assertOnLoop(file: StaticString = #fileID, line: UInt = #line) {
        loop.assertInEventLoop(file: file, line: line)
    }
}
