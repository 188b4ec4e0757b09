//! CNI wiring: the node's pod CIDRs (cluster-pool, recorded on its
//! CiliumNode), the endpoint manager serving `membrane-cni`, and the plugin
//! binary plus conflist installed where the container runtime looks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use membrane_crds::{CiliumNode, CiliumNodeSpec, NodeIpamSpec, PodCidrStatus};
use membrane_endpoint::{Hooks, Manager};
use membrane_ipam::{Cidr, ClusterPool, NodeAllocator};
use membrane_store::k8s_openapi::api::core::v1::Pod;
use membrane_store::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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
    /// Cluster pool per family: (CIDR, node mask size).
    pub cluster_pool: Vec<(Cidr, u8)>,
    pub mtu: u32,
    pub unreachable_routes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CniStartError {
    #[error(transparent)]
    Ipam(#[from] membrane_ipam::IpamError),
    #[error(transparent)]
    Endpoint(#[from] membrane_endpoint::EndpointError),
    #[error("installing the CNI plugin: {what}: {source}")]
    Install {
        what: String,
        source: std::io::Error,
    },
}

/// The node's pod CIDRs from the cluster pool, as the operator allocates
/// them: kept if the node's CiliumNode (or the agent's saved state) already
/// holds some, else the first free ones; recorded on the CiliumNode.
pub fn node_cidrs(
    store: &Store,
    node: &str,
    opts: &CniOptions,
) -> Result<Vec<Cidr>, CniStartError> {
    let mut pool = ClusterPool::new(opts.cluster_pool.clone())?;
    let snap = store.snapshot();
    let mut own_existing = Vec::new();
    for n in snap.typed::<CiliumNode>(None) {
        let name = n.metadata.name.clone().unwrap_or_default();
        for c in &n.spec.ipam.pod_cidrs {
            match c.parse::<Cidr>() {
                Ok(c) => {
                    pool.occupy(&name, c);
                    if name == node {
                        own_existing.push(c);
                    }
                }
                Err(e) => warn!(node = %name, error = %e, "CiliumNode spec.ipam.podCIDRs"),
            }
        }
    }
    // Without a CiliumNode (the embedded API starts empty), the CIDRs the
    // agent used before keep their addresses valid.
    if own_existing.is_empty()
        && let Ok(Some(saved)) = NodeAllocator::load(&opts.state_dir.join("ipam.json"))
    {
        for c in saved.cidrs() {
            pool.occupy(node, *c);
        }
    }
    let cidrs = pool.allocate(node)?;
    let pod_cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
    let key = ObjectKey::new(Kind::CiliumNode, "", node);
    let mut cn = match store.get(&key).as_deref() {
        Some(Object::CiliumNode(n)) => n.clone(),
        _ => CiliumNode {
            metadata: ObjectMeta {
                name: Some(node.to_string()),
                ..Default::default()
            },
            spec: CiliumNodeSpec::default(),
            status: None,
        },
    };
    if cn.spec.ipam.pod_cidrs != pod_cidrs {
        cn.spec.ipam = NodeIpamSpec {
            pod_cidrs,
            ..cn.spec.ipam
        };
        store.apply(Object::CiliumNode(cn));
    }
    Ok(cidrs)
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

/// Start the endpoint manager and install the plugin; the socket is served
/// (and labels follow Pod changes) until `shutdown`.
pub async fn start(
    opts: &CniOptions,
    node: &str,
    store: &Store,
    datapath: Option<Arc<DatapathHandle>>,
    policy: Option<Arc<PolicyHandle>>,
    shutdown: CancellationToken,
) -> Result<Arc<Manager>, CniStartError> {
    let cidrs = node_cidrs(store, node, opts)?;
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
            datapath,
            policy: policy.clone(),
        }),
    )
    .await?;
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
        node.to_string(),
        opts.clone(),
        shutdown,
    ));
    install(opts)?;
    Ok(manager)
}

/// Keep endpoints and IPAM in step with the store: labels follow Pod
/// objects; after every allocation change the CIDR states go to the
/// CiliumNode status, the cluster pool adds or withdraws CIDRs, and the
/// allocator follows the CiliumNode's spec.
async fn follow(
    m: Arc<Manager>,
    store: Store,
    node: String,
    opts: CniOptions,
    shutdown: CancellationToken,
) {
    let mut rx = store.subscribe();
    loop {
        m.refresh_labels().await;
        if let Err(e) = ipam_pass(&m, &store, &node, &opts).await {
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
    node: &str,
    opts: &CniOptions,
) -> Result<(), CniStartError> {
    let states = m.ipam_report().await;
    let key = ObjectKey::new(Kind::CiliumNode, "", node);
    let Some(Object::CiliumNode(cn)) = store.get(&key).as_deref().cloned() else {
        return Ok(());
    };
    // Agent: report each CIDR's state.
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
            store.update_status(&key, v);
        }
    }
    let spec = reconcile_cilium_node(store, &opts.cluster_pool, node, &states)?;
    // Agent: allocate from what the CiliumNode now holds.
    m.set_pod_cidrs(spec).await?;
    Ok(())
}

/// The operator's cluster-pool pass for one node: withdraw CIDRs its agent
/// released, add one when a family is depleted; writes the CiliumNode's
/// `spec.ipam.podCIDRs` and returns them.
pub fn reconcile_cilium_node(
    store: &Store,
    cluster_pool: &[(Cidr, u8)],
    node: &str,
    states: &BTreeMap<Cidr, membrane_ipam::CidrState>,
) -> Result<Vec<Cidr>, CniStartError> {
    let mut pool = ClusterPool::new(cluster_pool.to_vec())?;
    let snap = store.snapshot();
    let mut mine = None;
    for n in snap.typed::<CiliumNode>(None) {
        let name = n.metadata.name.clone().unwrap_or_default();
        if name == node {
            mine = Some(n.clone());
            continue;
        }
        for c in n.spec.ipam.pod_cidrs.iter().filter_map(|c| c.parse().ok()) {
            pool.occupy(&name, c);
        }
    }
    let Some(mut cn) = mine else {
        return Ok(Vec::new());
    };
    let spec: Vec<Cidr> = cn
        .spec
        .ipam
        .pod_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    let new_spec = pool.reconcile_node(node, &spec, states)?;
    if new_spec != spec {
        info!(
            node,
            from = ?spec.iter().map(ToString::to_string).collect::<Vec<_>>(),
            to = ?new_spec.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "CiliumNode pod CIDRs"
        );
        cn.spec.ipam.pod_cidrs = new_spec.iter().map(ToString::to_string).collect();
        store.apply(Object::CiliumNode(cn));
    }
    Ok(new_spec)
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
