import NIOCore

/// MQTT quality of service levels.
public enum QoS: UInt8, Sendable, Comparable, CaseIterable {
    case atMostOnce = 0
    case atLeastOnce = 1
    case exactlyOnce = 2

    public static func < (lhs: QoS, rhs: QoS) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// The MQTT control packet types, by their fixed-header type nibble: the fourteen of MQTT 3.1.1,
/// and AUTH (15), which only MQTT 5 has.
public enum PacketType: UInt8, Sendable {
    case connect = 1, connack, publish, puback, pubrec, pubrel, pubcomp
    case subscribe, suback, unsubscribe, unsuback, pingreq, pingresp, disconnect
    /// MQTT 5 only.
    case auth
}

/// An application message: topic, payload, QoS and retain flag. The one message type, from
/// decode to delivery: a PUBLISH routed by the broker, a will carried in CONNECT, a message as
/// the broker's hooks see it, a retained or queued message.
///
/// The payload (and the topic's bytes) may be slices of the publisher's read buffer: nothing is
/// copied on the way through unless the broker keeps the message (`isCompact` then says it holds
/// only its own bytes). QoS and the two flags share one byte, so the whole is 55 bytes (stride
/// 56: no larger than the broker's message was with a bare `ByteBuffer` topic).
public struct ApplicationMessage: Sendable {
    public var payload: ByteBuffer
    public var topic: TopicName
    /// In the topic's tail padding: before `properties`, so that the stride stays 64 bytes.
    private var bits: UInt8
    /// MQTT 5: the PUBLISH (or will) properties that travel with the message to MQTT 5
    /// subscribers. Empty (one nil reference) for a 3.1.1 publisher's.
    public var properties: MQTTProperties

    public init(
        topic: TopicName, payload: ByteBuffer, qos: QoS, retain: Bool, isCompact: Bool = false,
        properties: MQTTProperties = MQTTProperties()
    ) {
        self.payload = payload
        self.topic = topic
        self.properties = properties
        self.bits = qos.rawValue | (retain ? 0x04 : 0) | (isCompact ? 0x08 : 0)
    }

    public var qos: QoS {
        get { QoS(rawValue: bits & 0x03)! }
        set { bits = (bits & ~0x03) | newValue.rawValue }
    }

    public var retain: Bool {
        get { bits & 0x04 != 0 }
        set { bits = newValue ? bits | 0x04 : bits & ~0x04 }
    }

    /// Topic and payload hold only their own bytes (the broker made a compacted copy).
    public var isCompact: Bool {
        get { bits & 0x08 != 0 }
        set { bits = newValue ? bits | 0x08 : bits & ~0x08 }
    }
}

extension ApplicationMessage: Equatable {
    /// Same topic, payload, QoS, retain flag and properties (whether it is compacted does not matter).
    public static func == (a: ApplicationMessage, b: ApplicationMessage) -> Bool {
        a.topic == b.topic && a.payload == b.payload && a.qos == b.qos && a.retain == b.retain && a.properties == b.properties
    }
}

/// The will message carried in CONNECT.
public typealias Will = ApplicationMessage

/// CONNECT: kept behind a class box in `MQTTPacket` because it is large and rare. It is read and
/// written in the layout of its own `protocolLevel`, whatever version the codec is set to.
public struct ConnectPacket: Equatable, Sendable {
    /// "MQTT" (levels 4 and 5) or "MQIsdp" (level 3).
    public var protocolName: String
    /// 3, 4 or 5.
    public var protocolLevel: UInt8
    /// Clean session (3.1.1), clean start (5.0).
    public var cleanSession: Bool
    public var keepAlive: UInt16
    public var clientID: String
    public var will: Will?
    public var username: String?
    public var password: ByteBuffer?
    /// MQTT 5: the CONNECT properties.
    public var properties: MQTTProperties
    /// MQTT 5: the will properties (empty without a will).
    public var willProperties: MQTTProperties
    /// Mosquitto's bridge bit (0x80 on a 3.1 or 3.1.1 level, its `try_private`): the client is a
    /// broker bridging to this one, and does not want its own messages back.
    public var isBridge = false

    public init(
        protocolName: String = "MQTT", protocolLevel: UInt8 = 4, cleanSession: Bool = true,
        keepAlive: UInt16 = 60, clientID: String, will: Will? = nil,
        username: String? = nil, password: ByteBuffer? = nil,
        properties: MQTTProperties = MQTTProperties(), willProperties: MQTTProperties = MQTTProperties()
    ) {
        self.protocolName = protocolName
        self.protocolLevel = protocolLevel
        self.cleanSession = cleanSession
        self.keepAlive = keepAlive
        self.clientID = clientID
        self.will = will
        self.username = username
        self.password = password
        self.properties = properties
        self.willProperties = willProperties
    }

