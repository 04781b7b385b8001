import MQTTCore
import Testing

/// MQTT compares topics, filters and client ids byte for byte; Swift's `==` on strings is
/// Unicode canonical equivalence. `hasSameUTF8` and `ByteText` give the former, fast.
@Suite("Byte-exact text")
struct ByteTextTests {
    @Test("same bytes are equal; canonically equivalent strings with other bytes are not")
    func equality() {
        let composed = "caf\u{E9}/x"  // é as one scalar
        let decomposed = "cafe\u{301}/x"  // e + combining acute
        #expect(composed == decomposed)  // Swift's equality
        #expect(!composed.hasSameUTF8(as: decomposed))
        #expect(ByteText(composed) != ByteText(decomposed))
        #expect(Set([ByteText(composed), ByteText(decomposed)]).count == 2)
        #expect("K".hasSameUTF8(as: "K") && !"\u{212A}".hasSameUTF8(as: "K"))
        #expect("".hasSameUTF8(as: "") && !"".hasSameUTF8(as: "a") && !"a".hasSameUTF8(as: ""))
        let long = String(repeating: "sensor/", count: 40)
        #expect(long.hasSameUTF8(as: String(repeating: "sensor/", count: 40)))
        #expect(!long.hasSameUTF8(as: String(repeating: "sensor/", count: 39) + "sensoR/"))
    }

    @Test("substrings compare by their own bytes, wherever they sit in their base string")
    func substrings() {
        let levels = Topic.levels("a/caf\u{E9}/b/caf\u{E9}/cafe\u{301}")
        #expect(levels[1].hasSameUTF8(as: levels[3]))
        #expect(!levels[1].hasSameUTF8(as: levels[4]))
        #expect(levels[1].hasSameUTF8(as: "caf\u{E9}"))
        #expect(ByteText(levels[1]) == ByteText("caf\u{E9}"))
        #expect(ByteText(levels[1]).hashValue == ByteText("caf\u{E9}").hashValue)
    }
}
