//! Harness for the tests that run the real kubectl against `membrane
//! apiserver`: a server process on a fixed port of this suite's range
//! (35000-35999) and a data directory, killed by PID on drop; every wait
//! is a bounded poll.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_membrane");

/// The repository root (for examples/ and crds/).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// kubectl: `/usr/bin/kubectl`, or `KUBECTL`. Missing fails the test.
pub fn kubectl_bin() -> PathBuf {
    let path = std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/kubectl"));
    assert!(
        path.is_file(),
        "kubectl is required for this test (looked for {}; set KUBECTL)",
        path.display()
    );
    path
}

/// A running `membrane apiserver`.
pub struct ApiServer {
    child: Option<Child>,
    pub data: tempfile::TempDir,
    pub port: u16,
    pub kubeconfig: PathBuf,
    extra: Vec<String>,
}

impl ApiServer {
    pub fn start(port: u16) -> ApiServer {
        Self::start_with(port, &[])
    }

    pub fn start_with(port: u16, extra: &[&str]) -> ApiServer {
        let data = tempfile::tempdir().expect("tempdir");
        let kubeconfig = data.path().join("kubeconfig");
        let mut s = ApiServer {
            child: None,
            data,
            port,
            kubeconfig,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        // The port range is inside the kernel's ephemeral range, so another
        // process's outgoing connection can hold our port for a moment:
        // retry "address in use" a bounded number of times.
        for _attempt in 0..20 {
            match self.try_spawn() {
                Ok(()) => return,
                Err(log) if log.contains("Address already in use") => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(log) => panic!("membrane apiserver did not start:\n{log}"),
            }
        }
        panic!("port {} stayed in use", self.port);
    }

    /// Start the server; Err(its log) when it exits before serving.
    fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(BIN);
        cmd.arg("apiserver")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data.path())
            .args(&self.extra)
            .env("MEMBRANE_LOG", "membrane_apiserver=debug")
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(self.data.path().join("apiserver.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        let mut child = cmd.spawn().expect("spawn membrane apiserver");
        // The first line names the kubeconfig it wrote.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let Ok(first) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(self.log());
        };
        assert_eq!(first, format!("kubeconfig: {}", self.kubeconfig.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = self.try_http("GET", "/version", None) {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "API server not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("apiserver.log")).unwrap_or_default()
    }

    fn signal_and_wait(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the PID of a child we started and still own.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("membrane apiserver did not exit on signal {sig}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGTERM, wait for a clean exit (status 0), start again.
    pub fn restart_term(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as above.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let status = wait_bounded(&mut c, Duration::from_secs(20));
            assert!(status.success(), "SIGTERM exit status {status:?}");
        }
        self.spawn();
    }

    /// SIGKILL (no chance to clean up), start again.
    pub fn restart_kill(&mut self) {
        self.signal_and_wait(libc::SIGKILL);
        self.spawn();
    }

    /// kubectl with this server's kubeconfig and a private cache.
    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kubectl_bin());
        c.env("KUBECONFIG", &self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.data.path().join("kubectl-cache"))
            .args(args);
        c
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).output().expect("run kubectl")
    }

    /// kubectl that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}\n--- server log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            tail(&self.log())
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// kubectl with `input` on stdin.
    pub fn with_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .kubectl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("kubectl output")
    }

    pub fn ok_stdin(&self, args: &[&str], input: &str) -> String {
        let out = self.with_stdin(args, input);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One HTTP request; (status, body with chunked framing removed).
    pub fn try_http(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (ctype, data) = body.unwrap_or(("application/json", ""));
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{data}",
            data.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        Ok((status, body))
    }

    pub fn http(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String) {
        self.try_http(method, path, body).expect("HTTP request")
    }

    /// Start `kubectl get ... -w`; lines arrive on the receiver.
    pub fn watch(&self, args: &[&str]) -> Watch {
        let mut child = self
            .kubectl_cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl -w");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watch { child, lines: rx }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `kubectl get -w`.
pub struct Watch {
    child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Watch {
    /// Wait (bounded) for a line containing `needle`; returns it.
    pub fn expect_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!("watch never printed {needle:?}; printed {seen:?}");
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_bounded(c: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET on a port (to the end of the response body).
pub fn raw_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    dechunk(body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Poll `f` until it returns true (bounded), else panic with `what`.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Parse JSON output.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}
