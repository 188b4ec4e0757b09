//! eBPF host routing and the socket LB on a real kernel, in namespaces this
//! test creates (`mbh-<pid>-…`): a node with pod veths, echo servers in the
//! pods, and for the socket LB a cgroup of its own holding the client.
//!
//! Host routing is proven by the node's forwarding being off: with it, pod →
//! pod and pod → ClusterIP → pod still pass (and the redirect counters
//! count them); with legacy routing the same requests fail until forwarding
//! is turned back on.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Netns, PinDir, Proc, echo_server, prerequisites, wait_for, which_backend};
use membrane_ebpf::{Datapath, HostRouting, SockLb, Stat};
use membrane_lb::maglev::BackendState;
use membrane_lb::service::{
    Algorithm, Backend, DesiredState, FrontendType, L3n4Addr, Protocol, ServiceEntry, ServiceName,
};

const VIP: &str = "10.96.14.10";
const VIP6: &str = "fd00:96::14:10";
const NODE_PORT: u16 = 30_140;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn entry(
    frontend: (&str, u16),
    kind: FrontendType,
    proto: Protocol,
    backends: &[&str],
) -> ServiceEntry {
    let mut bes: Vec<Backend> = backends
        .iter()
        .map(|b| Backend {
            addr: L3n4Addr::new(ip(b), 8080, proto),
            state: BackendState::Active,
            weight: 100,
            cluster_id: 0,
        })
        .collect();
    bes.sort_by_key(|b| b.addr);
    ServiceEntry {
        name: ServiceName {
            namespace: "default".into(),
            name: "echo".into(),
        },
        port_name: String::new(),
        frontend: L3n4Addr::new(ip(frontend.0), frontend.1, proto),
        kind,
        backends: bes,
        algorithm: Algorithm::Random,
        affinity_timeout: None,
        affinity: Default::default(),
    }
}

fn desired(mut v: Vec<ServiceEntry>) -> DesiredState {
    v.sort_by_key(|e| e.frontend);
    DesiredState { services: v }
}

/// One pod: its namespace, host-side device and addresses.
struct Pod {
    ns: Netns,
    host_if: String,
    v4: String,
    v6: String,
}

impl Pod {
    fn mac(&self) -> [u8; 6] {
        let out = Command::new("ip")
            .args(["-n", &self.ns.name, "-br", "link", "show", "eth0"])
            .output()
            .expect("ip link");
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text.split_whitespace().nth(2).expect("mac column");
        let mut b = [0u8; 6];
        for (i, p) in mac.split(':').enumerate() {
            b[i] = u8::from_str_radix(p, 16).expect("hex");
        }
        b
    }
}

/// Node namespace + pods (`10.244.14<i>.2`, gateway `.1` on `mbh<i>`).
struct Topo {
    // Declared first: the servers die before their namespaces go.
    _servers: Vec<Proc>,
    pods: Vec<Pod>,
    node: Netns,
}

