// swift-tools-version:6.1
import PackageDescription

// Release builds of the broker modules skip the dynamic exclusivity checks: profiling showed
// them at ~7% of the publish path. Debug builds (and so every test run) keep them.
let releaseSpeed: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "mqlite",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "mqlite", targets: ["mqlite"]),
        .executable(name: "mqlite-bench", targets: ["mqlite-bench"]),
        .library(name: "MQTTCore", targets: ["MQTTCore"]),
        .library(name: "MQLiteBroker", targets: ["MQLiteBroker"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        // TLS listeners (BoringSSL vendored) and the benchmark's TLS client.
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        // DER parsing for client certificate subjects (already a dependency of swift-crypto's extras).
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.0.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
        // The broker is a Service: graceful shutdown on SIGTERM/SIGINT in a ServiceGroup, beside
        // whatever else a process runs (the executable adds its SIGHUP reloader).
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
        // Deque: a session's queue that costs nothing until something is queued (NIO uses it too).
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.1.0"),
        // SHA-256/512, HMAC and PBKDF2 for the Lua host library (Mosquitto password hashes).
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.0"..<"5.0.0"),
        // Allocation counting for the hot-path guard (the counter behind package-benchmark's
        // malloc metrics; package-benchmark itself needs a runtime interposer not available here).
        .package(url: "https://github.com/ordo-one/malloc-interposer.git", from: "1.6.1"),
        // Metrics (issue 11): the broker's counters are reported through swift-metrics so other
        // backends can be plugged, and exported on the `http` listener's /metrics by
        // swift-prometheus. The hot path keeps plain per-worker counters; these libraries only see
        // the sums, set when a scrape asks for them.
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.0.0"),
        // `mqlite.http.request` (issue 12): Lua hooks ask HTTP services (auth, ACL lookups) without
        // blocking a worker. The client runs on the broker's own event loops (each request on the
        // worker loop of the hook that made it); http and https, pooled connections, deadlines.
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
    ],
    targets: [
        // Protocol only: packets, codec, topic rules. No sockets, no state.
        .target(
            name: "MQTTCore",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: releaseSpeed
        ),
        // The broker: listeners, workers, sessions, routing, QoS, wills, keep-alive.
        .target(
            name: "MQLiteBroker",
            dependencies: [
                "MQTTCore",
                "CSQLite",
                "CMalloc",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                // MQTT over WebSocket listeners (HTTP/1.1 upgrade, then WebSocket frames).
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: releaseSpeed
        ),
        // Debian's SQLite 3 for the persistent store (issue 14). A thin layer of our own
        // (SQLite.swift) rather than GRDB: the store runs a handful of prepared statements on one
        // writer thread, binds payloads straight from ByteBuffers, and so needs none of GRDB's
        // record and observation machinery (nor its build time).
        .systemLibrary(
            name: "CSQLite",
            pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]
        ),
        // glibc's malloc.h (malloc_trim: the workers give freed memory back to the system).
        .systemLibrary(name: "CMalloc"),
        // Debian's Lua 5.4 with a shim for the macros Swift cannot import.
        .systemLibrary(
            name: "CLua",
            pkgConfig: "lua5.4",
            providers: [.apt(["liblua5.4-dev"])]
        ),
        // The Lua host: one lua_State per worker, hook registry, the `mqlite` library, reload.
        .target(
            name: "MQLiteScripting",
            dependencies: [
                "CLua",
                "MQTTCore",
                "MQLiteBroker",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: releaseSpeed
        ),
        .executableTarget(
            name: "mqlite",
            dependencies: [
                "MQLiteBroker",
                "MQLiteScripting",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]
        ),
        // Load generator for the side-by-side benchmark with Mosquitto (`make bench`).
        .executableTarget(
            name: "mqlite-bench",
            dependencies: [
                "MQTTCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Allocation counts of decode → route → encode, checked against bench/allocations.json.
        .executableTarget(
            name: "mqlite-alloc",
            dependencies: [
                "MQLiteBroker",
                "MQTTCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "MallocInterposerSwift", package: "malloc-interposer"),
            ]
        ),
        // The on_publish path in a loop, without sockets: for profiling the Lua layer (callgrind).
        .executableTarget(
            name: "mqlite-hookprof",
            dependencies: [
                "MQLiteBroker",
                "MQLiteScripting",
                "MQTTCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The fuzz targets' harnesses (docs/FUZZING.md), shared by the libFuzzer executable and
        // the regression tests that replay what the fuzzer found.
        .target(
            name: "MQLiteFuzzing",
            dependencies: [
                "MQTTCore",
                "MQLiteBroker",
                "MQLiteScripting",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // libFuzzer entry points; built with --sanitize=fuzzer by `make fuzz` (Fuzz/run.sh).
        .executableTarget(
            name: "mqlite-fuzz",
            dependencies: ["MQLiteFuzzing"]
        ),
        // Shared by the test targets: broker fixture and a minimal MQTT client.
        .target(
            name: "MQLiteTestSupport",
            dependencies: [
                "MQLiteBroker",
                "MQTTCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "InMemoryLogging", package: "swift-log"),
            ],
            path: "Tests/TestSupport"
        ),
        .testTarget(
            name: "MQTTCoreTests",
            dependencies: [
                "MQTTCore",
                "MQLiteTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "MQLiteBrokerTests",
            dependencies: [
                "MQLiteBroker",
                .product(name: "TOMLKit", package: "TOMLKit"),
                "MQLiteTestSupport",
                "MQTTCore",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "InMemoryLogging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "MQLiteScriptingTests",
            dependencies: [
                "MQLiteScripting",
                "MQLiteTestSupport",
                "MQLiteBroker",
                "MQTTCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "InMemoryLogging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "MQLiteFuzzTests",
            dependencies: [
                "MQLiteFuzzing",
                "MQTTCore",
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
