//! Finds, starts, restarts and stops the Envoy process.
//!
//! Envoy is started with `PR_SET_PDEATHSIG` so the kernel kills it if
//! Membrane dies without running its shutdown path; together with the
//! explicit stop on shutdown no orphan Envoy is ever left behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::bootstrap::{ADMIN_TCP_LISTENER, BootstrapParams, XdsProtocol, bootstrap};

#[derive(Debug, thiserror::Error)]
pub enum EnvoyError {
    #[error(
        "no Envoy binary found (tried --envoy-bin, $MEMBRANE_ENVOY, .venv/bin/envoy and PATH); run the setup command from README.md"
    )]
    NotFound,
    #[error("Envoy binary {0} does not exist")]
    Missing(PathBuf),
    /// The run directory, bootstrap file, admin socket or log file.
    #[error("preparing Envoy's files ({path}): {source}")]
    Files {
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
    /// Holds the bootstrap, the admin socket and Envoy's log.
    pub work_dir: PathBuf,
    pub node_id: String,
    pub xds_socket: PathBuf,
    /// Also expose admin on `127.0.0.1:<port>` (0 picks a free port); the
    /// bound address is reported in [`EnvoyState::admin_address`].
    pub admin_tcp_port: Option<u16>,
    pub protocol: XdsProtocol,
    pub concurrency: u16,
    pub log_level: String,
}

impl EnvoyOptions {
    /// Envoy's admin interface (a unix socket in the run directory).
    pub fn admin_socket(&self) -> PathBuf {
        self.work_dir.join("envoy-admin.sock")
    }
}

/// What `membrane status` shows about Envoy.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct EnvoyState {
    pub bin: String,
    /// The Envoy process exists.
    pub running: bool,
    /// Envoy answers `GET /ready` on its admin socket with 200 (it is
    /// initialized and serving); false whenever it is down or starting.
    pub ready: bool,
    pub pid: Option<u32>,
    /// How many times Envoy exited and was started again.
    pub restarts: u32,
    /// Failed start attempts in a row (0 once Envoy is up).
    pub start_failures: u32,
    /// The TCP admin address, when `--envoy-admin-port` asked for one.
    pub admin_address: Option<String>,
    /// Envoy's admin interface (unix socket).
    pub admin_socket: String,
    pub last_exit: Option<String>,
    /// Why the latest start attempt failed, while Envoy is down.
    pub last_error: Option<String>,
    pub log_file: String,
}

