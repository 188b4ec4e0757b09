//! The bootstrap Membrane hands to Envoy: admin on a unix socket, every
//! dynamic resource over one ADS stream on another unix socket.
//!
//! As in Cilium's bootstrap (`pkg/envoy`), the admin interface is reachable
//! through the static cluster [`ADMIN_CLUSTER`] (`/envoy-admin`), so a
//! CiliumEnvoyConfig can route to it (Cilium's admin and Prometheus listener
//! examples do). TCP admin is an opt-in static listener routing to that
//! cluster, never the admin interface itself.

use std::path::Path;

use serde_json::{Value, json};

/// Name of the static cluster that points Envoy at Membrane's xDS socket.
pub const XDS_CLUSTER: &str = "membrane-xds";

/// Name of the static cluster that points at Envoy's own admin socket;
/// Cilium's bootstrap uses the same name.
pub const ADMIN_CLUSTER: &str = "/envoy-admin";

/// Name of the static listener that exposes admin on TCP (`--envoy-admin-port`).
pub const ADMIN_TCP_LISTENER: &str = "membrane-envoy-admin";

/// Names of every cluster the bootstrap defines (CECs may reference them).
pub const BOOTSTRAP_CLUSTERS: [&str; 2] = [XDS_CLUSTER, ADMIN_CLUSTER];

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
    /// Envoy's admin interface listens here (a unix socket).
    pub admin_socket: &'a Path,
    /// Expose admin on `127.0.0.1:<port>` too (0 picks a free port).
    pub admin_tcp_port: Option<u16>,
    pub protocol: XdsProtocol,
}

/// Render the bootstrap as JSON (Envoy accepts JSON for `-c`).
pub fn bootstrap(params: &BootstrapParams<'_>) -> Value {
    let api_type = match params.protocol {
        XdsProtocol::Sotw => "GRPC",
        XdsProtocol::Delta => "DELTA_GRPC",
    };
    let admin_endpoint =
        json!({"address": {"pipe": {"path": params.admin_socket.to_string_lossy()}}});
    let mut listeners = Vec::new();
    if let Some(port) = params.admin_tcp_port {
        listeners.push(admin_tcp_listener(port));
    }
    json!({
        "node": {
            "id": params.node_id,
            "cluster": params.node_cluster,
        },
        "admin": {
            "address": {"pipe": {"path": params.admin_socket.to_string_lossy()}}
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
            "listeners": listeners,
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
            }, {
                "name": ADMIN_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": ADMIN_CLUSTER,
                    "endpoints": [{"lb_endpoints": [{"endpoint": admin_endpoint}]}]
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

/// Admin on loopback TCP: a plain HTTP listener whose only route goes to
/// the admin cluster.
fn admin_tcp_listener(port: u16) -> Value {
    json!({
        "name": ADMIN_TCP_LISTENER,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": ADMIN_TCP_LISTENER,
                "route_config": {
                    "name": ADMIN_TCP_LISTENER,
                    "virtual_hosts": [{
                        "name": ADMIN_TCP_LISTENER,
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": ADMIN_CLUSTER}}]
                    }]
                },
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                }]
            }
        }]}]
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
            admin_socket: Path::new("/tmp/admin.sock"),
            admin_tcp_port: None,
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

    #[test]
    fn admin_is_a_unix_socket_behind_the_envoy_admin_cluster() {
        let b = bootstrap(&BootstrapParams {
            node_id: "n1",
            node_cluster: "membrane",
            xds_socket: Path::new("/tmp/x.sock"),
            admin_socket: Path::new("/tmp/admin.sock"),
            admin_tcp_port: None,
            protocol: XdsProtocol::Delta,
        });
        assert_eq!(b["admin"]["address"]["pipe"]["path"], "/tmp/admin.sock");
        let admin = &b["static_resources"]["clusters"][1];
        assert_eq!(admin["name"], "/envoy-admin");
        assert_eq!(
            admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
                ["path"],
            "/tmp/admin.sock"
        );
        // No TCP admin unless asked for.
        assert_eq!(b["static_resources"]["listeners"], json!([]));
    }

    #[test]
    fn tcp_admin_is_an_opt_in_listener_to_the_admin_cluster() {
        let b = bootstrap(&BootstrapParams {
            node_id: "n1",
            node_cluster: "membrane",
            xds_socket: Path::new("/tmp/x.sock"),
            admin_socket: Path::new("/tmp/admin.sock"),
            admin_tcp_port: Some(9901),
            protocol: XdsProtocol::Delta,
        });
        let l = &b["static_resources"]["listeners"][0];
        assert_eq!(l["address"]["socket_address"]["address"], "127.0.0.1");
        assert_eq!(l["address"]["socket_address"]["port_value"], 9901);
        let hcm = &l["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(
            hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"],
            "/envoy-admin"
        );
    }
}
