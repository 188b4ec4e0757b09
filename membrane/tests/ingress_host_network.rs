//! Real Envoy: `membrane up --ingress-host-network` (Cilium's
//! `ingressController.hostNetwork`). Listeners bind the node's addresses on
//! the host port (`ingress.cilium.io/host-listener-port` for a dedicated
//! Ingress, the shared listener port otherwise) instead of a LoadBalancer
//! address; the generated Service is ClusterIP and gets no LB address. The
//! node label selector becomes the CECs' `nodeSelector`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const SHARED_PORT: u16 = 27380;
const DEDICATED_PORT: u16 = 27381;

fn ingress(name: &str, annotations: &str, svc: &str) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {name}
  namespace: default
  annotations: {{{annotations}}}
spec:
  ingressClassName: cilium
  rules:
    - host: {name}.example.com
      http:
        paths:
          - {{path: /, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}
"#
    )
}

fn at(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

#[test]
fn host_network_serves_on_the_node_ports() {
    let backends = Backends::new();
    backends.start("127.0.165.11", "hn-own");
    backends.start("127.0.165.12", "hn-shared");
    let shared_port = SHARED_PORT.to_string();
    let m = Membrane::start_with(
        "127.0.165.64/27",
        27382,
        27383,
        &[
            "--ingress-host-network",
            "--ingress-host-network-shared-listener-port",
            &shared_port,
            // This node is selected, so it serves.
            "--ingress-host-network-node-label-selector",
            "role=ingress",
            "--node-labels",
            "role=ingress,zone=a",
        ],
    );
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("hn-own", 80, None, "127.0.165.11"));
    m.apply(&service_yaml("hn-shared", 80, None, "127.0.165.12"));
    m.apply(&ingress(
        "own",
        &format!("ingress.cilium.io/host-listener-port: \"{DEDICATED_PORT}\""),
        "hn-own",
    ));
    m.apply(&ingress(
        "shared",
        "ingress.cilium.io/loadbalancer-mode: shared",
        "hn-shared",
    ));

    // The dedicated Ingress answers on its host port, on any node address.
    for ip in ["127.0.0.1", "127.0.165.99"] {
        let ok = wait_until(Duration::from_secs(20), || {
            served_by(at(ip, DEDICATED_PORT), "own.example.com", "/").as_deref() == Some("hn-own")
        });
        assert!(ok, "dedicated host port on {ip} not served:\n{}", m.log());
    }
    // The shared Ingress answers on the shared listener port.
    let ok = wait_until(Duration::from_secs(20), || {
        served_by(at("127.0.0.1", SHARED_PORT), "shared.example.com", "/").as_deref()
            == Some("hn-shared")
    });
    assert!(ok, "shared host port not served:\n{}", m.log());
    // IPv6 too, where the machine has it.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let ok = wait_until(Duration::from_secs(10), || {
            served_by(
                "[::1]:27381".parse().expect("address"),
                "own.example.com",
                "/",
            )
            .as_deref()
                == Some("hn-own")
        });
        assert!(ok, "dedicated host port on ::1 not served");
    }

    // No LoadBalancer: the Service is ClusterIP and has no LB address.
    let (code, out) = m
        .cli(&[
            "get",
            "service",
            "cilium-ingress-own",
            "-n",
            "default",
            "-o",
            "json",
        ])
        .expect("cli");
    assert_eq!(code, 0, "{out}");
    let svc: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(svc["spec"]["type"], "ClusterIP", "{svc}");
    assert!(
        svc.pointer("/status/loadBalancer/ingress/0/ip").is_none(),
        "{svc}"
    );
    assert!(m.rejected().is_empty(), "{:?}", m.rejected());
    let (_, cec) = m
        .cli(&[
            "get",
            "cec",
            "cilium-ingress-default-own",
            "-n",
            "default",
            "-o",
            "json",
        ])
        .expect("cli");
    let cec: serde_json::Value = serde_json::from_str(&cec).expect("JSON");
    assert_eq!(
        cec.pointer("/spec/nodeSelector/matchLabels/role"),
        Some(&serde_json::json!("ingress")),
        "{cec}"
    );

    // An invalid annotation value is reported in `membrane status` and the
    // log, naming the Ingress and the annotation; the others keep serving.
    m.apply(&ingress(
        "bad",
        "ingress.cilium.io/host-listener-port: \"http\"",
        "hn-own",
    ));
    let mut reason = String::new();
    let reported = wait_until(Duration::from_secs(10), || {
        reason = m
            .rejected()
            .into_iter()
            .find(|(o, _)| o == "Ingress default/bad")
            .map(|(_, r)| r)
            .unwrap_or_default();
        !reason.is_empty()
    });
    assert!(
        reported,
        "invalid annotation not reported: {:?}",
        m.rejected()
    );
    assert!(
        reason.contains("metadata.annotations[ingress.cilium.io/host-listener-port]")
            && reason.contains("\"http\""),
        "{reason}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || m
            .log()
            .contains("ingress.cilium.io/host-listener-port")),
        "rejection not logged"
    );
    assert_eq!(
        served_by(at("127.0.0.1", DEDICATED_PORT), "own.example.com", "/").as_deref(),
        Some("hn-own")
    );

    // A second dedicated Ingress on the same host port is rejected, naming
    // the port; the first keeps it.
    m.apply(&ingress(
        "clash",
        &format!("ingress.cilium.io/host-listener-port: \"{DEDICATED_PORT}\""),
        "hn-shared",
    ));
    let mut reason = String::new();
    let reported = wait_until(Duration::from_secs(10), || {
        reason = m
            .rejected()
            .into_iter()
            .find(|(o, _)| o == "Ingress default/clash")
            .map(|(_, r)| r)
            .unwrap_or_default();
        !reason.is_empty()
    });
    assert!(reported, "port clash not reported: {:?}", m.rejected());
    assert!(reason.contains(&DEDICATED_PORT.to_string()), "{reason}");
    assert_eq!(
        served_by(at("127.0.0.1", DEDICATED_PORT), "own.example.com", "/").as_deref(),
        Some("hn-own")
    );
}
