//! Membrane's typed object store.
//!
//! Sources (a watched manifest directory, the local apply API, later kube
//! reflectors) write Kubernetes objects into a [`Store`]; controllers read
//! consistent [`StoreSnapshot`]s and wake up on [`Store::subscribe`]; [`Store::changes_since`]
//! tells them which keys changed, so their work can follow the change.
//! Everything downstream of the store is the same whichever source fed it.

mod error;
mod kind;
mod manifest;
mod object;
mod parse;
mod source;
mod store;
mod upstream;

pub use error::StoreError;
pub use kind::Kind;
pub use manifest::ManifestDir;
pub use object::{Object, ObjectKey, Typed};
pub use parse::{
    LARGE_INPUT_BYTES, MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_INPUT_BYTES, parse_documents,
    parse_documents_lenient, parse_keys, run_parse,
};
pub use source::{DEFAULT_SCOPE, Source, SourceWriter};
pub use store::{
    CHANGE_LOG_CAPACITY, Change, ChangeCursor, Changes, KeyChange, KeyChangeKind, ScopeUpdate,
    Store, StoreSnapshot,
};
pub use upstream::{SharedUpstream, Upstream};

/// Re-exported so users name the same types the store holds.
pub use k8s_openapi;
pub use membrane_crds;
