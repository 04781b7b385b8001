import MQLiteTestSupport
import MQTTCore
import NIOCore
import NIOTestUtils
import Testing

/// Properties built in place.
func props(_ build: (inout MQTTProperties) -> Void) -> MQTTProperties {
    var properties = MQTTProperties()
    build(&properties)
    return properties
}

/// A decoder for MQTT 5 streams (level 5 accepted).
func v5Decoder(maxPacketSize: Int = 1 << 20) -> MQTTDecoder {
    MQTTDecoder(maxPacketSize: maxPacketSize, protocolVersion: .v5, acceptedVersions: .all)
}

func encodeV5(_ packets: [MQTTPacket]) -> ByteBuffer {
    var buffer = ByteBuffer()
    for packet in packets { buffer.writeMQTTPacket(packet, version: .v5) }
    return buffer
}

func decodeAllV5(_ bytes: ByteBuffer, maxPacketSize: Int = 1 << 20) throws -> [MQTTPacket] {
    var decoder = v5Decoder(maxPacketSize: maxPacketSize)
    var buffer = bytes
    var packets: [MQTTPacket] = []
    while let packet = try decoder.decode(buffer: &buffer) { packets.append(packet) }
    #expect(buffer.readableBytes == 0, "bytes left undecoded")
    return packets
}

func decodeOneV5(_ bytes: [UInt8]) throws -> MQTTPacket? {
    try decodeAllV5(ByteBuffer(bytes: bytes)).first
}

func bytes(hex: String) -> [UInt8] {
    let digits = Array(hex.filter { !$0.isWhitespace })
    return stride(from: 0, to: digits.count, by: 2).map { UInt8(String(digits[$0...$0 + 1]), radix: 16)! }
}

let allConnackProperties = props {
    $0.sessionExpiryInterval = 120
    $0.assignedClientIdentifier = "auto-1"
    $0.serverKeepAlive = 30
    $0.authenticationMethod = "SCRAM-SHA-256"
    $0.authenticationData = ByteBuffer(bytes: [0, 1, 2])
    $0.responseInformation = "resp/"
    $0.serverReference = "other:1883"
    $0.reasonString = "welcome"
    $0.receiveMaximum = 100
    $0.topicAliasMaximum = 10
    $0.maximumQoS = .atLeastOnce
    $0.retainAvailable = false
    $0.userProperties = [UserProperty(name: "n", value: "1"), UserProperty(name: "n", value: "2")]
    $0.maximumPacketSize = 1 << 20
    $0.wildcardSubscriptionAvailable = true
    $0.subscriptionIdentifierAvailable = false
    $0.sharedSubscriptionAvailable = false
}

let messageProperties = props {
    $0.payloadFormatIndicator = .utf8
    $0.messageExpiryInterval = 60
    $0.contentType = "text/plain"
    $0.responseTopic = "reply/to"
    $0.correlationData = ByteBuffer(bytes: [0xDE, 0xAD])
    $0.userProperties = [UserProperty(name: "ü", value: "ë"), UserProperty(name: "", value: "")]
}

/// One MQTT 5 packet of every kind, with properties wherever the packet has them.
let sampleV5Packets: [MQTTPacket] = [
    .connect(
        ConnectPacket(
            protocolLevel: 5, clientID: "c5",
            properties: props {
                $0.sessionExpiryInterval = 3600
                $0.receiveMaximum = 10
                $0.maximumPacketSize = 65536
                $0.topicAliasMaximum = 5
                $0.requestProblemInformation = false
                $0.requestResponseInformation = true
                $0.authenticationMethod = "PLAIN"
                $0.authenticationData = ByteBuffer(string: "secret")
                $0.userProperties = [UserProperty(name: "a", value: "1"), UserProperty(name: "a", value: "2")]
            })),
    // A password without a user name is allowed in MQTT 5.
    .connect(
        ConnectPacket(
            protocolLevel: 5, cleanSession: false, keepAlive: 0, clientID: "",
            will: Will(topic: "wills/x", payload: ByteBuffer(string: "bye"), qos: .atLeastOnce, retain: true),
            password: ByteBuffer(bytes: [9, 8]),
            willProperties: props {
                $0 = messageProperties
                $0.willDelayInterval = 5
            })),
    .connack(ConnackPacket(sessionPresent: true, reasonCode: .success, properties: allConnackProperties)),
    .connack(ConnackPacket(sessionPresent: false, reasonCode: .banned, properties: props { $0.reasonString = "no" })),
    .connack(ConnackPacket(sessionPresent: false, reasonCode: .unsupportedProtocolVersion)),
    .publish(
        PublishPacket(
            topic: "a/b", payload: "hi", qos: .atLeastOnce, packetID: 3,
            properties: props {
                $0 = messageProperties
                $0.subscriptionIdentifiers = [1, 300, 268_435_455]
                $0.topicAlias = 4
            })),
    .publish(PublishPacket(topic: "", payload: "aliased", qos: .exactlyOnce, retain: true, dup: true, packetID: 9, properties: props { $0.topicAlias = 4 })),
    .publish(PublishPacket(topic: "plain", payload: "")),
    .puback(packetID: 1),
    .pubrec(packetID: 2),
    .pubrel(packetID: 3),
    .pubcomp(packetID: 4),
    .ackV5(AckPacket(.puback, packetID: 1, reasonCode: .noMatchingSubscribers)),
    .ackV5(AckPacket(.pubrec, packetID: 2, reasonCode: .quotaExceeded, properties: props { $0.reasonString = "full" })),
    .ackV5(AckPacket(.pubrel, packetID: 3, reasonCode: .packetIdentifierNotFound)),
    .ackV5(AckPacket(.pubcomp, packetID: 4, properties: props { $0.userProperties = [UserProperty(name: "k", value: "v")] })),
    .subscribe(
        SubscribePacket(
            packetID: 5,
            subscriptions: [
                Subscription(filter: "a/+", qos: .exactlyOnce, noLocal: true, retainAsPublished: true, retainHandling: .doNotSend),
                Subscription(filter: "$share/g/x", qos: .atMostOnce, retainHandling: .sendOnNewSubscription),
                Subscription(filter: "#", qos: .atLeastOnce),
            ],
            properties: props {
                $0.subscriptionIdentifiers = [42]
                $0.userProperties = [UserProperty(name: "u", value: "v")]
            })),
    .suback(
        SubackPacket(
            packetID: 5,
            returnCodes: [.granted(.exactlyOnce), .failure, .refused(.notAuthorized), .refused(.wildcardSubscriptionsNotSupported), .granted(.atMostOnce)],
            properties: props { $0.reasonString = "partly" })),
    .suback(SubackPacket(packetID: 6, returnCodes: [.granted(.atLeastOnce)])),
    .unsubscribe(UnsubscribePacket(packetID: 6, filters: ["a/+", "#"], properties: props { $0.userProperties = [UserProperty(name: "x", value: "y")] })),
    .unsubscribe(UnsubscribePacket(packetID: 7, filters: ["t"])),
    .unsubackV5(UnsubackPacket(packetID: 6, reasonCodes: [.success, .noSubscriptionExisted], properties: props { $0.reasonString = "ok" })),
    .unsubackV5(UnsubackPacket(packetID: 7, reasonCodes: [.notAuthorized])),
    .pingreq,
    .pingresp,
    .disconnect,
    .disconnectV5(DisconnectPacket(reasonCode: .serverShuttingDown)),
    .disconnectV5(DisconnectPacket(reasonCode: .disconnectWithWillMessage)),
    .disconnectV5(
        DisconnectPacket(
            reasonCode: .normalDisconnection,
            properties: props {
                $0.sessionExpiryInterval = 0
                $0.serverReference = "other:1883"
                $0.reasonString = "bye"
            })),
    .auth(AuthPacket()),
    .auth(AuthPacket(reasonCode: .reAuthenticate)),
    .auth(
        AuthPacket(
            reasonCode: .continueAuthentication,
            properties: props {
                $0.authenticationMethod = "SCRAM-SHA-1"
                $0.authenticationData = ByteBuffer(bytes: Array(0..<200))
                $0.reasonString = "step 2"
                $0.userProperties = [UserProperty(name: "k", value: "v")]
            })),
]

