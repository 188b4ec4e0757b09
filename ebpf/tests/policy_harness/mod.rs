//! Policy test harness: endpoints behind host-side devices in a "node"
//! namespace, the policy datapath attached to them, and probes with real
//! packets. Endpoints come from [`PolicyTopology`] (veth pairs made here)
//! or, later, from the CNI: [`PolicyHarness`] only needs each endpoint's
//! labels, addresses, namespace and host-side device.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use membrane_ebpf::{PolicyConfig, PolicyDatapath};
use membrane_policy::rules::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use membrane_policy::{Cluster, Endpoint, Identities, NamedPort, PolicySet, State, Verdict};

use crate::common::{Netns, PinDir, Proc, sh, wait_for};
// The probe script and `Probe` live in `policy_cases`, shared with the
// runs through `membrane up` (membrane/tests).
use crate::policy_cases::SERVER_PY;
pub use crate::policy_cases::{Probe, probe};

/// Ports every pod serves over TCP and UDP.
pub const PORTS: [u16; 6] = [79, 80, 81, 443, 444, 445];

/// `LATE_PEER_PY PORT DELAY_MS`: answers each datagram at once and again
/// after DELAY_MS (a reply arriving after the flow went quiet).
pub const LATE_PEER_PY: &str = r#"
import socket, sys, threading
port, delay = int(sys.argv[1]), int(sys.argv[2]) / 1000.0
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(('::', port))
while True:
    d, a = u.recvfrom(64)
    u.sendto(b'ok', a)
    threading.Timer(delay, u.sendto, (b'again', a)).start()
"#;

/// One endpoint of the harness: a pod in its own network namespace.
#[derive(Debug, Clone)]
pub struct Pod {
    pub endpoint: Endpoint,
    /// The pod's network namespace (`ip netns` name).
    pub netns: String,
    /// The host-side device in the node namespace.
    pub host_if: String,
}

impl Pod {
    pub fn v4(&self) -> IpAddr {
        self.endpoint.ips[0]
    }
    pub fn v6(&self) -> IpAddr {
        self.endpoint.ips[1]
    }
}

impl Probe {
    pub fn proto_port(self, v6: bool) -> (u8, u16) {
        match self {
            Probe::Tcp(p) => (PROTO_TCP, p),
            Probe::Udp(p) | Probe::UdpRefused(p) => (PROTO_UDP, p),
            Probe::LateReply(p, _) => (PROTO_UDP, p),
            Probe::IcmpError(_) => (if v6 { PROTO_ICMPV6 } else { PROTO_ICMP }, 3),
            Probe::Icmp(t, _) => (if v6 { PROTO_ICMPV6 } else { PROTO_ICMP }, t as u16),
        }
    }
}

/// The datapath, the cluster model and the endpoints it enforces on.
pub struct PolicyHarness {
    pub dp: PolicyDatapath,
    pub cluster: Cluster,
    pub pods: Vec<Pod>,
    /// host-side ifindex per endpoint id.
    pub ifindex: BTreeMap<u32, u32>,
    pub ids: Identities,
    pub state: Option<State>,
    node: String,
}

impl PolicyHarness {
    /// Loads the datapath and attaches it to every pod's host device
    /// (inside `node`).
    pub fn new(pins: &PinDir, node: &Netns, cluster: Cluster, pods: Vec<Pod>) -> Self {
        Self::with_config(pins, node, cluster, pods, &PolicyConfig::default())
    }

    pub fn with_config(
        pins: &PinDir,
        node: &Netns,
        cluster: Cluster,
        pods: Vec<Pod>,
        cfg: &PolicyConfig,
    ) -> Self {
        let mut dp = PolicyDatapath::load_with(&pins.0, cfg).expect("load policy datapath");
        let mut ifindex = BTreeMap::new();
        node.run(|| {
            for p in &pods {
                let i = dp
                    .attach(&p.host_if)
                    .unwrap_or_else(|e| panic!("attach {}: {e}", p.host_if));
                ifindex.insert(p.endpoint.id, i);
            }
        });
        PolicyHarness {
            dp,
            cluster,
            pods,
            ifindex,
            ids: Identities::default(),
            state: None,
            node: node.name.clone(),
        }
    }

    /// Replaces the applied policies with `yaml` (CNP/CCNP/NetworkPolicy
    /// documents) and programs every endpoint.
    pub fn apply(&mut self, yaml: &str) -> usize {
        let set = parse_policies(yaml);
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        self.apply_set(set)
    }

