import DequeModule
import Logging
import MQTTCore
import NIOCore
import Synchronization

/// Where a session's messages go: a client's connection today; a bridge link, `$SYS` or a test
/// sink as well. The session decides what is sent and when (window, queue, retained walk, packet
/// ids); the outbound only writes. Called on the session's owner loop only.
protocol SessionOutbound: AnyObject {
    /// Whether it can take more now (else deliveries wait in the session's queue).
    var canWrite: Bool { get }
    func writePublish(_ message: Message, qos: QoS, packetID: UInt16?, retain: Bool, dup: Bool)
    /// A QoS 0 PUBLISH frame shared by every QoS 0 subscriber of one publish
    /// (`Message.encodeQoS0Frame`, 3.1.1's layout); `message`'s payload goes out after it when the
    /// frame leaves it out. An MQTT 5 client's outbound writes `message` in its own layout instead.
    func writeQoS0(frame: ByteBuffer, message: Message)
    func writePubrel(packetID: UInt16)
    /// Asks for `Session.pump` again once the loop has served others: in a later tick, after
    /// its poll of the sockets (`ConnectPacing.later`).
    func pumpSoon()
    /// A newer connection takes the session over: let go of it and close, publishing the will
    /// or not.
    func takenOver(publishWill: Bool)
    /// A plugin closes the client (`Broker.disconnect`): close, publishing the will.
    func disconnect(reason: String)
    /// The access rules may have changed (a reload, `Broker.reauthorize`): ask the hooks again,
    /// and drop the subscriptions the new rules no longer allow.
    func reauthorize()
    /// A delivery whose topic delivery hooks want, as it goes out: the message to send (changed
    /// or not), or nil for none.
    func interceptDelivery(_ message: Message) -> Message?
}

/// What happened to a session, for whoever must follow it (`SessionObserver`): the single tap a
/// store keeping sessions across restarts uses. Reported on the session's owner loop, after the
/// change. A QoS 1/2 message owed to a session that a store keeps (`Session.isStored`) has a
/// sequence number of the session's (`Delivery.seq`, never 0), which names it from the moment it
/// is queued or sent until it is acknowledged or dropped; the message events are reported for
/// numbered messages only (and inbound QoS 2 ids of stored sessions), so that a clean session's
/// messages cost nothing here.
enum SessionEvent {
    /// A connection took the session (made or resumed), its expiry set.
    case attached
    case subscribed(filter: TopicFilter, grant: Grant, identifier: UInt32?)
    case unsubscribed(filter: TopicFilter)
    /// The names the client used for filters an `on_subscribe` hook rewrote changed.
    case renamed
    /// A message was kept in the queue for later (offline, window full, or the socket full).
    case queued(Delivery)
    /// A QoS 1/2 message went out with `packetID` and waits for its acknowledgement; `queued`:
    /// it was queued before (with the same `seq`).
    case inflightAdded(packetID: UInt16, Delivery, queued: Bool)
    /// PUBREC came for a QoS 2 message: only its PUBREL/PUBCOMP remain.
    case released(packetID: UInt16, seq: UInt64)
    /// The in-flight message with this id is done (PUBACK, or PUBCOMP).
    case acknowledged(packetID: UInt16, seq: UInt64)
    /// A queued message left the queue without being sent: expired, too large for the client,
    /// held back by a hook or the ACL, or its subscription revoked.
    case discarded(seq: UInt64)
    /// A message of a shared subscription, queued or in flight, went to another member of its
    /// group: this session's connection went away before it was acknowledged.
    case handedOver(seq: UInt64)
    /// An inbound QoS 2 id awaits its PUBREL (`awaiting`), or no longer does.
    case inboundQoS2(packetID: UInt16, awaiting: Bool)
    /// Its connection went away; a persistent session stays.
    case detached
    /// Offline past `session_expiry`: it is discarded next (`ended`).
    case expired
    /// Discarded: clean session, taken over by a clean session, or expired.
    case ended
}

/// Follows every session's changes (`SessionEvent`). Called on the session's owner loop, so an
/// implementation must hand work elsewhere itself and not block.
protocol SessionObserver: Sendable {
    func session(_ session: Session, _ event: SessionEvent)
}

/// What a session needs from the broker around it, given once, when the session is made: the
/// limits, the log, whoever follows session changes, the retained messages (sent on SUBSCRIBE),
/// which topics delivery hooks want, the count of messages dropped for slow subscribers, and (for
/// the owner check of debug builds) each worker's loop. A session knows nothing else of the
/// broker: a test, a bridge link or `$SYS` makes sessions on a context of its own.
final class SessionContext: Sendable {
    let limits: Limits
    let logger: Logger
    /// Told of every session change (a store of sessions would be one); nil: nobody listens.
    let observer: (any SessionObserver)?
    let retained: any RetainedStore
    let hooks: any BrokerHooks
    /// Messages dropped for subscribers that could not keep up, since start.
    let droppedMessages = Atomic<Int>(0)
    /// Messages not sent because they were larger than the receiver's Maximum Packet Size (an
    /// MQTT 5 client's, or a bridge's remote's), since start.
    let droppedTooLarge = Atomic<Int>(0)
    /// The loop of each worker, by index (`Session.owner`); empty: the owner is not checked.
    let loops: [any EventLoop]

    init(
        limits: Limits, logger: Logger, observer: (any SessionObserver)? = nil,
        retained: any RetainedStore = TreeRetainedStore(), hooks: any BrokerHooks = NoHooks(), loops: [any EventLoop] = []
    ) {
        self.limits = limits
        self.logger = logger
        self.observer = observer
        self.retained = retained
        self.hooks = hooks
        self.loops = loops
    }
}

/// What an MQTT 5 client's CONNECT asked of what the broker sends it (nil, 0: nothing).
struct ClientLimits {
    var receiveMaximum: Int?
    var maximumPacketSize: Int?
    var topicAliasMaximum = 0
}

/// A client id, immutable: what the session registry hashes a session by (`Session` is one; a
/// lookup makes a bare one for the id it looks for).
class ClientIdentity: @unchecked Sendable {
    let clientID: String

    init(clientID: String) { self.clientID = clientID }
}

/// The state the broker keeps for one client id: subscriptions, outgoing QoS 1/2 messages in
/// flight, the queue of messages not yet sent, and inbound QoS 2 ids awaiting PUBREL. It sends
/// through a `SessionOutbound` (nil while offline) and reports its changes as `SessionEvent`s.
///
/// Everything but `owner` is touched only on the event loop of the worker that owns the session
/// (that is why it is `@unchecked Sendable`). A session moves to another worker only when a client
/// reconnects there with clean session 0, and only after its old connection has been detached.
final class Session: ClientIdentity, @unchecked Sendable {
    struct Inflight {
        var id: UInt16
        var message: Message
        var qos: QoS
        var retain: Bool
        /// QoS 2: PUBREC came and PUBREL was sent; waiting for PUBCOMP.
        var released: Bool
        /// Sent through a shared subscription of this group.
        var group: SharedGroup?
        /// Its number while a store keeps the session (`SessionEvent`); 0 otherwise.
        var seq: UInt64 = 0
        /// To be sent again on this connection once its window has room (`resume`).
        var owed = false
        /// As `Delivery.local`.
        var local = false
    }

