//! Snapshot cache: the resources served to each Envoy node, plus the
//! per-stream protocol state (what was sent, ACKed and NACKed).
//!
//! The protocol decisions (what to push, when, in which order) live here as
//! plain synchronous code driven by the server's stream tasks, so every
//! decision happens under one lock and can be reported in
//! [`SnapshotCache::status`]. State-of-the-world and incremental (delta)
//! streams share that logic: it yields protocol-neutral [`Push`]es, which
//! the server renders as either response type.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use serde::Serialize;
use tokio::sync::watch;

use crate::codec::{self, CodecError, type_url};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("duplicate {type_url} resource named {name:?}")]
    Duplicate { type_url: String, name: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// One xDS resource, immutable once built; shared as `Arc<Resource>`.
///
/// Equality is by name, type and content hash (equal hash ⇔ same content),
/// and `Eq` lets `Arc`'s comparison start with the pointer: comparing two
/// maps that share most entries costs what differs.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub type_url: String,
    pub body: Any,
    /// Hash of the type URL and encoded bytes: equal hash ⇔ same content.
    pub hash: u64,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.name == other.name && self.type_url == other.type_url
    }
}

impl Eq for Resource {}

impl Resource {
    /// Builds a resource, taking its name from the message (see
    /// [`codec::resource_name`]).
    pub fn new(body: Any) -> Result<Self, CodecError> {
        let name = codec::resource_name(&body)?;
        Ok(Self::with_name(name, body))
    }

    /// Builds a resource with an explicit name.
    pub fn with_name(name: impl Into<String>, body: Any) -> Self {
        let mut h = Fnv::new();
        h.write(body.type_url.as_bytes());
        h.write(&[0]);
        h.write(&body.value);
        Self {
            name: name.into(),
            type_url: body.type_url.clone(),
            hash: h.finish(),
            body,
        }
    }

    /// Packs a typed message.
    pub fn from_message<T: prost::Message + prost::Name>(msg: &T) -> Result<Self, CodecError> {
        Self::new(codec::encode(msg))
    }

    /// Decodes a protojson object with `@type`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, CodecError> {
        Self::new(codec::any_from_json(v)?)
    }

    /// The per-resource version sent in delta responses (the content hash).
    pub fn version(&self) -> String {
        format!("{:016x}", self.hash)
    }

    /// Stands in for a resource a delta client reported having
    /// (`initial_resource_versions`) that the snapshot does not hold with
    /// that version. Never sent: it only records what the client runs.
    fn placeholder(name: &str, type_url: &str, version: &str) -> Self {
        // Our own versions parse back to the hash; anything else gets a
        // hash no snapshot resource will match in practice.
        let hash = match u64::from_str_radix(version, 16) {
            Ok(h) if version.len() == 16 => h,
            _ => {
                let mut h = Fnv::new();
                h.write(b"foreign-version\0");
                h.write(version.as_bytes());
                h.finish()
            }
        };
        Self {
            name: name.to_owned(),
            type_url: type_url.to_owned(),
            body: Any {
                type_url: type_url.to_owned(),
                value: Vec::new(),
            },
            hash,
        }
    }
}

/// Resources of one type, by name. Persistent: a clone is O(1) and shares
/// structure with the original, so a snapshot update, a stream's selection
/// and a diff between two related maps cost what changed, not the type's
/// size.
pub type ResourceMap = imbl::OrdMap<String, Arc<Resource>>;

/// A complete, consistent set of resources for one node (or the default).
///
/// Each type's map is shared (`Arc`): every stream that follows a whole
/// type holds the same map rather than a copy, and a type's version is
/// computed once per snapshot rather than once per stream.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    types: BTreeMap<String, TypeEntry>,
}

/// One type's resources, with what lets a change cost the change: the
/// version kept up to date entry by entry, an identity of the key set, and
/// the names the last updates touched.
#[derive(Debug, Clone, Default)]
struct TypeEntry {
    map: Arc<ResourceMap>,
    /// Sum of [`entry_digest`] over the map: the type's version.
    digest: u64,
    /// Changes whenever a name is added or removed (0: never had one).
    keys: u64,
    /// The latest updates into `map`, oldest first.
    log: Arc<Vec<Transition>>,
}

/// An update of a type's map: the map it started from and the names it
/// touched. `from` is weak so that it neither keeps old maps alive nor
/// forces a copy on the next in-place update.
#[derive(Debug, Clone)]
struct Transition {
    from: std::sync::Weak<ResourceMap>,
    names: Vec<String>,
}

/// How many updates a stream may lag behind and still be diffed by name.
const LOG_LEN: usize = 8;

