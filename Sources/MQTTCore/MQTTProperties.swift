import NIOCore

// MARK: - Identifiers

/// The MQTT 5 property identifiers (MQTT 5.0 §2.2.2.2, table 2-4).
public enum PropertyIdentifier: UInt8, Sendable, CaseIterable {
    case payloadFormatIndicator = 0x01
    case messageExpiryInterval = 0x02
    case contentType = 0x03
    case responseTopic = 0x08
    case correlationData = 0x09
    case subscriptionIdentifier = 0x0B
    case sessionExpiryInterval = 0x11
    case assignedClientIdentifier = 0x12
    case serverKeepAlive = 0x13
    case authenticationMethod = 0x15
    case authenticationData = 0x16
    case requestProblemInformation = 0x17
    case willDelayInterval = 0x18
    case requestResponseInformation = 0x19
    case responseInformation = 0x1A
    case serverReference = 0x1C
    case reasonString = 0x1F
    case receiveMaximum = 0x21
    case topicAliasMaximum = 0x22
    case topicAlias = 0x23
    case maximumQoS = 0x24
    case retainAvailable = 0x25
    case userProperty = 0x26
    case maximumPacketSize = 0x27
    case wildcardSubscriptionAvailable = 0x28
    case subscriptionIdentifierAvailable = 0x29
    case sharedSubscriptionAvailable = 0x2A

    /// The contexts (packets, or CONNECT's will properties) the standard allows this property in.
    var allowed: PropertyContext.Mask {
        switch self {
        case .payloadFormatIndicator, .messageExpiryInterval, .contentType, .responseTopic, .correlationData:
            [.publish, .will]
        case .subscriptionIdentifier: [.publish, .subscribe]
        case .sessionExpiryInterval: [.connect, .connack, .disconnect]
        case .assignedClientIdentifier, .serverKeepAlive, .responseInformation, .maximumQoS, .retainAvailable,
            .wildcardSubscriptionAvailable, .subscriptionIdentifierAvailable, .sharedSubscriptionAvailable:
            [.connack]
        case .authenticationMethod, .authenticationData: [.connect, .connack, .auth]
        case .requestProblemInformation, .requestResponseInformation: [.connect]
        case .willDelayInterval: [.will]
        case .serverReference: [.connack, .disconnect]
        case .reasonString: [.connack, .ack, .suback, .unsuback, .disconnect, .auth]
        case .receiveMaximum, .topicAliasMaximum, .maximumPacketSize: [.connect, .connack]
        case .topicAlias: [.publish]
        case .userProperty: .everywhere
        }
    }

    /// User properties repeat anywhere; subscription identifiers only in PUBLISH (one per
    /// matching subscription). Any other property given twice is a protocol error.
    func mayRepeat(in context: PropertyContext) -> Bool {
        self == .userProperty || (self == .subscriptionIdentifier && context == .publish)
    }
}

/// Where a property set sits: in a packet's variable header, or in CONNECT's will properties.
enum PropertyContext: UInt8 {
    case connect, will, connack, publish, ack, subscribe, suback, unsubscribe, unsuback, disconnect, auth

    /// The packet type errors name (will properties are part of CONNECT).
    var packetType: PacketType {
        switch self {
        case .connect, .will: .connect
        case .connack: .connack
        case .publish: .publish
        case .ack: .puback
        case .subscribe: .subscribe
        case .suback: .suback
        case .unsubscribe: .unsubscribe
        case .unsuback: .unsuback
        case .disconnect: .disconnect
        case .auth: .auth
        }
    }

    /// A set of contexts, one bit each.
    struct Mask: OptionSet {
        let rawValue: UInt16
        static let connect = Mask(.connect), will = Mask(.will), connack = Mask(.connack), publish = Mask(.publish)
        static let ack = Mask(.ack), subscribe = Mask(.subscribe), suback = Mask(.suback)
        static let unsubscribe = Mask(.unsubscribe), unsuback = Mask(.unsuback), disconnect = Mask(.disconnect)
        static let auth = Mask(.auth)
        static let everywhere = Mask(rawValue: 0x7FF)
        init(rawValue: UInt16) { self.rawValue = rawValue }
        init(_ context: PropertyContext) { self.rawValue = 1 << context.rawValue }
    }
}

