//! LoadBalancer IPAM: every Service of type LoadBalancer gets an address
//! from `--lb-pool` in `status.loadBalancer.ingress[0].ip`. An address,
//! once given, stays with its Service. An address a CEC listener binds
//! explicitly is never handed out (the config pipeline rejects such a CEC
//! unless the address belongs to a Service it lists).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use membrane_ingress::{Pool, lb_ip};
use membrane_k8s::Sink;
use membrane_store::{ChangeCursor, Kind, ObjectKey, Store, StoreSnapshot};
use serde_json::json;

fn is_load_balancer(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

/// The allocator. It remembers what it handed out: with asynchronous
/// writes a status written a moment ago may not be visible yet, and the
/// address must not go to a second Service meanwhile.
///
/// Its pass walks every Service, so it runs only when its inputs changed:
/// a Service, or — while some Service waits for an address — a CEC, whose
/// listeners may have given up an address they bound.
#[derive(Debug, Default)]
pub struct LbIpam {
    given: BTreeMap<ObjectKey, Ipv4Addr>,
    changes: ChangeCursor,
    /// Services the last walk could not give an address, with why.
    problems: BTreeMap<ObjectKey, String>,
}

impl LbIpam {
    /// Assign addresses; returns Services that could not get one, with why.
    pub fn reconcile(
        &mut self,
        pool: &Pool,
        sink: &dyn Sink,
        store: &Store,
    ) -> BTreeMap<ObjectKey, String> {
        let changes = self.changes.advance(store);
        let waiting = !self.problems.is_empty();
        let inputs_changed = changes.touch_any(&[Kind::Service])
            || (waiting
                && changes
                    .touch_any(&[Kind::CiliumEnvoyConfig, Kind::CiliumClusterwideEnvoyConfig]));
        if inputs_changed {
            self.problems = self.walk(pool, sink, &store.snapshot());
        }
        self.problems.clone()
    }

    fn walk(
        &mut self,
        pool: &Pool,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
    ) -> BTreeMap<ObjectKey, String> {
        let mut problems = BTreeMap::new();
        let services: Vec<(ObjectKey, &Service)> = snap
            .typed::<Service>(None)
            .filter(|s| is_load_balancer(s))
            .map(|s| {
                let key = ObjectKey::new(
                    Kind::Service,
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                );
                (key, s)
            })
            .collect();
        let live: BTreeSet<&ObjectKey> = services.iter().map(|(k, _)| k).collect();
        self.given.retain(|k, _| live.contains(k));
        let mut used: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let mut pending = Vec::new();
        for (key, svc) in &services {
            match lb_ip(svc) {
                Some(ip) if pool.contains(ip) && used.insert(ip) => {
                    self.given.insert(key.clone(), ip);
                }
                _ => pending.push((key, *svc)),
            }
        }
        // Walking every CEC's listeners is the costly part of a pass: only
        // when an address is to be handed out.
        let bound = if pending.is_empty() {
            BTreeSet::new()
        } else {
            cec_bound(snap)
        };
        // Handed out but not visible yet: still taken.
        let in_flight: BTreeMap<Ipv4Addr, &ObjectKey> = pending
            .iter()
            .filter_map(|(k, _)| self.given.get(*k).map(|ip| (*ip, *k)))
            .filter(|(ip, _)| !used.contains(ip))
            .collect();
        for (key, svc) in pending {
            let mine = self
                .given
                .get(key)
                .copied()
                .filter(|ip| in_flight.get(ip) == Some(&key) && !bound.contains(ip));
            let taken = |ip: &Ipv4Addr| {
                used.contains(ip) || bound.contains(ip) || in_flight.contains_key(ip)
            };
            let requested = svc
                .spec
                .as_ref()
                .and_then(|s| s.load_balancer_ip.as_deref())
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                .filter(|ip| pool.contains(*ip) && !taken(ip));
            let free = || pool.hosts().find(|ip| !taken(ip));
            let Some(ip) = mine.or(requested).or_else(free) else {
                problems.insert(
                    key.clone(),
                    "status.loadBalancer: no free address left in --lb-pool".into(),
                );
                continue;
            };
            used.insert(ip);
            self.given.insert(key.clone(), ip);
            sink.status(
                key,
                json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}),
            );
        }
        problems
    }
}

