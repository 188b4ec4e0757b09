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

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use cni_node::{Netns, Node, Pins, Proc, ip_of, prerequisites};
use common::{require_envoy, wait_until};
use policy_cases::{L4, MODEL, ModelPod, NAMED_PORT, SERVER_PY, Step, steps, wrong_cells};
use serde_json::Value;

/// Ports, pools and addresses of this test (polperf's ranges).
const HTTP: u16 = 15080;
const HTTPS: u16 = 15443;

fn cluster_yaml() -> String {
    let mut y = String::new();
    for ns in ["x", "y", "z"] {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for (ns, pod) in MODEL {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers: [{{name: c, image: agnhost, ports: [{{name: {NAMED_PORT}, containerPort: 81, protocol: TCP}}, {{containerPort: 80}}]}}]\n"
        ));
    }
    y
}

/// The agent's policy report (`membrane policy get -o json`).
fn report(node: &Node) -> Value {
    let (code, out) = node.cli(&["policy", "get", "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).expect("policy get json")
}

/// Policy names (`Kind ns/name`) in force on any endpoint.
fn in_force(r: &Value) -> BTreeSet<String> {
    r["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["policies"].as_array().into_iter().flatten())
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect()
}

/// `Kind ns/name` (or `Kind name`) for each policy of a step's YAML.
fn names(yaml: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for doc in yaml.split("---\n").filter(|d| !d.trim().is_empty()) {
        let v: Value = serde_yaml_ng::from_str(doc).expect("step yaml");
        let kind = v["kind"].as_str().unwrap_or_default();
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        out.insert(match v["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} {name}"),
        });
    }
    out
}

/// Applies one case's policies in place of the previous case's and waits
/// until the agent has them in force.
struct Cases<'a> {
    node: &'a Node,
    dir: PathBuf,
    /// The previous case's file and policy names.
    previous: Option<(PathBuf, BTreeSet<String>)>,
    n: usize,
}

impl Cases<'_> {
    fn apply(&mut self, what: &str, policies: &str) {
        let node = self.node;
        self.n += 1;
        let before = report(node)["computations"].as_u64().unwrap_or(0);
        let want = names(policies);
        let mut changed = false;
        match self.previous.take() {
            // Same policies, new content: an update in place.
            Some((_, prev)) if prev == want => {}
            Some((p, _)) => {
                let (code, out) = node.cli(&["delete", "-f", p.to_str().expect("utf8")]);
                assert_eq!(code, 0, "{out}");
                changed = true;
            }
            None => {}
        }
        if !policies.is_empty() {
            let p = self.dir.join(format!("case{}.yaml", self.n));
            std::fs::write(&p, policies).expect("write");
            let (code, out) = node.cli(&["apply", "-f", p.to_str().expect("utf8")]);
            assert_eq!(code, 0, "{what}: {out}");
            self.previous = Some((p, want.clone()));
            changed = true;
        }
        // Programmed: the agent recomputed after the change and the
        // case's policies (only those) are in force.
        let ok = wait_until(Duration::from_secs(10), || {
            let r = report(node);
            (!changed || r["computations"].as_u64().unwrap_or(0) > before) && in_force(&r) == want
        });
        assert!(ok, "{what}: policies never in force\n{}", node.log());
    }
}

/// Every cell of `step`; a wrong cell fails with the agent's live trace.
fn check(node: &Node, pods: &[ModelPod], step: &Step) {
    let wrong = wrong_cells(pods, step);
    if wrong.is_empty() {
        return;
    }
    let explained: Vec<String> = wrong
        .iter()
        .map(|w| {
            let dport = format!("{}/{:?}", w.port, w.l4).to_uppercase();
            let t = trace(node, pods[w.src].ip, pods[w.dst].ip, &dport);
            format!("{}\n{t}", w.describe(pods))
        })
        .collect();
    panic!(
        "{}: {} wrong cells:\n{}",
        step.what,
        wrong.len(),
        explained.join("\n")
    );
}

/// The trace of `src -> dst` contains every line of `want`.
#[track_caller]
fn assert_trace(node: &Node, src: IpAddr, dst: IpAddr, dport: &str, want: &[&str]) {
    let t = trace(node, src, dst, dport);
    for w in want {
        assert!(
            t.contains(w),
            "trace {src} -> {dst} {dport}: want {w:?}\n{t}"
        );
    }
}

