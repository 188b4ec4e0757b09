//! Cluster-pool IPAM, the operator's half (as Cilium's operator): every
//! CiliumNode gets pod CIDRs carved out of the cluster pool in
//! `spec.ipam.podCIDRs`; with Cilium 1.12's cluster-pool-v2beta semantics
//! a node whose agent reports every CIDR of a family `depleted` gets one
//! more, and CIDRs it reports `released` are withdrawn. The agent creates
//! its CiliumNode (with `spec.addresses`) and reports usage in
//! `status.ipam.pod-cidrs`; it never writes `spec.ipam`.

use std::collections::BTreeMap;

use membrane_crds::CiliumNode;
use membrane_ipam::{Cidr, CidrState, ClusterPool, IpamError};
use membrane_k8s::Sink;
use membrane_store::{Kind, Object, ObjectKey, StoreSnapshot};
use tracing::{info, warn};

/// The cluster pool: (CIDR, node mask size) per family. Empty = the
/// operator does not allocate pod CIDRs.
pub type ClusterPoolConfig = Vec<(Cidr, u8)>;

fn name_of(n: &CiliumNode) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

fn spec_cidrs(n: &CiliumNode) -> Vec<Cidr> {
    n.spec
        .ipam
        .pod_cidrs
        .iter()
        .filter_map(|c| match c.parse::<Cidr>() {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(node = %name_of(n), error = %e, "CiliumNode spec.ipam.podCIDRs: entry ignored");
                None
            }
        })
        .collect()
}

fn status_states(n: &CiliumNode) -> BTreeMap<Cidr, CidrState> {
    n.status
        .iter()
        .flat_map(|s| &s.ipam.pod_cidrs)
        .filter_map(|(c, s)| Some((c.parse().ok()?, CidrState::parse(&s.status)?)))
        .collect()
}

/// Pod CIDRs for `node` before its agent starts (`membrane up` runs this
/// in-process): the ones its CiliumNode holds, else `preferred` (what the
/// agent used before, from its saved state) where still free, else the
/// first free ones. Writes `spec.ipam.podCIDRs` through `sink` when it
/// changes and returns them.
pub fn allocate_node(
    snap: &StoreSnapshot,
    cluster_pool: &[(Cidr, u8)],
    node: &str,
    preferred: &[Cidr],
    sink: &dyn Sink,
) -> Result<Vec<Cidr>, IpamError> {
    let mut pool = ClusterPool::new(cluster_pool.to_vec())?;
    let mut mine = None;
    for n in snap.typed::<CiliumNode>(None) {
        if name_of(n) == node {
            mine = Some(n.clone());
        } else {
            for c in spec_cidrs(n) {
                pool.occupy(&name_of(n), c);
            }
        }
    }
    let own: Vec<Cidr> = mine.as_ref().map(spec_cidrs).unwrap_or_default();
    if own.is_empty() {
        for c in preferred {
            let taken = snap
                .typed::<CiliumNode>(None)
                .filter(|n| name_of(n) != node)
                .any(|n| spec_cidrs(n).iter().any(|o| o.overlaps(c)));
            if !taken {
                pool.occupy(node, *c);
            }
        }
    } else {
        for c in &own {
            pool.occupy(node, *c);
        }
    }
    let cidrs = pool.allocate(node)?;
    let mut all = pool.node_cidrs(node);
    // Keep every CIDR the node holds (dynamic growth), the allocated ones
    // first.
    all.retain(|c| !cidrs.contains(c));
    let mut out = cidrs;
    out.extend(all);
    write_spec(mine, node, &out, sink);
    Ok(out)
}

fn write_spec(current: Option<CiliumNode>, node: &str, cidrs: &[Cidr], sink: &dyn Sink) {
    let wanted: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
    let mut cn = current.unwrap_or_else(|| CiliumNode::new(node, Default::default()));
    if cn.spec.ipam.pod_cidrs == wanted {
        return;
    }
    info!(
        node,
        from = ?cn.spec.ipam.pod_cidrs,
        to = ?wanted,
        "CiliumNode pod CIDRs"
    );
    cn.spec.ipam.pod_cidrs = wanted;
    cn.status = None;
    sink.apply_all(vec![Object::CiliumNode(cn)]);
}

