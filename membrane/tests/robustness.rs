//! Issue 14 (faults and hostile input) and issue 8 item 2 (empty EDS), each
//! reproduced against a real `membrane up` and a real Envoy. Ports
//! 30000-30999, LB pools and backends in 127.0.151.0/24 … 127.0.155.0/24.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

fn assert_rejected(m: &Membrane, object: &str, needles: &[&str]) -> String {
    let mut last = Vec::new();
    let found = wait_until(Duration::from_secs(15), || {
        last = m.rejected();
        last.iter()
            .any(|(o, r)| o == object && needles.iter().all(|n| r.contains(n)))
    });
    assert!(
        found,
        "{object} not rejected with {needles:?}; rejected: {last:#?}\n{}",
        m.log()
    );
    last.into_iter()
        .find(|(o, _)| o == object)
        .map(|(_, r)| r)
        .unwrap_or_default()
}

fn assert_not_rejected(m: &Membrane, object: &str) {
    let mut last = Vec::new();
    let gone = wait_until(Duration::from_secs(15), || {
        last = m.rejected();
        !last.iter().any(|(o, _)| o == object)
    });
    assert!(gone, "{object} still rejected: {last:#?}\n{}", m.log());
}

fn slice(name: &str, service: &str, address_type: &str, port: i64, addr: &str) -> String {
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: {address_type}
ports: [{{port: {port}}}]
endpoints:
- addresses: ["{addr}"]
  conditions: {{ready: true}}
"#
    )
}

fn no_nack_in(m: &Membrane) {
    let status = m.status();
    assert!(
        !status["xds"].to_string().contains("\"error_detail\""),
        "Envoy NACKed something: {:#}",
        status["xds"]
    );
}

/// Items 4 and 5, and invalid Service ports (10): a bad slice is rejected
/// alone with the field named, the Service keeps its other slices and the
/// Ingress keeps serving; Envoy is never sent what it would NACK.
#[test]
fn bad_endpoint_slices_are_rejected_alone_and_the_ingress_keeps_serving() {
    const HTTP: u16 = 30080;
    let backends = Backends::new();
    backends.start_pod("127.0.155.1", "web", "web-a");
    backends.start_pod("127.0.155.2", "web", "web-b");
    let m = Membrane::start("127.0.151.0/24", HTTP, 30443);
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("web", 80, None, "127.0.155.1"));
    m.apply(&ingress_yaml("web", &[("/", "web", 80)]));
    let ip = m.wait_ingress_ip("default", "web");
    let addr: SocketAddr = format!("{ip}:{HTTP}").parse().expect("addr");
    assert!(
        wait_until(Duration::from_secs(10), || served_by(addr, "x", "/")
            .as_deref()
            == Some("web")),
        "{}",
        m.log()
    );
    let pods = |m: &Membrane| {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            match served_by_pod(addr, "x", "/") {
                Some((_, pod)) => {
                    seen.insert(pod);
                }
                None => panic!("the Ingress stopped serving:\n{}", m.log()),
            }
        }
        seen
    };

    // A second slice with a good port adds its endpoint.
    m.apply(&slice("web-two", "web", "IPv4", 3000, "127.0.155.2"));
    assert!(
        wait_until(Duration::from_secs(10), || pods(&m).len() == 2),
        "second slice not served"
    );

    // The second slice turns bad in each way the issue lists: it alone is
    // rejected, its last good version keeps serving, and so does the rest.
    for (port, field, message) in [
        (
            65536,
            "ports[0].port",
            "65536 is not a valid port (1-65535)",
        ),
        (0, "ports[0].port", "0 is not a valid port (1-65535)"),
        (-5, "ports[0].port", "-5 is not a valid port (1-65535)"),
    ] {
        m.apply(&slice("web-two", "web", "IPv4", port, "127.0.155.2"));
        assert_rejected(
            &m,
            "EndpointSlice default/web-two",
            &[&format!(
                "EndpointSlice default/web-two: {field}: {message}"
            )],
        );
        assert_eq!(pods(&m).len(), 2, "the Service lost endpoints");
    }
    m.apply(&slice("web-two", "web", "IPv4", 3000, "999.1.1.1"));
    assert_rejected(
        &m,
        "EndpointSlice default/web-two",
        &[
            r#"EndpointSlice default/web-two: endpoints[0].addresses[0]: "999.1.1.1" is not an IPv4 address"#,
        ],
    );
    m.apply(&slice("web-fqdn", "web", "FQDN", 3000, "web.example.com"));
    assert_rejected(
        &m,
        "EndpointSlice default/web-fqdn",
        &["EndpointSlice default/web-fqdn: addressType", "FQDN"],
    );
    // A bad Service port is the Service's fault, not the Ingress's.
    m.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: wide, namespace: default}\nspec:\n  ports: [{name: http, port: 65536, targetPort: 3000}]\n",
    );
    m.apply(&ingress_yaml("wide", &[("/", "wide", 80)]).replace("number: 80", "name: http"));
    assert_rejected(
        &m,
        "Service default/wide",
        &["Service default/wide: spec.ports[0].port: 65536 is not a valid port (1-65535)"],
    );
    assert!(
        m.wait_ingress_ip("default", "wide")
            .starts_with("127.0.151.")
    );
    assert_eq!(pods(&m).len(), 2, "the Service lost endpoints");
    assert!(
        !m.rejected().iter().any(|(o, _)| o.starts_with("Ingress")),
        "the Ingress was blamed: {:#?}",
        m.rejected()
    );
    let (code, out) = m.cli(&["status"]).expect("cli");
    assert_ne!(code, 0, "status exits 0 with rejected objects:\n{out}");
    assert!(out.contains("EndpointSlice default/web-two"), "{out}");
    no_nack_in(&m);

    // Fixed, the slice is accepted again.
    m.apply(&slice("web-two", "web", "IPv4", 3000, "127.0.155.2"));
    assert_not_rejected(&m, "EndpointSlice default/web-two");
    assert_eq!(pods(&m).len(), 2);
}

