//! Kubernetes mode's read side: one kube-rs watcher per kind the store holds,
//! feeding the same [`Store`](membrane_store::Store) the manifest directory
//! feeds, so everything downstream is identical whichever API serves the
//! objects (a cluster's, or the one `membrane apiserver` embeds).
//!
//! Each kind is its own scope of the source: a (re)list replaces the scope
//! atomically once the listing is complete (`InitDone`), so objects deleted
//! while a watch was down disappear, and nothing is half-listed. An object
//! the store cannot take (a malformed spec) is reported as a problem naming
//! it and is left out; the rest of its kind keeps flowing.

pub mod events;
pub mod lease;
pub mod sink;
mod write;

pub use events::EventRecorder;
pub use lease::{CILIUM_OPERATOR_LEASE, LeaderElector, LeaseConfig, LeaseError};
pub use sink::{KubeSink, Sink, StoreSink, Warning};
pub use write::{AGENT_MANAGER, OPERATOR_MANAGER, WriteError, Writer};

/// The client type every function here takes (so binaries need not name
/// kube-rs themselves).
pub use kube::Client;

use std::collections::BTreeSet;
use std::path::Path;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use membrane_store::{Kind, Object, ObjectKey, Source, SourceWriter, StoreError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Errors of connecting to a Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("no kubeconfig given and none found ($KUBECONFIG, ~/.kube/config, in-cluster): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("User-Agent {0:?}: not a valid header value")]
    UserAgent(String),
    #[error("Node {name}: {source}")]
    Node { name: String, source: kube::Error },
}

/// A client for the API a kubeconfig file points at (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, K8sError> {
    let config = config_from_kubeconfig(path).await?;
    Ok(kube::Client::try_from(config)?)
}

async fn config_from_kubeconfig(path: &Path) -> Result<kube::Config, K8sError> {
    let kubeconfig_err = |source| K8sError::Kubeconfig {
        path: path.display().to_string(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_err)?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_err)
}

/// `User-Agent` of `membrane operator` (RBAC audits key on it).
pub fn operator_user_agent() -> String {
    format!("membrane-operator/{}", env!("CARGO_PKG_VERSION"))
}

/// `User-Agent` of `membrane agent`.
pub fn agent_user_agent() -> String {
    format!("membrane-agent/{}", env!("CARGO_PKG_VERSION"))
}

/// A client for `kubeconfig`, else what kubectl would use ($KUBECONFIG,
/// ~/.kube/config, then the in-cluster service account), sending
/// `user_agent` on every request.
pub async fn client_for(
    kubeconfig: Option<&Path>,
    user_agent: &str,
) -> Result<kube::Client, K8sError> {
    let mut config = match kubeconfig {
        Some(path) => config_from_kubeconfig(path).await?,
        None => kube::Config::infer().await?,
    };
    let value = http::HeaderValue::from_str(user_agent)
        .map_err(|_| K8sError::UserAgent(user_agent.to_owned()))?;
    config.headers.push((http::header::USER_AGENT, value));
    Ok(kube::Client::try_from(config)?)
}

/// Follows the labels of Node `name`, starting from `initial`: the
/// receiver sees every change (a deleted Node keeps its last labels).
pub fn watch_node_labels(
    client: kube::Client,
    name: &str,
    initial: std::collections::BTreeMap<String, String>,
) -> watch::Receiver<std::collections::BTreeMap<String, String>> {
    use k8s_openapi::api::core::v1::Node;
    let (tx, rx) = watch::channel(initial);
    let api: Api<Node> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Apply(node) | Event::InitApply(node)) => {
                    let labels = node.metadata.labels.unwrap_or_default();
                    tx.send_if_modified(|l| {
                        let changed = *l != labels;
                        *l = labels;
                        changed
                    });
                }
                Ok(_) => {}
                Err(e) => warn!(node = %name, error = %e, "kube: Node watch failed; retrying"),
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// A Node as an agent sees it at start.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub labels: std::collections::BTreeMap<String, String>,
    pub uid: Option<String>,
}

