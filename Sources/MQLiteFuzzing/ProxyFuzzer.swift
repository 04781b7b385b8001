import MQLiteBroker
import NIOCore

/// Fuzz target `proxy`: the input is what a connection on a `proxy_protocol` listener starts with.
/// `ProxyHeader.parse` is run on its prefixes, as a client sending a byte at a time would have it
/// run: every prefix until the answer is decided, then a few longer ones and the whole input.
/// Checked:
/// - the answers are monotonic: "need more" for a while, then either a header (the same one, of
///   the same length, for every longer prefix, and never longer than the prefix) or an error (for
///   every longer prefix too): bytes after a header never change it, and more bytes never repair
///   an invalid start;
/// - "need more" is bounded: never past 107 bytes for v1 or 16 + 4096 for v2;
/// - a header's length is within those limits, and a v1 header ends with CRLF.
public enum ProxyFuzzer {
    public static func run(_ data: UnsafeRawBufferPointer) {
        let all = ByteBuffer(bytes: data)
        let count = all.readableBytes
        var first: (at: Int, header: ProxyHeader)?
        var failedAt: Int?
        var later: [Int] = []
        var n = 0
        while n <= count {
            check(all, n, &first, &failedAt)
            if later.isEmpty, let decided = first?.at ?? failedAt {
                later = Set([decided + 1, decided + 2, decided + 13, count]).filter { $0 > decided && $0 <= count }.sorted()
                later.append(count + 1)  // the end
            }
            if later.isEmpty {
                n += 1
            } else {
                n = later.removeFirst()
                if later.isEmpty { break }
            }
        }
    }

    private static func check(_ all: ByteBuffer, _ n: Int, _ first: inout (at: Int, header: ProxyHeader)?, _ failedAt: inout Int?) {
        let prefix = all.getSlice(at: all.readerIndex, length: n)!
        let answer: ProxyHeader?
        do {
            answer = try ProxyHeader.parse(prefix)
        } catch {
            precondition(first == nil, "prefix of \(n) bytes refused (\(error)) after a header at \(first!.at)")
            if failedAt == nil { failedAt = n }
            return
        }
        precondition(failedAt == nil, "prefix of \(n) bytes accepted after a refusal at \(failedAt!)")
        guard let answer else {
            precondition(first == nil, "prefix of \(n) bytes needs more after a header at \(first!.at)")
            precondition(n < ProxyHeader.v2FixedLength + ProxyHeader.maxV2BodyLength, "still needs more after \(n) bytes")
            return
        }
        if let first {
            precondition(answer == first.header, "prefix of \(n) bytes: \(answer), at \(first.at): \(first.header)")
            return
        }
        precondition(answer.length <= n, "header of \(answer.length) bytes from \(n)")
        precondition(answer.length <= ProxyHeader.v2FixedLength + ProxyHeader.maxV2BodyLength, "header of \(answer.length) bytes")
        if all.getInteger(at: all.readerIndex, as: UInt8.self) == UInt8(ascii: "P") {
            precondition(answer.length <= ProxyHeader.maxV1Length, "v1 header of \(answer.length) bytes")
            precondition(all.getBytes(at: all.readerIndex + answer.length - 2, length: 2) == [0x0D, 0x0A], "v1 header without CRLF")
        }
        first = (n, answer)
    }
}
