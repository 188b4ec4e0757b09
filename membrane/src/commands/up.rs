//! `membrane up [DIR]`: the embedded mode. One process serves a
//! Kubernetes-compatible API (persisted in `--data-dir`, kubeconfig in the
//! run directory) and runs the operator and the agent against it through
//! the same kube-rs code as `membrane operator` / `membrane agent`. The
//! watched manifest directory and the local API are clients of that API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use anyhow::{Context, Result};
use membrane_agent::{Pool, XdsProtocol};
use membrane_k8s::{EventRecorder, KubeSink, OPERATOR_MANAGER, Writer};
use membrane_store::{Kind, ManifestDir, Store};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Directory of manifests (multi-document YAML/JSON), watched for changes.
    #[arg(default_value = "examples/quickstart")]
    pub dir: PathBuf,
    /// Where the xDS socket, Envoy bootstrap, Envoy log and the kubeconfig
    /// of the embedded Kubernetes API go (default: `run` next to the API
    /// socket).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Directory of the embedded Kubernetes API's database: objects applied
    /// through it survive restarts (default `<run-dir>/api`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address the embedded Kubernetes API listens on (plain HTTP; port 0
    /// picks a free one, printed at start and written to the kubeconfig).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub api_listen: std::net::SocketAddr,
    /// Append one JSON line per request to the embedded API to FILE (as
    /// `membrane apiserver --audit-log`).
    #[arg(long, value_name = "FILE")]
    pub api_audit_log: Option<PathBuf>,
    /// fsync every commit of the embedded API before answering (as
    /// `membrane apiserver --sync-commits`).
    #[arg(long)]
    pub api_sync_commits: bool,
    #[command(flatten)]
    pub envoy: EnvoyFlags,
    /// Pool LoadBalancer Service addresses come from.
    #[arg(long, default_value = "127.0.100.0/24")]
    pub lb_pool: Pool,
    /// Node name (Envoy node id `membrane~<name>`).
    #[arg(long, default_value = "local")]
    pub node_name: String,
    /// Node labels for CEC `nodeSelector`s, `k=v,k2=v2`.
    #[arg(long, default_value = "")]
    pub node_labels: String,
    /// Namespace TLS Secrets are synced to for SDS, as Cilium's.
    #[arg(long, default_value = "cilium-secrets")]
    pub secrets_namespace: String,
    /// Load-balancer mode of Ingresses without the
    /// `ingress.cilium.io/loadbalancer-mode` annotation: dedicated or shared.
    #[arg(long, default_value = "dedicated")]
    pub ingress_default_lb_mode: membrane_ingress::LoadBalancerMode,
    #[command(flatten)]
    pub ingress: IngressFlags,
    #[command(flatten)]
    pub datapath: super::service::DatapathArgs,
    #[command(flatten)]
    pub cni: CniArgs,
}

