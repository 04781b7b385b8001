import SwiftASN1

/// A certificate's subject, read from its DER with SwiftASN1: each relative distinguished name
/// (RDN) is a set of attribute type (an OID) and value pairs, in the certificate's order.
struct DistinguishedName {
    struct Attribute {
        /// Dotted OID (`2.5.4.3`).
        var type: String
        /// The value as text; nil when it is not a string type (RFC 4514 then prints `#` and the
        /// DER in hex).
        var text: String?
        var der: ArraySlice<UInt8>
    }

    var rdns: [[Attribute]]

    /// The subject of the X.509 certificate `der`; nil if it is not one.
    init?(certificateDER der: [UInt8]) {
        // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
        // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
        //                               validity, subject, ... }
        guard let certificate = try? DER.parse(der), case .constructed(let parts) = certificate.content,
            let tbs = parts.first(where: { _ in true }), case .constructed(let tbsFields) = tbs.content
        else { return nil }
        var fields = Array(tbsFields)
        if let first = fields.first, first.identifier.tagClass == .contextSpecific { fields.removeFirst() }
        guard fields.count > 4, fields[4].identifier == .sequence, case .constructed(let rdnNodes) = fields[4].content else { return nil }
        var rdns: [[Attribute]] = []
        for rdn in rdnNodes {
            guard rdn.identifier == .set, case .constructed(let pairs) = rdn.content else { return nil }
            var attributes: [Attribute] = []
            for pair in pairs {
                guard case .constructed(let items) = pair.content else { return nil }
                var iterator = items.makeIterator()
                guard let typeNode = iterator.next(), let valueNode = iterator.next(),
                    let type = try? ASN1ObjectIdentifier(derEncoded: typeNode)
                else { return nil }
                attributes.append(Attribute(type: type.description, text: Self.text(valueNode), der: valueNode.encodedBytes))
            }
            rdns.append(attributes)
        }
        self.rdns = rdns
    }

    /// The first common name that is text, as Mosquitto takes it for `use_identity_as_username`
    /// (a CN that is not valid text of its string type has none: see `text`).
    var commonName: String? {
        for rdn in rdns {
            for attribute in rdn where attribute.type == Self.commonNameOID {
                if let text = attribute.text { return text }
            }
        }
        return nil
    }

    static let commonNameOID = "2.5.4.3"

    /// RFC 4514 text: attributes last to first (as OpenSSL's RFC 2253 output, within a
    /// multi-valued RDN too), RDNs joined with `,`, the parts of a multi-valued one with `+`; known
    /// types by their short names (OpenSSL's), others as dotted OIDs. Non-ASCII stays UTF-8.
    var rfc4514: String {
        rdns.reversed().map { rdn in
            rdn.reversed().map { attribute in
                let name = Self.shortNames[attribute.type] ?? attribute.type
                if let text = attribute.text { return name + "=" + Self.escape(text) }
                return name + "=#" + attribute.der.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
            }.joined(separator: "+")
        }.joined(separator: ",")
    }

    static let shortNames: [String: String] = [
        "2.5.4.3": "CN", "2.5.4.4": "SN", "2.5.4.5": "serialNumber", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
        "2.5.4.9": "street", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.12": "title", "2.5.4.42": "GN",
        "0.9.2342.19200300.100.1.1": "UID", "0.9.2342.19200300.100.1.25": "DC", "1.2.840.113549.1.9.1": "emailAddress",
    ]

    /// RFC 4514 section 2.4: `"+,;<>\` escaped, and a leading `#` or space and a trailing space;
    /// control characters as `\XX` (as OpenSSL's RFC 2253 output). Scalar by scalar: a `,`
    /// followed by a combining mark is one `Character` that is not `","`, and must be escaped too.
    static func escape(_ value: String) -> String {
        var out = ""
        let scalars = Array(value.unicodeScalars)
        for (index, scalar) in scalars.enumerated() {
            switch scalar {
            case "\"", "+", ",", ";", "<", ">", "\\":
                out += "\\" + String(scalar)
            case "#" where index == 0, " " where index == 0 || index == scalars.count - 1:
                out += "\\" + String(scalar)
            case "\u{0}"..."\u{1F}", "\u{7F}":
                let hex = String(scalar.value, radix: 16, uppercase: true)
                out += "\\" + (hex.count == 1 ? "0" : "") + hex
            default:
                out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    /// A directory string's value as text.
    private static func text(_ node: ASN1Node) -> String? {
        guard case .primitive(let bytes) = node.content else { return nil }
        switch node.identifier {
        case .utf8String, .printableString, .ia5String, .visibleString, .numericString:
            // Not repaired: two different byte strings must not read as the same user name.
            return String(validating: bytes, as: UTF8.self)
        case .teletexString:
            // T.61 in practice holds Latin-1 (as OpenSSL reads it).
            return String(String.UnicodeScalarView(bytes.map { Unicode.Scalar($0) }))
        case .bmpString:
            guard bytes.count % 2 == 0 else { return nil }
            let units = stride(from: bytes.startIndex, to: bytes.endIndex, by: 2).map { UInt16(bytes[$0]) << 8 | UInt16(bytes[$0 + 1]) }
            return String(validating: units, as: UTF16.self)  // (a lone surrogate is refused, not repaired)
        case .universalString:
            guard bytes.count % 4 == 0 else { return nil }
            var scalars = String.UnicodeScalarView()
            for i in stride(from: bytes.startIndex, to: bytes.endIndex, by: 4) {
                let value = bytes[i..<i + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
                guard let scalar = Unicode.Scalar(value) else { return nil }
                scalars.append(scalar)
            }
            return String(scalars)
        default:
            return nil
        }
    }
}
