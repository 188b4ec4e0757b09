//! Certificates for TLS termination: validation of `kubernetes.io/tls`
//! Secrets before their PEM reaches Envoy, and self-signed issuance for tests
//! and examples.
//!
//! Envoy rejects a bad certificate by NACKing the whole SDS response, which
//! would take siblings down with it; validating here lets the agent reject
//! just the one Secret with a message that names it.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate/key pair is unusable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("tls.crt: no PEM certificate found")]
    NoCertificate,
    #[error("tls.crt: {0}")]
    BadCertificate(String),
    #[error("tls.key: no PEM private key found")]
    NoKey,
    #[error("tls.key: {0}")]
    BadKey(String),
    #[error("tls.key does not match the certificate in tls.crt")]
    KeyMismatch,
    #[error("issuing certificate: {0}")]
    Issue(String),
}

/// A validated certificate chain and key, still in PEM form for Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPair {
    pub cert_pem: String,
    pub key_pem: String,
    /// Number of certificates in the chain (leaf first).
    pub chain_len: usize,
    /// Validity of the leaf certificate, Unix seconds (`None` when its
    /// dates cannot be read).
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
}

/// Parse and cross-check a PEM certificate chain and private key.
pub fn validate_tls_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsPair, CertError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadCertificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| CertError::BadKey(e.to_string()))?
        .ok_or(CertError::NoKey)?;
    let leaf = x509_parser::parse_x509_certificate(&chain[0])
        .map(|(_, c)| c)
        .map_err(|e| CertError::BadCertificate(e.to_string()));
    let provider = rustls::crypto::ring::default_provider();
    match provider.key_provider.load_private_key(key.clone_key()) {
        Ok(signing_key) => {
            let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
            match certified.keys_match() {
                Ok(()) => {}
                // Key types whose public key rustls cannot derive are
                // accepted: Envoy will still check them.
                Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
                Err(rustls::Error::InconsistentKeys(_)) => return Err(CertError::KeyMismatch),
                Err(e) => return Err(CertError::BadCertificate(e.to_string())),
            }
        }
        // ring signs only with RSA keys up to 4096 bits; Envoy (BoringSSL)
        // serves 8192- and 16384-bit keys, so compare the modulus instead.
        Err(e) => match rsa_modulus(&key) {
            Some(modulus) => {
                let leaf = leaf.as_ref().map_err(Clone::clone)?;
                match leaf.public_key().parsed() {
                    Ok(x509_parser::public_key::PublicKey::RSA(pk))
                        if strip_zeros(pk.modulus) == strip_zeros(modulus) => {}
                    _ => return Err(CertError::KeyMismatch),
                }
            }
            None => return Err(CertError::BadKey(e.to_string())),
        },
    }
    let validity = leaf.as_ref().ok().map(|c| c.validity());
    Ok(TlsPair {
        cert_pem: String::from_utf8_lossy(cert_pem).into_owned(),
        key_pem: String::from_utf8_lossy(key_pem).into_owned(),
        chain_len: chain.len(),
        not_before: validity.map(|v| v.not_before.timestamp()),
        not_after: validity.map(|v| v.not_after.timestamp()),
    })
}

/// The modulus of an RSA private key (PKCS#1, or PKCS#8 wrapping one).
fn rsa_modulus<'a>(key: &'a PrivateKeyDer<'_>) -> Option<&'a [u8]> {
    use x509_parser::der_parser::parse_der;
    let pkcs1 = match key {
        PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der(),
        PrivateKeyDer::Pkcs8(k) => {
            // PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING }
            let (_, info) = parse_der(k.secret_pkcs8_der()).ok()?;
            let fields = info.as_sequence().ok()?;
            let oid = fields.get(1)?.as_sequence().ok()?.first()?.as_oid().ok()?;
            if oid.to_id_string() != "1.2.840.113549.1.1.1" {
                return None;
            }
            fields.get(2)?.as_slice().ok()?
        }
        _ => return None,
    };
    // RSAPrivateKey ::= SEQUENCE { version, modulus INTEGER, ... }
    let (_, rsa) = parse_der(pkcs1).ok()?;
    rsa.as_sequence().ok()?.get(1)?.as_slice().ok()
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[start..]
}

/// A self-signed certificate for `hosts` (first host is the common name), in
/// PEM. Used by tests and examples, never for production trust.
pub fn self_signed(hosts: &[&str]) -> Result<(String, String), CertError> {
    let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    let key = rcgen::KeyPair::generate().map_err(|e| CertError::Issue(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(names).map_err(|e| CertError::Issue(e.to_string()))?;
    if let Some(cn) = hosts.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, (*cn).to_owned());
    }
    let cert = params
        .self_signed(&key)
        .map_err(|e| CertError::Issue(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Like [`self_signed`], but valid only during 2020: an expired
/// certificate, for tests of how expiry is reported.
pub fn self_signed_expired(hosts: &[&str]) -> Result<(String, String), CertError> {
    let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    let key = rcgen::KeyPair::generate().map_err(|e| CertError::Issue(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(names).map_err(|e| CertError::Issue(e.to_string()))?;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params
        .self_signed(&key)
        .map_err(|e| CertError::Issue(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A private CA issuing server and client certificates, in PEM. For tests
/// and examples that need mutual TLS (e.g. Cluster Mesh's etcd), never for
/// production trust.
pub struct TestCa {
    cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(common_name: &str) -> Result<TestCa, CertError> {
        let issue = |e: rcgen::Error| CertError::Issue(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(issue)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(issue)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name.to_owned());
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(issue)?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The CA certificate (what peers trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A leaf for `hosts` (DNS names or IP addresses; the first is also the
    /// common name) usable as both TLS server and client: `(cert, key)`.
    pub fn issue(&self, hosts: &[&str]) -> Result<(String, String), CertError> {
        let issue = |e: rcgen::Error| CertError::Issue(e.to_string());
        let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let key = rcgen::KeyPair::generate().map_err(issue)?;
        let mut params = rcgen::CertificateParams::new(names).map_err(issue)?;
        if let Some(cn) = hosts.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, (*cn).to_owned());
        }
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).map_err(issue)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ca_issues_a_chain_that_validates() {
        let ca = TestCa::new("mesh-ca").unwrap();
        let (crt, key) = ca.issue(&["127.0.0.1", "etcd.local"]).unwrap();
        let pair = validate_tls_pair(crt.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(pair.chain_len, 1);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn accepts_matching_pair() {
        let (crt, key) = self_signed(&["foo.bar.com"]).unwrap();
        let pair = validate_tls_pair(crt.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(pair.chain_len, 1);
    }

    #[test]
    fn rejects_missing_or_garbage_parts() {
        let (crt, key) = self_signed(&["a.example"]).unwrap();
        assert_eq!(
            validate_tls_pair(b"", key.as_bytes()),
            Err(CertError::NoCertificate)
        );
        assert_eq!(
            validate_tls_pair(crt.as_bytes(), b""),
            Err(CertError::NoKey)
        );
        assert_eq!(
            validate_tls_pair(crt.as_bytes(), b"not pem at all"),
            Err(CertError::NoKey)
        );
    }

    #[test]
    fn rejects_key_of_another_certificate() {
        let (crt, _) = self_signed(&["a.example"]).unwrap();
        let (_, other_key) = self_signed(&["b.example"]).unwrap();
        assert_eq!(
            validate_tls_pair(crt.as_bytes(), other_key.as_bytes()),
            Err(CertError::KeyMismatch)
        );
    }
}