/// Pod networking through `membrane-cni` (flag names as Cilium's).
#[derive(clap::Args, Debug, Clone)]
pub struct CniArgs {
    /// Serve the CNI plugin and install it with its conflist, so a
    /// container runtime on this node gets pod networks from Membrane.
    #[arg(long)]
    pub enable_cni: bool,
    /// Where the `membrane-cni` binary is installed.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where the conflist (`05-membrane.conflist`) is written.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The `membrane-cni` binary to install (default: next to `membrane`).
    #[arg(long)]
    pub cni_plugin_bin: Option<PathBuf>,
    #[command(flatten)]
    pub pool: ClusterPoolArgs,
    /// MTU of pod interfaces (in tunnel mode the VXLAN overhead, 50 bytes,
    /// is taken off, as Cilium does).
    #[arg(long, default_value_t = 1500)]
    pub mtu: u32,
    /// After a pod's deletion, answer its old address with ICMP
    /// unreachable until the address is reused.
    #[arg(long)]
    pub unreachable_routes: bool,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

/// The cluster pool node pod CIDRs are carved from (Cilium's operator
/// flags; `membrane up` runs the operator in-process).
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterPoolArgs {
    /// Cluster pool node pod CIDRs are carved from.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_pool_ipv4_cidr: membrane_ipam::Cidr,
    /// Size of each node's IPv4 pod CIDR.
    #[arg(long, default_value_t = 24)]
    pub cluster_pool_ipv4_mask_size: u8,
    /// Give pods IPv6 addresses too.
    #[arg(long)]
    pub enable_ipv6: bool,
    #[arg(long, default_value = "fd00::/104")]
    pub cluster_pool_ipv6_cidr: membrane_ipam::Cidr,
    #[arg(long, default_value_t = 120)]
    pub cluster_pool_ipv6_mask_size: u8,
}

impl ClusterPoolArgs {
    /// (cluster CIDR, node mask size) per enabled family.
    pub fn pools(&self) -> Vec<(membrane_ipam::Cidr, u8)> {
        let mut pools = vec![(
            self.cluster_pool_ipv4_cidr,
            self.cluster_pool_ipv4_mask_size,
        )];
        if self.enable_ipv6 {
            pools.push((
                self.cluster_pool_ipv6_cidr,
                self.cluster_pool_ipv6_mask_size,
            ));
        }
        pools
    }
}

/// How pods reach pods on other nodes (Cilium's flag names and defaults).
#[derive(clap::Args, Debug, Clone)]
pub struct RoutingArgs {
    /// native: a route per remote node's pod CIDR via its InternalIP;
    /// tunnel: encapsulated to the remote node (device `cilium_vxlan`).
    #[arg(long, default_value = "tunnel")]
    pub routing_mode: membrane_agent::routing::RoutingMode,
    /// Encapsulation in tunnel mode (only vxlan).
    #[arg(long, default_value = "vxlan")]
    pub tunnel_protocol: membrane_agent::routing::TunnelProtocol,
    /// UDP port of the tunnel.
    #[arg(long, default_value_t = 8472)]
    pub tunnel_port: u16,
    /// This node's InternalIPs in its CiliumNode, at most one IPv4 and one
    /// IPv6 (`IP[,IP]`). Default: the IPv4 address of the device holding
    /// the default route, else the first global one, and likewise an IPv6
    /// address. Native routing carries IPv6 pod CIDRs only between nodes
    /// with IPv6 addresses; the tunnel carries them over IPv4.
    #[arg(long, value_delimiter = ',')]
    pub node_ip: Vec<std::net::IpAddr>,
}

impl CniArgs {
    pub fn options(&self, run_dir: &std::path::Path) -> Option<membrane_agent::cni::CniOptions> {
        if !self.enable_cni {
            return None;
        }
        let routing = membrane_agent::routing::RoutingOptions {
            mode: self.routing.routing_mode,
            tunnel_protocol: self.routing.tunnel_protocol,
            tunnel_port: self.routing.tunnel_port,
            node_ips: self.routing.node_ip.clone(),
        };
        Some(membrane_agent::cni::CniOptions {
            socket: membrane_agent::cni::default_socket(run_dir),
            state_dir: run_dir.join("cni"),
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
            plugin_bin: self.cni_plugin_bin.clone(),
            mtu: routing.pod_mtu(self.mtu),
            unreachable_routes: self.unreachable_routes,
            routing,
        })
    }
}

/// Envoy and the ports it serves Ingresses on, shared by `membrane up` and
/// `membrane agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct EnvoyFlags {
    /// Envoy binary (else $MEMBRANE_ENVOY, .venv/bin/envoy, PATH).
    #[arg(long)]
    pub envoy_bin: Option<PathBuf>,
    /// Also expose Envoy admin on 127.0.0.1:PORT (0 picks a free one).
    /// Default: admin only on the unix socket `<run-dir>/envoy-admin.sock`.
    #[arg(long)]
    pub envoy_admin_port: Option<u16>,
    #[arg(long, default_value_t = 2)]
    pub envoy_concurrency: u16,
    #[arg(long, default_value = "warning")]
    pub envoy_log_level: String,
    /// xDS variant Envoy uses: sotw or delta.
    #[arg(long, default_value = "delta", value_parser = parse_protocol)]
    pub xds_protocol: XdsProtocol,
    /// Port Ingress HTTP (service port 80) is served on.
    #[arg(long, default_value_t = 80)]
    pub http_port: u16,
    /// Port Ingress HTTPS (service port 443) is served on.
    #[arg(long, default_value_t = 443)]
    pub https_port: u16,
}

