//! Restarting `membrane apiserver` (SIGTERM and SIGKILL) keeps every
//! applied object, and a watch from a resourceVersion before the restart
//! replays what came after it, or gets 410 Gone once compacted.

mod kubectl_support;

use kubectl_support::{ApiServer, json, repo};
use serde_json::Value;

fn events(body: &str) -> Vec<Value> {
    body.lines()
        .filter(|l| l.starts_with('{'))
        .map(json)
        .collect()
}

fn snapshot(s: &ApiServer) -> Value {
    let mut all = json(&s.ok(&[
        "get",
        "ingress,svc,endpointslices,ingressclass,cm",
        "-A",
        "-o",
        "json",
    ]));
    all["items"]
        .as_array_mut()
        .expect("items")
        .sort_by_key(|o| o["metadata"]["uid"].to_string());
    all
}

#[test]
fn restart_keeps_objects_and_watch_history() {
    let mut s = ApiServer::start(29151);
    s.ok(&[
        "apply",
        "-f",
        repo().join("examples/quickstart").to_str().expect("path"),
    ]);
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {v: \"0\"}\n",
    );
    let rv0 = json(&s.ok(&["get", "cm", "c", "-o", "json"]))["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    s.ok(&[
        "patch",
        "cm",
        "c",
        "--type=merge",
        "-p",
        r#"{"data":{"v":"1"}}"#,
    ]);
    let before = snapshot(&s);

    s.restart_term();
    assert_eq!(snapshot(&s), before, "objects after SIGTERM restart");

    s.ok(&[
        "patch",
        "cm",
        "c",
        "--type=merge",
        "-p",
        r#"{"data":{"v":"2"}}"#,
    ]);
    let before_kill = snapshot(&s);
    // SIGKILL right after an acknowledged write: it must still be there,
    // with everything else.
    s.restart_kill();
    let c = json(&s.ok(&["get", "cm", "c", "-o", "json"]));
    assert_eq!(c["data"]["v"], "2");
    assert_eq!(snapshot(&s), before_kill, "objects after SIGKILL restart");

    // A watch from before both restarts replays every change after it, in
    // order, with increasing resourceVersions.
    let (code, body) = s.http(
        "GET",
        &format!(
            "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv0}&timeoutSeconds=1"
        ),
        None,
    );
    assert_eq!(code, 200);
    let evs = events(&body);
    let values: Vec<&str> = evs
        .iter()
        .filter_map(|e| e["object"]["data"]["v"].as_str())
        .collect();
    assert_eq!(values, ["1", "2"], "{body}");
    let rvs: Vec<u64> = evs
        .iter()
        .filter_map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()?
                .parse()
                .ok()
        })
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");
    assert!(rvs[0] > rv0.parse::<u64>().expect("rv"));

    // New writes continue the same history (no resourceVersion reuse).
    let out = s.ok(&[
        "patch",
        "cm",
        "c",
        "--type=merge",
        "-p",
        r#"{"data":{"v":"3"}}"#,
        "-o",
        "json",
    ]);
    let rv3: u64 = json(&out)["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .parse()
        .expect("rv");
    assert!(rv3 > *rvs.last().expect("rvs"));
}

#[test]
fn a_watch_from_a_compacted_version_gets_gone() {
    let mut s = ApiServer::start_with(29152, &["--event-window", "8", "--bookmark-interval", "1"]);
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {v: \"0\"}\n",
    );
    let rv0 = json(&s.ok(&["get", "cm", "c", "-o", "json"]))["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    // Enough writes to compact past rv0 (compaction runs every 64 versions).
    for i in 0..70 {
        let body = format!(r#"{{"data":{{"v":"{i}"}}}}"#);
        let (code, _) = s.http(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            Some(("application/merge-patch+json", &body)),
        );
        assert_eq!(code, 200);
    }
    s.restart_kill();
    let (code, body) = s.http(
        "GET",
        &format!(
            "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv0}&timeoutSeconds=1"
        ),
        None,
    );
    assert_eq!(code, 200);
    let evs = events(&body);
    assert_eq!(evs.len(), 1, "{body}");
    assert_eq!(evs[0]["type"], "ERROR");
    assert_eq!(evs[0]["object"]["code"], 410);
    assert_eq!(evs[0]["object"]["reason"], "Expired");

    // A recent version still replays, and bookmarks carry the latest one.
    let (code, list) = s.http("GET", "/api/v1/namespaces/default/configmaps", None);
    assert_eq!(code, 200);
    let rv = json(&list)["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let (code, body) = s.http(
        "GET",
        &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=4&allowWatchBookmarks=true"),
        None,
    );
    assert_eq!(code, 200);
    let evs = events(&body);
    assert!(!evs.is_empty(), "no bookmark in {body}");
    for e in &evs {
        assert_eq!(e["type"], "BOOKMARK", "{body}");
        assert_eq!(e["object"]["metadata"]["resourceVersion"], rv.as_str());
    }
}
