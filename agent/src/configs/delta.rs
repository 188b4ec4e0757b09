//! Passes over the changed CECs only ([`ConfigPipeline::configs_pass`]).
//!
//! A full pass walks every CEC in first-come-first-served order (creation
//! time, then what served last, then the key) and settles conflicts on
//! resource names and listener addresses. A CEC's outcome depends only on
//! the CECs before it that share a name or an address with it, so after a
//! change it is enough to re-check the changed CECs and, transitively, the
//! later CECs they share a name or address with: [`IncState`] keeps the
//! conflict tables (name → owner, address → owners in order), the same
//! indexes over every CEC that reached the conflict check (the "users" of
//! a name or address, accepted or not), each CEC's outcome, and the EDS,
//! route and listener counts derived from the accepted ones. The pass
//! returns what changed; the full pass stays for everything else (Service,
//! Secret and slice changes, resyncs, split shared CECs) and rebuilds the
//! state from scratch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use membrane_crds::EnvoyConfigSpec;
use membrane_store::{Kind, Object, ObjectKey, StoreSnapshot};
use membrane_xds::codec::type_url;

use super::users::Users;
use super::{
    Binds, Built, CachedEds, ConfigPipeline, EdsServing, Prepared, empty_eds, selects, static_type,
};
use crate::endpoints::SliceIndex;
use crate::placement::collides;

/// First come, first served: creation time, then whether it served in the
/// previous pass (newcomers last), then the key.
pub(super) type SortKey = (Option<Timestamp>, bool, ObjectKey);

/// A backend selection: namespace, Service, ports (empty: all).
pub(super) type WantKey = (String, String, Vec<String>);

/// One CEC's outcome in the latest pass.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) sort: SortKey,
    /// Its resourceVersion (joined versions for a split CEC's first part).
    pub(super) rv: String,
    /// The version it resolved to (selected, and something to serve).
    pub(super) prepared: Option<Arc<Prepared>>,
    /// The addresses it binds, when it reached the conflict check.
    pub(super) reached: Option<Vec<(String, u32)>>,
    pub(super) accepted: bool,
    /// Placed listeners (accepted only).
    pub(super) listeners: Vec<Built>,
    /// Backend selections (accepted only).
    pub(super) wants: Vec<WantKey>,
    pub(super) rejected: Option<String>,
    pub(super) warning: Option<String>,
}

impl Entry {
    /// Everything it serves: listeners, then routes, clusters, endpoints
    /// and secrets.
    fn resources(&self) -> impl Iterator<Item = &Built> {
        let fixed = match (&self.prepared, self.accepted) {
            (Some(p), true) => p.fixed.as_slice(),
            _ => &[],
        };
        self.listeners.iter().chain(fixed)
    }

    /// What must be ACKed before it counts as served.
    fn served(&self) -> Option<Vec<(&'static str, String)>> {
        if !self.accepted {
            return None;
        }
        let mut out: Vec<(&'static str, String)> = self
            .listeners
            .iter()
            .map(|l| (type_url::LISTENER, l.name.clone()))
            .collect();
        out.extend(
            self.resources()
                .skip(self.listeners.len())
                .filter(|r| r.type_url == type_url::ROUTE || r.type_url == type_url::CLUSTER)
                .map(|r| (static_type(&r.type_url), r.name.clone())),
        );
        Some(out)
    }

    fn names(&self) -> &[(&'static str, String)] {
        match (&self.prepared, &self.reached) {
            (Some(p), Some(_)) => &p.names,
            _ => &[],
        }
    }

    fn binds(&self) -> &[(String, u32)] {
        self.reached.as_deref().unwrap_or_default()
    }

    /// Same conflict-relevant state: accepted or not, names and binds.
    fn same_claims(&self, other: &Entry) -> bool {
        self.accepted == other.accepted
            && self.reached == other.reached
            && match (&self.prepared, &other.prepared) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a.names == b.names,
                (None, None) => true,
                _ => false,
            }
    }
}

/// What register/unregister touched: names whose derived state must be
/// looked at again.
#[derive(Default)]
struct Touched {
    services: BTreeSet<(String, String)>,
    eds_names: BTreeSet<String>,
    routes: BTreeSet<String>,
}

/// The state a pass leaves for the next incremental one.
#[derive(Default)]
pub(super) struct IncState {
    pub(super) entries: HashMap<ObjectKey, Entry>,
    /// Accepted CECs: resource name → owner.
    names: HashMap<(&'static str, String), ObjectKey>,
    /// Accepted CECs: port → owners in order → the addresses they bind.
    binds: HashMap<u32, BTreeMap<SortKey, Vec<String>>>,
    /// Every CEC that reached the conflict check, by name and by address.
    name_users: HashMap<(&'static str, String), Users<SortKey>>,
    bind_users: HashMap<u32, HashMap<String, Users<SortKey>>>,
    /// Counts over the accepted CECs.
    wants: BTreeMap<WantKey, usize>,
    asked: HashMap<String, usize>,
    cec_eds: HashMap<String, usize>,
    routes: HashMap<String, usize>,
    rds_users: HashMap<String, Users<ObjectKey>>,
    pub(super) live: BTreeSet<String>,
    /// Assignments published from Services (and empty ones), by name.
    pub(super) eds_res: HashMap<String, Built>,
    /// CECs whose accepted state flipped and that share a name or address
    /// with a CEC of the same creation time: their order changes in the
    /// next pass, which re-checks them.
    pub(super) flipped: BTreeSet<ObjectKey>,
    /// First parts named by split CEC parts: only full passes join them.
    pub(super) heads: HashSet<ObjectKey>,
    /// XOR of every CEC's (key, resourceVersion) hash.
    pub(super) fingerprint: u64,
}

fn count_up<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: K) {
    *m.entry(k).or_default() += 1;
}

fn count_down<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(c) = m.get_mut(k) {
        *c -= 1;
        if *c == 0 {
            m.remove(k);
        }
    }
}

/// The Service an assignment name (`<ns>/<svc>` or `<ns>/<svc>:<port>`)
/// belongs to.
fn eds_service(name: &str) -> Option<(String, String)> {
    let (ns, rest) = name.split_once('/')?;
    let svc = rest.split(':').next()?;
    (!ns.is_empty() && !svc.is_empty()).then(|| (ns.to_owned(), svc.to_owned()))
}

/// One CEC's `(key, resourceVersion)` for the fingerprint.
pub(super) fn version_hash(key: &ObjectKey, rv: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, rv).hash(&mut h);
    h.finish()
}

