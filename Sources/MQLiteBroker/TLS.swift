import Crypto
import Foundation
import Logging
import NIOCore
import NIOSSL
import Synchronization

// MARK: - Settings

/// TLS on one listener (`certfile`, `keyfile`, `cafile`, `require_certificate`,
/// `use_identity_as_username`, as Mosquitto names them). Paths are absolute (the config file's
/// relative ones are resolved against its folder).
public struct TLSSettings: Sendable, Equatable {
    /// The server's certificate chain (PEM), its own certificate first.
    public var certfile: String
    /// The server's private key (PEM, unencrypted).
    public var keyfile: String
    /// CAs trusted for client certificates (PEM). Without it, clients are not asked for one.
    public var cafile: String?
    /// A client without a valid certificate is refused in the handshake. Needs `cafile`.
    public var requireCertificate: Bool
    /// The client certificate's subject CN is the client's user name. Needs `requireCertificate`.
    public var useIdentityAsUsername: Bool

    public init(certfile: String, keyfile: String, cafile: String? = nil, requireCertificate: Bool = false, useIdentityAsUsername: Bool = false) {
        self.certfile = certfile
        self.keyfile = keyfile
        self.cafile = cafile
        self.requireCertificate = requireCertificate
        self.useIdentityAsUsername = useIdentityAsUsername
    }

    /// Reads the files and builds the context every handshake of the listener uses. A file that
    /// cannot be read or holds no usable PEM, or a key that does not match the certificate, throws,
    /// naming the key. Blocking file I/O: never on an event loop.
    public func makeContext() throws(TLSSettingsError) -> NIOSSLContext {
        let chain = try Self.certificates(certfile, key: "certfile", what: "certificate")
        let keyBytes = try Self.read(keyfile, key: "keyfile")
        let privateKey: NIOSSLPrivateKey
        do {
            privateKey = try NIOSSLPrivateKey(bytes: keyBytes, format: .pem)
        } catch {
            throw TLSSettingsError(key: "keyfile", problem: "no usable PEM private key in \(keyfile) (an encrypted key is not supported): \(error)")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        configuration.minimumTLSVersion = .tlsv12
        // Closing a connection sends close_notify and waits this long for the client's before
        // the socket is closed (NIOSSL waits 5 s by default): a client that never answers holds
        // its descriptor only briefly.
        configuration.shutdownTimeout = .seconds(1)
        if let cafile {
            let authorities = try Self.certificates(cafile, key: "cafile", what: "CA certificate")
            // Only these CAs: never the system's trust store, which would admit any certificate
            // a public CA signed.
            configuration.trustRoots = .certificates(authorities)
            configuration.sendCANameList = true
            configuration.certificateVerification = requireCertificate ? .noHostnameVerification : .optionalVerification
        } else {
            configuration.certificateVerification = .none
        }
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch NIOSSLError.failedToLoadPrivateKey {
            // BoringSSL refuses a private key whose public half is not the certificate's.
            throw TLSSettingsError(key: "keyfile", problem: "\(keyfile) does not match the certificate in \(certfile)")
        } catch {
            throw TLSSettingsError(key: "certfile", problem: "cannot use \(certfile) with \(keyfile): \(error)")
        }
    }

    /// A client's context (a bridge to its remote): the CAs it trusts (only these, never the
    /// system's store), and its own certificate and key if it has one. The same checks and errors
    /// as `makeContext`. Blocking file I/O: never on an event loop.
    public static func makeClientContext(cafile: String, certfile: String?, keyfile: String?) throws(TLSSettingsError) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try certificates(cafile, key: "cafile", what: "CA certificate"))
        if let certfile, let keyfile {
            configuration.certificateChain = try certificates(certfile, key: "certfile", what: "certificate").map { .certificate($0) }
            let keyBytes = try read(keyfile, key: "keyfile")
            do {
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: keyBytes, format: .pem))
            } catch {
                throw TLSSettingsError(key: "keyfile", problem: "no usable PEM private key in \(keyfile) (an encrypted key is not supported): \(error)")
            }
        }
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch NIOSSLError.failedToLoadPrivateKey {
            throw TLSSettingsError(key: "keyfile", problem: "\(keyfile ?? "") does not match the certificate in \(certfile ?? "")")
        } catch {
            throw TLSSettingsError(key: certfile == nil ? "cafile" : "certfile", problem: "cannot use \(certfile ?? cafile): \(error)")
        }
    }

    /// Largest certificate, key or CA file read (a CA bundle of a whole trust store is ~250 KB).
    static let maxFileBytes = 16 << 20

    /// A regular file's bytes (a device or FIFO named by mistake would never end).
    private static func read(_ path: String, key: String) throws(TLSSettingsError) -> [UInt8] {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw TLSSettingsError(key: key, problem: "cannot read \(path) (\(String(cString: strerror(errno))))")
        }
        guard info.st_mode & S_IFMT == S_IFREG else { throw TLSSettingsError(key: key, problem: "\(path) is not a regular file") }
        guard info.st_size <= maxFileBytes else { throw TLSSettingsError(key: key, problem: "\(path) is larger than \(maxFileBytes) bytes") }
        do {
            return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
        } catch {
            throw TLSSettingsError(key: key, problem: "cannot read \(path) (\((error as NSError).localizedDescription))")
        }
    }

    private static func certificates(_ path: String, key: String, what: String) throws(TLSSettingsError) -> [NIOSSLCertificate] {
        let bytes = try read(path, key: key)
        let certificates = (try? NIOSSLCertificate.fromPEMBytes(bytes)) ?? []
        guard !certificates.isEmpty else { throw TLSSettingsError(key: key, problem: "no PEM \(what) in \(path)") }
        return certificates
    }
}

