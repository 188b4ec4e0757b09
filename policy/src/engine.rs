//! Endpoints + policies → identities, ipcache, per-endpoint map entries;
//! the reference evaluator and `trace`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::identity::{ANY_IDENTITY, Identities, IdentityInfo, IdentityKind, IpCache, Reserved};
use crate::labels::{LabelSet, Selector};
use crate::rules::{Direction, L4, Peer, PolicyKind, PolicySet, Rule, RuleRef};

/// A named container port of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

/// A pod (or any workload) on this node or elsewhere in the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Node-local endpoint id (datapath map partition); 0 = not local.
    pub id: u32,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub named_ports: Vec<NamedPort>,
}

/// What the policy engine needs to know about the cluster.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Namespace name → its labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub endpoints: Vec<Endpoint>,
    /// This node's addresses (identity `host`).
    pub host_ips: Vec<IpAddr>,
    /// Other nodes' addresses (identity `remote-node`).
    pub remote_node_ips: Vec<IpAddr>,
    /// Cilium's `allow-localhost`: the host may always reach local endpoints.
    pub allow_localhost: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

/// Why a direction decided as it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// An allow or deny rule matched.
    Rule(RuleRef),
    /// Nothing matched and this rule put the direction into default deny.
    DefaultDeny(RuleRef),
    /// No rule with this direction selects the endpoint.
    NotEnforced,
    /// The host reaching a local endpoint (`allow-localhost`).
    Localhost,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Rule(r) => write!(f, "{r}"),
            Reason::DefaultDeny(r) => write!(
                f,
                "default deny ({} selects the endpoint for {})",
                r.policy(),
                if r.section.starts_with("ingress") {
                    "ingress"
                } else {
                    "egress"
                }
            ),
            Reason::NotEnforced => write!(f, "no policy selects the endpoint in this direction"),
            Reason::Localhost => write!(f, "allow-localhost (the host reaches local endpoints)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

/// The L4 key space of the policy map: `proto << 16 | port` (the ICMP type
/// in the port's place), 24 bits, so one prefix can say "every protocol",
/// "every port of TCP" or "TCP 80..=95".
pub const L4_BITS: u8 = 24;
const L4_MAX: u32 = (1 << L4_BITS) - 1;

pub fn l4_key(proto: u8, port: u16) -> u32 {
    ((proto as u32) << 16) | port as u32
}

/// One policy map entry of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    pub direction: Direction,
    /// Peer identity, or [`ANY_IDENTITY`].
    pub identity: u32,
    /// `proto << 16 | port`, masked to `prefix_len` leading bits of 24.
    pub l4: u32,
    pub prefix_len: u8,
    pub deny: bool,
}

/// The compiled policy of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub endpoint_id: u32,
    pub identity: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: Vec<PolicyEntry>,
}

impl EndpointPolicy {
    /// The datapath's decision, computed exactly as bpf/policy.c does:
    /// longest-prefix match for the peer's identity and for ANY; a deny in
    /// either wins, then an allow in either, then the direction's default.
    pub fn lookup(&self, dir: Direction, identity: u32, proto: u8, port: u16) -> Verdict {
        let key = l4_key(proto, port);
        let lpm = |id: u32| -> Option<bool> {
            self.entries
                .iter()
                .filter(|e| {
                    e.direction == dir && e.identity == id && mask(key, e.prefix_len) == e.l4
                })
                .max_by_key(|e| e.prefix_len)
                .map(|e| e.deny)
        };
        let a = lpm(identity);
        let b = lpm(ANY_IDENTITY);
        if a == Some(true) || b == Some(true) {
            return Verdict::Deny;
        }
        if a == Some(false) || b == Some(false) {
            return Verdict::Allow;
        }
        let enforced = match dir {
            Direction::Ingress => self.ingress_enforced,
            Direction::Egress => self.egress_enforced,
        };
        if enforced {
            Verdict::Deny
        } else {
            Verdict::Allow
        }
    }
}

fn mask(v: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        v & (L4_MAX << (L4_BITS - len)) & L4_MAX
    }
}

/// Sorted, disjoint, non-adjacent inclusive intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Intervals(Vec<(u32, u32)>);

