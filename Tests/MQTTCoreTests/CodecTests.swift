import MQLiteTestSupport
import MQTTCore
import NIOCore
import NIOTestUtils
import Testing

/// One packet of every type, with the fields that matter set.
let samplePackets: [MQTTPacket] = [
    .connect(ConnectPacket(clientID: "c1")),
    .connect(
        ConnectPacket(
            protocolName: "MQIsdp", protocolLevel: 3, cleanSession: false, keepAlive: 30, clientID: "héllo",
            will: Will(topic: "wills/c1", payload: ByteBuffer(string: "gone"), qos: .exactlyOnce, retain: true),
            username: "user", password: ByteBuffer(bytes: [0, 1, 2, 255]))),
    .connack(ConnackPacket(sessionPresent: true, returnCode: .accepted)),
    .connack(ConnackPacket(sessionPresent: false, returnCode: .notAuthorized)),
    .publish(PublishPacket(topic: "a/b", payload: "hello")),
    .publish(PublishPacket(topic: "a/b", payload: "", qos: .atLeastOnce, retain: true, packetID: 7)),
    .publish(PublishPacket(topic: "ü/x", payload: String(repeating: "x", count: 70_000), qos: .exactlyOnce, dup: true, packetID: 65535)),
    .puback(packetID: 1),
    .pubrec(packetID: 2),
    .pubrel(packetID: 3),
    .pubcomp(packetID: 4),
    .subscribe(SubscribePacket(packetID: 5, subscriptions: [.init(filter: "a/+/c", qos: .atLeastOnce), .init(filter: "#", qos: .exactlyOnce)])),
    .suback(SubackPacket(packetID: 5, returnCodes: [.granted(.atLeastOnce), .failure, .granted(.atMostOnce)])),
    .unsubscribe(UnsubscribePacket(packetID: 6, filters: ["a/+/c", "#"])),
    .unsuback(packetID: 6),
    .pingreq,
    .pingresp,
    .disconnect,
]

func encode(_ packets: [MQTTPacket]) -> ByteBuffer {
    var buffer = ByteBuffer()
    for packet in packets { buffer.writeMQTTPacket(packet) }
    return buffer
}

/// Decodes every whole packet in `bytes`.
func decodeAll(_ bytes: ByteBuffer, maxPacketSize: Int = 1 << 20) throws -> [MQTTPacket] {
    var decoder = MQTTDecoder(maxPacketSize: maxPacketSize)
    var buffer = bytes
    var packets: [MQTTPacket] = []
    while let packet = try decoder.decode(buffer: &buffer) { packets.append(packet) }
    return packets
}

func decodeOne(_ bytes: [UInt8], maxPacketSize: Int = 1 << 20) throws -> MQTTPacket? {
    try decodeAll(ByteBuffer(bytes: bytes), maxPacketSize: maxPacketSize).first
}

@Suite("Codec round trips")
struct RoundTripTests {
    @Test("every packet type encodes and decodes back to itself", arguments: samplePackets)
    func roundTrip(packet: MQTTPacket) throws {
        let decoded = try decodeAll(encode([packet]))
        #expect(decoded == [packet])
    }

