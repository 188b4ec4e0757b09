//! EDS: ClusterLoadAssignments named `<ns>/<svc>:<port>` (and
//! `<ns>/<svc>:<port-name>` for named ports) built from a Service and its
//! ready endpoints. EndpointSlice ports carry the resolved target port, so
//! a Service port is matched to a slice port by name, as kube-proxy does.
//!
//! Services and EndpointSlices are validated here, where the object is: a
//! bad slice (port out of range, an address that is not an IP of its
//! `addressType`, FQDN endpoints) is rejected alone and replaced by its last
//! good version, so Envoy is never sent what it would NACK and the Service
//! keeps its other slices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use membrane_store::{Kind, Object, ObjectKey, StoreSnapshot};

use crate::envoy_pb::*;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service an EndpointSlice belongs to: `(namespace, name)` from its
/// `kubernetes.io/service-name` label.
pub fn slice_service(obj: &Object) -> Option<(String, String)> {
    let Object::EndpointSlice(s) = obj else {
        return None;
    };
    let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        s.metadata.namespace.clone().unwrap_or_default(),
        svc.clone(),
    ))
}

/// Assignments for the ports of Service `ns/name` selected by `ports` (port
/// numbers or names as strings; empty selects all). A missing Service, a
/// missing port or a Service without ready endpoints gives empty
/// assignments so clusters warm up and answer 503 rather than hang.
pub fn load_assignments(
    snap: &StoreSnapshot,
    ns: &str,
    name: &str,
    ports: &[String],
) -> Vec<ClusterLoadAssignment> {
    let mut v = Validator::default();
    v.refresh(snap);
    SliceIndex::with_validator(snap, &v).assignments(snap, ns, name, ports)
}

/// Whether `port` is a usable TCP/UDP port number.
fn port_error(port: i32) -> Option<String> {
    (!(1..=65535).contains(&port)).then(|| format!("{port} is not a valid port (1-65535)"))
}

/// Why a Service cannot be used for EDS, as `field: message`.
pub fn validate_service(svc: &Service) -> Result<(), String> {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    for (i, p) in ports.into_iter().flatten().enumerate() {
        if let Some(e) = port_error(p.port) {
            return Err(format!("spec.ports[{i}].port: {e}"));
        }
        if let Some(IntOrString::Int(t)) = &p.target_port
            && let Some(e) = port_error(*t)
        {
            return Err(format!("spec.ports[{i}].targetPort: {e}"));
        }
    }
    Ok(())
}

/// Why an EndpointSlice cannot be used for EDS, as `field: message`.
pub fn validate_slice(slice: &EndpointSlice) -> Result<(), String> {
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        other => {
            return Err(format!(
                "addressType: {other:?} is not supported: Envoy needs IPv4 or IPv6 addresses"
            ));
        }
    };
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // An unset port means "all ports" (unused by Services with ports).
        if let Some(e) = p.port.and_then(port_error) {
            return Err(format!("ports[{i}].port: {e}"));
        }
    }
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        for (j, addr) in ep.addresses.iter().enumerate() {
            let ok = if v6 {
                addr.parse::<Ipv6Addr>().is_ok()
            } else {
                addr.parse::<Ipv4Addr>().is_ok()
            };
            if !ok {
                let family = if v6 { "IPv6" } else { "IPv4" };
                return Err(format!(
                    "endpoints[{i}].addresses[{j}]: {addr:?} is not an {family} address"
                ));
            }
        }
    }
    Ok(())
}

/// One object's validation, cached per resourceVersion.
struct Checked {
    resource_version: String,
    error: Option<String>,
    /// The latest version that passed.
    good: Option<Arc<Object>>,
}

/// Validates Services and EndpointSlices once per version and remembers
/// each slice's last good version, which replaces a bad one.
#[derive(Default)]
pub struct Validator {
    checked: HashMap<ObjectKey, Checked>,
}

