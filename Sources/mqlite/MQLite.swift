import ArgumentParser
import CoreMetrics
import Dispatch
import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting
import ServiceLifecycle
import Synchronization
import UnixSignals

/// `mqlite -c mqlite.conf`: parse, build a configuration, run the broker until SIGINT/SIGTERM.
@main
struct MQLite: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mqlite",
        abstract: "A scriptable MQTT 3.1.1 and 5.0 broker.",
        discussion: "Without -c, runs on defaults: listen on 0.0.0.0:1883, one worker per core, anonymous clients allowed."
    )

    @Option(name: .shortAndLong, help: ArgumentHelp("Config file (TOML).", valueName: "file"))
    var config: String?

    @Option(name: .customShort("b"), help: ArgumentHelp("Listen on HOST:PORT instead of the config file's listeners (repeatable; port 0 = ephemeral).", valueName: "host:port"))
    var bind: [String] = []

    @Option(name: .customShort("t"), help: ArgumentHelp("Number of worker threads (0 = one per core).", valueName: "n"))
    var threads: Int?

    @Flag(help: "Check the configuration and exit.")
    var check = false

    func run() async throws {
        // SIGHUP reloads once the broker runs (`Reloader`), and means nothing before; SIGUSR1 and
        // SIGUSR2 (Mosquitto's "save the store" and "dump") have no use here: none of them may
        // end the process, as their default action would.
        for sig in [SIGHUP, SIGUSR1, SIGUSR2] { signal(sig, SIG_IGN) }
        let configuration: BrokerConfiguration
        do {
            configuration = try makeConfiguration()
        } catch {
            printError("mqlite: \(error)")
            throw ExitCode(2)
        }
        let level = configuration.logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "mqlite")

        // Plugins load before anything listens: a script that fails stops startup.
        var scripting: ScriptingHost?
        if !configuration.plugins.isEmpty {
            do {
                scripting = try ScriptingHost(configuration: configuration, logger: logger)
            } catch {
                let index = configuration.plugins.firstIndex { $0.script == error.script }
                printError("mqlite: \(ConfigError(file: config ?? "defaults", key: index.map { "plugin[\($0)].script" }, problem: "cannot load \(error)"))")
                throw ExitCode(2)
            }
        }
        if !configuration.allowAnonymous, scripting?.authenticatesClients(worker: 0) != true,
            !configuration.listeners.contains(where: { $0.tls?.useIdentityAsUsername == true }) {
            logger.warning("[auth] allow_anonymous = false, and nothing checks user names (no plugin with an on_connect hook, such as plugins/password_file.lua; no listener with use_identity_as_username): every client will be refused but those a plugin's MQTT 5 enhanced authentication accepts")
        }
        if check {
            print("\(config ?? "defaults"): configuration OK (\(configuration.plugins.count) plugins)")
            return
        }

        // The store loads before anything listens; one that cannot be used stops startup.
        var store: PersistentStore?
        if let persistence = configuration.persistence {
            do {
                store = try PersistentStore(configuration: persistence, logger: logger)
            } catch {
                printError("mqlite: \(ConfigError(file: config ?? "defaults", key: "persistence.path", problem: error.description))")
                throw ExitCode(2)
            }
            let loaded = store!.loaded
            logger.info("store \(persistence.path) (sync \(persistence.sync.rawValue)): loaded \(loaded.retained) retained messages and \(loaded.sessions) sessions in \(String(format: "%.3f", loaded.seconds)) s")
            let limits = configuration.limits
            let held = store!.retainedBytes
            if (limits.maxRetained > 0 && loaded.retained > limits.maxRetained) || (limits.maxRetainedBytes > 0 && held > limits.maxRetainedBytes) {
                logger.warning("store \(persistence.path): the \(loaded.retained) retained messages loaded (\(held) bytes as max_retained_bytes counts them) are past [limits] max_retained = \(limits.maxRetained) or max_retained_bytes = \(limits.maxRetainedBytes): all are kept, and no new topic is retained until they are back under")
            }
        }

        // The broker and the SIGHUP reloader run in a service group, which turns SIGTERM and
        // SIGINT into a graceful shutdown (its signal handlers are in place before the broker
        // binds anything, so a stop request never meets the default action).
        let broker = Broker(configuration: configuration, hooks: scripting ?? NoHooks(), logger: logger, store: store)
        scripting?.bind(to: broker)
        // Whatever else in the process reports through swift-metrics lands on the broker's
        // /metrics too (the broker and its hooks use the factory directly, not this global).
        MetricsSystem.bootstrap(broker.metrics.factory)
        let group = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: [.init(service: broker), .init(service: Reloader(broker: broker, scripting: scripting, logger: logger))],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        logger.info("mqlite starting with \(configuration.resolvedWorkers) workers, \(configuration.plugins.count) plugins")
        do {
            try await group.run()
            // Acknowledged changes the store could not write as it closed (a full disk): logged, and
            // not a clean stop.
            if let store, store.lostAtClose > 0 { throw ExitCode(1) }
        } catch let error as ExitCode {
            throw error
        } catch let error as ListenError {
            // A listener that cannot be bound is a configuration problem: name its key.
            let key = bind.isEmpty ? "listener[\(error.index)].bind" : "-b"
            printError("mqlite: \(ConfigError(file: bind.isEmpty ? (config ?? "defaults") : "command line", key: key, problem: error.description))")
            throw ExitCode(2)
        } catch let error as BridgeSetupError {
            printError("mqlite: \(ConfigError(file: config ?? "defaults", key: "bridge[\(error.index)].\(error.key)", problem: error.description))")
            throw ExitCode(2)
        } catch let error as TLSSetupError {
            // A certificate file that changed since the check above.
            printError("mqlite: \(ConfigError(file: config ?? "defaults", key: "listener[\(error.index)].\(error.error.key)", problem: error.description))")
            throw ExitCode(2)
        } catch {
            logger.critical("cannot run: \(error)")
            throw ExitCode(1)
        }
    }

    /// Seconds a stop request may take before the process exits without finishing the close.
    static let shutdownDeadline = 5.0

    /// The config file (or defaults) with the command-line overrides applied.
    func makeConfiguration() throws -> BrokerConfiguration {
        var configuration = try config.map { try ConfigFile.load(path: $0) } ?? BrokerConfiguration()
        if !bind.isEmpty {
            configuration.listeners = try bind.map { text in
                guard let address = ListenAddress(parsing: text) else {
                    throw ConfigError(file: "command line", key: "-b", problem: "must be HOST:PORT, not \"\(text)\"")
                }
                return ListenerConfiguration(address)
            }
        }
        if let threads {
            guard BrokerConfiguration.workerRange.contains(threads) else {
                throw ConfigError(
                    file: "command line", key: "-t",
                    problem: "must be from \(BrokerConfiguration.workerRange.lowerBound) to \(BrokerConfiguration.workerRange.upperBound), not \(threads)")
            }
            configuration.workers = threads
        }
        return configuration
    }

    private func printError(_ message: String) {
        FileHandle.standardError.write(Data((message + "\n").utf8))
    }
}

