//! Errors of Ingress translation and reference validation.
//!
//! Every variant names the Ingress (`namespace/name`) and the offending field
//! so that the message can be shown to a user as is (status, events, CLI).

use thiserror::Error;

/// Why an Ingress could not be translated or is not ready to be served.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IngressError {
    /// A generated object could not be rendered as YAML (a bug, not bad input).
    #[error("rendering CiliumEnvoyConfig YAML: {0}")]
    Render(String),
    /// The Ingress has no `metadata.name`.
    #[error("Ingress in namespace {namespace}: metadata.name: required")]
    MissingName { namespace: String },

    /// A field has a value Membrane cannot use.
    #[error("Ingress {ingress}: {field}: {reason}")]
    InvalidField {
        ingress: String,
        field: String,
        reason: String,
    },

    /// An `ImplementationSpecific` path is not a valid regular expression.
    #[error("Ingress {ingress}: {field}: invalid regular expression {regex:?}: {reason}")]
    InvalidRegex {
        ingress: String,
        field: String,
        regex: String,
        reason: String,
    },

    /// A backend refers to a resource instead of a Service.
    #[error(
        "Ingress {ingress}: {field}: resource backends are not supported, use a Service backend"
    )]
    UnsupportedResourceBackend { ingress: String, field: String },

    /// An `ingress.cilium.io/*` annotation has a value that cannot be parsed.
    #[error(
        "Ingress {ingress}: metadata.annotations[{annotation}]: invalid value {value:?}: {reason}"
    )]
    InvalidAnnotation {
        ingress: String,
        annotation: String,
        value: String,
        reason: String,
    },

    /// A referenced Service does not exist.
    #[error("Ingress {ingress}: {field}: Service {service} not found")]
    ServiceNotFound {
        ingress: String,
        field: String,
        service: String,
    },

    /// A referenced Service exists but has no such port.
    #[error("Ingress {ingress}: {field}: Service {service} has no port {port}")]
    ServicePortNotFound {
        ingress: String,
        field: String,
        service: String,
        port: String,
    },

    /// A referenced TLS Secret does not exist.
    #[error("Ingress {ingress}: {field}: Secret {secret} not found")]
    SecretNotFound {
        ingress: String,
        field: String,
        secret: String,
    },

    /// Shared load-balancer mode: an older Ingress already serves this host
    /// and path (or this TLS host with another certificate).
    #[error(
        "Ingress {ingress}: {field}: {what} is already served by Ingress {owner} on the shared load balancer (the older Ingress wins)"
    )]
    SharedConflict {
        ingress: String,
        field: String,
        what: String,
        owner: String,
    },

    /// A referenced TLS Secret exists but cannot serve as a certificate.
    #[error("Ingress {ingress}: {field}: Secret {secret} {reason}")]
    InvalidSecret {
        ingress: String,
        field: String,
        secret: String,
        reason: String,
    },
}

impl IngressError {
    /// The field path (or `metadata.annotations[...]`) the error is about.
    pub fn field(&self) -> String {
        match self {
            IngressError::MissingName { .. } => "metadata.name".to_string(),
            IngressError::Render(_) => String::new(),
            IngressError::InvalidAnnotation { annotation, .. } => {
                format!("metadata.annotations[{annotation}]")
            }
            IngressError::InvalidField { field, .. }
            | IngressError::InvalidRegex { field, .. }
            | IngressError::UnsupportedResourceBackend { field, .. }
            | IngressError::ServiceNotFound { field, .. }
            | IngressError::ServicePortNotFound { field, .. }
            | IngressError::SecretNotFound { field, .. }
            | IngressError::InvalidSecret { field, .. }
            | IngressError::SharedConflict { field, .. } => field.clone(),
        }
    }
}
