import NIOCore

/// MQTT quality of service levels.
public enum QoS: UInt8, Sendable, Comparable, CaseIterable {
    case atMostOnce = 0
    case atLeastOnce = 1
    case exactlyOnce = 2

    public static func < (lhs: QoS, rhs: QoS) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// The fourteen MQTT 3.1.1 control packet types, by their fixed-header type nibble.
public enum PacketType: UInt8, Sendable {
    case connect = 1, connack, publish, puback, pubrec, pubrel, pubcomp
    case subscribe, suback, unsubscribe, unsuback, pingreq, pingresp, disconnect
}

/// An application message: topic, payload, QoS and retain flag. A will carried in CONNECT is one,
/// and so is a message as the broker's hooks see it.
public struct ApplicationMessage: Equatable, Sendable {
    public var topic: String
    public var payload: ByteBuffer
    public var qos: QoS
    public var retain: Bool

    public init(topic: String, payload: ByteBuffer, qos: QoS, retain: Bool) {
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
    }
}

/// The will message carried in CONNECT.
public typealias Will = ApplicationMessage

/// CONNECT: kept behind a class box in `MQTTPacket` because it is large and rare.
public struct ConnectPacket: Equatable, Sendable {
    /// "MQTT" (level 4) or "MQIsdp" (level 3).
    public var protocolName: String
    public var protocolLevel: UInt8
    public var cleanSession: Bool
    public var keepAlive: UInt16
    public var clientID: String
    public var will: Will?
    public var username: String?
    public var password: ByteBuffer?

    public init(
        protocolName: String = "MQTT", protocolLevel: UInt8 = 4, cleanSession: Bool = true,
        keepAlive: UInt16 = 60, clientID: String, will: Will? = nil,
        username: String? = nil, password: ByteBuffer? = nil
    ) {
        self.protocolName = protocolName
        self.protocolLevel = protocolLevel
        self.cleanSession = cleanSession
        self.keepAlive = keepAlive
        self.clientID = clientID
        self.will = will
        self.username = username
        self.password = password
    }
}

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
public enum ConnectReturnCode: UInt8, Sendable {
    case accepted = 0
    case unacceptableProtocolVersion = 1
    case identifierRejected = 2
    case serverUnavailable = 3
    case badUsernameOrPassword = 4
    case notAuthorized = 5
}

public struct ConnackPacket: Equatable, Sendable {
    public var sessionPresent: Bool
    public var returnCode: ConnectReturnCode

    public init(sessionPresent: Bool, returnCode: ConnectReturnCode) {
        self.sessionPresent = sessionPresent
        self.returnCode = returnCode
    }
}

/// PUBLISH. Topic and payload are slices of the buffer the packet was read from: decoding copies
/// nothing and makes no `String`.
public struct PublishPacket: Equatable, Sendable {
    public var topic: ByteBuffer
    public var payload: ByteBuffer
    public var qos: QoS
    public var retain: Bool
    public var dup: Bool
    /// Present exactly when `qos > 0`.
    public var packetID: UInt16?

    public init(topic: ByteBuffer, payload: ByteBuffer, qos: QoS, retain: Bool = false, dup: Bool = false, packetID: UInt16? = nil) {
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packetID = packetID
    }

    public init(topic: String, payload: String, qos: QoS = .atMostOnce, retain: Bool = false, dup: Bool = false, packetID: UInt16? = nil) {
        self.init(topic: ByteBuffer(string: topic), payload: ByteBuffer(string: payload), qos: qos, retain: retain, dup: dup, packetID: packetID)
    }

    /// The topic as a `String` (allocates; not for the fast path).
    public var topicString: String { String(buffer: topic) }
}

/// One topic filter and requested QoS in SUBSCRIBE.
public struct Subscription: Equatable, Sendable {
    public var filter: String
    public var qos: QoS

    public init(filter: String, qos: QoS) {
        self.filter = filter
        self.qos = qos
    }
}

public struct SubscribePacket: Equatable, Sendable {
    public var packetID: UInt16
    public var subscriptions: [Subscription]

    public init(packetID: UInt16, subscriptions: [Subscription]) {
        self.packetID = packetID
        self.subscriptions = subscriptions
    }
}

/// One SUBACK return code: a granted QoS or failure (0x80).
public enum SubackReturnCode: Equatable, Sendable {
    case granted(QoS)
    case failure

    public var rawValue: UInt8 {
        switch self {
        case .granted(let qos): return qos.rawValue
        case .failure: return 0x80
        }
    }
}

public struct SubackPacket: Equatable, Sendable {
    public var packetID: UInt16
    public var returnCodes: [SubackReturnCode]

    public init(packetID: UInt16, returnCodes: [SubackReturnCode]) {
        self.packetID = packetID
        self.returnCodes = returnCodes
    }
}

public struct UnsubscribePacket: Equatable, Sendable {
    public var packetID: UInt16
    public var filters: [String]

    public init(packetID: UInt16, filters: [String]) {
        self.packetID = packetID
        self.filters = filters
    }
}

/// An MQTT 3.1.1 control packet. Large, rare packets sit behind a box so the enum stays small.
public enum MQTTPacket: Equatable, Sendable {
    case connect(Box<ConnectPacket>)
    case connack(ConnackPacket)
    case publish(PublishPacket)
    case puback(packetID: UInt16)
    case pubrec(packetID: UInt16)
    case pubrel(packetID: UInt16)
    case pubcomp(packetID: UInt16)
    case subscribe(Box<SubscribePacket>)
    case suback(Box<SubackPacket>)
    case unsubscribe(Box<UnsubscribePacket>)
    case unsuback(packetID: UInt16)
    case pingreq
    case pingresp
    case disconnect

    public static func connect(_ p: ConnectPacket) -> MQTTPacket { .connect(Box(p)) }
    public static func subscribe(_ p: SubscribePacket) -> MQTTPacket { .subscribe(Box(p)) }
    public static func suback(_ p: SubackPacket) -> MQTTPacket { .suback(Box(p)) }
    public static func unsubscribe(_ p: UnsubscribePacket) -> MQTTPacket { .unsubscribe(Box(p)) }

    public var type: PacketType {
        switch self {
        case .connect: .connect
        case .connack: .connack
        case .publish: .publish
        case .puback: .puback
        case .pubrec: .pubrec
        case .pubrel: .pubrel
        case .pubcomp: .pubcomp
        case .subscribe: .subscribe
        case .suback: .suback
        case .unsubscribe: .unsubscribe
        case .unsuback: .unsuback
        case .pingreq: .pingreq
        case .pingresp: .pingresp
        case .disconnect: .disconnect
        }
    }
}

/// An immutable box that keeps large packet bodies out of the enum's inline storage.
public final class Box<Value: Equatable & Sendable>: Equatable, Sendable {
    public let value: Value
    public init(_ value: Value) { self.value = value }
    public static func == (lhs: Box, rhs: Box) -> Bool { lhs.value == rhs.value }
}
