import MQLiteBroker

/// Fuzz target `config`: the input as the text of a config file, through `ConfigFile.parse`
/// (TOMLKit, then every key's checks). Bytes that are not UTF-8 are repaired the way a lenient
/// reader would (`String(decoding:as:)`); `ConfigFile.load` itself refuses such files earlier.
/// Checked: parse returns or throws a `ConfigError` naming the file, and never crashes; a
/// configuration it accepts is within the documented ranges.
public enum ConfigFuzzer {
    public static func run(_ data: UnsafeRawBufferPointer) {
        let text = String(decoding: data, as: UTF8.self)
        do {
            let configuration = try ConfigFile.parse(text, file: "/fuzz/mqlite.conf")
            precondition(configuration.workers >= 0 && configuration.resolvedWorkers > 0)
            precondition((2...268_435_455).contains(configuration.limits.maxPacketSize), "accepted max_packet_size \(configuration.limits.maxPacketSize)")
            precondition(!configuration.listeners.isEmpty, "accepted a configuration without listeners")
            precondition(configuration.limits.maxInflight > 0, "accepted max_inflight \(configuration.limits.maxInflight)")
            precondition(configuration.baseDirectory == "/fuzz")
        } catch {
            precondition(error.file == "/fuzz/mqlite.conf", "error names \(error.file)")
        }
    }
}
