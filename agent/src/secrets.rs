//! SDS: every usable TLS Secret in the store becomes an Envoy `Secret` named
//! `<ns>/<name>`. Envoy only receives the names it asks for, so serving the
//! whole set is cheap; validating first keeps one bad Secret from making Envoy
//! NACK the response that carries its siblings.

use k8s_openapi::api::core::v1::Secret as KubeSecret;
use membrane_store::StoreSnapshot;

use crate::envoy_pb::*;

/// A Secret that looks like TLS material but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSecret {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// Envoy secrets for all TLS Secrets, plus the ones rejected and why, and
/// the ones served with a warning (expired or not yet valid certificates:
/// served as Cilium does, but clients will refuse them).
pub fn tls_secrets(snap: &StoreSnapshot) -> (Vec<Secret>, Vec<BadSecret>, Vec<BadSecret>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut warn = Vec::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for s in snap.typed::<KubeSecret>(None) {
        let is_tls = s.type_.as_deref() == Some("kubernetes.io/tls");
        let data = s.data.clone().unwrap_or_default();
        let crt = data.get("tls.crt").map(|b| b.0.clone());
        let key = data.get("tls.key").map(|b| b.0.clone());
        if !is_tls && (crt.is_none() || key.is_none()) {
            continue;
        }
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let name = s.metadata.name.clone().unwrap_or_default();
        let (Some(crt), Some(key)) = (crt, key) else {
            bad.push(BadSecret {
                namespace: ns,
                name,
                reason: "data: a kubernetes.io/tls Secret needs both tls.crt and tls.key".into(),
            });
            continue;
        };
        match membrane_certs::validate_tls_pair(&crt, &key) {
            Ok(pair) => {
                if let Some(why) = validity_problem(pair.not_before, pair.not_after, now) {
                    warn.push(BadSecret {
                        namespace: ns.clone(),
                        name: name.clone(),
                        reason: format!(
                            "data.tls.crt: {why}; Envoy serves it, clients will refuse it"
                        ),
                    });
                }
                good.push(Secret {
                    name: format!("{ns}/{name}"),
                    r#type: Some(SecretType::TlsCertificate(TlsCertificate {
                        certificate_chain: Some(inline(pair.cert_pem)),
                        private_key: Some(inline(pair.key_pem)),
                        ..Default::default()
                    })),
                });
            }
            Err(e) => bad.push(BadSecret {
                namespace: ns,
                name,
                reason: format!("data.{e}"),
            }),
        }
    }
    (good, bad, warn)
}

/// Why a certificate valid from `not_before` to `not_after` (Unix seconds)
/// is not valid at `now`.
fn validity_problem(not_before: Option<i64>, not_after: Option<i64>, now: i64) -> Option<String> {
    let at = |t: i64| {
        k8s_openapi::jiff::Timestamp::from_second(t)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| t.to_string())
    };
    match (not_before, not_after) {
        (_, Some(after)) if after < now => {
            Some(format!("the certificate expired at {}", at(after)))
        }
        (Some(before), _) if before > now => Some(format!(
            "the certificate is not valid before {}",
            at(before)
        )),
        _ => None,
    }
}

fn inline(text: String) -> DataSource {
    DataSource {
        specifier: Some(DataSpecifier::InlineString(text)),
        ..Default::default()
    }
}
