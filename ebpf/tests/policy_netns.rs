//! L3/L4 policy enforced by bpf/policy.c on real packets: pods in network
//! namespaces behind a node namespace, a "world" namespace outside. Every
//! probe is checked against the expected verdict and against the pure
//! model's trace (which also names the deciding rule).

mod common;
mod policy_cases;
mod policy_harness;

use std::net::IpAddr;

use common::{PinDir, prerequisites};
use membrane_ebpf::PolicyStat;
use membrane_policy::Verdict::{Allow, Deny};
use policy_harness::{PolicyHarness, PolicyTopology, Probe};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn setup(tag: &str, pods: &[(&str, &str)]) -> Option<(PinDir, PolicyTopology, PolicyHarness)> {
    if !prerequisites() {
        return None;
    }
    let pins = PinDir::new(tag);
    let topo = PolicyTopology::new(tag, pods);
    let h = PolicyHarness::new(&pins, &topo.node, topo.cluster(), topo.pods.clone());
    Some((pins, topo, h))
}

const XABC: &[(&str, &str)] = &[("x", "a"), ("x", "b"), ("x", "c")];

#[test]
fn deny_precedence_allow_update_and_delete() {
    let Some((_pins, _topo, mut h)) = setup("deny", XABC) else {
        return;
    };
    let (a, b, c) = (
        h.pod("x", "a").clone(),
        h.pod("x", "b").clone(),
        h.pod("x", "c").clone(),
    );
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny80, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
  ingressDeny: [{toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]
"#,
    );
    let why = h.check(&b.netns, b.v4(), a.v4(), Probe::Tcp(80), Deny);
    assert_eq!(why, "CiliumNetworkPolicy x/deny80 spec.ingressDeny[0]");
    let why = h.check(&b.netns, b.v4(), a.v4(), Probe::Tcp(81), Allow);
    assert_eq!(why, "CiliumNetworkPolicy x/deny80 spec.ingress[0]");
    h.check(&b.netns, b.v6(), a.v6(), Probe::Udp(80), Allow);
    h.check(&b.netns, b.v6(), a.v6(), Probe::Tcp(80), Deny);
    let why = h.check(&c.netns, c.v4(), a.v4(), Probe::Tcp(81), Deny);
    assert!(why.starts_with("default deny"), "{why}");
    // a's egress is not enforced: a reaches c.
    h.check(&a.netns, a.v4(), c.v4(), Probe::Tcp(80), Allow);
    let st = h.dp.stats().expect("stats");
    assert!(st[&PolicyStat::DropPolicyDeny] >= 2, "{st:?}");
    assert!(st[&PolicyStat::DropDefaultDeny] >= 1, "{st:?}");
    assert!(st[&PolicyStat::AllowPolicy] >= 2, "{st:?}");

    // Update: a peer deny drops everything from b, whatever else allows it.
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny80, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEntities: [all]}]
  ingressDeny: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
"#,
    );
    for p in [Probe::Tcp(81), Probe::Udp(81), Probe::Icmp(8, 7)] {
        h.check(&b.netns, b.v4(), a.v4(), p, Deny);
        h.check(&c.netns, c.v4(), a.v4(), p, Allow);
    }
    // Delete: nothing selects a any more.
    h.apply("");
    let why = h.check(&b.netns, b.v4(), a.v4(), Probe::Tcp(80), Allow);
    assert!(why.starts_with("no policy"), "{why}");
    assert_eq!(
        h.dp.entry_count(a.endpoint.id),
        1,
        "only allow-localhost is left"
    );

    // A policy needing more entries than an endpoint may hold is refused
    // and the endpoint keeps what it had.
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny80, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
"#,
    );
    h.check(&c.netns, c.v4(), a.v4(), Probe::Tcp(80), Deny);
    let state = h.state.as_ref().expect("state");
    let mut big = state.compile(a.endpoint.id).expect("a");
    let template = big.entries[0];
    big.entries = (0..20_000u32)
        .map(|i| membrane_policy::PolicyEntry {
            identity: 1_000_000 + i,
            ..template
        })
        .collect();
    let err =
        h.dp.sync_endpoint(h.ifindex[&a.endpoint.id], &big)
            .expect_err("too many entries");
    assert!(
        err.to_string().contains("more than the 16384 allowed"),
        "{err}"
    );
    h.check(&c.netns, c.v4(), a.v4(), Probe::Tcp(80), Deny);
    h.check(&b.netns, b.v4(), a.v4(), Probe::Tcp(80), Allow);

    // Removing the endpoint stops enforcement on its device.
    let ifindex = h.ifindex[&a.endpoint.id];
    h.dp.remove_endpoint(ifindex, a.endpoint.id)
        .expect("remove");
    assert_eq!(h.dp.entry_count(a.endpoint.id), 0);
    assert!(policy_harness::probe(
        &c.netns,
        a.v4(),
        Probe::Tcp(80),
        Some(c.v4())
    ));
}

