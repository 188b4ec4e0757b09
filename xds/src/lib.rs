//! Envoy xDS for Membrane: JSON/YAML ↔ protobuf codec, a snapshot cache with
//! ACK/NACK tracking, and an ADS gRPC server speaking both state-of-the-world
//! and incremental (delta) xDS.
//! Knows nothing about Kubernetes.

pub mod cache;
mod canonical;
pub mod codec;
#[cfg(test)]
mod descriptor_index;
mod descriptors;
pub mod server;

pub use cache::{
    CacheError, NackStatus, Protocol, Resource, ResourceMap, Snapshot, SnapshotCache, StreamStatus,
    TypeStatus, XdsStatus,
};
pub use codec::{CodecError, type_url};
pub use envoy_types::pb::google::protobuf::Any;
/// One entry of a [`ResourceMap`] diff.
pub use imbl::ordmap::DiffItem;
pub use server::{AdsServer, XdsError, serve_tcp, serve_tcp_listener, serve_unix, service};
