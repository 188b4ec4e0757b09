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
    pub protocol: Protocol,
    /// Empty until the first request carrying a node arrives.
    pub node_id: String,
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

