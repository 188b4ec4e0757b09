//! `membrane.io/v1alpha1` `ProxyNodeStatus`: one object per node, named after
//! it, in which the node's agent reports whether its Envoy ACKed each
//! CiliumEnvoyConfig it serves. Cilium's CEC schema has no status, and one
//! object per node (rather than per CEC) keeps an agent's writes batched
//! and avoids agents fighting over a shared status.

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

/// [`ConfigAck::state`] values.
pub const ACKED: &str = "Acked";
pub const NACKED: &str = "Nacked";
pub const PENDING: &str = "Pending";