@Suite("MQTT 5 round trips")
struct MQTT5RoundTripTests {
    @Test("every MQTT 5 packet encodes and decodes back to itself", arguments: sampleV5Packets)
    func roundTrip(packet: MQTTPacket) throws {
        #expect(try decodeAllV5(encodeV5([packet])) == [packet])
    }

    @Test("MQTT 5 packets come out the same whole, byte by byte and many per buffer")
    func verifier() async throws {
        try await offThePool { () throws in
            let pairs = sampleV5Packets.map { (encodeV5([$0]), [$0]) }
            try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) { v5Decoder() }
        }
    }

    @Test("a stream of every MQTT 5 packet decodes in order")
    func manyPerBuffer() throws {
        #expect(try decodeAllV5(encodeV5(sampleV5Packets)) == sampleV5Packets)
    }

    @Test("a v5 acknowledgement, DISCONNECT or AUTH with nothing to say is written in its shortest form")
    func shortForms() {
        #expect(Array(buffer: encodeV5([.ackV5(AckPacket(.pubrel, packetID: 7))])) == [0x62, 0x02, 0, 7])
        #expect(Array(buffer: encodeV5([.ackV5(AckPacket(.puback, packetID: 7, reasonCode: .notAuthorized))])) == [0x40, 0x03, 0, 7, 0x87])
        #expect(Array(buffer: encodeV5([.disconnectV5(DisconnectPacket())])) == [0xE0, 0x00])
        #expect(Array(buffer: encodeV5([.disconnectV5(DisconnectPacket(reasonCode: .keepAliveTimeout))])) == [0xE0, 0x01, 0x8D])
        #expect(Array(buffer: encodeV5([.auth(AuthPacket())])) == [0xF0, 0x00])
    }

    @Test("a v5 ack, DISCONNECT or AUTH may leave out its property length or reason code")
    func omittedFields() throws {
        #expect(try decodeOneV5([0x40, 0x03, 0, 7, 0x00]) == .puback(packetID: 7))
        #expect(try decodeOneV5([0x40, 0x04, 0, 7, 0x00, 0x00]) == .puback(packetID: 7))
        #expect(try decodeOneV5([0x50, 0x03, 0, 7, 0x10]) == .ackV5(AckPacket(.pubrec, packetID: 7, reasonCode: .noMatchingSubscribers)))
        #expect(try decodeOneV5([0xE0, 0x00]) == .disconnect)
        #expect(try decodeOneV5([0xE0, 0x01, 0x00]) == .disconnect)
        #expect(try decodeOneV5([0xE0, 0x02, 0x8E, 0x00]) == .disconnectV5(DisconnectPacket(reasonCode: .sessionTakenOver)))
        #expect(try decodeOneV5([0xF0, 0x00]) == .auth(AuthPacket()))
        #expect(try decodeOneV5([0xF0, 0x01, 0x18]) == .auth(AuthPacket(reasonCode: .continueAuthentication)))
    }

    @Test("properties' encoded size is what is written, for every sample")
    func encodedSize() {
        for properties in [MQTTProperties(), allConnackProperties, messageProperties, props { $0.subscriptionIdentifiers = [127, 128, 16_384] }] {
            var buffer = ByteBuffer()
            buffer.writeMQTTProperties(properties)
            #expect(buffer.readableBytes == properties.encodedSizeWithLength)
        }
        let publish = PublishPacket(topic: "a/b", payload: "xyz", qos: .atLeastOnce, packetID: 1, properties: messageProperties)
        #expect(
            encodeV5([.publish(publish)]).readableBytes
                == ByteBuffer.publishFrameSize(topicLength: 3, payloadLength: 3, qos: .atLeastOnce, properties: messageProperties))
    }
}

