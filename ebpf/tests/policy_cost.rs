//! Per-packet cost of policy enforcement, measured by the kernel with
//! `BPF_PROG_TEST_RUN` (no wall clock in assertions: verdicts are checked,
//! times are printed for docs/benchmarks.md). Run with `--nocapture`.

mod common;
mod policy_cases;
mod policy_harness;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{IpAddr, TcpListener, TcpStream};

use common::pkt::{self, SYN, TCP};
use common::{Netns, PinDir, prerequisites};
use membrane_ebpf::PolicyDatapath;
use membrane_policy::{Cluster, Endpoint, Identities, PolicySet, State, Verdict};
use policy_harness::{PolicyHarness, PolicyTopology, Probe};

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

/// Time from a policy change to maps that drop (then, after its delete,
/// admit) the first packet correctly, with 1,000 endpoints and 10,000
/// rules: translate the new policy, resolve, compile only the endpoints
/// the change concerns (`State::changed_endpoints`), write the
/// differences, and judge the packet in the kernel. The full recompute
/// (every endpoint compiled) is timed alongside. A measurement: ignored by
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
        let mut base = PolicySet::default();
        for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            base.add_cnp(&serde_json::from_value(v).expect("cnp"));
        }
        assert!(base.errors.is_empty());
        assert_eq!(base.rules.len(), 10_000);
        // The change: endpoint 1 (app0 in ns0) denies app10 on 8000.
        let deny = serde_yaml_ng::from_str(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny, namespace: ns0}\nspec:\n  endpointSelector: {matchLabels: {app: app0}}\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: app10}}], toPorts: [{ports: [{port: \"8000\", protocol: TCP}]}]}]\n",
        )
        .expect("deny cnp");
        // Endpoint 1 sits on the namespace's loopback (ifindex 1) so a
        // test run exercises it; the others get unused ifindex keys.
        let ifindex = |ep: u32| if ep == 1 { LOOPBACK_IFINDEX } else { 1000 + ep };
        // (state, endpoints compiled, entries written, phase times)
        let apply = |dp: &mut PolicyDatapath, set: PolicySet, prev: Option<&State>, full: bool| {
            let t = std::time::Instant::now();
            let ids = prev.map(|p| p.identities.clone()).unwrap_or_default();
            let s = State::build_with(&c, set, ids, prev);
            let build = t.elapsed();
            dp.sync_ipcache(&s.ipcache).expect("ipcache");
            let ipcache = t.elapsed() - build;
            let eps: Vec<u32> = match prev {
                Some(p) if !full => s.changed_endpoints(p).into_iter().collect(),
                _ => (1..=1000).collect(),
            };
            let select = t.elapsed() - build - ipcache;
            let mut written = 0;
            for ep in &eps {
                let pol = s.compile(*ep).expect("ep");
                let r = dp.sync_endpoint(ifindex(*ep), &pol).expect("sync");
                written += r.entries_written + r.entries_removed;
            }
            let compile = t.elapsed() - build - ipcache - select;
            let phases = format!(
                "build {build:?}, ipcache {ipcache:?}, select {select:?}, compile+write {compile:?}"
            );
            (s, eps.len(), written, phases)
        };
        // app10 in ns0 (10.124.0.11) → endpoint 1 (10.124.0.1) port 8000.
        let pkt = pkt::frame(ip("10.124.0.11"), 40000, ip("10.124.0.1"), 8000, TCP, SYN, b"", false);
        let mut out = String::new();
        let t = std::time::Instant::now();
        let (mut s, n, w, _) = apply(&mut dp, base.clone(), None, true);
        let _ = writeln!(out, "initial apply: {:?} ({n} endpoints compiled, {w} entries written)", t.elapsed());
        let (v, _) = dp.test_run(false, &pkt, 1).expect("run");
        assert_eq!(v, TC_ACT_UNSPEC, "allowed before the change");
        for round in 0..3 {
            for full in [false, true] {
                let how = if full { "full recompute" } else { "incremental" };
                // Apply: the new object is translated inside the timing.
                let t = std::time::Instant::now();
                let mut set = base.clone();
                set.add_cnp(&deny);
                let translate = t.elapsed();
                let (s1, n, w, phases) = apply(&mut dp, set, Some(&s), full);
                let (v, _) = dp.test_run(false, &pkt, 1).expect("run");
                let took = t.elapsed();
                assert_eq!(v, TC_ACT_SHOT, "dropped after the deny");
                let _ = writeln!(out, "round {round}, {how}: deny added → first packet dropped {took:?} ({n} endpoints compiled, {w} entries changed; translate+copy {translate:?}, {phases})");
                // Delete: the same packet is admitted again.
                let t = std::time::Instant::now();
                let (s2, n, w, phases) = apply(&mut dp, base.clone(), Some(&s1), full);
                let (v, _) = dp.test_run(false, &pkt, 1).expect("run");
                let took = t.elapsed();
                assert_eq!(v, TC_ACT_UNSPEC, "admitted after the delete");
                let _ = writeln!(out, "round {round}, {how}: deny deleted → first packet admitted {took:?} ({n} endpoints compiled, {w} entries changed; {phases})");
                s = s2;
            }
        }
        out
    });
    println!("{report}");
}

