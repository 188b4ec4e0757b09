//! Cilium's kvstore key layout (a stable API: mixed Cilium/Membrane meshes
//! read each other's keys).

/// `kvstore.BaseKeyPrefix`.
pub const BASE: &str = "cilium";
/// `store.ServiceStorePrefix`.
pub const SERVICES_PREFIX: &str = "cilium/state/services/v1";
/// Prefix of every cluster's `CiliumClusterConfig`.
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config";
/// Prefix of the per-cluster, per-prefix "synced" canaries.
pub const SYNCED_PREFIX: &str = "cilium/synced";
/// `kvstore.HeartbeatPath`.
pub const HEARTBEAT: &str = "cilium/.heartbeat";

/// `cilium/state/services/v1/<cluster>/<namespace>/<name>`
pub fn service_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{SERVICES_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `cilium/state/services/v1/<cluster>/`: every service of one cluster.
pub fn cluster_services_prefix(cluster: &str) -> String {
    format!("{SERVICES_PREFIX}/{cluster}/")
}

/// `cilium/cluster-config/<cluster>`
pub fn cluster_config_key(cluster: &str) -> String {
    format!("{CLUSTER_CONFIG_PREFIX}/{cluster}")
}

/// `cilium/synced/<cluster>/cilium/state/services/v1`: written once the
/// cluster's initial service export is complete.
pub fn services_synced_key(cluster: &str) -> String {
    format!("{SYNCED_PREFIX}/{cluster}/{SERVICES_PREFIX}")
}

/// `(namespace, name)` of a key under [`cluster_services_prefix`].
pub fn parse_service_key<'a>(cluster: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(SERVICES_PREFIX)?.strip_prefix('/')?;
    let rest = rest.strip_prefix(cluster)?.strip_prefix('/')?;
    let (ns, name) = rest.split_once('/')?;
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some((ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(
            service_key("c1", "default", "echo"),
            "cilium/state/services/v1/c1/default/echo"
        );
        assert_eq!(cluster_config_key("c1"), "cilium/cluster-config/c1");
        assert_eq!(
            services_synced_key("c1"),
            "cilium/synced/c1/cilium/state/services/v1"
        );
        assert_eq!(HEARTBEAT, "cilium/.heartbeat");
        assert_eq!(
            parse_service_key("c1", "cilium/state/services/v1/c1/ns/n"),
            Some(("ns", "n"))
        );
        assert_eq!(
            parse_service_key("c1", "cilium/state/services/v1/c10/ns/n"),
            None
        );
        assert_eq!(
            parse_service_key("c1", "cilium/state/services/v1/c1/ns/n/x"),
            None
        );
    }
}
