//! L3/L4 policy on the node's endpoints: CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy, NetworkPolicy, Namespaces and Pods from
//! the store plus the CNI's endpoints → [`membrane_policy`] → the
//! [`membrane_ebpf::policy`] maps behind each endpoint's host device.
//!
//! An endpoint is programmed from the CNI's `ready` hook, before ADD
//! returns, so its first packet is already under policy; afterwards
//! [`follow`] recomputes when a policy input or the endpoint set changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use membrane_ebpf::policy::{PolicyDatapath, PolicyDatapathError};
use membrane_endpoint::Manager;
use membrane_policy::manifest::{Manifests, parse_dport, parse_party, trace_report};
use membrane_policy::{Identities, State};
use membrane_store::{Kind, Object, Store, StoreSnapshot};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Kinds whose objects feed the policy computation.
const INPUT_KINDS: [Kind; 5] = [
    Kind::CiliumNetworkPolicy,
    Kind::CiliumClusterwideNetworkPolicy,
    Kind::NetworkPolicy,
    Kind::Namespace,
    Kind::Pod,
];

/// The loaded policy datapath and what was last programmed.
pub struct PolicyHandle {
    inner: Mutex<Inner>,
}

struct Inner {
    dp: PolicyDatapath,
    /// Kept across recomputations so identities stay stable.
    ids: Identities,
    /// Host device → ifindex, for attached devices.
    ifindex: BTreeMap<String, u32>,
    /// Local endpoints by policy endpoint id.
    endpoints: BTreeMap<u32, membrane_endpoint::Endpoint>,
    /// The store objects the last computation used (by identity), so
    /// changes to other kinds cost nothing.
    last_inputs: Vec<Arc<Object>>,
    last_endpoints: BTreeMap<u32, membrane_endpoint::Endpoint>,
    state: Option<State>,
    /// Endpoint id → the device it was last programmed behind; an
    /// endpoint is rewritten when its compiled policy may have changed
    /// (`State::changed_endpoints`) or its device did.
    programmed: BTreeMap<u32, u32>,
    /// Each input object's translation, by object identity: a change
    /// re-reads only the objects that changed.
    translated: HashMap<usize, (Arc<Object>, Manifests)>,
    /// The cluster and policies `state` was built from (for traces).
    inputs: Manifests,
    /// Per endpoint id: why it could not be programmed.
    errors: BTreeMap<u32, String>,
    /// Policies (or parts) that were not translated.
    policy_errors: Vec<String>,
    computations: u64,
    last_duration: Duration,
}