impl Intervals {
    pub fn add(&mut self, lo: u32, hi: u32) {
        self.0.push((lo, hi));
        self.0.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(self.0.len());
        for &(l, h) in &self.0 {
            match out.last_mut() {
                Some(last) if l <= last.1.saturating_add(1) => last.1 = last.1.max(h),
                _ => out.push((l, h)),
            }
        }
        self.0 = out;
    }

    pub fn subtract(&self, other: &Intervals) -> Intervals {
        let mut out = Vec::new();
        for &(mut l, h) in &self.0 {
            let mut done = false;
            for &(ol, oh) in &other.0 {
                if oh < l || ol > h {
                    continue;
                }
                if ol > l {
                    out.push((l, ol - 1));
                }
                if oh >= h {
                    done = true;
                    break;
                }
                l = oh + 1;
            }
            if !done {
                out.push((l, h));
            }
        }
        Intervals(out)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Minimal prefixes (value, length over 24 bits) covering the set.
    pub fn prefixes(&self) -> Vec<(u32, u8)> {
        let mut out = Vec::new();
        for &(lo, hi) in &self.0 {
            let mut lo = lo as u64;
            let hi = hi as u64;
            while lo <= hi {
                let mut k = 0u32;
                while k < L4_BITS as u32 {
                    let size = 1u64 << (k + 1);
                    if !lo.is_multiple_of(size) || lo + size - 1 > hi {
                        break;
                    }
                    k += 1;
                }
                out.push((lo as u32, L4_BITS - k as u8));
                lo += 1u64 << k;
            }
        }
        out
    }
}

/// Identities, ipcache and policies resolved against one cluster state.
pub struct State {
    pub identities: Identities,
    pub ipcache: IpCache,
    pub policies: PolicySet,
    endpoints: Vec<(Endpoint, u32)>,
    /// Per rule: matches every peer, or these identities.
    rule_peers: Vec<Arc<(bool, BTreeSet<u32>)>>,
    /// Per endpoint identity: the rules whose subject selects it, in order
    /// (what `compile` walks; the reference evaluator scans every rule).
    rules_of: HashMap<u32, Vec<usize>>,
    allow_localhost: bool,
    all_named: Vec<NamedPort>,
    /// Resolved peer lists and subjects, kept for the next build.
    peer_sets: HashMap<Vec<Peer>, Arc<(bool, BTreeSet<u32>)>>,
    subject_sets: HashMap<Selector, Arc<BTreeSet<u32>>>,
    /// Identities of the endpoints `subject_sets` was resolved over.
    ep_ids: BTreeSet<u32>,
}

impl State {
    /// Allocates identities (reusing those in `ids`), fills the ipcache and
    /// resolves every rule's peers.
    pub fn build(cluster: &Cluster, policies: PolicySet, ids: Identities) -> State {
        Self::build_with(cluster, policies, ids, None)
    }

