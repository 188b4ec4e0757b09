//! The local API (docs/local-api.md): HTTP/1.1 + JSON on a unix socket, used
//! by the CLI and the conformance runner.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use membrane_store::{Kind, ObjectKey};
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::state::AgentState;

/// Largest request body accepted (a big manifest, not a denial of service).
const MAX_BODY: usize = 64 << 20;

/// Most connections served at once; more are answered 503 and closed, so
/// a flood of clients can never take the descriptors the agent needs.
const MAX_CONNECTIONS: usize = 512;
/// Connections over the cap being answered 503 at once; more are closed.
const MAX_REFUSALS: usize = 128;
/// A client must send a complete request head within this time, on a new
/// connection and between requests on a kept-alive one (an idle timeout).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this, however it trickles its body.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Back-off after a failed `accept()`, doubled per failure in a row.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serve the API on `path` until `shutdown`. Only binding can fail: accept
/// errors (out of descriptors, aborted connections) are logged and waited
/// out, never fatal.
pub async fn serve(
    path: &Path,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => { backoff.success(); stream }
                Err(e) => {
                    backoff.failed(&e, "local API").await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Refusals are bounded too; past that, just close.
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse_busy(stream).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => debug!(error = %e, "api connection ended"),
                Err(_) => debug!("api connection closed after its maximum lifetime"),
                Ok(Ok(())) => {}
            }
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Over the connection cap: read what the client sent (briefly), answer
/// 503 so it fails fast instead of hanging, close. Answering before the
/// request is read confuses HTTP clients, hence the read.
async fn refuse_busy(mut stream: tokio::net::UnixStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // Up to the end of the request head, at most 16 KiB.
        while head.len() < 16 << 10 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = r#"{"error":"too many connections to the local API; retry"}"#;
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(resp.as_bytes())).await;
}

/// What an accept loop does after `accept()` fails: log (the first failure
/// of a streak, then sparsely), wait a growing while, go on. Running out of
/// descriptors is transient: they come back when connections close.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u64,
}

impl AcceptBackoff {
    pub fn success(&mut self) {
        if self.failures > 0 {
            info!(failures = self.failures, "accepting connections again");
            self.failures = 0;
        }
    }

    pub async fn failed(&mut self, e: &std::io::Error, what: &str) {
        self.failures += 1;
        let shift = self.failures.min(16) as u32 - 1;
        let wait = ACCEPT_BACKOFF_MIN
            .saturating_mul(1 << shift)
            .min(ACCEPT_BACKOFF_MAX);
        if self.failures == 1 || self.failures.is_power_of_two() || self.failures.is_multiple_of(30)
        {
            warn!(
                server = what,
                error = %e,
                failures = self.failures,
                retry_in_ms = wait.as_millis() as u64,
                "accept failed; backing off and continuing"
            );
        }
        tokio::time::sleep(wait).await;
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, json!({"error": msg.into()}))
}

async fn handle(state: &AgentState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body = match (&method, path.as_str()) {
        (&Method::POST, "/v1/apply") | (&Method::POST, "/v1/delete") => {
            match read_manifests(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            }
        }
        (&Method::POST, "/v1/services/backends" | "/v1/policy/trace") => match read_body(req).await
        {
            Ok(b) => Bytes::from(b),
            Err(resp) => return resp,
        },
        _ => Bytes::new(),
    };
    respond(state, &method, &path, &query, body).await
}