#[test]
fn icmp_echo_allowed_while_tcp_and_timestamp_are_dropped() {
    let Some((_pins, _topo, mut h)) = setup("icmp", XABC) else {
        return;
    };
    let (a, b) = (h.pod("x", "a").clone(), h.pod("x", "b").clone());
    h.apply("");
    // Without policy a answers echo and timestamp requests.
    h.check(&b.netns, b.v4(), a.v4(), Probe::Icmp(13, 11), Allow);
    h.check(&b.netns, b.v6(), a.v6(), Probe::Icmp(128, 11), Allow);
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    icmps: [{fields: [{type: EchoRequest, family: IPv4}, {type: EchoRequest, family: IPv6}]}]
"#,
    );
    let why = h.check(&b.netns, b.v4(), a.v4(), Probe::Icmp(8, 21), Allow);
    assert_eq!(why, "CiliumNetworkPolicy x/echo spec.ingress[0]");
    h.check(&b.netns, b.v6(), a.v6(), Probe::Icmp(128, 22), Allow);
    h.check(&b.netns, b.v4(), a.v4(), Probe::Tcp(80), Deny);
    h.check(&b.netns, b.v4(), a.v4(), Probe::Icmp(13, 23), Deny);

    // ICMP is allowed by an L3-only rule and dropped once a port rule
    // stands in its place.
    let l3 = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l3, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
"#;
    h.apply(l3);
    h.check(&b.netns, b.v4(), a.v4(), Probe::Icmp(8, 31), Allow);
    h.check(&b.netns, b.v6(), a.v6(), Probe::Icmp(128, 31), Allow);
    h.apply(&l3.replace(
        "[{fromEndpoints: [{matchLabels: {pod: b}}]}]",
        "[{fromEndpoints: [{matchLabels: {pod: b}}], toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]}]",
    ));
    h.check(&b.netns, b.v4(), a.v4(), Probe::Icmp(8, 32), Deny);
    h.check(&b.netns, b.v6(), a.v6(), Probe::Icmp(128, 32), Deny);
    h.check(&b.netns, b.v4(), a.v4(), Probe::Tcp(80), Allow);
}

#[test]
fn egress_port_range_cidr_except_and_cve_2024_47825() {
    let Some((_pins, topo, mut h)) = setup("cidr", XABC) else {
        return;
    };
    let (a, b) = (h.pod("x", "a").clone(), h.pod("x", "b").clone());
    let _ = &topo;
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toPorts: [{ports: [{port: "80", endPort: 444, protocol: TCP}]}]
  - toCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
"#,
    );
    for (port, want) in [
        (79, Deny),
        (80, Allow),
        (443, Allow),
        (444, Allow),
        (445, Deny),
    ] {
        h.check(&a.netns, a.v4(), b.v4(), Probe::Tcp(port), want);
    }
    h.check(&a.netns, a.v6(), b.v6(), Probe::Tcp(444), Allow);
    h.check(&a.netns, a.v4(), b.v4(), Probe::Udp(80), Deny);
    // The CIDR rule is L3: any port to 192.0.2.2, nothing extra to the except.
    h.check(&a.netns, a.v4(), ip("192.0.2.2"), Probe::Tcp(79), Allow);
    h.check(&a.netns, a.v4(), ip("192.0.2.2"), Probe::Udp(445), Allow);
    h.check(&a.netns, a.v4(), ip("192.0.2.200"), Probe::Tcp(79), Deny);
    h.check(&a.netns, a.v4(), ip("192.0.2.200"), Probe::Tcp(80), Allow);
    // 80..=444 of one protocol is a handful of prefixes, not 365 entries.
    let n = h.dp.entry_count(a.endpoint.id);
    assert!(n < 40, "{n} entries");

    // CVE-2024-47825: the /8-style broad deny wins over a narrow allow
    // next to toEntities all, and with enableDefaultDeny false.
    let cve = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cve, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egressDeny: [{toCIDR: [198.51.100.0/24]}]
  egress:
  - toCIDR: [198.51.100.7/32]
  - toEntities: [all]
