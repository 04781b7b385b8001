import NIOCore

/// Decodes MQTT packets (3.1, 3.1.1 and 5.0) from a byte stream.
///
/// A parser step: it answers "need more data" (`nil`) or a packet. The fixed header is checked as
/// soon as its bytes are there, and the remaining length against `maxPacketSize` before any of
/// the body is waited for, so an oversized packet is refused without being buffered.
/// PUBLISH topic and payload come out as slices of the read buffer.
///
/// Packets are read as `protocolVersion` (3.1.1 until a CONNECT says otherwise), except CONNECT,
/// which is read in the layout of the level it carries. A level outside `acceptedVersions` is
/// refused with `MQTTProtocolError.unsupportedProtocol`, which a server answers with CONNACK 1
/// (3.1.1) or reason code 0x84 (5.0).
public struct MQTTDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = MQTTPacket

    /// The largest remaining length accepted.
    public let maxPacketSize: Int
    /// The most levels a topic name (PUBLISH, will) or filter (SUBSCRIBE, UNSUBSCRIBE) may have.
    public let maxTopicLevels: Int
    /// The version `decode(buffer:)` reads packets as. Each CONNECT it decodes sets it to the
    /// CONNECT's level; a decoder that is copied per read (the broker's, stateless) stays at its
    /// initial value, and `decode(buffer:version:)` names the version per call instead.
    public var protocolVersion: ProtocolVersion
    /// The protocol levels a CONNECT may ask for; 3.1 and 3.1.1 by default, so MQTT 5 clients are
    /// refused until the broker speaks it.
    public let acceptedVersions: ProtocolVersionSet

    public init(
        maxPacketSize: Int = 1 << 20, maxTopicLevels: Int = .max, protocolVersion: ProtocolVersion = .v3_1_1,
        acceptedVersions: ProtocolVersionSet = .mqtt3
    ) {
        self.maxPacketSize = maxPacketSize
        self.maxTopicLevels = maxTopicLevels
        self.protocolVersion = protocolVersion
        self.acceptedVersions = acceptedVersions
    }

    /// Decodes one packet as `protocolVersion`; a CONNECT switches `protocolVersion` to its level.
    public mutating func decode(buffer: inout ByteBuffer) throws -> MQTTPacket? {
        let packet = try decode(buffer: &buffer, version: protocolVersion)
        if case .connect(let connect)? = packet, let version = connect.value.protocolVersion {
            protocolVersion = version
        }
        return packet
    }

    /// Decodes one packet as `version` (a CONNECT as its own level), leaving `protocolVersion` as
    /// it is: for a decoder shared by many connections, each with its own negotiated version.
    public func decode(buffer: inout ByteBuffer, version: ProtocolVersion) throws(MQTTProtocolError) -> MQTTPacket? {
        guard let header = try checkedHeader(buffer, version: version) else { return nil }
        guard buffer.readableBytes >= header.headerLength + header.remainingLength else { return nil }
        buffer.moveReaderIndex(forwardBy: header.headerLength)
        var body = buffer.readSlice(length: header.remainingLength)!
        return try parseBody(type: header.type, flags: header.flags, body: &body, version: version)
    }

    /// The protocol level of the CONNECT `buffer` starts with, as far as its first bytes can be
    /// read (fixed header, then protocol name "MQTT" and level), whether or not the rest of it is
    /// valid: nil if those bytes are not there or not a CONNECT's. For answering a CONNECT that
    /// cannot be decoded in its client's version.
    public static func connectProtocolLevel(in buffer: ByteBuffer) -> UInt8? {
        // (Protocol name and level within the packet.)
        guard let header = try? peekFixedHeader(buffer, version: .v3_1_1), header.type == .connect, header.remainingLength >= 7 else { return nil }
        let name = buffer.readerIndex + header.headerLength
        guard buffer.getBytes(at: name, length: 6) == [0, 4, 0x4D, 0x51, 0x54, 0x54] else { return nil }
        return buffer.getInteger(at: name + 6, as: UInt8.self)
    }

    /// The whole length (fixed header included) of the packet `buffer` starts with, once its
    /// fixed header is all there (nil before). Throws what `decode` would for that header.
    private func packetLength(_ buffer: ByteBuffer, version: ProtocolVersion) throws(MQTTProtocolError) -> Int? {
        guard let header = try checkedHeader(buffer, version: version) else { return nil }
        return header.headerLength + header.remainingLength
    }

    // MARK: - A packet split between reads
    //
    // A reader decodes each read in place. What a read ends with, the start of one packet, is
    // kept in a buffer of its own (`keepPartial`), which the next reads fill to the packet's end
    // and no further (`complete`): that packet is then decoded alone, from a buffer that holds
    // nothing else, and the rest of the read in place, never copied behind it.

    /// A buffer of its own for `rest`, the start of one packet (whose fixed header, if all
    /// there, `decode` checked): sized for the packet, but at most twice the bytes in hand, so
    /// that a peer does not make the reader hold more than it sent. It does not pin the read
    /// buffer `rest` came from.
    public func keepPartial(_ rest: inout ByteBuffer, version: ProtocolVersion) -> ByteBuffer {
        let length = try? packetLength(rest, version: version)
        var own = ByteBuffer()
        own.reserveCapacity(max(rest.readableBytes, min(length ?? 0, 2 * rest.readableBytes)))
        own.writeBuffer(&rest)
        return own
    }

    /// Moves from `buffer` to `pending` (from `keepPartial`) what completes the packet `pending`
    /// starts, and no more: whether it is complete now, or its fixed header is bad (`decode`
    /// then says why). The fixed header is completed a byte at a time, so nothing past it is
    /// taken before its length is known.
    public func complete(_ pending: inout ByteBuffer, from buffer: inout ByteBuffer, version: ProtocolVersion) -> Bool {
        while true {
            let length: Int?
            do { length = try packetLength(pending, version: version) } catch { return true }
            guard let length else {
                guard let byte: UInt8 = buffer.readInteger() else { return false }
                pending.writeInteger(byte)
                continue
            }
            let missing = length - pending.readableBytes
            guard missing > 0 else { return true }
            var part = buffer.readSlice(length: min(missing, buffer.readableBytes))!
            pending.writeBuffer(&part)
            return pending.readableBytes == length
        }
    }

    private func checkedHeader(_ buffer: ByteBuffer, version: ProtocolVersion) throws(MQTTProtocolError) -> FixedHeader? {
        guard let header = try Self.peekFixedHeader(buffer, version: version) else { return nil }
        if header.remainingLength > maxPacketSize {
            throw MQTTProtocolError.packetTooLarge(length: header.remainingLength, limit: maxPacketSize)
        }
        return header
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> MQTTPacket? {
        try decode(buffer: &buffer)
    }

    // MARK: - Fixed header

    struct FixedHeader {
        var type: PacketType
        var flags: UInt8
        var remainingLength: Int
        var headerLength: Int
    }

    static func peekFixedHeader(_ buffer: ByteBuffer, version: ProtocolVersion) throws(MQTTProtocolError) -> FixedHeader? {
        guard let first: UInt8 = buffer.getInteger(at: buffer.readerIndex) else { return nil }
        let type = try checkTypeAndFlags(first, version: version)
        var length = 0
        var multiplier = 1
        var offset = 1
        while true {
            guard let byte: UInt8 = buffer.getInteger(at: buffer.readerIndex + offset) else { return nil }
            length += Int(byte & 0x7F) * multiplier
            offset += 1
            if byte & 0x80 == 0 {
                // MQTT 5.0: the fewest bytes that hold the value (MQTT-1.5.5-1), as for a property
                // length; 3.1.1 says nothing of it, and Mosquitto takes both.
                if byte == 0, offset > 2, version == .v5 { throw .malformedRemainingLength }
                break
            }
            if offset > 4 { throw .malformedRemainingLength }
            multiplier *= 128
        }
        return FixedHeader(type: type, flags: first & 0x0F, remainingLength: length, headerLength: offset)
    }

    static func checkTypeAndFlags(_ first: UInt8, version: ProtocolVersion) throws(MQTTProtocolError) -> PacketType {
        guard let type = PacketType(rawValue: first >> 4), type != .auth || version == .v5 else {
            throw .invalidPacketType(first >> 4)
        }
        let flags = first & 0x0F
        switch type {
        case .publish:
            if (flags >> 1) & 0x03 == 3 { throw .invalidQoS(.publish) }
            // MQTT-3.3.1-2: DUP is 0 on every QoS 0 message (Mosquitto closes the connection too).
            if flags & 0x0E == 0x08 { throw .dupOnQoS0 }
        case .pubrel, .subscribe, .unsubscribe:
            if flags != 0x02 { throw .reservedFlags(type, flags: flags) }
        default:
            if flags != 0 { throw .reservedFlags(type, flags: flags) }
        }
        return type
    }

    // MARK: - Bodies

    func parseBody(type: PacketType, flags: UInt8, body: inout ByteBuffer, version: ProtocolVersion) throws(MQTTProtocolError) -> MQTTPacket {
        if type == .publish { return .publish(try parsePublish(flags: flags, body: &body, version: version)) }
        if type == .connect { return .connect(try parseConnect(body: &body)) }
        if version == .v5 { return try parseV5Body(type: type, body: &body) }
        switch type {
        case .connack:
            guard body.readableBytes == 2 else { throw .unexpectedLength(.connack, length: body.readableBytes) }
            let ackFlags: UInt8 = body.readInteger()!
            let code: UInt8 = body.readInteger()!
            guard ackFlags & 0xFE == 0, let rc = ConnectReturnCode(rawValue: code) else { throw .invalidConnack }
            return .connack(ConnackPacket(sessionPresent: ackFlags & 1 == 1, returnCode: rc))
        case .puback: return .puback(packetID: try Self.parseAck(type, &body))
        case .pubrec: return .pubrec(packetID: try Self.parseAck(type, &body))
        case .pubrel: return .pubrel(packetID: try Self.parseAck(type, &body))
        case .pubcomp: return .pubcomp(packetID: try Self.parseAck(type, &body))
        case .unsuback: return .unsuback(packetID: try Self.parseAck(type, &body))
        case .subscribe:
            let id = try Self.readPacketID(type, &body)
            var subscriptions: [Subscription] = []
            while body.readableBytes > 0 {
                let filter = try Self.readString(type, &body)
                try Topic.validateFilter(filter, maxLevels: maxTopicLevels)
                guard let options: UInt8 = body.readInteger() else { throw .truncated(type) }
                guard options & 0xFC == 0, let qos = QoS(rawValue: options) else { throw .invalidSubscriptionOptions(options) }
                subscriptions.append(Subscription(filter: filter, qos: qos))
            }
            if subscriptions.isEmpty { throw .noTopicFilters(type) }
            return .subscribe(SubscribePacket(packetID: id, subscriptions: subscriptions))
        case .suback:
            let id = try Self.readPacketID(type, &body)
            var codes: [SubackReturnCode] = []
            while let raw: UInt8 = body.readInteger() {
                if raw == 0x80 {
                    codes.append(.failure)
                } else if let qos = QoS(rawValue: raw) {
                    codes.append(.granted(qos))
                } else {
                    throw .invalidReasonCode(type, raw)  // (a SUBACK return code: 0, 1, 2 or 0x80)
                }
            }
            return .suback(SubackPacket(packetID: id, returnCodes: codes))
        case .unsubscribe:
            let id = try Self.readPacketID(type, &body)
            let filters = try readFilters(type, &body)
            return .unsubscribe(UnsubscribePacket(packetID: id, filters: filters))
        case .pingreq, .pingresp, .disconnect:
            try Self.expectEmpty(type, body)
            return type == .pingreq ? .pingreq : type == .pingresp ? .pingresp : .disconnect
        case .connect, .publish, .auth:
            preconditionFailure("\(type) is parsed above or refused by checkTypeAndFlags")
        }
    }

    func parsePublish(flags: UInt8, body: inout ByteBuffer, version: ProtocolVersion) throws(MQTTProtocolError) -> PublishPacket {
        let qos = QoS(rawValue: (flags >> 1) & 0x03)!
        guard let topicLength: UInt16 = body.readInteger(),
            let topic = body.readSlice(length: Int(topicLength))
        else { throw .truncated(.publish) }
        var levels = 0
        if version != .v5 {
            levels = try Topic.validateName(topic, maxLevels: maxTopicLevels)
        }
        var packetID: UInt16?
        if qos != .atMostOnce {
            packetID = try Self.readPacketID(.publish, &body)
        }
        var properties = MQTTProperties()
        if version == .v5 {
            // The common MQTT 5 PUBLISH after the first on a topic: no topic, a topic alias, no other
            // property. Read here, without a property set (`PublishPacket.bareAlias`).
            if topic.readableBytes == 0, body.readableBytes >= 4,
               body.getInteger(at: body.readerIndex, as: UInt32.self).map({ $0 >> 16 == 0x0323 }) == true
            {
                let alias: UInt16 = body.getInteger(at: body.readerIndex + 2)!
                guard alias != 0 else { throw .invalidPropertyValue(.publish, .topicAlias) }
                body.moveReaderIndex(forwardBy: 4)
                var packet = PublishPacket(
                    topic: topic, payload: body, qos: qos, retain: flags & 1 == 1, dup: flags & 0x08 != 0, packetID: packetID)
                packet.bareAlias = alias
                return packet
            }
            properties = try MQTTProperties.read(.publish, from: &body)
            // An empty topic stands for the one a topic alias names (§3.3.2.3.4).
            if topic.readableBytes != 0 {
                levels = try Topic.validateName(topic, maxLevels: maxTopicLevels)
            } else if properties.topicAlias == nil {
                throw .emptyTopicWithoutAlias
            }
            if properties.payloadFormatIndicator == .utf8, !Self.isValidUTF8(body) { throw .payloadFormatInvalid }
        }
        var packet = PublishPacket(
            topic: topic, payload: body, qos: qos, retain: flags & 1 == 1, dup: flags & 0x08 != 0, packetID: packetID,
            properties: properties)
        packet.topicLevels = levels <= Int(UInt16.max) ? UInt16(levels) : 0
        return packet
    }

    /// CONNECT, in the layout of the protocol level it carries (read first).
    func parseConnect(body: inout ByteBuffer) throws(MQTTProtocolError) -> ConnectPacket {
        let name = try Self.readString(.connect, &body)
        guard let raw: UInt8 = body.readInteger() else { throw .truncated(.connect) }
        // A Mosquitto bridge sets 0x80 on 3 or 4 (`try_private`).
        let isBridge = raw == 0x83 || raw == 0x84
        let level = isBridge ? raw & 0x7F : raw
        let known = name == "MQTT" ? (level == 4 || level == 5) : (name == "MQIsdp" && level == 3)
        guard known, let version = ProtocolVersion(rawValue: level), acceptedVersions.contains(version) else {
            throw .unsupportedProtocol(name: name, level: raw)
        }
        let isV5 = version == .v5
        guard let flags: UInt8 = body.readInteger(), let keepAlive: UInt16 = body.readInteger() else {
            throw .truncated(.connect)
        }
        if flags & 0x01 != 0 { throw .connectReservedFlag }
        let hasWill = flags & 0x04 != 0
        let willQoSBits = (flags >> 3) & 0x03
        let willRetain = flags & 0x20 != 0
        let hasPassword = flags & 0x40 != 0
        let hasUsername = flags & 0x80 != 0
        if willQoSBits == 3 { throw .invalidWillQoS }
        if !hasWill && (willQoSBits != 0 || willRetain) { throw .willFlagsWithoutWill }
        // MQTT 5 allows a password without a user name (§3.1.2.9).
        if hasPassword && !hasUsername && !isV5 { throw .passwordWithoutUsername }
        let properties = isV5 ? try MQTTProperties.read(.connect, from: &body) : MQTTProperties()

        let clientID = try Self.readString(.connect, &body)
        var will: Will?
        var willProperties = MQTTProperties()
        if hasWill {
            if isV5 { willProperties = try MQTTProperties.read(.will, from: &body) }
            let topic = try TopicName(try Self.readString(.connect, &body), maxLevels: maxTopicLevels)
            let payload = try Self.readBinary(.connect, &body)
            if willProperties.payloadFormatIndicator == .utf8, !Self.isValidUTF8(payload) { throw .payloadFormatInvalid }
            will = Will(topic: topic, payload: payload, qos: QoS(rawValue: willQoSBits)!, retain: willRetain)
        }
        let username = hasUsername ? try Self.readString(.connect, &body) : nil
        let password = hasPassword ? try Self.readBinary(.connect, &body) : nil
        if body.readableBytes != 0 { throw .unexpectedLength(.connect, length: body.readableBytes) }
        var connect = ConnectPacket(
            protocolName: name, protocolLevel: level, cleanSession: flags & 0x02 != 0, keepAlive: keepAlive,
            clientID: clientID, will: will, username: username, password: password,
            properties: properties, willProperties: willProperties)
        connect.isBridge = isBridge
        return connect
    }

    /// The topic filters of UNSUBSCRIBE, at least one.
    func readFilters(_ type: PacketType, _ body: inout ByteBuffer) throws(MQTTProtocolError) -> [String] {
        var filters: [String] = []
        while body.readableBytes > 0 {
            let filter = try Self.readString(type, &body)
            try Topic.validateFilter(filter, maxLevels: maxTopicLevels)
            filters.append(filter)
        }
        if filters.isEmpty { throw .noTopicFilters(type) }
        return filters
    }

    // MARK: - Fields

    static func parseAck(_ type: PacketType, _ body: inout ByteBuffer) throws(MQTTProtocolError) -> UInt16 {
        guard body.readableBytes == 2 else { throw .unexpectedLength(type, length: body.readableBytes) }
        return try readPacketID(type, &body)
    }

    static func expectEmpty(_ type: PacketType, _ body: ByteBuffer) throws(MQTTProtocolError) {
        guard body.readableBytes == 0 else { throw .unexpectedLength(type, length: body.readableBytes) }
    }

    static func readPacketID(_ type: PacketType, _ body: inout ByteBuffer) throws(MQTTProtocolError) -> UInt16 {
        guard let id: UInt16 = body.readInteger() else { throw .truncated(type) }
        if id == 0 { throw .zeroPacketID(type) }
        return id
    }

    static func readBinary(_ type: PacketType, _ body: inout ByteBuffer) throws(MQTTProtocolError) -> ByteBuffer {
        guard let length: UInt16 = body.readInteger(), let bytes = body.readSlice(length: Int(length)) else {
            throw .truncated(type)
        }
        return bytes
    }

    /// A UTF-8 encoded string (§1.5.3): well-formed, without U+0000.
    static func readString(_ type: PacketType, _ body: inout ByteBuffer) throws(MQTTProtocolError) -> String {
        let bytes = try readBinary(type, &body)
        if bytes.readableBytesView.contains(0) { throw .nullCharacter }
        guard let string = String(validating: bytes.readableBytesView, as: UTF8.self) else { throw .invalidUTF8 }
        return string
    }

    /// A variable byte integer (MQTT 5.0 §1.5.5): at most four bytes, so at most 268,435,455.
    static func readVariableByteInteger(_ type: PacketType, _ body: inout ByteBuffer) throws(MQTTProtocolError) -> Int {
        var value = 0
        for shift in stride(from: 0, to: 28, by: 7) {
            guard let byte: UInt8 = body.readInteger() else { throw .truncated(type) }
            value |= Int(byte & 0x7F) << shift
            if byte & 0x80 == 0 {
                // The fewest bytes that hold the value (§1.5.5): a last byte of 0 after others is not.
                if byte == 0 && shift > 0 { throw .malformedVariableByteInteger(type) }
                return value
            }
        }
        throw .malformedVariableByteInteger(type)
    }

    /// Whether `bytes` are well-formed UTF-8, checked in place (no copy, no `String`).
    public static func isValidUTF8(_ bytes: ByteBuffer) -> Bool {
        bytes.withUnsafeReadableBytes { raw in
            var parser = Unicode.UTF8.ForwardParser()
            var iterator = raw.makeIterator()
            while true {
                switch parser.parseScalar(from: &iterator) {
                case .valid: continue
                case .emptyInput: return true
                case .error: return false
                }
            }
        }
    }
}
