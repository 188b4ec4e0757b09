//! Issue 9: with many Ingresses, every address must follow Envoy's final ACK
//! promptly. The ACK → status path once lost a wake-up and left the last
//! Ingresses without an address until an unrelated event (Envoy's 15 s
//! initial-fetch timeout, or nothing at all).

mod common;

use std::time::{Duration, Instant};

use common::{Membrane, wait_until};
use serde_json::{Value, json};

const INGRESSES: usize = 100;
const PATHS: usize = 10;
const NS: &str = "many";

/// An address is due within this long after Envoy ACKed everything; the bug
/// showed 15 s to several minutes.
const BOUND: Duration = Duration::from_secs(3);

fn manifests() -> String {
    let mut docs = vec![json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "IngressClass",
        "metadata": {"name": "cilium"},
        "spec": {"controller": "cilium.io/ingress-controller"},
    })];
    docs.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}));
    for s in 0..INGRESSES {
        let name = format!("svc-{s}");
        docs.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"ports": [{"port": 80, "targetPort": 3000}]},
        }));
        docs.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": NS,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"port": 3000}],
            "endpoints": [{"addresses": [format!("10.1.{}.{}", s / 250, s % 250 + 1)],
                           "conditions": {"ready": true}}],
        }));
    }
    for i in 0..INGRESSES {
        let paths: Vec<Value> = (0..PATHS)
            .map(|j| {
                json!({"path": format!("/i{i}/r{j}"), "pathType": "Prefix",
                       "backend": {"service": {"name": format!("svc-{}", (i + j) % INGRESSES),
                                               "port": {"number": 80}}}})
            })
            .collect();
        docs.push(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": format!("ing-{i}"), "namespace": NS},
            "spec": {"ingressClassName": "cilium", "rules": [{"http": {"paths": paths}}]},
        }));
    }
    docs.iter()
        .map(|d| serde_json::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Every xDS type of every stream answered: nothing pending, the latest
/// response ACKed, and at least one listener per Ingress sent.
fn all_acked(status: &Value) -> bool {
    let Some(streams) = status["xds"]["streams"].as_array() else {
        return false;
    };
    let Some(stream) = streams.last() else {
        return false;
    };
    let Some(types) = stream["types"].as_object() else {
        return false;
    };
    let listeners = types
        .iter()
        .find(|(t, _)| t.ends_with("Listener"))
        .map(|(_, s)| s["acked_resources"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    listeners >= INGRESSES as u64
        && types.values().all(|t| {
            t["pending"] == false
                && t["rejected"] == false
                && t["sent_version"].is_string()
                && t["sent_version"] == t["acked_version"]
        })
}

fn addressed(m: &Membrane) -> usize {
    let Ok((0, out)) = m.cli(&["get", "ingress", "-n", NS, "-o", "json"]) else {
        return 0;
    };
    let Ok(v) = serde_json::from_str::<Value>(&out) else {
        return 0;
    };
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i.pointer("/status/loadBalancer/ingress/0/ip").is_some())
        .count()
}

#[test]
fn every_address_follows_the_final_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests_dir = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests_dir).expect("mkdir");
    std::fs::write(manifests_dir.join("many.yaml"), manifests()).expect("write");
    let m = Membrane::start_on(dir, &manifests_dir, "127.1.0.0/16", 18180, 18543, &[]);

    let started = Instant::now();
    let acked = wait_until(Duration::from_secs(120), || all_acked(&m.status()));
    assert!(acked, "Envoy never ACKed everything:\n{}", m.log());
    let acked_at = Instant::now();
    eprintln!("everything ACKed after {:?}", acked_at - started);

    let mut count = 0;
    let done = wait_until(BOUND, || {
        count = addressed(&m);
        count == INGRESSES
    });
    eprintln!(
        "{count}/{INGRESSES} Ingresses addressed {:?} after the final ACK",
        acked_at.elapsed()
    );
    assert!(
        done,
        "only {count} of {INGRESSES} Ingresses have an address {BOUND:?} after Envoy ACKed everything"
    );
}
