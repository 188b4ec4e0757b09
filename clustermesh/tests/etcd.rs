//! Cluster Mesh against a real etcd with mutual TLS on loopback.
//! Ports: 25100–25199 (this file).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::GetOptions;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use membrane_clustermesh::etcd::{ExportOptions, Exporter, ImportOptions, Mesh};
use membrane_clustermesh::export::cluster_services;
use membrane_clustermesh::{ClusterService, EtcdConfig, keys};
use serde_json::json;
use support::*;

/// A service exactly as Cilium's agent in cluster `cluster2` (id 2) writes it.
const CILIUM_REMOTE: &str = r#"{"cluster":"cluster2","namespace":"default","name":"echo","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.245.1.2":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":2}"#;
const CILIUM_CONFIG: &str =
    r#"{"id":2,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}"#;
const REMOTE_KEY: &str = "cilium/state/services/v1/cluster2/default/echo";

fn import_opts(cache_ttl: Option<Duration>) -> ImportOptions {
    ImportOptions {
        local_name: "cluster1".into(),
        local_id: 1,
        cache_ttl,
        dir_poll: Duration::from_millis(50),
    }
}

/// Plays Cilium's agent in cluster2: config, one service, the canary.
async fn write_as_cilium(c: &mut etcd_client::Client) {
    c.put(keys::cluster_config_key("cluster2"), CILIUM_CONFIG, None)
        .await
        .unwrap();
    c.put(REMOTE_KEY, CILIUM_REMOTE, None).await.unwrap();
    c.put(
        keys::services_synced_key("cluster2"),
        "2026-12-01T18:00:00Z",
        None,
    )
    .await
    .unwrap();
}

fn mesh_dir(cfg: &EtcdConfig) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("cluster2"), cfg.to_yaml()).unwrap();
    d
}

