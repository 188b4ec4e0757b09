//! Real Envoy: `ingress.cilium.io/tls-passthrough: enabled`. Two hosts are
//! routed by SNI to backends that terminate TLS themselves (Envoy holds no
//! certificate for them), in dedicated and in shared mode, while a
//! terminating Ingress and a plain-text one keep working next to it
//! (cilium/cilium#31242: a shared passthrough Ingress broke the others).

mod common;
mod ingress_support;

use common::*;
use ingress_support::*;

fn passthrough_ingress(mode: &str) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: passthrough
  namespace: default
  annotations:
    ingress.cilium.io/loadbalancer-mode: {mode}
    ingress.cilium.io/tls-passthrough: enabled
spec:
  ingressClassName: cilium
  rules:
    - host: a.example.com
      http:
        paths:
          - {{path: /, pathType: Prefix, backend: {{service: {{name: tls-a, port: {{number: 443}}}}}}}}
    - host: b.example.com
      http:
        paths:
          - {{path: /, pathType: Prefix, backend: {{service: {{name: tls-b, port: {{number: 443}}}}}}}}
"#
    )
}

fn terminating_ingress(mode: &str) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: terminating
  namespace: default
  annotations:
    ingress.cilium.io/loadbalancer-mode: {mode}
    ingress.cilium.io/force-https: disabled
spec:
  ingressClassName: cilium
  tls: [{{hosts: [secure.example.com], secretName: secure-tls}}]
  rules:
    - host: secure.example.com
      http:
        paths:
          - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}
"#
    )
}

/// Serves both passthrough hosts and the terminated host in `mode`;
/// `ips`: the echo backend and the two TLS backends.
fn run(mode: &str, pool: &str, http_port: u16, https_port: u16, ips: [&str; 3]) {
    let [web_ip, a_ip, b_ip] = ips;
    let backends = Backends::new();
    backends.start(web_ip, "web");
    let _a = TlsBackend::start(a_ip, 3000, "a.example.com", "backend-a");
    let _b = TlsBackend::start(b_ip, 3000, "b.example.com", "backend-b");
    let m = Membrane::start(pool, http_port, https_port);
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("web", 80, None, web_ip));
    m.apply(&service_yaml("tls-a", 443, None, a_ip));
    m.apply(&service_yaml("tls-b", 443, None, b_ip));
    m.apply(&tls_secret("secure-tls", "secure.example.com"));
    m.apply(&terminating_ingress(mode));
    m.apply(&ingress_yaml("plain", &[("/plain", "web", 80)]).replace(
        "  namespace: default\n",
        &format!(
            "  namespace: default\n  annotations: {{ingress.cilium.io/loadbalancer-mode: {mode}}}\n"
        ),
    ));
    m.apply(&passthrough_ingress(mode));

    let pt_ip = m.wait_ingress_ip("default", "passthrough");
    let term_ip = m.wait_ingress_ip("default", "terminating");
    if mode == "shared" {
        assert_eq!(pt_ip, term_ip, "shared mode serves both on one address");
    } else {
        assert_ne!(pt_ip, term_ip, "dedicated mode gives each its own address");
    }
    // Each SNI name reaches its own backend, which terminates TLS itself.
    assert!(
        wait_https(&pt_ip, https_port, "a.example.com", "/who", "backend-a"),
        "a.example.com not passed through to backend A:\n{}",
        m.log()
    );
    assert!(
        wait_https(&pt_ip, https_port, "b.example.com", "/who", "backend-b"),
        "b.example.com not passed through to backend B:\n{}",
        m.log()
    );
    // The terminating Ingress keeps working: Envoy terminates and proxies
    // HTTP to the echo backend.
    assert!(
        wait_https(&term_ip, https_port, "secure.example.com", "/", "\"web\""),
        "terminating Ingress broken next to the passthrough one:\n{}",
        m.log()
    );
    // So does plain-text HTTP on the Ingresses' HTTP port.
    let plain_ip = m.wait_ingress_ip("default", "plain");
    let plain = format!("{plain_ip}:{http_port}").parse().expect("address");
    assert!(
        wait_until(std::time::Duration::from_secs(20), || served_by(
            plain,
            "any.example.com",
            "/plain"
        )
        .as_deref()
            == Some("web")),
        "plain-text Ingress broken next to the passthrough one:\n{}",
        m.log()
    );
    // An unknown SNI name matches no chain: no answer.
    assert_eq!(
        https_get(&pt_ip, https_port, "c.example.com", "/who"),
        None,
        "unknown SNI must not be served"
    );
    assert!(m.rejected().is_empty(), "{:?}", m.rejected());
}

#[test]
fn passthrough_serves_two_hosts_by_sni_in_dedicated_mode() {
    run(
        "dedicated",
        "127.0.161.0/24",
        27080,
        27443,
        ["127.0.163.1", "127.0.163.2", "127.0.163.3"],
    );
}

#[test]
fn passthrough_serves_two_hosts_by_sni_in_shared_mode() {
    run(
        "shared",
        "127.0.162.0/24",
        27180,
        27543,
        ["127.0.164.1", "127.0.164.2", "127.0.164.3"],
    );
}
