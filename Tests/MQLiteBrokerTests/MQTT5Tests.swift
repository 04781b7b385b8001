@testable import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import NIOPosix
import Synchronization
import Testing

private func withV5Broker(
    workers: Int = 2, configure: (inout BrokerConfiguration) -> Void = { _ in }, _ body: (BrokerFixture) async throws -> Void
) async throws {
    try await withBroker(workers: workers, configure: configure, body)
}

/// Properties a request/response client puts on a message, all of the kinds forwarded.
private func sampleProperties() -> MQTTProperties {
    var properties = MQTTProperties()
    properties.payloadFormatIndicator = .utf8
    properties.contentType = "text/plain"
    properties.responseTopic = "reply/here"
    properties.correlationData = ByteBuffer(bytes: [1, 2, 3])
    properties.userProperties = [UserProperty(name: "a", value: "1"), UserProperty(name: "a", value: "2"), UserProperty(name: "b", value: "")]
    return properties
}

@Suite("MQTT 5.0")
struct MQTT5Tests {
    @Test("CONNACK says what the broker supports and what it decided: assigned client id, server keep-alive, maximum packet size, topic aliases (subscription identifiers available)")
    func connack() async throws {
        try await withV5Broker(configure: { $0.limits.maxKeepAlive = 100; $0.limits.maxPacketSize = 5000 }) { b in
            let (c, connack) = try await b.client5("", keepAlive: 300)
            #expect(connack.sessionPresent == false)
            let assigned = try #require(connack.properties.assignedClientIdentifier)
            #expect(assigned.hasPrefix("mqlite-"))
            #expect(connack.properties.serverKeepAlive == 100)
            #expect(connack.properties.maximumPacketSize == 5003)  // a remaining length of 5000 in 2 bytes
            #expect(connack.properties.subscriptionIdentifierAvailable == nil)  // absent: available
            #expect(connack.properties.topicAliasMaximum == 10)
            #expect(connack.properties.retainAvailable == nil)  // absent: available
            try await c.ping()

            let (d, plain) = try await b.client5("d", keepAlive: 60)
            #expect(plain.properties.assignedClientIdentifier == nil)
            #expect(plain.properties.serverKeepAlive == nil)
            try await d.ping()
        }
    }

    @Test("an authentication method without a script for it gets CONNACK 0x8C, bad authentication method")
    func authenticationMethod() async throws {
        try await withV5Broker { b in
            let c = try await TestClient.open(port: b.port, version: .v5)
            var properties = MQTTProperties()
            properties.authenticationMethod = "SCRAM-SHA-1"
            c.send(.connect(ConnectPacket(protocolLevel: 5, clientID: "a", properties: properties)))
            let packets = try await c.expectClosed()
            #expect(packets == [.connack(ConnackPacket(sessionPresent: false, reasonCode: .badAuthenticationMethod))])
        }
    }

    @Test("5.0 and 3.1.1 clients exchange messages both ways at QoS 0, 1 and 2; properties reach 5.0 subscribers unchanged and are dropped for 3.1.1 ones",
          arguments: QoS.allCases)
    func mixedVersions(qos: QoS) async throws {
        try await withV5Broker { b in
            let (sub5, _) = try await b.client5("sub5")
            try await sub5.subscribe("mix/#", qos: qos)
            let sub3 = try await b.client("sub3")
            try await sub3.subscribe("mix/#", qos: qos)
            let (pub5, _) = try await b.client5("pub5")
            let pub3 = try await b.client("pub3")
            let large = ByteBuffer(repeating: 0x61, count: 10_000)  // over the size sent as its own buffer
            for payload in [ByteBuffer(string: "small"), large] {
                pub5.send(.publish(PublishPacket(topic: ByteBuffer(string: "mix/5"), payload: payload, qos: qos, packetID: qos == .atMostOnce ? nil : 7, properties: sampleProperties())))
                try await completeFlow(pub5, qos: qos, id: 7)
                for sub in [sub5, sub3] {
                    let p = try await sub.expectPublish()
                    #expect(p.topicString == "mix/5")
                    #expect(p.payload == payload)
                    #expect(p.properties == (sub === sub5 ? sampleProperties() : MQTTProperties()))
                    try await acknowledge(p, on: sub)
                }
                try await pub3.publish("mix/3", payload, qos: qos, id: 9)
                for sub in [sub5, sub3] {
                    let p = try await sub.expectPublish()
                    #expect(p.topicString == "mix/3" && p.payload == payload && p.properties.isEmpty)
                    try await acknowledge(p, on: sub)
                }
            }
            try await sub5.expectNothing(for: .milliseconds(100))
            try await sub3.expectNothing(for: .milliseconds(100))
        }
    }

    @Test("PUBACK and PUBREC say 0x10 when nobody subscribes; QoS 2 then completes as usual")
    func noMatchingSubscribers() async throws {
        try await withV5Broker { b in
            let (c, _) = try await b.client5("c")
            c.send(.publish(PublishPacket(topic: ByteBuffer(string: "nobody"), payload: ByteBuffer(string: "x"), qos: .atLeastOnce, packetID: 1)))
            #expect(try await c.expectPacket() == .ackV5(AckPacket(.puback, packetID: 1, reasonCode: .noMatchingSubscribers)))
            c.send(.publish(PublishPacket(topic: ByteBuffer(string: "nobody"), payload: ByteBuffer(string: "x"), qos: .exactlyOnce, packetID: 2)))
            #expect(try await c.expectPacket() == .ackV5(AckPacket(.pubrec, packetID: 2, reasonCode: .noMatchingSubscribers)))
            c.send(.pubrel(packetID: 2))
            #expect(try await c.expectPacket() == .pubcomp(packetID: 2))
            try await c.subscribe("nobody", qos: .atLeastOnce)
            try await c.publish("nobody", "y", qos: .atLeastOnce, id: 3)  // plain PUBACK: a subscriber now
            #expect(String(buffer: try await c.expectPublish().payload) == "y")
        }
    }

    @Test("UNSUBACK has a reason code per filter: 0x00 for a subscription that existed, 0x11 for one that did not")
    func unsuback() async throws {
        try await withV5Broker { b in
            let (c, _) = try await b.client5("c")
            try await c.subscribe("u/#")
            c.send(.unsubscribe(UnsubscribePacket(packetID: 5, filters: ["u/#", "never/subscribed", "u/#"])))
            #expect(try await c.expectPacket() == .unsubackV5(UnsubackPacket(packetID: 5, reasonCodes: [.success, .noSubscriptionExisted, .noSubscriptionExisted])))
        }
    }

