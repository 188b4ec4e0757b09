//! Kubernetes mode: `membrane operator` (one per cluster, leader-elected)
//! and `membrane agent` (one per node), each against a Kubernetes API
//! (a cluster's, or `membrane apiserver`). `membrane up` runs both in one
//! process against its embedded API through the same functions here
//! ([`operator_config`], [`agent_config`], [`serve_agent`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use membrane_agent::{AgentConfig, Controller, ControllerPass, Pool, PortMap};
use membrane_k8s::{
    AGENT_MANAGER, EventRecorder, KubeSink, KubeSource, LeaderElector, LeaseConfig,
    OPERATOR_MANAGER, Sink, StoreSink, Writer,
};
use membrane_operator::{ManagedIngress, Operator, OperatorConfig};
use membrane_store::{Kind, Store};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::up::{EnvoyFlags, IngressFlags, ipv6_available, parse_labels, stop_on_signal};

/// The operator's pass inside the agent's loop (`membrane up`, and the
/// benchmarks), writing through `sink`: the embedded API's queued writer
/// in `membrane up`; without one (benchmarks only, which measure the
/// control plane without an API server), straight into the store it reads.
pub struct InProcessOperator {
    operator: Operator,
    sink: Option<Arc<dyn Sink>>,
    /// The managed list the agent was last given.
    managed: Vec<Arc<ManagedIngress>>,
}

impl InProcessOperator {
    pub fn new(config: &OperatorConfig, sink: Option<Arc<dyn Sink>>) -> Self {
        Self {
            operator: Operator::new(config),
            sink,
            managed: Vec::new(),
        }
    }
}

impl Controller for InProcessOperator {
    fn pass(&mut self, store: &Store) -> ControllerPass {
        let pass = match &self.sink {
            Some(sink) => self.operator.pass(store, sink.as_ref()),
            None => self.operator.pass(store, &StoreSink(store.clone())),
        };
        // Entries are shared between passes: the same allocations in the
        // same order are the same list.
        let same = pass.managed.len() == self.managed.len()
            && pass
                .managed
                .iter()
                .zip(&self.managed)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        let generated = (!same).then(|| {
            pass.managed
                .iter()
                .map(|m| (m.ingress.clone(), m.cec.clone()))
                .collect()
        });
        self.managed = pass.managed;
        ControllerPass {
            rejected: pass.rejected,
            generated,
        }
    }
}

/// The in-process operator with default Ingress options, writing into the
/// store (benchmarks).
pub fn in_process_operator(lb_pool: Pool) -> Box<dyn Controller> {
    Box::new(InProcessOperator::new(
        &OperatorConfig {
            lb_pool,
            secrets_namespace: "cilium-secrets".into(),
            ingress_default_lb_mode: Default::default(),
            ingress: Default::default(),
            cluster_pool: Default::default(),
        },
        None,
    ))
}

/// The operator's configuration from its flags (`membrane operator` and
/// `membrane up` share them).
pub(crate) fn operator_config(
    lb_pool: Pool,
    secrets_namespace: &str,
    ingress_default_lb_mode: membrane_ingress::LoadBalancerMode,
    ingress: &IngressFlags,
    cluster_pool: membrane_operator::node_ipam::ClusterPoolConfig,
) -> Result<OperatorConfig> {
    let mut ingress = ingress.options()?;
    if let Some(h) = ingress.host_network.as_mut() {
        h.ipv6 = ipv6_available();
    }
    Ok(OperatorConfig {
        lb_pool,
        secrets_namespace: secrets_namespace.to_owned(),
        ingress_default_lb_mode,
        ingress,
        cluster_pool,
    })
}

/// The agent's wiring that differs between `membrane agent` and
/// `membrane up` (everything else comes from the shared flags).
pub(crate) struct AgentSetup {
    pub run_dir: PathBuf,
    pub api_socket: PathBuf,
    pub lb_pool: Pool,
    pub node_name: String,
    pub node: membrane_k8s::NodeInfo,
    pub node_labels_updates: Option<tokio::sync::watch::Receiver<BTreeMap<String, String>>>,
    pub proxy_ports: Option<std::ops::RangeInclusive<u16>>,
    pub datapath: Option<membrane_agent::datapath::DatapathOptions>,
    pub cni: Option<membrane_agent::cni::CniOptions>,
}

/// The agent's configuration (`membrane agent` and `membrane up`).
pub(crate) fn agent_config(envoy: &EnvoyFlags, setup: AgentSetup) -> AgentConfig {
    AgentConfig {
        run_dir: setup.run_dir,
        api_socket: setup.api_socket,
        envoy_bin: envoy.envoy_bin.clone(),
        envoy_admin_port: envoy.envoy_admin_port,
        envoy_concurrency: envoy.envoy_concurrency,
        envoy_log_level: envoy.envoy_log_level.clone(),
        xds_protocol: envoy.xds_protocol,
        lb_pool: setup.lb_pool,
        ports: PortMap {
            http: envoy.http_port,
            https: envoy.https_port,
            // Set by the agent from `datapath`.
            transparent: false,
        },
        node_name: setup.node_name,
        node_uid: setup.node.uid,
        node_labels: setup.node.labels,
        node_labels_updates: setup.node_labels_updates,
        proxy_ports: setup.proxy_ports,
        datapath: setup.datapath,
        cni: setup.cni,
    }
}

