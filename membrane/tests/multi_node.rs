//! Several nodes (root, real kernel, real Envoy): an underlay namespace
//! with a bridge, two node namespaces joined to it by veths, `membrane
//! apiserver` and `membrane operator` on the underlay, one `membrane agent
//! --enable-cni --datapath ebpf` per node inside its namespace. Pods are
//! namespaces set up by the installed `membrane-cni`, run exactly as a
//! container runtime runs it (environment + stdin). In native routing and
//! in VXLAN tunnel mode:
//!
//! - the operator hands each CiliumNode an IPv4 and an IPv6 pod CIDR; each
//!   agent publishes its InternalIPs, one per family (node a's from
//!   `--node-ip`, node b's detected);
//! - pod a1 ↔ pod b1 across nodes, TCP both ways, over IPv4 and IPv6 (native:
//!   IPv6 routed via the nodes' IPv6 addresses; tunnel: through
//!   `cilium_vxlan` to the IPv4 endpoint);
//! - a ClusterIP with backends on both nodes, reached from a pod on node a:
//!   both backends answer;
//! - eBPF host routing (the default) across nodes: with the host stack's
//!   IPv4 forwarding off on the devices traffic from other nodes arrives on,
//!   pod ↔ pod (both families) and a ClusterIP whose backend is on node b
//!   still work, and the datapath counters show the BPF path on both
//!   nodes;
//! - NodePort on node a's address, and a LoadBalancer address the underlay
//!   routes to node a, from a client on the underlay (outside every node)
//!   reaching a backend only on node b (SNAT through node a);
//! - Maglev consistent across nodes: the same client flow (address, port)
//!   to the NodePort of either node lands on the same backend;
//! - a crashed agent's routes stay; restarted, it removes a stale one;
//! - a deleted CiliumNode's routes (tunnel: FDB entries) go on the other
//!   node;
//! - stopping an agent removes its routes (and `cilium_vxlan`), and
//!   cross-node traffic from its pods then fails.
//!
//! Namespaces `mbn-*`, addresses in 10.213.0.0/16 and fd00:213::/48 inside
//! them only, ports 13000-13999.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, envoy_bin, rand_suffix, require_envoy, stop_child, wait_until};
use serde_json::Value;

const API_PORT: u16 = 13001;
const ECHO_PORT: u16 = 13500;
const NODE_PORT_BOTH: u16 = 13900;
const NODE_PORT_B_ONLY: u16 = 13901;
const UNDERLAY_GW: &str = "10.213.250.254";
const CLUSTER_IP: &str = "10.213.240.10";
const CLUSTER_IP_B_ONLY: &str = "10.213.240.11";
const POOL: &str = "10.213.0.0/17";
const POOL6: &str = "fd00:213::/104";
const UNDERLAY_GW6: &str = "fd00:213:250::fe";
/// LoadBalancer addresses; the underlay routes them to node a.
const LB_POOL: &str = "10.213.241.0/24";

/// A line echo server answering `<name> <line>`.
const SERVER_PY: &str = r#"
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(('::', port)); s.listen(128)
def handle(c):
    try:
        for line in c.makefile('rb'):
            c.sendall(name.encode() + b' ' + line)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// Connect (optionally from a fixed source port), send a line, print the
/// answering server's name; exit 1 on any failure.
const CLIENT_PY: &str = r#"
import socket, sys
host, port, sport, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
v6 = ':' in host
try:
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sport:
        s.bind(('::' if v6 else '0.0.0.0', sport))
    s.settimeout(timeout)
    s.connect((host, port))
    s.sendall(b'hi\n')
    line = s.makefile('rb').readline().decode().strip()
    print(line.split(' ')[0] if line.endswith(' hi') else '')
except OSError as e:
    print('error', e, file=sys.stderr)
    sys.exit(1)
"#;

