//! Envoy admin as Cilium has it (issue 8): admin on a unix socket, the
//! bootstrap cluster `/envoy-admin` that CiliumEnvoyConfigs route to, and
//! Cilium's own admin and Prometheus listener examples applied unchanged.
//!
//! The examples bind `[::]:9901` and `[::]:9090` (every address): Membrane
//! runs without TCP admin, so 9901 is free, and no other test binds either
//! port. Requests go to 127.0.134.200, an address that is not Membrane's.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/cilium-envoy")
        .join(name)
}

/// `membrane apply -f <example>`, the file as it is.
fn apply_example(m: &Membrane, name: &str) {
    let path = example(name);
    let (code, out) = m
        .cli(&["apply", "-f", path.to_str().expect("utf-8 path")])
        .expect("cli");
    assert_eq!(code, 0, "apply {name}: {out}");
}

fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().ok()?;
    http_get(addr, "membrane-test", path).ok()
}

/// No NACK on any stream and nothing rejected; `membrane status` exits 0.
fn assert_all_accepted(m: &Membrane) {
    let status = m.status();
    assert_eq!(status["rejected"], Value::Array(vec![]), "{status}");
    for s in status["xds"]["streams"].as_array().into_iter().flatten() {
        for (t, v) in s["types"].as_object().into_iter().flatten() {
            assert!(v["last_nack"].is_null(), "{t} NACKed: {}", v["last_nack"]);
        }
    }
    // Envoy's readiness is probed every 50 ms: it may trail a first answer.
    wait_until(Duration::from_secs(10), || {
        m.cli(&["status"]).is_ok_and(|(code, _)| code == 0)
    });
    let (code, out) = m.cli(&["status"]).expect("cli");
    assert_eq!(code, 0, "status fails:\n{out}");
}

#[test]
fn cilium_admin_and_prometheus_listener_examples_work_unchanged() {
    // role=infra: the node-selector variant of the example selects us.
    let m = Membrane::start_with(
        "127.0.134.0/24",
        31085,
        31445,
        &["--node-labels", "role=infra"],
    );
    // Admin is a unix socket in the run directory; no TCP admin by default.
    let status = m.status();
    assert!(status["envoy"]["admin_address"].is_null(), "{status}");
    let socket = status["envoy"]["admin_socket"].as_str().unwrap_or_default();
    assert!(
        socket.ends_with("/run/envoy-admin.sock") && Path::new(socket).exists(),
        "admin socket {socket:?}"
    );
    // It is Envoy's admin: its server_info names this node.
    let info = {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(socket).expect("admin socket");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /server_info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(
        info.starts_with("HTTP/1.1 200") && info.contains("membrane~local"),
        "admin /server_info over the socket: {info}"
    );

    // Cilium's admin listener example: routes to `envoy-admin`.
    apply_example(&m, "envoy-admin-listener.yaml");
    let mut answer = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            answer = get("127.0.134.200:9901", "/ready");
            answer.as_ref().is_some_and(|(code, _)| *code == 200)
        }),
        "admin listener does not answer on 9901: {answer:?}\n{}\n{}",
        serde_json::to_string_pretty(&m.status()).unwrap_or_default(),
        m.log()
    );
    // Through the listener the answer is chunked: "5\r\nLIVE\n\r\n0".
    assert!(answer.is_some_and(|(_, b)| b.contains("LIVE\n")));
    // The whole admin interface is behind it (here: the listeners).
    let (code, listeners) = get("127.0.134.200:9901", "/listeners").expect("listeners");
    assert_eq!(code, 200);
    assert!(
        listeners.contains("envoy-admin-listener"),
        "admin /listeners: {listeners}"
    );
    assert_all_accepted(&m);

    // Cilium's Prometheus metrics listener example: RDS route with a
    // prefix rewrite to the admin's /stats/prometheus.
    apply_example(&m, "envoy-prometheus-metrics-listener.yaml");
    let mut metrics = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            metrics = get("127.0.134.200:9090", "/metrics");
            metrics
                .as_ref()
                .is_some_and(|(code, body)| *code == 200 && body.contains("# TYPE envoy_"))
        }),
        "no Prometheus metrics on 9090: {metrics:?}\n{}",
        m.log()
    );
    let (_, body) = metrics.expect("metrics");
    assert!(
        body.contains("envoy_listener_manager_total_listeners_active"),
        "Envoy's own stats are missing from /metrics"
    );
    // Only /metrics is routed.
    let (code, _) = get("127.0.134.200:9090", "/ready").expect("9090");
    assert_eq!(code, 404);
    assert_all_accepted(&m);

    // The current Cilium form (`/envoy-admin`, with a nodeSelector) on its
    // own: remove the first example, then apply this one.
    let first = example("envoy-admin-listener.yaml");
    let (code, out) = m
        .cli(&["delete", "-f", first.to_str().expect("utf-8 path")])
        .expect("cli");
    assert_eq!(code, 0, "{out}");
    assert!(
        wait_until(Duration::from_secs(20), || get(
            "127.0.134.200:9901",
            "/ready"
        )
        .is_none()),
        "9901 still answers after the example was deleted"
    );
    apply_example(&m, "envoy-admin-listener-nodeselector.yaml");
    assert!(
        wait_until(Duration::from_secs(20), || get(
            "127.0.134.200:9901",
            "/ready"
        )
        .is_some_and(|(c, _)| c == 200)),
        "admin listener routing to /envoy-admin does not answer:\n{}",
        m.log()
    );
    let (_, dump) = get(
        "127.0.134.200:9901",
        "/config_dump?resource=dynamic_listeners",
    )
    .expect("config dump");
    assert!(
        dump.contains("\"cluster\": \"/envoy-admin\""),
        "the listener does not route to /envoy-admin: {dump}"
    );
    assert_all_accepted(&m);
}

/// `--envoy-admin-port` still exposes admin on loopback TCP for those who
/// want it, reported by `membrane status`.
#[test]
fn admin_on_tcp_is_opt_in() {
    let m = Membrane::start_with(
        "127.0.134.0/24",
        31087,
        31447,
        &["--envoy-admin-port", "31086"],
    );
    let mut status = m.status();
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = m.status();
            !status["envoy"]["admin_address"].is_null()
        }),
        "{status}"
    );
    assert_eq!(status["envoy"]["admin_address"], "127.0.0.1:31086");
    let (code, body) = get("127.0.0.1:31086", "/ready").expect("tcp admin");
    assert_eq!(code, 200);
    assert!(body.contains("LIVE"), "{body}");
    let (code, out) = m.cli(&["status"]).expect("cli");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("127.0.0.1:31086"), "{out}");
}