@Suite("MQTT 5 user properties kept encoded")
struct MQTT5UserPropertiesEncodedTests {
    @Test("a decoded PUBLISH with many user properties writes the same bytes, after a change to another property too; a change to the user properties writes the new ones")
    func keptEncoded() throws {
        let many = (0..<40).map { UserProperty(name: "k\($0)", value: String(repeating: "v", count: $0)) }
        let publish = PublishPacket(topic: "a/b", payload: "xyz", qos: .atLeastOnce, packetID: 1, properties: props { $0.userProperties = many; $0.contentType = "t" })
        let wire = encodeV5([.publish(publish)])
        guard case .publish(let decoded) = try decodeAllV5(wire).first else { Issue.record("no PUBLISH"); return }
        #expect(decoded.properties.userProperties == many)
        #expect(encodeV5([.publish(decoded)]) == wire)
        // Another property changed on a copy (as per subscriber): the user properties go as they were.
        var adorned = decoded
        adorned.properties.subscriptionIdentifiers = [7]
        var expected = publish
        expected.properties.subscriptionIdentifiers = [7]
        #expect(encodeV5([.publish(adorned)]) == encodeV5([.publish(expected)]))
        #expect(encodeV5([.publish(decoded)]) == wire, "the original is unchanged")
        var sizes = ByteBuffer()
        sizes.writeMQTTProperties(adorned.properties)
        #expect(sizes.readableBytes == adorned.properties.encodedSizeWithLength)
        // The user properties themselves changed: the new list is written.
        var changed = decoded
        changed.properties.userProperties = Array(many.prefix(2))
        var fewer = publish
        fewer.properties.userProperties = Array(many.prefix(2))
        #expect(encodeV5([.publish(changed)]) == encodeV5([.publish(fewer)]))
    }
}

@Suite("MQTT 5 packets from a real client")
struct MQTT5CapturedTests {
    /// mosquitto_pub 2.0 (-V mqttv5 -q 1 -i cap1 -t sensors/temp -m 21.5 -D connect
    /// session-expiry-interval 60 -D connect user-property client mqlite-test -D publish
    /// user-property a b -D publish user-property a c -D publish content-type text/plain -D publish
    /// payload-format-indicator 1 -D publish message-expiry-interval 30 -D publish correlation-data
    /// abc -D publish response-topic reply/here), recorded by a socket server answering CONNACK
    /// and PUBACK.
    static let mosquittoPub = bytes(
        hex: """
            102f 0004 4d51 5454 0502 003c 1e11 0000 003c 2600 0663 6c69 656e 7400 0b6d 716c
            6974 652d 7465 7374 2100 1400 0463 6170 3132 4a00 0c73 656e 736f 7273 2f74 656d
            7000 0135 2600 0161 0001 6226 0001 6100 0163 0300 0a74 6578 742f 706c 6169 6e01
            0102 0000 001e 0900 0361 6263 0800 0a72 6570 6c79 2f68 6572 6532 312e 35e0 00
            """)

    /// mosquitto_sub 2.0 (-V mqttv5 -i cap2 -t 'a/+/c' -t 'b/#' -q 2 -D subscribe
    /// subscription-identifier 7 -D subscribe user-property k v --will-topic w/t --will-payload bye
    /// -D will will-delay-interval 10 -D will content-type x), ended by its -W timeout: it
    /// disconnects with reason 0x04 "disconnect with will message".
    static let mosquittoSub = bytes(
        hex: """
            1028 0004 4d51 5454 0506 003c 0321 0014 0004 6361 7032 0918 0000 000a 0300 0178
            0003 772f 7400 0362 7965 821a 0001 090b 0726 0001 6b00 0176 0005 612f 2b2f 6302
            0003 622f 2302 e001 04
            """)

    @Test("mosquitto_pub's MQTT 5 CONNECT, PUBLISH and DISCONNECT decode field by field")
    func publisher() throws {
        // A decoder at its defaults but for accepting level 5: the CONNECT switches it to MQTT 5.
        var decoder = MQTTDecoder(acceptedVersions: .all)
        var buffer = ByteBuffer(bytes: Self.mosquittoPub)
        var packets: [MQTTPacket] = []
        while let packet = try decoder.decode(buffer: &buffer) { packets.append(packet) }
        #expect(decoder.protocolVersion == .v5)
        #expect(buffer.readableBytes == 0)
        let connect = ConnectPacket(
            protocolLevel: 5, cleanSession: true, keepAlive: 60, clientID: "cap1",
            properties: props {
                $0.sessionExpiryInterval = 60
                $0.userProperties = [UserProperty(name: "client", value: "mqlite-test")]
                $0.receiveMaximum = 20
            })
        let publish = PublishPacket(
            topic: "sensors/temp", payload: "21.5", qos: .atLeastOnce, packetID: 1,
            properties: props {
                $0.userProperties = [UserProperty(name: "a", value: "b"), UserProperty(name: "a", value: "c")]
                $0.contentType = "text/plain"
                $0.payloadFormatIndicator = .utf8
                $0.messageExpiryInterval = 30
                $0.correlationData = ByteBuffer(string: "abc")
                $0.responseTopic = "reply/here"
            })
        #expect(packets == [.connect(connect), .publish(publish), .disconnect])
    }

    @Test("mosquitto_sub's MQTT 5 CONNECT with will properties, SUBSCRIBE and DISCONNECT 0x04 decode")
    func subscriber() throws {
        let packets = try decodeAllV5(ByteBuffer(bytes: Self.mosquittoSub))
        let connect = ConnectPacket(
            protocolLevel: 5, cleanSession: true, keepAlive: 60, clientID: "cap2",
            will: Will(topic: "w/t", payload: ByteBuffer(string: "bye"), qos: .atMostOnce, retain: false),
            properties: props { $0.receiveMaximum = 20 },
            willProperties: props {
                $0.willDelayInterval = 10
                $0.contentType = "x"
            })
        let subscribe = SubscribePacket(
            packetID: 1,
            subscriptions: [Subscription(filter: "a/+/c", qos: .exactlyOnce), Subscription(filter: "b/#", qos: .exactlyOnce)],
            properties: props {
                $0.subscriptionIdentifiers = [7]
                $0.userProperties = [UserProperty(name: "k", value: "v")]
            })
        #expect(packets == [.connect(connect), .subscribe(subscribe), .disconnectV5(DisconnectPacket(reasonCode: .disconnectWithWillMessage))])
    }

