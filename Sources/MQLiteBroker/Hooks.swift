import MQTTCore
import NIOCore

/// What a CONNECT hook is shown. The password is raw bytes, as the client sent it.
public struct ConnectRequest: Sendable {
    public var clientID: String
    public var username: String?
    public var password: ByteBuffer?
    public var address: String
    public var cleanSession: Bool
    public var keepAlive: UInt16
    /// The bind string of the listener the client came in on.
    public var listener: String
    /// On TLS listeners, what the handshake told of the client; nil on plain ones.
    public var tls: TLSClientInfo?
    /// The connection this CONNECT came on, while it is open (`BrokerHooks.abandoned` names it).
    public internal(set) var connection: ObjectIdentifier?
    /// The protocol level: 3 (MQTT 3.1), 4 (3.1.1) or 5 (5.0).
    public var protocolVersion: UInt8 = 4
    /// MQTT 5: the CONNECT's user properties, in order.
    public var userProperties: [UserProperty] = []

    public init(
        clientID: String, username: String?, password: ByteBuffer?, address: String, cleanSession: Bool, keepAlive: UInt16,
        listener: String = "", tls: TLSClientInfo? = nil
    ) {
        self.clientID = clientID
        self.username = username
        self.password = password
        self.address = address
        self.cleanSession = cleanSession
        self.keepAlive = keepAlive
        self.listener = listener
        self.tls = tls
    }
}

/// MQTT 5 enhanced authentication: one step of a challenge and response (§4.12), from the
/// CONNECT's Authentication Method and Data, then from each AUTH the client sends; or a connected
/// client's re-authentication (AUTH 0x19), in the method it connected with.
public struct AuthRequest: Sendable {
    public var clientID: String
    public var username: String?
    public var address: String
    public var listener: String
    public var method: String
    public var data: ByteBuffer?
    /// 1 for the first step of an exchange (CONNECT, or AUTH 0x19), then 2, 3, ...
    public var step: Int
    /// A connected client re-authenticates (its CONNECT was authenticated before).
    public var reauthenticating: Bool
    /// What the hook gave with its last `continue` in this exchange (nil at step 1).
    public var state: ByteBuffer?
    /// The connection this exchange is on, while it is open.
    public internal(set) var connection: ObjectIdentifier?

    public init(
        clientID: String, username: String?, address: String, listener: String = "", method: String, data: ByteBuffer?, step: Int = 1,
        reauthenticating: Bool = false, state: ByteBuffer? = nil
    ) {
        self.clientID = clientID
        self.username = username
        self.address = address
        self.listener = listener
        self.method = method
        self.data = data
        self.step = step
        self.reauthenticating = reauthenticating
        self.state = state
    }
}

/// A hook's answer to one step of enhanced authentication.
public enum AuthDecision: Sendable, Equatable {
    /// Authenticated: CONNACK 0 (or AUTH 0x00 for a re-authentication), with this data.
    case success(ByteBuffer?)
    /// Another step: AUTH 0x18 with this data; the client's answer comes with `state`.
    case `continue`(ByteBuffer?, state: ByteBuffer?)
    /// Refused: CONNACK (or, re-authenticating, DISCONNECT) with this reason code and string.
    case failure(ReasonCode, String?)
}

/// A hook's answer: now, or later, when the hook waits on something outside the broker (a
/// script's `mqlite.http.request`). A later answer completes on the event loop of the
/// connection concerned; meanwhile that client's packets wait, in order, and every other
/// client is served.
public enum HookAnswer<Value: Sendable>: Sendable {
    case now(Value)
    case later(EventLoopFuture<Value>)
}

extension HookAnswer: Equatable where Value: Equatable {}

/// A hook's answer to CONNECT.
public enum ConnectDecision: Sendable, Equatable {
    /// No opinion: the next hook, then the default policy (`allow_anonymous`), decides.
    case pass
    case accept
    /// Refuse with CONNACK 4 or 5 (or any other refusal code).
    case refuse(ConnectReturnCode)
    /// Refuse with an MQTT 5 reason code (one CONNACK allows) and reason string; a 3.1.1 client
    /// gets the nearest return code.
    case refuseWithReason(ReasonCode, String?)
}

/// What a SUBSCRIBE hook is shown: one filter of a SUBSCRIBE packet.
public struct SubscribeRequest: Sendable {
    public var clientID: String
    public var username: String?
    public var filter: String
    public var qos: QoS