    /// The version this CONNECT asks for (nil for a level the codec does not know).
    public var protocolVersion: ProtocolVersion? { ProtocolVersion(rawValue: protocolLevel) }
}

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
public enum ConnectReturnCode: UInt8, Sendable {
    case accepted = 0
    case unacceptableProtocolVersion = 1
    case identifierRejected = 2
    case serverUnavailable = 3
    case badUsernameOrPassword = 4
    case notAuthorized = 5

    /// The MQTT 5 reason code of the same meaning.
    public var reasonCode: ReasonCode {
        switch self {
        case .accepted: .success
        case .unacceptableProtocolVersion: .unsupportedProtocolVersion
        case .identifierRejected: .clientIdentifierNotValid
        case .serverUnavailable: .serverUnavailable
        case .badUsernameOrPassword: .badUserNameOrPassword
        case .notAuthorized: .notAuthorized
        }
    }

    /// The nearest 3.1.1 return code to an MQTT 5 CONNACK reason code (server unavailable for
    /// the failures 3.1.1 has no word for).
    public init(nearest code: ReasonCode) {
        switch code {
        case .success: self = .accepted
        case .unsupportedProtocolVersion: self = .unacceptableProtocolVersion
        case .clientIdentifierNotValid: self = .identifierRejected
        case .badUserNameOrPassword: self = .badUsernameOrPassword
        case .notAuthorized, .banned, .badAuthenticationMethod: self = .notAuthorized
        default: self = .serverUnavailable
        }
    }
}

/// CONNACK. MQTT 3.1.1 writes `returnCode`; MQTT 5 writes `reasonCode` and the properties. Each
/// initialiser sets the other code to its nearest equivalent, so code written for either
/// version reads the one it knows.
public struct ConnackPacket: Equatable, Sendable {
    public var sessionPresent: Bool
    public var returnCode: ConnectReturnCode
    /// MQTT 5: the CONNACK reason code.
    public var reasonCode: ReasonCode
    /// MQTT 5: the CONNACK properties.
    public var properties: MQTTProperties

    public init(sessionPresent: Bool, returnCode: ConnectReturnCode) {
        self.sessionPresent = sessionPresent
        self.returnCode = returnCode
        self.reasonCode = returnCode.reasonCode
        self.properties = MQTTProperties()
    }

    /// An MQTT 5 CONNACK.
    public init(sessionPresent: Bool, reasonCode: ReasonCode, properties: MQTTProperties = MQTTProperties()) {
        self.sessionPresent = sessionPresent
        self.returnCode = ConnectReturnCode(nearest: reasonCode)
        self.reasonCode = reasonCode
        self.properties = properties
    }
}

/// PUBLISH. Topic and payload are slices of the buffer the packet was read from: decoding copies
/// nothing and makes no `String`.
public struct PublishPacket: Equatable, Sendable {
    public var topic: ByteBuffer {
        didSet {  // counted for the old topic (an MQTT 5 alias resolved, say)
            topicLevels = 0
            bits &= ~0x10
        }
    }
    public var payload: ByteBuffer
    /// MQTT 5: the PUBLISH properties. Empty costs one nil reference and no allocation; it sits
    /// here, before the small fields, so that it adds 8 bytes and no padding.
    public var properties: MQTTProperties
    /// QoS, retain and DUP in one byte, so that `topicLevels` fits in the same 63 bytes.
    private var bits: UInt8
    /// The topic's level count, as the decoder's validation counted it (so that the broker does
    /// not walk the topic again to count them); 0: not counted (a packet made otherwise, or an
    /// MQTT 5 topic alias). Not part of equality. (Holds `bareAlias` when bit 4 of `bits` says so.)
    package var topicLevels: UInt16 = 0
    /// Present exactly when `qos > 0`.
    public var packetID: UInt16?

    public var qos: QoS {
        get { QoS(rawValue: bits & 0x03)! }
        set { bits = (bits & ~0x03) | newValue.rawValue }
    }

    public var retain: Bool {
        get { bits & 0x04 != 0 }
        set { bits = newValue ? bits | 0x04 : bits & ~0x04 }
    }

    public var dup: Bool {
        get { bits & 0x08 != 0 }
        set { bits = newValue ? bits | 0x08 : bits & ~0x08 }
    }

    /// MQTT 5: the PUBLISH's topic alias, wherever the decoder put it.
    public var topicAlias: UInt16? { bareAlias ?? properties.topicAlias }

