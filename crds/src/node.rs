//! `CiliumNode` (cluster scoped, short name `cn`): the parts cluster-pool
//! IPAM uses — `spec.ipam.podCIDRs` written by the operator and
//! `status.ipam.pod-cidrs` (per-CIDR `in-use` / `depleted` / `released`,
//! Cilium's cluster-pool-v2beta) written by the agent. Every other field
//! Cilium writes is kept as is, so real CiliumNodes round-trip unchanged.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumNode",
    plural = "ciliumnodes",
    shortname = "cn",
    status = "CiliumNodeStatus"
)]
pub struct CiliumNodeSpec {
    #[serde(default)]
    pub ipam: NodeIpamSpec,
    /// Fields Membrane does not interpret (addresses, health, encryption ...).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct NodeIpamSpec {
    /// Pod CIDRs the operator allocated to the node.
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CiliumNodeStatus {
    #[serde(default)]
    pub ipam: NodeIpamStatus,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct NodeIpamStatus {
    /// Per pod CIDR: `{"status": "in-use" | "depleted" | "released"}`.
    #[serde(
        rename = "pod-cidrs",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub pod_cidrs: BTreeMap<String, PodCidrStatus>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PodCidrStatus {
    pub status: String,
}
