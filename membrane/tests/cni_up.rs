//! `membrane up --enable-cni` inside a node namespace this test creates:
//! the plugin and conflist installed into the test's directories, pods
//! (namespaces) networked through the installed plugin, Pods from
//! `membrane apply` labelling their endpoints, `membrane endpoint list`,
//! the node's CiliumNode pod CIDRs, and state surviving a restart.
//! Needs root, iproute2 and Envoy (in CI a missing one fails).

mod cni_node;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cni_node::{HTTP_PY, Netns, Node, Pins, Proc, ip_of, prerequisites};
use common::{require_envoy, wait_until};
use serde_json::{Value, json};

#[test]
fn up_installs_the_plugin_and_registers_labelled_endpoints() {
    if !prerequisites() {
        return;
    }
    require_envoy();
    let mut node = Node::new();
    node.start();
    let list: Value = serde_json::from_str(
        &std::fs::read_to_string(node.conf_dir().join("05-membrane.conflist")).expect("conflist"),
    )
    .expect("json");
    assert_eq!(list["cniVersion"], "1.0.0");
    assert_eq!(list["plugins"][0]["type"], "membrane");
    assert_eq!(node.pod_cidrs(), json!(["10.123.0.0/24", "fd00:123::/64"]));

    let pod_yaml = node.dir.path().join("pod.yaml");
    std::fs::write(
        &pod_yaml,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec:\n  containers: [{name: c, image: busybox}]\n",
    )
    .expect("write");
    let (code, out) = node.cli(&["apply", "-f", pod_yaml.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");

    let web = Netns::new("pod");
    let (code, r) = node.plugin(
        "ADD",
        "web-1",
        &web.path(),
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web",
    );
    assert_eq!(code, 0, "ADD: {r}\n{}", node.log());
    let v4 = ip_of(&r, false);
    assert!(v4.starts_with("10.123.0."), "{v4}");
    let eps = node.endpoints();
    assert_eq!(eps.as_array().map(Vec::len), Some(1), "{eps}");
    let ep = &eps[0];
    assert_eq!(ep["pod"], "shop/web");
    assert_eq!(ep["node"], "node-a");
    assert_eq!(ep["state"], "ready");
    assert_eq!(
        ep["labels"],
        json!({"app": "web"}),
        "labels from the Pod object at ADD"
    );
    assert_eq!(ep["ips"][0], v4);
    assert!(
        ep["interface"]
            .as_str()
            .is_some_and(|i| i.starts_with("lxc")),
        "{ep}"
    );
    let (code, table) = node.cli(&["endpoint", "list"]);
    assert_eq!(code, 0);
    assert!(
        table.starts_with("ID") && table.contains("shop/web") && table.contains(&v4),
        "{table}"
    );

    // A restarted agent keeps its CIDRs, endpoints and allocations.
    node.stop();
    node.start();
    assert_eq!(node.pod_cidrs(), json!(["10.123.0.0/24", "fd00:123::/64"]));
    assert_eq!(node.endpoints()[0]["pod"], "shop/web");
    let other = Netns::new("pod");
    let (code, r2) = node.plugin(
        "ADD",
        "db-1",
        &other.path(),
        "IgnoreUnknown=1;K8S_POD_NAME=db",
    );
    assert_eq!(code, 0, "ADD after restart: {r2}");
    assert_ne!(ip_of(&r2, false), v4, "no duplicate after a restart");
    assert_ne!(ip_of(&r2, true), ip_of(&r, true));
    let eps = node.endpoints();
    assert_eq!(eps[1]["pod"], "default/db", "namespace defaults to default");

    for (cid, ns) in [("web-1", &web), ("db-1", &other)] {
        let (code, r) = node.plugin("DEL", cid, &ns.path(), "");
        assert_eq!(code, 0, "DEL: {r}");
    }
    assert_eq!(node.endpoints(), json!([]));
    node.stop();
}

fn curl(ns: &Netns, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "curl", "-s", "--max-time", "3", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn pods_reach_each_other_and_a_cluster_ip_through_the_ebpf_datapath() {
    if !prerequisites() {
        return;
    }
    require_envoy();
    let python = Command::new("python3")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    let curl_ok = Command::new("curl")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(python && curl_ok) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI: needs python3 and curl"
        );
        eprintln!("skipping: needs python3 and curl");
        return;
    }
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/membrane-cni-test-{}",
        common::rand_suffix()
    )));
    let mut node = Node::new();
    // Pods reach Ingress addresses through their gateway, so the pool is
    // routable (10.123.0.0/16 is this test's, and only inside its node).
    node.lb_pool = "10.123.201.0/28".into();
    node.extra = ["--datapath", "ebpf", "--bpf-pin-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([pins.0.display().to_string()])
        .chain(["--maglev-table-size", "251", "--max-services", "64"].map(String::from))
        .collect();
    node.start();

    let client = Netns::new("pod");
    let backends: Vec<Netns> = (0..2).map(|_| Netns::new("pod")).collect();
    let (code, _) = node.plugin("ADD", "client", &client.path(), "K8S_POD_NAME=client");
    assert_eq!(code, 0);
    let mut ips = Vec::new();
    let mut servers = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let (code, r) = node.plugin(
            "ADD",
            &format!("be{i}"),
            &b.path(),
            &format!("K8S_POD_NAME=be{i}"),
        );
        assert_eq!(code, 0, "{r}");
        ips.push(ip_of(&r, false));
        servers.push(Proc(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &b.0,
                    "python3",
                    "-c",
                    HTTP_PY,
                    &format!("be{i}"),
                    "23081",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("backend"),
        ));
    }
    // The datapath is on every pod's host interface.
    let status: Value = node
        .cli(&["status", "-o", "json"])
        .1
        .parse()
        .expect("status");
    let attached: Vec<String> = status["datapath"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(str::to_string))
        .collect();
    for ep in node.endpoints().as_array().expect("endpoints") {
        let i = ep["interface"].as_str().expect("interface").to_string();
        assert!(attached.contains(&i), "{i} not in {attached:?}");
    }
    // Pod to pod.
    let ok = wait_until(Duration::from_secs(10), || {
        curl(&client, &format!("http://{}:23081/", ips[0])).as_deref() == Some("be0")
    });
    assert!(ok, "client -> be0 pod to pod");
    // Pod to ClusterIP, load-balanced over both backends by the tc program.
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 10.96.123.10\n  ports: [{{port: 80, targetPort: 23081}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{port: 23081}}]\nendpoints:\n  - addresses: [\"{}\"]\n  - addresses: [\"{}\"]\n",
        ips[0], ips[1]
    );
    let svc_path = node.dir.path().join("svc.yaml");
    std::fs::write(&svc_path, svc).expect("write");
    let (code, out) = node.cli(&["apply", "-f", svc_path.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    let mut seen = std::collections::BTreeSet::new();
    let ok = wait_until(Duration::from_secs(20), || {
        if let Some(b) = curl(&client, "http://10.96.123.10/") {
            seen.insert(b);
        }
        seen.len() == 2
    });
    assert!(ok, "ClusterIP answered by {seen:?}\n{}", node.log());
    // Pod to Envoy through an Ingress: the tc program hands the VIP's
    // connections to Envoy's listener.
    let vip = ingress_vip(&node, "shop");
    let mut body = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        let out = Command::new("ip")
            .args(["netns", "exec", &client.0, "curl", "-si", "--max-time", "3"])
            .arg(format!("http://{vip}/"))
            .output()
            .expect("curl");
        body = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        body.contains("server: envoy") && (body.contains("be0") || body.contains("be1"))
    });
    assert!(ok, "Ingress {vip}: {body}\n{}", node.log());
    drop(servers);
    for (cid, ns) in [
        ("client", &client),
        ("be0", &backends[0]),
        ("be1", &backends[1]),
    ] {
        assert_eq!(node.plugin("DEL", cid, &ns.path(), "").0, 0);
    }
    node.stop();
}

