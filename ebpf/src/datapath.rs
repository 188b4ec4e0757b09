//! Loader, attachment and map sync of the service load balancer.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
use membrane_lb::maglev::{BackendState, MaglevConfig};
use membrane_lb::service::{
    Algorithm, DesiredState, FrontendType, L3n4Addr, ServiceEntry, ServiceName,
};

use crate::maps::{
    ALG_MAGLEV, ALG_RANDOM, AffinityKey, AffinityValue, BackendValue, CFG_REDIRECTS, CFG_SNAT_DEVS,
    CtValue, EP_F_EGRESS_HOOK, EpKey, EpValue, MAP_AFFINITY, MAP_BACKENDS, MAP_CT, MAP_ENDPOINTS,
    MAP_MAGLEV, MAP_REDIRECT, MAP_RNAT, MAP_SERVICES, MAP_SLOTS, MAP_STATS, RnatValue, SlotKey,
    Stat, SvcKey, SvcValue, Tuple, addr_bytes, addr_from_bytes, state_from_num,
};
use crate::snat::MAP_SNAT_DEV;

/// The compiled object (see build.rs).
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.o"));

/// Name of the tc program in the object.
pub const PROGRAM_NAME: &str = "membrane_lb";

/// Production pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/membrane";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Capacity of `lb_backends` in bpf/lb.c.
const BACKEND_ID_MAX: u32 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {PROGRAM_NAME}: {0}")]
    Program(#[from] ProgramError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("link for {ifname}: {source}")]
    Link {
        ifname: String,
        #[source]
        source: LinkError,
    },
    #[error("object has no {0}")]
    Missing(&'static str),
    #[error(
        "pinned {MAP_MAGLEV} in {dir} holds {have} entries but M={m} × {slots} service slots needs {want}; \
         remove the pin directory to change the Maglev table size"
    )]
    MaglevSize {
        dir: PathBuf,
        have: u32,
        want: u32,
        m: u32,
        slots: u32,
    },
    #[error("no service id left (max_services = {0})")]
    ServiceIdsExhausted(u32),
    #[error("no backend id left (at most {0} backends)")]
    BackendIdsExhausted(u32),
    #[error("backend {0} is not known to the datapath")]
    UnknownBackend(L3n4Addr),
    #[error("state {0:?} cannot be set by an operator (use active, quarantined or maintenance)")]
    StateNotSettable(BackendState),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// How the datapath is loaded.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// Where maps and links are pinned, e.g. `/sys/fs/bpf/membrane`.
    pub pin_dir: PathBuf,
    /// Maglev table size and hash seed.
    pub maglev: MaglevConfig,
    /// Highest service id; sizes the Maglev array (`(max_services + 1) × M`).
    pub max_services: u32,
    /// Seed of the in-kernel flow hash that picks a Maglev slot.
    pub flow_hash_seed: u32,
    /// eBPF host routing wanted (`false`: `--enable-host-legacy-routing`);
    /// used only when the kernel has the helpers (see [`HostRouting`]).
    pub host_routing: bool,
}

/// How packets from pods are forwarded (Cilium's "Host Routing" status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRouting {
    /// By the tc program: `bpf_redirect_peer` to local endpoints,
    /// `bpf_fib_lookup` + `bpf_redirect_neigh` otherwise.
    Bpf,
    /// By the host stack; `reason` says why (flag, or a missing helper).
    Legacy { reason: String },
}

impl HostRouting {
    /// `BPF` or `Legacy`, as `cilium status` shows it.
    pub fn as_str(&self) -> &'static str {
        match self {
            HostRouting::Bpf => "BPF",
            HostRouting::Legacy { .. } => "Legacy",
        }
    }
}

/// Whether the kernel has what eBPF host routing needs (tc programs calling
/// `bpf_redirect_peer`, `bpf_redirect_neigh`, `bpf_fib_lookup`); `Err` names
/// what is missing.
pub fn probe_host_routing() -> Result<(), String> {
    use aya::programs::ProgramType;
    use aya::sys::{BpfHelper, is_helper_supported};
    for (helper, name) in [
        (BpfHelper::BPF_FUNC_redirect_peer, "bpf_redirect_peer"),
        (BpfHelper::BPF_FUNC_redirect_neigh, "bpf_redirect_neigh"),
        (BpfHelper::BPF_FUNC_fib_lookup, "bpf_fib_lookup"),
    ] {
        match is_helper_supported(ProgramType::SchedClassifier, helper) {
            Ok(true) => {}
            Ok(false) => return Err(format!("the kernel has no {name} for tc programs")),
            Err(e) => return Err(format!("probing {name}: {e}")),
        }
    }
    Ok(())
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            maglev: MaglevConfig::default(),
            max_services: 1024,
            flow_hash_seed: MaglevConfig::default().seed(),
            host_routing: true,
        }
    }
}

/// One backend as `list()` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub id: u32,
    pub addr: L3n4Addr,
    pub state: BackendState,
}

