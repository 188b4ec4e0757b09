//! Load-balancing tables for Membrane. Pure: no I/O.
//!
//! The Maglev implementation reproduces Cilium's `pkg/maglev` bit for bit so a
//! mixed Cilium/Membrane fleet maps every flow to the same backend.

pub mod affinity;
pub mod cli;
pub mod maglev;
pub mod murmur3;
pub mod service;

pub use cli::{LbError, MaglevArgs, OutputFormat, maglev_command};
