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
    /// rejection. `None`: the same as the pass before.
    pub generated: Option<Vec<(ObjectKey, ObjectKey)>>,
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
    /// Hand the snapshot to the cache even if no resource changed (the
    /// node's labels changed).
    republish: bool,
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
    /// The pipeline's warnings as of the latest pass.
    pipeline_warnings: BTreeMap<ObjectKey, String>,
    /// Which served objects Envoy ACKed.
    pub acks: incremental::AckState,
    /// Something the ACK report shows changed since it was last written.
    pub report_dirty: bool,
    /// Time the latest store pass spent in the config pipeline and its
    /// bookkeeping (snapshot update, served and ACK report state).
    pub pipeline_time: std::time::Duration,
    incr: incremental::PassState,
    /// `(Ingress, CEC generated from it)` as the controller last reported,
    /// by CEC: `(position in the report, Ingress)`.
    generated: std::collections::HashMap<ObjectKey, Vec<(usize, ObjectKey)>>,
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
                // `MEMBRANE_FULL_PASSES=1`: every CEC change takes a full
                // pass (to compare with, or to rule out, the passes over
                // changed CECs only).
                p.set_always_full(
                    std::env::var_os("MEMBRANE_FULL_PASSES").is_some_and(|v| v == "1"),
                );
                if let Some(range) = config.proxy_ports.clone() {
                    p.set_proxy_port_range(range);
                }
                p
            },
            node_labels: config.node_labels.clone(),
            nodes: nodes::NodeSnapshots::new(ports),
            republish: true,
            xds_snapshot: Snapshot::new(),
            served: BTreeMap::new(),
            served_generations: BTreeMap::new(),
            served_addresses: BTreeMap::new(),
            served_parts: BTreeMap::new(),
            rejected_configs: BTreeMap::new(),
            logged: BTreeMap::new(),
            warned: BTreeMap::new(),
            pipeline_warnings: BTreeMap::new(),
            acks: Default::default(),
            report_dirty: true,
            pipeline_time: std::time::Duration::ZERO,
            incr: Default::default(),
            generated: Default::default(),
        }
    }

    /// This node's labels changed: select CECs by the new ones.
    pub fn set_node_labels(&mut self, labels: BTreeMap<String, String>) {
        self.pipeline.set_node_labels(labels.clone());
        self.node_labels = labels;
        // Hand the snapshot to the cache again: with or without labels it
        // is the default node's or this node's own.
        self.republish = true;
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
        let t = std::time::Instant::now();
        let saw = self.pipeline_step_inner(state, rerun);
        self.pipeline_time += t.elapsed();
        saw
    }

    fn pipeline_step_inner(&mut self, state: &AgentState, rerun: bool) -> bool {
        let store = &state.store;
        let (pipeline_rev, changes) = self.incr.pipeline_changes(store);
        if rerun && changes.is_empty() {
            self.incr.pipeline_seen = Some(pipeline_rev);
            return false;
        }
        let snap = store.snapshot();
        if timeline_on() && !changes.config_keys.is_empty() {
            timeline("pipeline start", changes.config_keys.iter());
        }
        let outcome = self.pipeline.run_changes(&snap, &changes);
        self.incr.pipeline_seen = Some(pipeline_rev);
        // What the ACK report is built from (served CECs, their
        // generations, addresses and rejections) changes only with a pass
        // over configs, or below with what the pass looked at.
        let mut report_inputs = matches!(
            outcome,
            configs::PassOutcome::Configs(_) | configs::PassOutcome::Full(_)
        );
        let mut full_pass = false;
        // CECs and Services the pass looked at (a pass over changed CECs).
        let mut looked_at: Vec<ObjectKey> = Vec::new();
        let published = match outcome {
            configs::PassOutcome::Unchanged => Vec::new(),
            configs::PassOutcome::Endpoints(eds) => {
                incremental::patch_rejected(&mut self.incr.pipeline_rejected, eds.rejected);
                self.incr
                    .publish_endpoints(&mut self.xds_snapshot, eds.updated)
            }
            configs::PassOutcome::Configs(pass) => {
                looked_at.extend(pass.rejected.iter().map(|(k, _)| k.clone()));
                looked_at.extend(pass.touched.iter().cloned());
                incremental::patch_rejected(&mut self.incr.pipeline_rejected, pass.rejected);
                if !pass.warnings.is_empty() {
                    incremental::patch_rejected(&mut self.pipeline_warnings, pass.warnings);
                    configs::publish_warnings(
                        &mut self.warned,
                        self.pipeline_warnings.clone(),
                        &state.warnings,
                    );
                }
                for (key, served) in pass.served {
                    self.acks.touch([key.clone()]);
                    match served {
                        Some(v) => self.served.insert(key, v),
                        None => self.served.remove(&key),
                    };
                }
                incremental::publish_delta(&mut self.xds_snapshot, pass.upserts, pass.removals)
            }
            configs::PassOutcome::Full(pass) => {
                full_pass = true;
                self.incr.pipeline_rejected = pass.rejected;
                self.pipeline_warnings = pass.warnings.clone();
                configs::publish_warnings(&mut self.warned, pass.warnings, &state.warnings);
                self.served = pass.served;
                self.acks.reset();
                if let Some(dp) = &state.datapath {
                    dp.set_proxy_targets(pass.redirects);
                }
                // Resources are shared and carry their content hash: the
                // snapshot is updated by the resources that differ only.
                incremental::publish_full(&mut self.xds_snapshot, pass.resources)
            }
        };
        let resources_changed = !published.is_empty() || std::mem::take(&mut self.republish);
        self.acks.published(published);
        if resources_changed {
            // Without labels of its own the agent's node is the default
            // node; with labels, its snapshot is node-specific.
            let own = (!self.node_labels.is_empty()).then_some(state.node_id.as_str());
            // Logged before the hand-over: a stream task may answer Envoy
            // before this thread logs again, and the log must keep order.
            timeline("published", std::iter::empty());
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
        } else {
            // Only what the pass looked at can have changed (split CECs
            // always take full passes, so there are no parts to follow),
            // and the CECs whose rejection by the controller came or went
            // since (the controller's rejections change without the CEC).
            let incr = &self.incr;
            let rejected_now = |k: &ObjectKey| {
                incr.pipeline_rejected
                    .get(k)
                    .or_else(|| incr.front_rejected.get(k))
            };
            looked_at.extend(
                self.incr
                    .front_rejected
                    .keys()
                    .filter(|k| report::is_config(k.kind))
                    .filter(|k| self.rejected_configs.get(*k) != rejected_now(k))
                    .cloned(),
            );
            looked_at.extend(
                self.rejected_configs
                    .keys()
                    .filter(|k| rejected_now(k).is_none())
                    .cloned(),
            );
            looked_at.sort();
            looked_at.dedup();
            report_inputs |= !looked_at.is_empty();
            for k in looked_at {
                let rejected = self
                    .incr
                    .pipeline_rejected
                    .get(&k)
                    .or_else(|| self.incr.front_rejected.get(&k))
                    .filter(|_| report::is_config(k.kind));
                match rejected {
                    Some(why) => self.rejected_configs.insert(k.clone(), why.clone()),
                    None => self.rejected_configs.remove(&k),
                };
                let obj = snap.get(&k);
                let listed = self.served.contains_key(&k) || self.rejected_configs.contains_key(&k);
                match obj.filter(|_| listed) {
                    Some(o) => {
                        let generation = o.meta().generation.unwrap_or(0);
                        self.served_generations.insert(k.clone(), generation);
                    }
                    None => {
                        self.served_generations.remove(&k);
                    }
                }
                match obj.filter(|_| self.served.contains_key(&k)) {
                    Some(o) => {
                        let addresses = report::frontends(&snap, o);
                        self.served_addresses.insert(k.clone(), addresses);
                    }
                    None => {
                        self.served_addresses.remove(&k);
                    }
                }
                self.served_parts.remove(&k);
            }
        }
        self.report_dirty |= report_inputs;
        !changes.is_empty()
    }

    /// Remember what Envoy fully ACKed (looking only at what changed since
    /// the last call, or at everything after a full pass or a new stream).
    /// True when the ACK report may have changed.
    pub fn ack_pass(&mut self, state: &AgentState) -> bool {
        // One lock for the whole check, not one per served resource.
        let (stream, acked_now) = state.cache.acked_resources_of_stream(&state.node_id);
        let pipeline = &mut self.pipeline;
        let mut newly: Vec<ObjectKey> = Vec::new();
        let on = timeline_on();
        let changed = self.acks.check(
            &self.served,
            &self.xds_snapshot,
            &acked_now,
            stream,
            |key| {
                pipeline.mark_acked(key);
                if on && report::is_config(key.kind) && newly.len() < 8 {
                    newly.push(key.clone());
                }
            },
        );
        if !newly.is_empty() {
            timeline("acked", newly.iter());
        }
        changed || std::mem::take(&mut self.report_dirty)
    }

    /// Recompute the desired configuration from what changed in the store
    /// since the last pass and hand the changed resources to the xDS cache;
    /// record what is rejected.
    pub fn store_pass(&mut self, state: &AgentState) {
        let store = &state.store;
        let t0 = std::time::Instant::now();
        self.pipeline_time = std::time::Duration::ZERO;
        // ---- incremental control plane (see incremental.rs) ----
        // The controller (LB IPAM, Ingress controller, status) runs unless
        // the change is one it never reads (EndpointSlices of workloads).
        let (front_rev, front_changes) = self.incr.front_changes(store);
        let snap = store.snapshot();
        let front = incremental::front_needed(&front_changes, &snap);
        drop(snap);
        if timeline_on()
            && let membrane_store::Changes::Keys(keys) = &front_changes
        {
            let ingresses = keys.iter().filter(|c| {
                c.key.kind == membrane_store::Kind::Ingress
                    && c.kind != membrane_store::KeyChangeKind::StatusUpdated
            });
            timeline("pass start", ingresses.map(|c| &c.key));
        }
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
            timeline("controller done", std::iter::empty());
            self.incr.front_rejected = controlled.rejected;
            if let Some(generated) = controlled.generated {
                self.generated.clear();
                for (i, (ingress, cec)) in generated.into_iter().enumerate() {
                    self.generated.entry(cec).or_default().push((i, ingress));
                }
            }
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
        let rejected_configs: BTreeMap<ObjectKey, String> = rejected
            .iter()
            .filter(|(k, _)| report::is_config(k.kind))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if rejected_configs != self.rejected_configs {
            self.rejected_configs = rejected_configs;
            self.report_dirty = true;
        }
        if front {
            // A CEC the controller newly rejects is reported at its generation.
            let snap = store.snapshot();
            for k in self.rejected_configs.keys() {
                if !self.served_generations.contains_key(k)
                    && let Some(obj) = snap.get(k)
                {
                    let generation = obj.meta().generation.unwrap_or(0);
                    self.served_generations.insert(k.clone(), generation);
                    self.report_dirty = true;
                }
            }
        }
        // ---- end of the incremental part ----
        // An Ingress answers for the CEC generated from it (looked up from
        // the rejected CECs: there are few of them, and many Ingresses).
        let mut answers: Vec<(usize, &ObjectKey, String)> = Vec::new();
        for (cec, why) in rejected.iter().filter(|(k, _)| report::is_config(k.kind)) {
            for (i, ingress) in self.generated.get(cec).into_iter().flatten() {
                answers.push((*i, ingress, why.clone()));
            }
        }
        answers.sort_by_key(|(i, _, _)| *i);
        for (_, ingress, why) in answers {
            rejected
                .entry(ingress.clone())
                .or_insert_with(|| format!("{ingress}: its {why}"));
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

/// Debug events of one change's way through the agent (target
/// `membrane_timeline`, read by `membrane bench xds --scenario apply
/// --timeline`): the log's timestamps put them on one clock with the API's
/// commits and the xDS server's responses.
fn timeline_on() -> bool {
    tracing::enabled!(target: "membrane_timeline", tracing::Level::DEBUG)
}

fn timeline<'k>(event: &str, keys: impl Iterator<Item = &'k ObjectKey>) {
    if timeline_on() {
        let keys: Vec<String> = keys.map(ToString::to_string).collect();
        debug!(target: "membrane_timeline", keys = keys.join(","), "{event}");
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
            // What Envoy ACKed while the last pass ran is reported before
            // the next one (a pass at scale takes long; the Ingress
            // addresses wait for the report).
            if rec.ack_pass(state) {
                reporter.publish(&rec, &rec.acks.acked, std::time::Instant::now());
            }
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
        // Remember what Envoy fully ACKed, report it (or what was held
        // back and is due), then act on new NACKs.
        let now = std::time::Instant::now();
        if rec.ack_pass(state) || reporter.due().is_some_and(|due| due <= now) {
            reporter.publish(&rec, &rec.acks.acked, now);
        }
        if nacks.handle(&mut rec, state) {
            store_dirty = true;
            continue;
        }

        store_dirty = tokio::select! {
            r = store_rx.changed() => { if r.is_err() { return; } true }
            r = ack_rx.changed() => { if r.is_err() { return; } false }
            _ = configs::retry_timer(rec.pipeline.next_wake()) => false,
            _ = configs::retry_timer(reporter.due()) => false,
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