    let context: SessionContext
    /// (32 bits, as `claims`: the two share a word.)
    private let ownerIndex: Atomic<Int32>
    /// Bumped by every CONNECT that claims this client id (under the registry lock): a connection
    /// may attach only while its claim is the latest, so exactly one, the newest, ends up attached.
    private let claims = Atomic<UInt32>(0)

    // MARK: Owner-loop state
    /// Where messages go now; nil while no connection (or link) holds the session.
    var outbound: (any SessionOutbound)? {
        didSet { online.store(outbound != nil, ordering: .relaxed) }
    }
    var isOnline: Bool { online.load(ordering: .relaxed) }
    var isBacklogged: Bool { backlogged.load(ordering: .relaxed) }

    /// After the queue changed: whether it has a backlog now.
    private func queueChanged() {
        let now = !queueIsEmpty
        if backlogged.load(ordering: .relaxed) != now { backlogged.store(now, ordering: .relaxed) }
    }
    /// Filter (compared byte for byte) → granted QoS.
    var subscriptions: [TopicFilter: QoS] = [:]
    private(set) var inflight: [Inflight] = []
    /// Messages waiting to be sent, oldest first. In `occasional` (most sessions never queue, and
    /// an idle connection should cost little); a change makes it.
    private(set) var queue: Deque<Delivery> {
        get { occasional?.queue ?? [] }
        _modify { yield &more.queue }
    }
    /// (Without a copy of the queue.)
    private var queueIsEmpty: Bool { occasional?.queue.isEmpty ?? true }
    /// Until when (uptime nanoseconds) this session counts as congested; 0 when it is not. The
    /// lowest bit set: on its allowance, not on time it earned (`Congestion`). Read by other
    /// workers' publish paths, so it is here rather than in `occasional`.
    private let congestedUntil = Atomic<UInt64>(0)
    private var occasional: Occasional?
    private var lastPacketID: UInt16 = 0
    /// Ids given in turn since nothing was in flight: while fewer than 65,535, the next one
    /// cannot be in use. `UInt16.max` after a restore (ids from a store, in unknown order).
    private var packetIDRun: UInt16 = 0
    /// Clean session 0 (MQTT 5: a session expiry interval over 0): kept after disconnect,
    /// queueing QoS 1/2 messages. Read by other threads (a CONNECT deciding whether to resume
    /// it); changed on the owner loop by an MQTT 5 client (`setExpiry`).
    var persistent: Bool { persistence.load(ordering: .relaxed) }
    private let persistence: Atomic<Bool>
    /// Set when the session is discarded; deliveries that still arrive are ignored.
    var ended = false
    /// Whether an outbound holds the session, for other threads (`Broker.disconnect`). Last, with
    /// the other one-byte fields, so that the object stays in a 112-byte malloc class.
    private let online = Atomic<Bool>(false)
    /// Whether messages wait in the queue, for other workers: a shared subscription's group
    /// passes over a member with a backlog while another member has none.
    private let backlogged = Atomic<Bool>(false)

    /// What most sessions never need: a queue's accounting and congestion, an ACL that restricts
    /// receiving, an offline session's expiry, retained messages still to send, inbound QoS 2
    /// ids (most clients publish at QoS 0 or 1). Made on first
    /// use, so that the session of an idle connection stays small (one malloc size class of 112
    /// bytes instead of 224).
    private final class Occasional {
        var queue = Deque<Delivery>()
        /// Topic and payload bytes of the queued messages (for `max_queued_bytes`).
        var queuedBytes = 0
        /// When the queue last moved (or started to fill after being empty).
        var lastProgress = NIODeadline.distantPast
        /// When the current episode over half the budget began.
        var congestionStart: NIODeadline?
        /// How long this session held publishers back in the `holdBackWindow` begun then, less
        /// what it earned by draining its queue meanwhile (`holdBackEarnedPerByte`).
        var congestionUsed = TimeAmount.zero
        var congestionWindowStart = NIODeadline.distantPast
        /// Messages dropped since the queue last drained (for one log line per episode).
        var droppedInEpisode = 0
        var receiveACL: ClientACL?
        var receiveVerdicts: [TopicName: Bool] = [:]
        var offline: (since: NIODeadline, claim: Int)?
        var expiry: TimeAmount?
        /// MQTT 5 Will Delay Interval: the will of the client that went, until it is due.
        var pendingWill: (task: Scheduled<Void>, publish: () -> Void)?
        /// MQTT 5: the client's Receive Maximum and Maximum Packet Size (nil: none said).
        var receiveMaximum: Int?
        /// A window of its own instead of `max_inflight` (a bridge's link: `[[bridge]] max_inflight`).
        var maxInflight: Int?
        /// Queue limits of its own instead of `max_queued` and `max_queued_bytes` (a bridge's:
        /// `[[bridge]] max_queued`, `max_queued_bytes`).
        var maxQueued: Int?
        var maxQueuedBytes: Int?
        var maximumPacketSize: Int?
        /// MQTT 5: the topic aliases of the connection (nil until one is used either way).
        var aliases: TopicAliases?
        /// MQTT 5: the Subscription Identifiers of the subscriptions that have one.
        var subscriptionIdentifiers: SubscriptionIdentifiers?
        /// Messages in flight are `owed` again to this connection (`resume`, `pump`).
        var resendsOwed = false
        /// Inbound QoS 2 ids whose PUBLISH was delivered, awaiting PUBREL (exactly once).
        var awaitingPubrel: Set<UInt16> = []
        /// Those of them an earlier connection received: not counted against this connection's
        /// Receive Maximum (`exceedsInboundQoS2`).
        var awaitingFromEarlier: Set<UInt16> = []
        /// See `sendRetained`.
        var retainedBacklog = Deque<(scan: RetainedTree<Message>.Scan, qos: QoS)>()
        /// Filters the client named that an `on_subscribe` hook rewrote.
        var names = SubscriptionNames()
        /// A store keeps this session (its observer says so): owed messages get numbers.
        var stored = false
        /// The last number given to an owed message (`SessionEvent`).
        var lastSeq: UInt64 = 0

        /// MQTT 5: whether what this client gets may differ from the message (`forClient`).
        var adorns: Bool { maximumPacketSize != nil || aliases != nil || subscriptionIdentifiers != nil }
    }

    private var more: Occasional {
        if let occasional { return occasional }
        let made = Occasional()
        occasional = made
        return made
    }

