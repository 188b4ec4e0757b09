//! Per-node snapshots: a CEC's `nodeSelector` decides which Envoys get it.
//! Membrane's own Envoy (labels from `--node-labels`) and two scripted xDS
//! clients with other labels in their node metadata each receive exactly
//! the listeners selected for them.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::UnixStream;
use tokio_stream::StreamExt;
use tonic::transport::{Endpoint, Uri};

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

fn selected_cec(name: &str, port: u16, selector: &str) -> String {
    direct_cec(name, port, name, "filterChains")
        .replace("spec:\n", &format!("spec:\n  nodeSelector: {selector}\n"))
}

fn node(id: &str, labels: &[(&str, &str)]) -> Node {
    let labels = Struct {
        fields: labels
            .iter()
            .map(|(k, v)| {
                let value = Value {
                    kind: Some(Kind::StringValue((*v).to_owned())),
                };
                ((*k).to_owned(), value)
            })
            .collect(),
    };
    let metadata = Struct {
        fields: [(
            "labels".to_owned(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        )]
        .into(),
    };
    Node {
        id: id.into(),
        metadata: Some(metadata),
        ..Default::default()
    }
}

/// Subscribe to LDS as `node` and return the listener names once they equal
/// `want` (ACKing every response), or the last set seen.
async fn listeners_for(xds: PathBuf, node: Node, want: &BTreeSet<String>) -> BTreeSet<String> {
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = xds.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to the xDS socket");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(8);
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: LDS.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let mut last = BTreeSet::new();
    // Bounded: the snapshot for a new node follows within a few pushes.
    for _ in 0..20 {
        let next = tokio::time::timeout(Duration::from_secs(5), responses.next()).await;
        let Ok(Some(Ok(resp))) = next else { break };
        let resp: DiscoveryResponse = resp;
        last = resp
            .resources
            .iter()
            .filter_map(|a| Listener::decode(a.value.as_slice()).ok())
            .map(|l| l.name)
            .collect();
        let _ = tx
            .send(DiscoveryRequest {
                type_url: LDS.into(),
                version_info: resp.version_info.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await;
        if &last == want {
            break;
        }
    }
    last
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| format!("default/{n}/direct")).collect()
}

#[test]
fn each_node_gets_the_configs_its_labels_select() {
    let m = Membrane::start_with(
        "127.0.108.0/24",
        28780,
        28781,
        &["--node-labels", "role=edge"],
    );
    m.apply(&selected_cec(
        "edge-only",
        28921,
        "{matchLabels: {role: edge}}",
    ));
    m.apply(&selected_cec(
        "core-only",
        28922,
        "{matchLabels: {role: core}}",
    ));
    m.apply(&direct_cec(
        "everywhere",
        28923,
        "everywhere",
        "filterChains",
    ));

    // Membrane's own Envoy (role=edge).
    assert!(
        wait_until(Duration::from_secs(10), || {
            body_at(28921).as_deref() == Some("edge-only")
                && body_at(28923).as_deref() == Some("everywhere")
        }),
        "{}",
        m.log()
    );
    assert_eq!(
        body_at(28922),
        None,
        "a core-only listener reached the edge node"
    );

    let xds = m.dir.path().join("run/xds.sock");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let core_want = names(&["core-only", "everywhere"]);
    let core = rt.block_on(listeners_for(
        xds.clone(),
        node("remote-core", &[("role", "core")]),
        &core_want,
    ));
    assert_eq!(core, core_want);
    let plain_want = names(&["everywhere"]);
    let plain = rt.block_on(listeners_for(xds, node("remote-plain", &[]), &plain_want));
    assert_eq!(plain, plain_want);
}
