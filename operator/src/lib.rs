//! The Membrane operator: one per cluster, leader-elected. It turns
//! Ingresses into CiliumEnvoyConfigs, LoadBalancer Services and
//! EndpointSlices, hands out LB addresses, syncs TLS Secrets into the
//! secrets namespace, reports rejections as Warning Events, and writes an
//! Ingress's address once the agents serving it report an ACK.
//!
//! [`Operator::pass`] is the whole reconcile logic, and it is the same code
//! in both modes: `membrane up` runs it inside the agent's loop writing to
//! the in-process store ([`membrane_k8s::StoreSink`]); `membrane operator`
//! runs it in [`run`] against a Kubernetes API, writing through a queued,
//! leader-gated [`membrane_k8s::KubeSink`].

pub mod ingress_controller;
pub mod ingress_status;
pub mod lb_ipam;
pub mod node_ipam;

use std::collections::BTreeMap;

use membrane_crds::{NACKED, ProxyNodeStatus};
use membrane_ingress::{LoadBalancerMode, TranslateOptions};
use membrane_k8s::{KubeSource, Sink, Warning};
use membrane_store::{ChangeCursor, Kind, ObjectKey, Store, StoreSnapshot};
use tokio::sync::watch;
use tracing::{info, warn};

pub use ingress_controller::{IngressOptions, ManagedIngress};
pub use membrane_ingress::{Pool, PoolError};

/// What the operator is told at start.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    pub lb_pool: Pool,
    pub secrets_namespace: String,
    /// Mode of Ingresses without `ingress.cilium.io/loadbalancer-mode`.
    pub ingress_default_lb_mode: LoadBalancerMode,
    pub ingress: IngressOptions,
    /// Cluster pool node pod CIDRs are carved from (`--cluster-pool-*`);
    /// empty: pod CIDRs are not allocated.
    pub cluster_pool: node_ipam::ClusterPoolConfig,
}

/// What one pass found.
#[derive(Debug, Default)]
pub struct OperatorPass {
    /// Objects rejected (bad Ingress, no free address), with why.
    pub rejected: BTreeMap<ObjectKey, String>,
    /// Managed Ingresses and the objects generated for them (shared
    /// between passes, see [`ingress_controller::IngressPass::managed`]).
    pub managed: Vec<std::sync::Arc<ManagedIngress>>,
}

/// The operator's reconcile state (memos of the controllers).
#[derive(Debug)]
pub struct Operator {
    pool: Pool,
    cluster_pool: node_ipam::ClusterPoolConfig,
    node_ipam: node_ipam::NodeIpam,
    opts: TranslateOptions,
    ipam: lb_ipam::LbIpam,
    ingress: ingress_controller::IngressController,
    status: ingress_status::StatusWriter,
    /// Rejections already reported as Events.
    warned: BTreeMap<ObjectKey, String>,
    /// Where the NACK reports were last read, and what they said.
    reports: ChangeCursor,
    nacked: BTreeMap<ObjectKey, String>,
}

impl Operator {
    pub fn new(config: &OperatorConfig) -> Self {
        Self {
            pool: config.lb_pool,
            cluster_pool: config.cluster_pool.clone(),
            node_ipam: Default::default(),
            opts: config.ingress.apply(TranslateOptions {
                secrets_namespace: config.secrets_namespace.clone(),
                default_lb_mode: config.ingress_default_lb_mode,
                ..TranslateOptions::default()
            }),
            ipam: Default::default(),
            ingress: Default::default(),
            status: Default::default(),
            warned: BTreeMap::new(),
            reports: ChangeCursor::default(),
            nacked: BTreeMap::new(),
        }
    }