/// One frontend as `list()` reports it (`cilium service list` columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub id: u32,
    pub frontend: L3n4Addr,
    /// `None` for a service restored from pinned maps and not yet re-synced.
    pub kind: Option<FrontendType>,
    pub name: Option<ServiceName>,
    pub algorithm: Algorithm,
    pub affinity_timeout: Option<u32>,
    pub backends: Vec<BackendStatus>,
}

/// What one `sync` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub services_added: usize,
    pub services_updated: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_updated: usize,
    pub backends_removed: usize,
    /// Selection slots (random slots + Maglev cells) written or deleted.
    pub slots_written: usize,
    /// Frontends that could not be programmed; the rest were.
    pub errors: Vec<String>,
}

struct SvcState {
    id: u32,
    value: SvcValue,
    /// What the kernel's selection table holds for this service: random
    /// slots in order, or the Maglev table.
    table: Vec<u32>,
    entry: Option<ServiceEntry>,
}

/// The loaded load balancer: program, maps, links and the userspace mirror
/// of what the maps hold (so syncs write only differences).
pub struct Datapath {
    cfg: DatapathConfig,
    ebpf: Ebpf,
    services: HashMap<MapData, SvcKey, SvcValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    maglev: Array<MapData, u32>,
    ct: HashMap<MapData, Tuple, CtValue>,
    rnat: HashMap<MapData, Tuple, RnatValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    stats: PerCpuArray<MapData, u64>,
    redirect: HashMap<MapData, SvcKey, RnatValue>,
    endpoints_map: HashMap<MapData, EpKey, EpValue>,
    host_routing: HostRouting,
    /// Mirror of `lb_endpoints`: host device → the endpoint addresses on it.
    endpoints: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Mirror of `lb_redirect`: frontend → proxy listener.
    redirects: BTreeMap<L3n4Addr, SocketAddr>,
    links: BTreeMap<String, FdLink>,
    svcs: BTreeMap<L3n4Addr, SvcState>,
    svc_ids: IdAllocator,
    backend_id_alloc: IdAllocator,
    backend_ids: BTreeMap<L3n4Addr, u32>,
    backend_vals: BTreeMap<u32, BackendValue>,
    overrides: BTreeMap<L3n4Addr, BackendState>,
    last_desired: Option<DesiredState>,
}

/// Fails unless `path` (or its nearest existing parent) is on bpffs.
pub fn check_bpffs(path: &Path) -> Result<(), DatapathError> {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
        DatapathError::NotBpffs {
            path: path.to_path_buf(),
        }
    })?;
    // SAFETY: statfs writes into the zeroed struct we own; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if r != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