fn trace(node: &Node, src: IpAddr, dst: IpAddr, dport: &str) -> String {
    let (code, out) = node.cli(&[
        "policy",
        "trace",
        "--src",
        &src.to_string(),
        "--dst",
        &dst.to_string(),
        "--dport",
        dport,
    ]);
    assert_eq!(code, 0, "{out}");
    out
}

#[test]
fn kubernetes_policy_model_on_cni_pods() {
    if !prerequisites() {
        return;
    }
    require_envoy();
    let py = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !py {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI: needs python3"
        );
        eprintln!("skipping: needs python3");
        return;
    }
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/membrane-polmodel-test-{}",
        common::rand_suffix()
    )));
    let mut node = Node::new();
    node.lb_pool = "127.15.1.0/24".into();
    node.v4_pool = ("10.215.0.0/16".into(), "24".into());
    node.v6_pool = "fd00:215::/48".into();
    node.ports = (HTTP, HTTPS);
    node.extra = ["--datapath", "ebpf", "--bpf-pin-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([pins.0.display().to_string()])
        .chain(["--maglev-table-size", "251", "--max-services", "64"].map(String::from))
        .collect();
    node.start();
    let dir = node.dir.path().join("policy");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let cluster = dir.join("cluster.yaml");
    std::fs::write(&cluster, cluster_yaml()).expect("write");
    let (code, out) = node.cli(&["apply", "-f", cluster.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");

    // The pods, through the plugin; a server on 80 and 81 in each.
    let mut netns = Vec::new();
    let mut ips = Vec::new();
    for (ns, pod) in MODEL {
        let n = Netns::new("pol");
        let (code, r) = node.plugin(
            "ADD",
            &format!("{ns}-{pod}"),
            &n.path(),
            &format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}"),
        );
        assert_eq!(code, 0, "ADD {ns}/{pod}: {r}\n{}", node.log());
        let ip: IpAddr = ip_of(&r, false).parse().expect("pod address");
        ips.push(ip);
        netns.push(n);
    }
    let _servers: Vec<Proc> = netns
        .iter()
        .map(|n| {
            Proc(
                Command::new("ip")
                    .args([
                        "netns", "exec", &n.0, "python3", "-c", SERVER_PY, "80", "81",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("server"),
            )
        })
        .collect();
    let pods: Vec<ModelPod> = MODEL
        .iter()
        .zip(&netns)
        .zip(&ips)
        .map(|(((ns, pod), n), ip)| ModelPod {
            ns,
            name: pod,
            netns: &n.0,
            ip: *ip,
        })
        .collect();

    let mut cases = Cases {
        node: &node,
        dir: dir.clone(),
        previous: None,
        n: 0,
    };
    let ip = |ns: &str, pod: &str| {
        MODEL
            .iter()
            .position(|m| *m == (ns, pod))
            .map(|i| ips[i])
            .expect("model pod")
    };
    for (i, step) in steps().iter().enumerate() {
        cases.apply(step.what, &step.policies);
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
    let fake = cluster_yaml().replace(
        "name: b, namespace: y, labels: {pod: b}",
        "name: b, namespace: y, labels: {pod: b, io.kubernetes.pod.namespace: x, io.cilium.k8s.namespace.labels.ns: x}",
    );
    assert_ne!(fake, cluster_yaml());
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
    for ((ns, pod), n) in MODEL.iter().zip(&netns) {
        let (code, r) = node.plugin("DEL", &format!("{ns}-{pod}"), &n.path(), "");
        assert_eq!(code, 0, "DEL {ns}/{pod}: {r}");
    }
    assert_eq!(report(&node)["endpoints"], serde_json::json!([]));
    // `ipcache` in the report is read back from the kernel's map.
    let r = report(&node);
    let ipcache = r["ipcache"].as_object().expect("ipcache in the report");
    assert!(!ipcache.is_empty(), "{r}");
    for ip in &ips {
        assert!(
            !ipcache.contains_key(&format!("{ip}/32")),
            "{ip} still in the ipcache after DEL: {r}"
        );
    }
    node.stop();
}