    @Test("DISCONNECT 0x04 publishes the will (with its properties); DISCONNECT 0x00 discards it")
    func disconnectWithWill() async throws {
        try await withV5Broker { b in
            let watcher = try await b.client("watcher")
            try await watcher.subscribe("will/#")
            var willProperties = MQTTProperties()
            willProperties.contentType = "text/plain"
            willProperties.willDelayInterval = 0  // a will property: not forwarded, even when 0
            let will = Will(topic: "will/a", payload: ByteBuffer(string: "gone"), qos: .atMostOnce, retain: false)
            let (a, _) = try await b.client5("a", will: will, willProperties: willProperties)
            a.send(.disconnectV5(DisconnectPacket(reasonCode: .disconnectWithWillMessage)))
            try await a.expectClosed()
            #expect(String(buffer: try await watcher.expectPublish().payload) == "gone")

            let (sub5, _) = try await b.client5("sub5")
            try await sub5.subscribe("will/#")
            let (c, _) = try await b.client5("c", will: Will(topic: "will/c", payload: ByteBuffer(string: "c gone"), qos: .atMostOnce, retain: false), willProperties: willProperties)
            c.send(.disconnectV5(DisconnectPacket(reasonCode: .unspecifiedError)))  // an error: the will goes
            try await c.expectClosed()
            let p = try await sub5.expectPublish()
            #expect(p.topicString == "will/c" && p.properties.contentType == "text/plain" && p.properties.willDelayInterval == nil)
            #expect(try await watcher.expectPublish().topicString == "will/c")

            let (quiet, _) = try await b.client5("quiet", will: Will(topic: "will/q", payload: ByteBuffer(string: "no"), qos: .atMostOnce, retain: false))
            quiet.send(.disconnectV5(DisconnectPacket(reasonCode: .normalDisconnection)))
            try await quiet.expectClosed()
            try await watcher.expectNothing()
        }
    }

    @Test("protocol errors after CONNACK get DISCONNECT with the reason code, then the close: topic alias 0 or past the maximum 0x94, an alias never given a topic 0x82, subscription identifier in PUBLISH 0x82, second CONNECT 0x82, malformed 0x81")
    func disconnectReasons() async throws {
        try await withV5Broker { b in
            func alias(_ n: UInt16) -> MQTTProperties {
                var alias = MQTTProperties()
                alias.topicAlias = n
                return alias
            }
            var subscriptionID = MQTTProperties()
            subscriptionID.subscriptionIdentifiers = [3]
            let cases: [(MQTTPacket?, [UInt8]?, ReasonCode)] = [
                (.publish(PublishPacket(topic: ByteBuffer(string: "t"), payload: ByteBuffer(), qos: .atMostOnce, properties: alias(11))), nil, .topicAliasInvalid),
                (.publish(PublishPacket(topic: ByteBuffer(string: "t"), payload: ByteBuffer(), qos: .atMostOnce, properties: alias(0))), nil, .topicAliasInvalid),
                (.publish(PublishPacket(topic: ByteBuffer(), payload: ByteBuffer(), qos: .atLeastOnce, packetID: 1, properties: alias(3))), nil, .protocolError),
                (.publish(PublishPacket(topic: ByteBuffer(string: "t"), payload: ByteBuffer(), qos: .atMostOnce, properties: subscriptionID)), nil, .protocolError),
                (.connect(ConnectPacket(protocolLevel: 5, clientID: "again")), nil, .protocolError),
                (nil, [0x36, 0x03, 0x00, 0x01, 0x74], .malformedPacket),  // PUBLISH with QoS 3
            ]
            for (i, (packet, raw, code)) in cases.enumerated() {
                let (c, _) = try await b.client5("c\(i)")
                if let packet { c.send(packet) } else if let raw { c.sendRaw(raw) }
                let before = try await c.expectClosed()
                #expect(before == [.disconnectV5(DisconnectPacket(reasonCode: code))], "case \(i)")
            }
        }
    }

    @Test("an MQTT 5 CONNECT that cannot be decoded gets CONNACK with the reason code, then the close: a property twice 0x82, a client id that is not UTF-8 0x81, over max_packet_size 0x95; a 3.1.1 one gets none")
    func malformedConnect() async throws {
        try await withV5Broker(configure: { $0.limits.maxPacketSize = 1000 }) { b in
            // CONNECT "MQTT" 5, flags clean start, keep-alive 60, properties, client id "c".
            func connect(properties: [UInt8], clientID: [UInt8] = [0x00, 0x01, 0x63], level: UInt8 = 5, declared: Int? = nil) -> [UInt8] {
                let body = [0x00, 0x04, 0x4D, 0x51, 0x54, 0x54, level, 0x02, 0x00, 0x3C]
                    + (level == 5 ? [UInt8(properties.count)] + properties : []) + clientID
                var length = declared ?? body.count
                var header: [UInt8] = [0x10]
                repeat {
                    header.append(UInt8(length & 0x7F) | (length > 0x7F ? 0x80 : 0))
                    length >>= 7
                } while length > 0
                return header + body
            }
            let cases: [([UInt8], ReasonCode)] = [
                (connect(properties: [0x11, 0, 0, 0, 10, 0x11, 0, 0, 0, 20]), .protocolError),  // Session Expiry Interval twice
                (connect(properties: [], clientID: [0x00, 0x02, 0xC3, 0x28]), .malformedPacket),
                (connect(properties: [], declared: 5000), .packetTooLarge),
            ]
            for (i, (bytes, code)) in cases.enumerated() {
                let c = try await TestClient.open(port: b.port, version: .v5)
                c.sendRaw(bytes)
                #expect(try await c.expectClosed() == [.connack(ConnackPacket(sessionPresent: false, reasonCode: code))], "case \(i)")
            }
            let old = try await TestClient.open(port: b.port)
            old.sendRaw(connect(properties: [], clientID: [0x00, 0x02, 0xC3, 0x28], level: 4))
            #expect(try await old.expectClosed() == [], "3.1.1 has no code for it: closed without CONNACK")
        }
    }

    @Test("a connection taken over by the same client id hears DISCONNECT 0x8E, session taken over (Clean Start or not); a stopping broker says 0x8B, server shutting down",
          arguments: [true, false])
    func takenOver(cleanStart: Bool) async throws {
        var keep = MQTTProperties()
        keep.sessionExpiryInterval = 60
        try await withV5Broker { b in
            let (old, _) = try await b.client5("same", properties: keep)
            let (new, _) = try await b.client5("same", cleanStart: cleanStart, properties: keep)
            let before = try await old.expectClosed()
            #expect(before == [.disconnectV5(DisconnectPacket(reasonCode: .sessionTakenOver))])
            try await new.ping()
            await b.broker.shutdown()
            #expect(try await new.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .serverShuttingDown))])
        }
    }

    @Test("a silent client past 1.5 x its keep-alive hears DISCONNECT 0x8D, keep-alive timeout")
    func keepAliveTimeout() async throws {
        try await withV5Broker { b in
            let (c, _) = try await b.client5("quiet", keepAlive: 1)
            #expect(try await c.expectClosed(timeout: .seconds(5)) == [.disconnectV5(DisconnectPacket(reasonCode: .keepAliveTimeout))])
        }
    }

    @Test("a client that asks for no keep-alive is given max_keep_alive (Server Keep Alive)")
    func serverKeepAlive() async throws {
        try await withV5Broker(configure: { $0.limits.maxKeepAlive = 30 }) { b in
            let (c, connack) = try await b.client5("c", keepAlive: 0)
            #expect(connack.properties.serverKeepAlive == 30)
            try await c.ping()
        }
    }

