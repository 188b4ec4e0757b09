//! Ingress status: `status.loadBalancer.ingress[0].ip` is written only once
//! every agent serving the Ingress's CEC reports (in its `ProxyNodeStatus`)
//! that its Envoy ACKed the CEC at its current generation — never merely
//! because a config was computed.
//!
//! The check follows the store's change log: an Ingress is looked at when
//! its managed entry, its Service or the Ingress changed, and on every pass
//! while its address waits (the agents' reports and the CEC's generation
//! decide the ACK, and every input is an object whose change wakes the
//! loop), so no wake-up can be lost between an ACK and the status write
//! (issue 9).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use membrane_crds::{ACKED, ProxyNodeStatus, report_node};
use membrane_ingress::lb_ip;
use membrane_k8s::Sink;
use membrane_store::{ChangeCursor, Changes, Kind, Object, ObjectKey, Store, StoreSnapshot};
use serde_json::json;

use crate::ingress_controller::ManagedIngress;

/// Writes the addresses, following changes: an Ingress is looked at when
/// its entry in the managed list, its Service or the Ingress itself
/// changed, and on every pass while its address waits for an ACK (agents'
/// reports and CEC generations decide that, and there are few such
/// Ingresses at a time).
#[derive(Debug, Default)]
pub struct StatusWriter {
    /// Ingresses carrying an address written by us.
    written: BTreeSet<ObjectKey>,
    changes: ChangeCursor,
    /// The managed list of the last pass: its entries are shared, so an
    /// entry that is the same allocation is unchanged.
    last: Vec<Arc<ManagedIngress>>,
    by_ingress: BTreeMap<ObjectKey, Arc<ManagedIngress>>,
    by_service: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Managed Ingresses whose status does not show their Service's
    /// address yet.
    pending: BTreeSet<ObjectKey>,
}

impl StatusWriter {
    /// `managed` lists one entry per managed Ingress (a later entry for the
    /// same Ingress wins).
    pub fn reconcile(&mut self, sink: &dyn Sink, store: &Store, managed: &[Arc<ManagedIngress>]) {
        let changes = self.changes.advance(store);
        let snap = store.snapshot();
        let mut look: BTreeSet<ObjectKey> = self.follow_managed(managed);
        match &changes {
            Changes::Resync => look.extend(self.by_ingress.keys().cloned()),
            Changes::Keys(keys) => {
                for c in keys {
                    match c.key.kind {
                        Kind::Service => {
                            look.extend(self.by_service.get(&c.key).into_iter().flatten().cloned());
                        }
                        Kind::Ingress if self.by_ingress.contains_key(&c.key) => {
                            look.insert(c.key.clone());
                        }
                        _ => {}
                    }
                }
            }
        }
        look.extend(self.pending.iter().cloned());
        let mut reports: Option<Vec<&ProxyNodeStatus>> = None;
        for key in look {
            let Some(m) = self.by_ingress.get(&key) else {
                // No longer ours: it loses the address we gave it.
                self.pending.remove(&key);
                if self.written.remove(&key) && ingress_ip(&snap, &key).is_some() {
                    sink.status(&key, json!({"loadBalancer": {}}));
                }
                continue;
            };
            let Some(ip) = snap
                .get_typed::<Service>(&m.service.namespace, &m.service.name)
                .and_then(lb_ip)
            else {
                self.pending.remove(&key);
                continue;
            };
            let ip = ip.to_string();
            if ingress_ip(&snap, &key).as_deref() == Some(ip.as_str()) {
                self.pending.remove(&key);
                self.written.insert(key);
                continue;
            }
            // Until the address shows, the Ingress is looked at every pass
            // (and written again while its ACK holds: the sink coalesces).
            self.pending.insert(key.clone());
            let reports =
                reports.get_or_insert_with(|| snap.typed::<ProxyNodeStatus>(None).collect());
            // The ACK must cover listeners on this very address.
            if !acked_everywhere(&snap, reports, &m.cec, Some(&ip)) {
                continue;
            }
            sink.status(&key, json!({"loadBalancer": {"ingress": [{"ip": ip}]}}));
            self.written.insert(key);
        }
    }