    /// Like [`PolicyHarness::apply`] for policies with parts in error;
    /// returns the errors.
    pub fn apply_with_errors(&mut self, yaml: &str) -> Vec<String> {
        let set = parse_policies(yaml);
        let errors = set.errors.iter().map(ToString::to_string).collect();
        self.apply_set(set);
        errors
    }

    fn apply_set(&mut self, set: PolicySet) -> usize {
        let state = State::build(&self.cluster, set, self.ids.clone());
        self.ids = state.identities.clone();
        self.dp.sync_ipcache(&state.ipcache).expect("ipcache");
        let mut written = 0;
        for p in &self.pods {
            let pol = state.compile(p.endpoint.id).expect("endpoint compiles");
            let r = self
                .dp
                .sync_endpoint(self.ifindex[&p.endpoint.id], &pol)
                .expect("sync endpoint");
            written += r.entries_written;
        }
        self.state = Some(state);
        written
    }

    pub fn pod(&self, ns: &str, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.endpoint.namespace == ns && p.endpoint.name == name)
            .unwrap_or_else(|| panic!("no pod {ns}/{name}"))
    }

    /// What the pure model says about a packet, with the deciding rule.
    pub fn expect(&self, src: IpAddr, dst: IpAddr, p: Probe) -> (Verdict, String) {
        let (proto, port) = p.proto_port(dst.is_ipv6());
        let t = self
            .state
            .as_ref()
            .expect("a policy was applied")
            .trace(src, dst, proto, port);
        let why = t
            .deciding()
            .map(|d| d.reason.to_string())
            .unwrap_or_default();
        (t.verdict, why)
    }

    /// Sends a probe and checks it against `want` and against the model.
    #[track_caller]
    pub fn check(
        &self,
        from_ns: &str,
        src: IpAddr,
        dst: IpAddr,
        p: Probe,
        want: Verdict,
    ) -> String {
        let (model, why) = self.expect(src, dst, p);
        assert_eq!(model, want, "model: {src} -> {dst} {p:?}: {why}");
        let got = probe(from_ns, dst, p, Some(src));
        let got = if got { Verdict::Allow } else { Verdict::Deny };
        assert_eq!(got, want, "kernel: {src} -> {dst} {p:?} (model: {why})");
        why
    }
}

pub fn parse_policies(yaml: &str) -> PolicySet {
    let mut set = PolicySet::default();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if v.is_null() {
            continue;
        }
        match v["kind"].as_str() {
            Some("CiliumNetworkPolicy") => set.add_cnp(&serde_json::from_value(v).expect("cnp")),
            Some("CiliumClusterwideNetworkPolicy") => {
                set.add_ccnp(&serde_json::from_value(v).expect("ccnp"))
            }
            Some("NetworkPolicy") => {
                set.add_network_policy(&serde_json::from_value(v).expect("np"))
            }
            k => panic!("unexpected kind {k:?}"),
        }
    }
    set
}

/// Node + pods (veth pairs) + a "world" namespace holding 192.0.2.0/24
/// and 198.51.100.7, .9 behind the node. Addresses 10.124.0.0/16 and
/// fd00:124::/48 only.
pub struct PolicyTopology {
    // Declared first so servers die before their namespaces.
    pub servers: Vec<Proc>,
    pub node: Netns,
    pub pod_ns: Vec<Netns>,
    pub world: Netns,
    pub pods: Vec<Pod>,
}

pub const WORLD_ADDRS: [&str; 4] = ["192.0.2.2", "192.0.2.200", "198.51.100.7", "198.51.100.9"];

