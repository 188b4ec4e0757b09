//! The endpoint manager: IPAM, kernel changes and the endpoint registry.
//! Mutations are serialised by one lock: they are short (a few netlink
//! round trips) and this keeps IPAM, the kernel and the registry in step.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use membrane_cni::spec::{Attachment, CniError, ErrorCode};
use membrane_cni::wire::{Command, Request, Response};
use membrane_ipam::{
    ALLOCATION_THRESHOLD, Cidr, CidrState, Family, NodeAllocator, RELEASE_THRESHOLD,
};
use netlink_packet_route::route::{RouteScope, RouteType};
use rtnetlink::{Handle, LinkVeth};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::netlink::{self, GATEWAY_V6};
use crate::{Endpoint, EndpointError, HOST_DEVICE, HOST_PEER_DEVICE, Hooks, Options};

/// Host-side interface name of a container's interface: `lxc` + 11 hex
/// digits of a hash, as Cilium names them (15 characters at most).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("lxc{}", &hex[..11])
}

fn owner(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

fn host_len(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

pub struct Manager {
    opts: Options,
    hooks: Arc<dyn Hooks>,
    handle: Handle,
    inner: Mutex<Inner>,
    owner_locks: std::sync::Mutex<BTreeMap<String, Arc<Mutex<()>>>>,
    /// Signalled after every change of allocations (for the IPAM report).
    changed: tokio::sync::Notify,
}

struct Inner {
    ipam: NodeAllocator,
    endpoints: BTreeMap<String, Endpoint>,
    next_id: u64,
}

impl Manager {
    /// Load the state, prepare the host side (forwarding, the gateway
    /// device). Must run inside a tokio runtime in the node's namespace.
    pub async fn start(
        opts: Options,
        hooks: Arc<dyn Hooks>,
    ) -> Result<Arc<Manager>, EndpointError> {
        std::fs::create_dir_all(&opts.state_dir).map_err(|e| EndpointError::State {
            path: opts.state_dir.clone(),
            why: e.to_string(),
        })?;
        let mut ipam = NodeAllocator::load(&ipam_path(&opts.state_dir))?
            .unwrap_or_else(|| NodeAllocator::new(opts.pod_cidrs.clone()));
        if !opts.pod_cidrs.is_empty() {
            ipam.set_cidrs(opts.pod_cidrs.clone());
        }
        let endpoints = load_endpoints(&endpoints_path(&opts.state_dir))?;
        let next_id = endpoints.values().map(|e| e.id).max().unwrap_or(0) + 1;
        let handle = netlink::connect()?;
        let m = Manager {
            opts,
            hooks,
            handle,
            inner: Mutex::new(Inner {
                ipam,
                endpoints,
                next_id,
            }),
            owner_locks: Default::default(),
            changed: tokio::sync::Notify::new(),
        };
        m.prepare_host().await?;
        m.restore().await;
        {
            let inner = m.inner.lock().await;
            inner.ipam.save(&ipam_path(&m.opts.state_dir))?;
            info!(
                cidrs = ?inner.ipam.cidrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
                endpoints = inner.endpoints.len(),
                allocations = inner.ipam.allocations().len(),
                "endpoint manager ready"
            );
        }
        Ok(Arc::new(m))
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// After a restart: endpoints whose host interface still exists get
    /// the (possibly new) datapath attached again and stay `ready`; the
    /// others are `not-ready` until DEL or GC removes them.
    async fn restore(&self) {
        let mut inner = self.inner.lock().await;
        for ep in inner.endpoints.values_mut() {
            let present = matches!(
                netlink::link_by_name(&self.handle, &ep.host_ifname).await,
                Ok(Some(_))
            );
            ep.state = if present {
                if let Err(e) = self.hooks.attach(&ep.host_ifname) {
                    warn!(host = %ep.host_ifname, error = %e, "re-attaching the datapath");
                }
                self.hooks.restored(ep);
                "ready".into()
            } else {
                warn!(host = %ep.host_ifname, pod = %ep.pod(), "endpoint's host interface is gone");
                "not-ready".into()
            };
        }
        if let Err(e) = self.save_endpoints(&inner) {
            warn!(error = %e, "saving endpoints");
        }
    }

    async fn prepare_host(&self) -> Result<(), EndpointError> {
        let inner = self.inner.lock().await;
        let gw4 = inner.ipam.gateway(Family::V4);
        let has_v6 = inner.ipam.gateway(Family::V6).is_some();
        drop(inner);
        netlink::sysctl("net/ipv4/ip_forward", "1")?;
        if has_v6 {
            netlink::sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        let h = &self.handle;
        let dev = match netlink::link_by_name(h, HOST_DEVICE).await? {
            Some(l) => l,
            None => {
                // A veth pair as Cilium's cilium_host/cilium_net (dummy
                // devices need a module some kernels lack).
                h.link()
                    .add(LinkVeth::new(HOST_DEVICE, HOST_PEER_DEVICE).up().build())
                    .execute()
                    .await
                    .or_else(|e| {
                        if netlink::is_exists(&e) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| EndpointError::Kernel {
                        what: format!("creating {HOST_DEVICE}"),
                        why: e.to_string(),
                    })?;
                netlink::link_by_name(h, HOST_DEVICE)
                    .await?
                    .ok_or_else(|| EndpointError::Kernel {
                        what: format!("creating {HOST_DEVICE}"),
                        why: "not found after creation".into(),
                    })?
            }
        };
        netlink::set_up(h, dev.header.index).await?;
        if let Some(peer) = netlink::link_by_name(h, HOST_PEER_DEVICE).await? {
            netlink::set_up(h, peer.header.index).await?;
        }
        if let Some(gw) = gw4 {
            netlink::add_addr(h, dev.header.index, gw, 32).await?;
        }
        Ok(())
    }

    /// Wait until allocations changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Release CIDRs no longer needed (above the release threshold) and
    /// report every CIDR's state (cluster-pool-v2beta).
    pub async fn ipam_report(&self) -> BTreeMap<Cidr, CidrState> {
        let mut inner = self.inner.lock().await;
        let released = inner.ipam.release_excess(RELEASE_THRESHOLD);
        if !released.is_empty() {
            info!(cidrs = ?released.iter().map(ToString::to_string).collect::<Vec<_>>(), "pod CIDRs released");
            if let Err(e) = inner.ipam.save(&ipam_path(&self.opts.state_dir)) {
                warn!(error = %e, "saving IPAM");
            }
        }
        inner.ipam.cidr_states(ALLOCATION_THRESHOLD)
    }

    /// The node's pod CIDRs changed (the operator added or withdrew one).
    pub async fn set_pod_cidrs(&self, cidrs: Vec<Cidr>) -> Result<(), EndpointError> {
        let mut inner = self.inner.lock().await;
        if inner.ipam.cidrs() == cidrs.as_slice() {
            return Ok(());
        }
        info!(cidrs = ?cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "pod CIDRs updated");
        inner.ipam.set_cidrs(cidrs);
        inner.ipam.save(&ipam_path(&self.opts.state_dir))?;
        drop(inner);
        self.changed.notify_one();
        Ok(())
    }

    /// Answer one plugin request.
    pub async fn handle(&self, req: Request) -> Response {
        let out = match req.command {
            Some(Command::Add) => self.add(&req).await,
            Some(Command::Del) => self
                .del(&req.container_id, &req.ifname)
                .await
                .map(|_| Value::Null),
            Some(Command::Check) => self.check(&req).await.map(|_| Value::Null),
            Some(Command::Gc) => self.gc(&req.valid_attachments).await.map(|_| Value::Null),
            Some(Command::Status) => return self.status().await,
            None => {
                return Response::Error(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "command: missing in the request",
                ));
            }
        };
        if matches!(req.command, Some(Command::Add | Command::Del | Command::Gc)) {
            self.changed.notify_one();
        }
        match out {
            Ok(v) => Response::Ok(v),
            Err(e) => {
                warn!(command = ?req.command, container = %req.container_id, error = %e, "CNI request failed");
                Response::Error(e.to_cni())
            }
        }
    }

    /// Every endpoint, by id.
    pub async fn list(&self) -> Vec<Endpoint> {
        let inner = self.inner.lock().await;
        let mut v: Vec<Endpoint> = inner.endpoints.values().cloned().collect();
        v.sort_by_key(|e| e.id);
        v
    }

    /// Refresh endpoints' labels (the Pod object arrived or changed).
    pub async fn refresh_labels(&self) {
        let mut inner = self.inner.lock().await;
        let mut changed = false;
        for ep in inner.endpoints.values_mut() {
            let labels = self
                .hooks
                .pod_labels(&ep.pod_namespace, &ep.pod_name)
                .unwrap_or_default();
            if labels != ep.labels {
                ep.labels = labels;
                changed = true;
            }
        }
        if changed && let Err(e) = self.save_endpoints(&inner) {
            warn!(error = %e, "saving endpoints");
        }
    }

    fn save_endpoints(&self, inner: &Inner) -> Result<(), EndpointError> {
        let path = endpoints_path(&self.opts.state_dir);
        let err = |why: String| EndpointError::State {
            path: path.clone(),
            why,
        };
        let list: Vec<&Endpoint> = inner.endpoints.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))
    }

    /// Serialises operations on one attachment; different attachments
    /// proceed in parallel (kernel work happens outside the state lock).
    async fn owner_lock(&self, owner: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.owner_locks.lock().unwrap_or_else(|p| p.into_inner());
            // Drop locks nobody holds or waits for, so the map stays small.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(owner.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    async fn add(&self, req: &Request) -> Result<Value, EndpointError> {
        let owner = owner(&req.container_id, &req.ifname);
        let host = host_ifname(&req.container_id, &req.ifname);
        let _serial = self.owner_lock(&owner).await;
        // A repeated ADD of a complete endpoint answers the same result.
        let existing = self.inner.lock().await.endpoints.get(&owner).cloned();
        if let Some(ep) = existing
            && ep.netns == req.netns
            && netlink::link_by_name(&self.handle, &host).await?.is_some()
        {
            return Ok(ep.result);
        }
        // Leftovers of an attempt cut short (agent restarted mid-ADD).
        netlink::delete_link(&self.handle, &host).await?;
        let (addrs, gw4) = {
            let mut inner = self.inner.lock().await;
            let mut addrs = Vec::new();
            let families: BTreeSet<Family> =
                inner.ipam.cidrs().iter().map(|c| c.family()).collect();
            if families.is_empty() {
                return Err(membrane_ipam::IpamError::NoPool { family: Family::V4 }.into());
            }
            for f in families {
                match inner.ipam.allocate(&owner, f) {
                    Ok(a) => addrs.push(a),
                    Err(e) => {
                        inner.ipam.release_owner(&owner);
                        return Err(e.into());
                    }
                }
            }
            // Persist before the address is used: a restart never reuses it.
            if let Err(e) = inner.ipam.save(&ipam_path(&self.opts.state_dir)) {
                inner.ipam.release_owner(&owner);
                return Err(e.into());
            }
            (addrs, inner.ipam.gateway(Family::V4))
        };
        let mtu = req.mtu.unwrap_or(self.opts.mtu);
        match self.setup(req, &host, &addrs, gw4, mtu).await {
            Ok((host_mac, mac)) => {
                let result = result_json(req, &host, &host_mac, &mac, &addrs, gw4);
                let labels = self
                    .hooks
                    .pod_labels(&req.pod_namespace, &req.pod_name)
                    .unwrap_or_default();
                let mut inner = self.inner.lock().await;
                let id = inner.next_id;
                inner.next_id += 1;
                let ep = Endpoint {
                    id,
                    container_id: req.container_id.clone(),
                    ifname: req.ifname.clone(),
                    netns: req.netns.clone(),
                    pod_namespace: req.pod_namespace.clone(),
                    pod_name: req.pod_name.clone(),
                    labels,
                    addrs: addrs.clone(),
                    host_ifname: host.clone(),
                    host_mac,
                    mac,
                    mtu,
                    node: self.opts.node_name.clone(),
                    state: "ready".into(),
                    result: result.clone(),
                };
                if let Err(why) = self.hooks.ready(&ep) {
                    // Kernel work happens outside the state lock.
                    drop(inner);
                    self.rollback(&owner, &host).await;
                    return Err(EndpointError::Datapath { ifname: host, why });
                }
                inner.endpoints.insert(owner, ep);
                if let Err(e) = self.save_endpoints(&inner) {
                    warn!(error = %e, "saving endpoints");
                }
                info!(container = %req.container_id, pod = %format!("{}/{}", req.pod_namespace, req.pod_name), host = %host, addrs = ?addrs, "endpoint added");
                Ok(result)
            }
            Err(e) => {
                self.rollback(&owner, &host).await;
                Err(e)
            }
        }
    }

    /// Nothing half-configured stays: the veth (and with it the peer and
    /// its addresses and routes) goes, the addresses too.
    async fn rollback(&self, owner: &str, host: &str) {
        self.hooks.detach(host);
        if let Err(de) = netlink::delete_link(&self.handle, host).await {
            warn!(error = %de, host = %host, "rollback: deleting veth");
        }
        let mut inner = self.inner.lock().await;
        inner.ipam.release_owner(owner);
        if let Err(se) = inner.ipam.save(&ipam_path(&self.opts.state_dir)) {
            warn!(error = %se, "rollback: saving IPAM");
        }
    }

    async fn setup(
        &self,
        req: &Request,
        host: &str,
        addrs: &[IpAddr],
        gw4: Option<IpAddr>,
        mtu: u32,
    ) -> Result<(String, String), EndpointError> {
        let h = &self.handle;
        for a in addrs {
            netlink::del_route(h, netlink::unreachable(*a), &format!("unreachable {a}")).await?;
        }
        netlink::create_veth(h, host, &req.ifname, Path::new(&req.netns), mtu).await?;
        let link = netlink::link_by_name(h, host)
            .await?
            .ok_or_else(|| EndpointError::Kernel {
                what: format!("veth {host}"),
                why: "missing right after creation".into(),
            })?;
        let host_idx = link.header.index;
        let host_mac = netlink::mac_of(&link).unwrap_or_default();
        let ifname = req.ifname.clone();
        let pod_addrs = addrs.to_vec();
        let mac = netlink::in_netns(Path::new(&req.netns), move |h| async move {
            if let Some(lo) = netlink::link_by_name(&h, "lo").await? {
                netlink::set_up(&h, lo.header.index).await?;
            }
            let l =
                netlink::link_by_name(&h, &ifname)
                    .await?
                    .ok_or_else(|| EndpointError::Kernel {
                        what: format!("{ifname} in the container"),
                        why: "missing after creation".into(),
                    })?;
            let idx = l.header.index;
            netlink::set_up(&h, idx).await?;
            for a in &pod_addrs {
                netlink::add_addr(&h, idx, *a, host_len(*a)).await?;
                match (a, gw4) {
                    (IpAddr::V4(_), Some(gw)) => {
                        netlink::add_route(
                            &h,
                            netlink::route(gw, 32, Some(idx), None, RouteScope::Link),
                            &format!("{gw} dev {ifname}"),
                        )
                        .await?;
                        netlink::add_route(
                            &h,
                            netlink::route(
                                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                                0,
                                Some(idx),
                                Some(gw),
                                RouteScope::Universe,
                            ),
                            &format!("default via {gw}"),
                        )
                        .await?;
                    }
                    (IpAddr::V6(_), _) => {
                        netlink::add_route(
                            &h,
                            netlink::route(
                                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                                0,
                                Some(idx),
                                Some(IpAddr::V6(GATEWAY_V6)),
                                RouteScope::Universe,
                            ),
                            &format!("default via {GATEWAY_V6}"),
                        )
                        .await?;
                    }
                    _ => {}
                }
            }
            Ok(netlink::mac_of(&l).unwrap_or_default())
        })
        .await?;
        if addrs.iter().any(IpAddr::is_ipv6) {
            netlink::add_addr(h, host_idx, IpAddr::V6(GATEWAY_V6), 64).await?;
        }
        for a in addrs {
            let scope = if a.is_ipv4() {
                RouteScope::Link
            } else {
                RouteScope::Universe
            };
            netlink::replace_route(
                h,
                netlink::route(*a, host_len(*a), Some(host_idx), None, scope),
                &format!("{a} dev {host}"),
            )
            .await?;
        }
        self.hooks
            .attach(host)
            .map_err(|why| EndpointError::Datapath {
                ifname: host.to_string(),
                why,
            })?;
        Ok((host_mac, mac))
    }

    /// Undo an ADD; succeeds when there is nothing (left) to undo.
    async fn del(&self, container_id: &str, ifname: &str) -> Result<(), EndpointError> {
        let owner = owner(container_id, ifname);
        let host = host_ifname(container_id, ifname);
        let _serial = self.owner_lock(&owner).await;
        self.hooks.detach(&host);
        // Deleting the host side deletes the peer with its addresses/routes.
        netlink::delete_link(&self.handle, &host).await?;
        // The unreachable routes go in before the addresses are released,
        // so a new owner's route always replaces them, never the reverse.
        let addrs = self.inner.lock().await.ipam.addrs_of(&owner);
        if self.opts.unreachable_routes {
            for a in &addrs {
                netlink::add_route(
                    &self.handle,
                    netlink::unreachable(*a),
                    &format!("unreachable {a}"),
                )
                .await?;
            }
        }
        let mut inner = self.inner.lock().await;
        inner.ipam.release_owner(&owner);
        inner.ipam.save(&ipam_path(&self.opts.state_dir))?;
        if inner.endpoints.remove(&owner).is_some() || !addrs.is_empty() {
            self.save_endpoints(&inner)?;
            info!(container = %container_id, ifname, addrs = ?addrs, "endpoint deleted");
        }
        Ok(())
    }

    async fn check(&self, req: &Request) -> Result<(), EndpointError> {
        let inner = self.inner.lock().await;
        let owner = owner(&req.container_id, &req.ifname);
        let ep = inner
            .endpoints
            .get(&owner)
            .cloned()
            .ok_or_else(|| EndpointError::Unknown(owner.clone()))?;
        let gw4 = inner.ipam.gateway(Family::V4);
        drop(inner);
        if let Some(prev) = &req.prev_result {
            let mut want: Vec<String> = ep
                .addrs
                .iter()
                .map(|a| format!("{a}/{}", host_len(*a)))
                .collect();
            let mut got: Vec<String> = prev
                .get("ips")
                .and_then(Value::as_array)
                .map(|ips| {
                    ips.iter()
                        .filter_map(|i| i.get("address")?.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            want.sort();
            got.sort();
            if want != got {
                return Err(EndpointError::Check(format!(
                    "prevResult.ips {got:?} differ from the endpoint's {want:?}"
                )));
            }
        }
        let h = &self.handle;
        let link = netlink::link_by_name(h, &ep.host_ifname)
            .await?
            .ok_or_else(|| {
                EndpointError::Check(format!("host interface {} is missing", ep.host_ifname))
            })?;
        let host_routes = [
            netlink::routes(h, false).await?,
            netlink::routes(h, true).await?,
        ]
        .concat();
        for a in &ep.addrs {
            if !host_routes.iter().any(|(d, l, _, oif, _)| {
                *d == Some(*a) && *l == host_len(*a) && *oif == Some(link.header.index)
            }) {
                return Err(EndpointError::Check(format!(
                    "host route {a} dev {} is missing",
                    ep.host_ifname
                )));
            }
        }
        let ifname = ep.ifname.clone();
        let addrs = ep.addrs.clone();
        netlink::in_netns(Path::new(&req.netns), move |h| async move {
            let l = netlink::link_by_name(&h, &ifname).await?.ok_or_else(|| {
                EndpointError::Check(format!("{ifname} is missing in the container"))
            })?;
            let idx = l.header.index;
            let have = netlink::addrs_of(&h, idx).await?;
            for a in &addrs {
                if !have.contains(a) {
                    return Err(EndpointError::Check(format!("{ifname} lacks address {a}")));
                }
            }
            let routes = [
                netlink::routes(&h, false).await?,
                netlink::routes(&h, true).await?,
            ]
            .concat();
            let has_default = |gw: IpAddr| {
                routes.iter().any(|(d, l, k, oif, g)| {
                    *l == 0
                        && d.is_none_or(|d| d.is_unspecified())
                        && *k == RouteType::Unicast
                        && *oif == Some(idx)
                        && *g == Some(gw)
                })
            };
            for a in &addrs {
                match (a, gw4) {
                    (IpAddr::V4(_), Some(gw)) => {
                        if !routes.iter().any(|(d, l, _, oif, _)| {
                            *d == Some(gw) && *l == 32 && *oif == Some(idx)
                        }) {
                            return Err(EndpointError::Check(format!(
                                "route {gw} dev {ifname} is missing"
                            )));
                        }
                        if !has_default(gw) {
                            return Err(EndpointError::Check(format!(
                                "default route via {gw} dev {ifname} is missing"
                            )));
                        }
                    }
                    (IpAddr::V6(_), _) if !has_default(IpAddr::V6(GATEWAY_V6)) => {
                        return Err(EndpointError::Check(format!(
                            "default route via {GATEWAY_V6} dev {ifname} is missing"
                        )));
                    }
                    _ => {}
                }
            }
            Ok(())
        })
        .await
    }

    /// Release every attachment not in `valid` (CNI GC).
    async fn gc(&self, valid: &[Attachment]) -> Result<(), EndpointError> {
        let keep: BTreeSet<String> = valid
            .iter()
            .map(|a| owner(&a.container_id, &a.ifname))
            .collect();
        let stale: BTreeSet<String> = {
            let inner = self.inner.lock().await;
            let mut stale: BTreeSet<String> = inner
                .ipam
                .allocations()
                .into_iter()
                .map(|a| a.owner)
                .collect();
            stale.extend(inner.endpoints.keys().cloned());
            stale.retain(|o| !keep.contains(o));
            stale
        };
        for o in stale {
            let Some((cid, ifname)) = o.rsplit_once('/') else {
                let mut inner = self.inner.lock().await;
                inner.ipam.release_owner(&o);
                inner.ipam.save(&ipam_path(&self.opts.state_dir))?;
                continue;
            };
            info!(container = cid, ifname, "GC: releasing attachment");
            self.del(cid, ifname).await?;
        }
        Ok(())
    }

    async fn status(&self) -> Response {
        let inner = self.inner.lock().await;
        let families: BTreeSet<Family> = inner.ipam.cidrs().iter().map(|c| c.family()).collect();
        if families.is_empty() {
            return Response::Error(CniError::new(
                ErrorCode::NotAvailable,
                "no pod CIDR on this node",
            ));
        }
        for f in families {
            if inner.ipam.free(f) == 0 {
                return Response::Error(CniError::new(
                    ErrorCode::NotAvailable,
                    format!("{f} pod CIDRs exhausted"),
                ));
            }
        }
        Response::Ok(Value::Null)
    }
}

fn result_json(
    req: &Request,
    host: &str,
    host_mac: &str,
    mac: &str,
    addrs: &[IpAddr],
    gw4: Option<IpAddr>,
) -> Value {
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for a in addrs {
        match a {
            IpAddr::V4(_) => {
                let mut ip = json!({"address": format!("{a}/32"), "interface": 1});
                if let Some(gw) = gw4 {
                    ip["gateway"] = json!(gw.to_string());
                    routes.push(json!({"dst": "0.0.0.0/0", "gw": gw.to_string()}));
                }
                ips.push(ip);
            }
            IpAddr::V6(_) => {
                ips.push(json!({"address": format!("{a}/128"), "gateway": GATEWAY_V6.to_string(), "interface": 1}));
                routes.push(json!({"dst": "::/0", "gw": GATEWAY_V6.to_string()}));
            }
        }
    }
    json!({
        "interfaces": [
            {"name": host, "mac": host_mac},
            {"name": req.ifname, "mac": mac, "sandbox": req.netns},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

fn ipam_path(dir: &Path) -> PathBuf {
    dir.join("ipam.json")
}

fn endpoints_path(dir: &Path) -> PathBuf {
    dir.join("endpoints.json")
}

fn load_endpoints(path: &Path) -> Result<BTreeMap<String, Endpoint>, EndpointError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(EndpointError::State {
                path: path.into(),
                why: e.to_string(),
            });
        }
    };
    let list: Vec<Endpoint> = serde_json::from_slice(&bytes).map_err(|e| EndpointError::State {
        path: path.into(),
        why: e.to_string(),
    })?;
    Ok(list
        .into_iter()
        .map(|e| (owner(&e.container_id, &e.ifname), e))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_cilium_style_and_fit_ifnamsiz() {
        let a = host_ifname("0123456789abcdef", "eth0");
        assert!(a.starts_with("lxc") && a.len() == 14, "{a}");
        assert_eq!(a, host_ifname("0123456789abcdef", "eth0"));
        assert_ne!(a, host_ifname("0123456789abcdef", "eth1"));
        assert_ne!(a, host_ifname("0123456789abcdeg", "eth0"));
    }

    #[test]
    fn result_has_the_spec_shape() {
        let req = Request {
            ifname: "eth0".into(),
            netns: "/run/netns/p".into(),
            ..Default::default()
        };
        let addrs = [
            "10.123.0.2".parse().expect("v4"),
            "fd00:123::2".parse().expect("v6"),
        ];
        let r = result_json(
            &req,
            "lxcabc",
            "aa:bb",
            "cc:dd",
            &addrs,
            Some("10.123.0.1".parse().expect("gw")),
        );
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/p");
        assert_eq!(
            r["ips"][0],
            json!({"address": "10.123.0.2/32", "gateway": "10.123.0.1", "interface": 1})
        );
        assert_eq!(r["ips"][1]["gateway"], "fe80::1");
        assert_eq!(
            r["routes"][0],
            json!({"dst": "0.0.0.0/0", "gw": "10.123.0.1"})
        );
        assert_eq!(r["routes"][1], json!({"dst": "::/0", "gw": "fe80::1"}));
    }
}
