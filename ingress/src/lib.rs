//! Kubernetes Ingress → Cilium `CiliumEnvoyConfig`, load balancer Service
//! and EndpointSlice, in dedicated mode (one set per Ingress) or shared mode
//! (one set for all shared Ingresses, see [`merge_shared`]). Pure
//! translation, no I/O.
//!
//! The CEC layout matches what Cilium's operator writes:
//!
//! - `spec.services`: `cilium-ingress-<name>` with ports `[80]` or `[80, 443]`;
//!   `spec.backendServices`: every backend Service with its ports as strings.
//! - Listener `listener` (no address): a `raw_buffer` filter chain whose HCM
//!   uses RDS `listener-insecure`, then one `tls` chain per TLS Secret
//!   (server names = its hosts) using RDS `listener-secure` and the
//!   certificate `<secrets-ns>/<ns>-<secret>` over SDS.
//! - RouteConfigurations `listener-insecure` (always) and `listener-secure`
//!   (with TLS); clusters `<ns>:<svc>:<port>` of type EDS with service name
//!   `<ns>/<svc>:<port>`.
//!
//! Cilium's Ingress features on top (see `docs/ingress.md`): TLS passthrough
//! (SNI filter chains with a TCP proxy, no termination), host network mode
//! (listener bound to the node's addresses on a host port), the PROXY
//! protocol listener filter, the default TLS secret, and the generated
//! Service's type, node ports, traffic policy, class and copied
//! annotations. Every `ingress.cilium.io/*` annotation is parsed as Cilium
//! parses it, with its aliases; invalid values are errors naming the
//! Ingress and the annotation.

mod annotations;
mod class;
mod conflicts;
mod envoy;
mod error;
mod layout;
mod model;
pub mod names;
pub mod pool;
mod references;
mod render;
mod shared;
mod translate;

pub use annotations::{
    ALIASES as ANNOTATION_ALIASES, FORCE_HTTPS, HOST_LISTENER_PORT, INSECURE_NODE_PORT,
    LOADBALANCER_CLASS, REQUEST_TIMEOUT, SECURE_NODE_PORT, SERVICE_EXTERNAL_TRAFFIC_POLICY,
    SERVICE_TYPE, ServiceType, TCP_KEEP_ALIVE, TCP_KEEP_ALIVE_IDLE, TCP_KEEP_ALIVE_PROBE_INTERVAL,
    TCP_KEEP_ALIVE_PROBE_MAX_FAILURES, TLS_PASSTHROUGH, WEBSOCKET, is_tls_passthrough,
};
pub use class::{
    CLASS_ANNOTATION, CLASS_NAME, CONTROLLER_NAME, DEFAULT_CLASS_ANNOTATION, ingress_class_of,
    is_managed,
};
pub use envoy::{CLUSTER_TYPE, LISTENER_TYPE, ROUTE_CONFIGURATION_TYPE};
pub use error::IngressError;
pub use layout::{
    BY_INGRESS, IngressOrder, LAYOUT_ANNOTATION, LayoutOutput, ORDER_FIELD, RouteKey, RouteOrder,
    SharedLayout, is_by_ingress,
};
pub use model::SecretRef;
pub use pool::{Pool, PoolError, lb_ip};
pub use references::{Lookup, TLS_SECRET_TYPE, validate_references, validate_references_with};
pub use render::{cecs_to_yaml, to_yaml};
pub use shared::{
    ClusterTranslation, FRAGMENT_SEP, IngressRejection, LOADBALANCER_MODE, LoadBalancerMode,
    MAX_OBJECT_BYTES, SHARED_PART_OF_LABEL, SHARED_PORTS, SharedOutcome, SharedPart,
    SharedTranslation, SplitError, join_shared_cecs, loadbalancer_mode, merge_shared,
    merge_shared_preferring, shared_part, shared_part_of, split_shared_cec, translate_cluster,
    translate_shared,
};
pub use translate::{
    DEFAULT_HOST_LISTENER_PORT, DEFAULT_LB_ANNOTATION_PREFIXES, HostNetwork, INGRESS_LABEL,
    PLACEHOLDER_ENDPOINT, SERVICE_NAME_LABEL, TranslateOptions, Translation,
    USE_ORIGINAL_SOURCE_ADDRESS_LABEL, translate, translate_all,
};