/// Request/response over real packets between two pods (veth pairs routed
/// by the node namespace), side by side in one run: the policy programs
/// not attached, attached to endpoints without policy, and enforcing
/// (both pods in default deny both ways, the flow allowed by rule, one
/// drop checked). Rounds alternate the three so drift hits each alike.
/// Prints round trips per second; no timing is asserted.
#[test]
#[ignore = "a measurement for docs/benchmarks.md (request/response ratio with and without policy), not a check; run with --ignored --nocapture"]
fn request_response_with_and_without_policy() {
    if !prerequisites() {
        return;
    }
    const PORT: u16 = 15080;
    const ROUND_TRIPS: usize = 5_000;
    const ROUNDS: usize = 15;
    let topo = PolicyTopology::new("rr", &[("x", "a"), ("x", "b")]);
    let pins = PinDir::new("rr");
    let mut h = PolicyHarness::new(&pins, &topo.node, topo.cluster(), topo.pods.clone());
    let (a, b) = (topo.pods[0].clone(), topo.pods[1].clone());
    let listener = topo.pod_ns[1].run(|| TcpListener::bind(("0.0.0.0", PORT)).expect("bind"));
    // Echoes every connection until it closes.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let _ = c.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let enforced = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: b-in, namespace: x}}\nspec:\n  endpointSelector: {{matchLabels: {{pod: b}}}}\n  ingress: [{{fromEndpoints: [{{matchLabels: {{pod: a}}}}], toPorts: [{{ports: [{{port: \"{PORT}\", protocol: TCP}}]}}]}}]\n  egress: [{{toEndpoints: [{{matchLabels: {{pod: a}}}}], toPorts: [{{ports: [{{port: \"9\", protocol: TCP}}]}}]}}]\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: a-out, namespace: x}}\nspec:\n  endpointSelector: {{matchLabels: {{pod: a}}}}\n  egress: [{{toEndpoints: [{{matchLabels: {{pod: b}}}}], toPorts: [{{ports: [{{port: \"{PORT}\", protocol: TCP}}]}}]}}]\n  ingress: [{{fromEndpoints: [{{matchLabels: {{pod: b}}}}], toPorts: [{{ports: [{{port: \"9\", protocol: TCP}}]}}]}}]\n"
    );
    let host_ifs = [a.host_if.clone(), b.host_if.clone()];
    let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _round in 0..ROUNDS {
        for variant in ["no programs", "programs, no policy", "policy enforced"] {
            let attach = variant != "no programs";
            topo.node.run(|| {
                for i in &host_ifs {
                    if attach {
                        h.dp.attach(i).expect("attach");
                    } else {
                        h.dp.detach(i).expect("detach");
                    }
                }
            });
            h.apply(if variant == "policy enforced" {
                &enforced
            } else {
                ""
            });
            if variant == "policy enforced" {
                // The policy is in force: the pods' port 80 is not allowed.
                h.check(&a.netns, a.v4(), b.v4(), Probe::Tcp(80), Verdict::Deny);
            }
            let dst = b.v4();
            let mut conn = topo.pod_ns[0].run(|| TcpStream::connect((dst, PORT)).expect("connect"));
            conn.set_nodelay(true).expect("nodelay");
            let mut one = [0u8; 1];
            let mut rr = |n: usize| {
                for _ in 0..n {
                    conn.write_all(b"x").expect("write");
                    conn.read_exact(&mut one).expect("read");
                }
            };
            rr(500);
            let t = std::time::Instant::now();
            rr(ROUND_TRIPS);
            let rate = ROUND_TRIPS as f64 / t.elapsed().as_secs_f64();
            rates.entry(variant).or_default().push(rate);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Per-round ratios: each variant against the unenforced run just
    // before it, so load that shifts between rounds cancels out.
    let base = &rates["no programs"];
    for (variant, v) in &rates {
        let ratios: Vec<f64> = v.iter().zip(base).map(|(r, b)| r / b).collect();
        println!(
            "{variant}: median {:.0} round trips/s, median per-round ratio to no programs {:.3} (ratios: {})",
            median(v),
            median(&ratios),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
}
