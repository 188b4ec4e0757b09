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
    pub resources: Vec<EnvoyResource>,
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

/// One entry of `spec.resources`: an Envoy resource in protojson form,
/// kept as compact JSON text with its keys sorted.
///
/// Stores hold every CEC for as long as it exists, and as a
/// `serde_json::Value` tree a generated CEC took ten times its JSON size
/// (each JSON object a B-tree node of ~640 bytes, most holding one or two
/// keys). Readers take the tree when they need it ([`Self::to_value`]).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EnvoyResource(Box<str>);

impl EnvoyResource {
    /// The resource as a JSON tree.
    pub fn to_value(&self) -> serde_json::Value {
        // The text is serde_json's own rendering of a `Value`, so it parses.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// Its `name` and `@type` when they are strings, read without building
    /// the tree.
    pub fn name_and_type(&self) -> (Option<String>, Option<String>) {
        #[derive(Deserialize)]
        struct Head {
            name: Option<serde_json::Value>,
            #[serde(rename = "@type")]
            type_url: Option<serde_json::Value>,
        }
        let string = |v: Option<serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        };
        match serde_json::from_str::<Head>(&self.0) {
            Ok(h) => (string(h.name), string(h.type_url)),
            Err(_) => (None, None),
        }
    }

    /// The compact JSON text.
    pub fn json(&self) -> &str {
        &self.0
    }

    /// Length of the compact JSON text, in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<serde_json::Value> for EnvoyResource {
    fn from(v: serde_json::Value) -> Self {
        EnvoyResource::from(&v)
    }
}

impl From<&serde_json::Value> for EnvoyResource {
    fn from(v: &serde_json::Value) -> Self {
        // A `Value` always serializes (its keys are strings); its objects
        // are ordered maps, so equal trees give equal text.
        EnvoyResource(v.to_string().into_boxed_str())
    }
}

impl std::fmt::Debug for EnvoyResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for EnvoyResource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Through the tree, so every serializer (JSON, YAML, `to_value`)
        // sees plain data.
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for EnvoyResource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(d).map(EnvoyResource::from)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Whatever the input's key order and formatting, a resource is held as
    /// one compact text, so equal content compares equal and serializes
    /// back to the same tree through any serializer.
    #[test]
    fn resources_are_canonical_text_and_round_trip() {
        let yaml = "resources:\n- name: a\n  '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  connectTimeout: 5s\n  n: 1.5\n";
        let from_yaml: EnvoyConfigSpec = serde_yaml_ng::from_str(yaml).expect("yaml");
        let json_text = r#"{"resources":[{"n":1.5,"connectTimeout":"5s","name":"a",
            "@type":"type.googleapis.com/envoy.config.cluster.v3.Cluster"}]}"#;
        let from_json: EnvoyConfigSpec = serde_json::from_str(json_text).expect("json");
        assert_eq!(from_yaml, from_json);
        let r = &from_json.resources[0];
        assert_eq!(
            r.json(),
            r#"{"@type":"type.googleapis.com/envoy.config.cluster.v3.Cluster","connectTimeout":"5s","n":1.5,"name":"a"}"#
        );
        assert_eq!(
            r.name_and_type(),
            (
                Some("a".to_owned()),
                Some("type.googleapis.com/envoy.config.cluster.v3.Cluster".to_owned())
            )
        );
        let tree = serde_json::to_value(&from_json).expect("to_value");
        assert_eq!(tree["resources"][0]["connectTimeout"], "5s");
        let back: EnvoyConfigSpec =
            serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&from_json).expect("to yaml"))
                .expect("yaml again");
        assert_eq!(back, from_json);
        assert_eq!(EnvoyResource::from(r.to_value()), *r);
    }

    #[test]
    fn name_and_type_only_when_strings() {
        let r = EnvoyResource::from(json!({"name": 7, "@type": "t"}));
        assert_eq!(r.name_and_type(), (None, Some("t".to_owned())));
        let r = EnvoyResource::from(json!("not an object"));
        assert_eq!(r.name_and_type(), (None, None));
    }
}