impl Topo {
    fn new(tag: &str, n: usize) -> Self {
        let p = format!("mbh-{}-{tag}", std::process::id());
        let node = Netns::new(format!("{p}-node"));
        node.sysctl("net.ipv4.ip_forward=1");
        node.sysctl("net.ipv6.conf.all.forwarding=1");
        node.sysctl("net.ipv4.conf.all.rp_filter=0");
        node.sysctl("net.ipv4.conf.default.rp_filter=0");
        let mut pods = Vec::new();
        for i in 1..=n {
            let ns = Netns::new(format!("{p}-pod{i}"));
            let host_if = format!("mbh{i}");
            let v4 = format!("10.244.14{i}");
            let v6 = format!("fd00:244:14{i}");
            node.ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            node.ip(&["addr", "add", &format!("{v4}.1/24"), "dev", &host_if]);
            node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}::1/64"),
                "dev",
                &host_if,
                "nodad",
            ]);
            node.ip(&["link", "set", &host_if, "up"]);
            ns.ip(&["addr", "add", &format!("{v4}.2/24"), "dev", "eth0"]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", &format!("{v4}.1")]);
            ns.ip(&["-6", "route", "add", "default", "via", &format!("{v6}::1")]);
            node.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter=0"));
            pods.push(Pod {
                ns,
                host_if,
                v4: format!("{v4}.2"),
                v6: format!("{v6}::2"),
            });
        }
        let servers = pods
            .iter()
            .enumerate()
            .map(|(i, p)| echo_server(&p.ns, &format!("pod{}", i + 1), 8080))
            .collect();
        let topo = Topo {
            _servers: servers,
            pods,
            node,
        };
        // Every server answers from the node (this also settles neighbour
        // discovery before any timed request).
        for (i, p) in topo.pods.iter().enumerate() {
            let want = format!("pod{}", i + 1);
            for a in [format!("{}:8080", p.v4), format!("[{}]:8080", p.v6)] {
                let addr: SocketAddr = a.parse().expect("addr");
                wait_for(&format!("{want} at {a}"), Duration::from_secs(15), || {
                    topo.node
                        .run(|| which_backend(addr).ok())
                        .filter(|n| *n == want)
                });
            }
        }
        topo
    }

    fn attach(&self, dp: &mut Datapath, register: bool) {
        self.node.run(|| {
            for p in &self.pods {
                dp.attach(&p.host_if).expect("attach");
                if register {
                    let host_mac = host_mac(&p.host_if);
                    dp.upsert_endpoint(
                        &p.host_if,
                        &[ip(&p.v4), ip(&p.v6)],
                        false,
                        Some((p.mac(), host_mac)),
                    )
                    .expect("register endpoint");
                }
            }
        });
    }

    fn forwarding(&self, on: bool) {
        let v = u8::from(on);
        self.node.sysctl(&format!("net.ipv4.ip_forward={v}"));
        self.node
            .sysctl(&format!("net.ipv6.conf.all.forwarding={v}"));
    }
}

/// MAC of a device in the calling thread's namespace.
fn host_mac(ifname: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-br", "link", "show", ifname])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text.split_whitespace().nth(2).expect("mac column");
    let mut b = [0u8; 6];
    for (i, p) in mac.split(':').enumerate() {
        b[i] = u8::from_str_radix(p, 16).expect("hex");
    }
    b
}

fn udp_ask(to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("bind")
    } else {
        "[::]:0".parse().expect("bind")
    };
    let u = UdpSocket::bind(bind)?;
    u.set_read_timeout(Some(Duration::from_secs(1)))?;
    u.send_to(b"hi", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = u.recv_from(&mut buf)?;
    let name = String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok((name, from))
}

fn services(topo: &Topo) -> DesiredState {
    let be = [topo.pods[1].v4.as_str()];
    let be6 = [topo.pods[1].v6.as_str()];
    desired(vec![
        entry((VIP, 80), FrontendType::ClusterIP, Protocol::Tcp, &be),
        entry((VIP, 53), FrontendType::ClusterIP, Protocol::Udp, &be),
        entry((VIP6, 80), FrontendType::ClusterIP, Protocol::Tcp, &be6),
    ])
}

