import Crypto
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import NIOWebSocket

// MQTT over WebSocket (MQTT 3.1.1 section 6, RFC 6455): an HTTP/1.1 upgrade on any path with the
// subprotocol `mqtt`, then binary frames whose payloads are the MQTT byte stream. The handlers here
// sit in front of `ConnectionHandler`, which sees only that stream (packets may be split across
// frames, or several share one) and writes ByteBuffers that go out as binary frames.
//
// Pipeline of a WebSocket listener before the upgrade:
//   [PROXY] [TLS] HTTPRequestLimit, HTTPResponseEncoder, HTTPRequestDecoder, WebSocketUpgradeHandler, ConnectionHandler
// and after it:
//   [TLS] WebSocketFrameEncoder, WebSocketFrameDecoder, WebSocketMQTTBridge, ConnectionHandler
// `ConnectionHandler` is there from the start, so the connection counts against max_connections
// and connect_timeout bounds the handshake as it bounds any connection without CONNECT.

/// Limits of WebSocket listeners.
enum WebSocketLimits {
    /// Bytes an HTTP upgrade request may take, request line and headers together (a browser's is
    /// under 2 KiB; cookies for the page's origin come along, hence the room).
    static let maxRequestBytes = 16 * 1024
    /// Headers of the upgrade request, and bytes of one header line.
    static let maxHeaderFields = 100
    static let maxHeaderFieldBytes = 8 * 1024
    /// Room beyond max_packet_size in one frame, for a client that puts several packets in one.
    static let frameHeadroom = 64 * 1024

    /// The largest frame accepted: a packet of max_packet_size with its fixed header, and room.
    /// The frame decoder refuses a larger length as soon as it has read it, before buffering.
    static func maxFrameSize(maxPacketSize: Int) -> Int {
        min(maxPacketSize + 5 + frameHeadroom, Int(UInt32.max))
    }
}

/// What the MQTT-over-WebSocket layer closed a connection for.
struct WebSocketTransportError: Error, CustomStringConvertible {
    let description: String
}

// MARK: - Upgrade

