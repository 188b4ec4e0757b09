//! Checks that what an Ingress refers to exists and is usable: backend
//! Services with the referenced port, TLS Secrets with a certificate and key.
//!
//! Separate from translation so a missing Service can be reported (status,
//! events) while the translation itself stays a pure function of the Ingress.

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};

use crate::error::IngressError;
use crate::model::{SecretRef, identity};

/// Read access to the objects an Ingress may reference.
pub trait Lookup {
    fn service(&self, namespace: &str, name: &str) -> Option<&Service>;
    fn secret(&self, namespace: &str, name: &str) -> Option<&Secret>;
}

/// Secret type of a TLS certificate.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
const TLS_CERT_KEY: &str = "tls.crt";
const TLS_KEY_KEY: &str = "tls.key";

/// Returns the first broken reference of the Ingress, in spec order
/// (default backend, rules, then TLS).
pub fn validate_references(ing: &Ingress, lookup: &dyn Lookup) -> Result<(), IngressError> {
    validate_references_with(ing, lookup, None)
}

/// [`validate_references`], where TLS entries without `secretName` use
/// `default_secret` (which must then exist and be usable). The TLS section
/// of a TLS passthrough Ingress is not used, so it is not checked.
pub fn validate_references_with(
    ing: &Ingress,
    lookup: &dyn Lookup,
    default_secret: Option<&SecretRef>,
) -> Result<(), IngressError> {
    let (namespace, name) = identity(ing)?;
    let ingress_id = format!("{namespace}/{name}");
    let Some(spec) = &ing.spec else {
        return Ok(());
    };

    let passthrough = crate::annotations::is_tls_passthrough(ing);
    if let Some(backend) = spec.default_backend.as_ref().filter(|_| !passthrough) {
        check_backend(
            backend,
            &namespace,
            &ingress_id,
            "spec.defaultBackend",
            lookup,
        )?;
    }
    // A TLS passthrough Ingress only uses the `/` paths of rules with a
    // host (see the model); what it ignores is not checked either.
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        if passthrough && rule.host.as_deref().is_none_or(str::is_empty) {
            continue;
        }
        for (j, path) in rule.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
            if passthrough && path.path.as_deref() != Some("/") {
                continue;
            }
            let field = format!("spec.rules[{i}].http.paths[{j}].backend");
            check_backend(&path.backend, &namespace, &ingress_id, &field, lookup)?;
        }
    }
    for (t, tls) in spec.tls.iter().flatten().enumerate() {
        if passthrough {
            break;
        }
        let (secret_ns, secret_name, field) =
            match tls.secret_name.as_deref().filter(|s| !s.is_empty()) {
                Some(s) => (namespace.as_str(), s, format!("spec.tls[{t}].secretName")),
                None => match default_secret {
                    Some(d) => (
                        d.namespace.as_str(),
                        d.name.as_str(),
                        format!("spec.tls[{t}].secretName (unset: the default TLS secret)"),
                    ),
                    None => continue,
                },
            };
        let secret_id = format!("{secret_ns}/{secret_name}");
        let secret =
            lookup
                .secret(secret_ns, secret_name)
                .ok_or_else(|| IngressError::SecretNotFound {
                    ingress: ingress_id.clone(),
                    field: field.clone(),
                    secret: secret_id.clone(),
                })?;
        check_tls_secret(secret).map_err(|reason| IngressError::InvalidSecret {
            ingress: ingress_id.clone(),
            field,
            secret: secret_id,
            reason,
        })?;
    }
    Ok(())
}

fn check_backend(
    backend: &IngressBackend,
    namespace: &str,
    ingress: &str,
    field: &str,
    lookup: &dyn Lookup,
) -> Result<(), IngressError> {
    if backend.resource.is_some() {
        return Err(IngressError::UnsupportedResourceBackend {
            ingress: ingress.to_string(),
            field: format!("{field}.resource"),
        });
    }
    let Some(svc_ref) = &backend.service else {
        return Err(IngressError::InvalidField {
            ingress: ingress.to_string(),
            field: format!("{field}.service"),
            reason: "required".to_string(),
        });
    };
    let service_id = format!("{namespace}/{}", svc_ref.name);
    let service =
        lookup
            .service(namespace, &svc_ref.name)
            .ok_or_else(|| IngressError::ServiceNotFound {
                ingress: ingress.to_string(),
                field: format!("{field}.service.name"),
                service: service_id.clone(),
            })?;
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let port_ref = svc_ref.port.as_ref();
    let number = port_ref.and_then(|p| p.number).filter(|n| *n != 0);
    let name = port_ref
        .and_then(|p| p.name.as_deref())
        .filter(|n| !n.is_empty());
    let (found, port_field, port_text) = match (number, name) {
        (Some(n), _) => (
            ports.iter().any(|p| p.port == n),
            "service.port.number",
            n.to_string(),
        ),
        (None, Some(name)) => (
            ports.iter().any(|p| p.name.as_deref() == Some(name)),
            "service.port.name",
            name.to_string(),
        ),
        (None, None) => {
            return Err(IngressError::InvalidField {
                ingress: ingress.to_string(),
                field: format!("{field}.service.port"),
                reason: "needs a port number or a port name".to_string(),
            });
        }
    };
    if !found {
        return Err(IngressError::ServicePortNotFound {
            ingress: ingress.to_string(),
            field: format!("{field}.{port_field}"),
            service: service_id,
            port: port_text,
        });
    }
    Ok(())
}

/// A usable TLS Secret: type `kubernetes.io/tls`, or an untyped/Opaque
/// Secret that has both keys; `tls.crt` and `tls.key` non-empty in `data`
/// or `stringData` (manifests applied locally are never normalised by an
/// API server).
fn check_tls_secret(secret: &Secret) -> Result<(), String> {
    let value_len = |key: &str| -> Option<usize> {
        let from_data = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| v.0.len());
        let from_string = secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(String::len);
        match (from_data, from_string) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
        }
    };
    let cert = value_len(TLS_CERT_KEY);
    let key = value_len(TLS_KEY_KEY);
    let typed = secret.type_.as_deref() == Some(TLS_SECRET_TYPE);
    if !typed && (cert.is_none() || key.is_none()) {
        return Err(format!(
            "is of type {:?}, expected {TLS_SECRET_TYPE:?} (or both {TLS_CERT_KEY} and {TLS_KEY_KEY})",
            secret.type_.as_deref().unwrap_or("Opaque")
        ));
    }
    for (k, len) in [(TLS_CERT_KEY, cert), (TLS_KEY_KEY, key)] {
        if len.unwrap_or(0) == 0 {
            return Err(format!("has no {k} or it is empty"));
        }
    }
    Ok(())
}