/// Shortest and longest wait before starting Envoy again.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs Envoy until `shutdown` fires. Never gives up: every failed start and
/// every exit is logged with its cause and followed by another attempt after
/// a capped exponential backoff, which resets once Envoy has been ready.
pub async fn supervise(
    opts: EnvoyOptions,
    state: watch::Sender<EnvoyState>,
    shutdown: CancellationToken,
) {
    let bootstrap_path = opts.work_dir.join("envoy-bootstrap.json");
    let admin_socket = opts.admin_socket();
    let log_file = opts.work_dir.join("envoy.log");
    let bootstrap = bootstrap(&BootstrapParams {
        node_id: &opts.node_id,
        node_cluster: "membrane",
        xds_socket: &opts.xds_socket,
        admin_socket: &admin_socket,
        admin_tcp_port: opts.admin_tcp_port,
        protocol: opts.protocol,
    })
    .to_string();
    state.send_modify(|s| {
        s.bin = opts.bin.display().to_string();
        s.log_file = log_file.display().to_string();
        s.admin_socket = admin_socket.display().to_string();
    });

    let mut backoff = BACKOFF_MIN;
    loop {
        // Written before every start: a run directory removed or full while
        // Envoy ran must not stop the next start from succeeding later.
        let started = prepare(&opts, &bootstrap_path, &bootstrap, &admin_socket)
            .and_then(|()| spawn(&opts, &bootstrap_path, &log_file));
        let mut child = match started {
            Ok(child) => child,
            Err(e) => {
                let failures = state.borrow().start_failures + 1;
                error!(error = %e, attempt = failures, retry_in_ms = backoff.as_millis() as u64, "envoy could not be started; retrying");
                state.send_modify(|s| {
                    s.running = false;
                    s.ready = false;
                    s.pid = None;
                    s.start_failures = failures;
                    s.last_error = Some(e.to_string());
                });
                if !pause(&shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let pid = child.id();
        info!(pid, bin = %opts.bin.display(), "envoy started");
        state.send_modify(|s| {
            s.running = true;
            s.ready = false;
            s.pid = pid;
            s.start_failures = 0;
            s.last_error = None;
            s.admin_address = None;
        });
        let exit = loop {
            // Quick probes until ready, so readiness is reported promptly.
            let every = if state.borrow().ready { 500 } else { 50 };
            tokio::select! {
                exit = child.wait() => break exit,
                _ = tokio::time::sleep(Duration::from_millis(every)) => {
                    let ready = admin_get(&admin_socket, "/ready").await.is_ok_and(|(code, _)| code == 200);
                    if ready && !state.borrow().ready {
                        info!(pid, "envoy ready");
                        // A good run: the next failure starts the backoff over.
                        backoff = BACKOFF_MIN;
                        state.send_modify(|s| s.ready = true);
                    }
                    if ready && opts.admin_tcp_port.is_some() && state.borrow().admin_address.is_none() {
                        let tcp = admin_tcp_address(&admin_socket).await;
                        state.send_modify(|s| s.admin_address = tcp);
                    } else if !ready && state.borrow().ready {
                        warn!(pid, "envoy admin /ready stopped answering 200");
                        state.send_modify(|s| s.ready = false);
                    }
                }
                _ = shutdown.cancelled() => {
                    stop(&mut child).await;
                    state.send_modify(|s| { s.running = false; s.ready = false; s.pid = None; });
                    return;
                }
            }
        };
        let why = match exit {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        };
        error!(pid, %why, log = %log_file.display(), retry_in_ms = backoff.as_millis() as u64, "envoy exited; restarting");
        state.send_modify(|s| {
            s.running = false;
            s.ready = false;
            s.pid = None;
            s.restarts += 1;
            s.last_exit = Some(why);
        });
        if !pause(&shutdown, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Sleep for `d`; false when shutdown came first.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// Run directory, bootstrap file, and no stale admin socket (Envoy cannot
/// bind a path that exists, and a killed Envoy leaves its socket behind).
fn prepare(
    opts: &EnvoyOptions,
    bootstrap_path: &Path,
    bootstrap: &str,
    admin_socket: &Path,
) -> Result<(), EnvoyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EnvoyError::Files { path, source }
    };
    std::fs::create_dir_all(&opts.work_dir).map_err(io(&opts.work_dir))?;
    std::fs::write(bootstrap_path, bootstrap).map_err(io(bootstrap_path))?;
    match std::fs::remove_file(admin_socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(admin_socket)(e)),
        _ => Ok(()),
    }
}

fn spawn(opts: &EnvoyOptions, bootstrap: &Path, log_file: &Path) -> Result<Child, EnvoyError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|source| EnvoyError::Files {
            path: log_file.to_path_buf(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| EnvoyError::Files {
        path: log_file.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new(&opts.bin);
    cmd.arg("-c")
        .arg(bootstrap)
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

/// One `GET` on Envoy's admin socket: (status, body). Bounded by a timeout
/// so a wedged Envoy cannot stall supervision.
pub async fn admin_get(socket: &Path, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::UnixStream::connect(socket).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        // Admin answers are small except dumps; cap what is read.
        (&mut s).take(16 << 20).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "envoy admin timed out")
        })??;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

/// The payload of a chunked HTTP/1.1 body (admin answers JSON that way).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// The address the TCP admin listener is bound to (its port may be 0 in
/// the bootstrap), from admin `/listeners`.
async fn admin_tcp_address(admin_socket: &Path) -> Option<String> {
    let (code, body) = admin_get(admin_socket, "/listeners?format=json")
        .await
        .ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == ADMIN_TCP_LISTENER)
        .and_then(|l| {
            let a = &l["local_address"]["socket_address"];
            Some(format!(
                "{}:{}",
                a["address"].as_str()?,
                a["port_value"].as_u64()?
            ))
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

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn dechunks_bodies() {
        assert_eq!(dechunk("5\r\nLIVE\n\r\n0\r\n\r\n"), "LIVE\n");
        assert_eq!(dechunk("3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"), "abcde");
        assert_eq!(dechunk("zz\r\n"), "");
    }
}
