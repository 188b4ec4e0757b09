//! Two agents' Cluster Mesh runtimes against two real etcds (mutual TLS,
//! loopback): export, import, merge into the service model with affinity.
//! Also measures how long a remote endpoint change takes to reach the
//! other cluster's merged model. Ports: 25150–25169 (this file).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use membrane_clustermesh::agent::merge_into;
use membrane_clustermesh::{MeshConfig, MeshRuntime};
use membrane_lb::service::{BackendOverrides, LbConfig, translate};
use serde_json::json;
use support::*;

fn echo(cluster: u32, affinity: &str, pods: &[u32]) -> (Service, EndpointSlice) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "echo", "namespace": "default",
                     "annotations": {"service.cilium.io/global": "true",
                                     "service.cilium.io/affinity": affinity}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "tcp", "port": 80}]}
    }))
    .unwrap();
    let eps: Vec<serde_json::Value> = pods
        .iter()
        .map(|i| json!({"addresses": [format!("10.{cluster}.0.{i}")]}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("echo-c{cluster}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": 8080}],
        "endpoints": eps
    }))
    .unwrap();
    (svc, slice)
}

fn runtime(
    dir: &std::path::Path,
    pki: &Pki,
    own: &Etcd,
    other: &Etcd,
    name: &str,
    id: u32,
    other_name: &str,
) -> MeshRuntime {
    let own_cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&own_cfg, pki.client_config(own).to_yaml()).unwrap();
    let mesh_dir = dir.join(format!("{name}-mesh"));
    std::fs::create_dir_all(&mesh_dir).unwrap();
    std::fs::write(
        mesh_dir.join(other_name),
        pki.client_config(other).to_yaml(),
    )
    .unwrap();
    let mut cfg = MeshConfig::new(name, id);
    cfg.kvstore_config = Some(own_cfg);
    cfg.mesh_dir = Some(mesh_dir);
    cfg.sync_timeout = Duration::from_secs(20);
    MeshRuntime::start(cfg)
}

