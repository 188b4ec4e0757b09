//! Per-packet cost of policy enforcement, measured by the kernel with
//! `BPF_PROG_TEST_RUN` (no wall clock in assertions: verdicts are checked,
//! times are printed for docs/benchmarks.md). Run with `--nocapture`.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use common::pkt::{self, SYN, TCP};
use common::{Netns, PinDir, prerequisites};
use membrane_ebpf::PolicyDatapath;
use membrane_policy::{Cluster, Endpoint, Identities, PolicySet, State};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const LOOPBACK_IFINDEX: u32 = 1;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// One pod (id 1) and `n` peers with distinct labels; the pod's egress
/// allows TCP 80..=444 to each peer by its own rule (n rules, n identities).
fn state(n: usize, enforce: bool) -> State {
    let mut c = Cluster::default();
    c.namespaces.insert("x".into(), BTreeMap::new());
    c.endpoints.push(Endpoint {
        id: 1,
        name: "a".into(),
        namespace: "x".into(),
        labels: BTreeMap::from([("pod".into(), "a".into())]),
        ips: vec![ip("10.124.0.2")],
        named_ports: Vec::new(),
    });
    for i in 0..n {
        c.endpoints.push(Endpoint {
            id: 2 + i as u32,
            name: format!("p{i}"),
            namespace: "x".into(),
            labels: BTreeMap::from([("peer".into(), i.to_string())]),
            ips: vec![
                format!("10.124.{}.{}", 1 + i / 250, 1 + i % 250)
                    .parse()
                    .expect("ip"),
            ],
            named_ports: Vec::new(),
        });
    }
    let mut set = PolicySet::default();
    if enforce {
        let mut yaml = String::from(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: many, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {pod: a}}\n  egress:\n",
        );
        for i in 0..n {
            let _ = writeln!(
                yaml,
                "  - toEndpoints: [{{matchLabels: {{peer: \"{i}\"}}}}]\n    toPorts: [{{ports: [{{port: \"80\", endPort: 444, protocol: TCP}}]}}]"
            );
        }
        let cnp = serde_yaml_ng::from_str(&yaml).expect("cnp");
        set.add_cnp(&cnp);
        assert!(set.errors.is_empty(), "{:?}", set.errors);
    }
    State::build(&c, set, Identities::default())
}

#[test]
fn per_packet_cost_with_and_without_policy() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("cost");
    let ns = Netns::new(format!("mp{}-cost", std::process::id()));
    let report = ns.run(|| {
        let mut dp = PolicyDatapath::load(&pins.0).expect("load");
        let syn = |dst: &str, dport: u16| {
            pkt::frame(
                ip("10.124.0.2"),
                40000,
                ip(dst),
                dport,
                TCP,
                SYN,
                b"",
                false,
            )
        };
        let peer = |i: usize| format!("10.124.{}.{}", 1 + i / 250, 1 + i % 250);
        let allowed = syn(&peer(0), 80);
        let repeat = 200_000;
        let mut out = String::new();
        let run = |out: &mut String, what: &str, dp: &PolicyDatapath, p: &[u8], want: i32| {
            let (v, d) = dp.test_run(true, p, repeat).expect("test run");
            assert_eq!(v, want, "{what}");
            let _ = writeln!(out, "{what}: {} ns/packet", d.as_nanos());
        };
        run(
            &mut out,
            "not a managed endpoint",
            &dp,
            &allowed,
            TC_ACT_UNSPEC,
        );
        let none = state(0, false);
        dp.sync_ipcache(&none.ipcache).expect("ipcache");
        let pol = none.compile(1).expect("compile");
        dp.sync_endpoint(LOOPBACK_IFINDEX, &pol).expect("sync");
        run(
            &mut out,
            "endpoint without policy",
            &dp,
            &allowed,
            TC_ACT_UNSPEC,
        );
        for n in [10, 1000] {
            let s = state(n, true);
            dp.sync_ipcache(&s.ipcache).expect("ipcache");
            let pol = s.compile(1).expect("compile");
            let r = dp.sync_endpoint(LOOPBACK_IFINDEX, &pol).expect("sync");
            let _ = writeln!(
                out,
                "{n} rules: {} policy entries ({} written, {} removed)",
                pol.entries.len(),
                r.entries_written,
                r.entries_removed
            );
            // The last peer's rule: as deep in the trie as any.
            let last = syn(&peer(n - 1), 444);
            run(
                &mut out,
                &format!("{n} rules, allowed"),
                &dp,
                &last,
                TC_ACT_UNSPEC,
            );
            let denied = syn(&peer(n - 1), 445);
            run(
                &mut out,
                &format!("{n} rules, default-denied"),
                &dp,
                &denied,
                TC_ACT_SHOT,
            );
        }
        out
    });
    println!("{report}");
}

