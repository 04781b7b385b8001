import MQTTCore
import NIOCore

/// The MQTT 3.1.1 rules of one connection, as a value: it takes what happened (a packet, a decode
/// error, the session arriving, a timeout sweep, the connection ending) and says what to do. It
/// does no I/O and knows no broker; `ConnectionHandler` carries the actions out (hooks, routing,
/// the session, the socket). Unit-tested without sockets in `ConnectionStateMachineTests`, as
/// SwiftNIO tests its own state machines.
///
/// States: waiting for CONNECT → (MQTT 5 enhanced authentication: authenticating, AUTH packets
/// both ways) → opening (CONNECT accepted, the session on its way; reading pauses, and what was
/// read waits undecoded in the handler) → connected → closed. Closed is final: nothing more is handled.
/// Across them, a hook may be pending (a script waiting on an HTTP call for this client's CONNECT,
/// PUBLISH or SUBSCRIBE): the client's later packets then wait, in order, until it answers;
/// reading pauses, and packets already decoded are held here.
/// An action that closes the connection leaves the state as it was, so that `closed()` can tell
/// whether a connected client went away (the hooks hear of that); the handler calls it as it closes.
struct ConnectionStateMachine {
    enum State {
        case awaitingConnect
        /// MQTT 5 enhanced authentication: the server sent AUTH and waits for the client's.
        case authenticating
        /// CONNECT accepted; waiting for the session (maybe held by another worker).
        case opening
        /// `held`: packets decoded before a hook started to wait (those sent before CONNACK), to be
        /// handled, in order, when it answers. Empty otherwise.
        case connected(held: [MQTTPacket])
        case closed
    }

    // Laid out to fill 24 bytes of the handler with its flags (`IdleFootprintTests`).
    private(set) var state = State.awaitingConnect
    /// When the socket opened (until CONNECT), then when a packet last came (with a keep-alive).
    private(set) var lastRead: NIODeadline
    /// 1.5 x the client's keep-alive in milliseconds (zero: no check).
    private var keepAliveMilliseconds: UInt32 = 0
    /// `hookPending` (bit 7), `authenticatesFirst` (bit 6), `saidGoodbye` (bit 5) and `version`
    /// (the protocol level) in one byte.
    private var bits = ProtocolVersion.v3_1_1.rawValue

    /// A hook is answering for this client (`hookStarted`): its packets wait.
    private(set) var hookPending: Bool {
        get { bits & 0x80 != 0 }
        set { bits = newValue ? bits | 0x80 : bits & 0x7F }
    }

    /// What the client speaks: 3.1.1 (3.1 is read and written as 3.1.1) until its CONNECT asks
    /// for 5.0. The handler sets it.
    var version: ProtocolVersion {
        get { ProtocolVersion(rawValue: bits & 0x1F) ?? .v3_1_1 }
        set { bits = (bits & 0xE0) | newValue.rawValue }
    }

    /// An MQTT 5 DISCONNECT went out to the client: nothing may follow it (MQTT-3.14.4-1). The
    /// handler sets it.
    var saidGoodbye: Bool {
        get { bits & 0x20 != 0 }
        set { bits = newValue ? bits | 0x20 : bits & ~0x20 }
    }

    /// MQTT 5 enhanced authentication was asked for: until CONNACK, the client may send nothing
    /// but AUTH and DISCONNECT (MQTT-3.1.2-30). Until the first read after CONNACK, then.
    private var authenticatesFirst: Bool { bits & 0x40 != 0 }

    init(now: NIODeadline) {
        lastRead = now
    }

    var keepAlive: TimeAmount { .milliseconds(Int64(keepAliveMilliseconds)) }

    var isConnected: Bool {
        if case .connected = state { return true }
        return false
    }

    var isClosed: Bool {
        if case .closed = state { return true }
        return false
    }

    /// CONNECT accepted, the session on its way.
    var isOpening: Bool {
        if case .opening = state { return true }
        return false
    }

    /// No CONNECT read yet.
    var isAwaitingConnect: Bool {
        if case .awaitingConnect = state { return true }
        return false
    }

    // MARK: - Reading