/// Node `name` (registered with `labels` if new) and a follower of its
/// labels.
pub(crate) async fn register_node(
    client: &membrane_k8s::Client,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(
    membrane_k8s::NodeInfo,
    tokio::sync::watch::Receiver<BTreeMap<String, String>>,
)> {
    let node = membrane_k8s::ensure_node(client, name, labels)
        .await
        .context("reading this node's labels")?;
    let updates = membrane_k8s::watch_node_labels(client.clone(), name, node.labels.clone());
    Ok((node, updates))
}

/// Runs the agent against an API until `shutdown`: watches `kinds` into
/// `store`, serves once every watch has listed, reports ACKs in its
/// ProxyNodeStatus (withdrawn on a clean stop). `controller` runs in every
/// store pass (`membrane up`'s operator).
pub(crate) async fn serve_agent(
    client: membrane_k8s::Client,
    store: Store,
    kinds: Vec<Kind>,
    config: AgentConfig,
    controller: Option<Box<dyn Controller>>,
    shutdown: CancellationToken,
) -> Result<()> {
    let source = KubeSource::with_kinds(client.clone(), kinds);
    let mut synced = source.synced();
    let _source = store.spawn_source(source);
    // Ready only once every watch has listed: Envoy's first configuration
    // is complete, never a partial cache.
    tokio::select! {
        ok = synced.wait() => anyhow::ensure!(ok, "the API watches stopped before syncing"),
        _ = shutdown.cancelled() => return Ok(()),
    }
    info!("caches synced; serving");
    let writer = Writer::new(client, AGENT_MANAGER);
    let reports = Arc::new(KubeSink::spawn(writer.clone(), None, None));
    let node_name = config.node_name.clone();
    membrane_agent::run(config, store, reports, controller, shutdown).await?;
    // A node that stops cleanly withdraws its report, so it no longer holds
    // Ingress addresses back (a crashed one's report stays: see docs).
    // Every object the report may be spread over (one already gone is fine).
    let deletes = (0..membrane_crds::REPORT_SHARDS).map(|shard| {
        let name = membrane_crds::report_object_name(&node_name, shard);
        let key = membrane_store::ObjectKey::new(Kind::ProxyNodeStatus, "", &name);
        let writer = &writer;
        async move { writer.delete(&key).await }
    });
    let all = futures::future::join_all(deletes);
    match tokio::time::timeout(Duration::from_secs(5), all).await {
        Ok(results) => match results.into_iter().find_map(Result::err) {
            None => info!(node = %node_name, "ProxyNodeStatus withdrawn"),
            Some(e) => tracing::warn!(error = %e, "withdrawing the ProxyNodeStatus"),
        },
        Err(_) => tracing::warn!("withdrawing the ProxyNodeStatus: no answer within 5 s"),
    }
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// kubeconfig of the API to use (default: $KUBECONFIG, ~/.kube/config,
    /// then the in-cluster service account, as kubectl).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Pool LoadBalancer Service addresses come from.
    #[arg(long, default_value = "127.0.100.0/24")]
    pub lb_pool: Pool,
    /// Namespace TLS Secrets are synced to for SDS, as Cilium's.
    #[arg(long, default_value = "cilium-secrets")]
    pub secrets_namespace: String,
    /// Load-balancer mode of Ingresses without the
    /// `ingress.cilium.io/loadbalancer-mode` annotation: dedicated or shared.
    #[arg(long, default_value = "dedicated")]
    pub ingress_default_lb_mode: membrane_ingress::LoadBalancerMode,
    #[command(flatten)]
    pub ingress: IngressFlags,
    /// Pod CIDRs handed to every CiliumNode (cluster-pool IPAM).
    #[command(flatten)]
    pub cluster_pool: super::up::ClusterPoolArgs,
    /// Namespace of the leader-election Lease `cilium-operator-resource-lock`.
    #[arg(long, default_value = "kube-system")]
    pub leader_election_namespace: String,
    /// How long a Lease holds without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_election_lease_duration: Duration,
    /// How long a leader keeps leading while renewals fail.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_election_renew_deadline: Duration,
    /// Time between acquire/renew attempts.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub leader_election_retry_period: Duration,
    /// Leader-election identity (default: `<hostname>-<pid>-<random>`).
    #[arg(long)]
    pub identity: Option<String>,
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "membrane".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{host}-{}-{nanos:08x}", std::process::id())
}

pub async fn operator(args: OperatorArgs) -> Result<ExitCode> {
    anyhow::ensure!(
        args.leader_election_renew_deadline < args.leader_election_lease_duration,
        "--leader-election-renew-deadline must be shorter than --leader-election-lease-duration"
    );
    let user_agent = membrane_k8s::operator_user_agent();
    let client = membrane_k8s::client_for(args.kubeconfig.as_deref(), &user_agent)
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let config = operator_config(
        args.lb_pool,
        &args.secrets_namespace,
        args.ingress_default_lb_mode,
        &args.ingress,
        args.cluster_pool.pools(),
    )?;
    let lease = LeaseConfig {
        lease_duration: args.leader_election_lease_duration,
        renew_deadline: args.leader_election_renew_deadline,
        retry_period: args.leader_election_retry_period,
        ..LeaseConfig::cilium_defaults(&args.leader_election_namespace, &identity)
    };
    let (leader, campaign) = LeaderElector::new(client.clone(), lease.clone()).spawn();
    let recorder = EventRecorder::new(client.clone(), "membrane-operator", &identity);
    let sink = KubeSink::spawn(
        Writer::new(client.clone(), OPERATOR_MANAGER),
        Some(recorder),
        Some(leader.clone()),
    );
    info!(%identity, "membrane operator starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    membrane_operator::run(
        config,
        client.clone(),
        &sink,
        leader.clone(),
        shutdown.cancelled_owned(),
    )
    .await;
    // A clean stop hands the Lease over at once (no renewal after it).
    campaign.abort();
    let _ = campaign.await;
    match tokio::time::timeout(
        lease.renew_deadline,
        membrane_k8s::lease::release(client, &lease),
    )
    .await
    {
        Ok(Ok(true)) => info!(%identity, "leader election: lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "leader election: releasing the lease"),
        Err(_) => tracing::warn!("leader election: releasing the lease timed out"),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// kubeconfig of the API to use (default as kubectl).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (its Node object, its `ProxyNodeStatus`, Envoy's
    /// node id `membrane~<name>`).
    #[arg(long)]
    pub node_name: String,
    /// Labels of the Node if it does not exist yet (it is created with
    /// them); an existing Node's own labels win. `k=v,k2=v2`.
    #[arg(long, default_value = "")]
    pub node_labels: String,
    /// Where the xDS socket, Envoy bootstrap and Envoy log go.
    #[arg(long)]
    pub run_dir: PathBuf,
    #[command(flatten)]
    pub envoy: super::up::EnvoyFlags,
    /// Pool LoadBalancer Service addresses come from (kept off CEC listeners).
    #[arg(long, default_value = "127.0.100.0/24")]
    pub lb_pool: Pool,
    /// Ports listeners without an address are given, `FIRST-LAST`.
    #[arg(long, default_value = "10000-20000", value_parser = parse_port_range)]
    pub proxy_ports: std::ops::RangeInclusive<u16>,
    #[command(flatten)]
    pub datapath: super::service::DatapathArgs,
    #[command(flatten)]
    pub cni: super::up::CniArgs,
}

fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let err = || format!("{s:?}: expected FIRST-LAST, e.g. 10000-20000");
    let (a, b) = s.split_once('-').ok_or_else(err)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| err())?,
        b.trim().parse().map_err(|_| err())?,
    );
    if a == 0 || a > b {
        return Err(err());
    }
    Ok(a..=b)
}