"#;
    for yaml in [
        cve.to_string(),
        cve.replace("  - toEntities: [all]\n", "") + "  enableDefaultDeny: {egress: false}\n",
    ] {
        h.apply(&yaml);
        let why = h.check(&a.netns, a.v4(), ip("198.51.100.7"), Probe::Tcp(80), Deny);
        assert_eq!(why, "CiliumNetworkPolicy x/cve spec.egressDeny[0]");
        h.check(&a.netns, a.v4(), ip("198.51.100.9"), Probe::Udp(80), Deny);
        h.check(&a.netns, a.v4(), ip("192.0.2.2"), Probe::Tcp(80), Allow);
        h.check(&a.netns, a.v4(), b.v4(), Probe::Tcp(81), Allow);
    }
}

#[test]
fn conntrack_admits_replies_and_nothing_else() {
    let Some((_pins, _topo, mut h)) = setup("ct", XABC) else {
        return;
    };
    let (a, b) = (h.pod("x", "a").clone(), h.pod("x", "b").clone());
    // a accepts nothing (default deny ingress with an empty rule).
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: closed, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{}]
"#,
    );
    // a's own connections work: their replies come back through conntrack.
    h.check(&a.netns, a.v4(), b.v4(), Probe::Tcp(80), Allow);
    h.check(&a.netns, a.v6(), b.v6(), Probe::Udp(81), Allow);
    h.check(&a.netns, a.v4(), b.v4(), Probe::Icmp(8, 0x4242), Allow);
    h.check(&a.netns, a.v6(), b.v6(), Probe::Icmp(128, 0x4343), Allow);
    let st = h.dp.stats().expect("stats");
    assert!(st[&PolicyStat::AllowReply] >= 4, "{st:?}");
    assert!(h.dp.conntrack_len() >= 4);
    // New connections into a are not replies.
    h.check(&b.netns, b.v4(), a.v4(), Probe::Tcp(80), Deny);
    h.check(&b.netns, b.v6(), a.v6(), Probe::Udp(81), Deny);
    // GHSA-c66w-hq56-4q97: an echo *request* reusing the id of a's echo.
    h.check(&b.netns, b.v4(), a.v4(), Probe::Icmp(8, 0x4242), Deny);
    h.check(&b.netns, b.v6(), a.v6(), Probe::Icmp(128, 0x4343), Deny);
    let st = h.dp.stats().expect("stats");
    assert!(st[&PolicyStat::DropDefaultDeny] >= 4, "{st:?}");
}

#[test]
fn external_lockdown_keeps_pods_and_host() {
    let Some((_pins, topo, mut h)) = setup("lock", XABC) else {
        return;
    };
    let (a, b) = (h.pod("x", "a").clone(), h.pod("x", "b").clone());
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: lockdown}
spec:
  endpointSelector: {}
  ingressDeny: [{fromEntities: [world]}]
  ingress: [{fromEntities: [all]}]
"#,
    );
    h.check(&b.netns, b.v4(), a.v4(), Probe::Tcp(80), Allow);
    let why = h.check(
        &topo.world.name,
        ip("192.0.2.2"),
        a.v4(),
        Probe::Tcp(80),
        Deny,
    );
    assert_eq!(
        why,
        "CiliumClusterwideNetworkPolicy lockdown spec.ingressDeny[0]"
    );
    h.check(
        &topo.world.name,
        ip("198.51.100.7"),
        a.v4(),
        Probe::Udp(80),
        Deny,
    );
    h.check(
        &topo.node.name,
        ip("10.124.10.1"),
        a.v4(),
        Probe::Tcp(80),
        Allow,
    );
    // a itself still reaches the world: replies come back.
    h.check(&a.netns, a.v4(), ip("192.0.2.2"), Probe::Tcp(80), Allow);
}