    // Slow-consumer policy. A connected session whose queue is over half its budget while it is
    // still making progress is congested: publishers to it are held back (TCP back-pressure) until
    // it is under a quarter. One that made no progress for `stallTimeout` is not: messages to it
    // are dropped past its budget instead, so a stalled client cannot slow anyone down. Nor can a
    // slow one for long: it holds publishers back for at most `maxHoldBack` in any
    // `holdBackWindow`, its episodes together (one that drains a little at a time ends an episode
    // each time), plus what it earns by draining; past that, it is treated as stalled until the
    // window's end.
    static let stallTimeout = TimeAmount.seconds(1)
    static let maxHoldBack = TimeAmount.seconds(1)

    // A subscriber earns hold-back time by draining: 1 µs a byte (1 ms a KiB, so one that takes
    // 1 MB/s or more may hold its publishers back through a whole burst), up to the window.
    // What a subscriber did not earn (its allowance) is bounded on the publisher's side too: a
    // publisher is held back by subscribers on their allowance, whichever and however many, for
    // at most `publisherAllowance` in a window (`HoldBackAllowance`), so that fresh connections
    // that never read, one after another, cannot throttle it. (Two seconds: a subscriber that
    // stalls and a reading one whose kernel buffers are still draining when the burst comes, as
    // the queue can only move once they are, each use up to their own second.)
    static let publisherAllowance = TimeAmount.seconds(2)
    static let holdBackWindow = TimeAmount.seconds(10)
    static let holdBackEarnedPerByte: Int64 = 1000

    /// Why a publisher should wait for a subscriber.
    enum Congestion: Comparable {
        case none
        /// On its allowance (having earned nothing, or used what it earned): the publisher's
        /// budget is charged.
        case allowance
        /// On time it earned by draining, or a worker's mailbox full: the publisher waits.
        case firm
    }

    // The publisher's side: a client is not held back while it has deliveries of its own in
    // flight (the broker would stop reading the acknowledgements they wait for, so it would look
    // stalled and lose its own messages).
    func mayBeHeldBack() -> Bool { inflight.isEmpty }

    /// Cheap hint for the publish path: congestion may need checking.
    var mayBeCongested: Bool { congestedUntil.load(ordering: .relaxed) != 0 }

    func congestion(now: NIODeadline) -> Congestion {
        let until = congestedUntil.load(ordering: .relaxed)
        guard until != 0 && now.uptimeNanoseconds < until else { return .none }
        return until & 1 == 1 ? .allowance : .firm
    }

    /// `max_queued` and `max_queued_bytes`, or the session's own (a bridge's: `setMaxQueued`).
    private func queueLimits(_ limits: Limits) -> (count: Int, bytes: Int) {
        (occasional?.maxQueued ?? limits.maxQueued, occasional?.maxQueuedBytes ?? limits.maxQueuedBytes)
    }

    private func isOver(fraction divisor: Int, _ limits: Limits) -> Bool {
        let (maxQueued, maxBytes) = queueLimits(limits)
        guard let occasional else { return false }
        return occasional.queue.count >= max(maxQueued / divisor, 1) || (maxBytes > 0 && occasional.queuedBytes >= maxBytes / divisor)
    }

    /// Sets how long publishers wait for this session: while it progresses, within the episode's
    /// hold-back allowance.
    private func holdPublishers(now: NIODeadline) {
        let more = self.more
        if now - more.congestionWindowStart >= Self.holdBackWindow {
            more.congestionWindowStart = now
            more.congestionUsed = .zero
        }
        let start = more.congestionStart ?? now
        more.congestionStart = start
        var until = min(more.lastProgress + Self.stallTimeout, start + (Self.maxHoldBack - more.congestionUsed))
        // Earned time lasts while what this episode used is covered by what was earned; then the
        // allowance (marked in the lowest bit), from the next check on.
        let earnedUntil = start - more.congestionUsed
        let earned = now < earnedUntil
        if earned { until = min(until, earnedUntil) }
        congestedUntil.store(until > now ? until.uptimeNanoseconds & ~1 | (earned ? 0 : 1) : 0, ordering: .relaxed)
    }

    /// After the queue grew: congested if over half the budget and still making progress.
    private func checkCongestion(_ limits: Limits) {
        guard outbound != nil else { return }
        if occasional?.queue.count == 1 { more.lastProgress = .now() }  // it kept up until now
        guard isOver(fraction: 2, limits), occasional?.congestionStart == nil || mayBeCongested else { return }
        holdPublishers(now: .now())
    }

    /// After the queue moved: still congested while over a quarter of the budget.
    private func progressed(_ limits: Limits, drained: Int) {
        let now = NIODeadline.now()
        let more = self.more
        more.lastProgress = now
        // Draining earns hold-back time, up to the whole window.
        more.congestionUsed = max(
            more.congestionUsed - .nanoseconds(Int64(drained) * Self.holdBackEarnedPerByte), Self.maxHoldBack - Self.holdBackWindow)
        if !isOver(fraction: 4, limits) {
            congestedUntil.store(0, ordering: .relaxed)
            if let start = more.congestionStart {
                more.congestionUsed = min(more.congestionUsed + (now - start), Self.maxHoldBack)
                more.congestionStart = nil
            }
        } else if mayBeCongested {
            holdPublishers(now: now)
        }
    }

    /// The connection went away: an offline queue holds no publisher back.
    func disconnected() {
        outbound = nil
        occasional?.retainedBacklog.removeAll()  // retained messages are sent to the connection that subscribed
        congestedUntil.store(0, ordering: .relaxed)
        occasional?.congestionStart = nil
        report(.detached)
    }

    /// The client's ACL when it denies topics: deliveries on denied topics are held back, and
    /// so are messages already queued when it is set (queued for the client that held the
    /// session before, another client taking its id over, or a session restored after a restart
    /// without rules): they are dropped, as Mosquitto does. (In flight: `resume`.)
    var receiveACL: ClientACL? {
        get { occasional?.receiveACL }
        set {
            guard newValue != nil || occasional != nil else { return }
            let more = self.more
            more.receiveACL = newValue
            more.receiveVerdicts.removeAll()
            if newValue != nil { dropQueued { !mayReceive($0.message.topic, more) } }
        }
    }

    /// Whether a store keeps this session (set by the store's observer, owner loop): then its
    /// owed messages are numbered (`SessionEvent`).
    var isStored: Bool {
        get { occasional?.stored ?? false }
        set {
            guard newValue || occasional != nil else { return }
            more.stored = newValue
        }
    }

    /// The number of the next owed message of a stored session.
    private func nextSeq() -> UInt64 {
        let more = self.more
        more.lastSeq += 1
        return more.lastSeq
    }

    /// Names the client used for rewritten filters (bounded by `max_subscriptions` as well).
    var subscriptionNameCount: Int { occasional?.names.count ?? 0 }

