//! Resource names inside a CEC are local to it; Cilium prefixes them with
//! `<namespace>/<cec-name>/` so configs never collide. Names that already
//! contain a `/` are taken as qualified (e.g. EDS service names
//! `<ns>/<svc>:<port>` and SDS names `<secrets-ns>/<secret>`).

/// Qualify `name` for the CEC `namespace`/`cec` (`namespace` is empty for a
/// clusterwide config).
pub fn qualify(namespace: &str, cec: &str, name: &str) -> String {
    if name.is_empty() || name.contains('/') {
        name.to_owned()
    } else {
        format!("{namespace}/{cec}/{name}")
    }
}

/// What the bootstrap admin cluster was called before Cilium qualified
/// names (its bootstrap had `envoy-admin`, now `/envoy-admin`); Cilium's
/// older admin and Prometheus listener examples still route to it.
pub const LEGACY_ADMIN_CLUSTER: &str = "envoy-admin";

/// Qualify a reference to a cluster. A bare `envoy-admin` names the
/// bootstrap admin cluster unless the CEC defines a cluster of that name
/// itself (`defines_legacy_admin`), so both generations of Cilium's
/// examples work unchanged; everything else is [`qualify`]'d.
pub fn qualify_cluster_ref(
    namespace: &str,
    cec: &str,
    name: &str,
    defines_legacy_admin: bool,
) -> String {
    if name == LEGACY_ADMIN_CLUSTER && !defines_legacy_admin {
        crate::envoy::ADMIN_CLUSTER.to_owned()
    } else {
        qualify(namespace, cec, name)
    }
}

#[cfg(test)]
mod tests {
    use super::{qualify, qualify_cluster_ref};

    #[test]
    fn the_bootstrap_admin_cluster_passes_through() {
        assert_eq!(qualify("", "ccec", "/envoy-admin"), "/envoy-admin");
        assert_eq!(
            qualify_cluster_ref("", "ccec", "/envoy-admin", false),
            "/envoy-admin"
        );
        assert_eq!(
            qualify_cluster_ref("", "ccec", "envoy-admin", false),
            "/envoy-admin"
        );
        // A CEC's own `envoy-admin` cluster stays its own.
        assert_eq!(
            qualify_cluster_ref("ns", "cec", "envoy-admin", true),
            "ns/cec/envoy-admin"
        );
        assert_eq!(qualify_cluster_ref("ns", "cec", "c", false), "ns/cec/c");
    }

    #[test]
    fn qualifies_local_names_only() {
        assert_eq!(qualify("ns", "cec", "listener"), "ns/cec/listener");
        assert_eq!(qualify("ns", "cec", "ns:svc:80"), "ns/cec/ns:svc:80");
        assert_eq!(qualify("ns", "cec", "ns/svc:80"), "ns/svc:80");
        assert_eq!(qualify("", "ccec", "l"), "/ccec/l");
        assert_eq!(qualify("ns", "cec", ""), "");
    }
}
