import Foundation
import Logging
import MQTTCore
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// A bridge whose TLS files could not be used when the broker started.
public struct BridgeSetupError: Error, CustomStringConvertible {
    /// Position of the bridge in the configuration.
    public var index: Int
    public var underlying: TLSSettingsError
    /// The bridge's key at fault (`cafile`, `certfile`, `keyfile`).
    public var key: String { underlying.key }
    public var description: String { underlying.problem }
}

/// What a bridge has done, for metrics and `$SYS` (any thread).
final class BridgeCounters: Sendable {
    let connected = Atomic<Bool>(false)
    let messagesOut = Atomic<Int>(0)
    let messagesIn = Atomic<Int>(0)
    let bytesOut = Atomic<Int>(0)
    let bytesIn = Atomic<Int>(0)
    let reconnects = Atomic<Int>(0)
    /// Messages waiting in the bridge's local session (queued), as of its last change.
    let queued = Atomic<Int>(0)
}

/// A link to another broker (`[[bridge]]`): an MQTT client of the remote, and a session of the
/// local broker (`$bridge/NAME`), on one worker's loop.
///
/// Out: the local session subscribes to each outgoing topic's local filter (No Local: what came in
/// over this bridge does not go back out); the session decides what is sent and when (queue,
/// in-flight window, packet ids, re-sending with DUP after a reconnect), exactly as for a client,
/// and this link, its `SessionOutbound`, writes it to the remote with the topic mapped
/// (`local_prefix` off, `remote_prefix` on). The session is persistent, so QoS 1/2 messages queue
/// while the link is down (and in the store, with `[persistence]`).
///
/// In: the link subscribes on the remote to each incoming topic's remote filter; what comes is
/// published locally with the topic mapped back, as from a client `$bridge/NAME`: the ACL the
/// `authorize` hook gives that name applies, and `on_publish` hooks run.
///
/// Everything here runs on `worker.loop` (hence `@unchecked Sendable`).
final class BridgeLink: SessionOutbound, @unchecked Sendable {
    let configuration: BridgeConfiguration
    let counters = BridgeCounters()
    private unowned let broker: Broker
    let worker: Worker
    private var logger: Logger
    /// The log lines of remote messages dropped for their topic, and of local ones not sent.
    private var topicDrops = LogThrottle()
    private var forwardDrops = LogThrottle()
    private let clientInfo: ClientInfo
    private var session: Session?
    private var channel: (any Channel)?
    /// CONNACK 0 came on `channel`.
    private var connected = false
    /// The remote's CONNACK refused the bridge (logged so): the close that follows is no news.
    private var refused = false
    /// A read brought acknowledgements: `readDone` pumps the session.
    private var acknowledgedInRead = false
    private var stopped = false
    private var delay: TimeAmount
    private var reconnectTask: Scheduled<Void>?
    /// When the current link got its CONNACK: the back-off starts again from `min` only after a
    /// link that lasted (a remote that accepts and drops at once is not retried at full speed).
    private var connectedAt = NIODeadline.distantPast
    /// Closes a connection whose CONNACK does not come (a remote that accepts and says nothing).
    private var connackTimeout: Scheduled<Void>?
    private var pingTask: RepeatedTask?
    /// A PINGREQ went out and its PINGRESP has not come.
    private var pingOutstanding = false
    /// What an MQTT 5 remote's CONNACK said it takes (3.1.1: everything): QoS is lowered to its
    /// Maximum QoS (MQTT-3.2.2-11), RETAIN cleared when it has none (MQTT-3.2.2-14), and a
    /// PUBLISH over its Maximum Packet Size, as mapped, not sent (MQTT-3.2.2-15).
    private var remote = RemoteLimits()
    private struct RemoteLimits {
        var maximumQoS = QoS.exactlyOnce
        var retains = true
        var maximumPacketSize = Int.max
        /// QoS 2 messages sent at QoS 1 (a Maximum QoS of 1): their PUBACK completes them.
        var downgraded = Set<UInt16>()
    }
    private var flushScheduled = false
    private var acl: ClientACL?
    private var verdicts: [TopicName: Bool] = [:]
    private var sslContext: NIOSSLContext?
    /// 3.1.1 remotes echo what the bridge publishes on topics it also subscribes to there: what
    /// went out on such topics, to drop once when it comes back (bounded).
    private var echoes = EchoFilter()
    private let echoesPossible: Bool
    private let version: ProtocolVersion
    /// `sync = "full"`: acknowledgements to the remote waiting for the store, in order.
    private let acks = StoreAcks()
    /// The topics of each direction, their filters parsed once.
    private let outgoing: [Mapping]
    private let incomingTopics: [Mapping]
    /// Packets written since the last flush, sent as one buffer (as a connection's batch). While
    /// the channel is not writable (the remote or the network is slower than the local side), the
    /// batch is kept and grows up to `maxBatchedBytes`; only then does the session queue messages
    /// (a queued message is first copied out of its read buffer: one copy more than the batch's).
    private var batch: ByteBuffer?
    /// Past this much in `batch`, the link counts as unable to take more until it is flushed.
    /// Large enough that a burst to a remote a little slower than the local side (the bridge
    /// bench row: ten publishers' QoS 0 1 KiB messages, ~10 MB outstanding) mostly stays in the
    /// batch: at 1 MiB half of them went through the queue and its copy, and the edge's core was
    /// the limit (388k -> 464k/s forwarded, edge CPU -17%).
    private static let maxBatchedBytes = 8 << 20

