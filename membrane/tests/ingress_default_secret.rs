//! Real Envoy: `membrane up --ingress-default-secret-namespace/-name`
//! (Cilium's `ingressController.defaultSecretNamespace/-Name`). A TLS host
//! whose `spec.tls` entry has no `secretName` is served with the default
//! certificate (verified by the client against it), synced for SDS from
//! another namespace; a missing default secret is reported by name.

mod common;
mod ingress_support;

use std::process::Command;
use std::time::Duration;

use common::*;

const HTTPS_PORT: u16 = 27743;

#[test]
fn tls_hosts_without_secret_name_get_the_default_certificate() {
    let backends = Backends::new();
    backends.start("127.0.163.10", "ds-web");
    let m = Membrane::start_with(
        "127.0.163.128/25",
        27780,
        HTTPS_PORT,
        &[
            "--ingress-default-secret-namespace",
            "certs",
            "--ingress-default-secret-name",
            "wildcard",
        ],
    );
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("ds-web", 80, None, "127.0.163.10"));
    m.apply(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: ds
  namespace: default
spec:
  ingressClassName: cilium
  tls: [{hosts: [default.example.com]}]
  rules:
    - host: default.example.com
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: ds-web, port: {number: 80}}}}
"#,
    );
    // No default secret yet: rejected, naming it.
    let reported = wait_until(Duration::from_secs(10), || {
        m.rejected()
            .iter()
            .any(|(o, r)| o == "Ingress default/ds" && r.contains("certs/wildcard"))
    });
    assert!(
        reported,
        "missing default secret not reported: {:?}",
        m.rejected()
    );

    // The default secret appears: served with it.
    let dir = tempfile::tempdir().expect("tempdir");
    let (secret, crt) = ingress_support::tls_secret_in("certs", "wildcard", "default.example.com");
    m.apply(&secret);
    let ca = dir.path().join("default.pem");
    std::fs::write(&ca, crt).expect("write");
    let ip = m.wait_ingress_ip("default", "ds");
    let verified = wait_until(Duration::from_secs(20), || {
        Command::new("curl")
            .args(["-s", "--max-time", "5", "--cacert"])
            .arg(&ca)
            .arg("--resolve")
            .arg(format!("default.example.com:{HTTPS_PORT}:{ip}"))
            .arg(format!("https://default.example.com:{HTTPS_PORT}/"))
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"ds-web\"")
            })
    });
    assert!(
        verified,
        "not served with the default certificate:\n{}",
        m.log()
    );
    assert!(m.rejected().is_empty(), "{:?}", m.rejected());
}
