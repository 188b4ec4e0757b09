//! Shared pieces of the policy tests through the real path
//! (`policy_model_cni`, `policy_cilium_cni`): a node running `membrane up
//! --enable-cni --datapath ebpf`, pods added by the installed plugin with a
//! server in each, policies applied with `membrane apply` and waited for
//! until the agent has them in force, and the live `membrane policy trace`.
//! Each test declares `mod common; mod cni_node; mod policy_cases; mod
//! policy_support;`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cni_node::{Netns, Node, Pins, Proc, ip_of};
use crate::common::{self, wait_until};
use crate::policy_cases::{ModelPod, NAMED_PORT, SERVER_PY, Step, wrong_cells};
use serde_json::Value;

/// Namespaces (`ns=<name>`) and Pods (`pod=<name>`, the named port
/// [`NAMED_PORT`] on 81/TCP) of `pods`, as one multi-document YAML.
pub fn cluster_yaml(pods: &[(&str, &str)]) -> String {
    let mut y = String::new();
    let namespaces: BTreeSet<&str> = pods.iter().map(|(ns, _)| *ns).collect();
    for ns in namespaces {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for (ns, pod) in pods {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers: [{{name: c, image: agnhost, ports: [{{name: {NAMED_PORT}, containerPort: 81, protocol: TCP}}, {{containerPort: 80}}]}}]\n"
        ));
    }
    y
}

/// Root, iproute2 and python3 (in CI a missing one fails); Envoy is
/// checked by `common::require_envoy`.
pub fn prerequisites() -> bool {
    if !crate::cni_node::prerequisites() {
        return false;
    }
    common::require_envoy();
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
    }
    py
}

/// A node for the policy tests: the eBPF datapath pinned under a fresh
/// bpffs directory, this test's pools and ports. `before_start` runs on
/// the node's namespace before `membrane up` (e.g. to wire an outside
/// network, whose addresses the agent then counts as the host's).
pub fn start_node(
    tag: &str,
    lb_pool: &str,
    ports: (u16, u16),
    before_start: impl FnOnce(&Node),
) -> (Pins, Node) {
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/membrane-{tag}-test-{}",
        common::rand_suffix()
    )));
    let mut node = Node::new();
    node.lb_pool = lb_pool.into();
    node.v4_pool = ("10.215.0.0/16".into(), "24".into());
    node.v6_pool = "fd00:215::/48".into();
    node.ports = ports;
    node.extra = ["--datapath", "ebpf", "--bpf-pin-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([pins.0.display().to_string()])
        .chain(["--maglev-table-size", "251", "--max-services", "64"].map(String::from))
        .collect();
    before_start(&node);
    node.start();
    (pins, node)
}

/// Pods added through the plugin, a server in each.
pub struct Pods {
    // Declared first: servers stop before their namespaces go.
    pub servers: Vec<Proc>,
    pub netns: Vec<Netns>,
    /// (namespace, pod) of each.
    pub names: Vec<(&'static str, &'static str)>,
    pub v4: Vec<IpAddr>,
    pub v6: Vec<IpAddr>,
}

