//! EDS: ClusterLoadAssignments named `<ns>/<svc>:<port>` (and
//! `<ns>/<svc>:<port-name>` for named ports) built from a Service and its
//! ready endpoints. EndpointSlice ports carry the resolved target port, so
//! a Service port is matched to a slice port by name, as kube-proxy does.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Endpoints, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use membrane_store::StoreSnapshot;

use crate::envoy_pb::*;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Assignments for the ports of Service `ns/name` selected by `ports` (port
/// numbers or names as strings; empty selects all). A missing Service gives
/// nothing; a Service without ready endpoints gives empty assignments so
/// clusters warm up and answer 503 rather than hang.
pub fn load_assignments(
    snap: &StoreSnapshot,
    ns: &str,
    name: &str,
    ports: &[String],
) -> Vec<ClusterLoadAssignment> {
    SliceIndex::new(snap).assignments(snap, ns, name, ports)
}

/// EndpointSlices by `(namespace, kubernetes.io/service-name)`, built once
/// per pass so finding a Service's slices does not scan every slice.
pub struct SliceIndex<'a> {
    by_service: HashMap<&'a str, HashMap<&'a str, Vec<&'a EndpointSlice>>>,
}

impl<'a> SliceIndex<'a> {
    pub fn new(snap: &'a StoreSnapshot) -> Self {
        let mut by_service: HashMap<&str, HashMap<&str, Vec<&EndpointSlice>>> = HashMap::new();
        for s in snap.typed::<EndpointSlice>(None) {
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

    /// See [`load_assignments`].
    pub fn assignments(
        &self,
        snap: &StoreSnapshot,
        ns: &str,
        name: &str,
        ports: &[String],
    ) -> Vec<ClusterLoadAssignment> {
        let Some(svc) = snap.get_typed::<Service>(ns, name) else {
            return Vec::new();
        };
        let service_ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        let slices = self.slices(ns, name);
        let legacy = snap.get_typed::<Endpoints>(ns, name);
        let mut out = Vec::new();
        // With no ports listed Cilium also publishes `<ns>/<svc>` with the
        // backends of every port (its examples' EDS clusters use that name).
        let mut all_ports = BTreeSet::new();
        for sp in &service_ports {
            let port_name = sp.name.clone().unwrap_or_default();
            let selected = ports.is_empty()
                || ports.iter().any(|p| {
                    *p == sp.port.to_string() || (!port_name.is_empty() && *p == port_name)
                });
            if !selected {
                continue;
            }
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
        out
    }
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
        for addr in subset.addresses.iter().flatten() {
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