    /// Bytes came from the client: read after CONNACK went out, so the client may have had it
    /// (what came in earlier reads was sent before it).
    mutating func bytesRead() {
        if authenticatesFirst, case .connected = state { bits &= ~0x40 }
    }

    /// A read starts a packet with `byte`. The first packet must be CONNECT (MQTT-3.1.0-1), and
    /// its first byte says whether it is: anything else closes the connection now, not once the
    /// packet it seems to begin is complete (a PROXY protocol header on a listener without
    /// `proxy_protocol` reads as a PUBREC of 82 bytes, which only `connect_timeout` ended).
    func packetStarts(with byte: UInt8) -> PacketAction? {
        guard byte != 0x10, case .awaitingConnect = state, !hookPending else { return nil }
        let type = PacketType(rawValue: byte >> 4).map { "\($0)" } ?? "reserved type 0"
        let hint = Self.otherProtocols[byte].map { " (\($0)?)" } ?? ""
        return .close(reason: "first packet is \(type), not CONNECT (first byte 0x\(String(byte, radix: 16, uppercase: true)))\(hint)")
    }

    /// First bytes of what clients pointed at the wrong listener send, named in the log.
    private static let otherProtocols: [UInt8: String] = [
        0x16: "a TLS handshake on a listener without TLS",
        UInt8(ascii: "G"): "an HTTP request on an MQTT listener without websocket",
        UInt8(ascii: "P"): "a PROXY protocol header on a listener without proxy_protocol",
    ]

    /// Whole packets came from the client: with a keep-alive, that is what its timer counts from
    /// (MQTT-3.1.2-24 counts Control Packets, as Mosquitto does; the bytes of a packet trickled
    /// in do not keep a connection alive).
    mutating func packetsRead(now: NIODeadline) {
        if keepAliveMilliseconds != 0 { lastRead = now }
    }

    /// Whether the socket should be read: while waiting for CONNECT and while connected, but not
    /// between CONNECT and CONNACK (the session may be held by another worker), nor while a hook
    /// answers for the client or back-pressure holds it back. Nil once closed (leave the socket
    /// alone).
    func wantsToRead(heldBack: Bool) -> Bool? {
        switch state {
        case .awaitingConnect, .authenticating: return !hookPending
        case .opening: return false
        case .connected: return !heldBack && !hookPending
        case .closed: return nil
        }
    }

    // MARK: - Hooks that wait

    /// A hook started to wait (an answer for this client's CONNECT, PUBLISH or SUBSCRIBE will come
    /// later): handle no packet of this client until `hookFinished`. One at a time: the handler
    /// stops decoding while one waits (a will published as the connection closes may add one,
    /// but a closed connection handles nothing more).
    mutating func hookStarted() {
        assert(!hookPending || isClosed, "a second hook waits for the same client")
        hookPending = true
    }

    /// The packets that could not be handled because a hook started to wait, in order: they go
    /// first when it answers (only packets sent before CONNACK arrive here already decoded).
    mutating func hold(_ packets: ArraySlice<MQTTPacket>) {
        guard case .connected(var held) = state, !packets.isEmpty else { return }
        state = .closed  // so that the array is not shared while it grows
        held.insert(contentsOf: packets, at: 0)
        state = .connected(held: held)
    }

    /// The hook answered: the packets held meanwhile, to handle now, in order.
    mutating func hookFinished() -> [MQTTPacket] {
        hookPending = false
        guard case .connected(let held) = state, !held.isEmpty else { return [] }
        state = .connected(held: [])
        return held
    }

    // MARK: - Packets

