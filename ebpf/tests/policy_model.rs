//! The upstream Kubernetes network-policy test model (namespaces x, y, z
//! with pods a, b, c; `pod=<name>`, `ns=<name>`), applied to veth pods made
//! here until the CNI creates them: each policy below, then every pod × pod
//! cell probed with real packets (in parallel) against a reachability
//! written by hand from the upstream cases — independent of Membrane's own
//! model. Loopback cells are ignored, as upstream does.

mod common;
mod policy_harness;

use common::{PinDir, prerequisites};
use policy_harness::{Pod, PolicyHarness, PolicyTopology, Probe, probe_many};

const MODEL: [(&str, &str); 9] = [
    ("x", "a"),
    ("x", "b"),
    ("x", "c"),
    ("y", "a"),
    ("y", "b"),
    ("y", "c"),
    ("z", "a"),
    ("z", "b"),
    ("z", "c"),
];

/// Probes every (src, dst) cell with `p` over IPv4 and compares with
/// `expect(src ns, src pod, dst ns, dst pod)`; a mismatch names the cell
/// and what Membrane's model (with its deciding rule) says.
fn matrix(
    h: &PolicyHarness,
    what: &str,
    p: Probe,
    expect: impl Fn(&str, &str, &str, &str) -> bool + Sync,
) {
    let mut wrong = Vec::new();
    // One prober per source pod, probing every other pod at once.
    let rows: Vec<(&Pod, Vec<&Pod>, Vec<bool>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = h
            .pods
            .iter()
            .map(|s| {
                sc.spawn(move || {
                    let dsts: Vec<&Pod> = h
                        .pods
                        .iter()
                        .filter(|d| d.endpoint.id != s.endpoint.id)
                        .collect();
                    let ips: Vec<_> = dsts.iter().map(|d| d.v4()).collect();
                    let got = probe_many(&s.netns, &ips, p);
                    (s, dsts, got)
                })
            })
            .collect();
        hs.into_iter()
            .map(|j| j.join().expect("probe thread"))
            .collect()
    });
    for (s, dsts, got) in rows {
        for (d, got) in dsts.into_iter().zip(got) {
            let (sn, sp, dn, dp) = (
                s.endpoint.namespace.as_str(),
                s.endpoint.name.as_str(),
                d.endpoint.namespace.as_str(),
                d.endpoint.name.as_str(),
            );
            let want = expect(sn, sp, dn, dp);
            if got != want {
                let (model, why) = h.expect(s.v4(), d.v4(), p);
                wrong.push(format!(
                    "{sn}/{sp} -> {dn}/{dp}: got {got}, want {want} (Membrane's model: {model:?}, {why})"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{what} {p:?}: {} wrong cells:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

fn np(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

#[test]
fn kubernetes_policy_model() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("model");
    let topo = PolicyTopology::new("model", &MODEL);
    let mut h = PolicyHarness::new(&pins, &topo.node, topo.cluster(), topo.pods.clone());
    h.apply("");
    matrix(&h, "no policy", Probe::Tcp(80), |_, _, _, _| true);

    // Default-deny ingress in x.
    h.apply(&np(
        "deny-ingress",
        "x",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    ));
    matrix(&h, "default-deny ingress", Probe::Tcp(80), |_, _, dn, _| {
        dn != "x"
    });
    matrix(&h, "default-deny ingress", Probe::Udp(81), |_, _, dn, _| {
        dn != "x"
    });

    // Deny all in x, DNS egress allowed.
    h.apply(&np(
        "deny-all-but-dns",
        "x",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  egress: [{ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]}]\n",
    ));
    matrix(&h, "deny-all with DNS", Probe::Tcp(80), |sn, _, dn, _| {
        sn != "x" && dn != "x"
    });

    // A podSelector is namespace-scoped: x/a accepts x/b only.
    h.apply(&np(
        "a-from-b",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
    ));
    matrix(&h, "podSelector", Probe::Tcp(80), |sn, sp, dn, dp| {
        !(dn == "x" && dp == "a") || (sn == "x" && sp == "b")
    });

    // namespaceSelector: x/a accepts namespace y.
    h.apply(&np(
        "a-from-y",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n",
    ));
    matrix(&h, "namespaceSelector", Probe::Tcp(80), |sn, _, dn, dp| {
        !(dn == "x" && dp == "a") || sn == "y"
    });

    // Port rules and two stacked policies: 80 from y, 81 from x/b.
    let stacked = np(
        "a-80-from-y",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n",
    ) + &np(
        "a-81-from-b",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 81}]}]\n",
    );
    h.apply(&stacked);
    matrix(&h, "stacked 80", Probe::Tcp(80), |sn, _, dn, dp| {
        !(dn == "x" && dp == "a") || sn == "y"
    });
    matrix(&h, "stacked 81", Probe::Tcp(81), |sn, sp, dn, dp| {
        !(dn == "x" && dp == "a") || (sn == "x" && sp == "b")
    });
    // NetworkPolicy ports default to TCP: UDP 81 reaches x/a from nobody.
    matrix(&h, "stacked 81/UDP", Probe::Udp(81), |_, _, dn, dp| {
        !(dn == "x" && dp == "a")
    });

    // A named port.
    h.apply(&np(
        "named",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: serve-81-tcp}]}]\n",
    ));
    matrix(&h, "named port 80", Probe::Tcp(80), |_, _, dn, dp| {
        !(dn == "x" && dp == "a")
    });
    matrix(&h, "named port 81", Probe::Tcp(81), |_, _, _, _| true);

    // Egress deny-all in x.
    h.apply(&np(
        "deny-egress",
        "x",
        "  podSelector: {}\n  policyTypes: [Egress]\n",
    ));
    matrix(&h, "egress deny-all", Probe::Tcp(80), |sn, _, _, _| {
        sn != "x"
    });

    // Allow-all ingress beside a narrower policy: the union allows all.
    h.apply(
        &(np(
            "narrow",
            "x",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
        ) + &np("allow-all", "x", "  podSelector: {}\n  ingress: [{}]\n")),
    );
    matrix(&h, "allow-all over narrow", Probe::Tcp(80), |_, _, _, _| {
        true
    });

    // Update, then delete.
    h.apply(&np(
        "moving",
        "y",
        "  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]\n",
    ));
    matrix(&h, "before update", Probe::Tcp(80), |sn, sp, dn, dp| {
        !(dn == "y" && dp == "c") || (sn == "y" && sp == "a")
    });
    h.apply(&np(
        "moving",
        "y",
        "  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
    ));
    matrix(&h, "after update", Probe::Tcp(80), |sn, sp, dn, dp| {
        !(dn == "y" && dp == "c") || (sn == "y" && sp == "b")
    });
    h.apply("");
    matrix(&h, "after delete", Probe::Tcp(80), |_, _, _, _| true);
}
