//! `CiliumNetworkPolicy` (namespaced, short name `cnp`) and
//! `CiliumClusterwideNetworkPolicy` (cluster scoped, short name `ccnp`).
//!
//! Field names and shapes follow Cilium's `pkg/policy/api` (`Rule`,
//! `IngressRule`, `EgressRule`, their deny variants, `PortRule`,
//! `ICMPRule`). Fields Membrane does not enforce yet (L7 rules, FQDNs,
//! groups, services, authentication) are kept verbatim so nothing a user
//! wrote is pruned; the policy crate refuses what it cannot enforce safely.
//!
//! Other lists are always serialised (an empty list the user wrote must
//! survive a round trip through strict field checking).
//!
//! Peer lists are `Option<Vec<_>>` on purpose: an absent list and an empty
//! one differ. A rule with no peer field at all applies to every peer; a
//! peer field that is present but selects nothing must select nothing
//! (CVE-2025-64715 was an empty peer set widened to "everything").

use std::collections::BTreeMap;

use std::borrow::Cow;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::CustomResourceExt;
use kube::core::Resource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// A CIDR with exceptions (Cilium `CIDRRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CidrRule {
    /// The prefix, e.g. `10.0.0.0/8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// A `CiliumCIDRGroup` reference (not resolved by Membrane yet; selects
    /// nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_group_ref: Option<String>,
    /// Sub-prefixes of `cidr` that are not selected.
    #[serde(default)]
    pub except: Vec<String>,
}

/// One port (Cilium `PortProtocol`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// A port number (`"80"`; a bare number is accepted too) or a named
    /// container port (`"http"`). Empty or `"0"` means every port.
    #[serde(default, deserialize_with = "port_string")]
    #[schemars(schema_with = "int_or_string_schema")]
    pub port: String,
    /// Last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    /// `TCP`, `UDP`, `SCTP` or `ANY` (the default; TCP, UDP and SCTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `toPorts` entry of an allow rule (Cilium `PortRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    #[serde(default)]
    pub ports: Vec<PortProtocol>,
    /// L7 rules (HTTP, Kafka, DNS): kept, not enforced by this crate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_schema")]
    pub rules: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_schema")]
    pub terminating_tls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_schema")]
    pub originating_tls: Option<serde_json::Value>,
    #[serde(default)]
    pub server_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_schema")]
    pub listener: Option<serde_json::Value>,
}

/// `toPorts` entry of a deny rule (Cilium `PortDenyRule`: ports only).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortDenyRule {
    #[serde(default)]
    pub ports: Vec<PortProtocol>,
}

/// One ICMP match (Cilium `ICMPField`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IcmpField {
    /// `IPv4` (default) or `IPv6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Type number or Cilium's name (`EchoRequest`, `DestinationUnreachable`, ...).
    #[serde(rename = "type")]
    pub icmp_type: IntOrString,
}

/// `icmps` entry (Cilium `ICMPRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IcmpRule {
    #[serde(default)]
    pub fields: Vec<IcmpField>,
}

/// An ingress allow rule (Cilium `IngressRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_requires: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list_schema")]
    pub from_groups: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_nodes: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_schema")]
    pub authentication: Option<serde_json::Value>,
}

/// An ingress deny rule (Cilium `IngressDenyRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressDenyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_requires: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list_schema")]
    pub from_groups: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_nodes: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortDenyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
}

/// An egress allow rule (Cilium `EgressRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_requires: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list_schema")]
    pub to_services: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "toFQDNs")]
    #[schemars(schema_with = "preserve_list_schema")]
    pub to_fqdns: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list_schema")]
    pub to_groups: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_nodes: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_schema")]
    pub authentication: Option<serde_json::Value>,
}

/// An egress deny rule (Cilium `EgressDenyRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressDenyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_requires: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list_schema")]
    pub to_services: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list_schema")]
    pub to_groups: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_nodes: Option<Vec<LabelSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortDenyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
}

/// `enableDefaultDeny` (Cilium `DefaultDenyConfig`); absent fields mean true.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultDenyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// One policy rule (Cilium `api.Rule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// Endpoints the rule applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_selector: Option<LabelSelector>,
    /// Nodes the rule applies to (host firewall; clusterwide only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_deny: Option<Vec<IngressDenyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<EgressDenyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDenyConfig>,
    /// Labels of the rule itself (`source:key=value` strings or objects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_list_schema")]
    pub labels: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Status written by the agent (kept free-form, as Cilium's node map).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct NetworkPolicyStatus {
    #[serde(default)]
    #[schemars(schema_with = "preserve_schema")]
    pub nodes: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    #[schemars(schema_with = "preserve_list_schema")]
    pub conditions: Vec<serde_json::Value>,
}