    @Test("the broker's Receive Maximum is max_inflight (CONNACK): one QoS 2 PUBLISH more than that awaiting PUBREL gets DISCONNECT 0x93; a re-sent one does not count, a released one no longer")
    func serverReceiveMaximum() async throws {
        try await withV5Broker(configure: { $0.limits.maxInflight = 3 }) { b in
            let (c, connack) = try await b.client5("q2")
            #expect(connack.properties.receiveMaximum == 3)
            func publish(_ id: UInt16, dup: Bool = false) async throws {
                c.send(.publish(PublishPacket(topic: "rmx", payload: "x", qos: .exactlyOnce, dup: dup, packetID: id)))
                #expect(try await c.expectPacket() == .ackV5(AckPacket(.pubrec, packetID: id, reasonCode: .noMatchingSubscribers)))
            }
            for id: UInt16 in 1...3 { try await publish(id) }
            try await publish(2, dup: true)  // its id still waits: not one more
            c.send(.pubrel(packetID: 1))
            #expect(try await c.expectPacket() == .pubcomp(packetID: 1))
            try await publish(4)  // three wait again
            c.send(.publish(PublishPacket(topic: "rmx", payload: "x", qos: .exactlyOnce, packetID: 5)))
            #expect(try await c.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .receiveMaximumExceeded))])
        }
        try await withV5Broker(configure: { $0.limits.maxInflight = 65535 }) { b in
            let (_, connack) = try await b.client5("q2")
            #expect(connack.properties.receiveMaximum == nil)  // 65535, the default
        }
    }

    @Test("the Receive Maximum's quota starts again with each connection (§4.9): QoS 2 ids an earlier connection left awaiting PUBREL do not count against the new one's, and their PUBRELs are still answered")
    func serverReceiveMaximumPerConnection() async throws {
        try await withV5Broker(configure: { $0.limits.maxInflight = 3 }) { b in
            var keep = MQTTProperties()
            keep.sessionExpiryInterval = 60
            func publish(_ c: TestClient, _ id: UInt16) async throws {
                c.send(.publish(PublishPacket(topic: "rmc", payload: "x", qos: .exactlyOnce, packetID: id)))
                #expect(try await c.expectPacket() == .ackV5(AckPacket(.pubrec, packetID: id, reasonCode: .noMatchingSubscribers)))
            }
            let (first, _) = try await b.client5("q2c", cleanStart: true, properties: keep)
            for id: UInt16 in 1...3 { try await publish(first, id) }
            await first.abort()  // three ids wait for PUBREL in the session
            let (again, connack) = try await b.client5("q2c", cleanStart: false, properties: keep)
            #expect(connack.sessionPresent)
            // A full quota of new ones before the PUBRELs of the old: within it.
            for id: UInt16 in 10...12 { try await publish(again, id) }
            for id: UInt16 in [1, 2, 3, 10] {
                again.send(.pubrel(packetID: id))
                #expect(try await again.expectPacket() == .pubcomp(packetID: id))
            }
            try await publish(again, 13)  // 11, 12, 13 wait: the quota is full again
            again.send(.publish(PublishPacket(topic: "rmc", payload: "x", qos: .exactlyOnce, packetID: 14)))
            #expect(try await again.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .receiveMaximumExceeded))])
        }
    }

    @Test("a PUBREC with a failure code ends that QoS 2 message: no PUBREL, and the window moves on")
    func pubrecRefused() async throws {
        try await withV5Broker(configure: { $0.limits.maxInflight = 1 }) { b in
            let (sub, _) = try await b.client5("sub")
            try await sub.subscribe("q2", qos: .exactlyOnce)
            let pub = try await b.client("pub")
            try await pub.publish("q2", "one", qos: .exactlyOnce, id: 1)
            try await pub.publish("q2", "two", qos: .exactlyOnce, id: 2)
            let first = try await sub.expectPublish()
            #expect(String(buffer: first.payload) == "one")
            try await sub.expectNothing(for: .milliseconds(100))  // a window of one
            sub.send(.ackV5(AckPacket(.pubrec, packetID: first.packetID!, reasonCode: .unspecifiedError)))
            let second = try await sub.expectPublish()  // no PUBREL before it
            #expect(String(buffer: second.payload) == "two")
        }
    }
}

@Suite("MQTT 5.0 subscriptions")
struct MQTT5SubscriptionTests {
    private static func subscribe(_ c: TestClient, _ subscriptions: [Subscription], id: UInt16 = 1, properties: MQTTProperties = MQTTProperties()) async throws -> [SubackReturnCode] {
        c.send(.subscribe(SubscribePacket(packetID: id, subscriptions: subscriptions, properties: properties)))
        guard case .suback(let suback) = try await c.expectPacket() else { throw TestFailure("expected SUBACK") }
        return suback.value.returnCodes
    }

    @Test("No Local: a client does not get its own messages on that subscription (others still do, and its other subscriptions still match)")
    func noLocal() async throws {
        try await withV5Broker { b in
            let (c, _) = try await b.client5("c")
            #expect(try await Self.subscribe(c, [Subscription(filter: "nl/a", qos: .atLeastOnce, noLocal: true)]) == [.granted(.atLeastOnce)])
            let (other, _) = try await b.client5("other")
            try await other.subscribe("nl/#")
            try await c.publish("nl/a", "mine", qos: .atLeastOnce)
            #expect(String(buffer: try await other.expectPublish().payload) == "mine")
            try await c.expectNothing(for: .milliseconds(150))
            try await other.publish("nl/a", "theirs")
            #expect(String(buffer: try await c.expectPublish().payload) == "theirs")
            _ = try await Self.subscribe(c, [Subscription(filter: "nl/+", qos: .atMostOnce)], id: 2)  // without No Local
            try await c.publish("nl/a", "mine again")
            #expect(String(buffer: try await c.expectPublish().payload) == "mine again")
        }
    }

    @Test("No Local beside an overlapping subscription without it: the client's own message comes through the other one alone, with its QoS, its RETAIN rule and its Subscription Identifier (MQTT-3.8.3-3, 3.3.4-3); others' messages through both")
    func noLocalOverlapping() async throws {
        try await withV5Broker { b in
            let (c, _) = try await b.client5("c")
            var seven = MQTTProperties(), eight = MQTTProperties()
            seven.subscriptionIdentifiers = [7]
            eight.subscriptionIdentifiers = [8]
            let noLocal = Subscription(filter: "R/+", qos: .exactlyOnce, noLocal: true, retainAsPublished: true)
            #expect(try await Self.subscribe(c, [noLocal], id: 1, properties: seven) == [.granted(.exactlyOnce)])
            #expect(try await Self.subscribe(c, [Subscription(filter: "R/#", qos: .atMostOnce)], id: 2, properties: eight) == [.granted(.atMostOnce)])
            c.send(.publish(PublishPacket(topic: "R/a", payload: "own", qos: .atLeastOnce, retain: true, packetID: 3)))
            #expect(try await c.expectPacket() == .puback(packetID: 3))
            let own = try await c.expectPublish()
            #expect(String(buffer: own.payload) == "own")
            #expect(own.qos == .atMostOnce, "through R/# (QoS 0) only, not R/+ (QoS 2, No Local)")
            #expect(!own.retain, "R/# has no Retain As Published")
            #expect(own.properties.subscriptionIdentifiers == [8])
            let (other, _) = try await b.client5("other")
            try await other.publish("R/a", "theirs", qos: .atLeastOnce, retain: true)
            let theirs = try await c.expectPublish()
            #expect(String(buffer: theirs.payload) == "theirs" && theirs.qos == .atLeastOnce && theirs.retain)
            #expect(theirs.properties.subscriptionIdentifiers == [7, 8])
            // The answers are cached per topic, apart for its own messages and others'.
            c.send(.publish(PublishPacket(topic: "R/a", payload: "own again", qos: .atLeastOnce, packetID: 4)))
            #expect(try await c.expectPacket() == .puback(packetID: 4))
            #expect(try await c.expectPublish().properties.subscriptionIdentifiers == [8])
            try await other.publish("R/a", "theirs again", qos: .atLeastOnce)
            #expect(try await c.expectPublish().properties.subscriptionIdentifiers == [7, 8])
        }
    }

