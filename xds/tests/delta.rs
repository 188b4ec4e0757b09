//! Drives the incremental (delta) ADS server over a unix socket with a
//! scripted gRPC client.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::{NODE, PROBE, STEP, Server, cla, cluster, listener, route, snap, type_status};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use membrane_xds::{Protocol, Resource, codec, type_url};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
    probes: u32,
    first: bool,
}

impl Client {
    async fn open(srv: &Server) -> Self {
        let mut grpc = AggregatedDiscoveryServiceClient::new(srv.channel().await);
        let (tx, rx) = mpsc::channel(16);
        let resp = timeout(
            STEP,
            grpc.delta_aggregated_resources(ReceiverStream::new(rx)),
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

    async fn send(&mut self, mut req: DeltaDiscoveryRequest) {
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
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: strings(names),
            ..Default::default()
        })
        .await;
    }

    async fn unsubscribe(&mut self, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_unsubscribe: strings(names),
            ..Default::default()
        })
        .await;
    }

    /// First request of a type on a reconnected stream, as Envoy sends it.
    async fn resume(&mut self, type_url: &str, names: &[&str], have: &[(&str, &str)]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: strings(names),
            initial_resource_versions: have
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&mut self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&mut self, r: &DeltaDiscoveryResponse, msg: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: msg.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    /// Receives a response and checks the invariants every delta response
    /// must hold.
    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        let r = timeout(STEP, self.rx.message())
            .await
            .expect("timed out waiting for a response")
            .unwrap()
            .expect("stream ended");
        assert!(!r.nonce.is_empty());
        assert!(!r.system_version_info.is_empty());
        let mut seen = BTreeSet::new();
        for res in &r.resources {
            assert!(seen.insert(res.name.clone()), "duplicate {}", res.name);
            let body = res.resource.clone().expect("resource body");
            assert_eq!(body.type_url, r.type_url);
            if !r.type_url.starts_with(PROBE) {
                assert_eq!(codec::resource_name(&body).unwrap(), res.name);
            }
            // The per-resource version is the content hash.
            assert_eq!(
                res.version,
                Resource::with_name(res.name.clone(), body).version()
            );
        }
        for n in &r.removed_resources {
            assert!(seen.insert(n.clone()), "{n} both updated/removed or twice");
        }
        r
    }

    /// Proves nothing else is queued: requests are handled in order, so if
    /// the answer to a fresh wildcard probe is the next message, the server
    /// had nothing to send before it.
    async fn expect_nothing_pending(&mut self) {
        self.probes += 1;
        let probe = format!("{PROBE}{}", self.probes);
        self.subscribe(&probe, &["*"]).await;
        let r = self.recv().await;
        assert_eq!(
            r.type_url,
            probe,
            "unexpected response {} with {:?} removed {:?}",
            r.type_url,
            names(&r),
            r.removed_resources
        );
        assert!(r.resources.is_empty());
    }
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    r.resources.iter().map(|r| r.name.clone()).collect()
}

fn version_of(r: &DeltaDiscoveryResponse, name: &str) -> String {
    r.resources
        .iter()
        .find(|x| x.name == name)
        .map(|x| x.version.clone())
        .unwrap_or_else(|| panic!("{name} not in response"))
}

#[tokio::test]
async fn wildcard_cds_initial_then_ack_feeds_status() {
    let srv = Server::start().await;
    let s = snap(&[cluster("a", 1), cluster("b", 1), cla("a", 80)]);
    let version = s.version(type_url::CLUSTER);
    srv.cache.set_snapshot(None, s);
    let mut events = srv.cache.subscribe();
    let mut c = Client::open(&srv).await;

    // Legacy wildcard: an empty first subscription to CDS.
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, type_url::CLUSTER);
    assert_eq!(names(&r), ["a", "b"]);
    assert_eq!(version_of(&r, "a"), cluster("a", 1).version());
    assert_eq!(r.system_version_info, version);
    assert!(r.removed_resources.is_empty());
    let ts = type_status(&srv.cache, type_url::CLUSTER);
    assert!(ts.wildcard && ts.pending);
    assert_eq!(ts.acked_version, None);
    assert_eq!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "a"), None);
    let st = srv.cache.status();
    assert_eq!(st.streams[0].protocol, Protocol::Delta);

    events.mark_unchanged();
    c.ack(&r).await;
    // An ACK is not answered.
    c.expect_nothing_pending().await;
    assert!(events.has_changed().unwrap(), "ACK must tick subscribers");
    let ts = type_status(&srv.cache, type_url::CLUSTER);
    assert!(!ts.pending && !ts.rejected);
    assert_eq!(ts.acked_version.as_deref(), Some(version.as_str()));
    assert_eq!(ts.acked_resources, 2);
    assert!(srv.cache.is_acked(NODE, &cluster("a", 1)));
    assert!(srv.cache.is_acked(NODE, &cluster("b", 1)));

    // An empty wildcard LDS is still answered: Envoy's init waits for it.
    c.subscribe(type_url::LISTENER, &[]).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, type_url::LISTENER);
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
    c.ack(&r).await;
    c.expect_nothing_pending().await;
    srv.stop().await;
}

