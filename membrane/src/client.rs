//! A client of the local API (docs/local-api.md) over its unix socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// Talks to one running Membrane.
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// Send one request; returns the status and the JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Value)> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "cannot reach Membrane at {} (is `membrane up` running? see --api-socket)",
                self.socket.display()
            )
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "membrane")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("invalid answer from Membrane ({status})"))?;
        Ok((status, value))
    }

    /// Like [`call`](Self::call) but turns an error answer into an error.
    pub async fn ok(&self, method: Method, path: &str, body: Option<String>) -> Result<Value> {
        let (status, value) = self.call(method, path, body).await?;
        if !status.is_success() {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed");
            bail!("{msg}");
        }
        Ok(value)
    }
}
