//! Envoy: its bootstrap and its process.

pub mod bootstrap;
pub mod supervisor;

pub use bootstrap::XdsProtocol;
pub use supervisor::{EnvoyError, EnvoyOptions, EnvoyState, find_envoy, supervise};
