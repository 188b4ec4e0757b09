//! NACK isolation. When Envoy rejects a response, find the objects whose new
//! resources it carried, quarantine exactly those at their current version
//! (they fall back to the version Envoy last ACKed), and report them. The
//! reverted content is what gets sent next, so nothing is resent in a loop,
//! and every other object keeps updating.

use std::collections::{BTreeMap, BTreeSet};

use membrane_store::ObjectKey;
use membrane_xds::{Snapshot, SnapshotCache, XdsStatus};

/// A NACK not handled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub type_url: String,
    pub error_detail: String,
}

/// Remembers which NACKs (by type and nonce) were already acted on.
#[derive(Debug, Default)]
pub struct NackWatcher {
    handled: BTreeSet<(u64, String, String)>,
}

impl NackWatcher {
    /// NACKs from `node`'s streams that were not seen before.
    pub fn take_new(&mut self, status: &XdsStatus, node: &str) -> Vec<Nack> {
        let mut out = Vec::new();
        for stream in status.streams.iter().filter(|s| s.node_id == node) {
            for (type_url, t) in &stream.types {
                let Some(nack) = &t.last_nack else { continue };
                let id = (stream.stream_id, type_url.clone(), nack.nonce.clone());
                if self.handled.insert(id) {
                    out.push(Nack {
                        type_url: type_url.clone(),
                        error_detail: nack.error_detail.clone(),
                    });
                }
            }
        }
        out
    }
}

/// The objects a NACK of `nack.type_url` can be blamed on: those with a
/// resource of that type Envoy has not ACKed at its current content. When
/// Envoy's message names some of those resources, only their owners.
pub fn suspects(
    nack: &Nack,
    served: &BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
    xds: &Snapshot,
    cache: &SnapshotCache,
    node: &str,
) -> Vec<ObjectKey> {
    let mut unacked: Vec<(ObjectKey, Vec<&str>)> = Vec::new();
    for (key, resources) in served {
        let names: Vec<&str> = resources
            .iter()
            .filter(|(t, _)| *t == nack.type_url)
            .filter(|(t, n)| {
                let current = xds.get(t, n).map(|r| r.hash);
                current.is_some() && cache.acked_hash(node, t, n) != current
            })
            .map(|(_, n)| n.as_str())
            .collect();
        if !names.is_empty() {
            unacked.push((key.clone(), names));
        }
    }
    let named: Vec<ObjectKey> = unacked
        .iter()
        .filter(|(_, names)| names.iter().any(|n| nack.error_detail.contains(n)))
        .map(|(k, _)| k.clone())
        .collect();
    if named.is_empty() {
        unacked.into_iter().map(|(k, _)| k).collect()
    } else {
        named
    }
}