#[test]
fn host_routing_forwards_without_the_host_stack() {
    if !prerequisites() {
        return;
    }
    if let Err(why) = membrane_ebpf::probe_host_routing() {
        let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
        assert!(!ci, "kernel lacks eBPF host routing (CI=true): {why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let topo = Topo::new("hr", 2);
    let (a, b) = (&topo.pods[0], &topo.pods[1]);
    let direct: SocketAddr = format!("{}:8080", b.v4).parse().expect("addr");
    let direct6: SocketAddr = format!("[{}]:8080", b.v6).parse().expect("addr");
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let vip_udp: SocketAddr = format!("{VIP}:53").parse().expect("addr");
    let vip6: SocketAddr = format!("[{VIP6}]:80").parse().expect("addr");

    {
        let pins = PinDir::new("mbh-hr");
        let mut dp = Datapath::load(pins.config(251)).expect("load");
        assert_eq!(dp.host_routing(), &HostRouting::Bpf);
        topo.attach(&mut dp, true);
        dp.sync(&services(&topo)).expect("sync");
        assert_eq!(
            dp.endpoint_entries().len(),
            4,
            "{:?}",
            dp.endpoint_entries()
        );
        topo.forwarding(false);

        let (d, d6, v, v6, u) = a.ns.run(|| {
            (
                which_backend(direct),
                which_backend(direct6),
                which_backend(vip),
                which_backend(vip6),
                udp_ask(vip_udp),
            )
        });
        assert_eq!(d.expect("pod → pod, forwarding off"), "pod2");
        assert_eq!(d6.expect("pod → pod over IPv6, forwarding off"), "pod2");
        assert_eq!(v.expect("pod → ClusterIP → pod, forwarding off"), "pod2");
        assert_eq!(v6.expect("pod → IPv6 ClusterIP → pod"), "pod2");
        let (name, from) = u.expect("UDP via ClusterIP, forwarding off");
        assert_eq!((name.as_str(), from), ("pod2", vip_udp));

        let st = dp.stats().expect("stats");
        // Both directions of 5 exchanges went pod to pod by redirect_peer.
        assert!(st[&Stat::HostRoutePeer] >= 10, "{st:?}");
        assert_eq!(st[&Stat::HostRouteEgress], 0, "{st:?}");
        assert!(st[&Stat::FwdNew] >= 3, "{st:?}");
        assert!(st[&Stat::RevNat] >= 3, "{st:?}");

        // Unregistered, the pods are reached through the FIB instead
        // (still no host stack).
        topo.node.run(|| {
            dp.remove_endpoint(&b.host_if).expect("remove");
        });
        assert_eq!(dp.endpoint_entries().len(), 2);
        let fib_before = dp.stats().expect("stats")[&Stat::HostRouteFib];
        let r = a.ns.run(|| which_backend(direct));
        // bpf_fib_lookup refuses to forward while forwarding is off: the
        // packet goes to the stack, which drops it. With forwarding on the
        // FIB path carries it.
        assert!(r.is_err(), "no endpoint entry, forwarding off: {r:?}");
        topo.forwarding(true);
        let r = a.ns.run(|| which_backend(direct));
        assert_eq!(r.expect("FIB path"), "pod2");
        let fib_after = dp.stats().expect("stats")[&Stat::HostRouteFib];
        assert!(fib_after > fib_before, "{fib_before} → {fib_after}");
        // Pins dropped here: the programs detach.
    }

    // Legacy routing: the same requests need the host stack's forwarding.
    let pins = PinDir::new("mbh-legacy");
    let mut cfg = pins.config(251);
    cfg.host_routing = false;
    let mut dp = Datapath::load(cfg).expect("load legacy");
    assert!(
        matches!(dp.host_routing(), HostRouting::Legacy { .. }),
        "{:?}",
        dp.host_routing()
    );
    topo.attach(&mut dp, true);
    dp.sync(&services(&topo)).expect("sync");
    topo.forwarding(false);
    let (d, v) = a.ns.run(|| (which_backend(direct), which_backend(vip)));
    assert!(d.is_err(), "legacy, forwarding off, pod → pod: {d:?}");
    assert!(v.is_err(), "legacy, forwarding off, pod → ClusterIP: {v:?}");
    topo.forwarding(true);
    let (d, v) = a.ns.run(|| (which_backend(direct), which_backend(vip)));
    assert_eq!(d.expect("legacy, forwarding on"), "pod2");
    assert_eq!(v.expect("legacy, forwarding on, ClusterIP"), "pod2");
    let st = dp.stats().expect("stats");
    assert_eq!(st[&Stat::HostRoutePeer], 0, "{st:?}");
    assert_eq!(st[&Stat::HostRouteFib], 0, "{st:?}");
}

#[test]
fn policy_flag_delivers_through_the_egress_hook() {
    if !prerequisites() {
        return;
    }
    if membrane_ebpf::probe_host_routing().is_err() {
        let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
        assert!(!ci, "kernel lacks eBPF host routing (CI=true)");
        return;
    }
    let topo = Topo::new("eg", 2);
    let pins = PinDir::new("mbh-eg");
    let mut dp = Datapath::load(pins.config(251)).expect("load");
    topo.node.run(|| {
        for p in &topo.pods {
            dp.attach(&p.host_if).expect("attach");
            dp.upsert_endpoint(&p.host_if, &[ip(&p.v4), ip(&p.v6)], true, None)
                .expect("register");
        }
    });
    topo.forwarding(false);
    let direct: SocketAddr = format!("{}:8080", topo.pods[1].v4).parse().expect("addr");
    let r = topo.pods[0].ns.run(|| which_backend(direct));
    assert_eq!(r.expect("pod → pod through the egress hook"), "pod2");
    let st = dp.stats().expect("stats");
    assert!(st[&Stat::HostRouteEgress] >= 2, "{st:?}");
    assert_eq!(st[&Stat::HostRoutePeer], 0, "{st:?}");
}

/// A cgroup v2 directory of this test's own, removed on drop (after the
/// processes in it exited).
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(tag: &str) -> Option<Self> {
        let name = format!("membrane-test-hostpath-{}-{tag}", std::process::id());
        // cgroup v2 at /sys/fs/cgroup, or (hybrid hosts) at its unified/.
        let base = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists())?;
        let p = base.join(name);
        let _ = std::fs::remove_dir(&p);
        std::fs::create_dir(&p).expect("mkdir cgroup");
        Some(Cgroup(p))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

const CLIENT_PY: &str = r#"
import json, os, socket, sys
cg, vip, vip6, node, nport = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
if cg:
    with open(os.path.join(cg, 'cgroup.procs'), 'w') as f:
        f.write(str(os.getpid()))
out = {}
def tcp(fam, addr):
    try:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(addr)
        peer = s.getpeername()[:2]
        s.sendall(b'hi\n')
        name = s.makefile('rb').readline().split()[0].decode()
        return {'name': name, 'peer': [peer[0], peer[1]]}
    except OSError as e:
        return {'error': str(e)}
def udp(fam, addr, connected):
    try:
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.settimeout(2)
        if connected:
            u.connect(addr)
            u.send(b'hi')
            d = u.recv(256)
            frm = u.getpeername()[:2]
        else:
            u.sendto(b'hi', addr)
            d, frm = u.recvfrom(256)
        return {'name': d.split()[0].decode(), 'from': [frm[0], frm[1]]}
    except OSError as e:
        return {'error': str(e)}
out['tcp4'] = tcp(socket.AF_INET, (vip, 80))
out['tcp6'] = tcp(socket.AF_INET6, (vip6, 80))
out['udp4'] = udp(socket.AF_INET, (vip, 53), False)
out['udp4c'] = udp(socket.AF_INET, (vip, 53), True)
out['udp6'] = udp(socket.AF_INET6, (vip6, 53), False)
out['nodeport'] = tcp(socket.AF_INET, (node, nport))
out['tcp6mapped'] = tcp(socket.AF_INET6, ('::ffff:' + vip, 80))
out['udp6mapped'] = udp(socket.AF_INET6, ('::ffff:' + vip, 53), False)
print(json.dumps(out))
"#;

fn run_client(node: &Netns, cgroup: Option<&Cgroup>, node_addr: &str) -> serde_json::Value {
    let cg = cgroup
        .map(|c| c.0.display().to_string())
        .unwrap_or_default();
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", node.name))
        .args(["python3", "-c", CLIENT_PY, &cg, VIP, VIP6, node_addr])
        .arg(NODE_PORT.to_string())
        .output()
        .expect("run client");
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client JSON")
}

#[test]
fn socket_lb_serves_host_processes_in_its_cgroup() {
    if !prerequisites() {
        return;
    }
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    let Some(cg) = Cgroup::new("sock") else {
        assert!(!ci, "no cgroup v2 hierarchy (CI=true)");
        eprintln!("SKIPPED: no cgroup v2 hierarchy");
        return;
    };
    let topo = Topo::new("sk", 1);
    let pod = &topo.pods[0];
    // The node's own address: the gateway address on the pod's veth.
    let node_addr = "10.244.141.1";
    let pins = PinDir::new("mbh-sock");
    let cfg = pins.config(251);
    let mut dp = Datapath::load(cfg.clone()).expect("load");
    let be = [pod.v4.as_str()];
    let be6 = [pod.v6.as_str()];
    dp.sync(&desired(vec![
        entry((VIP, 80), FrontendType::ClusterIP, Protocol::Tcp, &be),
        entry((VIP, 53), FrontendType::ClusterIP, Protocol::Udp, &be),
        entry((VIP6, 80), FrontendType::ClusterIP, Protocol::Tcp, &be6),
        entry((VIP6, 53), FrontendType::ClusterIP, Protocol::Udp, &be6),
        entry(
            (node_addr, NODE_PORT),
            FrontendType::NodePort,
            Protocol::Tcp,
            &be,
        ),
    ]))
    .expect("sync");

    // Control: before the socket LB, the node's processes reach nothing.
    let before = run_client(&topo.node, Some(&cg), node_addr);
    assert!(before["tcp4"]["error"].is_string(), "{before}");
    assert!(before["udp4"]["error"].is_string(), "{before}");

    let sock = SockLb::attach(&cfg, &cg.0).expect("attach socket LB");
    assert_eq!(sock.attached(), 8);
    let r = run_client(&topo.node, Some(&cg), node_addr);
    let name = |k: &str| r[k]["name"].as_str().map(str::to_string);
    for k in [
        "tcp4",
        "tcp6",
        "udp4",
        "udp4c",
        "udp6",
        "nodeport",
        "tcp6mapped",
        "udp6mapped",
    ] {
        assert_eq!(name(k).as_deref(), Some("pod1"), "{k}: {r}");
    }
    // The application sees the service, never the backend.
    assert_eq!(r["tcp4"]["peer"], serde_json::json!([VIP, 80]), "{r}");
    assert_eq!(r["tcp6"]["peer"], serde_json::json!([VIP6, 80]), "{r}");
    assert_eq!(r["udp4"]["from"], serde_json::json!([VIP, 53]), "{r}");
    assert_eq!(r["udp4c"]["from"], serde_json::json!([VIP, 53]), "{r}");
    assert_eq!(r["udp6"]["from"], serde_json::json!([VIP6, 53]), "{r}");
    assert_eq!(
        r["nodeport"]["peer"],
        serde_json::json!([node_addr, NODE_PORT]),
        "{r}"
    );
    // Dual-stack sockets: an IPv4-mapped service address is the IPv4 one.
    let mapped = format!("::ffff:{VIP}");
    assert_eq!(
        r["tcp6mapped"]["peer"],
        serde_json::json!([mapped, 80]),
        "{r}"
    );
    assert_eq!(
        r["udp6mapped"]["from"],
        serde_json::json!([mapped, 53]),
        "{r}"
    );
    let st = dp.stats().expect("stats");
    assert!(st[&Stat::SockTranslate] >= 8, "{st:?}");
    assert!(st[&Stat::SockRev] >= 5, "{st:?}");

    // A process outside the cgroup is not translated.
    let outside = run_client(&topo.node, None, node_addr);
    assert!(outside["tcp4"]["error"].is_string(), "{outside}");

    // Pinned: the translation outlives the loader, until the pins go.
    drop(sock);
    let r = run_client(&topo.node, Some(&cg), node_addr);
    assert_eq!(r["tcp4"]["name"], "pod1", "{r}");
    SockLb::remove_pins(&cfg.pin_dir, &cg.0).expect("remove pins");
    let r = run_client(&topo.node, Some(&cg), node_addr);
    assert!(r["tcp4"]["error"].is_string(), "{r}");
}

const POD_CLIENT_PY: &str = r#"
import json, os, socket, sys
cg, vip, vip6 = sys.argv[1], sys.argv[2], sys.argv[3]
if cg:
    with open(os.path.join(cg, 'cgroup.procs'), 'w') as f:
        f.write(str(os.getpid()))
def tcp(fam, addr):
    try:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(addr)
        peer = s.getpeername()[:2]
        s.sendall(b'hi\n')
        name = s.makefile('rb').readline().split()[0].decode()
        return {'name': name, 'peer': [peer[0], peer[1]]}
    except OSError as e:
        return {'error': str(e)}
print(json.dumps({'tcp4': tcp(socket.AF_INET, (vip, 80)), 'tcp6': tcp(socket.AF_INET6, (vip6, 80))}))
"#;

/// A process in `pod`'s namespace (and in `cgroup`, when given) connects
/// to the ClusterIPs.
fn run_pod_client(pod: &Pod, cgroup: Option<&Cgroup>) -> serde_json::Value {
    let cg = cgroup
        .map(|c| c.0.display().to_string())
        .unwrap_or_default();
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", pod.ns.name))
        .args(["python3", "-c", POD_CLIENT_PY, &cg, VIP, VIP6])
        .output()
        .expect("run pod client");
    assert!(
        out.status.success(),
        "pod client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("pod client JSON")
}

/// Differences of the counters between two snapshots.
fn stat_delta(
    before: &std::collections::BTreeMap<Stat, u64>,
    after: &std::collections::BTreeMap<Stat, u64>,
    s: Stat,
) -> u64 {
    after[&s] - before[&s]
}

/// Cilium's default datapath with kube-proxy replacement: the socket LB
/// (at the cgroup root, so pods too) translates a pod's connection to a
/// ClusterIP at connect(); its packets go to the backend as they are, and
/// the tc program only forwards them (host routing: the node's forwarding
/// is off). getpeername still shows the ClusterIP. A frontend redirected
/// to a local proxy is left to the tc program, which needs it in the packet.
#[test]
fn socket_lb_serves_a_pod_and_tc_only_forwards() {
    if !prerequisites() {
        return;
    }
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    if membrane_ebpf::probe_host_routing().is_err() {
        assert!(!ci, "kernel lacks eBPF host routing (CI=true)");
        return;
    }
    let Some(cg) = Cgroup::new("podsock") else {
        assert!(!ci, "no cgroup v2 hierarchy (CI=true)");
        eprintln!("SKIPPED: no cgroup v2 hierarchy");
        return;
    };
    let topo = Topo::new("ps", 2);
    let (client, server) = (&topo.pods[0], &topo.pods[1]);
    let pins = PinDir::new("mbh-podsock");
    let cfg = pins.config(251);
    let mut dp = Datapath::load(cfg.clone()).expect("load");
    topo.attach(&mut dp, true);
    dp.sync(&desired(vec![
        entry(
            (VIP, 80),
            FrontendType::ClusterIP,
            Protocol::Tcp,
            &[server.v4.as_str()],
        ),
        entry(
            (VIP6, 80),
            FrontendType::ClusterIP,
            Protocol::Tcp,
            &[server.v6.as_str()],
        ),
    ]))
    .expect("sync");
    topo.forwarding(false);
    let vip4 = serde_json::json!([VIP, 80]);
    let vip6 = serde_json::json!([VIP6, 80]);

    // Control: a pod process outside the cgroup is translated by tc.
    let before = dp.stats().expect("stats");
    let r = run_pod_client(client, None);
    let after = dp.stats().expect("stats");
    for (k, peer) in [("tcp4", &vip4), ("tcp6", &vip6)] {
        assert_eq!(r[k]["name"], "pod2", "{k}: {r}");
        assert_eq!(&r[k]["peer"], peer, "{k}: {r}");
    }
    assert_eq!(stat_delta(&before, &after, Stat::FwdNew), 2, "{after:?}");
    assert_eq!(stat_delta(&before, &after, Stat::SockTranslate), 0);

    // In the socket LB's cgroup: translated at connect, not by tc.
    let sock = SockLb::attach(&cfg, &cg.0).expect("attach socket LB");
    let before = dp.stats().expect("stats");
    let r = run_pod_client(client, Some(&cg));
    let after = dp.stats().expect("stats");
    for (k, peer) in [("tcp4", &vip4), ("tcp6", &vip6)] {
        assert_eq!(r[k]["name"], "pod2", "{k}: {r}");
        // The application sees the service, never the backend.
        assert_eq!(&r[k]["peer"], peer, "{k}: {r}");
    }
    let d = |s| stat_delta(&before, &after, s);
    assert_eq!(d(Stat::SockTranslate), 2, "{after:?}");
    assert!(d(Stat::SockRev) >= 2, "{after:?}");
    for s in [Stat::FwdNew, Stat::FwdEstablished, Stat::RevNat] {
        assert_eq!(
            d(s),
            0,
            "tc translated socket LB traffic ({s:?}): {after:?}"
        );
    }
    // Both directions of both connections went by host routing.
    assert!(d(Stat::HostRoutePeer) >= 8, "{after:?}");

    // A frontend the tc program hands to a local proxy: the socket LB
    // leaves it for pods. No proxy listens here, so tc drops and counts.
    let mut want = std::collections::BTreeMap::new();
    want.insert(
        L3n4Addr::new(ip(VIP), 80, Protocol::Tcp),
        "127.0.0.1:15001".parse::<SocketAddr>().expect("addr"),
    );
    dp.sync_redirects(&want).expect("redirects");
    let before = dp.stats().expect("stats");
    let r = run_pod_client(client, Some(&cg));
    let after = dp.stats().expect("stats");
    assert!(r["tcp4"]["error"].is_string(), "{r}");
    assert_eq!(r["tcp6"]["name"], "pod2", "{r}");
    assert_eq!(stat_delta(&before, &after, Stat::SockTranslate), 1);
    assert!(stat_delta(&before, &after, Stat::DropNoListener) >= 1);
    dp.sync_redirects(&Default::default()).expect("redirects");
    let r = run_pod_client(client, Some(&cg));
    assert_eq!(r["tcp4"]["name"], "pod2", "{r}");

    drop(sock);
    SockLb::remove_pins(&cfg.pin_dir, &cg.0).expect("remove pins");
}
