//! This node's ACK report: `membrane.io/v1alpha1` `ProxyNodeStatus` objects
//! listing for every CEC/CCEC the node serves (or rejected) whether its
//! Envoy ACKed the CEC's current generation, is still pending, or
//! NACKed/rejected it (with why). Cilium's CEC schema stays untouched.
//!
//! The entries are spread over [`REPORT_SHARDS`] objects by a hash of the
//! CEC's key, and only the objects whose entries changed are written: a CEC
//! change rewrites a sixteenth of the report, not all of it. A change whose
//! only news is entries still waiting for Envoy is held back briefly: the
//! ACK that usually follows within milliseconds goes out in the same write,
//! so a CEC change costs one write, not two (nothing acts on a pending
//! entry).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use membrane_crds::{
    ACKED, ConfigAck, NACKED, PENDING, ProxyNodeStatus, ProxyNodeStatusSpec, REPORT_NODE_LABEL,
    REPORT_SHARDS, report_object_name, report_shard,
};
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
    node: String,
    node_uid: Option<String>,
    labels: BTreeMap<String, String>,
    sink: &'a dyn Sink,
    /// The whole report as last written.
    last: Option<Vec<ConfigAck>>,
    /// The report objects declared so far (shard numbers).
    declared: BTreeSet<u32>,
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
        let mut reporter = Self {
            node: node.to_owned(),
            node_uid: node_uid.map(str::to_owned),
            labels: labels.clone(),
            sink,
            last: None,
            declared: BTreeSet::new(),
            held_since: None,
        };
        // The object named after the node always exists.
        reporter.declare(0);
        reporter
    }

    /// The node's labels changed: every report object says so.
    pub fn set_labels(&mut self, labels: &BTreeMap<String, String>) {
        self.labels = labels.clone();
        for shard in std::mem::take(&mut self.declared) {
            self.declare(shard);
        }
    }

    fn declare(&mut self, shard: u32) -> ObjectKey {
        let key = declare(
            &report_object_name(&self.node, shard),
            &self.node,
            self.node_uid.as_deref(),
            &self.labels,
            self.sink,
        );
        self.declared.insert(shard);
        key
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

    /// Writes the objects whose entries differ from the last write. The
    /// first write also withdraws objects a previous run may have left
    /// with entries this run no longer has.
    fn write(&mut self, configs: Vec<ConfigAck>) {
        let new = by_shard(&configs);
        let last = self.last.take();
        let old = last.as_deref().map(by_shard);
        let mut written = 0;
        for shard in 0..REPORT_SHARDS {
            let entries = new.get(&shard).map(Vec::as_slice).unwrap_or_default();
            match &old {
                Some(old) if old.get(&shard).map(Vec::as_slice).unwrap_or_default() == entries => {
                    continue;
                }
                None if entries.is_empty() && shard != 0 => {
                    self.sink.delete(&ObjectKey::new(
                        Kind::ProxyNodeStatus,
                        "",
                        &report_object_name(&self.node, shard),
                    ));
                    continue;
                }
                _ => {}
            }
            let key = if self.declared.contains(&shard) {
                ObjectKey::new(
                    Kind::ProxyNodeStatus,
                    "",
                    &report_object_name(&self.node, shard),
                )
            } else {
                self.declare(shard)
            };
            self.sink
                .status(&key, serde_json::json!({ "configs": entries }));
            written += 1;
        }
        debug!(
            configs = configs.len(),
            objects = written,
            "ACK report changed"
        );
        self.last = Some(configs);
        self.held_since = None;
    }
}

