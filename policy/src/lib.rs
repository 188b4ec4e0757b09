//! Membrane's L3/L4 network policy, pure (no I/O).
//!
//! Endpoints (pod labels + namespace + the namespace's labels) get numeric
//! security identities ([`identity`]); CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy and Kubernetes NetworkPolicy become
//! [`rules::Rule`]s with Cilium's semantics ([`rules`]); [`engine::State`]
//! resolves them against the cluster into an ipcache and per-endpoint
//! policy map entries keyed by (direction, identity, protocol, port prefix),
//! and evaluates or traces single packets with a straightforward reference
//! evaluator that the compiled form is tested against.

pub mod engine;
pub mod identity;
pub mod labels;
pub mod manifest;
pub mod rules;

pub use engine::{
    Cluster, Decision, Endpoint, EndpointPolicy, NamedPort, PolicyEntry, Reason, State, Trace,
    TraceEnd, Verdict, l4_key,
};
pub use identity::{ANY_IDENTITY, Identities, IpCache, Reserved};
pub use rules::{Direction, PolicySet, RuleRef};

/// A policy that cannot be (fully) translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{object}: {field}: {message}")]
    Invalid {
        object: String,
        field: String,
        message: String,
    },
}

impl PolicyError {
    /// An error whose object is filled in by the caller.
    pub(crate) fn field(field: &str, message: String) -> Self {
        PolicyError::Invalid {
            object: String::new(),
            field: field.to_string(),
            message,
        }
    }

    pub(crate) fn in_object(self, object: &str) -> Self {
        match self {
            PolicyError::Invalid { field, message, .. } => PolicyError::Invalid {
                object: object.to_string(),
                field,
                message,
            },
        }
    }
}
