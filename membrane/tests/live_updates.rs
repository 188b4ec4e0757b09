//! Real Envoy: Membrane on a watched manifest directory picks up an edited
//! Ingress, a new Ingress and a removed Ingress, each served live. Prints the
//! time from file change to first correct response (docs/benchmarks.md).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const HTTP_PORT: u16 = 28080;

fn addr(ip: &str) -> SocketAddr {
    format!("{ip}:{HTTP_PORT}").parse().expect("address")
}

#[test]
fn ingress_edits_additions_and_removals_are_served_live() {
    let backends = Backends::new();
    backends.start("127.0.21.1", "svc-a");
    backends.start("127.0.21.2", "svc-b");
    backends.start("127.0.21.3", "svc-c");
    let m = Membrane::start("127.0.101.0/24", HTTP_PORT, 28443);
    let dir = m.manifests();
    let services = [
        service_yaml("svc-a", 80, None, "127.0.21.1"),
        service_yaml("svc-b", 80, None, "127.0.21.2"),
        service_yaml("svc-c", 8080, Some("http"), "127.0.21.3"),
    ]
    .join("---\n");
    std::fs::write(
        dir.join("services.yaml"),
        format!("{INGRESS_CLASS}---\n{services}"),
    )
    .expect("write");
    std::fs::write(
        dir.join("one.yaml"),
        ingress_yaml("one", &[("/a", "svc-a", 80)]),
    )
    .expect("write");

    let ip1 = m.wait_ingress_ip("default", "one");
    // The address is only written once Envoy ACKed: the first request works.
    assert_eq!(
        served_by(addr(&ip1), "example.com", "/a").as_deref(),
        Some("svc-a"),
        "{}",
        m.log()
    );

    // Edit: a new path.
    let t = Instant::now();
    std::fs::write(
        dir.join("one.yaml"),
        ingress_yaml("one", &[("/a", "svc-a", 80), ("/b", "svc-b", 80)]),
    )
    .expect("write");
    assert!(
        wait_until(Duration::from_secs(10), || served_by(addr(&ip1), "x", "/b")
            .as_deref()
            == Some("svc-b")),
        "edited Ingress never served /b:\n{}",
        m.log()
    );
    let edit = t.elapsed();

    // Add: a second Ingress gets its own address.
    let t = Instant::now();
    std::fs::write(
        dir.join("two.yaml"),
        ingress_yaml("two", &[("/c", "svc-c", 8080)]),
    )
    .expect("write");
    let mut ip2 = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            if ip2.is_empty() {
                ip2 = m.ingress_ip("default", "two").unwrap_or_default();
            }
            !ip2.is_empty() && served_by(addr(&ip2), "x", "/c").as_deref() == Some("svc-c")
        }),
        "second Ingress never served:\n{}",
        m.log()
    );
    let add = t.elapsed();
    assert_ne!(ip1, ip2, "each Ingress has its own LoadBalancer address");

    // Remove the first: its address stops answering, the second keeps serving.
    let t = Instant::now();
    std::fs::remove_file(dir.join("one.yaml")).expect("remove");
    assert!(
        wait_until(Duration::from_secs(10), || served_by(addr(&ip1), "x", "/a")
            .is_none()),
        "removed Ingress still served:\n{}",
        m.log()
    );
    let remove = t.elapsed();
    assert_eq!(served_by(addr(&ip2), "x", "/c").as_deref(), Some("svc-c"));
    let (code, out) = m.cli(&["get", "cec", "-n", "default"]).expect("cli");
    assert_eq!(code, 0);
    assert!(
        out.contains("cilium-ingress-default-two") && !out.contains("cilium-ingress-default-one"),
        "{out}"
    );

    println!(
        "file change → first correct response: edit {:.1} ms, add {:.1} ms, remove {:.1} ms",
        edit.as_secs_f64() * 1e3,
        add.as_secs_f64() * 1e3,
        remove.as_secs_f64() * 1e3
    );
}
