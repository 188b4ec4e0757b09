//! Model → Envoy resources in protojson form (camelCase field names, `@type`
//! on every `Any`), shaped like the resources Cilium's operator writes.
//!
//! Config sources (RDS, EDS, SDS) are deliberately left out: the agent fills
//! them in with its own ADS, as Cilium's agent does.

use serde_json::{Value, json};

use crate::TranslateOptions;
use crate::annotations::KeepAlive;
use crate::annotations::protojson_duration;
use crate::model::{Action, Model, PathMatch, Route, VirtualHost, WILDCARD_HOST};
use crate::names;

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_CONFIGURATION_TYPE: &str =
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const DOWNSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const TLS_INSPECTOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const PROXY_PROTOCOL_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";
const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// All resources of the CEC in Cilium's order: the listener, the route
/// configurations (insecure, then secure), then clusters sorted by name.
/// `host_port`: host network mode, the listener binds the node's
/// addresses on that port.
pub(crate) fn resources(
    model: &Model,
    opts: &TranslateOptions,
    host_port: Option<u16>,
) -> Vec<Value> {
    let mut out = vec![listener(model, opts, host_port)];
    if model.serves_http() {
        out.push(route_configuration(
            names::INSECURE_ROUTE_NAME,
            &model.insecure,
        ));
    }
    if model.has_tls() {
        out.push(route_configuration(names::SECURE_ROUTE_NAME, &model.secure));
    }
    out.extend(clusters(&model.backends).into_iter().map(|(_, v)| v));
    out
}

/// The clusters of `backends`, sorted by name.
pub(crate) fn clusters(
    backends: &std::collections::BTreeMap<(String, String), std::collections::BTreeSet<String>>,
) -> Vec<(String, Value)> {
    // Every cluster is the same but for two names: patch a copy of one.
    let template = cluster("", "");
    let mut clusters: Vec<(String, Value)> = backends
        .iter()
        .flat_map(|((ns, svc), ports)| {
            let template = &template;
            ports.iter().map(move |port| {
                let name = names::cluster_name(ns, svc, port);
                let mut value = template.clone();
                value["name"] = Value::from(name.as_str());
                value["edsClusterConfig"]["serviceName"] =
                    Value::from(names::eds_service_name(ns, svc, port));
                (name, value)
            })
        })
        .collect();
    clusters.sort_by(|a, b| a.0.cmp(&b.0));
    clusters
}

fn listener(model: &Model, opts: &TranslateOptions, host_port: Option<u16>) -> Value {
    let secrets_namespace = &opts.secrets_namespace;
    let mut chains = Vec::new();
    if model.serves_http() {
        chains.push(json!({
            "filterChainMatch": {"transportProtocol": "raw_buffer"},
            "filters": [hcm_filter(names::INSECURE_ROUTE_NAME)],
        }));
    }
    for tls in &model.tls {
        let sds =
            names::sds_secret_name(secrets_namespace, &tls.secret_namespace, &tls.secret_name);
        chains.push(json!({
            "filterChainMatch": {
                "serverNames": tls.server_names,
                "transportProtocol": "tls",
            },
            "filters": [hcm_filter(names::SECURE_ROUTE_NAME)],
            "transportSocket": {
                "name": "envoy.transport_sockets.tls",
                "typedConfig": {
                    "@type": DOWNSTREAM_TLS_TYPE,
                    "commonTlsContext": {
                        "tlsCertificateSdsSecretConfigs": [{"name": sds}],
                    },
                },
            },
        }));
    }
    // TLS passthrough: the SNI picks the chain, whose TCP proxy forwards
    // the still-encrypted stream to the backend (Cilium's SNI listener).
    for pt in &model.passthrough {
        let cluster = names::cluster_name(
            &pt.backend.namespace,
            &pt.backend.name,
            &pt.backend.port.as_string(),
        );
        chains.push(json!({
            "filterChainMatch": {
                "serverNames": pt.server_names,
                "transportProtocol": "tls",
            },
            "filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typedConfig": {
                    "@type": TCP_PROXY_TYPE,
                    "statPrefix": cluster,
                    "cluster": cluster,
                },
            }],
        }));
    }
    // The PROXY protocol header comes before the TLS ClientHello, so its
    // filter must run first.
    let mut listener_filters = Vec::new();
    if opts.proxy_protocol {
        listener_filters.push(json!({
            "name": "envoy.filters.listener.proxy_protocol",
            "typedConfig": {"@type": PROXY_PROTOCOL_TYPE},
        }));
    }
    listener_filters.push(json!({
        "name": "envoy.filters.listener.tls_inspector",
        "typedConfig": {"@type": TLS_INSPECTOR_TYPE},
    }));
    let ka: KeepAlive = model.settings.keep_alive;
    let mut listener = json!({
        "@type": LISTENER_TYPE,
        "name": names::LISTENER_NAME,
        "filterChains": chains,
        "listenerFilters": listener_filters,
        // TCP keep-alive as Cilium sets it: SOL_SOCKET/SO_KEEPALIVE and
        // IPPROTO_TCP/TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT.
        "socketOptions": [
            socket_option("Enable TCP keep-alive (default to enabled)", 1, 9, i64::from(ka.enabled)),
            socket_option("TCP keep-alive idle time (in seconds) (defaults to 10s)", 6, 4, ka.idle),
            socket_option("TCP keep-alive probe intervals (in seconds) (defaults to 5s)", 6, 5, ka.interval),
            socket_option("TCP keep-alive probe max failures.", 6, 6, ka.max_failures),
        ],
    });
    if let Some(port) = host_port {
        // Host network mode: every IPv4 and IPv6 address of the node, as
        // Cilium binds it (Envoy makes the IPv6 socket v6-only).
        listener["address"] = socket_address("0.0.0.0", port);
        if opts.host_network.as_ref().is_none_or(|h| h.ipv6) {
            listener["additionalAddresses"] = json!([{"address": socket_address("::", port)}]);
        }
    }
    listener
}

