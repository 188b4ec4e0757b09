//! Cilium labels (`source:key=value`) and label selectors over them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::PolicyError;

/// Label source of Kubernetes-derived labels.
pub const SOURCE_K8S: &str = "k8s";
/// Label source of reserved identities.
pub const SOURCE_RESERVED: &str = "reserved";
/// Label source of CIDR identities.
pub const SOURCE_CIDR: &str = "cidr";
/// A selector key without a source (or with `any:`) matches every source.
pub const SOURCE_ANY: &str = "any";

/// The pod's namespace, as Cilium labels it.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix under which a namespace's labels appear on its pods.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Prefix of labels Cilium derives itself (service account, cluster).
pub const POLICY_LABELS_PREFIX: &str = "io.cilium.k8s.policy.";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Self {
        Label {
            source: source.to_string(),
            key: key.to_string(),
            value: value.to_string(),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

/// The labels of one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(pub BTreeSet<Label>);

impl LabelSet {
    /// Labels of a pod: its own labels (source `k8s`), its namespace and
    /// the namespace's labels. Pod labels that claim a namespace or a
    /// namespace label are dropped first, so a pod cannot relabel itself
    /// into another namespace's policies (CVE-2023-39347).
    pub fn for_pod(
        namespace: &str,
        pod_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Self {
        let mut s = BTreeSet::new();
        for (k, v) in pod_labels {
            if k == POD_NAMESPACE_LABEL
                || k.starts_with(NAMESPACE_LABELS_PREFIX)
                || k.starts_with(POLICY_LABELS_PREFIX)
            {
                continue;
            }
            s.insert(Label::new(SOURCE_K8S, k, v));
        }
        s.insert(Label::new(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace));
        for (k, v) in namespace_labels {
            s.insert(Label::new(
                SOURCE_K8S,
                &format!("{NAMESPACE_LABELS_PREFIX}{k}"),
                v,
            ));
        }
        LabelSet(s)
    }

    pub fn reserved(name: &str) -> Self {
        LabelSet([Label::new(SOURCE_RESERVED, name, "")].into())
    }

    /// Values of labels with `key` from `source` (or any source).
    fn values<'a>(&'a self, k: &'a LabelKey) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |l| l.key == k.key && k.source.as_ref().is_none_or(|s| *s == l.source))
            .map(|l| l.value.as_str())
    }

    pub fn namespace(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|l| l.source == SOURCE_K8S && l.key == POD_NAMESPACE_LABEL)
            .map(|l| l.value.as_str())
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "{}", v.join(","))
    }
}

/// A selector key: `app`, `any:app` (every source) or `k8s:app`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey {
    pub source: Option<String>,
    pub key: String,
}

impl LabelKey {
    pub fn parse(s: &str) -> Self {
        match s.split_once(':') {
            Some((src, key)) if !src.is_empty() && !src.contains('/') && !src.contains('.') => {
                LabelKey {
                    source: (src != SOURCE_ANY).then(|| src.to_string()),
                    key: key.to_string(),
                }
            }
            _ => LabelKey {
                source: None,
                key: s.to_string(),
            },
        }
    }

    pub fn k8s(key: &str) -> Self {
        LabelKey {
            source: Some(SOURCE_K8S.into()),
            key: key.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    In(LabelKey, BTreeSet<String>),
    NotIn(LabelKey, BTreeSet<String>),
    Exists(LabelKey),
    DoesNotExist(LabelKey),
}

impl Requirement {
    fn key(&self) -> &LabelKey {
        match self {
            Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    fn matches(&self, l: &LabelSet) -> bool {
        match self {
            Requirement::In(k, vs) => l.values(k).any(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => !l.values(k).any(|v| vs.contains(v)),
            Requirement::Exists(k) => l.values(k).next().is_some(),
            Requirement::DoesNotExist(k) => l.values(k).next().is_none(),
        }
    }
}

/// A conjunction of requirements; empty selects every label set.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector(pub Vec<Requirement>);

impl Selector {
    /// From a Kubernetes `LabelSelector`; `field` names it in errors.
    pub fn from_k8s(s: &LabelSelector, field: &str) -> Result<Self, PolicyError> {
        let mut reqs = Vec::new();
        for (k, v) in s.match_labels.iter().flatten() {
            reqs.push(Requirement::In(LabelKey::parse(k), [v.clone()].into()));
        }
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let key = LabelKey::parse(&e.key);
            let vals: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let field = format!("{field}.matchExpressions[{i}]");
            reqs.push(match e.operator.as_str() {
                "In" | "NotIn" if vals.is_empty() => {
                    return Err(PolicyError::field(
                        &field,
                        format!("operator {} needs values", e.operator),
                    ));
                }
                "In" => Requirement::In(key, vals),
                "NotIn" => Requirement::NotIn(key, vals),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                op => {
                    return Err(PolicyError::field(
                        &field,
                        format!("unknown operator {op:?} (In, NotIn, Exists, DoesNotExist)"),
                    ));
                }
            });
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, l: &LabelSet) -> bool {
        self.0.iter().all(|r| r.matches(l))
    }

    /// True if any requirement is about `key` (any source).
    pub fn mentions(&self, key: &str) -> bool {
        self.0.iter().any(|r| r.key().key == key)
    }

    /// True if any requirement names a `reserved:` label.
    pub fn mentions_reserved(&self) -> bool {
        self.0
            .iter()
            .any(|r| r.key().source.as_deref() == Some(SOURCE_RESERVED))
    }

    pub fn and(mut self, r: Requirement) -> Self {
        self.0.push(r);
        self
    }

    /// `k8s:io.kubernetes.pod.namespace=ns`.
    pub fn in_namespace(self, ns: &str) -> Self {
        self.and(Requirement::In(
            LabelKey::k8s(POD_NAMESPACE_LABEL),
            [ns.to_string()].into(),
        ))
    }
}