// MARK: - Values

/// One user property: a name/value pair of UTF-8 strings. Names may repeat; order is kept.
public struct UserProperty: Equatable, Hashable, Sendable {
    public var name: String
    public var value: String

    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}

/// The payload format indicator: unspecified bytes, or UTF-8 encoded character data.
public enum PayloadFormatIndicator: UInt8, Sendable {
    case unspecified = 0
    case utf8 = 1
}

/// The MQTT 5 properties of one packet (or of CONNECT's will). A value type whose storage is
/// allocated only when a property is present: an empty set is one nil reference (8 bytes), so
/// the MQTT 3.1.1 path never allocates for it. Storage is copied on write.
public struct MQTTProperties: Equatable, Sendable {
    private var storage: Storage?

    /// An empty property set (allocates nothing).
    public init() {}

    init(_ values: Values) {
        guard values != Values.empty else { return }
        storage = Storage(values)
        if values.userProperties.count >= Self.userPropertiesKeptEncoded {
            var encoded = ByteBuffer()
            for p in values.userProperties { encoded.writeUserProperty(p) }
            storage!.userPropertiesEncoded = encoded
        }
    }

    /// From this many user properties on, a decoded set keeps them encoded too, and every packet
    /// made of it copies those bytes: a message sent to many subscribers, each its own PUBLISH,
    /// does not encode its user properties again for each (200,000 of them to 100 subscribers
    /// held a worker for 2 s).
    static let userPropertiesKeptEncoded = 16

    /// Whether no property is set.
    public var isEmpty: Bool { storage.map { $0.values == Values.empty } ?? true }

    public static func == (lhs: MQTTProperties, rhs: MQTTProperties) -> Bool {
        if lhs.storage === rhs.storage { return true }
        return lhs.values == rhs.values
    }

    var values: Values { storage?.values ?? Values.empty }

    /// Not a property on the wire: when a message with a Message Expiry Interval expires, in
    /// uptime nanoseconds, as the broker that received it reckons (it sends what remains).
    public var messageExpiresAt: UInt64? {
        get { storage?.values.messageExpiresAt }
        set { self[\.messageExpiresAt] = newValue }
    }

    /// The Message Expiry Interval a message sent at `now` (uptime nanoseconds) carries: what
    /// remains of it, rounded up to the second, 0 once it has passed (MQTT-3.3.2-6).
    public func remainingExpiryInterval(at now: UInt64) -> UInt32? {
        guard let expiresAt = messageExpiresAt else { return nil }
        return UInt32(clamping: (max(expiresAt, now) - now + 999_999_999) / 1_000_000_000)
    }

    /// These properties with `alias` as topic alias, if there is one (`PublishPacket.bareAlias`).
    func withBareAlias(_ alias: UInt16?) -> MQTTProperties {
        guard let alias else { return self }
        var properties = self
        properties.topicAlias = alias
        return properties
    }

    /// Whether no property was ever set: a nil check (`isEmpty` compares every value), the cost
    /// the broker pays for a 3.1.1 message.
    public var isUnset: Bool { storage == nil }

    /// Whether both are the same storage (or both empty): a check that compares no values.
    public func isSame(as other: MQTTProperties) -> Bool { storage === other.storage }

    private subscript<T>(_ field: WritableKeyPath<Values, T>) -> T {
        // The one field, read in place (not a copy of every value: `values` would retain each).
        get { storage?.values[keyPath: field] ?? Values.empty[keyPath: field] }
        set {
            if storage == nil {
                storage = Storage(Values.empty)
            } else if !isKnownUniquelyReferenced(&storage!) {
                let copy = Storage(storage!.values)
                copy.userPropertiesEncoded = storage!.userPropertiesEncoded
                storage = copy
            }
            storage!.values[keyPath: field] = newValue
        }
    }

