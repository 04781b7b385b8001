/// Why a byte stream is not valid MQTT (3.1.1 or 5.0). Each rule has its own case so that a log
/// line (and a test) says exactly which one was broken; `reasonCode` gives the MQTT 5 reason code
/// a CONNACK or DISCONNECT reports it with.
public enum MQTTProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The type nibble is 0, or 15 (AUTH) before MQTT 5.
    case invalidPacketType(UInt8)
    /// The fixed header's flag bits are not the ones the packet type requires.
    case reservedFlags(PacketType, flags: UInt8)
    /// The remaining length runs past four bytes.
    case malformedRemainingLength
    /// The remaining length is over the configured limit; rejected before the body is buffered.
    case packetTooLarge(length: Int, limit: Int)
    /// The body ends before a field it must hold.
    case truncated(PacketType)
    /// The body holds bytes after its last field, or a fixed-size body has the wrong size.
    case unexpectedLength(PacketType, length: Int)
    /// A PUBLISH with both QoS bits set.
    case invalidQoS(PacketType)
    /// A QoS 0 PUBLISH with the DUP flag set (MQTT-3.3.1-2).
    case dupOnQoS0
    /// A string that is not well-formed UTF-8.
    case invalidUTF8
    /// A string that contains U+0000.
    case nullCharacter
    /// A topic name that is empty or holds a wildcard.
    case invalidTopicName(String)
    /// A topic filter that is empty or has a misplaced `#` or `+`.
    case invalidTopicFilter(String)
    /// A filter that starts with `$share/` but is not a valid shared subscription (the filter,
    /// and what is wrong with it).
    case invalidSharedSubscription(String, reason: String)
    /// A topic name or filter with more levels than the configured `max_topic_levels`.
    case tooManyTopicLevels(levels: Int, limit: Int)
    /// CONNECT's reserved flag bit is set.
    case connectReservedFlag
    /// CONNECT asks for will QoS 3.
    case invalidWillQoS
    /// CONNECT has will QoS or will retain without the will flag.
    case willFlagsWithoutWill
    /// CONNECT has the password flag without the user name flag.
    case passwordWithoutUsername
    /// CONNECT names a protocol or level this broker does not speak (answered with CONNACK 1).
    case unsupportedProtocol(name: String, level: UInt8)
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter.
    case noTopicFilters(PacketType)
    /// A SUBSCRIBE options byte with reserved bits set or QoS 3.
    case invalidSubscriptionOptions(UInt8)
    /// A packet identifier of 0 where a non-zero one is required.
    case zeroPacketID(PacketType)
    /// CONNACK's reserved acknowledge flags or an unknown return code (client side).
    case invalidConnack

    // MQTT 5

    /// A variable byte integer in the body (property length, subscription identifier) runs
    /// past four bytes.
    case malformedVariableByteInteger(PacketType)
    /// The property length runs past the end of the packet.
    case propertyLengthOverrun(PacketType, length: Int, available: Int)
    /// A property identifier MQTT 5 does not define.
    case unknownProperty(PacketType, identifier: UInt8)
    /// A property MQTT 5 does not allow in this packet (CONNECT stands for its will properties too).
    case propertyNotAllowed(PacketType, PropertyIdentifier)
    /// A property given twice (only user properties, and subscription identifiers in PUBLISH, repeat).
    case duplicateProperty(PacketType, PropertyIdentifier)
    /// A property value MQTT 5 forbids: 0 where it is not allowed, a flag other than 0 or 1, a
    /// QoS above 1 as maximum QoS, authentication data without a method.
    case invalidPropertyValue(PacketType, PropertyIdentifier)
    /// A reason code MQTT 5 does not allow in this packet.
    case invalidReasonCode(PacketType, UInt8)
    /// A payload marked as UTF-8 (payload format indicator 1) that is not well-formed UTF-8.
    case payloadFormatInvalid
    /// A subscription with the no-local option on a shared subscription (`$share/...`).
    case noLocalOnSharedSubscription(String)
    /// A PUBLISH with an empty topic name and no topic alias to stand for it (§3.3.2.3.4).
    case emptyTopicWithoutAlias

    public var description: String {
        switch self {
        case .invalidPacketType(let t): "invalid packet type \(t)"
        case .reservedFlags(let t, let f): "reserved flag bits 0x\(String(f, radix: 16)) in \(t)"
        case .malformedRemainingLength: "remaining length longer than 4 bytes, or (MQTT 5) not in the fewest bytes"
        case .packetTooLarge(let l, let limit): "packet of \(l) bytes is over max_packet_size \(limit)"
        case .truncated(let t): "\(t) body ends before its fields do"
        case .unexpectedLength(let t, let l): "\(t) body of unexpected length \(l)"
        case .invalidQoS(let t): "QoS 3 in \(t)"
        case .dupOnQoS0: "DUP flag set on a QoS 0 PUBLISH"
        case .invalidUTF8: "string is not well-formed UTF-8"
        case .nullCharacter: "string contains U+0000"
        case .invalidTopicName(let n): "invalid topic name \"\(n)\""
        case .invalidTopicFilter(let f): "invalid topic filter \"\(f)\""
        case .invalidSharedSubscription(let f, let reason): "invalid shared subscription \"\(f)\": \(reason)"
        case .tooManyTopicLevels(let l, let limit): "topic of \(l) levels is over max_topic_levels \(limit)"
        case .connectReservedFlag: "CONNECT reserved flag is set"
        case .invalidWillQoS: "CONNECT will QoS is 3"
        case .willFlagsWithoutWill: "CONNECT will QoS or retain set without the will flag"
        case .passwordWithoutUsername: "CONNECT password flag set without user name flag"
        case .unsupportedProtocol(let n, let l): "unsupported protocol \"\(n)\" level \(l)"
        case .noTopicFilters(let t): "\(t) without topic filters"
        case .invalidSubscriptionOptions(let o): "SUBSCRIBE options byte 0x\(String(o, radix: 16)) is invalid"
        case .zeroPacketID(let t): "\(t) with packet identifier 0"
        case .invalidConnack: "invalid CONNACK"
        case .malformedVariableByteInteger(let t): "variable byte integer longer than 4 bytes in \(t)"
        case .propertyLengthOverrun(let t, let l, let a): "\(t) property length \(l) runs past the \(a) bytes left"
        case .unknownProperty(let t, let id): "unknown property identifier 0x\(String(id, radix: 16)) in \(t)"
        case .propertyNotAllowed(let t, let id): "property \(id) is not allowed in \(t)"
        case .duplicateProperty(let t, let id): "property \(id) appears twice in \(t)"
        case .invalidPropertyValue(let t, let id): "invalid value of property \(id) in \(t)"
        case .invalidReasonCode(let t, let c): "reason code 0x\(String(c, radix: 16)) is not allowed in \(t)"
        case .payloadFormatInvalid: "payload marked as UTF-8 is not well-formed UTF-8"
        case .noLocalOnSharedSubscription(let f): "no local option on shared subscription \"\(f)\""
        case .emptyTopicWithoutAlias: "empty topic name without a topic alias"
        }
    }

    /// The MQTT 5 reason code that reports this error in CONNACK or DISCONNECT (§4.13): malformed
    /// packet for bytes that cannot be parsed (a property the packet type does not allow among
    /// them, §2.2.2.2), protocol error for parsed packets that break a rule.
    public var reasonCode: ReasonCode {
        switch self {
        case .invalidPacketType, .reservedFlags, .malformedRemainingLength, .truncated, .unexpectedLength,
            .invalidQoS, .dupOnQoS0, .invalidUTF8, .nullCharacter, .connectReservedFlag, .invalidWillQoS, .willFlagsWithoutWill,
            .passwordWithoutUsername, .invalidConnack, .malformedVariableByteInteger, .propertyLengthOverrun,
            .unknownProperty, .propertyNotAllowed:
            .malformedPacket
        case .packetTooLarge: .packetTooLarge
        case .invalidTopicName: .topicNameInvalid
        case .invalidTopicFilter, .invalidSharedSubscription: .topicFilterInvalid
        case .tooManyTopicLevels: .implementationSpecificError
        case .unsupportedProtocol: .unsupportedProtocolVersion
        case .invalidPropertyValue(_, .topicAlias): .topicAliasInvalid  // 0 (§3.3.2.3.4)
        case .noTopicFilters, .zeroPacketID, .duplicateProperty, .invalidPropertyValue,
            .invalidReasonCode, .noLocalOnSharedSubscription, .emptyTopicWithoutAlias:
            .protocolError
        case .invalidSubscriptionOptions(let options):
            // Retain handling 3 is a protocol error (§3.8.3.1); reserved bits or QoS 3 are malformed.
            options & 0xC0 == 0 && options & 0x03 != 3 ? .protocolError : .malformedPacket
        case .payloadFormatInvalid: .payloadFormatInvalid
        }
    }
}
