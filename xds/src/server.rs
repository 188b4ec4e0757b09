//! ADS gRPC server, state-of-the-world and incremental (delta), on top of
//! [`SnapshotCache`]. Both stream handlers are one generic loop; the
//! protocol decisions are shared in the cache.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::cache::{Protocol, Push, RequestKind, SnapshotCache};

/// Large listener/route configurations exceed tonic's 4 MiB default.
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xDS socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("xDS server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The ADS service; wrap with [`service`] to mount it on a tonic server.
#[derive(Debug, Clone)]
pub struct AdsServer {
    cache: SnapshotCache,
    /// Becomes `true` on shutdown; open streams then end, which lets the
    /// transport's graceful shutdown finish (Envoy never closes ADS itself).
    stopping: watch::Receiver<bool>,
}

impl AdsServer {
    pub fn new(cache: SnapshotCache) -> Self {
        let (_tx, stopping) = watch::channel(false);
        Self { cache, stopping }
    }

    /// Streams end when `stopping` becomes `true`.
    pub fn with_shutdown(cache: SnapshotCache, stopping: watch::Receiver<bool>) -> Self {
        Self { cache, stopping }
    }
}

/// The tonic service for `cache`, with raised message size limits.
pub fn service(cache: SnapshotCache) -> AggregatedDiscoveryServiceServer<AdsServer> {
    wrap(AdsServer::new(cache))
}

fn wrap(ads: AdsServer) -> AggregatedDiscoveryServiceServer<AdsServer> {
    AggregatedDiscoveryServiceServer::new(ads)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// A service whose streams end when `shutdown` completes, and the future
/// to hand to tonic's `serve_*_shutdown`.
fn with_shutdown(
    cache: SnapshotCache,
    shutdown: impl Future<Output = ()>,
) -> (
    AggregatedDiscoveryServiceServer<AdsServer>,
    impl Future<Output = ()>,
) {
    let (tx, rx) = watch::channel(false);
    let svc = wrap(AdsServer::with_shutdown(cache, rx));
    (svc, async move {
        shutdown.await;
        let _ = tx.send(true);
    })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // A dropped sender means "never stops".
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What differs between the two ADS variants, for the shared stream loop.
trait Variant: 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const PROTOCOL: Protocol;
    fn handle(cache: &SnapshotCache, id: u64, req: &Self::Request) -> (RequestKind, Vec<Push>);
    fn type_url(req: &Self::Request) -> &str;
    fn render(push: Push) -> Self::Response;
}

struct Sotw;

impl Variant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::StateOfTheWorld;
    fn handle(cache: &SnapshotCache, id: u64, req: &Self::Request) -> (RequestKind, Vec<Push>) {
        cache.handle_request(id, req)
    }
    fn type_url(req: &Self::Request) -> &str {
        &req.type_url
    }
    fn render(push: Push) -> Self::Response {
        push.into_sotw()
    }
}

struct Delta;

impl Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const PROTOCOL: Protocol = Protocol::Delta;
    fn handle(cache: &SnapshotCache, id: u64, req: &Self::Request) -> (RequestKind, Vec<Push>) {
        cache.handle_delta_request(id, req)
    }
    fn type_url(req: &Self::Request) -> &str {
        &req.type_url
    }
    fn render(push: Push) -> Self::Response {
        push.into_delta()
    }
}

impl AdsServer {
    fn spawn<V: Variant>(
        &self,
        request: Request<Streaming<V::Request>>,
    ) -> Response<ResponseStream<V::Response>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run_stream::<V>(
            self.cache.clone(),
            request.into_inner(),
            tx,
            self.stopping.clone(),
        ));
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(self.spawn::<Sotw>(request))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(self.spawn::<Delta>(request))
    }
}

/// Removes the stream from the cache however the task ends.
struct StreamGuard {
    cache: SnapshotCache,
    id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.cache.close_stream(self.id);
    }
}

async fn run_stream<V: Variant>(
    cache: SnapshotCache,
    mut inbound: Streaming<V::Request>,
    tx: mpsc::Sender<Result<V::Response, Status>>,
    stopping: watch::Receiver<bool>,
) {
    let guard = StreamGuard {
        id: cache.open_stream(V::PROTOCOL),
        cache: cache.clone(),
    };
    let id = guard.id;
    let mut snapshots = cache.snapshot_changes();
    let stop = stopped(stopping);
    tokio::pin!(stop);
    tracing::debug!(stream = id, protocol = ?V::PROTOCOL, "xds: stream opened");
    loop {
        let pushes = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    let (kind, pushes) = V::handle(&cache, id, &req);
                    tracing::trace!(stream = id, type_url = %V::type_url(&req), ?kind, "xds: request");
                    pushes
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(stream = id, %status, "xds: stream error");
                    break;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                cache.refresh_stream(id)
            }
            _ = tx.closed() => break,
            _ = &mut stop => break,
        };
        for p in pushes {
            if tx.send(Ok(V::render(p))).await.is_err() {
                tracing::debug!(stream = id, "xds: stream closed by peer");
                return;
            }
        }
    }
    tracing::debug!(stream = id, "xds: stream closed");
}

/// Serves ADS on a unix socket until `shutdown` completes. A stale socket file
/// left by a previous run is removed first.
pub async fn serve_unix(
    path: &Path,
    cache: SnapshotCache,
    shutdown: impl Future<Output = ()>,
) -> Result<(), XdsError> {
    let sock_err = |source| XdsError::Socket {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(sock_err)?;
    tracing::info!(path = %path.display(), "xds: serving ADS (SotW and delta) on unix socket");
    let (svc, shutdown) = with_shutdown(cache, shutdown);
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(resilient_incoming(listener), shutdown)
        .await?;
    Ok(())
}

/// The accepted connections of `listener`. An `accept()` error (out of
/// descriptors, an aborted connection) is logged and waited out with a
/// capped backoff instead of being handed to tonic, which would retry at
/// once and spin while descriptors stay exhausted.
fn resilient_incoming(
    listener: tokio::net::UnixListener,
) -> impl futures::Stream<Item = Result<tokio::net::UnixStream, std::io::Error>> {
    futures::stream::unfold((listener, 0u64), |(listener, mut failures)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if failures > 0 {
                        tracing::info!(failures, "xds: accepting connections again");
                    }
                    return Some((Ok(stream), (listener, 0)));
                }
                Err(e) => {
                    failures += 1;
                    let wait = std::time::Duration::from_millis(5 << failures.min(8))
                        .min(std::time::Duration::from_secs(1));
                    if failures == 1 || failures.is_power_of_two() || failures.is_multiple_of(30) {
                        tracing::warn!(error = %e, failures, retry_in_ms = wait.as_millis() as u64, "xds: accept failed; backing off and continuing");
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    })
}

/// Serves ADS on a TCP address until `shutdown` completes.
pub async fn serve_tcp(
    addr: SocketAddr,
    cache: SnapshotCache,
    shutdown: impl Future<Output = ()>,
) -> Result<(), XdsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| XdsError::Socket {
            path: addr.to_string(),
            source,
        })?;
    serve_tcp_listener(listener, cache, shutdown).await
}

/// Serves ADS on an already bound TCP listener (lets callers bind port 0).
pub async fn serve_tcp_listener(
    listener: tokio::net::TcpListener,
    cache: SnapshotCache,
    shutdown: impl Future<Output = ()>,
) -> Result<(), XdsError> {
    tracing::info!(addr = ?listener.local_addr().ok(), "xds: serving ADS on TCP");
    let (svc, shutdown) = with_shutdown(cache, shutdown);
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
