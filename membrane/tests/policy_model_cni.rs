//! The upstream Kubernetes network-policy model through the real path:
//! `membrane up --enable-cni --datapath ebpf` in a node namespace, the nine
//! model pods (x, y, z × a, b, c) networked by the installed `membrane-cni`
//! run as a runtime runs it, each case of the shared model
//! (`ebpf/tests/policy_cases`) applied with `membrane apply` (the previous
//! case's policies removed with `membrane delete`), and every pod × pod
//! cell probed with real packets over TCP and UDP 80 and 81. `membrane
//! policy trace` (live) names the deciding rule of an allowed and a denied
//! cell; after CNI DEL the pods' addresses are gone from the ipcache.
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
use policy_cases::{MODEL, ModelPod, NAMED_PORT, SERVER_PY, steps, wrong_cells};
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

/// `NetworkPolicy ns/name` for each policy of a step's YAML.
fn names(yaml: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for doc in yaml.split("---\n").filter(|d| !d.trim().is_empty()) {
        let v: Value = serde_yaml_ng::from_str(doc).expect("step yaml");
        out.insert(format!(
            "NetworkPolicy {}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or_default(),
            v["metadata"]["name"].as_str().unwrap_or_default()
        ));
    }
    out
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

    // The previous step's file and policy names.
    let mut previous: Option<(PathBuf, BTreeSet<String>)> = None;
    for (i, step) in steps().iter().enumerate() {
        let before = report(&node)["computations"].as_u64().unwrap_or(0);
        let want = names(&step.policies);
        let mut changed = false;
        match previous.take() {
            // Same policies, new content: an update in place.
            Some((_, prev)) if prev == want => {}
            Some((p, _)) => {
                let (code, out) = node.cli(&["delete", "-f", p.to_str().expect("utf8")]);
                assert_eq!(code, 0, "{out}");
                changed = true;
            }
            None => {}
        }
        if !step.policies.is_empty() {
            let p = dir.join(format!("step{i}.yaml"));
            std::fs::write(&p, &step.policies).expect("write");
            let (code, out) = node.cli(&["apply", "-f", p.to_str().expect("utf8")]);
            assert_eq!(code, 0, "{}: {out}", step.what);
            previous = Some((p, want.clone()));
            changed = true;
        }
        // Programmed: the agent recomputed after the change and the
        // step's policies (only those) are in force.
        let ok = wait_until(Duration::from_secs(10), || {
            let r = report(&node);
            (!changed || r["computations"].as_u64().unwrap_or(0) > before) && in_force(&r) == want
        });
        assert!(ok, "{}: policies never in force\n{}", step.what, node.log());
        // The servers answer before the first step is judged.
        let wrong = if i == 0 {
            let mut w = Vec::new();
            let ok = wait_until(Duration::from_secs(20), || {
                w = wrong_cells(&pods, step);
                w.is_empty()
            });
            if ok { Vec::new() } else { w }
        } else {
            wrong_cells(&pods, step)
        };
        if !wrong.is_empty() {
            let explained: Vec<String> = wrong
                .iter()
                .map(|w| {
                    let dport = format!("{}/{:?}", w.port, w.l4).to_uppercase();
                    let t = trace(&node, pods[w.src].ip, pods[w.dst].ip, &dport);
                    format!("{}\n{t}", w.describe(&pods))
                })
                .collect();
            panic!(
                "{}: {} wrong cells:\n{}",
                step.what,
                wrong.len(),
                explained.join("\n")
            );
        }
        // The live trace names the deciding rule, allowed and denied.
        if step.what.starts_with("podSelector") {
            let (xa, xb, xc) = (ips[0], ips[1], ips[2]);
            let t = trace(&node, xb, xa, "80/TCP");
            assert!(
                t.contains("Ingress: ALLOWED by NetworkPolicy x/a-from-b spec.ingress[0]")
                    && t.contains("Final verdict: ALLOWED"),
                "{t}"
            );
            let t = trace(&node, xc, xa, "80/TCP");
            assert!(
                t.contains("Ingress: DENIED  default deny (NetworkPolicy x/a-from-b")
                    && t.contains("Final verdict: DENIED"),
                "{t}"
            );
        }
    }

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