/// The Ingress controller's feature flags, shared by `membrane up` and
/// `membrane translate` (named after Cilium's operator flags).
#[derive(clap::Args, Debug, Clone)]
pub struct IngressFlags {
    /// Redirect plain HTTP to HTTPS for TLS hosts unless an Ingress sets
    /// `ingress.cilium.io/force-https` (Cilium's `enforce-ingress-https`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub enforce_ingress_https: bool,
    /// Host network mode (Cilium's `ingressController.hostNetwork.enabled`):
    /// Ingress listeners bind the node's addresses (0.0.0.0 and ::) on a
    /// host port instead of a LoadBalancer address.
    #[arg(long)]
    pub ingress_host_network: bool,
    /// Host network mode: port of the shared listener (dedicated Ingresses
    /// use `ingress.cilium.io/host-listener-port`, default 8080).
    #[arg(long, default_value_t = 8080, requires = "ingress_host_network")]
    pub ingress_host_network_shared_listener_port: u16,
    /// Host network mode: only nodes with these labels (`k=v,k2=v2`) serve
    /// Ingresses (Cilium's `ingressController.hostNetwork.nodes.matchLabels`
    /// / `ingress-hostnetwork-nodelabelselector`).
    #[arg(long, default_value = "", requires = "ingress_host_network")]
    pub ingress_host_network_node_label_selector: String,
    /// Require a PROXY protocol (v1 or v2) header on every Ingress
    /// connection (Cilium's `ingressController.enableProxyProtocol`).
    #[arg(long)]
    pub enable_ingress_proxy_protocol: bool,
    /// Namespace of the TLS Secret for Ingress TLS hosts without
    /// `secretName` (with `--ingress-default-secret-name`).
    #[arg(long, requires = "ingress_default_secret_name")]
    pub ingress_default_secret_namespace: Option<String>,
    /// Name of the default TLS Secret (with
    /// `--ingress-default-secret-namespace`).
    #[arg(long, requires = "ingress_default_secret_namespace")]
    pub ingress_default_secret_name: Option<String>,
    /// Ingress annotation and label key prefixes copied to the generated
    /// Service, comma-separated (Cilium's `ingressLBAnnotationPrefixes`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lbipam.cilium.io,service.beta.kubernetes.io,service.kubernetes.io,cloud.google.com"
    )]
    pub ingress_lb_annotation_prefixes: Vec<String>,
}

impl IngressFlags {
    pub fn options(&self) -> Result<membrane_operator::IngressOptions> {
        let default_secret = match (
            &self.ingress_default_secret_namespace,
            &self.ingress_default_secret_name,
        ) {
            (Some(namespace), Some(name)) => Some(membrane_ingress::SecretRef {
                namespace: namespace.clone(),
                name: name.clone(),
            }),
            _ => None,
        };
        let node_labels = self
            .ingress_host_network_node_label_selector
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .with_context(|| {
                        format!("--ingress-host-network-node-label-selector: {p:?} is not k=v")
                    })
            })
            .collect::<Result<BTreeMap<String, String>>>()?;
        Ok(membrane_operator::IngressOptions {
            enforce_https: self.enforce_ingress_https,
            default_secret,
            proxy_protocol: self.enable_ingress_proxy_protocol,
            host_network: self
                .ingress_host_network
                .then_some(membrane_ingress::HostNetwork {
                    shared_listener_port: self.ingress_host_network_shared_listener_port,
                    ipv6: true,
                    node_labels,
                }),
            lb_annotation_prefixes: self
                .ingress_lb_annotation_prefixes
                .iter()
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
        })
    }
}

/// Whether this node can bind IPv6 sockets (host network listeners bind
/// `::` only then, as Cilium binds only the families it has enabled).
pub(crate) fn ipv6_available() -> bool {
    let ok = std::net::TcpListener::bind("[::]:0").is_ok();
    if !ok {
        info!("no IPv6 on this node: host network Ingress listeners bind 0.0.0.0 only");
    }
    ok
}

fn parse_protocol(s: &str) -> Result<XdsProtocol, String> {
    match s {
        "sotw" => Ok(XdsProtocol::Sotw),
        "delta" => Ok(XdsProtocol::Delta),
        other => Err(format!("{other:?}: expected sotw or delta")),
    }
}

pub(crate) fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .with_context(|| format!("--node-labels: {p:?} is not k=v"))
        })
        .collect()
}

