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
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            secrets_namespace: "cilium-secrets".to_string(),
            enforce_https_default: true,
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

    let spec = EnvoyConfigSpec {
        services: vec![ServiceListener {
            name: service_name.clone(),
            namespace: model.namespace.clone(),
            ports: ports.clone(),
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
        resources: envoy::resources(&model, &opts.secrets_namespace),
        node_selector: None,
    };
    let mut cec = CiliumEnvoyConfig::new(
        &names::cec_name(&model.namespace, &model.name),
        CiliumEnvoyConfigSpec::from(spec),
    );
    cec.metadata.namespace = Some(model.namespace.clone());
    cec.metadata.labels = Some(BTreeMap::from([(
        USE_ORIGINAL_SOURCE_ADDRESS_LABEL.to_string(),
        "false".to_string(),
    )]));
    // The operator sets a controlling owner reference (garbage collection).
    cec.metadata.owner_references = Some(vec![owner(true)]);

    let port_names = |p: u16| if p == 443 { "https" } else { "http" };
    let service = Service {
        metadata: ObjectMeta {
            name: Some(service_name.clone()),
            namespace: Some(model.namespace.clone()),
            labels: Some(BTreeMap::from([(
                INGRESS_LABEL.to_string(),
                "true".to_string(),
            )])),
            owner_references: Some(vec![owner(false)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".to_string()),
            external_traffic_policy: Some("Cluster".to_string()),
            ports: Some(
                ports
                    .iter()
                    .map(|&p| ServicePort {
                        name: Some(port_names(p).to_string()),
                        port: i32::from(p),
                        protocol: Some("TCP".to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };

    let endpoint_slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(service_name.clone()),
            namespace: Some(model.namespace.clone()),
            labels: Some(BTreeMap::from([
                (INGRESS_LABEL.to_string(), "true".to_string()),
                (SERVICE_NAME_LABEL.to_string(), service_name.clone()),
            ])),
            owner_references: Some(vec![owner(false)]),
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
                    name: Some(port_names(p).to_string()),
                    port: Some(i32::from(p)),
                    protocol: Some("TCP".to_string()),
                    ..Default::default()
                })
                .collect(),
        ),
    };

    Ok(Translation {
        cec,
        service,
        endpoint_slice,
    })
}

/// Translates every Ingress independently: one bad Ingress never prevents
/// the others from being served.
pub fn translate_all(
    docs: &[Ingress],
    opts: &TranslateOptions,
) -> Vec<Result<Translation, IngressError>> {
    docs.iter().map(|ing| translate(ing, opts)).collect()
}
