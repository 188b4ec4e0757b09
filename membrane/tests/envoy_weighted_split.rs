//! Issue 8: Cilium's weighted traffic-splitting CEC example
//! (`envoy-helloworld-v1-90-v2-10.yaml`), applied unchanged with
//! `--datapath ebpf`: requests a client pod sends to the frontend Service
//! `helloworld` are redirected by the tc program to the CEC's Envoy
//! listener, which splits them 90/10 between the backend Services
//! `helloworld-v1` and `helloworld-v2` (EDS under Cilium's port-less names
//! `default/helloworld-v1`, `default/helloworld-v2`).
//!
//! Runs as root on the real kernel in network namespaces of its own (the
//! eBPF crate's topology); without root/bpffs/nsenter it skips, except
//! under `CI=true`, where it fails.

mod common;
mod ebpf_up;
#[path = "../../ebpf/tests/common/mod.rs"]
mod netns;
mod netns_pods;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::wait_until;
use ebpf_up::{Up, nsenter_available};
use netns::Topology;
use netns_pods::echo_and_http;

const VIP: &str = "10.96.0.40";
const REQUESTS: usize = 400;

/// A ClusterIP Service on port 5000 (→ 8081) over the backend pods `pods`.
fn service(name: &str, cluster_ip: &str, pods: &[usize]) -> String {
    let eps: String = pods
        .iter()
        .map(|i| {
            format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
                netns::backend_ip(*i)
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  clusterIPs: ["{cluster_ip}"]
  ports:
    - {{name: http, port: 5000, protocol: TCP, targetPort: 8081}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
  - {{name: http, port: 8081, protocol: TCP}}
endpoints:
{eps}"#
    )
}

/// One GET through the frontend: the answering pod's name on a 200.
fn get_pod(addr: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: helloworld\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_owned())
}

#[test]
fn cilium_weighted_split_example_splits_90_10_through_the_redirected_frontend() {
    if !netns::prerequisites() || !nsenter_available() {
        return;
    }
    let pins = netns::PinDir::new("wsplit");
    let topo = Topology::with_servers("wsplit", echo_and_http);
    let devices = topo.node_ifaces.join(",");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let agent = Up::new(dir, &topo.node.name, &pins.0, &devices)
        .lb_pool("127.0.135.0/24")
        .ports(31088, 31448)
        .wait_envoy_ready()
        .start();

    let services = dir.join("helloworld-services.yaml");
    let yaml = [
        service("helloworld", VIP, &[1, 2]),
        service("helloworld-v1", "10.96.0.41", &[1]),
        service("helloworld-v2", "10.96.0.42", &[2]),
    ]
    .join("---\n");
    std::fs::write(&services, yaml).expect("write");
    agent.apply_file(&services);
    agent.apply_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/cilium-envoy/envoy-helloworld-v1-90-v2-10.yaml"),
    );

    let fe = format!("{VIP}:5000/TCP");
    assert!(
        wait_until(Duration::from_secs(20), || {
            agent.status().is_some_and(|s| {
                s["datapath"]["redirected_to_envoy"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|e| e["frontend"] == fe.as_str()))
            })
        }),
        "{fe} never redirected to Envoy: {:?}",
        agent.status()
    );
    let vip: SocketAddr = format!("{VIP}:5000").parse().expect("addr");
    assert!(
        wait_until(Duration::from_secs(30), || topo
            .client_run(|| get_pod(vip))
            .is_some()),
        "no answer through the redirected frontend:\n{}",
        agent.log_text()
    );

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..REQUESTS {
        match topo.client_run(|| get_pod(vip)) {
            Some(pod) => *seen.entry(pod).or_default() += 1,
            None => failed += 1,
        }
    }
    let v1 = seen.get("be1").copied().unwrap_or(0);
    let v2 = seen.get("be2").copied().unwrap_or(0);
    eprintln!(
        "{REQUESTS} requests: helloworld-v1 (be1) {v1}, helloworld-v2 (be2) {v2}, failed {failed}"
    );
    assert_eq!(failed, 0, "requests failed: {seen:?}");
    assert_eq!(v1 + v2, REQUESTS, "answered by other pods: {seen:?}");
    // 90/10 over 400 requests: v1 expects 360, sd 6; ±4 sd is 0.84..0.96.
    let share = v1 as f64 / REQUESTS as f64;
    assert!(
        (0.84..=0.96).contains(&share),
        "helloworld-v1 got {v1} of {REQUESTS} ({share:.3}), expected about 0.9"
    );

    let (code, out, err) = agent.cli(&["status"]);
    assert_eq!(code, 0, "status fails:\n{out}{err}");
}
