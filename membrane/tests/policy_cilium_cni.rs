//! Cilium's policy cases through the real path, on the harness of the
//! upstream model (`policy_model_cni`): one `membrane up --enable-cni
//! --datapath ebpf` in a node namespace, pods x/a, x/b, x/c added by the
//! installed `membrane-cni` as a runtime adds them, an outside ("world")
//! namespace routed behind the node, policies applied with `membrane
//! apply` and waited for until the agent has them in force, real packets
//! (TCP, UDP, ICMP echo over IPv4 and IPv6, a crafted ICMP timestamp and
//! echo requests with a chosen ID), and the live `membrane policy trace`
//! naming the deciding rule of an allowed and a denied cell of each case.
//!
//! Cases: external lockdown; `toCIDR` + `toCIDRSet` with `except` and an
//! egress port range 80–444; ICMP echo allowed by `icmps` while TCP and
//! timestamps are dropped; ICMP under an L3-only rule, dropped once a
//! `toPorts` rule appears; CVE-2024-47825; GHSA-c66w-hq56-4q97.
//! Needs root, iproute2, python3 and Envoy (in CI a missing one fails).

mod cni_node;
mod common;
#[path = "../../ebpf/tests/policy_cases/mod.rs"]
mod policy_cases;
mod policy_support;

use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use cni_node::{Netns, Node};
use common::wait_until;
use policy_cases::{Probe, probe};
use policy_support::{Cases, Pods, assert_trace, serve, start_node, trace};

/// This test's ports and LB pool (polcni's ranges).
const HTTP: u16 = 15180;
const HTTPS: u16 = 15543;
const LB_POOL: &str = "127.15.2.0/24";

/// Ports every pod and the world serve over TCP and UDP (the port range
/// case probes both sides of 80–444).
const PORTS: [u16; 6] = [79, 80, 81, 443, 444, 445];

/// The node's address towards the world, and the world's addresses
/// (documentation ranges, only inside this test's namespaces).
const NODE_WORLD: &str = "192.0.2.1";
const WORLD: [&str; 4] = ["192.0.2.2", "192.0.2.200", "198.51.100.7", "198.51.100.9"];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A fresh ICMP echo ID per probe: conntrack must not turn a later probe
/// into a reply of an earlier one (GHSA reuses an ID on purpose).
fn icmp(ty: u8) -> Probe {
    static NEXT: AtomicU16 = AtomicU16::new(0x1000);
    Probe::Icmp(ty, NEXT.fetch_add(1, Ordering::Relaxed))
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The world namespace behind the node: `hw` (node, 192.0.2.1/24) to
/// `eth0` (world, the [`WORLD`] addresses, default route via the node).
fn wire_world(node: &Node, world: &Netns) {
    let n = node.ns.0.as_str();
    let w = world.0.as_str();
    for s in [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        run(&["ip", "netns", "exec", n, "sysctl", "-qw", s]);
    }
    run(&[
        "ip", "-n", n, "link", "add", "hw", "type", "veth", "peer", "name", "eth0", "netns", w,
    ]);
    run(&["ip", "-n", n, "addr", "add", "192.0.2.1/24", "dev", "hw"]);
    run(&["ip", "-n", n, "link", "set", "hw", "up"]);
    run(&["ip", "-n", w, "link", "set", "lo", "up"]);
    run(&["ip", "-n", w, "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    run(&[
        "ip",
        "-n",
        w,
        "addr",
        "add",
        "192.0.2.200/24",
        "dev",
        "eth0",
    ]);
    run(&[
        "ip",
        "-n",
        w,
        "addr",
        "add",
        "198.51.100.7/32",
        "dev",
        "eth0",
    ]);
    run(&[
        "ip",
        "-n",
        w,
        "addr",
        "add",
        "198.51.100.9/32",
        "dev",
        "eth0",
    ]);
    run(&["ip", "-n", w, "link", "set", "eth0", "up"]);
    run(&["ip", "-n", w, "route", "add", "default", "via", NODE_WORLD]);
    run(&[
        "ip",
        "-n",
        n,
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "192.0.2.2",
    ]);
}

/// One probe: from network namespace `from`, bound to `src`.
#[derive(Clone)]
struct Cell {
    from: String,
    src: IpAddr,
    dst: IpAddr,
    probe: Probe,
    want: bool,
}

fn cell(from: &str, src: IpAddr, dst: IpAddr, probe: Probe, want: bool) -> Cell {
    Cell {
        from: from.to_string(),
        src,
        dst,
        probe,
        want,
    }
}

/// The `--dport` of `membrane policy trace` for a probe.
fn dport(p: Probe, v6: bool) -> String {
    match p {
        Probe::Tcp(n) => format!("{n}/TCP"),
        Probe::Udp(n) => format!("{n}/UDP"),
        Probe::Icmp(t, _) if v6 => format!("{t}/ICMPv6"),
        Probe::Icmp(t, _) => format!("{t}/ICMP"),
        other => panic!("no trace for {other:?}"),
    }
}

/// The cells' outcomes, probed all at once (each probe waits 0.8 s at
/// most).
fn outcomes(cells: &[Cell]) -> Vec<bool> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = cells
            .iter()
            .map(|c| sc.spawn(move || probe(&c.from, c.dst, c.probe, Some(c.src))))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    })
}