    @Test("the decoder gives the same packets whole, byte by byte and many per buffer")
    func verifier() async throws {
        try await offThePool { () throws in
            // Byte-by-byte feeding is quadratic in the verifier; the 70 kB packet is left to the other tests.
            let pairs = samplePackets.map { (encode([$0]), [$0]) }.filter { $0.0.readableBytes < 20_000 }
                + [(encode([.publish(PublishPacket(topic: "big", payload: String(repeating: "y", count: 3000)))]), [.publish(PublishPacket(topic: "big", payload: String(repeating: "y", count: 3000)))])]
            try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) { MQTTDecoder() }
        }
    }

    @Test("many packets in one buffer come out in order")
    func manyPerBuffer() throws {
        #expect(try decodeAll(encode(samplePackets)) == samplePackets)
    }

    @Test("a partial packet waits for more bytes without consuming anything")
    func partial() throws {
        let bytes = encode([.publish(PublishPacket(topic: "t", payload: "payload"))])
        var decoder = MQTTDecoder()
        var buffer = bytes.getSlice(at: 0, length: bytes.readableBytes - 1)!
        #expect(try decoder.decode(buffer: &buffer) == nil)
        #expect(buffer.readableBytes == bytes.readableBytes - 1)
    }

    @Test("a stream cut anywhere: the packet split between reads is completed in a buffer of its own and no further, the rest decoded in place")
    func splitBetweenReads() async throws {
        try await offThePool { () throws in
            let packets = samplePackets.filter { encode([$0]).readableBytes < 1000 }
            let stream = encode(packets)
            let decoder = MQTTDecoder()
            for cut in [1, 2, 3, 5, 7, 11, 64] {
                var decoded: [MQTTPacket] = []
                var partial: ByteBuffer?
                var offset = 0
                while offset < stream.readableBytes {
                    var read = stream.getSlice(at: offset, length: min(cut, stream.readableBytes - offset))!
                    offset += read.readableBytes
                    if var pending = partial {
                        partial = nil
                        guard decoder.complete(&pending, from: &read, version: .v3_1_1) else {
                            #expect(read.readableBytes == 0)  // all of this read went to the packet
                            partial = pending
                            continue
                        }
                        let packet = try decoder.decode(buffer: &pending, version: .v3_1_1)
                        #expect(packet != nil && pending.readableBytes == 0, "completed exactly one packet")
                        decoded.append(packet!)
                    }
                    while let packet = try decoder.decode(buffer: &read, version: .v3_1_1) { decoded.append(packet) }
                    if read.readableBytes > 0 {
                        let held = read.readableBytes
                        partial = decoder.keepPartial(&read, version: .v3_1_1)
                        #expect(read.readableBytes == 0 && partial!.readableBytes == held)
                        #expect(partial!.capacity <= max(2 * held, 64), "kept in a buffer at most twice what came")
                    }
                }
                #expect(decoded == packets, "cut every \(cut) bytes")
                #expect(partial == nil)
            }
        }
    }

    @Test("completing a packet takes its fixed header a byte at a time and stops at a bad one; a kept start is sized for its packet")
    func completeHeader() throws {
        let decoder = MQTTDecoder(maxPacketSize: 100)
        // PUBLISH of 200 bytes: its header (0x30 0xC8 0x01) is refused once its length is whole,
        // and nothing after it is taken.
        var pending = ByteBuffer(bytes: [0x30])
        var read = ByteBuffer(bytes: [0xC8, 0x01, 1, 2, 3])
        #expect(decoder.complete(&pending, from: &read, version: .v3_1_1))
        #expect(Array(pending.readableBytesView) == [0x30, 0xC8, 0x01] && read.readableBytes == 3)
        #expect(throws: MQTTProtocolError.packetTooLarge(length: 200, limit: 100)) { try decoder.decode(buffer: &pending, version: .v3_1_1) }
        // A 50-byte packet begun with 40 bytes: kept in room for all 52; begun with 10: room for 20.
        let whole = encode([.publish(PublishPacket(topic: "t", payload: String(repeating: "p", count: 47)))])
        #expect(whole.readableBytes == 52)
        var start = whole.getSlice(at: 0, length: 40)!
        #expect(decoder.keepPartial(&start, version: .v3_1_1).capacity >= 52)
        var small = whole.getSlice(at: 0, length: 10)!
        let kept = decoder.keepPartial(&small, version: .v3_1_1)
        #expect(kept.capacity >= 10 && kept.capacity < 52)
    }

    @Test("PUBLISH topic and payload are slices of the read buffer, not copies")
    func zeroCopy() throws {
        var decoder = MQTTDecoder()
        var buffer = encode([.publish(PublishPacket(topic: "a/b", payload: "zero-copy"))])
        guard case .publish(let p) = try decoder.decode(buffer: &buffer) else { Issue.record("not a publish"); return }
        let base = buffer.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) } - UInt(buffer.readerIndex)
        let payloadBase = p.payload.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        // The payload's bytes live inside the read buffer's storage.
        #expect(payloadBase >= base && payloadBase < base + UInt(buffer.capacity))
        #expect(String(buffer: p.payload) == "zero-copy")
    }

    @Test("remaining length uses 1 to 4 bytes")
    func remainingLengthSizes() throws {
        for size in [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            var buffer = ByteBuffer()
            buffer.writeRemainingLength(size)
            let expected = size < 128 ? 1 : size < 16_384 ? 2 : size < 2_097_152 ? 3 : 4
            #expect(buffer.readableBytes == expected, "size \(size)")
        }
    }
}

