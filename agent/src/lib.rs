//! The Membrane agent: the one place where the store, the Ingress
//! controller, CEC processing, the xDS server and Envoy are wired together.

pub mod api;
pub mod cec;
pub mod configs;
pub mod endpoints;
pub mod envoy;
pub mod envoy_pb;
pub mod ingress_controller;
pub mod ingress_status;
pub mod lb_ipam;
pub mod nack;
pub mod placement;
pub mod ports;
pub mod secrets;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use membrane_ingress::TranslateOptions;
use membrane_store::Store;
use membrane_xds::{Resource, Snapshot, SnapshotCache};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use envoy::{EnvoyState, XdsProtocol};
pub use lb_ipam::Pool;
pub use placement::PortMap;
pub use state::AgentState;

/// Everything that can stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Envoy(#[from] envoy::EnvoyError),
    #[error("local API socket {path}: {source}")]
    Api {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("xDS server: {0}")]
    Xds(String),
    #[error("run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Holds the xDS socket, Envoy's bootstrap and log.
    pub run_dir: PathBuf,
    pub api_socket: PathBuf,
    pub envoy_bin: Option<PathBuf>,
    pub envoy_admin_port: u16,
    pub envoy_concurrency: u16,
    pub envoy_log_level: String,
    pub xds_protocol: XdsProtocol,
    pub lb_pool: Pool,
    pub ports: PortMap,
    pub node_name: String,
    pub node_labels: BTreeMap<String, String>,
    pub secrets_namespace: String,
}

impl AgentConfig {
    pub fn node_id(&self) -> String {
        format!("membrane~{}", self.node_name)
    }
    pub fn xds_socket(&self) -> PathBuf {
        self.run_dir.join("xds.sock")
    }
}

