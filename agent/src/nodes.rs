//! Snapshots for every connected Envoy: a CEC's `nodeSelector` is matched
//! against each node's labels (its Envoy `node.metadata.labels`), so each
//! node gets exactly the configs meant for it. Nodes with the same labels
//! share one computed snapshot; the xDS cache shares its resources.

use std::collections::BTreeMap;

use membrane_store::StoreSnapshot;
use membrane_xds::{Snapshot, SnapshotCache};

use crate::configs::{Built, ConfigPipeline};
use crate::placement::PortMap;

type Labels = BTreeMap<String, String>;

struct LabelSet {
    pipeline: ConfigPipeline,
    last: Option<Vec<Built>>,
    snapshot: Snapshot,
}

/// Per-label-set pipelines for the nodes other than the agent's own.
pub struct NodeSnapshots {
    ports: PortMap,
    sets: BTreeMap<Labels, LabelSet>,
    /// What each node was last given: its labels.
    published: BTreeMap<String, Labels>,
}

impl NodeSnapshots {
    pub fn new(ports: PortMap) -> Self {
        Self {
            ports,
            sets: BTreeMap::new(),
            published: BTreeMap::new(),
        }
    }

    /// The other nodes and their labels, as the cache knows them now.
    fn others(cache: &SnapshotCache, own_node: &str) -> BTreeMap<String, Labels> {
        let mut nodes = cache.connected_node_labels();
        nodes.remove(own_node);
        nodes
    }

    /// Whether nodes connected, left or changed labels since the last pass.
    pub fn nodes_changed(&self, cache: &SnapshotCache, own_node: &str) -> bool {
        Self::others(cache, own_node) != self.published
    }

    /// Recompute and publish the snapshot of every other node. When the
    /// agent's own node has labels, its snapshot is node-specific and the
    /// default (served to nodes not identified yet) is the one for a node
    /// without labels; otherwise the default is the agent's own.
    pub fn pass(
        &mut self,
        snap: &StoreSnapshot,
        cache: &SnapshotCache,
        own_node: &str,
        own_labels: &Labels,
        own_snapshot: &Snapshot,
    ) {
        let publish_default = !own_labels.is_empty();
        let nodes = Self::others(cache, own_node);
        let mut wanted: Vec<Labels> = nodes.values().cloned().collect();
        if publish_default {
            wanted.push(Labels::new());
        }
        wanted.sort();
        wanted.dedup();
        // The agent's own labels are computed by the main pass already.
        wanted.retain(|l| l != own_labels);
        self.sets.retain(|labels, _| wanted.contains(labels));
        for labels in &wanted {
            let ports = self.ports;
            let set = self.sets.entry(labels.clone()).or_insert_with(|| LabelSet {
                pipeline: ConfigPipeline::new(ports, labels.clone()),
                last: None,
                snapshot: Snapshot::new(),
            });
            let pass = set.pipeline.run(snap);
            if !set
                .last
                .as_ref()
                .is_some_and(|last| crate::same_resources(last, &pass.resources))
            {
                set.snapshot = crate::build_snapshot(&pass.resources);
                set.last = Some(pass.resources);
            }
        }
        for (node, labels) in &nodes {
            match self.sets.get(labels) {
                Some(set) => cache.set_snapshot(Some(node), set.snapshot.clone()),
                // Same labels as the agent's own node: serve what it serves.
                None if publish_default => cache.set_snapshot(Some(node), own_snapshot.clone()),
                None => cache.clear_snapshot(node),
            }
        }
        for gone in self.published.keys().filter(|n| !nodes.contains_key(*n)) {
            cache.clear_snapshot(gone);
        }
        if publish_default && let Some(set) = self.sets.get(&Labels::new()) {
            cache.set_snapshot(None, set.snapshot.clone());
        }
        self.published = nodes;
    }
}