/// The backend selections of an accepted CEC (as the full pass wants them).
pub(super) fn wants_of(key: &ObjectKey, spec: &EnvoyConfigSpec, p: &Prepared) -> Vec<WantKey> {
    let default_ns = key.namespace.as_str();
    let ns_of = |ns: &str| {
        if ns.is_empty() {
            default_ns.to_owned()
        } else {
            ns.to_owned()
        }
    };
    let mut out = Vec::new();
    for s in &spec.backend_services {
        out.push((ns_of(&s.namespace), s.name.clone(), s.number.clone()));
    }
    for s in &spec.services {
        let ports = s.ports.iter().map(u16::to_string).collect();
        out.push((ns_of(&s.namespace), s.name.clone(), ports));
    }
    for n in &p.eds_names {
        if let Some((ns, svc, port)) = super::split_eds_name(n) {
            out.push((ns.to_owned(), svc.to_owned(), vec![port.to_owned()]));
        }
    }
    out
}

impl IncState {
    /// A fresh state (a full pass fills it).
    pub(super) fn new(
        fingerprint: u64,
        heads: HashSet<ObjectKey>,
        eds_res: HashMap<String, Built>,
    ) -> Self {
        Self {
            fingerprint,
            heads,
            eds_res,
            ..Self::default()
        }
    }

    fn register(&mut self, key: &ObjectKey, e: &Entry, touched: Option<&mut Touched>) {
        for (t, n) in e.names() {
            self.name_users
                .entry((t, n.clone()))
                .or_default()
                .insert(e.sort.clone());
        }
        for (ip, port) in e.binds() {
            self.bind_users
                .entry(*port)
                .or_default()
                .entry(ip.clone())
                .or_default()
                .insert(e.sort.clone());
        }
        if !e.accepted {
            return;
        }
        let Some(p) = &e.prepared else {
            return;
        };
        for (t, n) in &p.names {
            self.names.insert((t, n.clone()), key.clone());
        }
        for (ip, port) in e.binds() {
            self.binds
                .entry(*port)
                .or_default()
                .entry(e.sort.clone())
                .or_default()
                .push(ip.clone());
        }
        for w in &e.wants {
            *self.wants.entry(w.clone()).or_default() += 1;
        }
        for n in &p.eds_names {
            count_up(&mut self.asked, n.clone());
        }
        for r in &p.fixed {
            if r.type_url == type_url::ENDPOINT {
                count_up(&mut self.cec_eds, r.name.clone());
            } else if r.type_url == type_url::ROUTE {
                count_up(&mut self.routes, r.name.clone());
            }
        }
        for (_, n) in &p.rds {
            self.rds_users
                .entry(n.clone())
                .or_default()
                .insert(key.clone());
        }
        for l in &e.listeners {
            self.live.insert(l.name.clone());
        }
        if let Some(t) = touched {
            t.note(e, p);
        }
    }

