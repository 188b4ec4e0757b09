//! Cluster Mesh for Membrane: global services shared between clusters
//! through etcd, in Cilium's own kvstore format so a mixed Cilium/Membrane
//! mesh shares services.
//!
//! Pure parts: [`types`] (the JSON), [`keys`] (the layout), [`config`] (etcd
//! config files and the `--clustermesh-config` directory), [`export`] (local
//! Services → `ClusterService`), [`merge`] (remote backends → the local
//! service model). I/O: [`etcd`].

use std::path::PathBuf;

pub mod agent;
pub mod config;
pub mod etcd;
pub mod export;
pub mod keys;
pub mod merge;
pub mod types;

pub use agent::{MeshConfig, MeshRuntime};
pub use config::{EtcdConfig, MeshDir, read_mesh_dir};
pub use types::{ClusterConfig, ClusterService, validate_cluster_id, validate_cluster_name};

/// Errors of the Cluster Mesh crate; each names the object and the field.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd config {}: {}{reason}", path.display(), if field.is_empty() { String::new() } else { format!("{field}: ") })]
    InvalidEtcdConfig {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("ClusterService {key}: {reason}")]
    InvalidService { key: String, reason: String },
    #[error("cluster config of {cluster}: {reason}")]
    InvalidClusterConfig { cluster: String, reason: String },
    #[error("cluster {cluster}: etcd: {source}")]
    Etcd {
        cluster: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("cluster {cluster}: TLS file {}: {source}", path.display())]
    TlsFile {
        cluster: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster {cluster}: the export lease could not be kept alive")]
    ExportLeaseLost { cluster: String },
    #[error("cluster {cluster}: initial sync did not complete within {secs}s")]
    SyncTimeout { cluster: String, secs: u64 },
}
