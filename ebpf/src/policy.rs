//! L3/L4 policy enforcement: `bpf/policy.c` on both hooks of a pod's
//! host-side device, its ipcache, per-endpoint policy entries (an LPM trie
//! keyed by endpoint, peer identity, direction, protocol and port prefix),
//! conntrack for replies, and verdict counters.
//!
//! [`PolicyDatapath`] loads the object with aya, pins maps and links under
//! the pin directory and syncs the maps from [`membrane_policy`]'s compiled
//! state, writing only differences.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
use membrane_policy::identity::IpCache;
use membrane_policy::{Direction, EndpointPolicy};

/// The compiled object (see build.rs).
pub static POLICY_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy.o"));

/// tc ingress of the host-side device: the pod's egress.
pub const PROG_FROM_POD: &str = "membrane_policy_from_pod";
/// tc egress of the host-side device: the pod's ingress.
pub const PROG_TO_POD: &str = "membrane_policy_to_pod";

pub const MAP_IPCACHE: &str = "pol_ipcache";
pub const MAP_POLICY: &str = "pol_policy";
pub const MAP_ENDPOINTS: &str = "pol_endpoints";
pub const MAP_CT: &str = "pol_ct";
pub const MAP_STATS: &str = "pol_stats";

const DIR_INGRESS: u8 = 0;
const DIR_EGRESS: u8 = 1;
const F_INGRESS_DEFAULT_DENY: u32 = 1;
const F_EGRESS_DEFAULT_DENY: u32 = 2;
const F_HAS_POLICY: u32 = 4;
/// (endpoint, identity, direction) bits always matched in full.
const KEY_FIXED_BITS: u32 = 72;

/// `struct pol_ipcache_key` without its prefix length.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct IpcacheKey {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    pub pad: u32,
}

