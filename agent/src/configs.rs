//! The config pipeline: all CECs/CCECs in the store (including the ones the
//! Ingress controller generated) → one consistent set of Envoy resources.
//!
//! Each CEC is decoded and encoded once per resourceVersion; its listeners
//! are re-encoded only when their placement changes, and EDS only when the
//! Service or its EndpointSlices change, so a pass over an unchanged store
//! shares every resource with the previous one. A CEC that fails is
//! rejected whole; its last good version keeps serving and no other CEC is
//! affected. Conflicts between CECs (same listener address, same resource
//! name) are settled first come, first served: the older object keeps it.
//!
//! Passes follow the change ([`ConfigPipeline::run_changes`]): a store
//! change that touches nothing the pipeline reads costs nothing; one that
//! touches only EndpointSlices/Endpoints re-renders the assignments of the
//! Services behind them without walking the CECs; otherwise the CECs are
//! walked (conflicts are first come first served, so one CEC can change
//! what another serves), but Service-, slice- and Secret-derived work is
//! redone only for what changed.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use membrane_crds::EnvoyConfigSpec;
use membrane_store::{Changes, KeyChangeKind, Kind, Object, ObjectKey, StoreSnapshot};
use membrane_xds::Resource;
use membrane_xds::codec::type_url;

use crate::cec::{Joined, ParsedCec, SharedJoin, parse_cec};
use crate::endpoints::{SliceIndex, Validator, empty_assignment, slice_service};
use crate::envoy_pb::*;
use crate::lb_ipam::{Pool, lb_ip};
use crate::placement::{PortMap, bound_addresses, collides, frontends, place, redirect_targets};
use crate::ports::ProxyPorts;
use crate::secrets::{BadSecret, tls_secrets};

mod delta;
mod users;
pub use delta::{ConfigsPass, ServedList};

/// One Envoy resource ready for the snapshot: encoded and hashed once per
/// object version, then shared by every pass and every xDS stream.
pub type Built = Arc<Resource>;

/// Result of one pass.
#[derive(Debug, Default)]
pub struct ConfigPass {
    pub resources: Vec<Built>,
    /// CECs/CCECs, Services, EndpointSlices and Secrets that were
    /// rejected, with why.
    pub rejected: BTreeMap<ObjectKey, String>,
    /// Objects that serve but probably not as meant (an expired
    /// certificate, an RDS name nobody defines), with why.
    pub warnings: BTreeMap<ObjectKey, String>,
    /// For every CEC that serves: the `(type_url, name)` of its listeners,
    /// routes and clusters — what must be ACKed before it counts as served.
    /// For every Service EDS is built from: its ClusterLoadAssignments, so
    /// an EDS NACK can be pinned on it.
    pub served: BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
    /// eBPF datapath only: VIP → proxy listener address of the CEC that
    /// claims it (first come, first served).
    pub redirects: BTreeMap<std::net::SocketAddr, std::net::SocketAddr>,
}

/// What changed in the store since the pipeline's last pass, reduced to
/// what the pipeline reads.
#[derive(Debug, Clone, Default)]
pub struct PipelineChanges {
    /// Anything may have changed: the first pass, or a reader that fell
    /// behind the store's change log.
    pub resync: bool,
    /// A CEC or CCEC changed.
    pub configs: bool,
    /// The CECs and CCECs that changed.
    pub config_keys: BTreeSet<ObjectKey>,
    /// Services that changed (frontends, LB addresses, EDS ports).
    pub services: BTreeSet<ObjectKey>,
    /// One of them changed beyond its status (ports: the names of the
    /// assignments it publishes), or came or went.
    pub service_specs: bool,
    /// EndpointSlices and Endpoints that changed.
    pub endpoints: BTreeSet<ObjectKey>,
    /// A Secret changed.
    pub secrets: bool,
}

impl PipelineChanges {
    /// Everything is to be looked at again.
    pub fn resync() -> Self {
        Self {
            resync: true,
            ..Self::default()
        }
    }

    /// The store's change log (see [`membrane_store::Store::changes_since`]).
    pub fn from_store(changes: &Changes) -> Self {
        let Changes::Keys(keys) = changes else {
            return Self::resync();
        };
        let mut out = Self::default();
        for c in keys {
            match c.key.kind {
                Kind::CiliumEnvoyConfig | Kind::CiliumClusterwideEnvoyConfig => {
                    out.configs = true;
                    out.config_keys.insert(c.key.clone());
                }
                Kind::Service => {
                    out.services.insert(c.key.clone());
                    out.service_specs |= c.kind != KeyChangeKind::StatusUpdated;
                }
                Kind::EndpointSlice | Kind::Endpoints => {
                    out.endpoints.insert(c.key.clone());
                }
                Kind::Secret => out.secrets = true,
                // Ingresses, classes, namespaces, nodes...: read by others.
                _ => {}
            }
        }
        out
    }

    /// Nothing the pipeline reads changed.
    pub fn is_empty(&self) -> bool {
        !self.resync
            && !self.configs
            && !self.secrets
            && self.services.is_empty()
            && self.endpoints.is_empty()
    }
}

/// What [`ConfigPipeline::run_changes`] did.
#[derive(Debug)]
pub enum PassOutcome {
    /// Nothing it reads changed: the previous pass stands.
    Unchanged,
    /// Only assignments changed; everything else of the previous pass stands.
    Endpoints(EndpointsPass),
    /// Only CECs changed (or were quarantined): what changed of the
    /// previous pass.
    Configs(ConfigsPass),
    /// A pass over every CEC.
    Full(ConfigPass),
}

/// Result of an EndpointSlice/Endpoints-only change.
#[derive(Debug, Default)]
pub struct EndpointsPass {
    /// Served assignments with new content: the previous resource and its
    /// replacement (same name).
    pub updated: Vec<(Built, Built)>,
    /// Rejection state of the changed objects: why, or `None` when fine.
    pub rejected: Vec<(ObjectKey, Option<String>)>,
    /// Services whose published assignments changed.
    pub services: Vec<ObjectKey>,
}

/// One CEC version, decoded, with everything that does not depend on where
/// its listeners are placed already encoded.
#[derive(Debug)]
struct Prepared {
    /// Listeners still without the addresses the agent assigns.
    parsed: ParsedCec,
    /// Routes, clusters, endpoints and secrets, in that order.
    fixed: Vec<Built>,
    /// Every `(type_url, name)` it defines, for conflict checks.
    names: Vec<(&'static str, String)>,
    /// The EDS names its EDS clusters wait for.
    eds_names: Vec<String>,
    /// RDS names its listeners wait for: field and name.
    rds: Vec<(String, String)>,
    /// Encoded size, a proxy for the memory it holds.
    bytes: usize,
}

impl Prepared {
    fn new(mut parsed: ParsedCec) -> Self {
        let mut fixed = Vec::new();
        for r in &parsed.routes {
            fixed.push(built(r.name.clone(), to_any(r)));
        }
        for c in &parsed.clusters {
            fixed.push(built(c.name.clone(), to_any(c)));
        }
        for e in &parsed.endpoints {
            fixed.push(built(e.cluster_name.clone(), to_any(e)));
        }
        for s in &parsed.secrets {
            fixed.push(built(s.name.clone(), to_any(s)));
        }
        fixed.extend(parsed.encoded.iter().map(|e| e.resource.clone()));
        let names = resource_names(&parsed);
        let eds_names = parsed
            .clusters
            .iter()
            .filter(|c| {
                matches!(
                    c.cluster_discovery_type,
                    Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
                )
            })
            .map(|c| {
                c.eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| c.name.clone())
            })
            .chain(parsed.encoded.iter().filter_map(|e| e.eds_name.clone()))
            .collect();
        let rds = parsed
            .listeners
            .iter()
            .flat_map(|l| l.rds.iter().cloned())
            .collect();
        // Only listeners are needed again (placement); the decoded routes,
        // clusters, endpoints and secrets are encoded in `fixed` and would
        // be a second, much larger copy (a 60,000-host route is ~1 GB
        // decoded).
        parsed.routes = Vec::new();
        parsed.clusters = Vec::new();
        parsed.endpoints = Vec::new();
        parsed.secrets = Vec::new();
        parsed.encoded = Vec::new();
        let bytes = fixed.iter().map(|r| r.body.value.len()).sum::<usize>()
            + parsed
                .listeners
                .iter()
                .map(|l| prost::Message::encoded_len(&l.listener))
                .sum::<usize>();
        Self {
            parsed,
            fixed,
            names,
            eds_names,
            rds,
            bytes,
        }
    }
}