@Suite("Decoder validation")
struct ValidationTests {
    func expectError(_ bytes: [UInt8], _ expected: MQTTProtocolError, maxPacketSize: Int = 1 << 20, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(throws: expected, sourceLocation: sourceLocation) { try decodeOne(bytes, maxPacketSize: maxPacketSize) }
    }

    /// A CONNECT body after the fixed header, with the given flags and fields.
    func connect(name: String = "MQTT", level: UInt8 = 4, flags: UInt8, rest: [UInt8] = [0, 1, 0x63]) -> [UInt8] {
        var body: [UInt8] = [0, UInt8(name.utf8.count)] + Array(name.utf8) + [level, flags, 0, 60] + rest
        body = [0x10, UInt8(body.count)] + body
        return body
    }

    @Test func invalidPacketType() {
        expectError([0x00, 0x00], .invalidPacketType(0))
        expectError([0xF0, 0x00], .invalidPacketType(15))
    }

    @Test func reservedFlagBits() {
        expectError([0x41, 0x02, 0, 1], .reservedFlags(.puback, flags: 1))
        expectError([0x60, 0x02, 0, 1], .reservedFlags(.pubrel, flags: 0))
        expectError([0x80, 0x05, 0, 1, 0, 1, 0x61], .reservedFlags(.subscribe, flags: 0))
        expectError([0xA0, 0x05, 0, 1, 0, 1, 0x61], .reservedFlags(.unsubscribe, flags: 0))
        expectError([0xC1, 0x00], .reservedFlags(.pingreq, flags: 1))
        expectError([0xE2, 0x00], .reservedFlags(.disconnect, flags: 2))
        expectError([0x11, 0x00], .reservedFlags(.connect, flags: 1))
    }

    @Test("a SUBACK return code other than 0, 1, 2 and 0x80 is named as one (not as a length)")
    func subackReturnCode() {
        expectError([0x90, 0x03, 0, 1, 0x40], .invalidReasonCode(.suback, 0x40))
    }

    @Test func publishQoS3() {
        expectError([0x36, 0x05, 0, 1, 0x61, 0, 1], .invalidQoS(.publish))
    }

    @Test("DUP on a QoS 0 PUBLISH is refused (MQTT-3.3.1-2), with or without RETAIN; on QoS 1 and 2 it is read")
    func publishQoS0WithDUP() throws {
        expectError([0x38, 0x04, 0, 1, 0x61, 0x78], .dupOnQoS0)
        expectError([0x39, 0x04, 0, 1, 0x61, 0x78], .dupOnQoS0)
        #expect(MQTTProtocolError.dupOnQoS0.reasonCode == .malformedPacket)
        for first: UInt8 in [0x3A, 0x3C] {
            var buffer = ByteBuffer(bytes: [first, 0x05, 0, 1, 0x61, 0, 7])
            guard case .publish(let packet) = try MQTTDecoder().decode(buffer: &buffer, version: .v3_1_1) else {
                Issue.record("no PUBLISH from 0x\(String(first, radix: 16))")
                continue
            }
            #expect(packet.dup && packet.packetID == 7)
        }
    }

    @Test func remainingLengthOverFourBytes() {
        expectError([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], .malformedRemainingLength)
    }

    @Test("an oversized packet is refused from its header alone, before the body arrives")
    func tooLarge() {
        // Header says 200 bytes; only the header is present.
        expectError([0x30, 0xC8, 0x01], .packetTooLarge(length: 200, limit: 100), maxPacketSize: 100)
    }

