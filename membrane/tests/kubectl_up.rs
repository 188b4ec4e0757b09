//! The real kubectl against `membrane up`: its embedded Kubernetes API
//! (kubeconfig in the run directory) is what the operator and the agent
//! run against, so kubectl drives what Envoy serves.
//!
//! - `kubectl apply -f examples/quickstart` (client-side) and again with
//!   `--server-side`; `get -w` sees the Ingress address appear, `get -o
//!   yaml` shows it, traffic through Envoy is answered by the backends;
//! - a CEC applied `--server-side` is served;
//! - `describe` of a bad Ingress shows a Warning Event naming the field;
//! - `delete ingress` garbage-collects its CEC, Service and EndpointSlice;
//! - restarting `membrane up` (SIGTERM, then SIGKILL) on the same run
//!   directory keeps every object applied with kubectl and `membrane
//!   apply`, and a watch from a resourceVersion before the restarts
//!   replays every change after it, across both restarts.
//!
//! Ports 24000-24999 and addresses in 127.24.0.0/16 only.

mod common;
mod kubectl_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{
    Backends, Membrane, body_at, direct_cec, ingress_yaml, served_by, service_yaml, wait_until,
};
use kubectl_support::{kubectl_bin, repo};

/// kubectl with the kubeconfig `membrane up` wrote.
struct Kubectl {
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn for_membrane(m: &Membrane) -> Kubectl {
        let kubeconfig = m.dir.path().join("run/kubeconfig");
        assert!(
            kubeconfig.is_file(),
            "no kubeconfig at {}:\n{}",
            kubeconfig.display(),
            m.log()
        );
        // The path is announced on stdout (here: the log).
        assert!(
            m.log()
                .contains(&format!("kubeconfig: {}", kubeconfig.display())),
            "kubeconfig path not printed:\n{}",
            m.log()
        );
        Kubectl { kubeconfig }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(kubectl_bin());
        c.env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
        c
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin.unwrap_or_default().as_bytes())
                .expect("kubectl stdin");
        }
        child.wait_with_output().expect("kubectl")
    }

    /// stdout of a command that must succeed.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// stdout if the command succeeds.
    fn get(&self, args: &[&str]) -> Option<String> {
        let out = self.run(args, None);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn exists(&self, kind: &str, name: &str) -> bool {
        self.run(&["get", kind, name], None).status.success()
    }
}

/// A copy of examples/quickstart whose backends live on this suite's
/// addresses (the rest exactly as shipped).
fn quickstart_copy(dir: &Path) -> PathBuf {
    let out = dir.join("quickstart");
    std::fs::create_dir_all(&out).expect("mkdir");
    for f in ["ingress.yaml", "services.yaml"] {
        let text = std::fs::read_to_string(repo().join("examples/quickstart").join(f))
            .expect("quickstart file");
        assert!(f != "services.yaml" || text.contains("127.0.10.1"));
        let text = text
            .replace("127.0.10.1", "127.24.10.1")
            .replace("127.0.10.2", "127.24.10.2");
        std::fs::write(out.join(f), text).expect("write");
    }
    out
}