    /// 0x01, PUBLISH and will: whether the payload is UTF-8 text.
    public var payloadFormatIndicator: PayloadFormatIndicator? {
        get { self[\.payloadFormatIndicator] }
        set { self[\.payloadFormatIndicator] = newValue }
    }
    /// 0x02, PUBLISH and will: lifetime of the message in seconds.
    public var messageExpiryInterval: UInt32? {
        get { self[\.messageExpiryInterval] }
        set { self[\.messageExpiryInterval] = newValue }
    }
    /// 0x03, PUBLISH and will: the MIME type of the payload.
    public var contentType: String? {
        get { self[\.contentType] }
        set { self[\.contentType] = newValue }
    }
    /// 0x08, PUBLISH and will: the topic name of a response.
    public var responseTopic: String? {
        get { self[\.responseTopic] }
        set { self[\.responseTopic] = newValue }
    }
    /// 0x09, PUBLISH and will: binary data matching a response to its request.
    public var correlationData: ByteBuffer? {
        get { self[\.correlationData] }
        set { self[\.correlationData] = newValue }
    }
    /// 0x0B, PUBLISH (any number, one per matching subscription) and SUBSCRIBE (at most one):
    /// values 1 to 268,435,455, variable byte integers on the wire.
    public var subscriptionIdentifiers: [UInt32] {
        get { self[\.subscriptionIdentifiers] }
        set { self[\.subscriptionIdentifiers] = newValue }
    }
    /// 0x11, CONNECT, CONNACK and DISCONNECT: seconds the session outlives the connection.
    public var sessionExpiryInterval: UInt32? {
        get { self[\.sessionExpiryInterval] }
        set { self[\.sessionExpiryInterval] = newValue }
    }
    /// 0x12, CONNACK: the client identifier the server assigned.
    public var assignedClientIdentifier: String? {
        get { self[\.assignedClientIdentifier] }
        set { self[\.assignedClientIdentifier] = newValue }
    }
    /// 0x13, CONNACK: the keep-alive the server imposes, in seconds.
    public var serverKeepAlive: UInt16? {
        get { self[\.serverKeepAlive] }
        set { self[\.serverKeepAlive] = newValue }
    }
    /// 0x15, CONNECT, CONNACK and AUTH: the name of the extended authentication method.
    public var authenticationMethod: String? {
        get { self[\.authenticationMethod] }
        set { self[\.authenticationMethod] = newValue }
    }
    /// 0x16, CONNECT, CONNACK and AUTH: the method's data (only with a method).
    public var authenticationData: ByteBuffer? {
        get { self[\.authenticationData] }
        set { self[\.authenticationData] = newValue }
    }
    /// 0x17, CONNECT: whether the client wants reason strings and user properties on failures.
    public var requestProblemInformation: Bool? {
        get { self[\.requestProblemInformation] }
        set { self[\.requestProblemInformation] = newValue }
    }
    /// 0x18, will: seconds between the end of the connection and the will's publication.
    public var willDelayInterval: UInt32? {
        get { self[\.willDelayInterval] }
        set { self[\.willDelayInterval] = newValue }
    }
    /// 0x19, CONNECT: whether the client wants response information in CONNACK.
    public var requestResponseInformation: Bool? {
        get { self[\.requestResponseInformation] }
        set { self[\.requestResponseInformation] = newValue }
    }
    /// 0x1A, CONNACK: the basis of response topics.
    public var responseInformation: String? {
        get { self[\.responseInformation] }
        set { self[\.responseInformation] = newValue }
    }
    /// 0x1C, CONNACK and DISCONNECT: another server the client may use.
    public var serverReference: String? {
        get { self[\.serverReference] }
        set { self[\.serverReference] = newValue }
    }
    /// 0x1F, acknowledgements, DISCONNECT and AUTH: a human-readable diagnostic.
    public var reasonString: String? {
        get { self[\.reasonString] }
        set { self[\.reasonString] = newValue }
    }
    /// 0x21, CONNECT and CONNACK: the most QoS 1 and 2 publications in flight at once (not 0).
    public var receiveMaximum: UInt16? {
        get { self[\.receiveMaximum] }
        set { self[\.receiveMaximum] = newValue }
    }
    /// 0x22, CONNECT and CONNACK: the highest topic alias accepted.
    public var topicAliasMaximum: UInt16? {
        get { self[\.topicAliasMaximum] }
        set { self[\.topicAliasMaximum] = newValue }
    }
    /// 0x23, PUBLISH: a number standing for the topic (not 0).
    public var topicAlias: UInt16? {
        get { self[\.topicAlias] }
        set { self[\.topicAlias] = newValue }
    }
    /// 0x24, CONNACK: the highest QoS the server supports (0 or 1; absent means 2).
    public var maximumQoS: QoS? {
        get { self[\.maximumQoS] }
        set { self[\.maximumQoS] = newValue }
    }
    /// 0x25, CONNACK: whether retained messages are supported.
    public var retainAvailable: Bool? {
        get { self[\.retainAvailable] }
        set { self[\.retainAvailable] = newValue }
    }
    /// 0x26, every packet with properties, and will: name/value pairs, in order, repeats kept.
    public var userProperties: [UserProperty] {
        get { self[\.userProperties] }
        set {
            self[\.userProperties] = newValue
            storage!.userPropertiesEncoded = nil
        }
    }
    /// 0x27, CONNECT and CONNACK: the largest packet the sender accepts (not 0).
    public var maximumPacketSize: UInt32? {
        get { self[\.maximumPacketSize] }
        set { self[\.maximumPacketSize] = newValue }
    }
    /// 0x28, CONNACK: whether wildcard subscriptions are supported.
    public var wildcardSubscriptionAvailable: Bool? {
        get { self[\.wildcardSubscriptionAvailable] }
        set { self[\.wildcardSubscriptionAvailable] = newValue }
    }
    /// 0x29, CONNACK: whether subscription identifiers are supported.
    public var subscriptionIdentifierAvailable: Bool? {
        get { self[\.subscriptionIdentifierAvailable] }
        set { self[\.subscriptionIdentifierAvailable] = newValue }
    }
    /// 0x2A, CONNACK: whether shared subscriptions are supported.
    public var sharedSubscriptionAvailable: Bool? {
        get { self[\.sharedSubscriptionAvailable] }
        set { self[\.sharedSubscriptionAvailable] = newValue }
    }

