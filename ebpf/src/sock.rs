//! Socket LB (Cilium's `--enable-socket-lb`): `bpf/sock.c`'s cgroup
//! `connect4/6`, `sendmsg4/6`, `recvmsg4/6` and `getpeername4/6` programs
//! translate service frontends to backends for the processes of a cgroup
//! (by default every process under the cgroup v2 root), so processes in the
//! host's network namespace reach ClusterIPs and the node's NodePorts, and
//! pods' connections (Cilium's default with kube-proxy replacement) go to
//! their backend as they are, the tc program only forwarding them. They
//! read the service maps of [`crate::Datapath`] through their pins.
//!
//! Links are pinned under `<pin dir>/sock-links/`, so translation survives an
//! agent restart like the tc program does; a new agent swaps them without a
//! window (the new links are attached before the old pins go).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfLoader};

use crate::DatapathConfig;
use crate::maps::MAP_MAGLEV;

/// The compiled object (see build.rs).
pub static SOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));

/// Cilium's default `--cgroup-root`.
pub const DEFAULT_CGROUP_ROOT: &str = "/run/cilium/cgroupv2";

/// The programs in the object (their hook comes from their ELF section).
pub const SOCK_PROGRAMS: [&str; 8] = [
    "membrane_sock_connect4",
    "membrane_sock_sendmsg4",
    "membrane_sock_recvmsg4",
    "membrane_sock_getpeername4",
    "membrane_sock_connect6",
    "membrane_sock_sendmsg6",
    "membrane_sock_recvmsg6",
    "membrane_sock_getpeername6",
];

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum SockLbError {
    #[error("--cgroup-root {path}: {why}")]
    CgroupRoot { path: PathBuf, why: String },
    #[error("loading the socket LB object (needs root or CAP_BPF + CAP_NET_ADMIN): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("socket LB program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("socket LB object has no {0}")]
    Missing(&'static str),
}

/// The loaded and attached socket LB programs.
pub struct SockLb {
    _ebpf: Ebpf,
    cgroup: PathBuf,
    links: Vec<FdLink>,
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// Makes sure `path` is on cgroup v2, mounting the hierarchy there (as
/// Cilium does for its `--cgroup-root`) when it is a missing or empty
/// directory outside any cgroup v2 mount.
pub fn ensure_cgroup_root(path: &Path) -> Result<(), SockLbError> {
    if path.exists() && is_cgroup2(path) {
        return Ok(());
    }
    let err = |why: String| SockLbError::CgroupRoot {
        path: path.to_path_buf(),
        why,
    };
    if path.exists()
        && fs::read_dir(path)
            .map_err(|e| err(e.to_string()))?
            .next()
            .is_some()
    {
        return Err(err(
            "not a cgroup v2 directory, and not empty (cannot mount cgroup2 there)".into(),
        ));
    }
    fs::create_dir_all(path).map_err(|e| err(format!("creating it: {e}")))?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err("path has a NUL byte".into()))?;
    // SAFETY: all pointers are NUL-terminated strings living across the call.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(err(format!(
            "mounting cgroup2: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

impl SockLb {
    /// Loads the programs with the maps [`crate::Datapath::load`] pinned in
    /// `cfg.pin_dir` (load that first, with the same `cfg`) and attaches
    /// them to the cgroup v2 directory `cgroup` (made a cgroup v2 mount if
    /// needed, see [`ensure_cgroup_root`]).
    pub fn attach(cfg: &DatapathConfig, cgroup: &Path) -> Result<Self, SockLbError> {
        ensure_cgroup_root(cgroup)?;
        let m = cfg.maglev.m();
        let want = m.saturating_mul(cfg.max_services.saturating_add(1));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .map_max_entries(MAP_MAGLEV, want)
            .override_global("MAGLEV_M", &m, true)
            .override_global("HASH_SEED", &cfg.flow_hash_seed, true)
            .override_global("HOST_NETNS_COOKIE", &own_netns_cookie(), true)
            .load(SOCK_OBJECT)?;
        let cg = fs::File::open(cgroup).map_err(|source| SockLbError::Io {
            what: format!("opening cgroup {}", cgroup.display()),
            source,
        })?;
        let dir = link_dir(&cfg.pin_dir, cgroup);
        fs::create_dir_all(&dir).map_err(|source| SockLbError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut links = Vec::new();
        for name in SOCK_PROGRAMS {
            let perr = |source| SockLbError::Program { name, source };
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(SockLbError::Missing(name))?
                .try_into()
                .map_err(perr)?;
            prog.load().map_err(perr)?;
            // A BPF link (the kernel wants no flags for those) always
            // coexists with others: the old instance's link (if pinned)
            // keeps translating until its pin is replaced below, and a
            // frontend it already translated is a backend the new one
            // leaves alone.
            let id = prog.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
            let link = prog.take_link(id).map_err(perr)?;
            let fd_link: FdLink = link.try_into().map_err(|e| SockLbError::Io {
                what: format!("link of {name}"),
                source: io::Error::other(format!("{e}")),
            })?;
            let pin = dir.join(name);
            // bpffs refuses names with dots.
            let tmp = dir.join(format!("{name}_new"));
            let _ = fs::remove_file(&tmp);
            let pinned = fd_link.pin(&tmp).map_err(|e| SockLbError::Io {
                what: format!("pinning link at {}", tmp.display()),
                source: io::Error::other(e.to_string()),
            })?;
            // Replacing the old pin drops the old link (its last reference).
            fs::rename(&tmp, &pin).map_err(|source| SockLbError::Io {
                what: format!("replacing {}", pin.display()),
                source,
            })?;
            links.push(FdLink::from(pinned));
        }
        tracing::info!(cgroup = %cgroup.display(), "socket LB attached");
        Ok(SockLb {
            _ebpf: ebpf,
            cgroup: cgroup.to_path_buf(),
            links,
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Number of attached programs.
    pub fn attached(&self) -> usize {
        self.links.len()
    }

    /// Detaches the programs from `cgroup` for good (removes their pins).
    pub fn remove_pins(pin_dir: &Path, cgroup: &Path) -> Result<(), SockLbError> {
        let dir = link_dir(pin_dir, cgroup);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SockLbError::Io {
                what: format!("removing {}", dir.display()),
                source,
            }),
        }
    }
}

/// Cookie of the caller's network namespace (the node's, for the agent),
/// which the programs compare against to tell the node's processes from
/// pods; 0 (matches no namespace) when the kernel cannot say (< 5.14).
fn own_netns_cookie() -> u64 {
    // SAFETY: plain socket/getsockopt/close on a descriptor we own, into a
    // u64 whose size we pass.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return 0;
        }
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            tracing::warn!(
                error = %err,
                "no SO_NETNS_COOKIE: the socket LB treats every process as a pod's"
            );
            return 0;
        }
        cookie
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc crate version.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Where the links for `cgroup` are pinned: one directory per cgroup.
fn link_dir(pin_dir: &Path, cgroup: &Path) -> PathBuf {
    let name: String = cgroup
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c == '/' || c == '.' { '_' } else { c })
        .collect();
    pin_dir.join("sock-links").join(if name.is_empty() {
        "root".to_string()
    } else {
        name
    })
}
