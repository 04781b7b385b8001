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
    unowned let broker: Broker

    private let mailbox = Mutex<[(Session, Delivery)]>([])

    // MARK: Loop-only state
    private var dirty: [ConnectionHandler] = []
    private var flushScheduled = false
    private var routeCache: [ByteBuffer: CachedRoute] = [:]
    var connections: [ObjectIdentifier: ConnectionHandler] = [:]

    private struct CachedRoute {
        var generation: Int
        var targets: [(session: Session, qos: QoS)]
    }

    private static let routeCacheLimit = 10_000

    init(index: Int, loop: any EventLoop, broker: Broker) {
        self.index = index
        self.loop = loop
        self.broker = broker
    }

    // MARK: - Mailbox

    /// Hands a delivery for a session owned by this worker. Any thread. The loop is woken once per
    /// batch: only the post that finds the mailbox empty schedules a drain.
    func post(_ session: Session, _ delivery: Delivery) {
        let wasEmpty = mailbox.withLock { items in
            items.append((session, delivery))
            return items.count == 1
        }
        if wasEmpty { loop.execute { self.drainMailbox() } }
    }

    private func drainMailbox() {
        let items = mailbox.withLock { items in
            let taken = items
            items.removeAll(keepingCapacity: true)
            return taken
        }
        for (session, delivery) in items {
            let owner = session.owner
            if owner == index {
                session.deliver(delivery, broker: broker)
            } else {
                // The session moved while this was in the mailbox.
                broker.workers[owner].post(session, delivery)
            }
        }
    }

    // MARK: - Output batching

    /// Registers a connection with unflushed output. Everything dirty is flushed when the
    /// connection whose packets caused it finishes its read batch (`flushDirty` from
    /// channelReadComplete) or, for output from anywhere else (mailbox, timers), once the loop
    /// has handled its current batch of events.
    func markDirty(_ connection: ConnectionHandler) {
        dirty.append(connection)
        if !flushScheduled {
            flushScheduled = true
            loop.execute { self.flushDirty() }
        }
    }

    func flushDirty() {
        flushScheduled = false
        if dirty.isEmpty { return }
        let batch = dirty
        dirty.removeAll(keepingCapacity: true)
        for connection in batch { connection.flushOutput() }
    }

    // MARK: - Publishing

    /// Stores or clears a retained message, then routes the message to every matching
    /// subscriber. On this worker's loop.
    func publish(_ message: Message) {
        if message.retain { broker.retain(message) }
        route(message)
    }

    private func route(_ message: Message) {
        let targets = lookup(message.topic)
        if targets.isEmpty { return }
        var qos0Frame: ByteBuffer?
        for target in targets {
            let qos = min(message.qos, target.qos)
            var delivery = Delivery(message: message, qos: qos, retain: false, frame: nil)
            if qos == .atMostOnce {
                if qos0Frame == nil { qos0Frame = message.encodeQoS0Frame(retain: false) }
                delivery.frame = qos0Frame
            }
            let owner = target.session.owner
            if owner == index {
                target.session.deliver(delivery, broker: broker)
            } else {
                broker.workers[owner].post(target.session, delivery)
            }
        }
    }

    /// Subscribers for a topic, from this worker's cache while the subscription set is unchanged.
    private func lookup(_ topic: ByteBuffer) -> [(session: Session, qos: QoS)] {
        let generation = broker.subscriptionGeneration.load(ordering: .acquiring)
        if let cached = routeCache[topic], cached.generation == generation { return cached.targets }
        let (targets, current) = broker.matchSubscribers(topic: String(buffer: topic))
        if routeCache.count >= Self.routeCacheLimit { routeCache.removeAll(keepingCapacity: true) }
        // The key is copied so that the cache does not pin the read buffer.
        routeCache[ByteBuffer(bytes: topic.readableBytesView)] = CachedRoute(generation: current, targets: targets)
        return targets
    }
}