fn socket_address(ip: &str, port: u16) -> Value {
    json!({"socketAddress": {"address": ip, "portValue": port}})
}

fn socket_option(description: &str, level: i64, name: i64, value: i64) -> Value {
    // int64 fields are strings in protojson.
    json!({
        "description": description,
        "level": level.to_string(),
        "name": name.to_string(),
        "intValue": value.to_string(),
    })
}

fn hcm_filter(route_name: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typedConfig": {
            "@type": HCM_TYPE,
            "statPrefix": route_name,
            "rds": {"routeConfigName": route_name},
            "useRemoteAddress": true,
            "commonHttpProtocolOptions": {"maxStreamDuration": "0s"},
            "httpFilters": [
                {
                    "name": "envoy.filters.http.grpc_web",
                    "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"},
                },
                {
                    "name": "envoy.filters.http.grpc_stats",
                    "typedConfig": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                        "emitFilterState": true,
                        "enableUpstreamStats": true,
                    },
                },
                {
                    "name": "envoy.filters.http.router",
                    "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
            // Private ranges count as internal, so Envoy keeps internal-only
            // headers for in-cluster clients (Cilium's defaults).
            "internalAddressConfig": {"cidrRanges": [
                {"addressPrefix": "10.0.0.0", "prefixLen": 8},
                {"addressPrefix": "172.16.0.0", "prefixLen": 12},
                {"addressPrefix": "192.168.0.0", "prefixLen": 16},
                {"addressPrefix": "127.0.0.1", "prefixLen": 32},
                {"addressPrefix": "::1", "prefixLen": 128},
            ]},
            "upgradeConfigs": [{"upgradeType": "websocket"}],
        },
    })
}

/// An object from already-built values. Unlike `json!`, which passes every
/// embedded value through `to_value` (a deep copy), this moves them: with
/// thousands of routes the copies dominated translation time.
fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn route_configuration(name: &str, vhosts: &[VirtualHost]) -> Value {
    object([
        ("@type", Value::from(ROUTE_CONFIGURATION_TYPE)),
        ("name", Value::from(name)),
        (
            "virtualHosts",
            Value::Array(vhosts.iter().map(virtual_host).collect()),
        ),
    ])
}

pub(crate) fn virtual_host(vh: &VirtualHost) -> Value {
    let domains = if vh.host == WILDCARD_HOST {
        vec![WILDCARD_HOST.to_string()]
    } else {
        vec![vh.host.clone(), format!("{}:*", vh.host)]
    };
    let authority = wildcard_authority_regex(&vh.host);
    object([
        ("name", Value::from(vh.host.as_str())),
        ("domains", Value::from(domains)),
        (
            "routes",
            Value::Array(
                vh.routes
                    .iter()
                    .map(|r| route(r, authority.as_deref()))
                    .collect(),
            ),
        ),
    ])
}

