//! Test fixtures: prerequisites, pin directories, network namespaces, veth
//! topologies and echo servers. Everything is named after the test process's
//! PID and removed on drop.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use membrane_ebpf::{Datapath, DatapathConfig};
use membrane_lb::maglev::MaglevConfig;

/// Checks root and bpffs (mounting bpffs at /sys/fs/bpf when missing).
/// Returns false to skip; under `CI=true` a missing prerequisite panics.
pub fn prerequisites() -> bool {
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    let fail = |why: String| -> bool {
        if ci {
            panic!("prerequisite missing (CI=true, so this fails instead of skipping): {why}");
        }
        eprintln!("SKIPPED: {why}");
        false
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return fail("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)".into());
    }
    if membrane_ebpf::check_bpffs(std::path::Path::new("/sys/fs/bpf")).is_err() {
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status();
        // Another test may have mounted it concurrently; re-check instead of
        // trusting the exit status.
        let _ = st;
        if let Err(e) = membrane_ebpf::check_bpffs(std::path::Path::new("/sys/fs/bpf")) {
            return fail(format!("no bpffs at /sys/fs/bpf and mounting failed: {e}"));
        }
    }
    for tool in ["ip", "python3"] {
        if Command::new("which")
            .arg(tool)
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            return fail(format!("{tool} not found"));
        }
    }
    true
}

/// A pin directory of our own, removed on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/membrane-test-{}-{tag}",
            std::process::id()
        ));
        let _ = Datapath::remove_pins(&p);
        PinDir(p)
    }

    pub fn config(&self, m: u32) -> DatapathConfig {
        DatapathConfig {
            pin_dir: self.0.clone(),
            maglev: MaglevConfig::from_seed_b64(m, membrane_lb::maglev::DEFAULT_HASH_SEED).unwrap(),
            max_services: 16,
            ..DatapathConfig::default()
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Datapath::remove_pins(&self.0);
    }
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v);
    }

    pub fn sysctl(&self, kv: &str) {
        sh(&["ip", "netns", "exec", &self.name, "sysctl", "-qw", kv]);
    }

    /// Runs `f` on a thread inside this namespace (only the network
    /// namespace changes; bpffs stays visible). Sockets made there keep it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: fd is a valid netns file for the lifetime of the call.
                let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed (by PID) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const ECHO_PY: &str = r#"
import socket, sys, threading
name, port = sys.argv[1].encode(), int(sys.argv[2])
def handle(c):
    try:
        f = c.makefile('rb')
        for line in f:
            c.sendall(name + b' ' + line)
    except OSError:
        pass
    finally:
        c.close()
def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('::', port)); s.listen(1024)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(('::', port))
    while True:
        d, a = u.recvfrom(65535)
        u.sendto(name + b' ' + d, a)
threading.Thread(target=udp, daemon=True).start()
tcp()
"#;

/// Starts a TCP+UDP echo server in `ns` answering `<name> <request>`.
pub fn echo_server(ns: &Netns, name: &str, port: u16) -> Proc {
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", ECHO_PY, name])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn echo server");
    Proc(child)
}

/// Polls until `f` returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request on a connected echo stream: returns the backend's name.
pub fn ask(conn: &mut BufReader<TcpStream>, msg: &str) -> std::io::Result<String> {
    conn.get_mut().write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let mut it = line.split_whitespace();
    match (it.next(), it.next()) {
        (Some(name), Some(echo)) if echo == msg => Ok(name.to_string()),
        _ => Err(std::io::Error::other(format!("bad reply {line:?}"))),
    }
}

pub fn connect(addr: SocketAddr) -> std::io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

/// One connection, one request: which backend answered.
pub fn which_backend(addr: SocketAddr) -> std::io::Result<String> {
    let mut c = connect(addr)?;
    ask(&mut c, "hi")
}

/// One UDP datagram: which backend answered.
pub fn which_backend_udp(addr: SocketAddr) -> std::io::Result<String> {
    let bind: SocketAddr = match addr.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        IpAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    let u = UdpSocket::bind(bind)?;
    u.set_read_timeout(Some(Duration::from_secs(1)))?;
    u.send_to(b"hi", addr)?;
    let mut buf = [0u8; 256];
    let (n, from) = u.recv_from(&mut buf)?;
    if from != addr {
        return Err(std::io::Error::other(format!(
            "reply from {from}, expected the frontend {addr}"
        )));
    }
    let s = String::from_utf8_lossy(&buf[..n]).to_string();
    s.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| std::io::Error::other("empty reply"))
}

