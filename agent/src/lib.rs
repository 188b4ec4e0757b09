//! The Membrane agent: the one place where the store, the Ingress
//! controller, CEC processing, the xDS server and Envoy are wired together.

pub mod api;
pub mod api_services;
#[doc(hidden)]
pub mod bench;
pub mod cec;
pub mod cni;
pub mod configs;
pub mod datapath;
pub mod endpoints;
pub mod envoy;
pub mod envoy_pb;
pub mod ingress_controller;
pub mod ingress_status;
pub mod lb_ipam;
pub mod nack;
pub mod nodes;
pub mod placement;
pub mod policy;
pub mod ports;
pub mod secrets;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use membrane_ingress::TranslateOptions;
use membrane_store::{ObjectKey, Store};
use membrane_xds::{Snapshot, SnapshotCache};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

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
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathStartError),
    #[error(transparent)]
    Cni(#[from] cni::CniStartError),
    #[error("policy datapath: {0}")]
    Policy(#[from] Box<membrane_ebpf::policy::PolicyDatapathError>),
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
    /// Also expose Envoy admin on `127.0.0.1:<port>` (0 = a free port);
    /// `None`: admin only on its unix socket in the run directory.
    pub envoy_admin_port: Option<u16>,
    pub envoy_concurrency: u16,
    pub envoy_log_level: String,
    pub xds_protocol: XdsProtocol,
    pub lb_pool: Pool,
    pub ports: PortMap,
    pub node_name: String,
    pub node_labels: BTreeMap<String, String>,
    pub secrets_namespace: String,
    /// Mode of Ingresses without `ingress.cilium.io/loadbalancer-mode`.
    pub ingress_default_lb_mode: membrane_ingress::LoadBalancerMode,
    /// The Ingress controller's other feature flags.
    pub ingress: ingress_controller::IngressOptions,
    /// The eBPF service datapath (`--datapath ebpf`); `None` = no datapath.
    pub datapath: Option<datapath::DatapathOptions>,
    /// Pods through `membrane-cni` (`--enable-cni`); `None` = no CNI.
    pub cni: Option<cni::CniOptions>,
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
    let datapath = match config.datapath.clone() {
        Some(opts) => Some(Arc::new(datapath::DatapathHandle::start(opts)?)),
        None => None,
    };
    // L3/L4 policy: with the CNI's endpoints on the eBPF datapath.
    let policy = match (&config.cni, &config.datapath) {
        (Some(_), Some(dp)) => Some(Arc::new(
            policy::PolicyHandle::start(&dp.pin_dir).map_err(Box::new)?,
        )),
        _ => None,
    };
    let endpoints = match &config.cni {
        Some(opts) => Some(
            cni::start(
                opts,
                &config.node_name,
                &store,
                datapath.clone(),
                policy.clone(),
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let state = Arc::new(AgentState {
        store: store.clone(),
        cache: cache.clone(),
        node_id: node_id.clone(),
        envoy: envoy_rx,
        rejections: Mutex::new(BTreeMap::new()),
        nacks_isolated: Default::default(),
        warnings: Default::default(),
        datapath: datapath.clone(),
        endpoints,
        policy,
    });
    let datapath_task =
        datapath.map(|h| tokio::spawn(datapath::run(h, store.clone(), shutdown.clone())));

    let xds_socket = config.xds_socket();
    let xds_task = {
        let cache = cache.clone();
        let shutdown = shutdown.clone();
        let path = xds_socket.clone();
        tokio::spawn(async move {
            let served = membrane_xds::serve_unix(&path, cache, shutdown.cancelled_owned()).await;
            if let Err(e) = &served {
                error!(error = %e, socket = %path.display(), "xDS server stopped");
            }
            served
        })
    };
    let api_task = {
        let state = state.clone();
        let shutdown = shutdown.clone();
        let path = config.api_socket.clone();
        tokio::spawn(async move {
            if let Err(e) = api::serve(&path, state, shutdown).await {
                error!(error = %e, socket = %path.display(), "local API stopped");
            }
        })
    };
    let envoy_task = tokio::spawn(envoy::supervise(
        envoy::EnvoyOptions {
            bin: envoy_bin,
            work_dir: config.run_dir.clone(),
            node_id: node_id.clone(),
            xds_socket,
            admin_tcp_port: config.envoy_admin_port,
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
    let _ = envoy_task.await;
    let _ = api_task.await;
    if let Some(t) = datapath_task {
        let _ = t.await;
    }
    let _ = xds_task.await;
    Ok(())
}

/// What one store-triggered pass keeps between passes: the pipeline's
/// caches and what the latest pass produced.
pub struct Reconciler {
    lb_pool: Pool,
    opts: TranslateOptions,
    ingress: ingress_controller::IngressController,
    pipeline: configs::ConfigPipeline,
    node_labels: BTreeMap<String, String>,
    /// Snapshots of the other nodes' Envoys.
    pub nodes: nodes::NodeSnapshots,
    /// The resources behind the snapshot last handed to the cache.
    last_resources: Option<Vec<configs::Built>>,
    pub xds_snapshot: Snapshot,
    pub managed: Vec<ingress_controller::ManagedIngress>,
    pub served: BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
    logged: BTreeMap<String, String>,
    warned: BTreeMap<String, String>,
}

impl Reconciler {
    pub fn new(config: &AgentConfig) -> Self {
        // With the eBPF datapath, frontends are redirected to listeners by
        // the program rather than bound by Envoy.
        let ports = PortMap {
            transparent: config.datapath.is_some(),
            ..config.ports
        };
        Self {
            lb_pool: config.lb_pool,
            opts: config.ingress.apply(TranslateOptions {
                secrets_namespace: config.secrets_namespace.clone(),
                default_lb_mode: config.ingress_default_lb_mode,
                ..TranslateOptions::default()
            }),
            ingress: Default::default(),
            pipeline: {
                let mut p = configs::ConfigPipeline::new(ports, config.node_labels.clone());
                p.set_lb_pool(Some(config.lb_pool));
                p
            },
            node_labels: config.node_labels.clone(),
            nodes: nodes::NodeSnapshots::new(ports),
            last_resources: None,
            xds_snapshot: Snapshot::new(),
            managed: Vec::new(),
            served: BTreeMap::new(),
            logged: BTreeMap::new(),
            warned: BTreeMap::new(),
        }
    }

    /// Give nodes that connected or changed labels their snapshots.
    pub fn node_pass(&mut self, state: &AgentState) {
        self.nodes.pass(
            &state.store.snapshot(),
            &state.cache,
            &state.node_id,
            &self.node_labels,
            &self.xds_snapshot,
        );
    }

    /// Recompute the desired configuration from the store and hand it to
    /// the xDS cache if it changed; record what is rejected.
    pub fn store_pass(&mut self, state: &AgentState) {
        let store = &state.store;
        let t0 = std::time::Instant::now();
        let snap = store.snapshot();
        let mut rejected = lb_ipam::reconcile(&self.lb_pool, store, &snap);
        let t1 = t0.elapsed();
        let snap = store.snapshot();
        let ingress = self.ingress.reconcile(store, &snap, &self.opts);
        let t2 = t0.elapsed();
        rejected.extend(ingress.rejected);
        self.managed = ingress.managed;
        let snap = store.snapshot();
        let pass = self.pipeline.run(&snap);
        let t3 = t0.elapsed();
        rejected.extend(pass.rejected);
        configs::publish_warnings(&mut self.warned, pass.warnings, &state.warnings);
        // An Ingress answers for the CEC generated from it.
        for m in &self.managed {
            if let Some(why) = rejected.get(&m.cec).cloned() {
                rejected
                    .entry(m.ingress.clone())
                    .or_insert_with(|| format!("{}: its {why}", m.ingress));
            }
        }
        self.served = pass.served;
        if let Some(dp) = &state.datapath {
            dp.set_proxy_targets(pass.redirects);
        }
        // Resources are shared and carry their content hash: comparing
        // identities and hashes is enough, no bytes are compared.
        if !self
            .last_resources
            .as_ref()
            .is_some_and(|last| same_resources(last, &pass.resources))
        {
            self.xds_snapshot = build_snapshot(&pass.resources);
            // Without labels of its own the agent's node is the default
            // node; with labels, its snapshot is node-specific.
            let own = (!self.node_labels.is_empty()).then_some(state.node_id.as_str());
            state.cache.set_snapshot(own, self.xds_snapshot.clone());
            self.last_resources = Some(pass.resources);
        }
        self.nodes.pass(
            &snap,
            &state.cache,
            &state.node_id,
            &self.node_labels,
            &self.xds_snapshot,
        );
        // Where a pass spends its time (MEMBRANE_LOG=membrane_agent=debug).
        debug!(
            ipam_ms = t1.as_secs_f64() * 1e3,
            ingress_ms = (t2 - t1).as_secs_f64() * 1e3,
            pipeline_ms = (t3 - t2).as_secs_f64() * 1e3,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "store pass"
        );
        let now: BTreeMap<String, String> = rejected
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        for (object, reason) in &now {
            if self.logged.get(object) != Some(reason) {
                warn!(%object, %reason, "rejected");
            }
        }
        for object in self.logged.keys().filter(|k| !now.contains_key(*k)) {
            info!(%object, "no longer rejected");
        }
        self.logged = now.clone();
        if let Ok(mut r) = state.rejections.lock() {
            *r = now;
        }
    }
}

/// The level-triggered control loop: on every store change recompute the
/// desired configuration from the whole store (the pipeline reuses what it
/// built for unchanged objects); on every xDS ACK update Ingress status.
async fn reconcile_loop(config: &AgentConfig, state: &AgentState, shutdown: CancellationToken) {
    let store = &state.store;
    let mut store_rx = store.subscribe();
    let mut ack_rx = state.cache.subscribe();
    let mut rec = Reconciler::new(config);
    let mut status_writer = ingress_status::StatusWriter::default();
    let mut nacks = nack::NackHandler::default();
    let mut store_dirty = true;

    loop {
        store_dirty |= rec.pipeline.housekeeping(std::time::Instant::now());
        if store_dirty {
            store_rx.borrow_and_update();
            rec.store_pass(state);
        }
        ack_rx.borrow_and_update();
        if !store_dirty && rec.nodes.nodes_changed(&state.cache, &state.node_id) {
            rec.node_pass(state);
        }
        status_writer.reconcile(
            store,
            &store.snapshot(),
            &rec.managed,
            &rec.served,
            &rec.xds_snapshot,
            &state.cache,
            &state.node_id,
        );

        // Remember what Envoy fully ACKed, then act on new NACKs.
        for (key, resources) in &rec.served {
            let all_acked = resources.iter().all(|(t, n)| {
                let current = rec.xds_snapshot.get(t, n).map(|r| r.hash);
                current.is_some() && state.cache.acked_hash(&state.node_id, t, n) == current
            });
            if all_acked {
                rec.pipeline.mark_acked(key);
            }
        }
        if nacks.handle(&mut rec, state) {
            store_dirty = true;
            continue;
        }

        store_dirty = tokio::select! {
            r = store_rx.changed() => { if r.is_err() { return; } true }
            r = ack_rx.changed() => { if r.is_err() { return; } false }
            _ = configs::retry_timer(rec.pipeline.next_wake()) => false,
            _ = shutdown.cancelled() => return,
        };
    }
}

/// `Listener` from `type.googleapis.com/envoy.config.listener.v3.Listener`.
pub(crate) fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

pub(crate) fn same_resources(a: &[configs::Built], b: &[configs::Built]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            Arc::ptr_eq(x, y) || (x.hash == y.hash && x.name == y.name && x.type_url == y.type_url)
        })
}

/// The snapshot of a pass's resources (shared, not copied).
pub fn build_snapshot(resources: &[configs::Built]) -> Snapshot {
    let mut snapshot = Snapshot::new();
    for r in resources {
        if let Err(e) = snapshot.insert(r.clone()) {
            // The pipeline already settled name conflicts; this is a bug guard.
            warn!(error = %e, "dropping duplicate resource");
        }
    }
    snapshot
}
