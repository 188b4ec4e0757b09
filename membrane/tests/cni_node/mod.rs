//! The node harness of the `membrane up --enable-cni` tests: a node
//! network namespace running `membrane up`, the installed `membrane-cni`
//! driven as libcni drives it, pod namespaces. Shared by `cni_up` and
//! `policy_up` (each declares `mod common;` and `mod cni_node;`).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{self, BIN, stop_child, wait_until};
use serde_json::Value;

/// A pod's HTTP server (`python3 -c HTTP_PY NAME PORT`): answers every GET
/// with the pod's name.
pub const HTTP_PY: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, port = sys.argv[1], int(sys.argv[2])
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header('content-length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(('0.0.0.0', port), H).serve_forever()
"#;

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
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI: {why}");
    eprintln!("skipping: {why}");
    false
}

pub struct Netns(pub String);
impl Netns {
    pub fn new(tag: &str) -> Netns {
        let n = format!("mcu-{tag}-{}", common::rand_suffix());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &n])
                .status()
                .expect("ip")
                .success()
        );
        Netns(n)
    }
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The plugin binary `membrane up` installs (built on demand: it belongs to
/// another package of the workspace).
pub fn plugin_bin() -> PathBuf {
    let p = Path::new(BIN).with_file_name("membrane-cni");
    if !p.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "membrane-cni"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "building membrane-cni");
    }
    p
}

pub struct Node {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    pub lb_pool: String,
    /// `--cluster-pool-ipv4-cidr` and `--cluster-pool-ipv4-mask-size`.
    pub v4_pool: (String, String),
    /// `--cluster-pool-ipv6-cidr`.
    pub v6_pool: String,
    /// `--http-port` and `--https-port`.
    pub ports: (u16, u16),
}

impl Node {
    pub fn new() -> Node {
        let ns = Netns::new("node");
        let up = Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status();
        assert!(up.is_ok_and(|s| s.success()));
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("manifests")).expect("mkdir");
        Node {
            ns,
            dir,
            child: None,
            extra: Vec::new(),
            lb_pool: "127.23.1.0/24".into(),
            v4_pool: ("10.123.0.0/16".into(), "24".into()),
            v6_pool: "fd00:123::/48".into(),
            ports: (23080, 23443),
        }
    }
    pub fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("cni-bin")
    }
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("cni-conf")
    }
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("membrane.log"))
            .expect("log");
        let d = self.dir.path();
        // nsenter switches only the network namespace: unlike `ip netns
        // exec` it keeps the host's /sys/fs/bpf for the datapath's pins.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path()))
            .args([BIN, "--api-socket"])
            .arg(self.api())
            .arg("up")
            .arg(d.join("manifests"))
            .arg("--run-dir")
            .arg(d.join("run"))
            .args(["--lb-pool", &self.lb_pool, "--http-port"])
            .arg(self.ports.0.to_string())
            .arg("--https-port")
            .arg(self.ports.1.to_string())
            .args(["--node-name", "node-a", "--enable-cni", "--cni-bin-dir"])
            .arg(self.bin_dir())
            .arg("--cni-conf-dir")
            .arg(self.conf_dir())
            .arg("--cni-plugin-bin")
            .arg(plugin_bin())
            .args([
                "--cluster-pool-ipv4-cidr",
                &self.v4_pool.0,
                "--cluster-pool-ipv4-mask-size",
                &self.v4_pool.1,
            ])
            .args(["--enable-ipv6", "--cluster-pool-ipv6-cidr", &self.v6_pool])
            .args([
                "--cluster-pool-ipv6-mask-size",
                "64",
                "--unreachable-routes",
            ])
            .args(&self.extra)
            .env("MEMBRANE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("membrane up");
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(30), || {
            self.cli(&["status", "-o", "json"])
                .1
                .parse::<Value>()
                .is_ok_and(|s| s["ready"] == true && s["envoy"]["running"] == true)
                && self.conf_dir().join("05-membrane.conflist").exists()
        });
        assert!(ok, "membrane up did not become ready: {}", self.log());
    }
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("membrane.log")).unwrap_or_default()
    }
    pub fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .arg("--api-socket")
            .arg(self.api())
            .args(args)
            .output()
            .expect("cli");
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), s)
    }
    /// The installed plugin, run as libcni runs it: the conflist's plugin
    /// entry with the list's `cniVersion` and `name`.
    pub fn plugin(&self, command: &str, cid: &str, netns: &str, args: &str) -> (i32, Value) {
        let list: Value = serde_json::from_str(
            &std::fs::read_to_string(self.conf_dir().join("05-membrane.conflist"))
                .expect("conflist"),
        )
        .expect("conflist json");
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        let mut child = Command::new(self.bin_dir().join("membrane-cni"))
            .env_clear()
            .envs([
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", netns),
            ])
            .envs([
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", args),
                ("CNI_PATH", "/nonexistent"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("stdin");
        let out = child.wait_with_output().expect("plugin");
        let text = String::from_utf8_lossy(&out.stdout);
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_str(text.trim()).unwrap_or(Value::Null),
        )
    }
    pub fn endpoints(&self) -> Value {
        let (code, out) = self.cli(&["endpoint", "list", "-o", "json"]);
        assert_eq!(code, 0, "{out}");
        serde_json::from_str(&out).expect("endpoint list json")
    }
    pub fn pod_cidrs(&self) -> Value {
        let (code, out) = self.cli(&["get", "ciliumnode", "node-a", "-o", "json"]);
        assert_eq!(code, 0, "{out}\n{}", self.log());
        let v: Value = serde_json::from_str(&out).expect("json");
        v["spec"]["ipam"]["podCIDRs"].clone()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn ip_of(result: &Value, v6: bool) -> String {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|i| i["address"].as_str())
        .find(|a| a.contains(':') == v6)
        .and_then(|a| a.split('/').next())
        .expect("address")
        .to_string()
}

/// A bpffs directory for the datapath's pins, removed on drop.
pub struct Pins(pub PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        stop_child(&mut self.0);
    }
}
