//! Drives the ADS server (state of the world) over a unix socket with a
//! scripted gRPC client.

mod common;

use common::{NODE, PROBE, STEP, Server, cla, cluster, listener, route, snap, type_status};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use membrane_xds::{Snapshot, codec, type_url};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

async fn client(srv: &Server) -> Client {
    Client::open(srv.channel().await).await
}

struct Client {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
    probes: u32,
    first: bool,
}

impl Client {
    async fn open(ch: Channel) -> Self {
        let mut grpc = AggregatedDiscoveryServiceClient::new(ch);
        let (tx, rx) = mpsc::channel(16);
        let resp = timeout(
            STEP,
            grpc.stream_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await
        .unwrap()
        .unwrap();
        Self {
            tx,
            rx: resp.into_inner(),
            probes: 0,
            first: true,
        }
    }

    async fn send(&mut self, mut req: DiscoveryRequest) {
        // Like Envoy: the node only on the first request of the stream.
        if self.first {
            req.node = Some(Node {
                id: NODE.into(),
                ..Default::default()
            });
            self.first = false;
        }
        self.tx.send(req).await.unwrap();
    }

    async fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&mut self, r: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&mut self, r: &DiscoveryResponse, names: &[&str], msg: &str) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            version_info: String::new(),
            response_nonce: r.nonce.clone(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: msg.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        timeout(STEP, self.rx.message())
            .await
            .expect("timed out waiting for a response")
            .unwrap()
            .expect("stream ended")
    }

    /// Proves nothing else is queued: requests are handled in order, so if
    /// the answer to a fresh probe subscription is the next message, the
    /// server had nothing to send before it.
    async fn expect_nothing_pending(&mut self) {
        self.probes += 1;
        let probe = format!("{PROBE}{}", self.probes);
        self.subscribe(&probe, &["*"]).await;
        let r = self.recv().await;
        assert_eq!(
            r.type_url,
            probe,
            "unexpected response {} with {:?}",
            r.type_url,
            names(&r)
        );
    }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| codec::resource_name(a).unwrap())
        .collect()
}

#[tokio::test]
async fn initial_cds_gets_all_clusters_and_ack_is_not_answered() {
    let srv = Server::start().await;
    let s = snap(&[cluster("a", 1), cluster("b", 1), cla("a", 80)]);
    let version = s.version(type_url::CLUSTER);
    srv.cache.set_snapshot(None, s);
    let mut events = srv.cache.subscribe();
    let mut c = client(&srv).await;

    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, type_url::CLUSTER);
    assert_eq!(names(&r), ["a", "b"]);
    assert_eq!(r.version_info, version);
    assert!(!r.nonce.is_empty());
    assert_eq!(
        type_status(&srv.cache, type_url::CLUSTER).acked_version,
        None
    );

    c.ack(&r, &[]).await;
    c.expect_nothing_pending().await;
    let ts = type_status(&srv.cache, type_url::CLUSTER);
    assert_eq!(ts.acked_version.as_deref(), Some(version.as_str()));
    assert_eq!(ts.acked_resources, 2);
    assert!(!ts.pending);
    assert_eq!(
        srv.cache.acked_hash(NODE, type_url::CLUSTER, "a"),
        Some(cluster("a", 1).hash)
    );
    assert_eq!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "zz"), None);
    assert_eq!(srv.cache.connected_nodes(), [NODE]);
    assert!(events.has_changed().unwrap(), "ACK must tick subscribers");
    events.mark_unchanged();

    // Disconnect is observed: the stream disappears from the status.
    drop(c);
    timeout(STEP, async {
        while !srv.cache.connected_nodes().is_empty() {
            events.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "a"), None);
    srv.stop().await;
}

#[tokio::test]
async fn nack_is_recorded_and_not_resent() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(None, snap(&[cluster("a", 1)]));
    let mut c = client(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    c.nack(&r, &[], "cluster 'a': bad config").await;
    c.expect_nothing_pending().await;

    let ts = type_status(&srv.cache, type_url::CLUSTER);
    let nack = ts.last_nack.expect("nack recorded");
    assert_eq!(nack.error_detail, "cluster 'a': bad config");
    assert_eq!(nack.nonce, r.nonce);
    assert_eq!(nack.version, r.version_info);
    assert!(nack.at > 0);
    assert!(ts.rejected);
    assert_eq!(ts.acked_version, None);
    assert_eq!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "a"), None);

    // A fixed snapshot is pushed and its ACK clears the rejection.
    srv.cache.set_snapshot(None, snap(&[cluster("a", 2)]));
    let r2 = c.recv().await;
    assert_eq!(r2.type_url, type_url::CLUSTER);
    assert_ne!(r2.version_info, r.version_info);
    c.ack(&r2, &[]).await;
    c.expect_nothing_pending().await;
    let ts = type_status(&srv.cache, type_url::CLUSTER);
    assert!(!ts.rejected);
    assert_eq!(ts.acked_version, Some(r2.version_info.clone()));
    assert_eq!(
        srv.cache.acked_hash(NODE, type_url::CLUSTER, "a"),
        Some(cluster("a", 2).hash)
    );
    srv.stop().await;
}

