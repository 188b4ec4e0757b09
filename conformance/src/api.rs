//! Client for Membrane's local API (docs/local-api.md): HTTP/1.1 JSON on a unix socket.
//! One connection per call keeps it simple and robust against the server restarting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::UnixStream;

/// Failure talking to the local API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to the Membrane API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local API {method} {path}: {detail}")]
    Transport {
        method: String,
        path: String,
        detail: String,
    },
    #[error("local API {method} {path} answered {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("local API {method} {path}: unexpected answer: {detail}")]
    Decode {
        method: String,
        path: String,
        detail: String,
    },
}

/// One line of an apply/delete answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ObjectResult {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub result: String,
}

#[derive(Deserialize)]
struct Results {
    #[serde(default)]
    results: Vec<ObjectResult>,
}

#[derive(Deserialize)]
struct Items {
    #[serde(default)]
    items: Vec<Value>,
}

/// Bound on one API call; the API answers from memory, so this only guards against a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct LocalApi {
    socket: PathBuf,
}

impl LocalApi {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        LocalApi {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /v1/apply` with one or more JSON/YAML documents.
    pub async fn apply(&self, body: &str) -> Result<Vec<ObjectResult>, ApiError> {
        self.post_results("/v1/apply", body).await
    }

    /// `POST /v1/delete`.
    pub async fn delete(&self, body: &str) -> Result<Vec<ObjectResult>, ApiError> {
        self.post_results("/v1/delete", body).await
    }

    /// `GET /v1/objects/{kind}?namespace=..`: every object of a kind (optionally in one namespace).
    pub async fn list(&self, kind: &str, namespace: Option<&str>) -> Result<Vec<Value>, ApiError> {
        let mut path = format!("/v1/objects/{kind}");
        if let Some(ns) = namespace {
            path.push_str("?namespace=");
            path.push_str(ns);
        }
        let (status, body) = self.call(Method::GET, &path, None).await?;
        if status != StatusCode::OK {
            return Err(status_error("GET", &path, status, &body));
        }
        decode::<Items>("GET", &path, &body).map(|i| i.items)
    }

    /// `GET /v1/objects/{kind}?namespace=..&name=..`; `None` when the API says 404.
    pub async fn get(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, ApiError> {
        let path = match namespace {
            Some(ns) => format!("/v1/objects/{kind}?namespace={ns}&name={name}"),
            None => format!("/v1/objects/{kind}?name={name}"),
        };
        let (status, body) = self.call(Method::GET, &path, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if status != StatusCode::OK {
            return Err(status_error("GET", &path, status, &body));
        }
        Ok(decode::<Items>("GET", &path, &body)?
            .items
            .into_iter()
            .next())
    }

    async fn post_results(&self, path: &str, body: &str) -> Result<Vec<ObjectResult>, ApiError> {
        let (status, answer) = self.call(Method::POST, path, Some(body.to_owned())).await?;
        if status != StatusCode::OK {
            return Err(status_error("POST", path, status, &answer));
        }
        decode::<Results>("POST", path, &answer).map(|r| r.results)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let transport = |detail: String| ApiError::Transport {
            method: method.to_string(),
            path: path.to_owned(),
            detail,
        };
        let fut = async {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| ApiError::Connect {
                        path: self.socket.clone(),
                        source,
                    })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| transport(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "local API connection ended");
                }
            });
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, "membrane");
            if body.is_some() {
                req = req.header(hyper::header::CONTENT_TYPE, "application/yaml");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| transport(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(e.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| transport(format!("no answer within {CALL_TIMEOUT:?}")))?
    }
}

fn status_error(method: &str, path: &str, status: StatusCode, body: &[u8]) -> ApiError {
    #[derive(Deserialize)]
    struct ErrBody {
        error: String,
    }
    let message = serde_json::from_slice::<ErrBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    ApiError::Status {
        method: method.to_owned(),
        path: path.to_owned(),
        status: status.as_u16(),
        message,
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Decode {
        method: method.to_owned(),
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    /// A fake local API that records requests and answers from a closure.
    async fn fake_api(
        answer: impl Fn(&str, &str, &str) -> (u16, String) + Send + Sync + 'static,
    ) -> (tempfile::TempDir, Arc<Mutex<Vec<(String, String, String)>>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let answer = answer.clone();
                            let seen = seen.clone();
                            async move {
                                let method = req.method().to_string();
                                let uri = req.uri().to_string();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let body = String::from_utf8(body.to_vec()).unwrap();
                                let (status, text) = answer(&method, &uri, &body);
                                seen.lock().unwrap().push((method, uri, body));
                                let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
                                *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (dir, seen)
    }

    #[tokio::test]
    async fn apply_get_list_delete_round_trip() {
        let (dir, seen) = fake_api(|method, uri, _| match (method, uri) {
            ("POST", "/v1/apply") => (
                200,
                r#"{"results":[{"kind":"Namespace","namespace":null,"name":"x","result":"created"}]}"#.into(),
            ),
            ("GET", u) if u.contains("name=missing") => (404, r#"{"error":"not found"}"#.into()),
            ("GET", _) => (200, r#"{"items":[{"kind":"Ingress","metadata":{"name":"a"}}]}"#.into()),
            ("POST", "/v1/delete") => (400, r#"{"error":"bad document"}"#.into()),
            _ => (500, "?".into()),
        })
        .await;
        let api = LocalApi::new(dir.path().join("api.sock"));
        let r = api.apply("kind: Namespace").await.unwrap();
        assert_eq!(r[0].result, "created");
        assert_eq!(r[0].name, "x");
        assert!(
            api.get("ingress", Some("ns"), "missing")
                .await
                .unwrap()
                .is_none()
        );
        let got = api.get("ingress", Some("ns"), "a").await.unwrap().unwrap();
        assert_eq!(got["metadata"]["name"], "a");
        assert_eq!(api.list("namespace", None).await.unwrap().len(), 1);
        let err = api.delete("x").await.unwrap_err();
        assert!(
            matches!(err, ApiError::Status { status: 400, ref message, .. } if message == "bad document"),
            "{err}"
        );
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen[0],
            ("POST".into(), "/v1/apply".into(), "kind: Namespace".into())
        );
        assert_eq!(seen[1].1, "/v1/objects/ingress?namespace=ns&name=missing");
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let api = LocalApi::new("/nonexistent/membrane.sock");
        assert!(matches!(
            api.list("ns", None).await,
            Err(ApiError::Connect { .. })
        ));
    }
}
