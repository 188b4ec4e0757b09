//! Rust types of the `cilium.io/v2` custom resources Membrane understands,
//! and of Membrane's own `membrane.io` ones.
//!
//! The JSON shape follows Cilium's CRDs field for field so that manifests
//! written for Cilium apply unchanged.

mod envoy_config;
mod network_policy;
mod node;
mod proxy_node_status;

pub use envoy_config::{
    BackendService, CiliumClusterwideEnvoyConfig, CiliumClusterwideEnvoyConfigSpec,
    CiliumEnvoyConfig, CiliumEnvoyConfigSpec, EnvoyConfigSpec, EnvoyResource, ServiceListener,
    selects_node,
};
pub use node::{
    CiliumNode, CiliumNodeSpec, CiliumNodeStatus, NodeIpamSpec, NodeIpamStatus, PodCidrStatus,
};

pub use network_policy::{
    CidrRule, CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, DefaultDenyConfig,
    EgressDenyRule, EgressRule, IcmpField, IcmpRule, IngressDenyRule, IngressRule,
    NetworkPolicyStatus, PolicyRule, PortDenyRule, PortProtocol, PortRule,
};

pub use proxy_node_status::{
    ACKED, ConfigAck, MEMBRANE_GROUP, NACKED, PENDING, ProxyNodeStatus, ProxyNodeStatusSpec,
    ProxyNodeStatusStatus, REPORT_NODE_LABEL, REPORT_SHARDS, report_node, report_object_name,
    report_shard,
};

use kube::CustomResourceExt;

/// The CRD group shared by every Cilium resource.
pub const GROUP: &str = "cilium.io";
/// The only served version.
pub const VERSION: &str = "v2";
/// `apiVersion` as it appears in manifests.
pub const API_VERSION: &str = "cilium.io/v2";

/// Every CRD Membrane defines, as one multi-document YAML stream, in a stable
/// order. This is what `membrane crds` prints and what `crds/yaml/` holds.
pub fn all_crds_yaml() -> String {
    let crds = [
        CiliumEnvoyConfig::crd(),
        CiliumClusterwideEnvoyConfig::crd(),
        CiliumNetworkPolicy::crd(),
        CiliumClusterwideNetworkPolicy::crd(),
        ProxyNodeStatus::crd(),
    ];
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        // Serialising a CRD we built ourselves cannot fail: every field is a
        // plain string, number, map or list.
        out.push_str(&serde_yaml_ng::to_string(&crd).unwrap_or_default());
    }
    out
}

/// File name under `crds/yaml/` for each CRD, paired with its YAML.
pub fn crd_files() -> Vec<(String, String)> {
    let crds = [
        CiliumEnvoyConfig::crd(),
        CiliumClusterwideEnvoyConfig::crd(),
        CiliumNetworkPolicy::crd(),
        CiliumClusterwideNetworkPolicy::crd(),
        ProxyNodeStatus::crd(),
    ];
    crds.into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            (name, serde_yaml_ng::to_string(&crd).unwrap_or_default())
        })
        .collect()
}
