//! etcd I/O: export this cluster's global services, import remote ones.
//!
//! Export writes every key under one lease kept alive while this cluster
//! lives, so a dead cluster's entries expire from its etcd. Import runs one
//! task per remote cluster (one file of `--clustermesh-config DIR`): connect
//! with mutual TLS, check the remote cluster config, list the services, then
//! watch from the listed revision. A full list replaces what was known of
//! that cluster, so a reconnect resyncs without duplicates and without a gap.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};

/// Operations per etcd transaction (etcd's `--max-txn-ops` default is 128).
const TXN_MAX_OPS: usize = 100;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::MeshError;
use crate::config::{EtcdConfig, read_mesh_dir};
use crate::keys;
use crate::types::{ClusterConfig, ClusterService};

fn etcd_err(cluster: &str) -> impl Fn(etcd_client::Error) -> MeshError + '_ {
    move |source| MeshError::Etcd {
        cluster: cluster.to_string(),
        source,
    }
}

fn read_tls(cluster: &str, path: &Path) -> Result<Vec<u8>, MeshError> {
    std::fs::read(path).map_err(|source| MeshError::TlsFile {
        cluster: cluster.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

/// Connects to the etcd of `cluster` as its config file says (mutual TLS
/// when it names certificates).
pub async fn connect(cluster: &str, cfg: &EtcdConfig) -> Result<Client, MeshError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        // A silent peer is noticed within a few seconds.
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if cfg.uses_tls() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.trusted_ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read_tls(cluster, ca)?));
        }
        if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
            tls = tls.identity(Identity::from_pem(
                read_tls(cluster, c)?,
                read_tls(cluster, k)?,
            ));
        }
        opts = opts.with_tls(tls);
    }
    Client::connect(&cfg.endpoints, Some(opts))
        .await
        .map_err(etcd_err(cluster))
}

/// RFC 3339 UTC timestamp (what Cilium writes into canaries and the
/// heartbeat), without pulling in a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Settings of the exporter.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// TTL of the lease all keys live under (Cilium's `--kvstore-lease-ttl`,
    /// 15 minutes by default).
    pub lease_ttl: Duration,
    /// How often `cilium/.heartbeat` is refreshed (Cilium: every minute).
    pub heartbeat: Duration,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            lease_ttl: Duration::from_secs(15 * 60),
            heartbeat: Duration::from_secs(60),
        }
    }
}

