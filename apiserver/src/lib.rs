//! `membrane-apiserver`: the embedded Kubernetes-compatible API server of
//! `membrane up` / `membrane apiserver`. Objects are generic JSON persisted
//! in SQLite under one global resourceVersion; a static table of resources
//! (plus stored CRDs) drives discovery and routing. The real kubectl works
//! against it; docs/apiserver.md lists the supported subset.

pub mod api;
pub mod audit;
pub mod convert;
pub mod defaults;
pub mod discovery;
pub mod error;
pub mod http;
pub mod patch;
pub mod protobuf;
pub mod resources;
pub mod selectors;
pub mod ssa;
pub mod store;
pub mod table;
pub mod util;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use api::Api;
pub use error::{ApiError, Error};

/// Server settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Change events kept for watchers to resume from; older → 410 Gone.
    pub event_window: u64,
    /// How often a watch with `allowWatchBookmarks` gets a bookmark.
    pub bookmark_interval: Duration,
    /// Events last seen longer ago than this are deleted.
    pub event_ttl: Duration,
    /// Append one JSON line per request here (`--audit-log`).
    pub audit_log: Option<PathBuf>,
    /// Commit durability (`--sync-commits`: fsync every commit).
    pub sync: store::SyncMode,
}

impl Config {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen,
            data_dir: data_dir.into(),
            event_window: 10_000,
            bookmark_interval: Duration::from_secs(5),
            event_ttl: Duration::from_secs(3600),
            audit_log: None,
            sync: store::SyncMode::default(),
        }
    }
}

/// A bound, not yet serving API server.
pub struct ApiServer {
    api: Arc<Api>,
    listener: TcpListener,
    config: Config,
    audit: Option<Arc<audit::AuditLog>>,
    gc: Arc<Notify>,
}

impl ApiServer {
    /// Open the data directory and bind the listener.
    pub async fn bind(config: Config) -> Result<ApiServer, Error> {
        let dir = config.data_dir.clone();
        let (window, sync) = (config.event_window, config.sync);
        let api = tokio::task::spawn_blocking(move || Api::open_with(&dir, window, sync))
            .await
            .map_err(|e| Error::Api(ApiError::internal(format!("opening the store: {e}"))))??;
        let audit = match &config.audit_log {
            Some(path) => Some(Arc::new(audit::AuditLog::open(path)?)),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Io(format!("binding {}", config.listen), e))?;
        Ok(ApiServer {
            api: Arc::new(api),
            listener,
            config,
            audit,
            gc: Arc::new(Notify::new()),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener
            .local_addr()
            .map_err(|e| Error::Io("listener address".into(), e))
    }

    /// The API (for in-process use).
    pub fn api(&self) -> Arc<Api> {
        self.api.clone()
    }

    /// Wakes garbage collection (after an in-process delete; deletes over
    /// HTTP wake it themselves).
    pub fn gc_waker(&self) -> Arc<Notify> {
        self.gc.clone()
    }

    /// Serve until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let addr = self.local_addr()?;
        let gc = self.gc.clone();
        let http = Arc::new(http::Http {
            api: self.api.clone(),
            server_addr: addr.to_string(),
            bookmark_interval: self.config.bookmark_interval,
            gc: gc.clone(),
            audit: self.audit.clone(),
        });
        let gc_task = tokio::spawn(gc_loop(self.api.clone(), gc, self.config.event_ttl));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept");
                            continue;
                        }
                    };
                    // Watch events are small writes: with Nagle, one sent
                    // while the previous is unacknowledged could wait for the
                    // client's delayed ACK (up to 40 ms). Kubernetes (Go)
                    // sets TCP_NODELAY on every connection too.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "TCP_NODELAY");
                    }
                    let http = http.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| http.clone().handle(req));
                        if let Err(e) = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await
                        {
                            tracing::debug!(%peer, error = %e, "connection");
                        }
                    });
                }
            }
        }
        gc_task.abort();
        Ok(())
    }
}

/// Garbage collection runs after deletes (and every 10 s, to finish work a
/// crash interrupted and to expire Events).
async fn gc_loop(api: Arc<Api>, wake: Arc<Notify>, event_ttl: Duration) {
    let ttl = event_ttl.as_secs() as i64;
    loop {
        let api2 = api.clone();
        let pass = move || -> Result<(), Error> {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            api2.expire_events(ttl, now)?;
            api2.collect_garbage()
        };
        match tokio::task::spawn_blocking(pass).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "garbage collection"),
            Err(e) => tracing::warn!(error = %e, "garbage collection task"),
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// A kubeconfig for a server at `addr` (plain HTTP, no credentials).
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: membrane
  cluster:
    server: http://{addr}
contexts:
- name: membrane
  context:
    cluster: membrane
    user: membrane
    namespace: default
current-context: membrane
users:
- name: membrane
  user: {{}}
"
    )
}

/// Write the kubeconfig to `path`.
pub fn write_kubeconfig(path: &Path, addr: SocketAddr) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::Io(parent.display().to_string(), e))?;
    }
    std::fs::write(path, kubeconfig(addr)).map_err(|e| Error::Io(path.display().to_string(), e))
}
