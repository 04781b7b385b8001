import MQTTCore
import NIOCore

/// Fuzz target `decoder`: the input is a byte stream a client might send, after one control byte
/// that picks how it is split into reads. The stream is decoded twice: as the broker does (MQTT
/// 3.1.1, level 5 refused), and as MQTT 5 (level 5 accepted; a CONNECT of level 3 or 4 switches
/// the rest of the stream to 3.1.1). Checked, for each:
/// - decoding in those chunks gives the same packets, and the same error, as decoding it whole;
/// - every decoded packet encodes (MQTTEncoder, in the version it was decoded as) to bytes that
///   decode to the same packet, and a PUBLISH's encoded size is what `publishFrameSize` predicts;
/// - the filters of every SUBSCRIBE, put in a `TopicTrie`, match exactly the PUBLISH topics that
///   `Topic.matches` says they match, and removing them all empties the trie.
public enum DecoderFuzzer {
    /// The limit the decoder is run with (small, so the "too large" path is reachable).
    public static let maxPacketSize = 64 * 1024

    /// Chunk sizes a control byte's nibbles select (0: the rest at once).
    static let chunkSizes = [0, 1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 32, 64, 100, 128, 1000]

    public static func run(_ data: UnsafeRawBufferPointer) {
        guard let control = data.first else { return }
        let stream = UnsafeRawBufferPointer(rebasing: data.dropFirst())

        let sizes = [chunkSizes[Int(control & 0x0F)], chunkSizes[Int(control >> 4)]]
        for decoder in decoders {
            let whole = decode([stream.count], stream, decoder)
            let chunked = decode(sizes, stream, decoder)
            precondition(
                whole.packets == chunked.packets && whole.error == chunked.error,
                "decoding in chunks of \(sizes) differs from decoding at once: \(chunked) vs \(whole)")

            var filters: [String] = []
            var topics: [String] = []
            for (packet, version) in zip(whole.packets, whole.versions) {
                checkRoundTrip(packet, version: version)
                switch packet {
                case .subscribe(let box): filters += box.value.subscriptions.map(\.filter)
                case .unsubscribe(let box): filters += box.value.filters
                // An MQTT 5 PUBLISH may have an empty topic (a topic alias): not a topic to match.
                case .publish(let publish): if publish.topic.readableBytes > 0 { topics.append(publish.topicString) }
                case .connect(let box): if let will = box.value.will { topics.append(will.topic.string) }
                default: break
                }
            }
            checkTrie(filters: filters, topics: topics)
        }
    }

    /// The broker's decoder (3.1.1 until a CONNECT says 3.1; level 5 refused), and an MQTT 5 one.
    static var decoders: [MQTTDecoder] {[
        MQTTDecoder(maxPacketSize: maxPacketSize),
        MQTTDecoder(maxPacketSize: maxPacketSize, protocolVersion: .v5, acceptedVersions: .all),
    ]}

    struct Outcome: CustomStringConvertible {
        var packets: [MQTTPacket] = []
        /// The version each packet was decoded as.
        var versions: [ProtocolVersion] = []
        var error: String?
        var description: String { "\(packets.count) packets, error: \(error ?? "none")" }
    }

    /// Decodes `stream` delivered in reads of the given sizes (cycled; 0 = all that is left), the
    /// way `ConnectionHandler` does: decode until nil, keep the rest, append the next read.
    static func decode(
        _ sizes: [Int], _ stream: UnsafeRawBufferPointer, _ initial: MQTTDecoder = MQTTDecoder(maxPacketSize: maxPacketSize)
    ) -> Outcome {
        var decoder = initial
        var outcome = Outcome()
        var buffer = ByteBuffer()
        var offset = 0
        var read = 0
        while offset < stream.count {
            let size = sizes[read % sizes.count]
            read += 1
            let end = size == 0 ? stream.count : min(stream.count, offset + size)
            buffer.writeBytes(UnsafeRawBufferPointer(rebasing: stream[offset..<end]))
            offset = end
            do {
                var version = decoder.protocolVersion
                while let packet = try decoder.decode(buffer: &buffer) {
                    outcome.packets.append(packet)
                    outcome.versions.append(version)
                    version = decoder.protocolVersion
                }
            } catch {
                outcome.error = "\(error)"
                return outcome
            }
        }
        return outcome
    }

    static func checkRoundTrip(_ packet: MQTTPacket, version: ProtocolVersion) {
        var encoded = ByteBuffer()
        encoded.writeMQTTPacket(packet, version: version)
        if case .publish(let p) = packet {
            let (t, n) = (p.topic.readableBytes, p.payload.readableBytes)
            // A PUBLISH read with only a topic alias keeps it out of its properties (`bareAlias`).
            var properties = p.properties
            if let alias = p.bareAlias { properties.topicAlias = alias }
            let expected =
                version == .v5
                ? ByteBuffer.publishFrameSize(topicLength: t, payloadLength: n, qos: p.qos, properties: properties)
                : ByteBuffer.publishFrameSize(topicLength: t, payloadLength: n, qos: p.qos)
            precondition(encoded.readableBytes == expected, "PUBLISH encoded to \(encoded.readableBytes) bytes, publishFrameSize says \(expected)")
        }
        let length = encoded.readableBytes
        let decoder = MQTTDecoder(maxPacketSize: Int.max, acceptedVersions: .all)
        let again: MQTTPacket?
        do {
            again = try decoder.decode(buffer: &encoded, version: version)
        } catch {
            preconditionFailure("re-encoded \(packet.type) does not decode: \(error)")
        }
        precondition(again == packet, "\(packet.type) changed in an encode/decode round trip: \(packet) → \(String(describing: again))")
        precondition(encoded.readableBytes == 0, "re-encoded \(packet.type) left \(encoded.readableBytes) of \(length) bytes undecoded")
    }

    static func checkTrie(filters: [String], topics: [String]) {
        guard !filters.isEmpty else { return }
        let trie = TopicTrie<[Int: String]>()
        for (index, filter) in filters.enumerated() {
            trie.insert(filter: filter, key: index, value: filter)
        }
        // One value per distinct filter (compared byte for byte), holding its entries.
        precondition(trie.count == Set(filters.map { ByteText($0) }).count)
        for topic in topics {
            var found = Set<Int>()
            trie.forEachMatch(topic: topic) { key, _ in
                precondition(found.insert(key).inserted, "trie visited entry \(key) twice for \(topic)")
            }
            let expected = Set(filters.indices.filter { Topic.matches(filter: filters[$0], topic: topic) })
            precondition(
                found == expected,
                "trie and Topic.matches disagree on \(topic): trie \(found.map { filters[$0] }), matches \(expected.map { filters[$0] })")
        }
        for (index, filter) in filters.enumerated() {
            trie.remove(filter: filter, key: index)
        }
        precondition(trie.count == 0 && trie.nodeCount == 0, "\(trie.count) filters, \(trie.nodeCount) nodes left after removing every filter")
    }
}