impl Validator {
    /// Check what changed in `snap`; forget what is gone.
    pub fn refresh(&mut self, snap: &StoreSnapshot) {
        let mut live = HashMap::with_capacity(self.checked.len());
        for kind in [Kind::Service, Kind::EndpointSlice] {
            for obj in snap.list(kind, None) {
                let key = obj.key();
                let entry = Self::check(self.checked.remove(&key), obj);
                live.insert(key, entry);
            }
        }
        self.checked = live;
    }

    /// Like [`Self::refresh`] for the objects `keys` only (the ones a store
    /// change touched); keys of other kinds are ignored.
    pub fn refresh_keys<'k>(
        &mut self,
        snap: &StoreSnapshot,
        keys: impl IntoIterator<Item = &'k ObjectKey>,
    ) {
        for key in keys {
            if !matches!(key.kind, Kind::Service | Kind::EndpointSlice) {
                continue;
            }
            let previous = self.checked.remove(key);
            if let Some(obj) = snap.get(key) {
                let entry = Self::check(previous, obj);
                self.checked.insert(key.clone(), entry);
            }
        }
    }

    /// Validate `obj` unless `previous` checked this very version.
    fn check(previous: Option<Checked>, obj: &Arc<Object>) -> Checked {
        let rv = obj.meta().resource_version.as_deref().unwrap_or_default();
        match previous {
            Some(c) if c.resource_version == rv => c,
            previous => {
                let error = match obj.as_ref() {
                    Object::Service(s) => validate_service(s).err(),
                    Object::EndpointSlice(s) => validate_slice(s).err(),
                    _ => None,
                };
                let good = if error.is_none() {
                    Some(obj.clone())
                } else {
                    previous.and_then(|p| p.good)
                };
                Checked {
                    resource_version: rv.to_owned(),
                    error,
                    good,
                }
            }
        }
    }

    /// Why `key` is rejected now, as [`Self::rejected`] words it.
    pub fn rejection(&self, key: &ObjectKey) -> Option<String> {
        let c = self.checked.get(key)?;
        let e = c.error.as_ref()?;
        let fallback = match (key.kind, &c.good) {
            (Kind::EndpointSlice, Some(_)) => "; serving its last good version",
            _ => "",
        };
        Some(format!("{key}: {e}{fallback}"))
    }

    /// Rejected Services and EndpointSlices, with why (naming the object).
    pub fn rejected(&self) -> BTreeMap<ObjectKey, String> {
        self.checked
            .iter()
            .filter(|(_, c)| c.error.is_some())
            .filter_map(|(k, _)| Some((k.clone(), self.rejection(k)?)))
            .collect()
    }

    /// Whether `key` is currently rejected.
    pub fn is_rejected(&self, key: &ObjectKey) -> bool {
        self.checked.get(key).is_some_and(|c| c.error.is_some())
    }

    /// The version of a slice to use: itself when valid, else its last
    /// good version, else none.
    fn usable<'a>(&'a self, key: &ObjectKey, current: &'a Arc<Object>) -> Option<&'a Arc<Object>> {
        match self.checked.get(key) {
            Some(c) if c.error.is_some() => c.good.as_ref(),
            _ => Some(current),
        }
    }
}

/// EndpointSlices by `(namespace, kubernetes.io/service-name)`, built once
/// per pass so finding a Service's slices does not scan every slice.
pub struct SliceIndex<'a> {
    by_service: HashMap<&'a str, HashMap<&'a str, Vec<&'a EndpointSlice>>>,
}

impl<'a> SliceIndex<'a> {
    /// The slices of `snap` as they are, unvalidated.
    pub fn new(snap: &'a StoreSnapshot) -> Self {
        Self::build(snap.typed::<EndpointSlice>(None))
    }