/// The executable's second service: SIGHUP re-reads certificate files and reloads the plugins; on
/// the group's graceful shutdown it arms the deadline past which the process exits anyway (should
/// a loop not answer: a C function that does not return).
///
/// Reloads run on a queue of their own, one at a time: a script that takes long to load (a long
/// `time_limit`) must not hold up a stop, which the group hands to the broker only once this
/// service has returned. The broker's stop then makes the load fail at its next check, as any
/// running script (`ScriptingHost.stop`). HUPs that come while a reload waits to start fold into it.
struct Reloader: Service {
    let broker: Broker
    let scripting: ScriptingHost?
    let logger: Logger
    private let reloads = ReloadQueue()

    init(broker: Broker, scripting: ScriptingHost?, logger: Logger) {
        self.broker = broker
        self.scripting = scripting
        self.logger = logger
    }

    private final class ReloadQueue: Sendable {
        private let queue = DispatchQueue(label: "mqlite.reload")
        private let waiting = Atomic<Bool>(false)

        func submit(_ work: @escaping @Sendable () -> Void) {
            guard !waiting.exchange(true, ordering: .acquiringAndReleasing) else { return }
            queue.async { [self] in
                waiting.store(false, ordering: .releasing)
                work()
            }
        }
    }

    func run() async throws {
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let logger = self.logger
        await withGracefulShutdownHandler {
            for await _ in hangups.cancelOnGracefulShutdown() { reloads.submit { [self] in reload() } }
        } onGracefulShutdown: {
            logger.info("stopping")
            Self.armDeadline(broker: broker, logger: logger, after: MQLite.shutdownDeadline)
        }
    }

    /// Past the deadline the process exits with status 1, unless the broker is committing its
    /// store: acknowledged messages are in that commit, so the deadline waits for it, a second
    /// at a time (a service manager's own stop timeout still bounds it), then gives the rest of
    /// the stop another deadline.
    private static func armDeadline(broker: Broker, logger: Logger, after seconds: Double, waited: Bool = false) {
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds) {
            if broker.isCommittingStore {
                if !waited { logger.warning("stopping: still committing the store's last changes, waiting for it") }
                return armDeadline(broker: broker, logger: logger, after: 1, waited: true)
            }
            if waited { return armDeadline(broker: broker, logger: logger, after: MQLite.shutdownDeadline) }
            FileHandle.standardError.write(Data("mqlite: shutdown did not finish within \(MQLite.shutdownDeadline) s, exiting\n".utf8))
            Foundation.exit(1)
        }
    }

    private func reload() {
        // New TLS handshakes use the re-read certificate files (a bad file keeps the old).
        broker.reloadCertificates()
        guard let scripting else {
            logger.info("SIGHUP: no plugins to reload")
            return
        }
        do {
            try scripting.reload()
        } catch {
            logger.error("reload failed, keeping the running scripts: \(error)")
        }
    }
}