/// Item 6: a CEC NACKed because its port was busy is retried after the
/// port is freed (timer) and when Envoy restarts; after deletion, its NACK
/// no longer shows in `membrane status`.
#[test]
fn a_cec_nacked_for_a_busy_port_is_retried() {
    let m = Membrane::start("127.0.152.0/24", 30180, 30181);
    // Fixed ports in the ephemeral range can be taken by any client socket;
    // the kernel hands out a free one to hold instead.
    let (holder, first) = hold_free_port();
    m.apply(&direct_cec("busy", first, "busy-ok", "filterChains"));
    assert_rejected(
        &m,
        "CiliumEnvoyConfig default/busy",
        &["Envoy rejected its Listener", &first.to_string()],
    );
    drop(holder);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || body_at(first).as_deref()
            == Some("busy-ok")),
        "not retried after the port was freed:\n{}",
        m.log()
    );
    println!("served {:?} after the port was freed", t.elapsed());
    assert_not_rejected(&m, "CiliumEnvoyConfig default/busy");

    // Busy again under a second CEC; freed, then Envoy restarts.
    let (holder, second) = hold_free_port();
    m.apply(&direct_cec("busy2", second, "busy2-ok", "filterChains"));
    assert_rejected(
        &m,
        "CiliumEnvoyConfig default/busy2",
        &["Envoy rejected its Listener", &second.to_string()],
    );
    drop(holder);
    let pid = m.status()["envoy"]["pid"].as_i64().expect("envoy pid");
    // SAFETY: signalling the Envoy our own `membrane up` started, by PID.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    assert!(
        wait_until(Duration::from_secs(20), || body_at(second).as_deref()
            == Some("busy2-ok")),
        "not retried after Envoy restarted:\n{}",
        m.log()
    );
    assert_ne!(m.status()["envoy"]["pid"].as_i64(), Some(pid));
    assert_eq!(body_at(first).as_deref(), Some("busy-ok"));

    // A NACK of a deleted object is not shown any more.
    let holder = std::net::TcpListener::bind("127.0.0.1:30203").expect("hold port");
    m.apply(&direct_cec("busy3", 30203, "x", "filterChains"));
    assert_rejected(&m, "CiliumEnvoyConfig default/busy3", &["30203"]);
    let lds = |m: &Membrane| {
        m.status()["xds"]["streams"][0]["types"]
            ["type.googleapis.com/envoy.config.listener.v3.Listener"]["last_nack"]
            .clone()
    };
    assert!(!lds(&m).is_null());
    m.delete(&direct_cec("busy3", 30203, "x", "filterChains"));
    drop(holder);
    assert!(
        wait_until(Duration::from_secs(10), || lds(&m).is_null()),
        "LAST NACK still shows the deleted CEC: {}",
        lds(&m)
    );
    let (_, out) = m.cli(&["status"]).expect("cli");
    assert!(!out.contains("30203"), "{out}");
}