/// Writes this cluster's global services into its own etcd.
pub struct Exporter {
    client: Client,
    cluster: String,
    id: u32,
    lease: i64,
    /// Key → JSON last written; only changes are written again.
    written: BTreeMap<String, String>,
    synced: bool,
    keepalive: JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

/// Marks the lease lost when the keep-alive task ends, however it ends.
struct LostOnDrop(watch::Sender<bool>);

impl Drop for LostOnDrop {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// What one [`Exporter::sync`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    pub put: usize,
    pub deleted: usize,
}

impl Exporter {
    /// Grants the lease, writes the cluster config and starts the lease
    /// keep-alive and the heartbeat.
    pub async fn start(
        mut client: Client,
        cluster: &str,
        id: u32,
        opts: ExportOptions,
    ) -> Result<Exporter, MeshError> {
        let err = etcd_err(cluster);
        let ttl = i64::try_from(opts.lease_ttl.as_secs().max(2)).unwrap_or(900);
        let lease = client.lease_grant(ttl, None).await.map_err(&err)?.id();
        let put = PutOptions::new().with_lease(lease);
        client
            .put(
                keys::cluster_config_key(cluster),
                ClusterConfig::membrane(id).to_json(),
                Some(put.clone()),
            )
            .await
            .map_err(&err)?;
        client
            .put(keys::HEARTBEAT, rfc3339(SystemTime::now()), Some(put))
            .await
            .map_err(&err)?;
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.map_err(&err)?;
        let mut hb_client = client.clone();
        let name = cluster.to_string();
        let (lost_tx, lost_rx) = watch::channel(false);
        let keepalive = tokio::spawn(async move {
            // Whatever ends this loop means the lease may expire: tell the
            // owner, which reconnects with a new lease and rewrites all.
            let _lost = LostOnDrop(lost_tx);
            let every = Duration::from_secs((ttl as u64 / 3).max(1));
            let mut tick = tokio::time::interval(every);
            let mut hb = tokio::time::interval(opts.heartbeat);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = keeper.keep_alive().await {
                            tracing::warn!(cluster = %name, error = %e, "clustermesh: lease keep-alive failed");
                            return;
                        }
                    }
                    _ = hb.tick() => {
                        let put = PutOptions::new().with_lease(lease);
                        if let Err(e) = hb_client.put(keys::HEARTBEAT, rfc3339(SystemTime::now()), Some(put)).await {
                            tracing::warn!(cluster = %name, error = %e, "clustermesh: heartbeat failed");
                        }
                    }
                    r = responses.message() => match r {
                        // TTL 0: the lease is gone (expired, or etcd lost it).
                        Ok(Some(resp)) if resp.ttl() <= 0 => {
                            tracing::warn!(cluster = %name, "clustermesh: export lease expired");
                            return;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => {
                            tracing::warn!(cluster = %name, "clustermesh: lease keep-alive stream ended");
                            return;
                        }
                    }
                }
            }
        });
        Ok(Exporter {
            client,
            cluster: cluster.to_string(),
            id,
            lease,
            written: BTreeMap::new(),
            synced: false,
            keepalive,
            lost: lost_rx,
        })
    }

    /// Resolves when the lease can no longer be kept alive (etcd restarted
    /// or unreachable): the owner must start a new exporter.
    pub async fn lost(&mut self) {
        // An error means the keep-alive task is gone: lost as well.
        let _ = self.lost.wait_for(|l| *l).await;
    }

    pub fn cluster_id(&self) -> u32 {
        self.id
    }

    /// Makes the exported services exactly `services` (keyed `ns/name`),
    /// writing only what changed; after the first complete export, writes
    /// the sync canary.
    pub async fn sync(
        &mut self,
        services: &BTreeMap<String, ClusterService>,
    ) -> Result<ExportStats, MeshError> {
        let err = etcd_err(&self.cluster);
        let mut stats = ExportStats::default();
        let want: BTreeMap<String, String> = services
            .values()
            .map(|s| {
                (
                    keys::service_key(&self.cluster, &s.namespace, &s.name),
                    s.to_json(),
                )
            })
            .collect();
        let puts: Vec<(&String, &String)> = want
            .iter()
            .filter(|(k, v)| self.written.get(*k) != Some(*v))
            .collect();
        let gone: Vec<String> = self
            .written
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        // Batched into transactions: one etcd commit (and fsync) per batch
        // instead of per key. etcd's default limit is 128 operations.
        let mut ops: Vec<TxnOp> = puts
            .iter()
            .map(|(k, v)| {
                TxnOp::put(
                    k.as_str(),
                    v.as_str(),
                    Some(PutOptions::new().with_lease(self.lease)),
                )
            })
            .collect();
        ops.extend(gone.iter().map(|k| TxnOp::delete(k.as_str(), None)));
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(TXN_MAX_OPS));
            let batch = std::mem::replace(&mut ops, rest);
            self.client
                .txn(Txn::new().and_then(batch))
                .await
                .map_err(&err)?;
        }
        stats.put = puts.len();
        stats.deleted = gone.len();
        let puts: Vec<(String, String)> = puts
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.written.extend(puts);
        for k in gone {
            self.written.remove(&k);
        }
        if !self.synced {
            let put = PutOptions::new().with_lease(self.lease);
            self.client
                .put(
                    keys::services_synced_key(&self.cluster),
                    rfc3339(SystemTime::now()),
                    Some(put),
                )
                .await
                .map_err(&err)?;
            self.synced = true;
        }
        Ok(stats)
    }
}

