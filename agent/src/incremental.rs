//! Bookkeeping of the agent's incremental store pass: which store changes
//! each stage has seen, the rejections of stages that did not run, and the
//! keyed update of the xDS snapshot from a pass's resources.
//!
//! Each stage reads the store's change log from the revision it last saw
//! ([`membrane_store::Store::changes_since`]); a stage that fell behind the
//! log, or runs for the first time, gets a resync (a full pass).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use membrane_ingress::INGRESS_LABEL;
use membrane_store::{Changes, KeyChangeKind, Kind, ObjectKey, Store, StoreSnapshot};
use membrane_xds::{ResourceMap, Snapshot};

use crate::configs::{Built, PipelineChanges};

/// What the incremental pass keeps between passes.
#[derive(Debug, Default)]
pub struct PassState {
    /// Store revision LB IPAM and the Ingress controller last ran at.
    pub front_seen: Option<u64>,
    /// Store revision the config pipeline last saw.
    pub pipeline_seen: Option<u64>,
    /// Rejections by LB IPAM and the Ingress controller at their last run.
    pub front_rejected: BTreeMap<ObjectKey, String>,
    /// Rejections by the config pipeline, patched by endpoint-only passes.
    pub pipeline_rejected: BTreeMap<ObjectKey, String>,
}

impl PassState {
    /// The changes LB IPAM and the Ingress controller have not seen.
    pub fn front_changes(&self, store: &Store) -> (u64, Changes) {
        since(store, self.front_seen)
    }

    /// The changes the pipeline has not seen, reduced to what it reads.
    pub fn pipeline_changes(&self, store: &Store) -> (u64, PipelineChanges) {
        let (rev, changes) = since(store, self.pipeline_seen);
        (rev, PipelineChanges::from_store(&changes))
    }

    /// An endpoint-only pass: put the changed assignments into the
    /// snapshot. True when the snapshot changed.
    pub fn publish_endpoints(
        &mut self,
        snapshot: &mut Snapshot,
        updated: Vec<(Built, Built)>,
    ) -> bool {
        publish_delta(
            snapshot,
            updated.into_iter().map(|(_, new)| new).collect(),
            Vec::new(),
        )
    }
}

fn since(store: &Store, seen: Option<u64>) -> (u64, Changes) {
    match seen {
        Some(rev) => store.changes_since(rev),
        None => (store.revision(), Changes::Resync),
    }
}

/// Whether LB IPAM and the Ingress controller must run for `changes`: they
/// read everything but the EndpointSlices/Endpoints of workloads (slices
/// the controller generates are its own to restore).
pub fn front_needed(changes: &Changes, snap: &StoreSnapshot) -> bool {
    let Changes::Keys(keys) = changes else {
        return true;
    };
    keys.iter().any(|c| match c.key.kind {
        Kind::Endpoints => false,
        // The controller writes Ingress status itself (from the agents'
        // reports, which do count); the echo of its own writes gives it
        // nothing new to do. At scale those echoes arrive a few at a time
        // and each would cost a pass over every Ingress.
        Kind::Ingress => c.kind != KeyChangeKind::StatusUpdated,
        // Workload slices are owned by their Service; the controller only
        // reads the slices generated for Ingresses.
        Kind::EndpointSlice => snap.get(&c.key).is_none_or(|o| {
            let meta = o.meta();
            meta.owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|r| r.kind == "Ingress"))
                || meta
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(INGRESS_LABEL))
        }),
        _ => true,
    })
}