    @Test("Retain As Published keeps a live message's RETAIN flag; without it RETAIN is 0; retained messages sent on SUBSCRIBE have it either way")
    func retainAsPublished() async throws {
        try await withV5Broker { b in
            let (rap, _) = try await b.client5("rap")
            _ = try await Self.subscribe(rap, [Subscription(filter: "r/#", qos: .atMostOnce, retainAsPublished: true)])
            let (plain, _) = try await b.client5("plain")
            _ = try await Self.subscribe(plain, [Subscription(filter: "r/#", qos: .atMostOnce)])
            let pub = try await b.client("pub")
            try await pub.publish("r/1", "kept", retain: true)
            #expect(try await rap.expectPublish().retain == true)
            #expect(try await plain.expectPublish().retain == false)
            try await pub.publish("r/2", "live")
            #expect(try await rap.expectPublish().retain == false)
            #expect(try await plain.expectPublish().retain == false)
            let (late, _) = try await b.client5("late")
            _ = try await Self.subscribe(late, [Subscription(filter: "r/#", qos: .atMostOnce)])
            let sent = try await late.expectPublish()
            #expect(sent.topicString == "r/1" && sent.retain)
        }
    }

    @Test("Retain Handling: 0 sends retained messages on every SUBSCRIBE, 1 only for a new subscription, 2 never")
    func retainHandling() async throws {
        try await withV5Broker { b in
            let pub = try await b.client("pub")
            try await pub.publish("rh/x", "retained", retain: true)
            let (c, _) = try await b.client5("c")
            for (handling, filter, again) in [(RetainHandling.sendOnSubscribe, "rh/#", true), (.sendOnNewSubscription, "rh/+", false), (.doNotSend, "rh/x", false)] {
                let subscription = Subscription(filter: filter, qos: .atMostOnce, retainHandling: handling)
                _ = try await Self.subscribe(c, [subscription])
                if handling != .doNotSend { #expect(try await c.expectPublish().topicString == "rh/x", "\(handling) first") }
                try await c.expectNothing(for: .milliseconds(100))
                _ = try await Self.subscribe(c, [subscription], id: 2)
                if again { #expect(try await c.expectPublish().topicString == "rh/x", "\(handling) again") }
                try await c.expectNothing(for: .milliseconds(100))
                c.send(.unsubscribe(UnsubscribePacket(packetID: 3, filters: [filter])))
                _ = try await c.expectPacket()
            }
        }
    }

    @Test("SUBACK gives MQTT 5 reason codes for refusals: 0x8F for an invalid shared subscription, 0x97 past max_subscriptions")
    func subackCodes() async throws {
        try await withV5Broker(configure: { $0.limits.maxSubscriptions = 2 }) { b in
            let (c, _) = try await b.client5("c")
            let codes = try await Self.subscribe(c, [
                Subscription(filter: "a", qos: .atLeastOnce), Subscription(filter: "$share/+/x", qos: .atMostOnce),
                Subscription(filter: "b", qos: .exactlyOnce), Subscription(filter: "c", qos: .atMostOnce),
            ])
            #expect(codes == [.granted(.atLeastOnce), .refused(.topicFilterInvalid), .granted(.exactlyOnce), .refused(.quotaExceeded)])
        }
    }
}

@Suite("MQTT 5.0 flow control")
struct MQTT5FlowTests {
    @Test("Receive Maximum: no more QoS 1/2 messages unacknowledged than the client asked for (below max_inflight); the rest wait in order")
    func receiveMaximum() async throws {
        try await withV5Broker { b in
            var properties = MQTTProperties()
            properties.receiveMaximum = 2
            let (sub, _) = try await b.client5("sub", properties: properties)
            try await sub.subscribe("rm", qos: .exactlyOnce)
            let pub = try await b.client("pub")
            for i in 1...4 { try await pub.publish("rm", "\(i)", qos: i % 2 == 0 ? .atLeastOnce : .exactlyOnce, id: UInt16(i)) }
            let first = try await sub.expectPublish()
            let second = try await sub.expectPublish()
            try await sub.expectNothing(for: .milliseconds(150))
            sub.send(.pubrec(packetID: first.packetID!))  // QoS 2: still in flight until PUBCOMP
            #expect(try await sub.expectPacket() == .pubrel(packetID: first.packetID!))
            try await sub.expectNothing(for: .milliseconds(100))
            sub.send(.pubcomp(packetID: first.packetID!))
            #expect(String(buffer: try await sub.expectPublish().payload) == "3")
            sub.send(.puback(packetID: second.packetID!))
            #expect(String(buffer: try await sub.expectPublish().payload) == "4")
        }
    }

    @Test("Maximum Packet Size: a message too large for the client is not sent to it (at any QoS) but counted, smaller ones still are, and other clients get it")
    func maximumPacketSize() async throws {
        try await withV5Broker { b in
            var properties = MQTTProperties()
            properties.maximumPacketSize = 100
            let (small, _) = try await b.client5("small", properties: properties)
            try await small.subscribe("mps", qos: .atLeastOnce)
            let big = try await b.client("big")
            try await big.subscribe("mps", qos: .atLeastOnce)
            let pub = try await b.client("pub")
            // A QoS 1 PUBLISH of topic "mps" is 2 + 3 + 2 + 1 (properties) + payload, plus 2 of header.
            for (i, size) in [90, 91, 200, 10].enumerated() {
                try await pub.publish("mps", ByteBuffer(repeating: 0x41, count: size), qos: QoS(rawValue: UInt8(i % 2))!, id: UInt16(i + 1))
            }
            var got: [Int] = []
            while let event = await small.nextEvent(timeout: .milliseconds(300)) {
                guard case .packet(.publish(let p)) = event else { break }
                got.append(p.payload.readableBytes)
                if let id = p.packetID { small.send(.puback(packetID: id)) }
            }
            #expect(got == [90, 10])
            for size in [90, 91, 200, 10] {
                let p = try await big.expectPublish()
                #expect(p.payload.readableBytes == size)
                if let id = p.packetID { big.send(.puback(packetID: id)) }
            }
            // Counted: mqlite_messages_dropped_total{reason="too_large"}.
            let stats = try await b.broker.collectStats(on: b.broker.group.next()).get()
            #expect(stats.droppedTooLarge == 2)
            b.broker.metrics.update(stats, listeners: b.broker.configuration.listeners)
            #expect(b.broker.metrics.render().contains("mqlite_messages_dropped_total{reason=\"too_large\"} 2"))
        }
    }
}

@Suite("MQTT 5.0 will delay")
struct MQTT5WillDelayTests {
    private static func connect(_ b: BrokerFixture, delay: UInt32, expiry: UInt32, cleanStart: Bool = true) async throws -> TestClient {
        var properties = MQTTProperties()
        properties.sessionExpiryInterval = expiry
        var willProperties = MQTTProperties()
        willProperties.willDelayInterval = delay
        willProperties.userProperties = [UserProperty(name: "k", value: "v")]
        let will = Will(topic: "wd/will", payload: ByteBuffer(string: "late"), qos: .atLeastOnce, retain: false)
        return try await b.client5("w", cleanStart: cleanStart, will: will, willProperties: willProperties, properties: properties).0
    }

    @Test("a stopping broker sends the wills still waiting out their delay, of clients connected and gone, then its DISCONNECT, and nothing after it (MQTT-3.14.4-1)")
    func willsAndDisconnectOnShutdown() async throws {
        try await withV5Broker { b in
            let (watcher, _) = try await b.client5("watcher")
            try await watcher.subscribe("wd/#", qos: .atLeastOnce)
            let gone = try await Self.connect(b, delay: 60, expiry: 100)
            await gone.abort()
            try await watcher.expectNothing(for: .milliseconds(200))
            // A subscriber in the middle of thousands of retained messages (sent as it reads).
            for i in 0..<2000 {
                try b.broker.publish(topic: "bulk/\(i)", payload: ByteBuffer(repeating: 0x61, count: 256), qos: .atMostOnce, retain: true, worker: i)
            }
            try await eventually("retained", timeout: .seconds(30)) { b.broker.retainedCount >= 2000 }
            let (reader, _) = try await b.client5("reader")
            reader.send(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "bulk/#", qos: .atMostOnce)])))
            _ = try await reader.expectPacket()
            await b.broker.shutdown()
            let packets = try await watcher.expectClosed()
            #expect(packets.contains { if case .publish(let p) = $0 { return p.topicString == "wd/will" } else { return false } }, "\(packets)")
            let got = try await reader.expectClosed(timeout: .seconds(10))
            let goodbye = got.firstIndex(of: .disconnectV5(DisconnectPacket(reasonCode: .serverShuttingDown)))
            #expect(goodbye != nil && goodbye == got.count - 1, "\(got.count) packets, the DISCONNECT at \(String(describing: goodbye))")
        }
    }

    @Test("Will Delay Interval: the will goes after the delay (without the delay property); a reconnect within the delay cancels it; a session that ends first sends it then")
    func willDelay() async throws {
        try await withV5Broker { b in
            let (watcher, _) = try await b.client5("watcher")
            try await watcher.subscribe("wd/#", qos: .atLeastOnce)
            // Delayed by 1 s, then published.
            // (Times are measured, not waited out: on a loaded machine a test task may start a
            // fixed wait late.)
            let clock = ContinuousClock()
            let w = try await Self.connect(b, delay: 1, expiry: 100)
            var gone = clock.now
            await w.abort()
            let p = try await watcher.expectPublish(timeout: .seconds(5))
            #expect(clock.now - gone >= .milliseconds(900))
            #expect(String(buffer: p.payload) == "late")
            #expect(p.properties.willDelayInterval == nil && p.properties.userProperties == [UserProperty(name: "k", value: "v")])
            watcher.send(.puback(packetID: p.packetID!))

            // Back within the delay (3 s: room for a slow connect on a loaded machine): no will.
            let again = try await Self.connect(b, delay: 3, expiry: 100, cleanStart: false)
            await again.abort()
            let back = try await Self.connect(b, delay: 1, expiry: 100, cleanStart: false)
            try await watcher.expectNothing(for: .milliseconds(3500))

            // The session ends before the delay (expiry 0): the will goes at once.
            await back.abort()  // (its own will, delayed 1 s, with the session kept)
            _ = try await watcher.expectPublish(timeout: .seconds(3))
            let short = try await Self.connect(b, delay: 100, expiry: 0)
            await short.abort()
            #expect(String(buffer: try await watcher.expectPublish(timeout: .seconds(1)).payload) == "late")
            // The session expires (1 s) before the delay (100 s): the will goes as it does.
            let expiring = try await Self.connect(b, delay: 100, expiry: 1)
            gone = clock.now
            await expiring.abort()
            #expect(String(buffer: try await watcher.expectPublish(timeout: .seconds(5)).payload) == "late")
            #expect(clock.now - gone >= .milliseconds(900))
        }
    }

    @Test("a connection taken over by Clean Start 0 publishes its will as it closes when it has no Will Delay Interval (MQTT-3.1.2-8); with one, the new connection's return cancels it")
    func takeoverWill() async throws {
        try await withV5Broker { b in
            let (watcher, _) = try await b.client5("watcher")
            try await watcher.subscribe("wd/#", qos: .atLeastOnce)
            let first = try await Self.connect(b, delay: 0, expiry: 100)
            let second = try await Self.connect(b, delay: 5, expiry: 100, cleanStart: false)
            #expect(try await first.expectClosed().contains(.disconnectV5(DisconnectPacket(reasonCode: .sessionTakenOver))))
            let p = try await watcher.expectPublish(timeout: .seconds(5))
            #expect(String(buffer: p.payload) == "late")
            watcher.send(.puback(packetID: p.packetID!))
            // Its will waits 5 s, and the client is back at once: none.
            _ = try await Self.connect(b, delay: 5, expiry: 100, cleanStart: false)
            _ = try await second.expectClosed()
            try await watcher.expectNothing(for: .milliseconds(500))
        }
    }

    /// Lets "w" publish on `wd/#` until `narrowed` is set, as a reload of its rules might.
    final class NarrowingHooks: BrokerHooks {
        let narrowed = Atomic<Bool>(false)
        func authorize(_ client: ClientInfo, worker: Int) -> HookAnswer<[ACLTable]> {
            guard client.clientID == "w" else { return .now([]) }
            return .now([ACLTable(publish: narrowed.load(ordering: .relaxed) ? ["other/#"] : ["wd/#"], subscribe: ["#"])])
        }
    }

    @Test("a delayed will is checked against the client's rules as they are when it goes: rules narrowed while it waited (a reload) hold it back, as Mosquitto does")
    func delayedWillRechecked() async throws {
        let hooks = NarrowingHooks()
        try await withBroker(hooks: hooks) { b in
            let (watcher, _) = try await b.client5("watcher")
            try await watcher.subscribe("wd/#", qos: .atLeastOnce)
            let w = try await Self.connect(b, delay: 1, expiry: 100)
            await w.abort()
            let p = try await watcher.expectPublish(timeout: .seconds(5))
            #expect(String(buffer: p.payload) == "late")
            watcher.send(.puback(packetID: p.packetID!))
            let again = try await Self.connect(b, delay: 1, expiry: 100, cleanStart: false)
            await again.abort()
            hooks.narrowed.store(true, ordering: .relaxed)
            try await watcher.expectNothing(for: .milliseconds(2500))
        }
    }
}