/// What decides a CEC's listener addresses: the frontends it binds and the
/// proxy ports of listeners without one.
type PlaceKey = (BTreeMap<String, Vec<(String, u16)>>, Vec<u16>);

/// A CEC version with its listeners placed and encoded.
struct Placed {
    prepared: Arc<Prepared>,
    key: PlaceKey,
    listeners: Vec<Built>,
    bound: Vec<(usize, String, String, u32)>,
    redirects: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
}

struct Cached {
    resource_version: String,
    result: Result<Arc<Prepared>, String>,
}

/// EDS of one backend selection, with the resourceVersions it came from.
struct CachedEds {
    inputs: Vec<(String, String)>,
    resources: Vec<Built>,
    /// The pass that last wanted it.
    generation: u64,
}

/// A CEC version Envoy rejected, and when to try it again: a port may be
/// freed, a cluster it names may appear, a new Envoy may accept it.
#[derive(Debug)]
struct Quarantine {
    resource_version: String,
    reason: String,
    /// Retries that were NACKed again.
    attempts: u32,
    last: Instant,
    next_retry: Instant,
    /// Being tried now: served as is until Envoy answers.
    retrying: bool,
}

/// Encoded bytes of CEC versions decoded or dropped that make returning
/// freed memory worthwhile: decoded and as JSON, such a CEC held ~100x more.
const TRIM_BYTES: usize = 256 << 10;

/// Retries on a timer: 5 s, 10 s, 20 s … up to 5 min.
const RETRY_BASE: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Retries after a change that may fix it: 200 ms, 400 ms … up to 30 s
/// after the last attempt, so churn does not become a NACK storm.
const EVENT_BASE: Duration = Duration::from_millis(200);
const EVENT_MAX: Duration = Duration::from_secs(30);

fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    base.saturating_mul(1u32 << attempts.min(16)).min(max)
}

/// What [`ConfigPipeline::quarantine`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quarantined {
    /// Nothing to do (not served, already reverted or quarantined).
    No,
    /// A version quarantined for the first time.
    New,
    /// A retry of a quarantined version was rejected again.
    Again,
}

/// Long-lived state of the pipeline.
pub struct ConfigPipeline {
    ports: PortMap,
    node_labels: BTreeMap<String, String>,
    proxy_ports: ProxyPorts,
    parsed: HashMap<ObjectKey, Cached>,
    last_good: HashMap<ObjectKey, Arc<Prepared>>,
    /// The version of each CEC Envoy last ACKed in full.
    acked_good: HashMap<ObjectKey, Arc<Prepared>>,
    /// What each CEC served in the latest pass: its resourceVersion, whether
    /// that is a fallback to the ACKed version, and the content.
    serving: HashMap<ObjectKey, (String, bool, Arc<Prepared>)>,
    /// CEC versions Envoy rejected.
    quarantined: HashMap<ObjectKey, Quarantine>,
    /// The other CECs' versions at the last pass: a change may fix a
    /// quarantined one.
    fingerprint: u64,
    /// Service and EndpointSlice validation.
    validator: Validator,
    /// Bytes of CEC versions held at the last memory trim, and at most
    /// since; a large drop means freed memory worth returning to the OS.
    held_at_trim: usize,
    /// When to return freed memory to the OS (after large work, once the
    /// versions it replaced are gone too).
    trim_at: Option<Instant>,
    /// `--lb-pool`: only the Services it is assigned to may bind its addresses.
    lb_pool: Option<Pool>,
    /// Empty assignments for EDS clusters nothing else provides, by name.
    empty_eds: HashMap<String, Built>,
    /// Per Service: its EDS inputs and the assignments of the latest pass.
    eds_serving: HashMap<ObjectKey, EdsServing>,
    /// Per Service: the assignments Envoy last ACKed.
    eds_acked: HashMap<ObjectKey, Vec<Built>>,
    /// Services whose assignments Envoy rejected: the inputs then, and why.
    eds_quarantined: HashMap<ObjectKey, (Vec<(String, String)>, String)>,
    /// Per TLS Secret: the resourceVersion and SDS secret of the latest
    /// pass, the version Envoy last ACKed, and versions it rejected.
    secret_serving: HashMap<ObjectKey, (String, Built)>,
    secret_acked: HashMap<ObjectKey, Built>,
    secret_quarantined: HashMap<ObjectKey, (String, String)>,
    placed: HashMap<ObjectKey, Placed>,
    /// EDS by namespace, Service and port selection.
    eds: HashMap<String, HashMap<String, HashMap<Vec<String>, CachedEds>>>,
    generation: u64,
    /// The next pass must walk everything: a quarantine or retry changed
    /// what serves without a store change.
    force_full: bool,
    /// Which Service each EndpointSlice feeds, and the reverse, kept across
    /// passes so a slice change (or deletion) finds its Service at once.
    slice_service: HashMap<ObjectKey, (String, String)>,
    service_slices: HashMap<(String, String), BTreeSet<ObjectKey>>,
    /// TLS Secrets as validated at the last Secret change (re-checked now
    /// and then: certificates expire without a change).
    secrets: Option<(SecretsChecked, Instant)>,
    /// Per CEC version: its LB pool check, valid while no Service changes.
    pool_checked: HashMap<ObjectKey, (Arc<Prepared>, Option<String>)>,
    /// Split shared CECs joined back (see [`crate::cec::SharedJoin`]).
    shared: SharedJoin,
    /// What the latest full pass joined, by first part (passes over
    /// changed CECs re-check these as dependents).
    joined: HashMap<ObjectKey, Arc<Joined>>,
    /// What the latest pass decided, for a pass over changed CECs only
    /// (`None`: the next pass is a full one).
    inc: Option<delta::IncState>,
    /// CECs whose quarantine state changed since the latest pass.
    dirty_configs: BTreeSet<ObjectKey>,
    /// Every CEC change takes a full pass (diagnostics and benchmarks).
    always_full: bool,
}

type SecretsChecked = (Vec<Secret>, Vec<BadSecret>, Vec<BadSecret>);

/// How long validated Secrets are reused without a Secret change (for
/// expiry warnings).
const SECRETS_RECHECK: Duration = Duration::from_secs(60);

/// A Service's EDS inputs (name, resourceVersion) and its assignments.
type EdsServing = (Vec<(String, String)>, Vec<Built>);

/// A backend selection of a CEC: namespace, Service, ports (empty: all).
type Wanted<'a> = (&'a str, &'a str, Cow<'a, [String]>);

/// Resource names defined by accepted CECs (borrowed from their prepared
/// versions) → index of the owner in the pass's CEC list.
#[derive(Default)]
struct Names<'a> {
    by_type: HashMap<(&'static str, &'a str), usize>,
}

impl<'a> Names<'a> {
    fn get(&self, t: &'static str, n: &str) -> Option<usize> {
        self.by_type.get(&(t, n)).copied()
    }
    fn insert(&mut self, t: &'static str, n: &'a str, owner: usize) {
        self.by_type.insert((t, n), owner);
    }
}

/// Addresses already bound by accepted CECs, indexed by port so a conflict
/// check does not scan every listener.
#[derive(Default)]
struct Binds {
    by_port: HashMap<u32, Vec<(String, ObjectKey)>>,
    /// Ports bound on any address (not free for proxy listeners).
    reserved: BTreeSet<u16>,
}

impl Binds {
    /// The CEC a bind of `ip:port` collides with. Of several (a wildcard
    /// address meets two specific ones), the least by key: which of them
    /// was accepted first can depend on what served before, and the
    /// message should not.
    fn owner(&self, ip: &str, port: u32) -> Option<&ObjectKey> {
        self.by_port
            .get(&port)?
            .iter()
            .filter(|(bip, _)| collides(ip, port, bip, port))
            .map(|(_, k)| k)
            .min()
    }