/// Item 6: a CEC routing to a cluster another CEC defines is NACKed
/// ("unknown cluster") while that CEC is missing, and serves once it comes.
#[test]
fn a_cec_waiting_for_another_cecs_cluster_is_retried_when_it_appears() {
    let backends = Backends::new();
    backends.start("127.0.155.10", "provided");
    let m = Membrane::start("127.0.152.0/24", 30280, 30281);
    let router = r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: router, namespace: default}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    address: {socketAddress: {address: 127.0.0.1, portValue: 30301}}
    filterChains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typedConfig:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          statPrefix: router
          routeConfig:
            virtualHosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: default/provider/backend}
          httpFilters:
          - name: envoy.filters.http.router
            typedConfig: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;
    m.apply(router);
    let reason = assert_rejected(
        &m,
        "CiliumEnvoyConfig default/router",
        &["Envoy rejected its Listener", "default/provider/backend"],
    );
    println!("rejected: {reason}");
    m.apply(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: provider, namespace: default}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: backend
    type: STATIC
    connectTimeout: 1s
    loadAssignment:
      clusterName: backend
      endpoints:
      - lbEndpoints:
        - endpoint: {address: {socketAddress: {address: 127.0.155.10, portValue: 3000}}}
"#,
    );
    let addr: SocketAddr = "127.0.0.1:30301".parse().expect("addr");
    assert!(
        wait_until(Duration::from_secs(15), || served_by(addr, "x", "/")
            .as_deref()
            == Some("provided")),
        "router not retried when its cluster appeared:\n{}",
        m.log()
    );
    assert_not_rejected(&m, "CiliumEnvoyConfig default/router");
}

/// Item 9: a CEC listener on a pool address is rejected (naming the
/// address field), and LB IPAM does not hand that address to an Ingress.
#[test]
fn cec_listeners_and_lb_ipam_do_not_share_pool_addresses() {
    const HTTP: u16 = 30380;
    let backends = Backends::new();
    backends.start("127.0.155.20", "pooled");
    let m = Membrane::start("127.0.153.0/24", HTTP, 30381);
    m.apply(
        &direct_cec("squatter", HTTP, "squat", "filterChains").replace("127.0.0.1", "127.0.153.1"),
    );
    assert_rejected(
        &m,
        "CiliumEnvoyConfig default/squatter",
        &[
            "spec.resources[0].address.socketAddress.address",
            "127.0.153.1 is in the load-balancer pool 127.0.153.0/24",
        ],
    );
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("pooled", 80, None, "127.0.155.20"));
    m.apply(&ingress_yaml("pooled", &[("/", "pooled", 80)]));
    let ip = m.wait_ingress_ip("default", "pooled");
    assert_ne!(ip, "127.0.153.1", "IPAM handed out the CEC's address");
    let addr: SocketAddr = format!("{ip}:{HTTP}").parse().expect("addr");
    assert!(
        wait_until(Duration::from_secs(10), || served_by(addr, "x", "/")
            .as_deref()
            == Some("pooled")),
        "{}",
        m.log()
    );
    assert!(
        !m.rejected().iter().any(|(o, _)| o.contains("pooled")),
        "{:#?}",
        m.rejected()
    );
}