@Suite("MQTT 5.0 message expiry")
struct MQTT5ExpiryTests {
    /// A Session Expiry Interval of 100 s: the session outlives its connection.
    private static let kept = { var p = MQTTProperties(); p.sessionExpiryInterval = 100; return p }()

    /// A PUBLISH of `topic`, with the topic as payload, whose Message Expiry Interval is `seconds`.
    private static func expiring(_ topic: String, _ seconds: UInt32, qos: QoS = .atLeastOnce, retain: Bool = false) -> MQTTPacket {
        var properties = MQTTProperties()
        properties.messageExpiryInterval = seconds
        return .publish(PublishPacket(
            topic: ByteBuffer(string: topic), payload: ByteBuffer(string: topic), qos: qos, retain: retain,
            packetID: qos == .atMostOnce ? nil : 1, properties: properties))
    }

    /// A 5.0 client whose session outlives it, subscribed to `filter` at QoS 1, then gone.
    private static func offlineSubscriber(_ b: BrokerFixture, _ id: String, _ filter: String) async throws {
        let (c, _) = try await b.client5(id, properties: kept)
        try await c.subscribe(filter, qos: .atLeastOnce)
        await c.disconnect()
    }

    @Test("Message Expiry Interval: an expired message is not delivered (queued offline, or retained), to 5.0 and 3.1.1 subscribers; one that is carries what remains of its interval")
    func messageExpiry() async throws {
        try await withV5Broker { b in
            try await Self.offlineSubscriber(b, "sub5", "me/#")
            let sub3 = try await b.client("sub3", clean: false)
            try await sub3.subscribe("me/#", qos: .atLeastOnce)
            await sub3.disconnect()

            let (pub, _) = try await b.client5("pub")
            for (topic, seconds, retain) in [("me/short", UInt32(1), false), ("me/long", 100, false), ("me/retained", 1, true)] {
                pub.send(Self.expiring(topic, seconds, retain: retain))
                _ = try await pub.expectPacket()
            }
            try await Task.sleep(for: .milliseconds(1300))
            let (back5, _) = try await b.client5("sub5", cleanStart: false, properties: Self.kept)
            let p = try await back5.expectPublish()
            #expect(p.topicString == "me/long")
            let remaining = try #require(p.properties.messageExpiryInterval)
            #expect(remaining <= 99 && remaining >= 90)
            back5.send(.puback(packetID: p.packetID!))
            try await back5.expectNothing(for: .milliseconds(150))
            let back3 = try await b.client("sub3", clean: false)
            let q = try await back3.expectPublish()
            #expect(q.topicString == "me/long" && q.properties.isEmpty)
            back3.send(.puback(packetID: q.packetID!))
            try await back3.expectNothing(for: .milliseconds(150))
            let late = try await b.client("late")
            try await late.subscribe("me/#")
            try await late.expectNothing(for: .milliseconds(150))  // the retained one expired
        }
    }