    /// Drops queued messages that only `revoked` filters brought (the access rules took those
    /// away); a message another subscription still matches stays.
    func dropQueued(onlyFrom revoked: [TopicFilter]) {
        dropQueued { delivery in
            let topic = delivery.message.topic
            func matches(_ filter: TopicFilter) -> Bool { SharedFilter.matching(filter).matches(topic) }
            return revoked.contains(where: matches) && !subscriptions.keys.contains(where: matches)
        }
    }

    /// Drops the queued messages `shouldDrop` picks (a store forgets them too).
    private func dropQueued(where shouldDrop: (Delivery) -> Bool) {
        guard !queueIsEmpty else { return }
        queue.removeAll { delivery in
            guard shouldDrop(delivery) else { return false }
            if delivery.seq != 0 { report(.discarded(seq: delivery.seq)) }
            return true
        }
        queueChanged()
        occasional?.queuedBytes = queue.reduce(0) { $0 + $1.message.size }
    }

    /// Whether an `on_subscribe` hook rewrote a filter this client still names.
    var hasRenamedSubscriptions: Bool { !(occasional?.names.isEmpty ?? true) }

    /// Whether the client holds a subscription it named `name` (rewritten by a hook or not).
    func isSubscribed(named name: TopicFilter) -> Bool {
        subscriptions[hasRenamedSubscriptions ? more.names.filter(named: name) : name] != nil
    }

    /// The filters the client named and what they are subscribed as (owner loop).
    func withSubscriptionNames<T>(_ body: (inout SubscriptionNames) -> T) -> T {
        body(&more.names)
    }

    init(clientID: String, persistent: Bool, owner: Int, context: SessionContext) {
        self.context = context
        self.persistence = Atomic(persistent)
        self.ownerIndex = Atomic(Int32(owner))
        super.init(clientID: clientID)
    }

    /// Index of the worker whose loop owns this session.
    var owner: Int { Int(ownerIndex.load(ordering: .acquiring)) }

    /// Registers a new claim and returns it. Called under the registry lock.
    func claim() -> Int { Int(claims.wrappingAdd(1, ordering: .acquiringAndReleasing).newValue) }

    /// Whether `claim` is still the latest (no newer CONNECT for this client id since).
    func isLatest(claim: Int) -> Bool { claims.load(ordering: .acquiring) == UInt32(truncatingIfNeeded: claim) }

    /// The latest claim.
    var latestClaim: Int { Int(claims.load(ordering: .acquiring)) }

    /// How long the session may stay offline (owner loop): nil for `session_expiry` (3.1.1
    /// clients), else what an MQTT 5 client asked for, capped by it (`Limits.sessionExpiry(for:)`);
    /// `Session.neverExpires` for never.
    var expiry: TimeAmount? { occasional?.expiry }

    /// An MQTT 5 client's Session Expiry Interval (CONNECT or DISCONNECT), already capped: zero
    /// ends the session with its connection.
    func setExpiry(_ expiry: TimeAmount?) {
        assertOnOwner()
        persistence.store(expiry != .zero, ordering: .relaxed)
        if expiry != nil || occasional != nil { more.expiry = expiry }
    }

    static let neverExpires = TimeAmount.nanoseconds(.max)

    /// MQTT 5 Will Delay Interval: `publish` runs on `loop` (the owner's) after `delay`, unless a
    /// connection takes the session first (`cancelPendingWill`); ending the session runs it now.
    func delayWill(after delay: TimeAmount, on loop: any EventLoop, _ publish: @escaping () -> Void) {
        assertOnOwner()
        cancelPendingWill()
        let task = loop.scheduleTask(in: delay) { [weak self] in
            guard let self, let will = self.occasional?.pendingWill else { return }
            self.occasional?.pendingWill = nil
            will.publish()
        }
        more.pendingWill = (task, publish)
    }

    /// A connection took the session before its will was due: no will (§3.1.3.2.2).
    func cancelPendingWill() {
        guard let will = occasional?.pendingWill else { return }
        occasional?.pendingWill = nil
        will.task.cancel()
    }

    /// The session ends before its will was due (or the broker stops): the will goes now.
    func publishPendingWill() {
        guard let will = occasional?.pendingWill else { return }
        occasional?.pendingWill = nil
        will.task.cancel()
        will.publish()
    }

    /// What an MQTT 5 client said it can take (CONNECT): at most `receiveMaximum` QoS 1/2
    /// messages unacknowledged, no packet over `maximumPacketSize` bytes. Nil for a 3.1.1 client.
    func setClientLimits(_ limits: ClientLimits) {
        assertOnOwner()
        let aliases = min(limits.topicAliasMaximum, context.limits.maxTopicAlias)
        guard limits.receiveMaximum != nil || limits.maximumPacketSize != nil || aliases > 0 || occasional != nil else { return }
        more.receiveMaximum = limits.receiveMaximum
        more.maximumPacketSize = limits.maximumPacketSize
        // A new connection: the aliases of the last one are gone (§3.3.2.3.4).
        more.aliases = aliases > 0 ? TopicAliases(outboundMaximum: aliases) : nil
    }

    /// MQTT 5: the topic the client's `alias` stands for on this connection (owner loop).
    func topic(forAlias alias: UInt16) -> TopicName? { occasional?.aliases?.topic(forAlias: alias) }

    /// MQTT 5: the client's `alias` stands for `topic` from now on (owner loop).
    func set(alias: UInt16, to topic: TopicName) {
        let more = self.more
        if more.aliases == nil { more.aliases = TopicAliases(outboundMaximum: 0) }
        more.aliases!.set(alias: alias, to: topic)
    }

    /// MQTT 5: the subscription `filter` has this Subscription Identifier (nil: none), as its
    /// latest SUBSCRIBE said (owner loop).
    func setSubscriptionIdentifier(_ identifier: UInt32?, for filter: TopicFilter, noLocal: Bool = false) {
        guard identifier != nil || occasional?.subscriptionIdentifiers != nil else { return }
        let identifiers = more.subscriptionIdentifiers ?? SubscriptionIdentifiers()
        identifiers.set(identifier, for: filter, noLocal: noLocal)
        more.subscriptionIdentifiers = identifiers.isEmpty ? nil : identifiers
    }

