//! Cilium's stable kvstore types, with the JSON shapes Cilium's agent marshals
//! (Go `encoding/json`: struct fields in declaration order, map keys sorted,
//! `omitempty` fields left out when empty).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::MeshError;

/// Highest cluster id (`max-connected-clusters` 255, Cilium's default).
pub const CLUSTER_ID_MAX: u32 = 255;
/// Longest cluster name Cilium accepts.
pub const CLUSTER_NAME_MAX_LEN: usize = 32;

/// Go decodes `null` into a nil map that marshals back as `null`; Membrane
/// treats it as empty (what Cilium's code does with it).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `loadbalancer.L4Addr`: exported Go fields without JSON tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4Addr {
    #[serde(rename = "Protocol")]
    pub protocol: String,
    #[serde(rename = "Port")]
    pub port: u16,
}

/// Port name → L4 address of a frontend or backend.
pub type PortConfiguration = BTreeMap<String, L4Addr>;

/// `store.ForZone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForZone {
    pub name: String,
}

/// `store.BackendZone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendZone {
    pub zone: String,
    #[serde(rename = "forZones", default, deserialize_with = "null_as_default")]
    pub for_zones: Vec<ForZone>,
}

/// `store.ClusterService`: a global service as one cluster shares it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterService {
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    /// Frontend IP → ports.
    #[serde(default, deserialize_with = "null_as_default")]
    pub frontends: BTreeMap<String, PortConfiguration>,
    /// Backend IP → ports.
    #[serde(default, deserialize_with = "null_as_default")]
    pub backends: BTreeMap<String, PortConfiguration>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub hostnames: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub zones: BTreeMap<String, BackendZone>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub selector: BTreeMap<String, String>,
    #[serde(rename = "includeExternal", default)]
    pub include_external: bool,
    #[serde(default)]
    pub shared: bool,
    #[serde(rename = "clusterID", default)]
    pub cluster_id: u32,
}

impl ClusterService {
    /// JSON exactly as Cilium's `ClusterService.Marshal` writes it.
    pub fn to_json(&self) -> String {
        // Maps of strings and plain structs: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses and validates a value read under `key`, as Cilium's
    /// `ValidatingClusterService` does for a remote cluster: the content must
    /// be well-formed, belong to `cluster` with `cluster_id`, and its
    /// `namespace/name` must be the key's.
    pub fn from_kv(
        key: &str,
        value: &[u8],
        cluster: &str,
        cluster_id: u32,
    ) -> Result<ClusterService, MeshError> {
        let bad = |reason: String| MeshError::InvalidService {
            key: key.to_string(),
            reason,
        };
        let svc: ClusterService =
            serde_json::from_slice(value).map_err(|e| bad(format!("not a ClusterService: {e}")))?;
        if svc.cluster.is_empty() {
            return Err(bad("cluster is unset".into()));
        }
        if svc.namespace.is_empty() {
            return Err(bad("namespace is unset".into()));
        }
        if svc.name.is_empty() {
            return Err(bad("name is unset".into()));
        }
        validate_cluster_id(svc.cluster_id).map_err(|e| bad(format!("clusterID: {e}")))?;
        for (what, map) in [("frontends", &svc.frontends), ("backends", &svc.backends)] {
            for addr in map.keys() {
                // A zone (`fe80::1%eth0`) does not parse as IpAddr either,
                // matching Cilium's "unsupported IPv6 zone".
                if addr.parse::<IpAddr>().is_err() {
                    return Err(bad(format!("{what}: {addr:?} is not an IP address")));
                }
            }
        }
        if svc.cluster != cluster {
            return Err(bad(format!(
                "unexpected cluster name: got {}, expected {cluster}",
                svc.cluster
            )));
        }
        if svc.cluster_id != cluster_id {
            return Err(bad(format!(
                "unexpected cluster ID: got {}, expected {cluster_id}",
                svc.cluster_id
            )));
        }
        let want = crate::keys::service_key(cluster, &svc.namespace, &svc.name);
        if want != key {
            return Err(bad(format!(
                "namespaced name does not match key: got {}/{}",
                svc.namespace, svc.name
            )));
        }
        Ok(svc)
    }
}

/// `types.CiliumClusterConfigCapabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(rename = "syncedCanaries", default, skip_serializing_if = "is_false")]
    pub synced_canaries: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub cached: bool,
    #[serde(
        rename = "maxConnectedClusters",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub max_connected_clusters: u32,
    #[serde(
        rename = "serviceExportsEnabled",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub service_exports_enabled: Option<bool>,
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `types.CiliumClusterConfig`, under `cilium/cluster-config/<cluster>`.
/// Go's `omitempty` never omits a struct, so `capabilities` is always written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterConfig {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub id: u32,
    #[serde(default)]
    pub capabilities: Capabilities,
}

impl ClusterConfig {
    /// What a Membrane cluster publishes about itself.
    pub fn membrane(id: u32) -> ClusterConfig {
        ClusterConfig {
            id,
            capabilities: Capabilities {
                synced_canaries: true,
                max_connected_clusters: CLUSTER_ID_MAX,
                ..Capabilities::default()
            },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a remote cluster's config and checks it is usable with ours.
    pub fn parse_remote(cluster: &str, value: &[u8]) -> Result<ClusterConfig, MeshError> {
        let bad = |reason: String| MeshError::InvalidClusterConfig {
            cluster: cluster.to_string(),
            reason,
        };
        let c: ClusterConfig =
            serde_json::from_slice(value).map_err(|e| bad(format!("not a cluster config: {e}")))?;
        validate_cluster_id(c.id).map_err(|e| bad(format!("id: {e}")))?;
        if c.capabilities.max_connected_clusters != 0
            && c.capabilities.max_connected_clusters != CLUSTER_ID_MAX
        {
            return Err(bad(format!(
                "mismatched maxConnectedClusters: local={CLUSTER_ID_MAX}, remote={}",
                c.capabilities.max_connected_clusters
            )));
        }
        Ok(c)
    }
}

/// Cluster ids are 1–255; 0 is reserved.
pub fn validate_cluster_id(id: u32) -> Result<(), String> {
    if id == 0 {
        return Err("cluster id 0 is reserved".into());
    }
    if id > CLUSTER_ID_MAX {
        return Err(format!("cluster id {id} is above {CLUSTER_ID_MAX}"));
    }
    Ok(())
}

/// At most 32 lower-case alphanumerics and '-', starting and ending with an
/// alphanumeric (Cilium's `--cluster-name` rule).
pub fn validate_cluster_name(name: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if name.is_empty() {
        return Err("cluster name is empty".into());
    }
    if name.len() > CLUSTER_NAME_MAX_LEN {
        return Err(format!(
            "cluster name {name:?} is longer than {CLUSTER_NAME_MAX_LEN} characters"
        ));
    }
    let ok_chars = name.chars().all(|c| alnum(c) || c == '-');
    let ends = name.starts_with(alnum) && name.ends_with(alnum);
    if !ok_chars || !ends {
        return Err(format!(
            "cluster name {name:?} must consist of lower case alphanumeric characters and '-', and start and end with an alphanumeric character"
        ));
    }
    Ok(())
}
