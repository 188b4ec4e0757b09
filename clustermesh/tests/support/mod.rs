//! A real etcd (Debian `etcd-server`) with mutual TLS on loopback, for tests.
//! Data lives in a temp dir; the process is killed by PID on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use membrane_certs::TestCa;
use membrane_clustermesh::EtcdConfig;

pub const ETCD: &str = "/usr/bin/etcd";

/// Whether etcd is installed; in CI a missing etcd fails the test.
pub fn etcd_available() -> bool {
    if Path::new(ETCD).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{ETCD} is missing (Debian package etcd-server; scripts/setup.sh installs it)");
    }
    eprintln!("skipping: {ETCD} is missing (install etcd-server)");
    false
}

/// Certificates shared by every etcd and client of one test.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate from another CA: must be refused.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        let ca = TestCa::new("membrane-mesh-test-ca").expect("ca");
        let (sc, sk) = ca.issue(&["127.0.0.1", "localhost"]).expect("server cert");
        let (cc, ck) = ca.issue(&["membrane-agent"]).expect("client cert");
        let other = TestCa::new("rogue-ca").expect("ca");
        let (rc, rk) = other.issue(&["rogue"]).expect("rogue cert");
        for (n, v) in [
            ("ca.crt", ca.cert_pem()),
            ("server.crt", sc.as_str()),
            ("server.key", sk.as_str()),
            ("client.crt", cc.as_str()),
            ("client.key", ck.as_str()),
            ("rogue.crt", rc.as_str()),
            ("rogue.key", rk.as_str()),
        ] {
            std::fs::write(p(n), v).expect("write pem");
        }
        Pki {
            ca: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
            rogue_cert: p("rogue.crt"),
            rogue_key: p("rogue.key"),
            dir,
        }
    }

    /// Cilium's etcd config file for a client of `etcd`.
    pub fn client_config(&self, etcd: &Etcd) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![etcd.url()],
            trusted_ca_file: Some(self.ca.clone()),
            cert_file: Some(self.client_cert.clone()),
            key_file: Some(self.client_key.clone()),
        }
    }
}

pub struct Etcd {
    pub client_port: u16,
    pub peer_port: u16,
    pub data: tempfile::TempDir,
    child: Option<Child>,
    args: Vec<String>,
}

impl Etcd {
    /// Starts etcd with client TLS and client-certificate auth on
    /// `127.0.0.1:client_port` (peer on `peer_port`, plain, loopback only).
    pub fn start(pki: &Pki, client_port: u16, peer_port: u16) -> Etcd {
        let data = tempfile::tempdir().expect("tempdir");
        let url = format!("https://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let args: Vec<String> = vec![
            "--name=mesh".into(),
            format!("--data-dir={}", data.path().join("data").display()),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=mesh={peer}"),
            format!("--cert-file={}", pki.server_cert.display()),
            format!("--key-file={}", pki.server_key.display()),
            format!("--trusted-ca-file={}", pki.ca.display()),
            "--client-cert-auth=true".into(),
        ];
        let mut e = Etcd {
            client_port,
            peer_port,
            data,
            child: None,
            args,
        };
        e.restart();
        e
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    /// Kills the process (SIGKILL, by PID) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts the process on the same data dir and ports.
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::File::create(self.data.path().join("etcd.log")).expect("log");
        let child = Command::new(ETCD)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects with the test's client certificate, retrying while etcd starts
/// (bounded).
pub async fn client(pki: &Pki, etcd: &Etcd) -> etcd_client::Client {
    let cfg = pki.client_config(etcd);
    for _ in 0..100 {
        if let Ok(mut c) = membrane_clustermesh::etcd::connect("test", &cfg).await
            && c.get("probe", None).await.is_ok()
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd on {} never became ready:\n{}", etcd.url(), etcd.log());
}

/// Polls `f` until it returns true, at most `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}
