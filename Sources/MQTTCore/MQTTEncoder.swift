import NIOCore

// MARK: - Encoding into a reused ByteBuffer

extension ByteBuffer {
    /// Appends one packet. Sizes are computed first, so each packet is written in one pass.
    public mutating func writeMQTTPacket(_ packet: MQTTPacket) {
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
            for code in s.returnCodes { writeInteger(code.rawValue) }
        case .unsubscribe(let box):
            let u = box.value
            let length = 2 + u.filters.reduce(0) { $0 + 2 + $1.utf8.count }
            writeInteger(UInt8(0xA2))
            writeRemainingLength(length)
            writeInteger(u.packetID)
            for filter in u.filters { writeMQTTString(filter) }
        case .pingreq: writeInteger(UInt16(0xC000))
        case .pingresp: writeInteger(UInt16(0xD000))
        case .disconnect: writeInteger(UInt16(0xE000))
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
        let topicLength = topic.readableBytes
        let remaining = 2 + topicLength + (qos == .atMostOnce ? 0 : 2) + payloadLength
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

    static func remainingLengthSize(_ length: Int) -> Int {
        length < 128 ? 1 : length < 16_384 ? 2 : length < 2_097_152 ? 3 : 4
    }

    mutating func writeConnect(_ c: ConnectPacket) {
        var flags: UInt8 = 0
        if c.cleanSession { flags |= 0x02 }
        var length = 2 + c.protocolName.utf8.count + 1 + 1 + 2 + 2 + c.clientID.utf8.count
        if let will = c.will {
            flags |= 0x04 | (will.qos.rawValue << 3)
            if will.retain { flags |= 0x20 }
            length += 2 + will.topic.utf8.count + 2 + will.payload.readableBytes
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
        writeInteger(c.protocolLevel)
        writeInteger(flags)
        writeInteger(c.keepAlive)
        writeMQTTString(c.clientID)
        if let will = c.will {
            writeMQTTString(will.topic)
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

    /// The variable-length remaining length of the fixed header (1 to 4 bytes).
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