/// `struct pol_key` without its prefix length; multi-byte fields are in
/// network byte order so the trie's prefixes run over them in order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PolicyKey {
    pub ep_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub proto: u8,
    pub dport: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyValue {
    pub deny: u8,
    pub pad: [u8; 7],
    pub packets: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointValue {
    pub ep_id: u32,
    pub identity: u32,
    pub flags: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub ep_id: u32,
    pub proto: u8,
    pub family: u8,
    pub direction: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtValue {
    pub last_seen: u64,
    pub flags: u32,
    pub pad: u32,
}

const _: () = assert!(size_of::<IpcacheKey>() == 20);
const _: () = assert!(size_of::<PolicyKey>() == 12);
const _: () = assert!(size_of::<PolicyValue>() == 16);
const _: () = assert!(size_of::<EndpointValue>() == 16);
const _: () = assert!(size_of::<CtKey>() == 44);
const _: () = assert!(size_of::<CtValue>() == 16);

// SAFETY: plain #[repr(C)] data without padding holes or pointers.
unsafe impl aya::Pod for IpcacheKey {}
unsafe impl aya::Pod for IpcacheValue {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for EndpointValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}

/// Verdict counters and drop reasons (indices of `pol_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyStat {
    AllowPolicy = 0,
    AllowReply = 1,
    AllowNotEnforced = 2,
    AllowNeighborDiscovery = 3,
    /// An explicit deny rule (Cilium drop reason 181, "Policy denied by denylist").
    DropPolicyDeny = 4,
    /// No rule allows it (Cilium drop reason 133, "Policy denied").
    DropDefaultDeny = 5,
    DropMalformed = 6,
    FragmentPassed = 7,
    ConntrackCreated = 8,
    /// An ICMP error about a flow the policy allowed (e.g. packet too big).
    AllowRelated = 9,
}

impl PolicyStat {
    pub const ALL: [PolicyStat; 10] = [
        PolicyStat::AllowPolicy,
        PolicyStat::AllowReply,
        PolicyStat::AllowNotEnforced,
        PolicyStat::AllowNeighborDiscovery,
        PolicyStat::DropPolicyDeny,
        PolicyStat::DropDefaultDeny,
        PolicyStat::DropMalformed,
        PolicyStat::FragmentPassed,
        PolicyStat::ConntrackCreated,
        PolicyStat::AllowRelated,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyDatapathError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("loading the policy eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("policy program: {0}")]
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
    #[error("policy object has no {0}")]
    Missing(&'static str),
    #[error("no interface named {0} in this network namespace")]
    NoInterface(String),
    #[error(transparent)]
    Bpffs(#[from] crate::DatapathError),
    #[error(
        "endpoint {ep_id}: its policy needs {need} map entries, more than the {max} allowed per endpoint; previous policy kept"
    )]
    TooManyEntries { ep_id: u32, need: usize, max: usize },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> PolicyDatapathError {
    move |source| PolicyDatapathError::Map { map, source }
}

/// Settings of the policy datapath.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// A TCP flow admits replies this long after its last packet.
    pub ct_timeout_tcp: std::time::Duration,
    /// Any other flow (UDP, SCTP, ICMP echo) likewise.
    pub ct_timeout_other: std::time::Duration,
    /// Entries one endpoint may hold (Cilium: 16,384 by default, 65,536
    /// at most); a policy needing more is refused and the endpoint keeps
    /// its previous entries.
    pub max_entries_per_endpoint: usize,
}

impl Default for PolicyConfig {
    /// Cilium's conntrack lifetimes: 6 h for TCP, 60 s otherwise.
    fn default() -> Self {
        PolicyConfig {
            ct_timeout_tcp: std::time::Duration::from_secs(6 * 3600),
            ct_timeout_other: std::time::Duration::from_secs(60),
            max_entries_per_endpoint: 16_384,
        }
    }
}

/// What one endpoint sync wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySyncReport {
    pub entries_written: usize,
    pub entries_removed: usize,
}

type EntryKey = (u32, PolicyKey);

/// The loaded policy datapath and the userspace mirror of its maps.
pub struct PolicyDatapath {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    endpoints: HashMap<MapData, u32, EndpointValue>,
    ct: HashMap<MapData, CtKey, CtValue>,
    stats: PerCpuArray<MapData, u64>,
    links: BTreeMap<String, (FdLink, FdLink)>,
    ipcache_mirror: BTreeMap<(u32, IpcacheKey), u32>,
    /// ep_id → (prefix length, key) → deny.
    entries: BTreeMap<u32, BTreeMap<EntryKey, bool>>,
    max_entries: usize,
}

impl PolicyDatapath {
    /// Loads the programs, creating maps or reusing those pinned in
    /// `pin_dir` (then the ipcache mirror is restored from them).
    pub fn load(pin_dir: &Path) -> Result<Self, PolicyDatapathError> {
        Self::load_with(pin_dir, &PolicyConfig::default())
    }

    /// [`PolicyDatapath::load`] with explicit settings.
    pub fn load_with(pin_dir: &Path, cfg: &PolicyConfig) -> Result<Self, PolicyDatapathError> {
        crate::check_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir).map_err(|source| PolicyDatapathError::Io {
            what: format!("creating {}", pin_dir.display()),
            source,
        })?;
        let tcp_ns = cfg.ct_timeout_tcp.as_nanos() as u64;
        let other_ns = cfg.ct_timeout_other.as_nanos() as u64;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global("CT_TIMEOUT_TCP_NS", &tcp_ns, true)
            .override_global("CT_TIMEOUT_OTHER_NS", &other_ns, true)
            .load(POLICY_OBJECT)?;
        for name in [PROG_FROM_POD, PROG_TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(PolicyDatapathError::Missing(name))?
                .try_into()?;
            prog.load()?;
        }
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(PolicyDatapathError::Missing(name))
        };
        let ipcache = LpmTrie::try_from(take(MAP_IPCACHE)?).map_err(map_err(MAP_IPCACHE))?;
        let policy = LpmTrie::try_from(take(MAP_POLICY)?).map_err(map_err(MAP_POLICY))?;
        let endpoints = HashMap::try_from(take(MAP_ENDPOINTS)?).map_err(map_err(MAP_ENDPOINTS))?;
        let ct = HashMap::try_from(take(MAP_CT)?).map_err(map_err(MAP_CT))?;
        let stats = PerCpuArray::try_from(take(MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let mut dp = PolicyDatapath {
            pin_dir: pin_dir.to_path_buf(),
            ebpf,
            ipcache,
            policy,
            endpoints,
            ct,
            stats,
            links: BTreeMap::new(),
            ipcache_mirror: BTreeMap::new(),
            entries: BTreeMap::new(),
            max_entries: cfg.max_entries_per_endpoint,
        };
        dp.restore()?;
        Ok(dp)
    }

    fn restore(&mut self) -> Result<(), PolicyDatapathError> {
        for kv in self.ipcache.iter() {
            let (k, v) = kv.map_err(map_err(MAP_IPCACHE))?;
            self.ipcache_mirror
                .insert((k.prefix_len(), k.data()), v.identity);
        }
        for kv in self.policy.iter() {
            let (k, v) = kv.map_err(map_err(MAP_POLICY))?;
            let d = k.data();
            self.entries
                .entry(u32::from_be(d.ep_id))
                .or_default()
                .insert((k.prefix_len(), d), v.deny != 0);
        }
        Ok(())
    }

    fn link_pin(&self, ifname: &str, hook: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{ifname}-policy-{hook}"))
    }

    fn attach_one(
        &mut self,
        ifname: &str,
        prog_name: &'static str,
        hook: TcAttachType,
    ) -> Result<FdLink, PolicyDatapathError> {
        let pin = self.link_pin(
            ifname,
            if hook == TcAttachType::Ingress {
                "ingress"
            } else {
                "egress"
            },
        );
        let link_err = |source| PolicyDatapathError::Link {
            ifname: ifname.to_string(),
            source,
        };
        let existing = match PinnedLink::from_pin(&pin) {
            Ok(l) => Some(l),
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(link_err(e)),
        };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog_name)
            .ok_or(PolicyDatapathError::Missing(prog_name))?
            .try_into()?;
        if let Some(old) = existing {
            let link: SchedClassifierLink = FdLink::from(old).try_into().map_err(link_err)?;
            let id = prog.attach_to_link(link)?;
            let link = prog.take_link(id)?;
            return FdLink::try_from(link).map_err(link_err);
        }
        // Policy runs before the load balancer at ingress: the load
        // balancer's redirect ends the hook, and a drop must come first.
        let id =
            prog.attach_with_options(ifname, hook, TcAttachOptions::TcxOrder(LinkOrder::first()))?;
        let link = prog.take_link(id)?;
        let fd_link = FdLink::try_from(link).map_err(link_err)?;
        if let Some(dir) = pin.parent() {
            fs::create_dir_all(dir).map_err(|source| PolicyDatapathError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        }
        let pinned = fd_link.pin(&pin).map_err(|e| PolicyDatapathError::Io {
            what: format!("pinning link at {}: {e}", pin.display()),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(FdLink::from(pinned))
    }

    /// Attaches both programs to `ifname` (resolved in the calling
    /// thread's network namespace) and returns its ifindex, the key of
    /// [`PolicyDatapath::sync_endpoint`].
    pub fn attach(&mut self, ifname: &str) -> Result<u32, PolicyDatapathError> {
        let c = std::ffi::CString::new(ifname)
            .map_err(|_| PolicyDatapathError::NoInterface(ifname.into()))?;
        // SAFETY: c is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            return Err(PolicyDatapathError::NoInterface(ifname.into()));
        }
        let ing = self.attach_one(ifname, PROG_FROM_POD, TcAttachType::Ingress)?;
        let eg = self.attach_one(ifname, PROG_TO_POD, TcAttachType::Egress)?;
        tracing::info!(ifname, ifindex, "attached policy programs");
        self.links.insert(ifname.to_string(), (ing, eg));
        Ok(ifindex)
    }

    /// Detaches from `ifname` (removes the pinned links).
    pub fn detach(&mut self, ifname: &str) -> Result<(), PolicyDatapathError> {
        for hook in ["ingress", "egress"] {
            let pin = self.link_pin(ifname, hook);
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PolicyDatapathError::Io {
                        what: format!("removing {}", pin.display()),
                        source,
                    });
                }
            }
        }
        self.links.remove(ifname);
        Ok(())
    }

    /// Makes the kernel's ipcache equal to `cache`.
    pub fn sync_ipcache(&mut self, cache: &IpCache) -> Result<usize, PolicyDatapathError> {
        let mut want = BTreeMap::new();
        for (net, id) in &cache.entries {
            want.insert(ipcache_key(net.addr(), net.prefix_len()), *id);
        }
        let mut written = 0;
        for (key, id) in &want {
            if self.ipcache_mirror.get(key) != Some(id) {
                let v = IpcacheValue {
                    identity: *id,
                    pad: 0,
                };
                self.ipcache
                    .insert(&Key::new(key.0, key.1), v, 0)
                    .map_err(map_err(MAP_IPCACHE))?;
                written += 1;
            }
        }
        let stale: Vec<_> = self
            .ipcache_mirror
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            match self.ipcache.remove(&Key::new(key.0, key.1)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_IPCACHE)(e)),
            }
            written += 1;
        }
        self.ipcache_mirror = want;
        Ok(written)
    }

    /// Removes the host entries (/32, /128) of `addrs` from the ipcache:
    /// a deleted endpoint's addresses stop carrying its identity at once,
    /// before the next full sync (which would drop them too).
    pub fn remove_ipcache_hosts(&mut self, addrs: &[IpAddr]) -> Result<usize, PolicyDatapathError> {
        let mut removed = 0;
        for a in addrs {
            let key = ipcache_key(*a, if a.is_ipv4() { 32 } else { 128 });
            if self.ipcache_mirror.remove(&key).is_none() {
                continue;
            }
            match self.ipcache.remove(&Key::new(key.0, key.1)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_IPCACHE)(e)),
            }
            removed += 1;
        }
        Ok(removed)
    }

    /// The kernel's ipcache, read back from the map: `addr/len` → identity.
    pub fn ipcache_entries(&self) -> Result<BTreeMap<String, u32>, PolicyDatapathError> {
        let mut out = BTreeMap::new();
        for kv in self.ipcache.iter() {
            let (k, v) = kv.map_err(map_err(MAP_IPCACHE))?;
            let d = k.data();
            let len = k.prefix_len().saturating_sub(32);
            let addr = match d.family {
                4 => IpAddr::from([d.addr[0], d.addr[1], d.addr[2], d.addr[3]]),
                _ => IpAddr::from(d.addr),
            };
            out.insert(format!("{addr}/{len}"), v.identity);
        }
        Ok(out)
    }

    /// Programs one endpoint behind device `ifindex`: its entries first
    /// (only differences), then its enforcement flags.
    pub fn sync_endpoint(
        &mut self,
        ifindex: u32,
        pol: &EndpointPolicy,
    ) -> Result<PolicySyncReport, PolicyDatapathError> {
        let mut want: BTreeMap<EntryKey, bool> = BTreeMap::new();
        for e in &pol.entries {
            let key = PolicyKey {
                ep_id: pol.endpoint_id.to_be(),
                identity: e.identity.to_be(),
                direction: match e.direction {
                    Direction::Ingress => DIR_INGRESS,
                    Direction::Egress => DIR_EGRESS,
                },
                proto: (e.l4 >> 16) as u8,
                dport: ((e.l4 & 0xffff) as u16).to_be(),
            };
            want.insert((KEY_FIXED_BITS + e.prefix_len as u32, key), e.deny);
        }
        if want.len() > self.max_entries {
            return Err(PolicyDatapathError::TooManyEntries {
                ep_id: pol.endpoint_id,
                need: want.len(),
                max: self.max_entries,
            });
        }
        let mut report = PolicySyncReport::default();
        let have = self.entries.remove(&pol.endpoint_id).unwrap_or_default();
        for (k, deny) in &want {
            if have.get(k) != Some(deny) {
                let v = PolicyValue {
                    deny: *deny as u8,
                    ..PolicyValue::default()
                };
                self.policy
                    .insert(&Key::new(k.0, k.1), v, 0)
                    .map_err(map_err(MAP_POLICY))?;
                report.entries_written += 1;
            }
        }
        let mut flags = 0;
        if pol.ingress_enforced {
            flags |= F_INGRESS_DEFAULT_DENY;
        }
        if pol.egress_enforced {
            flags |= F_EGRESS_DEFAULT_DENY;
        }
        // Without default deny in either direction and without a deny
        // entry every packet is allowed and no reply needs tracking: the
        // program skips such endpoints.
        if flags != 0 || want.values().any(|deny| *deny) {
            flags |= F_HAS_POLICY;
        }
        let ev = EndpointValue {
            ep_id: pol.endpoint_id,
            identity: pol.identity,
            flags,
            pad: 0,
        };
        self.endpoints
            .insert(ifindex, ev, 0)
            .map_err(map_err(MAP_ENDPOINTS))?;
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            match self.policy.remove(&Key::new(k.0, k.1)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_POLICY)(e)),
            }
            report.entries_removed += 1;
        }
        self.entries.insert(pol.endpoint_id, want);
        Ok(report)
    }

    /// Stops enforcing on `ifindex` and removes the endpoint's entries.
    pub fn remove_endpoint(&mut self, ifindex: u32, ep_id: u32) -> Result<(), PolicyDatapathError> {
        match self.endpoints.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(MAP_ENDPOINTS)(e)),
        }
        for k in self.entries.remove(&ep_id).unwrap_or_default().keys() {
            match self.policy.remove(&Key::new(k.0, k.1)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_POLICY)(e)),
            }
        }
        Ok(())
    }

    /// Policy entries in the kernel for `ep_id`.
    pub fn entry_count(&self, ep_id: u32) -> usize {
        self.entries.get(&ep_id).map_or(0, BTreeMap::len)
    }

    /// Packets counted on `ep_id`'s entries, per (prefix length, key).
    pub fn entry_packets(&self, ep_id: u32) -> BTreeMap<(u32, PolicyKey), u64> {
        let mut out = BTreeMap::new();
        for k in self
            .entries
            .get(&ep_id)
            .into_iter()
            .flat_map(BTreeMap::keys)
        {
            if let Ok(v) = self.policy.get(&Key::new(k.0, k.1), 0) {
                out.insert(*k, v.packets);
            }
        }
        out
    }

    /// Verdict counters summed over CPUs.
    pub fn stats(&self) -> Result<BTreeMap<PolicyStat, u64>, PolicyDatapathError> {
        let mut out = BTreeMap::new();
        for s in PolicyStat::ALL {
            let v = self.stats.get(&(s as u32), 0).map_err(map_err(MAP_STATS))?;
            out.insert(s, v.iter().sum());
        }
        Ok(out)
    }

    /// Live conntrack entries.
    pub fn conntrack_len(&self) -> usize {
        self.ct.keys().filter(|k| k.is_ok()).count()
    }

    /// Runs one program `repeat` times on `packet` (an Ethernet frame)
    /// with `BPF_PROG_TEST_RUN` (device: the namespace's loopback);
    /// returns the tc verdict and the kernel's average time per run.
    pub fn test_run(
        &self,
        from_pod: bool,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), PolicyDatapathError> {
        let name = if from_pod { PROG_FROM_POD } else { PROG_TO_POD };
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(PolicyDatapathError::Missing(name))?
            .try_into()?;
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat.max(1);
        let r = prog.test_run(opts)?;
        Ok((r.return_value as i32, r.duration))
    }

    /// Attached interfaces.
    pub fn attached(&self) -> BTreeSet<String> {
        self.links.keys().cloned().collect()
    }
}

/// The trie key of `addr/prefix_len` (the key's first 32 bits, family and
/// padding, are always matched).
fn ipcache_key(addr: IpAddr, prefix_len: u8) -> (u32, IpcacheKey) {
    let mut k = IpcacheKey::default();
    match addr {
        IpAddr::V4(a) => {
            k.addr[..4].copy_from_slice(&a.octets());
            k.family = 4;
        }
        IpAddr::V6(a) => {
            k.addr.copy_from_slice(&a.octets());
            k.family = 6;
        }
    }
    (32 + prefix_len as u32, k)
}