pub async fn run(args: UpArgs, api_socket: PathBuf) -> Result<ExitCode> {
    use super::embedded::{ApiObjects, LOCAL_API_MANAGER, MANIFESTS_MANAGER, ManifestSync};
    use super::roles::{self, AgentSetup, InProcessOperator};

    anyhow::ensure!(
        args.dir.is_dir(),
        "{}: not a directory of manifests",
        args.dir.display()
    );
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        api_socket
            .parent()
            .map(|p| p.join("run"))
            .unwrap_or_else(|| PathBuf::from("membrane-run"))
    });
    let data_dir = args.data_dir.clone().unwrap_or_else(|| run_dir.join("api"));
    // The run directory may lie inside the watched one (`membrane up .`):
    // its files are Membrane's own, never manifests, and its writes must not
    // wake the watcher.
    let manifests = ManifestDir::new(args.dir.clone()).ignoring(&run_dir);
    let cni = args.cni.options(&run_dir);
    let operator = roles::operator_config(
        args.lb_pool,
        &args.secrets_namespace,
        args.ingress_default_lb_mode,
        &args.ingress,
        if args.cni.enable_cni {
            args.cni.pool.pools()
        } else {
            Vec::new()
        },
    )?;
    let node_labels = parse_labels(&args.node_labels)?;
    let datapath = args.datapath.options_for(args.cni.enable_cni)?;

    // The embedded Kubernetes API: everything below is its client.
    let mut api_config = membrane_apiserver::Config::new(args.api_listen, &data_dir);
    api_config.audit_log = args.api_audit_log.clone();
    if args.api_sync_commits {
        api_config.sync = membrane_apiserver::store::SyncMode::Full;
    }
    let server = membrane_apiserver::ApiServer::bind(api_config)
        .await
        .with_context(|| {
            format!(
                "starting the Kubernetes API on {} (data in {})",
                args.api_listen,
                data_dir.display()
            )
        })?;
    let addr = server.local_addr()?;
    let kubeconfig = run_dir.join("kubeconfig");
    membrane_apiserver::write_kubeconfig(&kubeconfig, addr)?;
    println!("kubeconfig: {}", kubeconfig.display());
    println!("serving the Kubernetes API on http://{addr}");
    info!(%addr, kubeconfig = %kubeconfig.display(), data_dir = %data_dir.display(), "Kubernetes API ready");
    let api = server.api();
    let gc = server.gc_waker();
    let api_stop = CancellationToken::new();
    let api_task = tokio::spawn(server.serve(api_stop.clone().cancelled_owned()));

    // The agent's store mirrors the API; the local API (`membrane apply`)
    // writes into the API and reads its writes back from it.
    let store = Store::new();
    // (The agent's own direct writes, the CNI's CiliumNode, go to the API
    // as the agent's.)
    store
        .set_upstream(
            Arc::new(ApiObjects::new(api.clone(), gc.clone(), LOCAL_API_MANAGER)),
            Arc::new(ApiObjects::new(
                api.clone(),
                gc.clone(),
                membrane_k8s::AGENT_MANAGER,
            )),
        )
        .context("starting the store's API writer")?;

    // The watched directory is an API client. Applied before the watches
    // start, so the first configuration Envoy sees has every object.
    let manifest_store = Store::new();
    manifests
        .load_once(&manifest_store.writer(&manifests_name(&args.dir)))
        .with_context(|| format!("reading {}", args.dir.display()))?;
    let sync = {
        let (api, gc, manifest_store, report) = (
            api.clone(),
            gc.clone(),
            manifest_store.clone(),
            store.clone(),
        );
        let node_name = args.node_name.clone();
        let secrets_namespace = args.secrets_namespace.clone();
        tokio::task::spawn_blocking(move || {
            // This node as the flags declare it (an agent alone would keep
            // an existing Node's labels; here the flags are the source).
            super::embedded::declare_node(&api, &node_name, &node_labels);
            let objects = ApiObjects::new(api, gc, MANIFESTS_MANAGER);
            // TLS Secrets are synced into it (in a cluster the chart
            // creates it).
            if let Err(e) = objects.ensure_namespace(&secrets_namespace) {
                error!(error = %e, "creating the secrets namespace");
            }
            let mut sync = ManifestSync::new(objects, manifest_store, report);
            sync.sync();
            sync
        })
        .await
        .context("applying the manifest directory")?
    };
    let manifest_task = tokio::spawn(follow_manifests(
        manifest_store.clone(),
        manifest_store.spawn_source(manifests),
        sync,
    ));
    info!(dir = %args.dir.display(), "watching manifests");

    // The operator and the agent, through the same kube-rs code as
    // `membrane operator` / `membrane agent`; the operator's pass runs in
    // the agent's loop on the one store (its rejections reach `membrane
    // status`), its writes queued to the API as the operator's.
    let operator_client =
        membrane_k8s::client_for(Some(&kubeconfig), &membrane_k8s::operator_user_agent())
            .await
            .context("connecting to the embedded API")?;
    let agent_client =
        membrane_k8s::client_for(Some(&kubeconfig), &membrane_k8s::agent_user_agent())
            .await
            .context("connecting to the embedded API")?;
    let (node, node_labels_updates) =
        roles::register_node(&agent_client, &args.node_name, &BTreeMap::new()).await?;
    let config = roles::agent_config(
        &args.envoy,
        AgentSetup {
            run_dir,
            api_socket,
            lb_pool: args.lb_pool,
            node_name: args.node_name.clone(),
            node,
            node_labels_updates: Some(node_labels_updates),
            proxy_ports: None,
            datapath,
            cni,
        },
    );
    let identity = format!("membrane-up-{}", args.node_name);
    let recorder = EventRecorder::new(operator_client.clone(), "membrane-operator", &identity);
    let sink = KubeSink::spawn(
        Writer::new(operator_client, OPERATOR_MANAGER),
        Some(recorder),
        None,
    );
    let controller = InProcessOperator::new(&operator, Some(Arc::new(sink)));

    // The operator's pod CIDR allocation for this node runs before the
    // agent starts (the agent waits for its CIDRs, and the operator's pass
    // runs in the agent's loop), so the node's pod network comes up at once
    // and gets back the CIDRs its saved state holds.
    // Written to the API before the watches list, so the agent starts
    // with them and `membrane get ciliumnode` shows them at once.
    if let Some(cni) = &config.cni {
        let allocated = Store::new();
        membrane_operator::node_ipam::allocate_node(
            &store.snapshot(),
            &operator.cluster_pool,
            &config.node_name,
            &membrane_agent::cni::saved_cidrs(cni),
            &membrane_k8s::StoreSink(allocated.clone()),
        )
        .context("allocating this node's pod CIDRs from the cluster pool")?;
        let objects = ApiObjects::new(api.clone(), gc.clone(), OPERATOR_MANAGER);
        tokio::task::spawn_blocking(move || {
            for obj in allocated.snapshot().list(Kind::CiliumNode, None) {
                objects
                    .apply_one(obj.as_ref())
                    .map_err(anyhow::Error::msg)?;
            }
            anyhow::Ok(())
        })
        .await
        .context("writing this node's pod CIDRs")??;
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let served = roles::serve_agent(
        agent_client,
        store,
        Kind::all().to_vec(),
        config,
        Some(Box::new(controller)),
        shutdown,
    )
    .await;
    manifest_task.abort();
    api_stop.cancel();
    match api_task.await {
        Ok(Ok(())) => info!("Kubernetes API stopped"),
        Ok(Err(e)) => error!(error = %e, "Kubernetes API"),
        Err(e) => error!(error = %e, "Kubernetes API task"),
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Applies the manifest directory to the API on every change of it.
async fn follow_manifests(
    manifests: Store,
    source: tokio::task::JoinHandle<Result<(), membrane_store::StoreError>>,
    mut sync: super::embedded::ManifestSync,
) {
    tokio::spawn(async move {
        match source.await {
            Ok(Err(e)) => error!(error = %e, "manifest directory source stopped"),
            Err(e) => error!(error = %e, "manifest directory source panicked"),
            // The source only ends on error; keep serving what we have.
            Ok(Ok(())) => {}
        }
    });
    let mut changes = manifests.subscribe();
    while changes.changed().await.is_ok() {
        sync = match tokio::task::spawn_blocking(move || {
            sync.sync();
            sync
        })
        .await
        {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "applying the manifest directory failed; no longer following it");
                return;
            }
        };
    }
}

fn manifests_name(dir: &std::path::Path) -> String {
    format!("manifests {}", dir.display())
}

pub(crate) async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("stopping");
    shutdown.cancel();
}