    @Test("the captured streams decode the same fed byte by byte")
    func byteByByte() throws {
        for stream in [Self.mosquittoPub, Self.mosquittoSub] {
            let whole = try decodeAllV5(ByteBuffer(bytes: stream))
            var decoder = v5Decoder()
            var buffer = ByteBuffer()
            var packets: [MQTTPacket] = []
            for byte in stream {
                buffer.writeInteger(byte)
                while let packet = try decoder.decode(buffer: &buffer) { packets.append(packet) }
            }
            #expect(packets == whole)
        }
    }

    @Test("the spec's examples: a SUBSCRIBE options byte and a PUBACK with a reason string, by hand")
    func handBuilt() throws {
        // SUBSCRIBE id 10, no properties, "a/b" with QoS 1, no local, retain as published, retain handling 1.
        let subscribe = try decodeOneV5([0x82, 0x09, 0x00, 0x0A, 0x00, 0x00, 0x03, 0x61, 0x2F, 0x62, 0x1D])
        #expect(
            subscribe
                == .subscribe(
                    SubscribePacket(
                        packetID: 10,
                        subscriptions: [Subscription(filter: "a/b", qos: .atLeastOnce, noLocal: true, retainAsPublished: true, retainHandling: .sendOnNewSubscription)])))
        // PUBACK id 1, reason 0x97 quota exceeded, reason string "q".
        let puback = try decodeOneV5([0x40, 0x08, 0x00, 0x01, 0x97, 0x04, 0x1F, 0x00, 0x01, 0x71])
        #expect(puback == .ackV5(AckPacket(.puback, packetID: 1, reasonCode: .quotaExceeded, properties: props { $0.reasonString = "q" })))
    }
}

@Suite("MQTT 5 decoder validation")
struct MQTT5ValidationTests {
    func expectError(_ bytes: [UInt8], _ expected: MQTTProtocolError, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(throws: expected, sourceLocation: sourceLocation) { try decodeOneV5(bytes) }
    }

    /// A QoS 0 PUBLISH to "t" whose property section is `properties` (length included), then `payload`.
    func publish(_ properties: [UInt8], payload: [UInt8] = [0x78]) -> [UInt8] {
        let body: [UInt8] = [0, 1, 0x74] + properties + payload
        var bytes: [UInt8] = [0x30]
        var length = ByteBuffer()
        length.writeRemainingLength(body.count)
        bytes += Array(buffer: length)
        return bytes + body
    }

    @Test("an unknown property identifier is a malformed packet")
    func unknownProperty() {
        expectError(publish([2, 0x7F, 0]), .unknownProperty(.publish, identifier: 0x7F))
        expectError(publish([1, 0x00]), .unknownProperty(.publish, identifier: 0))
        expectError(publish([1, 0x2B]), .unknownProperty(.publish, identifier: 0x2B))
        #expect(MQTTProtocolError.unknownProperty(.publish, identifier: 0).reasonCode == .malformedPacket)
    }

    @Test("a property given twice is a protocol error, but for user properties and PUBLISH subscription identifiers")
    func duplicates() throws {
        expectError(publish([8, 0x03, 0, 1, 0x78, 0x03, 0, 1, 0x79]), .duplicateProperty(.publish, .contentType))
        expectError(publish([4, 0x23, 0, 1, 0x23]), .duplicateProperty(.publish, .topicAlias))
        // SUBSCRIBE: one subscription identifier at most.
        expectError([0x82, 0x0A, 0, 1, 4, 0x0B, 1, 0x0B, 2, 0, 1, 0x61, 0], .duplicateProperty(.subscribe, .subscriptionIdentifier))
        #expect(MQTTProtocolError.duplicateProperty(.publish, .contentType).reasonCode == .protocolError)
        guard case .publish(let p) = try decodeOneV5(publish([15, 0x0B, 1, 0x0B, 2, 0x26, 0, 1, 0x61, 0, 0, 0x26, 0, 0, 0, 0])) else {
            Issue.record("not a PUBLISH")
            return
        }
        #expect(p.properties.subscriptionIdentifiers == [1, 2])
        #expect(p.properties.userProperties == [UserProperty(name: "a", value: ""), UserProperty(name: "", value: "")])
    }

    @Test("a property not allowed in the packet is a malformed packet (§2.2.2.2)")
    func notAllowed() {
        expectError(publish([5, 0x11, 0, 0, 0, 1]), .propertyNotAllowed(.publish, .sessionExpiryInterval))
        expectError(publish([4, 0x1F, 0, 1, 0x61]), .propertyNotAllowed(.publish, .reasonString))
        expectError([0x40, 0x06, 0, 1, 0x10, 0x02, 0x23, 0x00], .propertyNotAllowed(.puback, .topicAlias))
        expectError([0x62, 0x07, 0, 1, 0x00, 0x03, 0x13, 0x00, 0x01], .propertyNotAllowed(.pubrel, .serverKeepAlive))
        expectError([0xE0, 0x04, 0x00, 0x02, 0x23, 0x00], .propertyNotAllowed(.disconnect, .topicAlias))
        expectError([0xF0, 0x04, 0x18, 0x02, 0x24, 0x00], .propertyNotAllowed(.auth, .maximumQoS))
        // The will delay belongs to the will properties, not to CONNECT's.
        expectError(connect(properties: [5, 0x18, 0, 0, 0, 1]), .propertyNotAllowed(.connect, .willDelayInterval))
        // And a topic alias to neither.
        expectError(connect(flags: 0x06, properties: [0], will: [3, 0x23, 0, 1, 0, 1, 0x77, 0, 0]), .propertyNotAllowed(.connect, .topicAlias))
        #expect(MQTTProtocolError.propertyNotAllowed(.publish, .reasonString).reasonCode == .malformedPacket)
    }