/// The operator's memory between passes: what it last wrote to each
/// node's `spec.ipam.podCIDRs`. In Kubernetes mode a write reaches the
/// store only when the watch brings it back, so a pass that trusted the
/// store alone could hand a CIDR written a moment ago to another node.
#[derive(Debug, Default)]
pub struct NodeIpam {
    written: BTreeMap<String, Vec<Cidr>>,
}

impl NodeIpam {
    /// One pass over every CiliumNode: nodes without pod CIDRs get them,
    /// depleted families grow, released CIDRs are withdrawn. Returns the
    /// nodes that could not be served (cluster pool exhausted), with why.
    pub fn reconcile(
        &mut self,
        snap: &StoreSnapshot,
        cluster_pool: &[(Cidr, u8)],
        sink: &dyn Sink,
    ) -> BTreeMap<ObjectKey, String> {
        let mut rejected = BTreeMap::new();
        if cluster_pool.is_empty() {
            return rejected;
        }
        let mut pool = match ClusterPool::new(cluster_pool.to_vec()) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cluster pool");
                return rejected;
            }
        };
        let mut nodes: Vec<&CiliumNode> = snap.typed::<CiliumNode>(None).collect();
        nodes.sort_by_key(|n| name_of(n));
        self.written
            .retain(|name, _| nodes.iter().any(|n| name_of(n) == *name));
        // What each node holds: what this operator wrote last (the write
        // may not be back yet), else what the store says.
        let held: Vec<(String, Vec<Cidr>)> = nodes
            .iter()
            .map(|n| {
                let name = name_of(n);
                let cidrs = self
                    .written
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| spec_cidrs(n));
                (name, cidrs)
            })
            .collect();
        // Every CIDR already handed out is taken before any node grows.
        for (name, cidrs) in &held {
            for c in cidrs {
                pool.occupy(name, *c);
            }
        }
        for (n, (name, cidrs)) in nodes.into_iter().zip(held) {
            match pool.reconcile_node(&name, &cidrs, &status_states(n)) {
                Ok(new_spec) => {
                    // Written while the store differs: a repeat of a write
                    // in flight is dropped by the writer.
                    if new_spec != spec_cidrs(n) {
                        write_spec(Some(n.clone()), &name, &new_spec, sink);
                    }
                    self.written.insert(name, new_spec);
                }
                Err(e) => {
                    rejected.insert(
                        ObjectKey::new(Kind::CiliumNode, "", &name),
                        format!("CiliumNode {name}: spec.ipam.podCIDRs: {e}"),
                    );
                }
            }
        }
        rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_crds::{CiliumNodeStatus, PodCidrStatus};
    use membrane_k8s::StoreSink;
    use membrane_store::Store;

    fn node(store: &Store, name: &str) -> CiliumNode {
        store.get_typed::<CiliumNode>("", name).expect("node")
    }

    #[test]
    fn nodes_get_distinct_cidrs_grow_and_shrink() {
        let store = Store::new();
        let sink = StoreSink(store.clone());
        let pool = vec![("10.213.0.0/22".parse().expect("pool"), 24)];
        for n in ["b", "a"] {
            let mut cn = CiliumNode::new(n, Default::default());
            cn.spec.other.insert(
                "addresses".into(),
                serde_json::json!([{"type": "InternalIP", "ip": "192.0.2.1"}]),
            );
            store.apply(Object::CiliumNode(cn));
        }
        let mut ipam = NodeIpam::default();
        assert!(ipam.reconcile(&store.snapshot(), &pool, &sink).is_empty());
        let a = node(&store, "a");
        assert_eq!(a.spec.ipam.pod_cidrs, ["10.213.0.0/24"]);
        // The agent's fields stay.
        assert!(a.spec.other.contains_key("addresses"));
        assert_eq!(node(&store, "b").spec.ipam.pod_cidrs, ["10.213.1.0/24"]);
        // A stable state is a no-op.
        let before = store.snapshot();
        ipam.reconcile(&before, &pool, &sink);
        assert_eq!(node(&store, "a").spec, a.spec);

        let report = |state: &str, cidrs: &[&str]| CiliumNodeStatus {
            ipam: membrane_crds::NodeIpamStatus {
                pod_cidrs: cidrs
                    .iter()
                    .map(|c| {
                        (
                            c.to_string(),
                            PodCidrStatus {
                                status: state.into(),
                            },
                        )
                    })
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        let key = ObjectKey::new(Kind::CiliumNode, "", "a");
        store.update_status(
            &key,
            serde_json::to_value(report("depleted", &["10.213.0.0/24"])).expect("status"),
        );
        ipam.reconcile(&store.snapshot(), &pool, &sink);
        assert_eq!(
            node(&store, "a").spec.ipam.pod_cidrs,
            ["10.213.0.0/24", "10.213.2.0/24"]
        );
        store.update_status(
            &key,
            serde_json::to_value(report("released", &["10.213.2.0/24"])).expect("status"),
        );
        ipam.reconcile(&store.snapshot(), &pool, &sink);
        assert_eq!(node(&store, "a").spec.ipam.pod_cidrs, ["10.213.0.0/24"]);

        // Exhaustion is reported, naming the node and the field.
        let tiny = vec![("10.213.0.0/23".parse().expect("pool"), 24)];
        store.apply(Object::CiliumNode(CiliumNode::new("c", Default::default())));
        let rejected = NodeIpam::default().reconcile(&store.snapshot(), &tiny, &sink);
        let why = rejected
            .get(&ObjectKey::new(Kind::CiliumNode, "", "c"))
            .expect("c rejected");
        assert!(why.contains("CiliumNode c: spec.ipam.podCIDRs"), "{why}");
    }

    /// Records applies without writing them: the store lags, as the
    /// watch does in Kubernetes mode.
    #[derive(Default)]
    struct Lagging(std::sync::Mutex<Vec<Object>>);
    impl Sink for Lagging {
        fn apply_all(&self, objs: Vec<Object>) {
            self.0.lock().expect("lock").extend(objs);
        }
        fn delete(&self, _: &ObjectKey) {}
        fn status(&self, _: &ObjectKey, _: serde_json::Value) {}
        fn warn(&self, _: membrane_k8s::Warning) {}
    }

    #[test]
    fn a_write_not_back_yet_is_not_handed_out_again() {
        let store = Store::new();
        let sink = Lagging::default();
        let pool = vec![("10.213.0.0/22".parse().expect("pool"), 24)];
        let mut ipam = NodeIpam::default();
        // node-b first; its CIDR is written but the store does not show it
        // when node-a (sorted first) appears.
        store.apply(Object::CiliumNode(CiliumNode::new(
            "node-b",
            Default::default(),
        )));
        ipam.reconcile(&store.snapshot(), &pool, &sink);
        store.apply(Object::CiliumNode(CiliumNode::new(
            "node-a",
            Default::default(),
        )));
        ipam.reconcile(&store.snapshot(), &pool, &sink);
        let mut last: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in sink.0.lock().expect("lock").iter() {
            if let Object::CiliumNode(n) = o {
                last.insert(name_of(n), n.spec.ipam.pod_cidrs.clone());
            }
        }
        assert_eq!(last["node-b"], ["10.213.0.0/24"]);
        assert_eq!(last["node-a"], ["10.213.1.0/24"]);
    }

    #[test]
    fn allocate_node_prefers_saved_cidrs() {
        let store = Store::new();
        let sink = StoreSink(store.clone());
        let pool = vec![("10.213.0.0/22".parse().expect("pool"), 24)];
        let saved: Cidr = "10.213.3.0/24".parse().expect("saved");
        let got = allocate_node(&store.snapshot(), &pool, "a", &[saved], &sink).expect("a");
        assert_eq!(got, vec![saved]);
        assert_eq!(node(&store, "a").spec.ipam.pod_cidrs, ["10.213.3.0/24"]);
        // Taken by someone else: the first free one instead.
        let got = allocate_node(&store.snapshot(), &pool, "b", &[saved], &sink).expect("b");
        assert_eq!(got[0].to_string(), "10.213.0.0/24");
    }
}