impl PolicyHandle {
    /// Loads the policy programs (maps pinned under `pin_dir`, restored if
    /// they exist).
    pub fn start(pin_dir: &Path) -> Result<Self, PolicyDatapathError> {
        let dp = PolicyDatapath::load(pin_dir)?;
        info!(pin_dir = %pin_dir.display(), "policy datapath loaded");
        Ok(PolicyHandle {
            inner: Mutex::new(Inner {
                dp,
                ids: Identities::default(),
                ifindex: BTreeMap::new(),
                endpoints: BTreeMap::new(),
                last_inputs: Vec::new(),
                last_endpoints: BTreeMap::new(),
                state: None,
                programmed: BTreeMap::new(),
                translated: HashMap::new(),
                inputs: Manifests::default(),
                errors: BTreeMap::new(),
                policy_errors: Vec::new(),
                computations: 0,
                last_duration: Duration::ZERO,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every map write is one syscall: a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attach both policy programs to an endpoint's host device.
    pub fn attach(&self, ifname: &str) -> Result<(), String> {
        let mut inner = self.lock();
        let idx = inner.dp.attach(ifname).map_err(|e| e.to_string())?;
        inner.ifindex.insert(ifname.to_string(), idx);
        Ok(())
    }

    /// Stop enforcing on a removed endpoint's host device.
    pub fn detach(&self, ifname: &str) {
        let mut inner = self.lock();
        let idx = inner.ifindex.remove(ifname);
        let gone: Vec<u32> = inner
            .endpoints
            .iter()
            .filter(|(_, e)| e.host_ifname == ifname)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            inner.programmed.remove(&id);
            // Its addresses stop carrying its identity now, not at the next
            // recompute (a new pod may get them first).
            if let Some(ep) = inner.endpoints.remove(&id)
                && let Err(e) = inner.dp.remove_ipcache_hosts(&ep.addrs)
            {
                warn!(ifname, error = %e, "removing ipcache entries");
            }
            if let Some(idx) = idx
                && let Err(e) = inner.dp.remove_endpoint(idx, id)
            {
                warn!(ifname, error = %e, "removing policy entries");
            }
        }
        if let Err(e) = inner.dp.detach(ifname) {
            warn!(ifname, error = %e, "detaching the policy programs");
        }
    }

    /// A new endpoint: program it (and every endpoint its labels may
    /// concern) now. Errors name the endpoint.
    pub fn ready(
        &self,
        snap: &StoreSnapshot,
        ep: &membrane_endpoint::Endpoint,
    ) -> Result<(), String> {
        let id = policy_id(ep.id)?;
        let mut inner = self.lock();
        inner.endpoints.insert(id, ep.clone());
        inner.recompute(snap, true);
        match inner.errors.get(&id) {
            Some(e) => Err(format!("policy for endpoint {id} ({}): {e}", ep.pod())),
            None => Ok(()),
        }
    }

    /// The endpoint manager's current set (labels, restarts).
    /// Endpoints restored from an earlier run get the programs again (the
    /// pinned links are reused), so their devices are known.
    pub fn set_endpoints(&self, eps: &[membrane_endpoint::Endpoint]) {
        let mut inner = self.lock();
        for e in eps {
            if !inner.ifindex.contains_key(&e.host_ifname) {
                match inner.dp.attach(&e.host_ifname) {
                    Ok(idx) => {
                        inner.ifindex.insert(e.host_ifname.clone(), idx);
                    }
                    Err(err) => {
                        warn!(pod = %e.pod(), ifname = %e.host_ifname, error = %err, "policy programs not attached")
                    }
                }
            }
        }
        // Merged, not replaced: an ADD may have registered an endpoint
        // after `eps` was listed. Endpoints leave through `detach` (DEL,
        // GC and failed ADDs all call it).
        for e in eps {
            if let Ok(id) = policy_id(e.id) {
                inner.endpoints.insert(id, e.clone());
            }
        }
    }

    /// Recompute if a policy input changed; returns whether it did.
    pub fn sync(&self, snap: &StoreSnapshot) -> bool {
        self.lock().recompute(snap, false)
    }

    /// `GET /v1/policy`: policies in force per endpoint, its identity and
    /// enforcement per direction.
    pub fn report(&self) -> Value {
        let inner = self.lock();
        let mut eps = Vec::new();
        for (id, ep) in &inner.endpoints {
            eps.push(inner.endpoint_json(*id, ep));
        }
        // Read back from the kernel: what packets are judged by.
        let ipcache = inner.dp.ipcache_entries().unwrap_or_else(|e| {
            warn!(error = %e, "reading the policy ipcache");
            BTreeMap::new()
        });
        json!({
            "endpoints": eps,
            "ipcache": ipcache,
            "errors": inner.policy_errors,
            "computations": inner.computations,
            "lastComputationMicros": inner.last_duration.as_micros() as u64,
        })
    }

    /// `POST /v1/policy/trace` (`membrane policy trace` without files): one
    /// packet under the policies and endpoints in force on this node.
    /// `body`: `{"src": .., "dst": .., "dport": "80/TCP"}`, the CLI's syntax.
    pub fn trace(&self, body: &Value) -> Result<Value, String> {
        let field = |k: &str| {
            body[k]
                .as_str()
                .ok_or_else(|| format!("trace request: {k}: missing"))
        };
        let src = parse_party(field("src")?).map_err(|e| format!("src: {e}"))?;
        let dst = parse_party(field("dst")?).map_err(|e| format!("dst: {e}"))?;
        let dport = body["dport"].as_str().unwrap_or("0/TCP");
        let (proto, port) = parse_dport(dport).map_err(|e| format!("dport: {e}"))?;
        let inner = self.lock();
        let (t, report) = trace_report(&inner.inputs, &src, &dst, proto, port);
        Ok(json!({
            "verdict": if t.verdict == membrane_policy::Verdict::Allow { "ALLOWED" } else { "DENIED" },
            "deciding": t.deciding().map(|d| d.reason.to_string()),
            "report": report,
        }))
    }

    /// Identity and enforcement of one endpoint, for `membrane endpoint list`.
    pub fn endpoint_columns(&self, ep_id: u64) -> Option<Value> {
        let inner = self.lock();
        let id = policy_id(ep_id).ok()?;
        let st = inner.state.as_ref()?;
        let pol = st.compile(id)?;
        Some(json!({
            "identity": pol.identity,
            "ingressEnforcement": pol.ingress_enforced,
            "egressEnforcement": pol.egress_enforced,
        }))
    }
}

impl Inner {
    /// Build the policy state from the store and the local endpoints and
    /// program what changed. Returns false when no input changed (unless
    /// `force`).
    fn recompute(&mut self, snap: &StoreSnapshot, force: bool) -> bool {
        let inputs: Vec<Arc<Object>> = INPUT_KINDS
            .iter()
            .flat_map(|k| snap.list(*k, None).cloned())
            .collect();
        let same = inputs.len() == self.last_inputs.len()
            && inputs
                .iter()
                .zip(&self.last_inputs)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !force && same && self.endpoints == self.last_endpoints {
            return false;
        }
        let start = Instant::now();
        let mut m = self.translate(&inputs);
        // The node's own addresses are identity `host` (allow-localhost
        // admits them, as Cilium does), not `world`.
        m.cluster.host_ips = host_addresses();
        // Local endpoints carry the CNI's addresses and ids; Pods of other
        // nodes (with addresses in their status) are peers only.
        let local_pods: BTreeSet<(String, String)> = self
            .endpoints
            .values()
            .map(|e| (e.pod_namespace.clone(), e.pod_name.clone()))
            .collect();
        // Local pods' labels come from the Pod itself when the store has it
        // (the endpoint's copy may lag behind a label change).
        let mut from_pod: BTreeMap<(String, String), membrane_policy::Endpoint> = BTreeMap::new();
        for ep in std::mem::take(&mut m.cluster.endpoints) {
            let key = (ep.namespace.clone(), ep.name.clone());
            if local_pods.contains(&key) {
                from_pod.insert(key, ep);
            } else if !ep.ips.is_empty() {
                m.cluster
                    .endpoints
                    .push(membrane_policy::Endpoint { id: 0, ..ep });
            }
        }
        for (id, e) in &self.endpoints {
            let key = (e.pod_namespace.clone(), e.pod_name.clone());
            m.cluster
                .namespaces
                .entry(e.pod_namespace.clone())
                .or_insert_with(|| {
                    BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_string(),
                        e.pod_namespace.clone(),
                    )])
                });
            let pod = from_pod.remove(&key);
            m.cluster.endpoints.push(membrane_policy::Endpoint {
                id: *id,
                name: e.pod_name.clone(),
                namespace: e.pod_namespace.clone(),
                labels: pod
                    .as_ref()
                    .map_or_else(|| e.labels.clone(), |p| p.labels.clone()),
                ips: e.addrs.clone(),
                named_ports: pod.map(|p| p.named_ports).unwrap_or_default(),
            });
        }
        self.policy_errors = m
            .errors
            .iter()
            .cloned()
            .chain(m.policies.errors.iter().map(ToString::to_string))
            .collect();
        let state = State::build_with(
            &m.cluster,
            m.policies.clone(),
            self.ids.clone(),
            self.state.as_ref(),
        );
        self.ids = state.identities.clone();
        // Endpoints that failed last time are retried.
        let failed: BTreeSet<u32> = std::mem::take(&mut self.errors).into_keys().collect();
        if let Err(e) = self.dp.sync_ipcache(&state.ipcache) {
            warn!(error = %e, "policy ipcache");
            for id in self.endpoints.keys() {
                self.errors.insert(*id, format!("ipcache: {e}"));
            }
        }
        // Only endpoints whose entries may differ are compiled and
        // written; the rest keep what the kernel has.
        let changed = self.state.as_ref().map(|old| state.changed_endpoints(old));
        let (mut written, mut compiled) = (0, 0);
        for (id, ep) in &self.endpoints {
            let Some(idx) = self.ifindex.get(&ep.host_ifname).copied() else {
                continue;
            };
            let stale = changed.as_ref().is_none_or(|c| c.contains(id))
                || self.programmed.get(id) != Some(&idx)
                || failed.contains(id);
            if !stale {
                continue;
            }
            let Some(pol) = state.compile(*id) else {
                continue;
            };
            compiled += 1;
            match self.dp.sync_endpoint(idx, &pol) {
                Ok(r) => {
                    written += r.entries_written + r.entries_removed;
                    self.programmed.insert(*id, idx);
                }
                Err(e) => {
                    warn!(endpoint = *id, pod = %ep.pod(), error = %e, "policy not programmed");
                    self.errors.insert(*id, e.to_string());
                }
            }
        }
        self.last_inputs = inputs;
        self.last_endpoints = self.endpoints.clone();
        self.state = Some(state);
        self.inputs = m;
        self.computations += 1;
        self.last_duration = start.elapsed();
        info!(
            endpoints = self.endpoints.len(),
            compiled,
            entries_changed = written,
            micros = self.last_duration.as_micros() as u64,
            "policy programmed"
        );
        true
    }

    /// The inputs as one [`Manifests`]; objects seen before (same `Arc`)
    /// reuse their translation.
    fn translate(&mut self, inputs: &[Arc<Object>]) -> Manifests {
        let mut cache = std::mem::take(&mut self.translated);
        let mut m = Manifests::from_values(&[]);
        for o in inputs {
            // The key is the object's address; the entry keeps the `Arc`
            // alive, so the address cannot be reused while cached.
            let key = Arc::as_ptr(o) as usize;
            let entry = match cache.remove(&key) {
                Some(e) => e,
                None => (o.clone(), Manifests::from_values(&[o.to_value()])),
            };
            let part = &entry.1;
            m.policies.rules.extend(part.policies.rules.iter().cloned());
            m.policies
                .enforcements
                .extend(part.policies.enforcements.iter().cloned());
            m.policies
                .errors
                .extend(part.policies.errors.iter().cloned());
            m.errors.extend(part.errors.iter().cloned());
            if o.kind() == Kind::Namespace {
                m.cluster.namespaces.extend(
                    part.cluster
                        .namespaces
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone())),
                );
            }
            m.cluster
                .endpoints
                .extend(part.cluster.endpoints.iter().cloned());
            self.translated.insert(key, entry);
        }
        m
    }

    fn endpoint_json(&self, id: u32, ep: &membrane_endpoint::Endpoint) -> Value {
        let Some(st) = &self.state else {
            return json!({"id": id, "pod": ep.pod()});
        };
        let Some(pol) = st.compile(id) else {
            return json!({"id": id, "pod": ep.pod()});
        };
        let labels = st.identities.get(pol.identity).map(|i| &i.labels);
        let mut policies = BTreeSet::new();
        if let Some(l) = labels {
            for r in &st.policies.rules {
                if r.subject.matches(l) {
                    policies.insert(r.origin.policy());
                }
            }
            for e in &st.policies.enforcements {
                if e.subject.matches(l) {
                    policies.insert(e.origin.policy());
                }
            }
        }
        let dir = |enforced: bool| if enforced { "default-deny" } else { "allow" };
        json!({
            "id": id,
            "pod": ep.pod(),
            "identity": pol.identity,
            "labels": labels.map(|l| l.0.iter().map(ToString::to_string).collect::<Vec<_>>()),
            "ingress": dir(pol.ingress_enforced),
            "egress": dir(pol.egress_enforced),
            "entries": pol.entries.len(),
            "policies": policies,
            "error": self.errors.get(&id),
        })
    }
}

/// Addresses of this network namespace's interfaces (loopback aside).
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below; every node
    // and address pointer is checked for null before being read.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            warn!(error = %std::io::Error::last_os_error(), "listing the node's addresses");
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let a = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let a = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(a.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.retain(|a| !a.is_loopback());
    out.sort();
    out.dedup();
    out
}

/// Datapath endpoint ids are 32-bit.
fn policy_id(id: u64) -> Result<u32, String> {
    u32::try_from(id).map_err(|_| format!("endpoint id {id} does not fit the policy maps"))
}

/// Keep the maps in step with the store and the endpoint set until
/// `shutdown`.
pub async fn follow(
    policy: Arc<PolicyHandle>,
    m: Arc<Manager>,
    store: Store,
    shutdown: CancellationToken,
) {
    // Endpoints come and go through the hooks (`ready`, `detach`); the
    // manager's list is re-read on each pass for restarts and GC. Its
    // change notification wakes one waiter only and belongs to the CNI's
    // own loop.
    let mut rx = store.subscribe();
    loop {
        policy.set_endpoints(&m.list().await);
        policy.sync(&store.snapshot());
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}