    /// The PUBLISH this client gets for `message` (MQTT 5): with the Subscription Identifiers of
    /// the subscriptions it came through, and a topic alias (the topic left out once the client
    /// knows the alias). Nil when it is larger than the client's Maximum Packet Size: it is not
    /// sent to the client, as if it had been (§3.1.2.11.4). Asked only for a client that uses
    /// either, or set a maximum (`Occasional.adorns`): the others pay nothing for it.
    private func forClient(_ message: Message, qos: QoS, group: SharedGroup?, local: Bool) -> Message? {
        guard let occasional else { return message }
        var message = message
        if let identifiers = occasional.subscriptionIdentifiers?.identifiers(for: message.topic, group: group, local: local), !identifiers.isEmpty {
            message.properties.subscriptionIdentifiers = identifiers
        }
        let limit = occasional.maximumPacketSize ?? .max
        func fits(_ m: Message) -> Bool {
            limit == .max
                || ByteBuffer.publishFrameSize(topicLength: m.topic.count, payloadLength: m.payload.readableBytes, qos: qos, properties: m.properties) <= limit
        }
        guard fits(message) else { return nil }
        guard occasional.aliases != nil else { return message }
        if let alias = occasional.aliases!.knownAlias(for: message.topic) {
            message.properties.topicAlias = alias
            message.topic = .aliased
        } else if let alias = occasional.aliases!.nextAlias {
            // A new alias only if the PUBLISH that gives it still fits (the alias costs 3 bytes).
            var aliased = message
            aliased.properties.topicAlias = alias
            if fits(aliased) {
                occasional.aliases!.assign(alias, to: message.topic)
                message = aliased
            }
        }
        return message
    }

    private static func fitsAPacket(_ m: Message, qos: QoS) -> Bool {
        let size = ByteBuffer.publishFrameSize(topicLength: m.topic.count, payloadLength: m.payload.readableBytes, qos: qos, properties: m.properties)
        return size <= 5 + MQTTProperties.maxVariableByteInteger
    }

    /// QoS 1/2 messages that may be unacknowledged at once: `max_inflight`, or fewer if the
    /// client asked for fewer.
    private var window: Int {
        guard let occasional else { return context.limits.maxInflight }
        let cap = occasional.maxInflight ?? context.limits.maxInflight
        guard let asked = occasional.receiveMaximum else { return cap }
        return min(asked, cap)
    }

    /// QoS 1/2 messages this session may have unacknowledged at once, in place of `max_inflight`
    /// (a bridge's link sets its own).
    func setMaxInflight(_ window: Int) {
        more.maxInflight = max(1, window)
    }

    /// Messages this session may queue, in place of `max_queued` (a bridge's link sets its own:
    /// it queues every client's messages while the link is down).
    func setMaxQueued(_ limit: Int, bytes: Int) {
        more.maxQueued = limit
        more.maxQueuedBytes = bytes
    }

    /// Offline persistent session: since when, and the claim it was left at (owner loop).
    var offline: (since: NIODeadline, claim: Int)? {
        get { occasional?.offline }
        set {
            guard newValue != nil || occasional != nil else { return }
            more.offline = newValue
        }
    }

    /// Hands the session to another worker. Called on the current owner's loop, after detaching.
    func move(to worker: Int) { ownerIndex.store(Int32(worker), ordering: .releasing) }

    /// In debug builds: traps unless called on the loop of the worker that owns this session.
    @inline(__always)
    private func assertOnOwner(file: StaticString = #fileID, line: UInt = #line) {
        assert(context.loops.isEmpty || context.loops[owner].inEventLoop, "session state touched off its owner's loop", file: file, line: line)
    }

    /// Tells the context's observer of a change (owner loop, after the change).
    func report(_ event: SessionEvent) {
        context.observer?.session(self, event)
    }

    // MARK: - Delivery

    /// Sends now if the window and the socket allow it and nothing is queued ahead; else queues.
    /// Returns the compacted message when it queued one, so that the caller hands that copy to
    /// the other sessions the message goes to (one copy however many queues keep it). `live`: the
    /// message is being published now (not a retained one), so that sending it now starts its
    /// onward delivery whatever its Message Expiry Interval, 0 included.
    @discardableResult
    func deliver(_ delivery: Delivery, live: Bool = true) -> Message? {
        assertOnOwner()
        if ended { return nil }
        if let occasional, occasional.receiveACL != nil, !mayReceive(delivery.message.topic, occasional) { return nil }
        guard let outbound else {
            // Offline: a persistent session keeps QoS 1/2 messages (QoS 0 is not queued, as in Mosquitto).
            if persistent && delivery.qos != .atMostOnce { return enqueue(delivery) }
            return nil
        }
        if queueIsEmpty && outbound.canWrite
            && (delivery.qos == .atMostOnce || inflight.count < window)
        {
            send(delivery, on: outbound, live: live)
            return nil
        }
        return enqueue(delivery)
    }

    /// Whether messages wait: in the queue, in flight to be sent again (`resume`), or retained
    /// messages still to be sent.
    var hasQueued: Bool {
        guard let occasional else { return false }
        guard occasional.queue.isEmpty else { return true }
        return occasional.resendsOwed || !occasional.retainedBacklog.isEmpty
    }

    // MARK: - Retained messages on SUBSCRIBE

    /// Walks of the retained tree still to deliver, one per granted filter, in SUBSCRIBE order.
    /// They are continued only when the queue is empty and the socket can take more, a few
    /// hundred nodes at a time: neither memory nor a worker's time follows how many retained
    /// messages match, only what the client reads.
    private static let retainedStep = 256

    func sendRetained(matching filter: TopicFilter, qos: QoS) {
        assertOnOwner()
        guard outbound != nil, !ended else { return }
        more.retainedBacklog.append((context.retained.scan(matching: filter), qos))
        pump()
    }

    /// Delivers the next step of retained messages; whether there was anything to walk.
    private func continueRetained() -> Bool {
        guard let occasional, var head = occasional.retainedBacklog.first else { return false }
        let step = max(1, min(Self.retainedStep, context.limits.maxQueued))
        // (The scan's nodes still to visit are shared by its copies: `TopicTrie.Pending`.)
        let messages = context.retained.continueScan(&head.scan, limit: step)
        if head.scan.isDone { occasional.retainedBacklog.removeFirst() }
        for message in messages {
            let hooked = context.hooks.isDeliverHooked(topic: message.topic, worker: owner)
            deliver(Delivery(message: message, qos: min(head.qos, message.qos), retain: true, frame: nil, hooked: hooked), live: false)
        }
        return true
    }

    private func mayReceive(_ topic: TopicName, _ occasional: Occasional) -> Bool {
        if let verdict = occasional.receiveVerdicts[topic] { return verdict }
        let verdict = occasional.receiveACL?.allowsReceive(topic: topic) ?? true
        if occasional.receiveVerdicts.count >= 1000 { occasional.receiveVerdicts.removeAll(keepingCapacity: true) }
        occasional.receiveVerdicts[topic.copied()] = verdict
        return verdict
    }