impl Pods {
    /// Applies the Namespaces and Pods of `pods` and runs CNI ADD for
    /// each; every pod serves TCP and UDP on `ports`.
    pub fn add(node: &Node, pods: &[(&'static str, &'static str)], ports: &[u16]) -> Pods {
        let dir = node.dir.path().join("policy");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let cluster = dir.join("cluster.yaml");
        std::fs::write(&cluster, cluster_yaml(pods)).expect("write");
        let (code, out) = node.cli(&["apply", "-f", cluster.to_str().expect("utf8")]);
        assert_eq!(code, 0, "{out}");
        let mut netns = Vec::new();
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (ns, pod) in pods {
            let n = Netns::new("pol");
            let (code, r) = node.plugin(
                "ADD",
                &format!("{ns}-{pod}"),
                &n.path(),
                &format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}"),
            );
            assert_eq!(code, 0, "ADD {ns}/{pod}: {r}\n{}", node.log());
            v4.push(ip_of(&r, false).parse().expect("pod address"));
            v6.push(ip_of(&r, true).parse().expect("pod address"));
            netns.push(n);
        }
        let servers = netns.iter().map(|n| serve(&n.0, ports)).collect();
        Pods {
            servers,
            netns,
            names: pods.to_vec(),
            v4,
            v6,
        }
    }

    fn index(&self, ns: &str, pod: &str) -> usize {
        self.names
            .iter()
            .position(|m| *m == (ns, pod))
            .unwrap_or_else(|| panic!("no pod {ns}/{pod}"))
    }
    pub fn ip(&self, ns: &str, pod: &str) -> IpAddr {
        self.v4[self.index(ns, pod)]
    }
    pub fn ip6(&self, ns: &str, pod: &str) -> IpAddr {
        self.v6[self.index(ns, pod)]
    }
    /// The pod's network namespace (`ip netns` name).
    pub fn ns(&self, ns: &str, pod: &str) -> &str {
        &self.netns[self.index(ns, pod)].0
    }
    /// The pods as the shared model sees them (IPv4 addresses).
    pub fn model(&self) -> Vec<ModelPod<'_>> {
        self.names
            .iter()
            .zip(&self.netns)
            .zip(&self.v4)
            .map(|(((ns, pod), n), ip)| ModelPod {
                ns,
                name: pod,
                netns: &n.0,
                ip: *ip,
            })
            .collect()
    }
}

/// A TCP and UDP server on `ports` in network namespace `netns`.
pub fn serve(netns: &str, ports: &[u16]) -> Proc {
    Proc(
        Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-c", SERVER_PY])
            .args(ports.iter().map(ToString::to_string))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("server"),
    )
}

/// The agent's policy report (`membrane policy get -o json`).
pub fn report(node: &Node) -> Value {
    let (code, out) = node.cli(&["policy", "get", "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).expect("policy get json")
}

/// Policy names (`Kind ns/name`) in force on any endpoint.
pub fn in_force(r: &Value) -> BTreeSet<String> {
    r["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["policies"].as_array().into_iter().flatten())
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect()
}

/// `Kind ns/name` (or `Kind name`) for each policy of a step's YAML.
pub fn names(yaml: &str) -> BTreeSet<String> {
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
pub struct Cases<'a> {
    node: &'a Node,
    dir: PathBuf,
    /// The previous case's file and policy names.
    previous: Option<(PathBuf, BTreeSet<String>)>,
    n: usize,
}

impl<'a> Cases<'a> {
    pub fn new(node: &'a Node) -> Self {
        let dir = node.dir.path().join("policy");
        std::fs::create_dir_all(&dir).expect("mkdir");
        Cases {
            node,
            dir,
            previous: None,
            n: 0,
        }
    }

    /// Returns whether this was an update in place (the same policies with
    /// new content): "in force" cannot tell the old content from the new
    /// then, so the caller waits for the new behaviour.
    pub fn apply(&mut self, what: &str, policies: &str) -> bool {
        let node = self.node;
        self.n += 1;
        let before = report(node)["computations"].as_u64().unwrap_or(0);
        let want = names(policies);
        let mut changed = false;
        let mut in_place = false;
        match self.previous.take() {
            // Same policies, new content: an update in place.
            Some((_, prev)) if prev == want => in_place = !want.is_empty(),
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
        in_place
    }
}

/// Every cell of `step`; a wrong cell fails with the agent's live trace.
pub fn check(node: &Node, pods: &[ModelPod], step: &Step) {
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
pub fn assert_trace(node: &Node, src: IpAddr, dst: IpAddr, dport: &str, want: &[&str]) {
    let t = trace(node, src, dst, dport);
    for w in want {
        assert!(
            t.contains(w),
            "trace {src} -> {dst} {dport}: want {w:?}\n{t}"
        );
    }
}

/// `membrane policy trace --src SRC --dst DST --dport DPORT` (live).
pub fn trace(node: &Node, src: IpAddr, dst: IpAddr, dport: &str) -> String {
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
