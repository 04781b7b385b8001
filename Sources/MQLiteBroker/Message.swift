import MQTTCore
import NIOCore

/// An application message on its way through the broker: MQTTCore's one message type. Topic
/// and payload may be slices of the publisher's read buffer; `compacted()` copies them out
/// before a message is kept for long.
typealias Message = ApplicationMessage

extension ApplicationMessage {
    /// A copy that holds only its own bytes, so that keeping it does not pin a read buffer; the
    /// message itself if it already does, so that every queue keeping it shares one copy.
    func compacted() -> Message {
        if isCompact { return self }
        var storage = ByteBuffer()
        storage.reserveCapacity(topic.count + payload.readableBytes)
        storage.writeImmutableBuffer(topic.bytes)
        storage.writeImmutableBuffer(payload)
        let t = storage.readSlice(length: topic.count)!
        var properties = self.properties
        if let data = properties.correlationData {  // an MQTT 5 property read as a slice too
            properties.correlationData = ByteBuffer(bytes: data.readableBytesView)
        }
        return Message(topic: topic.rebased(onto: t), payload: storage, qos: qos, retain: retain, isCompact: true, properties: properties)
    }

    /// Bytes this message accounts for in a queue: topic and payload, and MQTT 5 properties (user
    /// properties can be as large as a payload).
    var size: Int {
        topic.count + payload.readableBytes + (properties.isUnset ? 0 : properties.encodedSizeWithLength)
    }

    /// Whether `other` is this very message: the same bytes in the same memory (then a compacted
    /// copy of one serves the other).
    func isSame(as other: Message) -> Bool {
        func same(_ a: ByteBuffer, _ b: ByteBuffer) -> Bool {
            a.readableBytes == b.readableBytes
                && a.withUnsafeReadableBytes { x in b.withUnsafeReadableBytes { y in x.baseAddress == y.baseAddress } }
        }
        return qos == other.qos && retain == other.retain && same(payload, other.payload) && same(topic.bytes, other.topic.bytes)
            && properties.isSame(as: other.properties)
    }
}

/// Payloads above this size are handed to the channel as their own buffer instead of being copied
/// into the per-subscriber batch buffer.
let largePayloadThreshold = 4096

/// One message for one subscriber, at the QoS it is delivered with.
struct Delivery: Sendable {
    var message: Message
    var qos: QoS
    /// RETAIN flag of the outgoing PUBLISH: set for retained messages sent on SUBSCRIBE, and for a
    /// message published retained to an MQTT 5 subscription with Retain As Published.
    var retain: Bool
    /// For QoS 0: the frame encoded once for all QoS 0 subscribers of this publish.
    var frame: ByteBuffer?
    /// An `on_deliver` hook matches the topic: the outbound asks it as the message goes out.
    var hooked = false
    /// Through a shared subscription: its group, whose other members take the message if this
    /// subscriber's connection goes before it is acknowledged (and whose subscription's MQTT 5
    /// Subscription Identifier the message carries).
    var group: SharedGroup?
    /// Its number in the session that keeps it, while a store keeps that session (`SessionEvent`).
    var seq: UInt64 = 0
    /// Published by the subscriber's own client: the MQTT 5 Subscription Identifiers of its No
    /// Local subscriptions are not among those it carries (it did not come through them).
    var local = false
}

extension ApplicationMessage {
    private static let allocator = ByteBufferAllocator()

    /// The QoS 0 PUBLISH frame of a live delivery (RETAIN 0), to be shared by every QoS 0
    /// subscriber: header only when the payload is large (the payload then goes out as its own buffer).
    func encodeQoS0Frame() -> ByteBuffer {
        let large = payload.readableBytes > largePayloadThreshold
        let size = ByteBuffer.publishFrameSize(topicLength: topic.count, payloadLength: payload.readableBytes, qos: .atMostOnce)
        var frame = Self.allocator.buffer(capacity: large ? size - payload.readableBytes : size)
        if large {
            frame.writePublishHeader(
                topic: topic.bytes, payloadLength: payload.readableBytes, qos: .atMostOnce, retain: false, dup: false, packetID: nil)
        } else {
            frame.writePublish(topic: topic.bytes, payload: payload, qos: .atMostOnce, retain: false, dup: false, packetID: nil)
        }
        return frame
    }
}
