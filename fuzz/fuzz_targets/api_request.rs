//! The local API's request handling (`membrane_agent::api::respond`): routing,
//! apply/delete bodies, the `get` query string, `services/backends` bodies,
//! against a fresh in-memory agent state per input.
//!
//! Input: up to 8 requests separated by lines `%%%`; each is a request line
//! `METHOD /path[?query]` followed by the body (corpus files are readable).
//!
//! Properties beyond "never panics": every answer is a JSON object, errors
//! carry an `"error"` string, nothing answers 500, and every object an apply
//! reports is then found by `GET /v1/objects/{kind}?namespace=..&name=..`,
//! and every object a delete reports is not.
#![no_main]

use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll, Waker};

use http_body_util::Full;
use hyper::body::{Body, Bytes};
use hyper::{Method, Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use membrane_agent::AgentState;
use membrane_agent::api::respond;
use membrane_store::Store;
use membrane_xds::SnapshotCache;
use serde_json::Value;

const MAX_REQUESTS: usize = 8;

/// Apply/delete bodies are parsed off the async workers (`spawn_blocking`),
/// so requests run on a runtime, one for the whole process.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
});

fn state() -> AgentState {
    let (_tx, envoy) = tokio::sync::watch::channel(Default::default());
    AgentState {
        store: Store::new(),
        cache: SnapshotCache::new(),
        node_id: "fuzz".into(),
        envoy,
        rejections: Mutex::new(Default::default()),
        warnings: Mutex::new(Default::default()),
        nacks_isolated: Default::default(),
        datapath: None,
        endpoints: None,
        policy: None,
    }
}

/// The whole body of a `Full`, which is always ready.
fn body_json(resp: Response<Full<Bytes>>) -> (StatusCode, Value) {
    let status = resp.status();
    let mut body = resp.into_body();
    let mut cx = Context::from_waker(Waker::noop());
    let mut bytes = Vec::new();
    while let Poll::Ready(Some(frame)) = std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
        if let Ok(data) = frame.expect("Full never fails").into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {bytes:?}"));
    (status, value)
}

fn send(state: &AgentState, method: &Method, target: &str, body: &str) -> (StatusCode, Value) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let resp = RUNTIME.block_on(respond(
        state,
        method,
        path,
        query,
        Bytes::copy_from_slice(body.as_bytes()),
    ));
    let (status, value) = body_json(resp);
    assert!(
        value.is_object(),
        "{method} {target}: not an object: {value}"
    );
    assert_ne!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{method} {target}: {value}"
    );
    if !status.is_success() {
        assert!(
            value["error"].is_string(),
            "{method} {target}: {status} without error: {value}"
        );
    }
    (status, value)
}

/// `GET /v1/objects/...` of one apply/delete result.
fn get_target(r: &Value) -> String {
    let (Some(kind), Some(ns), Some(name)) = (
        r["kind"].as_str(),
        r["namespace"].as_str(),
        r["name"].as_str(),
    ) else {
        panic!("malformed result {r}");
    };
    format!("/v1/objects/{kind}?namespace={ns}&name={name}")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let state = state();
    for request in text.split("\n%%%\n").take(MAX_REQUESTS) {
        let (line, body) = request.split_once('\n').unwrap_or((request, ""));
        let (method, target) = line.split_once(' ').unwrap_or((line, "/"));
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            continue;
        };
        let (status, value) = send(&state, &method, target, body);
        // What apply and delete report must agree with what `get` finds.
        let expect = match target {
            "/v1/apply" => StatusCode::OK,
            "/v1/delete" => StatusCode::NOT_FOUND,
            _ => continue,
        };
        if method != Method::POST || status != StatusCode::OK {
            continue;
        }
        for r in value["results"].as_array().expect("results") {
            let get = get_target(r);
            let (status, found) = send(&state, &Method::GET, &get, "");
            assert_eq!(
                status, expect,
                "{target} reported {r}, then GET {get}: {found}"
            );
        }
    }
});
