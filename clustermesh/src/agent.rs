//! What the agent runs for Cluster Mesh: the exporter loop (this cluster's
//! global services into its etcd) and the importer (remote clusters from
//! `--clustermesh-config DIR`). The agent's datapath merges
//! [`MeshRuntime::remote_services`] into its service model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use membrane_lb::affinity::mesh_annotations;
use membrane_lb::service::{DesiredState, ServiceName};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{EtcdConfig, read_mesh_dir};
use crate::etcd::{ExportOptions, Exporter, ImportOptions, Mesh, RemoteStore, connect};
use crate::export::cluster_services;
use crate::merge::merge_remote;
use crate::types::ClusterService;

/// Cilium's default `--clustermesh-sync-timeout`.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Cluster Mesh settings of one agent (`membrane up` flags).
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// `--cluster-name`
    pub cluster_name: String,
    /// `--cluster-id` (1–255)
    pub cluster_id: u32,
    /// `--kvstore etcd --kvstore-opt etcd.config=FILE`: where to export.
    pub kvstore_config: Option<PathBuf>,
    /// `--clustermesh-config DIR`: remote clusters to import.
    pub mesh_dir: Option<PathBuf>,
    /// `--clustermesh-cache-ttl`; `None` keeps a lost cluster's backends.
    pub cache_ttl: Option<Duration>,
    /// `--clustermesh-sync-timeout`
    pub sync_timeout: Duration,
    /// TTL of the export lease.
    pub lease_ttl: Duration,
}

impl MeshConfig {
    pub fn new(cluster_name: &str, cluster_id: u32) -> MeshConfig {
        MeshConfig {
            cluster_name: cluster_name.to_string(),
            cluster_id,
            kvstore_config: None,
            mesh_dir: None,
            cache_ttl: None,
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            lease_ttl: ExportOptions::default().lease_ttl,
        }
    }
}

/// The running Cluster Mesh of an agent. Dropping it stops everything.
pub struct MeshRuntime {
    cfg: MeshConfig,
    mesh: Option<Mesh>,
    /// `None` until the agent hands over its first view of the store: the
    /// sync canary must not claim an export that has not happened.
    export_tx: watch::Sender<Option<BTreeMap<String, ClusterService>>>,
    export_task: Option<JoinHandle<()>>,
    local_changes: watch::Sender<u64>,
}

impl Drop for MeshRuntime {
    fn drop(&mut self) {
        if let Some(t) = &self.export_task {
            t.abort();
        }
    }
}

impl MeshRuntime {
    /// Starts import and export as configured. Must run inside tokio.
    pub fn start(cfg: MeshConfig) -> MeshRuntime {
        let mesh = cfg.mesh_dir.as_ref().map(|dir| {
            Mesh::start(
                dir,
                ImportOptions {
                    local_name: cfg.cluster_name.clone(),
                    local_id: cfg.cluster_id,
                    cache_ttl: cfg.cache_ttl,
                    dir_poll: Duration::from_millis(500),
                },
            )
        });
        let (export_tx, export_rx) = watch::channel(None);
        let export_task = cfg
            .kvstore_config
            .clone()
            .map(|path| tokio::spawn(export_loop(cfg.clone(), path, export_rx)));
        MeshRuntime {
            cfg,
            mesh,
            export_tx,
            export_task,
            local_changes: watch::channel(0).0,
        }
    }

    pub fn config(&self) -> &MeshConfig {
        &self.cfg
    }

    /// Waits for the initial sync of every remote cluster configured now, at
    /// most `--clustermesh-sync-timeout`; returns the ones that did not sync.
    pub async fn wait_initial_sync(&self) -> Vec<String> {
        let Some(mesh) = &self.mesh else {
            return Vec::new();
        };
        let configured: Vec<String> = match &self.cfg.mesh_dir {
            Some(d) => read_mesh_dir(d, &self.cfg.cluster_name)
                .map(|m| m.clusters.into_keys().collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        mesh.wait_synced(&configured, self.cfg.sync_timeout).await
    }

    /// Remote services right now.
    pub fn remote_services(&self) -> Vec<ClusterService> {
        self.mesh
            .as_ref()
            .map(|m| m.store().services())
            .unwrap_or_default()
    }

    pub fn remote_store(&self) -> Option<&RemoteStore> {
        self.mesh.as_ref().map(|m| m.store())
    }

    /// Changes whenever remote services change (never, without import).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        match &self.mesh {
            Some(m) => m.store().subscribe(),
            None => self.local_changes.subscribe(),
        }
    }

    /// Hands the local store's Services and EndpointSlices to the exporter.
    pub fn export(&self, services: &[Service], slices: &[EndpointSlice]) {
        if self.export_task.is_none() {
            return;
        }
        let want = cluster_services(
            services,
            slices,
            &self.cfg.cluster_name,
            self.cfg.cluster_id,
        );
        self.export_tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&want) {
                false
            } else {
                *cur = Some(want);
                true
            }
        });
    }
}

/// Local global Services (the only ones that take remote backends).
pub fn global_services(services: &[Service]) -> BTreeSet<ServiceName> {
    services
        .iter()
        .filter(|s| mesh_annotations(s.metadata.annotations.as_ref()).0.global)
        .map(|s| ServiceName {
            namespace: s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: s.metadata.name.clone().unwrap_or_default(),
        })
        .collect()
}

/// Merges remote backends into `state` (see [`merge_remote`]).
pub fn merge_into(
    state: &mut DesiredState,
    services: &[Service],
    remote: &[ClusterService],
) -> usize {
    if remote.is_empty() {
        return 0;
    }
    merge_remote(state, &global_services(services), remote)
}

/// Keeps the local etcd equal to the wanted export; reconnects and rewrites
/// everything when the connection or the lease is lost.
async fn export_loop(
    cfg: MeshConfig,
    path: PathBuf,
    mut rx: watch::Receiver<Option<BTreeMap<String, ClusterService>>>,
) {
    let name = cfg.cluster_name.clone();
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let etcd = EtcdConfig::load(&path)?;
            let client = connect(&name, &etcd).await?;
            let mut ex = Exporter::start(
                client,
                &name,
                cfg.cluster_id,
                ExportOptions {
                    lease_ttl: cfg.lease_ttl,
                    ..ExportOptions::default()
                },
            )
            .await?;
            loop {
                let Some(want) = rx.borrow().clone() else {
                    if rx.changed().await.is_err() {
                        return Ok(());
                    }
                    continue;
                };
                rx.mark_unchanged();
                let st = ex.sync(&want).await?;
                if st.put + st.deleted > 0 {
                    tracing::info!(cluster = %name, put = st.put, deleted = st.deleted, "clustermesh: exported services");
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() {
                        return Ok::<(), crate::MeshError>(());
                    },
                    _ = ex.lost() => {
                        return Err(crate::MeshError::ExportLeaseLost { cluster: name.clone() });
                    }
                }
            }
        };
        match attempt.await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(cluster = %name, error = %e, "clustermesh: export failed; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