/// Time from a policy change to maps that drop the first packet correctly,
/// with 1,000 endpoints and 10,000 rules (full recompute: resolve, compile
/// every endpoint, write the differences). A measurement: ignored by
/// default, run with `-- --ignored --nocapture`.
#[test]
#[ignore = "a measurement for docs/benchmarks.md (1,000 endpoints, 10,000 rules), not a check; run with --ignored --nocapture"]
fn apply_latency_1000_endpoints_10000_rules() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("scale");
    let ns = Netns::new(format!("mp{}-scale", std::process::id()));
    let report = ns.run(|| {
        let mut dp = PolicyDatapath::load(&pins.0).expect("load");
        let mut c = Cluster {
            allow_localhost: true,
            ..Cluster::default()
        };
        for n in 0..10 {
            c.namespaces.insert(format!("ns{n}"), BTreeMap::new());
        }
        for i in 0..1000u32 {
            c.endpoints.push(Endpoint {
                id: i + 1,
                name: format!("p{i}"),
                namespace: format!("ns{}", i % 10),
                labels: BTreeMap::from([("app".to_string(), format!("app{}", i % 100))]),
                ips: vec![format!("10.124.{}.{}", i / 250, 1 + i % 250).parse().expect("ip")],
                named_ports: Vec::new(),
            });
        }
        let policies = |extra: bool| {
            let mut yaml = String::new();
            for p in 0..1000 {
                let _ = write!(
                    yaml,
                    "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{p}, namespace: ns{}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: app{}}}}}\n  ingress:\n",
                    p % 10,
                    p % 100
                );
                for r in 0..10 {
                    let _ = writeln!(
                        yaml,
                        "  - fromEndpoints: [{{matchLabels: {{app: app{}}}}}]\n    toPorts: [{{ports: [{{port: \"8000\", endPort: {}, protocol: TCP}}]}}]",
                        (p + r + 1) % 100,
                        8000 + r * 7
                    );
                }
            }
            if extra {
                // The change: endpoint 1 (app0 in ns0) denies app10 on 8000.
                yaml.push_str("---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny, namespace: ns0}\nspec:\n  endpointSelector: {matchLabels: {app: app0}}\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: app10}}], toPorts: [{ports: [{port: \"8000\", protocol: TCP}]}]}]\n");
            }
            let mut set = PolicySet::default();
            for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
                let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
                set.add_cnp(&serde_json::from_value(v).expect("cnp"));
            }
            assert!(set.errors.is_empty());
            set
        };
        let base = policies(false);
        assert_eq!(base.rules.len(), 10_000);
        let changed = policies(true);
        // Endpoint 1 sits on the namespace's loopback (ifindex 1) so a
        // test run exercises it; the others get unused ifindex keys.
        let ifindex = |ep: u32| if ep == 1 { LOOPBACK_IFINDEX } else { 1000 + ep };
        let apply = |dp: &mut PolicyDatapath, set: PolicySet, ids: Identities| {
            let s = State::build(&c, set, ids);
            dp.sync_ipcache(&s.ipcache).expect("ipcache");
            let mut written = 0;
            for ep in 1..=1000 {
                let pol = s.compile(ep).expect("ep");
                written += dp.sync_endpoint(ifindex(ep), &pol).expect("sync").entries_written;
            }
            (s, written)
        };
        let t = std::time::Instant::now();
        let (s0, w0) = apply(&mut dp, base, Identities::default());
        let initial = t.elapsed();
        // app10 in ns0 (10.124.0.11) → endpoint 1 (10.124.0.1) port 8000.
        let pkt = pkt::frame(ip("10.124.0.11"), 40000, ip("10.124.0.1"), 8000, TCP, SYN, b"", false);
        let (v, _) = dp.test_run(false, &pkt, 1).expect("run");
        assert_eq!(v, TC_ACT_UNSPEC, "allowed before the change");
        let t = std::time::Instant::now();
        let (_, w1) = apply(&mut dp, changed, s0.identities.clone());
        let (v, _) = dp.test_run(false, &pkt, 1).expect("run");
        let change = t.elapsed();
        assert_eq!(v, TC_ACT_SHOT, "dropped after the change");
        format!(
            "initial apply: {initial:?} ({w0} entries written); one deny policy added → first packet dropped: {change:?} ({w1} entries written)"
        )
    });
    println!("{report}");
}