    @Test func invalidUTF8AndNull() {
        expectError([0x30, 0x04, 0, 2, 0xC3, 0x28], .invalidUTF8)
        expectError([0x30, 0x04, 0, 2, 0x61, 0x00], .nullCharacter)
        expectError(connect(flags: 0x02, rest: [0, 2, 0xED, 0xA0]), .invalidUTF8)  // UTF-16 surrogate half
        expectError(connect(flags: 0x02, rest: [0, 1, 0x00]), .nullCharacter)
        expectError([0x82, 0x06, 0, 1, 0, 1, 0x00, 0], .nullCharacter)
    }

    @Test func topicNames() {
        expectError([0x30, 0x02, 0, 0], .invalidTopicName(""))
        expectError([0x30, 0x05, 0, 3, 0x61, 0x2F, 0x2B], .invalidTopicName("a/+"))
        expectError([0x30, 0x03, 0, 1, 0x23], .invalidTopicName("#"))
    }

    @Test func topicFilters() {
        for bad in ["a/#/b", "a#", "a/b+", "+a", "", "##"] {
            let filter = Array(bad.utf8)
            let body: [UInt8] = [0, 1, 0, UInt8(filter.count)] + filter + [0]
            expectError([0x82, UInt8(body.count)] + body, .invalidTopicFilter(bad))
        }
    }

    @Test func connectFlags() {
        expectError(connect(flags: 0x03), .connectReservedFlag)
        expectError(connect(flags: 0x1E), .invalidWillQoS)
        expectError(connect(flags: 0x0A), .willFlagsWithoutWill)
        expectError(connect(flags: 0x22), .willFlagsWithoutWill)
        expectError(connect(flags: 0x42), .passwordWithoutUsername)
    }

    @Test func protocolNameAndLevel() throws {
        expectError(connect(level: 5, flags: 0x02), .unsupportedProtocol(name: "MQTT", level: 5))
        expectError(connect(name: "MQIsdp", level: 4, flags: 0x02), .unsupportedProtocol(name: "MQIsdp", level: 4))
        expectError(connect(name: "HTTP", level: 4, flags: 0x02), .unsupportedProtocol(name: "HTTP", level: 4))
        guard case .connect(let c) = try decodeOne(connect(name: "MQIsdp", level: 3, flags: 0x02)) else {
            Issue.record("MQIsdp level 3 not accepted")
            return
        }
        #expect(c.value.clientID == "c")
    }

    @Test("a Mosquitto bridge's CONNECT (0x80 on level 3 or 4, try_private) is read as that level with isBridge, and written back the same; 0x85 is no level")
    func bridgeLevel() throws {
        for (name, raw, level) in [("MQTT", UInt8(0x84), UInt8(4)), ("MQIsdp", 0x83, 3)] {
            let bytes = connect(name: name, level: raw, flags: 0x02)
            guard case .connect(let c) = try decodeOne(bytes) else {
                Issue.record("level \(raw) not accepted")
                continue
            }
            #expect(c.value.protocolLevel == level && c.value.isBridge && c.value.protocolVersion != nil)
            var written = ByteBuffer()
            written.writeMQTTPacket(.connect(c.value))
            #expect(Array(written.readableBytesView) == bytes)
        }
        expectError(connect(level: 0x85, flags: 0x02), .unsupportedProtocol(name: "MQTT", level: 0x85))
        expectError(connect(level: 0x04 | 0x40, flags: 0x02), .unsupportedProtocol(name: "MQTT", level: 0x44))
    }

    @Test func emptySubscribeAndUnsubscribe() {
        expectError([0x82, 0x02, 0, 1], .noTopicFilters(.subscribe))
        expectError([0xA2, 0x02, 0, 1], .noTopicFilters(.unsubscribe))
    }

    @Test func subscribeOptions() {
        expectError([0x82, 0x06, 0, 1, 0, 1, 0x61, 3], .invalidSubscriptionOptions(3))
        expectError([0x82, 0x06, 0, 1, 0, 1, 0x61, 0x04], .invalidSubscriptionOptions(4))
    }

    @Test func zeroPacketIDs() {
        expectError([0x32, 0x05, 0, 1, 0x61, 0, 0], .zeroPacketID(.publish))
        expectError([0x40, 0x02, 0, 0], .zeroPacketID(.puback))
        expectError([0x62, 0x02, 0, 0], .zeroPacketID(.pubrel))
        expectError([0x82, 0x06, 0, 0, 0, 1, 0x61, 0], .zeroPacketID(.subscribe))
        expectError([0xA2, 0x05, 0, 0, 0, 1, 0x61], .zeroPacketID(.unsubscribe))
    }