    /// What a packet from the client asks for.
    enum PacketAction: Equatable {
        /// Nothing: the connection is closed, or the packet waits for the session.
        case none
        /// The first packet: authenticate, then `connectAccepted` or `connectRefused`.
        case connect(ConnectPacket)
        case publish(PublishPacket)
        /// Outgoing QoS 1 acknowledged.
        case puback(UInt16)
        /// Outgoing QoS 2 received: release it, and answer PUBREL (even for an id not in flight,
        /// as Mosquitto, so a client that kept its state across a lost session completes its flow).
        case pubrec(UInt16)
        /// MQTT 5: outgoing QoS 2 refused by the client (PUBREC with a failure code): it is done,
        /// with no PUBREL.
        case pubrecRefused(UInt16)
        /// Outgoing QoS 2 complete.
        case pubcomp(UInt16)
        /// Incoming QoS 2 released: forget the id, answer PUBCOMP.
        case pubrel(UInt16)
        case subscribe(SubscribePacket)
        case unsubscribe(UnsubscribePacket)
        /// Answer PINGRESP.
        case ping
        /// DISCONNECT: close without the will (then `closed()`: nothing after it is handled).
        case disconnect
        /// MQTT 5 DISCONNECT with a reason code or properties: close, publishing the will unless
        /// the code is 0 (then `closed()`).
        case disconnectV5(DisconnectPacket)
        /// MQTT 5 AUTH: a step of enhanced authentication, or a re-authentication.
        case auth(AuthPacket)
        /// A protocol violation: close, publishing the will (then `closed()`); an MQTT 5 client is
        /// told `code` first.
        case close(reason: String, code: ReasonCode = .protocolError)
    }

    mutating func packetReceived(_ packet: consuming MQTTPacket) -> PacketAction {
        switch state {
        case .closed:
            return .none
        case _ where hookPending:
            assertionFailure("a packet handled while a hook answers for this client")
            return .close(reason: "packet handled while a hook was pending")
        case .awaitingConnect:
            guard case .connect(let connect) = packet else { return .close(reason: "first packet is \(packet.type), not CONNECT") }
            return .connect(connect.value)
        case .authenticating:
            switch packet {
            case .auth(let auth): return .auth(auth)
            case .disconnect, .disconnectV5: return .disconnect
            default: return .close(reason: "\(packet.type) during enhanced authentication")
            }
        case .opening:
            // Nothing is decoded while the session is on its way: what was read waits, as it
            // was read, until it is attached (however many packets one read brought).
            assertionFailure("a packet handled while the session is on its way")
            return .close(reason: "packet handled before the session was attached")
        case .connected where authenticatesFirst:
            // Read with the last AUTH, before CONNACK (which may have gone out since).
            switch packet {
            case .disconnect, .disconnectV5: return .disconnect
            default: return .close(reason: "\(packet.type) before CONNACK after enhanced authentication")
            }
        case .connected:
            switch packet {
            case .publish(let publish): return .publish(publish)
            case .puback(let id): return .puback(id)
            case .pubrec(let id): return .pubrec(id)
            case .pubcomp(let id): return .pubcomp(id)
            case .pubrel(let id): return .pubrel(id)
            case .subscribe(let subscribe): return .subscribe(subscribe.value)
            case .unsubscribe(let unsubscribe): return .unsubscribe(unsubscribe.value)
            case .pingreq: return .ping
            case .disconnect: return .disconnect
            case .connect: return .close(reason: "second CONNECT")
            case .connack, .suback, .unsuback, .unsubackV5, .pingresp: return .close(reason: "\(packet.type) is sent by servers only")
            // (Only a connection decoded as MQTT 5 has these.)
            case .ackV5(let ack):
                switch ack.kind {
                case .puback: return .puback(ack.packetID)
                case .pubrec: return ack.reasonCode.isFailure ? .pubrecRefused(ack.packetID) : .pubrec(ack.packetID)
                case .pubrel: return .pubrel(ack.packetID)
                case .pubcomp: return .pubcomp(ack.packetID)
                }
            case .disconnectV5(let disconnect): return .disconnectV5(disconnect)
            case .auth(let auth): return .auth(auth)
            }
        }
    }