    /// One `[[bridge.topic]]` for one direction: the filter topics are matched against, the
    /// prefix to take off and the one to put on.
    private struct Mapping {
        var filter: TopicFilter
        var strip: Int
        var add: ByteBuffer
        /// Nothing to change: the topic goes as it is.
        var identity: Bool { strip == 0 && add.readableBytes == 0 }

        /// The topic `name` becomes, if this mapping takes it: nil if it does not, and for the
        /// prefix's own parent, which `prefix/#` also matches. What it becomes may be no topic
        /// (empty: the prefix itself with no prefix to put on, MQTT-4.7.3-1; or longer than a
        /// topic may be): the caller checks.
        func map(_ name: TopicName) -> ByteBuffer? {
            guard filter.matches(name), name.bytes.readableBytes >= strip else { return nil }
            if identity { return name.bytes }
            var mapped = add
            mapped.writeImmutableBuffer(name.bytes.getSlice(at: name.bytes.readerIndex + strip, length: name.bytes.readableBytes - strip)!)
            return mapped
        }
    }

    init(configuration: BridgeConfiguration, broker: Broker, worker: Worker, logger: Logger) {
        self.configuration = configuration
        self.broker = broker
        self.worker = worker
        var logger = logger
        logger[metadataKey: "bridge"] = "\(configuration.name)"
        self.logger = logger
        self.delay = configuration.reconnectMin
        self.version = configuration.protocolVersion
        clientInfo = ClientInfo(
            clientID: configuration.localClientID, username: configuration.username, address: configuration.address.description,
            origin: RunningListener(unboundNamed: "bridge \(configuration.name)"))
        // MQTT 5 remotes honour No Local; a 3.1.1 one sends back what the bridge publishes on a
        // topic it subscribes to there too.
        echoesPossible = configuration.protocolVersion == .v3_1_1
            && configuration.topics.contains { $0.direction.goesOut }
            && configuration.topics.contains { $0.direction.comesIn }
        // (The filters were checked when the configuration was read.)
        outgoing = configuration.topics.filter(\.direction.goesOut).compactMap { topic in
            (try? TopicFilter(topic.localFilter)).map { Mapping(filter: $0, strip: topic.localPrefix.utf8.count, add: ByteBuffer(string: topic.remotePrefix)) }
        }
        incomingTopics = configuration.topics.filter(\.direction.comesIn).compactMap { topic in
            (try? TopicFilter(topic.remoteFilter)).map { Mapping(filter: $0, strip: topic.remotePrefix.utf8.count, add: ByteBuffer(string: topic.localPrefix)) }
        }
    }

    // MARK: - Lifecycle (worker loop)

    /// Takes (or makes) the local session, subscribes it locally, and connects; over TLS with
    /// `sslContext` (made off the loop: `TLSSettings.makeClientContext`).
    func start(sslContext: NIOSSLContext?) {
        worker.assertOnLoop()
        self.sslContext = sslContext
        let session = broker.bridgeSession(for: configuration, on: worker)
        session.setMaxInflight(configuration.maxInflight)
        session.setMaxQueued(configuration.maxQueued, bytes: configuration.maxQueuedBytes)
        self.session = session
        // (A session kept in the store from a run with other topics: what is no longer configured goes.)
        let filters = Set(configuration.topics.filter(\.direction.goesOut).map(\.localFilter))
        for filter in session.subscriptions.keys where !filters.contains(filter.string) { broker.unsubscribe(session, filter: filter) }
        for topic in configuration.topics where topic.direction.goesOut {
            guard let filter = try? TopicFilter(topic.localFilter) else { continue }
            broker.subscribe(session, filter: filter, grant: Grant(qos: topic.qos, noLocal: true))
        }
        switch broker.hooks.authorize(clientInfo, worker: worker.index) {
        case .now(let tables):
            authorized(tables)
            connect()
        case .later(let future):
            future.hop(to: worker.loop).whenComplete { [self] result in
                authorized((try? result.get()) ?? [.denyAll])
                connect()
            }
        }
    }

    private func authorized(_ tables: [ACLTable]) {
        acl = tables.isEmpty ? nil : ClientACL(tables, clientID: clientInfo.clientID, username: clientInfo.username)
        verdicts = [:]
    }

    /// Stops for good (the broker is stopping): DISCONNECT, and no reconnect.
    func stop() {
        worker.assertOnLoop()
        stopped = true
        reconnectTask?.cancel()
        connackTimeout?.cancel()
        pingTask?.cancel()
        if let channel, connected {
            var buffer = channel.allocator.buffer(capacity: 2)
            buffer.writeMQTTPacket(.disconnect, version: version)
            channel.writeAndFlush(buffer, promise: nil)
        }
        channel?.close(promise: nil)
    }

