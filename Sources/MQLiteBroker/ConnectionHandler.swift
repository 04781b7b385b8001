import Logging
import MQTTCore
import NIOCore
import NIOSSL

/// One client connection: decodes packets, runs the MQTT 3.1.1 protocol for that client, and
/// batches its output. Lives on its channel's event loop for its whole life.
final class ConnectionHandler: ChannelInboundHandler, SessionOutbound {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    // Stored properties are laid out in this order: references and words first, then the
    // single-byte ones together, so that an idle connection's handler stays in a small malloc
    // size class (`IdleFootprintTests`). For the same reason what most clients do not have (a
    // will, access rules, TLS details, publishers held back) is kept out of line, in one box, and
    // the handler refers to its listener.
    private let worker: Worker
    /// The worker's (not a field of its own: one word less on every connection).
    private var broker: Broker { worker.broker }
    private var context: ChannelHandlerContext?
    private var session: Session?
    /// The will and access rules, nil (no storage at all) for a client that has neither.
    private var rare: Rare?
    /// Bytes read and not yet handled: the start of one packet, in a buffer of its own
    /// (`partial`), or, while reading is paused, all that was read after the pause, as read. Nil
    /// when everything read was consumed, so an idle connection holds no read buffer.
    private var cumulation: ByteBuffer?
    private var output: ByteBuffer?
    /// The protocol's rules for this connection; this handler carries out what it decides.
    private var machine = ConnectionStateMachine(now: .now())
    /// The handler's yes/no state, in one byte.
    private var flags = Flags()
    /// KiB of payload written to the channel as buffers of their own (large payloads) since the
    /// last flush: `canWrite` counts them with the batch. (After `flags`, in the two bytes the
    /// state machine and flags leave free.)
    private var unflushedKiB: UInt16 = 0
    private struct Flags: OptionSet {
        let rawValue: UInt8
        /// In the broker's count of open connections.
        static let counted = Flags(rawValue: 1 << 0)
        /// Has output in the worker's batch.
        static let dirty = Flags(rawValue: 1 << 1)
        static let holdBackCheckPending = Flags(rawValue: 1 << 2)
        /// `cumulation` is the start of one packet and nothing else, in a buffer made for it.
        static let partial = Flags(rawValue: 1 << 3)
        /// The channel is not writable (as its last writability change said): read on every
        /// delivery, so kept here rather than asked of the channel.
        static let unwritable = Flags(rawValue: 1 << 4)
        /// The packet being handled was read alone into a buffer of its own (`process`): a
        /// message made of it is kept without a copy. Cleared once that PUBLISH is accepted,
        /// and before held packets are handled.
        static let readAlone = Flags(rawValue: 1 << 5)
        /// Not read: the client does not read what it is sent, and its answers pile up
        /// (`checkAnswerBacklog`).
        static let answersHeld = Flags(rawValue: 1 << 6)
        /// Not read: subscribers of what it publishes are filling up (`holdBack`).
        static let heldBack = Flags(rawValue: 1 << 7)
    }

    private var will: Will? {
        get { rare?.will }
        set { updateRare { $0.will = newValue } }
    }

    /// Access rules from the `authorize` hook, enforced here for the life of the connection.
    private var access: Access? {
        get { rare?.access }
        set { updateRare { $0.access = newValue } }
    }

    private func updateRare(_ change: (Rare) -> Void) {
        let box = rare ?? Rare()
        change(box)
        rare = box.isEmpty ? nil : box
    }

    private func rare(authentication: Authentication) { updateRare { $0.authentication = authentication } }

    /// What this client speaks (kept in the machine's spare byte).
    private var version: ProtocolVersion {
        get { machine.version }
        set { machine.version = newValue }
    }

    /// Output held back in the batch buffer beyond this counts as "socket cannot take more".
    private static let maxBatchedBytes = 1 << 20

    init(worker: Worker, listener: RunningListener) {
        self.worker = worker
        origin = listener
        worker.broker.connectionObjects.add(1, ordering: .relaxed)
    }

    deinit {
        broker.connectionObjects.add(-1, ordering: .relaxed)
    }

    /// The broker's logger with this connection's client id and address. Built only when a line
    /// is logged, so connections carry no metadata storage; and only for a line the log level
    /// lets through (`log`, or an autoclosure): building it formats the metadata (swift-log's
    /// stream handler renders it as it is set), which cost a CONNECT storm 5% of its time when a
    /// "connected" line at debug built it for every client at the default level.
    private var logger: Logger {
        var logger = broker.logger
        logger[metadataKey: "address"] = "\(address)"
        if !clientID.isEmpty { logger[metadataKey: "client"] = "\(LogText(value: clientID))" }
        return logger
    }

    /// Logs a line with this connection's address and client id if the log level lets it through.
    private func log(_ level: Logger.Level, _ message: @autoclosure () -> Logger.Message, metadata: @autoclosure () -> Logger.Metadata? = nil) {
        guard broker.logger.logLevel <= level else { return }
        logger.log(level: level, message(), metadata: metadata())
    }

    // Who this client is (for hooks and logs): its id and user name once CONNECT has given them.
    /// The session's while one is attached, which names it; before and after, kept in `rare` (a
    /// field less on every connection).
    private var clientID: String { session?.clientID ?? rare?.clientID ?? "" }
    private var username: String?
    private var address = "?"
    /// The listener the client came in on.
    private let origin: RunningListener
    /// As the client's CONNECT said: 3, 4 or 5.
    private var protocolLevel: UInt8 = 4

    /// For the hooks.
    private var clientInfo: ClientInfo {
        var info = ClientInfo(clientID: clientID, username: username, address: address, origin: origin, tls: rare?.tls)
        info.protocolVersion = protocolLevel
        return info
    }