/// A fresh key-set identity.
fn next_keys_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl TypeEntry {
    /// Puts `r`; true when its name is new.
    fn put(&mut self, r: Arc<Resource>) -> bool {
        self.digest = self.digest.wrapping_add(entry_digest(&r.name, r.hash));
        match Arc::make_mut(&mut self.map).insert(r.name.clone(), r) {
            Some(old) => {
                self.digest = self.digest.wrapping_sub(entry_digest(&old.name, old.hash));
                false
            }
            None => {
                self.keys = next_keys_id();
                true
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = Arc::make_mut(&mut self.map).remove(name) {
            self.digest = self.digest.wrapping_sub(entry_digest(&old.name, old.hash));
            self.keys = next_keys_id();
        }
    }

    /// The names that differ between `from` (a map this type held before)
    /// and the current map, if the log reaches back to it.
    ///
    /// `from` is compared by address: callers hold it (or a `Weak` to it),
    /// so the address cannot have been reused.
    fn changed_since(&self, from: *const ResourceMap) -> Option<BTreeSet<&str>> {
        let start = self
            .log
            .iter()
            .position(|t| std::ptr::eq(t.from.as_ptr(), from))?;
        Some(
            self.log[start..]
                .iter()
                .flat_map(|t| t.names.iter().map(String::as_str))
                .collect(),
        )
    }
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.types.len() == other.types.len()
            && self
                .types
                .iter()
                .zip(&other.types)
                .all(|((ta, a), (tb, b))| ta == tb && same_map(&a.map, &b.map))
    }
}

impl Snapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a snapshot from resources; a duplicate name within a type is an error.
    pub fn from_resources(
        resources: impl IntoIterator<Item = Arc<Resource>>,
    ) -> Result<Self, CacheError> {
        let mut s = Self::new();
        for r in resources {
            s.insert(r)?;
        }
        Ok(s)
    }

    pub fn insert(&mut self, r: Arc<Resource>) -> Result<(), CacheError> {
        let entry = self.types.entry(r.type_url.clone()).or_default();
        if entry.map.contains_key(&r.name) {
            return Err(CacheError::Duplicate {
                type_url: r.type_url.clone(),
                name: r.name.clone(),
            });
        }
        // A map being built: nothing to diff against by name.
        entry.log = Arc::default();
        entry.put(r);
        Ok(())
    }

    /// Keyed update: puts `upserts` (replacing resources of the same type
    /// and name) and drops `removals` (`(type_url, name)`). Only the types
    /// touched get a new map (and version); the others stay shared, so
    /// streams skip them without comparing.
    pub fn update(
        &mut self,
        upserts: impl IntoIterator<Item = Arc<Resource>>,
        removals: impl IntoIterator<Item = (String, String)>,
    ) {
        // Per touched type: the map it started from and the names touched.
        let mut touched: BTreeMap<String, Transition> = BTreeMap::new();
        let mut touch = |entry: &TypeEntry, type_url: &str, name: &str| {
            touched
                .entry(type_url.to_owned())
                .or_insert_with(|| Transition {
                    from: Arc::downgrade(&entry.map),
                    names: Vec::new(),
                })
                .names
                .push(name.to_owned());
        };
        for (type_url, name) in removals {
            if let Some(entry) = self.types.get_mut(&type_url)
                && entry.map.contains_key(&name)
            {
                touch(entry, &type_url, &name);
                entry.remove(&name);
            }
        }
        for r in upserts {
            let entry = self.types.entry(r.type_url.clone()).or_default();
            if entry
                .map
                .get(&r.name)
                .is_some_and(|old| Arc::ptr_eq(old, &r))
            {
                continue;
            }
            touch(entry, &r.type_url, &r.name);
            entry.put(r);
        }
        for (type_url, transition) in touched {
            if let Some(entry) = self.types.get_mut(&type_url) {
                let log = Arc::make_mut(&mut entry.log);
                if log.len() == LOG_LEN {
                    log.remove(0);
                }
                log.push(transition);
            }
        }
        self.types.retain(|_, e| !e.map.is_empty());
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<Resource>> {
        self.types.get(type_url)?.map.get(name)
    }

    /// All resources of one type (empty map if none).
    pub fn resources(&self, type_url: &str) -> &ResourceMap {
        static EMPTY: std::sync::LazyLock<ResourceMap> = std::sync::LazyLock::new(ResourceMap::new);
        self.types.get(type_url).map(|e| &*e.map).unwrap_or(&EMPTY)
    }

    fn shared(&self, type_url: &str) -> Option<&Arc<ResourceMap>> {
        self.types.get(type_url).map(|e| &e.map)
    }

    /// Every resource, ordered by type URL then name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.types.values().flat_map(|e| e.map.values())
    }

    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.types.values().map(|e| e.map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Content-derived version of one type: identical content ⇒ identical version.
    pub fn version(&self, type_url: &str) -> String {
        format_version(self.types.get(type_url).map_or(0, |e| e.digest))
    }

    /// Identity of the key set of `type_url` (equal ⇒ same names).
    fn keys_id(&self, type_url: &str) -> u64 {
        self.types.get(type_url).map_or(0, |e| e.keys)
    }

    /// The names of `type_url` that may differ between `from` and this
    /// snapshot's map, when `from` is one of the maps it was updated from.
    fn changed_since(&self, type_url: &str, from: &Arc<ResourceMap>) -> Option<BTreeSet<&str>> {
        self.types.get(type_url)?.changed_since(Arc::as_ptr(from))
    }

    /// The version of `map` if it is this snapshot's map of `type_url`.
    fn version_if_shared(&self, type_url: &str, map: &Arc<ResourceMap>) -> Option<String> {
        self.shared(type_url)
            .filter(|m| Arc::ptr_eq(m, map))
            .map(|_| self.version(type_url))
    }
}

/// Same names with the same content (maps are sorted by name); shared
/// parts of the two trees are skipped.
fn same_map(a: &ResourceMap, b: &ResourceMap) -> bool {
    a.len() == b.len() && a.diff(b).next().is_none()
}

/// What changed from `old` to `new`: resources added or with new content
/// (plus any named in `resend`), and names that are gone, in name order.
/// Parts of the trees the two maps share are skipped.
fn diff(
    old: &ResourceMap,
    new: &ResourceMap,
    resend: &BTreeSet<String>,
) -> (Vec<Arc<Resource>>, Vec<String>) {
    use imbl::ordmap::DiffItem;
    let mut updated = Vec::new();
    let mut removed = Vec::new();
    for item in old.diff(new) {
        match item {
            DiffItem::Add(_, r) | DiffItem::Update { new: (_, r), .. } => updated.push(r.clone()),
            DiffItem::Remove(n, _) => removed.push(n.clone()),
        }
    }
    let again: Vec<Arc<Resource>> = resend
        .iter()
        .filter_map(|n| new.get(n))
        .filter(|r| old.get(&r.name).is_some_and(|o| o.hash == r.hash))
        .cloned()
        .collect();
    if !again.is_empty() {
        updated.extend(again);
        updated.sort_by(|a, b| a.name.cmp(&b.name));
    }
    (updated, removed)
}

/// [`diff`] restricted to `names` (and `resend`): those are all the names
/// in which `old` and `new` may differ.
fn diff_names<'a>(
    old: &ResourceMap,
    new: &ResourceMap,
    mut names: BTreeSet<&'a str>,
    resend: &'a BTreeSet<String>,
) -> (Vec<Arc<Resource>>, Vec<String>) {
    names.extend(resend.iter().map(String::as_str));
    let mut updated = Vec::new();
    let mut removed = Vec::new();
    for name in names {
        match (old.get(name), new.get(name)) {
            (Some(o), Some(n)) => {
                if o.hash != n.hash || resend.contains(name) {
                    updated.push(n.clone());
                }
            }
            (None, Some(n)) => updated.push(n.clone()),
            (Some(_), None) => removed.push(name.to_owned()),
            (None, None) => {}
        }
    }
    (updated, removed)
}