    /// The stored fields, one per property.
    struct Values: Equatable {
        static let empty = Values()

        var payloadFormatIndicator: PayloadFormatIndicator?
        var messageExpiryInterval: UInt32?
        var contentType: String?
        var responseTopic: String?
        var correlationData: ByteBuffer?
        var subscriptionIdentifiers: [UInt32] = []
        var sessionExpiryInterval: UInt32?
        var assignedClientIdentifier: String?
        var serverKeepAlive: UInt16?
        var authenticationMethod: String?
        var authenticationData: ByteBuffer?
        var requestProblemInformation: Bool?
        var willDelayInterval: UInt32?
        var requestResponseInformation: Bool?
        var responseInformation: String?
        var serverReference: String?
        var reasonString: String?
        var receiveMaximum: UInt16?
        var topicAliasMaximum: UInt16?
        var topicAlias: UInt16?
        var maximumQoS: QoS?
        var retainAvailable: Bool?
        var userProperties: [UserProperty] = []
        var maximumPacketSize: UInt32?
        var wildcardSubscriptionAvailable: Bool?
        var subscriptionIdentifierAvailable: Bool?
        var sharedSubscriptionAvailable: Bool?
        /// Not a property: see `messageExpiresAt`.
        var messageExpiresAt: UInt64?
    }

    /// Mutated only while uniquely referenced (copy on write), so sharing it across threads
    /// shares nothing mutable.
    private final class Storage: @unchecked Sendable {
        var values: Values
        /// `values.userProperties` as written on the wire, when many (`userPropertiesKeptEncoded`).
        var userPropertiesEncoded: ByteBuffer?
        init(_ values: Values) { self.values = values }
    }

    /// The user properties as written on the wire, if kept so.
    var encodedUserProperties: ByteBuffer? { storage?.userPropertiesEncoded }
}

// MARK: - Decoding

extension MQTTProperties {
    /// The largest value of a variable byte integer (four bytes).
    public static let maxVariableByteInteger = 268_435_455

