//! Helpers shared by the `ingress_*` tests: TLS backends that terminate TLS
//! themselves (for passthrough), a curl-based HTTPS client, TLS Secrets.
//! Every process is killed by PID on drop; every wait is a bounded poll.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::wait_until;

/// `openssl s_server -WWW` on `ip:port` with a self-signed certificate for
/// `host`, serving the file `who` whose content is `body`: only this
/// backend can answer `GET /who` with `body`, and only if the TLS stream
/// reached it untouched.
pub struct TlsBackend {
    child: Child,
    _dir: tempfile::TempDir,
}

impl TlsBackend {
    pub fn start(ip: &str, port: u16, host: &str, body: &str) -> TlsBackend {
        let dir = tempfile::tempdir().expect("tempdir");
        let (crt, key) = membrane_certs::self_signed(&[host]).expect("issue certificate");
        std::fs::write(dir.path().join("crt.pem"), crt).expect("write");
        std::fs::write(dir.path().join("key.pem"), key).expect("write");
        std::fs::write(dir.path().join("who"), body).expect("write");
        let child = Command::new("openssl")
            .current_dir(dir.path())
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("{ip}:{port}"))
            .args(["-cert", "crt.pem", "-key", "key.pem"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl is required (Debian package openssl)");
        let addr: SocketAddr = format!("{ip}:{port}").parse().expect("address");
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        assert!(up, "openssl s_server on {addr} did not start");
        TlsBackend { child, _dir: dir }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET https://host:port/path` sent to `ip` (SNI and Host = `host`),
/// certificate not verified: the body on success.
pub fn https_get(ip: &str, port: u16, host: &str, path: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "--resolve"])
        .arg(format!("{host}:{port}:{ip}"))
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl is required");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls [`https_get`] until it returns a body containing `want`.
pub fn wait_https(ip: &str, port: u16, host: &str, path: &str, want: &str) -> bool {
    wait_until(Duration::from_secs(20), || {
        https_get(ip, port, host, path).is_some_and(|b| b.contains(want))
    })
}

/// A `kubernetes.io/tls` Secret `name` in `default` for `host`.
pub fn tls_secret(name: &str, host: &str) -> String {
    tls_secret_in("default", name, host).0
}

/// A `kubernetes.io/tls` Secret `namespace/name` for `host`, and its
/// certificate (PEM).
pub fn tls_secret_in(namespace: &str, name: &str, host: &str) -> (String, String) {
    let (crt, key) = membrane_certs::self_signed(&[host]).expect("issue certificate");
    let indent =
        |s: &str| -> String { s.lines().map(|l| format!("    {l}\n")).collect::<String>() };
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&crt),
        indent(&key)
    );
    (yaml, crt)
}
