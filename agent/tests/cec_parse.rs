//! CEC decoding and qualification, as Cilium's agent does it.

use membrane_agent::cec::parse_cec;
use membrane_agent::envoy_pb::*;
use membrane_crds::EnvoyConfigSpec;
use serde_json::json;

fn spec(resources: Vec<serde_json::Value>) -> EnvoyConfigSpec {
    EnvoyConfigSpec {
        resources: resources.into_iter().map(Into::into).collect(),
        ..Default::default()
    }
}

fn hcm_listener(rds: &str) -> serde_json::Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "listener",
        "filterChains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "statPrefix": "x",
                    "rds": {"routeConfigName": rds},
                    "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                }
            }],
            "transportSocket": {
                "name": "envoy.transport_sockets.tls",
                "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "commonTlsContext": {"tlsCertificateSdsSecretConfigs": [{"name": "cilium-secrets/default-cert"}, {"name": "local-cert"}]}
                }
            }
        }]
    })
}

#[test]
fn names_are_qualified_and_config_sources_filled() {
    let parsed = parse_cec(
        "CiliumEnvoyConfig ns/cec",
        "ns",
        "cec",
        &spec(vec![
            hcm_listener("routes"),
            json!({
                "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                "name": "routes",
                "virtualHosts": [{"name": "v", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "ns:svc:80"}},
                    {"match": {"prefix": "/q"}, "route": {"cluster": "already/qualified"}}
                ]}]
            }),
            json!({
                "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                "name": "ns:svc:80",
                "type": "EDS",
                "edsClusterConfig": {"serviceName": "ns/svc:80"}
            }),
        ]),
    )
    .expect("valid CEC");

    let l = &parsed.listeners[0];
    assert_eq!(l.local_name, "listener");
    assert_eq!(l.listener.name, "ns/cec/listener");
    assert!(l.needs_address);
    let chain = &l.listener.filter_chains[0];
    let Some(FilterConfigType::TypedConfig(any)) = &chain.filters[0].config_type else {
        panic!("typed config");
    };
    let hcm: HttpConnectionManager = from_any(any).expect("hcm").expect("decodes");
    let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
        panic!("rds");
    };
    assert_eq!(rds.route_config_name, "ns/cec/routes");
    assert_eq!(rds.config_source, Some(ads_config_source()));

    let Some(TransportConfigType::TypedConfig(tls)) =
        &chain.transport_socket.as_ref().expect("tls").config_type
    else {
        panic!("tls typed config");
    };
    let tls: DownstreamTlsContext = from_any(tls).expect("tls").expect("decodes");
    let sds = &tls
        .common_tls_context
        .expect("common")
        .tls_certificate_sds_secret_configs;
    assert_eq!(
        sds[0].name, "cilium-secrets/default-cert",
        "qualified names stay"
    );
    assert_eq!(sds[1].name, "ns/cec/local-cert");
    assert!(
        sds.iter()
            .all(|s| s.sds_config == Some(ads_config_source()))
    );

    let routes = &parsed.routes[0];
    assert_eq!(routes.name, "ns/cec/routes");
    let clusters: Vec<String> = routes.virtual_hosts[0]
        .routes
        .iter()
        .filter_map(|r| match &r.action {
            Some(RouteActionKind::Route(a)) => match &a.cluster_specifier {
                Some(RouteClusterSpecifier::Cluster(c)) => Some(c.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(clusters, ["ns/cec/ns:svc:80", "already/qualified"]);

    let c = &parsed.clusters[0];
    assert_eq!(c.name, "ns/cec/ns:svc:80");
    let eds = c.eds_cluster_config.as_ref().expect("eds");
    assert_eq!(eds.service_name, "ns/svc:80");
    assert_eq!(eds.eds_config, Some(ads_config_source()));
}

#[test]
fn errors_name_the_object_the_resource_and_the_field() {
    let cases = [
        (
            json!({"@type": "type.googleapis.com/envoy.config.listener.v3.Listenr", "name": "x"}),
            vec!["CiliumEnvoyConfig ns/bad", "spec.resources[0]", "Listenr"],
        ),
        (
            json!({"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "x", "filterChainz": []}),
            vec!["spec.resources[0]", "filterChainz"],
        ),
        (
            json!({"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"}),
            vec!["spec.resources[0].name", "must not be empty"],
        ),
        (
            json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}),
            vec!["spec.resources[0].@type", "not a resource type"],
        ),
        (json!({"name": "x"}), vec!["spec.resources[0]", "@type"]),
    ];
    for (resource, needles) in cases {
        let err = parse_cec(
            "CiliumEnvoyConfig ns/bad",
            "ns",
            "bad",
            &spec(vec![resource.clone()]),
        )
        .expect_err("must be rejected")
        .to_string();
        for n in needles {
            assert!(err.contains(n), "{resource}: {err:?} lacks {n:?}");
        }
    }
}

#[test]
fn duplicate_names_inside_one_cec_are_rejected() {
    let l = hcm_listener("r");
    let err = parse_cec(
        "CiliumEnvoyConfig ns/d",
        "ns",
        "d",
        &spec(vec![l.clone(), l]),
    )
    .expect_err("duplicate")
    .to_string();
    assert!(
        err.contains("two Listeners are named ns/d/listener"),
        "{err}"
    );
}

#[test]
fn clusterwide_configs_qualify_with_an_empty_namespace() {
    let parsed = parse_cec(
        "CiliumClusterwideEnvoyConfig cc",
        "",
        "cc",
        &spec(vec![hcm_listener("r")]),
    )
    .expect("valid");
    assert_eq!(parsed.listeners[0].listener.name, "/cc/listener");
}
