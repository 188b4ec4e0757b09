//! This node's ACK report: a `membrane.io/v1alpha1` `ProxyNodeStatus` named
//! after the node, listing for every CEC/CCEC the node serves (or rejected)
//! whether its Envoy ACKed the CEC's current generation, is still pending,
//! or NACKed/rejected it (with why). Cilium's CEC schema stays untouched.
//!
//! Written only when it changes, as one status write per change (batched:
//! one object per node, not one write per CEC). A change whose only news is
//! entries still waiting for Envoy is held back briefly: the ACK that
//! usually follows within milliseconds goes out in the same write, so a CEC
//! change costs one write of the whole report, not two (nothing acts on a
//! pending entry).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

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
    /// Since when a pending-only change has been held back.
    held_since: Option<Instant>,
}

/// How long a change whose only news is pending entries is held back.
pub const PENDING_HOLD: Duration = Duration::from_millis(100);

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
            held_since: None,
        }
    }

    /// The node's labels changed: the report says so.
    pub fn set_labels(&mut self, labels: &BTreeMap<String, String>) {
        declare(&self.node, self.node_uid.as_deref(), labels, self.sink);
    }

    /// Writes the report if it differs from the last one written, unless
    /// its only news is pending entries and it has been held back for less
    /// than [`PENDING_HOLD`] (then call again by [`Reporter::due`]).
    pub fn publish(&mut self, rec: &Reconciler, acked: &BTreeSet<ObjectKey>, now: Instant) {
        let configs = build(rec, acked);
        let Some(last) = &self.last else {
            return self.write(configs);
        };
        if *last == configs {
            self.held_since = None;
            return;
        }
        if only_pending_news(last, &configs) {
            let since = *self.held_since.get_or_insert(now);
            if now < since + PENDING_HOLD {
                return;
            }
        }
        self.write(configs);
    }

    /// When a held-back report is to be written.
    pub fn due(&self) -> Option<Instant> {
        self.held_since.map(|t| t + PENDING_HOLD)
    }

    fn write(&mut self, configs: Vec<ConfigAck>) {
        debug!(configs = configs.len(), "ACK report changed");
        let status = serde_json::json!({ "configs": configs });
        self.sink.status(&self.key, status);
        self.last = Some(configs);
        self.held_since = None;
    }
}