/// Content-derived version of any map: the same as a snapshot keeps for
/// its own maps entry by entry.
fn version_of(m: &ResourceMap) -> String {
    format_version(m.iter().fold(0u64, |d, (name, r)| {
        d.wrapping_add(entry_digest(name, r.hash))
    }))
}

fn format_version(digest: u64) -> String {
    format!("{digest:016x}")
}

/// One entry's share of a version: order-independent, so a version is
/// updated per changed entry instead of re-hashing the whole type.
fn entry_digest(name: &str, hash: u64) -> u64 {
    let mut h = Fnv::new();
    h.write(name.as_bytes());
    h.write(&[0]);
    h.write(&hash.to_le_bytes());
    // splitmix64's finalizer spreads FNV's weak high bits before summing.
    let mut z = h.finish();
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a: stable across processes and Rust versions, unlike `DefaultHasher`.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

// ---------------------------------------------------------------------------
// Status (serializable view)

/// What the control plane knows about every connected Envoy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct XdsStatus {
    pub streams: Vec<StreamStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamStatus {
    pub stream_id: u64,
    pub protocol: Protocol,
    /// Empty until the first request carrying a node arrives.
    pub node_id: String,
    /// The node's `metadata.labels`, which CEC `nodeSelector`s match.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub connected_since: u64,
    pub types: BTreeMap<String, TypeStatus>,
}

/// The xDS transport variant a stream speaks (both are aggregated: ADS).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `StreamAggregatedResources`: every response carries the full set.
    StateOfTheWorld,
    /// `DeltaAggregatedResources`: responses carry changes and removals.
    Delta,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TypeStatus {
    pub wildcard: bool,
    pub subscribed: Vec<String>,
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub sent_resources: usize,
    /// A response was sent and neither ACKed nor NACKed yet.
    pub pending: bool,
    pub acked_version: Option<String>,
    pub acked_resources: usize,
    /// The most recent response was rejected (its NACK is `last_nack`).
    pub rejected: bool,
    pub last_nack: Option<NackStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NackStatus {
    /// Version of the rejected response.
    pub version: String,
    pub nonce: String,
    pub error_detail: String,
    /// Unix seconds.
    pub at: u64,
}

// ---------------------------------------------------------------------------
// Cache

/// Shared handle to the snapshots and stream states; clone freely.
#[derive(Clone, Default)]
pub struct SnapshotCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SnapshotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCache").finish_non_exhaustive()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Bumped on every snapshot change; stream tasks re-evaluate on it.
    snapshots: watch::Sender<u64>,
    /// Bumped on ACK/NACK/connect/disconnect.
    events: watch::Sender<u64>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            snapshots: watch::Sender::new(0),
            events: watch::Sender::new(0),
        }
    }
}

#[derive(Default)]
struct State {
    default: Option<Arc<Snapshot>>,
    nodes: HashMap<String, Arc<Snapshot>>,
    streams: BTreeMap<u64, StreamState>,
    next_stream: u64,
    next_nonce: u64,
}

impl State {
    fn snapshot_for(&self, node: Option<&str>) -> Option<Arc<Snapshot>> {
        node.and_then(|n| self.nodes.get(n))
            .or(self.default.as_ref())
            .cloned()
    }
}

struct StreamState {
    protocol: Protocol,
    node_id: Option<String>,
    /// `node.metadata.labels` (string values) of the first request.
    node_labels: BTreeMap<String, String>,
    connected_since: u64,
    types: BTreeMap<String, TypeState>,
}

struct TypeState {
    type_url: String,
    wildcard: bool,
    /// The wildcard was implied by an empty first request rather than an
    /// explicit "*"; a later explicit subscription replaces it.
    legacy_wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds as far as we know: the last response (SotW),
    /// or everything sent and not removed since (delta).
    sent: Arc<ResourceMap>,
    sent_version: Option<String>,
    sent_nonce: Option<String>,
    pending: bool,
    /// The last ACKed state (shared with `sent` at the time of the ACK).
    acked: Arc<ResourceMap>,
    acked_version: Option<String>,
    last_nack: Option<NackStatus>,
    /// An initial request must be answered even if nothing changed.
    force: bool,
    /// Names to send again even though the client has them unchanged.
    resend: BTreeSet<String>,
    /// Bumped whenever `names` changes.
    names_gen: u64,
    /// `(key set, names_gen)` at which `names` was found to be every name
    /// of the type, so the check is not repeated per response.
    everything_at: Option<(u64, u64)>,
    /// What `names` selects from the snapshot when that is not everything
    /// of the type, kept between evaluations.
    selection: Option<Selection>,
}

/// A subscription's part of a snapshot map, updated from the names the
/// snapshot's log says changed rather than rebuilt from every subscribed
/// name (Envoy subscribes to each cluster's endpoints by name, so this is
/// the EDS selection of every stream).
struct Selection {
    /// The snapshot map it was taken from (weak, as [`Transition::from`]).
    source: std::sync::Weak<ResourceMap>,
    names_gen: u64,
    map: Arc<ResourceMap>,
    /// Sum of [`entry_digest`] over `map`: its version.
    digest: u64,
}

impl Selection {
    fn take(&mut self, name: &str, all: &ResourceMap) {
        let map = Arc::make_mut(&mut self.map);
        if let Some(old) = map.remove(name) {
            self.digest = self.digest.wrapping_sub(entry_digest(name, old.hash));
        }
        if let Some(r) = all.get(name) {
            self.digest = self.digest.wrapping_add(entry_digest(name, r.hash));
            map.insert(name.to_owned(), r.clone());
        }
    }
}

/// Listeners and clusters are the roots of Envoy's configuration: an empty
/// first request for them is the legacy wildcard.
fn legacy_wildcard_type(type_url: &str) -> bool {
    type_url == type_url::LISTENER || type_url == type_url::CLUSTER
}

impl TypeState {
    fn new(type_url: &str) -> Self {
        Self {
            type_url: type_url.to_owned(),
            wildcard: false,
            legacy_wildcard: false,
            names: BTreeSet::new(),
            sent: Arc::default(),
            sent_version: None,
            sent_nonce: None,
            pending: false,
            acked: Arc::default(),
            acked_version: None,
            last_nack: None,
            force: false,
            resend: BTreeSet::new(),
            names_gen: 0,
            everything_at: None,
            selection: None,
        }
    }

