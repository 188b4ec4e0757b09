//! The CNI plugin `membrane-cni` (CNI spec 1.0.0 and 1.1.0) and the small
//! wire protocol it speaks with the agent over a unix socket.
//!
//! The plugin is deliberately thin: it parses what the runtime gives it
//! (environment + network configuration on stdin), forwards one request to
//! the agent and prints the agent's answer in the spec's JSON. All state
//! (IPAM, veths, routes, the endpoint registry) lives in the agent, so the
//! binary stays small and has no async runtime.

pub mod plugin;
pub mod spec;
pub mod wire;

pub use plugin::{Env, run};
pub use spec::{CniError, ErrorCode, NetConf};
