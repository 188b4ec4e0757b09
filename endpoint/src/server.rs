//! The unix socket the plugin talks to: one JSON request line, one JSON
//! response line per connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use membrane_cni::spec::{CniError, ErrorCode};
use membrane_cni::wire::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::Manager;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 1 << 20;
/// A plugin must send its request within this time.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve until `shutdown`; requests in flight are abandoned then (the
/// plugin answers 11 and the runtime retries against the next agent).
pub async fn serve(
    path: &Path,
    manager: Arc<Manager>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let mut tasks = JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "CNI socket accept");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = shutdown.cancelled() => break,
        };
        let manager = manager.clone();
        tasks.spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
            let resp = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => manager.handle(req).await,
                    Err(e) => Response::Error(
                        CniError::new(ErrorCode::Decode, "undecodable request")
                            .details(e.to_string()),
                    ),
                },
                _ => return,
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            if let Err(e) = write.write_all(&out).await {
                debug!(error = %e, "CNI client went away before its answer");
            }
        });
    }
    tasks.abort_all();
    let _ = std::fs::remove_file(path);
    Ok(())
}
