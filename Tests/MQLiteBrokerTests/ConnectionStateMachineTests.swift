import MQTTCore
import NIOCore
import Testing

@testable import MQLiteBroker

/// The connection's protocol rules as a value: events in, actions out, no socket, no broker.
@Suite("Connection state machine (no sockets)")
struct ConnectionStateMachineTests {
    private let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
    private let connect = ConnectPacket(keepAlive: 10, clientID: "c")

    /// A machine that has accepted `connect` and got its session.
    private func connected() -> ConnectionStateMachine {
        var machine = ConnectionStateMachine(now: start)
        #expect(machine.packetReceived(.connect(connect)) == .connect(connect))
        machine.connectAccepted(keepAlive: connect.keepAlive, now: start)
        #expect(machine.sessionArrived() == .attach)
        return machine
    }

    @Test("the first packet must be CONNECT; anything else closes, and nothing is handled after closing")
    func firstPacket() {
        for packet: MQTTPacket in [.pingreq, .publish(PublishPacket(topic: "t", payload: "x")), .disconnect, .puback(packetID: 1)] {
            var machine = ConnectionStateMachine(now: start)
            #expect(machine.wantsToRead(heldBack: false) == true)
            #expect(machine.packetReceived(packet) == .close(reason: "first packet is \(packet.type), not CONNECT"))
            #expect(machine.closed() == false, "never connected: no disconnect for the hooks")
            #expect(machine.packetReceived(.connect(connect)) == .none)
            #expect(machine.wantsToRead(heldBack: false) == nil)
        }
        var machine = ConnectionStateMachine(now: start)
        #expect(machine.packetReceived(.connect(connect)) == .connect(connect))
    }

    @Test("a read whose first byte is not CONNECT's closes before the packet it begins is complete; after CONNECT (its hooks answering, or accepted) any packet may start a read")
    func firstByte() {
        var machine = ConnectionStateMachine(now: start)
        #expect(machine.packetStarts(with: 0x10) == nil)
        #expect(machine.packetStarts(with: 0x50) == .close(reason: "first packet is pubrec, not CONNECT (first byte 0x50) (a PROXY protocol header on a listener without proxy_protocol?)"))
        #expect(machine.packetStarts(with: 0x16) == .close(reason: "first packet is connect, not CONNECT (first byte 0x16) (a TLS handshake on a listener without TLS?)"))
        #expect(machine.packetStarts(with: 0x20) == .close(reason: "first packet is connack, not CONNECT (first byte 0x20)"))
        #expect(machine.packetReceived(.connect(connect)) == .connect(connect))
        machine.hookStarted()
        #expect(machine.packetStarts(with: 0x30) == nil)
        #expect(connected().packetStarts(with: 0x30) == nil)
    }

