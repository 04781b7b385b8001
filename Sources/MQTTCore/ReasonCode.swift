/// An MQTT 5 reason code (MQTT 5.0 §2.4, table 2-6). The same byte means different things in
/// different packets (0x00 is "success", "normal disconnection" and "granted QoS 0"); the
/// aliases below give those other names. `isAllowed(in:)` says which codes a packet may carry.
public enum ReasonCode: UInt8, Sendable, CaseIterable {
    case success = 0x00
    case grantedQoS1 = 0x01
    case grantedQoS2 = 0x02
    case disconnectWithWillMessage = 0x04
    case noMatchingSubscribers = 0x10
    case noSubscriptionExisted = 0x11
    case continueAuthentication = 0x18
    case reAuthenticate = 0x19
    case unspecifiedError = 0x80
    case malformedPacket = 0x81
    case protocolError = 0x82
    case implementationSpecificError = 0x83
    case unsupportedProtocolVersion = 0x84
    case clientIdentifierNotValid = 0x85
    case badUserNameOrPassword = 0x86
    case notAuthorized = 0x87
    case serverUnavailable = 0x88
    case serverBusy = 0x89
    case banned = 0x8A
    case serverShuttingDown = 0x8B
    case badAuthenticationMethod = 0x8C
    case keepAliveTimeout = 0x8D
    case sessionTakenOver = 0x8E
    case topicFilterInvalid = 0x8F
    case topicNameInvalid = 0x90
    case packetIdentifierInUse = 0x91
    case packetIdentifierNotFound = 0x92
    case receiveMaximumExceeded = 0x93
    case topicAliasInvalid = 0x94
    case packetTooLarge = 0x95
    case messageRateTooHigh = 0x96
    case quotaExceeded = 0x97
    case administrativeAction = 0x98
    case payloadFormatInvalid = 0x99
    case retainNotSupported = 0x9A
    case qosNotSupported = 0x9B
    case useAnotherServer = 0x9C
    case serverMoved = 0x9D
    case sharedSubscriptionsNotSupported = 0x9E
    case connectionRateExceeded = 0x9F
    case maximumConnectTime = 0xA0
    case subscriptionIdentifiersNotSupported = 0xA1
    case wildcardSubscriptionsNotSupported = 0xA2

    /// 0x00 in DISCONNECT.
    public static let normalDisconnection = ReasonCode.success
    /// 0x00 in SUBACK.
    public static let grantedQoS0 = ReasonCode.success

    /// Codes of 0x80 and above report a failure.
    public var isFailure: Bool { rawValue >= 0x80 }

    /// Whether the standard allows this code in a packet of `type` (the tables of §3).
    public func isAllowed(in type: PacketType) -> Bool {
        switch type {
        case .connack: isAllowedInConnack
        case .puback, .pubrec: isAllowedInPuback
        case .pubrel, .pubcomp: self == .success || self == .packetIdentifierNotFound
        case .suback: isAllowedInSuback
        case .unsuback: isAllowedInUnsuback
        case .disconnect: isAllowedInDisconnect
        case .auth: self == .success || self == .continueAuthentication || self == .reAuthenticate
        case .connect, .publish, .subscribe, .unsubscribe, .pingreq, .pingresp: false
        }
    }

    private var isAllowedInConnack: Bool {
        switch self {
        case .success, .unspecifiedError, .malformedPacket, .protocolError, .implementationSpecificError,
            .unsupportedProtocolVersion, .clientIdentifierNotValid, .badUserNameOrPassword, .notAuthorized,
            .serverUnavailable, .serverBusy, .banned, .badAuthenticationMethod, .topicNameInvalid, .packetTooLarge,
            .quotaExceeded, .payloadFormatInvalid, .retainNotSupported, .qosNotSupported, .useAnotherServer,
            .serverMoved, .connectionRateExceeded:
            true
        default: false
        }
    }

    private var isAllowedInPuback: Bool {
        switch self {
        case .success, .noMatchingSubscribers, .unspecifiedError, .implementationSpecificError, .notAuthorized,
            .topicNameInvalid, .packetIdentifierInUse, .quotaExceeded, .payloadFormatInvalid:
            true
        default: false
        }
    }

    private var isAllowedInSuback: Bool {
        switch self {
        case .grantedQoS0, .grantedQoS1, .grantedQoS2, .unspecifiedError, .implementationSpecificError, .notAuthorized,
            .topicFilterInvalid, .packetIdentifierInUse, .quotaExceeded, .sharedSubscriptionsNotSupported,
            .subscriptionIdentifiersNotSupported, .wildcardSubscriptionsNotSupported:
            true
        default: false
        }
    }

    private var isAllowedInUnsuback: Bool {
        switch self {
        case .success, .noSubscriptionExisted, .unspecifiedError, .implementationSpecificError, .notAuthorized,
            .topicFilterInvalid, .packetIdentifierInUse:
            true
        default: false
        }
    }

    private var isAllowedInDisconnect: Bool {
        switch self {
        case .normalDisconnection, .disconnectWithWillMessage, .unspecifiedError, .malformedPacket, .protocolError,
            .implementationSpecificError, .notAuthorized, .serverBusy, .serverShuttingDown, .keepAliveTimeout,
            .sessionTakenOver, .topicFilterInvalid, .topicNameInvalid, .receiveMaximumExceeded, .topicAliasInvalid,
            .packetTooLarge, .messageRateTooHigh, .quotaExceeded, .administrativeAction, .payloadFormatInvalid,
            .retainNotSupported, .qosNotSupported, .useAnotherServer, .serverMoved, .sharedSubscriptionsNotSupported,
            .connectionRateExceeded, .maximumConnectTime, .subscriptionIdentifiersNotSupported,
            .wildcardSubscriptionsNotSupported:
            true
        default: false
        }
    }
}