    fn subscribed(&self) -> bool {
        self.wildcard || !self.names.is_empty()
    }

    /// Applies a state-of-the-world request's full subscription.
    fn update_subscription(&mut self, resource_names: &[String]) {
        let names: BTreeSet<String> = resource_names.iter().cloned().collect();
        // "*" is the explicit wildcard for any type.
        self.wildcard =
            names.contains("*") || (legacy_wildcard_type(&self.type_url) && names.is_empty());
        let names: BTreeSet<String> = names.into_iter().filter(|n| n != "*").collect();
        if names != self.names {
            self.names = names;
            self.names_gen += 1;
        }
        self.forget_unselected();
    }

    /// Applies a delta request's subscription changes; `first` marks the
    /// stream's first request for this type.
    fn update_delta_subscription(
        &mut self,
        req: &DeltaDiscoveryRequest,
        first: bool,
        snap: Option<&Snapshot>,
    ) {
        if first {
            if req.resource_names_subscribe.is_empty() && legacy_wildcard_type(&self.type_url) {
                self.wildcard = true;
                self.legacy_wildcard = true;
            }
            // A reconnecting client says what it already runs: that is not
            // sent again, and counts as ACKed.
            for (name, version) in &req.initial_resource_versions {
                let held = snap
                    .and_then(|s| s.get(&self.type_url, name))
                    .filter(|r| r.version() == *version)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Resource::placeholder(name, &self.type_url, version))
                    });
                Arc::make_mut(&mut self.acked).insert(name.clone(), held.clone());
                Arc::make_mut(&mut self.sent).insert(name.clone(), held);
            }
        }
        let mut explicit = false;
        // Only a narrower selection can leave sent or ACKed names behind.
        let mut narrowed = first;
        for n in &req.resource_names_subscribe {
            if n == "*" {
                self.wildcard = true;
                self.legacy_wildcard = false;
            } else {
                explicit = true;
                // A (re-)subscription means the client may not hold the
                // resource (it drops what it unsubscribes), unless it just
                // reported its version.
                if !req.initial_resource_versions.contains_key(n) && self.sent.contains_key(n) {
                    Arc::make_mut(&mut self.sent).remove(n);
                }
                if self.names.insert(n.clone()) {
                    self.names_gen += 1;
                }
            }
        }
        if explicit && self.legacy_wildcard {
            self.wildcard = false;
            self.legacy_wildcard = false;
            narrowed = true;
        }
        for n in &req.resource_names_unsubscribe {
            narrowed = true;
            if n == "*" {
                self.wildcard = false;
                self.legacy_wildcard = false;
            } else {
                if self.names.remove(n) {
                    self.names_gen += 1;
                }
                if self.sent.contains_key(n) {
                    Arc::make_mut(&mut self.sent).remove(n);
                }
                if self.acked.contains_key(n) {
                    Arc::make_mut(&mut self.acked).remove(n);
                }
            }
        }
        // An ACK carries no subscription change: checking every sent name
        // against the selection would cost the whole type per ACK.
        if narrowed {
            self.forget_unselected();
        }
    }

    /// Forgets what the client no longer follows, so a later re-subscribe
    /// is answered and comparisons only cover subscribed names.
    fn forget_unselected(&mut self) {
        if !self.wildcard {
            // Only copy a shared map when something actually goes.
            let names = &self.names;
            for map in [&mut self.sent, &mut self.acked] {
                let gone: Vec<String> = map
                    .keys()
                    .filter(|n| !names.contains(*n))
                    .cloned()
                    .collect();
                if !gone.is_empty() {
                    let map = Arc::make_mut(map);
                    for n in &gone {
                        map.remove(n);
                    }
                }
            }
        }
    }

    /// The resources of `snap` this subscription selects: the snapshot's
    /// own shared map when that is everything of the type, else the kept
    /// [`Selection`] brought up to date.
    fn target(&mut self, snap: Option<&Snapshot>) -> Arc<ResourceMap> {
        let Some(snap) = snap else {
            return Arc::default();
        };
        let Some(all) = snap.shared(&self.type_url) else {
            return Arc::default();
        };
        if self.wildcard || self.selects_everything(snap, all) {
            return all.clone();
        }
        if let Some(sel) = &mut self.selection
            && sel.names_gen == self.names_gen
        {
            if std::ptr::eq(sel.source.as_ptr(), Arc::as_ptr(all)) {
                return sel.map.clone();
            }
            if let Some(changed) = snap
                .types
                .get(&self.type_url)
                .and_then(|e| e.changed_since(sel.source.as_ptr()))
            {
                for name in changed {
                    if self.names.contains(name) {
                        sel.take(name, all);
                    }
                }
                sel.source = Arc::downgrade(all);
                return sel.map.clone();
            }
        }
        let mut sel = Selection {
            source: Arc::downgrade(all),
            names_gen: self.names_gen,
            map: Arc::default(),
            digest: 0,
        };
        for name in &self.names {
            sel.take(name, all);
        }
        let map = sel.map.clone();
        self.selection = Some(sel);
        map
    }

    /// The version of `map` when it is the kept selection.
    fn selection_version(&self, map: &Arc<ResourceMap>) -> Option<String> {
        self.selection
            .as_ref()
            .filter(|s| Arc::ptr_eq(&s.map, map))
            .map(|s| format_version(s.digest))
    }

    /// Whether `names` is exactly the key set of `all` (the snapshot's map
    /// of this type), remembered per key set and selection.
    fn selects_everything(&self, snap: &Snapshot, all: &ResourceMap) -> bool {
        let at = (snap.keys_id(&self.type_url), self.names_gen);
        if self.everything_at == Some(at) {
            return true;
        }
        self.names.len() == all.len() && self.names.iter().zip(all.keys()).all(|(a, b)| a == b)
    }

    /// Envoy runs exactly what `snap` selects for this type.
    fn settled(&mut self, snap: Option<&Snapshot>) -> bool {
        if self.pending {
            return false;
        }
        let target = self.target(snap);
        Arc::ptr_eq(&self.acked, &target) || same_map(&self.acked, &target)
    }

    /// Records what a request says about our last response; returns whether
    /// subscribers of the event tick should hear about it.
    fn record_reply(&mut self, kind: RequestKind, req: &Incoming<'_>, node: &str) -> bool {
        match kind {
            // The client answers our newer response soon; nothing to record.
            RequestKind::Stale => {
                tracing::debug!(type_url = %self.type_url, nonce = %req.response_nonce, "xds: ignoring stale nonce");
                false
            }
            RequestKind::Subscribe => false,
            RequestKind::Initial => {
                self.pending = false;
                self.force = true;
                false
            }
            RequestKind::Ack => {
                self.pending = false;
                self.acked = self.sent.clone();
                self.acked_version = self.sent_version.clone();
                true
            }
            RequestKind::Nack => {
                // What was sent stays recorded as sent, so the rejected
                // content is not pushed again; only a new snapshot is.
                self.pending = false;
                let detail = req
                    .error_detail
                    .map(|s| s.message.clone())
                    .unwrap_or_default();
                let version = self.sent_version.clone().unwrap_or_default();
                tracing::warn!(
                    node,
                    type_url = %self.type_url,
                    version,
                    nonce = %req.response_nonce,
                    error = %detail,
                    "xds: Envoy rejected configuration (NACK)"
                );
                self.last_nack = Some(NackStatus {
                    version,
                    nonce: req.response_nonce.to_owned(),
                    error_detail: detail,
                    at: now_unix(),
                });
                true
            }
        }
    }

    fn status(&self) -> TypeStatus {
        TypeStatus {
            wildcard: self.wildcard,
            subscribed: self.names.iter().cloned().collect(),
            sent_version: self.sent_version.clone(),
            sent_nonce: self.sent_nonce.clone(),
            sent_resources: self.sent.len(),
            pending: self.pending,
            acked_version: self.acked_version.clone(),
            acked_resources: self.acked.len(),
            rejected: self
                .last_nack
                .as_ref()
                .is_some_and(|n| Some(&n.nonce) == self.sent_nonce.as_ref()),
            last_nack: self.last_nack.clone(),
        }
    }
}