    private func enqueue(_ delivery: Delivery) -> Message? {
        let limits = context.limits
        let size = delivery.message.size
        let more = self.more
        let (maxQueued, maxBytes) = queueLimits(limits)
        guard more.queue.count < maxQueued && (maxBytes == 0 || more.queuedBytes + size <= maxBytes) else {
            more.droppedInEpisode += 1
            context.droppedMessages.add(1, ordering: .relaxed)
            if more.droppedInEpisode == 1 {
                context.logger.info(
                    "subscriber cannot keep up: queue full (max_queued \(maxQueued), max_queued_bytes \(maxBytes)), dropping messages",
                    metadata: ["client": "\(LogText(value: clientID))"])
            }
            return nil
        }
        // Made field by field and moved into the queue: copies of a whole delivery would count
        // references to every part of it.
        let message = delivery.message.compacted()
        let seq = delivery.qos != .atMostOnce && more.stored ? nextSeq() : 0
        more.queue.append(
            Delivery(message: message, qos: delivery.qos, retain: delivery.retain, frame: nil, hooked: delivery.hooked, group: delivery.group, seq: seq))
        queueChanged()
        more.queuedBytes += size
        checkCongestion(limits)
        if seq != 0 { report(.queued(more.queue[more.queue.index(before: more.queue.endIndex)])) }
        return message
    }

    /// Copies in-flight messages out of the read buffers they are slices of, so that a client
    /// that is slow to acknowledge, or gone, does not pin a whole buffer per message.
    func compactInflight() {
        for i in inflight.indices where !inflight[i].message.isCompact && !inflight[i].released {
            inflight[i].message = inflight[i].message.compacted()
        }
    }

    private func send(_ delivery: Delivery, on outbound: any SessionOutbound, live: Bool) {
        if delivery.hooked || delivery.message.properties.messageExpiresAt != nil { return sendChanged(delivery, on: outbound, live: live) }
        if let occasional, occasional.adorns { return sendAdorned(delivery, on: outbound) }
        transmit(delivery, as: delivery.message, adorned: false, on: outbound)
    }

    /// `send` for a delivery that a hook may change or that expires: out of line, so that the
    /// usual one is not copied.
    @inline(never)
    private func sendChanged(_ delivery: Delivery, on outbound: any SessionOutbound, live: Bool) {
        var delivery = delivery
        if delivery.hooked {
            guard let message = outbound.interceptDelivery(delivery.message) else { return }
            if !message.isSame(as: delivery.message) {
                // For this subscriber only: its own frame, and its ACL asked about the new topic.
                if let occasional, occasional.receiveACL != nil, !mayReceive(message.topic, occasional) { return }
                delivery.message = message
                delivery.frame = nil
            }
        }
        // MQTT 5: a message whose Message Expiry Interval passed before its onward delivery
        // started is not sent (to any client, MQTT-3.3.2-5); one that goes tells what remains of
        // the interval (MQTT-3.3.2-6). Sent as it is published, an interval of 0 starts its
        // delivery now: it reaches the subscribers that can take it at once (as 0), and only them.
        if let expiresAt = delivery.message.properties.messageExpiresAt {
            let now = NIODeadline.now().uptimeNanoseconds
            guard now < expiresAt || (live && delivery.message.properties.messageExpiryInterval == 0) else { return }
            delivery.message.properties.messageExpiryInterval = delivery.message.properties.remainingExpiryInterval(at: now)
        }
        if let occasional, occasional.adorns { return sendAdorned(delivery, on: outbound) }
        transmit(delivery, as: delivery.message, adorned: false, on: outbound)
    }

    /// MQTT 5: what goes on the wire in the message's place, if anything does (`forClient`). In
    /// flight, the message is kept as it is: a connection's aliases end with it.
    @inline(never)
    private func sendAdorned(_ delivery: Delivery, on outbound: any SessionOutbound) {
        guard let adorned = forClient(delivery.message, qos: delivery.qos, group: delivery.group, local: delivery.local) else {
            context.droppedTooLarge.add(1, ordering: .relaxed)
            return
        }
        let changed = !adorned.isSame(as: delivery.message)
        transmit(delivery, as: changed ? adorned : delivery.message, adorned: changed, on: outbound)
    }

    /// Writes `delivery` as the PUBLISH of `wire`: its message, or what `forClient` made of it
    /// (`adorned`: then the frame shared with other subscribers is not this client's).
    @inline(__always)
    private func transmit(_ delivery: Delivery, as wire: Message, adorned: Bool, on outbound: any SessionOutbound) {
        // A PUBLISH is at most 268,435,455 bytes after its first two: a larger message (a script
        // made it) is not sent, as one over the client's Maximum Packet Size.
        if wire.payload.readableBytes > 64 << 20, !Self.fitsAPacket(wire, qos: delivery.qos) {
            context.logger.warning("message too large for any PUBLISH not sent", metadata: ["client": "\(LogText(value: clientID))"])
            return
        }
        if delivery.qos == .atMostOnce {
            if !adorned, let frame = delivery.frame {
                outbound.writeQoS0(frame: frame, message: delivery.message)
            } else {
                outbound.writePublish(wire, qos: .atMostOnce, packetID: nil, retain: delivery.retain, dup: false)
            }
        } else {
            transmitInFlight(delivery, as: wire, on: outbound)
        }
    }

    /// `transmit` at QoS 1 or 2: the message goes in flight under a new packet id. (Out of line:
    /// the QoS 0 path stays small enough to be inlined where it is used.)
    @inline(never)
    private func transmitInFlight(_ delivery: Delivery, as wire: Message, on outbound: any SessionOutbound) {
        let queued = delivery.seq != 0
        var seq = delivery.seq
        if !queued, let occasional, occasional.stored { seq = nextSeq() }
        let id = seq == 0 ? nextPacketID() : packetID(numbered: seq)
        inflight.append(
            Inflight(id: id, message: delivery.message, qos: delivery.qos, retain: delivery.retain, released: false, group: delivery.group, seq: seq, local: delivery.local))
        outbound.writePublish(wire, qos: delivery.qos, packetID: id, retain: delivery.retain, dup: false)
        if seq != 0 {
            var numbered = delivery  // (a copy only for a session the store keeps)
            numbered.seq = seq
            report(.inflightAdded(packetID: id, numbered, queued: queued))
        }
    }

    /// Sends queued messages while the window and the socket allow.
    func pump() {
        assertOnOwner()
        guard let outbound, !ended else { return }
        if let occasional, occasional.resendsOwed { resendOwed(on: outbound) }
        let maxInflight = window
        var drained = 0
        var retainedSteps = 0
        while outbound.canWrite, !ended {
            guard let occasional, !occasional.queue.isEmpty else {
                // Nothing queued: the next retained messages, if a SUBSCRIBE left any. A walk
                // that delivers little (a filter that matches little, an ACL that holds most
                // back) yields the loop to its sockets now and then.
                guard let occasional = self.occasional, !occasional.retainedBacklog.isEmpty else { break }
                retainedSteps += 1
                if retainedSteps > 16 {
                    outbound.pumpSoon()
                    break
                }
                _ = continueRetained()
                continue
            }
            // (The head is read in place and then moved out: a copy of it would count references.)
            if occasional.queue[occasional.queue.startIndex].qos != .atMostOnce && inflight.count >= maxInflight { break }
            let next = occasional.queue.removeFirst()
            let size = next.message.size, seq = next.seq
            occasional.queuedBytes -= size
            drained += size
            send(next, on: outbound, live: false)
            // A numbered message that did not go in flight is owed no longer.
            if seq != 0, inflight.last?.seq != seq { report(.discarded(seq: seq)) }
        }
        if drained > 0 {
            progressed(context.limits, drained: drained)
            queueChanged()
        }
        if let occasional, occasional.queue.isEmpty, occasional.droppedInEpisode > 0 {
            context.logger.info("subscriber caught up after dropping \(occasional.droppedInEpisode) messages", metadata: ["client": "\(LogText(value: clientID))"])
            occasional.droppedInEpisode = 0
        }
    }