/// CVE-2025-64715: egress peers that resolve to nothing (an unknown AWS
/// group, an empty CIDR set) must not widen the rule to every peer.
#[test]
fn cve_2025_64715_empty_peer_set_does_not_widen_egress() {
    let Some((_pins, _topo, mut h)) = setup("empty", XABC) else {
        return;
    };
    let (a, b) = (h.pod("x", "a").clone(), h.pod("x", "b").clone());
    for peers in [
        "toGroups: [{aws: {securityGroupsIds: [sg-0000]}}]",
        "toCIDRSet: []",
        "toEndpoints: [{matchLabels: {pod: nobody}}]",
    ] {
        let errors = h.apply_with_errors(&format!(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: empty, namespace: x}}
spec:
  endpointSelector: {{matchLabels: {{pod: a}}}}
  egress:
  - {peers}
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
"#
        ));
        if peers.starts_with("toGroups") {
            assert!(
                errors.iter().any(|e| e.contains("spec.egress[0].toGroups")),
                "{errors:?}"
            );
        }
        h.check(&a.netns, a.v4(), ip("192.0.2.2"), Probe::Tcp(80), Deny);
        h.check(&a.netns, a.v4(), b.v4(), Probe::Tcp(80), Deny);
    }
}

/// CVE-2023-39347: a pod in y labelled `io.kubernetes.pod.namespace: x`
/// (and a fake namespace label) is still y's.
#[test]
fn cve_2023_39347_fake_namespace_label_grants_nothing() {
    let Some((_pins, _topo, mut h)) = setup("fakens", &[("x", "a"), ("x", "b"), ("y", "b")]) else {
        return;
    };
    for ep in &mut h.cluster.endpoints {
        if ep.namespace == "y" {
            ep.labels
                .insert("io.kubernetes.pod.namespace".into(), "x".into());
            ep.labels
                .insert("io.cilium.k8s.namespace.labels.ns".into(), "x".into());
        }
    }
    let (a, xb, yb) = (
        h.pod("x", "a").clone(),
        h.pod("x", "b").clone(),
        h.pod("y", "b").clone(),
    );
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-ns-x, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}}], ports: [{port: 81}]}]
"#,
    );
    h.check(&xb.netns, xb.v4(), a.v4(), Probe::Tcp(80), Allow);
    h.check(&yb.netns, yb.v4(), a.v4(), Probe::Tcp(80), Deny);
    h.check(&yb.netns, yb.v4(), a.v4(), Probe::Tcp(81), Deny);
    h.check(&yb.netns, yb.v6(), a.v6(), Probe::Udp(80), Deny);
}

/// Kubernetes NetworkPolicy: namespaceSelector AND podSelector in one
/// peer, a named port, egress deny-all with DNS allowed.
#[test]
fn network_policy_peers_named_port_and_egress() {
    let Some((_pins, _topo, mut h)) =
        setup("np", &[("x", "a"), ("x", "b"), ("y", "a"), ("y", "b")])
    else {
        return;
    };
    let (xa, xb, ya, yb) = (
        h.pod("x", "a").clone(),
        h.pod("x", "b").clone(),
        h.pod("y", "a").clone(),
        h.pod("y", "b").clone(),
    );
    h.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and-named, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-81-tcp}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-dns-only, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]}]
"#,
    );
    let why = h.check(&yb.netns, yb.v4(), xa.v4(), Probe::Tcp(81), Allow);
    assert_eq!(why, "NetworkPolicy x/and-named spec.ingress[0]");
    h.check(&yb.netns, yb.v4(), xa.v4(), Probe::Tcp(80), Deny);
    h.check(&xb.netns, xb.v4(), xa.v4(), Probe::Tcp(81), Deny);
    h.check(&ya.netns, ya.v4(), xb.v4(), Probe::Tcp(80), Deny);
    h.check(&ya.netns, ya.v6(), yb.v6(), Probe::Udp(81), Deny);
    h.check(&yb.netns, yb.v4(), ya.v4(), Probe::Tcp(80), Allow);
}

