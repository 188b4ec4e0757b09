//! Local API endpoints of the eBPF service datapath (docs/local-api.md):
//! `GET /v1/services` and `POST /v1/services/backends`.

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::datapath::UpdateError;
use crate::state::AgentState;

/// Body of `POST /v1/services/backends`.
#[derive(Debug, Deserialize)]
struct UpdateRequest {
    backends: Vec<String>,
    state: String,
}

fn no_datapath() -> (StatusCode, Value) {
    (
        StatusCode::CONFLICT,
        json!({"error": "no service datapath is running (start with `membrane up --datapath ebpf`)"}),
    )
}

/// `GET /v1/services`.
pub fn list(state: &AgentState) -> (StatusCode, Value) {
    match &state.datapath {
        Some(dp) => (StatusCode::OK, dp.list_json()),
        None => no_datapath(),
    }
}

/// `POST /v1/services/backends`.
pub fn update_backends(state: &AgentState, body: &str) -> (StatusCode, Value) {
    let Some(dp) = &state.datapath else {
        return no_datapath();
    };
    let req: UpdateRequest = match serde_json::from_str(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": format!("expected {{\"backends\":[\"IP:PORT\",…],\"state\":\"active|quarantined|maintenance\"}}: {e}")}),
            );
        }
    };
    match dp.update_backends(&req.backends, &req.state) {
        Ok(v) => (StatusCode::OK, v),
        Err(UpdateError::Invalid(msg)) => (StatusCode::BAD_REQUEST, json!({"error": msg})),
        Err(e @ UpdateError::Datapath(_)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        ),
    }
}