    /// MQTT 5: the topic alias of a PUBLISH with no topic and no other property, which the
    /// decoder reads without making a property set (the usual PUBLISH of a client that uses an
    /// alias). Nil otherwise: an alias that comes with a topic or other properties is in
    /// `properties`. (Kept in `topicLevels`, unused without a topic.)
    public var bareAlias: UInt16? {
        get { bits & 0x10 != 0 ? topicLevels : nil }
        set {
            bits = newValue != nil ? bits | 0x10 : bits & ~0x10
            topicLevels = newValue ?? 0
        }
    }

    public init(
        topic: ByteBuffer, payload: ByteBuffer, qos: QoS, retain: Bool = false, dup: Bool = false, packetID: UInt16? = nil,
        properties: MQTTProperties = MQTTProperties()
    ) {
        self.topic = topic
        self.payload = payload
        self.properties = properties
        self.bits = qos.rawValue | (retain ? 0x04 : 0) | (dup ? 0x08 : 0)
        self.packetID = packetID
    }

    public static func == (a: PublishPacket, b: PublishPacket) -> Bool {
        a.topic == b.topic && a.payload == b.payload && a.properties.withBareAlias(a.bareAlias) == b.properties.withBareAlias(b.bareAlias)
            && a.bits & 0x0F == b.bits & 0x0F && a.packetID == b.packetID
    }

    public init(
        topic: String, payload: String, qos: QoS = .atMostOnce, retain: Bool = false, dup: Bool = false, packetID: UInt16? = nil,
        properties: MQTTProperties = MQTTProperties()
    ) {
        self.init(
            topic: ByteBuffer(string: topic), payload: ByteBuffer(string: payload), qos: qos, retain: retain, dup: dup,
            packetID: packetID, properties: properties)
    }

    /// The topic as a `String` (allocates; not for the fast path).
    public var topicString: String { String(buffer: topic) }
}

/// MQTT 5: when the server sends retained messages for a new subscription (§3.8.3.1).
public enum RetainHandling: UInt8, Sendable {
    /// At the time of the subscribe (what MQTT 3.1.1 does).
    case sendOnSubscribe = 0
    /// Only if the subscription did not already exist.
    case sendOnNewSubscription = 1
    /// Never.
    case doNotSend = 2
}

/// One topic filter and its options in SUBSCRIBE: the requested QoS, and in MQTT 5 the no local,
/// retain as published and retain handling options (ignored when written as 3.1.1).
public struct Subscription: Equatable, Sendable {
    public var filter: String
    public var qos: QoS
    /// MQTT 5: do not send this client its own publications.
    public var noLocal: Bool
    /// MQTT 5: keep the retain flag of forwarded messages as published.
    public var retainAsPublished: Bool
    /// MQTT 5: when retained messages are sent.
    public var retainHandling: RetainHandling

    public init(
        filter: String, qos: QoS, noLocal: Bool = false, retainAsPublished: Bool = false,
        retainHandling: RetainHandling = .sendOnSubscribe
    ) {
        self.filter = filter
        self.qos = qos
        self.noLocal = noLocal
        self.retainAsPublished = retainAsPublished
        self.retainHandling = retainHandling
    }

    /// The subscription options byte of MQTT 5 (the QoS alone in 3.1.1).
    public var optionsByte: UInt8 {
        qos.rawValue | (noLocal ? 0x04 : 0) | (retainAsPublished ? 0x08 : 0) | (retainHandling.rawValue << 4)
    }
}

public struct SubscribePacket: Equatable, Sendable {
    public var packetID: UInt16
    public var subscriptions: [Subscription]
    /// MQTT 5: the SUBSCRIBE properties (a subscription identifier, user properties).
    public var properties: MQTTProperties

    public init(packetID: UInt16, subscriptions: [Subscription], properties: MQTTProperties = MQTTProperties()) {
        self.packetID = packetID
        self.subscriptions = subscriptions
        self.properties = properties
    }
}

/// One SUBACK return code: a granted QoS or failure (0x80); in MQTT 5 also a more specific failure.
public enum SubackReturnCode: Equatable, Sendable {
    case granted(QoS)
    /// 0x80: failure (MQTT 5 "unspecified error").
    case failure
    /// MQTT 5: a failure reason code other than 0x80 (written as 0x80 in 3.1.1). Decoding gives
    /// `.failure` for 0x80, so that is the form to compare with.
    case refused(ReasonCode)

    /// The byte MQTT 5 writes (3.1.1 writes 0x80 for every failure).
    public var rawValue: UInt8 {
        switch self {
        case .granted(let qos): return qos.rawValue
        case .failure: return 0x80
        case .refused(let code): return code.rawValue
        }
    }

    /// The MQTT 5 reason code.
    public var reasonCode: ReasonCode { ReasonCode(rawValue: rawValue) ?? .unspecifiedError }
}

public struct SubackPacket: Equatable, Sendable {
    public var packetID: UInt16
    public var returnCodes: [SubackReturnCode]
    /// MQTT 5: the SUBACK properties (reason string, user properties).
    public var properties: MQTTProperties

