//! The eBPF service datapath in the agent (`membrane up --datapath ebpf`):
//! loads [`membrane_ebpf::Datapath`] (restoring from its pins), attaches it
//! to the configured devices, and on every store change translates Services
//! and EndpointSlices with [`membrane_lb::service::translate`] and syncs the
//! maps (differences only).
//!
//! Nothing is unpinned on shutdown: programs, maps and conntrack stay in the
//! kernel so forwarding (and established connections) survive an agent
//! restart. `rm -rf <pin dir>` detaches and frees everything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use membrane_crds::{CiliumClusterwideEnvoyConfig, CiliumEnvoyConfig, EnvoyConfigSpec};
use membrane_ebpf::{Datapath, DatapathConfig, DatapathError, ServiceStatus, SyncReport};
use membrane_lb::maglev::{BackendState, MaglevConfig};
use membrane_lb::service::{
    Affinity, Algorithm, BackendOverrides, L3n4Addr, LbConfig, Protocol, ServiceEntry, parse_state,
    state_str, translate,
};
use membrane_store::{Kind, Object, Store, StoreSnapshot};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cilium's default `--cgroup-root` (socket LB).
pub use membrane_ebpf::DEFAULT_CGROUP_ROOT;

/// Default number of service frontends the maps are sized for.
pub const DEFAULT_MAX_SERVICES: u32 = 1024;

/// How the agent runs the eBPF datapath.
#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// bpffs directory for maps and links (`--bpf-pin-dir`).
    pub pin_dir: PathBuf,
    /// Interfaces (in the agent's network namespace) to attach to.
    pub devices: Vec<String>,
    /// Algorithm of Services without `service.cilium.io/lb-algorithm`.
    pub default_algorithm: Algorithm,
    /// Maglev table size M (one of Cilium's primes).
    pub maglev_table_size: u32,
    /// Highest number of frontends; sizes the Maglev array.
    pub max_services: u32,
    /// Addresses NodePort frontends are exposed on.
    pub node_addresses: Vec<IpAddr>,
    /// Cluster Mesh (`--cluster-name`, `--cluster-id`, `--kvstore`,
    /// `--clustermesh-config`); `None` = a single cluster.
    pub mesh: Option<membrane_clustermesh::MeshConfig>,
    /// `--enable-host-legacy-routing`: the host stack forwards pod traffic
    /// even when the kernel supports eBPF host routing.
    pub host_legacy_routing: bool,
    /// `--enable-socket-lb`: the cgroup (`--cgroup-root`) whose processes
    /// get service translation at the socket; `None` = off.
    pub socket_lb: Option<PathBuf>,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions {
            pin_dir: PathBuf::from(membrane_ebpf::DEFAULT_PIN_DIR),
            devices: Vec::new(),
            default_algorithm: Algorithm::Random,
            maglev_table_size: membrane_lb::maglev::DEFAULT_M,
            max_services: DEFAULT_MAX_SERVICES,
            node_addresses: Vec::new(),
            mesh: None,
            host_legacy_routing: false,
            socket_lb: None,
        }
    }
}

/// Why the datapath could not start. The inner errors are part of the
/// message, not sources, so error chains do not print them twice.
#[derive(Debug, thiserror::Error)]
pub enum DatapathStartError {
    #[error("eBPF datapath: --maglev-table-size: {0}")]
    Maglev(membrane_lb::maglev::MaglevError),
    #[error(
        "eBPF datapath: {0}{hint}",
        hint = if matches!(**.0, DatapathError::NotBpffs { .. }) {
            " (note: `ip netns exec` remounts /sys and hides /sys/fs/bpf; use `nsenter --net=/var/run/netns/NAME` or a --bpf-pin-dir on a bpffs mounted elsewhere)"
        } else { "" }
    )]
    Datapath(Box<DatapathError>),
    #[error("eBPF datapath: socket LB: {0}")]
    SockLb(Box<membrane_ebpf::SockLbError>),
    #[error("eBPF datapath: attaching to device {device:?}: {error}")]
    Attach {
        device: String,
        error: Box<DatapathError>,
    },
}

impl From<membrane_lb::maglev::MaglevError> for DatapathStartError {
    fn from(e: membrane_lb::maglev::MaglevError) -> Self {
        DatapathStartError::Maglev(e)
    }
}

