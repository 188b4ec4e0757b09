use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, NamespaceStatus, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass, NetworkPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use membrane_crds::{
    CiliumClusterwideEnvoyConfig, CiliumClusterwideNetworkPolicy, CiliumEnvoyConfig,
    CiliumNetworkPolicy, CiliumNode, ProxyNodeStatus,
};
use serde_json::Value;

use crate::{Kind, StoreError};

/// Identity of an object: kind, namespace ("" when cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// Builds a key; the namespace is dropped for cluster-scoped kinds and
    /// defaults to "default" for namespaced ones, as the API server does.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
        let namespace = if !kind.namespaced() {
            String::new()
        } else if namespace.is_empty() {
            "default".to_string()
        } else {
            namespace.to_string()
        };
        ObjectKey {
            kind,
            namespace,
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One object of any kind the store holds.
// Every stored object is allocated at the size of the largest variant, so
// the one outlier (a `Pod`, 2.4 KB against at most ~0.8 KB for the others)
// is boxed: unboxed it cost every Ingress, Service, slice and CEC in the
// store 2.5 KB. Boxing the rest would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Object {
    Ingress(Ingress),
    IngressClass(IngressClass),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Endpoints(Endpoints),
    Secret(Secret),
    Namespace(Namespace),
    CiliumEnvoyConfig(CiliumEnvoyConfig),
    CiliumClusterwideEnvoyConfig(CiliumClusterwideEnvoyConfig),
    CiliumNetworkPolicy(CiliumNetworkPolicy),
    CiliumClusterwideNetworkPolicy(CiliumClusterwideNetworkPolicy),
    NetworkPolicy(NetworkPolicy),
    Pod(Box<Pod>),
    CiliumNode(CiliumNode),
    ProxyNodeStatus(ProxyNodeStatus),
}

impl PartialEq for Object {
    fn eq(&self, other: &Object) -> bool {
        // The CRD root types do not derive PartialEq; compare their parts.
        match (self, other) {
            (Object::Ingress(a), Object::Ingress(b)) => a == b,
            (Object::IngressClass(a), Object::IngressClass(b)) => a == b,
            (Object::Service(a), Object::Service(b)) => a == b,
            (Object::EndpointSlice(a), Object::EndpointSlice(b)) => a == b,
            (Object::Endpoints(a), Object::Endpoints(b)) => a == b,
            (Object::Secret(a), Object::Secret(b)) => a == b,
            (Object::Namespace(a), Object::Namespace(b)) => a == b,
            (Object::CiliumEnvoyConfig(a), Object::CiliumEnvoyConfig(b)) => {
                a.metadata == b.metadata && a.spec == b.spec
            }
            (Object::CiliumClusterwideEnvoyConfig(a), Object::CiliumClusterwideEnvoyConfig(b)) => {
                a.metadata == b.metadata && a.spec == b.spec
            }
            (Object::CiliumNetworkPolicy(a), Object::CiliumNetworkPolicy(b)) => a == b,
            (
                Object::CiliumClusterwideNetworkPolicy(a),
                Object::CiliumClusterwideNetworkPolicy(b),
            ) => a == b,
            (Object::NetworkPolicy(a), Object::NetworkPolicy(b)) => a == b,
            (Object::Pod(a), Object::Pod(b)) => a == b,
            (Object::CiliumNode(a), Object::CiliumNode(b)) => {
                a.metadata == b.metadata && a.spec == b.spec && a.status == b.status
            }
            (Object::ProxyNodeStatus(a), Object::ProxyNodeStatus(b)) => {
                a.metadata == b.metadata && a.spec == b.spec && a.status == b.status
            }
            _ => false,
        }
    }
}

/// Runs `$body` with `$o` bound to the inner typed object of any variant.
macro_rules! dispatch {
    ($obj:expr, $o:ident => $body:expr) => {
        match $obj {
            Object::Ingress($o) => $body,
            Object::IngressClass($o) => $body,
            Object::Service($o) => $body,
            Object::EndpointSlice($o) => $body,
            Object::Endpoints($o) => $body,
            Object::Secret($o) => $body,
            Object::Namespace($o) => $body,
            Object::CiliumEnvoyConfig($o) => $body,
            Object::CiliumClusterwideEnvoyConfig($o) => $body,
            Object::CiliumNetworkPolicy($o) => $body,
            Object::CiliumClusterwideNetworkPolicy($o) => $body,
            Object::NetworkPolicy($o) => $body,
            Object::Pod($o) => $body,
            Object::CiliumNode($o) => $body,
            Object::ProxyNodeStatus($o) => $body,
        }
    };
}

