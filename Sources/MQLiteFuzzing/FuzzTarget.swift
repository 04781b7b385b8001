/// One of the fuzz targets, by name: what `mqlite-fuzz` runs (MQLITE_FUZZ_TARGET) and what the
/// regression tests replay their inputs through.
public enum FuzzTarget {
    case decoder
    case connection(ConnectionFuzzer)
    case json(JSONFuzzer)
    case config
    case proxy

    public static let names = ["decoder", "connection", "json", "config", "proxy"]

    public struct UnknownTarget: Error, CustomStringConvertible {
        public var name: String
        public var description: String { "unknown fuzz target \"\(name)\" (MQLITE_FUZZ_TARGET: one of \(FuzzTarget.names.joined(separator: ", ")))" }
    }

    public init(name: String) throws {
        switch name {
        case "decoder": self = .decoder
        case "connection": self = .connection(try ConnectionFuzzer())
        case "json": self = .json(try JSONFuzzer())
        case "config": self = .config
        case "proxy": self = .proxy
        default: throw UnknownTarget(name: name)
        }
    }

    public func run(_ data: UnsafeRawBufferPointer) {
        switch self {
        case .decoder: DecoderFuzzer.run(data)
        case .connection(let fuzzer): fuzzer.run(data)
        case .json(let fuzzer): fuzzer.run(data)
        case .config: ConfigFuzzer.run(data)
        case .proxy: ProxyFuzzer.run(data)
        }
    }
}