    private func connect() {
        guard !stopped else { return }
        let configuration = self.configuration
        let sslContext = self.sslContext
        // No level limit on what the remote sends: `max_topic_levels` holds for the local topic it
        // maps to (`localMessage`), which is dropped past it, not the link closed (the remote would
        // send it again on every reconnect).
        let decoder = MQTTDecoder(maxPacketSize: broker.configuration.limits.maxPacketSize, protocolVersion: version)
        let host = configuration.address.host
        let isAddress = (try? SocketAddress(ipAddress: host, port: 0)) != nil
        let handler = BridgeChannelHandler(link: self, decoder: decoder)
        ClientBootstrap(group: worker.loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            // One link carries what many clients publish: room for a tick's batch in the channel
            // before it counts as unwritable and the session queues (and copies) messages.
            .channelOption(.writeBufferWaterMark, value: .init(low: 256 * 1024, high: 1024 * 1024))
            .channelOption(.maxMessagesPerRead, value: Broker.maxMessagesPerRead)
            .channelOption(.recvAllocator, value: Broker.receiveAllocator)
            .connectTimeout(.seconds(10))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let sslContext {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: sslContext, serverHostname: isAddress ? nil : host))
                    }
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: configuration.address.port)
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    guard !stopped else { return channel.close(promise: nil) }
                    self.channel = channel
                    sendConnect(on: channel)
                    // (keep_alive, at most 10 s: a remote that answers no CONNECT may answer no PINGREQ either.)
                    let wait = configuration.keepAlive == 0 ? 10 : min(Int64(configuration.keepAlive), 10)
                    connackTimeout = worker.loop.scheduleTask(in: .seconds(wait)) { [self] in
                        guard channel === self.channel, !connected else { return }
                        logger.warning("no CONNACK from \(configuration.address) within \(wait) s; trying again later")
                        channel.close(promise: nil)
                    }
                case .failure(let error):
                    logger.info("bridge cannot connect to \(configuration.address): \(errorText(error))")
                    scheduleReconnect()
                }
            }
    }

    private func sendConnect(on channel: any Channel) {
        var properties = MQTTProperties()
        if version == .v5 {
            // A session that outlives the connection needs an expiry (0 ends it with it).
            if !configuration.cleanSession { properties.sessionExpiryInterval = UInt32.max }
            // The remote must not send more (MQTT-3.1.2-24: it drops the message): a larger
            // packet would close the link, again on every reconnect if it is a QoS 1/2 resend.
            properties.maximumPacketSize = broker.configuration.limits.maximumPacketSizeProperty
        }
        let connect = ConnectPacket(
            protocolLevel: version.rawValue, cleanSession: configuration.cleanSession, keepAlive: configuration.keepAlive,
            clientID: configuration.clientID, username: configuration.username, password: configuration.password.map { ByteBuffer(string: $0) },
            properties: properties)
        var buffer = channel.allocator.buffer(capacity: 64)
        buffer.writeMQTTPacket(.connect(connect), version: version)
        channel.writeAndFlush(buffer, promise: nil)
    }

    /// Reconnects after the current delay (with jitter), and doubles it up to `max`.
    private func scheduleReconnect() {
        guard !stopped, reconnectTask == nil else { return }
        let jittered = TimeAmount.nanoseconds(Int64(Double(delay.nanoseconds) * Double.random(in: 0.75...1.25)))
        delay = min(delay * 2, configuration.reconnectMax)
        counters.reconnects.add(1, ordering: .relaxed)
        reconnectTask = worker.loop.scheduleTask(in: jittered) { [self] in
            reconnectTask = nil
            connect()
        }
    }

    // MARK: - From the remote (worker loop)

    fileprivate func received(_ packet: MQTTPacket, on channel: any Channel) {
        guard channel === self.channel, !stopped else { return }
        if !connected, packet.type != .connack {
            return protocolViolation("sent \("\(packet.type)".uppercased()) before CONNACK (MQTT-3.2.0-1)", on: channel)
        }
        switch packet {
        case .connack(let connack):
            connackReceived(connack, on: channel)
        case .publish(let publish):
            // The bridge's CONNECT allows no topic aliases (no Topic Alias Maximum).
            if publish.properties.topicAlias != nil {
                return protocolViolation("sent a topic alias, which the bridge did not allow", reasonCode: .topicAliasInvalid, on: channel)
            }
            incoming(publish, on: channel)
        case .puback(let id):
            remoteAcknowledged(.puback, id, refused: false, on: channel)
        case .pubrec(let id):
            remoteAcknowledged(.pubrec, id, refused: false, on: channel)
        case .pubcomp(let id):
            remoteAcknowledged(.pubcomp, id, refused: false, on: channel)
        case .pubrel(let id):
            remoteAcknowledged(.pubrel, id, refused: false, on: channel)
        case .ackV5(let ack):
            remoteAcknowledged(ack.kind, ack.packetID, refused: ack.reasonCode.isFailure, on: channel)
        case .suback(let suback):
            let filters = configuration.topics.filter(\.direction.comesIn).map(\.remoteFilter)
            let refused = suback.value.returnCodes.enumerated().compactMap { index, code -> String? in
                let filter = index < filters.count ? "\"\(LogText(filters[index]))\" " : ""
                switch code {
                case .granted: return nil
                case .failure: return filter + "(0x80)"
                case .refused(let reason): return filter + "(\(hex(reason.rawValue)))"
                }
            }
            if !refused.isEmpty {
                logger.warning("the remote refused \(refused.count) of the bridge's subscriptions: \(refused.joined(separator: ", "))")
            }
        case .pingresp:
            pingOutstanding = false
        case .disconnect:
            logger.info("the remote sent DISCONNECT")
            channel.close(promise: nil)
        case .disconnectV5(let disconnect):
            let reason = disconnect.properties.reasonString.map { ": \(LogText($0, limit: 256))" } ?? ""
            logger.info("the remote sent DISCONNECT, reason code \(hex(disconnect.reasonCode.rawValue))\(reason)")
            channel.close(promise: nil)
        case .auth:
            // The bridge's CONNECT names no Authentication Method (MQTT-4.12.0-6).
            return protocolViolation("sent AUTH, which the bridge did not ask for", on: channel)
        default:
            break
        }
        flushSoon()
    }

    /// The remote broke the protocol: logged, and the link closed (MQTT 5, after CONNACK: DISCONNECT
    /// with `reasonCode` first, written with what is batched before the close: a flush left for
    /// later would find the link gone).
    private func protocolViolation(_ what: String, reasonCode: ReasonCode = .protocolError, on channel: any Channel) {
        logger.warning("the remote \(what): closing the link")
        if connected, version == .v5 { write(.disconnectV5(DisconnectPacket(reasonCode: reasonCode))) }
        if let pending = batch {
            batch = nil
            channel.writeAndFlush(pending, promise: nil)
        }
        channel.close(promise: nil)
    }

    private func hex(_ code: UInt8) -> String { "0x" + String(code, radix: 16, uppercase: true) }

    private func connackReceived(_ connack: ConnackPacket, on channel: any Channel) {
        let accepted = version == .v5 ? connack.reasonCode == .success : connack.returnCode == .accepted
        guard accepted else {
            let code = version == .v5 ? "reason code \(hex(connack.reasonCode.rawValue))" : "return code \(connack.returnCode.rawValue)"
            logger.warning("the remote refused the bridge's CONNECT: CONNACK \(code); trying again later")
            refused = true
            channel.close(promise: nil)
            return
        }
        guard !connected else {
            logger.warning("the remote sent a second CONNACK: closing the link")
            channel.close(promise: nil)
            return
        }
        connackTimeout?.cancel()
        connackTimeout = nil
        connected = true
        connectedAt = .now()
        counters.connected.store(true, ordering: .relaxed)
        publishState()
        logger.info("bridge connected to \(configuration.address) (session present: \(connack.sessionPresent))")
        // Subscriptions on the remote: each incoming topic's remote filter (MQTT 5: No Local).
        let incoming = configuration.topics.filter(\.direction.comesIn)
        if !incoming.isEmpty {
            let subscriptions = incoming.map {
                Subscription(filter: $0.remoteFilter, qos: $0.qos, noLocal: version == .v5)
            }
            write(.subscribe(SubscribePacket(packetID: 1, subscriptions: subscriptions)))
        }
        remote = RemoteLimits()
        if version == .v5 {
            remote.maximumQoS = connack.properties.maximumQoS ?? .exactlyOnce
            remote.retains = connack.properties.retainAvailable ?? true
            remote.maximumPacketSize = connack.properties.maximumPacketSize.map(Int.init) ?? .max
        }
        // MQTT 5: the remote's Server Keep Alive replaces the bridge's (MQTT-3.2.2-21).
        let keepAlive = version == .v5 ? connack.properties.serverKeepAlive ?? configuration.keepAlive : configuration.keepAlive
        if keepAlive > 0 {
            let period = TimeAmount.seconds(Int64(keepAlive))
            pingOutstanding = false
            pingTask = worker.loop.scheduleRepeatedTask(initialDelay: period, delay: period) { [self] _ in
                guard let channel = self.channel, connected else { return }
                if pingOutstanding {
                    logger.info("the remote did not answer PINGREQ within keep_alive: reconnecting")
                    channel.close(promise: nil)
                    return
                }
                pingOutstanding = true
                write(.pingreq)
                flushSoon()
            }
        }
        guard let session else { return }
        // A remote that kept no session for the bridge has no QoS 2 flow half done either: the ids
        // it sends from now on are new.
        if !connack.sessionPresent { session.forgetInboundQoS2() }
        // An MQTT 5 remote's Receive Maximum lowers the window (its Maximum Packet Size is
        // checked with the remote topic, in `writePublish`).
        session.setClientLimits(ClientLimits(receiveMaximum: connack.properties.receiveMaximum.map(Int.init), maximumPacketSize: nil))
        session.outbound = self
        session.report(.attached)
        session.resume()
    }

    /// `$SYS/broker/bridges/NAME/state`, retained, as the link comes and goes (and every
    /// `sys_interval` with the other `$SYS` topics).
    private func publishState() {
        guard broker.isAccepting else { return }
        let topic = TopicName(alreadyValidated: ByteBuffer(string: "$SYS/broker/bridges/\(configuration.name)/state"))
        worker.publish(Message(topic: topic, payload: ByteBuffer(string: connected ? "connected" : "disconnected"), qos: .atMostOnce, retain: true))
    }

    /// The link went down: the session stays (persistent) and queues; reconnect later.
    fileprivate func closed(_ channel: any Channel) {
        guard channel === self.channel else { return }
        self.channel = nil
        batch = nil  // (what the session had sent on it goes again with DUP, or is QoS 0)
        connackTimeout?.cancel()
        connackTimeout = nil
        acks.reset()  // (the remote sends again what it had no acknowledgement for)
        pingTask?.cancel()
        pingTask = nil
        if connected {
            connected = false
            counters.connected.store(false, ordering: .relaxed)
            publishState()
            logger.info("bridge link to \(configuration.address) lost")
            if let session, session.outbound === self { session.disconnected() }
            if .now() - connectedAt >= .seconds(10) { delay = configuration.reconnectMin }
        } else if !refused {
            logger.info("bridge link to \(configuration.address) closed before CONNACK")
        }
        refused = false
        scheduleReconnect()
    }

    /// The link's channel failed (a TLS handshake the remote's certificate failed, a packet the
    /// decoder refused): logged; it closes, and the link reconnects.
    fileprivate func failed(_ error: any Error, on channel: any Channel) {
        guard channel === self.channel else { return }
        logger.warning("bridge link error with \(configuration.address): \(LogText(errorText(error), limit: 256))")
    }

    fileprivate func writabilityChanged(_ channel: any Channel) {
        guard channel === self.channel else { return }
        updateReading(channel)
        guard channel.isWritable else { return }
        if connected { session?.pump() }
        flushSoon()
    }

    /// The link is read while what it answers can go out: not while its channel is unwritable
    /// (a remote that sends PUBLISHes or PUBRELs without reading the acknowledgements would grow
    /// the batch without bound), nor while `StoreAcks.maxWaiting` acknowledgements wait for the
    /// disk.
    private func updateReading(_ channel: any Channel) {
        channel.setOption(.autoRead, value: channel.isWritable && acks.waiting < StoreAcks.maxWaiting).whenComplete { _ in }
    }

    /// A PUBLISH from the remote: its topic mapped, published locally as from `$bridge/NAME`
    /// (unless it is this bridge's own message coming back), and acknowledged: with `sync =
    /// "full"`, once the store has what it changed, in order with the other acknowledgements.
    private func incoming(_ publish: PublishPacket, on channel: any Channel) {
        counters.messagesIn.add(1, ordering: .relaxed)
        counters.bytesIn.add(publish.payload.readableBytes, ordering: .relaxed)
        // Exactly once: a PUBLISH again whose id still awaits PUBREL is not published again.
        let fresh = publish.qos != .exactlyOnce || (session?.receivedQoS2(publish.packetID!) ?? true)
        var waits = false
        if fresh, let message = localMessage(for: publish) {
            let route = worker.route(for: message.topic)
            waits = broker.waitingStore != nil
                && (message.retain || route.persists || (publish.qos == .exactlyOnce && session?.isStored == true))
            publishLocally(message, along: route)
        }
        guard let id = publish.packetID else { return }
        acknowledge(publish.qos == .atLeastOnce ? .puback(packetID: id) : .pubrec(packetID: id), waiting: waits, on: channel)
    }

    /// A PUBACK, PUBREC, PUBREL or PUBCOMP to the remote, in order with the others; `waiting`, with
    /// `sync = "full"`: once the store has what the packet it answers changed (as a connection's).
    private func acknowledge(_ ack: MQTTPacket, waiting: Bool, on channel: any Channel) {
        guard waiting, broker.waitingStore != nil else {
            if !acks.queueBehind(ack) { write(ack) }
            return
        }
        let ticket = acks.wait(ack)
        if acks.waiting >= StoreAcks.maxWaiting { updateReading(channel) }
        broker.committed(after: worker).whenComplete { [self] _ in
            let ready = acks.committed(ticket)
            guard channel === self.channel else { return }
            for entry in ready { write(entry.ack) }
            updateReading(channel)
            flushSoon()
        }
    }

    /// The local message a remote PUBLISH stands for: its topic mapped back, checked against the
    /// level limit and the ACL; nil if it does not come in (no incoming topic takes it, an echo of
    /// this bridge's own, denied).
    private func localMessage(for publish: PublishPacket) -> Message? {
        // Validated by the decoder, which counted its levels (an empty topic would need a topic
        // alias, which the bridge allows none).
        guard publish.topic.readableBytes > 0 else { return nil }
        let remote = publish.topicLevels != 0
            ? TopicName(alreadyValidated: publish.topic, levels: Int(publish.topicLevels)) : TopicName(alreadyValidated: publish.topic)
        guard let local = localTopic(for: remote) else { return nil }
        if echoesPossible, echoes.take(topic: publish.topic, payload: publish.payload) { return nil }
        guard let topic = try? TopicName(validating: local), topic.levelCount <= broker.configuration.limits.maxTopicLevels else {
            droppedTopic(local, remote: remote)
            return nil
        }
        guard mayPublish(topic) else { return nil }
        var properties = publish.properties
        properties.topicAlias = nil
        if let interval = properties.messageExpiryInterval {
            properties.messageExpiresAt = NIODeadline.now().uptimeNanoseconds + UInt64(interval) * 1_000_000_000
        }
        return Message(topic: topic, payload: publish.payload, qos: publish.qos, retain: publish.retain, properties: properties)
    }

    /// An acknowledgement from the remote: of a message the bridge sent (PUBACK, PUBREC,
    /// PUBCOMP: the session's flow goes on), or PUBREL of one it received. One that breaks the flow
    /// of the message under its id (PUBREC for a QoS 1 message, PUBCOMP before PUBREC) is a
    /// protocol violation that closes the link (MQTT-4.8.0-1), as Mosquitto's bridge does; an id
    /// not in flight is not (a late or repeated acknowledgement).
    private func remoteAcknowledged(_ kind: AckPacket.Kind, _ id: UInt16, refused: Bool, on channel: any Channel) {
        guard let session else { return }
        let broken: Bool
        switch kind {
        case .puback:
            // For a QoS 1 message, or a QoS 2 one sent at QoS 1 (`remote.downgraded`).
            if remote.downgraded.remove(id) != nil {
                broken = session.pubrec(id) || session.pubcomp(id, pumping: false)
            } else {
                broken = session.puback(id, pumping: false)
            }
        case .pubrec where refused:
            broken = session.pubrecRefused(id, pumping: false)
        case .pubrec:
            broken = session.pubrec(id)
            if !broken { acknowledge(.pubrel(packetID: id), waiting: session.isStored, on: channel) }
        case .pubcomp:
            broken = session.pubcomp(id, pumping: false)
        case .pubrel:
            session.released(inbound: id)
            acknowledge(.pubcomp(packetID: id), waiting: session.isStored, on: channel)
            return
        }
        acknowledgedInRead = true
        guard broken else { return }
        protocolViolation("sent \(kind) for packet id \(id), which is not in that state of its flow (MQTT-4.8.0-1)", on: channel)
    }

    /// After the packets of one read: the messages its acknowledgements made room for are sent
    /// (one pass of the session's queue per read rather than per acknowledgement).
    fileprivate func readDone() {
        guard acknowledgedInRead else { return }
        acknowledgedInRead = false
        session?.pump()
    }

    /// Publishes a message from the remote locally: the publish hooks first, if they want its topic.
    private func publishLocally(_ message: Message, along route: Worker.Route) {
        guard route.hooked else { return forward(message, along: route) }
        switch broker.hooks.interceptPublish(message, from: clientInfo, worker: worker.index) {
        case .now(let decision): apply(decision, to: message)
        case .later(let future):
            future.hop(to: worker.loop).whenComplete { [self] result in
                worker.beginBatch()
                apply((try? result.get()) ?? .drop, to: message)
                worker.flushDirty()
            }
        }
    }

    private func apply(_ decision: PublishDecision, to message: Message) {
        switch decision {
        case .deliver: forward(message, along: worker.route(for: message.topic))
        case .drop: worker.stats.droppedHook &+= 1
        case .change(let changed): publishChanged(changed, original: message)
        case .replace(let messages): for changed in messages { publishChanged(changed, original: message) }
        }
    }

    private func publishChanged(_ m: HookedMessage, original: Message) {
        guard m.topic.levelCount <= broker.configuration.limits.maxTopicLevels, m.topic == original.topic || mayPublish(m.topic) else { return }
        let message = Message(topic: m.topic, payload: m.payload, qos: m.qos, retain: m.retain, properties: m.properties)
        forward(message, along: worker.route(for: m.topic))
    }

    private func forward(_ message: Message, along route: Worker.Route) {
        // From the bridge's session: its own subscriptions (No Local) do not send it back out.
        worker.publish(message, along: route, from: session)
    }

    private func mayPublish(_ topic: TopicName) -> Bool {
        guard let acl else { return true }
        if let verdict = verdicts[topic] { return verdict }
        let verdict = acl.allowsPublish(topic: topic)
        if verdicts.count >= 1000 { verdicts.removeAll(keepingCapacity: true) }
        verdicts[topic.copied()] = verdict
        if !verdict { worker.stats.droppedACL &+= 1 }
        return verdict
    }

    // MARK: - Topic mapping

    /// The remote topic of a local one going out: the first outgoing topic whose local filter
    /// matches, with its local prefix taken off and its remote prefix put on.
    private func remoteTopic(for local: TopicName) -> ByteBuffer? {
        for mapping in outgoing { if let mapped = mapping.map(local) { return mapped } }
        return nil
    }

    /// The local topic of a remote one coming in (the other way round).
    private func localTopic(for remote: TopicName) -> ByteBuffer? {
        for mapping in incomingTopics { if let mapped = mapping.map(remote) { return mapped } }
        return nil
    }

    /// A remote message whose mapped topic is not one here: acknowledged and dropped (the remote
    /// would send it again on every reconnect otherwise), counted, and logged, at most once every
    /// ten seconds per bridge with the count since.
    private func droppedTopic(_ local: ByteBuffer, remote: TopicName) {
        worker.stats.droppedTopic &+= 1
        guard let count = topicDrops.due() else { return }
        let levels = local.readableBytesView.reduce(1) { $0 + ($1 == UInt8(ascii: "/") ? 1 : 0) }
        logger.warning(
            "message from the remote dropped: its local topic \"\(LogText(String(buffer: local)))\" (\(levels) levels, \(local.readableBytes) bytes) is over max_topic_levels (\(broker.configuration.limits.maxTopicLevels)) or not a topic; \(count) dropped since the last such line",
            metadata: ["remote_topic": "\(LogText(value: remote.string))"])
    }

    // MARK: - SessionOutbound (to the remote)

    var canWrite: Bool { connected && channel != nil && (batch?.readableBytes ?? 0) < Self.maxBatchedBytes }

    func writePublish(_ message: Message, qos: QoS, packetID: UInt16?, retain: Bool, dup: Bool) {
        guard let topic = remoteTopic(for: message.topic), (1...TopicName.maxLength).contains(topic.readableBytes) else {
            // No remote topic for it (empty or too long with the prefixes, or the prefix's parent):
            // it is not sent, and done with as if the remote had acknowledged it.
            worker.stats.droppedTopic &+= 1
            notForwarded("no remote topic for \"\(LogText(message.topic.string))\" (its prefixes make it empty or longer than 65,535 bytes, or it is the local prefix's parent)")
            return doneWithoutRemote(packetID, qos: qos)
        }
        // RETAIN as the local message had it: a retained message stays retained on the remote.
        let retain = message.retain && remote.retains
        let wireQoS = min(qos, remote.maximumQoS)
        if echoesPossible, !dup { echoes.add(topic: topic, payload: message.payload) }
        if version == .v3_1_1 {
            appendBatch { $0.writePublish(topic: topic, payload: message.payload, qos: qos, retain: retain, dup: dup, packetID: packetID) }
        } else {
            var properties = message.properties
            if !properties.isUnset {
                properties.subscriptionIdentifiers = []
                properties.topicAlias = nil
                if properties.messageExpiresAt != nil {
                    properties.messageExpiryInterval = properties.remainingExpiryInterval(at: NIODeadline.now().uptimeNanoseconds)
                }
            }
            let size = ByteBuffer.publishFrameSize(
                topicLength: topic.readableBytes, payloadLength: message.payload.readableBytes, qos: wireQoS, properties: properties)
            guard size <= remote.maximumPacketSize else {
                session?.context.droppedTooLarge.add(1, ordering: .relaxed)
                notForwarded("\(size) bytes as a PUBLISH to the remote, over its Maximum Packet Size (\(remote.maximumPacketSize))")
                return doneWithoutRemote(packetID, qos: qos)
            }
            let wireID = wireQoS == .atMostOnce ? nil : packetID
            if qos == .exactlyOnce, wireQoS == .atLeastOnce, let packetID { remote.downgraded.insert(packetID) }
            appendBatch {
                $0.writePublishHeader(
                    topic: topic, payloadLength: message.payload.readableBytes, qos: wireQoS, retain: retain, dup: dup && wireID != nil,
                    packetID: wireID, properties: properties)
                $0.writeImmutableBuffer(message.payload)
            }
            // Sent at QoS 0 (the remote's Maximum QoS): nothing will acknowledge it.
            if wireQoS == .atMostOnce, qos != .atMostOnce { doneWithoutRemote(packetID, qos: qos) }
        }
        counters.messagesOut.add(1, ordering: .relaxed)
        counters.bytesOut.add(message.payload.readableBytes, ordering: .relaxed)
        flushSoon()
    }

    /// A local message not sent to the remote: logged at most once every ten seconds per bridge,
    /// with the count since (a local client publishing such messages must not write a line each).
    private func notForwarded(_ why: @autoclosure () -> String) {
        guard let count = forwardDrops.due() else { return }
        logger.info("not forwarded: \(why()); \(count) not forwarded since the last such line")
    }

    /// A message the remote will not acknowledge (not sent, or sent at QoS 0): done with as if it
    /// had, once this call returns (the session is in the middle of sending it).
    private func doneWithoutRemote(_ packetID: UInt16?, qos: QoS) {
        guard let packetID, let session else { return }
        worker.loop.execute {
            if qos == .atLeastOnce { session.puback(packetID) } else { session.pubrec(packetID); session.pubcomp(packetID) }
        }
    }

    func writeQoS0(frame: ByteBuffer, message: Message) {
        writePublish(message, qos: .atMostOnce, packetID: nil, retain: false, dup: false)
    }

    func writePubrel(packetID: UInt16) {
        write(.pubrel(packetID: packetID))
        flushSoon()
    }

    func pumpSoon() {
        worker.pacing.later { [self] in
            session?.pump()
            flushSoon()
        }
    }

    // No client can take a bridge's session (`$bridge/` ids are refused), nor a plugin close it.
    func takenOver(publishWill: Bool) {}
    func disconnect(reason: String) {}
    func reauthorize() {
        switch broker.hooks.authorize(clientInfo, worker: worker.index) {
        case .now(let tables): authorized(tables)
        case .later(let future):
            future.hop(to: worker.loop).whenComplete { [self] result in authorized((try? result.get()) ?? [.denyAll]) }
        }
    }

    func interceptDelivery(_ message: Message) -> Message? {
        broker.interceptDelivery(message, to: clientInfo, worker: worker.index, logger: logger)
    }

    private func write(_ packet: MQTTPacket) {
        appendBatch { $0.writeMQTTPacket(packet, version: version) }
    }

    private func appendBatch(_ write: (inout ByteBuffer) -> Void) {
        guard let channel else { return }
        if batch == nil { batch = channel.allocator.buffer(capacity: 4096) }
        write(&batch!)
    }

    /// The depth of the local session's queue, for metrics (worker loop).
    func refreshQueued() {
        if let session { counters.queued.store(session.queue.count, ordering: .relaxed) }
    }

    /// One flush per loop tick, however many packets were written; none while the channel is not
    /// writable (`writabilityChanged` flushes then).
    private func flushSoon() {
        guard !flushScheduled, channel != nil else { return }
        flushScheduled = true
        worker.loop.execute { [self] in
            flushScheduled = false
            guard let channel, channel.isWritable, let pending = batch else { return }
            batch = nil
            channel.writeAndFlush(pending, promise: nil)
            // The batch's limit stopped the session, not the socket: go on.
            if connected, channel.isWritable, let session, session.hasQueued { session.pump() }
        }
    }
}