impl From<DatapathError> for DatapathStartError {
    fn from(e: DatapathError) -> Self {
        DatapathStartError::Datapath(Box::new(e))
    }
}

/// An operator's backend state change was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// The loaded datapath, shared by the sync task and the local API.
pub struct DatapathHandle {
    opts: DatapathOptions,
    inner: Mutex<Inner>,
}

struct Inner {
    dp: Datapath,
    /// The store objects the last sync was computed from (by identity), so
    /// store changes that touch no Service/EndpointSlice/CEC cost nothing.
    last_inputs: Vec<Arc<Object>>,
    /// `Service ns/name` → why part of it is not programmed.
    rejections: BTreeMap<String, String>,
    syncs: u64,
    last_report: SyncReport,
    /// Frontends left to Envoy because a CEC's `spec.services` names them.
    l7_frontends: Vec<String>,
    /// Problem setting up local delivery of redirected packets, if any.
    proxy_routing: Option<String>,
    /// VIP → proxy listener, from the CEC placement (TCP).
    proxy_targets: BTreeMap<SocketAddr, SocketAddr>,
    /// Why programming the redirects last failed, if it did.
    redirect_error: Option<String>,
    /// Cluster Mesh: generation of the remote services last merged, and
    /// per frontend its affinity and each backend's cluster id.
    mesh_gen: u64,
    mesh_view: BTreeMap<L3n4Addr, (Affinity, BTreeMap<L3n4Addr, u32>)>,
    /// Remote clusters, for the status report.
    mesh_remotes: Option<membrane_clustermesh::etcd::RemoteStore>,
    /// Socket LB programs, attached while this lives (and pinned).
    sock_lb: Option<membrane_ebpf::SockLb>,
}