    @Test("Message Expiry Interval 0: delivered, as 0, to the subscribers online when it is published (QoS 0 and 1, 5.0 and 3.1.1); not queued for an offline one; retained, it is gone for later subscribers")
    func messageExpiryZero() async throws {
        try await withV5Broker { b in
            try await Self.offlineSubscriber(b, "away", "zero/#")
            let (sub5, _) = try await b.client5("sub5")
            try await sub5.subscribe("zero/#", qos: .atLeastOnce)
            let sub3 = try await b.client("sub3")
            try await sub3.subscribe("zero/#", qos: .atLeastOnce)
            let (pub, _) = try await b.client5("pub")
            for (topic, qos, retain) in [("zero/q0", QoS.atMostOnce, false), ("zero/q1", .atLeastOnce, false), ("zero/kept", .atLeastOnce, true)] {
                pub.send(Self.expiring(topic, 0, qos: qos, retain: retain))
                if qos != .atMostOnce { #expect(try await pub.expectPacket() == .puback(packetID: 1)) }
            }
            for topic in ["zero/q0", "zero/q1", "zero/kept"] {
                let p = try await sub5.expectPublish()
                #expect(p.topicString == topic && p.properties.messageExpiryInterval == 0)
                if let id = p.packetID { sub5.send(.puback(packetID: id)) }
                let q = try await sub3.expectPublish()
                #expect(q.topicString == topic && q.properties.isEmpty)
                if let id = q.packetID { sub3.send(.puback(packetID: id)) }
            }
            let (back, connack) = try await b.client5("away", cleanStart: false, properties: Self.kept)
            #expect(connack.sessionPresent)
            try await back.expectNothing(for: .milliseconds(150))  // its lifetime passed before it could start
            let late = try await b.client("late")
            try await late.subscribe("zero/#")
            try await late.expectNothing(for: .milliseconds(150))
        }
    }

    /// Answers every publish hook after 1.5 s (as one waiting on an HTTP service would).
    final class SlowPublishHooks: BrokerHooks {
        func isPublishHooked(topic: TopicName, worker: Int) -> Bool { true }
        func interceptPublish(_ message: HookedMessage, from client: ClientInfo, worker: Int) -> HookAnswer<PublishDecision> {
            .later(MultiThreadedEventLoopGroup.singleton.next().scheduleTask(in: .milliseconds(1500)) { PublishDecision.deliver }.futureResult)
        }
    }

    @Test("Message Expiry Interval: a message that expires while a publish hook holds it is not delivered; one that does not carries what remains")
    func expiresWhileHooked() async throws {
        try await withBroker(hooks: SlowPublishHooks()) { b in
            let (sub, _) = try await b.client5("sub")
            try await sub.subscribe("slow/#", qos: .atLeastOnce)
            let (pub, _) = try await b.client5("pub")
            for (topic, seconds) in [("slow/short", UInt32(1)), ("slow/long", 100)] { pub.send(Self.expiring(topic, seconds, qos: .atMostOnce)) }
            let p = try await sub.expectPublish()
            #expect(p.topicString == "slow/long")
            #expect((p.properties.messageExpiryInterval ?? 0) <= 99)
            try await sub.expectNothing(for: .milliseconds(300))
        }
    }

    @Test("A resumed session's messages in flight: one expired meanwhile is not sent again, one that is tells what remains of its interval (MQTT-3.3.2-6), one over the new connection's Maximum Packet Size is discarded as sent (MQTT-3.1.2-25); all three are done")
    func resumedInflight() async throws {
        try await withV5Broker { b in
            var keep = MQTTProperties()
            keep.sessionExpiryInterval = 100
            let (sub, _) = try await b.client5("sub", properties: keep)
            try await sub.subscribe("inf/#", qos: .atLeastOnce)
            let (pub, _) = try await b.client5("pub")
            for (topic, seconds, size) in [("inf/short", UInt32(1), 10), ("inf/long", 100, 10), ("inf/big", 0, 300)] {
                var properties = MQTTProperties()
                if seconds > 0 { properties.messageExpiryInterval = seconds }
                pub.send(.publish(PublishPacket(topic: ByteBuffer(string: topic), payload: ByteBuffer(repeating: 0x41, count: size), qos: .atLeastOnce, packetID: 1, properties: properties)))
                _ = try await pub.expectPacket()
            }
            for _ in 0..<3 { _ = try await sub.expectPublish() }  // not acknowledged
            await sub.abort()
            try await Task.sleep(for: .milliseconds(1300))
            var small = keep
            small.maximumPacketSize = 100
            let (back, connack) = try await b.client5("sub", cleanStart: false, properties: small)
            #expect(connack.sessionPresent)
            let p = try await back.expectPublish()
            #expect(p.dup && p.topicString == "inf/long")
            let remaining = try #require(p.properties.messageExpiryInterval)
            #expect(remaining <= 99 && remaining >= 90)
            try await back.expectNothing(for: .milliseconds(150))
            await back.abort()
            // Done, not waiting: the next connection (no limit now) gets "inf/long" alone again.
            let (again, _) = try await b.client5("sub", cleanStart: false, properties: keep)
            let q = try await again.expectPublish()
            #expect(q.dup && q.topicString == "inf/long")
            again.send(.puback(packetID: q.packetID!))
            try await again.expectNothing(for: .milliseconds(150))
        }
    }
}

@Suite("MQTT 5.0 sessions")
struct MQTT5SessionTests {
    private static func expiry(_ seconds: UInt32) -> MQTTProperties {
        var properties = MQTTProperties()
        properties.sessionExpiryInterval = seconds
        return properties
    }

