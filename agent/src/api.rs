//! The local API (docs/local-api.md): HTTP/1.1 + JSON on a unix socket, used
//! by the CLI and the conformance runner.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use membrane_store::{Kind, ObjectKey};
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::state::AgentState;

/// Largest request body accepted (a big manifest, not a denial of service).
const MAX_BODY: usize = 64 << 20;

/// Serve the API on `path` until `shutdown`.
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
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = shutdown.cancelled() => break,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "api connection ended");
            }
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
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
    let body = if method == Method::POST {
        match read_body(req).await {
            Ok(b) => b,
            Err(resp) => return resp,
        }
    } else {
        String::new()
    };
    respond(state, &method, &path, &query, &body)
}

/// Answers one request whose body has been read. Separate from the socket
/// handling so the request parsing can be fuzzed without a server.
pub fn respond(
    state: &AgentState,
    method: &Method,
    path: &str,
    query: &str,
    body: &str,
) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::POST, "/v1/apply") => apply(state, body),
        (&Method::POST, "/v1/delete") => delete(state, body),
        (&Method::GET, "/v1/status") => reply(StatusCode::OK, state.status_report()),
        (&Method::GET, "/v1/services") => {
            let (status, body) = crate::api_services::list(state);
            reply(status, body)
        }
        (&Method::POST, "/v1/services/backends") => {
            let (status, body) = crate::api_services::update_backends(state, body);
            reply(status, body)
        }
        (&Method::GET, p) if p.starts_with("/v1/objects/") => {
            get_objects(state, &p["/v1/objects/".len()..], query)
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

fn apply(state: &AgentState, body: &str) -> Response<Full<Bytes>> {
    let objects = match membrane_store::parse_documents(body) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
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

fn delete(state: &AgentState, body: &str) -> Response<Full<Bytes>> {
    let objects = match membrane_store::parse_documents(body) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let keys: Vec<ObjectKey> = objects.iter().map(|o| o.key()).collect();
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

fn get_objects(state: &AgentState, kind: &str, query: &str) -> Response<Full<Bytes>> {
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
        return match state.store.get(&key) {
            Some(obj) => reply(StatusCode::OK, json!({"items": [obj.to_value()]})),
            None => error(StatusCode::NOT_FOUND, format!("{key} not found")),
        };
    }
    let items: Vec<Value> = state
        .store
        .list(kind, namespace.as_deref())
        .iter()
        .map(|o| o.to_value())
        .collect();
    reply(StatusCode::OK, json!({ "items": items }))
}