    // MARK: - Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    /// The pipeline is torn down (the channel closed): let go of the context, which holds this
    /// handler, so that neither outlives the connection, and of any buffered bytes.
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        cumulation = nil
        flags.remove(.partial)
        output = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        address = context.channel.remoteAddress?.addressText ?? "?"
        machine = ConnectionStateMachine(now: .now())
        worker.connections.insert(Worker.Connection(handler: self))
        let open = broker.connectionCount.add(1, ordering: .relaxed).newValue
        flags.insert(.counted)
        let listener = origin.index
        if listener >= 0 {
            worker.stats.connectionsTotal[listener] &+= 1
            worker.stats.connectionsOpen[listener] &+= 1
        }
        broker.noteOpenConnections(open)
        let max = broker.configuration.limits.maxConnections
        if max > 0 && open > max {
            worker.stats.refusedMaxConnections &+= 1
            log(.info, "refusing connection: max_connections \(max) reached")
            machine.closed()
            context.close(promise: nil)
        }
    }

    /// A PROXY protocol header named the client (`ProxyProtocolHandler`): that is its address.
    /// The client closed its side (EOF, on listeners that let NIO report it rather than close at
    /// once): the connection is lost once what it sent before is handled (`closeAtInputEnd`).
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let proxied = event as? ProxiedAddressEvent { address = proxied.address.addressText }
        if let event = event as? ChannelEvent, event == .inputClosed { closeAtInputEnd() }
        context.fireUserInboundEventTriggered(event)
    }

    /// The client sent its EOF: the connection closes when the worker's tick has room for it
    /// (`ConnectPacing`, so that a thousand clients leaving at once do not hold up the others),
    /// but not before what the client sent ahead of it is handled. Packets a pause kept wait for
    /// its end (a hook answering, the session on its way, back-pressure: each comes to an end
    /// or closes the connection), and the close is asked for again there (`inputHandled`): a
    /// client that writes CONNECT, PUBLISH and DISCONNECT, then closes, loses nothing. What they
    /// were answered (CONNACK, PUBACKs, also those waiting for the store's commit) goes out before
    /// the close: a client that only shut its sending side still reads.
    private func closeAtInputEnd() {
        guard !machine.isClosed else { return }
        guard !inputWaits else { return updateRare { $0.inputEnded = true } }
        let this = NIOLoopBound(self, eventLoop: worker.loop)
        worker.pacing.run {
            let handler = this.value
            // (A hook or the session it asked for may have come to wait meanwhile.)
            guard !handler.inputWaits else { return handler.updateRare { $0.inputEnded = true } }
            handler.flushOutput()
            // Lost now (the will goes out, the hooks hear of it), not when the transport is done
            // closing: NIOSSL waits up to its shutdown timeout for a close_notify that a client
            // which sent a bare FIN will not send.
            handler.detach(publishWill: true, reason: "connection lost")
            handler.context?.close(promise: nil)
        }
    }

    /// Packets the client sent wait to be handled behind a pause (decoded ones with the state
    /// machine; the rest of a read, not only a packet's start, in `cumulation`), or answers to
    /// them wait for the store.
    private var inputWaits: Bool {
        machine.hookPending || machine.isOpening || (cumulation != nil && !flags.contains(.partial))
            || rare?.storeAcks?.isEmpty == false
    }

    /// A pause ended, and what it kept was handled: if the client's EOF came meanwhile, the
    /// connection closes now (unless another pause began).
    private func inputHandled() {
        guard rare?.inputEnded == true, !inputWaits else { return }
        updateRare { $0.inputEnded = false }
        closeAtInputEnd()
    }

    /// The worker's periodic check (no connection holds a timer of its own): connect_timeout and
    /// keep-alive. With `closing` false (a late sweep) it only tidies.
    func checkTimeouts(now: NIODeadline, closing: Bool) {
        let limit = broker.configuration.limits.connectTimeout
        switch machine.timeoutCheck(now: now, connectTimeout: limit, heldBack: flags.contains(.heldBack), closing: closing) {
        case .close(let reason, _) where machine.isAwaitingConnect && !machine.hookPending:
            // A socket that never sent CONNECT (a scanner; a client stuck in the TLS handshake or
            // the WebSocket upgrade): logged with the listener's rate limit, as a refused handshake
            // is, so that thousands of them cannot flood the log.
            origin.logRefusal("closing connection: \(reason)", logger: logger)
            closeWithWill(reason: reason, logged: true)
        case .close(let reason, let code):
            tellV5(code)
            closeWithWill(reason: reason)
        case .tidy:
            // Messages still unacknowledged a sweep after they went out stop pinning read buffers.
            session?.compactInflight()
        case .none:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        worker.connections.remove(Worker.Connection(handler: self))
        worker.freedMemory = true
        if flags.contains(.counted) {
            broker.connectionCount.add(-1, ordering: .relaxed)
            if origin.index >= 0 { worker.stats.connectionsOpen[origin.index] &-= 1 }
        }
        flags.remove(.counted)
        // After a DISCONNECT the session is already detached (will discarded), so this does nothing.
        detach(publishWill: true, reason: "connection lost")
        // A read that ended in an error gets no channelReadComplete: end its batch here.
        worker.flushDirty()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Closing (`closeSocket`): what the client still sends is dropped.
        if machine.isClosed { return }
        var buffer = unwrapInboundIn(data)
        worker.beginBatch()  // ended by channelReadComplete (or errorCaught / channelInactive)
        machine.bytesRead()
        if cumulation == nil, let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self), let refused = machine.packetStarts(with: first) {
            return handle(refused)
        }
        while var pending = cumulation {
            cumulation = nil
            guard flags.contains(.partial), !decodingPaused else {
                // Paused, or what a pause kept: this read waits behind it, in order.
                flags.remove(.partial)
                pending.writeBuffer(&buffer)
                return process(&pending)
            }
            // The packet begun in an earlier read: completed from this one, and decoded alone;
            // the rest of this read is decoded where it is, not copied behind it.
            flags.remove(.partial)
            guard worker.decoder.complete(&pending, from: &buffer, version: version) else {
                cumulation = pending
                flags.insert(.partial)
                return
            }
            process(&pending, ownBuffer: true)  // (a pause keeps it: the loop appends this read)
            if machine.isClosed { return }
        }
        process(&buffer)
    }

    /// Whether what is read waits undecoded: while back-pressure holds the client, a hook answers
    /// for it, or its session is on its way (reading pauses then too, so what waits is at most
    /// what one read brought: a CONNECT's read that brought a thousand more packets is handled
    /// as it is when the session is at hand).
    private var decodingPaused: Bool {
        flags.contains(.heldBack) || machine.hookPending || machine.isOpening
    }

    /// Goes on with what was read while reading was paused (nothing while it is the start of a
    /// packet: that waits for the next read).
    private func processKept() {
        guard !flags.contains(.partial), var pending = cumulation else { return }
        cumulation = nil
        process(&pending)
    }

    /// Decodes and handles the packets in `buffer`, keeping what is left (an incomplete packet,
    /// or everything after the point where back-pressure paused this client) for later.
    /// `ownBuffer`: `buffer` holds one packet and nothing else, so a message made of it is kept
    /// without a copy.
    private func process(_ buffer: inout ByteBuffer, ownBuffer: Bool = false) {
        let decoder = worker.decoder  // stateless: the limits only
        flags.set(.readAlone, ownBuffer)
        defer { flags.remove(.readAlone) }
        let start = buffer.readerIndex
        do {
            while !decodingPaused, let packet = try decoder.decode(buffer: &buffer, version: version) {
                handle(machine.packetReceived(consume packet))
                if machine.isClosed { return }
            }
            if buffer.readerIndex != start { machine.packetsRead(now: .now()) }
            if buffer.readableBytes > 0 { keep(&buffer) }
        } catch {
            var level: UInt8?
            if machine.isAwaitingConnect {  // (the decoder may have read past the CONNECT's start)
                buffer.moveReaderIndex(to: start)
                level = MQTTDecoder.connectProtocolLevel(in: buffer)
            }
            let (connack, reason) = machine.decodeFailed(error, connectLevel: level)
            if let connack {
                guard level == ProtocolVersion.v5.rawValue, connack.returnCode != .unacceptableProtocolVersion else { return refuse(connack, reason, unread: true) }
                version = .v5
                return refuse(connack, reason, counted: false, unread: true)  // (a malformed CONNECT, not a refusal by a rule)
            }
            tellV5(error.reasonCode)  // MQTT 5 says why before closing (§4.13.1)
            closeWithWill(reason: reason)
        }
    }

    /// Keeps what `process` left. While paused, as it is (moved to the front so that the buffer
    /// does not grow). Else it is the start of one packet: in a buffer of its own, which later
    /// reads fill to the packet's end (`MQTTDecoder.keepPartial`).
    private func keep(_ rest: inout ByteBuffer) {
        if decodingPaused {
            rest.discardReadBytes()
            cumulation = rest
            return
        }
        cumulation = worker.decoder.keepPartial(&rest, version: version)
        flags.insert(.partial)
    }

    /// One read batch is done: flush what it produced, for every connection it wrote to.
    func channelReadComplete(context: ChannelHandlerContext) {
        worker.flushDirty()
        if flags.contains(.unwritable) { checkAnswerBacklog() }
    }

    /// Pumps the session again once the loop has served its other sockets.
    func pumpSoon() {
        let this = NIOLoopBound(self, eventLoop: worker.loop)
        worker.pacing.later { this.value.pump() }
    }

    /// Sends what the session has queued, if connected.
    private func pump() {
        if let session, machine.isConnected { session.pump() }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        flags.set(.unwritable, !context.channel.isWritable)
        guard !flags.contains(.unwritable) else { return }
        if flags.contains(.answersHeld) {
            flags.remove(.answersHeld)
            updateReading()
        }
        pump()
    }

    /// After a read while the channel is not writable: if what waits to be written has grown past
    /// `maxAnswerBacklog`, the client sends packets that are answered (QoS 1 and 2 PUBLISHes,
    /// PUBRELs, PINGREQs) without reading the answers, and is not read until it does (a flood of
    /// PUBRELs grew the broker ~12 MB a second). A slow reader's own messages wait in its session's
    /// queue instead (`canWrite`), so its PINGREQ or DISCONNECT is still read.
    private func checkAnswerBacklog() {
        guard let channel = context?.channel, let options = channel.syncOptions,
              let buffered = try? options.getOption(.bufferedWritableBytes), buffered > Self.maxAnswerBacklog
        else { return }
        flags.insert(.answersHeld)
        updateReading()
    }

    /// What may wait to be written to a client that does not read before it is not read either:
    /// NIO's high-water mark plus a full batch (what a session sends up to, `maxBatchedBytes`), and
    /// as much again.
    static let maxAnswerBacklog = 2 * (256 * 1024 + maxBatchedBytes)

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if origin.tls != nil, !(error is WebSocketTransportError) {
            // Before CONNECT, on a TLS listener: the handshake failed (or the client went away
            // during it). Logged with a rate limit, so that a scanner cannot flood the log. (A
            // CONNECT read and waiting for its hooks or a tick with room: see below.)
            if case .awaitingConnect = machine.state, !machine.hookPending {
                // (or early data past the WebSocket handshake's limit; the client gone)
                origin.logConnectionLost(error, closing: "TLS connection before CONNECT", logger: logger)
                machine.closed()
                context.close(promise: nil)
                worker.flushDirty()
                return
            }
            // A TCP close without TLS close_notify: the connection is lost, as a plain one would
            // be, once what the client sent before it is handled (the EOF follows as inputClosed).
            if let tlsError = error as? NIOSSLError, case .uncleanShutdown = tlsError { return }
        }
        closeWithWill(reason: errorText(error))
        worker.flushDirty()
    }

    // MARK: - Packets

    /// An acknowledgement that does not fit the flow of the message in flight under its id.
    private func outOfFlow(_ kind: String, _ id: UInt16) {
        tellV5(.protocolError)
        closeWithWill(reason: "\(kind) for packet id \(id) does not fit the QoS of the message in flight under it, or its step")
    }

    /// Carries out what the state machine made of a packet.
    private func handle(_ action: ConnectionStateMachine.PacketAction) {
        switch action {
        case .none:
            break
        case .connect(let connect):
            handleConnect(connect)
        case .publish(let publish):
            guard let session else { return }
            handlePublish(publish, session: session)
        case .puback(let id):
            if session?.puback(id) == true { outOfFlow("PUBACK", id) }
        case .pubrec(let id):
            if session?.pubrec(id) == true { return outOfFlow("PUBREC", id) }
            // (With the store: once it has the message as released, or a restart would send the
            // whole PUBLISH again, and the client deliver it twice.)
            acknowledge(.pubrel(packetID: id), waiting: session?.isStored == true)
        case .pubrecRefused(let id):
            if session?.pubrecRefused(id) == true { outOfFlow("PUBREC", id) }
        case .pubcomp(let id):
            if session?.pubcomp(id) == true { outOfFlow("PUBCOMP", id) }
        case .pubrel(let id):
            session?.released(inbound: id)
            // (With the store: once the id no longer awaits PUBREL there, or after a restart the
            // client's next message with that id would pass for this one sent again, and be lost.)
            acknowledge(.pubcomp(packetID: id), waiting: session?.isStored == true)
        case .subscribe(let subscribe):
            guard let session else { return }
            handleSubscribe(subscribe, session: session)
        case .unsubscribe(let unsubscribe):
            guard let session else { return }
            // (`unsubscribed` is a notification: nothing waits for a hook that waits.)
            var codes: [ReasonCode] = []
            for filter in unsubscribe.filters {
                let named = TopicFilter(alreadyValidated: filter)
                if version == .v5 { codes.append(session.isSubscribed(named: named) ? .success : .noSubscriptionExisted) }
                let subscribed = broker.unsubscribe(session, named: named)
                broker.hooks.unsubscribed(
                    UnsubscribeRequest(clientID: clientID, username: username, filter: filter, subscribed: subscribed.string),
                    worker: worker.index)
            }
            // (After the store has the change, as SUBACK.)
            acknowledge(version == .v5
                ? .unsubackV5(UnsubackPacket(packetID: unsubscribe.packetID, reasonCodes: codes)) : .unsuback(packetID: unsubscribe.packetID),
                waiting: session.isStored)
        case .ping:
            writePacket(.pingresp)
        case .disconnect:
            detach(publishWill: false, reason: "disconnected")
            flushOutput()
            context?.close(promise: nil)
        case .disconnectV5(let disconnect):
            if let interval = disconnect.properties.sessionExpiryInterval, let session {
                // A session that was to end with the connection cannot be kept now (§3.14.2.2.2).
                guard session.persistent || interval == 0 else {
                    tellV5(.protocolError)
                    return closeWithWill(reason: "DISCONNECT sets a session expiry after CONNECT set none")
                }
                session.setExpiry(broker.configuration.limits.sessionExpiry(for: interval))
            }
            // Any code but 0 keeps the will (0x04 asks for it; the others report an error).
            let code = disconnect.reasonCode
            detach(publishWill: code != .normalDisconnection, reason: "disconnected (reason code 0x\(String(code.rawValue, radix: 16)))")
            flushOutput()
            context?.close(promise: nil)
        case .auth(let auth):
            handleAuth(auth)
        case .close(let reason, let code):
            tellV5(code)
            closeWithWill(reason: reason)
        }
    }

    /// An MQTT 5 client, once connected, hears why the server closes (DISCONNECT with `code`,
    /// flushed with what was before it: the close follows).
    private func tellV5(_ code: ReasonCode, properties: MQTTProperties = MQTTProperties()) {
        guard version == .v5, machine.isConnected else { return }
        writePacket(.disconnectV5(DisconnectPacket(reasonCode: code, properties: properties)))
        machine.saidGoodbye = true
        flushOutput()
    }

    /// MQTT 5: a packet for the client is never larger than its Maximum Packet Size
    /// (MQTT-3.1.2-24): its reason string and user properties are left out first (MQTT-3.1.2-25).
    /// False if it is too large even without them.
    private func fit(_ properties: inout MQTTProperties, limit: UInt32?, _ packet: (MQTTProperties) -> MQTTPacket) -> Bool {
        guard let limit else { return true }
        func size() -> Int {
            var buffer = ByteBuffer()
            buffer.writeMQTTPacket(packet(properties), version: .v5)
            return buffer.readableBytes
        }
        if size() <= limit { return true }
        properties.reasonString = nil
        properties.userProperties = []
        return size() <= limit
    }

    private func handleConnect(_ connect: ConnectPacket) {
        if connect.protocolVersion == .v5 { version = .v5 }
        if connect.isBridge { updateRare { $0.peerIsBridge = true } }
        var clientID = connect.clientID
        if clientID.isEmpty {
            // MQTT 5 lets a client with an empty id keep a session (Clean Start 0): it is new anyway.
            guard connect.cleanSession || version == .v5 else { return refuse(.identifierRejected, "empty client id with clean session 0") }
            // MQTT 3.1 has no assigned ids: its client id is 1 to 23 characters (Mosquitto refuses too).
            guard connect.protocolLevel != 3 else { return refuse(.identifierRejected, "empty client id (MQTT 3.1)") }
            clientID = "mqlite-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        }
        // The ids of bridges' local sessions: no client may take one.
        if clientID.hasPrefix("$bridge/") { return refuse(.identifierRejected, "client id in $bridge/ (bridges' own)") }
        // MQTT 5 has the server's keep-alive take its place instead (Server Keep Alive in CONNACK).
        if Int(connect.keepAlive) > broker.configuration.limits.maxKeepAlive, version != .v5 {
            return refuse(.identifierRejected, "keep-alive \(connect.keepAlive) over max_keep_alive")
        }
        // MQTT 5 enhanced authentication: a method a hook takes care of (`on_auth`), or 0x8C.
        if version == .v5, let method = connect.properties.authenticationMethod {
            guard broker.hooks.handlesAuthentication(method: method, worker: worker.index) else {
                return refuse(reason: .badAuthenticationMethod, "authentication method \"\(LogText(method, limit: 64))\" (no hook takes care of it)")
            }
            rare(authentication: Authentication(method: method, connect: connect))
            machine.authenticationStarted()
        }
        var username = connect.username
        var password = connect.password
        var tlsInfo: TLSClientInfo?
        if let tls = origin.tls {
            // Once per connection: the handshake is done (CONNECT came through it).
            let info = clientTLSInfo(tls)
            tlsInfo = info
            updateRare { $0.tls = info }
            if tls.useIdentityAsUsername {
                // As Mosquitto: the certificate's CN replaces whatever user name and password the
                // client sent (require_certificate guarantees a verified certificate).
                guard let cn = info.certificate?.username else {
                    return refuse(.notAuthorized, "client certificate has no CN that can be a user name (use_identity_as_username)")
                }
                username = cn
                password = nil
            }
        }
        updateRare { $0.clientID = clientID }
        self.username = username

        var request = ConnectRequest(
            clientID: clientID, username: username, password: password, address: address,
            cleanSession: connect.cleanSession, keepAlive: connect.keepAlive, listener: origin.bind, tls: tlsInfo)
        request.connection = ObjectIdentifier(self)
        request.protocolVersion = connect.protocolLevel
        protocolLevel = connect.protocolLevel
        if version == .v5 { request.userProperties = connect.properties.userProperties }
        // In a storm of CONNECTs, this one may wait for a later tick of the loop (`ConnectPacing`).
        whenAnswered(worker.pacing.admit(), failed: ()) { handler, _ in
            guard !handler.machine.isClosed else { return }
            // Enhanced authentication stands for the authentication hooks.
            if handler.rare?.authentication != nil { return handler.askAuthentication(data: connect.properties.authenticationData) }
            // A hook that never answers (its future failed) refuses as a failing hook would.
            handler.whenAnswered(handler.broker.hooks.authenticate(request, worker: handler.worker.index), failed: .refuse(.notAuthorized)) {
                handler, decision in
                handler.authenticated(connect, decision)
            }
        }
    }

    private func authenticated(_ connect: ConnectPacket, _ decision: ConnectDecision) {
        guard !machine.isClosed else { return }  // the client went away while the hook answered
        switch decision {
        case .refuse(let code):
            return refuse(code, "refused by authentication hook")
        case .refuseWithReason(let code, let reason):
            var properties = MQTTProperties()
            if version == .v5, let reason { properties.reasonString = reason }
            _ = fit(&properties, limit: connect.properties.maximumPacketSize) { .connack(ConnackPacket(sessionPresent: false, reasonCode: code, properties: $0)) }
            return refuse(ConnackPacket(sessionPresent: false, reasonCode: code, properties: properties),
                          "refused by authentication hook" + (reason.map { ": \($0)" } ?? ""))
        case .accept:
            break
        case .pass:
            if !broker.configuration.allowAnonymous {
                if username == nil { return refuse(.notAuthorized, "anonymous clients are not allowed") }
                // A user name is only as good as what checks it: a hook (which had no opinion on
                // this one), or the client certificate it came from.
                if origin.tls?.useIdentityAsUsername != true && !broker.hooks.authenticatesClients(worker: worker.index) {
                    return refuse(.notAuthorized, "allow_anonymous = false and nothing checks user names (no on_connect hook, no use_identity_as_username)")
                }
            }
        }
        whenAnswered(broker.hooks.authorize(clientInfo, worker: worker.index), failed: [.denyAll]) { handler, tables in
            handler.authorized(connect, tables)
        }
    }

    private func authorized(_ connect: ConnectPacket, _ tables: [ACLTable]) {
        guard !machine.isClosed else { return }
        let clientID = self.clientID
        grant(tables)
        // A will is a message this client publishes later: its topic must be one the client may
        // publish to (CONNACK 5, as Mosquitto answers).
        if let will = connect.will, let acl = access?.acl, !acl.allowsPublish(topic: will.topic) {
            return refuse(.notAuthorized, "will topic denied by ACL")
        }
        if let will = connect.will, Self.isBrokerOnly(will.topic) {
            return refuse(.notAuthorized, "will topic is the broker's own ($SYS or $share)")
        }
        will = connect.will.map { will in
            var will = will
            will.properties = connect.willProperties
            return will
        }
        let maxKeepAlive = UInt16(clamping: broker.configuration.limits.maxKeepAlive)
        var keepAlive = min(connect.keepAlive, maxKeepAlive)
        // MQTT 5 lets the server ask for a keep-alive from a client that asked for none (Mosquitto too).
        if version == .v5, keepAlive == 0, maxKeepAlive < UInt16.max { keepAlive = maxKeepAlive }
        // MQTT 5: the session lasts as long as the client asks (capped by session_expiry).
        let expiry = version == .v5 ? broker.configuration.limits.sessionExpiry(for: connect.properties.sessionExpiryInterval ?? 0) : nil
        let connack = version == .v5 ? connackProperties(connect, keepAlive: keepAlive, expiry: expiry!) : MQTTProperties()
        // (What can make it large is the authentication hook's data.)
        var fitted = connack
        guard fit(&fitted, limit: connect.properties.maximumPacketSize, { .connack(ConnackPacket(sessionPresent: true, reasonCode: .success, properties: $0)) }) else {
            return refuse(reason: .packetTooLarge, "CONNACK would be larger than the client's Maximum Packet Size")
        }
        machine.connectAccepted(keepAlive: keepAlive, now: .now())
        // The completion runs on this worker's loop, so the handler may be used there.
        let this = NIOLoopBound(self, eventLoop: worker.loop)
        // Hooks reloaded before the session arrives: the ACL is asked for again at attach.
        let hooksGeneration = broker.hooks.publishHookGeneration
        let persistent = expiry.map { $0 != .zero } ?? !connect.cleanSession
        let limits = ClientLimits(
            receiveMaximum: connect.properties.receiveMaximum.map(Int.init), maximumPacketSize: connect.properties.maximumPacketSize.map(Int.init),
            topicAliasMaximum: Int(connect.properties.topicAliasMaximum ?? 0))
        broker.openSession(clientID: clientID, cleanStart: connect.cleanSession, persistent: persistent, on: worker) { session, present in
            guard let session else {
                // A newer CONNECT with this client id won the session before this one attached.
                return this.value.closeWithoutWill(reason: "taken over by a newer connection with the same client id")
            }
            this.value.attach(session, sessionPresent: present, hooksGeneration: hooksGeneration, expiry: expiry, limits: limits, connack: connack)
        }
        // Reading pauses only if the session is still on its way (from another worker, or behind
        // a takeover): most often it is attached by now, and pausing and resuming would be two
        // epoll_ctl calls per CONNECT for nothing (~3% of a reconnect storm).
        if machine.isOpening { updateReading() }
    }

    /// What an MQTT 5 CONNACK tells the client: what this broker supports, and what it decided
    /// for the client (an assigned client id, a keep-alive of its own).
    private func connackProperties(_ connect: ConnectPacket, keepAlive: UInt16, expiry: TimeAmount) -> MQTTProperties {
        var properties = MQTTProperties()
        let asked = connect.properties.sessionExpiryInterval ?? 0
        let granted = expiry == Session.neverExpires ? UInt32.max : UInt32(expiry.nanoseconds / 1_000_000_000)
        if granted != asked { properties.sessionExpiryInterval = granted }
        if connect.clientID.isEmpty { properties.assignedClientIdentifier = clientID }
        if keepAlive != connect.keepAlive { properties.serverKeepAlive = keepAlive }
        properties.maximumPacketSize = broker.configuration.limits.maximumPacketSizeProperty
        let inflight = broker.configuration.limits.maxInflight
        if inflight < Int(UInt16.max) { properties.receiveMaximum = UInt16(inflight) }
        let aliases = broker.configuration.limits.maxTopicAlias
        if aliases > 0 { properties.topicAliasMaximum = UInt16(aliases) }
        // Enhanced authentication: its method, and the hook's last data (§3.2.2.3.17).
        if let authentication = rare?.authentication {
            properties.authenticationMethod = authentication.method
            properties.authenticationData = authentication.serverData
            authentication.serverData = nil
        }
        // Retain, wildcard and shared subscriptions and subscription identifiers are available:
        // their absence says so.
        return properties
    }

    /// What the TLS handshake told of the client: its certificate, which was verified against
    /// `cafile` if the listener has one (a certificate that failed would have failed the handshake;
    /// without `cafile` none is asked for).
    private func clientTLSInfo(_ tls: TLSSettings) -> TLSClientInfo {
        let usernameFromCertificate = tls.useIdentityAsUsername
        guard let handler = try? context?.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self),
            let peer = handler.peerCertificate, tls.cafile != nil
        else { return TLSClientInfo(verified: false, certificate: nil, usernameFromCertificate: usernameFromCertificate) }
        let certificate = ClientCertificate(peer)
        return TLSClientInfo(verified: certificate != nil, certificate: certificate, usernameFromCertificate: usernameFromCertificate)
    }

    private func attach(
        _ session: Session, sessionPresent: Bool, hooksGeneration: Int, expiry: TimeAmount?,
        limits: ClientLimits, connack: MQTTProperties
    ) {
        guard machine.sessionArrived() == .attach else {
            // The connection went away while the session was being handed over.
            if session.persistent { worker.sessionWentOffline(session) } else { broker.endSession(session, worker: worker) }
            return
        }
        // A session resumed by another version of the protocol, or with another expiry.
        if expiry != nil || session.expiry != nil { session.setExpiry(expiry) }
        session.setClientLimits(limits)
        session.outbound = self
        session.report(.attached)
        session.receiveACL = (access?.acl.restrictsReceiving ?? false) ? access?.acl : nil
        self.session = session
        if rare?.clientID != nil { updateRare { $0.clientID = nil } }
        updateReading()
        writePacket(.connack(version == .v5
            ? ConnackPacket(sessionPresent: sessionPresent, reasonCode: .success, properties: connack)
            : ConnackPacket(sessionPresent: sessionPresent, returnCode: .accepted)))
        log(.debug, "connected", metadata: ["session_present": "\(sessionPresent)"])
        broker.hooks.connected(clientInfo, worker: worker.index)
        // (A session kept from before keeps its filters: what the client's ACL does not allow is
        // held back on delivery, and its owner, back on it, gets them again.)
        if broker.hooks.publishHookGeneration != hooksGeneration { reauthorize() }
        session.resume()
        // What the client sent after its CONNECT, kept undecoded meanwhile.
        if !decodingPaused { processKept() }
        inputHandled()
    }

    /// Handles decoded packets in order, stopping where a hook starts to wait: the rest wait with
    /// the state machine until it answers.
    private func handle(packets: [MQTTPacket]) {
        flags.remove(.readAlone)  // (held packets were not read alone)
        var rest = packets[...]
        while let packet = rest.first, machine.isConnected {
            if machine.hookPending { return machine.hold(rest) }
            rest.removeFirst()
            handle(machine.packetReceived(packet))
        }
    }

    // MARK: - Hooks that answer later

    /// Goes on with a hook's answer: at once, or, when the hook waits (a script's HTTP call), once
    /// it answers, on this loop. Meanwhile (`pausing`, the default) this client's packets wait, in
    /// order: reading pauses, what was read stays undecoded, and what the state machine had
    /// decoded it holds. `failed` stands for an answer whose future failed (the hook layer does
    /// not fail them).
    private func whenAnswered<Value>(
        _ answer: HookAnswer<Value>, failed: Value, pausing: Bool = true, _ body: @escaping (ConnectionHandler, Value) -> Void
    ) {
        switch answer {
        case .now(let value):
            body(self, value)
        case .later(let future):
            if pausing {
                machine.hookStarted()
                updateReading()
            }
            let this = NIOLoopBound(self, eventLoop: worker.loop)
            future.hop(to: worker.loop).whenComplete { result in
                let handler = this.value
                handler.worker.beginBatch()
                guard pausing else {
                    body(handler, (try? result.get()) ?? failed)
                    return handler.worker.flushDirty()
                }
                let held = handler.machine.hookFinished()
                // (Acting on the answer may start the next hook that waits: CONNECT asks two.)
                body(handler, (try? result.get()) ?? failed)
                handler.hookAnswered(held: held)
            }
        }
    }

    /// A hook that waited has answered, and its answer was acted on: the packets that waited go
    /// on (held again if another hook waits by then), then what was read, then reading.
    private func hookAnswered(held: [MQTTPacket]) {
        if !machine.isClosed {
            handle(packets: held)
            if !flags.contains(.heldBack), !machine.hookPending { processKept() }
            updateReading()
            inputHandled()
        }
        worker.flushDirty()
    }

    private func refuse(_ code: ConnectReturnCode, _ reason: String) {
        refuse(ConnackPacket(sessionPresent: false, returnCode: code), reason)
    }

    /// Refuses with an MQTT 5 reason code (a 3.1.1 client gets the nearest return code).
    private func refuse(reason code: ReasonCode, _ reason: String) {
        refuse(ConnackPacket(sessionPresent: false, reasonCode: code), reason)
    }

    /// `unread`: the CONNECT could not be read (malformed, or another protocol version), so
    /// anyone may be the cause: logged with the listener's rate limit, as other closes before
    /// CONNECT are (`logClose`). Refusals by a rule (a password, an ACL) are each logged.
    private func refuse(_ connack: ConnackPacket, _ reason: String, counted: Bool = true, unread: Bool = false) {
        let code = connack.returnCode
        if counted, Int(code.rawValue) < worker.stats.refusedByCode.count { worker.stats.refusedByCode[Int(code.rawValue)] &+= 1 }
        let shown = version == .v5 ? connack.reasonCode.rawValue : code.rawValue
        if unread {
            origin.logRefusal("refusing CONNECT (return code \(shown)): \(reason)", logger: logger)
        } else {
            log(.info, "refusing CONNECT: \(LogText(reason, limit: 512))", metadata: ["return_code": "\(shown)"])
        }
        writePacket(.connack(connack))
        machine.connectRefused()
        flushOutput()
        closeSocket()
    }

    /// The acknowledgement goes out before the message is forwarded (as Mosquitto): a client
    /// subscribed to its own topic reads PUBACK/PUBREC first. (Not for a retained message with
    /// `[persistence] sync = "full"`: its acknowledgement waits for the disk, `acknowledge`.)
    private func handlePublish(_ publish: PublishPacket, session: Session) {
        // MQTT 5: a topic alias, or properties to check.
        if version == .v5 { return handlePublishV5(publish, session: session) }
        // Validated by the decoder, which counted its levels: only its hash is computed here.
        let topic = publish.topicLevels != 0
            ? TopicName(alreadyValidated: publish.topic, levels: Int(publish.topicLevels)) : TopicName(alreadyValidated: publish.topic)
        accept(publish, topic: topic, properties: publish.properties, session: session)
    }

    private func handlePublishV5(_ publish: PublishPacket, session: Session) {
        // The client was told `max_inflight` as its Receive Maximum (CONNACK): more QoS 2
        // messages than that on this connection without PUBCOMP is an error (§3.3.4, §4.9).
        let receiveMaximum = broker.configuration.limits.maxInflight
        if publish.qos == .exactlyOnce, session.exceedsInboundQoS2(publish.packetID!, limit: receiveMaximum) {
            tellV5(.receiveMaximumExceeded)
            return closeWithWill(reason: "more than \(receiveMaximum) QoS 2 messages awaiting PUBREL (its Receive Maximum)")
        }
        var topic: TopicName
        var properties = publish.properties
        if let alias = publish.bareAlias {
            // A PUBLISH with only a topic alias (the decoder read it without properties).
            guard let known = resolve(alias: alias, topic: .aliased, session: session) else { return }
            topic = known
        } else {
            topic = publish.topic.readableBytes == 0 ? TopicName.aliased
                : publish.topicLevels != 0
                ? TopicName(alreadyValidated: publish.topic, levels: Int(publish.topicLevels)) : TopicName(alreadyValidated: publish.topic)
        }
        if !properties.isUnset {
            if !properties.subscriptionIdentifiers.isEmpty {
                tellV5(.protocolError)
                return closeWithWill(reason: "subscription identifier in a client's PUBLISH")
            }
            if let alias = properties.topicAlias {
                guard let known = resolve(alias: alias, topic: topic, session: session) else { return }
                topic = known
                // The alias is this connection's: it is not forwarded.
                properties.topicAlias = nil
                if properties.isEmpty { properties = MQTTProperties() }
            }
        }
        accept(publish, topic: topic, properties: properties, session: session)
    }

    /// A PUBLISH whose topic is known: acknowledged, then routed.
    private func accept(_ publish: PublishPacket, topic: TopicName, properties: MQTTProperties, session: Session) {
        // Read alone into a buffer of its own, it is kept as it is. (The mark is for this packet
        // only: a held one, handled while this one's hook answers, is not.)
        let message = Message(
            topic: topic, payload: publish.payload, qos: publish.qos, retain: publish.retain, isCompact: flags.contains(.readAlone),
            properties: properties)
        flags.remove(.readAlone)
        worker.stats.messagesReceived.add(publish.qos)
        worker.stats.bytesReceived.add(publish.qos, publish.payload.readableBytes)
        switch publish.qos {
        case .atMostOnce:
            route(message)
        case .atLeastOnce:
            let id = publish.packetID!
            let ack = version == .v5 ? ack(.puback, id, for: topic) : .puback(packetID: id)
            var known: Worker.Route?
            let waits = waitsForStore(publish, topic: topic, session: session, route: &known)
            if !waits { sendAck(ack) }
            route(message, known: known)
            if waits { acknowledge(ack, waiting: true) }
        case .exactlyOnce:
            let id = publish.packetID!
            let ack = version == .v5 ? ack(.pubrec, id, for: topic) : .pubrec(packetID: id)
            // A refused QoS 2 message (MQTT 5 PUBREC with a failure code) ends its flow there.
            if case .ackV5(let refused) = ack, refused.reasonCode.isFailure { return sendAck(ack) }
            var known: Worker.Route?
            let waits = waitsForStore(publish, topic: topic, session: session, route: &known)
            if !waits { sendAck(ack) }
            // Exactly once: a re-sent PUBLISH whose id still awaits PUBREL is not delivered again.
            // (With the store, the id and the deliveries other workers make are held to one
            // commit where possible: the id alone on disk would swallow the message after a crash.)
            let held = waits && session.isStored && broker.workers.count > 1
            if held { broker.store?.hold(broker.workers.count - 1) }
            if session.receivedQoS2(id) {
                route(message, known: known)
            }
            if waits { acknowledge(ack, waiting: true, held: held) }
        }
    }

    /// Whether this QoS 1/2 message's acknowledgement waits for the store (`[persistence] sync =
    /// "full"`): it is retained, a session the store keeps may get it, or (QoS 2) this client's
    /// session is kept, and with it the id awaiting PUBREL that makes a re-sent PUBLISH a
    /// duplicate after a restart.
    /// (`route`: the topic's route when this looked it up, for routing to use rather than look
    /// it up again.)
    private func waitsForStore(_ publish: PublishPacket, topic: TopicName, session: Session, route: inout Worker.Route?) -> Bool {
        guard broker.waitingStore != nil else { return false }
        if publish.retain || (publish.qos == .exactlyOnce && session.isStored) { return true }
        let found = worker.route(for: topic)
        route = found
        return found.persists
    }

    /// A PUBACK, PUBREC, PUBREL or PUBCOMP (or SUBACK, UNSUBACK), in order with the others.
    /// `waiting`, with `[persistence] sync = "full"`: it goes once the store has committed what the
    /// packet it answers changed, here and on the other workers a message went to
    /// (`Broker.committed(after:)`), and after the acknowledgements before it (`StoreAcks`). (A
    /// publish hook that waits, an HTTP call, routes the message later: its acknowledgement does
    /// not wait for the disk.)
    private func acknowledge(_ ack: MQTTPacket, waiting: Bool, held: Bool = false) {
        guard waiting, broker.waitingStore != nil, !machine.hookPending, !machine.isClosed else {
            if held { for _ in 1..<broker.workers.count { broker.store?.release() } }
            return sendAck(ack)
        }
        let acks = rare?.storeAcks ?? StoreAcks()
        if rare?.storeAcks == nil { updateRare { $0.storeAcks = acks } }
        let ticket = acks.wait(ack)
        whenAnswered(.later(broker.committed(after: worker, held: held)), failed: (), pausing: acks.waiting >= StoreAcks.maxWaiting) { handler, _ in
            let ready = acks.committed(ticket)
            guard !handler.machine.isClosed else { return }
            for entry in ready { handler.writePacket(entry.ack) }
            handler.inputHandled()
        }
    }

    /// A PUBACK/PUBREC that waits for nothing: now, or after those waiting for the store.
    private func sendAck(_ ack: MQTTPacket) {
        if let acks = rare?.storeAcks, acks.queueBehind(ack) { return }
        writePacket(ack)
    }

    /// An MQTT 5 PUBACK or PUBREC: it says when the ACL refuses the message (0x87) or when nobody
    /// subscribes to it (0x10; not known when a publish hook may change the topic).
    private func ack(_ kind: AckPacket.Kind, _ id: UInt16, for topic: TopicName) -> MQTTPacket {
        var code = ReasonCode.success
        if !mayPublish(topic) {
            code = .notAuthorized
        } else {
            let route = worker.route(for: topic)
            if !route.hooked, route.targets.isEmpty, route.groups.isEmpty { code = .noMatchingSubscribers }
        }
        if code == .success { return kind == .puback ? .puback(packetID: id) : .pubrec(packetID: id) }
        return .ackV5(AckPacket(kind, packetID: id, reasonCode: code))
    }

    /// MQTT 5: the topic a PUBLISH with a topic alias is for (§3.3.2.3.4): with a topic, the alias
    /// stands for it from now on; without, for the one it was last given. Nil when the alias is
    /// out of range (0x94) or was never given a topic (0x82): the client was told, and goes.
    private func resolve(alias: UInt16, topic: TopicName, session: Session) -> TopicName? {
        let maximum = broker.configuration.limits.maxTopicAlias
        guard alias != 0, alias <= maximum else {
            tellV5(.topicAliasInvalid)
            closeWithWill(reason: "topic alias \(alias) out of range (Topic Alias Maximum is \(maximum))")
            return nil
        }
        guard topic.count == 0 else {
            session.set(alias: alias, to: topic)
            return topic
        }
        guard let known = session.topic(forAlias: alias) else {
            tellV5(.protocolError)
            closeWithWill(reason: "topic alias \(alias) used before it was given a topic")
            return nil
        }
        return known
    }

    /// Whether the ACL lets this client publish to `topic` (always, without an ACL), which must
    /// not be one of the broker's own.
    private func mayPublish(_ topic: TopicName) -> Bool {
        if Self.isBrokerOnly(topic) {
            log(.debug, "publish to \"\(LogText(topic.string))\" refused: the broker's own topic")
            return false
        }
        guard let access else { return true }
        if let verdict = access.verdicts[topic] { return verdict }
        let verdict = access.acl.allowsPublish(topic: topic)
        if access.verdicts.count >= 1000 { access.verdicts.removeAll(keepingCapacity: true) }
        access.verdicts[topic.copied()] = verdict
        if !verdict { log(.debug, "publish to \"\(LogText(topic.string))\" denied by ACL") }
        return verdict
    }

    /// Topics no client publishes to, whatever its ACL, as in Mosquitto: `$SYS...` (the broker's
    /// statistics: a client could forge them, retained), except a bridge's connection state
    /// (`$SYS/broker/connection/NAME/state`, which Mosquitto bridges publish to their remote), and
    /// `$share...` (a shared subscription's prefix, not a topic). MQTT §4.7.2: the server should
    /// keep clients from exchanging messages on `$` topics it uses.
    static func isBrokerOnly(_ topic: TopicName) -> Bool {
        // (The first byte alone on the publish path: no view of the bytes, which allocates in a
        // debug build.)
        guard topic.bytes.getInteger(at: topic.bytes.readerIndex, as: UInt8.self) == UInt8(ascii: "$") else { return false }
        let bytes = topic.bytes.readableBytesView
        if bytes.starts(with: "$share".utf8) { return true }
        guard bytes.starts(with: "$SYS".utf8) else { return false }
        return !Topic.matches(filter: "$SYS/broker/connection/+/state", topic: topic.string)
    }

    /// Publishes a message of this client (a PUBLISH, or its will): the ACL, then the publish
    /// hooks if the topic is hooked, then routing.
    private func route(_ message: consuming Message, known: Worker.Route? = nil) {
        guard mayPublish(message.topic) else {
            worker.stats.droppedACL &+= 1
            return
        }
        if !message.properties.isUnset, let interval = message.properties.messageExpiryInterval {
            // MQTT 5: the message expires this long after the broker got it (a will: published it).
            message.properties.messageExpiresAt = NIODeadline.now().uptimeNanoseconds + UInt64(interval) * 1_000_000_000
        }
        let message = message  // (a constant from here: the closure below captures no variable)
        let route = known ?? worker.route(for: message.topic)
        guard route.hooked else { return publish(message, along: route) }
        // The hooks see the same message (no String, no copy made for them).
        switch broker.hooks.interceptPublish(message, from: clientInfo, worker: worker.index) {
        case .now(let decision):
            apply(decision, to: message, route: route)
            yieldIfHooksTookTheTurn()
        case .later(let future):
            // Routed as the hook answers (subscriptions may have changed meanwhile); a failed
            // answer drops the message, as a failing hook does.
            whenAnswered(.later(future), failed: .drop) { handler, decision in
                handler.apply(decision, to: message, route: handler.worker.route(for: message.topic))
            }
        }
    }

    /// After a hook call that answered at once: once this turn's hook calls have taken
    /// `Worker.hookTurnBudget`, the rest of what the client sent waits for a later tick of the
    /// loop (after its poll of the sockets, so that the other clients go first), as behind a hook
    /// that waits: reading pauses, what was read stays undecoded. Only hooked messages pay the
    /// clock read.
    private func yieldIfHooksTookTheTurn() {
        guard machine.isConnected, !machine.hookPending else { return }  // (not a will at the close)
        let now = NIODeadline.now()
        guard let start = worker.hookTurnStart else { return worker.hookTurnStart = now }
        guard now - start >= Worker.hookTurnBudget else { return }
        worker.hookTurnStart = nil
        let turn = worker.loop.makePromise(of: Void.self)
        worker.pacing.later { turn.succeed() }
        whenAnswered(.later(turn.futureResult), failed: ()) { _, _ in }
    }

    /// Carries out a publish hook's answer for `message`.
    private func apply(_ decision: PublishDecision, to message: Message, route: Worker.Route) {
        switch decision {
        case .deliver:
            publish(message, along: route)
        case .drop:
            worker.stats.droppedHook &+= 1
        case .change(let changed):
            publishChanged(changed, original: message, route: route)
        case .replace(let messages):
            for changed in messages { publishChanged(changed, original: message, route: route) }
        }
    }

    /// Routes a message of this client, holding the client back if a subscriber it reaches is
    /// congested (the same for messages as sent and as hooks changed them).
    private func publish(_ message: Message, along route: Worker.Route) {
        if worker.publish(message, along: route, from: session) { holdBackIfCongested(route.targets) }
    }

    /// Routes a message a publish hook produced in place of the one on `topic`.
    private func publishChanged(_ m: HookedMessage, original: HookedMessage, route: Worker.Route) {
        // Same topic (a payload or QoS transform): the checked topic bytes and route serve.
        if m.topic == original.topic {
            publish(Message(topic: original.topic, payload: m.payload, qos: m.qos, retain: m.retain, properties: m.properties), along: route)
            return
        }
        // A hook's topic is a valid name (`TopicName`); the broker's level limit is checked here.
        let limit = broker.configuration.limits.maxTopicLevels
        guard m.topic.levelCount <= limit else { return worker.logHookTopicDrop(m.topic, hook: "publish", limit: limit, logger: logger) }
        // A rewritten topic is checked against the ACL again.
        guard mayPublish(m.topic) else { return }
        publish(Message(topic: m.topic, payload: m.payload, qos: m.qos, retain: m.retain, properties: m.properties), along: worker.route(for: m.topic))
    }

    private func handleSubscribe(_ subscribe: SubscribePacket, session: Session) {
        var decisions: [SubscribeDecision] = []
        decisions.reserveCapacity(subscribe.subscriptions.count)
        askSubscribe(subscribe, session: session, from: 0, decisions: decisions)
    }

    /// Asks the hooks about each filter of the packet in turn, then subscribes. A hook that answers
    /// later holds the filters after it, SUBACK and the client's later packets until it does: a
    /// client has at most one call waiting at a time (a SUBSCRIBE of 1,000 filters cannot take a
    /// worker's whole `max_pending_calls`).
    private func askSubscribe(_ packet: SubscribePacket, session: Session, from first: Int, decisions: [SubscribeDecision]) {
        var decisions = decisions
        for index in first..<packet.subscriptions.count {
            let subscription = packet.subscriptions[index]
            let request = SubscribeRequest(
                clientID: clientID, username: username, filter: subscription.filter, qos: subscription.qos)
            switch broker.hooks.authorizeSubscribe(request, worker: worker.index) {
            case .now(let decision):
                decisions.append(decision)
            case .later(let future):
                return whenAnswered(.later(future), failed: .deny) { [decisions] handler, decision in
                    // The client may have gone (or been taken over) meanwhile.
                    guard handler.machine.isConnected, handler.session === session else { return }
                    handler.askSubscribe(packet, session: session, from: index + 1, decisions: decisions + [decision])
                }
            }
        }
        subscribe(packet, session: session, answers: decisions)
    }

    private func subscribe(_ packet: SubscribePacket, session: Session, answers decisions: [SubscribeDecision]) {
        var codes: [SubackReturnCode] = []
        var granted: [(TopicFilter, QoS)] = []
        // 3.1.1 says 0x80 for every refusal; these are MQTT 5's more precise codes for it.
        let v5 = version == .v5
        var refusedForLimit = false  // logged once per packet
        // MQTT 5: at most one (the decoder checked), for every subscription of the packet.
        let identifier = packet.properties.isUnset ? nil : packet.properties.subscriptionIdentifiers.first
        for (subscription, decision) in zip(packet.subscriptions, decisions) {
            let named = TopicFilter(alreadyValidated: subscription.filter)
            var filter = named
            var qos = subscription.qos
            switch decision {
            case .allow:
                break
            case .deny:
                codes.append(v5 ? .refused(.notAuthorized) : .failure)
                continue
            case .rewrite(let newFilter, let maxQoS):
                do {
                    filter = try TopicFilter(newFilter, maxLevels: broker.configuration.limits.maxTopicLevels)
                } catch {
                    log(.info, "subscribe hook produced an invalid filter \"\(LogText(newFilter))\": \(LogText(error.description))")
                    codes.append(.failure)
                    continue
                }
                qos = min(qos, maxQoS)
            }
            // A shared subscription (`$share/GROUP/FILTER`) must be a valid one; the ACL and the
            // `$` rule apply to the filter in it.
            if SharedFilter.isShared(filter) {
                do {
                    _ = try SharedFilter.parse(filter, maxLevels: broker.configuration.limits.maxTopicLevels)
                } catch {
                    if case .invalidSharedSubscription = error {  // (it names the filter)
                        log(.info, "subscribe refused: \(LogText(error.description))")
                    } else {
                        log(.info, "subscribe to \"\(LogText(filter.string))\" refused: \(LogText(error.description))")
                    }
                    codes.append(v5 ? .refused(.topicFilterInvalid) : .failure)
                    continue
                }
            }
            if let access, !access.acl.allowsSubscribe(filter: filter) {
                log(.debug, "subscribe to \"\(LogText(filter.string))\" denied by ACL")
                codes.append(v5 ? .refused(.notAuthorized) : .failure)
                continue
            }
            let limit = broker.configuration.limits.maxSubscriptions
            // Names the client used for rewritten filters count too (many names may map to one filter).
            if limit > 0, (session.subscriptions.count >= limit && session.subscriptions[filter] == nil)
                || (named != filter && session.subscriptionNameCount >= limit) {
                if !refusedForLimit { log(.info, "subscribe refused: the client holds max_subscriptions (\(limit)) filters") }
                refusedForLimit = true
                codes.append(v5 ? .refused(.quotaExceeded) : .failure)
                continue
            }
            // MQTT 5 Retain Handling: 1 sends retained messages only for a new subscription, 2 never.
            let sendsRetained = switch subscription.retainHandling {
            case .sendOnSubscribe: true
            case .sendOnNewSubscription: session.subscriptions[filter] == nil
            case .doNotSend: false
            }
            // (A Mosquitto bridge does not want back what it published: No Local for all it subscribes to.)
            let noLocal = subscription.noLocal || (rare?.peerIsBridge ?? false)
            let grant = Grant(qos: qos, noLocal: noLocal, retainAsPublished: subscription.retainAsPublished)
            broker.subscribe(session, named: named, as: filter, grant: grant, identifier: identifier)
            codes.append(.granted(qos))
            if sendsRetained { granted.append((filter, qos)) }
        }
        // A session a store keeps hears of its subscriptions once the store has them (sync =
        // "full"): after a crash, a session reported present has what its SUBACK granted.
        acknowledge(.suback(SubackPacket(packetID: packet.packetID, returnCodes: codes)), waiting: session.isStored)
        // Every retained message that matches is sent (MQTT-3.3.1-6), fetched from the retained
        // tree as the socket drains; none for a shared subscription (MQTT 5.0 §4.8.2). A filter
        // granted twice in one packet is walked once. They start now, before messages published
        // after the SUBSCRIBE (which the subscription already gets), even when the SUBACK waits
        // for the store: PUBLISH may come before SUBACK (§3.8.4).
        var seen = Set<TopicFilter>()
        for (filter, qos) in granted.reversed() where !SharedFilter.isShared(filter) && seen.insert(filter).inserted {
            session.sendRetained(matching: filter, qos: qos)
        }
    }

    // MARK: - Back-pressure

    /// Reading is paused because a subscriber of what this client publishes, one that is still
    /// reading, is over half its queue budget, or another worker's mailbox is full: the
    /// subscribers this waits for. What was already read waits in `cumulation`. (In `rare`; the
    /// read loop asks the `heldBack` flag.)
    private var holdBack: [(session: Session, grant: Grant)]? {
        get { rare?.holdBack }
        set {
            flags.set(.heldBack, newValue != nil)
            if newValue != nil || rare?.holdBack != nil { updateRare { $0.holdBack = newValue } }
        }
    }

    /// After a publish that found a subscriber queue or a mailbox filling up: pause reading this
    /// client until they drain (rechecked every 2 ms), so that the subscribers keeping up lose
    /// nothing. A subscriber that makes no progress stops counting after a while
    /// (`Session.stallTimeout`) and has its messages dropped instead.
    private func holdBackIfCongested(_ targets: [(session: Session, grant: Grant)]) {
        guard !flags.contains(.heldBack) else { return }
        let now = NIODeadline.now()
        let congestion = self.congestion(targets, now: now)
        guard congestion != .none else { return }
        holdBack = targets
        if congestion == .allowance { rare?.allowance.since = now }
        updateReading()
        scheduleHoldBackCheck()
    }

    /// Waits for the next check: woken by a worker whose mailbox drains, or polled every 2 ms
    /// while a subscriber's queue is the reason.
    private func scheduleHoldBackCheck() {
        guard !flags.contains(.holdBackCheckPending) else { return }
        flags.insert(.holdBackCheckPending)
        let this = NIOLoopBound(self, eventLoop: worker.loop)
        let loop = worker.loop
        if let full = broker.workers.first(where: { $0 !== worker && $0.mailboxIsFull }) {
            full.whenMailboxDrains { loop.execute { this.value.checkHoldBack() } }
        } else {
            loop.scheduleTask(in: .milliseconds(2)) { this.value.checkHoldBack() }
        }
    }

    private func checkHoldBack() {
        flags.remove(.holdBackCheckPending)
        let now = NIODeadline.now()
        rare?.allowance.charge(now: now)
        guard let targets = holdBack, machine.isConnected else {
            holdBack = nil
            return
        }
        let congestion = self.congestion(targets, now: now)
        if congestion != .none {
            if congestion == .allowance { rare?.allowance.since = now }
            return scheduleHoldBackCheck()
        }
        holdBack = nil
        if cumulation != nil {
            worker.beginBatch()
            processKept()
            worker.flushDirty()
        }
        if !flags.contains(.heldBack) { updateReading() }
        inputHandled()
    }

    /// Whether this client should wait before more of its messages are read, and why.
    private func congestion(_ targets: [(session: Session, grant: Grant)], now: NIODeadline) -> Session.Congestion {
        let allowance = rare?.allowance.left(now: now) ?? true
        return worker.congestion(targets, excluding: session, subscribers: session?.mayBeHeldBack() ?? true, allowance: allowance, now: now)
    }

    /// Reads from the socket when the state machine wants to (what was read while it does not
    /// waits in `cumulation`, or in the machine before CONNACK), and not while the client's
    /// answers pile up unread (`checkAnswerBacklog`).
    private func updateReading() {
        guard let reading = machine.wantsToRead(heldBack: flags.contains(.heldBack) || flags.contains(.answersHeld)) else { return }
        try? context?.channel.syncOptions?.setOption(.autoRead, value: reading)
    }

    // MARK: - Closing

    /// Closes this connection for a protocol violation, a timeout, or a takeover: one log line
    /// (unless the caller `logged` it already), and the will is published. The session is
    /// released at once, so a caller taking over the client id may hand it to another worker
    /// right after.
    func closeWithWill(reason: String, logged: Bool = false) {
        if machine.isClosed, session == nil { return }
        if !logged { logClose(reason) }
        flushOutput()
        detach(publishWill: true, reason: reason)
        closeSocket()
    }

    /// The broker is stopping: the will goes now (an MQTT 5 Will Delay Interval is not waited
    /// for: the broker will not be there when it ends), as any message of this client.
    func publishWillForShutdown() {
        guard machine.isConnected, session != nil, var message = will else { return }
        will = nil
        message.properties.willDelayInterval = nil
        route(message)
    }

    /// Closes (its will went already: `publishWillForShutdown`): the broker is stopping. What
    /// is batched for it (the wills routed to it) goes first, then an MQTT 5 client's DISCONNECT,
    /// and nothing after.
    func closeForShutdown() {
        if let context {
            writeBatch()
            context.flush()
        }
        tellV5(.serverShuttingDown)
        detach(publishWill: false, reason: "broker stopping")
        // The output shut (FIN after what was written), what the client still sends read and
        // dropped: closed at once, a client acknowledging the wills it was just sent would get a
        // reset, and its system could drop them unread. `Broker.shutdown` waits for these.
        closeSocket()
    }

    /// Closes without publishing the will, with one log line: a connection that never got its
    /// session, or one whose persistent session a clean session 0 CONNECT takes over (`publishWill`:
    /// unless MQTT 5 says it goes all the same).
    func closeWithoutWill(reason: String, keepShared: Bool = false, publishWill: Bool = false) {
        if machine.isClosed, session == nil { return }
        logClose(reason)
        detach(publishWill: publishWill, reason: reason, keepShared: keepShared)
        closeSocket()
    }

    /// One line saying why (bounded: the reason may quote the client, a topic or a protocol
    /// name). Before a CONNECT is read anyone can be the cause (a scanner, garbage, another
    /// protocol), so those lines have the listener's rate limit, as refused handshakes do.
    private func logClose(_ reason: String) {
        if machine.isAwaitingConnect {
            origin.logRefusal("closing connection: \(reason)", logger: logger)
        } else {
            log(.info, "closing connection: \(LogText(reason, limit: 512))")
        }
    }

    /// Closes the socket when the broker ends the connection (a refusal, a protocol error, a
    /// timeout, a takeover), after the packet that says why (CONNACK, an MQTT 5 DISCONNECT).
    /// The output is shut first (FIN after that packet), and what the client still sends is read
    /// and dropped until it closes too, for a second at most: a socket closed with unread bytes
    /// is reset, and a client still writing (pipelined packets, a QoS 2 flow) would get the reset
    /// before it read why. Where the output cannot be shut alone, it is closed at once. The
    /// second counts from here, not from the FIN: NIO shuts the output once what is queued for
    /// the socket is written, which a client that does not read would put off for ever.
    private func closeSocket() {
        guard let context else { return }
        let channel = context.channel
        let outputClosed = channel.eventLoop.makePromise(of: Void.self)
        context.close(mode: .output, promise: outputClosed)
        outputClosed.futureResult.whenFailure { _ in channel.close(promise: nil) }
        channel.eventLoop.scheduleTask(in: Self.lingerTime) { channel.close(promise: nil) }
    }

    static let lingerTime = TimeAmount.seconds(1)

    /// Releases the session (discarding it for clean session 1), publishes the will if asked,
    /// and tells the hooks. Idempotent.
    private func detach(publishWill: Bool, reason: String, keepShared: Bool = false) {
        let authenticating = machine.hookPending && !machine.isConnected && !machine.isClosed
        let wasConnected = machine.closed()
        if authenticating { broker.hooks.abandoned(connection: ObjectIdentifier(self), worker: worker.index) }
        guard let session else { return }
        updateRare { $0.clientID = session.clientID }
        self.session = nil
        if session.outbound === self {
            session.disconnected()
        }
        if !session.persistent {
            broker.endSession(session, worker: worker)  // hands over what its shared subscriptions brought
        } else if !session.ended {
            // Its client is gone (a connection taking the session over keeps it instead):
            // another member of its shared subscriptions' groups gets what it did not acknowledge.
            if !keepShared, session.outbound == nil { broker.handOverShared(from: session, worker: worker) }
            session.compactInflight()
            worker.sessionWentOffline(session)
        }
        if publishWill, let will {
            self.will = nil
            // As any message of this client: the ACL and the publish hooks see it. MQTT 5 may
            // delay it, while the session lasts, for a client that comes back meanwhile.
            var message = will
            let delay = message.properties.willDelayInterval ?? 0
            if message.properties.willDelayInterval != nil { message.properties.willDelayInterval = nil }  // a will property, not a PUBLISH one
            if delay > 0, !session.ended {
                session.delayWill(after: .seconds(Int64(delay)), on: worker.loop) { [self] in routeDelayedWill(message) }
            } else {
                route(message)
            }
        }
        will = nil
        if wasConnected { broker.hooks.disconnected(clientInfo, reason: reason, worker: worker.index) }
    }

    // MARK: - Enhanced authentication (MQTT 5 AUTH)

    /// Asks the hooks for the next step of the exchange in progress, with the client's data.
    private func askAuthentication(data: ByteBuffer?) {
        guard let authentication = rare?.authentication else { return }
        // A bound on the rounds one exchange may take (a client cannot keep the hooks busy).
        guard authentication.step < Authentication.maxSteps else {
            return authenticationAnswered(.failure(.notAuthorized, nil), authentication, reason: "more than \(Authentication.maxSteps) steps")
        }
        authentication.step += 1
        var request = AuthRequest(
            clientID: clientID, username: username, address: address, listener: origin.bind,
            method: authentication.method, data: data, step: authentication.step, reauthenticating: authentication.connect == nil,
            state: authentication.state)
        request.connection = ObjectIdentifier(self)
        whenAnswered(broker.hooks.authenticate(request, worker: worker.index), failed: .failure(.notAuthorized, nil)) { handler, decision in
            handler.authenticationAnswered(decision, authentication)
        }
    }

    private func authenticationAnswered(_ decision: AuthDecision, _ authentication: Authentication, reason logged: String? = nil) {
        guard !machine.isClosed, rare?.authentication === authentication else { return }
        var properties = MQTTProperties()
        properties.authenticationMethod = authentication.method
        switch decision {
        case .continue(let data, let state):
            authentication.state = state
            properties.authenticationData = data
            guard fit(&properties, limit: authentication.clientLimit, { .auth(AuthPacket(reasonCode: .continueAuthentication, properties: $0)) }) else {
                return authenticationAnswered(.failure(.packetTooLarge, nil), authentication, reason: "AUTH would be larger than the client's Maximum Packet Size")
            }
            machine.authenticationContinues()
            writePacket(.auth(AuthPacket(reasonCode: .continueAuthentication, properties: properties)))
            flushOutput()
        case .success(let data):
            authentication.finish()
            if let connect = authentication.connect {
                authentication.connect = nil
                authentication.serverData = data
                authenticated(connect, .accept)
            } else {
                properties.authenticationData = data
                guard fit(&properties, limit: authentication.clientLimit, { .auth(AuthPacket(reasonCode: .success, properties: $0)) }) else {
                    return authenticationAnswered(.failure(.packetTooLarge, nil), authentication, reason: "AUTH would be larger than the client's Maximum Packet Size")
                }
                writePacket(.auth(AuthPacket(reasonCode: .success, properties: properties)))
                log(.debug, "re-authenticated")
            }
        case .failure(let code, let reason):
            let text = "enhanced authentication refused" + ((logged ?? reason).map { ": \($0)" } ?? "")
            var refusal = MQTTProperties()
            if let reason { refusal.reasonString = reason }
            if authentication.connect != nil {
                _ = fit(&refusal, limit: authentication.clientLimit) { .connack(ConnackPacket(sessionPresent: false, reasonCode: code, properties: $0)) }
                refuse(ConnackPacket(sessionPresent: false, reasonCode: code, properties: refusal), text)
            } else {
                let code = code.isAllowed(in: .disconnect) ? code : .notAuthorized
                _ = fit(&refusal, limit: authentication.clientLimit) { .disconnectV5(DisconnectPacket(reasonCode: code, properties: $0)) }
                tellV5(code, properties: refusal)
                closeWithWill(reason: text)
            }
        }
    }

    /// AUTH from the client: the answer to the server's AUTH (0x18) in the exchange in progress,
    /// or a connected client's re-authentication (0x19) in the method it connected with (§4.12).
    private func handleAuth(_ auth: AuthPacket) {
        guard let authentication = rare?.authentication, auth.properties.authenticationMethod == authentication.method else {
            tellV5(.protocolError)
            return closeWithWill(reason: "AUTH without the authentication method the client connected with")
        }
        switch auth.reasonCode {
        case .continueAuthentication where authentication.inProgress:
            askAuthentication(data: auth.properties.authenticationData)
        case .reAuthenticate where machine.isConnected && !authentication.inProgress:
            askAuthentication(data: auth.properties.authenticationData)
        default:
            tellV5(.protocolError)
            closeWithWill(reason: "AUTH with reason code 0x\(String(auth.reasonCode.rawValue, radix: 16)) out of turn")
        }
    }

    // MARK: - Output

    /// For metrics: what this connection's session holds, if it is connected. On the loop.
    func sessionLoad() -> (inflight: Int, queued: Int)? {
        guard machine.isConnected, let session else { return nil }
        return (session.inflight.count, session.queue.count)
    }

    /// Whether the socket can take more now (else deliveries queue in the session).
    var canWrite: Bool {
        // A TLS handler holds what is written until the flush (and encrypts all of it then):
        // NIO's writability does not see it before.
        context != nil && !flags.contains(.unwritable) && !machine.saidGoodbye
            && (output?.readableBytes ?? 0) + (Int(unflushedKiB) << 10) < Self.maxBatchedBytes
    }

    private func appendOutput(_ write: (inout ByteBuffer) -> Void) {
        guard !machine.saidGoodbye else { return }
        if output == nil { output = context?.channel.allocator.buffer(capacity: 1024) ?? ByteBuffer() }
        write(&output!)
        markDirty()
    }

    private func countUnflushed(_ bytes: Int) {
        // (Elsewhere the channel counts writes as they come.)
        guard origin.tls != nil else { return }
        unflushedKiB = UInt16(clamping: Int(unflushedKiB) + (bytes + 1023) >> 10)
    }

    private func markDirty() {
        if !flags.contains(.dirty) {
            flags.insert(.dirty)
            worker.markDirty(self)
        }
    }

    /// Writes the batch buffer into the channel (without flushing), keeping write order when a
    /// large payload goes out as its own buffer.
    private func writeBatch() {
        if let pending = output, pending.readableBytes > 0, let context {
            context.write(wrapOutboundOut(pending), promise: nil)
        }
        output = nil
    }

    func writePacket(_ packet: MQTTPacket) {
        appendOutput { $0.writeMQTTPacket(packet, version: version) }
    }

    func writePubrel(packetID: UInt16) {
        writePacket(.pubrel(packetID: packetID))
    }

    func disconnect(reason: String) {
        tellV5(.administrativeAction)
        closeWithWill(reason: reason)
        worker.flushDirty()
    }

    /// Asks the `authorize` hook again (a reload, or a script asked) and applies its answer. An
    /// answer that comes later is applied when it comes (the client is not paused meanwhile: the
    /// rules it had apply until then), if the client is still connected with the same session.
    func reauthorize() {
        guard machine.isConnected, let session else { return }
        whenAnswered(broker.hooks.authorize(clientInfo, worker: worker.index), failed: [.denyAll], pausing: false) { handler, tables in
            guard handler.machine.isConnected, handler.session === session else { return }
            handler.reauthorized(session, tables)
        }
    }

    /// A will whose delay ran out: the `authorize` hook is asked again first, as the rules may
    /// have changed while it waited (a reload, `mqlite.reauthorize`), which this connection,
    /// gone, was not told of; Mosquitto too checks a will against the ACL as it sends it.
    private func routeDelayedWill(_ message: Message) {
        whenAnswered(broker.hooks.authorize(clientInfo, worker: worker.index), failed: [.denyAll], pausing: false) { handler, tables in
            handler.grant(tables)
            handler.route(message)
        }
    }

    /// Access rules from the `authorize` hook's tables (none: no rules).
    private func grant(_ tables: [ACLTable]) {
        access = tables.isEmpty ? nil : Access(ClientACL(tables, clientID: clientID, username: username))
    }

    private func reauthorized(_ session: Session, _ tables: [ACLTable]) {
        grant(tables)
        session.receiveACL = (access?.acl.restrictsReceiving ?? false) ? access?.acl : nil
        guard let acl = access?.acl else { return }
        revoke(session, acl: acl)
    }

    /// Removes the subscriptions `acl` no longer allows, with their names, and the queued
    /// messages only they brought.
    private func revoke(_ session: Session, acl: ClientACL) {
        let revoked = session.subscriptions.keys.filter { !acl.allowsSubscribe(filter: $0) }
        guard !revoked.isEmpty else { return }
        for filter in revoked {
            broker.unsubscribe(session, filter: filter)
            if session.hasRenamedSubscriptions {
                session.withSubscriptionNames { $0.removeAll(subscribedAs: filter) }
                session.report(.renamed)
            }
        }
        session.dropQueued(onlyFrom: revoked)
        log(.info, "access rules changed: \(revoked.count) subscriptions removed")
    }

    func interceptDelivery(_ message: Message) -> Message? {
        broker.interceptDelivery(message, to: clientInfo, worker: worker.index, logger: logger)
    }

    func takenOver(publishWill: Bool) {
        let reason = "taken over by a new connection with the same client id"
        tellV5(.sessionTakenOver)
        if publishWill { return closeWithWill(reason: reason) }
        // The session goes on with the new connection: what it has in flight or queued stays
        // with it, shared subscriptions' messages too. MQTT 5 publishes the will as the old
        // connection closes unless it has a Will Delay Interval, which the new connection's return
        // within it cancels (MQTT-3.1.2-8, §3.1.3.2.2); 3.1.1 says nothing of it, and Mosquitto
        // does not publish it.
        let willNow = version == .v5 && will.map { ($0.properties.willDelayInterval ?? 0) == 0 } == true
        closeWithoutWill(reason: reason, keepShared: true, publishWill: willNow)
    }

    /// A QoS 0 frame shared by all QoS 0 subscribers of one publish. A large payload is not in
    /// the frame; it goes to the socket as its own (shared) buffer.
    func writeQoS0(frame: ByteBuffer, message: Message) {
        // The frame is 3.1.1's; a 5.0 PUBLISH has properties after the topic.
        if version == .v5 { return writePublish(message, qos: .atMostOnce, packetID: nil, retain: false, dup: false) }
        let payload = message.payload
        worker.stats.messagesSent.qos0 &+= 1
        worker.stats.bytesSent.qos0 &+= payload.readableBytes
        if payload.readableBytes > largePayloadThreshold {
            guard let context else { return }
            writeBatch()
            context.write(wrapOutboundOut(frame), promise: nil)
            context.write(wrapOutboundOut(payload), promise: nil)
            countUnflushed(payload.readableBytes)
            markDirty()
        } else {
            appendOutput { $0.writeImmutableBuffer(frame) }
        }
    }

    func writePublish(_ message: Message, qos: QoS, packetID: UInt16?, retain: Bool, dup: Bool) {
        worker.stats.messagesSent.add(qos)
        worker.stats.bytesSent.add(qos, message.payload.readableBytes)
        if message.payload.readableBytes > largePayloadThreshold {
            guard let context else { return }
            writeBatch()
            var header = context.channel.allocator.buffer(capacity: message.topic.count + 10)
            if version == .v5 {
                header.writePublishHeader(
                    topic: message.topic.bytes, payloadLength: message.payload.readableBytes, qos: qos, retain: retain, dup: dup, packetID: packetID,
                    properties: message.properties)
            } else {
                header.writePublishHeader(
                    topic: message.topic.bytes, payloadLength: message.payload.readableBytes, qos: qos, retain: retain, dup: dup, packetID: packetID)
            }
            context.write(wrapOutboundOut(header), promise: nil)
            context.write(wrapOutboundOut(message.payload), promise: nil)
            countUnflushed(message.payload.readableBytes)
            markDirty()
        } else {
            appendOutput {
                if version == .v5 {
                    $0.writePublishHeader(
                        topic: message.topic.bytes, payloadLength: message.payload.readableBytes, qos: qos, retain: retain, dup: dup, packetID: packetID,
                        properties: message.properties)
                    $0.writeImmutableBuffer(message.payload)
                } else {
                    $0.writePublish(topic: message.topic.bytes, payload: message.payload, qos: qos, retain: retain, dup: dup, packetID: packetID)
                }
            }
        }
    }

    /// Writes and flushes what is batched. Called once per loop iteration by the worker.
    func flushOutput() {
        flags.remove(.dirty)
        guard let context else { return }
        unflushedKiB = 0
        // One trip down the pipeline for the batch and the flush.
        let pending = output
        output = nil
        if let pending, pending.readableBytes > 0 {
            context.writeAndFlush(wrapOutboundOut(pending), promise: nil)
        } else {
            context.flush()
        }
        // The socket took it all: go on with what waits (the batch limit stopped it, not the socket).
        if let session, session.hasQueued, !flags.contains(.unwritable), !machine.saidGoodbye, machine.isConnected { session.pump() }
    }
}

