//! The bootstrap Membrane hands to Envoy: admin on loopback, every dynamic
//! resource over one ADS stream on a unix socket.

use std::path::Path;

use serde_json::{Value, json};

/// Name of the static cluster that points Envoy at Membrane's xDS socket.
pub const XDS_CLUSTER: &str = "membrane-xds";

/// Which xDS variant Envoy's ADS stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdsProtocol {
    #[default]
    Sotw,
    Delta,
}

/// Inputs of the bootstrap.
#[derive(Debug, Clone)]
pub struct BootstrapParams<'a> {
    pub node_id: &'a str,
    pub node_cluster: &'a str,
    pub xds_socket: &'a Path,
    pub admin_port: u16,
    pub protocol: XdsProtocol,
}

/// Render the bootstrap as JSON (Envoy accepts JSON for `-c`).
pub fn bootstrap(params: &BootstrapParams<'_>) -> Value {
    let api_type = match params.protocol {
        XdsProtocol::Sotw => "GRPC",
        XdsProtocol::Delta => "DELTA_GRPC",
    };
    json!({
        "node": {
            "id": params.node_id,
            "cluster": params.node_cluster,
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": params.admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {
            "clusters": [{
                "name": XDS_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}
                    }
                },
                "load_assignment": {
                    "cluster_name": XDS_CLUSTER,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "pipe": {"path": params.xds_socket.to_string_lossy()}
                    }}}]}]
                }
            }]
        },
        // Envoy warns loudly without a bound on downstream connections.
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 50000
                }
            }]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ads_points_at_the_unix_socket() {
        let b = bootstrap(&BootstrapParams {
            node_id: "n1",
            node_cluster: "membrane",
            xds_socket: Path::new("/tmp/x.sock"),
            admin_port: 0,
            protocol: XdsProtocol::Sotw,
        });
        assert_eq!(
            b["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
                [0]["endpoint"]["address"]["pipe"]["path"],
            "/tmp/x.sock"
        );
        assert_eq!(b["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
        assert_eq!(b["node"]["id"], "n1");
    }
}