    /// An MQTT 5 CONNECT with client id "c", these properties and, after the client id, `will`.
    func connect(flags: UInt8 = 0x02, properties: [UInt8], will: [UInt8] = []) -> [UInt8] {
        let body: [UInt8] = [0, 4, 0x4D, 0x51, 0x54, 0x54, 5, flags, 0, 60] + properties + [0, 1, 0x63] + will
        return [0x10, UInt8(body.count)] + body
    }

    @Test("a property length past the body is malformed, checked before anything is read")
    func lengthOverrun() {
        expectError(publish([10, 0x03, 0, 1], payload: []), .propertyLengthOverrun(.publish, length: 10, available: 3))
        // A value that runs past the property length (message expiry needs 4 bytes).
        expectError(publish([3, 0x02, 0, 0], payload: [0, 0]), .truncated(.publish))
        // A user property whose value is cut by the property length.
        expectError(publish([4, 0x26, 0, 1, 0x61]), .truncated(.publish))
        #expect(MQTTProtocolError.propertyLengthOverrun(.publish, length: 1, available: 0).reasonCode == .malformedPacket)
    }

    @Test("a variable byte integer of more than four bytes, or of more bytes than its value needs, is malformed")
    func variableByteInteger() {
        expectError(publish([0xFF, 0xFF, 0xFF, 0xFF, 0x01]), .malformedVariableByteInteger(.publish))
        expectError(publish([6, 0x0B, 0x80, 0x80, 0x80, 0x80, 0x01]), .malformedVariableByteInteger(.publish))
        // 1 in four bytes, and a property length of 0 in two (§1.5.5: the fewest bytes).
        expectError(publish([5, 0x0B, 0x81, 0x80, 0x80, 0x00]), .malformedVariableByteInteger(.publish))
        expectError(publish([0x80, 0x00]), .malformedVariableByteInteger(.publish))
        #expect(throws: Never.self) { try decodeOneV5(self.publish([3, 0x0B, 0x80, 0x01])) }  // 128 in two bytes
        // The largest four-byte value is a subscription identifier like any other.
        #expect(throws: Never.self) { try decodeOneV5(self.publish([5, 0x0B, 0xFF, 0xFF, 0xFF, 0x7F])) }
    }

    @Test("the fixed header's remaining length in more bytes than it needs is malformed in MQTT 5 (MQTT-1.5.5-1), taken in 3.1.1 (as Mosquitto)")
    func nonMinimalRemainingLength() throws {
        expectError([0xC0, 0x80, 0x00], .malformedRemainingLength)  // PINGREQ, 0 in two bytes
        expectError([0x30, 0x84, 0x80, 0x00, 0, 1, 0x74, 0], .malformedRemainingLength)  // PUBLISH, 4 in three
        #expect(try decodeOneV5([0xC0, 0x00]) == .pingreq)
        #expect(try decodeOneV5([0x30, 0x85, 0x01, 0, 1, 0x74, 0] + Array(repeating: 0x78, count: 129)) != nil)  // 133 in two
        var decoder = MQTTDecoder()
        var buffer = ByteBuffer(bytes: [0xC0, 0x80, 0x00])
        #expect(try decoder.decode(buffer: &buffer, version: .v3_1_1) == .pingreq)
    }

    @Test("a property length of 268,435,455 with a short body is refused at once")
    func hugePropertyLength() throws {
        let bytes = publish([0xFF, 0xFF, 0xFF, 0x7F], payload: [1, 2, 3])
        expectError(bytes, .propertyLengthOverrun(.publish, length: 268_435_455, available: 3))
    }

    @Test("forbidden property values are protocol errors")
    func values() {
        expectError(publish([2, 0x01, 2]), .invalidPropertyValue(.publish, .payloadFormatIndicator))
        expectError(publish([3, 0x23, 0, 0]), .invalidPropertyValue(.publish, .topicAlias))
        expectError(publish([2, 0x0B, 0]), .invalidPropertyValue(.publish, .subscriptionIdentifier))
        expectError(connect(properties: [3, 0x21, 0, 0]), .invalidPropertyValue(.connect, .receiveMaximum))
        expectError(connect(properties: [5, 0x27, 0, 0, 0, 0]), .invalidPropertyValue(.connect, .maximumPacketSize))
        expectError(connect(properties: [2, 0x17, 2]), .invalidPropertyValue(.connect, .requestProblemInformation))
        expectError(connect(properties: [4, 0x16, 0, 1, 0xAA]), .invalidPropertyValue(.connect, .authenticationData))
        expectError([0x20, 0x05, 0, 0, 2, 0x24, 2], .invalidPropertyValue(.connack, .maximumQoS))
        expectError([0x20, 0x05, 0, 0, 2, 0x25, 7], .invalidPropertyValue(.connack, .retainAvailable))
        expectError(publish([4, 0x08, 0, 1, 0x23]), .invalidTopicName("#"))
    }

    @Test("a payload marked as UTF-8 must be UTF-8 (PUBLISH and will)")
    func payloadFormat() throws {
        expectError(publish([2, 0x01, 1], payload: [0xC3, 0x28]), .payloadFormatInvalid)
        expectError(publish([2, 0x01, 1], payload: [0xED, 0xA0, 0x80]), .payloadFormatInvalid)  // surrogate half
        expectError(connect(flags: 0x06, properties: [0], will: [2, 0x01, 1, 0, 1, 0x77, 0, 1, 0xFF]), .payloadFormatInvalid)
        #expect(MQTTProtocolError.payloadFormatInvalid.reasonCode == .payloadFormatInvalid)
        // Unmarked, any bytes go.
        #expect(throws: Never.self) { try decodeOneV5(self.publish([2, 0x01, 0], payload: [0xC3, 0x28])) }
        #expect(throws: Never.self) { try decodeOneV5(self.publish([2, 0x01, 1], payload: Array("héllo".utf8))) }
    }