    /// One pass over what changed in `store` since the last one, writing
    /// through `sink`. Each stage follows the store's change log itself
    /// and reads a fresh snapshot, so with a synchronous sink a stage sees
    /// what the previous one wrote.
    pub fn pass(&mut self, store: &Store, sink: &dyn Sink) -> OperatorPass {
        let mut rejected = self.ipam.reconcile(&self.pool, sink, store);
        rejected.extend(
            self.node_ipam
                .reconcile(&store.snapshot(), &self.cluster_pool, sink),
        );
        let ingress = self.ingress.reconcile_store(sink, store, &self.opts);
        rejected.extend(ingress.rejected);
        self.status.reconcile(sink, store, &ingress.managed);
        // What agents rejected (Envoy NACKs, CECs they cannot parse) is
        // reported as well, on the CEC, naming the node.
        let reports_changed = self
            .reports
            .advance(store)
            .touch_any(&[Kind::ProxyNodeStatus]);
        // Taken after the log was read, so it holds those changes.
        let snap = store.snapshot();
        if reports_changed {
            self.nacked = nacked_configs(&snap);
        }
        let mut warnings = rejected.clone();
        for (key, why) in &self.nacked {
            warnings.entry(key.clone()).or_insert_with(|| why.clone());
        }
        // One Event per distinct rejection; the recorder counts repeats.
        for (key, why) in &warnings {
            if self.warned.get(key) == Some(why) {
                continue;
            }
            sink.warn(Warning {
                regarding: key.clone(),
                uid: snap.get(key).and_then(|o| o.meta().uid.clone()),
                reason: reason_of(key.kind, why).to_owned(),
                note: why.clone(),
            });
        }
        self.warned = warnings;
        OperatorPass {
            rejected,
            managed: ingress.managed,
        }
    }
}

/// The configs agents report as NACKed, with the node and why.
fn nacked_configs(snap: &StoreSnapshot) -> BTreeMap<ObjectKey, String> {
    let mut out = BTreeMap::new();
    for report in snap.typed::<ProxyNodeStatus>(None) {
        let node = membrane_crds::report_node(report);
        for c in report.status.iter().flat_map(|s| &s.configs) {
            if c.state != NACKED {
                continue;
            }
            let Some(kind) = Kind::from_type(membrane_crds::API_VERSION, &c.kind) else {
                continue;
            };
            let why = c.message.as_deref().unwrap_or("rejected");
            out.entry(ObjectKey::new(kind, &c.namespace, &c.name))
                .or_insert_with(|| format!("node {node}: {why}"));
        }
    }
    out
}

/// The Event reason of a rejection.
fn reason_of(kind: Kind, why: &str) -> &'static str {
    match kind {
        Kind::Ingress if why.contains(" not found") || why.contains(" has no port ") => {
            "MissingBackend"
        }
        Kind::Ingress => "InvalidIngress",
        Kind::Service => "AddressUnavailable",
        Kind::CiliumEnvoyConfig | Kind::CiliumClusterwideEnvoyConfig => "ConfigRejected",
        Kind::CiliumNode => "PodCIDRUnavailable",
        _ => "Rejected",
    }
}

/// The kinds the operator reads.
pub const WATCHED_KINDS: &[Kind] = &[
    Kind::Ingress,
    Kind::IngressClass,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Secret,
    Kind::CiliumEnvoyConfig,
    Kind::CiliumClusterwideEnvoyConfig,
    Kind::ProxyNodeStatus,
    Kind::CiliumNode,
];

/// `membrane operator`: watch the API, and while `leader` reads true run
/// passes on every change, writing through `sink` (gated on the same
/// leadership). Every leadership term starts from fresh controller memos,
/// so a new leader re-derives everything from what it reads. Returns when
/// `shutdown` resolves.
pub async fn run(
    config: OperatorConfig,
    client: kube::Client,
    sink: &dyn Sink,
    mut leader: watch::Receiver<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let store = Store::new();
    let source = KubeSource::with_kinds(client, WATCHED_KINDS.to_vec());
    let mut synced = source.synced();
    let _source = store.spawn_source(source);
    tokio::pin!(shutdown);
    tokio::select! {
        ok = synced.wait() => if !ok { warn!("operator: watches stopped before syncing"); return; },
        _ = &mut shutdown => return,
    }
    info!("operator: caches synced");
    let mut store_rx = store.subscribe();
    loop {
        // Standby: wait to lead.
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { return },
            _ = &mut shutdown => return,
        }
        info!("operator: leading; reconciling");
        let mut operator = Operator::new(&config);
        loop {
            store_rx.borrow_and_update();
            let pass = operator.pass(&store, sink);
            if !pass.rejected.is_empty() {
                tracing::debug!(rejected = pass.rejected.len(), "operator pass");
            }
            // A change during the pass leaves the receiver marked, so the
            // next wait returns at once: no wake-up is lost.
            tokio::select! {
                r = store_rx.changed() => if r.is_err() { return },
                r = leader.changed() => {
                    if r.is_err() { return }
                    if !*leader.borrow() {
                        info!("operator: no longer leading; standing by");
                        break;
                    }
                }
                _ = &mut shutdown => return,
            }
        }
    }
}
