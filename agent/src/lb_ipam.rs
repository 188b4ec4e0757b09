//! LoadBalancer IPAM for `up` mode: every Service of type LoadBalancer gets an
//! address from `--lb-pool` in `status.loadBalancer.ingress[0].ip`. An
//! address, once given, stays with its Service. An address a CEC listener
//! binds explicitly is never handed out (the config pipeline rejects such a
//! CEC unless the address belongs to a Service it lists).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Service;
use membrane_store::{Kind, ObjectKey, Store, StoreSnapshot};
use serde_json::json;

/// An IPv4 CIDR pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    base: u32,
    prefix: u8,
}

/// A malformed `--lb-pool`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("--lb-pool {0:?}: expected an IPv4 CIDR such as 127.0.100.0/24")]
pub struct PoolError(String);

impl FromStr for Pool {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        let err = || PoolError(s.to_owned());
        let (ip, prefix) = s.split_once('/').ok_or_else(err)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        if !(8..=32).contains(&prefix) {
            return Err(err());
        }
        let mask = if prefix == 32 {
            u32::MAX
        } else {
            !(u32::MAX >> prefix)
        };
        Ok(Pool {
            base: u32::from(ip) & mask,
            prefix,
        })
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 32 {
            u32::MAX
        } else {
            !(u32::MAX >> self.prefix)
        };
        u32::from(ip) & mask == self.base
    }

    /// Usable host addresses: the network and broadcast addresses are skipped
    /// for pools larger than /31.
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        let (first, last) = if size > 2 {
            (1, size - 2)
        } else {
            (0, size - 1)
        };
        let base = u64::from(self.base);
        (first..=last).map(move |off| Ipv4Addr::from((base + off) as u32))
    }
}

/// The LB address of a Service, if it has one.
pub fn lb_ip(svc: &Service) -> Option<Ipv4Addr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .ip
        .as_deref()?
        .parse()
        .ok()
}

fn is_load_balancer(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

/// Assign addresses; returns Services that could not get one, with why.
pub fn reconcile(pool: &Pool, store: &Store, snap: &StoreSnapshot) -> BTreeMap<ObjectKey, String> {
    let mut problems = BTreeMap::new();
    let services: Vec<&Service> = snap
        .typed::<Service>(None)
        .filter(|s| is_load_balancer(s))
        .collect();
    let mut used: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let bound = cec_bound(snap);
    let mut pending = Vec::new();
    for svc in &services {
        match lb_ip(svc) {
            Some(ip) if pool.contains(ip) && used.insert(ip) => {}
            _ => pending.push(*svc),
        }
    }
    for svc in pending {
        let key = ObjectKey {
            kind: Kind::Service,
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
        };
        let requested = svc
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .filter(|ip| pool.contains(*ip) && !used.contains(ip) && !bound.contains(ip));
        let free = || {
            pool.hosts()
                .find(|ip| !used.contains(ip) && !bound.contains(ip))
        };
        let Some(ip) = requested.or_else(free) else {
            problems.insert(
                key,
                "status.loadBalancer: no free address left in --lb-pool".into(),
            );
            continue;
        };
        used.insert(ip);
        store.update_status(
            &key,
            json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}),
        );
    }
    problems
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
                let is_listener = r["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("envoy.config.listener.v3.Listener"));
                if !is_listener {
                    continue;
                }
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

    #[test]
    fn parses_and_enumerates_pools() {
        let p: Pool = "127.0.100.0/24".parse().unwrap();
        assert!(p.contains("127.0.100.7".parse().unwrap()));
        assert!(!p.contains("127.0.101.7".parse().unwrap()));
        let hosts: Vec<_> = p.hosts().collect();
        assert_eq!(hosts.len(), 254);
        assert_eq!(hosts[0], Ipv4Addr::new(127, 0, 100, 1));
        assert!("127.0.100.0".parse::<Pool>().is_err());
        assert!("nope/24".parse::<Pool>().is_err());
        let one: Pool = "10.0.0.5/32".parse().unwrap();
        assert_eq!(
            one.hosts().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(10, 0, 0, 5)]
        );
    }

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
        let problems = reconcile(&pool, &store, &store.snapshot());
        assert!(problems.is_empty(), "{problems:?}");
        let snap = store.snapshot();
        let svc = snap.get_typed::<Service>("default", "lb").expect("service");
        assert_eq!(lb_ip(svc), Some(Ipv4Addr::new(127, 0, 100, 3)));
    }
}