    public init(clientID: String, username: String?, filter: String, qos: QoS) {
        self.clientID = clientID
        self.username = username
        self.filter = filter
        self.qos = qos
    }
}

/// What an UNSUBSCRIBE hook is told: one filter of an UNSUBSCRIBE packet.
public struct UnsubscribeRequest: Sendable {
    public var clientID: String
    public var username: String?
    /// The filter as the client sent it.
    public var filter: String
    /// What it was subscribed as (an `on_subscribe` rewrite), else `filter`.
    public var subscribed: String

    public init(clientID: String, username: String?, filter: String, subscribed: String) {
        self.clientID = clientID
        self.username = username
        self.filter = filter
        self.subscribed = subscribed
    }
}

/// A hook's answer to one SUBSCRIBE filter.
public enum SubscribeDecision: Sendable, Equatable {
    /// Allow as asked.
    case allow
    /// SUBACK 0x80.
    case deny
    /// Subscribe to `filter` at no more than `qos` instead.
    case rewrite(filter: String, qos: QoS)
}

/// A message as a publish hook sees it and may change it.
public typealias HookedMessage = ApplicationMessage

/// A hook's answer to a PUBLISH.
public enum PublishDecision: Sendable, Equatable {
    case deliver
    /// Drop it (QoS 1/2 are still acknowledged to the publisher).
    case drop
    /// Deliver this changed message instead.
    case change(HookedMessage)
    /// Deliver these instead (zero, one or many).
    case replace([HookedMessage])
}

/// A hook's answer to a message on its way to one subscriber.
public enum DeliveryDecision: Sendable, Equatable {
    case deliver
    /// Not to this subscriber.
    case drop
    /// This message (its topic and payload changed) for this subscriber only.
    case change(HookedMessage)
}

/// Identity of the client that caused a hook call.
public struct ClientInfo: Sendable {
    public var clientID: String
    public var username: String?
    public var address: String
    /// On TLS listeners, what the handshake told of the client; nil on plain ones.
    public var tls: TLSClientInfo?
    /// The listener the client came in on: a reference rather than a copy of its bind string,
    /// since every connection's handler holds a `ClientInfo` (memory per idle connection).
    let origin: RunningListener
    /// The protocol level: 3 (MQTT 3.1), 4 (3.1.1) or 5 (5.0).
    public var protocolVersion: UInt8 = 4

    /// The bind string of the listener the client came in on.
    public var listener: String { origin.bind }

    public init(clientID: String, username: String?, address: String, listener: String = "", tls: TLSClientInfo? = nil) {
        self.init(clientID: clientID, username: username, address: address, origin: RunningListener(unboundNamed: listener), tls: tls)
    }

    init(clientID: String, username: String?, address: String, origin: RunningListener, tls: TLSClientInfo? = nil) {
        self.clientID = clientID
        self.username = username
        self.address = address
        self.origin = origin
        self.tls = tls
    }
}

