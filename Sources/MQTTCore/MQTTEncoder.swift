import NIOCore

// MARK: - Encoding into a reused ByteBuffer

extension ByteBuffer {
    /// Appends one packet as MQTT 3.1.1. Sizes are computed first, so each packet is written in
    /// one pass.
    public mutating func writeMQTTPacket(_ packet: MQTTPacket) {
        writeMQTTPacket(packet, version: .v3_1_1)
    }

    /// Appends one packet in the layout of `version` (a CONNECT in that of its own level).
    ///
    /// Written as 3.1 or 3.1.1, properties and MQTT 5 options are left out, MQTT 5 failure codes
    /// in SUBACK become 0x80, and `.ackV5`, `.unsubackV5` and `.disconnectV5` are written as their
    /// 3.1.1 packets; `.auth` has no 3.1.1 form and is written as MQTT 5 AUTH.
    public mutating func writeMQTTPacket(_ packet: MQTTPacket, version: ProtocolVersion) {
        if version == .v5 { return writeMQTTPacketV5(packet) }
        switch packet {
        case .publish(let p):
            writePublish(topic: p.topic, payload: p.payload, qos: p.qos, retain: p.retain, dup: p.dup, packetID: p.packetID)
        case .connect(let box):
            writeConnect(box.value)
        case .connack(let c):
            writeInteger(UInt8(0x20))
            writeInteger(UInt8(2))
            writeInteger(UInt8(c.sessionPresent ? 1 : 0))
            writeInteger(c.returnCode.rawValue)
        case .puback(let id): writeAck(0x40, id)
        case .pubrec(let id): writeAck(0x50, id)
        case .pubrel(let id): writeAck(0x62, id)
        case .pubcomp(let id): writeAck(0x70, id)
        case .unsuback(let id): writeAck(0xB0, id)
        case .subscribe(let box):
            let s = box.value
            let length = 2 + s.subscriptions.reduce(0) { $0 + 3 + $1.filter.utf8.count }
            writeInteger(UInt8(0x82))
            writeRemainingLength(length)
            writeInteger(s.packetID)
            for sub in s.subscriptions {
                writeMQTTString(sub.filter)
                writeInteger(sub.qos.rawValue)
            }
        case .suback(let box):
            let s = box.value
            writeInteger(UInt8(0x90))
            writeRemainingLength(2 + s.returnCodes.count)
            writeInteger(s.packetID)
            for code in s.returnCodes { writeInteger(code.reasonCode.isFailure ? 0x80 : code.rawValue) }
        case .unsubscribe(let box):
            let u = box.value
            let length = 2 + u.filters.reduce(0) { $0 + 2 + $1.utf8.count }
            writeInteger(UInt8(0xA2))
            writeRemainingLength(length)
            writeInteger(u.packetID)
            for filter in u.filters { writeMQTTString(filter) }
        case .pingreq: writeInteger(UInt16(0xC000))
        case .pingresp: writeInteger(UInt16(0xD000))
        case .disconnect, .disconnectV5: writeInteger(UInt16(0xE000))
        case .ackV5(let ack): writeAck(ack.kind.firstByte, ack.packetID)
        case .unsubackV5(let box): writeAck(0xB0, box.value.packetID)
        case .auth(let auth): writeReasonAndProperties(0xF0, auth.reasonCode, auth.properties)
        }
    }

    /// Appends a whole PUBLISH. The topic and payload buffers are read from without moving their
    /// reader indices (they are `inout` only to avoid a copy-on-write check).
    public mutating func writePublish(
        topic: ByteBuffer, payload: ByteBuffer, qos: QoS, retain: Bool, dup: Bool, packetID: UInt16?
    ) {
        writePublishHeader(topic: topic, payloadLength: payload.readableBytes, qos: qos, retain: retain, dup: dup, packetID: packetID)
        writeImmutableBuffer(payload)
    }

    /// Appends a PUBLISH's fixed and variable header for a payload of `payloadLength` bytes that
    /// the caller writes next (or hands to the channel as its own buffer, to avoid copying it).
    public mutating func writePublishHeader(
        topic: ByteBuffer, payloadLength: Int, qos: QoS, retain: Bool, dup: Bool, packetID: UInt16?
    ) {
        writePublishHeader(topic: topic, payloadLength: payloadLength, qos: qos, retain: retain, dup: dup, packetID: packetID, propertiesSize: 0)
    }

    /// The MQTT 5 PUBLISH header: as the 3.1.1 one, with the properties after the packet identifier.
    public mutating func writePublishHeader(
        topic: ByteBuffer, payloadLength: Int, qos: QoS, retain: Bool, dup: Bool, packetID: UInt16?,
        properties: MQTTProperties
    ) {
        writePublishHeader(
            topic: topic, payloadLength: payloadLength, qos: qos, retain: retain, dup: dup, packetID: packetID,
            propertiesSize: properties.encodedSizeWithLength)
        writeMQTTProperties(properties)
    }