fn prerequisites() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let tool = |t: &str, arg: &str| {
        Command::new(t)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ip = tool("ip", "-V");
    let py = tool("python3", "-V");
    let nsenter = tool("nsenter", "--version");
    let kubectl = Path::new("/usr/bin/kubectl").is_file() || std::env::var_os("KUBECTL").is_some();
    let bpffs = Path::new("/sys/fs/bpf").is_dir();
    if root && ip && py && nsenter && kubectl && bpffs {
        require_envoy();
        return true;
    }
    let why = format!(
        "needs root ({root}), iproute2 ({ip}), python3 ({py}), nsenter ({nsenter}), kubectl ({kubectl}), bpffs ({bpffs})"
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI: {why}");
    eprintln!("skipping: {why}");
    false
}

fn kubectl() -> PathBuf {
    std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/kubectl"))
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// A network namespace, deleted on drop.
struct Netns(String);
impl Netns {
    fn new(tag: &str) -> Netns {
        let n = format!("mbn-{tag}-{}", rand_suffix());
        sh(&["ip", "netns", "add", &n]);
        sh(&["ip", "-n", &n, "link", "set", "lo", "up"]);
        Netns(n)
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A process, stopped by PID (SIGTERM, then SIGKILL) on drop.
struct Proc(Option<Child>);
impl Proc {
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            stop_child(&mut c);
        }
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A bpffs directory for an agent's pins, removed on drop.
struct Pins(PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `BIN args…` inside `ns` (nsenter changes only the network namespace, so
/// /sys/fs/bpf stays the host's), output to `log`.
fn spawn_in(ns: &Netns, log: &Path, args: &[String]) -> Proc {
    let log = std::fs::File::create(log).expect("log");
    let child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .arg(BIN)
        .args(args)
        .env("MEMBRANE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn membrane");
    Proc(Some(child))
}

struct Node {
    name: &'static str,
    ip: &'static str,
    ns: Netns,
    run: PathBuf,
    args: Vec<String>,
    agent: Proc,
    _pins: Pins,
}

impl Node {
    /// SIGKILL the agent (no shutdown path runs) and the Envoy it started
    /// (by PID).
    fn crash(&mut self) {
        let (_, status) = self.cli(&["status", "-o", "json"]);
        let envoy = serde_json::from_str::<Value>(&status)
            .ok()
            .and_then(|v| v["envoy"]["pid"].as_i64());
        if let Some(mut c) = self.agent.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = envoy {
            // SAFETY: signalling the Envoy this agent started, by PID.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
    /// Start the agent again with the same flags.
    fn restart(&mut self) {
        self.agent = spawn_in(&self.ns, &self.run.join("agent-2.log"), &self.args);
    }
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let mut a = vec![BIN, "--api-socket"];
        let sock = self.run.join("api.sock").display().to_string();
        a.push(&sock);
        a.extend(args);
        output(&a)
    }
    fn log(&self) -> String {
        format!(
            "---- agent {} ----\n{}{}",
            self.name,
            std::fs::read_to_string(self.run.join("agent.log")).unwrap_or_default(),
            std::fs::read_to_string(self.run.join("agent-2.log")).unwrap_or_default()
        )
    }
    fn conflist(&self) -> PathBuf {
        self.run.join("cni-conf/05-membrane.conflist")
    }
    /// The installed plugin, run as libcni runs it.
    fn cni(&self, command: &str, cid: &str, netns: &str, pod: &str) -> (i32, Value) {
        let list: Value =
            serde_json::from_str(&std::fs::read_to_string(self.conflist()).expect("conflist"))
                .expect("conflist json");
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}");
        let mut child = Command::new(self.run.join("cni-bin/membrane-cni"))
            .env_clear()
            .envs([
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", args.as_str()),
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
    fn routes(&self) -> String {
        output(&["ip", "-n", &self.ns.0, "route", "show", "proto", "77"]).1
    }
    fn routes6(&self) -> String {
        output(&["ip", "-n", &self.ns.0, "-6", "route", "show", "proto", "77"]).1
    }
    fn status(&self) -> Value {
        let (ok, out) = self.cli(&["status", "-o", "json"]);
        assert!(ok || !out.is_empty(), "status: {out}");
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }
    /// IPv4 forwarding by the host stack on `dev` (per device; IPv6 has
    /// only the global switch).
    fn forwarding(&self, dev: &str, on: bool) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns.0,
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{dev}.forwarding={}", u8::from(on)),
        ]);
    }
}

struct Pod {
    name: &'static str,
    ip: String,
    ip6: String,
    // Dropped before the namespace.
    _server: Proc,
    ns: Netns,
}

/// Everything one mode's run owns; processes stop before namespaces go.
/// kubectl gets a cache directory of its own: both modes' API servers have
/// the same address (in different namespaces).
struct Cluster {
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    _operator: Proc,
    _apiserver: Proc,
    underlay: Netns,
    kubeconfig: PathBuf,
    // Last: the run directories outlive every process.
    dir: tempfile::TempDir,
}

impl Cluster {
    fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&n.log());
        }
        for f in ["operator.log", "apiserver.log"] {
            s.push_str(&format!(
                "---- {f} ----\n{}",
                std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default()
            ));
        }
        s
    }

    fn kubectl_apply(&self, yaml: &str) {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.underlay.path()))
            .arg(kubectl())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("stdin");
        let out = child.wait_with_output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn kubectl(&self, args: &[&str]) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.underlay.path()))
            .arg(kubectl())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ciliumnodes(&self) -> Value {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.underlay.path()))
            .arg(kubectl())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .args(["get", "ciliumnodes", "-o", "json"])
            .output()
            .expect("kubectl");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("pod")
    }
}

