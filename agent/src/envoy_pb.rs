//! Short paths to the Envoy protobuf types the agent touches, and the two
//! helpers to move them in and out of `Any`.

pub use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig},
};
pub use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, SocketAddress,
    address::Address as AddressKind, config_source::ConfigSourceSpecifier,
    data_source::Specifier as DataSpecifier, socket_address::PortSpecifier,
    transport_socket::ConfigType as TransportConfigType,
};
pub use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
pub use envoy_types::pb::envoy::config::listener::v3::{
    AdditionalAddress, FilterChain, Listener, filter::ConfigType as FilterConfigType,
};
pub use envoy_types::pb::envoy::config::route::v3::{
    RouteConfiguration, route::Action as RouteActionKind,
    route_action::ClusterSpecifier as RouteClusterSpecifier,
};
pub use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
pub use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier as TcpClusterSpecifier,
};
pub use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, TlsCertificate,
    UpstreamTlsContext, secret::Type as SecretType,
};
pub use envoy_types::pb::google::protobuf::Any;

/// Pack a message into `Any` under its canonical type URL, with map
/// entries in a fixed order (see `membrane_xds::codec::canonical_any`).
pub fn to_any<T: prost::Message + prost::Name>(msg: &T) -> Any {
    membrane_xds::codec::encode(msg)
}

/// Unpack `Any` when it holds a `T`; `None` for any other type.
pub fn from_any<T: prost::Message + prost::Name + Default>(
    any: &Any,
) -> Option<Result<T, prost::DecodeError>> {
    (any.type_url == T::type_url()).then(|| T::decode(any.value.as_slice()))
}

/// A config source that points at Membrane's own ADS stream.
pub fn ads_config_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// `ip:port` as an Envoy TCP socket address.
pub fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: ip.to_owned(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// The `(ip, port)` of a socket address, if the address is one.
pub fn ip_port(addr: &Address) -> Option<(String, u32)> {
    match &addr.address {
        Some(AddressKind::SocketAddress(sa)) => match sa.port_specifier {
            Some(PortSpecifier::PortValue(p)) => Some((sa.address.clone(), p)),
            _ => Some((sa.address.clone(), 0)),
        },
        _ => None,
    }
}