    fn add(&mut self, ip: String, port: u32, owner: ObjectKey) {
        if let Ok(p) = u16::try_from(port) {
            self.reserved.insert(p);
        }
        self.by_port.entry(port).or_default().push((ip, owner));
    }
}

impl ConfigPipeline {
    pub fn new(ports: PortMap, node_labels: BTreeMap<String, String>) -> Self {
        Self {
            ports,
            node_labels,
            proxy_ports: ProxyPorts::new(10000..=20000),
            parsed: HashMap::new(),
            last_good: HashMap::new(),
            acked_good: HashMap::new(),
            serving: HashMap::new(),
            quarantined: HashMap::new(),
            fingerprint: 0,
            validator: Validator::default(),
            held_at_trim: 0,
            trim_at: None,
            lb_pool: None,
            empty_eds: HashMap::new(),
            eds_serving: HashMap::new(),
            eds_acked: HashMap::new(),
            eds_quarantined: HashMap::new(),
            secret_serving: HashMap::new(),
            secret_acked: HashMap::new(),
            secret_quarantined: HashMap::new(),
            placed: HashMap::new(),
            eds: HashMap::new(),
            generation: 0,
            force_full: true,
            slice_service: HashMap::new(),
            service_slices: HashMap::new(),
            secrets: None,
            pool_checked: HashMap::new(),
            shared: SharedJoin::default(),
            joined: HashMap::new(),
            inc: None,
            dirty_configs: BTreeSet::new(),
            always_full: false,
        }
    }

    /// Take a full pass for every CEC change and quarantine, as before
    /// passes over changed CECs existed (to compare, or to rule them out).
    pub fn set_always_full(&mut self, on: bool) {
        self.always_full = on;
    }

    /// Addresses of `pool` may only be bound by the Services they are
    /// assigned to (a CEC listener naming one is rejected).
    pub fn set_lb_pool(&mut self, pool: Option<Pool>) {
        self.lb_pool = pool;
    }

    /// The node's labels changed (its Node was relabelled): `nodeSelector`s
    /// are evaluated against these from the next pass on.
    pub fn set_node_labels(&mut self, labels: BTreeMap<String, String>) {
        self.node_labels = labels;
    }

    /// Ports address-less listeners are given (default 10000-20000); set
    /// before the first pass.
    pub fn set_proxy_port_range(&mut self, range: std::ops::RangeInclusive<u16>) {
        self.proxy_ports = ProxyPorts::new(range);
    }

    /// Envoy ACKed everything `key` served in the latest pass: that version
    /// becomes the one to fall back to if a later version is NACKed, and a
    /// quarantined version being retried is cleared.
    pub fn mark_acked(&mut self, key: &ObjectKey) {
        if key.kind == Kind::Secret {
            if let Some((_, built)) = self.secret_serving.get(key)
                && !self.secret_quarantined.contains_key(key)
            {
                self.secret_acked.insert(key.clone(), built.clone());
            }
            return;
        }
        if key.kind == Kind::Service {
            if let Some((_, built)) = self.eds_serving.get(key)
                && !self.eds_quarantined.contains_key(key)
            {
                self.eds_acked.insert(key.clone(), built.clone());
            }
            return;
        }
        if let Some((rv, reverted, parsed)) = self.serving.get(key) {
            self.acked_good.insert(key.clone(), parsed.clone());
            if !*reverted
                && self
                    .quarantined
                    .get(key)
                    .is_some_and(|q| q.retrying && q.resource_version == *rv)
            {
                self.quarantined.remove(key);
            }
        }
    }

    /// Envoy rejected what `key` serves now: quarantine that version until
    /// the object changes or a retry is accepted. A Service's
    /// assignments are quarantined until its Service or slices change.
    pub fn quarantine(&mut self, key: &ObjectKey, reason: String) -> Quarantined {
        let q = self.quarantine_inner(key, reason);
        if q != Quarantined::No {
            // What serves changes without a store change: the CEC is
            // re-checked, a Service's or Secret's change takes a full pass.
            if key.kind == Kind::Service || key.kind == Kind::Secret {
                self.force_full = true;
            } else {
                self.dirty_configs.insert(key.clone());
            }
        }
        q
    }

    fn quarantine_inner(&mut self, key: &ObjectKey, reason: String) -> Quarantined {
        if key.kind == Kind::Secret {
            let Some((rv, _)) = self.secret_serving.get(key) else {
                return Quarantined::No;
            };
            if self
                .secret_quarantined
                .get(key)
                .is_some_and(|(q, _)| q == rv)
            {
                return Quarantined::No;
            }
            self.secret_quarantined
                .insert(key.clone(), (rv.clone(), reason));
            return Quarantined::New;
        }
        if key.kind == Kind::Service {
            let Some((inputs, _)) = self.eds_serving.get(key) else {
                return Quarantined::No;
            };
            if self
                .eds_quarantined
                .get(key)
                .is_some_and(|(q, _)| q == inputs)
            {
                return Quarantined::No;
            }
            self.eds_quarantined
                .insert(key.clone(), (inputs.clone(), reason));
            return Quarantined::New;
        }
        let Some((rv, reverted, _)) = self.serving.get(key) else {
            return Quarantined::No;
        };
        if *reverted {
            // Already serving the ACKed fallback; nothing newer to blame.
            return Quarantined::No;
        }
        let now = Instant::now();
        if let Some(q) = self.quarantined.get_mut(key)
            && q.resource_version == *rv
        {
            if !q.retrying {
                return Quarantined::No;
            }
            q.retrying = false;
            q.attempts += 1;
            q.last = now;
            q.next_retry = now + backoff(RETRY_BASE, RETRY_MAX, q.attempts);
            q.reason = reason;
            return Quarantined::Again;
        }
        self.quarantined.insert(
            key.clone(),
            Quarantine {
                resource_version: rv.clone(),
                reason,
                attempts: 0,
                last: now,
                next_retry: now + backoff(RETRY_BASE, RETRY_MAX, 0),
                retrying: false,
            },
        );
        Quarantined::New
    }

    /// Timed chores of the control loop: return freed memory when due,
    /// start due retries. True when a retry needs a store pass.
    pub fn housekeeping(&mut self, now: Instant) -> bool {
        if self.trim_at.is_some_and(|t| t <= now) {
            self.trim_at = None;
            release_freed_memory();
        }
        self.retry_due(now)
    }

    /// When [`Self::housekeeping`] has something to do.
    pub fn next_wake(&self) -> Option<Instant> {
        self.next_retry().into_iter().chain(self.trim_at).min()
    }

    /// Large work just happened: trim a second from now, when what it
    /// replaced (old snapshots, acknowledged versions) is freed too.
    fn schedule_trim(&mut self) {
        self.trim_at = Some(Instant::now() + Duration::from_secs(1));
    }

    /// Track the bytes of CEC versions still held; schedule a trim when
    /// they fell by more than [`TRIM_BYTES`] since the high-water mark.
    fn account_memory(&mut self) {
        let mut seen: HashSet<*const Prepared> = HashSet::new();
        let mut held = 0usize;
        let versions = self
            .parsed
            .values()
            .filter_map(|c| c.result.as_ref().ok())
            .chain(self.last_good.values())
            .chain(self.acked_good.values());
        for p in versions {
            if seen.insert(Arc::as_ptr(p)) {
                held += p.bytes;
            }
        }
        if held + TRIM_BYTES < self.held_at_trim {
            self.schedule_trim();
            self.held_at_trim = held;
        } else {
            self.held_at_trim = self.held_at_trim.max(held);
        }
    }

    /// When the next quarantined version is due for a retry.
    pub fn next_retry(&self) -> Option<Instant> {
        self.quarantined
            .values()
            .filter(|q| !q.retrying)
            .map(|q| q.next_retry)
            .min()
    }

    /// Start the retries that are due; true when there are any (the next
    /// pass serves those versions again).
    pub fn retry_due(&mut self, now: Instant) -> bool {
        let mut any = false;
        for (key, q) in self.quarantined.iter_mut() {
            if !q.retrying && q.next_retry <= now {
                q.retrying = true;
                any = true;
                self.dirty_configs.insert(key.clone());
            }
        }
        any
    }

    /// A new Envoy (restart): whatever the old one refused may work now.
    pub fn retry_all_now(&mut self) {
        let now = Instant::now();
        for q in self.quarantined.values_mut() {
            q.next_retry = now;
        }
    }

