//! `tls-server-end-point` channel binding data (RFC 5929 section 4.1): the hash of our own
//! leaf certificate, which SCRAM-SHA-256-PLUS clients fold into their proof.
//!
//! The hash function is the one of the certificate's signature algorithm, except that MD5 and
//! SHA-1 become SHA-256. Like PostgreSQL's `be_tls_get_certificate_hash` (OpenSSL's
//! `X509_get_signature_info`), RSASSA-PSS takes the hash from its parameters, and algorithms
//! without a separate hash (Ed25519, Ed448) or unknown ones give no binding at all: PostgreSQL
//! fails such logins, we do not offer -PLUS for them.
//!
//! Only the outer `signatureAlgorithm` of the certificate is read, with a minimal DER walker:
//! the certificate is our own, from the config, but it is still parsed without trusting it.

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// A hash usable for `tls-server-end-point`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl EndPointHash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            EndPointHash::Sha224 => Sha224::digest(data).to_vec(),
            EndPointHash::Sha256 => Sha256::digest(data).to_vec(),
            EndPointHash::Sha384 => Sha384::digest(data).to_vec(),
            EndPointHash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

/// The channel binding data for a DER leaf certificate; `None` when no hash can be determined
/// (see the module docs), in which case -PLUS must not be offered.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    Some(end_point_hash(cert_der)?.digest(cert_der))
}

/// The hash `tls-server-end-point` uses for this certificate.
pub fn end_point_hash(cert_der: &[u8]) -> Option<EndPointHash> {
    let (oid, params) = signature_algorithm(cert_der)?;
    match oid {
        RSA_PSS => pss_hash(params),
        _ => signature_hash(oid),
    }
}

// DER-encoded OID contents (no tag and length).
const RSA_MD5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04];
const RSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];
const RSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const RSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
const RSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
const RSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
const RSA_SHA224: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e];
const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
const ECDSA_SHA224: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01];
const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
const DSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03];
const DSA_SHA224: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x01];
const DSA_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x02];
// Hash algorithms, as named inside RSASSA-PSS parameters.
const MD5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x05];
const SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
const SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
const SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];
const SHA224: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04];

const TAG_SEQUENCE: u8 = 0x30;
const TAG_OID: u8 = 0x06;
/// `[0]` EXPLICIT, constructed: RSASSA-PSS-params' hashAlgorithm.
const TAG_CONTEXT_0: u8 = 0xa0;

fn signature_hash(oid: &[u8]) -> Option<EndPointHash> {
    Some(match oid {
        // RFC 5929: MD5 and SHA-1 are upgraded to SHA-256.
        RSA_MD5 | RSA_SHA1 | ECDSA_SHA1 | DSA_SHA1 => EndPointHash::Sha256,
        RSA_SHA224 | ECDSA_SHA224 | DSA_SHA224 => EndPointHash::Sha224,
        RSA_SHA256 | ECDSA_SHA256 | DSA_SHA256 => EndPointHash::Sha256,
        RSA_SHA384 | ECDSA_SHA384 => EndPointHash::Sha384,
        RSA_SHA512 | ECDSA_SHA512 => EndPointHash::Sha512,
        _ => return None,
    })
}

fn digest_hash(oid: &[u8]) -> Option<EndPointHash> {
    Some(match oid {
        MD5 | SHA1 | SHA256 => EndPointHash::Sha256,
        SHA224 => EndPointHash::Sha224,
        SHA384 => EndPointHash::Sha384,
        SHA512 => EndPointHash::Sha512,
        _ => return None,
    })
}

/// RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] HashAlgorithm DEFAULT sha1, ... }
/// (RFC 4055). Absent or empty parameters mean the SHA-1 default, hence SHA-256.
fn pss_hash(params: &[u8]) -> Option<EndPointHash> {
    if params.is_empty() {
        return Some(EndPointHash::Sha256);
    }
    let (tag, seq, rest) = read_tlv(params)?;
    if tag != TAG_SEQUENCE || !rest.is_empty() {
        return None;
    }
    if seq.is_empty() {
        return Some(EndPointHash::Sha256);
    }
    let (tag, explicit, _) = read_tlv(seq)?;
    if tag != TAG_CONTEXT_0 {
        // Other fields present, hashAlgorithm absent: the default.
        return Some(EndPointHash::Sha256);
    }
    let (oid, _) = algorithm_identifier(explicit)?;
    digest_hash(oid)
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier,
/// signatureValue BIT STRING }: the OID and the raw parameters of `signatureAlgorithm`.
pub(crate) fn signature_algorithm(cert_der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (tag, cert, trailing) = read_tlv(cert_der)?;
    if tag != TAG_SEQUENCE || !trailing.is_empty() {
        return None;
    }
    let (tag, _tbs, rest) = read_tlv(cert)?;
    if tag != TAG_SEQUENCE {
        return None;
    }
    algorithm_identifier(rest)
}

/// AlgorithmIdentifier ::= SEQUENCE { algorithm OBJECT IDENTIFIER, parameters ANY OPTIONAL }
/// at the start of `input`.
fn algorithm_identifier(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (tag, alg, _) = read_tlv(input)?;
    if tag != TAG_SEQUENCE {
        return None;
    }
    let (tag, oid, params) = read_tlv(alg)?;
    if tag != TAG_OID || oid.is_empty() {
        return None;
    }
    Some((oid, params))
}

/// One DER element at the start of `input`: (tag, contents, what follows). Single-byte tags
/// and definite lengths only, which is all a certificate's outer structure uses.
fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        // Long form: 1..=4 length bytes (0x80, indefinite, is not DER).
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    let (contents, after) = rest.split_at_checked(len)?;
    Some((tag, contents, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    fn rcgen_cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .der()
            .to_vec()
    }

    fn fixture(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("fixture PEM")
            .to_vec()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn rcgen_ecdsa_certificates() {
        let der = rcgen_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(signature_algorithm(&der).map(|a| a.0), Some(ECDSA_SHA256));
        assert_eq!(end_point_hash(&der), Some(EndPointHash::Sha256));
        assert_eq!(
            tls_server_end_point(&der),
            Some(Sha256::digest(&der).to_vec())
        );

        let der = rcgen_cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(signature_algorithm(&der).map(|a| a.0), Some(ECDSA_SHA384));
        assert_eq!(
            tls_server_end_point(&der),
            Some(Sha384::digest(&der).to_vec())
        );
    }

    #[test]
    fn rcgen_ed25519_certificate_has_no_binding() {
        let der = rcgen_cert(&rcgen::PKCS_ED25519);
        assert_eq!(
            signature_algorithm(&der).map(|a| a.0),
            Some([0x2b, 0x65, 0x70].as_slice())
        );
        assert_eq!(tls_server_end_point(&der), None);
    }

    /// RSA certificates made once with OpenSSL 3 (rcgen on ring cannot make RSA keys); the
    /// expected values are OpenSSL's own `x509 -outform der | dgst -<hash>`, so the hash choice
    /// is checked against an independent implementation.
    #[test]
    fn openssl_rsa_certificates() {
        let cases = [
            // SHA-1 signature: upgraded to SHA-256.
            (
                include_str!("testdata/rsa-sha1.pem"),
                EndPointHash::Sha256,
                "8e440588b2b08c45f24079e3203eb80aabc6a6c60ac91b90106ccc20b8f8255d",
            ),
            (
                include_str!("testdata/rsa-sha256.pem"),
                EndPointHash::Sha256,
                "d28ced70e5db594b4d136c98b770c4c2e39d2666653f14c2cd3c7628372fa869",
            ),
            (
                include_str!("testdata/rsa-sha512.pem"),
                EndPointHash::Sha512,
                "0c57ce7162015d7f3df898d4946336989498ccebd16ee7043dd065f90075bd62\
                 28fbc0bfd8855cd2a7546eec786c89dd8673509799e0aca43ef65de009201f9b",
            ),
            // RSASSA-PSS: the hash comes from the parameters.
            (
                include_str!("testdata/rsa-pss-sha384.pem"),
                EndPointHash::Sha384,
                "5cd3d969f82ea0b21fb3e8870228388742f0d16e0bcd51e2ce032abe3ed6922e\
                 5387007e848d07759e2e9cdcfa0ca521",
            ),
            // PSS with the default (SHA-1) hash, parameters without hashAlgorithm.
            (
                include_str!("testdata/rsa-pss-sha1.pem"),
                EndPointHash::Sha256,
                "b0bbc9a86cbba50305368d079c0ae9e9c6fafe702894e6c20f8950f5f4069816",
            ),
        ];
        for (pem, hash, expected) in cases {
            let der = fixture(pem);
            assert_eq!(end_point_hash(&der), Some(hash), "{pem}");
            assert_eq!(
                tls_server_end_point(&der).map(|h| hex(&h)).as_deref(),
                Some(expected)
            );
        }
    }

    #[test]
    fn pss_parameters() {
        // hashAlgorithm [0] { SEQUENCE { OID sha512, NULL } }, then a saltLength [2].
        let mut alg_id = vec![0x30, 0x0d, 0x06, 0x09];
        alg_id.extend_from_slice(SHA512);
        alg_id.extend_from_slice(&[0x05, 0x00]);
        let mut explicit = vec![TAG_CONTEXT_0, alg_id.len() as u8];
        explicit.extend_from_slice(&alg_id);
        explicit.extend_from_slice(&[0xa2, 0x03, 0x02, 0x01, 0x40]);
        let mut params = vec![TAG_SEQUENCE, explicit.len() as u8];
        params.extend_from_slice(&explicit);
        assert_eq!(pss_hash(&params), Some(EndPointHash::Sha512));
        // Empty or absent parameters: SHA-1 default, upgraded.
        assert_eq!(pss_hash(&[]), Some(EndPointHash::Sha256));
        assert_eq!(pss_hash(&[0x30, 0x00]), Some(EndPointHash::Sha256));
        // A hash we do not know (SHA3-256): no binding rather than a guess.
        let sha3: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x08];
        let mut params = vec![0x30, 0x0f, 0xa0, 0x0d, 0x30, 0x0b, 0x06, 0x09];
        params.extend_from_slice(sha3);
        assert_eq!(pss_hash(&params), None);
    }

    #[test]
    fn der_walker_rejects_malformed_input() {
        let der = rcgen_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        // Every truncation, and trailing bytes, give None, never a panic or a wrong answer.
        for n in 0..der.len() {
            assert_eq!(end_point_hash(&der[..n]), None, "prefix {n}");
        }
        let mut longer = der.clone();
        longer.push(0);
        assert_eq!(end_point_hash(&longer), None);
        // Indefinite length, oversized length-of-length, high tag numbers.
        assert_eq!(read_tlv(&[0x30, 0x80, 0x00, 0x00]), None);
        assert_eq!(read_tlv(&[0x30, 0x85, 1, 0, 0, 0, 0]), None);
        assert_eq!(read_tlv(&[0x1f, 0x01, 0x00]), None);
        assert_eq!(
            read_tlv(&[0x30, 0x82, 0x00, 0x01, 0xaa, 0xbb]),
            Some((0x30, [0xaa].as_slice(), [0xbb].as_slice()))
        );
        // Flipped bytes anywhere: any answer but no panic.
        for i in 0..der.len() {
            let mut m = der.clone();
            m[i] ^= 0xff;
            let _ = tls_server_end_point(&m);
        }
    }
}
