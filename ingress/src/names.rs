//! Names of the objects and Envoy resources Cilium's operator writes for an
//! Ingress in dedicated mode. They are part of the compatibility contract:
//! tooling and the agent look resources up by these names.

use sha2::{Digest, Sha256};

/// Prefix of every generated object name.
pub const PREFIX: &str = "cilium-ingress";
/// Default namespace of the shared-mode CEC and Service (Cilium's own).
pub const SHARED_NAMESPACE: &str = "kube-system";
/// Name of the single listener of a dedicated-mode CEC.
pub const LISTENER_NAME: &str = "listener";
/// RouteConfiguration (and HCM stat prefix) for plain-text HTTP.
pub const INSECURE_ROUTE_NAME: &str = "listener-insecure";
/// RouteConfiguration (and HCM stat prefix) for TLS-terminated HTTP.
pub const SECURE_ROUTE_NAME: &str = "listener-secure";

/// Longest name Kubernetes accepts for a Service (a DNS label).
const MAX_K8S_NAME: usize = 63;
/// Length of the hash suffix of a shortened name.
const HASH_LEN: usize = 10;

/// Shortens `s` to at most 63 characters the way Cilium does: keep the first
/// 52 characters, then `-` and 10 characters derived from the SHA-256 of the
/// whole name (with kubectl's vowel-free digit substitution, so the suffix
/// never spells words).
pub fn shorten_k8s_name(s: &str) -> String {
    if s.len() <= MAX_K8S_NAME {
        return s.to_string();
    }
    let mut keep = MAX_K8S_NAME - HASH_LEN - 1;
    // Names are ASCII in practice; never split a multi-byte character.
    while !s.is_char_boundary(keep) {
        keep -= 1;
    }
    let digest = Sha256::digest(s.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let suffix: String = hex
        .chars()
        .take(HASH_LEN)
        .map(|c| match c {
            '0' => 'g',
            '1' => 'h',
            '3' => 'k',
            'a' => 'm',
            'e' => 't',
            other => other,
        })
        .collect();
    format!("{}-{}", &s[..keep], suffix)
}

/// `cilium-ingress-<ns>-<name>`: the dedicated-mode CEC. Cilium does not
/// shorten it (CRD object names may be up to 253 characters).
pub fn cec_name(namespace: &str, name: &str) -> String {
    format!("{PREFIX}-{namespace}-{name}")
}

/// `cilium-ingress-<name>`, shortened to 63 characters: the LB Service and
/// its EndpointSlice, and the `spec.services` entry of the CEC.
pub fn service_name(ingress_name: &str) -> String {
    shorten_k8s_name(&format!("{PREFIX}-{ingress_name}"))
}

/// `<ns>:<svc>:<port>`: an Envoy cluster. Colons, not slashes, so the agent's
/// `<cec-ns>/<cec-name>/` qualification does not mistake it for qualified.
pub fn cluster_name(namespace: &str, service: &str, port: &str) -> String {
    format!("{namespace}:{service}:{port}")
}

/// `<ns>/<svc>:<port>`: the EDS service name (ClusterLoadAssignment name).
pub fn eds_service_name(namespace: &str, service: &str, port: &str) -> String {
    format!("{namespace}/{service}:{port}")
}

/// `<secrets-ns>/<ns>-<secret>`: the SDS name of a TLS certificate, as
/// synced by Cilium into its secrets namespace.
pub fn sds_secret_name(secrets_namespace: &str, namespace: &str, secret: &str) -> String {
    format!("{secrets_namespace}/{namespace}-{secret}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_unchanged() {
        assert_eq!(shorten_k8s_name("cilium-ingress-foo"), "cilium-ingress-foo");
        let exactly_63 = "a".repeat(63);
        assert_eq!(shorten_k8s_name(&exactly_63), exactly_63);
    }

    #[test]
    fn long_names_are_shortened_deterministically() {
        let long = format!("cilium-ingress-{}", "x".repeat(60));
        let short = shorten_k8s_name(&long);
        assert_eq!(short.len(), 63);
        assert!(short.starts_with(&long[..52]));
        assert_eq!(&short[52..53], "-");
        assert_eq!(short, shorten_k8s_name(&long));
        // The suffix never contains the substituted digits/vowels.
        assert!(!short[53..].contains(['0', '1', '3', 'a', 'e']));
        let other = format!("cilium-ingress-{}y", "x".repeat(60));
        assert_ne!(shorten_k8s_name(&other), short);
    }

    #[test]
    fn shortening_matches_cilium_algorithm() {
        // sha256("a" * 64) starts with "ffe054fe7a"; e→t, 0→g, a→m.
        let s = "a".repeat(64);
        assert_eq!(
            shorten_k8s_name(&s),
            format!("{}-fftg54ft7m", "a".repeat(52))
        );
    }

    #[test]
    fn resource_names() {
        assert_eq!(cec_name("ns", "ing"), "cilium-ingress-ns-ing");
        assert_eq!(service_name("ing"), "cilium-ingress-ing");
        assert_eq!(cluster_name("ns", "svc", "8080"), "ns:svc:8080");
        assert_eq!(eds_service_name("ns", "svc", "http"), "ns/svc:http");
        assert_eq!(
            sds_secret_name("cilium-secrets", "ns", "tls"),
            "cilium-secrets/ns-tls"
        );
    }
}