/// The broker's extension points. The broker calls every method on the event loop of the
/// connection concerned (`worker` is that loop's index), synchronously, so an implementation may
/// keep per-worker state without locks. The scripting layer implements this protocol; the broker
/// never imports it. Hooks are objects, so that the broker reaches them through one reference
/// (no existential copy per publish).
public protocol BrokerHooks: AnyObject, Sendable {
    /// Authentication. Called once per CONNECT that passed protocol checks.
    func authenticate(_ request: ConnectRequest, worker: Int) -> HookAnswer<ConnectDecision>
    /// Whether `authenticate` checks anything (a script has an `on_connect` hook): with
    /// `allow_anonymous = false` and nothing that checks, a user name proves nothing and every
    /// client is refused, as Mosquitto refuses them without a password file.
    func authenticatesClients(worker: Int) -> Bool
    /// Whether a hook takes care of enhanced authentication by `method`; a CONNECT with another
    /// method gets CONNACK 0x8C (bad authentication method).
    func handlesAuthentication(method: String, worker: Int) -> Bool
    /// One step of enhanced authentication by a method `handlesAuthentication` said yes to. A
    /// success stands for `authenticate`'s accept (that hook is not asked).
    func authenticate(_ request: AuthRequest, worker: Int) -> HookAnswer<AuthDecision>
    /// Authorisation, once per accepted connection (and again when the hooks are reloaded or ask
    /// for it): access rules that the broker enforces natively for the life of the connection.
    /// An empty list means no restriction.
    func authorize(_ client: ClientInfo, worker: Int) -> HookAnswer<[ACLTable]>
    /// Subscribe authorisation, once per filter.
    func authorizeSubscribe(_ request: SubscribeRequest, worker: Int) -> HookAnswer<SubscribeDecision>
    /// A notification, once per filter of an UNSUBSCRIBE.
    func unsubscribed(_ request: UnsubscribeRequest, worker: Int)
    /// Whether `topic` (a PUBLISH's topic) is one the hooks want to see; `false` keeps the
    /// message on the zero-copy path. The broker caches the answer per topic and worker (in its
    /// route cache) until `publishHookGeneration` changes.
    func isPublishHooked(topic: TopicName, worker: Int) -> Bool
    /// Changes whenever the answers of `isPublishHooked` may have changed (a reload).
    var publishHookGeneration: Int { get }
    /// Publish interception, only for topics where `isPublishHooked` said true.
    func interceptPublish(_ message: HookedMessage, from client: ClientInfo, worker: Int) -> HookAnswer<PublishDecision>
    /// Whether delivery hooks want messages on `topic` (cached per topic and worker in the route
    /// cache, as `isPublishHooked`); `false` keeps deliveries on the shared path.
    func isDeliverHooked(topic: TopicName, worker: Int) -> Bool
    /// Per-subscriber interception, on the subscriber's worker, only for topics where
    /// `isDeliverHooked` said true: live messages, queued ones as they go out, retained ones.
    /// Always answered at once (it is on every subscriber's delivery path).
    func interceptDelivery(_ message: HookedMessage, to client: ClientInfo, worker: Int) -> DeliveryDecision
    /// A connection (`ConnectRequest.connection`) closed while its `authenticate` answer was
    /// still to come: it is no longer wanted, and what the hook waits on for it may stop (a
    /// script's HTTP request is cancelled), so that clients that connect and leave at once do not
    /// hold the hooks' budget.
    func abandoned(connection: ObjectIdentifier, worker: Int)
    /// Notifications.
    func connected(_ client: ClientInfo, worker: Int)
    func disconnected(_ client: ClientInfo, reason: String, worker: Int)
    /// The broker is stopping: a hook running now, or called later, should end at once, so that
    /// no hook keeps a worker loop (and so the shutdown) waiting. Any thread.
    func stop()
    /// The connections are closed: release what the hooks hold on the broker's event loops (the
    /// scripts' HTTP client), before the loops stop.
    func shutdown() async
    /// What the hooks of `worker` counted since start (calls and failures per script and hook),
    /// for metrics. Called on that worker's loop, when a scrape asks.
    func hookCallStats(worker: Int) -> [HookCallStats]
}

extension BrokerHooks {
    public func authenticate(_ request: ConnectRequest, worker: Int) -> HookAnswer<ConnectDecision> { .now(.pass) }
    public func authenticatesClients(worker: Int) -> Bool { false }
    public func handlesAuthentication(method: String, worker: Int) -> Bool { false }
    public func authenticate(_ request: AuthRequest, worker: Int) -> HookAnswer<AuthDecision> { .now(.failure(.badAuthenticationMethod, nil)) }
    public func authorize(_ client: ClientInfo, worker: Int) -> HookAnswer<[ACLTable]> { .now([]) }
    public func authorizeSubscribe(_ request: SubscribeRequest, worker: Int) -> HookAnswer<SubscribeDecision> { .now(.allow) }
    public func unsubscribed(_ request: UnsubscribeRequest, worker: Int) {}
    public func isPublishHooked(topic: TopicName, worker: Int) -> Bool { false }
    public var publishHookGeneration: Int { 0 }
    public func interceptPublish(_ message: HookedMessage, from client: ClientInfo, worker: Int) -> HookAnswer<PublishDecision> {
        .now(.deliver)
    }
    public func isDeliverHooked(topic: TopicName, worker: Int) -> Bool { false }
    public func interceptDelivery(_ message: HookedMessage, to client: ClientInfo, worker: Int) -> DeliveryDecision { .deliver }
    public func abandoned(connection: ObjectIdentifier, worker: Int) {}
    public func connected(_ client: ClientInfo, worker: Int) {}
    public func disconnected(_ client: ClientInfo, reason: String, worker: Int) {}
    public func stop() {}
    public func shutdown() async {}
    public func hookCallStats(worker: Int) -> [HookCallStats] { [] }
}

/// No hooks: every default above.
public final class NoHooks: BrokerHooks {
    public init() {}
}
