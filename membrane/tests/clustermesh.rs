//! Cluster Mesh end to end, as root on the real kernel: two clusters, each a
//! node network namespace running `membrane up --datapath ebpf` and its own
//! etcd (mutual TLS, certificates from the certs crate), backend pods in pod
//! namespaces, a link between the nodes, and real TCP traffic from a client
//! pod in cluster1 to a global Service.
//!
//! Addresses: 10.125.0.0/16 inside the test's namespaces only; ports
//! 25200–25299; LB pools in 127.25.0.0/16. Without root/bpffs/nsenter/etcd
//! the test skips, except under `CI=true`, where it fails.

mod common;
mod ebpf_up;
#[path = "../../ebpf/tests/common/mod.rs"]
mod netns;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::wait_until;
use ebpf_up::{Agent, Up};
use netns::{Netns, Proc, echo_server, which_backend};
use serde_json::Value;

const VIP: &str = "10.125.200.10";
const ETCD: &str = "/usr/bin/etcd";

fn tools_available() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    for (what, ok) in [
        (
            "nsenter (util-linux)",
            Command::new("nsenter")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        ),
        ("etcd (Debian etcd-server)", Path::new(ETCD).exists()),
    ] {
        if !ok {
            assert!(!ci, "{what} is required (CI=true)");
            eprintln!("SKIPPED: {what} not found");
            return false;
        }
    }
    true
}

/// Two node namespaces joined by a veth link; a client pod on node 1; two
/// backend pods per node running echo servers named `c<cluster>p<i>`.
struct Mesh {
    // Held until the end of the test; declared first so the servers die
    // before their namespaces are deleted.
    #[allow(dead_code)]
    servers: Vec<Proc>,
    node1: Netns,
    node2: Netns,
    client: Netns,
    #[allow(dead_code)]
    pods: Vec<Netns>,
}

