//! `membrane up --datapath ebpf` end to end, as root on the real kernel: a
//! node network namespace with a client pod and three backend pods (the
//! eBPF crate's topology), `membrane up` running inside the node namespace,
//! a ClusterIP Service applied with `membrane apply`, real TCP and UDP
//! traffic from the client pod, `membrane service list/update`, and an
//! agent restart that keeps both the quarantine and an established flow.
//!
//! Without root/bpffs/nsenter the test skips, except under `CI=true`,
//! where it fails.

mod common;
mod ebpf_up;
#[path = "../../ebpf/tests/common/mod.rs"]
mod netns;
mod netns_pods;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::wait_until;
use ebpf_up::{Up, nsenter_available};
use netns::{PinDir, Topology, ask, connect, which_backend, which_backend_udp};
use netns_pods::echo_and_http;
use serde_json::Value;

const VIP: &str = "10.96.0.10";

/// A ClusterIP Service (TCP 80 and UDP 53 → 8080) over the three backend pods.
fn echo_service() -> String {
    let eps: String = (1..=3)
        .map(|i| {
            format!(
                "  - addresses: [\"{}\"]\n    conditions:\n      ready: true\n",
                netns::backend_ip(i)
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {VIP}
  clusterIPs: ["{VIP}"]
  ports:
    - name: tcp
      port: 80
      protocol: TCP
      targetPort: 8080
    - name: udp
      port: 53
      protocol: UDP
      targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-abc
  namespace: default
  labels:
    kubernetes.io/service-name: echo
addressType: IPv4
ports:
  - name: tcp
    port: 8080
    protocol: TCP
  - name: udp
    port: 8080
    protocol: UDP
endpoints:
{eps}"#
    )
}

/// A Service the datapath rejects in part: an unknown algorithm.
const BAD_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: bad
  namespace: default
  annotations:
    service.cilium.io/lb-algorithm: roundrobin
spec:
  clusterIP: 10.96.0.11
  ports:
    - port: 80
"#;

fn frontend<'a>(services: &'a [Value], fe: &str) -> Option<&'a Value> {
    services.iter().find(|s| s["frontend"] == fe)
}

