import ServiceLifecycle

// The broker as a swift-service-lifecycle `Service`: in a `ServiceGroup`, beside whatever else the
// process runs, it binds its listeners, serves until the group shuts down gracefully (SIGTERM,
// SIGINT, or another service ending), then closes every connection and stops its loops.
extension Broker: Service {
    /// Binds the listeners (unless `start()` already did), serves until a graceful shutdown or
    /// cancellation, then shuts down. A listener that cannot be bound ends it with `ListenError`
    /// (or `TLSSetupError`), after stopping what was started.
    public func run() async throws {
        if !isStarted {
            do {
                _ = try await start()
            } catch {
                await shutdown()
                throw error
            }
        }
        // Returns when the group shuts down gracefully; throws when the task is cancelled.
        // Either way the broker stops.
        try? await gracefulShutdown()
        await shutdown()
    }
}

/// `start()` was called twice.
public struct AlreadyStarted: Error, CustomStringConvertible {
    public var description: String { "the broker is already started" }
}