    /// Like [`State::build`], reusing what `prev` resolved: a peer list or
    /// subject seen before is only matched against the identities (resp.
    /// endpoint identities) that are new since, instead of all of them.
    /// Identities never change their labels, so this equals a fresh build
    /// (checked by the property tests); if `prev`'s identities are not a
    /// subset of `ids`, everything is resolved afresh.
    pub fn build_with(
        cluster: &Cluster,
        policies: PolicySet,
        mut ids: Identities,
        prev: Option<&State>,
    ) -> State {
        let empty = BTreeMap::new();
        let mut ipcache = IpCache::with_world();
        for rule in &policies.rules {
            for p in &rule.peers {
                if let Peer::Cidr { net, except } = p {
                    for n in std::iter::once(net).chain(except) {
                        if n.prefix_len() > 0 {
                            let id = ids.cidr(*n);
                            ipcache.insert(*n, id);
                        }
                    }
                }
            }
        }
        let mut endpoints = Vec::new();
        let mut all_named = BTreeSet::new();
        for ep in &cluster.endpoints {
            let nl = cluster.namespaces.get(&ep.namespace).unwrap_or(&empty);
            let labels = LabelSet::for_pod(&ep.namespace, &ep.labels, nl);
            let id = ids.endpoint(&labels);
            for ip in &ep.ips {
                ipcache.insert_ip(*ip, id);
            }
            all_named.extend(ep.named_ports.iter().cloned());
            endpoints.push((ep.clone(), id));
        }
        for ip in &cluster.remote_node_ips {
            ipcache.insert_ip(*ip, Reserved::RemoteNode.id());
        }
        for ip in &cluster.host_ips {
            ipcache.insert_ip(*ip, Reserved::Host.id());
        }
        // Reuse `prev` only if every identity it knew is still here,
        // unchanged; then only identities added since need matching.
        let prev = prev.filter(|p| {
            p.identities
                .iter()
                .all(|i| ids.get(i.id).is_some_and(|n| n == i))
        });
        let added: Vec<&IdentityInfo> = match prev {
            Some(p) => ids
                .iter()
                .filter(|i| p.identities.get(i.id).is_none())
                .collect(),
            None => ids.iter().collect(),
        };
        // Selector caches: identical peer lists and identical subjects are
        // resolved once (policies repeat them a lot).
        let mut peer_cache: HashMap<&[Peer], Arc<(bool, BTreeSet<u32>)>> = HashMap::new();
        let mut rule_peers = Vec::with_capacity(policies.rules.len());
        for r in &policies.rules {
            let set = peer_cache
                .entry(r.peers.as_slice())
                .or_insert_with(|| {
                    if r.peers.contains(&Peer::All) {
                        return Arc::new((true, BTreeSet::new()));
                    }
                    let matches =
                        |info: &IdentityInfo| r.peers.iter().any(|p| peer_matches(p, info));
                    match prev.and_then(|p| p.peer_sets.get(r.peers.as_slice())) {
                        Some(old) => {
                            let new: Vec<u32> =
                                added.iter().filter(|i| matches(i)).map(|i| i.id).collect();
                            if new.is_empty() {
                                return old.clone();
                            }
                            let mut set = old.1.clone();
                            set.extend(new);
                            Arc::new((false, set))
                        }
                        None => {
                            let set = ids
                                .iter()
                                .filter(|i| matches(i))
                                .map(|info| info.id)
                                .collect();
                            Arc::new((false, set))
                        }
                    }
                })
                .clone();
            rule_peers.push(set);
        }
        let ep_ids: BTreeSet<u32> = endpoints.iter().map(|(_, id)| *id).collect();
        let new_ep_ids: Vec<u32> = match prev {
            Some(p) => ep_ids.difference(&p.ep_ids).copied().collect(),
            None => ep_ids.iter().copied().collect(),
        };
        let mut subject_cache: HashMap<&Selector, Arc<BTreeSet<u32>>> = HashMap::new();
        let mut rules_of: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, r) in policies.rules.iter().enumerate() {
            let matched = subject_cache.entry(&r.subject).or_insert_with(|| {
                let matches = |id: &u32| {
                    ids.get(*id)
                        .is_some_and(|info| r.subject.matches(&info.labels))
                };
                match prev.and_then(|p| p.subject_sets.get(&r.subject)) {
                    Some(old) => {
                        // Endpoint identities that left drop out; new ones
                        // are matched.
                        let mut set: BTreeSet<u32> = old
                            .iter()
                            .copied()
                            .filter(|id| ep_ids.contains(id))
                            .collect();
                        set.extend(new_ep_ids.iter().copied().filter(matches));
                        if set == **old {
                            old.clone()
                        } else {
                            Arc::new(set)
                        }
                    }
                    None => Arc::new(ep_ids.iter().copied().filter(matches).collect()),
                }
            });
            for id in matched.iter() {
                rules_of.entry(*id).or_default().push(i);
            }
        }
        let peer_sets = peer_cache
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v))
            .collect();
        let subject_sets = subject_cache
            .into_iter()
            .map(|(k, v)| (k.clone(), v))
            .collect();
        State {
            identities: ids,
            ipcache,
            policies,
            endpoints,
            rule_peers,
            rules_of,
            allow_localhost: cluster.allow_localhost,
            all_named: all_named.into_iter().collect(),
            peer_sets,
            subject_sets,
            ep_ids,
        }
    }

    pub fn endpoints(&self) -> impl Iterator<Item = (&Endpoint, u32)> {
        self.endpoints.iter().map(|(e, id)| (e, *id))
    }

    fn endpoint(&self, ep_id: u32) -> Option<(&Endpoint, u32)> {
        self.endpoints
            .iter()
            .find(|(e, _)| e.id == ep_id)
            .map(|(e, id)| (e, *id))
    }

    fn labels(&self, identity: u32) -> Option<&LabelSet> {
        self.identities.get(identity).map(|i| &i.labels)
    }

    fn selecting<'a>(
        &'a self,
        identity: u32,
        dir: Direction,
    ) -> impl Iterator<Item = (usize, &'a Rule)> + 'a {
        let labels = self.labels(identity).cloned().unwrap_or_default();
        self.policies
            .rules
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.direction == dir && r.subject.matches(&labels))
            .map(|(i, r)| (i, &**r))
    }

    /// The rule that put `dir` of this identity into default deny, if any.
    fn enforced_by(&self, identity: u32, dir: Direction) -> Option<&RuleRef> {
        let labels = self.labels(identity)?;
        self.policies
            .enforcements
            .iter()
            .find(|e| e.direction == dir && e.default_deny && e.subject.matches(labels))
            .map(|e| &e.origin)
    }

    fn named(&self, ep: &Endpoint, dir: Direction) -> Vec<NamedPort> {
        match dir {
            // Ingress: the endpoint's own ports; egress: any destination's.
            Direction::Ingress => ep.named_ports.clone(),
            Direction::Egress => self.all_named.clone(),
        }
    }

    /// The reference evaluator: walks the rules for one packet.
    pub fn evaluate(
        &self,
        ep_id: u32,
        dir: Direction,
        peer: u32,
        proto: u8,
        port: u16,
    ) -> Option<Decision> {
        let (ep, identity) = self.endpoint(ep_id)?;
        let named = self.named(ep, dir);
        let info = self.identities.get(peer);
        // Deliberately independent of the resolved peer sets `compile`
        // uses: every rule's peers are matched against the identity here.
        let matches = |_: usize, r: &Rule| {
            let peer_ok = info.is_some_and(|inf| r.peers.iter().any(|p| peer_matches(p, inf)));
            peer_ok && l4_matches(r.l4.as_deref(), proto, port, &named)
        };
        let rules: Vec<(usize, &Rule)> = self.selecting(identity, dir).collect();
        for (i, r) in rules.iter().filter(|(_, r)| r.deny) {
            if matches(*i, r) {
                return Some(Decision {
                    verdict: Verdict::Deny,
                    reason: Reason::Rule(r.origin.clone()),
                });
            }
        }
        for (i, r) in rules.iter().filter(|(_, r)| !r.deny) {
            if matches(*i, r) {
                return Some(Decision {
                    verdict: Verdict::Allow,
                    reason: Reason::Rule(r.origin.clone()),
                });
            }
        }
        if self.allow_localhost && dir == Direction::Ingress && peer == Reserved::Host.id() {
            return Some(Decision {
                verdict: Verdict::Allow,
                reason: Reason::Localhost,
            });
        }
        Some(match self.enforced_by(identity, dir) {
            Some(r) => Decision {
                verdict: Verdict::Deny,
                reason: Reason::DefaultDeny(r.clone()),
            },
            None => Decision {
                verdict: Verdict::Allow,
                reason: Reason::NotEnforced,
            },
        })
    }

    /// The policy map entries of one endpoint.
    pub fn compile(&self, ep_id: u32) -> Option<EndpointPolicy> {
        let (ep, identity) = self.endpoint(ep_id)?;
        let mut entries = Vec::new();
        for dir in [Direction::Ingress, Direction::Egress] {
            let named = self.named(ep, dir);
            let mut allow: BTreeMap<u32, Intervals> = BTreeMap::new();
            let mut deny: BTreeMap<u32, Intervals> = BTreeMap::new();
            let indexed = self
                .rules_of
                .get(&identity)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for &i in indexed {
                let r = &self.policies.rules[i];
                if r.direction != dir {
                    continue;
                }
                let l4 = l4_intervals(r.l4.as_deref(), &named);
                if l4.is_empty() {
                    continue;
                }
                let (any, ids) = &*self.rule_peers[i];
                let target = if r.deny { &mut deny } else { &mut allow };
                let idents: Vec<u32> = if *any {
                    vec![ANY_IDENTITY]
                } else {
                    ids.iter().copied().collect()
                };
                for id in idents {
                    let set = target.entry(id).or_default();
                    for &(l, h) in &l4.0 {
                        set.add(l, h);
                    }
                }
            }
            if self.allow_localhost && dir == Direction::Ingress {
                allow.entry(Reserved::Host.id()).or_default().add(0, L4_MAX);
            }
            for (id, d) in &deny {
                for (v, len) in d.prefixes() {
                    entries.push(PolicyEntry {
                        direction: dir,
                        identity: *id,
                        l4: v,
                        prefix_len: len,
                        deny: true,
                    });
                }
            }
            for (id, a) in &allow {
                let a = match deny.get(id) {
                    Some(d) => a.subtract(d),
                    None => a.clone(),
                };
                for (v, len) in a.prefixes() {
                    entries.push(PolicyEntry {
                        direction: dir,
                        identity: *id,
                        l4: v,
                        prefix_len: len,
                        deny: false,
                    });
                }
            }
        }
        Some(EndpointPolicy {
            endpoint_id: ep_id,
            identity,
            ingress_enforced: self.enforced_by(identity, Direction::Ingress).is_some(),
            egress_enforced: self.enforced_by(identity, Direction::Egress).is_some(),
            entries,
        })
    }

    /// Local endpoints whose compiled policy may differ from what `old`
    /// compiled for them: new endpoints, those whose identity or named
    /// ports changed, and those a changed rule or enforcement selects. A
    /// rule counts as changed when its text or its resolved peer set did,
    /// so an identity that appears or goes reaches exactly the endpoints
    /// with rules referring to it. Endpoints outside the result compile
    /// exactly as before and need no map writes.
    pub fn changed_endpoints<'a>(&'a self, old: &'a State) -> BTreeSet<u32> {
        let local = || self.endpoints.iter().filter(|(e, _)| e.id != 0);
        if self.allow_localhost != old.allow_localhost {
            return local().map(|(e, _)| e.id).collect();
        }
        let before: HashMap<u32, (&Endpoint, u32)> = old
            .endpoints
            .iter()
            .filter(|(e, _)| e.id != 0)
            .map(|(e, id)| (e.id, (e, *id)))
            .collect();
        let mut out = BTreeSet::new();
        for (e, ident) in local() {
            match before.get(&e.id) {
                Some((o, oi)) if oi == ident && o.named_ports == e.named_ports => {}
                _ => {
                    out.insert(e.id);
                }
            }
        }
        // Rules come in contiguous runs per policy object: a run equal to
        // the same object's run before (text and resolved peers) changes
        // nothing; otherwise every subject of the object's runs, before
        // and after, is affected.
        type Runs<'a> = HashMap<(PolicyKind, Option<&'a str>, &'a str), Vec<(usize, usize)>>;
        let runs = |rules: &'a [Arc<Rule>]| {
            let mut m: Runs<'a> = HashMap::new();
            for (k, r) in rule_runs(rules) {
                m.entry(k).or_default().push(r);
            }
            m
        };
        let (old_runs, new_runs) = (runs(&old.policies.rules), runs(&self.policies.rules));
        let mut subjects: BTreeSet<&Selector> = BTreeSet::new();
        for (key, now) in &new_runs {
            let before = old_runs.get(key).map(Vec::as_slice).unwrap_or(&[]);
            // (Two objects of one name only come from files; their runs
            // are compared in order.)
            let same = now.len() == before.len()
                && now.iter().zip(before).all(|(&(lo, hi), &(olo, ohi))| {
                    ohi - olo == hi - lo
                        && (lo..hi).zip(olo..ohi).all(|(i, j)| {
                            (Arc::ptr_eq(&self.policies.rules[i], &old.policies.rules[j])
                                || self.policies.rules[i] == old.policies.rules[j])
                                && (Arc::ptr_eq(&self.rule_peers[i], &old.rule_peers[j])
                                    || self.rule_peers[i] == old.rule_peers[j])
                        })
                });
            if !same {
                for &(lo, hi) in now {
                    subjects.extend(self.policies.rules[lo..hi].iter().map(|r| &r.subject));
                }
                for &(lo, hi) in before {
                    subjects.extend(old.policies.rules[lo..hi].iter().map(|r| &r.subject));
                }
            }
        }
        for (key, before) in &old_runs {
            if !new_runs.contains_key(key) {
                for &(lo, hi) in before {
                    subjects.extend(old.policies.rules[lo..hi].iter().map(|r| &r.subject));
                }
            }
        }
        let mut enf: HashMap<&crate::rules::Enforcement, i64> = HashMap::new();
        for e in &self.policies.enforcements {
            *enf.entry(e).or_default() += 1;
        }
        for e in &old.policies.enforcements {
            *enf.entry(e).or_default() -= 1;
        }
        subjects.extend(
            enf.into_iter()
                .filter(|(_, n)| *n != 0)
                .map(|(e, _)| &e.subject),
        );
        // Egress named ports resolve against every endpoint's ports.
        let named_changed = self.all_named != old.all_named;
        let mut by_identity: HashMap<u32, bool> = HashMap::new();
        for (e, ident) in local() {
            if out.contains(&e.id) {
                continue;
            }
            let hit = *by_identity.entry(*ident).or_insert_with(|| {
                let Some(labels) = self.labels(*ident) else {
                    return true;
                };
                subjects.iter().any(|s| s.matches(labels))
                    || (named_changed
                        && self.rules_of.get(ident).is_some_and(|rs| {
                            rs.iter().any(|&i| {
                                let r = &self.policies.rules[i];
                                r.direction == Direction::Egress
                                    && r.l4.as_deref().is_some_and(|l| {
                                        l.iter().any(|x| matches!(x, L4::Named { .. }))
                                    })
                            })
                        }))
            });
            if hit {
                out.insert(e.id);
            }
        }
        out
    }

    /// Both ends of a packet: the source endpoint's egress (if the source
    /// is a known endpoint) and the destination's ingress.
    pub fn trace(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Trace {
        self.trace_ends(TraceEnd::Ip(src), TraceEnd::Ip(dst), proto, port)
    }

    /// Like [`State::trace`], each end an address or a known endpoint.
    pub fn trace_ends(&self, src: TraceEnd, dst: TraceEnd, proto: u8, port: u16) -> Trace {
        // (endpoint id if local, identity)
        let resolve = |e: TraceEnd| -> (Option<u32>, u32) {
            match e {
                TraceEnd::Ip(ip) => (
                    self.endpoints
                        .iter()
                        .find(|(ep, _)| ep.ips.contains(&ip))
                        .map(|(ep, _)| ep.id),
                    self.ipcache.lookup(ip),
                ),
                TraceEnd::Endpoint(id) => match self.endpoint(id) {
                    Some((_, ident)) => (Some(id), ident),
                    None => (None, 0),
                },
            }
        };
        let (src_ep, src_id) = resolve(src);
        let (dst_ep, dst_id) = resolve(dst);
        let egress = src_ep.and_then(|e| self.evaluate(e, Direction::Egress, dst_id, proto, port));
        let ingress =
            dst_ep.and_then(|e| self.evaluate(e, Direction::Ingress, src_id, proto, port));
        let verdict = if [&egress, &ingress]
            .iter()
            .any(|d| d.as_ref().is_some_and(|d| d.verdict == Verdict::Deny))
        {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
        Trace {
            src_identity: src_id,
            dst_identity: dst_id,
            egress,
            ingress,
            verdict,
        }
    }
}

/// Runs of consecutive rules from one policy object: (kind, namespace,
/// name) → index range.
fn rule_runs(
    rules: &[Arc<Rule>],
) -> impl Iterator<Item = ((PolicyKind, Option<&str>, &str), (usize, usize))> + '_ {
    fn key(r: &Rule) -> (PolicyKind, Option<&str>, &str) {
        (
            r.origin.kind,
            r.origin.namespace.as_deref(),
            r.origin.name.as_str(),
        )
    }
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = rules.get(i)?;
        let k = key(first);
        let lo = i;
        while rules.get(i).is_some_and(|r| key(r) == k) {
            i += 1;
        }
        Some((k, (lo, i)))
    })
}