#[tokio::test]
async fn update_sends_only_changed_types_clusters_before_listeners() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(
        None,
        snap(&[cluster("a", 1), listener("l", "r"), route("r", "a")]),
    );
    let mut c = client(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    c.subscribe(type_url::LISTENER, &[]).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, type_url::LISTENER);
    c.ack(&r, &[]).await;
    c.expect_nothing_pending().await;

    // Same clusters, new listener: only LDS goes out.
    srv.cache.set_snapshot(
        None,
        snap(&[cluster("a", 1), listener("l", "r2"), route("r", "a")]),
    );
    let r = c.recv().await;
    assert_eq!(r.type_url, type_url::LISTENER);
    c.ack(&r, &[]).await;
    c.expect_nothing_pending().await;

    // Both change: CDS first, LDS only once CDS was ACKed.
    srv.cache.set_snapshot(
        None,
        snap(&[cluster("a", 5), listener("l", "r3"), route("r", "a")]),
    );
    let cds = c.recv().await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    c.expect_nothing_pending().await;
    c.ack(&cds, &[]).await;
    let lds = c.recv().await;
    assert_eq!(lds.type_url, type_url::LISTENER);
    c.ack(&lds, &[]).await;
    c.expect_nothing_pending().await;

    // Identical snapshot: nothing at all.
    srv.cache.set_snapshot(
        None,
        snap(&[cluster("a", 5), listener("l", "r3"), route("r", "a")]),
    );
    c.expect_nothing_pending().await;
    srv.stop().await;
}

#[tokio::test]
async fn changed_cluster_gets_endpoints_again() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(
        None,
        snap(&[cluster("a", 1), cluster("b", 1), cla("a", 1), cla("b", 1)]),
    );
    let mut c = client(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let cds = c.recv().await;
    c.subscribe(type_url::ENDPOINT, &["a", "b"]).await;
    let eds = c.recv().await;
    assert_eq!(eds.type_url, type_url::ENDPOINT);
    c.ack(&cds, &[]).await;
    c.ack(&eds, &["a", "b"]).await;
    c.expect_nothing_pending().await;

    // Only the cluster changes; Envoy re-warms it and needs EDS again.
    srv.cache.set_snapshot(
        None,
        snap(&[cluster("a", 9), cluster("b", 1), cla("a", 1), cla("b", 1)]),
    );
    let cds = c.recv().await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    let eds2 = c.recv().await;
    assert_eq!(eds2.type_url, type_url::ENDPOINT);
    assert_eq!(eds2.version_info, eds.version_info);
    assert_eq!(names(&eds2), ["a", "b"]);
    c.ack(&cds, &[]).await;
    c.ack(&eds2, &["a", "b"]).await;
    c.expect_nothing_pending().await;
    srv.stop().await;
}

#[tokio::test]
async fn eds_and_rds_send_only_requested_names() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(
        None,
        snap(&[
            cla("x", 1),
            cla("y", 1),
            cla("z", 1),
            route("r1", "x"),
            route("r2", "y"),
        ]),
    );
    let mut c = client(&srv).await;
    c.subscribe(type_url::ENDPOINT, &["x"]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["x"]);
    // ACK carrying a larger subscription gets the added name.
    c.ack(&r, &["x", "y"]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["x", "y"]);
    // A name that does not exist yet: nothing to send.
    c.ack(&r, &["x", "y", "w"]).await;
    c.expect_nothing_pending().await;
    // Once it exists, it is sent.
    srv.cache.set_snapshot(
        None,
        snap(&[
            cla("x", 1),
            cla("y", 1),
            cla("z", 1),
            cla("w", 1),
            route("r1", "x"),
            route("r2", "y"),
        ]),
    );
    let r = c.recv().await;
    assert_eq!(names(&r), ["w", "x", "y"]);
    c.ack(&r, &["x", "y", "w"]).await;

    c.subscribe(type_url::ROUTE, &["r2"]).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, type_url::ROUTE);
    assert_eq!(names(&r), ["r2"]);
    c.ack(&r, &["r2"]).await;
    // A change to an unsubscribed route is not pushed.
    srv.cache.set_snapshot(
        None,
        snap(&[
            cla("x", 1),
            cla("y", 1),
            cla("z", 1),
            cla("w", 1),
            route("r1", "z"),
            route("r2", "y"),
        ]),
    );
    c.expect_nothing_pending().await;
    srv.stop().await;
}