/// Node + client pod + three backend pods (+ an external host for
/// NodePort), veth pairs, routes; echo servers on port 8080 in each backend.
pub struct Topology {
    // Declared first so the servers are killed before their namespaces go.
    pub servers: Vec<Proc>,
    pub node: Netns,
    pub client: Netns,
    pub backends: Vec<Netns>,
    pub external: Netns,
    /// Node-side interface names to attach to.
    pub node_ifaces: Vec<String>,
}

pub const NODE_EXT_IP: &str = "192.168.77.1";

pub fn backend_ip(i: usize) -> String {
    format!("10.244.{}.2", 10 + i)
}
pub fn backend_ip6(i: usize) -> String {
    format!("fd00:244:{}::2", 10 + i)
}

impl Topology {
    pub fn new(tag: &str) -> Self {
        Self::with_servers(tag, echo_server)
    }

    /// Like [`Topology::new`] with another server in each backend pod.
    pub fn with_servers(tag: &str, spawn: impl Fn(&Netns, &str, u16) -> Proc) -> Self {
        let p = format!("mb{}-{tag}", std::process::id());
        let node = Netns::new(format!("{p}-node"));
        let client = Netns::new(format!("{p}-client"));
        let external = Netns::new(format!("{p}-ext"));
        node.sysctl("net.ipv4.ip_forward=1");
        node.sysctl("net.ipv6.conf.all.forwarding=1");
        node.sysctl("net.ipv4.conf.all.rp_filter=0");
        node.sysctl("net.ipv4.conf.default.rp_filter=0");
        let mut node_ifaces = Vec::new();

        let mut pod = |ns: &Netns, host_if: &str, v4_net: String, v6_net: String| {
            node.ip(&[
                "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            node.ip(&["addr", "add", &format!("{v4_net}.1/24"), "dev", host_if]);
            node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6_net}::1/64"),
                "dev",
                host_if,
                "nodad",
            ]);
            node.ip(&["link", "set", host_if, "up"]);
            ns.ip(&["addr", "add", &format!("{v4_net}.2/24"), "dev", "eth0"]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6_net}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", &format!("{v4_net}.1")]);
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("{v6_net}::1"),
            ]);
            node.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter=0"));
            node_ifaces.push(host_if.to_string());
        };
        pod(&client, "hc", "10.244.1".into(), "fd00:244:1".into());
        let mut backends = Vec::new();
        for i in 1..=3 {
            let be = Netns::new(format!("{p}-be{i}"));
            pod(
                &be,
                &format!("hb{i}"),
                format!("10.244.{}", 10 + i),
                format!("fd00:244:{}", 10 + i),
            );
            backends.push(be);
        }
        pod(&external, "hx", "192.168.77".into(), "fd00:77:0".into());

        let servers: Vec<Proc> = backends
            .iter()
            .enumerate()
            .map(|(i, ns)| spawn(ns, &format!("be{}", i + 1), 8080))
            .collect();
        let topo = Topology {
            node,
            client,
            backends,
            external,
            servers,
            node_ifaces,
        };
        // Ready when each backend answers directly, over IPv4 and IPv6,
        // from the node and from the client pod (this also settles neighbour
        // discovery, which IPv6 otherwise does on the first, timed, packet).
        for i in 1..=3 {
            let want = format!("be{i}");
            for a in [
                format!("{}:8080", backend_ip(i)),
                format!("[{}]:8080", backend_ip6(i)),
            ] {
                let addr: SocketAddr = a.parse().unwrap();
                for ns in [&topo.node, &topo.client] {
                    let what = format!("echo server {want} at {a} from {}", ns.name);
                    wait_for(&what, Duration::from_secs(15), || {
                        ns.run(|| which_backend(addr).ok()).filter(|n| *n == want)
                    });
                }
            }
        }
        topo
    }

    pub fn attach_all(&self, dp: &mut Datapath) {
        let ifs = self.node_ifaces.clone();
        self.node.run(|| {
            for i in &ifs {
                dp.attach(i).unwrap_or_else(|e| panic!("attach {i}: {e}"));
            }
        });
    }

    pub fn client_run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.client.run(f)
    }
}
pub mod pkt;