    /// A packet could not be decoded: close (publishing the will, then `closed()`), answering
    /// CONNACK first where the protocol asks (an unsupported protocol level in CONNECT of an MQTT
    /// protocol name gets return code 1, MQTT-3.1.2-2) or allows (a CONNECT that `connectLevel`,
    /// its protocol level as far as it could be read, says is MQTT 5). A CONNECT of another
    /// protocol's name is not processed as MQTT at all (MQTT-3.1.2-1): closed without an answer,
    /// as Mosquitto does.
    func decodeFailed(_ error: any Error, connectLevel: UInt8? = nil) -> (connack: ConnackPacket?, reason: String) {
        let protocolError = error as? MQTTProtocolError
        var connack: ConnackPacket?
        if case .awaitingConnect = state {
            if case .unsupportedProtocol(let name, _)? = protocolError {
                if name == "MQTT" || name == "MQIsdp" { connack = ConnackPacket(sessionPresent: false, returnCode: .unacceptableProtocolVersion) }
            } else if connectLevel == ProtocolVersion.v5.rawValue, let protocolError {
                // An MQTT 5 CONNECT that is malformed or breaks a rule: CONNACK says which
                // (0x81, 0x82, 0x95...) before the close, as §4.13.1 allows.
                let code = protocolError.reasonCode
                connack = ConnackPacket(sessionPresent: false, reasonCode: code.isAllowed(in: .connack) ? code : .malformedPacket)
            }
        }
        return (connack, protocolError?.description ?? "\(error)")
    }

    // MARK: - CONNECT

    /// The client is admitted (authenticated, will allowed): wait for its session (reading
    /// paused), and from now on check its keep-alive.
    mutating func connectAccepted(keepAlive seconds: UInt16, now: NIODeadline) {
        assert({ switch state { case .awaitingConnect, .authenticating: true; default: false } }(), "CONNECT accepted twice")
        keepAliveMilliseconds = UInt32(seconds) * 1500
        lastRead = now
        state = .opening
    }

    /// CONNECT asked for MQTT 5 enhanced authentication: the hooks' exchange comes before CONNACK,
    /// and the client sends nothing else meanwhile.
    mutating func authenticationStarted() {
        bits |= 0x40
    }

    /// MQTT 5 enhanced authentication goes on: the server sent AUTH, the client answers with AUTH
    /// (within `connect_timeout` of the socket opening, as CONNECT).
    mutating func authenticationContinues() {
        if case .awaitingConnect = state { state = .authenticating }
    }

    /// The client is refused (CONNACK with an error code, then close).
    mutating func connectRefused() {
        state = .closed
    }

    /// What to do with a session that arrived for this connection.
    enum AttachAction: Equatable {
        /// Attach it and answer CONNACK (then what the client sent meanwhile is decoded).
        case attach
        /// The connection went away meanwhile: give the session back (offline, or ended).
        case giveBack
    }

    mutating func sessionArrived() -> AttachAction {
        guard case .opening = state else { return .giveBack }
        state = .connected(held: [])
        return .attach
    }

    // MARK: - Time

    enum TimeoutAction: Equatable {
        case none
        /// Close, publishing the will.
        case close(reason: String, code: ReasonCode)
        /// Connected and in time: let in-flight messages stop pinning read buffers.
        case tidy
    }

    /// The worker's periodic sweep: a socket that sent no CONNECT within `connectTimeout` is
    /// closed, and so is a client silent for 1.5 x its keep-alive (MQTT-3.1.2-24) unless the
    /// broker itself holds it back (or a hook answers for it). With `closing` false (a late sweep) it
    /// only tidies.
    func timeoutCheck(now: NIODeadline, connectTimeout: TimeAmount, heldBack: Bool, closing: Bool) -> TimeoutAction {
        switch state {
        case .awaitingConnect where closing && now - lastRead >= connectTimeout:
            return .close(
                reason: hookPending ? "no CONNACK within connect_timeout: the connect hooks were still answering" : "no CONNECT within connect_timeout",
                code: .maximumConnectTime)
        case .authenticating where closing && now - lastRead >= connectTimeout:
            return .close(reason: "enhanced authentication not done within connect_timeout", code: .maximumConnectTime)
        case .connected where closing && keepAliveMilliseconds != 0 && now - lastRead >= keepAlive && !heldBack && !hookPending:
            return .close(reason: "keep-alive expired (no packet for \(keepAliveMilliseconds) ms)", code: .keepAliveTimeout)
        case .connected:
            return .tidy
        default:
            return .none
        }
    }

    // MARK: - Closing

    /// The connection ends (closed by either side): whether the client had been connected (the
    /// hooks hear of a disconnect only then).
    @discardableResult
    mutating func closed() -> Bool {
        defer { state = .closed }
        return isConnected
    }
}
