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

/// Issue 14: with the Envoy binary briefly unavailable, a killed Envoy used
/// to stay down for good (one failed respawn ended supervision, silently,
/// and `membrane status` still exited 0). Now every failed start is logged
/// with its cause, status fails while Envoy is down, and Envoy comes back
/// once the binary does.
#[test]
fn envoy_comes_back_after_its_binary_was_missing() {
    let backends = Backends::new();
    backends.start("127.0.131.200", "phoenix");
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let link = envoy_link(bin_dir.path());
    let away = bin_dir.path().join("envoy-away");
    let m = Membrane::start_with(
        "127.0.131.0/24",
        31081,
        31441,
        &["--envoy-bin", link.to_str().expect("utf-8 path")],
    );
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("phoenix", 80, None, "127.0.131.200"));
    m.apply(&ingress_yaml("phoenix", &[("/", "phoenix", 80)]));
    let ip = m.wait_ingress_ip("default", "phoenix");
    let addr: SocketAddr = format!("{ip}:31081").parse().expect("addr");
    assert!(
        wait_until(Duration::from_secs(20), || served_by(addr, "x", "/")
            .as_deref()
            == Some("phoenix")),
        "never served:\n{}",
        m.log()
    );

    // The binary disappears, then Envoy dies.
    std::fs::rename(&link, &away).expect("rename envoy away");
    let first = m.envoy_pid().expect("envoy pid");
    // SAFETY: killing the Envoy child of our Membrane by its PID.
    unsafe { libc::kill(first, libc::SIGKILL) };

    // Several attempts fail, each logged with its cause; Membrane stays up
    // and reports Envoy down as a failure.
    assert!(
        wait_until(Duration::from_secs(20), || {
            m.status()["envoy"]["start_failures"].as_u64() >= Some(3)
        }),
        "start failures were not counted:\n{}",
        m.log()
    );
    let status = m.status();
    assert_eq!(status["envoy"]["running"], false, "{status}");
    assert_eq!(status["ready"], false, "{status}");
    let why = status["envoy"]["last_error"].as_str().unwrap_or_default();
    assert!(
        why.contains(link.to_str().unwrap_or_default()) && why.contains("No such file"),
        "last_error does not name the binary and the cause: {why}"
    );
    let (code, text) = m.cli(&["status"]).expect("cli");
    assert_ne!(code, 0, "status must fail while Envoy is down:\n{text}");
    assert!(text.contains("NOT RUNNING"), "{text}");
    let log = m.log();
    assert!(
        log.matches("envoy could not be started").count() >= 3,
        "failed starts are not logged:\n{log}"
    );
    assert_eq!(served_by(addr, "x", "/"), None, "nothing should serve now");

    // The binary is back: Envoy restarts on its own and traffic flows.
    std::fs::rename(&away, &link).expect("rename envoy back");
    assert!(
        wait_until(Duration::from_secs(30), || {
            served_by(addr, "x", "/").as_deref() == Some("phoenix")
        }),
        "Envoy did not come back:\n{}",
        m.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || m
            .cli(&["status"])
            .is_ok_and(|(code, _)| code == 0)),
        "status still fails after Envoy came back:\n{:?}",
        m.cli(&["status"])
    );
    let status = m.status();
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["envoy"]["start_failures"], 0, "{status}");
    assert_ne!(m.envoy_pid(), Some(first));
}