#[test]
fn kubectl_drives_membrane_up() {
    let backends = Backends::new();
    backends.start("127.24.10.1", "echo-a");
    backends.start("127.24.10.2", "echo-b");
    let m = Membrane::start_with(
        "127.24.0.0/24",
        24080,
        24443,
        &["--api-listen", "127.0.0.1:24001"],
    );
    let k = Kubectl::for_membrane(&m);

    // A watch opened before anything exists sees the address appear.
    let mut watch = k
        .command()
        .args([
            "get",
            "ingress",
            "-w",
            "-o",
            "custom-columns=NAME:.metadata.name,IP:.status.loadBalancer.ingress[0].ip",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = watch.stdout.take().expect("watch stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    // Client-side apply, the default, of the quickstart.
    let quickstart = quickstart_copy(m.dir.path());
    let applied = k.ok(
        &["apply", "-f", quickstart.to_str().unwrap_or_default()],
        None,
    );
    assert!(
        applied.contains("ingress.networking.k8s.io/quickstart created"),
        "{applied}"
    );

    let mut ip = None;
    let seen = wait_until(Duration::from_secs(30), || {
        while let Ok(line) = rx.try_recv() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.first() == Some(&"quickstart")
                && cols.get(1).is_some_and(|c| c.starts_with("127.24.0."))
            {
                ip = cols.get(1).map(|s| s.to_string());
            }
        }
        ip.is_some()
    });
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen, "get -w never showed the address:\n{}", m.log());
    let ip = ip.unwrap_or_default();

    let yaml = k.ok(&["get", "ingress", "quickstart", "-o", "yaml"], None);
    assert!(yaml.contains(&format!("ip: {ip}")), "{yaml}");
    let addr: SocketAddr = format!("{ip}:24080").parse().expect("addr");
    let served = wait_until(Duration::from_secs(10), || {
        served_by(addr, "anything", "/").as_deref() == Some("echo-a")
    });
    assert!(served, "{addr} / not served by echo-a:\n{}", m.log());
    assert_eq!(
        served_by(addr, "anything", "/b/hello").as_deref(),
        Some("echo-b")
    );

    // Server-side apply of the same files: same owner values, no conflict.
    let ssa = k.ok(
        &[
            "apply",
            "--server-side",
            "-f",
            quickstart.to_str().unwrap_or_default(),
        ],
        None,
    );
    assert!(
        ssa.contains("ingress.networking.k8s.io/quickstart serverside-applied"),
        "{ssa}"
    );

    // A CEC, server-side, is served by the agent.
    k.ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&direct_cec("direct", 24081, "from-a-cec", "filterChains")),
    );
    assert!(
        wait_until(Duration::from_secs(15), || body_at(24081).as_deref()
            == Some("from-a-cec")),
        "CEC not served:\n{}",
        m.log()
    );

    // A bad Ingress: a Warning Event names the field; the rest keeps serving.
    k.ok(
        &["apply", "-f", "-"],
        Some(&ingress_yaml("bad", &[("/", "missing", 80)])),
    );
    let mut described = String::new();
    let warned = wait_until(Duration::from_secs(20), || {
        described = k.get(&["describe", "ingress", "bad"]).unwrap_or_default();
        described.contains("Warning") && described.contains("backend.service.name")
    });
    assert!(warned, "no Warning Event naming the field:\n{described}");
    assert_eq!(served_by(addr, "anything", "/").as_deref(), Some("echo-a"));

    // Deleting the Ingress garbage-collects what was generated for it.
    for (kind, name) in [
        ("ciliumenvoyconfig", "cilium-ingress-default-quickstart"),
        ("service", "cilium-ingress-quickstart"),
        ("endpointslice", "cilium-ingress-quickstart"),
    ] {
        assert!(k.exists(kind, name), "{kind} {name} was never generated");
    }
    k.ok(&["delete", "ingress", "quickstart"], None);
    let collected = wait_until(Duration::from_secs(20), || {
        !k.exists("ciliumenvoyconfig", "cilium-ingress-default-quickstart")
            && !k.exists("service", "cilium-ingress-quickstart")
            && !k.exists("endpointslice", "cilium-ingress-quickstart")
    });
    assert!(collected, "generated objects left behind:\n{}", m.log());
    let gone = wait_until(Duration::from_secs(10), || {
        served_by(addr, "anything", "/").is_none()
    });
    assert!(gone, "{addr} still served after the delete");
}

/// `GET path` on the API; the whole body (a watch ends at its timeout).
fn api_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect API");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn resource_version(k: &Kubectl, kind: &str, name: &str) -> String {
    k.get(&[
        "get",
        kind,
        name,
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ])
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| panic!("{kind} {name} not found"))
}

fn restart(m: Membrane, manifests: &Path, hard: bool) -> Membrane {
    let mut m = m;
    if hard {
        m.kill_hard();
    }
    // Keep the directory: the next instance reads the same run/data dir.
    let dir = std::mem::replace(&mut m.dir, tempfile::tempdir().expect("tempdir"));
    drop(m); // SIGTERM (a no-op after SIGKILL) and wait
    Membrane::start_on(
        dir,
        manifests,
        "127.24.1.0/24",
        24180,
        24543,
        &["--api-listen", "127.0.0.1:24002"],
    )
}