/// Hands the link the packets its channel reads and tells it when the channel goes. It decodes
/// in place, as a client connection's handler does (no decoder stage: no `NIOAny` per packet; a
/// link carries many clients' acknowledgements); only an incomplete packet is kept between reads,
/// in a buffer of its own that the next reads complete (`MQTTDecoder.keepPartial`), and the
/// decoder refuses one past `max_packet_size` from its header.
private final class BridgeChannelHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    private let link: BridgeLink
    private let decoder: MQTTDecoder
    /// What the last read ended with: the start of a packet.
    private var partial: ByteBuffer?
    private var failed = false

    init(link: BridgeLink, decoder: MQTTDecoder) {
        self.link = link
        self.decoder = decoder
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        var buffer = unwrapInboundIn(data)
        let version = decoder.protocolVersion
        do {
            if var pending = partial {
                partial = nil
                guard decoder.complete(&pending, from: &buffer, version: version) else {
                    partial = pending
                    return
                }
                if let packet = try decoder.decode(buffer: &pending, version: version) { link.received(packet, on: context.channel) }
            }
            while let packet = try decoder.decode(buffer: &buffer, version: version) {
                link.received(packet, on: context.channel)
            }
            link.readDone()
        } catch {
            failed = true
            errorCaught(context: context, error: error)
            return
        }
        if buffer.readableBytes > 0 { partial = decoder.keepPartial(&buffer, version: version) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        link.closed(context.channel)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        link.writabilityChanged(context.channel)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        link.failed(error, on: context.channel)
        context.close(promise: nil)
    }
}

