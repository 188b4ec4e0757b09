//! The public translation: Ingress → CEC + LB Service + EndpointSlice.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use membrane_crds::{
    BackendService, CiliumEnvoyConfig, CiliumEnvoyConfigSpec, EnvoyConfigSpec, EnvoyResource,
    ServiceListener,
};

use crate::annotations::ServiceType;
use crate::error::IngressError;
use crate::model::SecretRef;
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
    /// Certificate for TLS hosts without `secretName` (Cilium's
    /// `--ingress-default-secret-namespace/-name`).
    pub default_secret: Option<SecretRef>,
    /// A PROXY protocol (v1 or v2) header is required on every Ingress
    /// connection (Cilium's `--enable-ingress-proxy-protocol`).
    pub proxy_protocol: bool,
    /// Host network mode (Cilium's `ingressController.hostNetwork`): the
    /// listeners bind the node's addresses instead of a LoadBalancer VIP.
    pub host_network: Option<HostNetwork>,
    /// Ingress annotations and labels whose key starts with one of these are
    /// copied to the generated Service (Cilium's
    /// `--ingress-lb-annotation-prefixes`).
    pub lb_annotation_prefixes: Vec<String>,
}

/// Port of a dedicated host-network listener without
/// `ingress.cilium.io/host-listener-port` (Cilium's
/// `defaultHostNetworkListenerPort`).
pub const DEFAULT_HOST_LISTENER_PORT: u16 = 8080;

/// Host network mode settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNetwork {
    /// Port of the shared listener (Cilium's default 8080).
    pub shared_listener_port: u16,
    /// Also bind `::` (Cilium binds the families it has enabled; a node
    /// without IPv6 could not bind it and Envoy would refuse the listener).
    pub ipv6: bool,
    /// Only nodes with these labels serve Ingresses (the CECs'
    /// `nodeSelector`; Cilium's `ingressController.hostNetwork.nodes`);
    /// empty: every node.
    pub node_labels: BTreeMap<String, String>,
}

impl Default for HostNetwork {
    fn default() -> Self {
        Self {
            shared_listener_port: 8080,
            ipv6: true,
            node_labels: BTreeMap::new(),
        }
    }
}

/// Cilium's default `--ingress-lb-annotation-prefixes`.
pub const DEFAULT_LB_ANNOTATION_PREFIXES: &[&str] = &[
    "lbipam.cilium.io",
    "service.beta.kubernetes.io",
    "service.kubernetes.io",
    "cloud.google.com",
];

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            secrets_namespace: "cilium-secrets".to_string(),
            enforce_https_default: true,
            default_lb_mode: LoadBalancerMode::Dedicated,
            shared_namespace: names::SHARED_NAMESPACE.to_string(),
            shared_service_name: names::PREFIX.to_string(),
            default_secret: None,
            proxy_protocol: false,
            host_network: None,
            lb_annotation_prefixes: DEFAULT_LB_ANNOTATION_PREFIXES
                .iter()
                .map(|p| p.to_string())
                .collect(),
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
    let model = model::build(
        ing,
        opts.enforce_https_default,
        opts.default_secret.as_ref(),
    )?;
    let uid = ing.metadata.uid.clone().unwrap_or_default();
    let service_name = names::service_name(&model.name);
    let ports = model.service_ports();
    // Host network: the listener binds this port on the node instead of
    // the Service's VIP, and `spec.services` lists it as Cilium does.
    // Without the annotation Cilium uses its fixed default, not the shared
    // listener port.
    let host_port = opts.host_network.as_ref().map(|_| {
        model
            .settings
            .host_listener_port
            .unwrap_or(DEFAULT_HOST_LISTENER_PORT)
    });

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
        host_port,
        // The operator sets a controlling owner reference (garbage collection).
        Some(owner(true)),
    );

    let mut service = lb_service(&service_name, &model.namespace, &ports, Some(owner(false)));
    dedicated_service_settings(&mut service, ing, &model, opts);
    let endpoint_slice =
        placeholder_endpoint_slice(&service_name, &model.namespace, &ports, Some(owner(false)));

    Ok(Translation {
        cec,
        service,
        endpoint_slice,
    })
}

/// The CEC of a model: `spec.services` is the LB Service `service_name`
/// in `namespace` (the CEC's own namespace) with `ports`, or with the host
/// port in host network mode.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_cec(
    name: &str,
    namespace: &str,
    service_name: &str,
    ports: &[u16],
    model: &model::Model,
    opts: &TranslateOptions,
    host_port: Option<u16>,
    owner: Option<OwnerReference>,
) -> CiliumEnvoyConfig {
    let spec = EnvoyConfigSpec {
        services: vec![ServiceListener {
            name: service_name.to_string(),
            namespace: namespace.to_string(),
            ports: host_port.map_or_else(|| ports.to_vec(), |p| vec![p]),
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
        resources: envoy::resources(model, opts, host_port)
            .into_iter()
            .map(EnvoyResource::from)
            .collect(),
        // Host network mode: the listener binds on every node it reaches,
        // so the selector decides which nodes serve Ingresses.
        node_selector: opts
            .host_network
            .as_ref()
            .filter(|h| !h.node_labels.is_empty())
            .map(|h| LabelSelector {
                match_labels: Some(h.node_labels.clone()),
                ..Default::default()
            }),
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

/// What the annotations of a dedicated Ingress and the controller's
/// options say about its Service, applied as Cilium's operator does: the
/// type (ClusterIP in host network mode), node ports, external traffic
/// policy, load-balancer class, and the Ingress's annotations and labels
/// whose keys start with one of the LB annotation prefixes.
fn dedicated_service_settings(
    service: &mut Service,
    ing: &Ingress,
    model: &model::Model,
    opts: &TranslateOptions,
) {
    let settings = &model.settings.service;
    let copy = |from: Option<&BTreeMap<String, String>>| -> BTreeMap<String, String> {
        from.into_iter()
            .flatten()
            .filter(|(k, _)| {
                opts.lb_annotation_prefixes
                    .iter()
                    .any(|p| !p.is_empty() && k.starts_with(p.as_str()))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let annotations = copy(ing.metadata.annotations.as_ref());
    if !annotations.is_empty() {
        service.metadata.annotations = Some(annotations);
    }
    let labels = copy(ing.metadata.labels.as_ref());
    if !labels.is_empty() {
        // Our own label wins over a copied one of the same key.
        let own = service.metadata.labels.get_or_insert_with(BTreeMap::new);
        for (k, v) in labels {
            own.entry(k).or_insert(v);
        }
    }
    let Some(spec) = service.spec.as_mut() else {
        return;
    };
    if settings.external_traffic_policy_local {
        spec.external_traffic_policy = Some("Local".to_string());
    }
    match settings.type_ {
        ServiceType::LoadBalancer if opts.host_network.is_some() => {
            // Nothing external reaches a host-network Ingress through its
            // Service: Cilium makes it ClusterIP (which has no external
            // traffic policy).
            spec.type_ = Some("ClusterIP".to_string());
            spec.external_traffic_policy = None;
        }
        ServiceType::LoadBalancer => {
            spec.load_balancer_class = settings.load_balancer_class.clone();
        }
        ServiceType::NodePort => {
            spec.type_ = Some("NodePort".to_string());
            for port in spec.ports.iter_mut().flatten() {
                let node_port = match port.port {
                    80 => settings.insecure_node_port,
                    443 => settings.secure_node_port,
                    _ => None,
                };
                port.node_port = node_port.map(i32::from);
            }
        }
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