    /// Something a quarantined version may depend on changed: retry soon.
    fn retry_soon(&mut self) {
        for q in self.quarantined.values_mut().filter(|q| !q.retrying) {
            let soon = q.last + backoff(EVENT_BASE, EVENT_MAX, q.attempts);
            q.next_retry = q.next_retry.min(soon);
        }
    }

    /// A pass over everything in `snap`, as if all of it changed.
    pub fn run(&mut self, snap: &StoreSnapshot) -> ConfigPass {
        self.full(snap, &PipelineChanges::resync())
    }

    /// A pass that does the work `changes` (since the previous pass, with
    /// `snap` at or after them) calls for; see [`PassOutcome`].
    pub fn run_changes(&mut self, snap: &StoreSnapshot, changes: &PipelineChanges) -> PassOutcome {
        // A changed CEC may serve a version it served before (a new one
        // that does not decode falls back to the last good one) under a
        // new `spec.services`: its placement is not the cached one.
        for key in &changes.config_keys {
            self.placed.remove(key);
            self.pool_checked.remove(key);
        }
        if changes.resync
            || self.force_full
            || self.inc.is_none()
            || (self.always_full
                && (changes.configs
                    || !self.dirty_configs.is_empty()
                    || !changes.services.is_empty()))
            || changes.secrets
        {
            return PassOutcome::Full(self.full(snap, changes));
        }
        // A Service change reaches the CECs that list the Service in
        // `spec.services` (their listeners sit on its frontends, and the LB
        // pool check reads its address) and, unless only its status
        // changed (LB IPAM), the CECs that take its endpoints (its ports
        // name the assignments it publishes).
        let mut frontend_users = self.frontend_users(snap, &changes.services);
        if changes.service_specs {
            frontend_users.extend(self.endpoint_users(&changes.services));
        }
        let configs = changes.configs
            || !frontend_users.is_empty()
            || !self.dirty_configs.is_empty()
            || self.inc.as_ref().is_some_and(|i| !i.flipped.is_empty());
        // Assignments first, so that CECs re-checked below read the new ones.
        let mut eds_keys = changes.endpoints.clone();
        eds_keys.extend(changes.services.iter().cloned());
        let eds = if eds_keys.is_empty() {
            None
        } else {
            match self.endpoints_only(snap, &eds_keys) {
                Some(p) => {
                    // The published assignments the next CEC pass compares with.
                    if let Some(inc) = self.inc.as_mut() {
                        for (_, new) in &p.updated {
                            if let Some(slot) = inc.eds_res.get_mut(&new.name) {
                                *slot = new.clone();
                            }
                        }
                    }
                    Some(p)
                }
                None => return PassOutcome::Full(self.full(snap, changes)),
            }
        };
        if !configs {
            return match eds {
                Some(p) => PassOutcome::Endpoints(p),
                None => PassOutcome::Unchanged,
            };
        }
        // Their Service-derived results no longer hold.
        for key in &frontend_users {
            self.placed.remove(key);
            self.pool_checked.remove(key);
        }
        let mut keys = changes.config_keys.clone();
        keys.extend(frontend_users);
        match self.configs_pass(snap, &keys) {
            Some(mut p) => {
                if let Some(eds) = eds {
                    p.merge_endpoints(eds);
                }
                PassOutcome::Configs(p)
            }
            None => PassOutcome::Full(self.full(snap, changes)),
        }
    }