/// Whether `new` differs from `last` only in entries that are pending now
/// (no entry gone, none newly ACKed, NACKed or rejected).
fn only_pending_news(last: &[ConfigAck], new: &[ConfigAck]) -> bool {
    let id = |c: &ConfigAck| (c.kind.clone(), c.namespace.clone(), c.name.clone());
    let before: HashMap<_, &ConfigAck> = last.iter().map(|c| (id(c), c)).collect();
    let mut kept = 0;
    for c in new {
        match before.get(&id(c)) {
            Some(b) => {
                kept += 1;
                if *b != c && c.state != PENDING {
                    return false;
                }
            }
            None if c.state != PENDING => return false,
            None => {}
        }
    }
    kept == before.len()
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
    // Entries by key in the order they are decided; for a key listed more
    // than once the last one counts (a rejection overrides serving). A
    // stable sort keeps that order within a key; no map, no key copies:
    // this runs for every change at thousands of CECs.
    let mut out: Vec<(&ObjectKey, ConfigAck)> =
        Vec::with_capacity(rec.served.len() + rec.rejected_configs.len());
    for key in rec.served.keys().filter(|k| is_config(k.kind)) {
        let state = if acked.contains(key) { ACKED } else { PENDING };
        let generation = rec.served_generations.get(key).copied().unwrap_or(0);
        let mut a = ack(key, generation, state, None);
        a.addresses = rec.served_addresses.get(key).cloned().unwrap_or_default();
        out.push((key, a));
        for (part, generation) in rec.served_parts.get(key).into_iter().flatten() {
            out.push((part, ack(part, *generation, state, None)));
        }
    }
    for (key, why) in &rec.rejected_configs {
        let generation = rec.served_generations.get(key).copied().unwrap_or(0);
        out.push((key, ack(key, generation, NACKED, Some(why.clone()))));
    }
    out.sort_by(|a, b| a.0.cmp(b.0));
    let mut configs: Vec<ConfigAck> = Vec::with_capacity(out.len());
    let mut last: Option<&ObjectKey> = None;
    for (key, a) in out {
        match configs.last_mut() {
            Some(prev) if last == Some(key) => *prev = a,
            _ => configs.push(a),
        }
        last = Some(key);
    }
    configs
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

    /// The report as a map from key to entry, the last decision winning:
    /// what `build` computes without the map.
    fn build_with_a_map(rec: &Reconciler, acked: &BTreeSet<ObjectKey>) -> Vec<ConfigAck> {
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

    #[test]
    fn build_equals_the_map_over_random_states() {
        let mut h = crate::bench::Harness::new("127.100.0.0/16", None).expect("harness");
        let rec = &mut h.reconciler;
        let mut x: u64 = 7;
        let mut next = |n: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % n
        };
        let key = |i: u64| {
            let kind = if i.is_multiple_of(5) {
                Kind::CiliumClusterwideEnvoyConfig
            } else {
                Kind::CiliumEnvoyConfig
            };
            let ns = if kind == Kind::CiliumEnvoyConfig {
                "ns"
            } else {
                ""
            };
            ObjectKey::new(kind, ns, &format!("c{}", i % 12))
        };
        for round in 0..300 {
            let k = key(next(40));
            match next(6) {
                0 => {
                    rec.served.insert(k, Vec::new());
                }
                1 => {
                    rec.served.remove(&k);
                }
                2 => {
                    rec.served_generations.insert(k, next(4) as i64);
                }
                3 => {
                    // Parts, possibly naming keys that are served or
                    // rejected themselves.
                    let parts = (0..next(3))
                        .map(|_| (key(next(40)), next(3) as i64))
                        .collect();
                    rec.served_parts.insert(k, parts);
                }
                4 => {
                    rec.served_addresses
                        .insert(k, vec![format!("10.0.0.{}", next(3))]);
                }
                _ => {
                    if next(2) == 0 {
                        rec.rejected_configs.insert(k, format!("bad {round}"));
                    } else {
                        rec.rejected_configs.remove(&k);
                    }
                }
            }
            let acked: BTreeSet<ObjectKey> = (0..12).filter(|_| next(2) == 0).map(key).collect();
            assert_eq!(
                build(rec, &acked),
                build_with_a_map(rec, &acked),
                "round {round}"
            );
        }
    }

    /// Records status writes.
    #[derive(Default)]
    struct Writes(std::sync::Mutex<Vec<serde_json::Value>>);

    impl Sink for Writes {
        fn apply_all(&self, _: Vec<Object>) {}
        fn delete(&self, _: &ObjectKey) {}
        fn status(&self, _: &ObjectKey, status: serde_json::Value) {
            if let Ok(mut w) = self.0.lock() {
                w.push(status);
            }
        }
        fn warn(&self, _: membrane_k8s::Warning) {}
    }

    fn states(w: &serde_json::Value) -> Vec<(String, i64, String)> {
        w["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_owned(),
                    c["generation"].as_i64().unwrap_or_default(),
                    c["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn pending_only_news_is_held_back_until_the_ack_or_the_deadline() {
        let writes = Writes::default();
        let mut h = crate::bench::Harness::new("127.100.0.0/16", None).expect("harness");
        let rec = &mut h.reconciler;
        let a = ObjectKey::new(Kind::CiliumEnvoyConfig, "ns", "a");
        let b = ObjectKey::new(Kind::CiliumEnvoyConfig, "ns", "b");
        let mut reporter = Reporter::new("n1", None, &BTreeMap::new(), &writes);
        let t0 = Instant::now();
        let count = || writes.0.lock().expect("lock").len();
        // The first report goes out at once.
        rec.served.insert(a.clone(), Vec::new());
        rec.served_generations.insert(a.clone(), 1);
        let acked: BTreeSet<ObjectKey> = [a.clone()].into();
        reporter.publish(rec, &acked, t0);
        assert_eq!(count(), 1);
        // New content of a, and a new CEC b, both pending: held back.
        rec.served_generations.insert(a.clone(), 2);
        rec.served.insert(b.clone(), Vec::new());
        rec.served_generations.insert(b.clone(), 1);
        reporter.publish(rec, &BTreeSet::new(), t0);
        assert_eq!(count(), 1, "pending-only news waits");
        assert_eq!(reporter.due(), Some(t0 + PENDING_HOLD));
        // Envoy ACKs a: written at once, with b still pending.
        let acked: BTreeSet<ObjectKey> = [a.clone()].into();
        reporter.publish(rec, &acked, t0 + Duration::from_millis(3));
        assert_eq!(count(), 2);
        assert_eq!(reporter.due(), None);
        let last = writes
            .0
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("write");
        assert_eq!(
            states(&last),
            vec![
                ("a".to_owned(), 2, ACKED.to_owned()),
                ("b".to_owned(), 1, PENDING.to_owned())
            ]
        );
        // Pending-only news with no ACK coming: written at the deadline.
        rec.served_generations.insert(b.clone(), 2);
        let t1 = t0 + Duration::from_millis(10);
        reporter.publish(rec, &acked, t1);
        assert_eq!(count(), 2);
        reporter.publish(rec, &acked, t1 + PENDING_HOLD / 2);
        assert_eq!(count(), 2, "still within the hold");
        reporter.publish(rec, &acked, t1 + PENDING_HOLD);
        assert_eq!(count(), 3);
        // A CEC no longer served is news at once.
        rec.served.remove(&b);
        reporter.publish(rec, &acked, t1 + PENDING_HOLD);
        assert_eq!(count(), 4);
        // A rejection too.
        rec.rejected_configs.insert(b.clone(), "bad".into());
        reporter.publish(rec, &acked, t1 + PENDING_HOLD);
        assert_eq!(count(), 5);
    }
}