/// Node `name`: the existing one, else the Node is created with `labels`
/// (an agent started before its Node was registered).
pub async fn ensure_node(
    client: &kube::Client,
    name: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<NodeInfo, K8sError> {
    use k8s_openapi::api::core::v1::Node;
    let api: Api<Node> = Api::all(client.clone());
    let node_err = |source| K8sError::Node {
        name: name.to_owned(),
        source,
    };
    let info = |node: Node| NodeInfo {
        labels: node.metadata.labels.unwrap_or_default(),
        uid: node.metadata.uid,
    };
    if let Some(node) = api.get_opt(name).await.map_err(node_err)? {
        return Ok(info(node));
    }
    let node = Node {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&kube::api::PostParams::default(), &node).await {
        Ok(created) => Ok(info(created)),
        // Registered meanwhile: its labels win.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Ok(info(api.get(name).await.map_err(node_err)?))
        }
        Err(e) => Err(node_err(e)),
    }
}

/// The API resource of a store kind.
pub fn api_resource(kind: Kind) -> ApiResource {
    let (group, version) = match kind.api_version().rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", kind.api_version()),
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind.kind_name()),
        kind.plural(),
    )
}

/// Watches every kind of [`Kind::all`] (or a chosen subset) on one API.
pub struct KubeSource {
    client: kube::Client,
    kinds: Vec<Kind>,
    synced: watch::Sender<BTreeSet<Kind>>,
}

/// Tells whether every watched kind has completed its initial listing.
#[derive(Clone, Debug)]
pub struct Synced {
    rx: watch::Receiver<BTreeSet<Kind>>,
    want: usize,
}

impl Synced {
    /// Every kind has been listed once.
    pub fn is_synced(&self) -> bool {
        self.rx.borrow().len() >= self.want
    }

    /// Waits until [`Self::is_synced`]; returns false if the source stopped first.
    pub async fn wait(&mut self) -> bool {
        let want = self.want;
        self.rx.wait_for(|s| s.len() >= want).await.is_ok()
    }
}

impl KubeSource {
    /// Watches every kind the store holds.
    pub fn new(client: kube::Client) -> Self {
        Self::with_kinds(client, Kind::all().to_vec())
    }

    pub fn with_kinds(client: kube::Client, kinds: Vec<Kind>) -> Self {
        let (synced, _) = watch::channel(BTreeSet::new());
        Self {
            client,
            kinds,
            synced,
        }
    }

    /// A handle that reports cache sync; readiness waits on it.
    pub fn synced(&self) -> Synced {
        Synced {
            rx: self.synced.subscribe(),
            want: self.kinds.len(),
        }
    }
}

impl Source for KubeSource {
    fn name(&self) -> String {
        "kube".into()
    }

    async fn run(self, writer: SourceWriter) -> Result<(), StoreError> {
        let watches = self
            .kinds
            .iter()
            .map(|&kind| watch_kind(self.client.clone(), kind, &writer, &self.synced));
        futures::future::join_all(watches).await;
        Ok(())
    }
}

/// The scope (and problem origin) of one kind's objects.
fn scope(kind: Kind) -> String {
    format!("kube {}", kind.plural())
}

