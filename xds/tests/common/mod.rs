//! Shared by the scripted-client tests: an ADS server on a unix socket and
//! resource fixtures.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use hyper_util::rt::TokioIo;
use membrane_xds::{Resource, Snapshot, SnapshotCache, type_url};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tonic::transport::{Channel, Endpoint, Uri};

pub const STEP: Duration = Duration::from_secs(10);
pub const PROBE: &str = "type.googleapis.com/membrane.test.Probe";
pub const NODE: &str = "node-1";

pub struct Server {
    pub cache: SnapshotCache,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xds.sock");
        // A stale file must not prevent start-up.
        std::fs::write(&path, b"stale").unwrap();
        let cache = SnapshotCache::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let cache = cache.clone();
            let path = path.clone();
            async move {
                membrane_xds::serve_unix(&path, cache, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            }
        });
        Self {
            cache,
            path,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        let path = self.path.clone();
        // The socket appears once the server task has bound it.
        for _ in 0..500 {
            if let Ok(ch) = connect(&path).await {
                return ch;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server did not come up at {}", path.display());
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            timeout(STEP, t).await.unwrap().unwrap();
        }
    }
}

async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

pub fn cluster(name: &str, timeout_s: i64) -> Arc<Resource> {
    Arc::new(
        Resource::from_message(&Cluster {
            name: name.into(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: timeout_s,
                nanos: 0,
            }),
            ..Default::default()
        })
        .unwrap(),
    )
}

pub fn cla(name: &str, port: u32) -> Arc<Resource> {
    let v = serde_json::json!({
        "@type": type_url::ENDPOINT,
        "clusterName": name,
        "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": port}}}}]}]
    });
    Arc::new(Resource::from_json(&v).unwrap())
}

pub fn listener(name: &str, route: &str) -> Arc<Resource> {
    let v = serde_json::json!({
        "@type": type_url::LISTENER,
        "name": name,
        "filterChains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": name,
                "rds": {"routeConfigName": route, "configSource": {"ads": {}}},
                "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        }]}]
    });
    Arc::new(Resource::from_json(&v).unwrap())
}

pub fn route(name: &str, cluster: &str) -> Arc<Resource> {
    let v = serde_json::json!({
        "@type": type_url::ROUTE,
        "name": name,
        "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]
    });
    Arc::new(Resource::from_json(&v).unwrap())
}

pub fn snap(rs: &[Arc<Resource>]) -> Snapshot {
    Snapshot::from_resources(rs.iter().cloned()).unwrap()
}

/// The status of `t` on `NODE`'s newest stream.
pub fn type_status(cache: &SnapshotCache, t: &str) -> membrane_xds::TypeStatus {
    let st = cache.status();
    let s = st
        .streams
        .iter()
        .rev()
        .find(|s| s.node_id == NODE)
        .expect("node stream");
    s.types.get(t).expect("type status").clone()
}
