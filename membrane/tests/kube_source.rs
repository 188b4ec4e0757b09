//! Kubernetes mode, read side: kube-rs watchers (membrane-k8s) mirror what the
//! real kubectl writes into `membrane apiserver` into Membrane's store, and
//! keep mirroring across an API server restart (SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
mod kubectl_support;

use common::{BIN, rand_suffix, wait_until};
use membrane_k8s::{KubeSource, client_from_kubeconfig};
use membrane_store::{Kind, ObjectKey, Store};

struct ApiServer {
    child: Child,
    data: PathBuf,
}

impl ApiServer {
    fn start(data: &Path, listen: &str) -> ApiServer {
        let log = std::fs::File::create(data.join("apiserver.log")).expect("log");
        let child = Command::new(BIN)
            .args(["apiserver", "--listen", listen, "--data-dir"])
            .arg(data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn membrane apiserver");
        let server = ApiServer {
            child,
            data: data.to_owned(),
        };
        let ready = wait_until(Duration::from_secs(30), || {
            server.kubeconfig().is_file() && kubectl(&server, &["get", "--raw", "/readyz"]).0
        });
        assert!(ready, "apiserver not ready:\n{}", server.log());
        server
    }

    fn kubeconfig(&self) -> PathBuf {
        self.data.join("kubeconfig")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("apiserver.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kubectl(server: &ApiServer, args: &[&str]) -> (bool, String) {
    let out = Command::new(kubectl_support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args(args)
        .output()
        .expect("run kubectl");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn apply(server: &ApiServer, yaml: &str) {
    let path = server.data.join(format!("apply-{}.yaml", rand_suffix()));
    std::fs::write(&path, yaml).expect("write");
    let (ok, out) = kubectl(server, &["apply", "-f", path.to_str().unwrap_or_default()]);
    assert!(ok, "kubectl apply failed: {out}");
}

fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: mirror\n\
         spec:\n  ports:\n  - port: {port}\n    targetPort: 3000\n"
    )
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: mirror\n";

const INGRESS: &str = "apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
  namespace: mirror
spec:
  ingressClassName: cilium
  rules:
  - http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service:
            name: one
            port:
              number: 80
";

const CEC: &str = "apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata:
  name: direct
  namespace: mirror
spec:
  resources: []
";

fn service_port(store: &Store, name: &str) -> Option<i32> {
    let svc: k8s_openapi::api::core::v1::Service = store.get_typed("mirror", name)?;
    Some(svc.spec?.ports?.first()?.port)
}

#[test]
fn watchers_mirror_the_api_into_the_store() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = ApiServer::start(data.path(), "127.0.0.1:18690");
    apply(&server, NAMESPACE);
    apply(&server, &service("one", 80));
    apply(&server, INGRESS);
    apply(&server, CEC);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store = Store::new();
    let mut synced = runtime.block_on(async {
        let client = client_from_kubeconfig(&server.kubeconfig())
            .await
            .expect("client from the kubeconfig membrane apiserver wrote");
        let source = KubeSource::new(client);
        let synced = source.synced();
        let _task = store.spawn_source(source);
        synced
    });
    let listed = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), synced.wait())
            .await
            .unwrap_or(false)
    });
    assert!(listed, "the watchers never completed their initial listing");

    // Everything applied before the watchers started is in the store.
    let ingress = ObjectKey::new(Kind::Ingress, "mirror", "web");
    let cec = ObjectKey::new(Kind::CiliumEnvoyConfig, "mirror", "direct");
    assert!(store.get(&ingress).is_some(), "Ingress not mirrored");
    assert!(store.get(&cec).is_some(), "CEC not mirrored");
    assert_eq!(service_port(&store, "one"), Some(80));

    // Changes and deletions made with kubectl follow.
    apply(&server, &service("one", 8080));
    apply(&server, &service("two", 81));
    assert!(
        wait_until(Duration::from_secs(10), || service_port(&store, "one")
            == Some(8080)
            && service_port(&store, "two") == Some(81)),
        "service changes not mirrored"
    );
    let (ok, out) = kubectl(&server, &["delete", "ingress", "web", "-n", "mirror"]);
    assert!(ok, "kubectl delete: {out}");
    assert!(
        wait_until(Duration::from_secs(10), || store.get(&ingress).is_none()),
        "deleted Ingress still in the store"
    );

    // The API server dies hard and comes back on the same data: the watchers
    // reconnect, what was applied survives, and new changes flow again.
    server.kill();
    let server = ApiServer::start(data.path(), "127.0.0.1:18690");
    apply(&server, &service("one", 9090));
    assert!(
        wait_until(Duration::from_secs(30), || service_port(&store, "one")
            == Some(9090)),
        "no change mirrored after the API server restarted:\n{}",
        server.log()
    );
    assert_eq!(service_port(&store, "two"), Some(81));
    assert!(store.get(&cec).is_some(), "CEC lost across the restart");
    assert!(store.get(&ingress).is_none(), "deleted Ingress came back");
    drop(runtime);
}

/// The writer against the real embedded API: server-side apply records
/// Membrane's field manager, status goes through the subresource, and
/// delete removes the object (and tolerates it being gone).
#[test]
fn writer_applies_with_its_field_manager() {
    use membrane_k8s::{OPERATOR_MANAGER, Writer};
    use membrane_store::Object;

    let data = tempfile::tempdir().expect("tempdir");
    let server = ApiServer::start(data.path(), "127.0.0.1:18691");
    apply(&server, NAMESPACE);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let writer = runtime.block_on(async {
        let client = client_from_kubeconfig(&server.kubeconfig())
            .await
            .expect("client");
        Writer::new(client, OPERATOR_MANAGER)
    });
    let svc = Object::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "generated", "namespace": "mirror"},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80}]},
    }))
    .expect("service");
    runtime.block_on(writer.apply(&svc)).expect("apply");
    let key = ObjectKey::new(Kind::Service, "mirror", "generated");
    runtime
        .block_on(writer.apply_status(
            &key,
            serde_json::json!({"loadBalancer": {"ingress": [{"ip": "127.0.190.5"}]}}),
        ))
        .expect("status");

    let (ok, out) = kubectl(
        &server,
        &[
            "get",
            "service",
            "generated",
            "-n",
            "mirror",
            "-o",
            "json",
            "--show-managed-fields",
        ],
    );
    assert!(ok, "kubectl get: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["spec"]["ports"][0]["port"], 80, "{v}");
    assert_eq!(
        v["status"]["loadBalancer"]["ingress"][0]["ip"], "127.0.190.5",
        "{v}"
    );
    let managers: Vec<&str> = v["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert!(
        managers.contains(&OPERATOR_MANAGER),
        "managers: {managers:?}"
    );

    runtime.block_on(writer.delete(&key)).expect("delete");
    let (ok, _) = kubectl(&server, &["get", "service", "generated", "-n", "mirror"]);
    assert!(!ok, "service still there after delete");
    runtime
        .block_on(writer.delete(&key))
        .expect("deleting a gone object is fine");
}