/// Typed access to the variants of [`Object`].
pub trait Typed: Sized + Clone {
    const KIND: Kind;
    fn from_object(o: &Object) -> Option<&Self>;
    fn into_object(self) -> Object;
}

macro_rules! typed {
    ($($variant:ident),* $(,)?) => {$(
        impl Typed for $variant {
            const KIND: Kind = Kind::$variant;
            fn from_object(o: &Object) -> Option<&Self> {
                match o {
                    Object::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_object(self) -> Object {
                Object::$variant(self)
            }
        }
        impl From<$variant> for Object {
            fn from(v: $variant) -> Object {
                Object::$variant(v)
            }
        }
    )*};
}

typed!(
    Ingress,
    IngressClass,
    Service,
    EndpointSlice,
    Endpoints,
    Secret,
    Namespace,
    CiliumEnvoyConfig,
    CiliumClusterwideEnvoyConfig,
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
    CiliumNode,
    ProxyNodeStatus,
);

impl Typed for Pod {
    const KIND: Kind = Kind::Pod;
    fn from_object(o: &Object) -> Option<&Self> {
        match o {
            Object::Pod(v) => Some(v),
            _ => None,
        }
    }
    fn into_object(self) -> Object {
        Object::Pod(Box::new(self))
    }
}

impl From<Pod> for Object {
    fn from(v: Pod) -> Object {
        Object::Pod(Box::new(v))
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Ingress(_) => Kind::Ingress,
            Object::IngressClass(_) => Kind::IngressClass,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Endpoints(_) => Kind::Endpoints,
            Object::Secret(_) => Kind::Secret,
            Object::Namespace(_) => Kind::Namespace,
            Object::CiliumEnvoyConfig(_) => Kind::CiliumEnvoyConfig,
            Object::CiliumClusterwideEnvoyConfig(_) => Kind::CiliumClusterwideEnvoyConfig,
            Object::CiliumNetworkPolicy(_) => Kind::CiliumNetworkPolicy,
            Object::CiliumClusterwideNetworkPolicy(_) => Kind::CiliumClusterwideNetworkPolicy,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Pod(_) => Kind::Pod,
            Object::CiliumNode(_) => Kind::CiliumNode,
            Object::ProxyNodeStatus(_) => Kind::ProxyNodeStatus,
        }
    }

    /// The key, with the namespace defaulted as the store would.
    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        ObjectKey::new(
            self.kind(),
            meta.namespace.as_deref().unwrap_or(""),
            meta.name.as_deref().unwrap_or(""),
        )
    }

    pub fn meta(&self) -> &ObjectMeta {
        dispatch!(self, o => &o.metadata)
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        dispatch!(self, o => &mut o.metadata)
    }

    /// Parses a JSON/YAML value with `apiVersion` and `kind` into an object.
    ///
    /// Errors name the offending field path (`spec.rules[0].host: ...`).
    /// Unknown fields are rejected, like the API server's strict field
    /// validation, so a misspelt field is an error instead of being dropped.
    /// Secrets given with `stringData` are converted to `data`.
    pub fn from_value(v: Value) -> Result<Object, StoreError> {
        let Some(map) = v.as_object() else {
            return Err(StoreError::NotManifest(format!(
                "expected an object with apiVersion and kind, found {}",
                value_type(&v)
            )));
        };
        if !map.contains_key("apiVersion") && !map.contains_key("kind") {
            return Err(StoreError::NotManifest(
                "apiVersion: required field is missing (and kind)".into(),
            ));
        }
        let api_version = required_str(map, "apiVersion")?;
        let kind_name = required_str(map, "kind")?;
        let Some(kind) = Kind::from_type(api_version, kind_name) else {
            return Err(StoreError::UnknownKind {
                api_version: api_version.to_string(),
                kind: kind_name.to_string(),
            });
        };
        match map.get("metadata").and_then(|m| m.get("name")) {
            None | Some(Value::Null) => {
                return Err(StoreError::Invalid(
                    "metadata.name: required field is missing".into(),
                ));
            }
            Some(Value::String(s)) if s.is_empty() => {
                return Err(StoreError::Invalid(
                    "metadata.name: must not be empty".into(),
                ));
            }
            _ => {}
        }
        // Deserialised from a borrow: the input is kept for the unknown-field
        // check without a second copy.
        let mut obj = match kind {
            Kind::Ingress => Object::Ingress(typed_from(&v)?),
            Kind::IngressClass => Object::IngressClass(typed_from(&v)?),
            Kind::Service => Object::Service(typed_from(&v)?),
            Kind::EndpointSlice => Object::EndpointSlice(typed_from(&v)?),
            Kind::Endpoints => Object::Endpoints(typed_from(&v)?),
            Kind::Secret => Object::Secret(typed_from(&v)?),
            Kind::Namespace => Object::Namespace(typed_from(&v)?),
            Kind::CiliumEnvoyConfig => Object::CiliumEnvoyConfig(typed_from(&v)?),
            Kind::CiliumClusterwideEnvoyConfig => {
                Object::CiliumClusterwideEnvoyConfig(typed_from(&v)?)
            }
            Kind::CiliumNetworkPolicy => Object::CiliumNetworkPolicy(typed_from(&v)?),
            Kind::CiliumClusterwideNetworkPolicy => {
                Object::CiliumClusterwideNetworkPolicy(typed_from(&v)?)
            }
            Kind::NetworkPolicy => Object::NetworkPolicy(typed_from(&v)?),
            Kind::Pod => Object::Pod(Box::new(typed_from(&v)?)),
            Kind::CiliumNode => Object::CiliumNode(typed_from(&v)?),
            Kind::ProxyNodeStatus => Object::ProxyNodeStatus(typed_from(&v)?),
        };
        let mut unknown = Vec::new();
        unknown_fields(&v, &obj.to_value(), &mut String::new(), &mut unknown);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown.iter().map(|p| format!("{p:?}")).collect();
            return Err(StoreError::Invalid(format!(
                "unknown field{} {}",
                if list.len() > 1 { "s" } else { "" },
                list.join(", ")
            )));
        }
        validate_names(&obj)?;
        obj.normalize();
        Ok(obj)
    }

    /// The object as JSON; always includes `apiVersion` and `kind`.
    pub fn to_value(&self) -> Value {
        // Serialising these types cannot fail (string-keyed maps only); fall
        // back to an empty object rather than panic.
        let mut v = dispatch!(self, o => serde_json::to_value(o))
            .unwrap_or_else(|_| Value::Object(Default::default()));
        if let Value::Object(map) = &mut v {
            let kind = self.kind();
            map.insert("apiVersion".into(), kind.api_version().into());
            map.insert("kind".into(), kind.kind_name().into());
        }
        v
    }

    /// Applies the API server's ingest defaults that do not depend on stored
    /// state: namespace defaulting/clearing and Secret `stringData` → `data`.
    pub(crate) fn normalize(&mut self) {
        let kind = self.kind();
        let meta = self.meta_mut();
        if kind.namespaced() {
            if meta.namespace.as_deref().is_none_or(str::is_empty) {
                meta.namespace = Some("default".into());
            }
        } else {
            meta.namespace = None;
        }
        if let Object::Secret(secret) = self
            && let Some(string_data) = secret.string_data.take()
        {
            let data = secret.data.get_or_insert_with(BTreeMap::new);
            for (k, v) in string_data {
                // stringData wins over data for the same key, as in Kubernetes.
                data.insert(k, ByteString(v.into_bytes()));
            }
        }
    }

    /// True when the object's kind has no status or its status is unset.
    pub(crate) fn status_is_none(&self) -> bool {
        match self {
            Object::Ingress(o) => o.status.is_none(),
            Object::Service(o) => o.status.is_none(),
            Object::Namespace(o) => o.status.is_none(),
            Object::Pod(o) => o.status.is_none(),
            Object::CiliumNode(o) => o.status.is_none(),
            Object::ProxyNodeStatus(o) => o.status.is_none(),
            _ => true,
        }
    }

    /// Unsets the status (kinds without one are left as they are).
    pub(crate) fn clear_status(&mut self) {
        match self {
            Object::Ingress(o) => o.status = None,
            Object::Service(o) => o.status = None,
            Object::Namespace(o) => o.status = None,
            Object::Pod(o) => o.status = None,
            Object::CiliumNode(o) => o.status = None,
            Object::ProxyNodeStatus(o) => o.status = None,
            _ => {}
        }
    }

    /// Copies the status of `other` (same kind) into `self`.
    pub(crate) fn copy_status_from(&mut self, other: &Object) {
        match (self, other) {
            (Object::Ingress(a), Object::Ingress(b)) => a.status.clone_from(&b.status),
            (Object::Service(a), Object::Service(b)) => a.status.clone_from(&b.status),
            (Object::Namespace(a), Object::Namespace(b)) => a.status.clone_from(&b.status),
            (Object::Pod(a), Object::Pod(b)) => a.status.clone_from(&b.status),
            (Object::CiliumNode(a), Object::CiliumNode(b)) => a.status.clone_from(&b.status),
            (Object::ProxyNodeStatus(a), Object::ProxyNodeStatus(b)) => {
                a.status.clone_from(&b.status)
            }
            _ => {}
        }
    }

    /// Sets the status from JSON. Fails when the kind has no status or the
    /// value does not fit the kind's status type.
    pub(crate) fn set_status_value(&mut self, status: Value) -> Result<(), StoreError> {
        fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<Option<T>, StoreError> {
            if v.is_null() {
                return Ok(None);
            }
            serde_path_to_error::deserialize(v)
                .map(Some)
                .map_err(|e| StoreError::Invalid(format!("status.{}: {}", e.path(), e.inner())))
        }
        match self {
            Object::Ingress(o) => o.status = parse(status)?,
            Object::Service(o) => o.status = parse(status)?,
            Object::Namespace(o) => o.status = parse(status)?,
            Object::Pod(o) => o.status = parse(status)?,
            Object::CiliumNode(o) => o.status = parse(status)?,
            Object::ProxyNodeStatus(o) => o.status = parse(status)?,
            other => {
                return Err(StoreError::Invalid(format!(
                    "{} has no status",
                    other.kind()
                )));
            }
        }
        Ok(())
    }

    /// Defaults a new object's status the way controllers in a real cluster
    /// would immediately (a Namespace is `Active`).
    pub(crate) fn default_status(&mut self) {
        if let Object::Namespace(ns) = self
            && ns.status.is_none()
        {
            ns.status = Some(NamespaceStatus {
                phase: Some("Active".into()),
                ..Default::default()
            });
        }
    }

    /// A copy without metadata and status: what `generation` tracks.
    pub(crate) fn body(&self) -> Object {
        let mut o = self.clone();
        *o.meta_mut() = ObjectMeta::default();
        o.clear_status();
        o
    }
}