    /// A PUBLISH's properties as `writeMQTTProperties` wrote them, checked as a client's are (a
    /// store keeps them so).
    public static func readPublishProperties(from bytes: inout ByteBuffer) throws(MQTTProtocolError) -> MQTTProperties {
        try read(.publish, from: &bytes)
    }

    /// Reads a property length and the properties it covers, checking each against the rules
    /// of `context`. The length is checked against the bytes left before anything is read, so
    /// a huge length costs nothing; the work is linear in the bytes (the seen-set is a bit mask).
    static func read(
        _ context: PropertyContext, from body: inout ByteBuffer, type: PacketType? = nil
    ) throws(MQTTProtocolError) -> MQTTProperties {
        let type = type ?? context.packetType
        let length = try MQTTDecoder.readVariableByteInteger(type, &body)
        guard length <= body.readableBytes else {
            throw .propertyLengthOverrun(type, length: length, available: body.readableBytes)
        }
        if length == 0 { return MQTTProperties() }
        var bytes = body.readSlice(length: length)!
        var values = Values()
        var seen: UInt64 = 0
        while let raw: UInt8 = bytes.readInteger() {
            guard let id = PropertyIdentifier(rawValue: raw) else { throw .unknownProperty(type, identifier: raw) }
            guard id.allowed.contains(PropertyContext.Mask(context)) else { throw .propertyNotAllowed(type, id) }
            let bit: UInt64 = 1 << raw
            if seen & bit != 0 && !id.mayRepeat(in: context) { throw .duplicateProperty(type, id) }
            seen |= bit
            try values.read(id, type, &bytes)
        }
        if values.authenticationData != nil && values.authenticationMethod == nil {
            throw .invalidPropertyValue(type, .authenticationData)
        }
        return MQTTProperties(values)
    }
}

extension MQTTProperties.Values {
    /// Reads the value of property `id` (its identifier already read).
    fileprivate mutating func read(_ id: PropertyIdentifier, _ type: PacketType, _ bytes: inout ByteBuffer) throws(MQTTProtocolError) {
        switch id {
        case .payloadFormatIndicator:
            payloadFormatIndicator = PayloadFormatIndicator(rawValue: try Self.byte(id, type, &bytes))
            if payloadFormatIndicator == nil { throw .invalidPropertyValue(type, id) }
        case .messageExpiryInterval: messageExpiryInterval = try Self.integer(type, &bytes)
        case .contentType: contentType = try MQTTDecoder.readString(type, &bytes)
        case .responseTopic:
            let topic = try MQTTDecoder.readString(type, &bytes)
            try Topic.validateName(topic)
            responseTopic = topic
        case .correlationData: correlationData = try MQTTDecoder.readBinary(type, &bytes)
        case .subscriptionIdentifier:
            let value = try MQTTDecoder.readVariableByteInteger(type, &bytes)
            if value == 0 { throw .invalidPropertyValue(type, id) }
            subscriptionIdentifiers.append(UInt32(value))
        case .sessionExpiryInterval: sessionExpiryInterval = try Self.integer(type, &bytes)
        case .assignedClientIdentifier: assignedClientIdentifier = try MQTTDecoder.readString(type, &bytes)
        case .serverKeepAlive: serverKeepAlive = try Self.integer(type, &bytes)
        case .authenticationMethod: authenticationMethod = try MQTTDecoder.readString(type, &bytes)
        case .authenticationData: authenticationData = try MQTTDecoder.readBinary(type, &bytes)
        case .requestProblemInformation: requestProblemInformation = try Self.flag(id, type, &bytes)
        case .willDelayInterval: willDelayInterval = try Self.integer(type, &bytes)
        case .requestResponseInformation: requestResponseInformation = try Self.flag(id, type, &bytes)
        case .responseInformation: responseInformation = try MQTTDecoder.readString(type, &bytes)
        case .serverReference: serverReference = try MQTTDecoder.readString(type, &bytes)
        case .reasonString: reasonString = try MQTTDecoder.readString(type, &bytes)
        case .receiveMaximum: receiveMaximum = try Self.nonZero(id, type, &bytes)
        case .topicAliasMaximum: topicAliasMaximum = try Self.integer(type, &bytes)
        case .topicAlias: topicAlias = try Self.nonZero(id, type, &bytes)
        case .maximumQoS:
            let raw = try Self.byte(id, type, &bytes)
            guard raw <= 1 else { throw .invalidPropertyValue(type, id) }
            maximumQoS = QoS(rawValue: raw)
        case .retainAvailable: retainAvailable = try Self.flag(id, type, &bytes)
        case .userProperty:
            let name = try MQTTDecoder.readString(type, &bytes)
            let value = try MQTTDecoder.readString(type, &bytes)
            userProperties.append(UserProperty(name: name, value: value))
        case .maximumPacketSize: maximumPacketSize = try Self.nonZero(id, type, &bytes)
        case .wildcardSubscriptionAvailable: wildcardSubscriptionAvailable = try Self.flag(id, type, &bytes)
        case .subscriptionIdentifierAvailable: subscriptionIdentifierAvailable = try Self.flag(id, type, &bytes)
        case .sharedSubscriptionAvailable: sharedSubscriptionAvailable = try Self.flag(id, type, &bytes)
        }
    }