    @Test("MQTT 5 enhanced authentication: reading goes on, AUTH and DISCONNECT pass, anything else closes, before CONNACK too (MQTT-3.1.2-30); connect_timeout counts from the socket's opening; accepted, the client connects as usual")
    func authenticating() {
        var machine = ConnectionStateMachine(now: start)
        _ = machine.packetReceived(.connect(connect))
        machine.authenticationStarted()
        machine.authenticationContinues()
        #expect(machine.wantsToRead(heldBack: false) == true)
        let auth = AuthPacket(reasonCode: .continueAuthentication)
        #expect(machine.packetReceived(.auth(auth)) == .auth(auth))
        #expect(machine.packetReceived(.disconnect) == .disconnect)
        let timeout = TimeAmount.seconds(10)
        #expect(machine.timeoutCheck(now: start + .seconds(9), connectTimeout: timeout, heldBack: false, closing: true) == .none)
        #expect(machine.timeoutCheck(now: start + .seconds(10), connectTimeout: timeout, heldBack: false, closing: true)
            == .close(reason: "enhanced authentication not done within connect_timeout", code: .maximumConnectTime))
        var other = machine
        #expect(other.packetReceived(.pingreq) == .close(reason: "pingreq during enhanced authentication"))
        machine.connectAccepted(keepAlive: 10, now: start)
        #expect(machine.sessionArrived() == .attach)
        #expect(machine.isConnected)
        // Sent with the last AUTH, before CONNACK (decoded once the session is attached): a
        // protocol error, but DISCONNECT; a read after CONNACK went out clears that.
        var early = machine
        #expect(early.packetReceived(.pingreq) == .close(reason: "pingreq before CONNACK after enhanced authentication"))
        var bye = machine
        #expect(bye.packetReceived(.disconnect) == .disconnect)
        machine.bytesRead()
        #expect(machine.packetReceived(.pingreq) == .ping)
        #expect(machine.version == .v3_1_1)  // (the flag has a bit of its own)
    }

    @Test("between CONNECT and CONNACK reading stops (what was read waits undecoded in the handler); then packets are handled as a connected client's")
    func opening() {
        var machine = ConnectionStateMachine(now: start)
        _ = machine.packetReceived(.connect(connect))
        machine.connectAccepted(keepAlive: 10, now: start)
        #expect(machine.wantsToRead(heldBack: false) == false)
        #expect(machine.isOpening && !machine.isConnected)

        #expect(machine.sessionArrived() == .attach)
        #expect(machine.isConnected && machine.wantsToRead(heldBack: false) == true)
        #expect(machine.wantsToRead(heldBack: true) == false, "back-pressure pauses reading")
        #expect(machine.packetReceived(.puback(packetID: 1)) == .puback(1))
    }

    @Test("a session that arrives after the connection closed is given back")
    func lateSession() {
        var machine = ConnectionStateMachine(now: start)
        _ = machine.packetReceived(.connect(connect))
        machine.connectAccepted(keepAlive: 0, now: start)
        machine.closed()
        #expect(machine.sessionArrived() == .giveBack)
        var refused = ConnectionStateMachine(now: start)
        _ = refused.packetReceived(.connect(connect))
        refused.connectRefused()
        #expect(refused.sessionArrived() == .giveBack && refused.isClosed)
    }

    @Test("a connected client's packets map to their actions; server-only, MQTT 5 and second CONNECT close")
    func connectedPackets() {
        var machine = connected()
        let publish = PublishPacket(topic: "a/b", payload: "p", qos: .atLeastOnce, packetID: 3)
        let subscribe = SubscribePacket(packetID: 4, subscriptions: [Subscription(filter: "a/#", qos: .atMostOnce)])
        let unsubscribe = UnsubscribePacket(packetID: 5, filters: ["a/#"])
        #expect(machine.packetReceived(.publish(publish)) == .publish(publish))
        #expect(machine.packetReceived(.puback(packetID: 6)) == .puback(6))
        #expect(machine.packetReceived(.pubrec(packetID: 7)) == .pubrec(7))
        #expect(machine.packetReceived(.pubrel(packetID: 8)) == .pubrel(8))
        #expect(machine.packetReceived(.pubcomp(packetID: 9)) == .pubcomp(9))
        #expect(machine.packetReceived(.subscribe(subscribe)) == .subscribe(subscribe))
        #expect(machine.packetReceived(.unsubscribe(unsubscribe)) == .unsubscribe(unsubscribe))
        #expect(machine.packetReceived(.pingreq) == .ping)
        // MQTT 5 forms (only a connection decoded as 5.0 has them): a PUBREC with a failure code
        // ends the message; any DISCONNECT reason code is the handler's to act on.
        #expect(machine.packetReceived(.ackV5(AckPacket(.puback, packetID: 6, reasonCode: .noMatchingSubscribers))) == .puback(6))
        #expect(machine.packetReceived(.ackV5(AckPacket(.pubrec, packetID: 7, reasonCode: .noMatchingSubscribers))) == .pubrec(7))
        #expect(machine.packetReceived(.ackV5(AckPacket(.pubrec, packetID: 7, reasonCode: .quotaExceeded))) == .pubrecRefused(7))
        #expect(machine.packetReceived(.ackV5(AckPacket(.pubrel, packetID: 8, reasonCode: .packetIdentifierNotFound))) == .pubrel(8))
        #expect(machine.packetReceived(.ackV5(AckPacket(.pubcomp, packetID: 9, reasonCode: .packetIdentifierNotFound))) == .pubcomp(9))
        #expect(machine.isConnected)

        let closing: [(MQTTPacket, String)] = [
            (.connect(connect), "second CONNECT"),
            (.connack(ConnackPacket(sessionPresent: false, returnCode: .accepted)), "connack is sent by servers only"),
            (.suback(SubackPacket(packetID: 1, returnCodes: [.failure])), "suback is sent by servers only"),
            (.unsuback(packetID: 1), "unsuback is sent by servers only"),
            (.pingresp, "pingresp is sent by servers only"),
            (.unsubackV5(UnsubackPacket(packetID: 1, reasonCodes: [.success])), "unsuback is sent by servers only"),
        ]
        for (packet, reason) in closing {
            var m = connected()
            #expect(m.packetReceived(packet) == .close(reason: reason))
            #expect(m.closed() == true, "a connected client went away: the hooks hear of it")
            #expect(m.packetReceived(.pingreq) == .none)
        }
        // AUTH goes to the handler, which knows whether the client authenticated with a method.
        var m = connected()
        #expect(m.packetReceived(.auth(AuthPacket(reasonCode: .reAuthenticate))) == .auth(AuthPacket(reasonCode: .reAuthenticate)))
    }

    @Test("DISCONNECT: close without the will; nothing after it is handled")
    func disconnect() {
        var machine = connected()
        #expect(machine.packetReceived(.disconnect) == .disconnect)
        #expect(machine.closed() == true)
        #expect(machine.packetReceived(.publish(PublishPacket(topic: "t", payload: "late"))) == .none)
        #expect(machine.closed() == false, "closing twice reports once")
    }

    @Test("decode errors close; an unsupported protocol level before CONNECT is answered with CONNACK 1 (not another protocol's name), an MQTT 5 CONNECT that cannot be decoded with its reason code")
    func decodeErrors() {
        let machine = ConnectionStateMachine(now: start)
        let unsupported = MQTTProtocolError.unsupportedProtocol(name: "MQTT", level: 9)
        #expect(machine.decodeFailed(unsupported).connack?.returnCode == .unacceptableProtocolVersion)
        #expect(machine.decodeFailed(unsupported).reason == unsupported.description)
        #expect(machine.decodeFailed(MQTTProtocolError.noTopicFilters(.subscribe)).connack == nil)
        #expect(connected().decodeFailed(unsupported).connack == nil, "after CONNECT it is a plain protocol error")
        // MQTT 3.1's name with another level: CONNACK 1 too. Another protocol's name: no answer.
        #expect(machine.decodeFailed(MQTTProtocolError.unsupportedProtocol(name: "MQIsdp", level: 4)).connack?.returnCode == .unacceptableProtocolVersion)
        for level: UInt8 in [3, 4, 5] {
            #expect(machine.decodeFailed(MQTTProtocolError.unsupportedProtocol(name: "hj", level: level)).connack == nil)
        }
        // A CONNECT that MQTT 5 cannot decode: CONNACK with the reason code; 3.1.1 has none for it.
        let duplicate = MQTTProtocolError.duplicateProperty(.connect, .sessionExpiryInterval)
        #expect(machine.decodeFailed(duplicate, connectLevel: 5).connack == ConnackPacket(sessionPresent: false, reasonCode: .protocolError))
        #expect(machine.decodeFailed(MQTTProtocolError.invalidUTF8, connectLevel: 5).connack?.reasonCode == .malformedPacket)
        #expect(machine.decodeFailed(duplicate, connectLevel: 4).connack == nil)
        #expect(machine.decodeFailed(duplicate).connack == nil)
        #expect(connected().decodeFailed(duplicate, connectLevel: 5).connack == nil)
    }

    @Test("connect_timeout before CONNECT; 1.5 x keep-alive after it, counted from the last packet read, not while held back")
    func timeouts() {
        let timeout = TimeAmount.seconds(10)
        let fresh = ConnectionStateMachine(now: start)
        #expect(fresh.timeoutCheck(now: start + .seconds(9), connectTimeout: timeout, heldBack: false, closing: true) == .none)
        #expect(fresh.timeoutCheck(now: start + .seconds(10), connectTimeout: timeout, heldBack: false, closing: true)
            == .close(reason: "no CONNECT within connect_timeout", code: .maximumConnectTime))
        #expect(fresh.timeoutCheck(now: start + .seconds(10), connectTimeout: timeout, heldBack: false, closing: false) == .none)

        var machine = connected()  // keep-alive 10 s: closed after 15 s of silence
        #expect(machine.keepAlive == .seconds(15))
        #expect(machine.timeoutCheck(now: start + .seconds(14), connectTimeout: timeout, heldBack: false, closing: true) == .tidy)
        #expect(machine.timeoutCheck(now: start + .seconds(15), connectTimeout: timeout, heldBack: false, closing: true)
            == .close(reason: "keep-alive expired (no packet for 15000 ms)", code: .keepAliveTimeout))
        #expect(machine.timeoutCheck(now: start + .seconds(15), connectTimeout: timeout, heldBack: true, closing: true) == .tidy)
        machine.bytesRead()  // (part of a packet: counts for nothing)
        #expect(machine.timeoutCheck(now: start + .seconds(15), connectTimeout: timeout, heldBack: false, closing: true)
            == .close(reason: "keep-alive expired (no packet for 15000 ms)", code: .keepAliveTimeout))
        machine.packetsRead(now: start + .seconds(14))
        #expect(machine.timeoutCheck(now: start + .seconds(28), connectTimeout: timeout, heldBack: false, closing: true) == .tidy)

        var noKeepAlive = ConnectionStateMachine(now: start)
        _ = noKeepAlive.packetReceived(.connect(connect))
        noKeepAlive.connectAccepted(keepAlive: 0, now: start)
        _ = noKeepAlive.sessionArrived()
        #expect(noKeepAlive.timeoutCheck(now: start + .hours(10), connectTimeout: timeout, heldBack: false, closing: true) == .tidy)
    }

    @Test("a hook that waits: reading pauses, packets already decoded are held in order, and go first when it answers")
    func hookPending() {
        // Before CONNACK: the connect hook waits.
        var opening = ConnectionStateMachine(now: start)
        _ = opening.packetReceived(.connect(connect))
        opening.hookStarted()
        #expect(opening.wantsToRead(heldBack: false) == false)
        #expect(opening.hookFinished() == [])
        #expect(opening.wantsToRead(heldBack: false) == true)

        // Connected: a publish hook waits while packets sent before CONNACK are replayed.
        var machine = connected()
        let packets: [MQTTPacket] = [.pingreq, .puback(packetID: 3), .publish(PublishPacket(topic: "t", payload: "y"))]
        machine.hookStarted()
        #expect(machine.wantsToRead(heldBack: false) == false)
        machine.hold(packets[1...])
        machine.hold(packets[0...0])  // held again in front (handled first)
        #expect(machine.hookFinished() == packets)
        #expect(machine.hookFinished() == [])
        #expect(machine.wantsToRead(heldBack: false) == true)
        #expect(machine.packetReceived(.pingreq) == .ping)
    }

    @Test("keep-alive does not close a client whose hook waits; connect_timeout still closes a socket whose connect hook waits")
    func hookPendingTimeouts() {
        var machine = connected()
        machine.hookStarted()
        let late = start + .seconds(60)
        #expect(machine.timeoutCheck(now: late, connectTimeout: .seconds(10), heldBack: false, closing: true) == .tidy)
        _ = machine.hookFinished()
        #expect(machine.timeoutCheck(now: late, connectTimeout: .seconds(10), heldBack: false, closing: true) != .tidy)

        var waiting = ConnectionStateMachine(now: start)
        _ = waiting.packetReceived(.connect(connect))
        waiting.hookStarted()
        #expect(waiting.timeoutCheck(now: late, connectTimeout: .seconds(10), heldBack: false, closing: true)
            == .close(reason: "no CONNACK within connect_timeout: the connect hooks were still answering", code: .maximumConnectTime))
    }
}
