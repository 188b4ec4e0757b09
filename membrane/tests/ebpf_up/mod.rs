//! `membrane up --datapath ebpf` inside a node network namespace, driven
//! through its CLI from the root namespace (the API socket is a file).
//! Shared by the end-to-end datapath, weighted-split and Cluster Mesh tests.
//!
//! `nsenter --net` only switches the network namespace: unlike `ip netns
//! exec` it does not remount /sys, so /sys/fs/bpf (and the pins that outlive
//! the agent) stay the host's.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{self, BIN, require_envoy, wait_until};

/// `nsenter` (util-linux) runs the agent inside the node namespace; in CI
/// its absence fails the test.
pub fn nsenter_available() -> bool {
    let ok = Command::new("nsenter")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "nsenter (util-linux) is required (CI=true)");
        eprintln!("SKIPPED: nsenter not found");
    }
    ok
}

/// How to start one agent; [`Up::start`] waits until it serves.
pub struct Up<'a> {
    dir: &'a Path,
    node_ns: &'a str,
    pins: &'a Path,
    devices: &'a str,
    lb_pool: &'a str,
    ports: (u16, u16),
    extra: Vec<String>,
    ready_timeout: Duration,
    /// Also wait for Envoy's admin `/ready` (the status's `ready`).
    envoy_ready: bool,
}

impl<'a> Up<'a> {
    /// Manifests in `dir/manifests`, run files in `dir/run`, pins in `pins`,
    /// the tc programs on `devices` (comma-separated).
    pub fn new(dir: &'a Path, node_ns: &'a str, pins: &'a Path, devices: &'a str) -> Self {
        Self {
            dir,
            node_ns,
            pins,
            devices,
            lb_pool: "127.0.100.0/24",
            ports: (18080, 18443),
            extra: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            envoy_ready: false,
        }
    }

    pub fn lb_pool(mut self, pool: &'a str) -> Self {
        self.lb_pool = pool;
        self
    }

    /// Ingress HTTP and HTTPS ports.
    pub fn ports(mut self, http: u16, https: u16) -> Self {
        self.ports = (http, https);
        self
    }

    /// More `membrane up` flags.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.extra
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    pub fn wait_envoy_ready(mut self) -> Self {
        self.envoy_ready = true;
        self
    }

    pub fn start(self) -> Agent {
        require_envoy();
        std::fs::create_dir_all(self.dir.join("manifests")).expect("mkdir manifests");
        let api = self.dir.join("api.sock");
        // A restart on the same directory keeps the earlier run's log.
        let log = (1..)
            .map(|run| self.dir.join(format!("membrane-{run}.log")))
            .find(|p| !p.exists())
            .expect("a free log name");
        let out = std::fs::File::create(&log).expect("log");
        let (http, https) = self.ports;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.node_ns))
            .arg(BIN)
            .arg("--api-socket")
            .arg(&api)
            .arg("up")
            .arg(self.dir.join("manifests"))
            .arg("--run-dir")
            .arg(self.dir.join("run"))
            .args(["--envoy-admin-port", "0", "--lb-pool", self.lb_pool])
            .args(["--http-port", &http.to_string()])
            .args(["--https-port", &https.to_string()])
            .args(["--datapath", "ebpf", "--datapath-devices", self.devices])
            .arg("--bpf-pin-dir")
            .arg(self.pins)
            .args(["--maglev-table-size", "251", "--max-services", "64"])
            .args(&self.extra)
            .env("MEMBRANE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn nsenter membrane up");
        let mut a = Agent {
            child,
            api,
            log,
            stopped: false,
        };
        let envoy_ready = self.envoy_ready;
        let ready = wait_until(self.ready_timeout, || {
            if let Ok(Some(_)) = a.child.try_wait() {
                return true;
            }
            a.status().is_some_and(|s| {
                s["envoy"]["running"] == true
                    && (!envoy_ready || s["ready"] == true)
                    && s["datapath"]["mode"] == "ebpf"
                    && s["datapath"]["syncs"].as_u64().unwrap_or(0) > 0
            })
        });
        let exited = matches!(a.child.try_wait(), Ok(Some(_)));
        assert!(
            ready && !exited,
            "membrane up --datapath ebpf in {} did not become ready:\n{}",
            self.node_ns,
            a.log_text()
        );
        a
    }
}

/// A running agent, stopped (SIGTERM, then SIGKILL, by PID) on drop.
pub struct Agent {
    child: Child,
    pub api: PathBuf,
    log: PathBuf,
    stopped: bool,
}

impl Agent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The CLI against this agent: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .arg("--api-socket")
            .arg(&self.api)
            .args(args)
            .output()
            .expect("run membrane");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn status(&self) -> Option<Value> {
        let (_, out, _) = self.cli(&["status", "-o", "json"]);
        serde_json::from_str(&out).ok()
    }

    /// `membrane service list -o json`.
    pub fn services(&self) -> Vec<Value> {
        let (code, out, err) = self.cli(&["service", "list", "-o", "json"]);
        assert_eq!(code, 0, "service list failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// `membrane apply -f` of `path`.
    pub fn apply_file(&self, path: &Path) {
        let (code, out, err) = self.cli(&["apply", "-f", path.to_str().expect("utf-8 path")]);
        assert_eq!(code, 0, "apply {} failed: {out}{err}", path.display());
    }

    /// `membrane apply -f` of `yaml`, written to a new file in `dir`.
    pub fn apply(&self, dir: &Path, yaml: &str) {
        let f = dir.join(format!("apply-{}.yaml", common::rand_suffix()));
        std::fs::write(&f, yaml).expect("write");
        self.apply_file(&f);
    }

    /// Graceful stop (SIGTERM), as an operator restarting the agent would.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return; // reaped: the PID may belong to someone else now
        }
        // nsenter execs membrane, so the PID is membrane's.
        common::stop_child(&mut self.child);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- membrane log ({}) ----\n{}",
                self.api.display(),
                self.log_text()
            );
        }
        self.stop();
    }
}