/// What is known of one remote cluster.
#[derive(Debug, Clone, Default)]
pub struct RemoteStatus {
    pub connected: bool,
    /// The initial list completed and the remote's sync canary was seen.
    pub synced: bool,
    pub cluster_id: u32,
    pub services: usize,
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct RemoteEntry {
    status: RemoteStatus,
    /// `ns/name` → service.
    services: BTreeMap<String, ClusterService>,
    disconnected_at: Option<Instant>,
}

/// Remote services of every connected cluster, shared with the consumer.
#[derive(Clone)]
pub struct RemoteStore {
    inner: Arc<Mutex<BTreeMap<String, RemoteEntry>>>,
    changed: watch::Sender<u64>,
}

impl Default for RemoteStore {
    fn default() -> Self {
        RemoteStore {
            inner: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl RemoteStore {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, RemoteEntry>) -> R) -> R {
        // A poisoned lock only means a panic elsewhere; the map is still whole.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Every remote service, cluster by cluster.
    pub fn services(&self) -> Vec<ClusterService> {
        self.with(|m| {
            m.values()
                .flat_map(|e| e.services.values().cloned())
                .collect()
        })
    }

    pub fn status(&self) -> BTreeMap<String, RemoteStatus> {
        self.with(|m| {
            m.iter()
                .map(|(k, e)| (k.clone(), e.status.clone()))
                .collect()
        })
    }

    /// Changes whenever the remote services (or a status) change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn update(&self, cluster: &str, f: impl FnOnce(&mut RemoteEntry)) {
        self.with(|m| {
            let e = m.entry(cluster.to_string()).or_default();
            f(e);
            e.status.services = e.services.len();
        });
        self.bump();
    }

    /// Forgets a cluster and its services (its file was removed).
    fn drain(&self, cluster: &str) {
        self.with(|m| m.remove(cluster));
        self.bump();
    }
}

/// Settings of the import side.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub local_name: String,
    pub local_id: u32,
    /// How long a disconnected cluster's services are kept; `None` = until it
    /// comes back (Cilium's default).
    pub cache_ttl: Option<Duration>,
    /// How often the config directory is re-read.
    pub dir_poll: Duration,
}

/// Runs one remote cluster until aborted: connect, list, watch; on failure,
/// keep the last services (or drop them after `cache_ttl`) and retry.
async fn run_remote(name: String, cfg: EtcdConfig, store: RemoteStore, opts: ImportOptions) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let res = remote_once(&name, &cfg, &store, &opts).await;
        let msg = match res {
            Ok(()) => "watch ended".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(cluster = %name, error = %msg, "clustermesh: remote cluster disconnected");
        store.update(&name, |e| {
            e.status.connected = false;
            e.status.last_error = Some(msg);
            e.disconnected_at.get_or_insert_with(Instant::now);
        });
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        if let Some(ttl) = opts.cache_ttl {
            let expired = store.with(|m| {
                m.get(&name)
                    .and_then(|e| e.disconnected_at)
                    .is_some_and(|t| t.elapsed() >= ttl)
            });
            if expired {
                store.update(&name, |e| e.services.clear());
            }
        }
    }
}

async fn remote_once(
    name: &str,
    cfg: &EtcdConfig,
    store: &RemoteStore,
    opts: &ImportOptions,
) -> Result<(), MeshError> {
    let err = etcd_err(name);
    let mut client = connect(name, cfg).await?;

    let cc = client
        .get(keys::cluster_config_key(name), None)
        .await
        .map_err(&err)?;
    let Some(kv) = cc.kvs().first() else {
        return Err(MeshError::InvalidClusterConfig {
            cluster: name.to_string(),
            reason: format!("{} is missing", keys::cluster_config_key(name)),
        });
    };
    let config = ClusterConfig::parse_remote(name, kv.value())?;
    if config.id == opts.local_id {
        return Err(MeshError::InvalidClusterConfig {
            cluster: name.to_string(),
            reason: format!("cluster id {} is this cluster's own id", config.id),
        });
    }
    let id = config.id;

    let prefix = keys::cluster_services_prefix(name);
    let listed = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(&err)?;
    let rev = listed.header().map(|h| h.revision()).unwrap_or(0);
    let mut services = BTreeMap::new();
    for kv in listed.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        match ClusterService::from_kv(key, kv.value(), name, id) {
            Ok(s) => {
                services.insert(format!("{}/{}", s.namespace, s.name), s);
            }
            Err(e) => tracing::warn!(error = %e, "clustermesh: ignoring invalid remote service"),
        }
    }
    let canary = keys::services_synced_key(name);
    let synced = !client
        .get(canary.as_str(), None)
        .await
        .map_err(&err)?
        .kvs()
        .is_empty();
    // One atomic replacement: no duplicates, and nothing vanishes meanwhile.
    store.update(name, |e| {
        e.services = services;
        e.status.connected = true;
        e.status.synced = synced;
        e.status.cluster_id = id;
        e.status.last_error = None;
        e.disconnected_at = None;
    });
    tracing::info!(cluster = %name, id, synced, "clustermesh: remote cluster connected");

    let mut stream = client
        .watch(
            prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .map_err(&err)?;
    if !synced {
        stream
            .watch(
                canary.as_str(),
                Some(WatchOptions::new().with_start_revision(rev + 1)),
            )
            .await
            .map_err(&err)?;
    }
    while let Some(resp) = stream.message().await.map_err(&err)? {
        if resp.canceled() {
            return Err(MeshError::InvalidClusterConfig {
                cluster: name.to_string(),
                reason: format!("watch canceled: {}", resp.cancel_reason()),
            });
        }
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        let mut saw_canary = false;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            if key == canary {
                saw_canary |= ev.event_type() == EventType::Put;
                continue;
            }
            let Some((ns, n)) = keys::parse_service_key(name, key) else {
                continue;
            };
            match ev.event_type() {
                EventType::Put => match ClusterService::from_kv(key, kv.value(), name, id) {
                    Ok(s) => upserts.push(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "clustermesh: ignoring invalid remote service");
                        // What was valid before is no longer what the
                        // remote says: stop using it.
                        deletes.push(format!("{ns}/{n}"));
                    }
                },
                EventType::Delete => deletes.push(format!("{ns}/{n}")),
            }
        }
        if upserts.is_empty() && deletes.is_empty() && !saw_canary {
            continue;
        }
        store.update(name, |e| {
            for k in deletes {
                e.services.remove(&k);
            }
            for s in upserts {
                e.services.insert(format!("{}/{}", s.namespace, s.name), s);
            }
            if saw_canary {
                e.status.synced = true;
            }
        });
    }
    Ok(())
}

