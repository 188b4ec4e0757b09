//! The ADS server against a real Envoy, over state-of-the-world and delta
//! xDS: initial sync, an update, EDS to a real backend, a NACK, switching
//! to a new cluster with removal of the old one, and a modified cluster that
//! must finish warming without waiting for Envoy's fetch timeout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use membrane_xds::{Protocol, Resource, Snapshot, SnapshotCache, type_url};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout};

const NODE: &str = "envoy-test";
const DEADLINE: Duration = Duration::from_secs(30);

fn find_envoy() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MEMBRANE_ENVOY") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    })
}

/// A port Envoy can bind later. Taken below the kernel's ephemeral range
/// (32768–60999 by default): a port the kernel handed out with port 0 can
/// go to another test's outgoing connection before Envoy binds it (seen in
/// CI: "Address already in use"). The start depends on the process and a
/// counter, so tests of this binary never pick the same port.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    let base = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = LOW + (base + step) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

fn res(v: serde_json::Value) -> Arc<Resource> {
    Arc::new(Resource::from_json(&v).unwrap())
}

fn listener(port: u16) -> Arc<Resource> {
    res(json!({
        "@type": type_url::LISTENER,
        "name": "l",
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
        "filterChains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": "l",
                "rds": {"routeConfigName": "r", "configSource": {"ads": {}, "resourceApiVersion": "V3"}},
                "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        }]}]
    }))
}

fn direct_route(body: &str) -> Arc<Resource> {
    res(json!({
        "@type": type_url::ROUTE,
        "name": "r",
        "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "directResponse": {"status": 200, "body": {"inlineString": body}}}
        ]}]
    }))
}

fn cluster_route(cluster: &str) -> Arc<Resource> {
    res(json!({
        "@type": type_url::ROUTE,
        "name": "r",
        "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}
        ]}]
    }))
}

fn bad_route() -> Arc<Resource> {
    // Envoy rejects duplicate domains across virtual hosts.
    res(json!({
        "@type": type_url::ROUTE,
        "name": "r",
        "virtualHosts": [
            {"name": "a", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "directResponse": {"status": 200}}]},
            {"name": "b", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "directResponse": {"status": 200}}]}
        ]
    }))
}

fn eds_cluster(name: &str) -> Arc<Resource> {
    eds_cluster_timeout(name, 1)
}

fn eds_cluster_timeout(name: &str, seconds: u32) -> Arc<Resource> {
    res(json!({
        "@type": type_url::CLUSTER,
        "name": name,
        "type": "EDS",
        "connectTimeout": format!("{seconds}s"),
        "edsClusterConfig": {"serviceName": name, "edsConfig": {"ads": {}, "resourceApiVersion": "V3"}}
    }))
}

fn cla(name: &str, port: u16) -> Arc<Resource> {
    res(json!({
        "@type": type_url::ENDPOINT,
        "clusterName": name,
        "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}}}}]}]
    }))
}

fn snap(rs: &[Arc<Resource>]) -> Snapshot {
    Snapshot::from_resources(rs.iter().cloned()).unwrap()
}

fn bootstrap(sock: &Path, api_type: &str, admin_port: u16) -> String {
    json!({
        "node": {"id": NODE, "cluster": "test"},
        "admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin_port}}},
        "dynamicResources": {
            "adsConfig": {"apiType": api_type, "transportApiVersion": "V3",
                "grpcServices": [{"envoyGrpc": {"clusterName": "xds"}}]},
            "cdsConfig": {"ads": {}, "resourceApiVersion": "V3"},
            "ldsConfig": {"ads": {}, "resourceApiVersion": "V3"}
        },
        "staticResources": {"clusters": [{
            "name": "xds",
            "type": "STATIC",
            "connectTimeout": "1s",
            "typedExtensionProtocolOptions": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicitHttpConfig": {"http2ProtocolOptions": {}}
                }
            },
            "loadAssignment": {"clusterName": "xds", "endpoints": [{"lbEndpoints": [{"endpoint": {
                "address": {"pipe": {"path": sock.display().to_string()}}
            }}]}]}
        }]}
    })
    .to_string()
}