    private static func integer<T: FixedWidthInteger>(_ type: PacketType, _ bytes: inout ByteBuffer) throws(MQTTProtocolError) -> T {
        guard let value: T = bytes.readInteger() else { throw .truncated(type) }
        return value
    }

    private static func byte(_ id: PropertyIdentifier, _ type: PacketType, _ bytes: inout ByteBuffer) throws(MQTTProtocolError) -> UInt8 {
        try integer(type, &bytes)
    }

    /// A byte that must be 0 or 1.
    private static func flag(_ id: PropertyIdentifier, _ type: PacketType, _ bytes: inout ByteBuffer) throws(MQTTProtocolError) -> Bool {
        let raw: UInt8 = try integer(type, &bytes)
        guard raw <= 1 else { throw .invalidPropertyValue(type, id) }
        return raw == 1
    }

    /// An integer for which 0 is a protocol error.
    private static func nonZero<T: FixedWidthInteger>(_ id: PropertyIdentifier, _ type: PacketType, _ bytes: inout ByteBuffer) throws(MQTTProtocolError) -> T {
        let value: T = try integer(type, &bytes)
        if value == 0 { throw .invalidPropertyValue(type, id) }
        return value
    }
}

// MARK: - Encoding

extension MQTTProperties {
    /// The bytes of the properties, without the property length in front of them.
    public var encodedLength: Int {
        guard let storage else { return 0 }
        let v = storage.values
        var n = 0
        func string(_ s: String?) { if let s { n += 3 + s.utf8.count } }
        func binary(_ b: ByteBuffer?) { if let b { n += 3 + b.readableBytes } }
        if v.payloadFormatIndicator != nil { n += 2 }
        if v.messageExpiryInterval != nil { n += 5 }
        string(v.contentType)
        string(v.responseTopic)
        binary(v.correlationData)
        for id in v.subscriptionIdentifiers { n += 1 + ByteBuffer.remainingLengthSize(Int(id)) }
        if v.sessionExpiryInterval != nil { n += 5 }
        string(v.assignedClientIdentifier)
        if v.serverKeepAlive != nil { n += 3 }
        string(v.authenticationMethod)
        binary(v.authenticationData)
        if v.requestProblemInformation != nil { n += 2 }
        if v.willDelayInterval != nil { n += 5 }
        if v.requestResponseInformation != nil { n += 2 }
        string(v.responseInformation)
        string(v.serverReference)
        string(v.reasonString)
        if v.receiveMaximum != nil { n += 3 }
        if v.topicAliasMaximum != nil { n += 3 }
        if v.topicAlias != nil { n += 3 }
        if v.maximumQoS != nil { n += 2 }
        if v.retainAvailable != nil { n += 2 }
        if let encoded = storage.userPropertiesEncoded {
            n += encoded.readableBytes
        } else {
            for p in v.userProperties { n += 5 + p.name.utf8.count + p.value.utf8.count }
        }
        if v.maximumPacketSize != nil { n += 5 }
        if v.wildcardSubscriptionAvailable != nil { n += 2 }
        if v.subscriptionIdentifierAvailable != nil { n += 2 }
        if v.sharedSubscriptionAvailable != nil { n += 2 }
        return n
    }

