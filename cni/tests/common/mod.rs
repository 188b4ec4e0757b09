//! Harness: a "node" network namespace with the endpoint manager serving
//! the CNI socket inside it (in this process, on a thread that entered the
//! namespace), "pod" namespaces, and the plugin binary run exactly as a
//! runtime runs it (environment + stdin).

#![allow(dead_code)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use membrane_endpoint::{Manager, NoHooks, Options};
use membrane_ipam::Cidr;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_membrane-cni");

/// True when the test can run; in CI a missing prerequisite fails.
pub fn prerequisites() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip {
        return true;
    }
    let why = format!("needs root ({root}) and iproute2 ({ip})");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI: {why}");
    }
    eprintln!("skipping: {why}");
    false
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A network namespace deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "mcni-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        Netns(name)
    }
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
    /// `ip -n NS args...`, checked.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.0.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }
    /// `ip -j -n NS args...` parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["-j", "-n", self.0.as_str()];
        a.extend_from_slice(args);
        let out = run("ip", &a);
        if out.trim().is_empty() {
            return json!([]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {out}"))
    }
    pub fn exec(&self, cmd: &[&str]) -> std::process::Output {
        let mut a = vec!["netns", "exec", self.0.as_str()];
        a.extend_from_slice(cmd);
        Command::new("ip").args(&a).output().expect("ip netns exec")
    }
    /// Interface names in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
    /// Global addresses of `dev` in the namespace.
    pub fn addrs(&self, dev: &str) -> Vec<String> {
        let v = self.ip_json(&["addr", "show"]);
        let mut out = Vec::new();
        for l in v.as_array().cloned().unwrap_or_default() {
            if l["ifname"] != dev {
                continue;
            }
            for a in l["addr_info"].as_array().cloned().unwrap_or_default() {
                if a["scope"] == "global" {
                    out.push(format!(
                        "{}/{}",
                        a["local"].as_str().unwrap_or(""),
                        a["prefixlen"]
                    ));
                }
            }
        }
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent's endpoint manager serving the CNI socket inside `node`.
pub struct Agent {
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    pub socket: PathBuf,
}

pub struct AgentSpec {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub cidrs: Vec<&'static str>,
    pub unreachable_routes: bool,
}

impl Agent {
    pub fn start(node: &Netns, spec: &AgentSpec) -> Agent {
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = std::fs::File::open(node.path()).expect("node netns");
        let opts = Options {
            state_dir: spec.state_dir.clone(),
            node_name: "node-a".into(),
            pod_cidrs: spec
                .cidrs
                .iter()
                .map(|c| c.parse::<Cidr>().expect("cidr"))
                .collect(),
            mtu: 1500,
            unreachable_routes: spec.unreachable_routes,
        };
        let socket = spec.socket.clone();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: this thread only; its runtime's threads inherit it.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let m = match Manager::start(opts, Arc::new(NoHooks)).await {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let serve = tokio::spawn({
                    let stop = stop.clone();
                    let socket = socket.clone();
                    async move { membrane_endpoint::serve(&socket, m, stop).await }
                });
                // Ready once the socket exists.
                for _ in 0..500 {
                    if socket.exists() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                let _ = tx.send(Ok(()));
                let _ = serve.await;
            });
            // Dropping the runtime aborts whatever was still running, like
            // a killed agent.
            rt.shutdown_background();
        });
        rx.recv().expect("agent thread").expect("agent start");
        Agent {
            shutdown,
            thread: Some(thread),
            socket: spec.socket.clone(),
        }
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.halt();
    }
}

pub fn conf(socket: &Path, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "membrane",
        "type": "membrane",
        "socket": socket.to_string_lossy(),
        "mtu": 1450,
    })
}

/// Output of one plugin run.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub json: Option<Value>,
    pub raw: String,
}

impl Out {
    /// The CNI error code, if the plugin failed.
    pub fn err_code(&self) -> Option<u64> {
        (self.code != 0).then(|| {
            self.json
                .as_ref()
                .and_then(|j| j["code"].as_u64())
                .unwrap_or(0)
        })
    }
}

/// Run the plugin as a runtime does.
pub fn plugin(
    command: &str,
    cid: &str,
    netns: &str,
    ifname: &str,
    args: &str,
    conf: &Value,
) -> Out {
    let mut child = Command::new(PLUGIN)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("plugin");
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    Out {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(raw.trim()).ok(),
        raw,
    }
}

/// The pod's IPv4 address from an ADD result.
pub fn result_ip(result: &Value, v6: bool) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|i| {
        let a = i["address"].as_str()?;
        (a.contains(':') == v6).then(|| a.split('/').next().unwrap_or("").to_string())
    })
}

/// Run `f` on a thread inside the namespace at `path`.
pub fn in_ns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(path).expect("netns");
    std::thread::spawn(move || {
        // SAFETY: this thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP listener inside a namespace answering "pong" to every connection.
pub fn pong_server(path: &str, addr: std::net::SocketAddr) {
    let listener = in_ns(path, move || {
        std::net::TcpListener::bind(addr).expect("bind")
    });
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"pong");
        }
    });
}

/// Connect from inside a namespace and read the answer.
pub fn ask(path: &str, addr: std::net::SocketAddr) -> std::io::Result<String> {
    in_ns(path, move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}
