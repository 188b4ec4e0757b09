//! The public translation: Ingress → CEC + LB Service + EndpointSlice.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use membrane_crds::{
    BackendService, CiliumEnvoyConfig, CiliumEnvoyConfigSpec, EnvoyConfigSpec, ServiceListener,
};

use crate::error::IngressError;
use crate::shared::LoadBalancerMode;
use crate::{envoy, model, names};

/// Label Cilium puts on the objects it generates for an Ingress.
pub const INGRESS_LABEL: &str = "cilium.io/ingress";
/// Label on the CEC telling the agent not to keep the client source address.
pub const USE_ORIGINAL_SOURCE_ADDRESS_LABEL: &str = "cilium.io/use-original-source-address";
/// EndpointSlice → Service link.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Cilium's dummy backend: the LB Service needs an endpoint to be
/// programmed, but its traffic is redirected to Envoy before reaching it.
pub const PLACEHOLDER_ENDPOINT: &str = "192.192.192.192";

/// Settings that are global to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateOptions {
    /// Namespace TLS Secrets are synced into; part of the SDS secret name.
    pub secrets_namespace: String,
    /// Redirect HTTP to HTTPS for TLS hosts unless the Ingress says otherwise
    /// (Cilium's `--enforce-ingress-https`, on by default).
    pub enforce_https_default: bool,
    /// Mode of Ingresses without the `ingress.cilium.io/loadbalancer-mode`
    /// annotation (Cilium's `--ingress-default-lb-mode`, `dedicated`).
    pub default_lb_mode: LoadBalancerMode,
    /// Namespace of the shared CEC, Service and EndpointSlice (Cilium's own
    /// namespace, `kube-system` by default).
    pub shared_namespace: String,
    /// Name of the shared LoadBalancer Service and of the shared CEC
    /// (Cilium's `--ingress-shared-lb-service-name`).
    pub shared_service_name: String,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            secrets_namespace: "cilium-secrets".to_string(),
            enforce_https_default: true,
            default_lb_mode: LoadBalancerMode::Dedicated,
            shared_namespace: names::SHARED_NAMESPACE.to_string(),
            shared_service_name: names::PREFIX.to_string(),
        }
    }
}

/// Everything dedicated mode creates for one Ingress.
#[derive(Debug, Clone)]
pub struct Translation {
    pub cec: CiliumEnvoyConfig,
    pub service: Service,
    pub endpoint_slice: EndpointSlice,
}

/// Translates one Ingress. Pure: the referenced Services and Secrets are not
/// consulted (see [`crate::validate_references`]).
pub fn translate(ing: &Ingress, opts: &TranslateOptions) -> Result<Translation, IngressError> {
    let model = model::build(ing, opts.enforce_https_default)?;
    let uid = ing.metadata.uid.clone().unwrap_or_default();
    let service_name = names::service_name(&model.name);
    let ports: Vec<u16> = if model.has_tls() {
        vec![80, 443]
    } else {
        vec![80]
    };

    let owner = |block: bool| OwnerReference {
        api_version: "networking.k8s.io/v1".to_string(),
        kind: "Ingress".to_string(),
        name: model.name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: block.then_some(true),
    };

    let cec = build_cec(
        &names::cec_name(&model.namespace, &model.name),
        &model.namespace,
        &service_name,
        &ports,
        &model,
        opts,
        // The operator sets a controlling owner reference (garbage collection).
        Some(owner(true)),
    );

    let service = lb_service(&service_name, &model.namespace, &ports, Some(owner(false)));
    let endpoint_slice =
        placeholder_endpoint_slice(&service_name, &model.namespace, &ports, Some(owner(false)));

    Ok(Translation {
        cec,
        service,
        endpoint_slice,
    })
}

/// The CEC of a model: `spec.services` is the LB Service `service_name`
/// in `namespace` (the CEC's own namespace) with `ports`.
pub(crate) fn build_cec(
    name: &str,
    namespace: &str,
    service_name: &str,
    ports: &[u16],
    model: &model::Model,
    opts: &TranslateOptions,
    owner: Option<OwnerReference>,
) -> CiliumEnvoyConfig {
    let spec = EnvoyConfigSpec {
        services: vec![ServiceListener {
            name: service_name.to_string(),
            namespace: namespace.to_string(),
            ports: ports.to_vec(),
            listener: String::new(),
        }],
        backend_services: model
            .backends
            .iter()
            .map(|((ns, name), ports)| BackendService {
                name: name.clone(),
                namespace: ns.clone(),
                number: ports.iter().cloned().collect(),
            })
            .collect(),
        resources: envoy::resources(model, &opts.secrets_namespace),
        node_selector: None,
    };
    let mut cec = CiliumEnvoyConfig::new(name, CiliumEnvoyConfigSpec::from(spec));
    cec.metadata.namespace = Some(namespace.to_string());
    cec.metadata.labels = Some(BTreeMap::from([(
        USE_ORIGINAL_SOURCE_ADDRESS_LABEL.to_string(),
        "false".to_string(),
    )]));
    cec.metadata.owner_references = owner.map(|o| vec![o]);
    cec
}

fn port_name(p: u16) -> &'static str {
    if p == 443 { "https" } else { "http" }
}

/// The LoadBalancer Service traffic for an Ingress arrives on.
pub(crate) fn lb_service(
    name: &str,
    namespace: &str,
    ports: &[u16],
    owner: Option<OwnerReference>,
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                INGRESS_LABEL.to_string(),
                "true".to_string(),
            )])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".to_string()),
            external_traffic_policy: Some("Cluster".to_string()),
            ports: Some(
                ports
                    .iter()
                    .map(|&p| ServicePort {
                        name: Some(port_name(p).to_string()),
                        port: i32::from(p),
                        protocol: Some("TCP".to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The EndpointSlice holding Cilium's placeholder backend for `service`.
pub(crate) fn placeholder_endpoint_slice(
    service: &str,
    namespace: &str,
    ports: &[u16],
    owner: Option<OwnerReference>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(service.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (INGRESS_LABEL.to_string(), "true".to_string()),
                (SERVICE_NAME_LABEL.to_string(), service.to_string()),
            ])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        address_type: "IPv4".to_string(),
        endpoints: vec![Endpoint {
            addresses: vec![PLACEHOLDER_ENDPOINT.to_string()],
            ..Default::default()
        }]
        .into(),
        ports: Some(
            ports
                .iter()
                .map(|&p| EndpointPort {
                    name: Some(port_name(p).to_string()),
                    port: Some(i32::from(p)),
                    protocol: Some("TCP".to_string()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// Translates every Ingress independently: one bad Ingress never prevents
/// the others from being served.
pub fn translate_all(
    docs: &[Ingress],
    opts: &TranslateOptions,
) -> Vec<Result<Translation, IngressError>> {
    docs.iter().map(|ing| translate(ing, opts)).collect()
}