    /// Fixed header, topic and packet id of a PUBLISH whose properties (`propertiesSize` bytes with
    /// their length; 0 in 3.1.1) and payload follow.
    @inline(__always)
    private mutating func writePublishHeader(
        topic: ByteBuffer, payloadLength: Int, qos: QoS, retain: Bool, dup: Bool, packetID: UInt16?, propertiesSize: Int
    ) {
        let topicLength = topic.readableBytes
        let remaining = 2 + topicLength + (qos == .atMostOnce ? 0 : 2) + propertiesSize + payloadLength
        var first: UInt8 = 0x30 | (qos.rawValue << 1)
        if retain { first |= 0x01 }
        if dup { first |= 0x08 }
        reserveCapacity(minimumWritableBytes: 5 + remaining - payloadLength)
        writeInteger(first)
        writeRemainingLength(remaining)
        writeInteger(UInt16(topicLength))
        writeImmutableBuffer(topic)
        if qos != .atMostOnce { writeInteger(packetID ?? 0) }
    }

    /// Size of the whole PUBLISH frame for these lengths.
    public static func publishFrameSize(topicLength: Int, payloadLength: Int, qos: QoS) -> Int {
        let remaining = 2 + topicLength + (qos == .atMostOnce ? 0 : 2) + payloadLength
        return 1 + remainingLengthSize(remaining) + remaining
    }

    /// Size of the whole MQTT 5 PUBLISH frame for these lengths and properties.
    public static func publishFrameSize(topicLength: Int, payloadLength: Int, qos: QoS, properties: MQTTProperties) -> Int {
        let remaining = 2 + topicLength + (qos == .atMostOnce ? 0 : 2) + properties.encodedSizeWithLength + payloadLength
        return 1 + remainingLengthSize(remaining) + remaining
    }

    static func remainingLengthSize(_ length: Int) -> Int {
        length < 128 ? 1 : length < 16_384 ? 2 : length < 2_097_152 ? 3 : 4
    }

    /// CONNECT, in the layout of its own protocol level.
    mutating func writeConnect(_ c: ConnectPacket) {
        let isV5 = c.protocolLevel == ProtocolVersion.v5.rawValue
        var flags: UInt8 = 0
        if c.cleanSession { flags |= 0x02 }
        var length = 2 + c.protocolName.utf8.count + 1 + 1 + 2 + 2 + c.clientID.utf8.count
        if isV5 { length += c.properties.encodedSizeWithLength }
        if let will = c.will {
            flags |= 0x04 | (will.qos.rawValue << 3)
            if will.retain { flags |= 0x20 }
            length += 2 + will.topic.count + 2 + will.payload.readableBytes
            if isV5 { length += c.willProperties.encodedSizeWithLength }
        }
        if let username = c.username {
            flags |= 0x80
            length += 2 + username.utf8.count
        }
        if let password = c.password {
            flags |= 0x40
            length += 2 + password.readableBytes
        }
        writeInteger(UInt8(0x10))
        writeRemainingLength(length)
        writeMQTTString(c.protocolName)
        writeInteger(c.protocolLevel | (c.isBridge ? 0x80 : 0))
        writeInteger(flags)
        writeInteger(c.keepAlive)
        if isV5 { writeMQTTProperties(c.properties) }
        writeMQTTString(c.clientID)
        if let will = c.will {
            if isV5 { writeMQTTProperties(c.willProperties) }
            writeInteger(UInt16(will.topic.count))
            writeImmutableBuffer(will.topic.bytes)
            writeInteger(UInt16(will.payload.readableBytes))
            writeImmutableBuffer(will.payload)
        }
        if let username = c.username { writeMQTTString(username) }
        if let password = c.password {
            writeInteger(UInt16(password.readableBytes))
            writeImmutableBuffer(password)
        }
    }

    mutating func writeAck(_ first: UInt8, _ id: UInt16) {
        writeInteger(first)
        writeInteger(UInt8(2))
        writeInteger(id)
    }

    mutating func writeMQTTString(_ string: String) {
        writeInteger(UInt16(string.utf8.count))
        writeString(string)
    }

    /// The variable-length remaining length of the fixed header (1 to 4 bytes); the same
    /// encoding is MQTT 5's variable byte integer.
    public mutating func writeRemainingLength(_ length: Int) {
        var value = length
        repeat {
            var byte = UInt8(value & 0x7F)
            value >>= 7
            if value > 0 { byte |= 0x80 }
            writeInteger(byte)
        } while value > 0
    }
}

// MARK: - MQTT 5