#[tokio::test]
async fn explicit_subscribe_and_unsubscribe() {
    let srv = Server::start().await;
    srv.cache
        .set_snapshot(None, snap(&[cla("x", 1), cla("y", 1), cla("z", 1)]));
    let mut c = Client::open(&srv).await;

    // An empty first request is a wildcard only for LDS/CDS.
    c.subscribe(type_url::ENDPOINT, &[]).await;
    c.expect_nothing_pending().await;
    assert!(!type_status(&srv.cache, type_url::ENDPOINT).wildcard);

    c.subscribe(type_url::ENDPOINT, &["x"]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["x"]);
    c.ack(&r).await;

    // Adding a name sends just that name, not x again.
    c.subscribe(type_url::ENDPOINT, &["y"]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["y"]);
    assert!(r.removed_resources.is_empty());
    c.ack(&r).await;
    c.expect_nothing_pending().await;
    assert!(srv.cache.is_acked(NODE, &cla("x", 1)));

    // Unsubscribing is not answered, and x is no longer followed.
    c.unsubscribe(type_url::ENDPOINT, &["x"]).await;
    c.expect_nothing_pending().await;
    let ts = type_status(&srv.cache, type_url::ENDPOINT);
    assert_eq!(ts.subscribed, ["y"]);
    assert!(!ts.wildcard);
    assert_eq!(srv.cache.acked_hash(NODE, type_url::ENDPOINT, "x"), None);
    srv.cache
        .set_snapshot(None, snap(&[cla("x", 2), cla("y", 1), cla("z", 2)]));
    c.expect_nothing_pending().await;

    // Re-subscribing sends it again (the client dropped it).
    c.subscribe(type_url::ENDPOINT, &["x"]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["x"]);
    assert_eq!(version_of(&r, "x"), cla("x", 2).version());
    c.ack(&r).await;

    // Explicit "*" switches to wildcard: only what the client lacks is sent.
    c.subscribe(type_url::ENDPOINT, &["*"]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["z"]);
    c.ack(&r).await;
    c.expect_nothing_pending().await;
    assert!(type_status(&srv.cache, type_url::ENDPOINT).wildcard);
    srv.stop().await;
}

#[tokio::test]
async fn subscription_to_missing_resource_is_answered_when_it_appears() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(None, snap(&[cla("x", 1)]));
    let mut c = Client::open(&srv).await;
    c.subscribe(type_url::ENDPOINT, &["w"]).await;
    c.expect_nothing_pending().await;
    c.subscribe(type_url::ROUTE, &["r"]).await;
    c.expect_nothing_pending().await;
    assert_eq!(
        type_status(&srv.cache, type_url::ENDPOINT).subscribed,
        ["w"]
    );

    // Unrelated changes do not answer it.
    srv.cache.set_snapshot(None, snap(&[cla("x", 2)]));
    c.expect_nothing_pending().await;

    srv.cache
        .set_snapshot(None, snap(&[cla("x", 2), cla("w", 1), route("r", "w")]));
    let eds = c.recv().await;
    assert_eq!(eds.type_url, type_url::ENDPOINT);
    assert_eq!(names(&eds), ["w"]);
    // Routes wait for the endpoints they may need.
    c.expect_nothing_pending().await;
    c.ack(&eds).await;
    let rds = c.recv().await;
    assert_eq!(rds.type_url, type_url::ROUTE);
    assert_eq!(names(&rds), ["r"]);
    c.ack(&rds).await;
    c.expect_nothing_pending().await;
    assert!(srv.cache.is_acked(NODE, &route("r", "w")));
    srv.stop().await;
}

