//! The upstream Kubernetes network-policy model through the real path:
//! `membrane up --enable-cni --datapath ebpf` in a node namespace, the nine
//! model pods (x, y, z × a, b, c) networked by the installed `membrane-cni`
//! run as a runtime runs it, each case of the shared model
//! (`ebpf/tests/policy_cases`) applied with `membrane apply` (the previous
//! case's policies removed with `membrane delete`), and every pod × pod
//! cell probed with real packets over TCP and UDP 80 and 81. Then Cilium
//! cases on the same pods: deny precedence (a port deny beside an allow, a
//! peer deny beside `fromEntities: all`), CVE-2023-39347 (a pod
//! relabelled with another namespace's labels through `membrane apply`)
//! and CVE-2025-64715 (an egress selector matching nobody).
//! `membrane policy trace` (live) names the deciding rule of allowed and
//! denied cells; after CNI DEL the pods' addresses are gone from the
//! kernel's ipcache.
//! Needs root, iproute2, python3 and Envoy (in CI a missing one fails).

mod cni_node;
mod common;
#[path = "../../ebpf/tests/policy_cases/mod.rs"]
mod policy_cases;
mod policy_support;

use std::time::Duration;

use common::wait_until;
use policy_cases::{L4, MODEL, Step, steps, wrong_cells};
use policy_support::{Cases, Pods, assert_trace, check, cluster_yaml, report, start_node};

/// Ports, pools and addresses of this test (polperf's ranges).
const HTTP: u16 = 15080;
const HTTPS: u16 = 15443;