/// Changes counted by kind (`Ingress:2 EndpointSlice:1`), for the pass's
/// debug log: what keeps the controller busy.
pub fn summary(changes: &Changes) -> String {
    let Changes::Keys(keys) = changes else {
        return "resync".into();
    };
    let mut by_kind: BTreeMap<(&'static str, bool), usize> = BTreeMap::new();
    for c in keys {
        let status = c.kind == KeyChangeKind::StatusUpdated;
        *by_kind.entry((c.key.kind.kind_name(), status)).or_default() += 1;
    }
    let parts: Vec<String> = by_kind
        .iter()
        .map(|((k, status), n)| format!("{k}{}:{n}", if *status { "/status" } else { "" }))
        .collect();
    parts.join(" ")
}

/// Apply an endpoint-only pass's rejection changes.
pub fn patch_rejected(
    rejected: &mut BTreeMap<ObjectKey, String>,
    changes: Vec<(ObjectKey, Option<String>)>,
) {
    for (key, why) in changes {
        match why {
            Some(why) => rejected.insert(key, why),
            None => rejected.remove(&key),
        };
    }
}

/// Same resource: the same `Arc`, or the same type, name and content hash.
fn same(a: &Built, b: &Built) -> bool {
    Arc::ptr_eq(a, b) || (a.hash == b.hash && a.name == b.name && a.type_url == b.type_url)
}

/// A full pass's resources into the snapshot: only the resources that
/// differ from what it holds are put or removed. True when the snapshot
/// changed.
pub fn publish_full(snapshot: &mut Snapshot, new: Vec<Built>) -> bool {
    let keep: HashSet<(&str, &str)> = new
        .iter()
        .map(|r| (r.type_url.as_str(), r.name.as_str()))
        .collect();
    let removals: Vec<(String, String)> = snapshot
        .type_urls()
        .flat_map(|t| {
            snapshot
                .resources(t)
                .keys()
                .filter(|n| !keep.contains(&(t, n.as_str())))
                .map(move |n| (t.to_owned(), n.clone()))
        })
        .collect();
    drop(keep);
    publish_delta(snapshot, new, removals)
}

/// Put `upserts` (those that differ from what the snapshot holds) and
/// remove `removals`. True when the snapshot changed.
pub fn publish_delta(
    snapshot: &mut Snapshot,
    upserts: Vec<Built>,
    removals: Vec<(String, String)>,
) -> bool {
    let upserts: Vec<Built> = upserts
        .into_iter()
        .filter(|r| {
            snapshot
                .get(&r.type_url, &r.name)
                .is_none_or(|old| !same(old, r))
        })
        .collect();
    let removals: Vec<(String, String)> = removals
        .into_iter()
        .filter(|(t, n)| snapshot.get(t, n).is_some())
        .collect();
    if upserts.is_empty() && removals.is_empty() {
        return false;
    }
    snapshot.update(upserts, removals);
    true
}

/// Which served objects Envoy has ACKed in full. Re-checked where
/// something changed only: an object once ACKed stays ACKed until what it
/// serves changes (a pass touches it) or Envoy's stream is replaced.
#[derive(Debug, Default)]
pub struct AckState {
    /// Served and ACKed in full.
    pub acked: BTreeSet<ObjectKey>,
    /// Served, not ACKed as of the last check: checked again when Envoy
    /// ACKed something since.
    pending: BTreeSet<ObjectKey>,
    /// Touched since the last check.
    fresh: BTreeSet<ObjectKey>,
    /// A touch took something out of `acked` since the last check.
    unacked: bool,
    /// Everything is to be checked (a full pass, a new stream).
    all: bool,
    stream: Option<u64>,
    /// What Envoy had ACKed at the last check (shared maps: a new ACK
    /// replaces its type's map).
    seen: BTreeMap<String, Arc<ResourceMap>>,
}

impl AckState {
    /// Everything served may have changed.
    pub fn reset(&mut self) {
        self.all = true;
    }

    /// What these serve may have changed (or they are no longer served).
    pub fn touch(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        for k in keys {
            self.unacked |= self.acked.remove(&k);
            self.pending.remove(&k);
            self.fresh.insert(k);
        }
    }

    /// Check the objects that need it against what Envoy ACKed on
    /// `stream`; `mark` is called for each newly ACKed one. True when the
    /// ACKed set changed.
    pub fn check(
        &mut self,
        served: &BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
        snapshot: &Snapshot,
        acked_now: &BTreeMap<String, Arc<ResourceMap>>,
        stream: Option<u64>,
        mut mark: impl FnMut(&ObjectKey),
    ) -> bool {
        let all_acked = |resources: &[(&'static str, String)]| {
            resources.iter().all(|(t, n)| {
                let Some(current) = snapshot.get(t, n) else {
                    return false;
                };
                acked_now
                    .get(*t)
                    .and_then(|m| m.get(n))
                    .is_some_and(|r| Arc::ptr_eq(r, current) || r.hash == current.hash)
            })
        };
        let acks_same = self.seen.len() == acked_now.len()
            && self
                .seen
                .iter()
                .zip(acked_now)
                .all(|((ta, a), (tb, b))| ta == tb && Arc::ptr_eq(a, b));
        self.seen = acked_now.clone();
        if self.all || stream != self.stream {
            self.unacked = false;
            self.all = false;
            self.stream = stream;
            self.pending.clear();
            self.fresh.clear();
            let before = std::mem::take(&mut self.acked);
            for (key, resources) in served {
                if all_acked(resources) {
                    mark(key);
                    self.acked.insert(key.clone());
                } else {
                    self.pending.insert(key.clone());
                }
            }
            return before != self.acked;
        }
        let mut changed = std::mem::take(&mut self.unacked);
        // Nothing new ACKed: what was pending still is.
        let mut todo = std::mem::take(&mut self.fresh);
        if !acks_same {
            todo.append(&mut self.pending);
        }
        for key in todo {
            let Some(resources) = served.get(&key) else {
                // No longer served.
                changed |= self.acked.remove(&key);
                continue;
            };
            if all_acked(resources) {
                mark(&key);
                changed |= self.acked.insert(key);
            } else {
                self.pending.insert(key);
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy_pb::Any;
    use membrane_xds::Resource;

    fn res(t: &str, name: &str, body: u8) -> Built {
        Arc::new(Resource::with_name(
            name,
            Any {
                type_url: t.to_owned(),
                value: vec![body],
            },
        ))
    }

    /// The keyed update gives the snapshot a rebuild from scratch gives,
    /// whatever changed where.
    #[test]
    fn keyed_update_equals_rebuild() {
        let l = "type.googleapis.com/envoy.config.listener.v3.Listener";
        let c = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
        let base: Vec<Built> = (0..20)
            .map(|i| res(if i % 3 == 0 { l } else { c }, &format!("r{i}"), 0))
            .collect();
        let mut cases: Vec<Vec<Built>> = Vec::new();
        // unchanged, one changed in the middle, one inserted, one removed,
        // first and last changed, everything different, empty.
        cases.push(base.clone());
        let mut v = base.clone();
        v[7] = res(c, "r7", 1);
        cases.push(v);
        let mut v = base.clone();
        v.insert(5, res(c, "new", 0));
        cases.push(v);
        let mut v = base.clone();
        v.remove(11);
        cases.push(v);
        let mut v = base.clone();
        v[0] = res(l, "r0", 2);
        v[19] = res(c, "r19", 2);
        cases.push(v);
        cases.push((0..5).map(|i| res(l, &format!("x{i}"), 0)).collect());
        cases.push(Vec::new());
        for (n, case) in cases.into_iter().enumerate() {
            let mut snap = crate::build_snapshot(&base);
            let changed = publish_full(&mut snap, case.clone());
            assert_eq!(snap, crate::build_snapshot(&case), "case {n}");
            assert_eq!(changed, n != 0, "case {n}");
            // Hashes too, not only names: content changes are visible.
            for r in &case {
                assert_eq!(snap.get(&r.type_url, &r.name).map(|x| x.hash), Some(r.hash));
            }
        }
    }

    /// The ACK check looks only at what changed, yet finds what a check of
    /// everything finds: a new ACK, a changed resource, a new stream.
    #[test]
    fn ack_state_follows_acks_changes_and_streams() {
        let l = "type.googleapis.com/envoy.config.listener.v3.Listener";
        let key = ObjectKey::new(Kind::CiliumEnvoyConfig, "a", "c");
        let served: BTreeMap<ObjectKey, Vec<(&'static str, String)>> =
            [(key.clone(), vec![(type_url_static(), "x".to_owned())])].into();
        let v1 = res(l, "x", 1);
        let snap = crate::build_snapshot(std::slice::from_ref(&v1));
        let acked_of = |r: &Built| -> BTreeMap<String, Arc<ResourceMap>> {
            [(l.to_owned(), Arc::new([("x".to_owned(), r.clone())].into()))].into()
        };
        let mut st = AckState::default();
        let mut marked = Vec::new();
        st.reset();
        assert!(!st.check(&served, &snap, &BTreeMap::new(), Some(1), |k| {
            marked.push(k.clone())
        }));
        assert!(st.acked.is_empty());
        // Envoy ACKs it: found although nothing was touched.
        let acked = acked_of(&v1);
        assert!(st.check(&served, &snap, &acked, Some(1), |k| marked.push(k.clone())));
        assert!(st.acked.contains(&key));
        assert_eq!(marked, vec![key.clone()]);
        // Its content changes: pending until the new content is ACKed.
        let v2 = res(l, "x", 2);
        let snap2 = crate::build_snapshot(std::slice::from_ref(&v2));
        st.touch([key.clone()]);
        assert!(st.check(&served, &snap2, &acked, Some(1), |_| {}));
        assert!(!st.acked.contains(&key));
        assert!(st.check(&served, &snap2, &acked_of(&v2), Some(1), |_| {}));
        assert!(st.acked.contains(&key));
        // A new stream starts from nothing ACKed.
        assert!(st.check(&served, &snap2, &BTreeMap::new(), Some(2), |_| {}));
        assert!(st.acked.is_empty());
    }

    fn type_url_static() -> &'static str {
        "type.googleapis.com/envoy.config.listener.v3.Listener"
    }
}
