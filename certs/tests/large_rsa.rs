//! RSA keys larger than ring can sign with (it stops at 4096 bits) are
//! valid TLS material for Envoy: they are accepted when they match the
//! certificate and still rejected when they do not. The fixtures are
//! self-signed test certificates made with
//! `openssl req -x509 -newkey rsa:N -nodes -subj /CN=big.example.com`.

use membrane_certs::{CertError, validate_tls_pair};

const CRT_8192: &[u8] = include_bytes!("testdata/rsa8192.crt");
const KEY_8192: &[u8] = include_bytes!("testdata/rsa8192.key");
const CRT_16384: &[u8] = include_bytes!("testdata/rsa16384.crt");
const KEY_16384: &[u8] = include_bytes!("testdata/rsa16384.key");

#[test]
fn large_rsa_keys_are_accepted() {
    for (crt, key) in [(CRT_8192, KEY_8192), (CRT_16384, KEY_16384)] {
        let pair = validate_tls_pair(crt, key).expect("a matching large RSA pair is valid");
        assert_eq!(pair.chain_len, 1);
        assert!(pair.not_after.is_some_and(|t| t > 4_000_000_000));
    }
}

#[test]
fn large_rsa_keys_of_another_certificate_are_rejected() {
    assert_eq!(
        validate_tls_pair(CRT_8192, KEY_16384),
        Err(CertError::KeyMismatch)
    );
    let (_, small_key) = membrane_certs::self_signed(&["a.example"]).expect("issue");
    assert_eq!(
        validate_tls_pair(CRT_16384, small_key.as_bytes()),
        Err(CertError::KeyMismatch)
    );
}

#[test]
fn expired_certificates_report_their_dates() {
    let (crt, key) = membrane_certs::self_signed_expired(&["old.example"]).expect("issue");
    let pair = validate_tls_pair(crt.as_bytes(), key.as_bytes()).expect("still valid material");
    assert_eq!(pair.not_after, Some(1_609_459_200));
}
