//! The Membrane agent: the one place where the store, CEC processing, the
//! xDS server and Envoy are wired together. In `membrane up` the operator's
//! reconcile pass runs inside the agent's loop (a [`Controller`]); in
//! Kubernetes mode the operator is a process of its own.

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
pub mod incremental;
pub mod lb_ipam;
pub mod nack;
pub mod nodes;
pub mod placement;
pub mod policy;
pub mod ports;
pub mod report;
pub mod routing;
pub mod secrets;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use membrane_k8s::Sink;
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
    /// uid of this node's Node object, if there is one: the node's report
    /// is owned by it, so deleting the Node garbage-collects the report.
    pub node_uid: Option<String>,
    /// Later values of `node_labels` (the Node was relabelled).
    pub node_labels_updates: Option<watch::Receiver<BTreeMap<String, String>>>,
    /// Ports for listeners without an address (default 10000-20000).
    pub proxy_ports: Option<std::ops::RangeInclusive<u16>>,
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

/// A controller that runs at the start of every store pass, before the CEC
/// pipeline (the operator, in `membrane up`), writing into the same store.
pub trait Controller: Send {
    fn pass(&mut self, store: &Store) -> ControllerPass;
}

/// What a [`Controller`] pass found.
#[derive(Debug, Default)]
pub struct ControllerPass {
    /// Objects it rejected, with why.
    pub rejected: BTreeMap<ObjectKey, String>,
    /// `(Ingress, CEC generated from it)`: an Ingress answers for its CEC's
    /// rejection.
    pub generated: Vec<(ObjectKey, ObjectKey)>,
}

/// Run until `shutdown`; Envoy is stopped before this returns. `reports`
/// receives this node's `ProxyNodeStatus` (ACK reports); `controller`, if
/// any, runs in every store pass.
pub async fn run(
    config: AgentConfig,
    store: Store,
    reports: std::sync::Arc<dyn Sink>,
    controller: Option<Box<dyn Controller>>,
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
        Some(mut opts) => {
            // With the CNI, NodePorts are on the node's address unless
            // `--node-addresses` says otherwise (Cilium exposes them on its
            // devices' addresses).
            if opts.node_addresses.is_empty()
                && let Some(cni) = &config.cni
                && let Ok(Some(ip)) = routing::node_ip(&cni.routing).await
            {
                info!(%ip, "NodePort frontends on the node address");
                opts.node_addresses.push(ip);
            }
            Some(Arc::new(datapath::DatapathHandle::start(opts)?))
        }
        None => None,
    };
    // L3/L4 policy: with the CNI's endpoints on the eBPF datapath.
    let policy = match (&config.cni, &config.datapath) {
        (Some(_), Some(dp)) => Some(Arc::new(
            policy::PolicyHandle::start(&dp.pin_dir).map_err(Box::new)?,
        )),
        _ => None,
    };
    let (endpoints, routing_task) = match &config.cni {
        Some(opts) => {
            let started = cni::start(
                opts,
                &config.node_name,
                &store,
                reports.clone(),
                datapath.clone(),
                policy.clone(),
                shutdown.clone(),
            )
            .await?;
            (Some(started.manager), Some(started.routing))
        }
        None => (None, None),
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

    reconcile_loop(
        &config,
        &state,
        reports.as_ref(),
        controller,
        shutdown.clone(),
    )
    .await;

    shutdown.cancel();
    let _ = envoy_task.await;
    let _ = api_task.await;
    if let Some(t) = datapath_task {
        let _ = t.await;
    }
    // Routes to other nodes are removed before the process exits.
    if let Some(t) = routing_task {
        let _ = t.await;
    }
    let _ = xds_task.await;
    Ok(())
}

