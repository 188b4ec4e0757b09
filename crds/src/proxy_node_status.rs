//! `membrane.io/v1alpha1` `ProxyNodeStatus`: the objects in which a node's
//! agent reports whether its Envoy ACKed each CiliumEnvoyConfig it serves.
//! Cilium's CEC schema has no status. A node's entries are spread over
//! [`REPORT_SHARDS`] objects by a hash of the CEC's key (the one named after
//! the node, and `<node>.<k>` for the others, created when first needed;
//! all labelled `membrane.io/node: <node>`): a change rewrites the object
//! holding its entry — a sixteenth of the node's report — rather than an
//! entry per CEC of the whole node (≈ 150 KB at 1,000 CECs), and agents
//! never share an object.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of Membrane's own resources.
pub const MEMBRANE_GROUP: &str = "membrane.io";

/// Spec of `ProxyNodeStatus`: the node the report is about.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "membrane.io",
    version = "v1alpha1",
    kind = "ProxyNodeStatus",
    plural = "proxynodestatuses",
    shortname = "pns",
    status = "ProxyNodeStatusStatus",
    category = "membrane"
)]
#[serde(rename_all = "camelCase")]
pub struct ProxyNodeStatusSpec {
    /// The labels the agent selects CECs with (`nodeSelector`). Always
    /// written, empty or not, so what is read back equals what was written.
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
}

/// What the node's Envoy did with each CEC/CCEC the node serves.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyNodeStatusStatus {
    #[serde(default)]
    pub configs: Vec<ConfigAck>,
}

/// Envoy's answer to one CEC/CCEC at one version of its content.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigAck {
    /// `CiliumEnvoyConfig` or `CiliumClusterwideEnvoyConfig`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    /// `metadata.generation` of the content this answer is about.
    pub generation: i64,
    /// The LoadBalancer addresses of the CEC's `spec.services` the content
    /// was built with (an ACK covers listeners bound on them).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// `Acked`, `Nacked` or `Pending`.
    pub state: String,
    /// Why it was NACKed or rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How many objects a node's report is spread over.
pub const REPORT_SHARDS: u32 = 16;

/// The label naming the node a report object belongs to.
pub const REPORT_NODE_LABEL: &str = "membrane.io/node";

/// The report object of `node` that holds the entry of the config
/// `kind`/`namespace`/`name` (FNV-1a of the three, so every agent and
/// restart agrees).
pub fn report_shard(kind: &str, namespace: &str, name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in [kind, namespace, name] {
        for b in part.bytes().chain([0]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h % REPORT_SHARDS
}

/// The name of `node`'s report object number `shard`.
pub fn report_object_name(node: &str, shard: u32) -> String {
    if shard == 0 {
        node.to_owned()
    } else {
        format!("{node}.{shard}")
    }
}

/// The node a report object belongs to: its [`REPORT_NODE_LABEL`], else
/// its name (objects written before reports were spread out).
pub fn report_node(report: &ProxyNodeStatus) -> &str {
    report
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REPORT_NODE_LABEL))
        .or(report.metadata.name.as_ref())
        .map_or("", String::as_str)
}

/// [`ConfigAck::state`] values.
pub const ACKED: &str = "Acked";
pub const NACKED: &str = "Nacked";
pub const PENDING: &str = "Pending";
