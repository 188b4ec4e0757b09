//! The operator's passes follow the store's change log (LB IPAM walks only
//! after Service changes, the status writer looks only at the Ingresses a
//! change reaches). Over random changes, after the passes settle, the
//! store must be what the rules say from scratch: every LoadBalancer
//! Service has an address while the pool lasts, and an Ingress shows its
//! Service's address exactly when it is managed and every selected agent
//! ACKed its CEC with that address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use membrane_crds::{ACKED, ProxyNodeStatus};
use membrane_ingress::{Pool, lb_ip};
use membrane_k8s::StoreSink;
use membrane_operator::ingress_status::acked_everywhere;
use membrane_operator::{Operator, OperatorConfig, OperatorPass};
use membrane_store::{Kind, ObjectKey, Store, parse_documents};
use serde_json::json;

/// Pool of 6 addresses for up to 8 dedicated Ingresses plus the shared
/// Service: Services wait for addresses and get them when others go.
const POOL: &str = "127.0.100.0/29";
const INGRESSES: u64 = 8;

struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn apply(store: &Store, yaml: &str) {
    for obj in parse_documents(yaml).expect("yaml") {
        store.apply(obj);
    }
}

fn ingress(i: u64, class: &str, shared: bool, path: u64, backend: &str) -> String {
    let mode = if shared { "shared" } else { "dedicated" };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: i{i}\n  namespace: default\n  annotations: {{ingress.cilium.io/loadbalancer-mode: {mode}}}\nspec:\n  ingressClassName: {class}\n  rules:\n  - host: h{i}.example\n    http:\n      paths:\n      - {{path: /p{path}, pathType: Prefix, backend: {{service: {{name: {backend}, port: {{number: 80}}}}}}}}\n"
    )
}

/// The agent on node `n1`: ACKs (at their current generation, with every
/// LB address) the CECs `acked` picks, the others are pending.
fn report(store: &Store, acked: impl Fn(&ObjectKey) -> bool) {
    let snap = store.snapshot();
    let addresses: Vec<String> = snap
        .typed::<Service>(None)
        .filter_map(lb_ip)
        .map(|ip| ip.to_string())
        .collect();
    let configs: Vec<serde_json::Value> = snap
        .list(Kind::CiliumEnvoyConfig, None)
        .map(|o| {
            let key = o.key();
            let state = if acked(&key) { ACKED } else { "Pending" };
            json!({
                "kind": "CiliumEnvoyConfig",
                "namespace": key.namespace,
                "name": key.name,
                "generation": o.meta().generation.unwrap_or(0),
                "state": state,
                "addresses": addresses,
            })
        })
        .collect();
    let key = ObjectKey::new(Kind::ProxyNodeStatus, "", "n1");
    assert!(store.update_status(&key, json!({ "configs": configs })));
}

/// Passes until the store stops changing (every write is synchronous).
fn settle(op: &mut Operator, store: &Store) -> OperatorPass {
    for _ in 0..20 {
        let before = store.revision();
        let pass = op.pass(store, &StoreSink(store.clone()));
        if store.revision() == before {
            return pass;
        }
    }
    panic!("the operator's passes did not settle in 20 rounds");
}

fn ingress_ip(store: &Store, name: &str) -> Option<String> {
    let key = ObjectKey::new(Kind::Ingress, "default", name);
    membrane_operator::ingress_status::ingress_ip(&store.snapshot(), &key)
}

