//! Zero-error updates: while clients send steady traffic through Envoy,
//! endpoints are added and removed, a route is added, the main route moves to
//! a new cluster and the old cluster's Service is deleted. No request may
//! fail: neither a non-2xx answer nor a connection error.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;

const HTTP_PORT: u16 = 28680;

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    bad_status: AtomicU64,
    conn_errors: AtomicU64,
}

fn load(addr: SocketAddr, stop: Arc<AtomicBool>, c: Arc<Counters>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        // Bounded: at most 200k requests even if the stop flag were lost.
        for _ in 0..200_000 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match http_get(addr, "load.example", "/") {
                Ok((200, _)) => c.ok.fetch_add(1, Ordering::Relaxed),
                Ok(_) => c.bad_status.fetch_add(1, Ordering::Relaxed),
                Err(_) => c.conn_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    })
}

#[test]
fn config_changes_under_load_fail_no_request_delta() {
    churn_under_load("delta", "127.0.24", "127.0.106.0/24", HTTP_PORT);
}

#[test]
fn config_changes_under_load_fail_no_request_sotw() {
    churn_under_load("sotw", "127.0.25", "127.0.107.0/24", HTTP_PORT + 2);
}

fn churn_under_load(protocol: &str, net: &str, pool: &str, port: u16) {
    let backends = Backends::new();
    let (ip1, ip2, ip3) = (format!("{net}.1"), format!("{net}.2"), format!("{net}.3"));
    backends.start_pod(&ip1, "svc-a", "a1");
    backends.start_pod(&ip2, "svc-a", "a2");
    backends.start_pod(&ip3, "svc-b", "b1");
    let m = Membrane::start_with(pool, port, port + 1, &["--xds-protocol", protocol]);
    assert_eq!(
        m.status()["xds"]["streams"][0]["protocol"],
        protocol_name(protocol)
    );
    m.apply(INGRESS_CLASS);
    m.apply(&service_with_endpoints("svc-a", &[ip1.as_str()]));
    m.apply(&service_with_endpoints("svc-b", &[ip3.as_str()]));
    m.apply(&ingress_yaml("load", &[("/", "svc-a", 80)]));
    let ip = m.wait_ingress_ip("default", "load");
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
    assert_eq!(served_by(addr, "x", "/").as_deref(), Some("svc-a"));

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let workers: Vec<_> = (0..2)
        .map(|_| load(addr, stop.clone(), counters.clone()))
        .collect();
    let saw = |path: &str, want: (&str, &str)| {
        wait_until(Duration::from_secs(10), || {
            served_by_pod(addr, "x", path).is_some_and(|(s, p)| s == want.0 && p == want.1)
        })
    };

    // 1. Scale out: a second endpoint.
    m.apply(&service_with_endpoints(
        "svc-a",
        &[ip1.as_str(), ip2.as_str()],
    ));
    assert!(saw("/", ("svc-a", "a2")), "new endpoint never used");
    // 2. Scale in: the first endpoint goes away.
    m.apply(&service_with_endpoints("svc-a", &[ip2.as_str()]));
    assert!(
        wait_until(Duration::from_secs(10), || (0..20).all(|_| {
            served_by_pod(addr, "x", "/").is_some_and(|(_, p)| p == "a2")
        })),
        "removed endpoint still used"
    );
    // 3. A new route to a new cluster.
    m.apply(&ingress_yaml(
        "load",
        &[("/", "svc-a", 80), ("/extra", "svc-b", 80)],
    ));
    assert!(saw("/extra", ("svc-b", "b1")), "new route never served");
    // 4. Move the main route to the other cluster and delete the old Service.
    m.apply(&ingress_yaml("load", &[("/", "svc-b", 80)]));
    assert!(saw("/", ("svc-b", "b1")), "route never moved");
    m.delete(&service_with_endpoints("svc-a", &[]));
    // 5. Endpoint churn on the remaining cluster.
    m.apply(&service_with_endpoints(
        "svc-b",
        &[ip3.as_str(), ip1.as_str()],
    ));
    m.apply(&service_with_endpoints("svc-b", &[ip3.as_str()]));
    assert!(saw("/", ("svc-b", "b1")));
    // Give the load a last full config cycle to run through.
    let before = counters.ok.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || counters
        .ok
        .load(Ordering::Relaxed)
        > before + 50));

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("load thread");
    }
    let ok = counters.ok.load(Ordering::Relaxed);
    let bad = counters.bad_status.load(Ordering::Relaxed);
    let errors = counters.conn_errors.load(Ordering::Relaxed);
    println!("zero-error churn ({protocol}): {ok} ok, {bad} non-2xx, {errors} connection errors");
    assert!(ok > 100, "too little traffic to mean anything: {ok}");
    assert_eq!(
        (bad, errors),
        (0, 0),
        "requests failed during updates:\n{}",
        m.log()
    );
}

fn protocol_name(flag: &str) -> &'static str {
    if flag == "delta" {
        "delta"
    } else {
        "state_of_the_world"
    }
}