    public init(packetID: UInt16, returnCodes: [SubackReturnCode], properties: MQTTProperties = MQTTProperties()) {
        self.packetID = packetID
        self.returnCodes = returnCodes
        self.properties = properties
    }
}

public struct UnsubscribePacket: Equatable, Sendable {
    public var packetID: UInt16
    public var filters: [String]
    /// MQTT 5: the UNSUBSCRIBE properties (user properties).
    public var properties: MQTTProperties

    public init(packetID: UInt16, filters: [String], properties: MQTTProperties = MQTTProperties()) {
        self.packetID = packetID
        self.filters = filters
        self.properties = properties
    }
}

/// MQTT 5 UNSUBACK: a reason code per filter of the UNSUBSCRIBE, in order, and properties.
public struct UnsubackPacket: Equatable, Sendable {
    public var packetID: UInt16
    public var reasonCodes: [ReasonCode]
    public var properties: MQTTProperties

    public init(packetID: UInt16, reasonCodes: [ReasonCode], properties: MQTTProperties = MQTTProperties()) {
        self.packetID = packetID
        self.reasonCodes = reasonCodes
        self.properties = properties
    }
}

/// MQTT 5 PUBACK, PUBREC, PUBREL or PUBCOMP with a reason code and properties.
public struct AckPacket: Equatable, Sendable {
    /// Which of the four acknowledgements.
    public enum Kind: UInt8, Sendable, CaseIterable {
        case puback, pubrec, pubrel, pubcomp

        public var packetType: PacketType {
            switch self {
            case .puback: .puback
            case .pubrec: .pubrec
            case .pubrel: .pubrel
            case .pubcomp: .pubcomp
            }
        }
    }

    public var kind: Kind
    public var packetID: UInt16
    public var reasonCode: ReasonCode
    public var properties: MQTTProperties

    public init(_ kind: Kind, packetID: UInt16, reasonCode: ReasonCode = .success, properties: MQTTProperties = MQTTProperties()) {
        self.kind = kind
        self.packetID = packetID
        self.reasonCode = reasonCode
        self.properties = properties
    }
}

/// MQTT 5 DISCONNECT: a reason code and properties (either side may send it).
public struct DisconnectPacket: Equatable, Sendable {
    public var reasonCode: ReasonCode
    public var properties: MQTTProperties

    public init(reasonCode: ReasonCode = .normalDisconnection, properties: MQTTProperties = MQTTProperties()) {
        self.reasonCode = reasonCode
        self.properties = properties
    }
}

/// MQTT 5 AUTH: a step of extended authentication (success, continue, re-authenticate).
public struct AuthPacket: Equatable, Sendable {
    public var reasonCode: ReasonCode
    public var properties: MQTTProperties

    public init(reasonCode: ReasonCode = .success, properties: MQTTProperties = MQTTProperties()) {
        self.reasonCode = reasonCode
        self.properties = properties
    }
}

/// An MQTT control packet. Large, rare packets sit behind a box so the enum stays small.
///
/// The 3.1.1 cases serve MQTT 5 too whenever the packet has nothing more to say: a v5 PUBACK with
/// reason "success" and no properties decodes as `.puback(packetID:)`, an empty v5 DISCONNECT as
/// `.disconnect`. The `...V5` cases carry what 3.1.1 cannot (reason codes, properties); decoding
/// gives them only when needed, so each packet has one decoded form.
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
    /// MQTT 5: PUBACK, PUBREC, PUBREL or PUBCOMP with a failure reason code or properties.
    case ackV5(AckPacket)
    /// MQTT 5: UNSUBACK, which always carries a reason code per filter.
    case unsubackV5(Box<UnsubackPacket>)
    /// MQTT 5: DISCONNECT with a reason code other than normal disconnection, or properties.
    case disconnectV5(DisconnectPacket)
    /// MQTT 5: AUTH (type 15; invalid before MQTT 5).
    case auth(AuthPacket)

    public static func connect(_ p: ConnectPacket) -> MQTTPacket { .connect(Box(p)) }
    public static func unsubackV5(_ p: UnsubackPacket) -> MQTTPacket { .unsubackV5(Box(p)) }
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
        case .ackV5(let ack): ack.kind.packetType
        case .unsubackV5: .unsuback
        case .disconnectV5: .disconnect
        case .auth: .auth
        }
    }
}

/// An immutable box that keeps large packet bodies out of the enum's inline storage.
public final class Box<Value: Equatable & Sendable>: Equatable, Sendable {
    public let value: Value
    public init(_ value: Value) { self.value = value }
    public static func == (lhs: Box, rhs: Box) -> Bool { lhs.value == rhs.value }
}