#[tokio::test]
async fn removed_clusters_are_dropped_after_listeners_and_routes_are_acked() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(
        None,
        snap(&[
            cluster("a", 1),
            cluster("b", 1),
            cla("a", 1),
            cla("b", 1),
            listener("l", "r"),
            route("r", "b"),
        ]),
    );
    let mut c = client(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    c.subscribe(type_url::ENDPOINT, &["a", "b"]).await;
    let r = c.recv().await;
    c.ack(&r, &["a", "b"]).await;
    c.subscribe(type_url::LISTENER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    c.subscribe(type_url::ROUTE, &["r"]).await;
    let r = c.recv().await;
    c.ack(&r, &["r"]).await;
    c.expect_nothing_pending().await;

    // "b" goes away, "a" changes, the route moves from b to a.
    srv.cache.set_snapshot(
        None,
        snap(&[
            cluster("a", 2),
            cla("a", 2),
            listener("l", "r"),
            route("r", "a"),
        ]),
    );
    // Phase 1: CDS with the new "a" and the old "b" still present.
    let cds1 = c.recv().await;
    assert_eq!(cds1.type_url, type_url::CLUSTER);
    assert_eq!(names(&cds1), ["a", "b"]);
    let eds1 = c.recv().await;
    assert_eq!(eds1.type_url, type_url::ENDPOINT);
    assert_eq!(names(&eds1), ["a", "b"]);
    c.ack(&cds1, &[]).await;
    c.ack(&eds1, &["a", "b"]).await;
    let rds = c.recv().await;
    assert_eq!(rds.type_url, type_url::ROUTE);
    assert_eq!(names(&rds), ["r"]);
    // Not yet: the new routes are not ACKed.
    c.expect_nothing_pending().await;
    assert_eq!(
        srv.cache.acked_hash(NODE, type_url::CLUSTER, "b"),
        Some(cluster("b", 1).hash)
    );
    c.ack(&rds, &["r"]).await;

    // Phase 2: the stale cluster and its endpoints are removed.
    let cds2 = c.recv().await;
    assert_eq!(cds2.type_url, type_url::CLUSTER);
    assert_eq!(names(&cds2), ["a"]);
    let eds2 = c.recv().await;
    assert_eq!(eds2.type_url, type_url::ENDPOINT);
    assert_eq!(names(&eds2), ["a"]);
    c.ack(&cds2, &[]).await;
    c.ack(&eds2, &["a"]).await;
    c.expect_nothing_pending().await;
    assert_eq!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "b"), None);
    srv.stop().await;
}

#[tokio::test]
async fn nacked_listener_keeps_removed_clusters() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(
        None,
        snap(&[cluster("a", 1), cluster("b", 1), listener("l", "r")]),
    );
    let mut c = client(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    c.subscribe(type_url::LISTENER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;

    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 1), listener("l", "r2")]));
    let lds = c.recv().await;
    assert_eq!(lds.type_url, type_url::LISTENER);
    c.nack(&lds, &[], "listener l: rejected").await;
    // Envoy still runs the old listener, which may use "b": keep it.
    c.expect_nothing_pending().await;
    assert!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "b").is_some());

    // The fix is ACKed: now "b" goes.
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 1), listener("l", "r3")]));
    let lds = c.recv().await;
    c.ack(&lds, &[]).await;
    let cds = c.recv().await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    assert_eq!(names(&cds), ["a"]);
    srv.stop().await;
}

#[tokio::test]
async fn node_snapshot_overrides_default_and_stale_nonce_is_ignored() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(None, snap(&[cluster("default", 1)]));
    srv.cache
        .set_snapshot(Some(NODE), snap(&[cluster("mine", 1)]));
    let mut c = client(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r1 = c.recv().await;
    assert_eq!(names(&r1), ["mine"]);
    // Default changes do not concern this node.
    srv.cache.set_snapshot(None, snap(&[cluster("default", 2)]));
    c.expect_nothing_pending().await;

    srv.cache
        .set_snapshot(Some(NODE), snap(&[cluster("mine", 2)]));
    // r1 is still un-ACKed, so the change waits for the ACK.
    c.expect_nothing_pending().await;
    c.ack(&r1, &[]).await;
    let r2 = c.recv().await;
    assert_eq!(names(&r2), ["mine"]);
    // An ACK of the older nonce is stale: ignored, no ACK recorded.
    c.ack(&r1, &[]).await;
    c.expect_nothing_pending().await;
    let ts = type_status(&srv.cache, type_url::CLUSTER);
    assert!(ts.pending);
    assert_eq!(ts.acked_version, Some(r1.version_info.clone()));

    srv.cache.clear_snapshot(NODE);
    c.ack(&r2, &[]).await;
    let r3 = c.recv().await;
    assert_eq!(names(&r3), ["default"]);
    srv.stop().await;
}

#[test]
fn snapshot_versions_follow_content() {
    let a = snap(&[cluster("a", 1), cluster("b", 1)]);
    let b = snap(&[cluster("b", 1), cluster("a", 1)]);
    let c = snap(&[cluster("a", 1), cluster("b", 2)]);
    assert_eq!(a.version(type_url::CLUSTER), b.version(type_url::CLUSTER));
    assert_ne!(a.version(type_url::CLUSTER), c.version(type_url::CLUSTER));
    assert_eq!(a.len(), 2);
    let mut d = Snapshot::new();
    d.insert(cluster("a", 1)).unwrap();
    let err = d.insert(cluster("a", 2)).unwrap_err();
    assert!(err.to_string().contains("\"a\""), "{err}");
}