/// The entries of a report by the object that holds them (each list keeps
/// the report's order).
fn by_shard(configs: &[ConfigAck]) -> BTreeMap<u32, Vec<&ConfigAck>> {
    let mut out: BTreeMap<u32, Vec<&ConfigAck>> = BTreeMap::new();
    for c in configs {
        out.entry(report_shard(&c.kind, &c.namespace, &c.name))
            .or_default()
            .push(c);
    }
    out
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

/// Creates or updates one of the node's report objects (labels in `spec`).
fn declare(
    name: &str,
    node: &str,
    node_uid: Option<&str>,
    labels: &BTreeMap<String, String>,
    sink: &dyn Sink,
) -> ObjectKey {
    let mut obj = ProxyNodeStatus::new(
        name,
        ProxyNodeStatusSpec {
            node_labels: labels.clone(),
        },
    );
    obj.metadata.labels = Some([(REPORT_NODE_LABEL.to_owned(), node.to_owned())].into());
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

    /// The report objects as a sink leaves them: status by object name,
    /// the objects declared and deleted, and how many status writes.
    #[derive(Default)]
    struct Objects {
        status: BTreeMap<String, serde_json::Value>,
        declared: BTreeSet<String>,
        deleted: BTreeSet<String>,
        writes: usize,
    }

    #[derive(Default)]
    struct Writes(std::sync::Mutex<Objects>);

    impl Writes {
        fn with<T>(&self, f: impl FnOnce(&mut Objects) -> T) -> T {
            f(&mut self.0.lock().expect("lock"))
        }
        fn writes(&self) -> usize {
            self.with(|o| o.writes)
        }
        /// Every entry of every object, by name.
        fn report(&self) -> Vec<(String, i64, String)> {
            let mut out: Vec<(String, i64, String)> =
                self.with(|o| o.status.values().flat_map(states).collect());
            out.sort();
            out
        }
    }

    impl Sink for Writes {
        fn apply_all(&self, objs: Vec<Object>) {
            self.with(|o| {
                for obj in objs {
                    let name = obj.key().name;
                    o.deleted.remove(&name);
                    o.declared.insert(name);
                }
            });
        }
        fn delete(&self, key: &ObjectKey) {
            self.with(|o| {
                o.status.remove(&key.name);
                o.declared.remove(&key.name);
                o.deleted.insert(key.name.clone());
            });
        }
        fn status(&self, key: &ObjectKey, status: serde_json::Value) {
            self.with(|o| {
                assert!(
                    o.declared.contains(&key.name),
                    "status of undeclared {}",
                    key.name
                );
                o.status.insert(key.name.clone(), status);
                o.writes += 1;
            });
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

    /// 64 CECs over the report objects: a change of one entry rewrites only
    /// the object holding it, the objects together always hold the whole
    /// report, and the first write withdraws objects a previous run may
    /// have left behind.
    #[test]
    fn a_change_rewrites_only_the_object_holding_its_entry() {
        let writes = Writes::default();
        let mut h = crate::bench::Harness::new("127.100.0.0/16", None).expect("harness");
        let rec = &mut h.reconciler;
        let keys: Vec<ObjectKey> = (0..64)
            .map(|i| ObjectKey::new(Kind::CiliumEnvoyConfig, "ns", &format!("c{i}")))
            .collect();
        for k in &keys {
            rec.served.insert(k.clone(), Vec::new());
            rec.served_generations.insert(k.clone(), 1);
        }
        let mut acked: BTreeSet<ObjectKey> = keys.iter().cloned().collect();
        let mut reporter = Reporter::new("n1", None, &BTreeMap::new(), &writes);
        let t0 = Instant::now();
        reporter.publish(rec, &acked, t0);
        let used: BTreeSet<u32> = keys
            .iter()
            .map(|k| report_shard("CiliumEnvoyConfig", "ns", &k.name))
            .collect();
        assert!(used.len() > 8, "64 keys over {} objects", used.len());
        let report = |acked: &BTreeSet<ObjectKey>| -> Vec<(String, i64, String)> {
            let mut v: Vec<_> = keys
                .iter()
                .map(|k| {
                    let state = if acked.contains(k) { ACKED } else { PENDING };
                    (k.name.clone(), 1, state.to_owned())
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(writes.report(), report(&acked));
        writes.with(|o| {
            for shard in 1..REPORT_SHARDS {
                let name = report_object_name("n1", shard);
                assert_eq!(
                    o.deleted.contains(&name),
                    !used.contains(&shard),
                    "object {name}"
                );
            }
            assert!(o.declared.contains("n1"), "the node's own object exists");
        });
        // One CEC rejected (news at once): one object rewritten.
        for (i, k) in keys.iter().enumerate().step_by(7) {
            let before = writes.writes();
            acked.remove(k);
            rec.rejected_configs.insert(k.clone(), format!("bad {i}"));
            reporter.publish(rec, &acked, t0);
            assert_eq!(writes.writes(), before + 1, "change of {}", k.name);
            rec.rejected_configs.remove(k);
            acked.insert(k.clone());
            reporter.publish(rec, &acked, t0);
            assert_eq!(writes.writes(), before + 2);
            assert_eq!(writes.report(), report(&acked));
        }
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
        // Publishes that wrote (one write may cover several objects):
        // called once after each publish.
        let (mut seen, mut rounds) = (0, 0);
        let mut count = || {
            let w = writes.writes();
            if w > seen {
                seen = w;
                rounds += 1;
            }
            rounds
        };
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
        assert_eq!(
            writes.report(),
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