/// (address, state) of a frontend's backends.
fn backend_states(services: &[Value], fe: &str) -> Vec<(String, String)> {
    frontend(services, fe)
        .and_then(|s| s["backends"].as_array())
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_owned(),
                b["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn backends_seen(topo: &Topology, n: usize) -> BTreeSet<String> {
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    topo.client_run(|| {
        (0..n)
            .map(|_| which_backend(vip).expect("TCP to the ClusterIP"))
            .collect()
    })
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn agent_programs_services_quarantines_and_survives_restart() {
    if !netns::prerequisites() || !nsenter_available() {
        return;
    }
    let pins = PinDir::new("agent");
    let topo = Topology::new("agent");
    let devices = topo.node_ifaces.join(",");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("manifests")).expect("mkdir");

    let mut agent = Up::new(dir, &topo.node.name, &pins.0, &devices).start();
    let st = agent.status().expect("status");
    let attached: BTreeSet<String> = st["datapath"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        attached,
        topo.node_ifaces.iter().cloned().collect::<BTreeSet<_>>()
    );

    // Objects through the local API, as `kubectl apply` would.
    agent.apply(dir, &echo_service());
    agent.apply(dir, BAD_SERVICE);
    let fe = format!("{VIP}:80/TCP");
    assert!(
        wait_until(Duration::from_secs(10), || {
            backend_states(&agent.services(), &fe).len() == 3
        }),
        "{fe} never got 3 backends: {:?}",
        agent.services()
    );
    let svcs = agent.services();
    let tcp = frontend(&svcs, &fe).expect("TCP frontend");
    assert_eq!(tcp["type"], "ClusterIP");
    assert_eq!(tcp["service"], "default/echo");
    assert!(
        frontend(&svcs, &format!("{VIP}:53/UDP")).is_some(),
        "{svcs:?}"
    );

    // The bad Service is reported by name and field, and still programmed
    // with the default algorithm.
    let st = agent.status().expect("status");
    let rejected = st["rejected"].as_array().cloned().unwrap_or_default();
    assert!(
        rejected.iter().any(|r| r["object"] == "Service default/bad"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("service.cilium.io/lb-algorithm"))),
        "{rejected:?}"
    );
    assert!(frontend(&svcs, "10.96.0.11:80/TCP").is_some());
    let (code, _, _) = agent.cli(&["status"]);
    assert_ne!(code, 0, "status exits non-zero while something is rejected");

    // Real traffic from the client pod: TCP and UDP spread over all three.
    assert_eq!(backends_seen(&topo, 45), names(&["be1", "be2", "be3"]));
    let udp_vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let udp: BTreeSet<String> = topo.client_run(|| {
        (0..45)
            .map(|_| which_backend_udp(udp_vip).expect("UDP to the ClusterIP"))
            .collect()
    });
    assert_eq!(udp, names(&["be1", "be2", "be3"]));

    // `membrane service list`, Cilium's table.
    let (code, table, err) = agent.cli(&["service", "list"]);
    assert_eq!(code, 0, "{err}");
    let header = table.lines().next().unwrap_or_default();
    for col in ["ID", "Frontend", "Service Type", "Backend"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table.lines().any(|l| l.contains(&fe)
            && l.contains("ClusterIP")
            && l.contains("1 => 10.244.11.2:8080/TCP (active)")),
        "{table}"
    );
    assert!(
        table.contains("3 => 10.244.13.2:8080/TCP (active)"),
        "{table}"
    );

    // Quarantine be2: new connections avoid it.
    let be2 = format!("{}:8080", netns::backend_ip(2));
    let (code, out, err) = agent.cli(&[
        "service",
        "update",
        "--backends",
        &be2,
        "--states",
        "quarantined",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{be2}/TCP: quarantined")), "{out}");
    assert!(
        backend_states(&agent.services(), &fe)
            .contains(&(format!("{be2}/TCP"), "quarantined".into()))
    );
    assert_eq!(backends_seen(&topo, 45), names(&["be1", "be3"]));
    let (code, table, _) = agent.cli(&["service", "list"]);
    assert_eq!(code, 0);
    assert!(
        table.contains(&format!("{be2}/TCP (quarantined)")),
        "{table}"
    );
    // Unknown backends and states are refused.
    let (code, _, err) = agent.cli(&[
        "service",
        "update",
        "--backends",
        "10.1.2.3:80",
        "--states",
        "quarantined",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("not a backend"), "{err}");
    let (code, _, _) = agent.cli(&["service", "update", "--backends", &be2, "--states", "gone"]);
    assert_ne!(code, 0);

    // Stats in the status report.
    let st = agent.status().expect("status");
    let stats = &st["datapath"]["stats"];
    assert!(stats["forward_new"].as_u64().unwrap_or(0) >= 90, "{stats}");
    assert!(stats["reverse_nat"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert_eq!(stats["drop_no_backend"], 0, "{stats}");

    // An established connection, then a restart of the agent. Objects
    // applied through the local API persist in the embedded API's data
    // directory (in the run directory): the echo Service comes back by
    // itself; the bad one is deleted first so nothing is rejected after.
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let mut conn = topo.client_run(|| connect(vip).expect("connect"));
    let first = ask(&mut conn, "before").expect("ask before restart");
    assert!(first == "be1" || first == "be3", "{first}");
    let bad = dir.join("bad-service.yaml");
    std::fs::write(&bad, BAD_SERVICE).expect("write");
    let (code, out, err) = agent.cli(&["delete", "-f", bad.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "delete failed: {out}{err}");
    agent.stop();

    // With no agent at all, the pinned program keeps forwarding.
    assert_eq!(ask(&mut conn, "agent-down").expect("ask"), first);
    let down = backends_seen(&topo, 15);
    assert!(!down.contains("be2"), "{down:?}");

    let agent2 = Up::new(dir, &topo.node.name, &pins.0, &devices).start();
    assert!(
        agent2.log_text().contains("datapath state restored"),
        "{}",
        agent2.log_text()
    );
    assert_eq!(
        ask(&mut conn, "after").expect("established connection after restart"),
        first
    );
    assert!(
        backend_states(&agent2.services(), &fe)
            .contains(&(format!("{be2}/TCP"), "quarantined".into())),
        "{:?}",
        agent2.services()
    );
    assert_eq!(backends_seen(&topo, 45), names(&["be1", "be3"]));
    let st = agent2.status().expect("status");
    assert!(
        st["rejected"].as_array().is_some_and(|r| r.is_empty()),
        "{st}"
    );

    // Back to active: be2 takes new connections again.
    let (code, out, err) = agent2.cli(&[
        "service",
        "update",
        "--backends",
        &be2,
        "--states",
        "active",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(backends_seen(&topo, 45), names(&["be1", "be2", "be3"]));
    assert_eq!(ask(&mut conn, "end").expect("ask"), first);
    drop(agent2);
    drop(agent);
}

const WEB_VIP: &str = "10.96.0.20";

/// ClusterIP Service `web` (80 → 8081 on the three backend pods) and a CEC
/// that lists it in `services` (redirect to its listener) and in
/// `backendServices` (EDS for the route's cluster).
fn web_service_and_cec() -> String {
    let eps: String = (1..=3)
        .map(|i| {
            format!(
                "  - addresses: [\"{}\"]\n    conditions:\n      ready: true\n",
                netns::backend_ip(i)
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {WEB_VIP}
  clusterIPs: ["{WEB_VIP}"]
  ports:
    - {{name: http, port: 80, protocol: TCP, targetPort: 8081}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {{name: http, port: 8081, protocol: TCP}}
endpoints:
{eps}---
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: web-l7, namespace: default}}
spec:
  services:
    - {{name: web, namespace: default, ports: [80]}}
  backendServices:
    - {{name: web, namespace: default}}
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: web-l7
    filterChains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typedConfig:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          statPrefix: web
          routeConfig:
            virtualHosts:
            - name: web
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: "default/web:80"}}
                responseHeadersToAdd:
                - header: {{key: x-membrane-route, value: web-l7}}
                - header: {{key: x-original-dst, value: "%DOWNSTREAM_LOCAL_ADDRESS%"}}
          httpFilters:
          - name: envoy.filters.http.router
            typedConfig: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: "default/web:80"
    type: EDS
    connectTimeout: 2s
    edsClusterConfig: {{serviceName: "default/web:80"}}
"#
    )
}

/// Status, lower-cased headers and body of an HTTP response.
type HttpReply = (u16, Vec<(String, String)>, String);

/// One HTTP/1.1 GET.
fn http_get_raw(addr: SocketAddr) -> std::io::Result<HttpReply> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end: {raw:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A ClusterIP:80 named in a CEC's `spec.services` is delivered by the tc
/// program to that CEC's Envoy listener (bpf_sk_assign to a transparent
/// listener, no address rewrite): the client pod's request is answered
/// through Envoy's route (its response headers), Envoy sees the ClusterIP
/// as the connection's local address (the original destination), and it
/// reaches the Service's backend pods through EDS.
#[test]
fn cec_service_frontend_is_redirected_to_envoy() {
    if !netns::prerequisites() || !nsenter_available() {
        return;
    }
    let pins = PinDir::new("redirect");
    let topo = Topology::with_servers("redir", echo_and_http);
    let devices = topo.node_ifaces.join(",");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("manifests")).expect("mkdir");
    let agent = Up::new(dir, &topo.node.name, &pins.0, &devices).start();
    agent.apply(dir, &web_service_and_cec());
    // A plain Service next to it still goes through the BPF load balancer.
    agent.apply(dir, &echo_service());

    let fe = format!("{WEB_VIP}:80/TCP");
    assert!(
        wait_until(Duration::from_secs(15), || {
            agent.status().is_some_and(|s| {
                s["datapath"]["redirected_to_envoy"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|e| e["frontend"] == fe.as_str()))
            })
        }),
        "{fe} never redirected: {:?}",
        agent.status()
    );
    let st = agent.status().expect("status");
    assert_eq!(st["datapath"]["proxy_routing_error"], Value::Null, "{st}");
    // Not load-balanced by BPF: it belongs to Envoy.
    assert!(frontend(&agent.services(), &fe).is_none());

    let vip: SocketAddr = format!("{WEB_VIP}:80").parse().unwrap();
    // Envoy gets the listener and EDS asynchronously: poll until it answers.
    let mut seen = BTreeSet::new();
    let mut last = String::new();
    let answered = wait_until(Duration::from_secs(30), || {
        match topo.client_run(|| http_get_raw(vip)) {
            Ok((200, headers, body)) => {
                assert_eq!(
                    header(&headers, "x-membrane-route"),
                    Some("web-l7"),
                    "routed by the CEC's route: {headers:?}"
                );
                assert!(
                    header(&headers, "x-envoy-upstream-service-time").is_some(),
                    "{headers:?}"
                );
                assert_eq!(
                    header(&headers, "x-original-dst"),
                    Some(format!("{WEB_VIP}:80").as_str()),
                    "Envoy sees the original destination"
                );
                seen.insert(body);
                true
            }
            other => {
                last = format!("{other:?}");
                false
            }
        }
    });
    assert!(
        answered,
        "no answer through Envoy: {last}\n{}",
        agent.log_text()
    );
    // More requests: EDS spreads them over the three backend pods.
    assert!(
        wait_until(Duration::from_secs(20), || {
            if let Ok((200, _, body)) = topo.client_run(|| http_get_raw(vip)) {
                seen.insert(body);
            }
            seen.len() == 3
        }),
        "backends reached through Envoy: {seen:?}"
    );
    assert_eq!(seen, names(&["be1", "be2", "be3"]));

    let stats = &agent.status().expect("status")["datapath"]["stats"];
    assert!(
        stats["redirect_to_proxy"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    // The other Service is still DNATed by the program.
    assert_eq!(backends_seen(&topo, 30), names(&["be1", "be2", "be3"]));
}

/// Ingress `web` (class cilium) for Service `web` (ClusterIP 10.96.0.30,
/// 80 → 8081 on 127.0.0.1 of the same namespace).
const INGRESS_WEB: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.30
  clusterIPs: ["10.96.0.30"]
  ports:
    - {name: http, port: 80, protocol: TCP, targetPort: 8081}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-lo
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, port: 8081, protocol: TCP}
endpoints:
  - addresses: ["127.0.0.1"]
    conditions: {ready: true}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default}
spec:
  ingressClassName: cilium
  rules:
  - http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service: {name: web, port: {number: 80}}
"#;

/// Listening TCP sockets (`ss -Hltn` local addresses) in a namespace.
fn listening(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Hltn"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect()
}

/// With `--datapath ebpf` attached to `lo`, an Ingress's LoadBalancer
/// address is a VIP, as in Cilium: Envoy's listener gets a proxy port
/// (nothing listens on VIP:80), the tc program on `lo` assigns VIP:80 to
/// it, and the request is answered through Envoy by the backend. The VIP
/// keeps port 80 although `--http-port` is 18080 (that only maps directly
/// bound addresses). Runs in a namespace of its own, so its `lo` is not the
/// host's.
#[test]
fn ingress_vip_is_redirected_to_proxy_port_on_lo() {
    if !netns::prerequisites() || !nsenter_available() {
        return;
    }
    let pins = PinDir::new("ingress-vip");
    let ns = netns::Netns::new(format!("mbvip-{}", std::process::id()));
    let _backend = echo_and_http(&ns, "lo-backend", 8080);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("manifests")).expect("mkdir");
    let agent = Up::new(dir, &ns.name, &pins.0, "lo")
        .lb_pool("127.0.120.0/24")
        .start();
    agent.apply(dir, INGRESS_WEB);

    // The VIP:80 frontend appears in the redirect map, pointing at a proxy
    // port on loopback.
    let mut redirect: Option<(String, String)> = None;
    let programmed = wait_until(Duration::from_secs(20), || {
        redirect = agent.status().and_then(|s| {
            s["datapath"]["redirected_to_envoy"]
                .as_array()?
                .iter()
                .find(|e| {
                    e["frontend"]
                        .as_str()
                        .is_some_and(|f| f.starts_with("127.0.120.") && f.ends_with(":80/TCP"))
                })
                .map(|e| {
                    (
                        e["frontend"].as_str().unwrap_or_default().to_owned(),
                        e["listener"].as_str().unwrap_or_default().to_owned(),
                    )
                })
        });
        redirect.is_some()
    });
    assert!(
        programmed,
        "Ingress VIP never redirected: {:?}",
        agent.status()
    );
    let (fe, listener) = redirect.expect("redirect");
    let vip: SocketAddr = fe.trim_end_matches("/TCP").parse().expect("VIP");
    let proxy: SocketAddr = listener.parse().expect("listener address");
    assert_eq!(proxy.ip().to_string(), "127.0.0.1", "{listener}");
    assert_ne!(proxy.port(), 80);
    assert_ne!(proxy.port(), 18080);

    let mut last = String::new();
    let answered = wait_until(Duration::from_secs(30), || {
        match ns.run(|| http_get_raw(vip)) {
            Ok((200, headers, body)) => {
                assert!(
                    header(&headers, "x-envoy-upstream-service-time").is_some(),
                    "answered by Envoy: {headers:?}"
                );
                assert_eq!(body, "lo-backend");
                true
            }
            other => {
                last = format!("{other:?}");
                false
            }
        }
    });
    assert!(answered, "no answer on {vip}: {last}\n{}", agent.log_text());

    // Envoy listens on the proxy port only: not on the VIP, not on 80 or
    // the --http-port.
    let socks = listening(&ns.name);
    assert!(
        socks
            .iter()
            .any(|a| a == &format!("0.0.0.0:{}", proxy.port())),
        "{socks:?}"
    );
    assert!(
        !socks
            .iter()
            .any(|a| a.ends_with(":80") || a.ends_with(":18080") || a.starts_with("127.0.120.")),
        "{socks:?}"
    );
    let stats = &agent.status().expect("status")["datapath"]["stats"];
    assert!(
        stats["redirect_to_proxy"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
}
