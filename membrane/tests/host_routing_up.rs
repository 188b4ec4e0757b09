//! eBPF host routing and the socket LB through the real path: `membrane up
//! --enable-cni --datapath ebpf --enable-socket-lb` in a node namespace,
//! pods networked by the installed `membrane-cni`, a ClusterIP Service from
//! `membrane apply`. With the node's forwarding off, pod → pod and pod →
//! ClusterIP → pod still work (host routing; the counters show the BPF
//! path), a node process in the socket LB's cgroup reaches the ClusterIP,
//! and after a restart with `--enable-host-legacy-routing` the same
//! requests need forwarding again. Needs root, iproute2, python3, curl and
//! Envoy (in CI a missing one fails).

mod cni_node;
mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use cni_node::{HTTP_PY, Netns, Node, Pins, Proc, ip_of, prerequisites};
use common::{require_envoy, wait_until};
use serde_json::Value;

/// Ports of this test (hostpath's range).
const HTTP: u16 = 14080;
const HTTPS: u16 = 14443;
const SERVER: u16 = 14081;
const VIP: &str = "10.96.114.10";

/// A namespace named with this test's prefix (`mbh-`).
fn netns(tag: &str) -> Netns {
    let n = format!("mbh-{tag}-{}", common::rand_suffix());
    let ok = Command::new("ip")
        .args(["netns", "add", &n])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip netns add {n}");
    Netns(n)
}

/// curl's exit code and body (1 s limit; 28 = timed out).
fn curl(ns: &Netns, url: &str) -> (i32, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "curl", "-s", "--max-time", "1", url])
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn forwarding(node: &Node, on: bool) {
    let v = u8::from(on);
    for kv in [
        format!("net.ipv4.ip_forward={v}"),
        format!("net.ipv6.conf.all.forwarding={v}"),
    ] {
        let ok = Command::new("ip")
            .args(["netns", "exec", &node.ns.0, "sysctl", "-qw", &kv])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "sysctl {kv}");
    }
}