    @Test("reason codes a packet may not carry are refused")
    func reasonCodes() {
        expectError([0x40, 0x03, 0, 1, 0x04], .invalidReasonCode(.puback, 0x04))
        expectError([0x70, 0x03, 0, 1, 0x10], .invalidReasonCode(.pubcomp, 0x10))
        expectError([0xE0, 0x01, 0x01], .invalidReasonCode(.disconnect, 0x01))
        expectError([0xE0, 0x01, 0x91], .invalidReasonCode(.disconnect, 0x91))
        expectError([0xF0, 0x01, 0x80], .invalidReasonCode(.auth, 0x80))
        expectError([0x20, 0x03, 0, 0x10, 0], .invalidReasonCode(.connack, 0x10))
        expectError([0x90, 0x04, 0, 1, 0, 0x03], .invalidReasonCode(.suback, 0x03))
        expectError([0xB0, 0x04, 0, 1, 0, 0x01], .invalidReasonCode(.unsuback, 0x01))
        expectError([0x40, 0x03, 0, 1, 0xFF], .invalidReasonCode(.puback, 0xFF))
        // A refusal with a session.
        expectError([0x20, 0x03, 1, 0x87, 0], .invalidConnack)
    }

    @Test("AUTH is packet type 15 in MQTT 5 only")
    func auth() throws {
        #expect(throws: MQTTProtocolError.invalidPacketType(15)) { try decodeOne([0xF0, 0x00]) }
        expectError([0xF1, 0x00], .reservedFlags(.auth, flags: 1))
        #expect(try decodeOneV5([0xF0, 0x00]) == .auth(AuthPacket()))
    }

    @Test("MQTT 5 subscription options: reserved bits, QoS 3, retain handling 3, no local on a shared subscription")
    func subscriptionOptions() {
        expectError([0x82, 0x07, 0, 1, 0, 0, 1, 0x61, 0x40], .invalidSubscriptionOptions(0x40))
        expectError([0x82, 0x07, 0, 1, 0, 0, 1, 0x61, 0x03], .invalidSubscriptionOptions(0x03))
        expectError([0x82, 0x07, 0, 1, 0, 0, 1, 0x61, 0x30], .invalidSubscriptionOptions(0x30))
        #expect(MQTTProtocolError.invalidSubscriptionOptions(0x30).reasonCode == .protocolError)
        #expect(MQTTProtocolError.invalidSubscriptionOptions(0x40).reasonCode == .malformedPacket)
        let share = Array("$share/g/a".utf8)
        expectError([0x82, UInt8(6 + share.count), 0, 1, 0, 0, UInt8(share.count)] + share + [0x04], .noLocalOnSharedSubscription("$share/g/a"))
        // In 3.1.1 the same bytes (no property length) are refused as before.
        #expect(throws: MQTTProtocolError.invalidSubscriptionOptions(0x04)) { try decodeOne([0x82, 0x06, 0, 1, 0, 1, 0x61, 0x04]) }
    }

    @Test("an empty topic stands for a topic alias, and needs one")
    func topicAlias() throws {
        let aliased: [UInt8] = [0x30, 0x07, 0, 0, 3, 0x23, 0, 5, 0x78]
        guard case .publish(let p) = try decodeOneV5(aliased) else {
            Issue.record("not a PUBLISH")
            return
        }
        #expect(p.topic.readableBytes == 0 && p.topicAlias == 5)
        // Read without a property set (the usual PUBLISH of a client that uses aliases), yet the
        // same packet as one built with the property, and written back the same.
        #expect(p.bareAlias == 5 && p.properties.isUnset)
        var built = MQTTProperties()
        built.topicAlias = 5
        #expect(p == PublishPacket(topic: ByteBuffer(), payload: ByteBuffer(string: "x"), qos: .atMostOnce, properties: built))
        var encoder = ByteBuffer()
        encoder.writeMQTTPacket(.publish(p), version: .v5)
        #expect(Array(encoder.readableBytesView) == aliased)
        // With another property, or a topic, the alias is among the properties.
        guard case .publish(let q) = try decodeOneV5([0x30, 0x09, 0, 0, 5, 0x23, 0, 5, 0x01, 0x01, 0x78]) else {
            Issue.record("not a PUBLISH")
            return
        }
        #expect(q.bareAlias == nil && q.topicAlias == 5 && q.properties.payloadFormatIndicator == .utf8)
        expectError([0x30, 0x07, 0, 0, 3, 0x23, 0, 0, 0x78], .invalidPropertyValue(.publish, .topicAlias))
        // An empty topic and no alias: a protocol error (§3.3.2.3.4), not an invalid topic name.
        expectError([0x30, 0x04, 0, 0, 0, 0x78], .emptyTopicWithoutAlias)
        #expect(MQTTProtocolError.emptyTopicWithoutAlias.reasonCode == .protocolError)
    }

    @Test("an MQTT 5 CONNECT may carry a password without a user name; 3.1.1 may not")
    func passwordWithoutUsername() throws {
        guard case .connect(let c) = try decodeOneV5(connect(flags: 0x42, properties: [0], will: [0, 1, 0x70])) else {
            Issue.record("not a CONNECT")
            return
        }
        #expect(c.value.password == ByteBuffer(string: "p") && c.value.username == nil)
    }

    @Test("thousands of user properties are decoded in linear time, within the packet size limit")
    func manyUserProperties() async throws {
        try await offThePool { () throws in
            let count = 40_000
            var properties = MQTTProperties()
            properties.userProperties = (0..<count).map { UserProperty(name: "k", value: String($0 % 10)) }
            let packet = MQTTPacket.publish(PublishPacket(topic: "t", payload: "x", properties: properties))
            let bytes = encodeV5([packet])
            #expect(bytes.readableBytes > 7 * count)
            let start = ContinuousClock.now
            #expect(try decodeAllV5(bytes) == [packet])
            #expect(ContinuousClock.now - start < .seconds(20))
            // Under a smaller limit the packet is refused from its header, before its body is read.
            let header = bytes.getSlice(at: 0, length: 5)!
            #expect(throws: MQTTProtocolError.packetTooLarge(length: bytes.readableBytes - 4, limit: 65_536)) {
                try decodeAllV5(header, maxPacketSize: 65_536)
            }
        }
    }
}