/// What one store-triggered pass keeps between passes: the pipeline's
/// caches and what the latest pass produced.
pub struct Reconciler {
    controller: Option<Box<dyn Controller>>,
    pipeline: configs::ConfigPipeline,
    node_labels: BTreeMap<String, String>,
    /// Snapshots of the other nodes' Envoys.
    pub nodes: nodes::NodeSnapshots,
    /// The resources behind the snapshot last handed to the cache.
    last_resources: Option<Vec<configs::Built>>,
    pub xds_snapshot: Snapshot,
    pub served: BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
    /// `metadata.generation` of each served CEC as the last pass read it.
    pub served_generations: BTreeMap<ObjectKey, i64>,
    /// LB addresses of each served CEC's `spec.services`, as the last pass
    /// read them (the content it built binds them).
    pub served_addresses: BTreeMap<ObjectKey, Vec<String>>,
    /// The other parts of each served split CEC, with their generations:
    /// the report answers for them as for the CEC they are joined into.
    pub served_parts: BTreeMap<ObjectKey, Vec<(ObjectKey, i64)>>,
    /// CECs/CCECs rejected by the last pass (NACK quarantine included).
    pub rejected_configs: BTreeMap<ObjectKey, String>,
    logged: BTreeMap<String, String>,
    warned: BTreeMap<String, String>,
    incr: incremental::PassState,
    /// `(Ingress, CEC generated from it)` as the controller last reported.
    generated: Vec<(ObjectKey, ObjectKey)>,
}

impl Reconciler {
    pub fn new(config: &AgentConfig, controller: Option<Box<dyn Controller>>) -> Self {
        // With the eBPF datapath, frontends are redirected to listeners by
        // the program rather than bound by Envoy.
        let ports = PortMap {
            transparent: config.datapath.is_some(),
            ..config.ports
        };
        Self {
            controller,
            pipeline: {
                let mut p = configs::ConfigPipeline::new(ports, config.node_labels.clone());
                p.set_lb_pool(Some(config.lb_pool));
                if let Some(range) = config.proxy_ports.clone() {
                    p.set_proxy_port_range(range);
                }
                p
            },
            node_labels: config.node_labels.clone(),
            nodes: nodes::NodeSnapshots::new(ports),
            last_resources: None,
            xds_snapshot: Snapshot::new(),
            served: BTreeMap::new(),
            served_generations: BTreeMap::new(),
            served_addresses: BTreeMap::new(),
            served_parts: BTreeMap::new(),
            rejected_configs: BTreeMap::new(),
            logged: BTreeMap::new(),
            warned: BTreeMap::new(),
            incr: Default::default(),
            generated: Vec::new(),
        }
    }