/// What most connections do not have: a will, access rules, enhanced authentication,
/// acknowledgements waiting for the store, TLS, publishers held back.
private final class Rare {
    /// The client's id while no session is attached (`ConnectionHandler.clientID`).
    var clientID: String?
    var will: Will?
    var access: Access?
    var authentication: Authentication?
    var storeAcks: StoreAcks?
    /// A Mosquitto bridge (`ConnectPacket.isBridge`): its subscriptions have No Local.
    var peerIsBridge = false
    /// On TLS listeners, what the handshake told of the client.
    var tls: TLSClientInfo?
    var holdBack: [(session: Session, grant: Grant)]?
    /// How long subscribers on their allowance held this publisher back in the current window.
    var allowance = HoldBackAllowance()
    /// The client's EOF came while packets it sent before waited behind a pause
    /// (`ConnectionHandler.closeAtInputEnd`).
    var inputEnded = false

    var isEmpty: Bool {
        clientID == nil && will == nil && access == nil && authentication == nil && storeAcks == nil && !peerIsBridge && tls == nil && holdBack == nil
            && allowance.isUnused && !inputEnded
    }
}

/// A publisher's side of the slow-consumer policy: subscribers that have not earned it (fresh
/// connections, slow readers) hold it back for at most `Session.publisherAllowance` in any
/// `Session.holdBackWindow`, together, whichever and however many they are; past that their
/// messages are dropped at their queue limits instead.
struct HoldBackAllowance {
    private var windowStart = NIODeadline.distantPast
    private var used = TimeAmount.zero
    /// Held back on allowance since then (charged at the next check).
    var since: NIODeadline?