@Suite("Protocol versions")
struct ProtocolVersionTests {
    @Test("level 5 is refused by default (the broker answers CONNACK 1) and accepted when enabled")
    func acceptedVersions() throws {
        let connect = encodeV5([.connect(ConnectPacket(protocolLevel: 5, clientID: "x"))])
        var refused = MQTTDecoder()
        var buffer = connect
        #expect(throws: MQTTProtocolError.unsupportedProtocol(name: "MQTT", level: 5)) { try refused.decode(buffer: &buffer) }
        #expect(MQTTProtocolError.unsupportedProtocol(name: "MQTT", level: 5).reasonCode == .unsupportedProtocolVersion)
        var accepting = MQTTDecoder(acceptedVersions: .all)
        buffer = connect
        #expect(try accepting.decode(buffer: &buffer) == .connect(ConnectPacket(protocolLevel: 5, clientID: "x")))
        #expect(accepting.protocolVersion == .v5)
        // Only 3.1.1: MQIsdp is refused too.
        var only311 = MQTTDecoder(acceptedVersions: .v3_1_1)
        buffer = encode([.connect(ConnectPacket(protocolName: "MQIsdp", protocolLevel: 3, clientID: "x"))])
        #expect(throws: MQTTProtocolError.unsupportedProtocol(name: "MQIsdp", level: 3)) { try only311.decode(buffer: &buffer) }
        // Level 5 under the 3.1 name is not MQTT 5.
        let body: [UInt8] = [0, 6] + Array("MQIsdp".utf8) + [5, 2, 0, 60, 0, 0, 1, 0x63]
        buffer = ByteBuffer(bytes: [0x10, UInt8(body.count)] + body)
        #expect(throws: MQTTProtocolError.unsupportedProtocol(name: "MQIsdp", level: 5)) { try accepting.decode(buffer: &buffer) }
    }

    @Test("decode(buffer:) follows CONNECT's level; decode(buffer:version:) leaves the decoder's version alone")
    func versionTracking() throws {
        var decoder = MQTTDecoder(protocolVersion: .v5, acceptedVersions: .all)
        var buffer = encode([.connect(ConnectPacket(protocolName: "MQIsdp", protocolLevel: 3, clientID: "x"))])
        _ = try decoder.decode(buffer: &buffer)
        #expect(decoder.protocolVersion == .v3_1)
        // The same PUBACK bytes with a reason code: an error as 3.1.1, a v5 ack as 5.
        let bytes = ByteBuffer(bytes: [0x40, 0x03, 0, 1, 0x10])
        buffer = bytes
        #expect(throws: MQTTProtocolError.unexpectedLength(.puback, length: 3)) { try decoder.decode(buffer: &buffer, version: .v3_1_1) }
        buffer = bytes
        #expect(try decoder.decode(buffer: &buffer, version: .v5) == .ackV5(AckPacket(.puback, packetID: 1, reasonCode: .noMatchingSubscribers)))
        #expect(decoder.protocolVersion == .v3_1)
    }

    @Test("writeMQTTPacket(_:) is 3.1.1, byte for byte as before")
    func encoderDefault() {
        for packet in samplePackets {
            var a = ByteBuffer()
            a.writeMQTTPacket(packet)
            var b = ByteBuffer()
            b.writeMQTTPacket(packet, version: .v3_1_1)
            #expect(a == b)
        }
        // Known 3.1.1 bytes.
        #expect(Array(buffer: encode([.publish(PublishPacket(topic: "a/b", payload: "hi", qos: .atLeastOnce, packetID: 10))])) == [0x32, 0x09, 0, 3, 0x61, 0x2F, 0x62, 0, 10, 0x68, 0x69])
        #expect(Array(buffer: encode([.connack(ConnackPacket(sessionPresent: true, returnCode: .accepted))])) == [0x20, 0x02, 0x01, 0x00])
        #expect(Array(buffer: encode([.suback(SubackPacket(packetID: 1, returnCodes: [.granted(.atLeastOnce), .failure]))])) == [0x90, 0x04, 0, 1, 1, 0x80])
        #expect(Array(buffer: encode([.subscribe(SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "a", qos: .exactlyOnce)]))])) == [0x82, 0x06, 0, 1, 0, 1, 0x61, 2])
    }

    @Test("written as 3.1.1, MQTT 5 fields are left out and failures become 0x80")
    func v5PacketsAs311() throws {
        var publish = PublishPacket(topic: "a/b", payload: "hi", qos: .atLeastOnce, packetID: 10)
        let plain = encode([.publish(publish)])
        publish.properties = messageProperties
        #expect(encode([.publish(publish)]) == plain)
        #expect(Array(buffer: encode([.ackV5(AckPacket(.pubrel, packetID: 3, reasonCode: .packetIdentifierNotFound))])) == [0x62, 0x02, 0, 3])
        #expect(Array(buffer: encode([.unsubackV5(UnsubackPacket(packetID: 3, reasonCodes: [.success]))])) == [0xB0, 0x02, 0, 3])
        #expect(Array(buffer: encode([.disconnectV5(DisconnectPacket(reasonCode: .serverBusy))])) == [0xE0, 0x00])
        #expect(Array(buffer: encode([.suback(SubackPacket(packetID: 1, returnCodes: [.refused(.quotaExceeded)]))])) == [0x90, 0x03, 0, 1, 0x80])
        let subscribe = SubscribePacket(packetID: 1, subscriptions: [Subscription(filter: "a", qos: .exactlyOnce, noLocal: true, retainHandling: .doNotSend)])
        #expect(Array(buffer: encode([.subscribe(subscribe)])) == [0x82, 0x06, 0, 1, 0, 1, 0x61, 2])
    }