/// Answers one request whose body has been read. Separate from the socket
/// handling so request parsing can be fuzzed without a server (fuzz/).
pub async fn respond(
    state: &AgentState,
    method: &Method,
    path: &str,
    query: &str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::POST, "/v1/apply") => apply(state, body).await,
        (&Method::POST, "/v1/delete") => delete(state, body).await,
        (&Method::GET, "/v1/status") => reply(StatusCode::OK, state.status_report()),
        (&Method::GET, "/v1/services") => {
            let (status, body) = crate::api_services::list(state);
            reply(status, body)
        }
        (&Method::POST, "/v1/services/backends") => match std::str::from_utf8(&body) {
            Ok(b) => {
                let (status, body) = crate::api_services::update_backends(state, b);
                reply(status, body)
            }
            Err(_) => error(StatusCode::BAD_REQUEST, "request body is not UTF-8"),
        },
        (&Method::GET, "/v1/endpoints") => match &state.endpoints {
            Some(m) => reply(
                StatusCode::OK,
                crate::cni::list_json(&m.list().await, state.policy.as_deref()),
            ),
            None => reply(StatusCode::OK, json!([])),
        },
        (&Method::POST, "/v1/policy/trace") => {
            let Some(p) = &state.policy else {
                return error(
                    StatusCode::NOT_FOUND,
                    "policy is enforced only with --enable-cni and --datapath ebpf",
                );
            };
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) => match p.trace(&v) {
                    Ok(r) => reply(StatusCode::OK, r),
                    Err(e) => error(StatusCode::BAD_REQUEST, e),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, format!("trace request: {e}")),
            }
        }
        (&Method::GET, "/v1/policy") => match &state.policy {
            Some(p) => reply(StatusCode::OK, p.report()),
            None => reply(StatusCode::OK, json!({"endpoints": []})),
        },
        (&Method::GET, p) if p.starts_with("/v1/objects/") => {
            get_objects(state, &p["/v1/objects/".len()..], query).await
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<String, Response<Full<Bytes>>> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("reading request body: {e}"),
            )
        })?
        .to_bytes();
    String::from_utf8(body.to_vec())
        .map_err(|_| error(StatusCode::BAD_REQUEST, "request body is not UTF-8"))
}

/// Reads an apply/delete body of at most [`membrane_store::MAX_INPUT_BYTES`]
/// into one buffer (parsed in place later, never copied).
async fn read_manifests(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    let limit = membrane_store::MAX_INPUT_BYTES;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is more than the limit of {} MiB", limit >> 20),
        )
    };
    // Refuse an announced oversize body before reading any of it.
    let announced = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("reading request body: {e}"),
        )),
    }
}

/// Parses a body off the async workers (see [`membrane_store::run_parse`]),
/// so a huge or hostile manifest never stalls the rest of the API.
async fn parse_body<T: Send + 'static>(
    body: Bytes,
    parse: fn(&str) -> Result<T, membrane_store::StoreError>,
) -> Result<T, Response<Full<Bytes>>> {
    let parsed = membrane_store::run_parse(body.len(), move || match std::str::from_utf8(&body) {
        Ok(text) => parse(text).map_err(|e| e.to_string()),
        Err(e) => Err(format!("request body is not UTF-8: {e}")),
    })
    .await;
    match parsed {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(msg)) => Err(error(StatusCode::BAD_REQUEST, msg)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn apply(state: &AgentState, body: Bytes) -> Response<Full<Bytes>> {
    let objects = match parse_body(body, membrane_store::parse_documents).await {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    if let Some(upstream) = state.store.upstream() {
        return apply_upstream(upstream, objects).await;
    }
    // One atomic change: the agent never sees half of a multi-document file.
    let keys: Vec<ObjectKey> = objects.iter().map(|o| o.key()).collect();
    let changes = state.store.apply_all(objects);
    let results: Vec<Value> = keys
        .iter()
        .zip(changes)
        .map(|(key, change)| {
            json!({"kind": key.kind.kind_name(), "namespace": key.namespace, "name": key.name, "result": change.as_str()})
        })
        .collect();
    reply(StatusCode::OK, json!({ "results": results }))
}

async fn delete(state: &AgentState, body: Bytes) -> Response<Full<Bytes>> {
    // Only apiVersion, kind and metadata are read (docs/local-api.md).
    let keys = match parse_body(body, membrane_store::parse_keys).await {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    if let Some(upstream) = state.store.upstream() {
        return delete_upstream(upstream, keys).await;
    }
    let deleted = state.store.delete_all(&keys);
    let results: Vec<Value> = keys
        .iter()
        .zip(deleted)
        .map(|(key, gone)| {
            let result = if gone.is_some() { "deleted" } else { "not found" };
            json!({"kind": key.kind.kind_name(), "namespace": key.namespace, "name": key.name, "result": result})
        })
        .collect();
    reply(StatusCode::OK, json!({ "results": results }))
}

/// One result line per object, as `membrane apply` prints them.
fn result_json(key: &ObjectKey, result: &str) -> Value {
    json!({"kind": key.kind.kind_name(), "namespace": key.namespace, "name": key.name, "result": result})
}

/// Runs a call to the API server off the async workers (SQLite commits).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response<Full<Bytes>>> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("API server call: {e}"),
        )
    })
}