/// Run until `shutdown`; Envoy is stopped before this returns.
pub async fn run(
    config: AgentConfig,
    store: Store,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.run_dir).map_err(|source| AgentError::RunDir {
        path: config.run_dir.clone(),
        source,
    })?;
    let envoy_bin = envoy::find_envoy(config.envoy_bin.as_deref())?;
    let cache = SnapshotCache::new();
    let node_id = config.node_id();
    let (envoy_tx, envoy_rx) = watch::channel(EnvoyState::default());
    let state = Arc::new(AgentState {
        store: store.clone(),
        cache: cache.clone(),
        node_id: node_id.clone(),
        envoy: envoy_rx,
        rejections: Mutex::new(BTreeMap::new()),
        nacks_isolated: Default::default(),
    });

    let xds_socket = config.xds_socket();
    let xds_task = {
        let cache = cache.clone();
        let shutdown = shutdown.clone();
        let path = xds_socket.clone();
        tokio::spawn(async move {
            membrane_xds::serve_unix(&path, cache, shutdown.cancelled_owned()).await
        })
    };
    let api_task = {
        let state = state.clone();
        let shutdown = shutdown.clone();
        let path = config.api_socket.clone();
        tokio::spawn(async move { api::serve(&path, state, shutdown).await })
    };
    let envoy_task = tokio::spawn(envoy::supervise(
        envoy::EnvoyOptions {
            bin: envoy_bin,
            work_dir: config.run_dir.clone(),
            node_id: node_id.clone(),
            xds_socket,
            admin_port: config.envoy_admin_port,
            protocol: config.xds_protocol,
            concurrency: config.envoy_concurrency,
            log_level: config.envoy_log_level.clone(),
        },
        envoy_tx,
        shutdown.clone(),
    ));
    info!(api = %config.api_socket.display(), node = %node_id, "membrane agent running");

    reconcile_loop(&config, &state, shutdown.clone()).await;

    shutdown.cancel();
    let envoy_result = envoy_task.await;
    let _ = api_task.await;
    let _ = xds_task.await;
    match envoy_result {
        Ok(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// The level-triggered control loop: on every store change recompute the
/// desired configuration from the whole store; on every xDS ACK update
/// Ingress status.
async fn reconcile_loop(config: &AgentConfig, state: &AgentState, shutdown: CancellationToken) {
    let store = &state.store;
    let mut store_rx = store.subscribe();
    let mut ack_rx = state.cache.subscribe();
    let opts = TranslateOptions {
        secrets_namespace: config.secrets_namespace.clone(),
        ..TranslateOptions::default()
    };
    let mut pipeline = configs::ConfigPipeline::new(config.ports, config.node_labels.clone());
    let mut status_writer = ingress_status::StatusWriter::default();
    let mut last_resources: Option<Vec<configs::Built>> = None;
    let mut xds_snapshot = Snapshot::new();
    let mut managed = Vec::new();
    let mut served = BTreeMap::new();
    let mut logged: BTreeMap<String, String> = BTreeMap::new();
    let mut nacks = nack::NackWatcher::default();
    let mut store_dirty = true;

    loop {
        if store_dirty {
            store_rx.borrow_and_update();
            let snap = store.snapshot();
            let mut rejected = lb_ipam::reconcile(&config.lb_pool, store, &snap);
            let snap = store.snapshot();
            let ingress = ingress_controller::reconcile(store, &snap, &opts);
            rejected.extend(ingress.rejected);
            managed = ingress.managed;
            let snap = store.snapshot();
            let pass = pipeline.run(&snap);
            rejected.extend(pass.rejected);
            // An Ingress answers for the CEC generated from it.
            for m in &managed {
                if let Some(why) = rejected.get(&m.cec).cloned() {
                    rejected
                        .entry(m.ingress.clone())
                        .or_insert_with(|| format!("{}: its {why}", m.ingress));
                }
            }
            served = pass.served;
            if last_resources.as_ref() != Some(&pass.resources) {
                xds_snapshot = build_snapshot(&pass.resources);
                state.cache.set_snapshot(None, xds_snapshot.clone());
                last_resources = Some(pass.resources);
            }
            let now: BTreeMap<String, String> = rejected
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            for (object, reason) in &now {
                if logged.get(object) != Some(reason) {
                    warn!(%object, %reason, "rejected");
                }
            }
            for object in logged.keys().filter(|k| !now.contains_key(*k)) {
                info!(%object, "no longer rejected");
            }
            logged = now.clone();
            if let Ok(mut r) = state.rejections.lock() {
                *r = now;
            }
        }
        ack_rx.borrow_and_update();
        status_writer.reconcile(
            store,
            &store.snapshot(),
            &managed,
            &served,
            &xds_snapshot,
            &state.cache,
            &state.node_id,
        );

        // Remember what Envoy fully ACKed, then act on new NACKs.
        for (key, resources) in &served {
            let all_acked = resources.iter().all(|(t, n)| {
                let current = xds_snapshot.get(t, n).map(|r| r.hash);
                current.is_some() && state.cache.acked_hash(&state.node_id, t, n) == current
            });
            if all_acked {
                pipeline.mark_acked(key);
            }
        }
        let mut quarantined = false;
        for nack in nacks.take_new(&state.cache.status(), &state.node_id) {
            let suspects =
                nack::suspects(&nack, &served, &xds_snapshot, &state.cache, &state.node_id);
            if suspects.is_empty() {
                warn!(type_url = %nack.type_url, detail = %nack.error_detail, "Envoy NACK not attributable to any object");
            }
            for key in suspects {
                let reason = format!(
                    "Envoy rejected its {}: {}",
                    short_type(&nack.type_url),
                    nack.error_detail
                );
                if pipeline.quarantine(&key, reason) {
                    state
                        .nacks_isolated
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(object = %key, detail = %nack.error_detail, "quarantined after Envoy NACK; serving its last ACKed version");
                    quarantined = true;
                }
            }
        }
        if quarantined {
            store_dirty = true;
            continue;
        }

        store_dirty = tokio::select! {
            r = store_rx.changed() => { if r.is_err() { return; } true }
            r = ack_rx.changed() => { if r.is_err() { return; } false }
            _ = shutdown.cancelled() => return,
        };
    }
}

/// `Listener` from `type.googleapis.com/envoy.config.listener.v3.Listener`.
fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

fn build_snapshot(resources: &[configs::Built]) -> Snapshot {
    let mut snapshot = Snapshot::new();
    for r in resources {
        let resource = Resource::with_name(r.name.clone(), r.body.clone());
        if let Err(e) = snapshot.insert(Arc::new(resource)) {
            // The pipeline already settled name conflicts; this is a bug guard.
            warn!(error = %e, "dropping duplicate resource");
        }
    }
    snapshot
}