fn value_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn required_str<'a>(
    map: &'a serde_json::Map<String, Value>,
    field: &str,
) -> Result<&'a str, StoreError> {
    match map.get(field) {
        None | Some(Value::Null) => Err(StoreError::Invalid(format!(
            "{field}: required field is missing"
        ))),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(other) => Err(StoreError::Invalid(format!(
            "{field}: expected a non-empty string, found {}",
            value_type(other)
        ))),
    }
}

fn typed_from<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, StoreError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        if path.is_empty() || path == "." {
            StoreError::Invalid(e.inner().to_string())
        } else {
            StoreError::Invalid(format!("{path}: {}", e.inner()))
        }
    })
}

/// Collects paths present in `input` but absent from `output` (the typed
/// round trip). Nulls are ignored: they mean "unset".
fn unknown_fields(input: &Value, output: &Value, path: &mut String, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match b.get(k) {
                    Some(w) => unknown_fields(v, w, path, out),
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                unknown_fields(v, w, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Name rules of the API server: DNS-1123 subdomains for most names, DNS-1123
/// labels for namespaces, DNS-1035 labels for Services.
fn validate_names(obj: &Object) -> Result<(), StoreError> {
    let meta = obj.meta();
    let name = meta.name.as_deref().unwrap_or("");
    match obj.kind() {
        Kind::Namespace => {
            check_label(name, false).map_err(|m| name_error("metadata.name", name, m))?
        }
        Kind::Service => {
            check_label(name, true).map_err(|m| name_error("metadata.name", name, m))?
        }
        _ => check_subdomain(name).map_err(|m| name_error("metadata.name", name, m))?,
    }
    if let Some(ns) = meta.namespace.as_deref().filter(|ns| !ns.is_empty())
        && obj.kind().namespaced()
    {
        check_label(ns, false).map_err(|m| name_error("metadata.namespace", ns, m))?;
    }
    Ok(())
}

fn name_error(field: &str, value: &str, message: &str) -> StoreError {
    StoreError::Invalid(format!("{field}: invalid value {value:?}: {message}"))
}

fn check_label(s: &str, must_start_with_letter: bool) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters");
    }
    if must_start_with_letter && !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(
            "must start with a lower-case letter and consist of lower-case letters, digits and '-'",
        );
    }
    check_label_chars(s)
}

fn check_label_chars(s: &str) -> Result<(), &'static str> {
    let ok_chars = s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ok_ends = s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok_chars && ok_ends {
        Ok(())
    } else {
        Err(
            "must consist of lower-case letters, digits and '-', and start and end with a letter or digit",
        )
    }
}

fn check_subdomain(s: &str) -> Result<(), &'static str> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters");
    }
    for part in s.split('.') {
        check_label_chars(part).map_err(|_| {
            "must consist of lower-case letters, digits, '-' and '.', and start and end with a letter or digit"
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Each stored object is allocated at the size of the largest
    /// variant: an unboxed large type would multiply the store's memory.
    #[test]
    fn no_variant_inflates_every_object() {
        let size = std::mem::size_of::<super::Object>();
        assert!(
            size <= 1024,
            "Object is {size} bytes; box the large variant"
        );
    }
}
