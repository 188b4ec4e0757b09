//! CNI wiring: the node's pod CIDRs (cluster-pool, recorded on its
//! CiliumNode), the endpoint manager serving `membrane-cni`, and the plugin
//! binary plus conflist installed where the container runtime looks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use membrane_crds::{CiliumNode, PodCidrStatus};
use membrane_endpoint::{Hooks, Manager};
use membrane_ipam::{Cidr, NodeAllocator};
use membrane_k8s::Sink;
use membrane_store::k8s_openapi::api::core::v1::Pod;
use membrane_store::{Kind, Object, ObjectKey, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::datapath::DatapathHandle;
use crate::policy::PolicyHandle;

/// Name of the conflist and of the network it defines.
pub const NETWORK_NAME: &str = "membrane";
pub const CONFLIST_FILE: &str = "05-membrane.conflist";
pub const PLUGIN_BIN: &str = "membrane-cni";
/// The plugin's `type` in the conflist, which is also the file name a
/// runtime executes.
pub const PLUGIN_TYPE: &str = membrane_cni::spec::PLUGIN_TYPE;

#[derive(Debug, Clone)]
pub struct CniOptions {
    /// The socket the plugin connects to.
    pub socket: PathBuf,
    /// IPAM and endpoint state (survives restarts).
    pub state_dir: PathBuf,
    /// Where the plugin binary is installed (`--cni-bin-dir`).
    pub bin_dir: PathBuf,
    /// Where the conflist is written (`--cni-conf-dir`).
    pub conf_dir: PathBuf,
    /// The `membrane-cni` binary to install (default: next to this one).
    pub plugin_bin: Option<PathBuf>,
    /// Pod MTU (tunnel overhead already taken off).
    pub mtu: u32,
    pub unreachable_routes: bool,
    /// How pods on other nodes are reached, and this node's address.
    pub routing: crate::routing::RoutingOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum CniStartError {
    #[error(transparent)]
    Ipam(#[from] membrane_ipam::IpamError),
    #[error(transparent)]
    Endpoint(#[from] membrane_endpoint::EndpointError),
    #[error(transparent)]
    Routing(#[from] crate::routing::RoutingError),
    #[error("stopped before the operator allocated pod CIDRs to CiliumNode {0}")]
    Stopped(String),
    #[error("installing the CNI plugin: {what}: {source}")]
    Install {
        what: String,
        source: std::io::Error,
    },
}

/// The pod CIDRs this node's agent used before (its saved IPAM state), so
/// the operator of `membrane up` can give them back after a restart.
pub fn saved_cidrs(opts: &CniOptions) -> Vec<Cidr> {
    match NodeAllocator::load(&opts.state_dir.join("ipam.json")) {
        Ok(Some(saved)) => saved.cidrs().to_vec(),
        _ => Vec::new(),
    }
}

fn own_node(store: &Store, node: &str) -> Option<CiliumNode> {
    match store
        .get(&ObjectKey::new(Kind::CiliumNode, "", node))
        .as_deref()
    {
        Some(Object::CiliumNode(n)) => Some(n.clone()),
        _ => None,
    }
}

fn spec_cidrs(cn: &CiliumNode) -> Vec<Cidr> {
    cn.spec
        .ipam
        .pod_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// Create or update this node's CiliumNode with its InternalIPs, one per
/// family (the agent's part of the spec, as Cilium's agent; the operator
/// adds pod CIDRs). Written only when the addresses differ.
pub fn publish_node(store: &Store, sink: &dyn Sink, node: &str, node_ips: &[std::net::IpAddr]) {
    let current = own_node(store, node);
    if current
        .as_ref()
        .is_some_and(|cn| crate::routing::internal_ips(cn) == node_ips)
    {
        return;
    }
    let mut cn = current.unwrap_or_else(|| CiliumNode::new(node, Default::default()));
    cn.spec.other.insert(
        "addresses".into(),
        crate::routing::addresses_value(node_ips),
    );
    cn.status = None;
    info!(node, node_ips = ?node_ips, "CiliumNode addresses");
    sink.apply_all(vec![Object::CiliumNode(cn)]);
}

/// Create this node's CiliumNode if it does not exist yet (no address).
fn publish_node_without_address(store: &Store, sink: &dyn Sink, node: &str) {
    if own_node(store, node).is_none() {
        sink.apply_all(vec![Object::CiliumNode(CiliumNode::new(
            node,
            Default::default(),
        ))]);
    }
}

/// Wait until the operator has given this node pod CIDRs.
async fn wait_for_cidrs(
    store: &Store,
    node: &str,
    shutdown: &CancellationToken,
) -> Result<Vec<Cidr>, CniStartError> {
    let mut rx = store.subscribe();
    let mut logged = false;
    loop {
        rx.borrow_and_update();
        let cidrs = own_node(store, node)
            .map(|n| spec_cidrs(&n))
            .unwrap_or_default();
        if !cidrs.is_empty() {
            return Ok(cidrs);
        }
        if !logged {
            info!(
                node,
                "waiting for the operator to allocate pod CIDRs (CiliumNode spec.ipam.podCIDRs)"
            );
            logged = true;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return Err(CniStartError::Stopped(node.into())) },
            _ = shutdown.cancelled() => return Err(CniStartError::Stopped(node.into())),
        }
    }
}

/// Copy the plugin binary (atomically: temp file + rename, so a runtime
/// never executes a half-written file) and write the conflist.
pub fn install(opts: &CniOptions) -> Result<PathBuf, CniStartError> {
    let err = |what: String| move |source| CniStartError::Install { what, source };
    let src = match &opts.plugin_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(err("locating this executable".into()))?
            .with_file_name(PLUGIN_BIN),
    };
    std::fs::create_dir_all(&opts.bin_dir).map_err(err(opts.bin_dir.display().to_string()))?;
    std::fs::create_dir_all(&opts.conf_dir).map_err(err(opts.conf_dir.display().to_string()))?;
    // Runtimes execute the plugin named by the configuration's `type`, so
    // the binary is installed under that name too.
    let dst = opts.bin_dir.join(PLUGIN_BIN);
    for name in [PLUGIN_BIN, PLUGIN_TYPE] {
        let to = opts.bin_dir.join(name);
        let tmp = opts.bin_dir.join(format!(".{name}.tmp"));
        std::fs::copy(&src, &tmp).map_err(err(format!("copying {}", src.display())))?;
        std::fs::rename(&tmp, &to).map_err(err(format!("installing {}", to.display())))?;
    }
    let conflist = json!({
        // 1.0.0: what runtimes with an older libcni (podman 4) accept; the
        // plugin answers 1.1.0 too.
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [{
            "type": PLUGIN_TYPE,
            "socket": opts.socket,
            "mtu": opts.mtu,
        }],
    });
    let path = opts.conf_dir.join(CONFLIST_FILE);
    let text = serde_json::to_string_pretty(&conflist).unwrap_or_default();
    let tmp = opts.conf_dir.join(format!(".{CONFLIST_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(err(tmp.display().to_string()))?;
    std::fs::rename(&tmp, &path).map_err(err(path.display().to_string()))?;
    info!(bin = %dst.display(), conf = %path.display(), "CNI plugin installed");
    Ok(dst)
}

/// Pod labels from the store; the datapath and policy on every endpoint's
/// host side.
struct AgentHooks {
    store: Store,
    datapath: Option<Arc<DatapathHandle>>,
    policy: Option<Arc<PolicyHandle>>,
}

impl Hooks for AgentHooks {
    fn pod_labels(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let pod: Pod = self.store.get_typed(namespace, name)?;
        Some(pod.metadata.labels.unwrap_or_default())
    }
    fn attach(&self, host_ifname: &str) -> Result<(), String> {
        if let Some(dp) = &self.datapath {
            dp.attach_device(host_ifname)?;
        }
        match &self.policy {
            Some(p) => p.attach(host_ifname),
            None => Ok(()),
        }
    }
    fn detach(&self, host_ifname: &str) {
        if let Some(p) = &self.policy {
            p.detach(host_ifname);
        }
        if let Some(dp) = &self.datapath {
            dp.unregister_endpoint(host_ifname);
            dp.detach_device(host_ifname);
        }
    }
    fn ready(&self, ep: &membrane_endpoint::Endpoint) -> Result<(), String> {
        if let Some(p) = &self.policy {
            p.ready(&self.store.snapshot(), ep)?;
        }
        if let Some(dp) = &self.datapath {
            // Without the entry host routing still works (FIB lookup), so a
            // failure here is reported, not fatal to the ADD.
            // With policy, traffic to the pod must pass the policy program
            // on the host device's egress hook.
            self.register(dp, ep);
        }
        Ok(())
    }
    fn restored(&self, ep: &membrane_endpoint::Endpoint) {
        // A new pin directory (or a new ifindex) would otherwise leave the
        // pod to the FIB path until it is re-added.
        if let Some(dp) = &self.datapath {
            self.register(dp, ep);
        }
    }
}

impl AgentHooks {
    fn register(&self, dp: &DatapathHandle, ep: &membrane_endpoint::Endpoint) {
        if let Err(e) = dp.register_endpoint(
            &ep.host_ifname,
            &ep.addrs,
            self.policy.is_some(),
            &ep.mac,
            &ep.host_mac,
        ) {
            warn!(host = %ep.host_ifname, error = %e, "registering the endpoint for host routing");
        }
    }
}

/// A started CNI: the endpoint manager and the task keeping routes to other
/// nodes (it removes them once `shutdown` fires; await it before exiting).
pub struct Started {
    pub manager: Arc<Manager>,
    pub routing: tokio::task::JoinHandle<()>,
}

/// Publish this node's CiliumNode, wait for its pod CIDRs, start the
/// endpoint manager and the routes to other nodes, and install the plugin;
/// the socket is served (and labels follow Pod changes) until `shutdown`.
/// `sink` is where the agent writes its CiliumNode (spec.addresses,
/// status).
pub async fn start(
    opts: &CniOptions,
    node: &str,
    store: &Store,
    sink: Arc<dyn Sink>,
    datapath: Option<Arc<DatapathHandle>>,
    policy: Option<Arc<PolicyHandle>>,
    shutdown: CancellationToken,
) -> Result<Started, CniStartError> {
    let node_ips = crate::routing::node_ips(&opts.routing).await?;
    match node_ips.as_slice() {
        [_, ..] => publish_node(store, sink.as_ref(), node, &node_ips),
        // Still a pod network on this node; the operator allocates for a
        // CiliumNode without addresses too.
        [] => {
            warn!(
                node,
                "no node address found (pass --node-ip): no routes to other nodes"
            );
            publish_node_without_address(store, sink.as_ref(), node);
        }
    }
    let cidrs = wait_for_cidrs(store, node, &shutdown).await?;
    info!(node, cidrs = ?cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "pod CIDRs");
    let manager = Manager::start(
        membrane_endpoint::Options {
            state_dir: opts.state_dir.clone(),
            node_name: node.to_string(),
            pod_cidrs: cidrs,
            mtu: opts.mtu,
            unreachable_routes: opts.unreachable_routes,
        },
        Arc::new(AgentHooks {
            store: store.clone(),
            datapath: datapath.clone(),
            policy: policy.clone(),
        }),
    )
    .await?;
    let routing = if node_ips.is_empty() {
        tokio::spawn(async {})
    } else {
        crate::routing::start(
            &opts.routing,
            node_ips,
            node.to_string(),
            store.clone(),
            datapath,
            shutdown.clone(),
        )
        .await?
    };
    if let Some(p) = policy {
        tokio::spawn(crate::policy::follow(
            p,
            manager.clone(),
            store.clone(),
            shutdown.clone(),
        ));
    }
    {
        let m = manager.clone();
        let socket = opts.socket.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = membrane_endpoint::serve(&socket, m, shutdown).await {
                error!(error = %e, socket = %socket.display(), "CNI socket stopped");
            }
        });
    }
    tokio::spawn(follow(
        manager.clone(),
        store.clone(),
        sink,
        node.to_string(),
        shutdown,
    ));
    install(opts)?;
    Ok(Started { manager, routing })
}

/// Keep endpoints and IPAM in step with the store: labels follow Pod
/// objects; after every allocation change the CIDR states go to the
/// CiliumNode status (the operator adds or withdraws CIDRs from them), and
/// the allocator follows the CiliumNode's spec.
async fn follow(
    m: Arc<Manager>,
    store: Store,
    sink: Arc<dyn Sink>,
    node: String,
    shutdown: CancellationToken,
) {
    let mut rx = store.subscribe();
    loop {
        m.refresh_labels().await;
        if let Err(e) = ipam_pass(&m, &store, sink.as_ref(), &node).await {
            warn!(error = %e, node = %node, "pod CIDR reconciliation");
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = m.changed() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn ipam_pass(
    m: &Manager,
    store: &Store,
    sink: &dyn Sink,
    node: &str,
) -> Result<(), CniStartError> {
    let states = m.ipam_report().await;
    let key = ObjectKey::new(Kind::CiliumNode, "", node);
    let Some(cn) = own_node(store, node) else {
        return Ok(());
    };
    let reported: BTreeMap<String, PodCidrStatus> = states
        .iter()
        .map(|(c, s)| {
            (
                c.to_string(),
                PodCidrStatus {
                    status: s.as_str().into(),
                },
            )
        })
        .collect();
    if cn.status.as_ref().map(|s| &s.ipam.pod_cidrs) != Some(&reported) {
        let mut status = cn.status.clone().unwrap_or_default();
        status.ipam.pod_cidrs = reported;
        if let Ok(v) = serde_json::to_value(&status) {
            sink.status(&key, v);
        }
    }
    let spec = spec_cidrs(&cn);
    if !spec.is_empty() {
        m.set_pod_cidrs(spec).await?;
    }
    Ok(())
}

/// `membrane endpoint list -o json`.
pub fn list_json(
    endpoints: &[membrane_endpoint::Endpoint],
    policy: Option<&PolicyHandle>,
) -> serde_json::Value {
    serde_json::Value::Array(
        endpoints
            .iter()
            .map(|e| {
                let cols = policy.and_then(|p| p.endpoint_columns(e.id));
                let col = |k: &str| {
                    cols.as_ref()
                        .map_or(serde_json::Value::Null, |c| c[k].clone())
                };
                json!({
                    "id": e.id,
                    "pod": e.pod(),
                    "containerID": e.container_id,
                    "ips": e.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "interface": e.host_ifname,
                    "node": e.node,
                    "state": e.state,
                    "labels": e.labels,
                    "identity": col("identity"),
                    "ingressEnforcement": col("ingressEnforcement"),
                    "egressEnforcement": col("egressEnforcement"),
                })
            })
            .collect(),
    )
}

#[doc(hidden)]
pub fn default_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("cni.sock")
}
