//! Test harness: a real `membrane up` (real Envoy) on a temporary manifest
//! directory, in-process echo backends, and a tiny HTTP client. Every wait
//! is a bounded poll; every process is killed by PID on drop.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_membrane");

/// In CI a missing prerequisite fails the test instead of skipping it.
pub fn require_envoy() {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy");
    let found = venv.is_file() || std::env::var_os("MEMBRANE_ENVOY").is_some();
    assert!(
        found,
        "Envoy is required: run scripts/setup.sh (looked for {})",
        venv.display()
    );
}

/// A running `membrane up`.
pub struct Membrane {
    child: Child,
    pub dir: tempfile::TempDir,
    pub api: PathBuf,
    pub http_port: u16,
    pub https_port: u16,
}

impl Membrane {
    /// Start on an empty manifest directory with LB pool `pool`
    /// (e.g. "127.0.101.0/24") and the given Ingress ports.
    pub fn start(pool: &str, http_port: u16, https_port: u16) -> Membrane {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        Self::start_on(dir, &manifests, pool, http_port, https_port, &[])
    }

    /// Start on an empty manifest directory with extra `membrane up` flags.
    pub fn start_with(pool: &str, http_port: u16, https_port: u16, extra: &[&str]) -> Membrane {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        Self::start_on(dir, &manifests, pool, http_port, https_port, extra)
    }