/// kube's derive generates structs named after the kind; the shapes live
/// here so the served types (which add Cilium's `specs`) can take the names.
pub mod shape {
    use super::{NetworkPolicyStatus, PolicyRule};
    use kube::CustomResource;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    /// The schema-bearing shape kube's derive generates the CRD from; the
    /// served objects are [`CiliumNetworkPolicy`] (which adds Cilium's `specs`).
    #[derive(
        CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema,
    )]
    #[kube(
        group = "cilium.io",
        version = "v2",
        kind = "CiliumNetworkPolicy",
        plural = "ciliumnetworkpolicies",
        shortname = "cnp",
        shortname = "ciliumnp",
        namespaced,
        category = "cilium",
        category = "ciliumpolicy",
        status = "NetworkPolicyStatus"
    )]
    pub struct CnpShapeSpec {
        #[serde(flatten)]
        pub rule: PolicyRule,
    }

    /// Shape of `CiliumClusterwideNetworkPolicy` for the CRD (see `shape::CiliumNetworkPolicy`).
    #[derive(
        CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema,
    )]
    #[kube(
        group = "cilium.io",
        version = "v2",
        kind = "CiliumClusterwideNetworkPolicy",
        plural = "ciliumclusterwidenetworkpolicies",
        shortname = "ccnp",
        category = "cilium",
        category = "ciliumpolicy",
        status = "NetworkPolicyStatus"
    )]
    pub struct CcnpShapeSpec {
        #[serde(flatten)]
        pub rule: PolicyRule,
    }
}

macro_rules! policy_kind {
    ($(#[$doc:meta])* $name:ident, $shape:ident, $scope:ty) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            #[serde(default)]
            pub metadata: ObjectMeta,
            /// The single rule (Cilium: `spec`).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub spec: Option<PolicyRule>,
            /// Further rules (Cilium: `specs`).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub specs: Option<Vec<PolicyRule>>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<NetworkPolicyStatus>,
        }

        impl $name {
            /// `spec` followed by `specs`, as Cilium evaluates them.
            pub fn rules(&self) -> Vec<&PolicyRule> {
                self.spec
                    .iter()
                    .chain(self.specs.iter().flatten())
                    .collect()
            }
        }

        impl Resource for $name {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(dt: &()) -> Cow<'_, str> {
                <shape::$shape as Resource>::kind(dt)
            }
            fn group(dt: &()) -> Cow<'_, str> {
                <shape::$shape as Resource>::group(dt)
            }
            fn version(dt: &()) -> Cow<'_, str> {
                <shape::$shape as Resource>::version(dt)
            }
            fn plural(dt: &()) -> Cow<'_, str> {
                <shape::$shape as Resource>::plural(dt)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }

        impl CustomResourceExt for $name {
            fn crd() -> CustomResourceDefinition {
                with_specs(<shape::$shape as CustomResourceExt>::crd())
            }
            fn crd_name() -> &'static str {
                <shape::$shape as CustomResourceExt>::crd_name()
            }
            fn api_resource() -> kube::core::ApiResource {
                <shape::$shape as CustomResourceExt>::api_resource()
            }
            fn shortnames() -> &'static [&'static str] {
                <shape::$shape as CustomResourceExt>::shortnames()
            }
        }
    };
}

policy_kind!(
    /// `CiliumNetworkPolicy` (namespaced): selectors default to its namespace.
    CiliumNetworkPolicy,
    CiliumNetworkPolicy,
    NamespaceResourceScope
);
policy_kind!(
    /// `CiliumClusterwideNetworkPolicy` (cluster scoped).
    CiliumClusterwideNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    ClusterResourceScope
);

/// Adds Cilium's top-level `specs` (a list of rules with `spec`'s schema)
/// to the derived CRD and makes `spec` optional, as Cilium's CRD does.
fn with_specs(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for v in &mut crd.spec.versions {
        let Some(root) = v
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        if let Some(req) = root.required.as_mut() {
            req.retain(|r| r != "spec");
            if req.is_empty() {
                root.required = None;
            }
        }
        let Some(props) = root.properties.as_mut() else {
            continue;
        };
        if let Some(spec) = props.get("spec").cloned() {
            props.insert(
                "specs".to_string(),
                JSONSchemaProps {
                    type_: Some("array".to_string()),
                    items: Some(JSONSchemaPropsOrArray::Schema(Box::new(spec))),
                    ..Default::default()
                },
            );
        }
    }
    crd
}

/// Accepts `port: 80` as well as Cilium's `port: "80"`.
fn port_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P {
        N(i64),
        S(String),
    }
    Ok(match Option::<P>::deserialize(d)? {
        None => String::new(),
        Some(P::N(n)) => n.to_string(),
        Some(P::S(s)) => s,
    })
}

fn int_or_string_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true
    })
}

fn preserve_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn preserve_list_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}