/// Issue 8 item 2: EDS clusters whose Service has no endpoints, no slices
/// or does not exist get empty assignments, so a restarted Envoy serves
/// listeners at once instead of after its 15 s initial-fetch timeout.
#[test]
fn listeners_are_served_at_once_after_envoy_restarts_with_empty_backends() {
    let m = Membrane::start("127.0.154.0/24", 30480, 30481);
    m.apply(&service_with_endpoints("zero", &[]));
    m.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: noslices, namespace: default}\nspec:\n  ports: [{port: 80, targetPort: 3000}]\n",
    );
    let eds_cluster = |name: &str, service: &str| {
        format!(
            r#"  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: {name}
    type: EDS
    connectTimeout: 1s
    edsClusterConfig: {{serviceName: {service}}}
"#
        )
    };
    let mut cec = direct_cec("empty-eds", 30401, "up", "filterChains");
    cec = cec.replace(
        "spec:\n",
        "spec:\n  backendServices:\n  - {name: zero, namespace: default, number: [\"80\"]}\n  - {name: noslices, namespace: default, number: [\"80\"]}\n  - {name: ghost, namespace: default, number: [\"80\"]}\n",
    );
    cec.push_str(&eds_cluster("zero", "default/zero:80"));
    cec.push_str(&eds_cluster("noslices", "default/noslices:80"));
    cec.push_str(&eds_cluster("ghost", "default/ghost:80"));
    cec.push_str(&eds_cluster("unlisted", "default/unlisted:80"));
    cec.push_str(&eds_cluster("opaque", "some-opaque-name"));
    m.apply(&cec);
    assert!(
        wait_until(Duration::from_secs(30), || body_at(30401).as_deref()
            == Some("up")),
        "{}",
        m.log()
    );
    for _ in 0..2 {
        let pid = m.status()["envoy"]["pid"].as_i64().expect("envoy pid");
        let t = Instant::now();
        // SAFETY: signalling the Envoy our own `membrane up` started, by PID.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        assert!(
            wait_until(Duration::from_secs(30), || {
                m.status()["envoy"]["pid"]
                    .as_i64()
                    .is_some_and(|p| p != pid)
                    && body_at(30401).as_deref() == Some("up")
            }),
            "{}",
            m.log()
        );
        let took = t.elapsed();
        println!("first listener served {took:?} after killing Envoy");
        assert!(
            took < Duration::from_secs(5),
            "listener held back {took:?} after an Envoy restart"
        );
    }
    no_nack_in(&m);
}