/// One end of a traced packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceEnd {
    Ip(IpAddr),
    /// A known endpoint, by id.
    Endpoint(u32),
}

/// What `trace` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub egress: Option<Decision>,
    pub ingress: Option<Decision>,
    pub verdict: Verdict,
}

/// The deciding rule: the first direction that denied, else the ingress
/// decision, else the egress one.
impl Trace {
    pub fn deciding(&self) -> Option<&Decision> {
        let denied = [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .find(|d| d.verdict == Verdict::Deny);
        denied.or(self.ingress.as_ref()).or(self.egress.as_ref())
    }
}

/// Does `peer` select identity `info`?
pub fn peer_matches(peer: &Peer, info: &IdentityInfo) -> bool {
    match peer {
        Peer::All => true,
        Peer::Endpoints(sel) => sel.matches(&info.labels),
        Peer::Reserved(r) => info.id == r.id(),
        Peer::Cluster => !info.is_world(),
        Peer::World(fam) => {
            info.is_world()
                && match (fam, &info.kind) {
                    (None, _) => true,
                    (Some(4), IdentityKind::Reserved(r)) => *r != Reserved::WorldIpv6,
                    (Some(6), IdentityKind::Reserved(r)) => *r != Reserved::WorldIpv4,
                    (Some(4), IdentityKind::Cidr(n)) => matches!(n, IpNet::V4(_)),
                    (Some(6), IdentityKind::Cidr(n)) => matches!(n, IpNet::V6(_)),
                    _ => false,
                }
        }
        Peer::Cidr { net, except } => match &info.kind {
            IdentityKind::Cidr(p) => net.contains(p) && !except.iter().any(|e| e.contains(p)),
            // The remainder of the world: only a /0 covers it.
            IdentityKind::Reserved(r) if r.is_world() && net.prefix_len() == 0 => matches!(
                (r, net),
                (Reserved::WorldIpv4, IpNet::V4(_))
                    | (Reserved::WorldIpv6, IpNet::V6(_))
                    | (Reserved::World, _)
            ),
            _ => false,
        },
    }
}

fn named_ports<'a>(
    protos: &'a [u8],
    name: &'a str,
    named: &'a [NamedPort],
) -> impl Iterator<Item = &'a NamedPort> + 'a {
    named
        .iter()
        .filter(move |n| n.name == name && protos.contains(&n.proto))
}