/// podman (CNI backend) + runc + busybox-static, configured entirely in a
/// temporary directory and run in the node's namespace.
struct Podman {
    dir: PathBuf,
    ns: String,
}

impl Podman {
    fn available() -> bool {
        let ok = ["podman", "runc"].iter().all(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        }) && Path::new("/bin/busybox").exists();
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI: needs podman, runc and busybox-static (scripts/setup.sh)"
            );
            eprintln!("skipping: needs podman, runc and busybox-static (scripts/setup.sh)");
        }
        ok
    }

    fn new(node: &Node) -> Podman {
        let dir = node.dir.path().join("podman");
        for d in ["root", "runroot", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\ntmp_dir = \"{}\"\n",
            node.bin_dir().display(),
            node.conf_dir().display(),
            dir.join("tmp").display()
        );
        std::fs::write(dir.join("containers.conf"), conf).expect("containers.conf");
        Podman {
            dir,
            ns: node.ns.path(),
        }
    }

    /// A rootfs of busybox-static whose httpd serves `name`.
    fn rootfs(&self, name: &str) -> PathBuf {
        let root = self.dir.join(format!("rootfs-{name}"));
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "www"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("sh");
        std::fs::write(root.join("www/index.html"), name).expect("index");
        root
    }

    /// `podman ARGS` in the node's network namespace (nsenter keeps the
    /// mount namespace, so the agent sees podman's netns bind mounts).
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.ns))
            .arg("podman")
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .expect("podman")
    }

    /// `podman run` with the flags this machine needs; `rootfs` last, as
    /// `--rootfs` takes it as the positional image argument.
    fn container(
        &self,
        flags: &[&str],
        rootfs: &Path,
        cmd: &[&str],
    ) -> (std::process::Output, Duration) {
        let mut args = vec!["run", "--network", "membrane"];
        args.extend([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]);
        args.extend_from_slice(flags);
        args.extend(["--rootfs", rootfs.to_str().expect("utf8")]);
        args.extend_from_slice(cmd);
        let t = std::time::Instant::now();
        let out = self.run(&args);
        (out, t.elapsed())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--force", "--all", "--time", "0"]);
    }
}

