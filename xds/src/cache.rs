//! Snapshot cache: the resources served to each Envoy node, plus the
//! per-stream protocol state (what was sent, ACKed and NACKed).
//!
//! The state-of-the-world protocol decisions live here as plain synchronous
//! code driven by the server's stream tasks, so every decision happens under
//! one lock and can be reported in [`SnapshotCache::status`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
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
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    pub type_url: String,
    pub body: Any,
    /// Hash of the type URL and encoded bytes: equal hash ⇔ same content.
    pub hash: u64,
}

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
}

/// Resources of one type, by name.
pub type ResourceMap = BTreeMap<String, Arc<Resource>>;

/// A complete, consistent set of resources for one node (or the default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    types: BTreeMap<String, ResourceMap>,
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
        let m = self.types.entry(r.type_url.clone()).or_default();
        if m.contains_key(&r.name) {
            return Err(CacheError::Duplicate {
                type_url: r.type_url.clone(),
                name: r.name.clone(),
            });
        }
        m.insert(r.name.clone(), r);
        Ok(())
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<Resource>> {
        self.types.get(type_url)?.get(name)
    }

    /// All resources of one type (empty map if none).
    pub fn resources(&self, type_url: &str) -> &ResourceMap {
        static EMPTY: ResourceMap = BTreeMap::new();
        self.types.get(type_url).unwrap_or(&EMPTY)
    }

    /// Every resource, ordered by type URL then name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.types.values().flat_map(|m| m.values())
    }

    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.types.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Content-derived version of one type: identical content ⇒ identical version.
    pub fn version(&self, type_url: &str) -> String {
        version_of(self.resources(type_url))
    }
}

fn version_of(m: &ResourceMap) -> String {
    let mut h = Fnv::new();
    for (name, r) in m {
        h.write(name.as_bytes());
        h.write(&[0]);
        h.write(&r.hash.to_le_bytes());
    }
    format!("{:016x}", h.finish())
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
    /// Empty until the first request carrying a node arrives.
    pub node_id: String,
    /// Unix seconds.
    pub connected_since: u64,
    pub types: BTreeMap<String, TypeStatus>,
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
    node_id: Option<String>,
    connected_since: u64,
    types: BTreeMap<String, TypeState>,
}

struct TypeState {
    type_url: String,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Content of the last response sent.
    sent: ResourceMap,
    sent_version: Option<String>,
    sent_nonce: Option<String>,
    pending: bool,
    /// Content of the last ACKed response (name → hash).
    acked: BTreeMap<String, u64>,
    acked_version: Option<String>,
    last_nack: Option<NackStatus>,
    /// An initial request (no nonce) must be answered even if nothing changed.
    force: bool,
}

impl TypeState {
    fn new(type_url: &str) -> Self {
        Self {
            type_url: type_url.to_owned(),
            wildcard: false,
            names: BTreeSet::new(),
            sent: ResourceMap::new(),
            sent_version: None,
            sent_nonce: None,
            pending: false,
            acked: BTreeMap::new(),
            acked_version: None,
            last_nack: None,
            force: false,
        }
    }

    fn subscribed(&self) -> bool {
        self.wildcard || !self.names.is_empty()
    }

    /// Applies the subscription carried by a request.
    fn update_subscription(&mut self, req: &DiscoveryRequest) {
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        // Legacy wildcard: an empty name list on LDS/CDS means "everything";
        // "*" is the explicit wildcard for any type.
        let full_state = self.type_url == type_url::LISTENER || self.type_url == type_url::CLUSTER;
        self.wildcard = names.contains("*") || (full_state && names.is_empty());
        self.names = names.into_iter().filter(|n| n != "*").collect();
        if !self.wildcard {
            // Forget what the client no longer follows, so a later re-subscribe
            // is answered and comparisons only cover subscribed names.
            self.sent.retain(|n, _| self.names.contains(n));
            self.acked.retain(|n, _| self.names.contains(n));
        }
    }

    /// The resources of `snap` this subscription selects.
    fn target(&self, snap: Option<&Snapshot>) -> ResourceMap {
        let Some(snap) = snap else {
            return ResourceMap::new();
        };
        let all = snap.resources(&self.type_url);
        if self.wildcard {
            all.clone()
        } else {
            self.names
                .iter()
                .filter_map(|n| all.get(n).map(|r| (n.clone(), r.clone())))
                .collect()
        }
    }