    /// After a reconnect: re-send what is in flight (PUBLISH with DUP, or PUBREL), in order, then
    /// the queue, all by `pump`: no more at once than the connection's window
    /// (its Receive Maximum, MQTT-4.9.0-2: the send quota starts again with each connection) and
    /// its socket allow; the rest goes as acknowledgements and flushes make room.
    func resume() {
        assertOnOwner()
        guard outbound != nil else { return }
        for i in inflight.indices { inflight[i].owed = true }
        if !inflight.isEmpty || occasional?.resendsOwed == true { more.resendsOwed = !inflight.isEmpty }
        if let occasional, occasional.awaitingPubrel.count != occasional.awaitingFromEarlier.count {
            occasional.awaitingFromEarlier = occasional.awaitingPubrel
        }
        pump()
    }

    /// Sends owed in-flight messages and PUBRELs (`resume`), in order, while the window and the
    /// socket allow.
    private func resendOwed(on outbound: any SessionOutbound) {
        let now = NIODeadline.now().uptimeNanoseconds
        let window = self.window
        var sent = inflight.reduce(0) { $0 + ($1.owed ? 0 : 1) }
        var owed = false
        var i = 0
        while i < inflight.count {
            guard inflight[i].owed else {
                i += 1
                continue
            }
            guard sent < window, outbound.canWrite else {
                owed = true
                break
            }
            if inflight[i].released {
                inflight[i].owed = false
                outbound.writePubrel(packetID: inflight[i].id)
                sent += 1
                i += 1
            } else if resend(at: i, on: outbound, now: now) {
                sent += 1
                i += 1
            }
        }
        more.resendsOwed = owed
    }

    /// Sends the in-flight message at `index` again (DUP), to the client that holds the session
    /// now; whether it is still in flight. MQTT 5: a message whose Message Expiry Interval passed
    /// while it waited for its acknowledgement is not sent again (as Mosquitto), one that goes
    /// tells what remains of the interval (MQTT-3.3.2-6), and one larger than the new
    /// connection's Maximum Packet Size is discarded as if sent (MQTT-3.1.2-25): either way it
    /// is done. Sent to the client that held the session before, it is sent again only if this
    /// one may receive it (else done with, as Mosquitto drops it).
    private func resend(at i: Int, on outbound: any SessionOutbound, now: UInt64) -> Bool {
        inflight[i].owed = false
        let entry = inflight[i]
        if let occasional, occasional.receiveACL != nil, !mayReceive(entry.message.topic, occasional) {
            inflightDone(at: i)
            return false
        }
        var wire = entry.message
        if let expiresAt = wire.properties.messageExpiresAt {
            guard now < expiresAt else {
                inflightDone(at: i)
                return false
            }
            wire.properties.messageExpiryInterval = wire.properties.remainingExpiryInterval(at: now)
        }
        if occasional?.adorns == true {
            guard let adorned = forClient(wire, qos: entry.qos, group: entry.group, local: entry.local) else {
                context.droppedTooLarge.add(1, ordering: .relaxed)
                inflightDone(at: i)
                return false
            }
            wire = adorned
        }
        outbound.writePublish(wire, qos: entry.qos, packetID: entry.id, retain: entry.retain, dup: true)
        return true
    }

    /// The in-flight message at `index` is done: acknowledged, or (`resume`) not owed any more.
    private func inflightDone(at index: Int) {
        let done = inflight.remove(at: index)
        if done.seq != 0 { report(.acknowledged(packetID: done.id, seq: done.seq)) }
    }

    // MARK: - Shared subscriptions

    /// Takes out the messages of shared subscriptions that this session's client has not
    /// acknowledged (queued, or in flight before PUBREC) and that `movable` says another member
    /// of their group can take: the connection went away (MQTT 5.0 §4.8.2). A QoS 2 message
    /// whose PUBREC came stays: the client has it.
    func takeShared(where movable: (SharedGroup) -> Bool) -> [Delivery] {
        assertOnOwner()
        var taken: [Delivery] = []
        if inflight.contains(where: { $0.group != nil }) {
            inflight.removeAll { entry in
                guard let group = entry.group, !entry.released, movable(group) else { return false }
                taken.append(Delivery(message: entry.message.compacted(), qos: entry.qos, retain: false, frame: nil, group: group))
                if entry.seq != 0 { report(.handedOver(seq: entry.seq)) }
                return true
            }
        }
        if queue.contains(where: { $0.group != nil }) {
            var kept = Deque<Delivery>()
            for var delivery in queue {
                if let group = delivery.group, movable(group) {
                    more.queuedBytes -= delivery.message.size
                    if delivery.seq != 0 { report(.handedOver(seq: delivery.seq)) }
                    delivery.seq = 0  // (the other member's session numbers its own)
                    taken.append(delivery)
                } else {
                    kept.append(delivery)
                }
            }
            queue = kept
            queueChanged()
        }
        return taken
    }

    // MARK: - Inbound QoS 2

    /// Records an inbound QoS 2 PUBLISH id until its PUBREL; whether it is new (a re-sent
    /// PUBLISH whose id still awaits PUBREL is not delivered again).
    func receivedQoS2(_ id: UInt16) -> Bool {
        let more = self.more
        guard more.awaitingPubrel.insert(id).inserted else { return false }
        if more.stored { report(.inboundQoS2(packetID: id, awaiting: true)) }
        return true
    }

    /// Whether inbound QoS 2 id `id` would be one more than `limit` that this connection received
    /// awaiting PUBREL (a re-sent PUBLISH whose id already waits is not). The quota starts again
    /// with each connection (MQTT 5 §4.9): a client that resumes with new QoS 2 messages before
    /// its PUBRELs for the earlier ones is within it.
    func exceedsInboundQoS2(_ id: UInt16, limit: Int) -> Bool {
        guard let occasional, occasional.awaitingPubrel.count - occasional.awaitingFromEarlier.count >= limit else { return false }
        return !occasional.awaitingPubrel.contains(id)
    }

    /// The peer kept no session: no inbound QoS 2 id awaits PUBREL any more (a bridge's remote).
    func forgetInboundQoS2() {
        guard let occasional, !occasional.awaitingPubrel.isEmpty else { return }
        for id in occasional.awaitingPubrel { released(inbound: id) }
    }