async fn watch_kind(
    client: kube::Client,
    kind: Kind,
    writer: &SourceWriter,
    synced: &watch::Sender<BTreeSet<Kind>>,
) {
    let ar = api_resource(kind);
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let scope = scope(kind);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Vec<Object> = Vec::new();
    let mut reported = BTreeSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(o)) => {
                if let Some(obj) = convert(kind, o, writer, &mut reported) {
                    listing.push(obj);
                }
            }
            Ok(Event::InitDone) => {
                let n = listing.len();
                writer.replace_scope(&scope, std::mem::take(&mut listing));
                let first = synced.send_if_modified(|s| s.insert(kind));
                if first {
                    info!(%kind, objects = n, "kube: initial listing synced");
                } else {
                    debug!(%kind, objects = n, "kube: relisted");
                }
            }
            Ok(Event::Apply(o)) => {
                if let Some(obj) = convert(kind, o, writer, &mut reported) {
                    writer.apply_in(&scope, obj);
                }
            }
            Ok(Event::Delete(o)) => {
                let key = key_of(kind, &o);
                clear_problem(writer, &mut reported, &key);
                writer.delete(&key);
            }
            // The backoff wrapper retries; say why the watch is down.
            Err(e) => warn!(%kind, error = %e, "kube: watch failed; retrying"),
        }
    }
}

fn key_of(kind: Kind, o: &DynamicObject) -> ObjectKey {
    ObjectKey::new(
        kind,
        o.metadata.namespace.as_deref().unwrap_or_default(),
        o.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn clear_problem(writer: &SourceWriter, reported: &mut BTreeSet<ObjectKey>, key: &ObjectKey) {
    if reported.remove(key) {
        writer.set_problem(&key.to_string(), None);
    }
}

/// A watched object as a store object. List items carry no apiVersion/kind,
/// so they are set from the watched kind; a failure is reported under the
/// object's name and the object is skipped.
fn convert(
    kind: Kind,
    o: DynamicObject,
    writer: &SourceWriter,
    reported: &mut BTreeSet<ObjectKey>,
) -> Option<Object> {
    let key = key_of(kind, &o);
    let mut value = match serde_json::to_value(&o) {
        Ok(v) => v,
        Err(e) => {
            warn!(object = %key, error = %e, "kube: cannot encode watched object");
            return None;
        }
    };
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), kind.api_version().into());
        map.insert("kind".into(), kind.kind_name().into());
    }
    match Object::from_value(value) {
        Ok(obj) => {
            clear_problem(writer, reported, &key);
            Some(obj)
        }
        Err(e) => {
            let problem = format!("{key}: {e}");
            warn!(object = %key, error = %e, "kube: object rejected");
            writer.set_problem(&key.to_string(), Some(problem));
            reported.insert(key);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_resources_match_the_kinds() {
        let ing = api_resource(Kind::Ingress);
        assert_eq!(
            (
                ing.group.as_str(),
                ing.version.as_str(),
                ing.plural.as_str()
            ),
            ("networking.k8s.io", "v1", "ingresses")
        );
        let svc = api_resource(Kind::Service);
        assert_eq!((svc.group.as_str(), svc.api_version.as_str()), ("", "v1"));
        let cec = api_resource(Kind::CiliumEnvoyConfig);
        assert_eq!(cec.api_version, "cilium.io/v2");
        assert_eq!(cec.kind, "CiliumEnvoyConfig");
    }
}

#[cfg(test)]
mod user_agent_tests {
    use std::io::{Read, Write};

    /// Every request of a client made by [`super::client_for`] carries the
    /// role's User-Agent (an RBAC audit keys on it).
    #[tokio::test]
    async fn clients_send_the_role_user_agent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:20950").expect("bind 20950");
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).expect("read");
            let request = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
            let body = r#"{"major":"1","minor":"33","gitVersion":"v1.33.0"}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            request
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:20950'}}]\nusers: [{name: u, user: {}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
        )
        .expect("write kubeconfig");
        let client = super::client_for(Some(&kubeconfig), &super::operator_user_agent())
            .await
            .expect("client");
        let _ = client.apiserver_version().await;
        let request = server.join().expect("server");
        let want = format!(
            "user-agent: membrane-operator/{}",
            env!("CARGO_PKG_VERSION")
        );
        assert!(request.contains(&want), "{request}");
        assert_eq!(request.matches("user-agent:").count(), 1, "{request}");
    }
}