/// ICMP errors about a flow the policy allowed (port unreachable, packet
/// too big) reach the endpoint; unsolicited ones do not.
#[test]
fn related_icmp_errors_only() {
    let Some((_pins, _topo, mut h)) = setup("related", XABC) else {
        return;
    };
    let (a, b) = (h.pod("x", "a").clone(), h.pod("x", "b").clone());
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: closed, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{}]
"#,
    );
    for dst in [b.v4(), b.v6()] {
        assert!(
            policy_harness::probe(&a.netns, dst, Probe::UdpRefused(9), None),
            "port unreachable from {dst} did not reach a"
        );
    }
    let st = h.dp.stats().expect("stats");
    assert!(st[&PolicyStat::AllowRelated] >= 2, "{st:?}");
    let before = st[&PolicyStat::DropDefaultDeny];
    let related = st[&PolicyStat::AllowRelated];
    assert!(policy_harness::probe(
        &b.netns,
        a.v4(),
        Probe::IcmpError(53),
        None
    ));
    let st = policy_harness_wait_drop(&h, before);
    assert_eq!(st[&PolicyStat::AllowRelated], related, "{st:?}");
}

/// The kernel counts the drop of the unsolicited error (bounded poll).
fn policy_harness_wait_drop(
    h: &PolicyHarness,
    before: u64,
) -> std::collections::BTreeMap<PolicyStat, u64> {
    common::wait_for(
        "the unsolicited ICMP error to be dropped",
        std::time::Duration::from_secs(5),
        || {
            let st = h.dp.stats().expect("stats");
            (st[&PolicyStat::DropDefaultDeny] > before).then_some(st)
        },
    )
}

/// A flow that went quiet longer than its conntrack lifetime admits no
/// more replies (lifetime 1 s here; Cilium's 60 s by default).
#[test]
fn expired_flows_admit_no_replies() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("ctexp");
    let topo = PolicyTopology::new("ctexp", XABC);
    let cfg = membrane_ebpf::PolicyConfig {
        ct_timeout_other: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let mut h =
        PolicyHarness::with_config(&pins, &topo.node, topo.cluster(), topo.pods.clone(), &cfg);
    let (a, b) = (h.pod("x", "a").clone(), h.pod("x", "b").clone());
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: closed, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{}]
"#,
    );
    let peer = |port: u16, delay_ms: u16| {
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &b.netns,
                "python3",
                "-c",
                policy_harness::LATE_PEER_PY,
            ])
            .arg(port.to_string())
            .arg(delay_ms.to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn late peer");
        common::Proc(child)
    };
    // Ready when it answers (its first answer is a plain reply).
    let wait_ready = |port: u16| {
        common::wait_for("late peer", std::time::Duration::from_secs(10), || {
            policy_harness::probe(&a.netns, b.v4(), Probe::Udp(port), None).then_some(())
        })
    };
    let _p1 = peer(5555, 200);
    wait_ready(5555);
    assert!(
        policy_harness::probe(&a.netns, b.v4(), Probe::LateReply(5555, 200), None),
        "an answer 200 ms later is still a reply"
    );
    let _p2 = peer(5556, 1500);
    wait_ready(5556);
    assert!(
        !policy_harness::probe(&a.netns, b.v4(), Probe::LateReply(5556, 1500), None),
        "an answer 1.5 s after the flow went quiet must be judged by policy (dropped)"
    );
}

/// Maps and links are pinned: a restarted agent finds the entries again,
/// and enforcement does not stop while no process holds the datapath.
#[test]
fn enforcement_survives_a_restart() {
    let Some((pins, _topo, mut h)) = setup("restart", XABC) else {
        return;
    };
    let (a, b, c) = (
        h.pod("x", "a").clone(),
        h.pod("x", "b").clone(),
        h.pod("x", "c").clone(),
    );
    h.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
"#,
    );
    let entries = h.dp.entry_count(a.endpoint.id);
    assert!(entries > 0);
    drop(h);
    // No process holds the datapath now: the pinned links keep enforcing.
    assert!(!policy_harness::probe(
        &c.netns,
        a.v4(),
        Probe::Tcp(80),
        Some(c.v4())
    ));
    assert!(policy_harness::probe(
        &b.netns,
        a.v4(),
        Probe::Tcp(80),
        Some(b.v4())
    ));
    let dp = membrane_ebpf::PolicyDatapath::load(&pins.0).expect("reload");
    assert_eq!(
        dp.entry_count(a.endpoint.id),
        entries,
        "entries restored from the pinned map"
    );
}