/// What a bridge sent to a 3.1.1 remote on topics it also subscribes to there, to recognise it
/// when the remote sends it back: a hash of topic and payload, counted, the oldest forgotten past
/// `capacity` (an echo comes back within a round trip; one that comes later is delivered twice).
struct EchoFilter {
    static let capacity = 8192
    private var order: [Int] = []
    private var head = 0
    private var counts: [Int: Int] = [:]

    private static func key(_ topic: ByteBuffer, _ payload: ByteBuffer) -> Int {
        var hasher = Hasher()
        hasher.combine(topic.readableBytesView.count)
        topic.withUnsafeReadableBytes { hasher.combine(bytes: $0) }
        payload.withUnsafeReadableBytes { hasher.combine(bytes: $0) }
        return hasher.finalize()
    }

    mutating func add(topic: ByteBuffer, payload: ByteBuffer) {
        let key = Self.key(topic, payload)
        if order.count < Self.capacity {
            order.append(key)
        } else {
            let old = order[head]
            if let count = counts[old] { counts[old] = count > 1 ? count - 1 : nil }
            order[head] = key
            head = (head + 1) % Self.capacity
        }
        counts[key, default: 0] += 1
    }

    /// Whether this message is one sent out (then it is forgotten once).
    mutating func take(topic: ByteBuffer, payload: ByteBuffer) -> Bool {
        let key = Self.key(topic, payload)
        guard let count = counts[key] else { return false }
        counts[key] = count > 1 ? count - 1 : nil
        return true
    }
}