/// Item 10: expired certificates and RDS names nobody defines are
/// reported (as warnings: they still serve), and Envoy's rejection text is
/// shown whole without its protobuf dump.
#[test]
fn warnings_and_readable_rejections() {
    let m = Membrane::start("127.0.154.0/24", 30580, 30581);
    let (crt, key) = expired_pair();
    let indent = |t: &str| {
        t.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    m.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: old, namespace: default}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}\n  tls.key: |\n{}\n",
        indent(&crt),
        indent(&key)
    ));
    let rds = direct_cec("rds-missing", 30501, "x", "filterChains").replace(
        "          routeConfig:\n            virtualHosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: /}\n                directResponse: {status: 200, body: {inlineString: x}}\n",
        "          rds: {routeConfigName: nowhere}\n",
    );
    assert!(rds.contains("nowhere"), "{rds}");
    m.apply(&rds);
    let mut warnings = serde_json::Value::Null;
    let found = wait_until(Duration::from_secs(10), || {
        warnings = m.status()["warnings"].clone();
        let text = warnings.to_string();
        text.contains("Secret default/old: data.tls.crt: the certificate expired at")
            && text.contains("CiliumEnvoyConfig default/rds-missing: spec.resources[0].filterChains[0].filters[0].typedConfig.rds.routeConfigName: route configuration default/rds-missing/nowhere is not defined")
    });
    assert!(found, "warnings: {warnings:#}\n{}", m.log());
    let (code, out) = m.cli(&["status"]).expect("cli");
    assert_eq!(code, 0, "warnings alone do not fail status:\n{out}");
    assert!(out.contains("Warnings:  2"), "{out}");

    // A listener port Envoy's validation refuses: the reason names the
    // problem, without the dump of the whole listener.
    m.apply(&direct_cec("bad-port", 30502, "x", "filterChains").replace("30502", "70000"));
    let reason = assert_rejected(
        &m,
        "CiliumEnvoyConfig default/bad-port",
        &[
            "Envoy rejected its Listener default/bad-port/direct",
            "PortValue: value must be less than or equal to 65535",
        ],
    );
    println!("reason: {reason}");
    assert!(reason.len() < 600, "{reason}");
    assert!(!reason.contains("socket_address {"), "{reason}");
    assert!(!reason.contains('\n'), "{reason}");
    let (_, out) = m.cli(&["status"]).expect("cli");
    assert!(
        out.contains("PortValue: value must be less than or equal to 65535")
            && !out.contains("socket_address {"),
        "LAST NACK is not readable:\n{out}"
    );
}

fn expired_pair() -> (String, String) {
    membrane_certs::self_signed_expired(&["old.example.com"]).expect("issue")
}

/// Item 10: an Ingress terminating TLS with an 8192- or 16384-bit RSA key
/// (valid, and served by Envoy) is accepted and serves HTTPS.
#[test]
fn large_rsa_keys_serve_https() {
    const HTTPS: u16 = 30681;
    let backends = Backends::new();
    backends.start("127.0.155.30", "secure");
    let m = Membrane::start("127.0.154.0/24", 30680, HTTPS);
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("secure", 80, None, "127.0.155.30"));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../certs/tests/testdata");
    for bits in [8192, 16384] {
        let read =
            |ext: &str| std::fs::read_to_string(format!("{dir}/rsa{bits}.{ext}")).expect("fixture");
        let indent = |t: &str| {
            t.lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let name = format!("big{bits}");
        m.apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}\n  tls.key: |\n{}\n",
            indent(&read("crt")),
            indent(&read("key"))
        ));
        m.apply(&format!(
            r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: {name}, namespace: default}}
spec:
  ingressClassName: cilium
  tls: [{{hosts: [big.example.com], secretName: {name}}}]
  rules:
  - host: big.example.com
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: secure, port: {{number: 80}}}}}}}}
"#
        ));
        let ip = m.wait_ingress_ip("default", &name);
        let mut out = String::new();
        let ok = wait_until(Duration::from_secs(15), || {
            let r = std::process::Command::new("curl")
                .args(["-sk", "-m", "5", "--resolve"])
                .arg(format!("big.example.com:{HTTPS}:{ip}"))
                .arg(format!("https://big.example.com:{HTTPS}/"))
                .output();
            out = r
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            out.contains("\"secure\"")
        });
        assert!(
            ok,
            "{bits}-bit key not served: {out}\nrejected: {:#?}\n{}",
            m.rejected(),
            m.log()
        );
    }
    no_nack_in(&m);
    assert!(m.rejected().is_empty(), "{:#?}", m.rejected());
}

/// A listener on a free loopback port, and the port.
fn hold_free_port() -> (std::net::TcpListener, u16) {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = holder.local_addr().expect("local address").port();
    (holder, port)
}