impl DatapathHandle {
    /// Loads (or restores from pins) and attaches to every device.
    pub fn start(opts: DatapathOptions) -> Result<Self, DatapathStartError> {
        let maglev = MaglevConfig::from_seed_b64(
            opts.maglev_table_size,
            membrane_lb::maglev::DEFAULT_HASH_SEED,
        )?;
        let mut dp = Datapath::load(DatapathConfig {
            pin_dir: opts.pin_dir.clone(),
            maglev,
            max_services: opts.max_services,
            flow_hash_seed: maglev.seed(),
            host_routing: !opts.host_legacy_routing,
        })?;
        let sock_lb = match &opts.socket_lb {
            Some(root) => Some(
                membrane_ebpf::SockLb::attach(dp.config(), root)
                    .map_err(|e| DatapathStartError::SockLb(Box::new(e)))?,
            ),
            None => None,
        };
        for dev in &opts.devices {
            dp.attach(dev).map_err(|error| DatapathStartError::Attach {
                device: dev.clone(),
                error: Box::new(error),
            })?;
        }
        let proxy_routing = proxy_routing().err();
        if let Some(e) = &proxy_routing {
            warn!(error = %e, "local delivery of packets redirected to Envoy is not set up");
        }
        info!(
            pin_dir = %opts.pin_dir.display(),
            devices = ?opts.devices,
            host_routing = dp.host_routing().as_str(),
            socket_lb = ?opts.socket_lb,
            restored_services = dp.list().len(),
            "eBPF datapath loaded"
        );
        Ok(DatapathHandle {
            opts,
            inner: Mutex::new(Inner {
                dp,
                last_inputs: Vec::new(),
                rejections: BTreeMap::new(),
                syncs: 0,
                last_report: SyncReport::default(),
                l7_frontends: Vec::new(),
                proxy_routing,
                proxy_targets: BTreeMap::new(),
                redirect_error: None,
                mesh_gen: 0,
                mesh_view: BTreeMap::new(),
                mesh_remotes: None,
                sock_lb,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps consistent (every
        // write is a single syscall), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where maps and links are pinned.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.opts.pin_dir
    }

    /// Attach the programs to a new endpoint's host interface.
    pub fn attach_device(&self, ifname: &str) -> Result<(), String> {
        self.lock().dp.attach(ifname).map_err(|e| e.to_string())
    }

    /// Detach from a removed endpoint's host interface (gone already or not).
    pub fn detach_device(&self, ifname: &str) {
        if let Err(e) = self.lock().dp.detach(ifname) {
            warn!(ifname, error = %e, "detaching the datapath");
        }
    }

    /// Registers a pod's addresses for eBPF host routing (delivered to
    /// `host_ifname`). `egress_hook`: through the device's egress hook, where
    /// the policy program sees traffic to the pod. MACs as `aa:bb:…`.
    pub fn register_endpoint(
        &self,
        host_ifname: &str,
        addrs: &[IpAddr],
        egress_hook: bool,
        mac: &str,
        host_mac: &str,
    ) -> Result<(), String> {
        let macs = parse_mac(mac).zip(parse_mac(host_mac));
        self.lock()
            .dp
            .upsert_endpoint(host_ifname, addrs, egress_hook, macs)
            .map_err(|e| e.to_string())
    }

    /// Forgets a removed pod's addresses.
    pub fn unregister_endpoint(&self, host_ifname: &str) {
        if let Err(e) = self.lock().dp.remove_endpoint(host_ifname) {
            warn!(host_ifname, error = %e, "removing the endpoint from host routing");
        }
    }

    /// Translates the snapshot's Services and EndpointSlices and programs
    /// the maps with the difference.
    pub fn sync_store(&self, snap: &StoreSnapshot) {
        self.sync_store_mesh(snap, &[], 0);
    }

    /// [`Self::sync_store`] with remote Cluster Mesh services (generation
    /// `mesh_gen`) merged into the local global services.
    pub fn sync_store_mesh(
        &self,
        snap: &StoreSnapshot,
        remote: &[membrane_clustermesh::ClusterService],
        mesh_gen: u64,
    ) {
        let inputs: Vec<Arc<Object>> = [
            Kind::Service,
            Kind::EndpointSlice,
            Kind::CiliumEnvoyConfig,
            Kind::CiliumClusterwideEnvoyConfig,
        ]
        .iter()
        .flat_map(|k| snap.list(*k, None).cloned())
        .collect();
        let mut inner = self.lock();
        if inner.syncs > 0
            && inner.mesh_gen == mesh_gen
            && inner.last_inputs.len() == inputs.len()
            && inner
                .last_inputs
                .iter()
                .zip(&inputs)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        {
            return;
        }
        let services: Vec<Service> = snap.typed::<Service>(None).cloned().collect();
        let slices: Vec<EndpointSlice> = snap.typed::<EndpointSlice>(None).cloned().collect();
        let l7 = l7_services(snap);
        let cfg = LbConfig {
            default_algorithm: self.opts.default_algorithm,
            node_addresses: self.opts.node_addresses.clone(),
        };
        // Operator states (restored from the pinned maps) are applied by
        // `Datapath::sync` itself; baking them into the translation would
        // keep them in its remembered desired state after they are cleared.
        let mut t = translate(&services, &slices, &cfg, &BackendOverrides::new());
        // --- Cluster Mesh hook: remote backends join local global services.
        membrane_clustermesh::agent::merge_into(&mut t.state, &services, remote);
        inner.mesh_gen = mesh_gen;
        inner.mesh_view = t
            .state
            .services
            .iter()
            .map(|e| {
                let clusters = e.backends.iter().map(|b| (b.addr, b.cluster_id)).collect();
                (e.frontend, (e.affinity, clusters))
            })
            .collect();
        // --- end Cluster Mesh hook.
        let mut l7_frontends = Vec::new();
        t.state.services.retain(|e| {
            let to_envoy = is_l7(&l7, e);
            if to_envoy {
                l7_frontends.push(format!("{} ({})", e.frontend, e.name));
            }
            !to_envoy
        });
        let mut rejections: BTreeMap<String, String> = BTreeMap::new();
        for e in &t.errors {
            let reason = format!("{}: {}", e.field, e.message);
            rejections
                .entry(format!("Service {}", e.service))
                .and_modify(|r| {
                    r.push_str("; ");
                    r.push_str(&reason);
                })
                .or_insert(reason);
        }
        match inner.dp.sync(&t.state) {
            Ok(report) => {
                for err in &report.errors {
                    warn!(error = %err, "datapath could not program a frontend");
                }
                if !report.errors.is_empty() {
                    rejections.insert("datapath".into(), report.errors.join("; "));
                }
                inner.last_report = report;
            }
            Err(e) => {
                warn!(error = %e, "datapath sync failed");
                rejections.insert("datapath".into(), format!("sync failed: {e}"));
            }
        }
        program_redirects(&mut inner);
        if let Some(e) = &inner.redirect_error {
            rejections.insert("datapath".into(), format!("redirects to Envoy: {e}"));
        }
        inner.rejections = rejections;
        inner.l7_frontends = l7_frontends;
        inner.last_inputs = inputs;
        inner.syncs += 1;
    }

    /// Where each VIP of a CEC's `spec.services` goes: its listener's proxy
    /// address (from placement). Programmed at once when it changed.
    pub fn set_proxy_targets(&self, targets: BTreeMap<SocketAddr, SocketAddr>) {
        let mut inner = self.lock();
        if inner.proxy_targets == targets {
            return;
        }
        inner.proxy_targets = targets;
        program_redirects(&mut inner);
    }

    /// Objects the datapath rejected (`Service ns/name` → reason).
    pub fn rejections(&self) -> BTreeMap<String, String> {
        self.lock().rejections.clone()
    }

    /// `GET /v1/services`: every programmed frontend, as `cilium service list`.
    pub fn list_json(&self) -> Value {
        let inner = self.lock();
        let list = inner.dp.list();
        let services: Vec<Value> = list
            .iter()
            .map(|s| {
                let mut v = service_json(s);
                mesh_annotate(&mut v, inner.mesh_view.get(&s.frontend), s);
                v
            })
            .collect();
        json!({ "services": services })
    }

    /// Sets an operator state (`active`, `quarantined`, `maintenance`) on
    /// backends given as `IP:PORT` (every protocol the datapath knows the
    /// address with) or `IP:PORT/PROTO`. All are checked before any changes.
    pub fn update_backends(&self, backends: &[String], state: &str) -> Result<Value, UpdateError> {
        let state = parse_state(state).map_err(UpdateError::Invalid)?;
        if state == BackendState::Terminating {
            return Err(UpdateError::Invalid(
                "state terminating comes from EndpointSlices; use active, quarantined or maintenance"
                    .into(),
            ));
        }
        if backends.is_empty() {
            return Err(UpdateError::Invalid("no backends given".into()));
        }
        let mut inner = self.lock();
        let mut targets: BTreeSet<L3n4Addr> = BTreeSet::new();
        for b in backends {
            let (addr, protos) = parse_backend(b).map_err(UpdateError::Invalid)?;
            let known: Vec<L3n4Addr> = protos
                .iter()
                .map(|p| L3n4Addr::new(addr.ip(), addr.port(), *p))
                .filter(|a| inner.dp.backend_id(a).is_some())
                .collect();
            if known.is_empty() {
                return Err(UpdateError::Invalid(format!(
                    "backend {b} is not a backend of any service"
                )));
            }
            targets.extend(known);
        }
        for a in &targets {
            inner.dp.update_backend_state(a, state)?;
        }
        info!(backends = ?targets.iter().map(|a| a.to_string()).collect::<Vec<_>>(), state = state_str(state), "backend state updated");
        Ok(json!({
            "updated": targets.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "state": state_str(state),
        }))
    }

    /// The `datapath` section of the status report.
    pub fn status_json(&self) -> Value {
        let inner = self.lock();
        let stats: BTreeMap<&str, u64> = match inner.dp.stats() {
            Ok(s) => s.into_iter().map(|(k, v)| (k.name(), v)).collect(),
            Err(e) => {
                warn!(error = %e, "reading datapath stats");
                BTreeMap::new()
            }
        };
        let list = inner.dp.list();
        let backends: BTreeSet<u32> = list
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        let r = &inner.last_report;
        json!({
            "mode": "ebpf",
            "pin_dir": self.opts.pin_dir.display().to_string(),
            "devices": inner.dp.attached(),
            "default_algorithm": self.opts.default_algorithm.as_str(),
            "maglev_table_size": self.opts.maglev_table_size,
            "services": list.len(),
            "backends": backends.len(),
            "conntrack_entries": inner.dp.conntrack_len(),
            "syncs": inner.syncs,
            "last_sync": {
                "services_added": r.services_added,
                "services_updated": r.services_updated,
                "services_removed": r.services_removed,
                "backends_added": r.backends_added,
                "backends_updated": r.backends_updated,
                "backends_removed": r.backends_removed,
                "slots_written": r.slots_written,
            },
            "left_to_envoy": inner.l7_frontends,
            "redirected_to_envoy": inner.dp.redirects().iter()
                .map(|(fe, to)| json!({"frontend": fe.to_string(), "listener": to.to_string()}))
                .collect::<Vec<_>>(),
            "proxy_routing_error": inner.proxy_routing,
            "host_routing": match inner.dp.host_routing() {
                membrane_ebpf::HostRouting::Bpf => json!({"mode": "BPF"}),
                membrane_ebpf::HostRouting::Legacy { reason } => json!({"mode": "Legacy", "reason": reason}),
            },
            "host_routing_endpoints": inner.dp.endpoint_entries().len(),
            "socket_lb": match &inner.sock_lb {
                Some(s) => json!({"enabled": true, "cgroup_root": s.cgroup().display().to_string(), "programs": s.attached()}),
                None => json!({"enabled": false}),
            },
            "stats": stats,
            "clustermesh": mesh_status_json(self.opts.mesh.as_ref(), inner.mesh_remotes.as_ref()),
        })
    }
}

/// Cluster Mesh: each backend's `cluster_id` and, with an affinity,
/// whether it is `preferred` (what `service list --clustermesh-affinity`
/// marks).
fn mesh_annotate(
    v: &mut Value,
    view: Option<&(Affinity, BTreeMap<L3n4Addr, u32>)>,
    s: &ServiceStatus,
) {
    let Some((affinity, clusters)) = view else {
        return;
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert("clustermesh_affinity".into(), json!(affinity.as_str()));
    }
    let Some(bes) = v.get_mut("backends").and_then(|b| b.as_array_mut()) else {
        return;
    };
    for (bv, b) in bes.iter_mut().zip(&s.backends) {
        let cluster = clusters.get(&b.addr).copied().unwrap_or(0);
        if let Some(o) = bv.as_object_mut() {
            o.insert("cluster_id".into(), json!(cluster));
            o.insert("preferred".into(), json!(affinity.prefers(cluster)));
        }
    }
}

/// The `datapath.clustermesh` section of the status report.
fn mesh_status_json(
    cfg: Option<&membrane_clustermesh::MeshConfig>,
    remotes: Option<&membrane_clustermesh::etcd::RemoteStore>,
) -> Value {
    let Some(cfg) = cfg else {
        return Value::Null;
    };
    let clusters: BTreeMap<String, Value> = remotes
        .map(|r| r.status())
        .unwrap_or_default()
        .into_iter()
        .map(|(name, s)| {
            (
                name,
                json!({
                    "connected": s.connected,
                    "synced": s.synced,
                    "cluster_id": s.cluster_id,
                    "services": s.services,
                    "last_error": s.last_error,
                }),
            )
        })
        .collect();
    json!({
        "cluster_name": cfg.cluster_name,
        "cluster_id": cfg.cluster_id,
        "remote_clusters": clusters,
    })
}

/// Keeps the maps in step with the store until `shutdown`.
pub async fn run(handle: Arc<DatapathHandle>, store: Store, shutdown: CancellationToken) {
    let mut rx = store.subscribe();
    // --- Cluster Mesh hook: import/export, and wait (bounded by
    // --clustermesh-sync-timeout) for remote clusters before programming.
    let mesh = handle
        .opts
        .mesh
        .clone()
        .map(membrane_clustermesh::MeshRuntime::start);
    let mut mesh_rx = mesh.as_ref().map(|m| m.subscribe());
    handle.lock().mesh_remotes = mesh.as_ref().and_then(|m| m.remote_store().cloned());
    if let Some(m) = &mesh {
        // Export first: the other clusters may be waiting for our canary.
        let snap = store.snapshot();
        let services: Vec<Service> = snap.typed::<Service>(None).cloned().collect();
        let slices: Vec<EndpointSlice> = snap.typed::<EndpointSlice>(None).cloned().collect();
        m.export(&services, &slices);
        let missing = m.wait_initial_sync().await;
        if !missing.is_empty() {
            warn!(clusters = ?missing, "clustermesh: initial sync timed out; programming services without them");
        }
    }
    // --- end Cluster Mesh hook.
    loop {
        rx.borrow_and_update();
        let snap = store.snapshot();
        let h = handle.clone();
        let (remote, mesh_gen) = match (&mesh, &mut mesh_rx) {
            (Some(m), Some(mrx)) => {
                let services: Vec<Service> = snap.typed::<Service>(None).cloned().collect();
                let slices: Vec<EndpointSlice> =
                    snap.typed::<EndpointSlice>(None).cloned().collect();
                m.export(&services, &slices);
                // Generation first: a change racing with the read then
                // wakes the loop again instead of being marked as seen.
                let generation = *mrx.borrow_and_update();
                (m.remote_services(), generation)
            }
            _ => (Vec::new(), 0),
        };
        // Map writes are syscalls; keep them off the async workers.
        if let Err(e) =
            tokio::task::spawn_blocking(move || h.sync_store_mesh(&snap, &remote, mesh_gen)).await
        {
            warn!(error = %e, "datapath sync task failed");
        }
        let mesh_changed = async {
            match &mut mesh_rx {
                Some(mrx) => mrx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            true = mesh_changed => {}
            _ = shutdown.cancelled() => {
                info!(
                    pin_dir = %handle.opts.pin_dir.display(),
                    "leaving the eBPF datapath pinned (forwarding continues); remove the pin directory to detach it"
                );
                return;
            }
        }
    }
}

/// Writes the redirect map from the placement's targets (TCP only: only
/// TCP listeners are proxied).
fn program_redirects(inner: &mut Inner) {
    let want: BTreeMap<L3n4Addr, SocketAddr> = inner
        .proxy_targets
        .iter()
        .map(|(vip, to)| (L3n4Addr::new(vip.ip(), vip.port(), Protocol::Tcp), *to))
        .collect();
    inner.redirect_error = match inner.dp.sync_redirects(&want) {
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "programming redirects to Envoy failed");
            Some(e.to_string())
        }
    };
}

/// Routing table for packets the program assigned to a proxy socket.
const PROXY_TABLE: &str = "2004";

/// Packets marked by the program (assigned to an Envoy socket) are routed
/// to a table whose only route is `local default dev lo`: they are
/// delivered to the socket with their destination (a ClusterIP, not local)
/// unchanged instead of being forwarded. Idempotent.
fn proxy_routing() -> Result<(), String> {
    let mark = format!(
        "{:#x}/{:#x}",
        membrane_ebpf::PROXY_MARK,
        membrane_ebpf::PROXY_MARK_MASK
    );
    let ip = |args: &[&str]| -> Result<String, String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("running ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        let r = (|| {
            let rules = ip(&[family, "rule", "show"])?;
            if !rules
                .lines()
                .any(|l| l.contains(&format!("lookup {PROXY_TABLE}")))
            {
                ip(&[
                    family,
                    "rule",
                    "add",
                    "fwmark",
                    &mark,
                    "lookup",
                    PROXY_TABLE,
                    "pref",
                    "9",
                ])?;
            }
            ip(&[
                family,
                "route",
                "replace",
                "local",
                default,
                "dev",
                "lo",
                "table",
                PROXY_TABLE,
            ])
            .map(|_| ())
        })();
        // IPv6 may be disabled; IPv4 is what must work.
        match (r, family) {
            (Err(e), "-4") => return Err(e),
            (Err(e), _) => warn!(error = %e, "IPv6 proxy routing not set up"),
            _ => {}
        }
    }
    Ok(())
}

/// `ns/name` → ports (empty: all) of Services a CEC/CCEC redirects to Envoy.
fn l7_services(snap: &StoreSnapshot) -> BTreeMap<(String, String), BTreeSet<u16>> {
    let mut out: BTreeMap<(String, String), BTreeSet<u16>> = BTreeMap::new();
    let mut add = |default_ns: &str, spec: &EnvoyConfigSpec| {
        for s in &spec.services {
            let ns = if s.namespace.is_empty() {
                default_ns
            } else {
                &s.namespace
            };
            let ports = out.entry((ns.to_string(), s.name.clone())).or_default();
            if s.ports.is_empty() {
                // "All ports" is recorded as the empty set and wins.
                ports.clear();
                ports.insert(0);
            } else if !ports.contains(&0) {
                ports.extend(s.ports.iter().copied());
            }
        }
    };
    for c in snap.typed::<CiliumEnvoyConfig>(None) {
        add(
            c.metadata.namespace.as_deref().unwrap_or("default"),
            &c.spec.config,
        );
    }
    for c in snap.typed::<CiliumClusterwideEnvoyConfig>(None) {
        add("default", &c.spec);
    }
    out
}

/// Frontends of Services named in a CEC's `spec.services` belong to Envoy
/// (Ingress load balancers have a placeholder backend): the tc program must
/// not DNAT them to their backends.
fn is_l7(l7: &BTreeMap<(String, String), BTreeSet<u16>>, e: &ServiceEntry) -> bool {
    l7.get(&(e.name.namespace.clone(), e.name.name.clone()))
        .is_some_and(|ports| ports.contains(&0) || ports.contains(&e.frontend.port))
}

/// `aa:bb:cc:dd:ee:ff` → bytes; `None` when empty or malformed.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// `IP:PORT` (every protocol) or `IP:PORT/PROTO`.
fn parse_backend(s: &str) -> Result<(SocketAddr, Vec<Protocol>), String> {
    let (addr, protos) = match s.rsplit_once('/') {
        Some((a, p)) => (a, vec![p.parse::<Protocol>()?]),
        None => (s, vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
    };
    let addr: SocketAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not IP:PORT (IPv6 as [ADDR]:PORT)"))?;
    Ok((addr, protos))
}

fn service_json(s: &ServiceStatus) -> Value {
    json!({
        "id": s.id,
        "frontend": s.frontend.to_string(),
        "type": s.kind.map(|k| k.as_str()),
        "service": s.name.as_ref().map(|n| n.to_string()),
        "algorithm": s.algorithm.as_str(),
        "affinity_timeout": s.affinity_timeout,
        "backends": s.backends.iter().map(|b| json!({
            "id": b.id,
            "address": b.addr.to_string(),
            "state": state_str(b.state),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_with_and_without_protocol() {
        let (a, p) = parse_backend("10.0.0.1:80").unwrap();
        assert_eq!(a.to_string(), "10.0.0.1:80");
        assert_eq!(p.len(), 3);
        let (a, p) = parse_backend("[fd00::1]:53/udp").unwrap();
        assert_eq!(a.to_string(), "[fd00::1]:53");
        assert_eq!(p, vec![Protocol::Udp]);
        assert!(parse_backend("10.0.0.1").is_err());
        assert!(parse_backend("10.0.0.1:80/ICMP").is_err());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:00:0a:f4:01:ff"),
            Some([2, 0, 0x0a, 0xf4, 1, 0xff])
        );
        assert_eq!(parse_mac(""), None);
        assert_eq!(parse_mac("02:00:0a:f4:01"), None);
        assert_eq!(parse_mac("02:00:0a:f4:01:ff:00"), None);
        assert_eq!(parse_mac("zz:00:0a:f4:01:ff"), None);
    }

    #[test]
    fn cec_services_are_left_to_envoy() {
        let store = Store::new();
        let cec: Value = serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
            "metadata": {"name": "c", "namespace": "web"},
            "spec": {"services": [{"name": "all"}, {"name": "some", "ports": [80]}], "resources": []}
        });
        store.apply(Object::from_value(cec).unwrap());
        let l7 = l7_services(&store.snapshot());
        let entry = |name: &str, port: u16| ServiceEntry {
            name: membrane_lb::service::ServiceName {
                namespace: "web".into(),
                name: name.into(),
            },
            port_name: String::new(),
            frontend: L3n4Addr::new("10.96.0.1".parse().unwrap(), port, Protocol::Tcp),
            kind: membrane_lb::service::FrontendType::ClusterIP,
            backends: vec![],
            algorithm: Algorithm::Random,
            affinity_timeout: None,
            affinity: Default::default(),
        };
        assert!(is_l7(&l7, &entry("all", 443)));
        assert!(is_l7(&l7, &entry("some", 80)));
        assert!(!is_l7(&l7, &entry("some", 443)));
        assert!(!is_l7(&l7, &entry("other", 80)));
    }
}