impl Mesh {
    fn new() -> Mesh {
        let p = format!("mm{}", std::process::id());
        let node1 = Netns::new(format!("{p}-n1"));
        let node2 = Netns::new(format!("{p}-n2"));
        let client = Netns::new(format!("{p}-c1"));
        for n in [&node1, &node2] {
            n.sysctl("net.ipv4.ip_forward=1");
            n.sysctl("net.ipv4.conf.all.rp_filter=0");
            n.sysctl("net.ipv4.conf.default.rp_filter=0");
        }
        let pod = |node: &Netns, ns: &Netns, host_if: &str, net: &str| {
            node.ip(&[
                "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            node.ip(&["addr", "add", &format!("{net}.1/24"), "dev", host_if]);
            node.ip(&["link", "set", host_if, "up"]);
            ns.ip(&["addr", "add", &format!("{net}.2/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", &format!("{net}.1")]);
            node.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter=0"));
        };
        pod(&node1, &client, "hc", "10.125.1");
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for (c, node) in [(1, &node1), (2, &node2)] {
            for i in 1..=2 {
                let ns = Netns::new(format!("{p}-c{c}p{i}"));
                pod(node, &ns, &format!("hp{i}"), &format!("10.125.{c}{i}"));
                servers.push(echo_server(&ns, &format!("c{c}p{i}"), 8080));
                pods.push(ns);
            }
        }
        // The link between the nodes and the routes to the other's pods.
        node1.ip(&[
            "link",
            "add",
            "lk",
            "type",
            "veth",
            "peer",
            "name",
            "lk",
            "netns",
            &node2.name,
        ]);
        node1.ip(&["addr", "add", "10.125.0.1/30", "dev", "lk"]);
        node2.ip(&["addr", "add", "10.125.0.2/30", "dev", "lk"]);
        node1.ip(&["link", "set", "lk", "up"]);
        node2.ip(&["link", "set", "lk", "up"]);
        node1.sysctl("net.ipv4.conf.lk.rp_filter=0");
        node2.sysctl("net.ipv4.conf.lk.rp_filter=0");
        node1.ip(&["route", "add", "10.125.16.0/20", "via", "10.125.0.2"]);
        node2.ip(&["route", "add", "10.125.0.0/20", "via", "10.125.0.1"]);
        let m = Mesh {
            servers,
            node1,
            node2,
            client,
            pods,
        };
        // Every pod answers the client directly (routing works both ways).
        for (c, i) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            let addr: SocketAddr = format!("10.125.{c}{i}.2:8080").parse().unwrap();
            let want = format!("c{c}p{i}");
            netns::wait_for(
                &format!("{want} from the client"),
                Duration::from_secs(15),
                || {
                    m.client
                        .run(|| which_backend(addr).ok())
                        .filter(|n| *n == want)
                },
            );
        }
        m
    }

    /// The backends `n` new connections to the global Service reach; the
    /// first failure ends the round.
    fn seen(&self, n: usize) -> std::io::Result<BTreeSet<String>> {
        let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
        self.client
            .run(|| (0..n).map(|_| which_backend(vip)).collect())
    }
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// One etcd in a node namespace, client TLS with client-cert auth; killed
/// by PID (nsenter execs etcd, so the child is etcd itself).
struct Etcd {
    child: Option<Child>,
    args: Vec<String>,
    ns: String,
    log: PathBuf,
}

impl Etcd {
    fn start(ns: &Netns, ip: &str, port: u16, pki: &Path, data: &Path) -> Etcd {
        let url = format!("https://{ip}:{port}");
        let peer = format!("http://{ip}:{}", port + 1);
        let args = vec![
            "--name=mesh".to_string(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=mesh={peer}"),
            format!("--cert-file={}", pki.join("server.crt").display()),
            format!("--key-file={}", pki.join("server.key").display()),
            format!("--trusted-ca-file={}", pki.join("ca.crt").display()),
            "--client-cert-auth=true".into(),
        ];
        let mut e = Etcd {
            child: None,
            args,
            ns: ns.name.clone(),
            log: data.with_extension("log"),
        };
        e.restart();
        e
    }

    fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .arg(ETCD)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Cilium's etcd config file format.
fn etcd_config(endpoint: &str, pki: &Path) -> String {
    format!(
        "endpoints:\n- {endpoint}\ntrusted-ca-file: {}\nkey-file: {}\ncert-file: {}\n",
        pki.join("ca.crt").display(),
        pki.join("client.key").display(),
        pki.join("client.crt").display()
    )
}

/// `membrane up --datapath ebpf` of cluster `cluster` in `node`, connected
/// to its own etcd and to the other cluster's through `dir/clustermesh`.
fn start_agent(
    dir: &Path,
    node: &Netns,
    pins: &Path,
    devices: &str,
    cluster: u32,
    pool: &str,
) -> Agent {
    let etcd = format!("etcd.config={}", dir.join("etcd.yaml").display());
    let mesh = dir.join("clustermesh").display().to_string();
    Up::new(dir, &node.name, pins, devices)
        .lb_pool(pool)
        .ports(25280, 25281)
        .args(["--cluster-name", &format!("cluster{cluster}")])
        .args(["--cluster-id", &cluster.to_string()])
        .args(["--kvstore", "etcd", "--kvstore-opt", &etcd])
        .args(["--clustermesh-config", &mesh])
        .args(["--clustermesh-sync-timeout", "20s"])
        .ready_timeout(Duration::from_secs(60))
        .start()
}

/// Backend addresses of the global Service's TCP frontend.
fn backends(agent: &Agent) -> Vec<String> {
    agent
        .services()
        .iter()
        .find(|s| s["frontend"] == format!("{VIP}:80/TCP"))
        .and_then(|s| s["backends"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|b| b["address"].as_str().map(str::to_string))
        .collect()
}

/// The agent's view of remote cluster `cluster`.
fn remote(agent: &Agent, cluster: &str) -> Value {
    agent
        .status()
        .map(|s| s["datapath"]["clustermesh"]["remote_clusters"][cluster].clone())
        .unwrap_or(Value::Null)
}

/// The global Service `default/echo` of one cluster with `extra`
/// annotations, and its EndpointSlice over `pods` of that cluster.
fn echo(cluster: u32, annotations: &[(&str, &str)], pods: &[u32]) -> String {
    let ann: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let eps: String = pods
        .iter()
        .map(|i| {
            format!(
                "  - addresses: [\"10.125.{cluster}{i}.2\"]\n    conditions:\n      ready: true\n"
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{eps}")
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
  annotations:
    service.cilium.io/global: "true"
{ann}spec:
  type: ClusterIP
  clusterIP: {VIP}
  clusterIPs: ["{VIP}"]
  ports:
    - name: tcp
      port: 80
      protocol: TCP
      targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-c{cluster}
  namespace: default
  labels:
    kubernetes.io/service-name: echo
addressType: IPv4
ports:
  - name: tcp
    port: 8080
    protocol: TCP
endpoints:{eps}"#
    )
}

fn wait_backends(agent: &Agent, n: usize, what: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || backends(agent).len() == n),
        "{what}: expected {n} backends, have {:?}; status {:?}",
        backends(agent),
        agent.status().map(|s| s["datapath"]["clustermesh"].clone())
    );
}

/// Traffic converges to exactly `want`: 40 new connections in a row all
/// succeed and reach exactly those backends. The datapath may lag the API
/// by a sync, and a connection open while its backend is removed is reset
/// (its conntrack entry is re-balanced, as in Cilium), so a failed round
/// only means "not yet".
fn wait_traffic(mesh: &Mesh, want: &[&str], what: &str) {
    let want = names(want);
    let mut last = Ok(BTreeSet::new());
    let ok = wait_until(Duration::from_secs(20), || {
        last = mesh.seen(40);
        last.as_ref().is_ok_and(|seen| *seen == want)
    });
    assert!(ok, "{what}: traffic went to {last:?}, expected {want:?}");
}

#[test]
fn two_clusters_global_service_affinity_and_failover() {
    if !netns::prerequisites() || !tools_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();

    // PKI: one CA; the etcd server certificate covers both node addresses.
    let pki = root.join("pki");
    std::fs::create_dir_all(&pki).expect("mkdir");
    let ca = membrane_certs::TestCa::new("mesh-ca").expect("ca");
    let (sc, sk) = ca
        .issue(&["10.125.0.1", "10.125.0.2", "127.0.0.1"])
        .expect("server");
    let (cc, ck) = ca.issue(&["membrane"]).expect("client");
    for (n, v) in [
        ("ca.crt", ca.cert_pem()),
        ("server.crt", &sc),
        ("server.key", &sk),
        ("client.crt", &cc),
        ("client.key", &ck),
    ] {
        std::fs::write(pki.join(n), v).expect("write");
    }

    let mesh = Mesh::new();
    let _etcd1 = Etcd::start(&mesh.node1, "10.125.0.1", 25201, &pki, &root.join("etcd1"));
    let mut etcd2 = Etcd::start(&mesh.node2, "10.125.0.2", 25211, &pki, &root.join("etcd2"));

    // Each agent exports into its own etcd and imports the other's.
    let (d1, d2) = (root.join("c1"), root.join("c2"));
    for (d, own, other, other_name) in [
        (
            &d1,
            "https://10.125.0.1:25201",
            "https://10.125.0.2:25211",
            "cluster2",
        ),
        (
            &d2,
            "https://10.125.0.2:25211",
            "https://10.125.0.1:25201",
            "cluster1",
        ),
    ] {
        std::fs::create_dir_all(d.join("clustermesh")).expect("mkdir");
        std::fs::write(d.join("etcd.yaml"), etcd_config(own, &pki)).expect("write");
        std::fs::write(
            d.join("clustermesh").join(other_name),
            etcd_config(other, &pki),
        )
        .expect("write");
    }
    let pins1 = netns::PinDir::new("mesh1");
    let pins2 = netns::PinDir::new("mesh2");
    let a1 = start_agent(
        &d1,
        &mesh.node1,
        &pins1.0,
        "hc,hp1,hp2,lk",
        1,
        "127.25.1.0/24",
    );
    let a2 = start_agent(&d2, &mesh.node2, &pins2.0, "hp1,hp2,lk", 2, "127.25.2.0/24");

    // A global service balances over both clusters.
    a2.apply(&d2, &echo(2, &[], &[1, 2]));
    a1.apply(&d1, &echo(1, &[], &[1, 2]));
    wait_backends(&a1, 4, "cluster1 merges cluster2's backends");
    wait_backends(&a2, 4, "cluster2 merges cluster1's backends");
    let r = remote(&a1, "cluster2");
    assert!(
        r["connected"] == true && r["synced"] == true && r["cluster_id"] == 2,
        "{r}"
    );
    wait_traffic(&mesh, &["c1p1", "c1p2", "c2p1", "c2p2"], "affinity none");

    // local: only local backends, preferred in the CLI.
    a1.apply(
        &d1,
        &echo(1, &[("service.cilium.io/affinity", "local")], &[1, 2]),
    );
    wait_traffic(&mesh, &["c1p1", "c1p2"], "affinity local");
    let (code, table, err) = a1.cli(&["service", "list", "--clustermesh-affinity"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("10.125.11.2:8080/TCP (active) (preferred)"),
        "{table}"
    );
    assert!(table.contains("10.125.21.2:8080/TCP (active)\n"), "{table}");
    let (_, plain, _) = a1.cli(&["service", "list"]);
    assert!(!plain.contains("(preferred)"), "{plain}");

    // Local backends quarantined: fail over to the remote ones, and back.
    let (code, out, err) = a1.cli(&[
        "service",
        "update",
        "--backends",
        "10.125.11.2:8080,10.125.12.2:8080",
        "--states",
        "quarantined",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    wait_traffic(&mesh, &["c2p1", "c2p2"], "local quarantined");
    let (code, _, err) = a1.cli(&[
        "service",
        "update",
        "--backends",
        "10.125.11.2:8080,10.125.12.2:8080",
        "--states",
        "active",
    ]);
    assert_eq!(code, 0, "{err}");
    wait_traffic(&mesh, &["c1p1", "c1p2"], "local active again");

    // Local backends deleted: remote; restored: local.
    a1.apply(
        &d1,
        &echo(1, &[("service.cilium.io/affinity", "local")], &[]),
    );
    wait_traffic(&mesh, &["c2p1", "c2p2"], "local deleted");
    a1.apply(
        &d1,
        &echo(1, &[("service.cilium.io/affinity", "local")], &[1, 2]),
    );
    wait_traffic(&mesh, &["c1p1", "c1p2"], "local restored");

    // remote (legacy annotation): the reverse.
    a1.apply(
        &d1,
        &echo(1, &[("io.cilium/service-affinity", "remote")], &[1, 2]),
    );
    wait_traffic(&mesh, &["c2p1", "c2p2"], "affinity remote");
    let (_, table, _) = a1.cli(&["service", "list", "--clustermesh-affinity"]);
    assert!(
        table.contains("10.125.21.2:8080/TCP (active) (preferred)"),
        "{table}"
    );
    assert!(
        !table.contains("10.125.11.2:8080/TCP (active) (preferred)"),
        "{table}"
    );

    // shared: "false" in cluster2 keeps its backends private: cluster1
    // falls back to its own; cluster2 still uses cluster1's.
    a2.apply(
        &d2,
        &echo(2, &[("service.cilium.io/shared", "false")], &[1, 2]),
    );
    wait_backends(&a1, 2, "cluster2 not shared");
    wait_traffic(&mesh, &["c1p1", "c1p2"], "cluster2 not shared");
    // A non-shared service still uses the remote backends.
    wait_backends(&a2, 4, "cluster2 not shared, cluster1's backends");
    a2.apply(&d2, &echo(2, &[], &[1, 2]));
    wait_backends(&a1, 4, "cluster2 shared again");
    wait_traffic(&mesh, &["c2p1", "c2p2"], "cluster2 shared again");

    // cluster2's etcd dies: its last backends keep serving.
    etcd2.kill();
    assert!(
        wait_until(
            Duration::from_secs(20),
            || remote(&a1, "cluster2")["connected"] == false
        ),
        "disconnect not noticed: {}",
        remote(&a1, "cluster2")
    );
    assert_eq!(backends(&a1).len(), 4);
    wait_traffic(&mesh, &["c2p1", "c2p2"], "remote etcd down");
    // Meanwhile cluster2 drops a backend; its return resyncs, no duplicates.
    a2.apply(&d2, &echo(2, &[], &[1]));
    etcd2.restart();
    wait_backends(&a1, 3, "resync after the remote etcd returned");
    let bes = backends(&a1);
    let unique: BTreeSet<&String> = bes.iter().collect();
    assert_eq!(unique.len(), bes.len(), "duplicates: {bes:?}");
    assert!(remote(&a1, "cluster2")["connected"] == true);
    wait_traffic(&mesh, &["c2p1"], "after resync");

    // none again: everything that is left.
    a1.apply(
        &d1,
        &echo(1, &[("service.cilium.io/affinity", "none")], &[1, 2]),
    );
    wait_traffic(
        &mesh,
        &["c1p1", "c1p2", "c2p1"],
        "affinity none after resync",
    );

    // Latency from a remote endpoint change (applied in cluster2) to
    // cluster1's programmed datapath (its `service list`, which reads the
    // datapath's programmed state), polled every 20 ms: an upper bound.
    let mut lat = Vec::new();
    for i in 0..20 {
        let pods: &[u32] = if i % 2 == 0 { &[1, 2] } else { &[1] };
        let want = 2 + pods.len();
        let t0 = std::time::Instant::now();
        a2.apply(&d2, &echo(2, &[], pods));
        assert!(
            wait_until(Duration::from_secs(10), || backends(&a1).len() == want),
            "change {i} not seen"
        );
        lat.push(t0.elapsed());
    }
    lat.sort();
    eprintln!(
        "remote endpoint change -> local datapath: p50 {:?} p90 {:?} max {:?} (n={})",
        lat[lat.len() / 2],
        lat[lat.len() * 9 / 10],
        lat[lat.len() - 1],
        lat.len()
    );
}
