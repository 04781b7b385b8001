import Crypto
import _CryptoExtras
import Foundation

/// Verifies the hashes that `mosquitto_passwd` writes, so users keep their password files:
/// `$7$ITERATIONS$SALT$HASH` (PBKDF2-HMAC-SHA512) and `$6$SALT$HASH` (SHA-512 of password then
/// salt), salt and hash in base64.
enum PasswordHash {
    static let maxIterations = 1_000_000

    static func verify(_ encoded: String, password: [UInt8]) -> Bool {
        // Longer than any hash mosquitto_passwd writes (a 64-byte digest is 88 base64 characters,
        // its salt 16): refused before any decoding, which costs time on a long string.
        guard encoded.utf8.count <= 512 else { return false }
        let parts = encoded.split(separator: "$", omittingEmptySubsequences: false)
        // "$7$101$salt$hash" splits into ["", "7", "101", "salt", "hash"].
        guard parts.count >= 4, parts[0].isEmpty else { return false }
        switch parts[1] {
        case "6" where parts.count == 4:
            guard let salt = Data(base64Encoded: String(parts[2])), let expected = Data(base64Encoded: String(parts[3])) else { return false }
            var hasher = SHA512()
            hasher.update(data: password)
            hasher.update(data: salt)
            return constantTimeEqual(Array(hasher.finalize()), Array(expected))
        case "7" where parts.count == 5:
            // At most one PBKDF2 block (64 bytes, what mosquitto_passwd writes: a longer hash costs
            // the iterations once more per block) and a million iterations (about a second here;
            // mosquitto_passwd's default is 101): a hash past either is refused, not computed.
            guard let iterations = Int(parts[2]), iterations > 0, iterations <= maxIterations,
                let salt = Data(base64Encoded: String(parts[3])), let expected = Data(base64Encoded: String(parts[4])),
                !expected.isEmpty, expected.count <= 64
            else { return false }
            guard let key = try? KDF.Insecure.PBKDF2.deriveKey(
                from: password, salt: salt, using: .sha512, outputByteCount: expected.count, unsafeUncheckedRounds: iterations)
            else { return false }
            return key.withUnsafeBytes { constantTimeEqual(Array($0), Array(expected)) }
        default:
            return false
        }
    }

    private static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for i in 0..<a.count { difference |= a[i] ^ b[i] }
        return difference == 0
    }
}