    var isUnused: Bool { used == .zero && since == nil }

    mutating func charge(now: NIODeadline) {
        guard let since else { return }
        used += now - since
        self.since = nil
    }

    mutating func left(now: NIODeadline) -> Bool {
        if now - windowStart >= Session.holdBackWindow {
            windowStart = now
            used = .zero
        }
        return used < Session.publisherAllowance
    }
}

/// An MQTT 5 enhanced authentication method in use on a connection: the exchange in progress (at
/// CONNECT, or re-authenticating), then the method a re-authentication must use.
private final class Authentication {
    let method: String
    /// Until the exchange at CONNECT succeeds: that CONNECT.
    var connect: ConnectPacket?
    /// Steps asked so far in the exchange in progress (0: none in progress).
    var step = 0
    /// What the hook gave with its last `continue`.
    var state: ByteBuffer?
    /// Most steps (hook calls) in one exchange: SCRAM takes two or three.
    static let maxSteps = 16
    /// The hook's data for CONNACK.
    var serverData: ByteBuffer?
    /// The client's Maximum Packet Size: what AUTH must fit.
    let clientLimit: UInt32?

    init(method: String, connect: ConnectPacket) {
        self.method = method
        self.connect = connect
        clientLimit = connect.properties.maximumPacketSize
    }

    var inProgress: Bool { step > 0 }

    func finish() {
        step = 0
        state = nil
    }
}

/// A client's access rules and, so that they are matched once per topic, its publish verdicts.
private final class Access {
    let acl: ClientACL
    var verdicts: [TopicName: Bool] = [:]

    init(_ acl: ClientACL) { self.acl = acl }
}

extension OptionSet {
    fileprivate mutating func set(_ member: Element, _ on: Bool) {
        if on { insert(member) } else { remove(member) }
    }
}