/// The kinds an agent reads.
const AGENT_KINDS: &[Kind] = &[
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Secret,
    Kind::CiliumEnvoyConfig,
    Kind::CiliumClusterwideEnvoyConfig,
];

pub async fn agent(args: AgentArgs, api_socket: PathBuf) -> Result<ExitCode> {
    let user_agent = membrane_k8s::agent_user_agent();
    let client = membrane_k8s::client_for(args.kubeconfig.as_deref(), &user_agent)
        .await
        .context("connecting to the Kubernetes API")?;
    let (node, node_labels_updates) =
        register_node(&client, &args.node_name, &parse_labels(&args.node_labels)?).await?;
    info!(node = %args.node_name, labels = ?node.labels, "membrane agent starting");
    let config = agent_config(
        &args.envoy,
        AgentSetup {
            run_dir: args.run_dir.clone(),
            api_socket,
            lb_pool: args.lb_pool,
            node_name: args.node_name.clone(),
            node,
            node_labels_updates: Some(node_labels_updates),
            proxy_ports: Some(args.proxy_ports.clone()),
            datapath: args.datapath.options_for(args.cni.enable_cni)?,
            cni: args.cni.options(&args.run_dir),
        },
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let mut kinds = AGENT_KINDS.to_vec();
    if args.cni.enable_cni {
        // Pod labels for endpoints; CiliumNodes for pod CIDRs and routes.
        kinds.extend([Kind::Pod, Kind::CiliumNode]);
    }
    serve_agent(client, Store::new(), kinds, config, None, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
