//! The static table of served resources that drives discovery and routing,
//! extended at run time by stored CustomResourceDefinitions.

use serde_json::{Value, json};

/// One served resource (group/version/plural).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Has a `/status` subresource (the main endpoint ignores status).
    pub status: bool,
    pub categories: Vec<String>,
}

impl Resource {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural` or `plural.group`, as Kubernetes names it in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Storage key prefix of every object of this resource (in `ns`).
    pub fn prefix(&self, ns: Option<&str>) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        match ns {
            Some(ns) if self.namespaced => format!("{g}/{}/{ns}/", self.plural),
            _ => format!("{g}/{}/", self.plural),
        }
    }

    /// Storage key of one object.
    pub fn key(&self, ns: Option<&str>, name: &str) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        match ns {
            Some(ns) if self.namespaced => format!("{g}/{}/{ns}/{name}", self.plural),
            _ => format!("{g}/{}/-/{name}", self.plural),
        }
    }

    /// Discovery `APIResource` entries (the resource and its subresource).
    pub fn discovery(&self) -> Vec<Value> {
        let mut r = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        });
        if !self.short_names.is_empty() {
            r["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            r["categories"] = json!(self.categories);
        }
        let mut out = vec![r];
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

struct Row(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    bool,
);

// (group, version, plural, kind, namespaced, shortNames, status)
const TABLE: &[Row] = &[
    Row("", "v1", "namespaces", "Namespace", false, &["ns"], true),
    Row("", "v1", "nodes", "Node", false, &["no"], true),
    Row("", "v1", "pods", "Pod", true, &["po"], true),
    Row("", "v1", "services", "Service", true, &["svc"], true),
    Row("", "v1", "endpoints", "Endpoints", true, &["ep"], false),
    Row("", "v1", "secrets", "Secret", true, &[], false),
    Row("", "v1", "configmaps", "ConfigMap", true, &["cm"], false),
    Row("", "v1", "events", "Event", true, &["ev"], false),
    Row(
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
        false,
    ),
    Row(
        "networking.k8s.io",
        "v1",
        "ingresses",
        "Ingress",
        true,
        &["ing"],
        true,
    ),
    Row(
        "networking.k8s.io",
        "v1",
        "ingressclasses",
        "IngressClass",
        false,
        &[],
        false,
    ),
    Row(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        &[],
        false,
    ),
    Row(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
        &["netpol"],
        false,
    ),
    Row(
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        true,
        &[],
        false,
    ),
    Row(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        true,
        &["ev"],
        false,
    ),
    Row(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        true,
    ),
    Row(
        "cilium.io",
        "v2",
        "ciliumenvoyconfigs",
        "CiliumEnvoyConfig",
        true,
        &["cec"],
        false,
    ),
    Row(
        "cilium.io",
        "v2",
        "ciliumclusterwideenvoyconfigs",
        "CiliumClusterwideEnvoyConfig",
        false,
        &["ccec"],
        false,
    ),
    Row(
        "cilium.io",
        "v2",
        "ciliumnetworkpolicies",
        "CiliumNetworkPolicy",
        true,
        &["cnp", "ciliumnp"],
        true,
    ),
    Row(
        "cilium.io",
        "v2",
        "ciliumclusterwidenetworkpolicies",
        "CiliumClusterwideNetworkPolicy",
        false,
        &["ccnp"],
        true,
    ),
    Row(
        "membrane.io",
        "v1alpha1",
        "proxynodestatuses",
        "ProxyNodeStatus",
        false,
        &["pns"],
        true,
    ),
    Row(
        "cilium.io",
        "v2",
        "ciliumnodes",
        "CiliumNode",
        false,
        &["cn", "ciliumn"],
        true,
    ),
    Row(
        "cilium.io",
        "v2",
        "ciliumendpoints",
        "CiliumEndpoint",
        true,
        &["cep", "ciliumep"],
        true,
    ),
];

/// The top-level fields of a built-in kind (for field validation); `None`
/// for kinds whose schema is not known here (custom resources).
pub fn top_level_fields(group: &str, kind: &str) -> Option<&'static [&'static str]> {
    const OBJ: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
    Some(match (group, kind) {
        ("", "Namespace" | "Node" | "Pod" | "Service")
        | ("networking.k8s.io", "Ingress" | "IngressClass" | "NetworkPolicy")
        | ("coordination.k8s.io", "Lease")
        | ("apiextensions.k8s.io", "CustomResourceDefinition") => OBJ,
        ("", "ConfigMap") => &[
            "apiVersion",
            "kind",
            "metadata",
            "data",
            "binaryData",
            "immutable",
        ],
        ("", "Secret") => &[
            "apiVersion",
            "kind",
            "metadata",
            "data",
            "stringData",
            "type",
            "immutable",
        ],
        ("", "Endpoints") => &["apiVersion", "kind", "metadata", "subsets"],
        ("", "ServiceAccount") => &[
            "apiVersion",
            "kind",
            "metadata",
            "secrets",
            "imagePullSecrets",
            "automountServiceAccountToken",
        ],
        ("discovery.k8s.io", "EndpointSlice") => &[
            "apiVersion",
            "kind",
            "metadata",
            "addressType",
            "endpoints",
            "ports",
        ],
        ("", "Event") => &[
            "apiVersion",
            "kind",
            "metadata",
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "series",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
        ],
        _ => return None,
    })
}

/// Top-level fields of `obj` that a built-in `kind` does not have.
pub fn unknown_fields(group: &str, kind: &str, obj: &serde_json::Value) -> Vec<String> {
    let (Some(known), Some(map)) = (top_level_fields(group, kind), obj.as_object()) else {
        return Vec::new();
    };
    map.keys()
        .filter(|k| !k.starts_with('$') && !known.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// The built-in resources.
pub fn builtin() -> Vec<Resource> {
    TABLE
        .iter()
        .map(|r| Resource {
            group: r.0.into(),
            version: r.1.into(),
            plural: r.2.into(),
            singular: r.3.to_ascii_lowercase(),
            kind: r.3.into(),
            namespaced: r.4,
            short_names: r.5.iter().map(|s| s.to_string()).collect(),
            status: r.6,
            categories: match (r.0, r.2) {
                ("cilium.io", _) => vec!["cilium".into()],
                ("", "pods" | "services") => vec!["all".into()],
                _ => Vec::new(),
            },
        })
        .collect()
}

/// The resources a stored CRD serves (one per served version).
pub fn from_crd(crd: &Value) -> Vec<Resource> {
    let spec = &crd["spec"];
    let (Some(group), Some(plural), Some(kind)) = (
        spec["group"].as_str(),
        spec["names"]["plural"].as_str(),
        spec["names"]["kind"].as_str(),
    ) else {
        return Vec::new();
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let singular = spec["names"]["singular"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| kind.to_ascii_lowercase());
    let mut out = Vec::new();
    for v in spec["versions"].as_array().into_iter().flatten() {
        if v["served"].as_bool() == Some(false) {
            continue;
        }
        let Some(version) = v["name"].as_str() else {
            continue;
        };
        out.push(Resource {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: singular.clone(),
            kind: kind.into(),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            short_names: strings(&spec["names"]["shortNames"]),
            status: v["subresources"]["status"].is_object(),
            categories: strings(&spec["names"]["categories"]),
        });
    }
    out
}

/// Group versions in discovery order: core first, then groups by name.
pub fn group_versions(all: &[Resource]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for r in all {
        let gv = (r.group.clone(), r.version.clone());
        if !out.contains(&gv) {
            out.push(gv);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_and_prefixes() {
        let all = builtin();
        let pods = all.iter().find(|r| r.plural == "pods").expect("pods");
        assert_eq!(pods.key(Some("default"), "a"), "core/pods/default/a");
        assert!(
            pods.key(Some("default"), "a")
                .starts_with(&pods.prefix(Some("default")))
        );
        let ns = all.iter().find(|r| r.plural == "namespaces").expect("ns");
        assert_eq!(ns.key(None, "default"), "core/namespaces/-/default");
        assert_eq!(ns.api_version(), "v1");
    }

    #[test]
    fn unknown_top_level_fields() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}, "dta": {}});
        assert_eq!(unknown_fields("", "ConfigMap", &cm), ["dta"]);
        let svc = json!({"spec": {}, "$setElementOrder/x": []});
        assert!(unknown_fields("", "Service", &svc).is_empty());
        assert!(unknown_fields("cilium.io", "CiliumEnvoyConfig", &cm).is_empty());
    }

    #[test]
    fn crd_rows() {
        let crd = serde_json::json!({"spec": {"group": "example.com", "scope": "Cluster",
            "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [{"name": "v1", "served": true, "subresources": {"status": {}}},
                          {"name": "v0", "served": false}]}});
        let rows = from_crd(&crd);
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].namespaced);
        assert!(rows[0].status);
        assert_eq!(rows[0].singular, "widget");
    }
}
