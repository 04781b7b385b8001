import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// An HTTP/1.1 service on 127.0.0.1 (ephemeral port) for `mqlite.http.request`:
///  - `/status/N` answers status N;
///  - `/delay/MS` answers 200 after MS milliseconds;
///  - `/echo` answers 200 with the request's method, body and `x-test` header: `METHOD body header`;
///  - `/big` answers 2 MiB.
/// It counts the requests it received and the most it had open at once.
final class HTTPTestServer: Sendable {
    let port: Int
    private let channel: any Channel
    private let counters = Mutex<(requests: Int, open: Int, mostOpen: Int)>((0, 0, 0))

    var requests: Int { counters.withLock { $0.requests } }
    var mostOpen: Int { counters.withLock { $0.mostOpen } }

    init() async throws {
        let box = Mutex<HTTPTestServer?>(nil)
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 4096)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Handler(server: { box.withLock { $0! } }))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        port = channel.localAddress!.port!
        box.withLock { $0 = self }
    }

    func stop() async {
        try? await channel.close()
    }

    fileprivate func began() {
        counters.withLock {
            $0.requests += 1
            $0.open += 1
            $0.mostOpen = max($0.mostOpen, $0.open)
        }
    }

    fileprivate func ended() {
        counters.withLock { $0.open -= 1 }
    }

    private final class Handler: ChannelInboundHandler, Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let server: @Sendable () -> HTTPTestServer
        private let request = Mutex<(head: HTTPRequestHead?, body: String)>((nil, ""))

        init(server: @escaping @Sendable () -> HTTPTestServer) { self.server = server }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                request.withLock { $0 = (head, "") }
                server().began()
            case .body(let buffer):
                request.withLock { $0.body += String(buffer: buffer) }
            case .end:
                let (head, body) = request.withLock { ($0.head!, $0.body) }
                let parts = head.uri.split(separator: "/").map(String.init)
                var status = HTTPResponseStatus.ok
                var text = ""
                var delay = 0
                switch parts.first {
                case "status": status = HTTPResponseStatus(statusCode: Int(parts[1]) ?? 500)
                case "delay": delay = Int(parts[1]) ?? 0
                case "echo": text = "\(head.method.rawValue) \(body) \(head.headers["x-test"].first ?? "-")"
                case "big": text = String(repeating: "x", count: 2 << 20)
                default: status = .notFound
                }
                let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
                let server = server()
                let respond = {
                    let context = loopBound.value
                    var headers = HTTPHeaders([("content-length", "\(text.utf8.count)"), ("x-reply", "a"), ("X-Reply", "b")])
                    headers.add(name: "content-type", value: "text/plain")
                    context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
                    context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(string: text)))), promise: nil)
                    context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)), promise: nil)
                    server.ended()
                }
                if delay > 0 {
                    context.eventLoop.scheduleTask(in: .milliseconds(Int64(delay))) { respond() }
                } else {
                    respond()
                }
            }
        }
    }
}
