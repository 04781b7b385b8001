import MQLiteBroker

/// Fuzz target `config`: the input as the text of a config file, through `ConfigFile.parse`
/// (TOMLKit, then every key's checks). Bytes that are not UTF-8 are repaired the way a lenient
/// reader would (`String(decoding:as:)`); `ConfigFile.load` itself refuses such files earlier.
/// Checked: parse returns or throws a `ConfigError` naming the file, and never crashes; a
/// configuration it accepts is within the documented ranges.
public enum ConfigFuzzer {
    public static func run(_ data: UnsafeRawBufferPointer) {
        let text = String(decoding: data, as: UTF8.self)
        if mayHitTOMLHeaderBug(text) || mayHitTOMLArrayBug(text) { return }
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

    /// A known bug, skipped so that the fuzzer looks for others: toml++ 3.4.0 (vendored by
    /// TOMLKit 0.6.0) calls `parse_key` on a table header whose key starts with a character that
    /// cannot start a key (`[#`, `[&`, `[[[`, `[` at the end of a line): an assertion failure
    /// (abort) in debug builds, undefined behaviour (`__builtin_assume`) in release builds.
    /// Upstream: marzer/tomlplusplus#294, fixed by #301; no TOMLKit release has the fix yet.
    /// Reproducer: `printf '[#' > x.conf; .build/debug/mqlite --check -c x.conf` (SIGABRT).
    /// Conservative: any line that starts like such a header is skipped, even inside an array.
    /// The same kind of bug: toml++ calls `parse_value` on a value terminator when an array item is
    /// missing (`o=[}`, `o=[,`, `o=[1,,2]`): `Assertion '!is_value_terminator(*cp)' failed`.
    /// Reproducer: `printf 'o=[}' > x.conf; .build/debug/mqlite --check -c x.conf` (SIGABRT).
    /// Conservative: any `[` or `,` followed (after blanks and line breaks) by `,` or `}` is skipped.
    public static func mayHitTOMLArrayBug(_ text: String) -> Bool {
        var afterOpenOrComma = false
        for c in text.unicodeScalars {
            switch c {
            case "[", ",":
                if afterOpenOrComma && c == "," { return true }
                afterOpenOrComma = true
            case "}":
                if afterOpenOrComma { return true }
            case " ", "\t", "\n", "\r":
                break
            default:
                afterOpenOrComma = false
            }
        }
        return false
    }

    public static func mayHitTOMLHeaderBug(_ text: String) -> Bool {
        func isSpace(_ c: Unicode.Scalar) -> Bool { c == " " || c == "\t" }
        func startsKey(_ c: Unicode.Scalar) -> Bool {
            c.isASCII && (c.properties.isAlphabetic || ("0"..."9").contains(c) || c == "_" || c == "-" || c == "\"" || c == "'")
        }
        for line in text.unicodeScalars.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r" }) {
            var rest = line.drop(while: { isSpace($0) || $0 == "\u{FEFF}" })  // blanks, a byte order mark
            guard rest.first == "[" else { continue }
            rest = rest.dropFirst().drop(while: isSpace)
            if rest.first == "[" { rest = rest.dropFirst().drop(while: isSpace) }
            guard let c = rest.first else { return true }
            if c != "]" && !startsKey(c) { return true }
        }
        return false
    }
}