/// Ask from namespace `ns` `host:port` (from `sport` if not 0); the name of
/// the server that answered.
fn probe(ns: &str, host: &str, port: u16, sport: u16, timeout_s: f32) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", CLIENT_PY, host])
        .arg(port.to_string())
        .arg(sport.to_string())
        .arg(timeout_s.to_string())
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// Bounded retries until `probe` answers; the answering server's name.
fn probe_until(ns: &str, host: &str, port: u16, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(n) = probe(ns, host, port, 0, 2.0) {
            return Some(n);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The address LB IPAM gave Service `name`.
fn wait_for_lb_ip(c: &Cluster, name: &str) -> String {
    let mut ip = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", c.underlay.path()))
            .arg(kubectl())
            .arg("--kubeconfig")
            .arg(&c.kubeconfig)
            .arg("--cache-dir")
            .arg(c.dir.path().join("kube-cache"))
            .args(["get", "service", name, "-o"])
            .arg("jsonpath={.status.loadBalancer.ingress[0].ip}")
            .output()
            .expect("kubectl");
        ip = String::from_utf8_lossy(&out.stdout).trim().to_string();
        !ip.is_empty()
    });
    assert!(
        ok,
        "Service {name} got no LoadBalancer address\n{}",
        c.logs()
    );
    ip
}

fn start_apiserver(underlay: &Netns, dir: &Path) -> (Proc, PathBuf) {
    let data = dir.join("api-data");
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", underlay.path()))
        .arg(BIN)
        .args(["apiserver", "--listen"])
        .arg(format!("{UNDERLAY_GW}:{API_PORT}"))
        .arg("--data-dir")
        .arg(&data)
        .env("MEMBRANE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("apiserver.log")).expect("log"))
        .spawn()
        .expect("membrane apiserver");
    // Its first line names the kubeconfig it wrote.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining: the server's later lines must not hit a closed pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let proc = Proc(Some(child));
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("membrane apiserver did not start");
    let kubeconfig = line
        .split_whitespace()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| data.join("kubeconfig"));
    assert!(kubeconfig.is_file(), "no kubeconfig: {line}");
    (proc, kubeconfig)
}

