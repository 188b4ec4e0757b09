//! Envoy: its bootstrap and its process.

pub mod bootstrap;
pub mod supervisor;

pub use bootstrap::{ADMIN_CLUSTER, BOOTSTRAP_CLUSTERS, XdsProtocol};
pub use supervisor::{EnvoyError, EnvoyOptions, EnvoyState, admin_get, find_envoy, supervise};