    @Test func lengths() {
        expectError([0x40, 0x03, 0, 1, 0], .unexpectedLength(.puback, length: 3))
        expectError([0xC0, 0x01, 0], .unexpectedLength(.pingreq, length: 1))
        expectError(connect(flags: 0x02, rest: [0, 1, 0x63, 0xFF]), .unexpectedLength(.connect, length: 1))
        expectError([0x30, 0x01, 0], .truncated(.publish))
    }
}

@Suite("Topics")
struct TopicTests {
    @Test(
        "filter matching",
        arguments: [
            ("a/b", "a/b", true), ("a/b", "a/c", false), ("a/+", "a/b", true), ("a/+", "a/b/c", false),
            ("a/#", "a", true), ("a/#", "a/b/c", true), ("#", "a/b", true), ("+/+", "a/b", true),
            ("+", "/a", false), ("+/a", "/a", true), ("a/+/c", "a//c", true), ("a/b/#", "a/b", true),
            ("#", "$SYS/x", false), ("+/x", "$SYS/x", false), ("$SYS/#", "$SYS/x", true), ("$SYS/+", "$SYS/x", true),
            ("a/b", "a/b/", false), ("a/+", "a/", true), ("/#", "/a", true), ("#", "/", true),
        ])
    func matching(filter: String, topic: String, expected: Bool) {
        #expect(Topic.matches(filter: filter, topic: topic) == expected)
    }

    @Test func validFilters() throws {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "/", "a//b", "$SYS/#", "sport/tennis/+"] {
            try Topic.validateFilter(ok)
        }
    }

    @Test func topicNameValidation() throws {
        try Topic.validateName("a/b/ü")
        #expect(throws: MQTTProtocolError.invalidTopicName("a/+")) { try Topic.validateName("a/+") }
        #expect(throws: MQTTProtocolError.invalidTopicName("")) { try Topic.validateName("") }
        #expect(throws: MQTTProtocolError.invalidUTF8) { try Topic.validateName(ByteBuffer(bytes: [0x61, 0xFF])) }
    }
}

@Suite("Topic trie")
struct TopicTrieTests {
    static let filters = ["a/b", "a/+", "a/#", "#", "+/+", "+", "/#", "+/a", "a/+/c", "a/b/#", "$SYS/#", "$SYS/+", "+/x", "a//c"]
    static let topics = ["a/b", "a/c", "a/b/c", "a", "/a", "a//c", "$SYS/x", "/", "a/", "b/x", "x"]

    @Test("the trie matches exactly the filters that Topic.matches accepts, including the $ rule")
    func agreesWithMatches() {
        let trie = TopicTrie<[String: Int]>()
        for (i, f) in Self.filters.enumerated() { trie.insert(filter: f, key: f, value: i) }
        #expect(trie.count == Self.filters.count)
        for topic in Self.topics {
            var found: [String] = []
            trie.forEachMatch(topic: topic) { key, _ in found.append(key) }
            let expected = Self.filters.filter { Topic.matches(filter: $0, topic: topic) }
            #expect(found.sorted() == expected.sorted(), "topic \(topic)")
        }
    }

    @Test("removing entries prunes them and leaves the others")
    func removal() {
        let trie = TopicTrie<[Int: String]>()
        trie.insert(filter: "a/+", key: 1, value: "one")
        trie.insert(filter: "a/+", key: 2, value: "two")
        trie.insert(filter: "a/+", key: 1, value: "uno")  // replaces
        #expect(trie.count == 1 && trie.value(at: "a/+")?.count == 2)
        trie.remove(filter: "a/+", key: 1)
        var found: [String] = []
        trie.forEachMatch(topic: "a/x") { _, v in found.append(v) }
        #expect(found == ["two"])
        trie.remove(filter: "a/+", key: 2)
        trie.remove(filter: "never/there", key: 3)
        #expect(trie.count == 0 && trie.nodeCount == 0)
    }
}