    /// The slices of `snap`, a rejected slice replaced by its last good
    /// version (or left out when it never had one).
    pub fn with_validator(snap: &'a StoreSnapshot, v: &'a Validator) -> Self {
        Self::build(
            snap.list(Kind::EndpointSlice, None)
                .filter_map(|obj| v.usable(&obj.key(), obj))
                .filter_map(|obj| match obj.as_ref() {
                    Object::EndpointSlice(s) => Some(s),
                    _ => None,
                }),
        )
    }

    /// Like [`Self::with_validator`] for the slices `keys` only (those of
    /// the Services a change touched), in the given order.
    pub fn with_validator_for<'k>(
        snap: &'a StoreSnapshot,
        v: &'a Validator,
        keys: impl IntoIterator<Item = &'k ObjectKey>,
    ) -> Self {
        Self::build(
            keys.into_iter()
                .filter_map(|k| v.usable(k, snap.get(k)?))
                .filter_map(|obj| match obj.as_ref() {
                    Object::EndpointSlice(s) => Some(s),
                    _ => None,
                }),
        )
    }

    fn build(slices: impl Iterator<Item = &'a EndpointSlice>) -> Self {
        let mut by_service: HashMap<&str, HashMap<&str, Vec<&EndpointSlice>>> = HashMap::new();
        for s in slices {
            let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            by_service
                .entry(ns)
                .or_default()
                .entry(svc.as_str())
                .or_default()
                .push(s);
        }
        Self { by_service }
    }

    fn slices(&self, ns: &str, name: &str) -> &[&'a EndpointSlice] {
        self.by_service
            .get(ns)
            .and_then(|m| m.get(name))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The (name, resourceVersion) of everything the assignments of
    /// `ns/name` are computed from: Service, legacy Endpoints, slices.
    fn input_iter<'s>(
        &'s self,
        snap: &'s StoreSnapshot,
        ns: &str,
        name: &str,
    ) -> impl Iterator<Item = (&'s str, &'s str)> {
        let meta = |m: &'s ObjectMeta| {
            (
                m.name.as_deref().unwrap_or_default(),
                m.resource_version.as_deref().unwrap_or_default(),
            )
        };
        let svc = snap
            .get_typed::<Service>(ns, name)
            .map(|s| meta(&s.metadata));
        let legacy = snap
            .get_typed::<Endpoints>(ns, name)
            .map(|e| meta(&e.metadata));
        [svc.unwrap_or(("", "")), legacy.unwrap_or(("", ""))]
            .into_iter()
            .chain(self.slices(ns, name).iter().map(move |s| meta(&s.metadata)))
    }

    /// See [`Self::inputs_equal`].
    pub fn inputs(&self, snap: &StoreSnapshot, ns: &str, name: &str) -> Vec<(String, String)> {
        self.input_iter(snap, ns, name)
            .map(|(n, rv)| (n.to_owned(), rv.to_owned()))
            .collect()
    }

    /// Whether the inputs of `ns/name` are still `cached` (from
    /// [`Self::inputs`]): equal inputs give equal assignments.
    pub fn inputs_equal(
        &self,
        snap: &StoreSnapshot,
        ns: &str,
        name: &str,
        cached: &[(String, String)],
    ) -> bool {
        self.input_iter(snap, ns, name)
            .eq(cached.iter().map(|(n, rv)| (n.as_str(), rv.as_str())))
    }

    /// The names of the slices behind `ns/name`'s assignments.
    pub fn slice_names(&self, ns: &str, name: &str) -> Vec<String> {
        self.slices(ns, name)
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect()
    }

    /// See [`load_assignments`]. Every selected port gets an assignment,
    /// empty when the Service, the port or ready endpoints are missing, so
    /// Envoy never waits for EDS that will not come.
    pub fn assignments(
        &self,
        snap: &StoreSnapshot,
        ns: &str,
        name: &str,
        ports: &[String],
    ) -> Vec<ClusterLoadAssignment> {
        let service_ports = snap
            .get_typed::<Service>(ns, name)
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        let slices = self.slices(ns, name);
        let legacy = snap.get_typed::<Endpoints>(ns, name);
        let mut out = Vec::new();
        // With no ports listed Cilium also publishes `<ns>/<svc>` with the
        // backends of every port (its examples' EDS clusters use that name).
        let mut all_ports = BTreeSet::new();
        let mut found: BTreeSet<&str> = BTreeSet::new();
        for sp in &service_ports {
            // A bad port is reported on the Service; the others still serve.
            if port_error(sp.port).is_some() {
                continue;
            }
            let port_name = sp.name.clone().unwrap_or_default();
            let number = sp.port.to_string();
            let matches: Vec<&String> = ports
                .iter()
                .filter(|p| **p == number || (!port_name.is_empty() && **p == port_name))
                .collect();
            if !ports.is_empty() && matches.is_empty() {
                continue;
            }
            found.extend(matches.iter().map(|p| p.as_str()));
            let backends = if slices.is_empty() {
                legacy.map(|e| from_endpoints(e, sp)).unwrap_or_default()
            } else {
                from_slices(slices, sp)
            };
            if ports.is_empty() {
                all_ports.extend(backends.iter().cloned());
            }
            let mut names = vec![format!("{ns}/{name}:{}", sp.port)];
            if !port_name.is_empty() {
                names.push(format!("{ns}/{name}:{port_name}"));
            }
            for cluster_name in names {
                out.push(assignment(cluster_name, &backends));
            }
        }
        if ports.is_empty() {
            out.push(assignment(format!("{ns}/{name}"), &all_ports));
        }
        // Requested ports the Service does not have (or no Service at all).
        for p in ports.iter().filter(|p| !found.contains(p.as_str())) {
            out.push(assignment(format!("{ns}/{name}:{p}"), &BTreeSet::new()));
        }
        out
    }
}

