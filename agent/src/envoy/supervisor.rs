//! Finds, starts, restarts and stops the Envoy process.
//!
//! Envoy is started with `PR_SET_PDEATHSIG` so the kernel kills it if
//! Membrane dies without running its shutdown path; together with the
//! explicit stop on shutdown no orphan Envoy is ever left behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::bootstrap::{BootstrapParams, XdsProtocol, bootstrap};

#[derive(Debug, thiserror::Error)]
pub enum EnvoyError {
    #[error(
        "no Envoy binary found (tried --envoy-bin, $MEMBRANE_ENVOY, .venv/bin/envoy and PATH); run the setup command from README.md"
    )]
    NotFound,
    #[error("Envoy binary {0} does not exist")]
    Missing(PathBuf),
    #[error("writing Envoy bootstrap {path}: {source}")]
    Bootstrap {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting Envoy {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
}

/// Locate Envoy: an explicit path, then `$MEMBRANE_ENVOY`, then `.venv/bin/envoy`
/// in the current directory or any parent, then `PATH`.
pub fn find_envoy(explicit: Option<&Path>) -> Result<PathBuf, EnvoyError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(EnvoyError::Missing(p.to_path_buf()))
        };
    }
    if let Some(p) = std::env::var_os("MEMBRANE_ENVOY").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(EnvoyError::Missing(p))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    // A binary built into <repo>/target or an external CARGO_TARGET_DIR still
    // finds the checkout's venv through the source tree it was built from.
    roots.extend(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(Path::to_path_buf),
    );
    for root in roots {
        let candidate = root.join(".venv/bin/envoy");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("envoy");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(EnvoyError::NotFound)
}

/// How to run Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub bin: PathBuf,
    /// Holds the bootstrap, the admin address file and Envoy's log.
    pub work_dir: PathBuf,
    pub node_id: String,
    pub xds_socket: PathBuf,
    /// 0 picks a free port; the chosen address is reported in [`EnvoyState`].
    pub admin_port: u16,
    pub protocol: XdsProtocol,
    pub concurrency: u16,
    pub log_level: String,
}

/// What `membrane status` shows about Envoy.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct EnvoyState {
    pub bin: String,
    pub running: bool,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub admin_address: Option<String>,
    pub last_exit: Option<String>,
    pub log_file: String,
}

/// Runs Envoy until `shutdown` fires, restarting it with backoff when it exits.
pub async fn supervise(
    opts: EnvoyOptions,
    state: watch::Sender<EnvoyState>,
    shutdown: CancellationToken,
) -> Result<(), EnvoyError> {
    std::fs::create_dir_all(&opts.work_dir).map_err(|source| EnvoyError::Bootstrap {
        path: opts.work_dir.clone(),
        source,
    })?;
    let bootstrap_path = opts.work_dir.join("envoy-bootstrap.json");
    let bootstrap = bootstrap(&BootstrapParams {
        node_id: &opts.node_id,
        node_cluster: "membrane",
        xds_socket: &opts.xds_socket,
        admin_port: opts.admin_port,
        protocol: opts.protocol,
    });
    std::fs::write(&bootstrap_path, bootstrap.to_string()).map_err(|source| {
        EnvoyError::Bootstrap {
            path: bootstrap_path.clone(),
            source,
        }
    })?;
    let log_file = opts.work_dir.join("envoy.log");
    state.send_modify(|s| {
        s.bin = opts.bin.display().to_string();
        s.log_file = log_file.display().to_string();
    });

    let mut backoff = Duration::from_millis(200);
    loop {
        let admin_file = opts.work_dir.join("envoy-admin.addr");
        let _ = std::fs::remove_file(&admin_file);
        let started = Instant::now();
        let mut child = spawn(&opts, &bootstrap_path, &admin_file, &log_file)?;
        let pid = child.id();
        info!(pid, bin = %opts.bin.display(), "envoy started");
        state.send_modify(|s| {
            s.running = true;
            s.pid = pid;
            s.admin_address = None;
        });
        let admin_watch = watch_admin_address(admin_file.clone(), state.clone());

        tokio::select! {
            exit = child.wait() => {
                admin_watch.abort();
                let why = match exit {
                    Ok(status) => status.to_string(),
                    Err(e) => e.to_string(),
                };
                warn!(%why, log = %log_file.display(), "envoy exited; restarting");
                state.send_modify(|s| {
                    s.running = false;
                    s.pid = None;
                    s.restarts += 1;
                    s.last_exit = Some(why);
                });
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(200);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            _ = shutdown.cancelled() => {
                admin_watch.abort();
                stop(&mut child).await;
                state.send_modify(|s| { s.running = false; s.pid = None; });
                return Ok(());
            }
        }
    }
}

fn spawn(
    opts: &EnvoyOptions,
    bootstrap: &Path,
    admin_file: &Path,
    log_file: &Path,
) -> Result<Child, EnvoyError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|source| EnvoyError::Bootstrap {
            path: log_file.to_path_buf(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| EnvoyError::Bootstrap {
        path: log_file.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new(&opts.bin);
    cmd.arg("-c")
        .arg(bootstrap)
        .arg("--admin-address-path")
        .arg(admin_file)
        .arg("--disable-hot-restart")
        .arg("--concurrency")
        .arg(opts.concurrency.to_string())
        .arg("--log-level")
        .arg(&opts.log_level)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| EnvoyError::Spawn {
        bin: opts.bin.clone(),
        source,
    })
}

/// SIGTERM, then SIGKILL if Envoy has not exited within five seconds.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling a child we own by its PID.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            info!(pid, "envoy stopped");
            return;
        }
    }
    let _ = child.kill().await;
}

/// Envoy writes its admin address once it listens; report it when it appears.
fn watch_admin_address(
    file: PathBuf,
    state: watch::Sender<EnvoyState>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Bounded: Envoy takes well under a second to start; give it 60 s.
        for _ in 0..600 {
            if let Ok(text) = tokio::fs::read_to_string(&file).await {
                let addr = text.trim().to_owned();
                if !addr.is_empty() {
                    state.send_modify(|s| s.admin_address = Some(addr));
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