    /// Takes in the new managed list; returns the Ingresses whose entry
    /// came, went or changed.
    fn follow_managed(&mut self, managed: &[Arc<ManagedIngress>]) -> BTreeSet<ObjectKey> {
        let mut changed = BTreeSet::new();
        let unchanged = managed.len() == self.last.len()
            && managed
                .iter()
                .zip(&self.last)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if unchanged {
            return changed;
        }
        let ptr = |m: &Arc<ManagedIngress>| Arc::as_ptr(m) as usize;
        let new: HashSet<usize> = managed.iter().map(ptr).collect();
        let old: HashSet<usize> = self.last.iter().map(ptr).collect();
        for gone in self.last.iter().filter(|m| !new.contains(&ptr(m))) {
            if self
                .by_ingress
                .get(&gone.ingress)
                .is_some_and(|m| Arc::ptr_eq(m, gone))
            {
                self.by_ingress.remove(&gone.ingress);
            }
            if let Some(users) = self.by_service.get_mut(&gone.service) {
                users.remove(&gone.ingress);
                if users.is_empty() {
                    self.by_service.remove(&gone.service);
                }
            }
            changed.insert(gone.ingress.clone());
        }
        for came in managed.iter().filter(|m| !old.contains(&ptr(m))) {
            self.by_ingress.insert(came.ingress.clone(), came.clone());
            changed.insert(came.ingress.clone());
        }
        // Service users of the Ingresses that changed, from what they map
        // to now (an Ingress's old Service was dropped above).
        for key in &changed {
            if let Some(m) = self.by_ingress.get(key) {
                self.by_service
                    .entry(m.service.clone())
                    .or_default()
                    .insert(key.clone());
            }
        }
        self.last = managed.to_vec();
        changed
    }
}

/// The address an Ingress's status shows, if any.
pub fn ingress_ip(snap: &StoreSnapshot, key: &ObjectKey) -> Option<String> {
    snap.get_typed::<Ingress>(&key.namespace, &key.name)?
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .ip
        .clone()
}

/// Whether at least one agent serves `cec` and every agent whose node its
/// `nodeSelector` selects reports an ACK of its current generation (built
/// with `address` as its Service's LB address, if given).
pub fn acked_everywhere(
    snap: &StoreSnapshot,
    reports: &[&ProxyNodeStatus],
    cec: &ObjectKey,
    address: Option<&str>,
) -> bool {
    let Some(obj) = snap.get(cec) else {
        return false;
    };
    let selector = match obj.as_ref() {
        Object::CiliumEnvoyConfig(c) => c.spec.node_selector.as_ref(),
        Object::CiliumClusterwideEnvoyConfig(c) => c.spec.node_selector.as_ref(),
        _ => return false,
    };
    // A split shared CEC is served as one: every part must be ACKed at its
    // own current generation too (the address is on the first part only).
    let mut wanted = vec![(
        cec.name.as_str(),
        obj.meta().generation.unwrap_or(0),
        address,
    )];
    if cec.kind == Kind::CiliumEnvoyConfig {
        wanted.extend(
            snap.list(Kind::CiliumEnvoyConfig, Some(&cec.namespace))
                .filter(|o| membrane_ingress::shared_part_of(o.meta()) == Some(cec.name.as_str()))
                .map(|o| {
                    let meta = o.meta();
                    (
                        meta.name.as_deref().unwrap_or_default(),
                        meta.generation.unwrap_or(0),
                        None,
                    )
                }),
        );
    }
    // A node's report is spread over several objects; its labels are on
    // each (the one named after the node counts when they differ).
    let mut nodes: BTreeMap<&str, Vec<&ProxyNodeStatus>> = BTreeMap::new();
    for report in reports {
        nodes.entry(report_node(report)).or_default().push(report);
    }
    let mut serving = 0;
    for (node, objects) in &nodes {
        let labels = objects
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(*node))
            .or(objects.first())
            .map(|r| &r.spec.node_labels);
        if !labels.is_some_and(|l| selects(selector, l)) {
            continue;
        }
        serving += 1;
        let configs = || {
            objects
                .iter()
                .flat_map(|r| r.status.iter().flat_map(|s| &s.configs))
        };
        let acked = wanted.iter().all(|(name, generation, address)| {
            configs().any(|c| {
                c.kind == cec.kind.kind_name()
                    && c.namespace == cec.namespace
                    && c.name == *name
                    && c.generation == *generation
                    && c.state == ACKED
                    && address.is_none_or(|a| c.addresses.iter().any(|x| x == a))
            })
        });
        if !acked {
            return false;
        }
    }
    serving > 0
}