    fn unregister(&mut self, key: &ObjectKey, e: &Entry, touched: Option<&mut Touched>) {
        for (t, n) in e.names() {
            let k = (*t, n.clone());
            if let Some(set) = self.name_users.get_mut(&k) {
                set.remove(&e.sort);
                if set.is_empty() {
                    self.name_users.remove(&k);
                }
            }
        }
        for (ip, port) in e.binds() {
            if let Some(by_ip) = self.bind_users.get_mut(port) {
                if let Some(set) = by_ip.get_mut(ip) {
                    set.remove(&e.sort);
                    if set.is_empty() {
                        by_ip.remove(ip);
                    }
                }
                if by_ip.is_empty() {
                    self.bind_users.remove(port);
                }
            }
        }
        if !e.accepted {
            return;
        }
        let Some(p) = &e.prepared else {
            return;
        };
        for (t, n) in &p.names {
            let k = (*t, n.clone());
            if self.names.get(&k) == Some(key) {
                self.names.remove(&k);
            }
        }
        for (_, port) in e.binds() {
            if let Some(m) = self.binds.get_mut(port) {
                m.remove(&e.sort);
                if m.is_empty() {
                    self.binds.remove(port);
                }
            }
        }
        for w in &e.wants {
            if let Some(c) = self.wants.get_mut(w) {
                *c -= 1;
                if *c == 0 {
                    self.wants.remove(w);
                }
            }
        }
        for n in &p.eds_names {
            count_down(&mut self.asked, n);
        }
        for r in &p.fixed {
            if r.type_url == type_url::ENDPOINT {
                count_down(&mut self.cec_eds, &r.name);
            } else if r.type_url == type_url::ROUTE {
                count_down(&mut self.routes, &r.name);
            }
        }
        for (_, n) in &p.rds {
            if let Some(set) = self.rds_users.get_mut(n) {
                set.remove(key);
                if set.is_empty() {
                    self.rds_users.remove(n);
                }
            }
        }
        for l in &e.listeners {
            self.live.remove(&l.name);
        }
        if let Some(t) = touched {
            t.note(e, p);
        }
    }

