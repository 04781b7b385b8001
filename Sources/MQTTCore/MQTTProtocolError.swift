/// Why a byte stream is not valid MQTT 3.1.1. Each rule has its own case so that a log line (and a
/// test) says exactly which one was broken.
public enum MQTTProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The type nibble is 0 or 15.
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
    /// A string that is not well-formed UTF-8.
    case invalidUTF8
    /// A string that contains U+0000.
    case nullCharacter
    /// A topic name that is empty or holds a wildcard.
    case invalidTopicName(String)
    /// A topic filter that is empty or has a misplaced `#` or `+`.
    case invalidTopicFilter(String)
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

    public var description: String {
        switch self {
        case .invalidPacketType(let t): "invalid packet type \(t)"
        case .reservedFlags(let t, let f): "reserved flag bits 0x\(String(f, radix: 16)) in \(t)"
        case .malformedRemainingLength: "remaining length longer than 4 bytes"
        case .packetTooLarge(let l, let limit): "packet of \(l) bytes is over max_packet_size \(limit)"
        case .truncated(let t): "\(t) body ends before its fields do"
        case .unexpectedLength(let t, let l): "\(t) body of unexpected length \(l)"
        case .invalidQoS(let t): "QoS 3 in \(t)"
        case .invalidUTF8: "string is not well-formed UTF-8"
        case .nullCharacter: "string contains U+0000"
        case .invalidTopicName(let n): "invalid topic name \"\(n)\""
        case .invalidTopicFilter(let f): "invalid topic filter \"\(f)\""
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
        }
    }
}