fn http_via_nc(target: &str) -> String {
    format!(
        "printf 'GET / HTTP/1.1\\r\\nHost: shop\\r\\nConnection: close\\r\\n\\r\\n' | /bin/busybox nc -w 3 {target}; echo"
    )
}

#[test]
fn podman_containers_get_their_network_from_membrane_cni() {
    if !prerequisites() || !Podman::available() {
        return;
    }
    require_envoy();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/membrane-cni-podman-{}",
        common::rand_suffix()
    )));
    let mut node = Node::new();
    // Pods reach Ingress addresses through their gateway, so the pool is
    // routable (10.123.0.0/16 is this test's, and only inside its node).
    node.lb_pool = "10.123.200.0/28".into();
    node.extra = ["--datapath", "ebpf", "--bpf-pin-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([pins.0.display().to_string()])
        .chain(["--maglev-table-size", "251", "--max-services", "64"].map(String::from))
        .collect();
    node.start();
    let podman = Podman::new(&node);
    let mut ips = Vec::new();
    for name in ["web1", "web2"] {
        let rootfs = podman.rootfs(name);
        let (out, took) = podman.container(
            &["-d", "--name", name],
            &rootfs,
            &["/bin/busybox", "httpd", "-f", "-p", "23081", "-h", "/www"],
        );
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("podman run -d {name}: {:.0} ms", took.as_secs_f64() * 1e3);
        let eps = node.endpoints();
        let ep = eps
            .as_array()
            .expect("list")
            .iter()
            .find(|e| e["pod"] == format!("default/{name}"))
            .unwrap_or_else(|| panic!("no endpoint for {name}: {eps}"))
            .clone();
        ips.push(ep["ips"][0].as_str().expect("ip").to_string());
    }
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 10.96.123.20\n  ports: [{{port: 80, targetPort: 23081}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{port: 23081}}]\nendpoints:\n  - addresses: [\"{}\"]\n  - addresses: [\"{}\"]\n",
        ips[0], ips[1]
    );
    let svc_path = node.dir.path().join("svc.yaml");
    std::fs::write(&svc_path, svc).expect("write");
    let (code, out) = node.cli(&["apply", "-f", svc_path.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");

    let vip = ingress_vip(&node, "shop");

    // A client container: the other container directly, then the ClusterIP
    // (translated by the tc program on its host interface) until both
    // backends answered.
    let client = podman.rootfs("client");
    // Envoy resets a request whose client half-closed first; keep nc's
    // input open until the answer is in.
    let via_ingress = format!(
        "(printf 'GET / HTTP/1.1\\r\\nHost: shop\\r\\nConnection: close\\r\\n\\r\\n'; /bin/busybox sleep 2) | /bin/busybox nc -w 3 {vip} 80"
    );
    let script = format!(
        "{}; for i in $(/bin/busybox seq 1 30); do {}; done; echo INGRESS; {via_ingress}",
        http_via_nc(&format!("{} 23081", ips[0])),
        http_via_nc("10.96.123.20 80"),
    );
    let mut answered = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        let (out, _) = podman.container(
            &["--rm", "--name", "client"],
            &client,
            &["/bin/sh", "-c", &script],
        );
        answered = String::from_utf8_lossy(&out.stdout).into_owned();
        let direct = answered.split("HTTP/1.").nth(1).unwrap_or("");
        let (services, ingress) = answered.split_once("INGRESS").unwrap_or((&answered, ""));
        direct.contains("web1")
            && services.matches("web1").count() > 1
            && services.contains("web2")
            && ingress.contains("server: envoy")
            && (ingress.contains("web1") || ingress.contains("web2"))
    });
    assert!(ok, "client saw: {answered}\n{}", node.log());
    // podman DELs on stop: the endpoints and host interfaces go.
    let out = podman.run(&["rm", "--force", "--all", "--time", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = wait_until(Duration::from_secs(10), || node.endpoints() == json!([]));
    assert!(gone, "endpoints left after podman rm: {}", node.endpoints());
    node.stop();
}

/// Apply Ingress `name` (path / to Service web:80) and wait for its address.
fn ingress_vip(node: &Node, name: &str) -> String {
    let path = node.dir.path().join(format!("ingress-{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "{}---\n{}",
            common::INGRESS_CLASS,
            common::ingress_yaml(name, &[("/", "web", 80)])
        ),
    )
    .expect("write");
    let (code, out) = node.cli(&["apply", "-f", path.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    let mut vip = None;
    wait_until(Duration::from_secs(20), || {
        vip = node
            .cli(&["get", "ingress", name, "-o", "json"])
            .1
            .parse::<Value>()
            .ok()
            .and_then(|v| {
                v.pointer("/status/loadBalancer/ingress/0/ip")?
                    .as_str()
                    .map(str::to_string)
            });
        vip.is_some()
    });
    vip.unwrap_or_else(|| panic!("Ingress {name} got no address:\n{}", node.log()))
}

/// The CiliumNode's `status.ipam.pod-cidrs` as (CIDR, state).
fn cidr_states(node: &Node) -> Vec<(String, String)> {
    let (_, out) = node.cli(&["get", "ciliumnode", "node-a", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    v.pointer("/status/ipam/pod-cidrs")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, s)| (k.clone(), s["status"].as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pod_cidrs_grow_when_depleted_and_shrink_when_released() {
    if !prerequisites() {
        return;
    }
    require_envoy();
    let mut node = Node::new();
    // /28 node CIDRs: 13 pod addresses each; thresholds 8 (allocate) and
    // 16 (release) as Cilium's cluster-pool-v2beta.
    node.v4_pool = ("10.123.64.0/26".into(), "28".into());
    node.start();
    let v4 = |c: &Value| -> Vec<String> {
        c.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|c| !c.contains(':'))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(v4(&node.pod_cidrs()), ["10.123.64.0/28"]);
    let ok = wait_until(Duration::from_secs(10), || {
        cidr_states(&node).contains(&("10.123.64.0/28".into(), "in-use".into()))
    });
    assert!(ok, "first CIDR in-use: {:?}", cidr_states(&node));
    let pods: Vec<Netns> = (0..20).map(|_| Netns::new("pod")).collect();
    let mut addrs = std::collections::BTreeSet::new();
    for (i, p) in pods.iter().enumerate() {
        let (code, r) = node.plugin(
            "ADD",
            &format!("g{i}"),
            &p.path(),
            &format!("K8S_POD_NAME=p{i}"),
        );
        assert_eq!(code, 0, "ADD {i}: {r}\n{}", node.log());
        assert!(addrs.insert(ip_of(&r, false)), "duplicate address {r}");
        if i == 5 {
            // 7 free < 8: the CIDR is depleted and a second one is added.
            let ok = wait_until(Duration::from_secs(10), || v4(&node.pod_cidrs()).len() == 2);
            assert!(
                ok,
                "no second CIDR: {} {:?}",
                node.pod_cidrs(),
                cidr_states(&node)
            );
        }
    }
    // 20 of 26 used: depleted again, a third CIDR.
    let ok = wait_until(Duration::from_secs(10), || v4(&node.pod_cidrs()).len() == 3);
    assert!(
        ok,
        "no third CIDR: {} {:?}",
        node.pod_cidrs(),
        cidr_states(&node)
    );
    let cidrs = v4(&node.pod_cidrs());
    let in_second = addrs
        .iter()
        .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .filter(|a| (16..32).contains(&a.octets()[3]))
        .count();
    assert_eq!(in_second, 7, "pods 14..20 from the second CIDR: {addrs:?}");
    for (i, p) in pods.iter().enumerate() {
        let (code, r) = node.plugin("DEL", &format!("g{i}"), &p.path(), "");
        assert_eq!(code, 0, "DEL {i}: {r}");
    }
    // 39 free: the unused third CIDR is released (26 stay free > 16) and
    // withdrawn; the second stays (13 would not be > 16).
    let ok = wait_until(Duration::from_secs(10), || {
        v4(&node.pod_cidrs()) == cidrs[..2]
    });
    assert!(
        ok,
        "third CIDR not withdrawn: {} {:?}",
        node.pod_cidrs(),
        cidr_states(&node)
    );
    let states = cidr_states(&node);
    assert!(
        states.iter().all(|(c, s)| s == "in-use" && c != &cidrs[2]),
        "{states:?}"
    );
    node.stop();
}