#[tokio::test]
async fn removal_and_unchanged_resources() {
    let srv = Server::start().await;
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 1), cluster("b", 1), cla("x", 1)]));
    let mut c = Client::open(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.subscribe(type_url::ENDPOINT, &["x"]).await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.expect_nothing_pending().await;

    // Only b changes: only b is sent, with a new type version.
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 1), cluster("b", 2), cla("x", 1)]));
    let r2 = c.recv().await;
    assert_eq!(r2.type_url, type_url::CLUSTER);
    assert_eq!(names(&r2), ["b"]);
    assert!(r2.removed_resources.is_empty());
    assert_ne!(r2.system_version_info, r.system_version_info);
    c.ack(&r2).await;
    c.expect_nothing_pending().await;

    // The same content again: nothing at all.
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 1), cluster("b", 2), cla("x", 1)]));
    c.expect_nothing_pending().await;

    // b and x disappear; c appears.
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 1), cluster("c", 1)]));
    let cds = c.recv().await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    assert_eq!(names(&cds), ["c"]);
    assert_eq!(cds.removed_resources, ["b"]);
    let eds = c.recv().await;
    assert_eq!(eds.type_url, type_url::ENDPOINT);
    assert!(eds.resources.is_empty());
    assert_eq!(eds.removed_resources, ["x"]);
    c.ack(&cds).await;
    c.ack(&eds).await;
    c.expect_nothing_pending().await;
    assert_eq!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "b"), None);
    assert_eq!(srv.cache.acked_hash(NODE, type_url::ENDPOINT, "x"), None);
    // x stays subscribed and is sent once it exists again.
    assert_eq!(
        type_status(&srv.cache, type_url::ENDPOINT).subscribed,
        ["x"]
    );
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 1), cluster("c", 1), cla("x", 3)]));
    let eds = c.recv().await;
    assert_eq!(names(&eds), ["x"]);
    srv.stop().await;
}

#[tokio::test]
async fn nack_is_recorded_and_not_resent() {
    let srv = Server::start().await;
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 1), cluster("b", 1)]));
    let mut c = Client::open(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r1 = c.recv().await;
    c.ack(&r1).await;

    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 2), cluster("b", 1)]));
    let r = c.recv().await;
    assert_eq!(names(&r), ["a"]);
    c.nack(&r, "cluster 'a': bad config").await;
    c.expect_nothing_pending().await;

    let ts = type_status(&srv.cache, type_url::CLUSTER);
    let nack = ts.last_nack.clone().expect("nack recorded");
    assert_eq!(nack.error_detail, "cluster 'a': bad config");
    assert_eq!(nack.nonce, r.nonce);
    assert_eq!(nack.version, r.system_version_info);
    assert!(ts.rejected && !ts.pending);
    // Envoy still runs the previous a.
    assert_eq!(ts.acked_version, Some(r1.system_version_info.clone()));
    assert!(srv.cache.is_acked(NODE, &cluster("a", 1)));

    // Setting the rejected content again does not resend it.
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 2), cluster("b", 1)]));
    c.expect_nothing_pending().await;

    // A fix is pushed; its ACK clears the rejection.
    srv.cache
        .set_snapshot(None, snap(&[cluster("a", 3), cluster("b", 1)]));
    let r2 = c.recv().await;
    assert_eq!(names(&r2), ["a"]);
    c.ack(&r2).await;
    c.expect_nothing_pending().await;
    let ts = type_status(&srv.cache, type_url::CLUSTER);
    assert!(!ts.rejected);
    assert!(srv.cache.is_acked(NODE, &cluster("a", 3)));
    assert!(srv.cache.is_acked(NODE, &cluster("b", 1)));
    srv.stop().await;
}

#[tokio::test]
async fn stale_nonce_is_not_an_ack_but_its_subscription_applies() {
    let srv = Server::start().await;
    srv.cache
        .set_snapshot(None, snap(&[cla("x", 1), cla("y", 1)]));
    let mut c = Client::open(&srv).await;
    c.subscribe(type_url::ENDPOINT, &["x"]).await;
    let r1 = c.recv().await;
    c.ack(&r1).await;
    srv.cache
        .set_snapshot(None, snap(&[cla("x", 2), cla("y", 1)]));
    let r2 = c.recv().await;
    assert_eq!(names(&r2), ["x"]);

    // ACK of the older response, carrying a new subscription.
    c.send(DeltaDiscoveryRequest {
        type_url: type_url::ENDPOINT.into(),
        response_nonce: r1.nonce.clone(),
        resource_names_subscribe: strings(&["y"]),
        ..Default::default()
    })
    .await;
    c.expect_nothing_pending().await;
    let ts = type_status(&srv.cache, type_url::ENDPOINT);
    assert!(ts.pending, "a stale nonce must not count as an ACK");
    assert_eq!(ts.acked_version, Some(r1.system_version_info.clone()));
    assert_eq!(ts.subscribed, ["x", "y"]);

    // Once r2 is ACKed, y follows.
    c.ack(&r2).await;
    let r3 = c.recv().await;
    assert_eq!(names(&r3), ["y"]);
    assert!(srv.cache.is_acked(NODE, &cla("x", 2)));
    srv.stop().await;
}

