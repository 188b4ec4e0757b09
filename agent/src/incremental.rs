//! Bookkeeping of the agent's incremental store pass: which store changes
//! each stage has seen, the rejections of stages that did not run, and the
//! keyed update of the xDS snapshot from a pass's resources.
//!
//! Each stage reads the store's change log from the revision it last saw
//! ([`membrane_store::Store::changes_since`]); a stage that fell behind the
//! log, or runs for the first time, gets a resync (a full pass).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use membrane_ingress::INGRESS_LABEL;
use membrane_store::{Changes, KeyChangeKind, Kind, ObjectKey, Store, StoreSnapshot};
use membrane_xds::{ResourceMap, Snapshot};

use crate::configs::{Built, PipelineChanges, ServedList};

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
    /// snapshot. What changed (see [`publish_delta`]).
    pub fn publish_endpoints(
        &mut self,
        snapshot: &mut Snapshot,
        updated: Vec<(Built, Built)>,
    ) -> Vec<(String, String)> {
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
/// differ from what it holds are put or removed. What changed (see
/// [`publish_delta`]).
pub fn publish_full(snapshot: &mut Snapshot, new: Vec<Built>) -> Vec<(String, String)> {
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
/// remove `removals`. The `(type, name)` of what changed: empty when the
/// snapshot did not.
pub fn publish_delta(
    snapshot: &mut Snapshot,
    upserts: Vec<Built>,
    removals: Vec<(String, String)>,
) -> Vec<(String, String)> {
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
    let changed: Vec<(String, String)> = upserts
        .iter()
        .map(|r| (r.type_url.clone(), r.name.clone()))
        .chain(removals.iter().cloned())
        .collect();
    if !changed.is_empty() {
        snapshot.update(upserts, removals);
    }
    changed
}

/// Which served objects Envoy runs in full: every resource an object
/// serves is in the snapshot, and the content Envoy last ACKed for it is
/// the snapshot's. Kept per resource and updated from exact differences
/// only: the resources a publish changed ([`AckState::published`]), the
/// entries of Envoy's ACKed maps that differ from the maps at the last
/// check, and the served lists that changed ([`AckState::touch`]). So the
/// result is always what [`acked_in_full`] finds, at a cost that follows
/// the change; a full pass or a new stream re-evaluates everything.
#[derive(Debug, Default)]
pub struct AckState {
    /// Served and ACKed in full.
    pub acked: BTreeSet<ObjectKey>,
    /// Each served resource, by type and name: who serves it, and whether
    /// Envoy runs its current content.
    resources: HashMap<String, HashMap<String, Res>>,
    /// Each served object's resources (as last tracked) and how many of
    /// them Envoy does not run yet.
    objects: HashMap<ObjectKey, (ServedList, usize)>,
    /// Served lists that changed since the last check.
    lists_changed: BTreeSet<ObjectKey>,
    /// Snapshot resources `(type, name)` put or removed since the last check.
    res_changed: HashSet<(String, String)>,
    /// Everything is to be re-evaluated (a full pass).
    all: bool,
    stream: Option<u64>,
    /// Envoy's ACKed maps at the last check (shared: an ACK replaces its
    /// type's map, so an unchanged type is one pointer comparison).
    seen: BTreeMap<String, Arc<ResourceMap>>,
}

#[derive(Debug, Default)]
struct Res {
    users: Vec<ObjectKey>,
    running: bool,
}

/// Envoy runs the snapshot's content of `(t, n)`.
fn runs(snapshot: &Snapshot, acked: &BTreeMap<String, Arc<ResourceMap>>, t: &str, n: &str) -> bool {
    let Some(current) = snapshot.get(t, n) else {
        return false;
    };
    acked
        .get(t)
        .and_then(|m| m.get(n))
        .is_some_and(|r| Arc::ptr_eq(r, current) || r.hash == current.hash)
}

/// The served objects every resource of which Envoy runs, checked one by
/// one (what [`AckState`] keeps up to date).
pub fn acked_in_full(
    served: &BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
    snapshot: &Snapshot,
    acked: &BTreeMap<String, Arc<ResourceMap>>,
) -> BTreeSet<ObjectKey> {
    served
        .iter()
        .filter(|(_, list)| list.iter().all(|(t, n)| runs(snapshot, acked, t, n)))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Names whose entries differ between two maps of one type (by pointer,
/// then content hash), including names only one of them has. The maps are
/// persistent: what they share is skipped.
fn differing(old: &ResourceMap, new: &ResourceMap) -> Vec<String> {
    use membrane_xds::DiffItem;
    old.diff(new)
        .map(|item| match item {
            DiffItem::Add(n, _) | DiffItem::Remove(n, _) => n.clone(),
            DiffItem::Update { new: (n, _), .. } => n.clone(),
        })
        .collect()
}

impl AckState {
    /// Everything served may have changed (a full pass).
    pub fn reset(&mut self) {
        self.all = true;
    }

    /// The served lists of these changed (or they are no longer served).
    pub fn touch(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        self.lists_changed.extend(keys);
    }

    /// The snapshot put or removed these resources `(type, name)`.
    pub fn published(&mut self, changed: impl IntoIterator<Item = (String, String)>) {
        if !self.all {
            self.res_changed.extend(changed);
        }
    }

    /// Bring the ACKed set up to date with `served`, `snapshot` and what
    /// Envoy ACKed on `stream`; `mark` is called for each object found
    /// ACKed whose state was looked at (newly ACKed, or its resources
    /// changed and are ACKed again). True when the ACKed set changed.
    pub fn check(
        &mut self,
        served: &BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
        snapshot: &Snapshot,
        acked_now: &BTreeMap<String, Arc<ResourceMap>>,
        stream: Option<u64>,
        mut mark: impl FnMut(&ObjectKey),
    ) -> bool {
        if self.all || stream != self.stream {
            self.all = false;
            self.stream = stream;
            self.seen = acked_now.clone();
            self.resources.clear();
            self.objects.clear();
            self.lists_changed.clear();
            self.res_changed.clear();
            let before = std::mem::take(&mut self.acked);
            for (key, list) in served {
                if self.add(key, list, snapshot, acked_now) {
                    mark(key);
                    self.acked.insert(key.clone());
                }
            }
            return before != self.acked;
        }
        // Objects whose state is to be looked at.
        let mut look: BTreeSet<ObjectKey> = BTreeSet::new();
        for key in std::mem::take(&mut self.lists_changed) {
            self.remove(&key);
            if let Some(list) = served.get(&key) {
                self.add(&key, list, snapshot, acked_now);
            }
            look.insert(key);
        }
        // Resources whose snapshot content or ACKed content changed.
        let mut names: Vec<(String, String)> =
            std::mem::take(&mut self.res_changed).into_iter().collect();
        for (t, now) in acked_now {
            match self.seen.get(t) {
                Some(old) if Arc::ptr_eq(old, now) => {}
                Some(old) => names.extend(differing(old, now).into_iter().map(|n| (t.clone(), n))),
                None => names.extend(now.keys().map(|n| (t.clone(), n.clone()))),
            }
        }
        for (t, old) in &self.seen {
            if !acked_now.contains_key(t) {
                names.extend(old.keys().map(|n| (t.clone(), n.clone())));
            }
        }
        self.seen = acked_now.clone();
        for (t, n) in names {
            let Some(res) = self.resources.get_mut(&t).and_then(|m| m.get_mut(&n)) else {
                continue;
            };
            let running = runs(snapshot, acked_now, &t, &n);
            look.extend(res.users.iter().cloned());
            if running == res.running {
                continue;
            }
            res.running = running;
            for u in &res.users {
                if let Some((_, missing)) = self.objects.get_mut(u) {
                    if running {
                        *missing -= 1;
                    } else {
                        *missing += 1;
                    }
                }
            }
        }
        let mut changed = false;
        for key in look {
            if self.objects.get(&key).is_some_and(|(_, m)| *m == 0) {
                mark(&key);
                changed |= self.acked.insert(key);
            } else {
                changed |= self.acked.remove(&key);
            }
        }
        changed
    }

    /// Track `key` serving `list`; true when Envoy runs all of it.
    fn add(
        &mut self,
        key: &ObjectKey,
        list: &[(&'static str, String)],
        snapshot: &Snapshot,
        acked: &BTreeMap<String, Arc<ResourceMap>>,
    ) -> bool {
        let mut missing = 0;
        for (t, n) in list {
            let by_name = match self.resources.get_mut(*t) {
                Some(m) => m,
                None => self.resources.entry((*t).to_owned()).or_default(),
            };
            let res = match by_name.get_mut(n) {
                Some(r) => r,
                None => by_name.entry(n.clone()).or_insert_with(|| Res {
                    users: Vec::new(),
                    running: runs(snapshot, acked, t, n),
                }),
            };
            res.users.push(key.clone());
            if !res.running {
                missing += 1;
            }
        }
        self.objects.insert(key.clone(), (list.to_vec(), missing));
        missing == 0
    }

    /// Stop tracking `key`.
    fn remove(&mut self, key: &ObjectKey) {
        let Some((list, _)) = self.objects.remove(key) else {
            return;
        };
        for (t, n) in list {
            let Some(by_name) = self.resources.get_mut(t) else {
                continue;
            };
            let Some(res) = by_name.get_mut(&n) else {
                continue;
            };
            if let Some(i) = res.users.iter().position(|u| u == key) {
                res.users.swap_remove(i);
            }
            if res.users.is_empty() {
                by_name.remove(&n);
            }
        }
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
            assert_eq!(!changed.is_empty(), n != 0, "case {n}");
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
        let mut snap = crate::build_snapshot(std::slice::from_ref(&v1));
        let acked_of = |r: &Built| -> BTreeMap<String, Arc<ResourceMap>> {
            [(
                l.to_owned(),
                Arc::new(ResourceMap::unit("x".to_owned(), r.clone())),
            )]
            .into()
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
        st.published(publish_delta(&mut snap, vec![v2.clone()], Vec::new()));
        assert!(st.check(&served, &snap, &acked, Some(1), |_| {}));
        assert!(!st.acked.contains(&key));
        assert!(st.check(&served, &snap, &acked_of(&v2), Some(1), |_| {}));
        assert!(st.acked.contains(&key));
        // A new stream starts from nothing ACKed.
        assert!(st.check(&served, &snap, &BTreeMap::new(), Some(2), |_| {}));
        assert!(st.acked.is_empty());
    }

    /// Random snapshot changes, served-list changes, ACKs of whole types,
    /// of part of a type (names Envoy follows) and of older content,
    /// reconnects and full passes: after every check the ACKed set is what
    /// a check of every served object finds, and every newly ACKed object
    /// was marked.
    #[test]
    fn ack_state_equals_a_check_of_everything() {
        let types = [
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        ];
        let keys: Vec<ObjectKey> = (0..6)
            .map(|i| ObjectKey::new(Kind::CiliumEnvoyConfig, "a", &format!("c{i}")))
            .collect();
        for seed in [3u64, 17, 2024, 77777] {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut below = |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut snap = Snapshot::new();
            let mut served: BTreeMap<ObjectKey, Vec<(&'static str, String)>> = BTreeMap::new();
            let mut envoy: BTreeMap<String, Arc<ResourceMap>> = BTreeMap::new();
            // Envoy's previous ACKed maps, to go back to (older content).
            let mut older: Vec<BTreeMap<String, Arc<ResourceMap>>> = Vec::new();
            let mut stream = 1;
            let mut st = AckState::default();
            st.reset();
            let mut before = BTreeSet::new();
            for step in 0..400 {
                match below(8) {
                    0 | 1 => {
                        let t = types[below(3) as usize];
                        let n = format!("r{}", below(6));
                        let changed = if below(4) == 0 {
                            publish_delta(&mut snap, Vec::new(), vec![(t.to_owned(), n)])
                        } else {
                            publish_delta(&mut snap, vec![res(t, &n, below(3) as u8)], Vec::new())
                        };
                        st.published(changed);
                    }
                    2 => {
                        let k = keys[below(6) as usize].clone();
                        if below(5) == 0 {
                            served.remove(&k);
                        } else {
                            let list = (0..below(4))
                                .map(|_| (types[below(3) as usize], format!("r{}", below(6))))
                                .collect();
                            served.insert(k.clone(), list);
                        }
                        st.touch([k]);
                    }
                    3 | 4 => {
                        older.push(envoy.clone());
                        let t = types[below(3) as usize];
                        let mut m = snap.resources(t).clone();
                        if below(3) == 0 {
                            let keep = below(6);
                            m = m
                                .into_iter()
                                .filter(|(n, _)| !n.ends_with(&keep.to_string()))
                                .collect();
                        }
                        envoy.insert(t.to_owned(), Arc::new(m));
                    }
                    5 if !older.is_empty() => {
                        envoy = older.remove(below(older.len() as u64) as usize);
                    }
                    6 if below(4) == 0 => {
                        stream += 1;
                        envoy.clear();
                    }
                    7 if below(4) == 0 => st.reset(),
                    _ => {}
                }
                let mut marked = BTreeSet::new();
                st.check(&served, &snap, &envoy, Some(stream), |k| {
                    marked.insert(k.clone());
                });
                let want = acked_in_full(&served, &snap, &envoy);
                assert_eq!(st.acked, want, "seed {seed} step {step}");
                assert!(
                    want.iter()
                        .all(|k| before.contains(k) || marked.contains(k)),
                    "seed {seed} step {step}: newly ACKed are marked"
                );
                before = want;
            }
        }
    }

    fn type_url_static() -> &'static str {
        "type.googleapis.com/envoy.config.listener.v3.Listener"
    }
}