    @Test("Session Expiry Interval 0 ends the session with the connection; over 0 keeps it (queueing QoS 1) for Clean Start 0; Clean Start 1 starts afresh but keeps the new one")
    func expiryAndCleanStart() async throws {
        try await withV5Broker { b in
            let pub = try await b.client("pub")
            // No expiry: nothing is kept, even without Clean Start.
            let (a, _) = try await b.client5("a", cleanStart: false)
            try await a.subscribe("s/a", qos: .atLeastOnce)
            await a.disconnect()
            let (a2, again) = try await b.client5("a", cleanStart: false)
            #expect(again.sessionPresent == false)
            await a2.disconnect()

            // An expiry: the session and what it was sent while offline wait for it.
            let (k, _) = try await b.client5("k", cleanStart: true, properties: Self.expiry(100))
            try await k.subscribe("s/k", qos: .atLeastOnce)
            await k.disconnect()
            try await pub.publish("s/k", "while away", qos: .atLeastOnce)
            let (k2, resumed) = try await b.client5("k", cleanStart: false, properties: Self.expiry(100))
            #expect(resumed.sessionPresent)
            #expect(String(buffer: try await k2.expectPublish().payload) == "while away")
            await k2.disconnect()

            // Clean Start 1: the old session goes, the new one (with an expiry) stays.
            let (k3, fresh) = try await b.client5("k", cleanStart: true, properties: Self.expiry(100))
            #expect(fresh.sessionPresent == false)
            try await k3.subscribe("s/k3", qos: .atLeastOnce)
            await k3.disconnect()
            try await pub.publish("s/k", "old filter", qos: .atLeastOnce)
            try await pub.publish("s/k3", "new filter", qos: .atLeastOnce)
            let (k4, kept) = try await b.client5("k", cleanStart: false, properties: Self.expiry(100))
            #expect(kept.sessionPresent)
            #expect(String(buffer: try await k4.expectPublish().payload) == "new filter")
            try await k4.expectNothing(for: .milliseconds(100))
        }
    }

    @Test("a session expires after its own interval offline; session_expiry caps what a client asks for, and CONNACK says so")
    func expiresOnItsOwn() async throws {
        try await withV5Broker(configure: { $0.limits.sessionExpiry = .seconds(100) }) { b in
            let (c, connack) = try await b.client5("forever", properties: Self.expiry(.max))
            #expect(connack.properties.sessionExpiryInterval == 100)
            await c.disconnect()
            let (short, plain) = try await b.client5("short", properties: Self.expiry(1))
            #expect(plain.properties.sessionExpiryInterval == nil)  // as asked
            try await short.subscribe("x")
            await short.disconnect()
            try await eventually("expired", timeout: .seconds(10)) { b.broker.registry.count == 1 }  // "forever" stays
            let (back, gone) = try await b.client5("short", cleanStart: false, properties: Self.expiry(1))
            #expect(gone.sessionPresent == false)
            await back.disconnect()
        }
    }

    @Test("DISCONNECT may end a kept session (expiry 0) but not keep one that was to end: that is a protocol error, DISCONNECT 0x82")
    func expiryOnDisconnect() async throws {
        try await withV5Broker { b in
            let (k, _) = try await b.client5("k", properties: Self.expiry(100))
            var end = MQTTProperties()
            end.sessionExpiryInterval = 0
            k.send(.disconnectV5(DisconnectPacket(reasonCode: .normalDisconnection, properties: end)))
            try await k.expectClosed()
            let (k2, ended) = try await b.client5("k", cleanStart: false)
            #expect(ended.sessionPresent == false)
            k2.send(.disconnectV5(DisconnectPacket(reasonCode: .normalDisconnection, properties: Self.expiry(50))))
            #expect(try await k2.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .protocolError))])
        }
    }
}

/// The publisher's side of a QoS flow (MQTT 5 acknowledgements without a reason code).
private func completeFlow(_ c: TestClient, qos: QoS, id: UInt16) async throws {
    switch qos {
    case .atMostOnce: return
    case .atLeastOnce: #expect(try await c.expectPacket() == .puback(packetID: id))
    case .exactlyOnce:
        #expect(try await c.expectPacket() == .pubrec(packetID: id))
        c.send(.pubrel(packetID: id))
        #expect(try await c.expectPacket() == .pubcomp(packetID: id))
    }
}

/// The subscriber's side of a QoS flow.
private func acknowledge(_ p: PublishPacket, on c: TestClient) async throws {
    switch p.qos {
    case .atMostOnce: return
    case .atLeastOnce: c.send(.puback(packetID: p.packetID!))
    case .exactlyOnce:
        c.send(.pubrec(packetID: p.packetID!))
        #expect(try await c.expectPacket() == .pubrel(packetID: p.packetID!))
        c.send(.pubcomp(packetID: p.packetID!))
    }
}

@Suite("MQTT 5.0 topic aliases and subscription identifiers")
struct MQTT5AliasTests {
    private static func aliasing(_ maximum: UInt16) -> MQTTProperties {
        var properties = MQTTProperties()
        properties.topicAliasMaximum = maximum
        return properties
    }

    private static func alias(_ n: UInt16) -> MQTTProperties {
        var properties = MQTTProperties()
        properties.topicAlias = n
        return properties
    }

    private static func publish(_ c: TestClient, _ topic: String, _ payload: String, alias: UInt16? = nil, properties: MQTTProperties = MQTTProperties()) {
        var properties = properties
        properties.topicAlias = alias
        c.send(.publish(PublishPacket(topic: ByteBuffer(string: topic), payload: ByteBuffer(string: payload), qos: .atMostOnce, properties: properties)))
    }

    @Test("to the broker: an alias stands for the topic it came with, on that connection only; it is not forwarded; another topic may replace it; max_topic_alias bounds it (0: none offered)")
    func inbound() async throws {
        try await withV5Broker { b in
            let (sub, _) = try await b.client5("sub")
            try await sub.subscribe("in/#")
            let (c, _) = try await b.client5("c")
            var user = MQTTProperties()
            user.userProperties = [UserProperty(name: "k", value: "v")]
            Self.publish(c, "in/a", "1", alias: 10)
            Self.publish(c, "", "2", alias: 10, properties: user)
            Self.publish(c, "in/b", "3", alias: 10)  // the alias now stands for in/b
            Self.publish(c, "", "4", alias: 10)
            var got: [(String, String, MQTTProperties)] = []
            for _ in 0..<4 {
                let p = try await sub.expectPublish()
                got.append((String(buffer: p.topic), String(buffer: p.payload), p.properties))
            }
            #expect(got.map { "\($0.0) \($0.1)" } == ["in/a 1", "in/a 2", "in/b 3", "in/b 4"])
            #expect(got.allSatisfy { $0.2.topicAlias == nil })
            #expect(got[1].2.userProperties == [UserProperty(name: "k", value: "v")])
            // A new connection of the same client starts with no alias.
            let (again, _) = try await b.client5("c")
            Self.publish(again, "", "5", alias: 10)
            #expect(try await again.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .protocolError))])
            try await sub.expectNothing()
        }
        try await withV5Broker(configure: { $0.limits.maxTopicAlias = 0 }) { b in
            let (c, connack) = try await b.client5("c")
            #expect(connack.properties.topicAliasMaximum == nil)
            Self.publish(c, "t", "x", alias: 1)
            #expect(try await c.expectClosed() == [.disconnectV5(DisconnectPacket(reasonCode: .topicAliasInvalid))])
        }
    }

