import NIOCore

// MARK: - MQTT 5 bodies

extension MQTTDecoder {
    /// The bodies whose MQTT 5 layout differs from 3.1.1 (PUBLISH and CONNECT are parsed apart).
    func parseV5Body(type: PacketType, body: inout ByteBuffer) throws(MQTTProtocolError) -> MQTTPacket {
        switch type {
        case .connack: return .connack(try Self.parseConnackV5(&body))
        case .puback: return try Self.parseAckV5(.puback, &body)
        case .pubrec: return try Self.parseAckV5(.pubrec, &body)
        case .pubrel: return try Self.parseAckV5(.pubrel, &body)
        case .pubcomp: return try Self.parseAckV5(.pubcomp, &body)
        case .subscribe: return .subscribe(try parseSubscribeV5(&body))
        case .suback: return .suback(try Self.parseSubackV5(&body))
        case .unsubscribe:
            let id = try Self.readPacketID(type, &body)
            let properties = try MQTTProperties.read(.unsubscribe, from: &body)
            let filters = try readFilters(type, &body)
            return .unsubscribe(UnsubscribePacket(packetID: id, filters: filters, properties: properties))
        case .unsuback: return .unsubackV5(try Self.parseUnsubackV5(&body))
        case .pingreq, .pingresp:
            try Self.expectEmpty(type, body)
            return type == .pingreq ? .pingreq : .pingresp
        case .disconnect:
            let (code, properties) = try Self.readReasonAndProperties(.disconnect, .disconnect, &body)
            if code == .normalDisconnection && properties.isEmpty { return .disconnect }
            return .disconnectV5(DisconnectPacket(reasonCode: code, properties: properties))
        case .auth:
            let (code, properties) = try Self.readReasonAndProperties(.auth, .auth, &body)
            return .auth(AuthPacket(reasonCode: code, properties: properties))
        case .connect, .publish:
            preconditionFailure("\(type) is parsed by parseBody")
        }
    }

    static func parseConnackV5(_ body: inout ByteBuffer) throws(MQTTProtocolError) -> ConnackPacket {
        guard let ackFlags: UInt8 = body.readInteger(), let raw: UInt8 = body.readInteger() else {
            throw .truncated(.connack)
        }
        let code = try reasonCode(raw, .connack)
        let sessionPresent = ackFlags & 1 == 1
        // A refusal never has a session (§3.2.2.1.1).
        guard ackFlags & 0xFE == 0, !(sessionPresent && code.isFailure) else { throw .invalidConnack }
        let properties = try MQTTProperties.read(.connack, from: &body)
        try expectEmpty(.connack, body)
        return ConnackPacket(sessionPresent: sessionPresent, reasonCode: code, properties: properties)
    }

    /// PUBACK, PUBREC, PUBREL, PUBCOMP: packet identifier, then reason code and properties, each
    /// of which may be left out (§3.4.2.1). Success without properties is the 3.1.1 case.
    static func parseAckV5(_ kind: AckPacket.Kind, _ body: inout ByteBuffer) throws(MQTTProtocolError) -> MQTTPacket {
        let type = kind.packetType
        let id = try readPacketID(type, &body)
        let (code, properties) = try readReasonAndProperties(type, .ack, &body)
        guard code == .success && properties.isEmpty else {
            return .ackV5(AckPacket(kind, packetID: id, reasonCode: code, properties: properties))
        }
        switch kind {
        case .puback: return .puback(packetID: id)
        case .pubrec: return .pubrec(packetID: id)
        case .pubrel: return .pubrel(packetID: id)
        case .pubcomp: return .pubcomp(packetID: id)
        }
    }

    func parseSubscribeV5(_ body: inout ByteBuffer) throws(MQTTProtocolError) -> SubscribePacket {
        let type = PacketType.subscribe
        let id = try Self.readPacketID(type, &body)
        let properties = try MQTTProperties.read(.subscribe, from: &body)
        var subscriptions: [Subscription] = []
        while body.readableBytes > 0 {
            let filter = try Self.readString(type, &body)
            try Topic.validateFilter(filter, maxLevels: maxTopicLevels)
            guard let options: UInt8 = body.readInteger() else { throw .truncated(type) }
            // Bits 6-7 reserved, QoS 3 and retain handling 3 are invalid (§3.8.3.1).
            guard options & 0xC0 == 0, let qos = QoS(rawValue: options & 0x03),
                let retainHandling = RetainHandling(rawValue: (options >> 4) & 0x03)
            else { throw .invalidSubscriptionOptions(options) }
            let noLocal = options & 0x04 != 0
            if noLocal && filter.hasPrefix("$share/") { throw .noLocalOnSharedSubscription(filter) }
            subscriptions.append(
                Subscription(
                    filter: filter, qos: qos, noLocal: noLocal, retainAsPublished: options & 0x08 != 0,
                    retainHandling: retainHandling))
        }
        if subscriptions.isEmpty { throw .noTopicFilters(type) }
        return SubscribePacket(packetID: id, subscriptions: subscriptions, properties: properties)
    }

    static func parseSubackV5(_ body: inout ByteBuffer) throws(MQTTProtocolError) -> SubackPacket {
        let id = try readPacketID(.suback, &body)
        let properties = try MQTTProperties.read(.suback, from: &body)
        var codes: [SubackReturnCode] = []
        codes.reserveCapacity(body.readableBytes)
        while let raw: UInt8 = body.readInteger() {
            let code = try reasonCode(raw, .suback)
            switch code {
            case .grantedQoS0: codes.append(.granted(.atMostOnce))
            case .grantedQoS1: codes.append(.granted(.atLeastOnce))
            case .grantedQoS2: codes.append(.granted(.exactlyOnce))
            case .unspecifiedError: codes.append(.failure)
            default: codes.append(.refused(code))
            }
        }
        return SubackPacket(packetID: id, returnCodes: codes, properties: properties)
    }

    static func parseUnsubackV5(_ body: inout ByteBuffer) throws(MQTTProtocolError) -> UnsubackPacket {
        let id = try readPacketID(.unsuback, &body)
        let properties = try MQTTProperties.read(.unsuback, from: &body)
        var codes: [ReasonCode] = []
        codes.reserveCapacity(body.readableBytes)
        while let raw: UInt8 = body.readInteger() {
            codes.append(try reasonCode(raw, .unsuback))
        }
        return UnsubackPacket(packetID: id, reasonCodes: codes, properties: properties)
    }

    /// An optional reason code (success when the body ends first) and then optional properties
    /// (none when the body ends after the code), as in acknowledgements, DISCONNECT and AUTH.
    static func readReasonAndProperties(
        _ type: PacketType, _ context: PropertyContext, _ body: inout ByteBuffer
    ) throws(MQTTProtocolError) -> (ReasonCode, MQTTProperties) {
        guard let raw: UInt8 = body.readInteger() else { return (.success, MQTTProperties()) }
        let code = try reasonCode(raw, type)
        let properties = body.readableBytes > 0 ? try MQTTProperties.read(context, from: &body, type: type) : MQTTProperties()
        try expectEmpty(type, body)
        return (code, properties)
    }

    /// A reason code that the standard allows in `type`.
    static func reasonCode(_ raw: UInt8, _ type: PacketType) throws(MQTTProtocolError) -> ReasonCode {
        guard let code = ReasonCode(rawValue: raw), code.isAllowed(in: type) else { throw .invalidReasonCode(type, raw) }
        return code
    }
}