/// A TLS setting that cannot be used: the listener's key (`certfile`, `keyfile`, `cafile`) and why.
public struct TLSSettingsError: Error, Equatable, CustomStringConvertible {
    /// The listener's key at fault (`certfile`, `keyfile` or `cafile`).
    public var key: String
    /// What is wrong, naming the file.
    public var problem: String

    public init(key: String, problem: String) {
        self.key = key
        self.problem = problem
    }

    public var description: String { "\(key): \(problem)" }
}

/// A TLS listener whose files could not be used when the broker started.
public struct TLSSetupError: Error, CustomStringConvertible {
    /// Position of the listener in the configuration.
    public var index: Int
    /// Which file, and why.
    public var error: TLSSettingsError

    public var description: String { error.problem }
}

// MARK: - Running listeners

/// A listener as the broker runs it: what connections accepted on it need to know. Plain
/// listeners carry only their bind string; TLS ones the context new handshakes use (replaced by
/// a reload) and the rate limit of their handshake failure log.
final class RunningListener: Sendable {
    let index: Int
    /// `c.listener` for scripts.
    let bind: String
    let tls: TLSSettings?
    /// What is spoken on top of TCP (or TLS): MQTT, or MQTT over WebSocket.
    let kind: ListenerConfiguration.Kind
    /// Connections start with a PROXY protocol header (`proxy_protocol`).
    let proxyProtocol: Bool
    private let context: Mutex<NIOSSLContext?>
    private let failureLog = Mutex<(logged: ContinuousClock.Instant?, suppressed: Int)>((nil, 0))
    /// Handshake failures are logged at info at most once per this; the others at debug.
    static let failureLogInterval: Duration = .seconds(10)

    init(index: Int, configuration: ListenerConfiguration, context: NIOSSLContext?) {
        self.index = index
        self.bind = configuration.bind
        self.tls = configuration.tls
        self.kind = configuration.kind
        self.proxyProtocol = configuration.proxyProtocol
        self.context = Mutex(context)
    }

    /// A plain listener that is not bound anywhere (connections served from a socketpair).
    init(unboundNamed bind: String) {
        self.index = -1
        self.bind = bind
        self.tls = nil
        self.kind = .mqtt
        self.proxyProtocol = false
        self.context = Mutex(nil)
    }

    /// The context for the next handshake.
    var currentContext: NIOSSLContext? { context.withLock { $0 } }

    /// Re-reads the certificate files: new handshakes use them from now on. On failure the
    /// running context stays and the error is thrown.
    func reloadContext() throws(TLSSettingsError) {
        guard let tls else { return }
        let fresh = try tls.makeContext()
        context.withLock { $0 = fresh }
    }

    /// Logs a connection lost before its protocol began (`stage`: "TLS connection before CONNECT",
    /// "WebSocket connection before the upgrade"): a failed or aborted TLS handshake, or the
    /// socket's error. With `logRefusal`'s rate limit, so a scanner cannot flood the log.
    func logConnectionLost(_ error: any Error, closing stage: String, logger: Logger) {
        if error is NIOSSLError {
            logRefusal("closing TLS connection before CONNECT (handshake failed or aborted): \(LogText("\(error)", limit: 512))", logger: logger)
        } else {
            logRefusal("closing \(stage): \(error)", logger: logger)
        }
    }