    /// Takes `key`'s entry out of the tables.
    fn take(&mut self, key: &ObjectKey, touched: &mut Touched) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.unregister(key, &e, Some(touched));
        Some(e)
    }

    /// Insert an entry (from the full pass or an evaluation).
    pub(super) fn put(&mut self, key: ObjectKey, e: Entry) {
        self.register(&key, &e, None);
        self.entries.insert(key, e);
    }

    fn put_touched(&mut self, key: ObjectKey, e: Entry, touched: &mut Touched) {
        self.register(&key, &e, Some(touched));
        self.entries.insert(key, e);
    }

    /// CECs sharing a name or an address with these, ordered after `after`
    /// (all of them when `None`).
    fn overlaps(
        &self,
        after: Option<&SortKey>,
        names: &[(&'static str, String)],
        binds: &[(String, u32)],
    ) -> BTreeSet<SortKey> {
        let range = |set: &Users<SortKey>| set.after(after).to_vec();
        let mut out = BTreeSet::new();
        for (t, n) in names {
            if let Some(set) = self.name_users.get(&(*t, n.clone())) {
                out.extend(range(set));
            }
        }
        for (ip, port) in binds {
            if *port == 0 {
                continue;
            }
            let Some(by_ip) = self.bind_users.get(port) else {
                continue;
            };
            for (bip, set) in by_ip {
                if collides(ip, *port, bip, *port) {
                    out.extend(range(set));
                }
            }
        }
        out
    }

    /// Ports bound by accepted CECs ordered before `sort` (not free for
    /// proxy listeners, as in the full pass).
    fn reserved_before(&self, sort: &SortKey) -> BTreeSet<u16> {
        self.binds
            .iter()
            .filter(|(_, m)| m.keys().next().is_some_and(|first| first < sort))
            .filter_map(|(p, _)| u16::try_from(*p).ok())
            .collect()
    }

    /// The first accepted CEC (in order) binding an address colliding
    /// with `ip:port`.
    /// See `Binds::owner`: the least key among the colliding owners.
    fn bind_owner(&self, ip: &str, port: u32) -> Option<&ObjectKey> {
        self.binds
            .get(&port)?
            .iter()
            .filter(|(_, ips)| ips.iter().any(|b| collides(ip, port, b, port)))
            .map(|(s, _)| &s.2)
            .min()
    }

    /// Settle the accepted-state flips of a pass: a CEC whose flip moves it
    /// among CECs of the same creation time it shares nothing with keeps
    /// its outcome and just takes its new place; the others are re-checked
    /// by the next pass.
    pub(super) fn settle_flips(&mut self, flips: Vec<ObjectKey>) {
        for key in flips {
            let Some(e) = self.entries.get(&key) else {
                continue;
            };
            let next: SortKey = (e.sort.0, !e.accepted, key.clone());
            if next == e.sort {
                continue;
            }
            let tie = self
                .overlaps(None, e.names(), e.binds())
                .iter()
                .any(|s| s.0 == e.sort.0 && s.2 != key);
            if tie {
                self.flipped.insert(key);
                continue;
            }
            let Some(mut e) = self.entries.remove(&key) else {
                continue;
            };
            self.unregister(&key, &e, None);
            e.sort = next;
            self.register(&key, &e, None);
            self.entries.insert(key, e);
        }
    }
}

impl Touched {
    fn note(&mut self, e: &Entry, p: &Prepared) {
        for w in &e.wants {
            self.services.insert((w.0.clone(), w.1.clone()));
        }
        for n in &p.eds_names {
            self.eds_names.insert(n.clone());
        }
        for r in &p.fixed {
            if r.type_url == type_url::ENDPOINT {
                self.eds_names.insert(r.name.clone());
            } else if r.type_url == type_url::ROUTE {
                self.routes.insert(r.name.clone());
            }
        }
    }
}

/// The `(type_url, name)` of what must be ACKed before an object counts as
/// served.
pub type ServedList = Vec<(&'static str, String)>;

/// Result of a pass over the changed CECs: what changed only.
#[derive(Debug, Default)]
pub struct ConfigsPass {
    /// Resources to put into the snapshot (new or with new content).
    pub upserts: Vec<Built>,
    /// `(type_url, name)` of resources no longer served.
    pub removals: Vec<(String, String)>,
    /// New served lists (`None`: no longer served).
    pub served: Vec<(ObjectKey, Option<ServedList>)>,
    /// New rejection state of the objects looked at (`None`: fine).
    pub rejected: Vec<(ObjectKey, Option<String>)>,
    /// New warning state of the objects looked at (`None`: none).
    pub warnings: Vec<(ObjectKey, Option<String>)>,
    /// Objects whose served content may have changed (re-check their ACKs).
    pub touched: Vec<ObjectKey>,
}

impl ConfigsPass {
    /// Fold in the assignments an EndpointSlice/Service change re-rendered
    /// in the same pass (before the CECs were re-checked, so where both
    /// touch one assignment, the CEC pass's content is the newer one).
    pub(super) fn merge_endpoints(&mut self, eds: super::EndpointsPass) {
        let mine: HashSet<(String, String)> = self
            .upserts
            .iter()
            .map(|r| (r.type_url.clone(), r.name.clone()))
            .chain(self.removals.iter().cloned())
            .collect();
        let earlier: Vec<Built> = eds
            .updated
            .into_iter()
            .map(|(_, new)| new)
            .filter(|r| !mine.contains(&(r.type_url.clone(), r.name.clone())))
            .collect();
        self.upserts.splice(0..0, earlier);
        self.rejected.extend(eds.rejected);
    }
}

/// A CEC/CCEC in the store: spec, resourceVersion, creation time.
fn config_of<'s>(
    snap: &'s StoreSnapshot,
    key: &ObjectKey,
) -> Option<(&'s EnvoyConfigSpec, &'s str, Option<Timestamp>, bool)> {
    let obj = snap.get(key)?;
    let (spec, meta) = match obj.as_ref() {
        Object::CiliumEnvoyConfig(c) => (&c.spec.config, &c.metadata),
        Object::CiliumClusterwideEnvoyConfig(c) => (&c.spec.config, &c.metadata),
        _ => return None,
    };
    let part = membrane_ingress::shared_part_of(meta).is_some();
    Some((
        spec,
        meta.resource_version.as_deref().unwrap_or_default(),
        meta.creation_timestamp.as_ref().map(|t| t.0),
        part,
    ))
}

impl ConfigPipeline {
    /// Re-check the CECs in `changed` (plus quarantine changes and pending
    /// flips) and what depends on them. `None` when only a full pass can
    /// do it (the state is then rebuilt by that pass).
    pub(super) fn configs_pass(
        &mut self,
        snap: &StoreSnapshot,
        changed: &BTreeSet<ObjectKey>,
    ) -> Option<ConfigsPass> {
        if self.ports.transparent {
            // Redirect targets are first-come over all CECs.
            return None;
        }
        let inc = self.inc.as_ref()?;
        let mut dirty: BTreeSet<ObjectKey> = changed
            .iter()
            .filter(|k| {
                matches!(
                    k.kind,
                    Kind::CiliumEnvoyConfig | Kind::CiliumClusterwideEnvoyConfig
                )
            })
            .cloned()
            .collect();
        dirty.extend(self.dirty_configs.iter().cloned());
        dirty.extend(inc.flipped.iter().cloned());
        // Split shared CECs are joined by full passes only; a version that
        // defines Secrets shadows Kubernetes Secrets (full pass too).
        let defines_secrets = |p: &Prepared| p.fixed.iter().any(|r| r.type_url == type_url::SECRET);
        for key in &dirty {
            if inc.heads.contains(key) || self.joined.contains_key(key) {
                return None;
            }
            if config_of(snap, key).is_some_and(|c| c.3) {
                return None;
            }
            if inc
                .entries
                .get(key)
                .and_then(|e| e.prepared.as_deref())
                .is_some_and(defines_secrets)
            {
                return None;
            }
        }
        let mut inc = self.inc.take()?;
        let dirty_configs = std::mem::take(&mut self.dirty_configs);
        inc.flipped.clear();
        let mut serving_undo = Vec::new();
        let result = self.configs_inner(snap, &mut inc, &dirty, &mut serving_undo);
        match result {
            Some(pass) => {
                self.inc = Some(inc);
                Some(pass)
            }
            None => {
                // Undo what the full pass reads; it rebuilds the rest.
                for (k, v) in serving_undo.into_iter().rev() {
                    match v {
                        Some(v) => self.serving.insert(k, v),
                        None => self.serving.remove(&k),
                    };
                }
                self.dirty_configs = dirty_configs;
                None
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn configs_inner(
        &mut self,
        snap: &StoreSnapshot,
        inc: &mut IncState,
        dirty: &BTreeSet<ObjectKey>,
        serving_undo: &mut Vec<(ObjectKey, Option<(String, bool, Arc<Prepared>)>)>,
    ) -> Option<ConfigsPass> {
        let defines_secrets = |p: &Prepared| p.fixed.iter().any(|r| r.type_url == type_url::SECRET);
        let mut touched = Touched::default();
        // Old state of every CEC looked at, for the change set.
        let mut old: BTreeMap<ObjectKey, Option<Entry>> = BTreeMap::new();
        let mut queue: BTreeSet<SortKey> = BTreeSet::new();
        // The place each scheduled CEC is to be checked at.
        let mut expect: HashMap<ObjectKey, SortKey> = HashMap::new();
        // CECs already re-checked in this pass.
        let mut done: HashSet<ObjectKey> = HashSet::new();
        let mut fingerprint = inc.fingerprint;
        let mut deleted = Vec::new();
        for key in dirty {
            let prev = inc.take(key, &mut touched);
            let now = config_of(snap, key);
            if let Some(p) = &prev {
                fingerprint ^= version_hash(key, &p.rv);
            }
            let new_sort = now.map(|(_, rv, created, _)| {
                fingerprint ^= version_hash(key, rv);
                (created, !self.serving.contains_key(key), key.clone())
            });
            // A quarantined version that was replaced is forgotten.
            let rv_now = now.map(|c| c.1);
            if self
                .quarantined
                .get(key)
                .is_some_and(|q| Some(q.resource_version.as_str()) != rv_now)
            {
                self.quarantined.remove(key);
            }
            if let Some(p) = &prev {
                let after = match &new_sort {
                    Some(s) if s < &p.sort => s,
                    _ => &p.sort,
                };
                for u in inc.overlaps(Some(after), p.names(), p.binds()) {
                    schedule(&mut queue, &mut expect, &done, u);
                }
            }
            match new_sort {
                Some(s) => {
                    expect.insert(key.clone(), s.clone());
                    queue.insert(s);
                }
                None => deleted.push(key.clone()),
            }
            old.insert(key.clone(), prev);
        }

        while let Some(sort) = queue.pop_first() {
            let key = sort.2.clone();
            if expect.get(&key) != Some(&sort) {
                continue;
            }
            expect.remove(&key);
            if !done.insert(key.clone()) {
                continue;
            }
            if !old.contains_key(&key) {
                let prev = inc.take(&key, &mut touched);
                old.insert(key.clone(), prev);
            }
            // A split CEC's first part serves its joined spec (only ever a
            // dependent here: changed split CECs take the full pass).
            let joined = self.joined.get(&key).cloned();
            let (spec, rv): (&EnvoyConfigSpec, String) = match &joined {
                Some(j) => (j.spec.as_ref(), j.rv.clone()),
                None => match config_of(snap, &key) {
                    Some((spec, rv, _, _)) => (spec, rv.to_owned()),
                    None => continue,
                },
            };
            let mut e = Entry {
                sort: sort.clone(),
                rv: rv.clone(),
                prepared: None,
                reached: None,
                accepted: false,
                listeners: Vec::new(),
                wants: Vec::new(),
                rejected: None,
                warning: None,
            };
            serving_undo.push((key.clone(), self.serving.remove(&key)));
            if selects(spec.node_selector.as_ref(), &self.node_labels) {
                let (prepared, why) = self.resolve(&key, spec, &rv, joined.as_ref());
                e.rejected = why;
                if let Some((p, nacked)) = prepared {
                    if defines_secrets(&p) {
                        return None;
                    }
                    e.prepared = Some(p.clone());
                    let mut sched = Sched {
                        queue: &mut queue,
                        expect: &mut expect,
                        done: &done,
                        old: &mut old,
                        touched: &mut touched,
                    };
                    self.check(snap, inc, &key, spec, &p, nacked, &mut e, &mut sched);
                }
            }
            // Later CECs sharing a name or address see a different owner
            // (or none) when this one's claims changed.
            let same = old
                .get(&key)
                .and_then(|p| p.as_ref())
                .is_some_and(|p| p.same_claims(&e));
            if !same {
                for u in inc.overlaps(Some(&sort), e.names(), e.binds()) {
                    schedule(&mut queue, &mut expect, &done, u);
                }
                if let Some(p) = old.get(&key).and_then(|p| p.as_ref()) {
                    for u in inc.overlaps(Some(&sort), p.names(), p.binds()) {
                        schedule(&mut queue, &mut expect, &done, u);
                    }
                }
            }
            inc.put_touched(key, e, &mut touched);
        }

        for key in &deleted {
            serving_undo.push((key.clone(), self.serving.remove(key)));
            self.parsed.remove(key);
            self.last_good.remove(key);
            self.acked_good.remove(key);
            self.placed.remove(key);
            self.pool_checked.remove(key);
            self.quarantined.remove(key);
        }

        // EDS of the Services whose selections or names changed.
        let mut services = touched.services.clone();
        services.extend(touched.eds_names.iter().filter_map(|n| eds_service(n)));
        if services.iter().any(|(ns, svc)| {
            self.eds_quarantined
                .contains_key(&ObjectKey::new(Kind::Service, ns, svc))
        }) {
            return None;
        }
        let mut out = ConfigsPass::default();
        let mut names: BTreeSet<String> = touched.eds_names.clone();
        self.eds_for(snap, inc, &services, &mut names, &mut out);

        // Resources of the CECs looked at.
        let mut upserts: BTreeMap<(String, String), Built> = BTreeMap::new();
        let mut removals: BTreeSet<(String, String)> = BTreeSet::new();
        for (key, prev) in &old {
            let now = inc.entries.get(key);
            let before: Vec<&Built> = prev.iter().flat_map(|p| p.resources()).collect();
            let after: Vec<&Built> = now.iter().flat_map(|e| e.resources()).collect();
            let unchanged = before.len() == after.len()
                && before
                    .iter()
                    .zip(&after)
                    .all(|(a, b)| super::same_built(a, b));
            if !unchanged {
                for r in before {
                    removals.insert((r.type_url.clone(), r.name.clone()));
                }
                for r in after {
                    upserts.insert((r.type_url.clone(), r.name.clone()), r.clone());
                }
            }
            let was = prev.as_ref().and_then(Entry::served);
            let is = now.and_then(Entry::served);
            if was != is {
                out.served.push((key.clone(), is));
            }
            let was = prev.as_ref().and_then(|p| p.rejected.clone());
            let is = now.and_then(|e| e.rejected.clone());
            if was != is {
                out.rejected.push((key.clone(), is));
            }
            out.touched.push(key.clone());
        }
        // Service-published assignments of the names looked at.
        for n in &names {
            let now = if inc.cec_eds.contains_key(n) {
                None
            } else {
                let published = eds_service(n).and_then(|(ns, svc)| {
                    self.eds_serving
                        .get(&ObjectKey::new(Kind::Service, &ns, &svc))
                        .and_then(|(_, list)| list.iter().find(|r| r.name == *n).cloned())
                });
                match published {
                    Some(b) => Some(b),
                    None if inc.asked.contains_key(n) => {
                        let mut used = HashMap::new();
                        let b = empty_eds(&self.empty_eds, &mut used, n);
                        self.empty_eds.extend(used);
                        Some(b)
                    }
                    None => None,
                }
            };
            let k = (type_url::ENDPOINT.to_owned(), n.clone());
            match (inc.eds_res.get(n), now) {
                (Some(a), Some(b)) if super::same_built(a, &b) => {}
                (_, Some(b)) => {
                    upserts.insert(k, b.clone());
                    inc.eds_res.insert(n.clone(), b);
                }
                (Some(_), None) => {
                    removals.insert(k);
                    inc.eds_res.remove(n);
                }
                (None, None) => {}
            }
        }
        for k in upserts.keys() {
            removals.remove(k);
        }
        out.upserts = upserts.into_values().collect();
        out.removals = removals.into_iter().collect();

        // RDS warnings of the CECs looked at and of those whose routes
        // came or went.
        let mut warn_keys: BTreeSet<ObjectKey> = old.keys().cloned().collect();
        for r in &touched.routes {
            if let Some(users) = inc.rds_users.get(r) {
                warn_keys.extend(users.iter().cloned());
            }
        }
        for key in warn_keys {
            let Some(e) = inc.entries.get_mut(&key) else {
                if old
                    .get(&key)
                    .is_some_and(|p| p.as_ref().is_some_and(|p| p.warning.is_some()))
                {
                    out.warnings.push((key, None));
                }
                continue;
            };
            let warning = match (&e.prepared, e.accepted) {
                (Some(p), true) => p
                    .rds
                    .iter()
                    .find(|(_, n)| !inc.routes.contains_key(n))
                    .map(|(field, name)| super::rds_warning(&key, field, name)),
                _ => None,
            };
            let was = match old.get(&key) {
                Some(p) => p.as_ref().and_then(|p| p.warning.clone()),
                None => e.warning.clone(),
            };
            e.warning = warning.clone();
            if was != warning {
                out.warnings.push((key, warning));
            }
        }

        // Proxy ports of listeners no accepted CEC has any more.
        self.proxy_ports.retain(&inc.live);
        if fingerprint != inc.fingerprint {
            inc.fingerprint = fingerprint;
            self.fingerprint = fingerprint;
            self.retry_soon();
        }
        // Served before this pass: the first undo record of each key.
        let mut was_serving: HashMap<&ObjectKey, bool> = HashMap::new();
        for (k, v) in serving_undo.iter() {
            was_serving.entry(k).or_insert(v.is_some());
        }
        let flips: Vec<ObjectKey> = old
            .keys()
            .filter(|k| {
                let was = was_serving.get(*k).copied().unwrap_or(false);
                let is = inc.entries.get(*k).is_some_and(|e| e.accepted);
                was != is
            })
            .cloned()
            .collect();
        inc.settle_flips(flips);
        Some(out)
    }

    /// Placement and the conflict check of one CEC version at its place in
    /// the order; later accepted CECs it shares a name or address with are
    /// taken out and scheduled (they come after it).
    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        snap: &StoreSnapshot,
        inc: &mut IncState,
        key: &ObjectKey,
        spec: &EnvoyConfigSpec,
        p: &Arc<Prepared>,
        nacked: bool,
        e: &mut Entry,
        sched: &mut Sched<'_>,
    ) {
        if let Some(msg) = self.pool_check(snap, key, spec, p, true) {
            e.rejected = Some(msg);
            return;
        }
        let binds = Binds {
            by_port: HashMap::new(),
            reserved: inc.reserved_before(&e.sort),
        };
        let (listeners, bound) = match self.place_listeners(snap, key, spec, p, &binds, true) {
            Ok(v) => v,
            Err((index, why)) => {
                e.rejected = Some(format!("{key}: spec.resources[{index}]: {why}"));
                return;
            }
        };
        let addrs: Vec<(String, u32)> = bound
            .iter()
            .map(|(_, _, ip, port)| (ip.clone(), *port))
            .collect();
        // Later accepted CECs sharing a claim are re-checked after this one.
        for u in inc.overlaps(Some(&e.sort), &p.names, &addrs) {
            let accepted = inc
                .entries
                .get(&u.2)
                .is_some_and(|x| x.accepted && x.sort == u);
            if accepted && !sched.old.contains_key(&u.2) {
                let x = inc.take(&u.2, sched.touched);
                sched.old.insert(u.2.clone(), x);
            }
            schedule(sched.queue, sched.expect, sched.done, u);
        }
        e.reached = Some(addrs);
        let mut msg = None;
        for (index, listener, ip, port) in &bound {
            if let Some(owner) = inc.bind_owner(ip, *port) {
                msg = Some(format!(
                    "{key}: spec.resources[{index}] (listener {listener}): address {ip}:{port} is already used by {owner}"
                ));
                break;
            }
        }
        if msg.is_none() {
            for (t, n) in &p.names {
                if let Some(owner) = inc.names.get(&(*t, n.clone())) {
                    msg = Some(format!(
                        "{key}: spec.resources: resource {n} is already defined by {owner}"
                    ));
                    break;
                }
            }
        }
        match msg {
            Some(m) => e.rejected = Some(m),
            None => {
                e.accepted = true;
                e.listeners = listeners;
                e.wants = wants_of(key, spec, p);
                self.serving
                    .insert(key.clone(), (e.rv.clone(), nacked, p.clone()));
            }
        }
    }

    /// Recompute the published assignments of `services` as the full pass
    /// would; adds the names they published before and now to `names`.
    fn eds_for(
        &mut self,
        snap: &StoreSnapshot,
        inc: &IncState,
        services: &BTreeSet<(String, String)>,
        names: &mut BTreeSet<String>,
        out: &mut ConfigsPass,
    ) {
        let keys: Vec<ObjectKey> = self
            .slices_of(services.iter().map(|(n, s)| (n.as_str(), s.as_str())))
            .into_iter()
            .cloned()
            .collect();
        let mut index: Option<SliceIndex> = None;
        for (ns, svc) in services {
            let svc_key = ObjectKey::new(Kind::Service, ns, svc);
            if let Some((_, list)) = self.eds_serving.get(&svc_key) {
                names.extend(list.iter().map(|r| r.name.clone()));
            }
            let from = (ns.clone(), svc.clone(), Vec::new());
            let selections: Vec<Vec<String>> = inc
                .wants
                .range(from..)
                .take_while(|((n, s, _), _)| n == ns && s == svc)
                .map(|((_, _, ports), _)| ports.clone())
                .collect();
            // Selections nobody wants any more are dropped from the cache.
            if let Some(by_ports) = self.eds.get_mut(ns).and_then(|m| m.get_mut(svc)) {
                by_ports.retain(|ports, _| selections.contains(ports));
            }
            let mut serving: Option<EdsServing> = None;
            let mut used: HashSet<String> = HashSet::new();
            for ports in &selections {
                let cached = self
                    .eds
                    .get(ns)
                    .and_then(|m| m.get(svc))
                    .is_some_and(|m| m.contains_key(ports));
                if !cached {
                    let index = index.get_or_insert_with(|| {
                        SliceIndex::with_validator_for(snap, &self.validator, &keys)
                    });
                    let resources = index
                        .assignments(snap, ns, svc, ports)
                        .into_iter()
                        .map(|cla| super::built(cla.cluster_name.clone(), super::to_any(&cla)))
                        .collect();
                    let inputs = index.inputs(snap, ns, svc);
                    self.eds
                        .entry(ns.clone())
                        .or_default()
                        .entry(svc.clone())
                        .or_default()
                        .insert(
                            ports.clone(),
                            CachedEds {
                                inputs,
                                resources,
                                generation: self.generation,
                            },
                        );
                }
                let Some(c) = self
                    .eds
                    .get(ns)
                    .and_then(|m| m.get(svc))
                    .and_then(|m| m.get(ports))
                else {
                    continue;
                };
                let entry = serving.get_or_insert_with(|| (c.inputs.clone(), Vec::new()));
                for r in &c.resources {
                    if inc.cec_eds.contains_key(&r.name) || !used.insert(r.name.clone()) {
                        continue;
                    }
                    entry.1.push(r.clone());
                }
            }
            if let Some(m) = self.eds.get_mut(ns) {
                if m.get(svc).is_some_and(|b| b.is_empty()) {
                    m.remove(svc);
                }
                if m.is_empty() {
                    self.eds.remove(ns);
                }
            }
            let served_names: Option<Vec<(&'static str, String)>> =
                serving.as_ref().and_then(|(_, list)| {
                    let v: Vec<(&'static str, String)> = list
                        .iter()
                        .filter(|r| inc.asked.contains_key(&r.name))
                        .map(|r| (type_url::ENDPOINT, r.name.clone()))
                        .collect();
                    (!v.is_empty()).then_some(v)
                });
            match serving {
                Some(s) => {
                    names.extend(s.1.iter().map(|r| r.name.clone()));
                    self.eds_serving.insert(svc_key.clone(), s);
                }
                None => {
                    self.eds_serving.remove(&svc_key);
                    self.eds_acked.remove(&svc_key);
                    self.eds_quarantined.remove(&svc_key);
                }
            }
            out.served.push((svc_key.clone(), served_names));
            out.touched.push(svc_key);
        }
    }
}

/// The re-check schedule of a pass, and the old state of what it took out.
struct Sched<'a> {
    queue: &'a mut BTreeSet<SortKey>,
    expect: &'a mut HashMap<ObjectKey, SortKey>,
    done: &'a HashSet<ObjectKey>,
    old: &'a mut BTreeMap<ObjectKey, Option<Entry>>,
    touched: &'a mut Touched,
}

/// Schedule a later CEC to be re-checked at its place (once).
fn schedule(
    queue: &mut BTreeSet<SortKey>,
    expect: &mut HashMap<ObjectKey, SortKey>,
    done: &HashSet<ObjectKey>,
    u: SortKey,
) {
    if done.contains(&u.2) || expect.contains_key(&u.2) {
        return;
    }
    expect.insert(u.2.clone(), u.clone());
    queue.insert(u);
}
