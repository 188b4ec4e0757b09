//! NACK isolation. When Envoy rejects a response, find the objects whose new
//! resources it carried, quarantine exactly those at their current version
//! (they fall back to the version Envoy last ACKed), and report them. The
//! reverted content is what gets sent next, so nothing is resent in a loop,
//! and every other object keeps updating. Quarantined versions are retried
//! with backoff (see `ConfigPipeline::quarantine`), at once when Envoy
//! restarts; a NACK stops being shown once the objects it was pinned on are
//! deleted or changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use membrane_store::ObjectKey;
use membrane_xds::{Snapshot, SnapshotCache, XdsStatus};
use tracing::{info, warn};

use crate::Reconciler;
use crate::configs::Quarantined;
use crate::state::AgentState;

/// A NACK not handled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub type_url: String,
    pub error_detail: String,
    pub stream_id: u64,
    pub nonce: String,
    /// The names the stream subscribes to (`None`: all, a wildcard):
    /// only those can have been in the rejected response.
    pub subscribed: Option<BTreeSet<String>>,
}

/// A handled NACK and the objects (at their resourceVersion then) it was
/// pinned on.
struct Pinned {
    type_url: String,
    nonce: String,
    objects: Vec<(ObjectKey, Option<String>)>,
}

/// Everything the control loop does with Envoy's answers: quarantine on
/// NACK, retry on Envoy restart, forget NACKs of objects that are gone.
#[derive(Default)]
pub struct NackHandler {
    watcher: NackWatcher,
    envoy_pid: Option<u32>,
    pinned: Vec<Pinned>,
}

impl NackHandler {
    /// Returns true when the configuration must be recomputed.
    pub fn handle(&mut self, rec: &mut Reconciler, state: &AgentState) -> bool {
        let mut dirty = false;
        // A new Envoy starts from nothing: whatever the old one refused
        // (a busy port, an unknown cluster) may work now.
        let pid = state.envoy.borrow().pid;
        if pid.is_some() && pid != self.envoy_pid {
            if self.envoy_pid.is_some() && rec.pipeline.next_retry().is_some() {
                info!("Envoy restarted: retrying quarantined configuration");
                rec.pipeline.retry_all_now();
                dirty |= rec.pipeline.retry_due(std::time::Instant::now());
            }
            self.envoy_pid = pid;
        }
        for nack in self.watcher.take_new(&state.cache.status(), &state.node_id) {
            let suspects = suspects(
                &nack,
                &rec.served,
                &rec.xds_snapshot,
                &state.cache,
                &state.node_id,
            );
            let detail = clean_detail(&nack.error_detail);
            if suspects.is_empty() {
                warn!(type_url = %nack.type_url, %detail, "Envoy NACK not attributable to any object");
            }
            let mut objects = Vec::new();
            for key in suspects {
                let names = own_names(&nack, &rec.served, &key);
                let reason = format!(
                    "Envoy rejected its {} {}: {detail}",
                    crate::short_type(&nack.type_url),
                    names.join(", ")
                );
                match rec.pipeline.quarantine(&key, reason) {
                    Quarantined::New => {
                        state.nacks_isolated.fetch_add(1, Ordering::Relaxed);
                        warn!(object = %key, %detail, "quarantined after Envoy NACK; serving its last ACKed version");
                        dirty = true;
                    }
                    Quarantined::Again => {
                        warn!(object = %key, %detail, "retry rejected by Envoy again; quarantined, retrying later");
                        dirty = true;
                    }
                    Quarantined::No => {}
                }
                let rv = state
                    .store
                    .get(&key)
                    .and_then(|o| o.meta().resource_version.clone());
                objects.push((key, rv));
            }
            if !objects.is_empty() {
                self.pinned.push(Pinned {
                    type_url: nack.type_url,
                    nonce: nack.nonce,
                    objects,
                });
            }
        }
        self.forget_resolved(state);
        dirty
    }

    /// A NACK whose objects were all deleted, or changed and no longer
    /// rejected, is history: `membrane status` stops showing it.
    fn forget_resolved(&mut self, state: &AgentState) {
        let rejected = state
            .rejections
            .lock()
            .map(|r| r.keys().cloned().collect::<BTreeSet<String>>())
            .unwrap_or_default();
        self.pinned.retain(|p| {
            let resolved = p
                .objects
                .iter()
                .all(|(key, rv)| match state.store.get(key) {
                    None => true,
                    Some(obj) => {
                        obj.meta().resource_version != *rv && !rejected.contains(&key.to_string())
                    }
                });
            if resolved {
                state
                    .cache
                    .dismiss_nack(&state.node_id, &p.type_url, &p.nonce);
            }
            !resolved
        });
    }
}