    @Test("to the client: aliases up to the fewer of its Topic Alias Maximum and max_topic_alias, first come first served; a new connection starts over and in-flight messages are re-sent with their topic; none for a client that asks for none or a 3.1.1 client")
    func outbound() async throws {
        try await withV5Broker(configure: { $0.limits.maxTopicAlias = 2 }) { b in
            var asks = Self.aliasing(5)
            asks.sessionExpiryInterval = 300
            let (sub, _) = try await b.client5("sub", properties: asks)
            try await sub.subscribe("out/#", qos: .atLeastOnce)
            let (plain5, _) = try await b.client5("plain5")
            try await plain5.subscribe("out/#")
            let plain3 = try await b.client("plain3")
            try await plain3.subscribe("out/#")
            let pub = try await b.client("pub")
            for topic in ["out/a", "out/b", "out/c", "out/a", "out/b", "out/c"] { try await pub.publish(topic, topic, qos: .atLeastOnce) }
            var seen: [(String, UInt16?, String)] = []
            for _ in 0..<6 {
                let p = try await sub.expectPublish()
                seen.append((String(buffer: p.topic), p.topicAlias, String(buffer: p.payload)))
            }
            // Two aliases (the broker's maximum): out/a and out/b get them, out/c never does.
            #expect(seen.map { "\($0.0)|\($0.1.map(String.init) ?? "-")|\($0.2)" } == [
                "out/a|1|out/a", "out/b|2|out/b", "out/c|-|out/c", "|1|out/a", "|2|out/b", "out/c|-|out/c",
            ])
            for client in [plain5, plain3] as [TestClient] {
                for _ in 0..<6 {
                    let p = try await client.expectPublish()
                    #expect(p.topic.readableBytes > 0 && p.topicAlias == nil)
                }
            }
            // Unacknowledged, the session reconnects: the re-sent messages carry their topics,
            // aliased afresh.
            let (back, connack) = try await b.client5("sub", cleanStart: false, properties: asks)
            #expect(connack.sessionPresent)
            var resent: [String] = []
            for _ in 0..<6 {
                let p = try await back.expectPublish()
                #expect(p.dup)
                resent.append("\(String(buffer: p.topic))|\(p.topicAlias.map(String.init) ?? "-")")
                back.send(.puback(packetID: p.packetID!))
            }
            #expect(resent == ["out/a|1", "out/b|2", "out/c|-", "|1", "|2", "out/c|-"])
        }
    }

    @Test("Subscription Identifiers: a message carries those of every plain subscription of the client that matches it (one copy), retained ones too; a copy through a shared subscription carries that one's; a SUBSCRIBE without one takes it away, as does UNSUBSCRIBE")
    func subscriptionIdentifiers() async throws {
        try await withV5Broker { b in
            let pub = try await b.client("pub")
            try await pub.publish("sid/kept", "retained", retain: true)
            let (c, _) = try await b.client5("c")
            func subscribe(_ filter: String, _ identifier: UInt32?, id: UInt16) async throws {
                var properties = MQTTProperties()
                if let identifier { properties.subscriptionIdentifiers = [identifier] }
                c.send(.subscribe(SubscribePacket(packetID: id, subscriptions: [Subscription(filter: filter, qos: .atLeastOnce)], properties: properties)))
                guard case .suback = try await c.expectPacket() else { throw TestFailure("expected SUBACK") }
            }
            try await subscribe("sid/#", 1, id: 1)
            let retained = try await c.expectPublish()
            #expect(retained.retain && retained.properties.subscriptionIdentifiers == [1])
            try await subscribe("sid/+", 268_435_455, id: 2)
            let again = try await c.expectPublish()  // retained again, both now match
            #expect(again.properties.subscriptionIdentifiers == [1, 268_435_455])
            try await subscribe("$share/g/sid/x/#", 9, id: 3)
            try await pub.publish("sid/a", "a")
            #expect(try await c.expectPublish().properties.subscriptionIdentifiers == [1, 268_435_455])
            try await pub.publish("sid/x/y", "shared and #")
            var shared: [[UInt32]] = []
            for _ in 0..<2 { shared.append(try await c.expectPublish().properties.subscriptionIdentifiers) }
            // Two copies, each with the identifier of the subscription it came through: the plain
            // one's (sid/#), the group's.
            #expect(shared.sorted { $0.first ?? 0 < $1.first ?? 0 } == [[1], [9]])
            try await subscribe("sid/#", nil, id: 4)
            _ = try await c.expectPublish()  // the retained message once more
            c.send(.unsubscribe(UnsubscribePacket(packetID: 5, filters: ["sid/+"])))
            let unsuback = try await c.expectPacket()
            guard case .unsubackV5 = unsuback else { throw TestFailure("expected UNSUBACK, got \(unsuback)") }
            try await pub.publish("sid/b", "none")
            #expect(try await c.expectPublish().properties.subscriptionIdentifiers == [])
        }
    }
}

@Suite("MQTT 5.0 what a client gets beyond the message, within its Maximum Packet Size")
struct MQTT5WireSizeTests {
    @Test("subscription identifiers and a new topic alias count towards the client's Maximum Packet Size: a PUBLISH they would make too large is not sent, and an alias is given only when the PUBLISH giving it fits (later ones may use it)")
    func maximumPacketSizeCountsWhatTheBrokerAdds() async throws {
        try await withV5Broker { b in
            // A QoS 0 PUBLISH of topic "m/t" with 20 bytes of payload and no properties is 28 bytes.
            var asks = MQTTProperties()
            asks.maximumPacketSize = 28
            let (c, _) = try await b.client5("c", properties: asks)
            var identifier = MQTTProperties()
            identifier.subscriptionIdentifiers = [200_000]
            c.send(.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "m/#", qos: .atMostOnce)], properties: identifier)))
            _ = try await c.expectPacket()
            let pub = try await b.client("pub")
            try await pub.publish("m/t", ByteBuffer(repeating: 0x41, count: 20))  // 28 + 4 bytes of identifier: too large
            try await pub.publish("m/t", ByteBuffer(repeating: 0x41, count: 16))  // 32 - 4: fits
            let got = try await c.expectPublish()
            #expect(got.payload.readableBytes == 16 && got.properties.subscriptionIdentifiers == [200_000])
            try await c.expectNothing()

            asks.topicAliasMaximum = 5
            let (a, _) = try await b.client5("a", properties: asks)
            try await a.subscribe("m/#")
            try await pub.publish("m/t", ByteBuffer(repeating: 0x41, count: 20))  // 28: fits, but not with a new alias (+3)
            let full = try await a.expectPublish()
            #expect(String(buffer: full.topic) == "m/t" && full.topicAlias == nil)
            try await pub.publish("m/t", ByteBuffer(repeating: 0x41, count: 17))  // 25 + 3: gives the alias
            let giving = try await a.expectPublish()
            #expect(String(buffer: giving.topic) == "m/t" && giving.topicAlias == 1)
            try await pub.publish("m/t", ByteBuffer(repeating: 0x41, count: 20))  // 28 - 3 + 3 with the alias alone: fits
            let aliased = try await a.expectPublish()
            #expect(aliased.topic.readableBytes == 0 && aliased.topicAlias == 1 && aliased.payload.readableBytes == 20)
        }
    }
}