/// Selected backends of the merged model of `local`'s service.
fn selected(local: &(Service, EndpointSlice), remote: &MeshRuntime) -> Vec<(String, u32)> {
    let (svc, slice) = local;
    let mut t = translate(
        std::slice::from_ref(svc),
        std::slice::from_ref(slice),
        &LbConfig::default(),
        &BackendOverrides::new(),
    );
    merge_into(
        &mut t.state,
        std::slice::from_ref(svc),
        &remote.remote_services(),
    );
    let e = &t.state.services[0];
    e.selectable()
        .iter()
        .map(|b| (b.addr.addr.to_string(), b.cluster_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runtimes_share_a_global_service() {
    if !etcd_available() {
        return;
    }
    let pki = Pki::new();
    let e1 = Etcd::start(&pki, 25151, 25152);
    let e2 = Etcd::start(&pki, 25153, 25154);
    // Both ready before the agents start.
    client(&pki, &e1).await;
    client(&pki, &e2).await;
    let dir = tempfile::tempdir().unwrap();
    let r1 = runtime(dir.path(), &pki, &e1, &e2, "cluster1", 1, "cluster2");
    let r2 = runtime(dir.path(), &pki, &e2, &e1, "cluster2", 2, "cluster1");

    let c1 = echo(1, "local", &[1, 2]);
    let c2 = echo(2, "none", &[1, 2]);
    // Each exports before waiting, so neither waits for the other's canary.
    r1.export(std::slice::from_ref(&c1.0), std::slice::from_ref(&c1.1));
    r2.export(std::slice::from_ref(&c2.0), std::slice::from_ref(&c2.1));
    let (m1, m2) = tokio::join!(r1.wait_initial_sync(), r2.wait_initial_sync());
    assert!(m1.is_empty() && m2.is_empty(), "{m1:?} {m2:?}");

    // cluster2 (affinity none) balances over all four; cluster1 (local)
    // over its own two.
    let all = selected(&c2, &r2);
    assert_eq!(
        all,
        [
            ("10.1.0.1".to_string(), 1),
            ("10.1.0.2".to_string(), 1),
            ("10.2.0.1".to_string(), 0),
            ("10.2.0.2".to_string(), 0)
        ]
    );
    let local: Vec<u32> = selected(&c1, &r1).iter().map(|b| b.1).collect();
    assert_eq!(local, [0, 0]);

    // cluster1 loses its endpoints: it fails over to cluster2's.
    let empty = echo(1, "local", &[]);
    r1.export(
        std::slice::from_ref(&empty.0),
        std::slice::from_ref(&empty.1),
    );
    assert_eq!(
        selected(&empty, &r1),
        [("10.2.0.1".to_string(), 2), ("10.2.0.2".to_string(), 2)]
    );
    let store = r2.remote_store().unwrap().clone();
    eventually(10, "cluster1's empty export reaches cluster2", || {
        store
            .services()
            .first()
            .is_some_and(|s| s.backends.is_empty())
    })
    .await;

    // Latency: cluster2 changes an endpoint, cluster1's merged model sees it.
    let mut lat = Vec::new();
    let mut rx = r1.subscribe();
    for i in 0..50u32 {
        let pods: Vec<u32> = if i % 2 == 0 { vec![1] } else { vec![1, 2] };
        let want = pods.len();
        let c = echo(2, "none", &pods);
        let t0 = Instant::now();
        r2.export(std::slice::from_ref(&c.0), std::slice::from_ref(&c.1));
        loop {
            let n = r1
                .remote_services()
                .first()
                .map(|s| s.backends.len())
                .unwrap_or(0);
            if n == want {
                break;
            }
            tokio::time::timeout(Duration::from_secs(10), rx.changed())
                .await
                .expect("remote change within 10 s")
                .expect("runtime alive");
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "remote endpoint change -> local merged model: p50 {:?} p99 {:?} max {:?} (n={})",
        p(0.5),
        p(0.99),
        lat[lat.len() - 1],
        lat.len()
    );
}

/// Export cost with 1,000 global services: the first full export, a no-op
/// re-sync, and one changed service (numbers printed for docs/benchmarks.md;
/// the assertions only check what was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_cost_with_1000_global_services() {
    use membrane_clustermesh::etcd::{ExportOptions, Exporter};
    use membrane_clustermesh::export::cluster_services;
    if !etcd_available() {
        return;
    }
    let pki = Pki::new();
    let e = Etcd::start(&pki, 25155, 25156);
    let c = client(&pki, &e).await;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..1000u32 {
        let (mut s, mut sl) = echo(1, "none", &[1, 2, 3]);
        s.metadata.name = Some(format!("svc-{i}"));
        sl.metadata.name = Some(format!("svc-{i}-1"));
        sl.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("kubernetes.io/service-name".into(), format!("svc-{i}"));
        services.push(s);
        slices.push(sl);
    }
    let t0 = Instant::now();
    let want = cluster_services(&services, &slices, "cluster1", 1);
    let build = t0.elapsed();
    assert_eq!(want.len(), 1000);
    let mut ex = Exporter::start(c.clone(), "cluster1", 1, ExportOptions::default())
        .await
        .unwrap();
    let t0 = Instant::now();
    let st = ex.sync(&want).await.unwrap();
    let first = t0.elapsed();
    assert_eq!(st.put, 1000);
    let t0 = Instant::now();
    assert_eq!(ex.sync(&want).await.unwrap().put, 0);
    let noop = t0.elapsed();
    let mut changed = want.clone();
    if let Some(s) = changed.values_mut().next() {
        s.backends.clear();
    }
    let t0 = Instant::now();
    assert_eq!(ex.sync(&changed).await.unwrap().put, 1);
    let one = t0.elapsed();
    eprintln!(
        "export 1000 global services: build {build:?}, first export {first:?}, no-op re-sync {noop:?}, one change {one:?}"
    );
}

/// An etcd restart ends the export lease's keep-alive: the agent takes a new
/// lease and rewrites its keys (otherwise they would expire with the old one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_moves_to_a_new_lease_after_an_etcd_restart() {
    if !etcd_available() {
        return;
    }
    let pki = Pki::new();
    let mut e = Etcd::start(&pki, 25157, 25158);
    let mut c = client(&pki, &e).await;
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("own.yaml");
    std::fs::write(&own, pki.client_config(&e).to_yaml()).unwrap();
    let mut cfg = MeshConfig::new("cluster1", 1);
    cfg.kvstore_config = Some(own);
    let r = MeshRuntime::start(cfg);
    let svc = echo(1, "none", &[1]);
    r.export(std::slice::from_ref(&svc.0), std::slice::from_ref(&svc.1));
    let key = "cilium/state/services/v1/cluster1/default/echo";
    let mut first = 0;
    for _ in 0..100 {
        if let Some(kv) = c.get(key, None).await.unwrap().kvs().first() {
            first = kv.lease();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(first, 0, "service never exported");

    e.kill();
    e.restart();
    c = client(&pki, &e).await;
    let mut moved = false;
    for _ in 0..200 {
        if let Some(kv) = c
            .get(key, None)
            .await
            .ok()
            .and_then(|r| r.kvs().first().cloned())
            && kv.lease() != first
            && kv.lease() != 0
        {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        moved,
        "export still on the old lease after the etcd restart"
    );
    drop(r);
}