/// Counts the bytes of the HTTP request before the upgrade and closes a connection whose request
/// goes past `WebSocketLimits.maxRequestBytes` (endless header lines, a huge URL). Removed at the
/// upgrade.
final class HTTPRequestLimit: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let maxBytes: Int
    private let what: String
    private var received = 0
    private var failed = false
    /// A WebSocket upgrade was answered: what follows the request in the stream is frames, not
    /// counted; a client's EOF waits here until the request decoder has passed on what it read
    /// of them (`decoderRemoved`).
    var upgraded = false
    private var inputClosedHeld = false

    /// `what` names the request in the error (the `http` listener uses this handler too).
    init(maxBytes: Int = WebSocketLimits.maxRequestBytes, what: String = "HTTP upgrade request") {
        self.maxBytes = maxBytes
        self.what = what
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        if upgraded { return context.fireChannelRead(data) }
        received += unwrapInboundIn(data).readableBytes
        // Passed on first: a read may hold the end of the request and frames behind it (a client
        // that does not wait for 101); once upgraded, they do not count.
        context.fireChannelRead(data)
        if received > maxBytes, !upgraded, !failed {
            failed = true
            context.fireErrorCaught(WebSocketTransportError(description: "\(what) longer than \(maxBytes) bytes"))
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if upgraded, event as? ChannelEvent == .inputClosed {
            inputClosedHeld = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// The request decoder is gone, and what it had read behind the upgrade request went on to
    /// the frame decoder: the end of that read (from here, behind TLS: NIOSSL passes on a
    /// read-complete only after a read it decrypted), then the client's EOF if it came.
    func decoderRemoved(context: ChannelHandlerContext) {
        context.fireChannelReadComplete()
        if inputClosedHeld { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
    }
}

/// Answers the HTTP upgrade request of a WebSocket listener: `101 Switching Protocols` with the
/// subprotocol `mqtt` for a valid WebSocket handshake (then it rebuilds the pipeline for frames and
/// removes itself), `426 Upgrade Required` for a request that is not an upgrade, `400 Bad Request`
/// for an upgrade that cannot be served (a subprotocol other than MQTT, no key). Refused
/// connections are closed once the answer is written, and logged (rate-limited per listener).
final class WebSocketUpgradeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private enum State {
        case awaitingHead
        /// A valid upgrade request; the switch happens at its end.
        case accepted(accept: String, subprotocol: String?)
        case done
    }

    private let listener: RunningListener
    private let logger: Logger
    private let maxFrameSize: Int
    private let requestLimit: HTTPRequestLimit
    private let responseEncoder: HTTPResponseEncoder
    private let requestDecoder: ByteToMessageHandler<HTTPRequestDecoder>
    private var state = State.awaitingHead
    /// The client as logged (the PROXY protocol header's address when there is one).
    private var address: SocketAddress?

    /// Subprotocols served, in order of preference: `mqtt` (MQTT 3.1.1 section 6) and `mqttv3.1`,
    /// which older clients offer (Mosquitto accepts both).
    static let subprotocols = ["mqtt", "mqttv3.1"]
    /// RFC 6455 section 1.3.
    static let acceptGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    private init(listener: RunningListener, logger: Logger, maxFrameSize: Int, requestLimit: HTTPRequestLimit,
                 responseEncoder: HTTPResponseEncoder, requestDecoder: ByteToMessageHandler<HTTPRequestDecoder>) {
        self.listener = listener
        self.logger = logger
        self.maxFrameSize = maxFrameSize
        self.requestLimit = requestLimit
        self.responseEncoder = responseEncoder
        self.requestDecoder = requestDecoder
    }

    /// Adds the HTTP handlers and this one at the end of `pipeline` (the connection handler goes
    /// after them).
    static func addHandlers(to pipeline: ChannelPipeline.SynchronousOperations, listener: RunningListener, logger: Logger, maxFrameSize: Int) throws {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderFieldSize = WebSocketLimits.maxHeaderFieldBytes
        limits.maxHeaderListSize = WebSocketLimits.maxRequestBytes
        limits.maxHeaderFieldCount = WebSocketLimits.maxHeaderFields
        let requestLimit = HTTPRequestLimit()
        let encoder = HTTPResponseEncoder()
        // What follows the upgrade request in the same read (a client that sends CONNECT without
        // waiting for 101) is handed to the frame decoder when this decoder is removed.
        let decoder = ByteToMessageHandler(
            HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes, informationalResponseStrategy: .drop, limitConfiguration: limits),
            maximumBufferSize: WebSocketLimits.maxRequestBytes)
        let upgrader = WebSocketUpgradeHandler(
            listener: listener, logger: logger, maxFrameSize: maxFrameSize, requestLimit: requestLimit, responseEncoder: encoder,
            requestDecoder: decoder)
        try pipeline.addHandlers([requestLimit, encoder, decoder, upgrader])
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // Kept: a socket the client reset no longer knows its peer when the error is logged.
        address = context.channel.remoteAddress
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let proxied = event as? ProxiedAddressEvent { address = proxied.address }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch (unwrapInboundIn(data), state) {
        case (.head(let head), .awaitingHead):
            switch Self.answer(to: head) {
            case .upgrade(let accept, let subprotocol):
                state = .accepted(accept: accept, subprotocol: subprotocol)
            case .refuse(let status, let reason, let headers):
                refuse(context: context, status: status, reason: reason, headers: headers)
            }
        case (.body, .accepted):
            refuse(context: context, status: .badRequest, reason: "upgrade request with a body", headers: [:])
        case (.end, .accepted(let accept, let subprotocol)):
            upgrade(context: context, accept: accept, subprotocol: subprotocol)
        default:
            // After a refusal (the connection is closing), or the body of a refused request.
            break
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // An HTTP parse error or a request over the limits (or the client gone mid-request):
        // answered 400, logged with the listener's rate limit. After a refusal the connection is
        // closing, and what the decoder still has to say (the request cut short at EOF) adds
        // nothing: not passed on, so that it is not logged once more for every connection.
        guard case .done = state else {
            if error is NIOSSLError || error is IOError {
                // The TLS handshake failed (a wss listener), or the socket did (the client reset
                // it): nothing to answer over it.
                state = .done
                listener.logConnectionLost(error, closing: "WebSocket connection before the upgrade", logger: logger(context))
                return context.close(promise: nil)
            }
            let reason = error is HTTPParserError ? "malformed HTTP request (\(error))" : "\(error)"
            return refuse(context: context, status: .badRequest, reason: reason, headers: [:])
        }
    }

    enum Answer: Equatable {
        case upgrade(accept: String, subprotocol: String?)
        case refuse(HTTPResponseStatus, String, [String: String])
    }

    /// The answer to a request head: the handshake's values, or why it is refused.
    static func answer(to head: HTTPRequestHead) -> Answer {
        let headers = head.headers
        func tokens(_ name: String) -> [String] {
            headers[name].flatMap { $0.split(separator: ",") }.map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        }
        let upgradeRequired = ["Upgrade": "websocket", "Sec-WebSocket-Version": "13"]
        guard tokens("Upgrade").contains(where: { $0.lowercased() == "websocket" }),
            tokens("Connection").contains(where: { $0.lowercased() == "upgrade" })
        else { return .refuse(.upgradeRequired, "not a WebSocket upgrade request (this listener speaks MQTT over WebSocket)", upgradeRequired) }
        guard head.method == .GET, head.version.major == 1, head.version.minor >= 1 else {
            return .refuse(.badRequest, "WebSocket upgrade must be an HTTP/1.1 GET", [:])
        }
        guard headers["Host"].count == 1 else { return .refuse(.badRequest, "no Host header, or more than one (RFC 6455 section 4.1)", [:]) }
        guard headers["Sec-WebSocket-Version"] == ["13"] else {
            return .refuse(.upgradeRequired, "unsupported Sec-WebSocket-Version (13 is)", upgradeRequired)
        }
        let keys = headers["Sec-WebSocket-Key"]
        guard keys.count == 1, let key = keys.first?.trimmingCharacters(in: .whitespaces),
            Data(base64Encoded: key)?.count == 16
        else { return .refuse(.badRequest, "missing or invalid Sec-WebSocket-Key", [:]) }
        let offered = tokens("Sec-WebSocket-Protocol")
        var subprotocol: String?
        if !offered.isEmpty {
            // A client that offers subprotocols gets one of MQTT's or none (as Mosquitto).
            guard let chosen = subprotocols.first(where: { offered.contains($0) }) else {
                return .refuse(.badRequest, "no MQTT subprotocol offered (Sec-WebSocket-Protocol must include \"mqtt\")", [:])
            }
            subprotocol = chosen
        }
        let digest = Insecure.SHA1.hash(data: Array((key + acceptGUID).utf8))
        return .upgrade(accept: Data(digest).base64EncodedString(), subprotocol: subprotocol)
    }

    /// The listener's logger with the client's address (the PROXY header's, if one came).
    private func logger(_ context: ChannelHandlerContext) -> Logger {
        var log = logger
        log[metadataKey: "address"] = "\((address ?? context.channel.remoteAddress).map(\.addressText) ?? "?")"
        return log
    }

    private func refuse(context: ChannelHandlerContext, status: HTTPResponseStatus, reason: String, headers extra: [String: String]) {
        guard !isDone else { return }
        state = .done
        listener.logRefusal("closing WebSocket connection: \(status.code) \(reason)", logger: logger(context))
        let body = ByteBuffer(string: "\(status.code) \(status.reasonPhrase): \(reason)\n")
        var headers = HTTPHeaders([("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "\(body.readableBytes)"), ("Connection", "close")])
        for (name, value) in extra.sorted(by: { $0.key < $1.key }) { headers.add(name: name, value: value) }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    private var isDone: Bool {
        if case .done = state { return true }
        return false
    }

    /// Answers 101, then swaps the HTTP handlers for the WebSocket frame codec and the bridge.
    private func upgrade(context: ChannelHandlerContext, accept: String, subprotocol: String?) {
        state = .done
        var headers = HTTPHeaders([("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)])
        if let subprotocol { headers.add(name: "Sec-WebSocket-Protocol", value: subprotocol) }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .switchingProtocols, headers: headers))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        let pipeline = context.pipeline.syncOperations
        do {
            try pipeline.addHandlers(
                [WebSocketFrameEncoder(), ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: maxFrameSize)), WebSocketMQTTBridge(maxFrameSize: maxFrameSize)],
                position: .after(self))
        } catch {
            context.fireErrorCaught(error)
            return
        }
        pipeline.removeHandler(context: context, promise: nil)
        pipeline.removeHandler(responseEncoder, promise: nil)
        // Last: the request decoder's left-over bytes go to the frame decoder, now right behind
        // it. They come after this read's end (the removal is done in a later loop turn), so a
        // read-complete follows them: the connection handler flushes what it answered (a CONNACK)
        // at a read's end. Meanwhile the request limit, in front of the decoder, holds back the
        // client's EOF: seen first, it would have the decoder drop them.
        requestLimit.upgraded = true
        let removed = context.eventLoop.makePromise(of: Void.self)
        let requestLimit = requestLimit
        removed.futureResult.assumeIsolated().whenSuccess {
            guard let limitContext = try? pipeline.context(handler: requestLimit) else { return }
            requestLimit.decoderRemoved(context: limitContext)
            pipeline.removeHandler(context: limitContext, promise: nil)
        }
        pipeline.removeHandler(requestDecoder, promise: removed)
    }
}

// MARK: - Frames

/// Between the WebSocket frame codec and `ConnectionHandler`: passes the payloads of binary frames
/// on as the MQTT byte stream and sends what the connection writes as binary frames. Text frames
/// close the connection (MQTT-6.0.0-1), as do unmasked frames, reserved bits and unknown opcodes
/// (RFC 6455); pings are answered, a close frame is answered and closes the connection (the will
/// is published, as for any connection lost without DISCONNECT).
final class WebSocketMQTTBridge: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = WebSocketFrame

    private let maxFrameSize: Int
    /// A fragmented binary message is open: continuation frames belong to it.
    private var inBinaryMessage = false
    private var closeSent = false
    private var failed = false
    /// The status code of the close frame: why the connection is failing (`fail`), or the answer
    /// to the client's close frame. Sent when the connection handler closes, after what it still
    /// had to write (RFC 6455 section 5.5.1: no data frame after a close frame).
    private var closeCode: WebSocketErrorCode?
    /// The data of the last ping of this read: answered once the read is handled.
    private var pingData: ByteBuffer?

    init(maxFrameSize: Int) {
        self.maxFrameSize = maxFrameSize
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        let frame = unwrapInboundIn(data)
        guard frame.maskKey != nil else { return fail(context: context, .protocolError, "unmasked frame from the client") }
        guard frame.reservedBits.isEmpty else { return fail(context: context, .protocolError, "reserved bits set in a frame (no extension was negotiated)") }
        switch frame.opcode {
        case .binary:
            guard !inBinaryMessage else { return fail(context: context, .protocolError, "new message inside a fragmented one") }
            inBinaryMessage = !frame.fin
            forward(frame, context: context)
        case .continuation:
            guard inBinaryMessage else { return fail(context: context, .protocolError, "continuation frame without a message") }
            inBinaryMessage = !frame.fin
            forward(frame, context: context)
        case .text:
            fail(context: context, .unacceptableData, "text frame (MQTT over WebSocket is binary frames only)")
        case .ping:
            // Answered after the read, the last one only (RFC 6455 section 5.5.3 allows it): a
            // flood of pings costs one pong per read, not a write for each.
            pingData = frame.unmaskedData
        case .pong:
            break
        case .connectionClose:
            // The client's input ends here, as at an EOF: the connection handler closes once what
            // came before is handled (a CONNECT waiting for its tick, a PUBLISH for its hook), and
            // the answer, with the client's status code (RFC 6455 section 5.5.1), goes out then,
            // after what it still writes. For MQTT this is a connection lost without DISCONNECT.
            failed = true
            closeCode = Self.answer(toClose: frame.unmaskedData)
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        default:
            fail(context: context, .protocolError, "unknown opcode \(frame.opcode)")
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        // A peer that sends pings but does not read gets no more pongs than the socket takes.
        if let data = pingData {
            pingData = nil
            if context.channel.isWritable, !closeSent {
                context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .pong, data: data)), promise: nil)
            }
        }
        context.fireChannelReadComplete()
    }

    /// The status code that answers a client's close frame: its own when it is one an endpoint
    /// may send (RFC 6455 section 7.4), 1000 for none, 1002 for a body too short for a code or a
    /// code that may not be sent (1004-1006, 1015, under 1000, 1016-2999, over 4999), 1007 for a
    /// reason that is not UTF-8 (section 8.1).
    static func answer(toClose body: ByteBuffer) -> WebSocketErrorCode {
        var body = body
        guard body.readableBytes > 0 else { return .normalClosure }
        guard let code = body.readInteger(as: UInt16.self) else { return .protocolError }
        switch code {
        case 1000...1003, 1007...1014, 3000...4999: break
        default: return .protocolError
        }
        guard String(validating: body.readableBytesView, as: UTF8.self) != nil else { return .dataInconsistentWithMessage }
        return WebSocketErrorCode(codeNumber: Int(code))
    }

    private func forward(_ frame: WebSocketFrame, context: ChannelHandlerContext) {
        let payload = frame.unmaskedData
        if payload.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(payload)) }
    }

    /// Hands the reason to the connection handler, which logs it, writes what it still had for
    /// the client (a CONNACK, a PUBACK of this read) and closes the connection: the close frame,
    /// with `code`, goes out then (`close`).
    private func fail(context: ChannelHandlerContext, _ code: WebSocketErrorCode, _ reason: String) {
        guard !failed else { return }
        failed = true
        closeCode = code
        context.fireErrorCaught(WebSocketTransportError(description: "WebSocket: " + reason))
    }

    private func sendClose(context: ChannelHandlerContext, code: WebSocketErrorCode) {
        guard !closeSent else { return }
        closeSent = true
        var payload = context.channel.allocator.buffer(capacity: 2)
        payload.write(webSocketErrorCode: code)
        context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: payload)), promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // The frame decoder's: a frame over the size limit, a fragmented or long control frame.
        if let error = error as? NIOWebSocketError {
            switch error {
            case .invalidFrameLength: return fail(context: context, .messageTooLarge, "frame longer than \(maxFrameSize) bytes")
            default: return fail(context: context, .protocolError, "invalid frame (\(error))")
            }
        }
        context.fireErrorCaught(error)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let buffer = unwrapOutboundIn(data)
        context.write(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .binary, data: buffer)), promise: promise)
    }

    /// The broker closes the connection (a protocol error, a takeover, shutdown), or its output
    /// first: a close frame before (a failure's status code, or the answer to the client's close frame), so that browsers see
    /// a clean close.
    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if mode != .input, context.channel.isActive { sendClose(context: context, code: closeCode ?? .normalClosure) }
        context.close(mode: mode, promise: promise)
    }
}

// Channel handlers live on their channel's event loop.
@available(*, unavailable)
extension HTTPRequestLimit: Sendable {}
@available(*, unavailable)
extension WebSocketUpgradeHandler: Sendable {}
@available(*, unavailable)
extension WebSocketMQTTBridge: Sendable {}