    /// Logs a connection refused before CONNECT (a failed TLS handshake, a bad PROXY protocol
    /// header or WebSocket upgrade): at info at most once per `failureLogInterval` for the
    /// listener, with the count not logged since; otherwise at debug.
    func logRefusal(_ message: String, logger: Logger) {
        let now = ContinuousClock.now
        let suppressed = failureLog.withLock { log -> Int? in
            if let last = log.logged, now - last < Self.failureLogInterval {
                log.suppressed += 1
                return nil
            }
            defer { log = (now, 0) }
            return log.suppressed
        }
        let line: Logger.Message = "\(LogText(message, limit: 600))"
        if let suppressed {
            var metadata: Logger.Metadata = ["listener": "\(bind)"]
            if suppressed > 0 { metadata["suppressed"] = "\(suppressed)" }
            logger.info(line, metadata: metadata)
        } else {
            logger.debug(line, metadata: ["listener": "\(bind)"])
        }
    }
}

// MARK: - Client certificates

/// What a TLS listener knows of a client, as hooks see it (`c.tls`). Computed once per
/// connection, at CONNECT.
public final class TLSClientInfo: Sendable {
    /// The client presented a certificate that verified against the listener's `cafile`.
    public let verified: Bool
    /// That certificate (nil without one).
    public let certificate: ClientCertificate?
    /// The user name is the certificate's CN (`use_identity_as_username`), not the client's.
    public let usernameFromCertificate: Bool

    public init(verified: Bool, certificate: ClientCertificate?, usernameFromCertificate: Bool = false) {
        self.verified = verified
        self.certificate = certificate
        self.usernameFromCertificate = usernameFromCertificate
    }
}

/// The fields of a client certificate that scripts see.
public struct ClientCertificate: Sendable, Equatable {
    /// The subject as RFC 4514 text, most significant last (`CN=device-1,O=Example`), as
    /// `openssl x509 -subject -nameopt RFC2253,-esc_msb` prints it.
    public var subject: String
    /// The subject's (first) common name.
    public var commonName: String?
    /// Subject alternative names: DNS names, IP addresses, e-mail addresses and URIs, as text.
    public var subjectAlternativeNames: [String]
    /// SHA-256 of the DER certificate, lowercase hex.
    public var fingerprint: String
    /// End of validity, seconds since 1970.
    public var notAfter: Int

    public init(subject: String, commonName: String?, subjectAlternativeNames: [String], fingerprint: String, notAfter: Int) {
        self.subject = subject
        self.commonName = commonName
        self.subjectAlternativeNames = subjectAlternativeNames
        self.fingerprint = fingerprint
        self.notAfter = notAfter
    }

    /// The user name `use_identity_as_username` takes: the CN, unless empty or holding U+0000,
    /// which no user name may (MQTT-1.5.3-2; a plugin reading it as a C string would see only
    /// what comes before it).
    var username: String? {
        guard let commonName, !commonName.isEmpty, !commonName.unicodeScalars.contains("\0") else { return nil }
        return commonName
    }

    /// Most subject alternative names kept (a certificate a trusted CA signed could still list
    /// thousands).
    static let maxAlternativeNames = 256

    /// Reads a certificate that passed the handshake. Nil if its DER cannot be had or parsed.
    init?(_ certificate: NIOSSLCertificate) {
        guard let der = try? certificate.toDERBytes(), let subject = DistinguishedName(certificateDER: der) else { return nil }
        self.subject = subject.rfc4514
        self.commonName = subject.commonName
        self.fingerprint = SHA256.hash(data: der).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
        self.notAfter = Int(certificate.notValidAfter)
        var names: [String] = []
        for name in certificate._subjectAlternativeNames() where names.count < Self.maxAlternativeNames {
            switch name.nameType {
            case .dnsName, .email, .uri:
                names.append(String(decoding: name.contents, as: UTF8.self))
            case .ipAddress:
                if let text = Self.ipText(Array(name.contents)) { names.append(text) }
            default:
                continue
            }
        }
        self.subjectAlternativeNames = names
    }

    private static func ipText(_ bytes: [UInt8]) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let family: Int32
        switch bytes.count {
        case 4: family = AF_INET
        case 16: family = AF_INET6
        default: return nil
        }
        guard inet_ntop(family, bytes, &buffer, socklen_t(buffer.count)) != nil else { return nil }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