#[tokio::test]
async fn reconnect_with_initial_resource_versions() {
    let srv = Server::start().await;
    srv.cache.set_snapshot(
        None,
        snap(&[cluster("a", 1), cluster("b", 1), cla("x", 1), cla("y", 1)]),
    );
    let mut c = Client::open(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.expect_nothing_pending().await;
    let va = version_of(&r, "a");
    let vb = version_of(&r, "b");
    drop(c);

    // While disconnected: b changes, c appears, and the client also holds a
    // cluster this control plane never had.
    srv.cache.set_snapshot(
        None,
        snap(&[
            cluster("a", 1),
            cluster("b", 2),
            cluster("c", 1),
            cla("x", 1),
            cla("y", 1),
        ]),
    );
    let mut c = Client::open(&srv).await;
    c.resume(
        type_url::CLUSTER,
        &[],
        &[("a", &va), ("b", &vb), ("gone", "v-from-elsewhere")],
    )
    .await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["b", "c"]);
    assert_eq!(r.removed_resources, ["gone"]);
    // What the client reported at the current version counts as ACKed.
    assert!(srv.cache.is_acked(NODE, &cluster("a", 1)));
    assert!(!srv.cache.is_acked(NODE, &cluster("b", 2)));
    c.ack(&r).await;
    c.expect_nothing_pending().await;
    assert!(srv.cache.is_acked(NODE, &cluster("b", 2)));
    assert_eq!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "gone"), None);

    // Explicit names: only the one the client lacks is sent.
    c.resume(
        type_url::ENDPOINT,
        &["x", "y"],
        &[("x", &cla("x", 1).version())],
    )
    .await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["y"]);
    c.ack(&r).await;

    // Nothing to send at all: a non-wildcard resume is not answered.
    c.resume(type_url::ROUTE, &["r"], &[]).await;
    c.expect_nothing_pending().await;
    srv.stop().await;
}

#[tokio::test]
async fn clusters_before_listeners_and_stale_clusters_removed_last() {
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
    let mut c = Client::open(&srv).await;
    c.subscribe(type_url::CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.subscribe(type_url::ENDPOINT, &["a", "b"]).await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.subscribe(type_url::LISTENER, &[]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["l"]);
    c.ack(&r).await;
    c.subscribe(type_url::ROUTE, &["r"]).await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.expect_nothing_pending().await;

    // Listener and cluster change together: CDS first, LDS after its ACK.
    srv.cache.set_snapshot(
        None,
        snap(&[
            cluster("a", 2),
            cluster("b", 1),
            cla("a", 1),
            cla("b", 1),
            listener("l", "r2"),
            route("r", "b"),
        ]),
    );
    let cds = c.recv().await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    assert_eq!(names(&cds), ["a"]);
    // The modified cluster re-warms: its unchanged endpoints are sent again.
    let eds = c.recv().await;
    assert_eq!(eds.type_url, type_url::ENDPOINT);
    assert_eq!(names(&eds), ["a"]);
    c.expect_nothing_pending().await;
    c.ack(&cds).await;
    c.ack(&eds).await;
    let lds = c.recv().await;
    assert_eq!(lds.type_url, type_url::LISTENER);
    assert_eq!(names(&lds), ["l"]);
    c.ack(&lds).await;
    c.expect_nothing_pending().await;

    // b goes away while the route moves from b to a: b is removed only
    // after the new route is ACKed.
    srv.cache.set_snapshot(
        None,
        snap(&[
            cluster("a", 2),
            cla("a", 1),
            listener("l", "r2"),
            route("r", "a"),
        ]),
    );
    let rds = c.recv().await;
    assert_eq!(rds.type_url, type_url::ROUTE);
    assert_eq!(names(&rds), ["r"]);
    c.expect_nothing_pending().await;
    assert!(srv.cache.is_acked(NODE, &cluster("b", 1)));
    c.ack(&rds).await;
    let cds = c.recv().await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    assert!(cds.resources.is_empty());
    assert_eq!(cds.removed_resources, ["b"]);
    let eds = c.recv().await;
    assert_eq!(eds.type_url, type_url::ENDPOINT);
    assert_eq!(eds.removed_resources, ["b"]);
    c.ack(&cds).await;
    c.ack(&eds).await;
    c.expect_nothing_pending().await;
    assert_eq!(srv.cache.acked_hash(NODE, type_url::CLUSTER, "b"), None);
    srv.stop().await;
}
