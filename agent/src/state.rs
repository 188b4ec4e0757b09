//! What the running agent shares between its tasks and shows in `status`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use membrane_store::Store;
use membrane_xds::SnapshotCache;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::envoy::EnvoyState;

/// Shared state of one agent.
pub struct AgentState {
    pub store: Store,
    pub cache: SnapshotCache,
    pub node_id: String,
    pub envoy: watch::Receiver<EnvoyState>,
    /// Rejected objects (`Kind ns/name`) and why, replaced on every pass.
    pub rejections: Mutex<BTreeMap<String, String>>,
    /// Objects served with a warning (expired certificate, RDS name no
    /// CEC defines) and why.
    pub warnings: Mutex<BTreeMap<String, String>>,
    /// How many object versions were quarantined after an Envoy NACK.
    pub nacks_isolated: AtomicU64,
    /// The eBPF service datapath, when running (`--datapath ebpf`).
    pub datapath: Option<std::sync::Arc<crate::datapath::DatapathHandle>>,
    /// Pod endpoints set up through `membrane-cni` (`--enable-cni`).
    pub endpoints: Option<std::sync::Arc<membrane_endpoint::Manager>>,
    /// L3/L4 policy on those endpoints (`--enable-cni --datapath ebpf`).
    pub policy: Option<std::sync::Arc<crate::policy::PolicyHandle>>,
}

impl AgentState {
    /// The report behind `membrane status` and `GET /v1/status`.
    pub fn status_report(&self) -> Value {
        let envoy = self.envoy.borrow().clone();
        let mut rejected: Vec<Value> = self
            .rejections
            .lock()
            .map(|r| {
                r.iter()
                    .map(|(object, reason)| json!({"object": object, "reason": reason}))
                    .collect()
            })
            .unwrap_or_default();
        for (origin, problem) in self.store.problems() {
            rejected.push(json!({"object": origin, "reason": problem}));
        }
        let datapath = match &self.datapath {
            Some(dp) => {
                for (object, reason) in dp.rejections() {
                    rejected.push(json!({"object": object, "reason": reason}));
                }
                dp.status_json()
            }
            None => json!({"mode": "none"}),
        };
        let warnings: Vec<Value> = self
            .warnings
            .lock()
            .map(|w| {
                w.iter()
                    .map(|(object, reason)| json!({"object": object, "reason": reason}))
                    .collect()
            })
            .unwrap_or_default();
        let xds = serde_json::to_value(self.cache.status()).unwrap_or(Value::Null);
        json!({
            "node": self.node_id,
            // Serving needs Envoy: not ready while it is down or starting.
            "ready": envoy.running && envoy.ready,
            "envoy": envoy,
            "xds": xds,
            "rejected": rejected,
            "warnings": warnings,
            "datapath": datapath,
            "metrics": {
                "nacks_isolated_total": self.nacks_isolated.load(Ordering::Relaxed),
            },
        })
    }
}
