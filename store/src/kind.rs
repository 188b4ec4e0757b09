use std::fmt;

use crate::StoreError;

/// The kinds of objects the store holds.
///
/// The declaration order is the sort order of [`crate::ObjectKey`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
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
    Pod,
    CiliumNode,
    /// Membrane's per-node ACK report (`membrane.io/v1alpha1`).
    ProxyNodeStatus,
}

const ALL: &[Kind] = &[
    Kind::Ingress,
    Kind::IngressClass,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Endpoints,
    Kind::Secret,
    Kind::Namespace,
    Kind::CiliumEnvoyConfig,
    Kind::CiliumClusterwideEnvoyConfig,
    Kind::CiliumNetworkPolicy,
    Kind::CiliumClusterwideNetworkPolicy,
    Kind::NetworkPolicy,
    Kind::Pod,
    Kind::CiliumNode,
    Kind::ProxyNodeStatus,
];

impl Kind {
    /// Every kind, in key order.
    pub fn all() -> &'static [Kind] {
        ALL
    }

    /// The kind of a manifest's `apiVersion` + `kind`, if the store holds it.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        ALL.iter()
            .copied()
            .find(|k| k.api_version() == api_version && k.kind_name() == kind)
    }

    /// Parses a kubectl-style resource name (singular, plural, short name or
    /// kind name), case-insensitively.
    pub fn parse(s: &str) -> Result<Kind, StoreError> {
        let lower = s.trim().to_ascii_lowercase();
        let kind = match lower.as_str() {
            "ingress" | "ingresses" | "ing" => Kind::Ingress,
            "ingressclass" | "ingressclasses" => Kind::IngressClass,
            "service" | "services" | "svc" => Kind::Service,
            "endpointslice" | "endpointslices" => Kind::EndpointSlice,
            "endpoints" | "endpoint" | "ep" => Kind::Endpoints,
            "secret" | "secrets" => Kind::Secret,
            "namespace" | "namespaces" | "ns" => Kind::Namespace,
            "cec" | "ciliumenvoyconfig" | "ciliumenvoyconfigs" => Kind::CiliumEnvoyConfig,
            "ccec" | "ciliumclusterwideenvoyconfig" | "ciliumclusterwideenvoyconfigs" => {
                Kind::CiliumClusterwideEnvoyConfig
            }
            "cnp" | "ciliumnp" | "ciliumnetworkpolicy" | "ciliumnetworkpolicies" => {
                Kind::CiliumNetworkPolicy
            }
            "ccnp" | "ciliumclusterwidenetworkpolicy" | "ciliumclusterwidenetworkpolicies" => {
                Kind::CiliumClusterwideNetworkPolicy
            }
            "networkpolicy" | "networkpolicies" | "netpol" => Kind::NetworkPolicy,
            "pod" | "pods" | "po" => Kind::Pod,
            "ciliumnode" | "ciliumnodes" | "cn" => Kind::CiliumNode,
            "pns" | "proxynodestatus" | "proxynodestatuses" => Kind::ProxyNodeStatus,
            _ => {
                // Also accept `<plural>.<group>` as kubectl does (e.g. `ingresses.networking.k8s.io`).
                if let Some((name, group)) = lower.split_once('.')
                    && let Ok(kind) = Kind::parse(name)
                    && kind.group() == group
                {
                    return Ok(kind);
                }
                return Err(StoreError::UnknownResource(s.to_string()));
            }
        };
        Ok(kind)
    }

    /// True for kinds that live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Kind::Namespace
                | Kind::IngressClass
                | Kind::CiliumClusterwideEnvoyConfig
                | Kind::CiliumClusterwideNetworkPolicy
                | Kind::CiliumNode
                | Kind::ProxyNodeStatus
        )
    }

    /// `apiVersion` as written in manifests.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Ingress | Kind::IngressClass | Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::Service | Kind::Endpoints | Kind::Secret | Kind::Namespace | Kind::Pod => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::CiliumEnvoyConfig
            | Kind::CiliumClusterwideEnvoyConfig
            | Kind::CiliumNetworkPolicy
            | Kind::CiliumClusterwideNetworkPolicy
            | Kind::CiliumNode => "cilium.io/v2",
            Kind::ProxyNodeStatus => "membrane.io/v1alpha1",
        }
    }

    /// API group ("" for the core group).
    pub fn group(self) -> &'static str {
        match self.api_version().rsplit_once('/') {
            Some((group, _)) => group,
            None => "",
        }
    }

    /// `kind` as written in manifests.
    pub fn kind_name(self) -> &'static str {
        match self {
            Kind::Ingress => "Ingress",
            Kind::IngressClass => "IngressClass",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Endpoints => "Endpoints",
            Kind::Secret => "Secret",
            Kind::Namespace => "Namespace",
            Kind::CiliumEnvoyConfig => "CiliumEnvoyConfig",
            Kind::CiliumClusterwideEnvoyConfig => "CiliumClusterwideEnvoyConfig",
            Kind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Kind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Pod => "Pod",
            Kind::CiliumNode => "CiliumNode",
            Kind::ProxyNodeStatus => "ProxyNodeStatus",
        }
    }

    /// Lower-case plural resource name, as used in API paths.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Ingress => "ingresses",
            Kind::IngressClass => "ingressclasses",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Endpoints => "endpoints",
            Kind::Secret => "secrets",
            Kind::Namespace => "namespaces",
            Kind::CiliumEnvoyConfig => "ciliumenvoyconfigs",
            Kind::CiliumClusterwideEnvoyConfig => "ciliumclusterwideenvoyconfigs",
            Kind::CiliumNetworkPolicy => "ciliumnetworkpolicies",
            Kind::CiliumClusterwideNetworkPolicy => "ciliumclusterwidenetworkpolicies",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Pod => "pods",
            Kind::CiliumNode => "ciliumnodes",
            Kind::ProxyNodeStatus => "proxynodestatuses",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind_name())
    }
}