fn backends(store: &membrane_clustermesh::etcd::RemoteStore) -> Vec<String> {
    store
        .services()
        .iter()
        .flat_map(|s| s.backends.keys().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_what_ciliums_agent_writes_and_follows_changes() {
    if !etcd_available() {
        return;
    }
    let pki = Pki::new();
    let etcd = Etcd::start(&pki, 25101, 25102);
    let mut c = client(&pki, &etcd).await;
    write_as_cilium(&mut c).await;

    let dir = mesh_dir(&pki.client_config(&etcd));
    // This cluster's own file in the same directory is skipped.
    std::fs::write(
        dir.path().join("cluster1"),
        pki.client_config(&etcd).to_yaml(),
    )
    .unwrap();
    let mesh = Mesh::start(dir.path(), import_opts(None));
    let missing = mesh
        .wait_synced(&["cluster2".to_string()], Duration::from_secs(20))
        .await;
    assert!(
        missing.is_empty(),
        "not synced: {missing:?} {:?}",
        mesh.store().status()
    );
    let got = mesh.store().services();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to_json(), CILIUM_REMOTE);
    let st = &mesh.store().status()["cluster2"];
    assert!(st.connected && st.synced && st.cluster_id == 2, "{st:?}");
    assert_eq!(
        mesh.store().status().len(),
        1,
        "own cluster file must be skipped"
    );

    // A new backend appears.
    let two = CILIUM_REMOTE.replace(
        r#""backends":{"#,
        r#""backends":{"10.245.1.3":{"http":{"Protocol":"TCP","Port":8080}},"#,
    );
    c.put(REMOTE_KEY, two, None).await.unwrap();
    let store = mesh.store().clone();
    eventually(10, "second backend", || backends(&store).len() == 2).await;

    // A value whose content does not match its key is refused.
    c.put(
        "cilium/state/services/v1/cluster2/default/other",
        CILIUM_REMOTE,
        None,
    )
    .await
    .unwrap();
    // A valid one after it proves the bad one was processed (and ignored).
    let third = CILIUM_REMOTE.replace("\"name\":\"echo\"", "\"name\":\"third\"");
    c.put(
        "cilium/state/services/v1/cluster2/default/third",
        third,
        None,
    )
    .await
    .unwrap();
    eventually(10, "third service", || store.services().len() == 2).await;
    let names: Vec<String> = store.services().iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["echo", "third"]);

    // Deleted remotely: gone locally.
    c.delete(REMOTE_KEY, None).await.unwrap();
    eventually(10, "echo deleted", || store.services().len() == 1).await;

    // Removing the cluster's file disconnects and drains it.
    std::fs::remove_file(dir.path().join("cluster2")).unwrap();
    eventually(10, "drained", || {
        store.services().is_empty() && store.status().is_empty()
    })
    .await;
    // Adding it back connects again.
    std::fs::write(
        dir.path().join("cluster2"),
        pki.client_config(&etcd).to_yaml(),
    )
    .unwrap();
    eventually(10, "reconnected", || store.services().len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_wrong_cluster_config_and_foreign_client_certs() {
    if !etcd_available() {
        return;
    }
    let pki = Pki::new();
    let etcd = Etcd::start(&pki, 25111, 25112);
    let mut c = client(&pki, &etcd).await;

    // Mutual TLS: a client certificate from another CA is refused.
    let mut rogue = pki.client_config(&etcd);
    rogue.cert_file = Some(pki.rogue_cert.clone());
    rogue.key_file = Some(pki.rogue_key.clone());
    let refused = match membrane_clustermesh::etcd::connect("cluster2", &rogue).await {
        Err(_) => true,
        Ok(mut rc) => rc.get("probe", None).await.is_err(),
    };
    assert!(refused, "etcd accepted a foreign client certificate");

    // The remote claims our own cluster id: nothing is imported.
    c.put(
        keys::cluster_config_key("cluster2"),
        r#"{"id":1,"capabilities":{}}"#,
        None,
    )
    .await
    .unwrap();
    c.put(REMOTE_KEY, CILIUM_REMOTE, None).await.unwrap();
    let dir = mesh_dir(&pki.client_config(&etcd));
    let mesh = Mesh::start(dir.path(), import_opts(None));
    let store = mesh.store().clone();
    eventually(10, "error reported", || {
        store
            .status()
            .get("cluster2")
            .and_then(|s| s.last_error.clone())
            .is_some_and(|e| e.contains("this cluster's own id"))
    })
    .await;
    assert!(store.services().is_empty());
    // The initial sync never completes: waiting is bounded by the timeout.
    let missing = mesh
        .wait_synced(&["cluster2".to_string()], Duration::from_millis(300))
        .await;
    assert_eq!(missing, ["cluster2"]);

    // Fixed remotely: the retry loop picks it up.
    c.put(keys::cluster_config_key("cluster2"), CILIUM_CONFIG, None)
        .await
        .unwrap();
    eventually(15, "imported after fix", || store.services().len() == 1).await;
}

fn global_echo() -> (Service, EndpointSlice) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "echo", "namespace": "default",
                     "annotations": {"service.cilium.io/global": "true"}},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "echo"},
                 "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "echo-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.244.1.2"]}]
    }))
    .unwrap();
    (svc, slice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_ciliums_json_under_a_lease_that_expires_with_the_cluster() {
    if !etcd_available() {
        return;
    }
    let pki = Pki::new();
    let etcd = Etcd::start(&pki, 25121, 25122);
    let mut c = client(&pki, &etcd).await;

    let (svc, slice) = global_echo();
    let services = cluster_services(&[svc], &[slice], "cluster1", 1);
    let opts = ExportOptions {
        // Short, but with room for a loaded machine: keep-alives go every
        // TTL/3.
        lease_ttl: Duration::from_secs(5),
        heartbeat: Duration::from_millis(500),
    };
    let mut ex = Exporter::start(c.clone(), "cluster1", 1, opts)
        .await
        .unwrap();
    // Not synced before the first complete export.
    let canary = keys::services_synced_key("cluster1");
    assert!(c.get(canary.as_str(), None).await.unwrap().kvs().is_empty());
    let st = ex.sync(&services).await.unwrap();
    assert_eq!((st.put, st.deleted), (1, 0));

    // Read back exactly as Cilium's agent would, and parse as it would.
    let key = "cilium/state/services/v1/cluster1/default/echo";
    let r = c.get(key, None).await.unwrap();
    let kv = &r.kvs()[0];
    let expected = r#"{"cluster":"cluster1","namespace":"default","name":"echo","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.2":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":1}"#;
    assert_eq!(kv.value_str().unwrap(), expected);
    assert_ne!(kv.lease(), 0, "service key must live under the lease");
    assert!(ClusterService::from_kv(key, kv.value(), "cluster1", 1).is_ok());
    let cfg = c
        .get(keys::cluster_config_key("cluster1"), None)
        .await
        .unwrap();
    assert_eq!(
        cfg.kvs()[0].value_str().unwrap(),
        r#"{"id":1,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}"#
    );
    let canary_v = c.get(canary.as_str(), None).await.unwrap();
    assert!(canary_v.kvs()[0].value_str().unwrap().ends_with('Z'));
    let hb = c.get(keys::HEARTBEAT, None).await.unwrap();
    assert_eq!(hb.kvs().len(), 1);

    // Unchanged: nothing rewritten. Removed: deleted.
    assert_eq!(ex.sync(&services).await.unwrap().put, 0);
    let st = ex.sync(&BTreeMap::new()).await.unwrap();
    assert_eq!(st.deleted, 1);
    assert!(c.get(key, None).await.unwrap().kvs().is_empty());
    ex.sync(&services).await.unwrap();

    // The lease is kept alive past its TTL while the exporter lives...
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(c.get(key, None).await.unwrap().kvs().len(), 1);
    // ...and every key expires once the cluster is gone.
    drop(ex);
    let mut gone = false;
    for _ in 0..150 {
        let r = c
            .get("cilium/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        if r.kvs().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "keys of a dead cluster did not expire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_etcd_down_keeps_backends_and_return_resyncs_without_duplicates() {
    if !etcd_available() {
        return;
    }
    let pki = Pki::new();
    let mut etcd = Etcd::start(&pki, 25131, 25132);
    let mut c = client(&pki, &etcd).await;
    write_as_cilium(&mut c).await;
    let dir = mesh_dir(&pki.client_config(&etcd));
    let mesh = Mesh::start(dir.path(), import_opts(None));
    let store = mesh.store().clone();
    eventually(20, "synced", || store.services().len() == 1).await;

    etcd.kill();
    eventually(20, "disconnect noticed", || {
        store.status().get("cluster2").is_some_and(|s| !s.connected)
    })
    .await;
    // Cilium's default: the last known backends stay.
    assert_eq!(backends(&store), ["10.245.1.2"]);

    etcd.restart();
    let mut c = client(&pki, &etcd).await;
    // While it was away, the remote changed its backends.
    let moved = CILIUM_REMOTE.replace("10.245.1.2", "10.245.1.7");
    c.put(REMOTE_KEY, moved, None).await.unwrap();
    eventually(30, "resynced", || {
        store.status().get("cluster2").is_some_and(|s| s.connected)
            && backends(&store) == ["10.245.1.7"]
    })
    .await;
    assert_eq!(store.services().len(), 1, "no duplicates after resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_ttl_drops_a_dead_clusters_backends() {
    if !etcd_available() {
        return;
    }
    let pki = Pki::new();
    let mut etcd = Etcd::start(&pki, 25141, 25142);
    let mut c = client(&pki, &etcd).await;
    write_as_cilium(&mut c).await;
    let dir = mesh_dir(&pki.client_config(&etcd));
    let mesh = Mesh::start(dir.path(), import_opts(Some(Duration::from_millis(500))));
    let store = mesh.store().clone();
    eventually(20, "synced", || store.services().len() == 1).await;
    etcd.kill();
    eventually(20, "dropped after cache ttl", || {
        store.services().is_empty()
    })
    .await;
}