/// Probes every cell; wrong ones fail with the agent's live trace. An
/// allowed cell that timed out is probed twice more (a loaded machine can
/// be slower than the 0.8 s timeout); a denied cell that answered fails at
/// once: a retry can excuse slowness, never a leak.
fn check(node: &Node, what: &str, cells: &[Cell]) {
    let mut got = outcomes(cells);
    for (c, got) in cells.iter().zip(got.iter_mut()) {
        for _ in 0..2 {
            if *got || !c.want {
                break;
            }
            *got = probe(&c.from, c.dst, c.probe, Some(c.src));
        }
    }
    let wrong: Vec<String> = cells
        .iter()
        .zip(got)
        .filter(|(c, got)| *got != c.want)
        .map(|(c, got)| {
            let t = trace(node, c.src, c.dst, &dport(c.probe, c.dst.is_ipv6()));
            format!(
                "{} -> {} {:?}: got {got}, want {}\n{t}",
                c.src, c.dst, c.probe, c.want
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{what}: {} wrong cells:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

const LOCKDOWN: &str = "apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: lockdown}
spec:
  endpointSelector: {}
  ingressDeny: [{fromEntities: [world]}]
  ingress: [{fromEntities: [all]}]
";

const EGRESS_OUT: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toPorts: [{ports: [{port: \"80\", endPort: 444, protocol: TCP}]}]
  - toCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
  - toCIDR: [198.51.100.7/32]
";

const ECHO: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    icmps: [{fields: [{type: EchoRequest, family: IPv4}, {type: EchoRequest, family: IPv6}]}]
";

const L3: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l3, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
";

const CVE_2024_47825: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cve, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egressDeny: [{toCIDR: [198.51.100.0/24]}]
  egress:
  - toCIDR: [198.51.100.7/32]
  - toEntities: [all]
";

const CLOSED: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: closed, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: c}}]}]
";

#[test]
fn cilium_policy_cases_on_cni_pods() {
    if !policy_support::prerequisites() {
        return;
    }
    let world = Netns::new("polw");
    let (_pins, mut node) = start_node("polcni", LB_POOL, (HTTP, HTTPS), |n| wire_world(n, &world));
    let pods = Pods::add(&node, &[("x", "a"), ("x", "b"), ("x", "c")], &PORTS);
    let _world_server = serve(&world.0, &PORTS);
    let (na, nb, nc) = (
        pods.ns("x", "a").to_string(),
        pods.ns("x", "b").to_string(),
        pods.ns("x", "c").to_string(),
    );
    let (a, b, c) = (pods.ip("x", "a"), pods.ip("x", "b"), pods.ip("x", "c"));
    let (a6, b6) = (pods.ip6("x", "a"), pods.ip6("x", "b"));
    let (nw, nn) = (world.0.clone(), node.ns.0.clone());
    let host = ip(NODE_WORLD);
    let [w2, w200, w7, w9] = WORLD.map(ip);
    let mut cases = Cases::new(&node);

    // Without policy every cell below answers: the drops that follow are
    // the policy's, not the wiring's. Polled: the servers start and
    // neighbours resolve.
    let open = [
        cell(&nb, b, a, Probe::Tcp(80), true),
        cell(&nb, b6, a6, Probe::Udp(81), true),
        cell(&nb, b, a, icmp(13), true),
        cell(&nb, b6, a6, icmp(128), true),
        cell(&nw, w2, a, Probe::Tcp(80), true),
        cell(&nw, w7, a, Probe::Udp(80), true),
        cell(&nn, host, a, Probe::Tcp(80), true),
        cell(&na, a, b, Probe::Tcp(79), true),
        cell(&na, a, b, Probe::Tcp(445), true),
        cell(&na, a, w200, Probe::Tcp(79), true),
        cell(&na, a, w7, Probe::Tcp(80), true),
        // Not UDP 80: a later case expects that tuple dropped, and a UDP
        // source port may repeat; conntrack must not remember it as allowed.
        cell(&na, a, w9, Probe::Udp(81), true),
    ];
    let ok = wait_until(Duration::from_secs(30), || {
        outcomes(&open).into_iter().all(|x| x)
    });
    if !ok {
        check(&node, "no policy", &open);
    }

    // External lockdown: pods reach each other, the world does not, the
    // host does; a itself still reaches the world (replies come back).
    cases.apply("external lockdown", LOCKDOWN);
    check(
        &node,
        "external lockdown",
        &[
            cell(&nb, b, a, Probe::Tcp(80), true),
            cell(&nb, b6, a6, Probe::Udp(81), true),
            cell(&na, a, c, Probe::Tcp(81), true),
            cell(&nw, w2, a, Probe::Tcp(80), false),
            cell(&nw, w7, a, Probe::Udp(80), false),
            cell(&nw, w9, b, icmp(8), false),
            cell(&nn, host, a, Probe::Tcp(80), true),
            cell(&na, a, w2, Probe::Tcp(80), true),
        ],
    );
    assert_trace(
        &node,
        b,
        a,
        "80/TCP",
        &["Ingress: ALLOWED by CiliumClusterwideNetworkPolicy lockdown spec.ingress[0]"],
    );
    assert_trace(
        &node,
        w2,
        a,
        "80/TCP",
        &[
            "Ingress: DENIED  by CiliumClusterwideNetworkPolicy lockdown spec.ingressDeny[0]",
            "Final verdict: DENIED",
        ],
    );

    // toCIDR + toCIDRSet with except, and an egress port range 80–444:
    // the CIDR rules are L3 (any port), the range is L4 (any peer).
    cases.apply("toCIDR, toCIDRSet except, port range", EGRESS_OUT);
    check(
        &node,
        "toCIDR, toCIDRSet except, port range",
        &[
            cell(&na, a, b, Probe::Tcp(79), false),
            cell(&na, a, b, Probe::Tcp(80), true),
            cell(&na, a, b, Probe::Tcp(443), true),
            cell(&na, a, b, Probe::Tcp(444), true),
            cell(&na, a, b, Probe::Tcp(445), false),
            cell(&na, a6, b6, Probe::Tcp(444), true),
            cell(&na, a6, b6, Probe::Tcp(445), false),
            cell(&na, a, b, Probe::Udp(80), false),
            cell(&na, a, w2, Probe::Tcp(79), true),
            cell(&na, a, w2, Probe::Udp(445), true),
            cell(&na, a, w200, Probe::Tcp(79), false),
            cell(&na, a, w200, Probe::Tcp(80), true),
            cell(&na, a, w7, Probe::Tcp(79), true),
            cell(&na, a, w9, Probe::Tcp(79), false),
            cell(&na, a, w9, Probe::Udp(80), false),
            // b's egress is not enforced.
            cell(&nb, b, w200, Probe::Tcp(79), true),
        ],
    );
    assert_trace(
        &node,
        a,
        b,
        "444/TCP",
        &["Egress : ALLOWED by CiliumNetworkPolicy x/out spec.egress[0]"],
    );
    assert_trace(
        &node,
        a,
        b,
        "445/TCP",
        &[
            "Egress : DENIED  default deny (CiliumNetworkPolicy x/out",
            "Final verdict: DENIED",
        ],
    );
    assert_trace(
        &node,
        a,
        w2,
        "79/TCP",
        &["Egress : ALLOWED by CiliumNetworkPolicy x/out spec.egress[1]"],
    );
    assert_trace(
        &node,
        a,
        w7,
        "79/TCP",
        &["Egress : ALLOWED by CiliumNetworkPolicy x/out spec.egress[2]"],
    );
    assert_trace(
        &node,
        a,
        w200,
        "79/TCP",
        &["Egress : DENIED  default deny", "Final verdict: DENIED"],
    );

    // ICMP echo allowed by `icmps` over IPv4 and IPv6; TCP and ICMP
    // timestamp (type 13) dropped.
    cases.apply("icmps echo", ECHO);
    check(
        &node,
        "icmps echo",
        &[
            cell(&nb, b, a, icmp(8), true),
            cell(&nb, b6, a6, icmp(128), true),
            cell(&nb, b, a, Probe::Tcp(80), false),
            cell(&nb, b, a, icmp(13), false),
            cell(&nb, b6, a6, Probe::Udp(80), false),
        ],
    );
    assert_trace(
        &node,
        b,
        a,
        "8/ICMP",
        &["Ingress: ALLOWED by CiliumNetworkPolicy x/echo spec.ingress[0]"],
    );
    assert_trace(
        &node,
        b6,
        a6,
        "128/ICMPv6",
        &["Ingress: ALLOWED by CiliumNetworkPolicy x/echo spec.ingress[0]"],
    );
    assert_trace(
        &node,
        b,
        a,
        "13/ICMP",
        &[
            "Ingress: DENIED  default deny (CiliumNetworkPolicy x/echo",
            "Final verdict: DENIED",
        ],
    );

    // ICMP allowed by an L3-only rule, dropped once a port rule stands in
    // its place.
    cases.apply("L3-only rule", L3);
    check(
        &node,
        "L3-only rule",
        &[
            cell(&nb, b, a, icmp(8), true),
            cell(&nb, b6, a6, icmp(128), true),
            cell(&nb, b, a, Probe::Udp(81), true),
        ],
    );
    assert_trace(
        &node,
        b,
        a,
        "8/ICMP",
        &["Ingress: ALLOWED by CiliumNetworkPolicy x/l3 spec.ingress[0]"],
    );
    // A policy of its own name: "in force" then cannot mean the previous
    // content still is.
    let l4 = L3.replace("name: l3", "name: l4").replace(
        "[{fromEndpoints: [{matchLabels: {pod: b}}]}]",
        "[{fromEndpoints: [{matchLabels: {pod: b}}], toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]}]",
    );
    assert_ne!(l4, L3);
    cases.apply("a toPorts rule", &l4);
    check(
        &node,
        "a toPorts rule",
        &[
            cell(&nb, b, a, icmp(8), false),
            cell(&nb, b6, a6, icmp(128), false),
            cell(&nb, b, a, Probe::Tcp(80), true),
            cell(&nb, b, a, Probe::Tcp(81), false),
        ],
    );
    assert_trace(
        &node,
        b,
        a,
        "8/ICMP",
        &[
            "Ingress: DENIED  default deny (CiliumNetworkPolicy x/l4",
            "Final verdict: DENIED",
        ],
    );
    assert_trace(
        &node,
        b,
        a,
        "80/TCP",
        &["Ingress: ALLOWED by CiliumNetworkPolicy x/l4 spec.ingress[0]"],
    );

    // CVE-2024-47825: the broad deny wins over a narrow allow beside
    // `toEntities: all`, and with `enableDefaultDeny: {egress: false}`.
    // The second variant has its own name (see the toPorts case above).
    let no_default_deny = CVE_2024_47825
        .replace("name: cve", "name: cve-no-default-deny")
        .replace("  - toEntities: [all]\n", "")
        + "  enableDefaultDeny: {egress: false}\n";
    for (what, name, yaml, allowed) in [
        (
            "CVE-2024-47825 beside toEntities all",
            "cve",
            CVE_2024_47825.to_string(),
            "Egress : ALLOWED by CiliumNetworkPolicy x/cve spec.egress[1]",
        ),
        (
            "CVE-2024-47825 with enableDefaultDeny false",
            "cve-no-default-deny",
            no_default_deny,
            "Egress : ALLOWED no policy selects the endpoint in this direction",
        ),
    ] {
        cases.apply(what, &yaml);
        check(
            &node,
            what,
            &[
                cell(&na, a, w7, Probe::Tcp(80), false),
                cell(&na, a, w7, icmp(8), false),
                cell(&na, a, w9, Probe::Udp(80), false),
                cell(&na, a, w2, Probe::Tcp(80), true),
                cell(&na, a, b, Probe::Tcp(81), true),
            ],
        );
        assert_trace(
            &node,
            a,
            w7,
            "80/TCP",
            &[
                format!("Egress : DENIED  by CiliumNetworkPolicy x/{name} spec.egressDeny[0]")
                    .as_str(),
                "Final verdict: DENIED",
            ],
        );
        assert_trace(&node, a, w2, "80/TCP", &[allowed, "Final verdict: ALLOWED"]);
    }

    // GHSA-c66w-hq56-4q97: a accepts only c; its own echoes to b come back
    // (conntrack), but an echo *request* from b reusing their IDs is new
    // traffic into a and is dropped.
    cases.apply("GHSA-c66w-hq56-4q97", CLOSED);
    check(
        &node,
        "GHSA-c66w-hq56-4q97: a's own echoes",
        &[
            cell(&na, a, b, Probe::Icmp(8, 0x4242), true),
            cell(&na, a6, b6, Probe::Icmp(128, 0x4343), true),
            cell(&na, a, b, Probe::Tcp(80), true),
        ],
    );
    check(
        &node,
        "GHSA-c66w-hq56-4q97: b's requests reusing the IDs",
        &[
            cell(&nb, b, a, Probe::Icmp(8, 0x4242), false),
            cell(&nb, b6, a6, Probe::Icmp(128, 0x4343), false),
            cell(&nb, b, a, Probe::Tcp(80), false),
            cell(&nc, c, a, icmp(8), true),
        ],
    );
    assert_trace(
        &node,
        c,
        a,
        "8/ICMP",
        &[
            "Ingress: ALLOWED by CiliumNetworkPolicy x/closed spec.ingress[0]",
            "Final verdict: ALLOWED",
        ],
    );
    assert_trace(
        &node,
        b,
        a,
        "8/ICMP",
        &[
            "Ingress: DENIED  default deny (CiliumNetworkPolicy x/closed",
            "Final verdict: DENIED",
        ],
    );

    // Deleted: the world reaches a again.
    cases.apply("no policy", "");
    check(
        &node,
        "no policy again",
        &[
            cell(&nw, w2, a, Probe::Tcp(80), true),
            cell(&nb, b, a, icmp(13), true),
        ],
    );
    node.stop();
}