/// For `*.foo.com`: `^[^.]+[.]foo[.]com(:[0-9]+)?$`.
///
/// Envoy's `*.foo.com` domain also matches `a.b.foo.com`, but an Ingress
/// wildcard covers exactly one DNS label, so routes of a wildcard host also
/// match `:authority` against this regex. Unlike Cilium (`...[.]com$`) we
/// accept an optional `:port`, otherwise the `*.foo.com:*` domain the virtual
/// host lists could never route anything.
pub(crate) fn wildcard_authority_regex(host: &str) -> Option<String> {
    let suffix = host.strip_prefix("*.")?;
    let escaped: Vec<String> = suffix.split('.').map(regex::escape).collect();
    Some(format!("^[^.]+[.]{}(:[0-9]+)?$", escaped.join("[.]")))
}

fn route(r: &Route, authority_regex: Option<&str>) -> Value {
    let mut m = serde_json::Map::new();
    match &r.path {
        PathMatch::Exact(p) => {
            m.insert("path".into(), Value::from(p.as_str()));
        }
        PathMatch::Regex(p) => {
            m.insert(
                "safeRegex".into(),
                object([("regex", Value::from(p.as_str()))]),
            );
        }
        PathMatch::Prefix(p) if p == "/" => {
            m.insert("prefix".into(), Value::from("/"));
        }
        PathMatch::Prefix(p) => {
            m.insert("pathSeparatedPrefix".into(), Value::from(p.as_str()));
        }
    }
    if let Some(regex) = authority_regex {
        m.insert(
            "headers".into(),
            json!([{"name": ":authority", "stringMatch": {"safeRegex": {"regex": regex}}}]),
        );
    }
    match &r.action {
        Action::HttpsRedirect => object([
            ("match", Value::Object(m)),
            ("redirect", object([("httpsRedirect", Value::Bool(true))])),
        ]),
        Action::Forward(b) => {
            let mut action = serde_json::Map::new();
            action.insert(
                "cluster".into(),
                Value::from(names::cluster_name(
                    &b.namespace,
                    &b.name,
                    &b.port.as_string(),
                )),
            );
            if let Some(timeout) = r.timeout {
                action.insert("timeout".into(), Value::from(protojson_duration(timeout)));
            }
            action.insert(
                "maxStreamDuration".into(),
                object([("maxStreamDuration", Value::from("0s"))]),
            );
            object([
                ("match", Value::Object(m)),
                ("route", Value::Object(action)),
            ])
        }
    }
}

fn cluster(name: &str, eds_service_name: &str) -> Value {
    json!({
        "@type": CLUSTER_TYPE,
        "name": name,
        "type": "EDS",
        "connectTimeout": "5s",
        "edsClusterConfig": {"serviceName": eds_service_name},
        "outlierDetection": {"splitExternalLocalOriginErrors": true},
        "typedExtensionProtocolOptions": {
            HTTP_PROTOCOL_OPTIONS_KEY: {
                "@type": format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS_KEY}"),
                "commonHttpProtocolOptions": {"idleTimeout": "60s"},
                // Speak to the backend in the client's HTTP version.
                "useDownstreamProtocolConfig": {"http2ProtocolOptions": {}},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_regex_matches_exactly_one_label() {
        let re = wildcard_authority_regex("*.foo.com").unwrap();
        assert_eq!(re, "^[^.]+[.]foo[.]com(:[0-9]+)?$");
        let re = regex::Regex::new(&re).unwrap();
        assert!(re.is_match("bar.foo.com"));
        assert!(re.is_match("bar.foo.com:8080"));
        assert!(!re.is_match("baz.bar.foo.com"));
        assert!(!re.is_match("foo.com"));
        assert!(!re.is_match(".foo.com"));
        assert!(!re.is_match("barxfoo.com"));
        assert!(!re.is_match("bar.foo.com:"));
        assert_eq!(wildcard_authority_regex("foo.com"), None);
        assert_eq!(wildcard_authority_regex("*"), None);
    }
}