/// A tiny HTTP backend answering every request with `body`.
async fn backend(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

async fn get(port: u16) -> Option<String> {
    get_path(port, "/").await
}

async fn get_path(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Polls until the listener answers with `want` (bounded).
async fn wait_body(port: u16, want: &str) {
    let start = Instant::now();
    loop {
        let got = get(port).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "listener never answered {want:?}, last: {got:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// Waits on the cache's event tick until `cond` holds.
async fn wait_for(cache: &SnapshotCache, what: &str, cond: impl Fn(&SnapshotCache) -> bool) {
    let mut rx = cache.subscribe();
    let r = timeout(DEADLINE, async {
        while !cond(cache) {
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "timed out waiting for {what}: {:#?}",
        cache.status()
    );
}

struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// One counter or gauge from Envoy's admin `/stats`.
async fn stat(admin_port: u16, name: &str) -> Option<u64> {
    let body = get_path(admin_port, &format!("/stats?filter=^{name}$")).await?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_envoy_follows_snapshots_sotw() {
    follows_snapshots("GRPC", Protocol::StateOfTheWorld).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_envoy_follows_snapshots_delta() {
    follows_snapshots("DELTA_GRPC", Protocol::Delta).await;
}

async fn follows_snapshots(api_type: &str, protocol: Protocol) {
    let Some(envoy_bin) = find_envoy() else {
        assert!(
            std::env::var("CI").is_err(),
            "envoy binary not found (set MEMBRANE_ENVOY or install .venv)"
        );
        eprintln!("SKIP: envoy binary not found");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xds.sock");
    let cache = SnapshotCache::new();
    let port = free_port();
    let admin_port = free_port();
    let be1 = backend("backend-one").await;
    let be2 = backend("backend-two").await;

    cache.set_snapshot(None, snap(&[listener(port), direct_route("v1")]));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let cache = cache.clone();
        let sock = sock.clone();
        async move {
            membrane_xds::serve_unix(&sock, cache, async {
                let _ = stopped.await;
            })
            .await
        }
    });

    let cfg = dir.path().join("bootstrap.json");
    std::fs::write(&cfg, bootstrap(&sock, api_type, admin_port)).unwrap();
    let _envoy = Envoy(
        Command::new(envoy_bin)
            .arg("-c")
            .arg(&cfg)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    );

    // 1. Initial sync: listener + route ACKed, and traffic flows.
    let route_v1 = direct_route("v1");
    wait_for(&cache, "initial RDS ACK", |c| c.is_acked(NODE, &route_v1)).await;
    assert!(cache.is_acked(NODE, &listener(port)));
    assert_eq!(cache.connected_nodes(), [NODE]);
    let streams = cache.status().streams;
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].protocol, protocol);
    wait_body(port, "v1").await;

    // 2. EDS: route to a cluster whose endpoints are a real backend.
    cache.set_snapshot(
        None,
        snap(&[
            listener(port),
            cluster_route("c1"),
            eds_cluster("c1"),
            cla("c1", be1),
        ]),
    );
    wait_body(port, "backend-one").await;

    // 3. Endpoints move: only EDS changes.
    cache.set_snapshot(
        None,
        snap(&[
            listener(port),
            cluster_route("c1"),
            eds_cluster("c1"),
            cla("c1", be2),
        ]),
    );
    wait_body(port, "backend-two").await;

    // 4. A bad route is NACKed; Envoy keeps serving the last good one.
    let bad = snap(&[
        listener(port),
        bad_route(),
        eds_cluster("c1"),
        cla("c1", be2),
    ]);
    let bad_version = bad.version(type_url::ROUTE);
    cache.set_snapshot(None, bad);
    wait_for(&cache, "RDS NACK", |c| {
        c.status().streams.iter().any(|s| {
            s.types.get(type_url::ROUTE).is_some_and(|t| {
                t.rejected
                    && t.last_nack
                        .as_ref()
                        .is_some_and(|n| n.version == bad_version && !n.error_detail.is_empty())
            })
        })
    })
    .await;
    // Removal of c1 waited for the routes, which were rejected: c1 stays.
    assert!(cache.acked_hash(NODE, type_url::CLUSTER, "c1").is_some());
    assert_eq!(get(port).await.as_deref(), Some("backend-two"));

    // 5. Switch to a new cluster c2 and drop c1: c1 goes only after the new
    //    routes are ACKed, and traffic never breaks.
    cache.set_snapshot(
        None,
        snap(&[
            listener(port),
            cluster_route("c2"),
            eds_cluster("c2"),
            cla("c2", be1),
        ]),
    );
    wait_body(port, "backend-one").await;
    wait_for(&cache, "c1 removed", |c| {
        c.acked_hash(NODE, type_url::CLUSTER, "c1").is_none()
            && c.acked_hash(NODE, type_url::CLUSTER, "c2").is_some()
    })
    .await;
    assert_eq!(get(port).await.as_deref(), Some("backend-one"));

    // 6. c2 is modified, its endpoints are not: Envoy re-warms c2 and must
    //    get its endpoints again, well before the 15 s initial_fetch_timeout.
    let c2_v2 = eds_cluster_timeout("c2", 2);
    let t0 = Instant::now();
    cache.set_snapshot(
        None,
        snap(&[
            listener(port),
            cluster_route("c2"),
            c2_v2.clone(),
            cla("c2", be1),
        ]),
    );
    // Envoy ACKs CDS once the warming clusters are initialized.
    wait_for(&cache, "modified c2 ACKed", |c| c.is_acked(NODE, &c2_v2)).await;
    loop {
        let warming = stat(admin_port, "cluster_manager.warming_clusters").await;
        if warming == Some(0) {
            break;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "c2 still warming: warming={warming:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "modified c2 took {:?} to warm: its endpoints were not sent again",
        t0.elapsed()
    );
    assert_eq!(get(port).await.as_deref(), Some("backend-one"));

    let _ = stop.send(());
    drop(_envoy);
    timeout(DEADLINE, server).await.unwrap().unwrap().unwrap();
}