/// IPv4 addresses CEC/CCEC listeners name explicitly (`address` and
/// `additionalAddresses`), read from the raw resources: cheap, and
/// independent of whether the CEC is otherwise valid.
fn cec_bound(snap: &StoreSnapshot) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    for kind in [Kind::CiliumEnvoyConfig, Kind::CiliumClusterwideEnvoyConfig] {
        for obj in snap.list(kind, None) {
            let spec = match obj.as_ref() {
                membrane_store::Object::CiliumEnvoyConfig(c) => &c.spec.config,
                membrane_store::Object::CiliumClusterwideEnvoyConfig(c) => &c.spec.config,
                _ => continue,
            };
            for r in &spec.resources {
                let is_listener = r
                    .name_and_type()
                    .1
                    .is_some_and(|t| t.ends_with("envoy.config.listener.v3.Listener"));
                if !is_listener {
                    continue;
                }
                let r = &r.to_value();
                // protojson accepts both spellings of a field.
                let field = |v: &'_ serde_json::Value, camel: &str, snake: &str| {
                    let c = &v[camel];
                    if c.is_null() {
                        v[snake].clone()
                    } else {
                        c.clone()
                    }
                };
                let extra = field(r, "additionalAddresses", "additional_addresses");
                let extra = extra
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| a["address"].clone());
                for a in std::iter::once(r["address"].clone()).chain(extra) {
                    let sa = field(&a, "socketAddress", "socket_address");
                    let ip = sa["address"].as_str();
                    if let Some(ip) = ip.and_then(|ip| ip.parse().ok()) {
                        out.insert(ip);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_k8s::StoreSink;
    use membrane_store::Store;

    #[test]
    fn addresses_cec_listeners_bind_are_not_handed_out() {
        let store = Store::new();
        let yaml = r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: squatter, namespace: default}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    address: {socket_address: {address: 127.0.100.1, port_value: 80}}
    additionalAddresses:
    - address: {socketAddress: {address: 127.0.100.2, portValue: 80}}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  ports: [{port: 80}]
"#;
        for obj in membrane_store::parse_documents(yaml).expect("yaml") {
            store.apply(obj);
        }
        let pool: Pool = "127.0.100.0/24".parse().expect("pool");
        let problems = LbIpam::default().reconcile(&pool, &StoreSink(store.clone()), &store);
        assert!(problems.is_empty(), "{problems:?}");
        let snap = store.snapshot();
        let svc = snap.get_typed::<Service>("default", "lb").expect("service");
        assert_eq!(lb_ip(svc), Some(Ipv4Addr::new(127, 0, 100, 3)));
    }

    /// A sink that records status writes without applying them, as an
    /// asynchronous writer looks to the next pass.
    #[derive(Default)]
    struct Pending(std::sync::Mutex<Vec<(ObjectKey, serde_json::Value)>>);

    impl Sink for Pending {
        fn apply_all(&self, _: Vec<membrane_store::Object>) {}
        fn delete(&self, _: &ObjectKey) {}
        fn status(&self, key: &ObjectKey, status: serde_json::Value) {
            if let Ok(mut w) = self.0.lock() {
                w.push((key.clone(), status));
            }
        }
        fn warn(&self, _: membrane_k8s::Warning) {}
    }

    #[test]
    fn an_address_whose_write_is_in_flight_is_not_given_twice() {
        let store = Store::new();
        let svc = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: LoadBalancer\n  ports: [{{port: 80}}]\n"
            )
        };
        for obj in membrane_store::parse_documents(&svc("b")).expect("yaml") {
            store.apply(obj);
        }
        let pool: Pool = "127.0.100.0/30".parse().expect("pool");
        let sink = Pending::default();
        let mut ipam = LbIpam::default();
        ipam.reconcile(&pool, &sink, &store);
        // Before b's status is visible, a Service sorting first appears.
        for obj in membrane_store::parse_documents(&svc("a")).expect("yaml") {
            store.apply(obj);
        }
        ipam.reconcile(&pool, &sink, &store);
        let writes = sink.0.lock().expect("lock").clone();
        let ip_of = |name: &str| {
            writes
                .iter()
                .rev()
                .find(|(k, _)| k.name == name)
                .map(|(_, v)| v["loadBalancer"]["ingress"][0]["ip"].clone())
        };
        assert_eq!(
            ip_of("b"),
            Some("127.0.100.1".into()),
            "b keeps its address"
        );
        assert_eq!(ip_of("a"), Some("127.0.100.2".into()), "a gets another one");
    }
}
