//! Property test against the kernel: random CNP/CCNP/NetworkPolicy sets are
//! compiled and written to the real maps, random packets (TCP SYN, UDP,
//! SCTP, ICMP/ICMPv6) are run through bpf/policy.c with
//! `BPF_PROG_TEST_RUN`, and every verdict must equal the reference
//! evaluator's. `POLICY_SEED` and `POLICY_CASES` vary it.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use common::pkt;
use common::{Netns, PinDir, prerequisites};
use membrane_ebpf::PolicyDatapath;
use membrane_policy::rules::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use membrane_policy::{
    Cluster, Direction, Endpoint, Identities, NamedPort, PolicySet, State, Verdict,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const LOOPBACK_IFINDEX: u32 = 1;
const NS: [&str; 2] = ["x", "y"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [u16; 8] = [0, 53, 79, 80, 81, 443, 444, 8080];
const CIDRS: [&str; 6] = [
    "192.0.2.0/24",
    "192.0.2.0/25",
    "198.51.100.7/32",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8::/64",
];
const WORLD: [&str; 6] = [
    "192.0.2.1",
    "192.0.2.200",
    "198.51.100.7",
    "203.0.113.9",
    "2001:db8::1",
    "2001:db8:1::1",
];
const HOST4: &str = "10.124.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn pod_ips(n: usize, p: usize) -> [IpAddr; 2] {
    [
        ip(&format!("10.124.{}.{}", n + 1, p + 2)),
        ip(&format!("fd00:124:{}::{}", n + 1, p + 2)),
    ]
}

fn cluster() -> Cluster {
    let mut c = Cluster {
        host_ips: vec![ip(HOST4)],
        allow_localhost: true,
        ..Cluster::default()
    };
    for (n, ns) in NS.iter().enumerate() {
        c.namespaces.insert(
            ns.to_string(),
            BTreeMap::from([("ns".to_string(), ns.to_string())]),
        );
        for (p, pod) in PODS.iter().enumerate() {
            c.endpoints.push(Endpoint {
                id: (n * 3 + p + 1) as u32,
                name: pod.to_string(),
                namespace: ns.to_string(),
                labels: BTreeMap::from([("pod".to_string(), pod.to_string())]),
                ips: pod_ips(n, p).to_vec(),
                named_ports: vec![NamedPort {
                    name: "web".into(),
                    proto: PROTO_TCP,
                    port: 8080,
                }],
            });
        }
    }
    c
}

fn pick<'a, T>(r: &mut StdRng, v: &'a [T]) -> &'a T {
    &v[r.random_range(0..v.len())]
}

