//! Real `membrane up` (real Envoy) against big and foreign input: the control
//! plane stays responsive while large applies are parsed (issue 14 item 3),
//! `membrane up .` ignores its own files and stays quiet (issue 8 item 4),
//! and the apply/delete API's limits and contract (issue 14 items 8, 10).
//!
//! Ports 32000-31999 and LB pools 127.0.141.0/24-127.0.145.0/24 only.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Many small valid documents adding up to `bytes`, then one invalid
/// document, so the apply is refused after a full parse and the store does
/// not change: what is measured is parsing, not applying.
fn large_rejected_apply(bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + 256);
    let mut i = 0;
    while text.len() < bytes {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bulk-{i}\n  namespace: default\nspec:\n  ports:\n  - port: 80\n    targetPort: 3000\n"
        ));
        i += 1;
    }
    text.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: last}\nspec: {ports: [{port: .inf}]}\n");
    text
}

/// Issue 14.3: on two cores, two big applies froze the control plane (a new
/// Ingress took 34.5 s to serve). Now parsing runs off the async workers and
/// a new Ingress is served within 1 s while two large applies are parsed.
#[test]
fn new_ingress_is_served_within_1s_while_two_large_applies_parse() {
    let backends = Backends::new();
    backends.start("127.0.142.2", "svc-a");
    let m = Membrane::start("127.0.141.0/24", 32080, 32443);
    m.apply(&format!(
        "{INGRESS_CLASS}---\n{}",
        service_yaml("svc-a", 80, None, "127.0.142.2")
    ));

    let mib: usize = std::env::var("PARSE_TEST_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let big = large_rejected_apply(mib << 20);
    let mut applies: Vec<Child> = (0..2)
        .map(|i| {
            let path = m.dir.path().join(format!("big-{i}.yaml"));
            std::fs::write(&path, &big).expect("write");
            Command::new(BIN)
                .arg("--api-socket")
                .arg(&m.api)
                .args(["apply", "-f"])
                .arg(&path)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn apply")
        })
        .collect();

    // Straight to the API socket (no CLI process per request), so what is
    // timed is the control plane, not process start-up on a loaded machine.
    let started = Instant::now();
    let ingress = ingress_yaml("fresh", &[("/", "svc-a", 80)]);
    let (status, body) = post(&m.api, "/v1/apply", ingress.as_bytes());
    assert_eq!(status, 200, "{body}");
    let applied = started.elapsed();
    let mut served_at = None;
    let mut addressed = None;
    let served = wait_until(Duration::from_secs(30), || {
        let (_, body) = get(&m.api, "/v1/objects/ingress?namespace=default&name=fresh");
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        let Some(ip) = v
            .pointer("/items/0/status/loadBalancer/ingress/0/ip")
            .and_then(Value::as_str)
        else {
            return false;
        };
        addressed.get_or_insert_with(|| started.elapsed());
        let addr: SocketAddr = format!("{ip}:32080").parse().expect("address");
        let ok = served_by(addr, "example.com", "/").as_deref() == Some("svc-a");
        if ok {
            served_at = Some(started.elapsed());
        }
        ok
    });
    assert!(served, "the new Ingress was never served:\n{}", m.log());
    let elapsed = served_at.expect("served");
    let mut still_parsing = 0;
    for child in &mut applies {
        if matches!(child.try_wait(), Ok(None)) {
            still_parsing += 1;
        }
    }
    eprintln!(
        "new Ingress: applied after {applied:?}, address after {addressed:?}, served after \
         {elapsed:?}; big applies still running: {still_parsing}"
    );

    // Both big applies were parsed to the end: refused for the last document.
    for child in applies {
        let out = child.wait_with_output().expect("apply output");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the big apply must be refused");
        assert!(
            text.contains("spec.ports[0].port") && text.contains("not a number"),
            "{text}"
        );
    }
    assert!(
        still_parsing > 0,
        "the large applies were over before the Ingress was served; nothing was shown"
    );
    assert!(
        elapsed < Duration::from_secs(1),
        "a new Ingress took {elapsed:?} to serve while large applies were parsed"
    );
    let (code, _) = m.cli(&["get", "service", "bulk-0"]).expect("cli");
    assert_ne!(code, 0, "nothing of a refused apply is stored");
}

/// A raw HTTP/1.1 request on the API socket: (status, body).
fn raw_request(api: &Path, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(api).expect("connect API");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(head.as_bytes()).expect("write head");
    // The server may answer (and close) before reading the whole body.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn post(api: &Path, path: &str, body: &[u8]) -> (u16, String) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    raw_request(api, &head, body)
}

fn get(api: &Path, path: &str) -> (u16, String) {
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    raw_request(api, &head, b"")
}

/// Issue 14.8 and 14.10 through the API: the body limit, JSON errors named
/// as JSON, and delete by apiVersion/kind/metadata only.
#[test]
fn apply_and_delete_api_limits_and_contract() {
    let m = Membrane::start("127.0.144.0/24", 32280, 32643);

    // An announced body over 16 MiB is refused before it is read.
    let head = format!(
        "POST /v1/apply HTTP/1.1\r\nHost: x\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        (16 << 20) + 1
    );
    let (status, body) = raw_request(&m.api, &head, b"");
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("16 MiB"), "{body}");

    // A JSON syntax error is reported as JSON, with its line.
    let json = "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"Service\"\n  \"metadata\": {\"name\": \"x\"}\n}\n";
    let head = format!(
        "POST /v1/apply HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        json.len()
    );
    let (status, body) = raw_request(&m.api, &head, json.as_bytes());
    assert_eq!(status, 400, "{body}");
    let error: Value = serde_json::from_str(&body).expect("JSON error");
    let error = error["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("document 1: invalid JSON: ") && error.contains("line 4"),
        "{error}"
    );

    // Delete reads only apiVersion, kind and metadata.
    m.apply(&service_yaml("gone", 80, None, "127.0.145.2"));
    let path = m.dir.path().join("delete.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: gone\n  namespace: default\n",
    )
    .expect("write");
    let (code, out) = m
        .cli(&["delete", "-f", path.to_str().expect("utf-8 path")])
        .expect("cli");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("service/gone deleted"), "{out}");
}