/// An assignment without endpoints: the cluster warms at once and answers
/// 503 instead of Envoy waiting for its initial-fetch timeout.
pub fn empty_assignment(cluster_name: String) -> ClusterLoadAssignment {
    assignment(cluster_name, &BTreeSet::new())
}

fn from_slices(slices: &[&EndpointSlice], sp: &ServicePort) -> BTreeSet<(String, u16)> {
    let want = sp.name.clone().unwrap_or_default();
    let mut out = BTreeSet::new();
    for slice in slices {
        let Some(port) = slice.ports.as_ref().and_then(|ports| {
            ports
                .iter()
                .find(|p| p.name.clone().unwrap_or_default() == want)
                .and_then(|p| p.port)
        }) else {
            continue;
        };
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            // `ready` unset means ready (EndpointSlice API contract).
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for addr in &ep.addresses {
                out.insert((addr.clone(), port));
            }
        }
    }
    out
}

fn from_endpoints(ep: &Endpoints, sp: &ServicePort) -> BTreeSet<(String, u16)> {
    let want = sp.name.clone().unwrap_or_default();
    let mut out = BTreeSet::new();
    for subset in ep.subsets.iter().flatten() {
        let Some(port) = subset.ports.as_ref().and_then(|ports| {
            ports
                .iter()
                .find(|p| p.name.clone().unwrap_or_default() == want)
                .map(|p| p.port)
        }) else {
            continue;
        };
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if port == 0 {
            continue;
        }
        // Legacy Endpoints are not validated as objects; an address Envoy
        // would NACK is left out rather than sent.
        for addr in subset.addresses.iter().flatten() {
            if addr.ip.parse::<std::net::IpAddr>().is_err() {
                continue;
            }
            out.insert((addr.ip.clone(), port));
        }
    }
    out
}

fn assignment(cluster_name: String, backends: &BTreeSet<(String, u16)>) -> ClusterLoadAssignment {
    let lb_endpoints = backends
        .iter()
        .map(|(ip, port)| LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(ip, *port)),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name,
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
}
