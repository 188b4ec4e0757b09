//! Every example directory is served for real: `examples/quickstart` answers
//! through Envoy with the echo backends its README command starts.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::*;

#[test]
fn quickstart_example_serves_both_backends() {
    let backends = Backends::new();
    // The addresses examples/quickstart/services.yaml lists.
    backends.start("127.0.10.1", "echo-a");
    backends.start("127.0.10.2", "echo-b");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let m = Membrane::start_on(
        tempfile::tempdir().expect("tempdir"),
        &example,
        "127.0.100.0/24",
        28480,
        28481,
        &[],
    );
    let ip = m.wait_ingress_ip("default", "quickstart");
    let addr: SocketAddr = format!("{ip}:28480").parse().expect("addr");
    assert_eq!(served_by(addr, "anything", "/").as_deref(), Some("echo-a"));
    assert_eq!(
        served_by(addr, "anything", "/b/hello").as_deref(),
        Some("echo-b")
    );
    // Envoy's readiness is probed every 50 ms: it may trail the first 200.
    wait_until(std::time::Duration::from_secs(10), || {
        m.cli(&["status"]).is_ok_and(|(code, _)| code == 0)
    });
    let (code, out) = m.cli(&["status"]).expect("cli");
    assert_eq!(code, 0, "quickstart has rejected objects:\n{out}");
}