/// A `membrane up .` started by hand: cwd is the watched directory, its log
/// is redirected into it, its run directory is inside it.
struct UpInCwd {
    child: Child,
    dir: tempfile::TempDir,
}

impl UpInCwd {
    fn api(&self) -> std::path::PathBuf {
        self.dir.path().join("api.sock")
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("membrane.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .arg("--api-socket")
            .arg(self.api())
            .args(args)
            .output()
            .expect("run cli");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
}

impl Drop for UpInCwd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by PID; it stops Envoy on SIGTERM.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let stopped = wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Issue 8.4: `membrane up .` with `> membrane.log` and the run directory
/// inside `.` read Envoy's bootstrap JSON as a bad manifest, failed
/// `membrane status`, and logged the warning ~20 times a second forever.
#[test]
fn membrane_up_dot_ignores_its_own_files_and_stays_quiet() {
    require_envoy();
    let backends = Backends::new();
    backends.start("127.0.143.2", "svc-a");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("app.yaml"),
        format!(
            "{INGRESS_CLASS}---\n{}---\n{}",
            service_yaml("svc-a", 80, None, "127.0.143.2"),
            ingress_yaml("web", &[("/", "svc-a", 80)])
        ),
    )
    .expect("write");
    // Foreign JSON/YAML next to the manifests is not a problem either.
    std::fs::write(dir.path().join("package.json"), r#"{"name": "app"}"#).expect("write");
    let log = std::fs::File::create(dir.path().join("membrane.log")).expect("log");
    let child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["--api-socket", "./api.sock", "up", "."])
        .args(["--envoy-admin-port", "0", "--lb-pool", "127.0.143.0/24"])
        .args(["--http-port", "32180", "--https-port", "32543"])
        .env("MEMBRANE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn membrane up .");
    let up = UpInCwd { child, dir };

    // Ready: the Ingress is served (everything converged).
    let served = wait_until(Duration::from_secs(40), || {
        let (code, out) = up.cli(&["get", "ingress", "web", "-o", "json"]);
        if code != 0 {
            return false;
        }
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        let Some(ip) = v
            .pointer("/status/loadBalancer/ingress/0/ip")
            .and_then(Value::as_str)
        else {
            return false;
        };
        let addr: SocketAddr = format!("{ip}:32180").parse().expect("address");
        served_by(addr, "example.com", "/").as_deref() == Some("svc-a")
    });
    assert!(
        served,
        "membrane up . never served the Ingress:\n{}",
        up.log()
    );
    assert!(
        up.dir.path().join("run").is_dir(),
        "the run directory is expected inside the watched one"
    );

    // Envoy's readiness is probed every 50 ms; the Ingress may be served
    // before the first probe after start-up has seen it.
    let status_ok = wait_until(Duration::from_secs(10), || up.cli(&["status"]).0 == 0);
    let (code, out) = up.cli(&["status"]);
    assert!(status_ok, "membrane status: {out}\nlog:\n{}", up.log());
    assert_eq!(code, 0, "membrane status: {out}\nlog:\n{}", up.log());

    // Idle: the log does not grow (its own writes do not wake the watcher).
    let size = std::fs::metadata(up.log_path()).expect("log").len();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let now = std::fs::metadata(up.log_path()).expect("log").len();
        assert_eq!(now, size, "the log grew while idle:\n{}", up.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out) = up.cli(&["status"]);
    assert_eq!(code, 0, "membrane status: {out}");
    assert!(
        !up.log().contains("bad manifest"),
        "a file was reported as a bad manifest:\n{}",
        up.log()
    );
}
