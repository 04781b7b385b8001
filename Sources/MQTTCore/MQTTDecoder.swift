import NIOCore

/// Decodes MQTT 3.1.1 packets from a byte stream.
///
/// A parser step: it answers "need more data" (`nil`) or a packet. The fixed header is checked as
/// soon as its bytes are there, and the remaining length against `maxPacketSize` before any of
/// the body is waited for, so an oversized packet is refused without being buffered.
/// PUBLISH topic and payload come out as slices of the read buffer.
public struct MQTTDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = MQTTPacket

    /// The largest remaining length accepted.
    public let maxPacketSize: Int
    /// The most levels a topic name (PUBLISH, will) or filter (SUBSCRIBE, UNSUBSCRIBE) may have.
    public let maxTopicLevels: Int

    public init(maxPacketSize: Int = 1 << 20, maxTopicLevels: Int = .max) {
        self.maxPacketSize = maxPacketSize
        self.maxTopicLevels = maxTopicLevels
    }

    public mutating func decode(buffer: inout ByteBuffer) throws -> MQTTPacket? {
        guard let header = try Self.peekFixedHeader(buffer) else { return nil }
        if header.remainingLength > maxPacketSize {
            throw MQTTProtocolError.packetTooLarge(length: header.remainingLength, limit: maxPacketSize)
        }
        guard buffer.readableBytes >= header.headerLength + header.remainingLength else { return nil }
        buffer.moveReaderIndex(forwardBy: header.headerLength)
        var body = buffer.readSlice(length: header.remainingLength)!
        return try Self.parseBody(type: header.type, flags: header.flags, body: &body, maxTopicLevels: maxTopicLevels)
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

    static func peekFixedHeader(_ buffer: ByteBuffer) throws(MQTTProtocolError) -> FixedHeader? {
        guard let first: UInt8 = buffer.getInteger(at: buffer.readerIndex) else { return nil }
        let type = try checkTypeAndFlags(first)
        var length = 0
        var multiplier = 1
        var offset = 1
        while true {
            guard let byte: UInt8 = buffer.getInteger(at: buffer.readerIndex + offset) else { return nil }
            length += Int(byte & 0x7F) * multiplier
            offset += 1
            if byte & 0x80 == 0 { break }
            if offset > 4 { throw .malformedRemainingLength }
            multiplier *= 128
        }
        return FixedHeader(type: type, flags: first & 0x0F, remainingLength: length, headerLength: offset)
    }

    static func checkTypeAndFlags(_ first: UInt8) throws(MQTTProtocolError) -> PacketType {
        guard let type = PacketType(rawValue: first >> 4) else { throw .invalidPacketType(first >> 4) }
        let flags = first & 0x0F
        switch type {
        case .publish:
            if (flags >> 1) & 0x03 == 3 { throw .invalidQoS(.publish) }
        case .pubrel, .subscribe, .unsubscribe:
            if flags != 0x02 { throw .reservedFlags(type, flags: flags) }
        default:
            if flags != 0 { throw .reservedFlags(type, flags: flags) }
        }
        return type
    }

    // MARK: - Bodies

    static func parseBody(
        type: PacketType, flags: UInt8, body: inout ByteBuffer, maxTopicLevels: Int = .max
    ) throws(MQTTProtocolError) -> MQTTPacket {
        switch type {
        case .publish:
            return .publish(try parsePublish(flags: flags, body: &body, maxTopicLevels: maxTopicLevels))
        case .connect:
            return .connect(try parseConnect(body: &body, maxTopicLevels: maxTopicLevels))
        case .connack:
            guard body.readableBytes == 2 else { throw .unexpectedLength(.connack, length: body.readableBytes) }
            let ackFlags: UInt8 = body.readInteger()!
            let code: UInt8 = body.readInteger()!
            guard ackFlags & 0xFE == 0, let rc = ConnectReturnCode(rawValue: code) else { throw .invalidConnack }
            return .connack(ConnackPacket(sessionPresent: ackFlags & 1 == 1, returnCode: rc))
        case .puback: return .puback(packetID: try parseAck(type, &body))
        case .pubrec: return .pubrec(packetID: try parseAck(type, &body))
        case .pubrel: return .pubrel(packetID: try parseAck(type, &body))
        case .pubcomp: return .pubcomp(packetID: try parseAck(type, &body))
        case .unsuback: return .unsuback(packetID: try parseAck(type, &body))
        case .subscribe:
            let id = try readPacketID(type, &body)
            var subscriptions: [Subscription] = []
            while body.readableBytes > 0 {
                let filter = try readString(type, &body)
                try Topic.validateFilter(filter, maxLevels: maxTopicLevels)
                guard let options: UInt8 = body.readInteger() else { throw .truncated(type) }
                guard options & 0xFC == 0, let qos = QoS(rawValue: options) else { throw .invalidSubscriptionOptions(options) }
                subscriptions.append(Subscription(filter: filter, qos: qos))
            }
            if subscriptions.isEmpty { throw .noTopicFilters(type) }
            return .subscribe(SubscribePacket(packetID: id, subscriptions: subscriptions))
        case .suback:
            let id = try readPacketID(type, &body)
            var codes: [SubackReturnCode] = []
            while let raw: UInt8 = body.readInteger() {
                if raw == 0x80 {
                    codes.append(.failure)
                } else if let qos = QoS(rawValue: raw) {
                    codes.append(.granted(qos))
                } else {
                    throw .unexpectedLength(type, length: Int(raw))
                }
            }
            return .suback(SubackPacket(packetID: id, returnCodes: codes))
        case .unsubscribe:
            let id = try readPacketID(type, &body)
            var filters: [String] = []
            while body.readableBytes > 0 {
                let filter = try readString(type, &body)
                try Topic.validateFilter(filter, maxLevels: maxTopicLevels)
                filters.append(filter)
            }
            if filters.isEmpty { throw .noTopicFilters(type) }
            return .unsubscribe(UnsubscribePacket(packetID: id, filters: filters))
        case .pingreq, .pingresp, .disconnect:
            guard body.readableBytes == 0 else { throw .unexpectedLength(type, length: body.readableBytes) }
            return type == .pingreq ? .pingreq : type == .pingresp ? .pingresp : .disconnect
        }
    }

    static func parsePublish(flags: UInt8, body: inout ByteBuffer, maxTopicLevels: Int = .max) throws(MQTTProtocolError) -> PublishPacket {
        let qos = QoS(rawValue: (flags >> 1) & 0x03)!
        guard let topicLength: UInt16 = body.readInteger(),
            let topic = body.readSlice(length: Int(topicLength))
        else { throw .truncated(.publish) }
        try Topic.validateName(topic, maxLevels: maxTopicLevels)
        var packetID: UInt16?
        if qos != .atMostOnce {
            packetID = try readPacketID(.publish, &body)
        }
        return PublishPacket(topic: topic, payload: body, qos: qos, retain: flags & 1 == 1, dup: flags & 0x08 != 0, packetID: packetID)
    }

    static func parseConnect(body: inout ByteBuffer, maxTopicLevels: Int = .max) throws(MQTTProtocolError) -> ConnectPacket {
        let name = try readString(.connect, &body)
        guard let level: UInt8 = body.readInteger() else { throw .truncated(.connect) }
        guard (name == "MQTT" && level == 4) || (name == "MQIsdp" && level == 3) else {
            throw .unsupportedProtocol(name: name, level: level)
        }
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
        if hasPassword && !hasUsername { throw .passwordWithoutUsername }

        let clientID = try readString(.connect, &body)
        var will: Will?
        if hasWill {
            let topic = try readString(.connect, &body)
            try Topic.validateName(topic, maxLevels: maxTopicLevels)
            let payload = try readBinary(.connect, &body)
            will = Will(topic: topic, payload: payload, qos: QoS(rawValue: willQoSBits)!, retain: willRetain)
        }
        let username = hasUsername ? try readString(.connect, &body) : nil
        let password = hasPassword ? try readBinary(.connect, &body) : nil
        if body.readableBytes != 0 { throw .unexpectedLength(.connect, length: body.readableBytes) }
        return ConnectPacket(
            protocolName: name, protocolLevel: level, cleanSession: flags & 0x02 != 0, keepAlive: keepAlive,
            clientID: clientID, will: will, username: username, password: password)
    }

    // MARK: - Fields

    static func parseAck(_ type: PacketType, _ body: inout ByteBuffer) throws(MQTTProtocolError) -> UInt16 {
        guard body.readableBytes == 2 else { throw .unexpectedLength(type, length: body.readableBytes) }
        return try readPacketID(type, &body)
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
}