impl Datapath {
    /// Loads the program, creating the maps or reusing the ones pinned in
    /// `cfg.pin_dir`; with pinned maps the userspace mirror is restored from
    /// them, so forwarding state (services, backends, conntrack) carries over.
    pub fn load(cfg: DatapathConfig) -> Result<Self, DatapathError> {
        check_bpffs(&cfg.pin_dir)?;
        fs::create_dir_all(&cfg.pin_dir).map_err(|source| DatapathError::Io {
            what: format!("creating {}", cfg.pin_dir.display()),
            source,
        })?;
        let m = cfg.maglev.m();
        let slots = cfg.max_services.saturating_add(1);
        let want = m.saturating_mul(slots);
        // Checked before loading: the program's M must match the pinned
        // table it would reuse, or every Maglev lookup would be wrong.
        let pinned = cfg.pin_dir.join(MAP_MAGLEV);
        if pinned.exists() {
            let info = aya::maps::MapInfo::from_pin(&pinned).map_err(map_err(MAP_MAGLEV))?;
            if info.max_entries() != want {
                return Err(DatapathError::MaglevSize {
                    dir: cfg.pin_dir.clone(),
                    have: info.max_entries(),
                    want,
                    m,
                    slots,
                });
            }
        }
        let host_routing = if !cfg.host_routing {
            HostRouting::Legacy {
                reason: "--enable-host-legacy-routing".into(),
            }
        } else {
            match probe_host_routing() {
                Ok(()) => HostRouting::Bpf,
                Err(reason) => {
                    tracing::warn!(%reason, "eBPF host routing unavailable; the host stack forwards");
                    HostRouting::Legacy { reason }
                }
            }
        };
        let hr: u32 = (host_routing == HostRouting::Bpf).into();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .map_max_entries(MAP_MAGLEV, want)
            .override_global("MAGLEV_M", &m, true)
            .override_global("HASH_SEED", &cfg.flow_hash_seed, true)
            .override_global("HOST_ROUTING", &hr, true)
            .load(LB_OBJECT)?;
        {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(PROGRAM_NAME)
                .ok_or(DatapathError::Missing(PROGRAM_NAME))?
                .try_into()?;
            prog.load()?;
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(DatapathError::Missing(name));
        let services = HashMap::try_from(take(MAP_SERVICES)?).map_err(map_err(MAP_SERVICES))?;
        let backends = HashMap::try_from(take(MAP_BACKENDS)?).map_err(map_err(MAP_BACKENDS))?;
        let slots_map = HashMap::try_from(take(MAP_SLOTS)?).map_err(map_err(MAP_SLOTS))?;
        let maglev: Array<MapData, u32> =
            Array::try_from(take(MAP_MAGLEV)?).map_err(map_err(MAP_MAGLEV))?;
        let ct = HashMap::try_from(take(MAP_CT)?).map_err(map_err(MAP_CT))?;
        let rnat = HashMap::try_from(take(MAP_RNAT)?).map_err(map_err(MAP_RNAT))?;
        let affinity = HashMap::try_from(take(MAP_AFFINITY)?).map_err(map_err(MAP_AFFINITY))?;
        let stats = PerCpuArray::try_from(take(MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let redirect = HashMap::try_from(take(MAP_REDIRECT)?).map_err(map_err(MAP_REDIRECT))?;
        let endpoints_map =
            HashMap::try_from(take(MAP_ENDPOINTS)?).map_err(map_err(MAP_ENDPOINTS))?;
        let mut dp = Datapath {
            cfg,
            ebpf,
            services,
            backends,
            slots: slots_map,
            maglev,
            ct,
            rnat,
            affinity,
            stats,
            redirect,
            endpoints_map,
            host_routing,
            endpoints: BTreeMap::new(),
            redirects: BTreeMap::new(),
            links: BTreeMap::new(),
            svcs: BTreeMap::new(),
            svc_ids: IdAllocator::new(0),
            backend_id_alloc: IdAllocator::new(0),
            backend_ids: BTreeMap::new(),
            backend_vals: BTreeMap::new(),
            overrides: BTreeMap::new(),
            last_desired: None,
        };
        dp.restore()?;
        // The counts the program's shortcuts rely on, for maps that may
        // have been filled (pinned) before this map existed.
        dp.set_config(CFG_REDIRECTS, dp.redirects.len())?;
        let snat_devs = match dp.ebpf.map(MAP_SNAT_DEV) {
            Some(m) => HashMap::<_, u32, RnatValue>::try_from(m)
                .map_err(map_err(MAP_SNAT_DEV))?
                .keys()
                .count(),
            None => 0,
        };
        dp.set_config(CFG_SNAT_DEVS, snat_devs)?;
        Ok(dp)
    }

    /// Rebuilds the userspace mirror from the (possibly pinned) maps.
    fn restore(&mut self) -> Result<(), DatapathError> {
        for kv in self.endpoints_map.iter() {
            let (k, v) = kv.map_err(map_err(MAP_ENDPOINTS))?;
            let (Some(a), Some(name)) = (addr_from_bytes(&k.addr, k.family), if_name(v.ifindex))
            else {
                continue;
            };
            self.endpoints.entry(name).or_default().insert(a);
        }
        for kv in self.backends.iter() {
            let (id, v) = kv.map_err(map_err(MAP_BACKENDS))?;
            let Some(addr) = v.to_l3n4() else { continue };
            let st = state_from_num(v.state);
            if matches!(st, BackendState::Quarantined | BackendState::Maintenance) {
                // Operator states live in the map, so they survive restarts.
                self.overrides.insert(addr, st);
            }
            self.backend_ids.insert(addr, id);
            self.backend_vals.insert(id, v);
        }
        for kv in self.redirect.iter() {
            let (k, v) = kv.map_err(map_err(MAP_REDIRECT))?;
            let (Some(fe), Some(ip)) = (k.to_l3n4(), addr_from_bytes(&v.addr, k.family)) else {
                continue;
            };
            self.redirects
                .insert(fe, SocketAddr::new(ip, u16::from_be(v.port)));
        }
        let m = self.cfg.maglev.m();
        let mut entries = Vec::new();
        for kv in self.services.iter() {
            entries.push(kv.map_err(map_err(MAP_SERVICES))?);
        }
        for (k, v) in entries {
            let Some(fe) = k.to_l3n4() else { continue };
            let mut table = Vec::new();
            if v.algorithm == ALG_MAGLEV {
                if v.count > 0 {
                    let base = v.svc_id.saturating_mul(m);
                    for i in 0..m {
                        table.push(
                            self.maglev
                                .get(&(base + i), 0)
                                .map_err(map_err(MAP_MAGLEV))?,
                        );
                    }
                }
            } else {
                for slot in 0..v.count {
                    let id = self
                        .slots
                        .get(
                            &SlotKey {
                                svc_id: v.svc_id,
                                slot,
                            },
                            0,
                        )
                        .map_err(map_err(MAP_SLOTS))?;
                    table.push(id);
                }
            }
            self.svcs.insert(
                fe,
                SvcState {
                    id: v.svc_id,
                    value: v,
                    table,
                    entry: None,
                },
            );
        }
        self.svc_ids =
            IdAllocator::with_used(self.cfg.max_services, self.svcs.values().map(|s| s.id));
        self.backend_id_alloc =
            IdAllocator::with_used(BACKEND_ID_MAX, self.backend_vals.keys().copied());
        tracing::info!(
            services = self.svcs.len(),
            backends = self.backend_ids.len(),
            pin_dir = %self.cfg.pin_dir.display(),
            "datapath state restored from maps"
        );
        Ok(())
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.cfg
    }

    fn link_pin(&self, ifname: &str) -> PathBuf {
        self.cfg
            .pin_dir
            .join("links")
            .join(format!("{ifname}-ingress"))
    }

    fn program_mut(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DatapathError::Missing(PROGRAM_NAME))?
            .try_into()?)
    }

    /// Attaches to `ifname`'s ingress with TCX (resolved in the calling
    /// thread's network namespace). The link is pinned, so it outlives this
    /// process; a link already pinned for `ifname` is switched to this
    /// program atomically (no window without a program).
    pub fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let pin = self.link_pin(ifname);
        let link_err = |source| DatapathError::Link {
            ifname: ifname.to_string(),
            source,
        };
        let existing = match PinnedLink::from_pin(&pin) {
            Ok(l) => Some(l),
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(link_err(e)),
        };
        let prog = self.program_mut()?;
        let fd_link = if let Some(old) = existing {
            let link: SchedClassifierLink = FdLink::from(old).try_into().map_err(link_err)?;
            let id = prog.attach_to_link(link)?;
            let link = prog.take_link(id)?;
            FdLink::try_from(link).map_err(link_err)?
        } else {
            let id = prog.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )?;
            let link = prog.take_link(id)?;
            let fd_link = FdLink::try_from(link).map_err(link_err)?;
            if let Some(dir) = pin.parent() {
                fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
                    what: format!("creating {}", dir.display()),
                    source,
                })?;
            }
            let pinned = fd_link.pin(&pin).map_err(|e| DatapathError::Io {
                what: format!("pinning link at {}: {e}", pin.display()),
                source: io::Error::other(e.to_string()),
            })?;
            FdLink::from(pinned)
        };
        tracing::info!(ifname, pin = %pin.display(), "attached tc ingress");
        self.links.insert(ifname.to_string(), fd_link);
        Ok(())
    }

    /// Detaches from `ifname` (removes the pinned link).
    pub fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let pin = self.link_pin(ifname);
        match fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::Io {
                    what: format!("removing {}", pin.display()),
                    source,
                });
            }
        }
        // Closing the last reference destroys the link, i.e. detaches.
        self.links.remove(ifname);
        Ok(())
    }

    /// Interfaces this instance attached to.
    pub fn attached(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    /// Programs the maps to match `desired`, writing only differences:
    /// backends first, then each service's selection table before its
    /// frontend entry, removed frontends next, unused backends last, so a
    /// packet never sees a slot pointing at a missing backend.
    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncReport, DatapathError> {
        let mut report = SyncReport::default();
        self.last_desired = Some(desired.clone());

        // Operator overrides win over EndpointSlice states.
        let entries: Vec<ServiceEntry> = desired
            .services
            .iter()
            .map(|e| {
                let mut e = e.clone();
                for b in &mut e.backends {
                    if let Some(s) = self.overrides.get(&b.addr) {
                        b.state = *s;
                    }
                }
                e
            })
            .collect();

        // 1. Backends.
        let mut want_backends: BTreeMap<L3n4Addr, BackendState> = BTreeMap::new();
        for e in &entries {
            for b in &e.backends {
                want_backends.entry(b.addr).or_insert(b.state);
            }
        }
        for (addr, state) in &want_backends {
            let val = BackendValue::new(addr, *state);
            let id = match self.backend_ids.get(addr) {
                Some(id) => *id,
                None => {
                    let id = self
                        .backend_id_alloc
                        .alloc()
                        .ok_or(DatapathError::BackendIdsExhausted(BACKEND_ID_MAX))?;
                    self.backend_ids.insert(*addr, id);
                    report.backends_added += 1;
                    id
                }
            };
            if self.backend_vals.get(&id) != Some(&val) {
                if self.backend_vals.contains_key(&id) {
                    report.backends_updated += 1;
                }
                self.backends
                    .insert(id, val, 0)
                    .map_err(map_err(MAP_BACKENDS))?;
                self.backend_vals.insert(id, val);
            }
        }

        // 2. Services.
        let want_fes: BTreeSet<L3n4Addr> = entries.iter().map(|e| e.frontend).collect();
        for e in &entries {
            match self.sync_service(e, &mut report) {
                Ok(()) => {}
                Err(err) => {
                    tracing::warn!(frontend = %e.frontend, service = %e.name, error = %err, "cannot program frontend");
                    report
                        .errors
                        .push(format!("{} ({}): {err}", e.frontend, e.name));
                }
            }
        }

        // 3. Removed frontends.
        let gone: Vec<L3n4Addr> = self
            .svcs
            .keys()
            .filter(|fe| !want_fes.contains(fe))
            .copied()
            .collect();
        for fe in gone {
            let Some(st) = self.svcs.remove(&fe) else {
                continue;
            };
            match self.services.remove(&SvcKey::from_l3n4(&fe)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_SERVICES)(e)),
            }
            if st.value.algorithm == ALG_RANDOM {
                for slot in 0..st.table.len() as u32 {
                    let _ = self.slots.remove(&SlotKey {
                        svc_id: st.id,
                        slot,
                    });
                    report.slots_written += 1;
                }
            }
            // Maglev cells are left as they are: unreachable without the
            // frontend entry, and fully rewritten when the id is reused.
            self.svc_ids.release(st.id);
            report.services_removed += 1;
        }

        // 4. Backends no frontend uses any more.
        let unused: Vec<(L3n4Addr, u32)> = self
            .backend_ids
            .iter()
            .filter(|(a, _)| !want_backends.contains_key(a))
            .map(|(a, id)| (*a, *id))
            .collect();
        for (addr, id) in unused {
            match self.backends.remove(&id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_BACKENDS)(e)),
            }
            self.backend_ids.remove(&addr);
            self.backend_vals.remove(&id);
            self.backend_id_alloc.release(id);
            // A returning pod with the same address starts out active.
            self.overrides.remove(&addr);
            report.backends_removed += 1;
        }
        tracing::debug!(?report, "datapath sync");
        Ok(report)
    }

    fn sync_service(
        &mut self,
        e: &ServiceEntry,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let m = self.cfg.maglev.m();
        let key = SvcKey::from_l3n4(&e.frontend);
        let (id, old_table, old_value, is_new) = match self.svcs.get(&e.frontend) {
            Some(s) => (s.id, s.table.clone(), Some(s.value), false),
            None => {
                let id = self
                    .svc_ids
                    .alloc()
                    .ok_or(DatapathError::ServiceIdsExhausted(self.cfg.max_services))?;
                (id, Vec::new(), None, true)
            }
        };
        let ids = &self.backend_ids;
        let lookup = |a: &L3n4Addr| ids.get(a).copied().unwrap_or(0);
        let (algorithm, table, count) = match e.algorithm {
            Algorithm::Maglev => {
                let t = e.maglev_table(&self.cfg.maglev, lookup);
                let n = e.selectable().len() as u32;
                (ALG_MAGLEV, t, n)
            }
            Algorithm::Random => {
                let t: Vec<u32> = e.selectable().iter().map(|b| lookup(&b.addr)).collect();
                let n = t.len() as u32;
                (ALG_RANDOM, t, n)
            }
        };
        // Switching algorithms: the old table means nothing to the new one.
        let old_table = match old_value {
            Some(v) if v.algorithm == algorithm => old_table,
            _ => Vec::new(),
        };
        let value = SvcValue {
            svc_id: id,
            count,
            affinity_timeout: e.affinity_timeout.unwrap_or(0),
            algorithm,
            flags: 0,
            pad: 0,
        };

        if algorithm == ALG_MAGLEV {
            let base = id * m;
            for (i, b) in table.iter().enumerate() {
                if old_table.get(i) != Some(b) {
                    self.maglev
                        .set(base + i as u32, *b, 0)
                        .map_err(map_err(MAP_MAGLEV))?;
                    report.slots_written += 1;
                }
            }
        } else {
            for (i, b) in table.iter().enumerate() {
                if old_table.get(i) != Some(b) {
                    self.slots
                        .insert(
                            SlotKey {
                                svc_id: id,
                                slot: i as u32,
                            },
                            *b,
                            0,
                        )
                        .map_err(map_err(MAP_SLOTS))?;
                    report.slots_written += 1;
                }
            }
        }
        if old_value != Some(value) {
            self.services
                .insert(key, value, 0)
                .map_err(map_err(MAP_SERVICES))?;
        }
        if let Some(ov) = old_value
            && ov.algorithm == ALG_RANDOM
        {
            let from = if algorithm == ALG_RANDOM {
                table.len()
            } else {
                0
            };
            for slot in from..old_table.len().max(ov.count as usize) {
                let _ = self.slots.remove(&SlotKey {
                    svc_id: id,
                    slot: slot as u32,
                });
                report.slots_written += 1;
            }
        }
        // An empty Maglev table keeps its old cells (count 0 stops lookups);
        // remember them so a later non-empty table writes only differences.
        let kept = if algorithm == ALG_MAGLEV && table.is_empty() {
            old_table
        } else {
            table
        };
        let changed = is_new || old_value != Some(value);
        if is_new {
            report.services_added += 1;
        } else if changed {
            report.services_updated += 1;
        }
        self.svcs.insert(
            e.frontend,
            SvcState {
                id,
                value,
                table: kept,
                entry: Some(e.clone()),
            },
        );
        Ok(())
    }

    /// Programs the frontends delivered to local proxy listeners (Envoy)
    /// instead of backends: `frontend → listener address`. Only TCP
    /// frontends are redirected; the listener must be transparent (its
    /// connections keep the frontend as local address) and marked packets
    /// must be routed locally (see [`crate::maps::PROXY_MARK`]). Writes
    /// only differences; returns how many entries changed.
    pub fn sync_redirects(
        &mut self,
        want: &BTreeMap<L3n4Addr, SocketAddr>,
    ) -> Result<usize, DatapathError> {
        let mut changed = 0;
        let stale: Vec<L3n4Addr> = self
            .redirects
            .keys()
            .filter(|fe| !want.contains_key(fe))
            .copied()
            .collect();
        for fe in stale {
            match self.redirect.remove(&SvcKey::from_l3n4(&fe)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_REDIRECT)(e)),
            }
            self.redirects.remove(&fe);
            changed += 1;
        }
        for (fe, target) in want {
            if self.redirects.get(fe) == Some(target) {
                continue;
            }
            let (addr, _) = addr_bytes(target.ip());
            let v = RnatValue {
                addr,
                port: target.port().to_be(),
                pad: [0; 2],
            };
            self.redirect
                .insert(SvcKey::from_l3n4(fe), v, 0)
                .map_err(map_err(MAP_REDIRECT))?;
            self.redirects.insert(*fe, *target);
            changed += 1;
        }
        if changed > 0 {
            self.set_config(CFG_REDIRECTS, self.redirects.len())?;
        }
        Ok(changed)
    }

    /// Writes one `lb_config` count (see bpf/lb.h).
    fn set_config(&self, idx: u32, n: usize) -> Result<(), DatapathError> {
        crate::snat::set_config(&self.cfg.pin_dir, idx, u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Frontends redirected to proxy listeners.
    pub fn redirects(&self) -> &BTreeMap<L3n4Addr, SocketAddr> {
        &self.redirects
    }

    /// How packets from pods are forwarded.
    pub fn host_routing(&self) -> &HostRouting {
        &self.host_routing
    }

    /// Registers a local endpoint for host routing: its addresses are
    /// delivered to `host_ifname` (the pod's host-side veth, in this
    /// namespace). `egress_hook`: through that device's egress hook
    /// (`bpf_redirect`, so a program there — policy — sees the packet)
    /// instead of straight into the pod (`bpf_redirect_peer`). MACs are
    /// written into delivered frames when both are given. Replaces what
    /// was registered for the device before.
    pub fn upsert_endpoint(
        &mut self,
        host_ifname: &str,
        addrs: &[IpAddr],
        egress_hook: bool,
        macs: Option<([u8; 6], [u8; 6])>,
    ) -> Result<(), DatapathError> {
        let ifindex = if_index(host_ifname)?;
        let (mac, node_mac) = macs.unwrap_or_default();
        let v = EpValue {
            ifindex,
            flags: if egress_hook { EP_F_EGRESS_HOOK } else { 0 },
            mac,
            node_mac,
        };
        let want: BTreeSet<IpAddr> = addrs.iter().copied().collect();
        for a in &want {
            self.endpoints_map
                .insert(ep_key(*a), v, 0)
                .map_err(map_err(MAP_ENDPOINTS))?;
        }
        let old = self
            .endpoints
            .insert(host_ifname.to_string(), want.clone())
            .unwrap_or_default();
        for a in old.difference(&want) {
            self.remove_endpoint_addr(*a)?;
        }
        Ok(())
    }

    /// Forgets the endpoint behind `host_ifname` (its packets then go
    /// through the FIB).
    pub fn remove_endpoint(&mut self, host_ifname: &str) -> Result<(), DatapathError> {
        let addrs = self.endpoints.remove(host_ifname).unwrap_or_default();
        for a in addrs {
            self.remove_endpoint_addr(a)?;
        }
        Ok(())
    }

    fn remove_endpoint_addr(&mut self, a: IpAddr) -> Result<(), DatapathError> {
        match self.endpoints_map.remove(&ep_key(a)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_ENDPOINTS)(e)),
        }
    }

    /// Endpoint addresses the kernel map holds → host-side ifindex.
    pub fn endpoint_entries(&self) -> BTreeMap<IpAddr, u32> {
        self.endpoints_map
            .iter()
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, v)| Some((addr_from_bytes(&k.addr, k.family)?, v.ifindex)))
            .collect()
    }

    /// Sets an operator state on a backend (Cilium's `service update
    /// --states`). `Active` clears the override. Persisted in the backend
    /// map, so it survives restarts; selection tables are recomputed.
    pub fn update_backend_state(
        &mut self,
        backend: &L3n4Addr,
        state: BackendState,
    ) -> Result<SyncReport, DatapathError> {
        if !self.backend_ids.contains_key(backend) {
            return Err(DatapathError::UnknownBackend(*backend));
        }
        match state {
            BackendState::Active => {
                self.overrides.remove(backend);
            }
            BackendState::Quarantined | BackendState::Maintenance => {
                self.overrides.insert(*backend, state);
            }
            BackendState::Terminating => return Err(DatapathError::StateNotSettable(state)),
        }
        match self.last_desired.clone() {
            Some(d) => self.sync(&d),
            None => {
                // Restored but not yet synced: record the state in the map;
                // the next sync recomputes the tables.
                let id = self.backend_ids[backend];
                let val = BackendValue::new(backend, state);
                self.backends
                    .insert(id, val, 0)
                    .map_err(map_err(MAP_BACKENDS))?;
                self.backend_vals.insert(id, val);
                Ok(SyncReport::default())
            }
        }
    }

    /// Operator-set backend states (restored from the maps after a restart).
    pub fn backend_overrides(&self) -> &BTreeMap<L3n4Addr, BackendState> {
        &self.overrides
    }

    /// Every programmed frontend, sorted by service id.
    pub fn list(&self) -> Vec<ServiceStatus> {
        let mut out: Vec<ServiceStatus> = self
            .svcs
            .iter()
            .map(|(fe, s)| {
                let backends = match &s.entry {
                    Some(e) => e
                        .backends
                        .iter()
                        .map(|b| BackendStatus {
                            id: self.backend_ids.get(&b.addr).copied().unwrap_or(0),
                            addr: b.addr,
                            state: self
                                .backend_ids
                                .get(&b.addr)
                                .and_then(|id| self.backend_vals.get(id))
                                .map(|v| state_from_num(v.state))
                                .unwrap_or(b.state),
                        })
                        .collect(),
                    None => {
                        // Restored: all we know is who is in the table.
                        let ids: BTreeSet<u32> = s.table.iter().copied().collect();
                        ids.into_iter()
                            .filter_map(|id| {
                                let v = self.backend_vals.get(&id)?;
                                Some(BackendStatus {
                                    id,
                                    addr: v.to_l3n4()?,
                                    state: state_from_num(v.state),
                                })
                            })
                            .collect()
                    }
                };
                ServiceStatus {
                    id: s.id,
                    frontend: *fe,
                    kind: s.entry.as_ref().map(|e| e.kind),
                    name: s.entry.as_ref().map(|e| e.name.clone()),
                    algorithm: if s.value.algorithm == ALG_MAGLEV {
                        Algorithm::Maglev
                    } else {
                        Algorithm::Random
                    },
                    affinity_timeout: (s.value.affinity_timeout > 0)
                        .then_some(s.value.affinity_timeout),
                    backends,
                }
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Kernel-side id of a backend.
    pub fn backend_id(&self, backend: &L3n4Addr) -> Option<u32> {
        self.backend_ids.get(backend).copied()
    }

    /// The selection table the kernel holds for a frontend (random slots or
    /// the Maglev table), read back from the maps.
    pub fn kernel_table(&self, frontend: &L3n4Addr) -> Result<Vec<u32>, DatapathError> {
        let v = match self.services.get(&SvcKey::from_l3n4(frontend), 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(Vec::new()),
            Err(e) => return Err(map_err(MAP_SERVICES)(e)),
        };
        let mut out = Vec::new();
        if v.algorithm == ALG_MAGLEV {
            let m = self.cfg.maglev.m();
            for i in 0..m {
                out.push(
                    self.maglev
                        .get(&(v.svc_id * m + i), 0)
                        .map_err(map_err(MAP_MAGLEV))?,
                );
            }
        } else {
            for slot in 0..v.count {
                out.push(
                    self.slots
                        .get(
                            &SlotKey {
                                svc_id: v.svc_id,
                                slot,
                            },
                            0,
                        )
                        .map_err(map_err(MAP_SLOTS))?,
                );
            }
        }
        Ok(out)
    }

    /// Counters summed over CPUs.
    pub fn stats(&self) -> Result<BTreeMap<Stat, u64>, DatapathError> {
        let mut out = BTreeMap::new();
        for s in Stat::ALL {
            let v = self.stats.get(&(s as u32), 0).map_err(map_err(MAP_STATS))?;
            out.insert(s, v.iter().sum());
        }
        Ok(out)
    }

    /// The tc program's cumulative run time and run count as the kernel
    /// keeps them (both stay 0 unless `kernel.bpf_stats_enabled` is 1);
    /// for measuring the per-packet cost.
    pub fn program_run_stats(&self) -> Result<(std::time::Duration, u64), DatapathError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(DatapathError::Missing(PROGRAM_NAME))?
            .try_into()?;
        let info = prog.info()?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Number of conntrack entries (walks the map; for tests and status).
    pub fn conntrack_len(&self) -> usize {
        self.ct.keys().filter(|k| k.is_ok()).count()
    }

    /// Conntrack entries: client → frontend tuple, backend id.
    pub fn conntrack(&self) -> Vec<(Tuple, CtValue)> {
        self.ct.iter().filter_map(|kv| kv.ok()).collect()
    }

    /// Forgets every tracked flow (and its reverse NAT): established flows
    /// then select again through the current tables. Returns how many.
    pub fn flush_conntrack(&mut self) -> Result<usize, DatapathError> {
        let keys: Vec<Tuple> = self.ct.keys().filter_map(|k| k.ok()).collect();
        for k in &keys {
            match self.ct.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_CT)(e)),
            }
        }
        let rkeys: Vec<Tuple> = self.rnat.keys().filter_map(|k| k.ok()).collect();
        for k in &rkeys {
            match self.rnat.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_RNAT)(e)),
            }
        }
        Ok(keys.len())
    }

    /// Reverse-NAT entries (reply tuple → frontend).
    pub fn rev_nat_len(&self) -> usize {
        self.rnat.keys().filter(|k| k.is_ok()).count()
    }

    /// Session-affinity entries.
    pub fn affinity_len(&self) -> usize {
        self.affinity.keys().filter(|k| k.is_ok()).count()
    }

    /// Runs the program once on `packet` (an Ethernet frame) with
    /// `BPF_PROG_TEST_RUN`; returns the tc verdict and the packet after it.
    pub fn test_run(&self, packet: &[u8]) -> Result<(u32, Vec<u8>), DatapathError> {
        let (verdict, out, _) = self.run_test(packet, 1)?;
        Ok((verdict, out))
    }

    /// Runs the program `repeat` times on `packet` with
    /// `BPF_PROG_TEST_RUN`; returns the tc verdict and the kernel's average
    /// time per run (the program's own per-packet cost, for benchmarks).
    pub fn test_run_repeat(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), DatapathError> {
        let (verdict, _, took) = self.run_test(packet, repeat)?;
        Ok((verdict, took))
    }

    /// `BPF_PROG_TEST_RUN` of the tc program: verdict, the packet after the
    /// last run, and the kernel's average time per run.
    fn run_test(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, std::time::Duration), DatapathError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(DatapathError::Missing(PROGRAM_NAME))?
            .try_into()?;
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat.max(1);
        let r = prog.test_run(opts)?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration))
    }

    /// Removes every pin (maps and links) under `pin_dir`: the datapath is
    /// gone once the last process holding it exits.
    pub fn remove_pins(pin_dir: &Path) -> Result<(), DatapathError> {
        match fs::remove_dir_all(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Io {
                what: format!("removing {}", pin_dir.display()),
                source,
            }),
        }
    }
}