#[test]
fn restarts_keep_objects_and_watch_history() {
    let m = Membrane::start_with(
        "127.24.1.0/24",
        24180,
        24543,
        &["--api-listen", "127.0.0.1:24002"],
    );
    let manifests = m.manifests();
    let k = Kubectl::for_membrane(&m);
    k.ok(
        &["apply", "-f", "-"],
        Some(&service_yaml("by-kubectl", 80, None, "127.24.11.1")),
    );
    m.apply(&service_yaml("by-membrane-apply", 80, None, "127.24.11.2"));
    // The list's resourceVersion: every change after it is replayed below.
    let list = api_get(24002, "/api/v1/namespaces/default/services");
    // The JSON document, whatever the transfer encoding around it.
    let body = &list[list.find('{').unwrap_or(0)..=list.rfind('}').unwrap_or(0)];
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let rv0 = v["metadata"]["resourceVersion"]
        .as_str()
        .expect("list resourceVersion")
        .to_owned();
    k.ok(
        &["apply", "-f", "-"],
        Some(&service_yaml("after-rv0", 80, None, "127.24.11.3")),
    );
    let before: Vec<String> = ["by-kubectl", "by-membrane-apply", "after-rv0"]
        .iter()
        .map(|n| resource_version(&k, "service", n))
        .collect();

    let m = restart(m, &manifests, false);
    let k = Kubectl::for_membrane(&m);
    m.apply(&service_yaml("after-sigterm", 80, None, "127.24.11.4"));
    let m = restart(m, &manifests, true);
    let k2 = Kubectl::for_membrane(&m);
    drop(k);
    k2.ok(
        &["apply", "-f", "-"],
        Some(&service_yaml("after-sigkill", 80, None, "127.24.11.5")),
    );

    // Objects applied before the restarts are there, unchanged.
    let after: Vec<String> = ["by-kubectl", "by-membrane-apply", "after-rv0"]
        .iter()
        .map(|n| resource_version(&k2, "service", n))
        .collect();
    assert_eq!(before, after, "objects changed across restarts");
    // `membrane get` (the local API) sees them too.
    let (code, out) = m.cli(&["get", "service", "by-kubectl"]).expect("cli");
    assert_eq!(code, 0, "{out}");

    // A watch from before the restarts replays every later change, in
    // resourceVersion order, above rv0.
    let watch = api_get(
        24002,
        &format!(
            "/api/v1/namespaces/default/services?watch=true&resourceVersion={rv0}&timeoutSeconds=1"
        ),
    );
    let mut seen = Vec::new();
    let mut last = rv0.parse::<u64>().expect("numeric resourceVersion");
    for line in watch.lines().filter(|l| l.starts_with('{')) {
        let e: serde_json::Value = serde_json::from_str(line).expect("watch event");
        let rv: u64 = e["object"]["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("event resourceVersion");
        assert!(rv > last, "resourceVersions not increasing: {watch}");
        last = rv;
        if e["type"] == "ADDED" {
            seen.push(
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    for name in ["after-rv0", "after-sigterm", "after-sigkill"] {
        assert!(
            seen.iter().any(|s| s == name),
            "{name} not replayed: {seen:?}\n{watch}"
        );
    }
    assert!(
        !seen.iter().any(|s| s == "by-kubectl"),
        "a change before rv0 was replayed: {seen:?}"
    );
}

/// The watched directory is an API client: it applies what its files
/// declare and deletes only what it applied (not what kubectl created),
/// also when a file went away while Membrane was down; an unchanged
/// rewrite of a file writes nothing.
#[test]
fn the_manifest_directory_applies_and_deletes_only_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(
        manifests.join("a.yaml"),
        service_yaml("from-file-a", 80, None, "127.24.12.1"),
    )
    .expect("write");
    std::fs::write(
        manifests.join("b.yaml"),
        service_yaml("from-file-b", 80, None, "127.24.12.2"),
    )
    .expect("write");
    let m = Membrane::start_on(
        dir,
        &manifests,
        "127.24.2.0/24",
        24280,
        24643,
        &["--api-listen", "127.0.0.1:24003"],
    );
    let k = Kubectl::for_membrane(&m);
    assert!(k.exists("service", "from-file-a") && k.exists("service", "from-file-b"));
    let managers = k.ok(
        &[
            "get",
            "service",
            "from-file-a",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
        None,
    );
    assert!(managers.contains("membrane-manifests"), "{managers}");
    k.ok(
        &["apply", "-f", "-"],
        Some(&service_yaml("by-kubectl", 80, None, "127.24.12.3")),
    );

    // The same content written again: nothing is written to the API.
    let rv = resource_version(&k, "service", "from-file-a");
    std::fs::write(
        manifests.join("a.yaml"),
        service_yaml("from-file-a", 80, None, "127.24.12.1"),
    )
    .expect("rewrite");
    // A real change in another file, after it, proves the reload happened.
    std::fs::write(
        manifests.join("c.yaml"),
        service_yaml("from-file-c", 80, None, "127.24.12.4"),
    )
    .expect("write");
    assert!(
        wait_until(Duration::from_secs(10), || k
            .exists("service", "from-file-c")),
        "c.yaml not applied:\n{}",
        m.log()
    );
    assert_eq!(resource_version(&k, "service", "from-file-a"), rv);

    // A removed file deletes its objects; kubectl's stay.
    std::fs::remove_file(manifests.join("a.yaml")).expect("rm");
    assert!(
        wait_until(Duration::from_secs(10), || !k
            .exists("service", "from-file-a")),
        "from-file-a not deleted:\n{}",
        m.log()
    );
    assert!(k.exists("service", "by-kubectl"));

    // A file removed while Membrane is down: its objects go at the next start.
    let mut m = m;
    let dir = std::mem::replace(&mut m.dir, tempfile::tempdir().expect("tempdir"));
    drop(m);
    std::fs::remove_file(manifests.join("b.yaml")).expect("rm");
    let m = Membrane::start_on(
        dir,
        &manifests,
        "127.24.2.0/24",
        24280,
        24643,
        &["--api-listen", "127.0.0.1:24003"],
    );
    let k = Kubectl::for_membrane(&m);
    assert!(!k.exists("service", "from-file-b"), "{}", m.log());
    assert!(k.exists("service", "from-file-c"));
    assert!(k.exists("service", "by-kubectl"));
}