    /// Envoy runs exactly what `snap` selects for this type.
    fn settled(&self, snap: Option<&Snapshot>) -> bool {
        !self.pending && same_content(&self.acked, &self.target(snap))
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

fn same_content(hashes: &BTreeMap<String, u64>, m: &ResourceMap) -> bool {
    hashes.len() == m.len() && m.iter().all(|(n, r)| hashes.get(n) == Some(&r.hash))
}

fn same_resources(a: &ResourceMap, b: &ResourceMap) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((na, ra), (nb, rb))| na == nb && ra.hash == rb.hash)
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

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl StreamState {
    /// Decides which responses to send now, in push order.
    fn evaluate(&mut self, snap: Option<&Snapshot>, nonce: &mut u64) -> Vec<DiscoveryResponse> {
        // Listeners and routes stay on the old clusters until Envoy has ACKed
        // the new ones; only then may clusters and endpoints be dropped.
        let refs_settled = [type_url::LISTENER, type_url::ROUTE]
            .iter()
            .all(|t| self.types.get(*t).is_none_or(|ts| ts.settled(snap)));

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
            if removed_last(&t) && !refs_settled {
                for (n, r) in &ts.sent {
                    if !desired.contains_key(n) && (ts.wildcard || ts.names.contains(n)) {
                        desired.insert(n.clone(), r.clone());
                    }
                }
            }
            let changed = !same_resources(&desired, &ts.sent);
            let force = std::mem::take(&mut ts.force);
            let must_answer = force && (ts.wildcard || !desired.is_empty());
            if !changed && !must_answer {
                continue;
            }
            *nonce += 1;
            let version = version_of(&desired);
            let nonce_s = nonce.to_string();
            out.push(DiscoveryResponse {
                version_info: version.clone(),
                resources: desired.values().map(|r| r.body.clone()).collect(),
                type_url: t.clone(),
                nonce: nonce_s.clone(),
                ..Default::default()
            });
            tracing::debug!(type_url = %t, version, nonce = nonce_s, resources = desired.len(), "xds: sending");
            // An added or modified cluster re-warms in Envoy and waits for an
            // EDS response even if its endpoints are unchanged (Envoy's EDS
            // cache only kicks in after initial_fetch_timeout).
            let clusters_changed = t == type_url::CLUSTER
                && desired
                    .iter()
                    .any(|(n, r)| ts.sent.get(n).map(|o| o.hash) != Some(r.hash));
            ts.sent = desired;
            ts.sent_version = Some(version);
            ts.sent_nonce = Some(nonce_s);
            ts.pending = true;
            if clusters_changed && let Some(eds) = self.types.get_mut(type_url::ENDPOINT) {
                eds.force = true;
            }
        }
        out
    }
}

/// What a request meant, for the server's logs and the event tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Initial,
    Ack,
    Nack,
    Stale,
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
                    node_id: s.node_id.clone().unwrap_or_default(),
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

    /// Content hash of resource `name` as of the latest response of `type_url`
    /// that `node_id` ACKed, on its newest stream. `None` if that node is not
    /// connected or has not ACKed the resource.
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
            .copied()
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

    pub(crate) fn open_stream(&self) -> u64 {
        let id = {
            let mut st = self.lock();
            st.next_stream += 1;
            let id = st.next_stream;
            st.streams.insert(
                id,
                StreamState {
                    node_id: None,
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

    /// Processes one request of stream `id`; returns the responses to send.
    pub(crate) fn handle_request(
        &self,
        id: u64,
        req: &DiscoveryRequest,
    ) -> (RequestKind, Vec<DiscoveryResponse>) {
        let mut tick = false;
        let result = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(stream) = st.streams.get_mut(&id) else {
                return (RequestKind::Stale, Vec::new());
            };
            if stream.node_id.is_none()
                && let Some(node) = &req.node
            {
                stream.node_id = Some(node.id.clone());
                tick = true;
            }
            let node = stream.node_id.clone();
            let ts = stream
                .types
                .entry(req.type_url.clone())
                .or_insert_with(|| TypeState::new(&req.type_url));

            let kind = if req.response_nonce.is_empty() {
                RequestKind::Initial
            } else if Some(&req.response_nonce) != ts.sent_nonce.as_ref() {
                RequestKind::Stale
            } else if req.error_detail.is_some() {
                RequestKind::Nack
            } else {
                RequestKind::Ack
            };

            match kind {
                // The client answers our newer response with its current
                // subscription; nothing to do until then.
                RequestKind::Stale => {
                    tracing::debug!(type_url = %req.type_url, nonce = %req.response_nonce, "xds: ignoring stale request");
                }
                RequestKind::Initial => {
                    ts.pending = false;
                    ts.force = true;
                }
                RequestKind::Ack => {
                    ts.pending = false;
                    ts.acked = ts.sent.iter().map(|(n, r)| (n.clone(), r.hash)).collect();
                    ts.acked_version = ts.sent_version.clone();
                    tick = true;
                }
                RequestKind::Nack => {
                    ts.pending = false;
                    let detail = req
                        .error_detail
                        .as_ref()
                        .map(|s| s.message.clone())
                        .unwrap_or_default();
                    let version = ts.sent_version.clone().unwrap_or_default();
                    tracing::warn!(
                        node = node.as_deref().unwrap_or(""),
                        type_url = %req.type_url,
                        version,
                        nonce = %req.response_nonce,
                        error = %detail,
                        "xds: Envoy rejected configuration (NACK)"
                    );
                    ts.last_nack = Some(NackStatus {
                        version,
                        nonce: req.response_nonce.clone(),
                        error_detail: detail,
                        at: now_unix(),
                    });
                    tick = true;
                }
            }
            if kind == RequestKind::Stale {
                drop(guard);
                if tick {
                    self.tick();
                }
                return (kind, Vec::new());
            }
            ts.update_subscription(req);

            let snap = st.snapshot_for(node.as_deref());
            let stream = st.streams.get_mut(&id);
            let responses = match stream {
                Some(s) => s.evaluate(snap.as_deref(), &mut st.next_nonce),
                None => Vec::new(),
            };
            (kind, responses)
        };
        if tick {
            self.tick();
        }
        result
    }

    /// Re-evaluates stream `id` after a snapshot change.
    pub(crate) fn refresh_stream(&self, id: u64) -> Vec<DiscoveryResponse> {
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
