//! Remote `ClusterService`s → backends of the local service of the same
//! namespace/name, tagged with the remote cluster's id (pure).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use membrane_lb::maglev::{BackendState, DEFAULT_BACKEND_WEIGHT};
use membrane_lb::service::{Backend, DesiredState, L3n4Addr, Protocol, ServiceName};

use crate::types::ClusterService;

/// Adds every remote backend to the matching frontends of `state`.
///
/// Only services in `global` (local Services annotated global) take remote
/// backends, as in Cilium. A remote backend matches a frontend by port name
/// and protocol, in the frontend's address family. An address that is
/// already a backend (local, or from another cluster) is not added twice.
/// Returns how many backends were added.
pub fn merge_remote<'a>(
    state: &mut DesiredState,
    global: &BTreeSet<ServiceName>,
    remotes: impl IntoIterator<Item = &'a ClusterService>,
) -> usize {
    let mut by_name: BTreeMap<ServiceName, Vec<&ClusterService>> = BTreeMap::new();
    for r in remotes {
        if !r.shared {
            continue;
        }
        let key = ServiceName {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        };
        if global.contains(&key) {
            by_name.entry(key).or_default().push(r);
        }
    }
    let mut added = 0;
    for e in &mut state.services {
        let Some(rs) = by_name.get(&e.name) else {
            continue;
        };
        let mut have: BTreeSet<L3n4Addr> = e.backends.iter().map(|b| b.addr).collect();
        for r in rs {
            for (ip, ports) in &r.backends {
                let Ok(ip) = ip.parse::<IpAddr>() else {
                    continue;
                };
                if ip.is_ipv6() != e.frontend.addr.is_ipv6() {
                    continue;
                }
                let Some(l4) = ports.get(&e.port_name) else {
                    continue;
                };
                if l4.protocol.parse::<Protocol>().ok() != Some(e.frontend.proto) {
                    continue;
                }
                let addr = L3n4Addr::new(ip, l4.port, e.frontend.proto);
                if have.insert(addr) {
                    e.backends.push(Backend {
                        addr,
                        state: BackendState::Active,
                        weight: DEFAULT_BACKEND_WEIGHT,
                        cluster_id: r.cluster_id,
                    });
                    added += 1;
                }
            }
        }
        e.backends.sort_by_key(|b| b.addr);
    }
    added
}