/// The answer of a write through the API server: every object's result;
/// 422 naming each object the API refused (the others are written, as
/// kubectl does).
fn write_reply(results: Vec<Value>, refused: Vec<String>) -> Response<Full<Bytes>> {
    if refused.is_empty() {
        reply(StatusCode::OK, json!({ "results": results }))
    } else {
        reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": refused.join("; "), "results": results}),
        )
    }
}

/// `/v1/apply` when the store mirrors an API server (`membrane up`): the
/// objects are applied there, in document order.
async fn apply_upstream(
    upstream: membrane_store::SharedUpstream,
    objects: Vec<membrane_store::Object>,
) -> Response<Full<Bytes>> {
    let keys: Vec<ObjectKey> = objects.iter().map(|o| o.key()).collect();
    let outcomes = match blocking(move || upstream.apply(&objects)).await {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    let mut results = Vec::new();
    let mut refused = Vec::new();
    for (key, outcome) in keys.iter().zip(outcomes) {
        match outcome {
            Ok(change) => results.push(result_json(key, change.as_str())),
            Err(e) => {
                results.push(result_json(key, "refused"));
                refused.push(e);
            }
        }
    }
    write_reply(results, refused)
}

async fn delete_upstream(
    upstream: membrane_store::SharedUpstream,
    keys: Vec<ObjectKey>,
) -> Response<Full<Bytes>> {
    let for_call = keys.clone();
    let outcomes = match blocking(move || upstream.delete(&for_call)).await {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    let mut results = Vec::new();
    let mut refused = Vec::new();
    for (key, outcome) in keys.iter().zip(outcomes) {
        match outcome {
            Ok(true) => results.push(result_json(key, "deleted")),
            Ok(false) => results.push(result_json(key, "not found")),
            Err(e) => {
                results.push(result_json(key, "refused"));
                refused.push(e);
            }
        }
    }
    write_reply(results, refused)
}

async fn get_objects(state: &AgentState, kind: &str, query: &str) -> Response<Full<Bytes>> {
    let kind = match Kind::parse(kind) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let mut namespace = None;
    let mut name = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "namespace" if !v.is_empty() => namespace = Some(v.to_owned()),
            "name" if !v.is_empty() => name = Some(v.to_owned()),
            _ => {}
        }
    }
    if !kind.namespaced() {
        // Like kubectl: a namespace means nothing to cluster-scoped kinds.
        namespace = None;
    }
    if let Some(name) = name {
        let ns = if kind.namespaced() {
            namespace.unwrap_or_else(|| "default".to_owned())
        } else {
            String::new()
        };
        let key = ObjectKey {
            kind,
            namespace: ns,
            name,
        };
        // Read your writes: from the API server a store mirrors, if any.
        let found = match state.store.upstream() {
            Some(upstream) => {
                let k = key.clone();
                match blocking(move || upstream.get(&k)).await {
                    Ok(Ok(o)) => o.map(|o| o.to_value()),
                    Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
                    Err(resp) => return resp,
                }
            }
            None => state.store.get(&key).map(|o| o.to_value()),
        };
        return match found {
            Some(obj) => reply(StatusCode::OK, json!({"items": [obj]})),
            None => error(StatusCode::NOT_FOUND, format!("{key} not found")),
        };
    }
    let items: Vec<Value> = match state.store.upstream() {
        Some(upstream) => match blocking(move || upstream.list(kind, namespace.as_deref())).await {
            Ok(Ok(objs)) => objs.iter().map(|o| o.to_value()).collect(),
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
            Err(resp) => return resp,
        },
        None => state
            .store
            .list(kind, namespace.as_deref())
            .iter()
            .map(|o| o.to_value())
            .collect(),
    };
    reply(StatusCode::OK, json!({ "items": items }))
}