    /// PUBREL came for an inbound QoS 2 id.
    func released(inbound id: UInt16) {
        guard let occasional, occasional.awaitingPubrel.remove(id) != nil else { return }
        if !occasional.awaitingFromEarlier.isEmpty { occasional.awaitingFromEarlier.remove(id) }
        guard occasional.stored else { return }
        report(.inboundQoS2(packetID: id, awaiting: false))
    }

    // MARK: - Acknowledgements of outgoing messages

    // The acknowledgements of messages sent to the client. Each says whether it breaks the flow
    // of the message in flight under its id (PUBACK answers QoS 1; PUBREC and PUBCOMP QoS 2,
    // PUBCOMP only after PUBREC): a protocol violation, on which the connection closes, as
    // Mosquitto's does (MQTT-4.8.0-1). An id not in flight is not: a late or repeated
    // acknowledgement is ignored.

    /// (`pumping` false: the caller pumps once after a read's acknowledgements, a bridge's link.)
    @discardableResult
    func puback(_ id: UInt16, pumping: Bool = true) -> Bool {
        assertOnOwner()
        guard let i = inflight.firstIndex(where: { $0.id == id }) else { return false }
        guard inflight[i].qos == .atLeastOnce else { return true }
        inflightDone(at: i)
        if pumping { pump() }
        return false
    }

    /// Marks a QoS 2 message in flight as received (PUBREL is sent next).
    @discardableResult
    func pubrec(_ id: UInt16) -> Bool {
        assertOnOwner()
        guard let i = inflight.firstIndex(where: { $0.id == id }) else { return false }
        guard inflight[i].qos == .exactlyOnce else { return true }
        guard !inflight[i].released else { return false }
        inflight[i].released = true
        inflight[i].owed = false  // (the client had it from the connection before)
        inflight[i].message = Message(topic: TopicName(alreadyValidated: ByteBuffer()), payload: ByteBuffer(), qos: .exactlyOnce, retain: false)
        if inflight[i].seq != 0 { report(.released(packetID: id, seq: inflight[i].seq)) }
        return false
    }

    /// MQTT 5: the client refused a QoS 2 message (PUBREC with a failure code): it is done.
    @discardableResult
    func pubrecRefused(_ id: UInt16, pumping: Bool = true) -> Bool {
        assertOnOwner()
        guard let i = inflight.firstIndex(where: { $0.id == id }) else { return false }
        guard inflight[i].qos == .exactlyOnce else { return true }
        guard !inflight[i].released else { return false }
        inflightDone(at: i)
        if pumping { pump() }
        return false
    }

    @discardableResult
    func pubcomp(_ id: UInt16, pumping: Bool = true) -> Bool {
        assertOnOwner()
        guard let i = inflight.firstIndex(where: { $0.id == id }) else { return false }
        guard inflight[i].qos == .exactlyOnce, inflight[i].released else { return true }
        inflightDone(at: i)
        if pumping { pump() }
        return false
    }

    /// The next packet id for an outgoing QoS 1/2 message: 1 to 65535 in turn, skipping ids
    /// still in flight (MQTT-2.3.1-2: never 0, never one in use).
    func nextPacketID() -> UInt16 {
        packetID(preferring: lastPacketID == UInt16.max ? 1 : lastPacketID + 1)
    }

    /// The packet id of a numbered message (a session a store keeps): its number's, modulo 65,535
    /// (never 0). The store learns that a queued message went in flight after it was sent; after
    /// a crash in between it is restored as queued, and sent again under the id it had: a client
    /// that holds that id awaiting PUBREL (QoS 2) takes it as the duplicate it is, instead of a
    /// new message (delivered twice), and the id is not given to another message (swallowed as
    /// a duplicate).
    private func packetID(numbered seq: UInt64) -> UInt16 {
        packetID(preferring: UInt16(truncatingIfNeeded: (seq - 1) % UInt64(UInt16.max) + 1))
    }

    /// `preferred`, or the first id after it not in flight. Ids given in turn since the window was
    /// last empty are a run: while it is shorter than 65,535, every id in flight is one of the
    /// run's, so the id after the last one given is free without looking (the usual case). Any
    /// other id is looked for in the window, and breaks the run: ids are looked for from then on
    /// until the window is empty. (The window is below 65,535: an id is free.)
    private func packetID(preferring preferred: UInt16) -> UInt16 {
        if inflight.isEmpty { packetIDRun = 0 }
        var id = preferred
        if id == (lastPacketID == UInt16.max ? 1 : lastPacketID + 1), packetIDRun < UInt16.max - 1 {
            packetIDRun += 1
        } else {
            while inflight.contains(where: { $0.id == id }) { id = id == UInt16.max ? 1 : id + 1 }
            packetIDRun = UInt16.max
        }
        lastPacketID = id
        return id
    }

    /// Numbers given after a restore start this far past the last one stored, and up to
    /// `restoredSeqSpread` further at random: those given after the store's last commit before a
    /// crash (messages sent straight away, whose in-flight record was lost) may be ids the client
    /// still holds, half the id space away from these. The random part is for a second crash
    /// before anything of the run in between was committed (the last stored number is the same
    /// again): that run's numbers are not repeated, as they were without it, but land elsewhere
    /// (k of them are met with a chance of about k in 8,000).
    static let restoredSeqGap: UInt64 = 32_768
    static let restoredSeqSpread: UInt64 = 16_384

    /// What a store kept of this session before a restart (owner loop, before any connection
    /// takes it): messages in flight (sent again with DUP, or their PUBREL, on resume), the
    /// queue, inbound QoS 2 ids awaiting PUBREL, and the last number given to an owed message.
    func restore(
        inflight restored: [Inflight], queue kept: [Delivery], awaitingPubrel: [UInt16], lastSeq: UInt64,
        spread: UInt64 = .random(in: 0..<Session.restoredSeqSpread)
    ) {
        assertOnOwner()
        inflight = restored
        lastPacketID = restored.last?.id ?? 0
        packetIDRun = UInt16.max
        let more = self.more
        for delivery in kept {
            queue.append(delivery)
            more.queuedBytes += delivery.message.size
        }
        queueChanged()
        more.awaitingPubrel.formUnion(awaitingPubrel)
        more.lastSeq = lastSeq + Self.restoredSeqGap + spread
    }

    /// Forgets everything queued or in flight: the session is discarded (`ended`).
    func end() {
        publishPendingWill()
        ended = true
        inflight.removeAll()
        occasional?.queue.removeAll()
        queueChanged()
        occasional?.retainedBacklog.removeAll()
        occasional?.queuedBytes = 0
        congestedUntil.store(0, ordering: .relaxed)
        occasional?.congestionStart = nil
        occasional?.awaitingPubrel.removeAll()
        occasional?.awaitingFromEarlier.removeAll()
        report(.ended)
    }
}
