import Logging
import MQLiteBroker
import MQLiteTestSupport
import MQTTCore
import NIOCore
import ServiceLifecycle
import Testing

@Suite("Broker as a Service")
struct ServiceTests {
    @Test("in a ServiceGroup the broker binds, serves, and on graceful shutdown closes its clients and returns")
    func gracefulShutdown() async throws {
        var logger = Logger(label: "service-test")
        logger.logLevel = .critical
        let broker = Broker(
            configuration: BrokerConfiguration(workers: 2, listeners: [ListenerConfiguration(ListenAddress(host: "127.0.0.1", port: 0))]),
            logger: logger)
        let group = ServiceGroup(services: [broker], logger: logger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            try await eventually("bound", timeout: .seconds(30)) { broker.isStarted && broker.boundPorts.first != nil }
            let port = try #require(broker.boundPorts.first)
            let client = try await TestClient.open(port: port)
            #expect(try await client.connect(ConnectPacket(clientID: "svc")).returnCode == .accepted)
            await group.triggerGracefulShutdown()
            _ = try await client.expectClosed()
            try await tasks.next()  // the group returns once the broker has stopped
            #expect(broker.openConnections == 0)
        }
    }
}