    /// The accepted CECs/CCECs that take endpoints of one of `services`
    /// (as the last pass left them).
    fn endpoint_users(&self, services: &BTreeSet<ObjectKey>) -> Vec<ObjectKey> {
        let Some(inc) = self.inc.as_ref() else {
            return Vec::new();
        };
        inc.entries
            .iter()
            .filter(|(_, e)| {
                e.wants.iter().any(|(ns, name, _)| {
                    services.contains(&ObjectKey::new(Kind::Service, ns, name))
                })
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The CECs/CCECs whose `spec.services` name one of `services`. A walk
    /// over the CECs' specs (no decoding): cheap next to re-placing every
    /// CEC's listeners, which is what a Service change used to cost.
    fn frontend_users(
        &self,
        snap: &StoreSnapshot,
        services: &BTreeSet<ObjectKey>,
    ) -> BTreeSet<ObjectKey> {
        let mut out = BTreeSet::new();
        if services.is_empty() {
            return out;
        }
        for kind in [Kind::CiliumEnvoyConfig, Kind::CiliumClusterwideEnvoyConfig] {
            for obj in snap.list(kind, None) {
                let (spec, default_ns) = match obj.as_ref() {
                    Object::CiliumEnvoyConfig(c) => {
                        (&c.spec.config, c.metadata.namespace.as_deref())
                    }
                    Object::CiliumClusterwideEnvoyConfig(c) => (&c.spec.config, None),
                    _ => continue,
                };
                let named = spec.services.iter().any(|s| {
                    let ns = if s.namespace.is_empty() {
                        default_ns.unwrap_or("default")
                    } else {
                        s.namespace.as_str()
                    };
                    services.contains(&ObjectKey::new(Kind::Service, ns, &s.name))
                });
                if named {
                    out.insert(obj.key());
                }
            }
        }
        out
    }

    /// Update the slice ↔ Service index and the validator for `changes`;
    /// the Services whose EDS inputs may differ (`None`: all of them).
    fn refresh_endpoints(
        &mut self,
        snap: &StoreSnapshot,
        changes: &PipelineChanges,
    ) -> Option<HashSet<(String, String)>> {
        if changes.resync {
            self.validator.refresh(snap);
            self.slice_service.clear();
            self.service_slices.clear();
            for obj in snap.list(Kind::EndpointSlice, None) {
                if let Some(svc) = slice_service(obj) {
                    let key = obj.key();
                    self.service_slices
                        .entry(svc.clone())
                        .or_default()
                        .insert(key.clone());
                    self.slice_service.insert(key, svc);
                }
            }
            return None;
        }
        self.validator
            .refresh_keys(snap, changes.services.iter().chain(&changes.endpoints));
        let mut dirty: HashSet<(String, String)> = changes
            .services
            .iter()
            .map(|k| (k.namespace.clone(), k.name.clone()))
            .collect();
        for key in &changes.endpoints {
            if key.kind == Kind::Endpoints {
                dirty.insert((key.namespace.clone(), key.name.clone()));
                continue;
            }
            if let Some(old) = self.slice_service.remove(key) {
                if let Some(set) = self.service_slices.get_mut(&old) {
                    set.remove(key);
                    if set.is_empty() {
                        self.service_slices.remove(&old);
                    }
                }
                dirty.insert(old);
            }
            if let Some(svc) = snap.get(key).and_then(|o| slice_service(o)) {
                self.service_slices
                    .entry(svc.clone())
                    .or_default()
                    .insert(key.clone());
                self.slice_service.insert(key.clone(), svc.clone());
                dirty.insert(svc);
            }
        }
        Some(dirty)
    }

    /// The slices of the given Services, from the index.
    fn slices_of<'s>(
        &'s self,
        services: impl IntoIterator<Item = (&'s str, &'s str)>,
    ) -> Vec<&'s ObjectKey> {
        let mut out = Vec::new();
        for (ns, name) in services {
            if let Some(set) = self.service_slices.get(&(ns.to_owned(), name.to_owned())) {
                out.extend(set.iter());
            }
        }
        out
    }

    /// EndpointSlices/Endpoints changed and nothing else: re-render the
    /// assignments of the Services behind them. `None` when a full pass is
    /// needed instead (a Service whose assignments Envoy rejected).
    fn endpoints_only(
        &mut self,
        snap: &StoreSnapshot,
        keys: &BTreeSet<ObjectKey>,
    ) -> Option<EndpointsPass> {
        // The Services fed before and after the change; decided before
        // anything is updated, so that bailing out leaves state untouched.
        let mut services: BTreeSet<(String, String)> = BTreeSet::new();
        for key in keys {
            match key.kind {
                Kind::Endpoints | Kind::Service => {
                    services.insert((key.namespace.clone(), key.name.clone()));
                }
                Kind::EndpointSlice => {
                    services.extend(self.slice_service.get(key).cloned());
                    services.extend(snap.get(key).and_then(|o| slice_service(o)));
                }
                _ => return None,
            }
        }
        if services.iter().any(|(ns, name)| {
            self.eds_quarantined
                .contains_key(&ObjectKey::new(Kind::Service, ns, name))
        }) {
            return None;
        }
        let (service_keys, endpoint_keys) =
            keys.iter().cloned().partition(|k| k.kind == Kind::Service);
        let changes = PipelineChanges {
            services: service_keys,
            endpoints: endpoint_keys,
            ..PipelineChanges::default()
        };
        self.refresh_endpoints(snap, &changes);
        let mut out = EndpointsPass::default();
        for key in keys
            .iter()
            .filter(|k| matches!(k.kind, Kind::EndpointSlice | Kind::Service))
        {
            out.rejected
                .push((key.clone(), self.validator.rejection(key)));
        }
        let slices: Vec<ObjectKey> = self
            .slices_of(services.iter().map(|(n, s)| (n.as_str(), s.as_str())))
            .into_iter()
            .cloned()
            .collect();
        let index = SliceIndex::with_validator_for(snap, &self.validator, &slices);
        for (ns, name) in &services {
            let Some(by_ports) = self.eds.get_mut(ns).and_then(|m| m.get_mut(name)) else {
                // No CEC wants this Service's endpoints.
                continue;
            };
            let mut changed = false;
            for (ports, c) in by_ports.iter_mut() {
                if index.inputs_equal(snap, ns, name, &c.inputs) {
                    continue;
                }
                c.resources = index
                    .assignments(snap, ns, name, ports)
                    .into_iter()
                    .map(|cla| built(cla.cluster_name.clone(), to_any(&cla)))
                    .collect();
                c.inputs = index.inputs(snap, ns, name);
                changed = true;
            }
            if !changed {
                continue;
            }
            let svc_key = ObjectKey::new(Kind::Service, ns, name);
            let Some((inputs, published)) = self.eds_serving.get_mut(&svc_key) else {
                continue;
            };
            *inputs = index.inputs(snap, ns, name);
            out.services.push(svc_key.clone());
            // The names a Service publishes follow from its ports, not its
            // slices: each published assignment gets its new content.
            for r in published.iter_mut() {
                let Some(new) = by_ports
                    .values()
                    .flat_map(|c| &c.resources)
                    .find(|n| n.name == r.name)
                else {
                    continue;
                };
                if new.hash != r.hash {
                    out.updated.push((r.clone(), new.clone()));
                    *r = new.clone();
                }
            }
        }
        Some(out)
    }

    fn full(&mut self, snap: &StoreSnapshot, changes: &PipelineChanges) -> ConfigPass {
        self.force_full = false;
        self.dirty_configs.clear();
        self.inc = None;
        // Service-derived results (frontends, LB pool checks) of unchanged
        // CEC versions still hold when no Service changed.
        let services_same = !changes.resync && changes.services.is_empty();
        let mut pass = ConfigPass::default();
        let (joined, parts) = self.shared.join(snap);
        self.joined = joined.clone();
        let mut configs: Vec<(ObjectKey, &EnvoyConfigSpec, &str, Option<Timestamp>)> = Vec::new();
        // First parts named by split parts (see `SharedJoin::join`).
        let mut heads: HashSet<ObjectKey> = HashSet::new();
        for kind in [Kind::CiliumEnvoyConfig, Kind::CiliumClusterwideEnvoyConfig] {
            for obj in snap.list(kind, None) {
                let (spec, meta) = match obj.as_ref() {
                    Object::CiliumEnvoyConfig(c) => (&c.spec.config, &c.metadata),
                    Object::CiliumClusterwideEnvoyConfig(c) => (&c.spec.config, &c.metadata),
                    _ => continue,
                };
                let key = obj.key();
                if let Some(head) = membrane_ingress::shared_part_of(meta) {
                    heads.insert(ObjectKey::new(kind, &key.namespace, head));
                }
                if parts.contains(&key) {
                    continue;
                }
                let created = meta.creation_timestamp.as_ref().map(|t| t.0);
                let (spec, rv) = match joined.get(&key) {
                    Some(j) => (j.spec.as_ref(), j.rv.as_str()),
                    None => (spec, meta.resource_version.as_deref().unwrap_or_default()),
                };
                configs.push((key, spec, rv, created));
            }
        }
        // First come, first served on conflicts. Creation times have whole
        // seconds (as in Kubernetes); within one second, what served in the
        // last pass keeps serving, and only then do names decide.
        let serving = &self.serving;
        configs.sort_by(|a, b| {
            let newcomer = |c: &ObjectKey| !serving.contains_key(c);
            (&a.3, newcomer(&a.0), &a.0).cmp(&(&b.3, newcomer(&b.0), &b.0))
        });
        let live: HashSet<&ObjectKey> = configs.iter().map(|c| &c.0).collect();
        self.parsed.retain(|k, _| live.contains(k));
        self.last_good.retain(|k, _| live.contains(k));
        self.acked_good.retain(|k, _| live.contains(k));
        let rvs: HashMap<&ObjectKey, &str> = configs.iter().map(|c| (&c.0, c.2)).collect();
        // A quarantined version that was replaced is forgotten.
        self.quarantined
            .retain(|k, q| rvs.get(k).is_some_and(|rv| *rv == q.resource_version));
        self.placed.retain(|k, _| live.contains(k));
        self.pool_checked.retain(|k, _| live.contains(k));
        // Who served in the previous pass (the order within one second).
        let was_serving: Vec<bool> = configs
            .iter()
            .map(|c| self.serving.contains_key(&c.0))
            .collect();
        self.serving.clear();
        // Every CEC's version: quarantining one changes nothing here, so it
        // does not trigger its own retry. Order-independent, so that a pass
        // over changed CECs keeps it up to date.
        let fingerprint = configs
            .iter()
            .fold(0u64, |h, (key, _, rv, _)| h ^ delta::version_hash(key, rv));
        if fingerprint != self.fingerprint {
            self.fingerprint = fingerprint;
            self.retry_soon();
        }

        // Phase 1: the version each CEC serves (fresh, last good, or the
        // ACKed fallback), decoding only what changed.
        let mut resolved: Vec<(usize, Arc<Prepared>, bool)> = Vec::new();
        // Phase-1 rejections (a version that does not decode, or was
        // NACKed), before the conflict checks may replace them.
        for (i, (key, spec, rv, _)) in configs.iter().enumerate() {
            if !selects(spec.node_selector.as_ref(), &self.node_labels) {
                continue;
            }
            let (prepared, why) = self.resolve(key, spec, rv, joined.get(key));
            if let Some(why) = why {
                pass.rejected.insert(key.clone(), why);
            }
            if let Some((prepared, nacked)) = prepared {
                resolved.push((i, prepared, nacked));
            }
        }

        // Phase 2: placement and conflicts, first come first served. Names
        // borrow from `resolved`, which no longer changes.
        let mut names = Names::default();
        let mut binds = Binds::default();
        let mut live_listeners = BTreeSet::new();
        let mut eds_wanted: BTreeSet<Wanted<'_>> = BTreeSet::new();
        let mut accepted: Vec<(ObjectKey, Arc<Prepared>)> = Vec::new();
        // Addresses of the CECs that reached the conflict check.
        let mut reached: HashMap<ObjectKey, Vec<(String, u32)>> = HashMap::new();

        for (i, prepared, nacked) in &resolved {
            let (key, spec, rv, _) = &configs[*i];
            let nacked = *nacked;
            let violation = self.pool_check(snap, key, spec, prepared, services_same);
            if let Some(msg) = violation {
                pass.rejected.insert(key.clone(), msg);
                continue;
            }
            let placed = self.place_listeners(snap, key, spec, prepared, &binds, services_same);
            let (listeners, bound) = match placed {
                Ok(v) => v,
                Err((index, why)) => {
                    pass.rejected.insert(
                        key.clone(),
                        format!("{key}: spec.resources[{index}]: {why}"),
                    );
                    continue;
                }
            };
            reached.insert(
                key.clone(),
                bound
                    .iter()
                    .map(|(_, _, ip, port)| (ip.clone(), *port))
                    .collect(),
            );
            if let Some(msg) = conflict(key, &bound, &prepared.names, &binds, &names, &configs) {
                pass.rejected.insert(key.clone(), msg);
                continue;
            }
            for (_, _, ip, port) in bound {
                binds.add(ip, port, key.clone());
            }
            for l in &listeners {
                live_listeners.insert(l.name.clone());
            }
            if let Some(p) = self.placed.get(key) {
                for (vip, to) in &p.redirects {
                    pass.redirects.entry(*vip).or_insert(*to);
                }
            }
            let default_ns = key.namespace.as_str();
            for s in &spec.backend_services {
                let ns = if s.namespace.is_empty() {
                    default_ns
                } else {
                    &s.namespace
                };
                eds_wanted.insert((ns, &s.name, Cow::Borrowed(&s.number)));
            }
            for s in &spec.services {
                let ns = if s.namespace.is_empty() {
                    default_ns
                } else {
                    &s.namespace
                };
                let ports = s.ports.iter().map(u16::to_string).collect();
                eds_wanted.insert((ns, &s.name, Cow::Owned(ports)));
            }
            // EDS clusters naming a Service port directly get its
            // endpoints even when `backendServices` does not list it.
            for n in &prepared.eds_names {
                if let Some((ns, svc, port)) = split_eds_name(n) {
                    eds_wanted.insert((ns, svc, Cow::Owned(vec![port.to_owned()])));
                }
            }
            self.serving
                .insert(key.clone(), ((*rv).to_owned(), nacked, prepared.clone()));
            for (t, n) in &prepared.names {
                names.insert(t, n, *i);
            }
            accepted.push((key.clone(), prepared.clone()));
        }
        self.proxy_ports.retain(&live_listeners);

        for (key, prepared) in &accepted {
            let mut served = Vec::new();
            if let Some(placed) = self.placed.get(key) {
                for l in &placed.listeners {
                    served.push((type_url::LISTENER, l.name.clone()));
                    pass.resources.push(l.clone());
                }
            }
            for r in &prepared.fixed {
                if r.type_url == type_url::ROUTE || r.type_url == type_url::CLUSTER {
                    served.push((static_type(&r.type_url), r.name.clone()));
                }
                pass.resources.push(r.clone());
            }
            pass.served.insert(key.clone(), served);
        }

        // EDS: refresh the cached assignments whose inputs changed, then
        // publish each name once (CEC-defined endpoints take precedence).
        self.account_memory();
        // Only the Services whose inputs changed (all on a resync) and
        // selections not computed yet need the slices looked at.
        let dirty = self.refresh_endpoints(snap, changes);
        pass.rejected.extend(self.validator.rejected());
        let is_clean = |ns: &str, name: &str| {
            dirty
                .as_ref()
                .is_some_and(|d| !d.contains(&(ns.to_owned(), name.to_owned())))
        };
        let cached = |eds: &HashMap<String, HashMap<String, HashMap<Vec<String>, CachedEds>>>,
                      ns: &str,
                      name: &str,
                      ports: &[String]| {
            eds.get(ns)
                .and_then(|m| m.get(name))
                .is_some_and(|m| m.contains_key(ports))
        };
        let index = match &dirty {
            None => SliceIndex::with_validator(snap, &self.validator),
            Some(_) => {
                let mut todo: Vec<(&str, &str)> = eds_wanted
                    .iter()
                    .filter(|(ns, name, ports)| {
                        !is_clean(ns, name) || !cached(&self.eds, ns, name, ports)
                    })
                    .map(|(ns, name, _)| (*ns, *name))
                    .collect();
                todo.dedup();
                let keys = self.slices_of(todo);
                SliceIndex::with_validator_for(snap, &self.validator, keys)
            }
        };
        self.generation += 1;
        let generation = self.generation;
        for (ns, name, ports) in &eds_wanted {
            let clean = is_clean(ns, name);
            let by_ports = self
                .eds
                .entry((*ns).to_owned())
                .or_default()
                .entry((*name).to_owned())
                .or_default();
            match by_ports.get_mut(ports.as_ref()) {
                Some(c) if clean => {
                    c.generation = generation;
                }
                Some(c) if index.inputs_equal(snap, ns, name, &c.inputs) => {
                    c.generation = generation;
                }
                _ => {
                    let resources = index
                        .assignments(snap, ns, name, ports)
                        .into_iter()
                        .map(|cla| built(cla.cluster_name.clone(), to_any(&cla)))
                        .collect();
                    by_ports.insert(
                        ports.clone().into_owned(),
                        CachedEds {
                            inputs: index.inputs(snap, ns, name),
                            resources,
                            generation,
                        },
                    );
                }
            }
        }
        // Selections nobody wants any more are dropped.
        for by_name in self.eds.values_mut() {
            for by_ports in by_name.values_mut() {
                by_ports.retain(|_, c| c.generation == generation);
            }
            by_name.retain(|_, by_ports| !by_ports.is_empty());
        }
        self.eds.retain(|_, by_name| !by_name.is_empty());
        let mut eds_out = Vec::new();
        let mut eds_serving: HashMap<ObjectKey, EdsServing> = HashMap::new();
        let mut eds_names: HashSet<String> = pass
            .resources
            .iter()
            .filter(|r| r.type_url == type_url::ENDPOINT)
            .map(|r| r.name.clone())
            .collect();
        let mut empty_used = HashMap::new();
        for (ns, name, ports) in &eds_wanted {
            let Some(c) = self
                .eds
                .get(*ns)
                .and_then(|m| m.get(*name))
                .and_then(|m| m.get(ports.as_ref()))
            else {
                continue;
            };
            let svc_key = ObjectKey::new(Kind::Service, ns, name);
            // Envoy rejected these inputs: serve what it last ACKed.
            let quarantined = self
                .eds_quarantined
                .get(&svc_key)
                .filter(|(inputs, _)| *inputs == c.inputs);
            if let Some((_, why)) = quarantined {
                pass.rejected
                    .insert(svc_key.clone(), format!("{svc_key}: {why}"));
                for slice in index.slice_names(ns, name) {
                    let k = ObjectKey::new(Kind::EndpointSlice, ns, &slice);
                    pass.rejected.insert(
                        k.clone(),
                        format!("{k}: {why} (the assignment of Service {ns}/{name})"),
                    );
                }
            }
            let entry = eds_serving
                .entry(svc_key.clone())
                .or_insert_with(|| (c.inputs.clone(), Vec::new()));
            for r in &c.resources {
                if !eds_names.insert(r.name.clone()) {
                    continue;
                }
                let r = match quarantined {
                    None => r.clone(),
                    Some(_) => self
                        .eds_acked
                        .get(&svc_key)
                        .and_then(|acked| acked.iter().find(|a| a.name == r.name))
                        .cloned()
                        .unwrap_or_else(|| empty_eds(&self.empty_eds, &mut empty_used, &r.name)),
                };
                entry.1.push(r.clone());
                eds_out.push(r);
            }
        }
        // Every other EDS cluster gets an empty assignment, so Envoy never
        // waits for its initial-fetch timeout.
        for (_, prepared) in &accepted {
            for n in &prepared.eds_names {
                if eds_names.insert(n.clone()) {
                    eds_out.push(empty_eds(&self.empty_eds, &mut empty_used, n));
                }
            }
        }
        self.empty_eds = empty_used;
        // Only what an EDS cluster asks for is ever ACKed, so only that
        // counts for a Service (the other names are never subscribed).
        let asked: HashSet<&str> = accepted
            .iter()
            .flat_map(|(_, p)| p.eds_names.iter().map(String::as_str))
            .collect();
        for (key, (_, built)) in &eds_serving {
            let names: Vec<(&'static str, String)> = built
                .iter()
                .filter(|r| asked.contains(r.name.as_str()))
                .map(|r| (type_url::ENDPOINT, r.name.clone()))
                .collect();
            if !names.is_empty() {
                pass.served.insert(key.clone(), names);
            }
        }
        self.eds_quarantined
            .retain(|k, (inputs, _)| eds_serving.get(k).is_some_and(|(i, _)| i == inputs));
        self.eds_acked.retain(|k, _| eds_serving.contains_key(k));
        self.eds_serving = eds_serving;
        let eds_res: HashMap<String, Built> = eds_out
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect();
        pass.resources.extend(eds_out);

        // An RDS name no CEC defines leaves its listener waiting for routes
        // that never come.
        let routes: HashSet<&str> = pass
            .resources
            .iter()
            .filter(|r| r.type_url == type_url::ROUTE)
            .map(|r| r.name.as_str())
            .collect();
        for (key, prepared) in &accepted {
            if let Some((field, name)) = prepared
                .rds
                .iter()
                .find(|(_, n)| !routes.contains(n.as_str()))
            {
                pass.warnings
                    .insert(key.clone(), rds_warning(key, field, name));
            }
        }

        let recheck = changes.resync
            || changes.secrets
            || self
                .secrets
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() > SECRETS_RECHECK);
        if recheck {
            self.secrets = Some((tls_secrets(snap), Instant::now()));
        }
        // Taken out for the loop below (which reads other fields), then
        // put back.
        let checked = self.secrets.take();
        let empty: SecretsChecked = Default::default();
        let (secrets, bad, expiring) = checked.as_ref().map_or(&empty, |(s, _)| s);
        let mut secret_names: HashSet<String> = pass
            .resources
            .iter()
            .filter(|r| r.type_url == type_url::SECRET)
            .map(|r| r.name.clone())
            .collect();
        let mut secret_serving = HashMap::new();
        for s in secrets {
            if !secret_names.insert(s.name.clone()) {
                continue;
            }
            let Some((ns, name)) = s.name.split_once('/') else {
                continue;
            };
            let key = ObjectKey::new(Kind::Secret, ns, name);
            let rv = snap
                .get(&key)
                .and_then(|o| o.meta().resource_version.clone())
                .unwrap_or_default();
            let fresh = match self.secret_serving.get(&key) {
                Some((old_rv, b)) if *old_rv == rv => b.clone(),
                _ => built(s.name.clone(), to_any(s)),
            };
            // Envoy rejected this version: serve what it last ACKed.
            let serve = match self.secret_quarantined.get(&key) {
                Some((q, why)) if *q == rv => {
                    pass.rejected.insert(key.clone(), format!("{key}: {why}"));
                    self.secret_acked.get(&key).cloned()
                }
                _ => Some(fresh.clone()),
            };
            if let Some(b) = serve {
                pass.served
                    .insert(key.clone(), vec![(type_url::SECRET, b.name.clone())]);
                pass.resources.push(b);
            }
            secret_serving.insert(key, (rv, fresh));
        }
        self.secret_quarantined
            .retain(|k, (q, _)| secret_serving.get(k).is_some_and(|(rv, _)| rv == q));
        self.secret_acked
            .retain(|k, _| secret_serving.contains_key(k));
        self.secret_serving = secret_serving;
        for b in bad {
            let key = ObjectKey::new(Kind::Secret, &b.namespace, &b.name);
            let msg = format!("{key}: {}", b.reason);
            pass.rejected.insert(key, msg);
        }
        for w in expiring {
            let key = ObjectKey::new(Kind::Secret, &w.namespace, &w.name);
            let msg = format!("{key}: {}", w.reason);
            pass.warnings.insert(key, msg);
        }
        self.secrets = checked;

        // What the next pass over changed CECs starts from.
        let mut inc = delta::IncState::new(fingerprint, heads, eds_res);
        let resolved_by: HashMap<usize, &Arc<Prepared>> =
            resolved.iter().map(|(i, p, _)| (*i, p)).collect();
        let accepted_keys: HashSet<&ObjectKey> = accepted.iter().map(|(k, _)| k).collect();
        let mut flips = Vec::new();
        for (i, (key, spec, rv, created)) in configs.iter().enumerate() {
            let prepared = resolved_by.get(&i).map(|p| (*p).clone());
            let is_accepted = accepted_keys.contains(key);
            let (listeners, wants) = match (&prepared, is_accepted) {
                (Some(p), true) => (
                    self.placed
                        .get(key)
                        .map(|pl| pl.listeners.clone())
                        .unwrap_or_default(),
                    delta::wants_of(key, spec, p),
                ),
                _ => Default::default(),
            };
            if was_serving[i] != is_accepted {
                flips.push(key.clone());
            }
            let entry = delta::Entry {
                sort: (*created, !was_serving[i], key.clone()),
                rv: (*rv).to_owned(),
                prepared,
                reached: reached.remove(key),
                accepted: is_accepted,
                listeners,
                wants,
                rejected: pass.rejected.get(key).cloned(),
                warning: pass.warnings.get(key).cloned(),
            };
            inc.put(key.clone(), entry);
        }
        inc.settle_flips(flips);
        self.inc = Some(inc);
        pass
    }
    /// The version `key` serves (fresh, last good, or the ACKed fallback
    /// when the fresh one was NACKed), decoding only what changed, and why
    /// the fresh version is rejected, if it is. `None`: nothing to serve.
    #[allow(clippy::type_complexity)]
    fn resolve(
        &mut self,
        key: &ObjectKey,
        spec: &EnvoyConfigSpec,
        rv: &str,
        joined: Option<&Arc<Joined>>,
    ) -> (Option<(Arc<Prepared>, bool)>, Option<String>) {
        let fresh = match self.parsed.get(key) {
            Some(c) if c.resource_version == rv => c.result.clone(),
            _ => {
                let object = key.to_string();
                let r = match joined {
                    Some(j) => j.parse(&object, &key.namespace, &key.name),
                    None => parse_cec(&object, &key.namespace, &key.name, spec),
                };
                let r = r
                    .map(|p| Arc::new(Prepared::new(p)))
                    .map_err(|e| e.to_string());
                // Decoding a large CEC leaves many freed allocations.
                if r.as_ref()
                    .map_or(spec.resources.len() > 1000, |p| p.bytes > TRIM_BYTES)
                {
                    self.trim_at = Some(Instant::now() + Duration::from_secs(1));
                }
                self.parsed.insert(
                    key.clone(),
                    Cached {
                        resource_version: rv.to_owned(),
                        result: r.clone(),
                    },
                );
                r
            }
        };
        let quarantine = self
            .quarantined
            .get(key)
            .filter(|q| q.resource_version == rv && !q.retrying);
        let nacked = quarantine.is_some();
        let fresh = match quarantine {
            Some(q) => Err(format!("{key}: {}", q.reason)),
            None => fresh,
        };
        match fresh {
            Ok(p) => {
                if !self.last_good.get(key).is_some_and(|l| Arc::ptr_eq(l, &p)) {
                    self.last_good.insert(key.clone(), p.clone());
                }
                (Some((p, nacked)), None)
            }
            Err(e) => {
                let fallback = if nacked {
                    &self.acked_good
                } else {
                    &self.last_good
                };
                (fallback.get(key).map(|p| (p.clone(), nacked)), Some(e))
            }
        }
    }

    /// The LB pool check of a CEC version, cached while no Service changes.
    fn pool_check(
        &mut self,
        snap: &StoreSnapshot,
        key: &ObjectKey,
        spec: &EnvoyConfigSpec,
        prepared: &Arc<Prepared>,
        services_same: bool,
    ) -> Option<String> {
        match self.pool_checked.get(key) {
            Some((p, v)) if services_same && Arc::ptr_eq(p, prepared) => v.clone(),
            _ => {
                let v = self.pool_violation(snap, key, spec, prepared);
                self.pool_checked
                    .insert(key.clone(), (prepared.clone(), v.clone()));
                v
            }
        }
    }

    /// A listener address from the LB pool that is not the address of a
    /// Service in the CEC's `spec.services`: the next Service assigned it
    /// would be broken.
    fn pool_violation(
        &self,
        snap: &StoreSnapshot,
        key: &ObjectKey,
        spec: &EnvoyConfigSpec,
        prepared: &Prepared,
    ) -> Option<String> {
        let pool = self.lb_pool?;
        let own: Vec<std::net::Ipv4Addr> = spec
            .services
            .iter()
            .filter_map(|s| {
                let ns = if s.namespace.is_empty() {
                    key.namespace.as_str()
                } else {
                    s.namespace.as_str()
                };
                snap.get_typed::<Service>(ns, &s.name).and_then(lb_ip)
            })
            .collect();
        for pl in prepared
            .parsed
            .listeners
            .iter()
            .filter(|l| !l.needs_address)
        {
            let field = format!("spec.resources[{}]", pl.index);
            let l = &pl.listener;
            let addrs = l
                .address
                .iter()
                .map(|a| (format!("{field}.address"), a))
                .chain(
                    l.additional_addresses
                        .iter()
                        .enumerate()
                        .filter_map(|(j, a)| {
                            Some((
                                format!("{field}.additionalAddresses[{j}].address"),
                                a.address.as_ref()?,
                            ))
                        }),
                );
            for (field, a) in addrs {
                let Some((ip, _)) = crate::envoy_pb::ip_port(a) else {
                    continue;
                };
                let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() else {
                    continue;
                };
                if pool.contains(ip) && !own.contains(&ip) {
                    return Some(format!(
                        "{key}: {field}.socketAddress.address: {ip} is in the load-balancer pool {pool}, which only the Services it is assigned to may bind (list the Service in spec.services)"
                    ));
                }
            }
        }
        None
    }

    /// The CEC's listeners with their addresses, encoded, and every
    /// address they bind. Reuses the previous pass's result when neither
    /// the CEC version nor its placement changed.
    #[allow(clippy::type_complexity)]
    fn place_listeners(
        &mut self,
        snap: &StoreSnapshot,
        key: &ObjectKey,
        spec: &EnvoyConfigSpec,
        prepared: &Arc<Prepared>,
        binds: &Binds,
        services_same: bool,
    ) -> Result<(Vec<Built>, Vec<(usize, String, String, u32)>), (usize, String)> {
        let fe = match self.placed.get(key) {
            // Frontends come from the Services: unchanged with them.
            Some(p) if services_same && Arc::ptr_eq(&p.prepared, prepared) => p.key.0.clone(),
            _ => frontends(snap, &key.namespace, spec, &prepared.parsed, self.ports),
        };
        // Proxy ports are stable per listener name, so asking for them here
        // gives what `place` will assign.
        let mut proxy = Vec::new();
        for pl in &prepared.parsed.listeners {
            // In transparent mode listeners with frontends get a proxy port too.
            if pl.needs_address
                && (self.ports.transparent || fe.get(&pl.local_name).is_none_or(Vec::is_empty))
            {
                match self
                    .proxy_ports
                    .port_for(&pl.listener.name, &binds.reserved)
                {
                    Some(p) => proxy.push(p),
                    None => return Err((pl.index, "no free proxy port left".into())),
                }
            }
        }
        let place_key = (fe, proxy);
        if let Some(p) = self.placed.get(key)
            && Arc::ptr_eq(&p.prepared, prepared)
            && p.key == place_key
        {
            return Ok((p.listeners.clone(), p.bound.clone()));
        }
        let mut only_listeners = ParsedCec {
            listeners: prepared.parsed.listeners.clone(),
            routes: Vec::new(),
            clusters: Vec::new(),
            endpoints: Vec::new(),
            secrets: Vec::new(),
            encoded: Vec::new(),
        };
        place(
            &mut only_listeners,
            &place_key.0,
            &mut self.proxy_ports,
            &binds.reserved,
            self.ports.transparent,
        )?;
        let listeners: Vec<Built> = only_listeners
            .listeners
            .iter()
            .map(|l| built(l.listener.name.clone(), to_any(&l.listener)))
            .collect();
        let bound = bound_addresses(&only_listeners);
        let redirects = redirect_targets(&only_listeners, &place_key.0, self.ports.transparent);
        self.placed.insert(
            key.clone(),
            Placed {
                prepared: prepared.clone(),
                key: place_key,
                listeners: listeners.clone(),
                bound: bound.clone(),
                redirects,
            },
        );
        Ok((listeners, bound))
    }
}

fn conflict(
    key: &ObjectKey,
    bound: &[(usize, String, String, u32)],
    defined: &[(&'static str, String)],
    binds: &Binds,
    names: &Names<'_>,
    configs: &[(ObjectKey, &EnvoyConfigSpec, &str, Option<Timestamp>)],
) -> Option<String> {
    for (index, listener, ip, port) in bound {
        if let Some(owner) = binds.owner(ip, *port) {
            return Some(format!(
                "{key}: spec.resources[{index}] (listener {listener}): address {ip}:{port} is already used by {owner}"
            ));
        }
    }
    for (t, n) in defined {
        if let Some(owner) = names.get(t, n).map(|i| &configs[i].0) {
            return Some(format!(
                "{key}: spec.resources: resource {n} is already defined by {owner}"
            ));
        }
    }
    None
}

/// Return memory freed by dropped objects to the OS. glibc keeps freed
/// small allocations (a decoded CEC is millions of them) in its arenas, so
/// without this RSS stays at its peak after a large CEC is deleted.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sleeps until `at` (forever when `None`): the control loop's wake-up
/// for quarantine retries.
pub async fn retry_timer(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Log warnings that are new or changed, and publish the current set for
/// `membrane status`.
pub fn publish_warnings(
    logged: &mut BTreeMap<String, String>,
    now: BTreeMap<ObjectKey, String>,
    shown: &std::sync::Mutex<BTreeMap<String, String>>,
) {
    let now: BTreeMap<String, String> = now.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    for (object, reason) in &now {
        if logged.get(object) != Some(reason) {
            tracing::warn!(%object, %reason, "serving with a warning");
        }
    }
    if *logged != now {
        if let Ok(mut w) = shown.lock() {
            *w = now.clone();
        }
        *logged = now;
    }
}

/// `<ns>/<svc>:<port>` → its parts, when it names a Service port.
fn split_eds_name(n: &str) -> Option<(&str, &str, &str)> {
    let (ns, rest) = n.split_once('/')?;
    let (svc, port) = rest.rsplit_once(':')?;
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', ':']);
    (plain(ns) && plain(svc) && plain(port)).then_some((ns, svc, port))
}

/// The shared empty assignment named `name`, encoded once.
fn empty_eds(
    cache: &HashMap<String, Built>,
    used: &mut HashMap<String, Built>,
    name: &str,
) -> Built {
    if let Some(b) = used.get(name) {
        return b.clone();
    }
    let b = cache
        .get(name)
        .cloned()
        .unwrap_or_else(|| built(name.to_owned(), to_any(&empty_assignment(name.to_owned()))));
    used.insert(name.to_owned(), b.clone());
    b
}

/// The warning of a listener waiting for routes no CEC defines.
fn rds_warning(key: &ObjectKey, field: &str, name: &str) -> String {
    format!(
        "{key}: {field}: route configuration {name} is not defined by any CiliumEnvoyConfig; Envoy waits for it and the listener serves no routes"
    )
}

/// Same resource: the same `Arc`, or the same type, name and content hash.
fn same_built(a: &Built, b: &Built) -> bool {
    Arc::ptr_eq(a, b) || (a.hash == b.hash && a.name == b.name && a.type_url == b.type_url)
}

fn built(name: String, body: Any) -> Built {
    Arc::new(Resource::with_name(name, body))
}

/// The `'static` type URL constant equal to `t`.
fn static_type(t: &str) -> &'static str {
    [
        type_url::LISTENER,
        type_url::ROUTE,
        type_url::CLUSTER,
        type_url::ENDPOINT,
        type_url::SECRET,
    ]
    .into_iter()
    .find(|s| *s == t)
    .unwrap_or(type_url::CLUSTER)
}

fn resource_names(p: &ParsedCec) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    out.extend(
        p.listeners
            .iter()
            .map(|l| (type_url::LISTENER, l.listener.name.clone())),
    );
    out.extend(p.routes.iter().map(|r| (type_url::ROUTE, r.name.clone())));
    out.extend(
        p.clusters
            .iter()
            .map(|c| (type_url::CLUSTER, c.name.clone())),
    );
    out.extend(
        p.endpoints
            .iter()
            .map(|e| (type_url::ENDPOINT, e.cluster_name.clone())),
    );
    out.extend(p.secrets.iter().map(|s| (type_url::SECRET, s.name.clone())));
    out.extend(p.encoded.iter().map(|e| {
        let r = &e.resource;
        (static_type(&r.type_url), r.name.clone())
    }));
    out
}

pub use membrane_crds::selects_node as selects;