/// The import side: watches `--clustermesh-config DIR` and runs one task per
/// remote cluster. Dropping it stops everything.
pub struct Mesh {
    store: RemoteStore,
    task: JoinHandle<()>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mesh {
    /// Starts watching `dir`. Must run inside a tokio runtime.
    pub fn start(dir: &Path, opts: ImportOptions) -> Mesh {
        let store = RemoteStore::default();
        let task = tokio::spawn(watch_dir(dir.to_path_buf(), store.clone(), opts));
        Mesh { store, task }
    }

    pub fn store(&self) -> &RemoteStore {
        &self.store
    }

    /// Waits until every configured remote cluster has synced, at most
    /// `timeout` (`--clustermesh-sync-timeout`). Returns the clusters that
    /// had not synced by then.
    pub async fn wait_synced(&self, configured: &[String], timeout: Duration) -> Vec<String> {
        let mut rx = self.store.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.store.status();
            let missing: Vec<String> = configured
                .iter()
                .filter(|c| !status.get(*c).is_some_and(|s| s.synced))
                .cloned()
                .collect();
            if missing.is_empty() {
                return missing;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return missing,
            }
        }
    }
}

async fn watch_dir(dir: std::path::PathBuf, store: RemoteStore, opts: ImportOptions) {
    let mut running: BTreeMap<String, (EtcdConfig, JoinHandle<()>)> = BTreeMap::new();
    let mut reported: Vec<String> = Vec::new();
    loop {
        match read_mesh_dir(&dir, &opts.local_name) {
            Ok(found) => {
                let errs: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                if errs != reported {
                    for e in &errs {
                        tracing::warn!(error = %e, "clustermesh: ignoring cluster config");
                    }
                    reported = errs;
                }
                let gone: Vec<String> = running
                    .iter()
                    .filter(|(name, (cfg, _))| found.clusters.get(*name) != Some(cfg))
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in gone {
                    if let Some((_, task)) = running.remove(&name) {
                        task.abort();
                    }
                    store.drain(&name);
                    tracing::info!(cluster = %name, "clustermesh: remote cluster removed");
                }
                for (name, cfg) in found.clusters {
                    if running.contains_key(&name) {
                        continue;
                    }
                    store.update(&name, |_| {});
                    let task = tokio::spawn(run_remote(
                        name.clone(),
                        cfg.clone(),
                        store.clone(),
                        opts.clone(),
                    ));
                    running.insert(name, (cfg, task));
                }
            }
            Err(e) => tracing::warn!(error = %e, "clustermesh: cannot read config directory"),
        }
        tokio::time::sleep(opts.dir_poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
    }
}