    /// Start on an existing manifest directory.
    pub fn start_on(
        dir: tempfile::TempDir,
        manifests: &Path,
        pool: &str,
        http_port: u16,
        https_port: u16,
        extra: &[&str],
    ) -> Membrane {
        require_envoy();
        let api = dir.path().join("api.sock");
        let log = std::fs::File::create(dir.path().join("membrane.log")).expect("log");
        let child = Command::new(BIN)
            .arg("--api-socket")
            .arg(&api)
            .arg("up")
            .arg(manifests)
            .args(["--run-dir"])
            .arg(dir.path().join("run"))
            .args(["--lb-pool", pool])
            .args([
                "--http-port",
                &http_port.to_string(),
                "--https-port",
                &https_port.to_string(),
            ])
            .args(extra)
            .env(
                "MEMBRANE_LOG",
                std::env::var("MEMBRANE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn membrane up");
        let m = Membrane {
            child,
            dir,
            api,
            http_port,
            https_port,
        };
        let ok = wait_until(Duration::from_secs(30), || {
            m.cli(&["status", "-o", "json"])
                .ok()
                .and_then(|(_, out)| serde_json::from_str::<Value>(&out).ok())
                .is_some_and(|s| {
                    s["envoy"]["running"] == true
                        && s["ready"] == true
                        && !s["xds"]["streams"].as_array().is_none_or(|a| a.is_empty())
                })
        });
        assert!(ok, "membrane up did not become ready:\n{}", m.log());
        m
    }

    /// PID of the `membrane up` process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// PID of the Envoy this Membrane runs, per `membrane status`.
    pub fn envoy_pid(&self) -> Option<i32> {
        self.status()["envoy"]["pid"].as_i64().map(|p| p as i32)
    }

    /// SIGKILL Membrane (no shutdown path runs).
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("membrane.log")).unwrap_or_default()
    }

    /// Run the CLI against this instance: (exit code, stdout+stderr).
    pub fn cli(&self, args: &[&str]) -> std::io::Result<(i32, String)> {
        let out = Command::new(BIN)
            .arg("--api-socket")
            .arg(&self.api)
            .args(args)
            .output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// `membrane apply -f -` with `yaml`.
    pub fn apply(&self, yaml: &str) {
        let path = self
            .dir
            .path()
            .join(format!("apply-{}.yaml", rand_suffix()));
        std::fs::write(&path, yaml).expect("write");
        let (code, out) = self
            .cli(&["apply", "-f", path.to_str().unwrap_or_default()])
            .expect("cli");
        assert_eq!(code, 0, "apply failed: {out}");
    }

    pub fn delete(&self, yaml: &str) {
        let path = self
            .dir
            .path()
            .join(format!("delete-{}.yaml", rand_suffix()));
        std::fs::write(&path, yaml).expect("write");
        let (code, out) = self
            .cli(&["delete", "-f", path.to_str().unwrap_or_default()])
            .expect("cli");
        assert_eq!(code, 0, "delete failed: {out}");
    }

    pub fn status(&self) -> Value {
        let (_, out) = self.cli(&["status", "-o", "json"]).expect("cli");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
    }

    /// Reasons of rejected objects, keyed by object.
    pub fn rejected(&self) -> Vec<(String, String)> {
        self.status()["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["object"].as_str().unwrap_or_default().to_owned(),
                    r["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The Ingress's status address, once written.
    pub fn ingress_ip(&self, ns: &str, name: &str) -> Option<String> {
        let (code, out) = self
            .cli(&["get", "ingress", name, "-n", ns, "-o", "json"])
            .ok()?;
        if code != 0 {
            return None;
        }
        let v: Value = serde_json::from_str(&out).ok()?;
        v.pointer("/status/loadBalancer/ingress/0/ip")?
            .as_str()
            .map(str::to_owned)
    }

    pub fn wait_ingress_ip(&self, ns: &str, name: &str) -> String {
        let mut ip = None;
        wait_until(Duration::from_secs(20), || {
            ip = self.ingress_ip(ns, name);
            ip.is_some()
        });
        ip.unwrap_or_else(|| panic!("Ingress {ns}/{name} never got an address:\n{}", self.log()))
    }
}

impl Drop for Membrane {
    fn drop(&mut self) {
        if std::env::var_os("MEMBRANE_TEST_LOG").is_some() {
            eprintln!("---- membrane log ----\n{}", self.log());
        }
        // Membrane stops its Envoy on SIGTERM.
        stop_child(&mut self.child);
    }
}

/// Stops a child we spawned, by PID: SIGTERM, up to 10 s to exit, then
/// SIGKILL. Reaps it, so call it once per child.
pub fn stop_child(child: &mut Child) {
    // SAFETY: signalling our own, not yet reaped child by PID.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The Envoy binary tests run (`$MEMBRANE_ENVOY` or the checkout's venv).
pub fn envoy_bin() -> PathBuf {
    std::env::var_os("MEMBRANE_ENVOY")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy"))
}

/// A symlink `dir/envoy` to the Envoy binary, for tests that make the
/// binary disappear (rename the link away) and come back.
pub fn envoy_link(dir: &Path) -> PathBuf {
    require_envoy();
    let target = std::fs::canonicalize(envoy_bin()).expect("envoy binary");
    let link = dir.join("envoy");
    std::os::unix::fs::symlink(&target, &link).expect("symlink envoy");
    link
}

pub fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Poll `f` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`: (status, body). It
/// stops at Content-Length rather than at EOF, because Envoy delays closing
/// after local replies (HCM `delayed_close_timeout`, 1 s by default) and
/// that second must not be counted as update latency.
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if length.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The `service` an echo backend reported, if the answer was a 200 from one.
pub fn served_by(addr: SocketAddr, host: &str, path: &str) -> Option<String> {
    let (status, body) = http_get(addr, host, path).ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["service"].as_str().map(str::to_owned)
}

/// Echo backends on loopback addresses, served by a background runtime.
pub struct Backends {
    rt: tokio::runtime::Runtime,
}

impl Backends {
    pub fn new() -> Backends {
        Backends {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    /// Start an echo "pod" on `ip:3000` answering as `service`.
    pub fn start(&self, ip: &str, service: &str) {
        self.start_pod(ip, service, &format!("{service}-pod"));
    }

    /// Start an echo pod with its own pod name.
    pub fn start_pod(&self, ip: &str, service: &str, pod: &str) {
        let id = membrane_conformance::echo::EchoIdentity {
            namespace: "default".into(),
            ingress: "test".into(),
            service: service.into(),
            pod: pod.into(),
        };
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(format!("{ip}:3000")))
            .unwrap_or_else(|e| panic!("bind {ip}:3000: {e}"));
        self.rt.spawn(membrane_conformance::echo::serve(
            listener,
            id,
            std::future::pending(),
        ));
    }
}

/// A Service `name` (port `port`, optionally named) with one ready endpoint
/// at `ip:3000`.
pub fn service_yaml(name: &str, port: u16, port_name: Option<&str>, ip: &str) -> String {
    let named = port_name
        .map(|n| format!("\n      name: {n}"))
        .unwrap_or_default();
    let slice_named = port_name
        .map(|n| format!("\n    name: {n}"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  ports:
    - port: {port}{named}
      targetPort: 3000
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
  - port: 3000{slice_named}
endpoints:
  - addresses: ["{ip}"]
    conditions:
      ready: true
"#
    )
}

/// A Service `name` on port 80 whose EndpointSlice has one ready endpoint
/// per address in `ips` (port 3000).
pub fn service_with_endpoints(name: &str, ips: &[&str]) -> String {
    let head = service_yaml(name, 80, None, "0.0.0.0");
    let head = &head[..head.find("endpoints:").unwrap_or(head.len())];
    let mut out = format!("{head}endpoints:\n");
    if ips.is_empty() {
        out = format!("{head}endpoints: []\n");
    }
    for ip in ips {
        out.push_str(&format!(
            "  - addresses: [\"{ip}\"]\n    conditions:\n      ready: true\n"
        ));
    }
    out
}

/// The (`service`, `pod`) an echo backend reported for a 200.
pub fn served_by_pod(addr: SocketAddr, host: &str, path: &str) -> Option<(String, String)> {
    let (status, body) = http_get(addr, host, path).ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    Some((
        v["service"].as_str()?.to_owned(),
        v["pod"].as_str()?.to_owned(),
    ))
}

/// An Ingress of class cilium routing `path` (Prefix) on any host to `svc:port`.
pub fn ingress_yaml(name: &str, routes: &[(&str, &str, u16)]) -> String {
    let mut paths = String::new();
    for (path, svc, port) in routes {
        paths.push_str(&format!(
            r#"          - path: {path}
            pathType: Prefix
            backend:
              service:
                name: {svc}
                port:
                  number: {port}
"#
        ));
    }
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {name}
  namespace: default
spec:
  ingressClassName: cilium
  rules:
    - http:
        paths:
{paths}"#
    )
}

pub const INGRESS_CLASS: &str = r#"apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: cilium
spec:
  controller: cilium.io/ingress-controller
"#;

/// A CEC with one listener on 127.0.0.1:`port` answering `body` directly.
/// `field` lets a test misspell the filter-chain key.
pub fn direct_cec(name: &str, port: u16, body: &str, field: &str) -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: {name}, namespace: default}}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: direct
    address: {{socketAddress: {{address: 127.0.0.1, portValue: {port}}}}}
    {field}:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typedConfig:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          statPrefix: direct
          routeConfig:
            virtualHosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                directResponse: {{status: 200, body: {{inlineString: {body}}}}}
          httpFilters:
          - name: envoy.filters.http.router
            typedConfig: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

pub fn body_at(port: u16) -> Option<String> {
    let (status, body) = http_get(format!("127.0.0.1:{port}").parse().ok()?, "x", "/").ok()?;
    (status == 200).then_some(body)
}