    /// This node's labels changed: select CECs by the new ones.
    pub fn set_node_labels(&mut self, labels: BTreeMap<String, String>) {
        self.pipeline.set_node_labels(labels.clone());
        self.node_labels = labels;
        // Hand the snapshot to the cache again: with or without labels it
        // is the default node's or this node's own.
        self.last_resources = None;
        // Which CECs select this node changed although no object did: the
        // next pass walks every CEC.
        self.incr.pipeline_seen = None;
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

    /// Runs the config pipeline on the store changes it has not seen and
    /// publishes what changed. `rerun`: an earlier step of this pass already
    /// ran, so nothing new means nothing to do. True when it saw changes.
    fn pipeline_step(&mut self, state: &AgentState, rerun: bool) -> bool {
        let store = &state.store;
        let (pipeline_rev, changes) = self.incr.pipeline_changes(store);
        if rerun && changes.is_empty() {
            self.incr.pipeline_seen = Some(pipeline_rev);
            return false;
        }
        let snap = store.snapshot();
        let outcome = self.pipeline.run_changes(&snap, &changes);
        self.incr.pipeline_seen = Some(pipeline_rev);
        let mut full_pass = false;
        let resources_changed = match outcome {
            configs::PassOutcome::Unchanged => false,
            configs::PassOutcome::Endpoints(eds) => {
                incremental::patch_rejected(&mut self.incr.pipeline_rejected, eds.rejected);
                self.incr.publish_endpoints(
                    &mut self.last_resources,
                    &mut self.xds_snapshot,
                    eds.updated,
                )
            }
            configs::PassOutcome::Full(pass) => {
                full_pass = true;
                self.incr.pipeline_rejected = pass.rejected;
                configs::publish_warnings(&mut self.warned, pass.warnings, &state.warnings);
                self.served = pass.served;
                if let Some(dp) = &state.datapath {
                    dp.set_proxy_targets(pass.redirects);
                }
                // Resources are shared and carry their content hash: the
                // snapshot is updated by the resources that differ only.
                incremental::publish_full(
                    &mut self.last_resources,
                    &mut self.xds_snapshot,
                    pass.resources,
                )
            }
        };
        if resources_changed {
            // Without labels of its own the agent's node is the default
            // node; with labels, its snapshot is node-specific.
            let own = (!self.node_labels.is_empty()).then_some(state.node_id.as_str());
            state.cache.set_snapshot(own, self.xds_snapshot.clone());
        }
        if resources_changed || !changes.is_empty() {
            self.nodes.pass(
                &snap,
                &state.cache,
                &state.node_id,
                &self.node_labels,
                &self.xds_snapshot,
            );
        }
        if full_pass {
            // The pipeline's rejections count from here on; what the ACK
            // reports name: generation and LB addresses of each served (or
            // rejected) CEC as this pass read it.
            self.rejected_configs = self
                .incr
                .front_rejected
                .iter()
                .chain(self.incr.pipeline_rejected.iter())
                .filter(|(k, _)| report::is_config(k.kind))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            self.served_generations = self
                .served
                .keys()
                .chain(self.rejected_configs.keys())
                .filter_map(|k| Some((k.clone(), snap.get(k)?.meta().generation.unwrap_or(0))))
                .collect();
            self.served_addresses = self
                .served
                .keys()
                .filter_map(|k| Some((k.clone(), report::frontends(&snap, snap.get(k)?))))
                .collect();
            self.served_parts = report::split_parts(&snap, self.served.keys());
        }
        !changes.is_empty()
    }

    /// Recompute the desired configuration from what changed in the store
    /// since the last pass and hand the changed resources to the xDS cache;
    /// record what is rejected.
    pub fn store_pass(&mut self, state: &AgentState) {
        let store = &state.store;
        let t0 = std::time::Instant::now();
        // ---- incremental control plane (see incremental.rs) ----
        // The controller (LB IPAM, Ingress controller, status) runs unless
        // the change is one it never reads (EndpointSlices of workloads).
        let (front_rev, front_changes) = self.incr.front_changes(store);
        let snap = store.snapshot();
        let front = incremental::front_needed(&front_changes, &snap);
        drop(snap);
        let mut early = false;
        if front && self.controller.is_some() && self.incr.pipeline_seen.is_some() {
            // What is already in the store is served before the controller
            // runs: its pass walks every Ingress (long at scale), and in
            // `membrane up` its writes reach the store only later, through
            // the API, so an EndpointSlice change that arrived with an
            // unrelated status write would otherwise wait for it.
            early = self.pipeline_step(state, false);
        }
        let t_early = t0.elapsed();
        if front {
            let controlled = match self.controller.as_mut() {
                Some(c) => c.pass(store),
                None => ControllerPass::default(),
            };
            self.incr.front_rejected = controlled.rejected;
            self.generated = controlled.generated;
        }
        self.incr.front_seen = Some(front_rev);
        let t1 = t0.elapsed();
        // What the controller wrote straight into the store (no API), or
        // everything when there was no early step.
        self.pipeline_step(state, early);
        let t2 = t0.elapsed();
        let mut rejected = self.incr.front_rejected.clone();
        rejected.extend(
            self.incr
                .pipeline_rejected
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        self.rejected_configs = rejected
            .iter()
            .filter(|(k, _)| report::is_config(k.kind))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if front {
            // A CEC the controller newly rejects is reported at its generation.
            let snap = store.snapshot();
            for k in self.rejected_configs.keys() {
                if !self.served_generations.contains_key(k)
                    && let Some(obj) = snap.get(k)
                {
                    let generation = obj.meta().generation.unwrap_or(0);
                    self.served_generations.insert(k.clone(), generation);
                }
            }
        }
        // ---- end of the incremental part ----
        // An Ingress answers for the CEC generated from it.
        for (ingress, cec) in &self.generated {
            if let Some(why) = rejected.get(cec).cloned() {
                rejected
                    .entry(ingress.clone())
                    .or_insert_with(|| format!("{ingress}: its {why}"));
            }
        }
        // Where a pass spends its time (MEMBRANE_LOG=membrane_agent=debug).
        debug!(
            changes = %incremental::summary(&front_changes),
            early_ms = t_early.as_secs_f64() * 1e3,
            operator_ms = (t1 - t_early).as_secs_f64() * 1e3,
            pipeline_ms = (t2 - t1).as_secs_f64() * 1e3,
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
/// built for unchanged objects); after every wake-up (store change or xDS
/// ACK) compare what Envoy ACKed with what it was sent and publish this
/// node's ACK report if it changed. The operator writes Ingress status from
/// those reports (in `membrane up`, in the next store pass).
async fn reconcile_loop(
    config: &AgentConfig,
    state: &AgentState,
    reports: &dyn Sink,
    controller: Option<Box<dyn Controller>>,
    shutdown: CancellationToken,
) {
    let store = &state.store;
    let mut store_rx = store.subscribe();
    let mut ack_rx = state.cache.subscribe();
    let mut rec = Reconciler::new(config, controller);
    let mut reporter = report::Reporter::new(
        &config.node_name,
        config.node_uid.as_deref(),
        &config.node_labels,
        reports,
    );
    let mut labels_rx = config.node_labels_updates.clone();
    let mut nacks = nack::NackHandler::default();
    let mut store_dirty = true;

    loop {
        store_dirty |= rec.pipeline.housekeeping(std::time::Instant::now());
        if store_dirty {
            store_rx.borrow_and_update();
            rec.store_pass(state);
        }
        ack_rx.borrow_and_update();
        // Also after a store pass: one whose changes the pipeline ignored
        // publishes no node snapshots, and a node that identified itself
        // meanwhile would wait for the next tick.
        if rec.nodes.nodes_changed(&state.cache, &state.node_id) {
            rec.node_pass(state);
        }
        // Remember what Envoy fully ACKed, report it, then act on new NACKs.
        let mut acked = std::collections::BTreeSet::new();
        // One lock for the whole check, not one per served resource.
        let acked_now = state.cache.acked_resources(&state.node_id);
        for (key, resources) in &rec.served {
            let all_acked = resources.iter().all(|(t, n)| {
                let Some(current) = rec.xds_snapshot.get(t, n) else {
                    return false;
                };
                acked_now
                    .get(*t)
                    .and_then(|m| m.get(n))
                    .is_some_and(|r| Arc::ptr_eq(r, current) || r.hash == current.hash)
            });
            if all_acked {
                rec.pipeline.mark_acked(key);
                acked.insert(key.clone());
            }
        }
        reporter.publish(&rec, &acked);
        if nacks.handle(&mut rec, state) {
            store_dirty = true;
            continue;
        }

        store_dirty = tokio::select! {
            r = store_rx.changed() => { if r.is_err() { return; } true }
            r = ack_rx.changed() => { if r.is_err() { return; } false }
            _ = configs::retry_timer(rec.pipeline.next_wake()) => false,
            labels = next_labels(&mut labels_rx) => match labels {
                Some(labels) => {
                    info!(?labels, "node labels changed");
                    reporter.set_labels(&labels);
                    rec.set_node_labels(labels);
                    true
                }
                None => {
                    labels_rx = None;
                    false
                }
            },
            _ = shutdown.cancelled() => return,
        };
    }
}

/// The next label set, or `None` once the updates end.
async fn next_labels(
    rx: &mut Option<watch::Receiver<BTreeMap<String, String>>>,
) -> Option<BTreeMap<String, String>> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
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
