@testable import MQLiteBroker
import NIOSSL
import Testing

/// What scripts see of a client certificate (`c.tls`), against what `openssl x509` prints for the
/// same certificate.
@Suite("Client certificates")
struct ClientCertificateTests {
    /// Made with `openssl req -x509 -multivalue-rdn -utf8 -subj '/C=DE/O=Acme; "Inc" <x>/OU=#ops
    /// /CN=dev\\,ice+UID=42/emailAddress=a@b.example/CN=Zoë' -addext "subjectAltName=DNS:odd.example,
    /// IP:10.1.2.3,IP:::1,email:a@b.example,URI:spiffe://acme/dev"`: every RFC 4514 escape, a
    /// multi-valued RDN, two CNs, UTF-8, every kind of SAN.
    static let pem = """
-----BEGIN CERTIFICATE-----
MIICtjCCAlugAwIBAgIUU0B5DwO7YY8/CADmNFmB7qYMkBIwCgYIKoZIzj0EAwIw
gYYxCzAJBgNVBAYTAkRFMRgwFgYDVQQKDA9BY21lOyAiSW5jIiA8eD4xDjAMBgNV
BAsMBSNvcHMgMSIwDgYDVQQDDAdkZXYsaWNlMBAGCgmSJomT8ixkAQEMAjQyMRow
GAYJKoZIhvcNAQkBFgthQGIuZXhhbXBsZTENMAsGA1UEAwwEWm/DqzAeFw0yNjEx
MjkxOTMyMDdaFw0zNjExMjYxOTMyMDdaMIGGMQswCQYDVQQGEwJERTEYMBYGA1UE
CgwPQWNtZTsgIkluYyIgPHg+MQ4wDAYDVQQLDAUjb3BzIDEiMA4GA1UEAwwHZGV2
LGljZTAQBgoJkiaJk/IsZAEBDAI0MjEaMBgGCSqGSIb3DQEJARYLYUBiLmV4YW1w
bGUxDTALBgNVBAMMBFpvw6swWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAR0fDWj
pc/FiW3rqwoC2iMd4w+E5kBi5XsNWTDhLDp/oKc4XL2vQJxRqnzs37wC2NlvfhE7
y8Sr7QDimOrkJp11o4GkMIGhMB0GA1UdDgQWBBSuST0mlPQhHoZZqyYAUrrg7byw
BTAfBgNVHSMEGDAWgBSuST0mlPQhHoZZqyYAUrrg7bywBTAPBgNVHRMBAf8EBTAD
AQH/ME4GA1UdEQRHMEWCC29kZC5leGFtcGxlhwQKAQIDhxAAAAAAAAAAAAAAAAAA
AAABgQthQGIuZXhhbXBsZYYRc3BpZmZlOi8vYWNtZS9kZXYwCgYIKoZIzj0EAwID
SQAwRgIhAMTCgCKwcx8QPIbIN8/SI7QpC3xExreXhKJXdbF+ROzvAiEA1v1St45/
Lb9vwFU+bTbGMptaHzf80kOhZkhyqhv3epA=
-----END CERTIFICATE-----
"""

    @Test("subject, CN, SANs, fingerprint and expiry as openssl prints them")
    func fields() throws {
        let certificate = try #require(ClientCertificate(NIOSSLCertificate(bytes: Array(Self.pem.utf8), format: .pem)))
        // openssl x509 -noout -subject -nameopt RFC2253,-esc_msb
        #expect(certificate.subject == ##"CN=Zoë,emailAddress=a@b.example,UID=42+CN=dev\,ice,OU=\#ops\ ,O=Acme\; \"Inc\" \<x\>,C=DE"##)
        // The first CN, as Mosquitto's use_identity_as_username takes it.
        #expect(certificate.commonName == "dev,ice")
        #expect(certificate.subjectAlternativeNames == ["odd.example", "10.1.2.3", "::1", "a@b.example", "spiffe://acme/dev"])
        // openssl x509 -noout -fingerprint -sha256
        #expect(certificate.fingerprint == "e6b759cba41bbc8db2ec93c15a720e95da96c7454394f02d5c940d9857efe9d5")
        // notAfter=Nov 26 19:32:07 2036 GMT
        #expect(certificate.notAfter == 2_111_340_727)
    }

    /// Self-signed, its only CN "admin\0evil" (made with Python's `cryptography`).
    static let nulPEM = """
-----BEGIN CERTIFICATE-----
MIIBFjCBvaADAgECAgEBMAoGCCqGSM49BAMCMBUxEzARBgNVBAMMCmFkbWluAGV2
aWwwHhcNMjYxMjAyMDAwMDAwWhcNMzYxMTI5MDAwMDAwWjAVMRMwEQYDVQQDDAph
ZG1pbgBldmlsMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEtbXYVrKOkjvVALe4
T3UGs4EO4KxiX/0m0ndtrCF4jJ0Tri3DxghoshsbqPiSm0sAmJRfuQ2MmojwuZ2o
Ob+xNzAKBggqhkjOPQQDAgNIADBFAiB0z2OmycRni/F4zQxaltJZiXsa2DVhjWN2
CZBwHVOsJQIhANEmmODeV27AfOzcyvUROs2tnIzJJLvcc7pJYC7m3nYm
-----END CERTIFICATE-----
"""

    @Test("use_identity_as_username: a CN holding U+0000 is no user name (MQTT-1.5.3-2), as no CN is; another CN is one as it is")
    func usernameFromCN() throws {
        let nul = try #require(ClientCertificate(NIOSSLCertificate(bytes: Array(Self.nulPEM.utf8), format: .pem)))
        #expect(nul.commonName == "admin\0evil")
        #expect(nul.subject == #"CN=admin\00evil"#)
        #expect(nul.username == nil)
        let odd = try #require(ClientCertificate(NIOSSLCertificate(bytes: Array(Self.pem.utf8), format: .pem)))
        #expect(odd.username == "dev,ice")
        #expect(ClientCertificate(subject: "", commonName: "", subjectAlternativeNames: [], fingerprint: "", notAfter: 0).username == nil)
        #expect(ClientCertificate(subject: "", commonName: nil, subjectAlternativeNames: [], fingerprint: "", notAfter: 0).username == nil)
    }

    @Test("RFC 4514 escapes")
    func escapes() {
        #expect(DistinguishedName.escape("a,b+c\"d\\e<f>g;h") == #"a\,b\+c\"d\\e\<f\>g\;h"#)
        #expect(DistinguishedName.escape("#x y ") == ##"\#x y\ "##)
        #expect(DistinguishedName.escape(" lead") == #"\ lead"#)
        #expect(DistinguishedName.escape("in#side") == "in#side")
        // Scalar by scalar: a separator followed by a combining mark or a joiner (one Character
        // in Swift) is escaped all the same, so that a subject cannot fake an RDN.
        #expect(DistinguishedName.escape("evil,\u{301}O=x") == "evil\\,\u{301}O=x")
        #expect(DistinguishedName.escape("a+\u{200D}b") == "a\\+\u{200D}b")
        // Control characters as \XX, as OpenSSL prints them.
        #expect(DistinguishedName.escape("a\nb\u{1B}c\u{7F}\u{0}") == #"a\0Ab\1Bc\7F\00"#)
    }

    @Test("not a certificate: no subject")
    func garbage() {
        #expect(DistinguishedName(certificateDER: [0x30, 0x03, 0x02, 0x01, 0x00]) == nil)
        #expect(DistinguishedName(certificateDER: []) == nil)
    }
}