    @Test("CONNACK keeps its 3.1.1 return code and its MQTT 5 reason code in step")
    func connackCodes() {
        for code in [ConnectReturnCode.accepted, .unacceptableProtocolVersion, .identifierRejected, .serverUnavailable, .badUsernameOrPassword, .notAuthorized] {
            #expect(ConnackPacket(sessionPresent: false, returnCode: code) == ConnackPacket(sessionPresent: false, reasonCode: code.reasonCode))
        }
        #expect(ConnackPacket(sessionPresent: false, reasonCode: .serverBusy).returnCode == .serverUnavailable)
        #expect(ConnackPacket(sessionPresent: false, reasonCode: .banned).returnCode == .notAuthorized)
    }
}

@Suite("MQTT 5 properties")
struct MQTTPropertiesTests {
    @Test("an empty property set is one reference wide, and PUBLISH grows by only that")
    func sizes() {
        #expect(MemoryLayout<MQTTProperties>.size == 8)
        // Before MQTT 5: PublishPacket 53 bytes, MQTTPacket 53 (stride 56). The properties add
        // one reference (8 bytes, aligned): 63, and the enum's stride 64.
        #expect(MemoryLayout<PublishPacket>.size <= 63)
        #expect(MemoryLayout<MQTTPacket>.stride <= 64)
        print("sizes: PublishPacket \(MemoryLayout<PublishPacket>.size), MQTTPacket \(MemoryLayout<MQTTPacket>.size) stride \(MemoryLayout<MQTTPacket>.stride), ConnackPacket \(MemoryLayout<ConnackPacket>.size), AckPacket \(MemoryLayout<AckPacket>.size), MQTTDecoder \(MemoryLayout<MQTTDecoder>.size)")
    }

    @Test("properties are values: a copy does not see later changes, and clearing them all makes them empty")
    func valueSemantics() {
        var a = MQTTProperties()
        #expect(a.isEmpty)
        a.contentType = "x"
        let b = a
        a.contentType = "y"
        a.userProperties.append(UserProperty(name: "n", value: "v"))
        #expect(b.contentType == "x" && b.userProperties.isEmpty)
        #expect(a.contentType == "y")
        a.contentType = nil
        a.userProperties = []
        #expect(a.isEmpty && a == MQTTProperties())
    }

    @Test("every MQTT protocol error has the reason code of table 2-6")
    func reasonCodes() {
        #expect(MQTTProtocolError.malformedRemainingLength.reasonCode == .malformedPacket)
        #expect(MQTTProtocolError.packetTooLarge(length: 2, limit: 1).reasonCode == .packetTooLarge)
        #expect(MQTTProtocolError.invalidTopicName("#").reasonCode == .topicNameInvalid)
        #expect(MQTTProtocolError.invalidTopicFilter("a#").reasonCode == .topicFilterInvalid)
        #expect(MQTTProtocolError.zeroPacketID(.publish).reasonCode == .protocolError)
        #expect(ReasonCode.packetTooLarge.rawValue == 0x95 && ReasonCode.malformedPacket.rawValue == 0x81)
        #expect(ReasonCode.protocolError.rawValue == 0x82 && ReasonCode.payloadFormatInvalid.rawValue == 0x99)
        #expect(ReasonCode.unsupportedProtocolVersion.rawValue == 0x84)
    }

    @Test("each packet allows the reason codes of its table in §3")
    func reasonCodeTables() {
        let counts: [(PacketType, Int)] = [
            (.connack, 22), (.puback, 9), (.pubrec, 9), (.pubrel, 2), (.pubcomp, 2), (.suback, 12), (.unsuback, 7),
            (.disconnect, 29), (.auth, 3), (.publish, 0), (.connect, 0),
        ]
        for (type, count) in counts {
            #expect(ReasonCode.allCases.filter { $0.isAllowed(in: type) }.count == count, "\(type)")
        }
        #expect(ReasonCode.disconnectWithWillMessage.isAllowed(in: .disconnect))
        #expect(!ReasonCode.packetIdentifierInUse.isAllowed(in: .disconnect))
        #expect(ReasonCode.packetIdentifierNotFound.isAllowed(in: .pubcomp))
        #expect(!ReasonCode.serverBusy.isAllowed(in: .puback))
    }

    @Test("the protocol level of a CONNECT is read from its first bytes, whatever follows; nil for anything else or too few bytes")
    func connectProtocolLevel() {
        var buffer = ByteBuffer(bytes: [0xFF, 0xFF])  // what came before, read already
        buffer.moveReaderIndex(forwardBy: 2)
        buffer.writeBytes([0x10, 0x80, 0x01, 0x00, 0x04, 0x4D, 0x51, 0x54, 0x54, 0x05, 0xFF])  // two-byte length, then junk
        #expect(MQTTDecoder.connectProtocolLevel(in: buffer) == 5)
        #expect(MQTTDecoder.connectProtocolLevel(in: ByteBuffer(bytes: [0x10, 0x0A, 0x00, 0x04, 0x4D, 0x51, 0x54, 0x54, 0x04])) == 4)
        #expect(MQTTDecoder.connectProtocolLevel(in: ByteBuffer(bytes: [0x10, 0x0A, 0x00, 0x04, 0x4D, 0x51, 0x54, 0x54])) == nil)
        #expect(MQTTDecoder.connectProtocolLevel(in: ByteBuffer(bytes: [0x10, 0x0A, 0x00, 0x06, 0x4D, 0x51, 0x49, 0x73, 0x64, 0x70, 0x03])) == nil)
        #expect(MQTTDecoder.connectProtocolLevel(in: ByteBuffer(bytes: [0x30, 0x0A, 0x00, 0x04, 0x4D, 0x51, 0x54, 0x54, 0x05])) == nil)
        #expect(MQTTDecoder.connectProtocolLevel(in: ByteBuffer(bytes: [0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x04])) == nil)
        #expect(MQTTDecoder.connectProtocolLevel(in: ByteBuffer(bytes: [0x10, 0xFF, 0xFF, 0xFF, 0x80, 0x00, 0x04, 0x4D, 0x51, 0x54, 0x54, 0x05])) == nil)
        #expect(MQTTDecoder.connectProtocolLevel(in: ByteBuffer(bytes: [0x10, 0x03, 0x00, 0x04, 0x4D, 0x51, 0x54, 0x54, 0x05])) == nil, "past the packet's end")
    }
}