impl PolicyTopology {
    /// `pods`: (namespace, name) pairs; every pod gets `pod=<name>`.
    pub fn new(tag: &str, pods: &[(&str, &str)]) -> Self {
        let p = format!("mp{}-{tag}", std::process::id());
        let node = Netns::new(format!("{p}-node"));
        node.sysctl("net.ipv4.ip_forward=1");
        node.sysctl("net.ipv6.conf.all.forwarding=1");
        node.sysctl("net.ipv4.conf.all.rp_filter=0");
        node.sysctl("net.ipv4.conf.default.rp_filter=0");
        let world = Netns::new(format!("{p}-world"));
        node.ip(&[
            "link",
            "add",
            "hw",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &world.name,
        ]);
        node.ip(&["addr", "add", "192.0.2.1/24", "dev", "hw"]);
        node.ip(&["link", "set", "hw", "up"]);
        node.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.2"]);
        world.ip(&["addr", "add", "192.0.2.2/24", "dev", "eth0"]);
        world.ip(&["addr", "add", "192.0.2.200/24", "dev", "eth0"]);
        world.ip(&["addr", "add", "198.51.100.7/32", "dev", "eth0"]);
        world.ip(&["addr", "add", "198.51.100.9/32", "dev", "eth0"]);
        world.ip(&["link", "set", "eth0", "up"]);
        world.ip(&["route", "add", "default", "via", "192.0.2.1"]);
        let mut pod_ns = Vec::new();
        let mut out = Vec::new();
        for (i, (ns, name)) in pods.iter().enumerate() {
            let n = 10 + i;
            let pns = Netns::new(format!("{p}-{ns}-{name}"));
            let host_if = format!("lxc{i}");
            node.ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pns.name,
            ]);
            node.ip(&["addr", "add", &format!("10.124.{n}.1/24"), "dev", &host_if]);
            node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:124:{n}::1/64"),
                "dev",
                &host_if,
                "nodad",
            ]);
            node.ip(&["link", "set", &host_if, "up"]);
            node.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter=0"));
            pns.ip(&["addr", "add", &format!("10.124.{n}.2/24"), "dev", "eth0"]);
            pns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:124:{n}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            pns.ip(&["link", "set", "eth0", "up"]);
            pns.ip(&["route", "add", "default", "via", &format!("10.124.{n}.1")]);
            pns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:124:{n}::1"),
            ]);
            out.push(Pod {
                endpoint: Endpoint {
                    id: (i + 1) as u32,
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
                    ips: vec![
                        format!("10.124.{n}.2").parse().expect("ip"),
                        format!("fd00:124:{n}::2").parse().expect("ip"),
                    ],
                    named_ports: vec![NamedPort {
                        name: "serve-81-tcp".into(),
                        proto: PROTO_TCP,
                        port: 81,
                    }],
                },
                netns: pns.name.clone(),
                host_if,
            });
            pod_ns.push(pns);
        }
        let servers = pod_ns
            .iter()
            .chain(std::iter::once(&world))
            .map(|ns| {
                let child = Command::new("ip")
                    .args(["netns", "exec", &ns.name, "python3", "-c", SERVER_PY])
                    .args(PORTS.map(|p| p.to_string()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn server");
                Proc(child)
            })
            .collect();
        let topo = PolicyTopology {
            servers,
            node,
            pod_ns,
            world,
            pods: out,
        };
        // Ready when every pod answers TCP and UDP over both families from
        // the node (this also settles neighbour discovery).
        let world_ip: IpAddr = WORLD_ADDRS[0].parse().expect("ip");
        wait_for("world server", Duration::from_secs(15), || {
            probe(&topo.node.name, world_ip, Probe::Tcp(80), None).then_some(())
        });
        for pod in &topo.pods {
            for dst in [pod.v4(), pod.v6()] {
                for pr in [Probe::Tcp(80), Probe::Udp(80)] {
                    wait_for(
                        &format!("{pr:?} server at {dst}"),
                        Duration::from_secs(15),
                        || probe(&topo.node.name, dst, pr, None).then_some(()),
                    );
                }
            }
        }
        topo
    }

    /// The cluster model of this topology.
    pub fn cluster(&self) -> Cluster {
        let mut namespaces = BTreeMap::new();
        for p in &self.pods {
            let ns = p.endpoint.namespace.clone();
            namespaces.insert(
                ns.clone(),
                BTreeMap::from([
                    ("ns".to_string(), ns.clone()),
                    ("kubernetes.io/metadata.name".to_string(), ns),
                ]),
            );
        }
        let mut host_ips: Vec<IpAddr> = vec!["192.0.2.1".parse().expect("ip")];
        for i in 0..self.pods.len() {
            host_ips.push(format!("10.124.{}.1", 10 + i).parse().expect("ip"));
            host_ips.push(format!("fd00:124:{}::1", 10 + i).parse().expect("ip"));
        }
        Cluster {
            namespaces,
            endpoints: self.pods.iter().map(|p| p.endpoint.clone()).collect(),
            host_ips,
            remote_node_ips: Vec::new(),
            allow_localhost: true,
        }
    }
}

/// `ip netns exec` wrapper for ad-hoc commands.
pub fn in_ns(ns: &str, args: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v);
}