fn ep_key(a: IpAddr) -> EpKey {
    let (addr, family) = addr_bytes(a);
    EpKey {
        addr,
        family,
        pad: [0; 3],
    }
}

/// Index of a device in this network namespace.
pub(crate) fn if_index(ifname: &str) -> Result<u32, DatapathError> {
    let c = std::ffi::CString::new(ifname).map_err(|_| DatapathError::Io {
        what: format!("device name {ifname:?}"),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: c is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(DatapathError::Io {
            what: format!("device {ifname}"),
            source: io::Error::last_os_error(),
        });
    }
    Ok(i)
}

/// Name of a device in this network namespace.
fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let c = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(c.to_string_lossy().into_owned())
}

/// Hands out the lowest free id in `1..=max` in O(log n): ids below the
/// high-water mark that were released wait in `free`.
#[derive(Debug, Default)]
struct IdAllocator {
    max: u32,
    high: u32,
    free: BTreeSet<u32>,
}

impl IdAllocator {
    fn new(max: u32) -> Self {
        IdAllocator {
            max,
            high: 0,
            free: BTreeSet::new(),
        }
    }

    /// Rebuilds the allocator from ids already in use (restore).
    fn with_used(max: u32, used: impl Iterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.collect();
        let high = used.last().copied().unwrap_or(0);
        let free = (1..high).filter(|i| !used.contains(i)).collect();
        IdAllocator { max, high, free }
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        if self.high >= self.max {
            return None;
        }
        self.high += 1;
        Some(self.high)
    }

    fn release(&mut self, id: u32) {
        if id == self.high {
            self.high -= 1;
            // Trailing free ids fold back into the high-water mark.
            while self.high > 0 && self.free.remove(&self.high) {
                self.high -= 1;
            }
        } else if id > 0 && id < self.high {
            self.free.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IdAllocator;

    #[test]
    fn ids_lowest_free_first() {
        let mut a = IdAllocator::new(3);
        assert_eq!(
            (a.alloc(), a.alloc(), a.alloc(), a.alloc()),
            (Some(1), Some(2), Some(3), None)
        );
        a.release(2);
        assert_eq!(a.alloc(), Some(2));
        a.release(3);
        a.release(2);
        assert_eq!(a.alloc(), Some(2));
        assert_eq!(a.alloc(), Some(3));

        let mut r = IdAllocator::with_used(10, [2, 4].into_iter());
        assert_eq!(
            (r.alloc(), r.alloc(), r.alloc()),
            (Some(1), Some(3), Some(5))
        );
        r.release(5);
        r.release(4);
        r.release(3);
        assert_eq!(r.alloc(), Some(3));
    }
}
