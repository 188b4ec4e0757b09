//! Realistic manifests (shapes from Kubernetes and Cilium docs) must parse
//! without false "unknown field" errors and round-trip losslessly.

use membrane_store::{Object, parse_documents};

const MANIFESTS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: cilium
  annotations:
    ingressclass.kubernetes.io/is-default-class: "true"
spec:
  controller: cilium.io/ingress-controller
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: tls-ingress
  namespace: default
  annotations:
    ingress.cilium.io/loadbalancer-mode: dedicated
    ingress.cilium.io/force-https: enabled
  labels: {app: bookinfo}
spec:
  ingressClassName: cilium
  defaultBackend:
    service: {name: details, port: {name: http}}
  tls:
  - hosts: [bookinfo.cilium.rocks, hipstershop.cilium.rocks]
    secretName: demo-cert
  rules:
  - host: hipstershop.cilium.rocks
    http:
      paths:
      - backend:
          service:
            name: productcatalogservice
            port:
              number: 3550
        path: /hipstershop.ProductCatalogService
        pathType: Prefix
      - backend:
          resource: {apiGroup: k8s.example.com, kind: StorageBucket, name: static-assets}
        path: /x
        pathType: ImplementationSpecific
status:
  loadBalancer:
    ingress:
    - ip: 172.18.255.194
      ports: [{port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata:
  name: details
  labels: {app: details, service: details}
spec:
  type: LoadBalancer
  selector: {app: details}
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Cluster
  loadBalancerClass: io.cilium/node
  ports:
  - name: http
    port: 9080
    targetPort: 9080
    protocol: TCP
    appProtocol: http
  - name: web
    port: 80
    targetPort: web
    nodePort: 30080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: details-abc
  labels: {kubernetes.io/service-name: details}
addressType: IPv4
ports:
- {name: http, port: 9080, protocol: TCP}
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: z1
  targetRef: {kind: Pod, name: details-1, namespace: default}
---
apiVersion: v1
kind: Endpoints
metadata: {name: details}
subsets:
- addresses: [{ip: 10.244.1.5, nodeName: node-1}]
  notReadyAddresses: [{ip: 10.244.1.6}]
  ports: [{name: http, port: 9080, protocol: TCP}]
---
apiVersion: v1
kind: Secret
metadata: {name: demo-cert}
type: kubernetes.io/tls
immutable: false
data: {tls.crt: Y2VydA==, tls.key: a2V5}
---
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata:
  name: envoy-lb-listener
spec:
  services:
    - name: echo-service-1
      namespace: default
      ports: [80]
      listener: envoy-lb-listener
  backendServices:
    - name: echo-service-2
      namespace: default
      number: ["8080", http]
  nodeSelector:
    matchLabels: {ingress: "true"}
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: envoy-lb-listener
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: envoy-lb-listener
                rds:
                  route_config_name: lb_route
                use_remote_address: true
                skip_xff_append: true
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: "default/echo-service-1"
      connect_timeout: 5s
      lb_policy: ROUND_ROBIN
      type: EDS
      outlier_detection: {split_external_local_origin_errors: true, consecutive_local_origin_failure: 2}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideEnvoyConfig
metadata: {name: cc}
spec:
  resources: []
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {kubernetes.io/metadata.name: shop}
spec:
  finalizers: [kubernetes]
"#;

#[test]
fn realistic_manifests_parse_and_round_trip() {
    let objs = parse_documents(MANIFESTS).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(objs.len(), 9);
    for obj in &objs {
        let v = obj.to_value();
        let back = Object::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: {e}", obj.key()));
        assert_eq!(&back, obj, "{}", obj.key());
    }
    let cec = objs[6].to_value();
    assert_eq!(
        cec["spec"]["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["route_config_name"],
        "lb_route"
    );
    assert_eq!(cec["spec"]["backendServices"][0]["number"][1], "http");
    assert_eq!(
        objs[1].to_value()["status"]["loadBalancer"]["ingress"][0]["ip"],
        "172.18.255.194"
    );
}
