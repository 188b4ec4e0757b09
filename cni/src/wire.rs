//! The plugin ↔ agent protocol: one JSON request line, one JSON response
//! line, on a fresh unix-socket connection per CNI invocation.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::{Attachment, CniError, ErrorCode};

/// Longest a request may take before the plugin gives up (code 11, so the
/// runtime retries). Covers a busy agent under many parallel ADDs.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
}

/// What the agent needs to act on one CNI invocation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Request {
    pub command: Option<Command>,
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The network's name (`name` in the configuration).
    #[serde(default)]
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub valid_attachments: Vec<Attachment>,
}

/// The agent's answer: a result body (ADD: the CNI result without
/// `cniVersion`; other commands: null) or a CNI error.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Ok(Value),
    Error(CniError),
}

/// Send `req` to the agent at `socket`. An unreachable agent, a dropped
/// connection or a timeout is code 11 ("try again later"): the runtime
/// retries, and the agent has either done nothing or will finish the
/// request idempotently on retry.
pub fn call(socket: &Path, req: &Request) -> Result<Value, CniError> {
    let again = |what: &str, e: std::io::Error| {
        CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "membrane agent not reachable at {}: {what}",
                socket.display()
            ),
        )
        .details(e.to_string())
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| again("connect", e))?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| again("socket options", e))?;
    let mut line = serde_json::to_vec(req)
        .map_err(|e| CniError::new(ErrorCode::Io, "encoding the request").details(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| again("send", e))?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let n = reader
        .read_line(&mut answer)
        .map_err(|e| again("receive", e))?;
    if n == 0 {
        return Err(again(
            "receive",
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before an answer",
            ),
        ));
    }
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok(v)) => Ok(v),
        Ok(Response::Error(e)) => Err(e),
        Err(e) => Err(CniError::new(
            ErrorCode::Decode,
            "undecodable answer from the membrane agent",
        )
        .details(e.to_string())),
    }
}
