import ArgumentParser
import Dispatch
import Foundation
import Logging
import MQLiteBroker
import MQLiteScripting

/// `mqlite -c mqlite.conf`: parse, build a configuration, run the broker until SIGINT/SIGTERM.
@main
struct MQLite: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mqlite",
        abstract: "A scriptable MQTT 3.1.1 broker.",
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
                printError("mqlite: cannot load plugin \(error)")
                throw ExitCode(2)
            }
        }
        if check {
            print("\(config ?? "defaults"): configuration OK (\(configuration.plugins.count) plugins)")
            return
        }

        // Signals are caught from before the first socket is bound (the stream keeps them until
        // read), so a stop request never meets the default action and skips the graceful close.
        let signals = Self.signals([SIGINT, SIGTERM, SIGHUP])
        let broker = Broker(configuration: configuration, hooks: scripting ?? NoHooks(), logger: logger)
        scripting?.bind(to: broker)
        do {
            _ = try await broker.start()
        } catch let error as ListenError {
            // A listener that cannot be bound is a configuration problem: name its key.
            let key = bind.isEmpty ? "listener[\(error.index)].bind" : "-b"
            printError("mqlite: \(ConfigError(file: bind.isEmpty ? (config ?? "defaults") : "command line", key: key, problem: error.description))")
            await broker.shutdown()
            throw ExitCode(2)
        } catch let error as TLSSetupError {
            // A certificate file that changed since the check above.
            printError("mqlite: \(ConfigError(file: config ?? "defaults", key: "listener[\(error.index)].\(error.error.key)", problem: error.description))")
            await broker.shutdown()
            throw ExitCode(2)
        } catch {
            logger.critical("cannot start: \(error)")
            await broker.shutdown()
            throw ExitCode(1)
        }
        logger.info("mqlite started with \(configuration.resolvedWorkers) workers, \(configuration.plugins.count) plugins")
        for await signal in signals {
            if signal == SIGHUP {
                // New TLS handshakes use the re-read certificate files (a bad file keeps the old).
                broker.reloadCertificates()
                guard let scripting else {
                    logger.info("SIGHUP: no plugins to reload")
                    continue
                }
                do {
                    try scripting.reload()
                } catch {
                    logger.error("reload failed, keeping the running scripts: \(error)")
                }
                continue
            }
            logger.info("received signal \(signal), stopping")
            break
        }
        // A hook that is running (or about to) fails at its next check, so that no script keeps
        // a worker loop, and so shutdown, waiting. Should a loop still not answer (a C function
        // that does not return), the process exits anyway once the deadline passes.
        scripting?.stop()
        let deadline = Self.shutdownDeadline
        DispatchQueue.global().asyncAfter(deadline: .now() + deadline) {
            FileHandle.standardError.write(Data("mqlite: shutdown did not finish within \(deadline) s, exiting\n".utf8))
            Foundation.exit(1)
        }
        await broker.shutdown()
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

    /// The given signals as they arrive (their default handling is turned off). The sources live
    /// as long as the process.
    static func signals(_ numbers: [Int32]) -> AsyncStream<Int32> {
        let (stream, continuation) = AsyncStream<Int32>.makeStream()
        for number in numbers {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { continuation.yield(number) }
            source.resume()
            SignalSources.keep(source)
        }
        return stream
    }
}

/// Keeps signal sources alive for the life of the process.
private enum SignalSources {
    nonisolated(unsafe) private static var sources: [any DispatchSourceSignal] = []
    static func keep(_ source: any DispatchSourceSignal) { sources.append(source) }
}