/// Push order for make-before-break: clusters and endpoints exist before the
/// listeners and routes that reference them.
fn rank(type_url: &str) -> u8 {
    match type_url {
        type_url::CLUSTER => 0,
        type_url::ENDPOINT => 1,
        type_url::SECRET => 2,
        type_url::LISTENER => 3,
        type_url::ROUTE => 4,
        type_url::VIRTUAL_HOST => 5,
        _ => 6,
    }
}

/// Types whose removals wait until listeners and routes no longer need them.
fn removed_last(type_url: &str) -> bool {
    type_url == type_url::CLUSTER || type_url == type_url::ENDPOINT
}

/// The endpoints (ClusterLoadAssignment) name a cluster resource uses.
fn eds_name(cluster: &Resource) -> String {
    Cluster::decode(cluster.body.value.as_slice())
        .ok()
        .and_then(|c| c.eds_cluster_config)
        .map(|e| e.service_name)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| cluster.name.clone())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One response decided by the shared push logic, before it is rendered for
/// the stream's protocol.
#[derive(Debug, Clone)]
pub(crate) struct Push {
    type_url: String,
    /// Version of the whole type after this push.
    version: String,
    nonce: String,
    /// Everything the client should hold afterwards (the SotW body).
    resources: Arc<ResourceMap>,
    /// Added, changed or re-sent resources (the delta body).
    updated: Vec<Arc<Resource>>,
    /// Names the client holds that are no longer selected (delta only).
    removed: Vec<String>,
}

impl Push {
    pub(crate) fn into_sotw(self) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: self.version,
            resources: self.resources.values().map(|r| r.body.clone()).collect(),
            type_url: self.type_url,
            nonce: self.nonce,
            ..Default::default()
        }
    }

    pub(crate) fn into_delta(self) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: self.version,
            resources: self
                .updated
                .iter()
                .map(|r| DeltaResource {
                    name: r.name.clone(),
                    version: r.version(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: self.type_url,
            removed_resources: self.removed,
            nonce: self.nonce,
            ..Default::default()
        }
    }
}