    /// The property length field and the properties: what a packet's size counts for them.
    public var encodedSizeWithLength: Int {
        let length = encodedLength
        return ByteBuffer.remainingLengthSize(length) + length
    }
}

extension ByteBuffer {
    /// Appends the property length and then the properties, in identifier order (user
    /// properties and subscription identifiers in their own order).
    public mutating func writeMQTTProperties(_ properties: MQTTProperties) {
        writeRemainingLength(properties.encodedLength)
        guard !properties.isEmpty else { return }
        let v = properties.values
        func id(_ id: PropertyIdentifier) { writeInteger(id.rawValue) }
        if let x = v.payloadFormatIndicator { id(.payloadFormatIndicator); writeInteger(x.rawValue) }
        if let x = v.messageExpiryInterval { id(.messageExpiryInterval); writeInteger(x) }
        if let x = v.contentType { id(.contentType); writeMQTTString(x) }
        if let x = v.responseTopic { id(.responseTopic); writeMQTTString(x) }
        if let x = v.correlationData { id(.correlationData); writeMQTTBinary(x) }
        for x in v.subscriptionIdentifiers { id(.subscriptionIdentifier); writeRemainingLength(Int(x)) }
        if let x = v.sessionExpiryInterval { id(.sessionExpiryInterval); writeInteger(x) }
        if let x = v.assignedClientIdentifier { id(.assignedClientIdentifier); writeMQTTString(x) }
        if let x = v.serverKeepAlive { id(.serverKeepAlive); writeInteger(x) }
        if let x = v.authenticationMethod { id(.authenticationMethod); writeMQTTString(x) }
        if let x = v.authenticationData { id(.authenticationData); writeMQTTBinary(x) }
        if let x = v.requestProblemInformation { id(.requestProblemInformation); writeInteger(UInt8(x ? 1 : 0)) }
        if let x = v.willDelayInterval { id(.willDelayInterval); writeInteger(x) }
        if let x = v.requestResponseInformation { id(.requestResponseInformation); writeInteger(UInt8(x ? 1 : 0)) }
        if let x = v.responseInformation { id(.responseInformation); writeMQTTString(x) }
        if let x = v.serverReference { id(.serverReference); writeMQTTString(x) }
        if let x = v.reasonString { id(.reasonString); writeMQTTString(x) }
        if let x = v.receiveMaximum { id(.receiveMaximum); writeInteger(x) }
        if let x = v.topicAliasMaximum { id(.topicAliasMaximum); writeInteger(x) }
        if let x = v.topicAlias { id(.topicAlias); writeInteger(x) }
        if let x = v.maximumQoS { id(.maximumQoS); writeInteger(x.rawValue) }
        if let x = v.retainAvailable { id(.retainAvailable); writeInteger(UInt8(x ? 1 : 0)) }
        if let encoded = properties.encodedUserProperties {
            writeImmutableBuffer(encoded)
        } else {
            for p in v.userProperties { writeUserProperty(p) }
        }
        if let x = v.maximumPacketSize { id(.maximumPacketSize); writeInteger(x) }
        if let x = v.wildcardSubscriptionAvailable { id(.wildcardSubscriptionAvailable); writeInteger(UInt8(x ? 1 : 0)) }
        if let x = v.subscriptionIdentifierAvailable { id(.subscriptionIdentifierAvailable); writeInteger(UInt8(x ? 1 : 0)) }
        if let x = v.sharedSubscriptionAvailable { id(.sharedSubscriptionAvailable); writeInteger(UInt8(x ? 1 : 0)) }
    }

    mutating func writeUserProperty(_ p: UserProperty) {
        writeInteger(PropertyIdentifier.userProperty.rawValue)
        writeMQTTString(p.name)
        writeMQTTString(p.value)
    }

    mutating func writeMQTTBinary(_ bytes: ByteBuffer) {
        writeInteger(UInt16(bytes.readableBytes))
        writeImmutableBuffer(bytes)
    }
}