pub use membrane_crds::selects_node as selects;

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_store::Store;

    fn apply(store: &Store, yaml: &str) {
        for obj in membrane_store::parse_documents(yaml).expect("yaml") {
            store.apply(obj);
        }
    }

    fn report(store: &Store, node: &str, labels: &str, generation: i64, state: &str) {
        apply(
            store,
            &format!(
                "apiVersion: membrane.io/v1alpha1\nkind: ProxyNodeStatus\nmetadata: {{name: {node}}}\nspec: {{nodeLabels: {labels}}}\n"
            ),
        );
        let key = ObjectKey::new(Kind::ProxyNodeStatus, "", node);
        assert!(store.update_status(
            &key,
            json!({"configs": [{"kind": "CiliumEnvoyConfig", "namespace": "default", "name": "c",
                                "generation": generation, "state": state}]}),
        ));
    }

    #[test]
    fn every_selected_agent_must_ack_the_current_generation() {
        let store = Store::new();
        apply(
            &store,
            "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c, namespace: default}\nspec:\n  nodeSelector: {matchLabels: {role: edge}}\n  resources: []\n",
        );
        let cec = ObjectKey::new(Kind::CiliumEnvoyConfig, "default", "c");
        let check = |store: &Store| {
            let snap = store.snapshot();
            let reports: Vec<&ProxyNodeStatus> = snap.typed::<ProxyNodeStatus>(None).collect();
            acked_everywhere(&snap, &reports, &cec, None)
        };
        assert!(!check(&store), "no agent serves it yet");
        report(&store, "a", "{role: edge}", 1, ACKED);
        assert!(check(&store));
        // An ACK of content built before the Service had its LB address
        // does not cover that address.
        {
            let snap = store.snapshot();
            let reports: Vec<&ProxyNodeStatus> = snap.typed::<ProxyNodeStatus>(None).collect();
            assert!(!acked_everywhere(&snap, &reports, &cec, Some("127.0.0.9")));
        }
        // A node the selector does not pick has no say.
        report(&store, "b", "{role: other}", 0, "Pending");
        assert!(check(&store));
        // A second selected node that has not ACKed holds the address back.
        report(&store, "c", "{role: edge}", 1, "Pending");
        assert!(!check(&store));
        report(&store, "c", "{role: edge}", 1, ACKED);
        assert!(check(&store));
        // New content: the old ACKs no longer count.
        apply(
            &store,
            "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c, namespace: default}\nspec:\n  nodeSelector: {matchLabels: {role: edge}}\n  resources: [{\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener, name: l}]\n",
        );
        assert!(!check(&store));
    }

    #[test]
    fn a_split_cec_counts_as_acked_only_with_every_part_at_its_generation() {
        let store = Store::new();
        apply(
            &store,
            "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c, namespace: default}\nspec: {resources: []}\n---\napiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c-1, namespace: default, labels: {membrane.io/shared-part-of: c}}\nspec: {resources: []}\n",
        );
        let cec = ObjectKey::new(Kind::CiliumEnvoyConfig, "default", "c");
        let acks = |part_generation: i64| {
            json!({"configs": [
                {"kind": "CiliumEnvoyConfig", "namespace": "default", "name": "c",
                 "generation": 1, "state": ACKED},
                {"kind": "CiliumEnvoyConfig", "namespace": "default", "name": "c-1",
                 "generation": part_generation, "state": ACKED},
            ]})
        };
        let check = |store: &Store| {
            let snap = store.snapshot();
            let reports: Vec<&ProxyNodeStatus> = snap.typed::<ProxyNodeStatus>(None).collect();
            acked_everywhere(&snap, &reports, &cec, None)
        };
        report(&store, "a", "{}", 1, ACKED);
        assert!(!check(&store), "the part is not ACKed");
        let key = ObjectKey::new(Kind::ProxyNodeStatus, "", "a");
        assert!(store.update_status(&key, acks(1)));
        assert!(check(&store));
        // The part alone changes: its new generation must be ACKed too.
        apply(
            &store,
            "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c-1, namespace: default, labels: {membrane.io/shared-part-of: c}}\nspec:\n  resources: [{\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener, name: l}]\n",
        );
        assert!(!check(&store));
        assert!(store.update_status(&key, acks(2)));
        assert!(check(&store));
    }

    /// A node's report spread over several objects counts as one: an entry
    /// in any of them, the labels of the one named after the node.
    #[test]
    fn a_report_spread_over_objects_counts_per_node() {
        let store = Store::new();
        apply(
            &store,
            "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c, namespace: default}\nspec:\n  nodeSelector: {matchLabels: {role: edge}}\n  resources: []\n---\napiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c-1, namespace: default, labels: {membrane.io/shared-part-of: c}}\nspec: {resources: []}\n",
        );
        let cec = ObjectKey::new(Kind::CiliumEnvoyConfig, "default", "c");
        let check = |store: &Store| {
            let snap = store.snapshot();
            let reports: Vec<&ProxyNodeStatus> = snap.typed::<ProxyNodeStatus>(None).collect();
            acked_everywhere(&snap, &reports, &cec, None)
        };
        let object = |name: &str, node: &str, labels: &str, entry: Option<&str>| {
            apply(
                &store,
                &format!(
                    "apiVersion: membrane.io/v1alpha1\nkind: ProxyNodeStatus\nmetadata: {{name: {name}, labels: {{membrane.io/node: {node}}}}}\nspec: {{nodeLabels: {labels}}}\n"
                ),
            );
            let configs: Vec<serde_json::Value> = entry
                .into_iter()
                .map(|n| {
                    json!({"kind": "CiliumEnvoyConfig", "namespace": "default", "name": n,
                           "generation": 1, "state": ACKED})
                })
                .collect();
            assert!(store.update_status(
                &ObjectKey::new(Kind::ProxyNodeStatus, "", name),
                json!({ "configs": configs }),
            ));
        };
        // The head in node a's own object, the part in another of its objects.
        object("a", "a", "{role: edge}", Some("c"));
        assert!(!check(&store), "the part is not ACKed yet");
        object("a.5", "a", "{role: edge}", Some("c-1"));
        assert!(check(&store), "entries of one node in two objects");
        // Node b is selected (by its own object's labels) and ACKed nothing.
        object("b", "b", "{role: edge}", None);
        object("b.3", "b", "{}", None);
        assert!(!check(&store));
        object("b.3", "b", "{}", Some("c"));
        object("b.9", "b", "{}", Some("c-1"));
        assert!(check(&store));
        // Node d's own object says it is not selected; its others' stale
        // labels do not make it so.
        object("d", "d", "{role: other}", None);
        object("d.2", "d", "{role: edge}", None);
        assert!(check(&store));
    }
}