fn start_node(
    underlay: &Netns,
    dir: &Path,
    kubeconfig: &Path,
    name: &'static str,
    // Its IPv4 and IPv6 underlay addresses.
    (ip, ip6): (&'static str, &'static str),
    mode: &str,
    explicit_ip: bool,
) -> Node {
    let ns = Netns::new(&format!("n{}", &name[name.len() - 1..]));
    let ul_if = format!(
        "ul{}-{}",
        &name[name.len() - 1..],
        std::process::id() % 100_000
    );
    sh(&[
        "ip",
        "link",
        "add",
        &ul_if,
        "netns",
        &underlay.0,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &ns.0,
    ]);
    sh(&[
        "ip",
        "-n",
        &underlay.0,
        "link",
        "set",
        &ul_if,
        "master",
        "br0",
        "up",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns.0,
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        "eth0",
    ]);
    // No duplicate address detection: the address is usable (and found by
    // node b's detection) at once.
    sh(&[
        "ip",
        "-n",
        &ns.0,
        "addr",
        "add",
        &format!("{ip6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    sh(&["ip", "-n", &ns.0, "link", "set", "eth0", "up"]);
    let run = dir.join(name);
    std::fs::create_dir_all(&run).expect("run dir");
    let pins = Pins(PathBuf::from(format!("/sys/fs/bpf/{}", ns.0)));
    let s = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = [
        "--api-socket",
        &s(&run.join("api.sock")),
        "agent",
        "--kubeconfig",
        &s(kubeconfig),
        "--node-name",
        name,
        "--run-dir",
        &s(&run),
        "--envoy-bin",
        &s(&envoy_bin()),
        "--lb-pool",
        LB_POOL,
        "--http-port",
        "13080",
        "--https-port",
        "13443",
        "--proxy-ports",
        "13100-13199",
        "--enable-cni",
        "--cni-bin-dir",
        &s(&run.join("cni-bin")),
        "--cni-conf-dir",
        &s(&run.join("cni-conf")),
        "--cni-plugin-bin",
        &s(&plugin_bin()),
        "--routing-mode",
        mode,
        "--datapath",
        "ebpf",
        "--bpf-pin-dir",
        &s(&pins.0),
        "--lb-algorithm",
        "maglev",
        "--maglev-table-size",
        "251",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    // Node a names its address and its NodePort addresses; node b's are
    // detected (and NodePorts default to it).
    if explicit_ip {
        args.extend(
            ["--node-ip", &format!("{ip},{ip6}"), "--node-addresses", ip].map(String::from),
        );
    }
    let agent = spawn_in(&ns, &run.join("agent.log"), &args);
    Node {
        name,
        ip,
        ns,
        run,
        args,
        agent,
        _pins: pins,
    }
}

/// The plugin binary the agents install (built on demand: another package).
fn plugin_bin() -> PathBuf {
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

fn add_pod(node: &Node, name: &'static str) -> Pod {
    let ns = Netns::new(&format!("p{name}"));
    let (code, result) = node.cni("ADD", &format!("cid-{}", ns.0), &ns.path(), name);
    assert_eq!(
        code,
        0,
        "CNI ADD {name} on {}: {result}\n{}",
        node.name,
        node.log()
    );
    let addr = |v6: bool| {
        result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .find(|a| a.contains(':') == v6)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("pod {name}: no address (IPv6 {v6}): {result}"))
            .to_string()
    };
    let (ip, ip6) = (addr(false), addr(true));
    let server = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c", SERVER_PY, name])
        .arg(ECHO_PORT.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("server");
    Pod {
        name,
        ip,
        ip6,
        _server: Proc(Some(server)),
        ns,
    }
}

fn services_yaml(a2: &str, b1: &str) -> String {
    let slice = |svc: &str, ips: &[(&str, &str)]| {
        let mut eps = String::new();
        for (ip, node) in ips {
            eps.push_str(&format!(
                "  - addresses: [\"{ip}\"]\n    nodeName: {node}\n    conditions:\n      ready: true\n"
            ));
        }
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n  - port: {ECHO_PORT}\n    protocol: TCP\nendpoints:\n{eps}"
        )
    };
    let svc = |name: &str, kind: &str, ip: &str, node_port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {kind}\n  clusterIP: {ip}\n  ports:\n  - port: 80\n    targetPort: {ECHO_PORT}\n    nodePort: {node_port}\n    protocol: TCP\n"
        )
    };
    format!(
        "{}---\n{}---\n{}---\n{}",
        svc("echo", "NodePort", CLUSTER_IP, NODE_PORT_BOTH),
        slice("echo", &[(a2, "node-a"), (b1, "node-b")]),
        svc(
            "only-b",
            "LoadBalancer",
            CLUSTER_IP_B_ONLY,
            NODE_PORT_B_ONLY
        ),
        slice("only-b", &[(b1, "node-b")]),
    )
}

fn run(mode: &str) {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let underlay = Netns::new("ul");
    sh(&[
        "ip",
        "-n",
        &underlay.0,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
    ]);
    sh(&[
        "ip",
        "-n",
        &underlay.0,
        "addr",
        "add",
        &format!("{UNDERLAY_GW}/24"),
        "dev",
        "br0",
    ]);
    sh(&[
        "ip",
        "-n",
        &underlay.0,
        "addr",
        "add",
        &format!("{UNDERLAY_GW6}/64"),
        "dev",
        "br0",
        "nodad",
    ]);
    sh(&["ip", "-n", &underlay.0, "link", "set", "br0", "up"]);
    let (apiserver, kubeconfig) = start_apiserver(&underlay, dir.path());
    let operator = spawn_in(
        &underlay,
        &dir.path().join("operator.log"),
        &[
            "operator".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--cluster-pool-ipv4-cidr".into(),
            POOL.into(),
            "--cluster-pool-ipv4-mask-size".into(),
            "24".into(),
            "--enable-ipv6".into(),
            "--cluster-pool-ipv6-cidr".into(),
            POOL6.into(),
            "--cluster-pool-ipv6-mask-size".into(),
            "120".into(),
            "--lb-pool".into(),
            LB_POOL.into(),
        ],
    );
    let started = Instant::now();
    let node_a = start_node(
        &underlay,
        dir.path(),
        &kubeconfig,
        "node-a",
        ("10.213.250.1", "fd00:213:250::1"),
        mode,
        true,
    );
    // Node b's addresses are detected (its only global ones).
    let node_b = start_node(
        &underlay,
        dir.path(),
        &kubeconfig,
        "node-b",
        ("10.213.250.2", "fd00:213:250::2"),
        mode,
        false,
    );
    let mut c = Cluster {
        dir,
        pods: Vec::new(),
        nodes: vec![node_a, node_b],
        _operator: operator,
        _apiserver: apiserver,
        underlay,
        kubeconfig,
    };

    // The operator allocates, each agent publishes its address, installs
    // the plugin and routes to the other node's CIDR.
    let ready = wait_until(Duration::from_secs(60), || {
        c.nodes.iter().all(|n| n.conflist().exists())
    });
    assert!(ready, "agents did not install the plugin\n{}", c.logs());
    let cn = c.ciliumnodes();
    let mut cidrs = std::collections::BTreeMap::new();
    let mut cidrs6 = std::collections::BTreeMap::new();
    for item in cn["items"].as_array().expect("ciliumnodes") {
        let name = item["metadata"]["name"].as_str().expect("name").to_string();
        let pod_cidrs: Vec<&str> = item["spec"]["ipam"]["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(pod_cidrs.len(), 2, "one CIDR per family: {item}");
        let ips: Vec<&str> = item["spec"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["type"] == "InternalIP")
            .filter_map(|a| a["ip"].as_str())
            .collect();
        let want = if name == "node-a" {
            ["10.213.250.1", "fd00:213:250::1"]
        } else {
            ["10.213.250.2", "fd00:213:250::2"]
        };
        assert_eq!(ips, want, "{item}");
        let cidr = |v6: bool| {
            pod_cidrs
                .iter()
                .find(|c| c.contains(':') == v6)
                .map(|c| c.to_string())
                .unwrap_or_else(|| panic!("no CIDR (IPv6 {v6}): {item}"))
        };
        cidrs.insert(name.clone(), cidr(false));
        cidrs6.insert(name, cidr(true));
    }
    assert_eq!(cidrs.len(), 2, "{cn}");
    assert_ne!(cidrs["node-a"], cidrs["node-b"]);
    assert_ne!(cidrs6["node-a"], cidrs6["node-b"]);
    let routed = wait_until(Duration::from_secs(30), || {
        c.nodes[0].routes().contains(&cidrs["node-b"])
            && c.nodes[1].routes().contains(&cidrs["node-a"])
            && c.nodes[0].routes6().contains(&cidrs6["node-b"])
            && c.nodes[1].routes6().contains(&cidrs6["node-a"])
    });
    assert!(
        routed,
        "routes: a: {}{} b: {}{}\n{}",
        c.nodes[0].routes(),
        c.nodes[0].routes6(),
        c.nodes[1].routes(),
        c.nodes[1].routes6(),
        c.logs()
    );
    eprintln!(
        "{mode}: agents started → routes to each other in {:?}",
        started.elapsed()
    );
    let route_a = c.nodes[0].routes();
    let route6_a = c.nodes[0].routes6();
    if mode == "tunnel" {
        assert!(route_a.contains("dev cilium_vxlan"), "{route_a}");
        // IPv6 through the same tunnel: node b's derived link-local next
        // hop (0a:4d + 10.213.250.2), which resolves to node b's MAC.
        assert!(
            route6_a.contains(&format!(
                "{} via fe80::a4d:ad5:fa02 dev cilium_vxlan",
                cidrs6["node-b"]
            )),
            "{route6_a}"
        );
        let (ok, link) = output(&[
            "ip",
            "-d",
            "-n",
            &c.nodes[0].ns.0,
            "link",
            "show",
            "cilium_vxlan",
        ]);
        assert!(ok && link.contains("dstport 8472"), "{link}");
        let (_, fdb) = output(&[
            "bridge",
            "-n",
            &c.nodes[0].ns.0,
            "fdb",
            "show",
            "dev",
            "cilium_vxlan",
        ]);
        assert!(fdb.contains("dst 10.213.250.2"), "{fdb}");
    } else {
        assert!(route_a.contains("via 10.213.250.2 dev eth0"), "{route_a}");
        assert!(
            route6_a.contains(&format!(
                "{} via fd00:213:250::2 dev eth0",
                cidrs6["node-b"]
            )),
            "{route6_a}"
        );
    }

    let a1 = add_pod(&c.nodes[0], "a1");
    let a2 = add_pod(&c.nodes[0], "a2");
    let b1 = add_pod(&c.nodes[1], "b1");
    assert!(cidrs["node-a"].starts_with(&a1.ip[..a1.ip.rfind('.').expect("v4")]));
    assert!(cidrs["node-b"].starts_with(&b1.ip[..b1.ip.rfind('.').expect("v4")]));
    let in_cidr6 = |ip: &str, cidr: &str| {
        let net: std::net::Ipv6Addr = cidr
            .split('/')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("cidr6");
        let ip: std::net::Ipv6Addr = ip.parse().expect("pod ip6");
        // The node CIDRs are /120: all but the last byte.
        ip.octets()[..15] == net.octets()[..15]
    };
    assert!(
        in_cidr6(&a1.ip6, &cidrs6["node-a"]),
        "{} {}",
        a1.ip6,
        cidrs6["node-a"]
    );
    assert!(
        in_cidr6(&b1.ip6, &cidrs6["node-b"]),
        "{} {}",
        b1.ip6,
        cidrs6["node-b"]
    );
    c.pods.extend([a1, a2, b1]);

    // Pod ↔ pod across nodes, both ways.
    let (a1_ns, b1_ns) = (c.pod("a1").ns.0.clone(), c.pod("b1").ns.0.clone());
    let (a1_ip, a2_ip, b1_ip) = (
        c.pod("a1").ip.clone(),
        c.pod("a2").ip.clone(),
        c.pod("b1").ip.clone(),
    );
    // `from` reaches the echo server of pod `want` at `to`.
    let reaches = |from: &str, to: &str, want: &str, what: &str| {
        assert_eq!(
            probe_until(from, to, ECHO_PORT, Duration::from_secs(20)).as_deref(),
            Some(want),
            "{what} ({to})\n{}",
            c.logs()
        );
    };
    reaches(&a1_ns, &b1_ip, "b1", "a1 → b1");
    reaches(&b1_ns, &a1_ip, "a1", "b1 → a1");
    // The same over IPv6.
    let (a1_ip6, b1_ip6) = (c.pod("a1").ip6.clone(), c.pod("b1").ip6.clone());
    reaches(&a1_ns, &b1_ip6, "b1", "a1 → b1 over IPv6");
    reaches(&b1_ns, &a1_ip6, "a1", "b1 → a1 over IPv6");

    c.kubectl_apply(&services_yaml(&a2_ip, &b1_ip));
    let programmed = wait_until(Duration::from_secs(30), || {
        c.nodes.iter().all(|n| {
            let (_, out) = n.cli(&["service", "list"]);
            out.contains(&format!("{CLUSTER_IP}:80"))
                && out.contains(&format!("{}:{NODE_PORT_B_ONLY}", n.ip))
                && out.contains(&format!("{b1_ip}:{ECHO_PORT}"))
                && out.contains(&format!("{a2_ip}:{ECHO_PORT}"))
        })
    });
    assert!(programmed, "services not programmed\n{}", c.logs());

    // ClusterIP from a pod on node a: backends on both nodes answer.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        if let Some(n) = probe(&a1_ns, CLUSTER_IP, 80, 0, 2.0) {
            seen.insert(n);
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.iter().map(String::as_str).collect::<Vec<_>>(),
        ["a2", "b1"],
        "ClusterIP {CLUSTER_IP} from a1\n{}",
        c.logs()
    );

    // eBPF host routing across nodes. It is the default: both agents run
    // without --enable-host-legacy-routing and the kernel has the helpers.
    for n in &c.nodes {
        let st = n.status();
        assert_eq!(
            st["datapath"]["host_routing"]["mode"], "BPF",
            "node {}: {st}",
            n.name
        );
    }
    // What arrives from the other node may not be forwarded by the host
    // stack (IPv4 forwarding off on those devices; the pods' own devices
    // keep it, as the FIB lookup of host routing checks the ingress
    // device), so only the programs can deliver it.
    let external: &[&str] = if mode == "tunnel" {
        &["eth0", "cilium_vxlan"]
    } else {
        &["eth0"]
    };
    for n in &c.nodes {
        for d in external {
            n.forwarding(d, false);
        }
    }
    let stat = |n: &Node, k: &str| n.status()["datapath"]["stats"][k].as_u64().unwrap_or(0);
    let delivered =
        |n: &Node| stat(n, "host_route_redirect_peer") + stat(n, "host_route_redirect_egress_hook");
    let (fib_a, fib_b) = (
        stat(&c.nodes[0], "host_route_fib"),
        stat(&c.nodes[1], "host_route_fib"),
    );
    let (del_a, del_b) = (delivered(&c.nodes[0]), delivered(&c.nodes[1]));
    for (from_ns, to, want) in [
        (&a1_ns, &b1_ip, "b1"),
        (&b1_ns, &a1_ip, "a1"),
        (&a1_ns, &b1_ip6, "b1"),
        (&b1_ns, &a1_ip6, "a1"),
    ] {
        assert_eq!(
            probe(from_ns, to, ECHO_PORT, 0, 3.0).as_deref(),
            Some(want),
            "host routing: → {to} with the stack's forwarding off\n{}",
            c.logs()
        );
    }
    // A ClusterIP whose only backend is on node b, from node a's pod:
    // translated on node a, the reply reverse-translated there.
    assert_eq!(
        probe(&a1_ns, CLUSTER_IP_B_ONLY, 80, 0, 3.0).as_deref(),
        Some("b1"),
        "host routing: ClusterIP {CLUSTER_IP_B_ONLY} → b1\n{}",
        c.logs()
    );
    // Four connections out of each node's pods went to the FIB's next hop
    // (the other node) and were delivered into pods by the programs.
    let after = |n: &Node, k: &str, before: u64| stat(n, k).saturating_sub(before);
    let (fib_a, fib_b) = (
        after(&c.nodes[0], "host_route_fib", fib_a),
        after(&c.nodes[1], "host_route_fib", fib_b),
    );
    let (del_a, del_b) = (
        delivered(&c.nodes[0]).saturating_sub(del_a),
        delivered(&c.nodes[1]).saturating_sub(del_b),
    );
    eprintln!(
        "{mode}: host routing counters over 5 connections: FIB redirects a {fib_a} b {fib_b}, into pods a {del_a} b {del_b}"
    );
    assert!(
        fib_a >= 3 && fib_b >= 3 && del_a >= 3 && del_b >= 3,
        "host routing counters: FIB a {fib_a} b {fib_b}, into pods a {del_a} b {del_b}"
    );
    for n in &c.nodes {
        for d in external {
            n.forwarding(d, true);
        }
    }

    // NodePort on node a, backend only on node b, client outside the nodes.
    let ul = c.underlay.0.clone();
    assert_eq!(
        probe_until(
            &ul,
            "10.213.250.1",
            NODE_PORT_B_ONLY,
            Duration::from_secs(10)
        )
        .as_deref(),
        Some("b1"),
        "NodePort 10.213.250.1:{NODE_PORT_B_ONLY} → b1\n{}",
        c.logs()
    );
    // Its LoadBalancer address, routed to node a by the underlay.
    let lb_ip = wait_for_lb_ip(&c, "only-b");
    sh(&[
        "ip",
        "-n",
        &ul,
        "route",
        "add",
        LB_POOL,
        "via",
        "10.213.250.1",
    ]);
    let lb_programmed = wait_until(Duration::from_secs(30), || {
        c.nodes[0]
            .cli(&["service", "list"])
            .1
            .contains(&format!("{lb_ip}:80"))
    });
    assert!(
        lb_programmed,
        "LoadBalancer {lb_ip} not programmed\n{}",
        c.logs()
    );
    assert_eq!(
        probe_until(&ul, &lb_ip, 80, Duration::from_secs(10)).as_deref(),
        Some("b1"),
        "LoadBalancer {lb_ip}:80 through node a → b1\n{}",
        c.logs()
    );
    // And the ClusterIP of that Service from node a's pod (remote only).
    assert_eq!(
        probe(&a1_ns, CLUSTER_IP_B_ONLY, 80, 0, 2.0).as_deref(),
        Some("b1")
    );

    // Maglev across nodes: the same flow (client address and port) to
    // either node's NodePort picks the same backend. In parallel.
    let ports: Vec<u16> = (13600..13612).collect();
    let answers: Vec<(u16, Option<String>, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ports
            .iter()
            .map(|&sport| {
                let ul = ul.clone();
                s.spawn(move || {
                    let on_a = probe(&ul, "10.213.250.1", NODE_PORT_BOTH, sport, 3.0);
                    let on_b = probe(&ul, "10.213.250.2", NODE_PORT_BOTH, sport, 3.0);
                    (sport, on_a, on_b)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe"))
            .collect()
    });
    for (sport, on_a, on_b) in &answers {
        assert!(
            on_a.is_some(),
            "port {sport}: no answer through node a\n{}",
            c.logs()
        );
        assert_eq!(on_a, on_b, "port {sport}: nodes chose different backends");
    }
    let backends: std::collections::BTreeSet<_> =
        answers.iter().filter_map(|a| a.1.clone()).collect();
    assert_eq!(
        backends.len(),
        2,
        "12 flows all on one backend: {answers:?}"
    );
    // Same backends in the same states on both nodes.
    let list = |n: &Node| {
        let (ok, out) = n.cli(&["service", "list", "-o", "json"]);
        assert!(ok, "{out}");
        let v: Value = serde_json::from_str(&out).expect("json");
        let mut rows: Vec<String> = v
            .as_array()
            .expect("list")
            .iter()
            .filter(|s| {
                s["frontend"]
                    .as_str()
                    .is_some_and(|f| f.starts_with(CLUSTER_IP))
            })
            .map(|s| {
                let mut be: Vec<String> = s["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| format!("{}:{}", b["address"], b["state"]))
                    .collect();
                be.sort();
                format!("{} {}", s["frontend"], be.join(","))
            })
            .collect();
        rows.sort();
        rows
    };
    let (la, lb) = (list(&c.nodes[0]), list(&c.nodes[1]));
    assert!(!la.is_empty(), "service list on node a");
    assert_eq!(la, lb, "service lists differ across nodes");

    // A crashed agent leaves its routes (forwarding goes on); restarted,
    // it keeps what is still wanted (and the tunnel device), removes what
    // is not (a stale route of its protocol), and traffic flows.
    let stale = "10.213.99.0/24";
    c.nodes[1].crash();
    assert!(c.nodes[1].routes().contains(&cidrs["node-a"]));
    let ns_b = c.nodes[1].ns.0.clone();
    sh(&[
        "ip",
        "-n",
        &ns_b,
        "route",
        "add",
        stale,
        "via",
        "10.213.250.1",
        "proto",
        "77",
    ]);
    c.nodes[1].restart();
    let rebuilt = wait_until(Duration::from_secs(30), || {
        let r = c.nodes[1].routes();
        !r.contains(stale)
            && r.contains(&cidrs["node-a"])
            && c.nodes[1].routes6().contains(&cidrs6["node-a"])
    });
    assert!(
        rebuilt,
        "after restart: {}\n{}",
        c.nodes[1].routes(),
        c.logs()
    );
    assert_eq!(
        probe_until(&b1_ns, &a1_ip, ECHO_PORT, Duration::from_secs(10)).as_deref(),
        Some("a1"),
        "b1 → a1 after node b's agent restarted\n{}",
        c.logs()
    );

    // A CiliumNode deleted: the other node's routes to it go (and, in
    // tunnel mode, its neighbour and FDB entries).
    c.kubectl(&["delete", "ciliumnode", "node-a"]);
    let t = Instant::now();
    let withdrawn = wait_until(Duration::from_secs(30), || {
        !c.nodes[1].routes().contains(&cidrs["node-a"])
            && !c.nodes[1].routes6().contains(&cidrs6["node-a"])
    });
    // A figure for the report, not an assertion.
    eprintln!(
        "{mode}: CiliumNode deleted (kubectl returned) → route gone on the other node in {:?}",
        t.elapsed()
    );
    assert!(
        withdrawn,
        "node b still routes to node a: {}",
        c.nodes[1].routes()
    );
    if mode == "tunnel" {
        let (_, fdb) = output(&["bridge", "-n", &ns_b, "fdb", "show", "dev", "cilium_vxlan"]);
        assert!(!fdb.contains("dst 10.213.250.1"), "{fdb}");
    }

    // Stopping node a's agent removes its routes (and the tunnel device);
    // pods on node a then cannot reach node b's pods.
    c.nodes[0].agent.stop();
    assert_eq!(c.nodes[0].routes().trim(), "", "routes left behind");
    assert_eq!(c.nodes[0].routes6().trim(), "", "IPv6 routes left behind");
    let (has_vxlan, _) = output(&["ip", "-n", &c.nodes[0].ns.0, "link", "show", "cilium_vxlan"]);
    assert!(!has_vxlan, "cilium_vxlan left behind");
    assert_eq!(
        probe(&a1_ns, &b1_ip, ECHO_PORT, 0, 1.0),
        None,
        "a1 → b1 after cleanup"
    );
    drop(c);
}

#[test]
fn native_routing() {
    run("native");
}

#[test]
fn vxlan_tunnel() {
    run("tunnel");
}
