//! Ingress status: `status.loadBalancer.ingress[0].ip` is written only once
//! Envoy has ACKed every listener, route and cluster of the Ingress's CEC at
//! their current content — never merely because a config was computed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use membrane_store::{Kind, ObjectKey, Store, StoreSnapshot};
use membrane_xds::{Snapshot, SnapshotCache};
use serde_json::json;

use crate::ingress_controller::ManagedIngress;
use crate::lb_ipam::lb_ip;

/// Remembers which Ingresses carry a status written by us.
#[derive(Debug, Default)]
pub struct StatusWriter {
    written: BTreeSet<ObjectKey>,
}

impl StatusWriter {
    #[allow(clippy::too_many_arguments)]
    pub fn reconcile(
        &mut self,
        store: &Store,
        snap: &StoreSnapshot,
        managed: &[ManagedIngress],
        served: &BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
        xds: &Snapshot,
        cache: &SnapshotCache,
        node_id: &str,
    ) {
        let mut still_managed = BTreeSet::new();
        for m in managed {
            still_managed.insert(m.ingress.clone());
            let Some(resources) = served.get(&m.cec) else {
                continue;
            };
            let acked = !resources.is_empty()
                && resources.iter().all(|(t, n)| {
                    let current = xds.get(t, n).map(|r| r.hash);
                    current.is_some() && cache.acked_hash(node_id, t, n) == current
                });
            if !acked {
                continue;
            }
            let Some(ip) = snap
                .get_typed::<Service>(&m.service.namespace, &m.service.name)
                .and_then(lb_ip)
            else {
                continue;
            };
            store.update_status(
                &m.ingress,
                json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}),
            );
            self.written.insert(m.ingress.clone());
        }
        // An Ingress that is no longer ours loses the address we gave it.
        let dropped: Vec<ObjectKey> = self
            .written
            .iter()
            .filter(|k| !still_managed.contains(*k))
            .cloned()
            .collect();
        for key in dropped {
            if key.kind == Kind::Ingress {
                store.update_status(&key, json!({"loadBalancer": {}}));
            }
            self.written.remove(&key);
        }
    }
}