impl StreamState {
    /// Decides which responses to send now, in push order.
    fn evaluate(&mut self, snap: Option<&Snapshot>, nonce: &mut u64) -> Vec<Push> {
        // Listeners and routes stay on the old clusters until Envoy has ACKed
        // the new ones; only then may clusters and endpoints be dropped.
        let refs_settled = [type_url::LISTENER, type_url::ROUTE]
            .iter()
            .all(|t| self.types.get_mut(*t).is_none_or(|ts| ts.settled(snap)));

        let mut order: Vec<String> = self.types.keys().cloned().collect();
        order.sort_by_key(|t| (rank(t), t.clone()));

        let mut out = Vec::new();
        for t in order {
            // Listeners and routes wait while a cluster/endpoint/secret
            // response is in flight, so Envoy has what they reference.
            let early_in_flight = (3..=5).contains(&rank(&t))
                && self
                    .types
                    .values()
                    .any(|ts| rank(&ts.type_url) < 3 && ts.pending);
            let Some(ts) = self.types.get_mut(&t) else {
                continue;
            };
            if ts.pending || !ts.subscribed() || early_in_flight {
                continue;
            }
            let mut desired = ts.target(snap);
            if let Some(snap) = snap
                && !ts.wildcard
                && snap
                    .shared(&t)
                    .is_some_and(|all| Arc::ptr_eq(all, &desired))
            {
                ts.everything_at = Some((snap.keys_id(&t), ts.names_gen));
            }
            if removed_last(&t) && !refs_settled && !Arc::ptr_eq(&desired, &ts.sent) {
                // What was sent and is no longer desired (the structural
                // diff skips what the two maps share).
                let gone: Vec<(String, Arc<Resource>)> = ts
                    .sent
                    .diff(&desired)
                    .filter_map(|item| match item {
                        imbl::ordmap::DiffItem::Remove(n, r) => Some((n, r)),
                        _ => None,
                    })
                    .filter(|(n, _)| ts.wildcard || ts.names.contains(*n))
                    .map(|(n, r)| (n.clone(), r.clone()))
                    .collect();
                if !gone.is_empty() {
                    let map = Arc::make_mut(&mut desired);
                    for (n, r) in gone {
                        map.insert(n, r);
                    }
                }
            }
            let resend = std::mem::take(&mut ts.resend);
            let force = std::mem::take(&mut ts.force);
            // Unchanged shared map: nothing to compare. The snapshot's map
            // updated from what was sent: compare the names it touched.
            let (updated, removed) = if Arc::ptr_eq(&desired, &ts.sent) && resend.is_empty() {
                (Vec::new(), Vec::new())
            } else if let Some(names) = snap
                .filter(|s| s.shared(&t).is_some_and(|all| Arc::ptr_eq(all, &desired)))
                .and_then(|s| s.changed_since(&t, &ts.sent))
            {
                diff_names(&ts.sent, &desired, names, &resend)
            } else {
                diff(&ts.sent, &desired, &resend)
            };
            let must_answer = force
                && match self.protocol {
                    Protocol::StateOfTheWorld => ts.wildcard || !desired.is_empty(),
                    // Envoy's initialization waits for the first wildcard
                    // response, even an empty one.
                    Protocol::Delta => ts.wildcard,
                };
            if updated.is_empty() && removed.is_empty() && !must_answer {
                continue;
            }
            *nonce += 1;
            let version = snap
                .and_then(|s| s.version_if_shared(&t, &desired))
                .or_else(|| ts.selection_version(&desired))
                .unwrap_or_else(|| version_of(&desired));
            let nonce_s = nonce.to_string();
            tracing::debug!(
                type_url = %t,
                version,
                nonce = nonce_s,
                resources = desired.len(),
                updated = updated.len(),
                removed = removed.len(),
                "xds: sending"
            );
            // An added or modified cluster re-warms in Envoy and waits for
            // its endpoints even if they are unchanged (Envoy's EDS cache only
            // kicks in after initial_fetch_timeout), so they are sent again.
            let rewarm: Vec<String> = if t == type_url::CLUSTER {
                updated.iter().map(|r| eds_name(r)).collect()
            } else {
                Vec::new()
            };
            ts.sent_version = Some(version.clone());
            ts.sent_nonce = Some(nonce_s.clone());
            ts.pending = true;
            out.push(Push {
                type_url: t.clone(),
                version,
                nonce: nonce_s,
                resources: desired.clone(),
                updated,
                removed,
            });
            ts.sent = desired;
            if !rewarm.is_empty()
                && let Some(eds) = self.types.get_mut(type_url::ENDPOINT)
            {
                eds.resend.extend(rewarm);
            }
        }
        out
    }
}

/// What a request meant, for the server's logs and the event tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    /// The stream's first request for a type (SotW: any without a nonce).
    Initial,
    /// Delta only: subscription changes without answering a response.
    Subscribe,
    Ack,
    Nack,
    /// Answers a response other than the latest one of its type.
    Stale,
}

/// The fields SotW and delta requests share.
pub(crate) struct Incoming<'a> {
    node: Option<&'a Node>,
    type_url: &'a str,
    response_nonce: &'a str,
    error_detail: Option<&'a RpcStatus>,
}

