//! `CiliumEnvoyConfig` (namespaced, short name `cec`) and
//! `CiliumClusterwideEnvoyConfig` (cluster scoped, short name `ccec`).
//!
//! Both kinds carry the same spec; kube's derive needs one spec struct per
//! kind, so the clusterwide spec wraps the shared [`EnvoyConfigSpec`] and
//! dereferences to it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Kubernetes Service whose traffic is redirected to a listener of the
/// config (Cilium: `spec.services`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceListener {
    /// Service name.
    pub name: String,
    /// Service namespace; defaults to the config's namespace.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Service ports to redirect; empty means all ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Name of the listener (unqualified) traffic is redirected to; empty
    /// means the first listener of the config.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub listener: String,
}

/// A Kubernetes Service whose endpoints are published over EDS
/// (Cilium: `spec.backendServices`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendService {
    /// Service name.
    pub name: String,
    /// Service namespace; defaults to the config's namespace.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Port numbers or port names (as strings) to publish; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub number: Vec<String>,
}

/// The spec shared by both kinds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyConfigSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceListener>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_services: Vec<BackendService>,
    /// Envoy resources in protojson form, each with an `@type`.
    #[serde(default)]
    #[schemars(schema_with = "envoy_resources_schema")]
    pub resources: Vec<serde_json::Value>,
    /// Which nodes receive this config; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// Spec of `CiliumEnvoyConfig`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumEnvoyConfig",
    plural = "ciliumenvoyconfigs",
    shortname = "cec",
    namespaced,
    category = "cilium"
)]
pub struct CiliumEnvoyConfigSpec {
    #[serde(flatten)]
    pub config: EnvoyConfigSpec,
}

/// Spec of `CiliumClusterwideEnvoyConfig`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumClusterwideEnvoyConfig",
    plural = "ciliumclusterwideenvoyconfigs",
    shortname = "ccec",
    category = "cilium"
)]
pub struct CiliumClusterwideEnvoyConfigSpec {
    #[serde(flatten)]
    pub config: EnvoyConfigSpec,
}

impl std::ops::Deref for CiliumEnvoyConfigSpec {
    type Target = EnvoyConfigSpec;
    fn deref(&self) -> &EnvoyConfigSpec {
        &self.config
    }
}

impl std::ops::Deref for CiliumClusterwideEnvoyConfigSpec {
    type Target = EnvoyConfigSpec;
    fn deref(&self) -> &EnvoyConfigSpec {
        &self.config
    }
}

impl From<EnvoyConfigSpec> for CiliumEnvoyConfigSpec {
    fn from(config: EnvoyConfigSpec) -> Self {
        Self { config }
    }
}

impl From<EnvoyConfigSpec> for CiliumClusterwideEnvoyConfigSpec {
    fn from(config: EnvoyConfigSpec) -> Self {
        Self { config }
    }
}

/// Envoy objects are arbitrary protojson; the API server must keep every
/// field, exactly as Cilium's CRD declares.
fn envoy_resources_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}

/// Whether a node with `labels` is selected by a CEC/CCEC `nodeSelector`
/// (`None` selects every node): the agent serves by it, the operator waits
/// for the ACKs of exactly those nodes.
pub fn selects_node(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else { return true };
    let labels_match = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_match = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && exprs_match
}