#[test]
fn kubernetes_policy_model_on_cni_pods() {
    if !policy_support::prerequisites() {
        return;
    }
    let (_pins, mut node) = start_node("polmodel", "127.15.1.0/24", (HTTP, HTTPS), |_| {});
    // The pods, through the plugin; a server on 80 and 81 in each.
    let added = Pods::add(&node, &MODEL, &[80, 81]);
    let pods = added.model();
    let ips = &added.v4;
    let dir = node.dir.path().join("policy");
    let mut cases = Cases::new(&node);
    let ip = |ns: &str, pod: &str| added.ip(ns, pod);
    for (i, step) in steps().iter().enumerate() {
        let in_place = cases.apply(step.what, &step.policies);
        if in_place {
            // The update is programmed asynchronously; `check` below judges
            // whatever is in force after at most this wait.
            wait_until(Duration::from_secs(10), || {
                wrong_cells(&pods, step).is_empty()
            });
        }
        if i == 0 {
            // The servers answer before the first case is judged.
            let ok = wait_until(Duration::from_secs(20), || {
                wrong_cells(&pods, step).is_empty()
            });
            assert!(ok, "servers never answered");
        }
        check(&node, &pods, step);
        // The live trace names the deciding rule, allowed and denied.
        if step.what.starts_with("podSelector") {
            assert_trace(
                &node,
                ip("x", "b"),
                ip("x", "a"),
                "80/TCP",
                &[
                    "Ingress: ALLOWED by NetworkPolicy x/a-from-b spec.ingress[0]",
                    "Final verdict: ALLOWED",
                ],
            );
            assert_trace(
                &node,
                ip("x", "c"),
                ip("x", "a"),
                "80/TCP",
                &[
                    "Ingress: DENIED  default deny (NetworkPolicy x/a-from-b",
                    "Final verdict: DENIED",
                ],
            );
        }
    }

    // Cilium's cases on the same pods. Deny precedence: a deny of port 80
    // beside an allow from b.
    let deny80 = Step {
        what: "ingressDeny 80 beside an allow from b",
        policies: "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny80, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {pod: a}}\n  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]\n  ingressDeny: [{toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]}]\n".into(),
        expect: |c| !(c.dn == "x" && c.dp == "a") || (c.sn == "x" && c.sp == "b" && !(c.l4 == L4::Tcp && c.port == 80)),
    };
    cases.apply(deny80.what, &deny80.policies);
    check(&node, &pods, &deny80);
    assert_trace(
        &node,
        ip("x", "b"),
        ip("x", "a"),
        "80/TCP",
        &["Ingress: DENIED  by CiliumNetworkPolicy x/deny80 spec.ingressDeny[0]"],
    );
    assert_trace(
        &node,
        ip("x", "b"),
        ip("x", "a"),
        "81/TCP",
        &["Ingress: ALLOWED by CiliumNetworkPolicy x/deny80 spec.ingress[0]"],
    );
    // A peer deny drops everything from b, whatever else allows it.
    let peer_deny = Step {
        what: "a peer deny beside fromEntities all",
        policies: "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny80, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {pod: a}}\n  ingress: [{fromEntities: [all]}]\n  ingressDeny: [{fromEndpoints: [{matchLabels: {pod: b}}]}]\n".into(),
        expect: |c| !(c.dn == "x" && c.dp == "a" && c.sn == "x" && c.sp == "b"),
    };
    cases.apply(peer_deny.what, &peer_deny.policies);
    check(&node, &pods, &peer_deny);

    // CVE-2023-39347: y/b relabelled with x's namespace labels stays y's.
    let fake = cluster_yaml(&MODEL).replace(
        "name: b, namespace: y, labels: {pod: b}",
        "name: b, namespace: y, labels: {pod: b, io.kubernetes.pod.namespace: x, io.cilium.k8s.namespace.labels.ns: x}",
    );
    assert_ne!(fake, cluster_yaml(&MODEL));
    let relabelled = dir.join("relabelled.yaml");
    std::fs::write(&relabelled, fake).expect("write");
    let (code, out) = node.cli(&["apply", "-f", relabelled.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    let fake_ns = Step {
        what: "CVE-2023-39347: a fake namespace label grants nothing",
        policies: "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: from-b, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {pod: a}}\n  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-ns-x, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}}], ports: [{port: 81}]}]\n".into(),
        expect: |c| {
            !(c.dn == "x" && c.dp == "a")
                || (c.sn == "x" && c.sp == "b")
                || (c.sn == "x" && c.l4 == L4::Tcp && c.port == 81)
        },
    };
    cases.apply(fake_ns.what, &fake_ns.policies);
    check(&node, &pods, &fake_ns);
    assert_trace(
        &node,
        ip("y", "b"),
        ip("x", "a"),
        "81/TCP",
        &["Final verdict: DENIED"],
    );
    // CVE-2025-64715: a peer selector matching no pod selects nobody; it
    // must not widen x/a's egress to everyone.
    let empty_peer = Step {
        what: "CVE-2025-64715: an empty selector result allows nothing",
        policies: "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: to-nobody, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {pod: a}}\n  egress: [{toEndpoints: [{matchLabels: {pod: nosuch}}]}]\n".into(),
        expect: |c| !(c.sn == "x" && c.sp == "a"),
    };
    cases.apply(empty_peer.what, &empty_peer.policies);
    check(&node, &pods, &empty_peer);
    assert_trace(
        &node,
        ip("x", "a"),
        ip("x", "b"),
        "80/TCP",
        &[
            "Egress : DENIED  default deny (CiliumNetworkPolicy x/to-nobody",
            "Final verdict: DENIED",
        ],
    );
    cases.apply("no policy", "");

    // CNI DEL: the endpoints leave the report and their addresses the
    // kernel's ipcache at once.
    for ((ns, pod), n) in MODEL.iter().zip(&added.netns) {
        let (code, r) = node.plugin("DEL", &format!("{ns}-{pod}"), &n.path(), "");
        assert_eq!(code, 0, "DEL {ns}/{pod}: {r}");
    }
    assert_eq!(report(&node)["endpoints"], serde_json::json!([]));
    // `ipcache` in the report is read back from the kernel's map.
    let r = report(&node);
    let ipcache = r["ipcache"].as_object().expect("ipcache in the report");
    assert!(!ipcache.is_empty(), "{r}");
    for ip in ips {
        assert!(
            !ipcache.contains_key(&format!("{ip}/32")),
            "{ip} still in the ipcache after DEL: {r}"
        );
    }
    node.stop();
}