extension ByteBuffer {
    mutating func writeMQTTPacketV5(_ packet: MQTTPacket) {
        switch packet {
        case .publish(let p):
            writePublishHeader(
                topic: p.topic, payloadLength: p.payload.readableBytes, qos: p.qos, retain: p.retain, dup: p.dup,
                packetID: p.packetID, properties: p.properties.withBareAlias(p.bareAlias))
            writeImmutableBuffer(p.payload)
        case .connect(let box):
            writeConnect(box.value)
        case .connack(let c):
            writeInteger(UInt8(0x20))
            writeRemainingLength(2 + c.properties.encodedSizeWithLength)
            writeInteger(UInt8(c.sessionPresent ? 1 : 0))
            writeInteger(c.reasonCode.rawValue)
            writeMQTTProperties(c.properties)
        case .puback(let id): writeAck(0x40, id)
        case .pubrec(let id): writeAck(0x50, id)
        case .pubrel(let id): writeAck(0x62, id)
        case .pubcomp(let id): writeAck(0x70, id)
        case .ackV5(let ack): writeAckV5(ack)
        case .subscribe(let box):
            let s = box.value
            let length = 2 + s.properties.encodedSizeWithLength + s.subscriptions.reduce(0) { $0 + 3 + $1.filter.utf8.count }
            writeInteger(UInt8(0x82))
            writeRemainingLength(length)
            writeInteger(s.packetID)
            writeMQTTProperties(s.properties)
            for sub in s.subscriptions {
                writeMQTTString(sub.filter)
                writeInteger(sub.optionsByte)
            }
        case .suback(let box):
            let s = box.value
            writeInteger(UInt8(0x90))
            writeRemainingLength(2 + s.properties.encodedSizeWithLength + s.returnCodes.count)
            writeInteger(s.packetID)
            writeMQTTProperties(s.properties)
            for code in s.returnCodes { writeInteger(code.rawValue) }
        case .unsubscribe(let box):
            let u = box.value
            let length = 2 + u.properties.encodedSizeWithLength + u.filters.reduce(0) { $0 + 2 + $1.utf8.count }
            writeInteger(UInt8(0xA2))
            writeRemainingLength(length)
            writeInteger(u.packetID)
            writeMQTTProperties(u.properties)
            for filter in u.filters { writeMQTTString(filter) }
        case .unsuback(let id):
            // No reason codes to give: an UNSUBACK for an UNSUBSCRIBE of no filter.
            writeUnsubackV5(UnsubackPacket(packetID: id, reasonCodes: []))
        case .unsubackV5(let box): writeUnsubackV5(box.value)
        case .pingreq: writeInteger(UInt16(0xC000))
        case .pingresp: writeInteger(UInt16(0xD000))
        case .disconnect: writeInteger(UInt16(0xE000))
        case .disconnectV5(let d): writeReasonAndProperties(0xE0, d.reasonCode, d.properties)
        case .auth(let a): writeReasonAndProperties(0xF0, a.reasonCode, a.properties)
        }
    }

    /// PUBACK, PUBREC, PUBREL, PUBCOMP: the reason code and properties only when needed (§3.4.2.1).
    mutating func writeAckV5(_ ack: AckPacket) {
        if ack.properties.isEmpty {
            if ack.reasonCode == .success { return writeAck(ack.kind.firstByte, ack.packetID) }
            writeInteger(ack.kind.firstByte)
            writeInteger(UInt8(3))
            writeInteger(ack.packetID)
            writeInteger(ack.reasonCode.rawValue)
            return
        }
        writeInteger(ack.kind.firstByte)
        writeRemainingLength(3 + ack.properties.encodedSizeWithLength)
        writeInteger(ack.packetID)
        writeInteger(ack.reasonCode.rawValue)
        writeMQTTProperties(ack.properties)
    }

    mutating func writeUnsubackV5(_ u: UnsubackPacket) {
        writeInteger(UInt8(0xB0))
        writeRemainingLength(2 + u.properties.encodedSizeWithLength + u.reasonCodes.count)
        writeInteger(u.packetID)
        writeMQTTProperties(u.properties)
        for code in u.reasonCodes { writeInteger(code.rawValue) }
    }

    /// DISCONNECT and AUTH: empty for success without properties, else the code, then the
    /// properties if there are any.
    mutating func writeReasonAndProperties(_ first: UInt8, _ code: ReasonCode, _ properties: MQTTProperties) {
        writeInteger(first)
        if properties.isEmpty {
            if code == .success {
                writeInteger(UInt8(0))
                return
            }
            writeInteger(UInt8(1))
            writeInteger(code.rawValue)
            return
        }
        writeRemainingLength(1 + properties.encodedSizeWithLength)
        writeInteger(code.rawValue)
        writeMQTTProperties(properties)
    }
}

extension AckPacket.Kind {
    /// The fixed header's first byte (PUBREL has flag bits 0010).
    var firstByte: UInt8 {
        switch self {
        case .puback: 0x40
        case .pubrec: 0x50
        case .pubrel: 0x62
        case .pubcomp: 0x70
        }
    }
}