fn check(store: &Store, pass: &OperatorPass, pool: &Pool, step: usize) {
    let snap = store.snapshot();
    // LB IPAM: unique pool addresses, as many as the pool has for those
    // who want one.
    let lb: Vec<&Service> = snap
        .typed::<Service>(None)
        .filter(|s| s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"))
        .collect();
    let ips: Vec<Ipv4Addr> = lb.iter().filter_map(|s| lb_ip(s)).collect();
    let unique: BTreeSet<&Ipv4Addr> = ips.iter().collect();
    assert_eq!(
        unique.len(),
        ips.len(),
        "step {step}: an address given twice"
    );
    assert!(ips.iter().all(|ip| pool.contains(*ip)), "step {step}");
    let size = pool.hosts().count();
    assert_eq!(
        ips.len(),
        lb.len().min(size),
        "step {step}: a Service waits while the pool has room"
    );
    // Ingress status, by the rule.
    let reports: Vec<&ProxyNodeStatus> = snap.typed::<ProxyNodeStatus>(None).collect();
    let managed: BTreeMap<&ObjectKey, _> = pass.managed.iter().map(|m| (&m.ingress, m)).collect();
    for ing in snap.typed::<Ingress>(Some("default")) {
        let name = ing.metadata.name.as_deref().unwrap_or_default();
        let key = ObjectKey::new(Kind::Ingress, "default", name);
        let shown = ingress_ip(store, name);
        let Some(m) = managed.get(&key) else {
            assert_eq!(shown, None, "step {step}: {name} is not managed");
            continue;
        };
        let want = snap
            .get_typed::<Service>(&m.service.namespace, &m.service.name)
            .and_then(lb_ip)
            .map(|ip| ip.to_string());
        if let Some(ip) = &want
            && acked_everywhere(&snap, &reports, &m.cec, Some(ip))
        {
            assert_eq!(shown.as_ref(), Some(ip), "step {step}: {name} ACKed");
        }
    }
}

#[test]
fn incremental_operator_passes_settle_where_the_rules_say() {
    for seed in 1..=6u64 {
        let store = Store::new();
        apply(
            &store,
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec:\n  ports: [{port: 80}]\n---\napiVersion: membrane.io/v1alpha1\nkind: ProxyNodeStatus\nmetadata: {name: n1}\nspec: {nodeLabels: {}}\n",
        );
        let pool: Pool = POOL.parse().expect("pool");
        let mut op = Operator::new(&OperatorConfig {
            lb_pool: pool,
            secrets_namespace: "cilium-secrets".into(),
            ingress_default_lb_mode: Default::default(),
            ingress: Default::default(),
            cluster_pool: Default::default(),
        });
        let mut rng = Rng(seed);
        let mut acked: BTreeSet<ObjectKey> = BTreeSet::new();
        settle(&mut op, &store);
        for step in 0..120 {
            let i = rng.next(INGRESSES);
            match rng.next(8) {
                0..=2 => {
                    let backend = if rng.next(6) == 0 { "missing" } else { "s" };
                    // Another class: no longer ours, it loses its address.
                    let class = if rng.next(8) == 0 { "other" } else { "cilium" };
                    let yaml = ingress(i, class, rng.next(3) == 0, rng.next(4), backend);
                    apply(&store, &yaml);
                }
                3 => {
                    store.delete(&ObjectKey::new(Kind::Ingress, "default", &format!("i{i}")));
                }
                4 | 5 => {
                    // The agent ACKs some CECs (new content is pending until
                    // it is ACKed again).
                    for o in store.snapshot().list(Kind::CiliumEnvoyConfig, None) {
                        if rng.next(3) > 0 {
                            acked.insert(o.key());
                        } else {
                            acked.remove(&o.key());
                        }
                    }
                    report(&store, |k| acked.contains(k));
                }
                6 => {
                    // Someone else clears an Ingress's address.
                    let key = ObjectKey::new(Kind::Ingress, "default", &format!("i{i}"));
                    if store.get(&key).is_some() {
                        assert!(store.update_status(&key, json!({"loadBalancer": {}})));
                    }
                }
                _ => {
                    // An LB Service is deleted behind the operator's back.
                    let key =
                        ObjectKey::new(Kind::Service, "default", &format!("cilium-ingress-i{i}"));
                    store.delete(&key);
                }
            }
            let pass = settle(&mut op, &store);
            check(&store, &pass, &pool, step);
        }
        // Everything ACKed in the end: every managed Ingress with an
        // address shows it.
        report(&store, |_| true);
        let pass = settle(&mut op, &store);
        check(&store, &pass, &pool, usize::MAX);
        let shown = pass
            .managed
            .iter()
            .filter(|m| ingress_ip(&store, &m.ingress.name).is_some())
            .count();
        assert!(shown > 0, "seed {seed}: no Ingress got an address");
    }
}
