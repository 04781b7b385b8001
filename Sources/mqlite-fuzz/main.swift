// libFuzzer entry points for mqlite's fuzz targets (see docs/FUZZING.md). Built by `make fuzz`
// with `--sanitize=fuzzer`; libFuzzer supplies `main`, so this file holds declarations only.
// The target is chosen by MQLITE_FUZZ_TARGET: decoder, connection, json, config or proxy.
#if canImport(Glibc)
import Glibc
#endif
import MQLiteFuzzing

nonisolated(unsafe) var selected: FuzzTarget?

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> CInt {
    let name = getenv("MQLITE_FUZZ_TARGET").map { String(cString: $0) } ?? ""
    do {
        selected = try FuzzTarget(name: name)
    } catch {
        print("mqlite-fuzz: \(error)")
        exit(2)
    }
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTestOneInput(_ start: UnsafePointer<UInt8>?, _ count: Int) -> CInt {
    selected!.run(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}
