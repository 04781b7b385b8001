/// An MQTT protocol version, by the protocol level its CONNECT carries.
public enum ProtocolVersion: UInt8, Sendable, CaseIterable, Comparable, CustomStringConvertible {
    /// MQTT 3.1 ("MQIsdp", level 3): its packets are those of 3.1.1.
    case v3_1 = 3
    /// MQTT 3.1.1 ("MQTT", level 4).
    case v3_1_1 = 4
    /// MQTT 5.0 ("MQTT", level 5): properties, reason codes and AUTH.
    case v5 = 5

    /// The protocol name CONNECT carries with this level.
    public var protocolName: String { self == .v3_1 ? "MQIsdp" : "MQTT" }

    public static func < (lhs: ProtocolVersion, rhs: ProtocolVersion) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String {
        switch self {
        case .v3_1: "MQTT 3.1"
        case .v3_1_1: "MQTT 3.1.1"
        case .v5: "MQTT 5.0"
        }
    }
}

/// A set of protocol versions, e.g. those a decoder accepts in CONNECT. A bit set, so that a
/// decoder holding one stays a plain value that copies without reference counting.
public struct ProtocolVersionSet: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8

    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// The set of one version.
    public init(_ version: ProtocolVersion) { self.rawValue = 1 << version.rawValue }

    /// MQTT 3.1 (level 3).
    public static let v3_1 = ProtocolVersionSet(.v3_1)
    /// MQTT 3.1.1 (level 4).
    public static let v3_1_1 = ProtocolVersionSet(.v3_1_1)
    /// MQTT 5.0 (level 5).
    public static let v5 = ProtocolVersionSet(.v5)
    /// 3.1 and 3.1.1: what the broker speaks today.
    public static let mqtt3: ProtocolVersionSet = [.v3_1, .v3_1_1]
    /// Every version the codec can read.
    public static let all: ProtocolVersionSet = [.v3_1, .v3_1_1, .v5]

    /// Whether `version` is in the set.
    public func contains(_ version: ProtocolVersion) -> Bool { contains(ProtocolVersionSet(version)) }
}