impl SnapshotCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the snapshot of `node_id` (`None`: the default snapshot, served
    /// to every node without its own) and wakes the streams.
    pub fn set_snapshot(&self, node_id: Option<&str>, snapshot: Snapshot) {
        {
            let mut st = self.lock();
            let snap = Arc::new(snapshot);
            match node_id {
                Some(n) => {
                    st.nodes.insert(n.to_owned(), snap);
                }
                None => st.default = Some(snap),
            }
        }
        self.inner.snapshots.send_modify(|v| *v += 1);
    }

    /// Drops the node-specific snapshot of `node_id`; it falls back to the default.
    pub fn clear_snapshot(&self, node_id: &str) {
        let removed = self.lock().nodes.remove(node_id).is_some();
        if removed {
            self.inner.snapshots.send_modify(|v| *v += 1);
        }
    }

    /// The snapshot served to `node_id` (`None`: the default).
    pub fn snapshot(&self, node_id: Option<&str>) -> Option<Arc<Snapshot>> {
        self.lock().snapshot_for(node_id)
    }

    /// Ticks on every ACK, NACK, connect and disconnect.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.events.subscribe()
    }

    /// Labels of every identified node with an open stream (its newest
    /// stream's `node.metadata.labels`), by node id.
    pub fn connected_node_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let st = self.lock();
        st.streams
            .values()
            .filter_map(|s| Some((s.node_id.clone()?, s.node_labels.clone())))
            .collect()
    }

    /// Node ids of the open streams (those that identified themselves).
    pub fn connected_nodes(&self) -> Vec<String> {
        let st = self.lock();
        let set: BTreeSet<String> = st
            .streams
            .values()
            .filter_map(|s| s.node_id.clone())
            .collect();
        set.into_iter().collect()
    }

    pub fn status(&self) -> XdsStatus {
        let st = self.lock();
        XdsStatus {
            streams: st
                .streams
                .iter()
                .map(|(id, s)| StreamStatus {
                    stream_id: *id,
                    protocol: s.protocol,
                    node_id: s.node_id.clone().unwrap_or_default(),
                    node_labels: s.node_labels.clone(),
                    connected_since: s.connected_since,
                    types: s
                        .types
                        .iter()
                        .map(|(t, ts)| (t.clone(), ts.status()))
                        .collect(),
                })
                .collect(),
        }
    }

    /// Content hash of resource `name` as of the latest state of `type_url`
    /// that `node_id` ACKed, on its newest stream (either protocol). `None`
    /// if that node is not connected or has not ACKed the resource.
    /// Stop reporting the NACK `nonce` of `type_url` on `node_id`'s streams
    /// (the objects it was pinned on are gone). Only that NACK is cleared:
    /// a newer one stays.
    pub fn dismiss_nack(&self, node_id: &str, type_url: &str, nonce: &str) {
        let mut state = self.lock();
        let mut changed = false;
        for stream in state.streams.values_mut() {
            if stream.node_id.as_deref() != Some(node_id) {
                continue;
            }
            if let Some(t) = stream.types.get_mut(type_url)
                && t.last_nack.as_ref().is_some_and(|n| n.nonce == nonce)
            {
                t.last_nack = None;
                changed = true;
            }
        }
        drop(state);
        if changed {
            self.tick();
        }
    }

    /// What `node_id` ACKed, per type, on its newest stream (either
    /// protocol): the maps are shared, not copied, so one call under one lock
    /// replaces a lookup (and a lock) per resource. Empty if the node is not
    /// connected.
    pub fn acked_resources(&self, node_id: &str) -> BTreeMap<String, Arc<ResourceMap>> {
        let st = self.lock();
        st.streams
            .values()
            .rev()
            .find(|s| s.node_id.as_deref() == Some(node_id))
            .map(|s| {
                s.types
                    .iter()
                    .map(|(t, ts)| (t.clone(), ts.acked.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// [`Self::acked_resources`] with the id of the stream they come from:
    /// a new stream (an Envoy restart) starts from nothing ACKed.
    pub fn acked_resources_of_stream(
        &self,
        node_id: &str,
    ) -> (Option<u64>, BTreeMap<String, Arc<ResourceMap>>) {
        let st = self.lock();
        st.streams
            .iter()
            .rev()
            .find(|(_, s)| s.node_id.as_deref() == Some(node_id))
            .map(|(id, s)| {
                let acked = s
                    .types
                    .iter()
                    .map(|(t, ts)| (t.clone(), ts.acked.clone()))
                    .collect();
                (Some(*id), acked)
            })
            .unwrap_or_default()
    }

    pub fn acked_hash(&self, node_id: &str, type_url: &str, name: &str) -> Option<u64> {
        let st = self.lock();
        st.streams
            .values()
            .rev()
            .find(|s| s.node_id.as_deref() == Some(node_id))?
            .types
            .get(type_url)?
            .acked
            .get(name)
            .map(|r| r.hash)
    }

    /// Whether `node_id` has ACKed exactly this content of `resource`.
    pub fn is_acked(&self, node_id: &str, resource: &Resource) -> bool {
        self.acked_hash(node_id, &resource.type_url, &resource.name) == Some(resource.hash)
    }

    fn tick(&self) {
        self.inner.events.send_modify(|v| *v += 1);
    }

    pub(crate) fn snapshot_changes(&self) -> watch::Receiver<u64> {
        let mut rx = self.inner.snapshots.subscribe();
        rx.mark_unchanged();
        rx
    }

    pub(crate) fn open_stream(&self, protocol: Protocol) -> u64 {
        let id = {
            let mut st = self.lock();
            st.next_stream += 1;
            let id = st.next_stream;
            st.streams.insert(
                id,
                StreamState {
                    protocol,
                    node_id: None,
                    node_labels: BTreeMap::new(),
                    connected_since: now_unix(),
                    types: BTreeMap::new(),
                },
            );
            id
        };
        self.tick();
        id
    }

    pub(crate) fn close_stream(&self, id: u64) {
        let removed = self.lock().streams.remove(&id).is_some();
        if removed {
            self.tick();
        }
    }

    /// Processes one state-of-the-world request of stream `id`; returns the
    /// responses to send.
    pub(crate) fn handle_request(
        &self,
        id: u64,
        req: &DiscoveryRequest,
    ) -> (RequestKind, Vec<Push>) {
        let incoming = Incoming {
            node: req.node.as_ref(),
            type_url: &req.type_url,
            response_nonce: &req.response_nonce,
            error_detail: req.error_detail.as_ref(),
        };
        self.process(id, &incoming, |ts, _, _| {
            ts.update_subscription(&req.resource_names)
        })
    }

    /// Processes one delta request of stream `id`; returns the responses to send.
    pub(crate) fn handle_delta_request(
        &self,
        id: u64,
        req: &DeltaDiscoveryRequest,
    ) -> (RequestKind, Vec<Push>) {
        let incoming = Incoming {
            node: req.node.as_ref(),
            type_url: &req.type_url,
            response_nonce: &req.response_nonce,
            error_detail: req.error_detail.as_ref(),
        };
        self.process(id, &incoming, |ts, first, snap| {
            ts.update_delta_subscription(req, first, snap)
        })
    }

    /// The protocol-independent part of handling a request: node identity,
    /// nonce/ACK/NACK bookkeeping, then `subscribe` applies the request's
    /// subscription and the stream is re-evaluated.
    fn process(
        &self,
        id: u64,
        req: &Incoming<'_>,
        subscribe: impl FnOnce(&mut TypeState, bool, Option<&Snapshot>),
    ) -> (RequestKind, Vec<Push>) {
        let mut tick = false;
        let result = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(stream) = st.streams.get_mut(&id) else {
                return (RequestKind::Stale, Vec::new());
            };
            if stream.node_id.is_none()
                && let Some(node) = req.node
            {
                stream.node_id = Some(node.id.clone());
                stream.node_labels = node_labels(node);
                tick = true;
            }
            let node = stream.node_id.clone();
            let snap = st.snapshot_for(node.as_deref());
            let Some(stream) = st.streams.get_mut(&id) else {
                return (RequestKind::Stale, Vec::new());
            };
            let protocol = stream.protocol;
            let first = !stream.types.contains_key(req.type_url);
            let ts = stream
                .types
                .entry(req.type_url.to_owned())
                .or_insert_with(|| TypeState::new(req.type_url));

            let kind = if req.response_nonce.is_empty() {
                if protocol == Protocol::Delta && !first {
                    RequestKind::Subscribe
                } else {
                    RequestKind::Initial
                }
            } else if Some(req.response_nonce) != ts.sent_nonce.as_deref() {
                RequestKind::Stale
            } else if req.error_detail.is_some() {
                RequestKind::Nack
            } else {
                RequestKind::Ack
            };
            tick |= ts.record_reply(kind, req, node.as_deref().unwrap_or(""));

            // A stale SotW request is superseded by the client's answer to our
            // newer response, which carries its full subscription. Delta
            // subscription changes are never repeated, so they always apply.
            if kind == RequestKind::Stale && protocol == Protocol::StateOfTheWorld {
                (kind, Vec::new())
            } else {
                subscribe(ts, first, snap.as_deref());
                (kind, stream.evaluate(snap.as_deref(), &mut st.next_nonce))
            }
        };
        if tick {
            self.tick();
        }
        result
    }

    /// Re-evaluates stream `id` after a snapshot change.
    pub(crate) fn refresh_stream(&self, id: u64) -> Vec<Push> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let node = match st.streams.get(&id) {
            Some(s) => s.node_id.clone(),
            None => return Vec::new(),
        };
        let snap = st.snapshot_for(node.as_deref());
        match st.streams.get_mut(&id) {
            Some(s) => s.evaluate(snap.as_deref(), &mut st.next_nonce),
            None => Vec::new(),
        }
    }
}

/// String-valued entries of `node.metadata.labels`; other shapes are ignored.
fn node_labels(node: &envoy_types::pb::envoy::config::core::v3::Node) -> BTreeMap<String, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(Kind::StructValue(labels)) = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("labels"))
        .and_then(|v| v.kind.as_ref())
    else {
        return BTreeMap::new();
    };
    labels
        .fields
        .iter()
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = type_url::ENDPOINT;

    fn res(name: &str, content: u64) -> Arc<Resource> {
        Arc::new(Resource::with_name(
            name,
            Any {
                type_url: T.into(),
                value: content.to_le_bytes().to_vec(),
            },
        ))
    }

    /// xorshift64*: a fixed-seed sequence, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
        }
    }

    /// Up to `most` random puts (three contents) and removals among 40 names.
    fn random_update(rng: &mut Rng, snap: &mut Snapshot, most: u64) {
        let mut ups = Vec::new();
        let mut rms = Vec::new();
        for _ in 0..=rng.next(most - 1) {
            let name = format!("r{}", rng.next(40));
            if rng.next(4) == 0 {
                rms.push((T.to_owned(), name));
            } else {
                ups.push(res(&name, rng.next(3)));
            }
        }
        snap.update(ups, rms);
    }

    /// Random updates (puts, content changes, removals) to a snapshot while
    /// "streams" keep maps from 0–10 updates ago: the kept version equals
    /// the version computed from scratch, and the diff by touched names
    /// equals the full diff whenever the log reaches back that far.
    #[test]
    fn kept_version_and_diff_by_name_match_full_computation() {
        for seed in 1..=6u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut snap = Snapshot::new();
            let mut history: Vec<Arc<ResourceMap>> = Vec::new();
            let mut by_name = 0;
            for _ in 0..200 {
                random_update(&mut rng, &mut snap, 5);
                let now = snap.shared(T).cloned().unwrap_or_default();
                assert_eq!(snap.version(T), version_of(&now), "seed {seed}");
                let resend: BTreeSet<String> = if rng.next(5) == 0 {
                    [format!("r{}", rng.next(40))].into()
                } else {
                    BTreeSet::new()
                };
                for back in 0..history.len().min(10) {
                    let old = &history[history.len() - 1 - back];
                    let full = diff(old, &now, &resend);
                    if let Some(names) = snap.changed_since(T, old) {
                        by_name += 1;
                        let partial = diff_names(old, &now, names, &resend);
                        let key = |(u, r): &(Vec<Arc<Resource>>, Vec<String>)| {
                            (
                                u.iter()
                                    .map(|r| (r.name.clone(), r.hash))
                                    .collect::<Vec<_>>(),
                                r.clone(),
                            )
                        };
                        assert_eq!(key(&partial), key(&full), "seed {seed}, {back} back");
                    } else {
                        // Only an update that changed nothing (same map) or
                        // a type that was emptied on the way is not logged.
                        let emptied = history[history.len() - 1 - back..]
                            .iter()
                            .any(|m| m.is_empty());
                        assert!(
                            back >= LOG_LEN || Arc::ptr_eq(old, &now) || emptied || now.is_empty(),
                            "log lost a recent map ({back} back)"
                        );
                    }
                }
                history.push(now);
            }
            assert!(by_name > 500, "the by-name path ran only {by_name} times");
        }
    }

    /// Random snapshot updates and subscription changes: what a named
    /// subscription selects, kept and updated from the snapshot's log, is
    /// always what the names select from scratch, with that version.
    #[test]
    fn kept_selection_matches_the_selection_from_scratch() {
        for seed in 1..=6u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut snap = Snapshot::new();
            let mut ts = TypeState::new(T);
            let mut kept = 0;
            for _ in 0..300 {
                random_update(&mut rng, &mut snap, 4);
                if ts.names.is_empty() || rng.next(12) == 0 {
                    let names: Vec<String> = (0..40)
                        .filter(|_| rng.next(4) != 0)
                        .map(|i| format!("r{i}"))
                        .collect();
                    ts.update_subscription(&names);
                }
                if ts
                    .selection
                    .as_ref()
                    .is_some_and(|s| s.names_gen == ts.names_gen)
                {
                    kept += 1;
                }
                let got = ts.target(Some(&snap));
                let all = snap.resources(T);
                let want: ResourceMap = ts
                    .names
                    .iter()
                    .filter_map(|n| all.get(n).map(|r| (n.clone(), r.clone())))
                    .collect();
                assert!(same_map(&got, &want), "seed {seed}");
                assert_eq!(got.len(), want.len(), "seed {seed}");
                let everything = snap.shared(T).is_some_and(|m| Arc::ptr_eq(m, &got));
                if !everything && !got.is_empty() {
                    assert_eq!(
                        ts.selection_version(&got),
                        Some(version_of(&want)),
                        "seed {seed}"
                    );
                }
            }
            assert!(kept > 200, "the kept selection was used {kept} times");
        }
    }

    #[test]
    fn version_follows_content_not_order_or_history() {
        let a = Snapshot::from_resources([res("x", 1), res("y", 2)]).unwrap();
        let b = Snapshot::from_resources([res("y", 2), res("x", 1)]).unwrap();
        assert_eq!(a.version(T), b.version(T));
        let mut c = a.clone();
        c.update([res("x", 5)], Vec::new());
        assert_ne!(c.version(T), a.version(T));
        c.update([res("x", 1)], Vec::new());
        assert_eq!(c.version(T), a.version(T));
        c.update(Vec::new(), [(T.to_owned(), "y".to_owned())]);
        assert_eq!(
            c.version(T),
            Snapshot::from_resources([res("x", 1)]).unwrap().version(T)
        );
        // Cloned snapshots share the key-set identity until a name changes.
        assert_eq!(c.clone().keys_id(T), c.keys_id(T));
        let mut d = c.clone();
        d.update([res("z", 1)], Vec::new());
        assert_ne!(d.keys_id(T), c.keys_id(T));
    }
}