/// The resources of `type_url` that `key` serves, for messages.
fn own_names(
    nack: &Nack,
    served: &BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
    key: &ObjectKey,
) -> Vec<String> {
    let mine: Vec<&String> = served
        .get(key)
        .into_iter()
        .flatten()
        .filter(|(t, _)| *t == nack.type_url)
        .map(|(_, n)| n)
        .collect();
    let named: Vec<String> = mine
        .iter()
        .filter(|n| nack.error_detail.contains(n.as_str()))
        .map(|n| n.to_string())
        .collect();
    if named.is_empty() && mine.len() == 1 {
        vec![mine[0].clone()]
    } else {
        named
    }
}

/// Envoy's error text made readable: one line, whole, without the protobuf
/// dump Envoy appends to validation errors.
pub fn clean_detail(detail: &str) -> String {
    const CHECK: &str = "Proto constraint validation failed (";
    // Envoy 1.3x+ prints the message before the error, behind a marker
    // protobuf varies on purpose (`goo.gle/debugproto`, `goo.gle/debugstr`):
    // `<marker> <message> : Proto constraint validation failed (…)`.
    const MARK: &str = "goo.gle/debug";
    let mut text = detail.to_owned();
    let mut omitted = false;
    if let Some(mark) = text.find(MARK)
        && let Some(check) = text[mark..].find(CHECK).map(|i| mark + i)
    {
        text.replace_range(mark..check, "");
        omitted = true;
    }
    // Older Envoys print it after the (parenthesised, maybe nested) error.
    if let Some(start) = text.find(CHECK) {
        let open = start + CHECK.len();
        let mut depth = 1usize;
        let mut end = None;
        for (i, c) in text[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = Some(open + i + 1);
                break;
            }
        }
        if let Some(end) = end
            && !text[end..].trim().is_empty()
        {
            text.truncate(end);
            omitted = true;
        }
    }
    let mut out = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if omitted {
        out.push_str(" (message dump omitted)");
    }
    out
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
                        stream_id: stream.stream_id,
                        nonce: nack.nonce.clone(),
                        subscribed: (!t.wildcard).then(|| t.subscribed.iter().cloned().collect()),
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
            .filter(|(_, n)| nack.subscribed.as_ref().is_none_or(|s| s.contains(n)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_dumps_are_dropped_and_text_is_one_line() {
        let raw = "Error adding/updating listener(s) ns/c/l: Proto constraint validation failed (ListenerValidationError.Address: embedded message failed validation | caused by SocketAddressValidationError.PortValue: value must be less than or equal to 65535 (got 70000)): name: \"ns/c/l\"\naddress {\n  socket_address {\n    port_value: 70000\n  }\n}\n";
        let clean = clean_detail(raw);
        assert_eq!(
            clean,
            "Error adding/updating listener(s) ns/c/l: Proto constraint validation failed (ListenerValidationError.Address: embedded message failed validation | caused by SocketAddressValidationError.PortValue: value must be less than or equal to 65535 (got 70000)) (message dump omitted)"
        );
        let new_style = "Error adding/updating listener(s) ns/c/l: goo.gle/debugproto name: \"ns/c/l\" address { socket_address { port_value: 70000 } } : Proto constraint validation failed (ListenerValidationError.Address: embedded message failed validation | caused by SocketAddressValidationError.PortValue: value must be less than or equal to 65535)\n";
        assert_eq!(
            clean_detail(new_style),
            "Error adding/updating listener(s) ns/c/l: Proto constraint validation failed (ListenerValidationError.Address: embedded message failed validation | caused by SocketAddressValidationError.PortValue: value must be less than or equal to 65535) (message dump omitted)"
        );
        assert_eq!(
            clean_detail(&new_style.replace("debugproto", "debugstr")),
            clean_detail(new_style)
        );
        let long = "x ".repeat(3000);
        assert_eq!(clean_detail(&long).len(), 5999, "never cut");
        assert_eq!(clean_detail("cannot bind\n  port"), "cannot bind port");
    }
}
