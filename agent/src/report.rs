//! This node's ACK report: a `membrane.io/v1alpha1` `ProxyNodeStatus` named
//! after the node, listing for every CEC/CCEC the node serves (or rejected)
//! whether its Envoy ACKed the CEC's current generation, is still pending,
//! or NACKed/rejected it (with why). Cilium's CEC schema stays untouched.
//!
//! Written only when it changes, as one status write per change (batched:
//! one object per node, not one write per CEC).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use membrane_crds::{ACKED, ConfigAck, NACKED, PENDING, ProxyNodeStatus, ProxyNodeStatusSpec};
use membrane_k8s::Sink;
use membrane_store::{Kind, Object, ObjectKey, StoreSnapshot};
use tracing::debug;

use crate::Reconciler;

/// Kinds an agent reports on.
pub fn is_config(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::CiliumEnvoyConfig | Kind::CiliumClusterwideEnvoyConfig
    )
}

/// The LB addresses of the Services a CEC/CCEC lists in `spec.services`.
pub fn frontends(snap: &StoreSnapshot, obj: &Object) -> Vec<String> {
    let (services, default_ns) = match obj {
        Object::CiliumEnvoyConfig(c) => (&c.spec.services, c.metadata.namespace.as_deref()),
        Object::CiliumClusterwideEnvoyConfig(c) => (&c.spec.services, None),
        _ => return Vec::new(),
    };
    let mut out: Vec<String> = services
        .iter()
        .filter_map(|s| {
            let ns = if s.namespace.is_empty() {
                default_ns.unwrap_or("default")
            } else {
                s.namespace.as_str()
            };
            snap.get_typed::<Service>(ns, &s.name)
                .and_then(crate::lb_ipam::lb_ip)
                .map(|ip| ip.to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The parts (beyond the first) of each split CEC among `served`, with
/// their generations.
pub fn split_parts<'a>(
    snap: &StoreSnapshot,
    served: impl Iterator<Item = &'a ObjectKey>,
) -> BTreeMap<ObjectKey, Vec<(ObjectKey, i64)>> {
    let heads: BTreeSet<&ObjectKey> = served
        .filter(|k| k.kind == Kind::CiliumEnvoyConfig)
        .collect();
    let mut out: BTreeMap<ObjectKey, Vec<(ObjectKey, i64)>> = BTreeMap::new();
    if heads.is_empty() {
        return out;
    }
    for obj in snap.list(Kind::CiliumEnvoyConfig, None) {
        let meta = obj.meta();
        let Some(head) = membrane_ingress::shared_part_of(meta) else {
            continue;
        };
        let key = obj.key();
        let head = ObjectKey::new(Kind::CiliumEnvoyConfig, &key.namespace, head);
        if heads.contains(&head) {
            let generation = meta.generation.unwrap_or(0);
            out.entry(head).or_default().push((key, generation));
        }
    }
    out
}

/// Publishes this node's report through a [`Sink`].
pub struct Reporter<'a> {
    key: ObjectKey,
    node: String,
    node_uid: Option<String>,
    sink: &'a dyn Sink,
    last: Option<Vec<ConfigAck>>,
}

impl<'a> Reporter<'a> {
    /// Declares the node's report object (its labels in `spec`).
    pub fn new(
        node: &str,
        node_uid: Option<&str>,
        labels: &BTreeMap<String, String>,
        sink: &'a dyn Sink,
    ) -> Self {
        let key = declare(node, node_uid, labels, sink);
        Self {
            key,
            node: node.to_owned(),
            node_uid: node_uid.map(str::to_owned),
            sink,
            last: None,
        }
    }

    /// The node's labels changed: the report says so.
    pub fn set_labels(&mut self, labels: &BTreeMap<String, String>) {
        declare(&self.node, self.node_uid.as_deref(), labels, self.sink);
    }

    /// Writes the report if it differs from the last one written.
    pub fn publish(&mut self, rec: &Reconciler, acked: &BTreeSet<ObjectKey>) {
        let configs = build(rec, acked);
        if self.last.as_ref() == Some(&configs) {
            return;
        }
        debug!(configs = configs.len(), "ACK report changed");
        let status = serde_json::json!({ "configs": configs });
        self.sink.status(&self.key, status);
        self.last = Some(configs);
    }
}

/// Creates or updates the node's report object (labels in `spec`).
fn declare(
    node: &str,
    node_uid: Option<&str>,
    labels: &BTreeMap<String, String>,
    sink: &dyn Sink,
) -> ObjectKey {
    let mut obj = ProxyNodeStatus::new(
        node,
        ProxyNodeStatusSpec {
            node_labels: labels.clone(),
        },
    );
    obj.metadata.labels = Some([("membrane.io/node".to_owned(), node.to_owned())].into());
    // Owned by the Node: a node removed from the cluster takes its report
    // (and its say over Ingress addresses) with it.
    obj.metadata.owner_references = node_uid.map(|uid| {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node.to_owned(),
            uid: uid.to_owned(),
            ..Default::default()
        }]
    });
    let obj = Object::ProxyNodeStatus(obj);
    let key = obj.key();
    sink.apply_all(vec![obj]);
    key
}

/// The report's entries: every served or rejected CEC/CCEC (and the parts
/// of split ones) with its state.
pub fn build(rec: &Reconciler, acked: &BTreeSet<ObjectKey>) -> Vec<ConfigAck> {
    let mut out: BTreeMap<ObjectKey, ConfigAck> = BTreeMap::new();
    for key in rec.served.keys().filter(|k| is_config(k.kind)) {
        let state = if acked.contains(key) { ACKED } else { PENDING };
        let generation = rec.served_generations.get(key).copied().unwrap_or(0);
        let mut a = ack(key, generation, state, None);
        a.addresses = rec.served_addresses.get(key).cloned().unwrap_or_default();
        out.insert(key.clone(), a);
        for (part, generation) in rec.served_parts.get(key).into_iter().flatten() {
            out.insert(part.clone(), ack(part, *generation, state, None));
        }
    }
    for (key, why) in &rec.rejected_configs {
        let generation = rec.served_generations.get(key).copied().unwrap_or(0);
        out.insert(key.clone(), ack(key, generation, NACKED, Some(why.clone())));
    }
    out.into_values().collect()
}

fn ack(key: &ObjectKey, generation: i64, state: &str, message: Option<String>) -> ConfigAck {
    ConfigAck {
        kind: key.kind.kind_name().to_owned(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        generation,
        addresses: Vec::new(),
        state: state.to_owned(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_store::Store;

    #[test]
    fn parts_of_served_split_cecs_are_found_with_their_generations() {
        let store = Store::new();
        let yaml = "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c, namespace: a}\nspec: {resources: []}\n---\napiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c-1, namespace: a, labels: {membrane.io/shared-part-of: c}}\nspec: {resources: []}\n---\napiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c-1, namespace: b, labels: {membrane.io/shared-part-of: c}}\nspec: {resources: []}\n";
        for obj in membrane_store::parse_documents(yaml).expect("yaml") {
            store.apply(obj);
        }
        let head = ObjectKey::new(Kind::CiliumEnvoyConfig, "a", "c");
        let parts = split_parts(&store.snapshot(), [&head].into_iter());
        assert_eq!(
            parts.get(&head),
            Some(&vec![(
                ObjectKey::new(Kind::CiliumEnvoyConfig, "a", "c-1"),
                1
            )]),
            "only the part in the head's namespace: {parts:?}"
        );
        assert_eq!(parts.len(), 1);
    }
}