fn item(r: &mut StdRng, pfx: &str) -> Value {
    let mut o = serde_json::Map::new();
    match r.random_range(0..6) {
        0 => {
            o.insert(
                format!("{pfx}Endpoints"),
                json!([{"matchLabels": {"pod": pick(r, &PODS)}}]),
            );
        }
        1 => {
            o.insert(
                format!("{pfx}Entities"),
                json!([pick(r, &["all", "world", "cluster", "host"])]),
            );
        }
        2 => {
            o.insert(format!("{pfx}CIDR"), json!([pick(r, &CIDRS)]));
        }
        3 => {
            o.insert(
                format!("{pfx}CIDRSet"),
                json!([{"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}]),
            );
        }
        4 => {
            o.insert(format!("{pfx}Endpoints"), json!([{}]));
        }
        _ => {}
    }
    if r.random_bool(0.5) || o.is_empty() {
        let port = *pick(r, &PORTS);
        let mut p =
            json!({"port": port.to_string(), "protocol": pick(r, &["TCP", "UDP", "SCTP", "ANY"])});
        if port > 0 && r.random_bool(0.4) {
            p["endPort"] = json!(port + r.random_range(0..400));
        }
        if r.random_bool(0.1) {
            p = json!({"port": "web", "protocol": "TCP"});
        }
        o.insert("toPorts".into(), json!([{"ports": [p]}]));
    }
    if r.random_bool(0.25) {
        o.insert(
            "icmps".into(),
            json!([{"fields": [{"type": pick(r, &[8, 13]), "family": "IPv4"}, {"type": "EchoRequest", "family": "IPv6"}]}]),
        );
    }
    Value::Object(o)
}

fn rule(r: &mut StdRng) -> Value {
    let mut o = serde_json::Map::new();
    o.insert(
        "endpointSelector".into(),
        if r.random_bool(0.3) {
            json!({})
        } else {
            json!({"matchLabels": {"pod": pick(r, &PODS)}})
        },
    );
    for (sec, pfx, p) in [
        ("ingress", "from", 0.5),
        ("ingressDeny", "from", 0.3),
        ("egress", "to", 0.5),
        ("egressDeny", "to", 0.3),
    ] {
        if r.random_bool(p) {
            let items: Vec<Value> = (0..r.random_range(1..3)).map(|_| item(r, pfx)).collect();
            o.insert(sec.into(), json!(items));
        }
    }
    if r.random_bool(0.15) {
        o.insert(
            "enableDefaultDeny".into(),
            json!({"ingress": false, "egress": r.random_bool(0.5)}),
        );
    }
    Value::Object(o)
}

fn policies(r: &mut StdRng) -> PolicySet {
    let mut set = PolicySet::default();
    for i in 0..r.random_range(1..4) {
        if r.random_bool(0.6) {
            let v = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": pick(r, &NS)}, "spec": rule(r)});
            set.add_cnp(&serde_json::from_value(v).expect("cnp"));
        } else if r.random_bool(0.5) {
            let v = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                "metadata": {"name": format!("c{i}")}, "spec": rule(r)});
            set.add_ccnp(&serde_json::from_value(v).expect("ccnp"));
        } else {
            let from = match r.random_range(0..3) {
                0 => json!([{"podSelector": {"matchLabels": {"pod": pick(r, &PODS)}}}]),
                1 => json!([{"namespaceSelector": {"matchLabels": {"ns": pick(r, &NS)}}}]),
                _ => json!([{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]),
            };
            let v = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("n{i}"), "namespace": pick(r, &NS)},
                "spec": {"podSelector": {"matchLabels": {"pod": pick(r, &PODS)}},
                         "policyTypes": ["Ingress", "Egress"],
                         "ingress": [{"from": from, "ports": [{"port": pick(r, &[80, 81]), "protocol": "TCP"}]}],
                         "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}});
            set.add_network_policy(&serde_json::from_value(v).expect("np"));
        }
    }
    set
}

#[test]
fn kernel_verdicts_agree_with_the_reference_evaluator() {
    if !prerequisites() {
        return;
    }
    let seed: u64 = std::env::var("POLICY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xb9f);
    let cases: usize = std::env::var("POLICY_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(80);
    let pins = PinDir::new("kprop");
    let ns = Netns::new(format!("mp{}-kprop", std::process::id()));
    let (checked, denied) = ns.run(|| {
        let mut dp = PolicyDatapath::load(&pins.0).expect("load");
        let mut r = StdRng::seed_from_u64(seed);
        let c = cluster();
        let mut ids = Identities::default();
        let mut sport = 30000u16;
        let (mut checked, mut denied) = (0usize, 0usize);
        for case in 0..cases {
            let set = policies(&mut r);
            let s = State::build(&c, set, ids.clone());
            ids = s.identities.clone();
            dp.sync_ipcache(&s.ipcache).expect("ipcache");
            for _ in 0..3 {
                let ep = &c.endpoints[r.random_range(0..c.endpoints.len())];
                let pol = s.compile(ep.id).expect("compile");
                dp.sync_endpoint(LOOPBACK_IFINDEX, &pol).expect("sync");
                for _ in 0..25 {
                    let v6 = r.random_bool(0.25);
                    let mut peers: Vec<IpAddr> = c
                        .endpoints
                        .iter()
                        .filter(|e| e.id != ep.id)
                        .map(|e| e.ips[usize::from(v6)])
                        .collect();
                    peers.extend(WORLD.iter().map(|w| ip(w)).filter(|w| w.is_ipv6() == v6));
                    if !v6 {
                        peers.push(ip(HOST4));
                    }
                    let peer = *pick(&mut r, &peers);
                    let me = ep.ips[usize::from(v6)];
                    let dir = if r.random_bool(0.5) { Direction::Ingress } else { Direction::Egress };
                    let (src, dst) = match dir {
                        Direction::Ingress => (peer, me),
                        Direction::Egress => (me, peer),
                    };
                    let (proto, port, frame) = match r.random_range(0..5) {
                        k @ 0..=2 => {
                            let proto = [PROTO_TCP, PROTO_UDP, PROTO_SCTP][k];
                            let port = *pick(&mut r, &PORTS);
                            sport = 30000 + (sport - 29999) % 30000;
                            let flags = if proto == PROTO_TCP { pkt::SYN } else { 0 };
                            (proto, port, pkt::frame(src, sport, dst, port, proto, flags, b"x", false))
                        }
                        _ => {
                            let (proto, t) = if v6 {
                                (PROTO_ICMPV6, *pick(&mut r, &[128u8, 129]))
                            } else {
                                (PROTO_ICMP, *pick(&mut r, &[8u8, 13, 0]))
                            };
                            // type/code in the first two bytes, the id in 4..6.
                            let id = r.random_range(1..u16::MAX);
                            let f = pkt::frame(src, u16::from(t) << 8, dst, 0, proto, 0, &[0; 8], false);
                            let mut f = f;
                            let l4 = if v6 { 14 + 40 } else { 14 + 20 };
                            f[l4 + 4..l4 + 6].copy_from_slice(&id.to_be_bytes());
                            (proto, u16::from(t), f)
                        }
                    };
                    let peer_id = s.ipcache.lookup(peer);
                    let want = s.evaluate(ep.id, dir, peer_id, proto, port).expect("ep");
                    // Echo replies are admitted only as replies of tracked
                    // echoes; none were sent here, so policy decides.
                    let (v, _) = dp
                        .test_run(dir == Direction::Egress, &frame, 1)
                        .expect("test run");
                    let got = match v {
                        TC_ACT_UNSPEC => Verdict::Allow,
                        TC_ACT_SHOT => Verdict::Deny,
                        other => panic!("unexpected tc verdict {other}"),
                    };
                    assert_eq!(
                        got, want.verdict,
                        "case {case} (POLICY_SEED={seed}): endpoint {} {dir:?} {src} -> {dst} proto {proto} port {port}; reference: {}",
                        ep.id, want.reason
                    );
                    checked += 1;
                    if got == Verdict::Deny {
                        denied += 1;
                    }
                }
            }
        }
        (checked, denied)
    });
    assert!(
        denied > checked / 10 && denied < checked * 9 / 10,
        "{denied} of {checked} denied"
    );
    println!("{checked} packets, {denied} denied");
}