fn status(node: &Node) -> Value {
    let (code, out) = node.cli(&["status", "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).expect("status json")
}

/// A cgroup v2 directory of this test's own, removed on drop.
struct Cgroup(PathBuf);
impl Cgroup {
    fn new() -> Option<Cgroup> {
        let base = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists())?;
        let p = base.join(format!(
            "membrane-test-hostpath-up-{}",
            common::rand_suffix()
        ));
        std::fs::create_dir(&p).expect("mkdir cgroup");
        Some(Cgroup(p))
    }
}
impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// curl from the node's namespace, in `cg` (as a host-network pod would be).
fn node_curl(node: &Node, cg: &Cgroup, url: &str) -> String {
    cg_curl(&node.ns.path(), cg, url)
}

/// curl from the network namespace at `netns`, in `cg` (on a real node
/// every pod's processes are under the cgroup root the socket LB is at).
fn cg_curl(netns: &str, cg: &Cgroup, url: &str) -> String {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec curl -s --max-time 1 {url}",
        cg.0.display()
    );
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["sh", "-c", &script])
        .output()
        .expect("curl from the node");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn service_yaml(web_ip: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: ClusterIP
  clusterIP: {VIP}
  clusterIPs: ["{VIP}"]
  ports:
    - {{name: http, port: 80, protocol: TCP, targetPort: {SERVER}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {{name: http, port: {SERVER}, protocol: TCP}}
endpoints:
  - addresses: ["{web_ip}"]
    conditions: {{ready: true}}
"#
    )
}

#[test]
fn host_routing_and_socket_lb_through_membrane_up() {
    if !prerequisites() {
        return;
    }
    require_envoy();
    for tool in ["python3", "curl", "nsenter"] {
        let ok = Command::new("which")
            .arg(tool)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI: needs {tool}"
            );
            eprintln!("skipping: needs {tool}");
            return;
        }
    }
    let Some(cg) = Cgroup::new() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI: needs cgroup v2"
        );
        eprintln!("skipping: no cgroup v2 hierarchy");
        return;
    };
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/membrane-hostpath-test-{}",
        common::rand_suffix()
    )));
    let mut node = Node::new();
    // This test's namespace prefix instead of the harness's.
    let _old = std::mem::replace(&mut node.ns, netns("node"));
    let up = Command::new("ip")
        .args(["-n", &node.ns.0, "link", "set", "lo", "up"])
        .status();
    assert!(up.is_ok_and(|s| s.success()));
    node.lb_pool = "127.14.1.0/24".into();
    node.v4_pool = ("10.114.0.0/16".into(), "24".into());
    node.v6_pool = "fd00:114::/48".into();
    node.ports = (HTTP, HTTPS);
    let base: Vec<String> = ["--datapath", "ebpf", "--bpf-pin-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([pins.0.display().to_string()])
        .chain(["--maglev-table-size", "251", "--max-services", "64"].map(String::from))
        .chain(["--enable-socket-lb".into(), "--cgroup-root".into()])
        .chain([cg.0.display().to_string()])
        .collect();
    node.extra = base.clone();
    node.start();

    let pods = node.dir.path().join("pods.yaml");
    std::fs::write(
        &pods,
        ["web", "client"]
            .map(|n| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: shop, labels: {{app: {n}}}}}\nspec:\n  containers: [{{name: c, image: busybox}}]\n---\n"))
            .concat(),
    )
    .expect("write pods");
    let (code, out) = node.cli(&["apply", "-f", pods.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    let mut ns = std::collections::BTreeMap::new();
    let mut ips = std::collections::BTreeMap::new();
    for name in ["web", "client"] {
        let n = netns("pod");
        let (code, r) = node.plugin(
            "ADD",
            name,
            &n.path(),
            &format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}"),
        );
        assert_eq!(code, 0, "ADD {name}: {r}\n{}", node.log());
        ips.insert(name, ip_of(&r, false));
        ns.insert(name, n);
    }
    let _server = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns["web"].0, "python3", "-c", HTTP_PY])
            .arg("web")
            .arg(SERVER.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("server"),
    );
    let svc = node.dir.path().join("svc.yaml");
    std::fs::write(&svc, service_yaml(&ips["web"])).expect("write svc");
    let (code, out) = node.cli(&["apply", "-f", svc.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    let direct = format!("http://{}:{SERVER}/", ips["web"]);
    let via_vip = format!("http://{VIP}/");
    let ok = wait_until(Duration::from_secs(10), || {
        curl(&ns["client"], &direct) == (0, "web".into())
            && curl(&ns["client"], &via_vip) == (0, "web".into())
    });
    assert!(ok, "client -> web (forwarding on)\n{}", node.log());

    // Host routing: the node does not forward, the program does.
    let st = status(&node);
    let dp = &st["datapath"];
    assert_eq!(dp["host_routing"]["mode"], "BPF", "{dp}");
    assert!(dp["host_routing_endpoints"].as_u64() >= Some(2), "{dp}");
    assert_eq!(dp["socket_lb"]["enabled"], true, "{dp}");
    let (_, human) = node.cli(&["status"]);
    assert!(human.contains("Host Routing:  BPF"), "{human}");
    assert!(human.contains("Socket LB:     Enabled"), "{human}");
    forwarding(&node, false);
    let before = status(&node)["datapath"]["stats"].clone();
    assert_eq!(curl(&ns["client"], &direct), (0, "web".into()), "pod → pod");
    assert_eq!(
        curl(&ns["client"], &via_vip),
        (0, "web".into()),
        "pod → ClusterIP → pod"
    );
    let after = status(&node)["datapath"]["stats"].clone();
    // Policy runs on the pods' devices, so delivery goes through their
    // egress hook (bpf_redirect), not redirect_peer.
    let hooked = |s: &Value| s["host_route_redirect_egress_hook"].as_u64().unwrap_or(0);
    assert!(
        hooked(&after) >= hooked(&before) + 8,
        "before {before}\nafter {after}"
    );

    // Socket LB: a node process in the cgroup reaches the ClusterIP.
    assert_eq!(node_curl(&node, &cg, &via_vip), "web");
    // And a pod's process (Cilium's default with kube-proxy replacement):
    // translated at connect, so the tc program forwards its packets (host
    // routing, forwarding is off) without translating any of them.
    let before = status(&node)["datapath"]["stats"].clone();
    assert_eq!(cg_curl(&ns["client"].path(), &cg, &via_vip), "web");
    let after = status(&node)["datapath"]["stats"].clone();
    let n = |s: &Value, k: &str| s[k].as_u64().unwrap_or(0);
    assert!(
        n(&after, "sock_translate") > n(&before, "sock_translate"),
        "before {before}\nafter {after}"
    );
    for k in ["forward_new", "forward_established", "reverse_nat"] {
        assert_eq!(
            n(&after, k),
            n(&before, k),
            "{k}: before {before}\nafter {after}"
        );
    }
    assert!(
        hooked(&after) >= hooked(&before) + 4,
        "before {before}\nafter {after}"
    );

    // Legacy routing: the same requests need the host stack's forwarding.
    node.stop();
    node.extra = base;
    node.extra.push("--enable-host-legacy-routing".into());
    node.start();
    let st = status(&node);
    assert_eq!(st["datapath"]["host_routing"]["mode"], "Legacy", "{st}");
    assert!(
        st["datapath"]["host_routing"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--enable-host-legacy-routing")),
        "{st}"
    );
    // Applied objects live in memory only: apply them again, and wait
    // until the datapath holds the Service.
    for f in [&pods, &svc] {
        let (code, out) = node.cli(&["apply", "-f", f.to_str().expect("utf8")]);
        assert_eq!(code, 0, "{out}");
    }
    let ok = wait_until(Duration::from_secs(10), || {
        node.cli(&["service", "list", "-o", "json"])
            .1
            .contains(&format!("{VIP}:80/TCP"))
    });
    assert!(ok, "service programmed after the restart\n{}", node.log());
    // The CNI turns forwarding on as it starts: off again.
    forwarding(&node, false);
    assert_eq!(
        curl(&ns["client"], &via_vip).0,
        28,
        "legacy, forwarding off"
    );
    assert_eq!(curl(&ns["client"], &direct).0, 28, "legacy, forwarding off");
    forwarding(&node, true);
    let ok = wait_until(Duration::from_secs(5), || {
        curl(&ns["client"], &via_vip) == (0, "web".into())
    });
    assert!(ok, "legacy, forwarding on\n{}", node.log());
    // The socket LB came back with the restarted agent.
    assert_eq!(node_curl(&node, &cg, &via_vip), "web");
}
