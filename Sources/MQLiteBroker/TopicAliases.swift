import MQTTCore

/// MQTT 5 topic aliases of one connection, both ways (§3.3.2.3.4). They last as long as the
/// connection: a session's next connection starts with none. Each direction holds at most
/// `max_topic_alias` topics (fewer towards a client that accepts fewer), copied out of the
/// buffers they came in, so a connection's aliases cost at most that many topics.
struct TopicAliases {
    /// Client to broker: what each alias stands for.
    private var inbound: [UInt16: TopicName] = [:]
    /// Broker to client: the alias of each topic it was given for. Assigned first come, first
    /// served, and kept for the connection: no alias is ever reassigned, so a client never has
    /// to track a change (as with EMQX's; Mosquitto assigns none).
    private var outbound: [TopicName: UInt16] = [:]
    /// How many aliases the broker may assign towards the client.
    let outboundMaximum: Int

    init(outboundMaximum: Int) { self.outboundMaximum = outboundMaximum }

    /// The topic a client's alias stands for (a PUBLISH with an empty topic).
    func topic(forAlias alias: UInt16) -> TopicName? { inbound[alias] }

    /// A client's PUBLISH with a topic and an alias: the alias stands for it from now on.
    mutating func set(alias: UInt16, to topic: TopicName) {
        if inbound[alias] != topic { inbound[alias] = topic.copied() }
    }

    /// The alias the client knows `topic` by (the topic itself is then left out).
    func knownAlias(for topic: TopicName) -> UInt16? { outbound[topic] }

    /// The alias the next new topic gets; nil when every alias is taken.
    var nextAlias: UInt16? { outbound.count < outboundMaximum ? UInt16(outbound.count + 1) : nil }

    /// `topic` goes out with `nextAlias` (and its topic): from now on the alias stands for it.
    mutating func assign(_ alias: UInt16, to topic: TopicName) {
        outbound[topic.copied()] = alias
    }
}