fn l4_matches(l4: Option<&[L4]>, proto: u8, port: u16, named: &[NamedPort]) -> bool {
    let Some(l4) = l4 else { return true };
    l4.iter().any(|x| match x {
        L4::Ports { protos, lo, hi } => protos.contains(&proto) && *lo <= port && port <= *hi,
        L4::Named { protos, name } => {
            named_ports(protos, name, named).any(|n| n.proto == proto && n.port == port)
        }
        L4::Icmp {
            proto: p,
            icmp_type,
        } => *p == proto && *icmp_type as u16 == port,
    })
}

fn l4_intervals(l4: Option<&[L4]>, named: &[NamedPort]) -> Intervals {
    let mut s = Intervals::default();
    let Some(l4) = l4 else {
        s.add(0, L4_MAX);
        return s;
    };
    for x in l4 {
        match x {
            L4::Ports { protos, lo, hi } => {
                for p in protos {
                    s.add(l4_key(*p, *lo), l4_key(*p, *hi));
                }
            }
            L4::Named { protos, name } => {
                for n in named_ports(protos, name, named) {
                    s.add(l4_key(n.proto, n.port), l4_key(n.proto, n.port));
                }
            }
            L4::Icmp { proto, icmp_type } => {
                let k = l4_key(*proto, *icmp_type as u16);
                s.add(k, k);
            }
        }
    }
    s
}
