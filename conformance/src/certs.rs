//! The self-signed serving certificate upstream's `generateRSACert` makes for the
//! `conformance-tls` Secret: RSA 2048, PKCS#1 key PEM ("RSA PRIVATE KEY"), subject
//! `O=Acme Co, CN=default`, SANs = the hosts, valid for a year, server-auth only.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePrivateKey;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("a self-signed certificate needs at least one host")]
    NoHosts,
    #[error("invalid host {host:?} for a certificate: {detail}")]
    BadHost { host: String, detail: String },
    #[error("generating the RSA key: {0}")]
    Key(String),
    #[error("signing the certificate: {0}")]
    Sign(String),
}

/// PEM-encoded certificate and PKCS#1 private key.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
}

const RSA_BITS: usize = 2048;
const VALID_FOR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Generates a fresh RSA key and a certificate for `hosts` (IP literals become IP SANs).
pub fn self_signed_rsa(hosts: &[String]) -> Result<SelfSigned, CertError> {
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, RSA_BITS)
        .map_err(|e| CertError::Key(e.to_string()))?;
    self_signed_with_key(&key, hosts)
}

/// Same as [`self_signed_rsa`] with a caller-supplied key (key generation dominates the cost).
pub fn self_signed_with_key(
    key: &rsa::RsaPrivateKey,
    hosts: &[String],
) -> Result<SelfSigned, CertError> {
    if hosts.is_empty() {
        return Err(CertError::NoHosts);
    }
    let pkcs8 = key
        .to_pkcs8_der()
        .map_err(|e| CertError::Key(e.to_string()))?;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_bytes());
    let key_pair = KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| CertError::Key(e.to_string()))?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // Go marshals pkix.Name with Organization before CommonName.
    dn.push(DnType::OrganizationName, "Acme Co");
    dn.push(DnType::CommonName, "default");
    params.distinguished_name = dn;
    for h in hosts {
        let san = match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.clone().try_into().map_err(|e: rcgen::Error| {
                CertError::BadHost {
                    host: h.clone(),
                    detail: e.to_string(),
                }
            })?),
        };
        params.subject_alt_names.push(san);
    }
    let now = std::time::SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + VALID_FOR).into();
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f; // keep the DER INTEGER positive without a pad byte
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.key_usages = vec![
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.is_ca = IsCa::ExplicitNoCa;

    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| CertError::Sign(e.to_string()))?;
    let key_pem = key
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| CertError::Key(e.to_string()))?;
    Ok(SelfSigned {
        cert_pem: cert.pem(),
        key_pem: key_pem.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn certificate_matches_upstream_shape() {
        let s = self_signed_rsa(&["foo.bar.com".to_string()]).unwrap();
        assert!(
            s.key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"),
            "{}",
            s.key_pem
        );
        let (_, pem) = parse_x509_pem(s.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, vec!["default"]);
        let org: Vec<_> = cert
            .subject()
            .iter_organization()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(org, vec!["Acme Co"]);
        assert_eq!(cert.subject(), cert.issuer());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::DNSName("foo.bar.com")]
        );
        let spki = cert.public_key().parsed().unwrap();
        match spki {
            x509_parser::public_key::PublicKey::RSA(rsa) => assert_eq!(rsa.key_size(), 2048),
            other => panic!("not RSA: {other:?}"),
        }
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.value.digital_signature() && ku.value.key_encipherment());
        let validity = cert.validity().time_to_expiration().unwrap();
        assert!(validity.whole_days() >= 364, "{validity:?}");
        // The key in the Secret must be the certificate's key.
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(&s.key_pem).unwrap();
        let x509_parser::public_key::PublicKey::RSA(rsa_pub) = cert.public_key().parsed().unwrap()
        else {
            unreachable!()
        };
        let modulus = rsa_pub
            .modulus
            .iter()
            .skip_while(|b| **b == 0)
            .copied()
            .collect::<Vec<_>>();
        assert_eq!(modulus, key.n().to_bytes_be());
    }

    #[test]
    fn ip_hosts_become_ip_sans_and_empty_is_rejected() {
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, RSA_BITS).unwrap();
        let s = self_signed_with_key(&key, &["10.0.0.1".to_string()]).unwrap();
        let (_, pem) = parse_x509_pem(s.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::IPAddress(&[10, 0, 0, 1])]
        );
        assert!(matches!(
            self_signed_with_key(&key, &[]),
            Err(CertError::NoHosts)
        ));
    }
}
