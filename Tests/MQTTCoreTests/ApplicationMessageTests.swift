import MQTTCore
import NIOCore
import Testing

@Suite("ApplicationMessage, the one message type")
struct ApplicationMessageTests {
    @Test("QoS, retain and compact share one byte: each reads back what was set, independently")
    func flags() {
        var m = ApplicationMessage(topic: "a/b", payload: ByteBuffer(string: "p"), qos: .exactlyOnce, retain: true)
        #expect(m.qos == .exactlyOnce && m.retain && !m.isCompact)
        m.qos = .atLeastOnce
        #expect(m.qos == .atLeastOnce && m.retain && !m.isCompact)
        m.isCompact = true
        m.retain = false
        #expect(m.qos == .atLeastOnce && !m.retain && m.isCompact)
        for qos in QoS.allCases {
            m.qos = qos
            #expect(m.qos == qos && m.isCompact && !m.retain)
        }
    }

    @Test("equality: topic, payload, QoS and retain; not whether it is compacted")
    func equality() {
        let a = ApplicationMessage(topic: "a/b", payload: ByteBuffer(string: "p"), qos: .atLeastOnce, retain: false)
        var b = a
        b.isCompact = true
        #expect(a == b)
        b.retain = true
        #expect(a != b)
        #expect(a != ApplicationMessage(topic: "a/c", payload: ByteBuffer(string: "p"), qos: .atLeastOnce, retain: false))
    }

    @Test("64 bytes a stride, topic included: the broker's message was 56, and MQTT 5 properties take one reference")
    func size() {
        print("sizes: ApplicationMessage \(MemoryLayout<ApplicationMessage>.size) stride \(MemoryLayout<ApplicationMessage>.stride), TopicName \(MemoryLayout<TopicName>.size), TopicFilter \(MemoryLayout<TopicFilter>.size), ByteBuffer \(MemoryLayout<ByteBuffer>.size)")
        #expect(MemoryLayout<ApplicationMessage>.stride <= 64)
        #expect(MemoryLayout<TopicName>.size <= 32)
        #expect(MemoryLayout<TopicFilter>.stride <= 24)
    }
}
