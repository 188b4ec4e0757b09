//! Envoy supervision: a killed Envoy is restarted and serves again; stopping
//! Membrane stops Envoy; killing Membrane outright still takes Envoy down
//! (PR_SET_PDEATHSIG). No orphan Envoy survives any of it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie is not "alive" for us.
    // SAFETY: no signal is delivered.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true);
    exists && !zombie
}

fn envoy_pid(m: &Membrane) -> Option<i32> {
    m.status()["envoy"]["pid"].as_i64().map(|p| p as i32)
}

#[test]
fn envoy_is_restarted_and_never_orphaned() {
    let backends = Backends::new();
    backends.start("127.0.23.1", "sup");
    let m = Membrane::start("127.0.103.0/24", 28380, 28643);
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("sup", 80, None, "127.0.23.1"));
    m.apply(&ingress_yaml("sup", &[("/", "sup", 80)]));
    let ip = m.wait_ingress_ip("default", "sup");
    let addr: SocketAddr = format!("{ip}:28380").parse().expect("addr");
    assert_eq!(served_by(addr, "x", "/").as_deref(), Some("sup"));

    // Kill Envoy: it comes back (new PID) and serves the same config again.
    let first = envoy_pid(&m).expect("envoy pid");
    // SAFETY: killing the Envoy child of our Membrane by its PID.
    unsafe { libc::kill(first, libc::SIGKILL) };
    let mut second = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            second = envoy_pid(&m).filter(|p| *p != first);
            second.is_some() && served_by(addr, "x", "/").as_deref() == Some("sup")
        }),
        "Envoy was not restarted:\n{}",
        m.log()
    );
    let second = second.expect("restarted pid");
    assert_eq!(m.status()["envoy"]["restarts"], 1);

    // Stop Membrane gracefully: Envoy goes with it.
    drop(m);
    assert!(
        wait_until(Duration::from_secs(10), || !alive(second)),
        "Envoy {second} outlived Membrane"
    );

    // Kill Membrane outright: the kernel takes Envoy down too.
    let mut m = Membrane::start("127.0.104.0/24", 28381, 28644);
    let envoy = envoy_pid(&m).expect("envoy pid");
    m.kill_hard();
    assert!(
        wait_until(Duration::from_secs(10), || !alive(envoy)),
        "Envoy {envoy} orphaned after SIGKILL"
    );
}
