//! Kernel changes through rtnetlink: veth pairs, addresses, routes and the
//! few sysctls the host side needs. Work inside a container's network
//! namespace runs on a dedicated thread that `setns`es into it (the rest of
//! the agent never changes namespace).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::EndpointError;

/// The IPv6 gateway every pod uses: a link-local address on the host side of
/// its veth, so no global address is spent and each veth answers for it.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// ENOENT / ESRCH / ENODEV answers mean "already gone".
pub fn is_not_found(e: &rtnetlink::Error) -> bool {
    errno(e).is_some_and(|n| n == libc::ENOENT || n == libc::ESRCH || n == libc::ENODEV)
}

pub fn is_exists(e: &rtnetlink::Error) -> bool {
    errno(e) == Some(libc::EEXIST)
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn kernel(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> EndpointError {
    let what = what.into();
    move |e| match e {
        // The netlink connection itself is gone (the agent is stopping).
        rtnetlink::Error::RequestFailed => EndpointError::Unavailable(what),
        e => EndpointError::Kernel {
            what,
            why: e.to_string(),
        },
    }
}

/// A netlink handle in the calling thread's namespace (its connection task
/// runs on the current runtime).
pub fn connect() -> Result<Handle, EndpointError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| EndpointError::Kernel {
        what: "opening a netlink socket".into(),
        why: e.to_string(),
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Run `f` with a netlink handle inside the network namespace at `netns`,
/// on a thread of its own (setns affects only that thread, which exits).
pub async fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T, EndpointError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, EndpointError>>,
{
    let file = std::fs::File::open(netns).map_err(|e| EndpointError::Netns {
        path: netns.into(),
        why: e.to_string(),
    })?;
    let path: PathBuf = netns.into();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let run = || -> Result<T, EndpointError> {
                // SAFETY: setns on this thread only; the fd is valid for the
                // call (the file lives until the end of this closure).
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(EndpointError::Netns {
                        path: path.clone(),
                        why: std::io::Error::last_os_error().to_string(),
                    });
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| EndpointError::Netns {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                rt.block_on(async move {
                    let handle = connect()?;
                    f(handle).await
                })
            };
            let _ = tx.send(run());
        })
        .map_err(|e| EndpointError::Netns {
            path: netns.into(),
            why: e.to_string(),
        })?;
    rx.await.map_err(|_| EndpointError::Netns {
        path: netns.into(),
        why: "namespace worker thread died".into(),
    })?
}

pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, EndpointError> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(kernel(format!("looking up link {name}"))(e)),
    }
}

pub fn mac_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => Some(
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        ),
        _ => None,
    })
}

/// Delete link `name` if present; true when one was deleted.
pub async fn delete_link(h: &Handle, name: &str) -> Result<bool, EndpointError> {
    let Some(l) = link_by_name(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(l.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(kernel(format!("deleting link {name}"))(e)),
    }
}

/// A veth pair whose peer is created directly inside the namespace `netns`
/// under its final name `peer` (no temporary name in the host namespace).
pub async fn create_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    netns: &Path,
    mtu: u32,
) -> Result<(), EndpointError> {
    let ns = std::fs::File::open(netns).map_err(|e| EndpointError::Netns {
        path: netns.into(),
        why: e.to_string(),
    })?;
    let peer_msg = LinkUnspec::new_with_name(peer)
        .mtu(mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(host, peer)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .mtu(mtu)
        .up()
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(kernel(format!("creating veth {host} <-> {peer}")))
}

pub async fn set_up(h: &Handle, index: u32) -> Result<(), EndpointError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(kernel(format!("setting link {index} up")))
}

/// Add an address without duplicate address detection (the address is ours
/// by IPAM; DAD would only delay the pod's first packet).
pub async fn add_addr(
    h: &Handle,
    index: u32,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), EndpointError> {
    let mut req = h.address().add(index, addr, prefix);
    if addr.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(e) => Err(kernel(format!("adding {addr}/{prefix} to link {index}"))(e)),
    }
}

pub async fn addrs_of(h: &Handle, index: u32) -> Result<Vec<IpAddr>, EndpointError> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(kernel(format!("listing addresses of link {index}")))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.index == index)
        .flat_map(|m| {
            m.attributes.iter().filter_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
        .collect())
}

/// A route to `dst/len` out of `oif`, optionally via `gw`, with `scope`.
pub fn route(
    dst: IpAddr,
    len: u8,
    oif: Option<u32>,
    gw: Option<IpAddr>,
    scope: RouteScope,
) -> RouteMessage {
    let mut b = match dst {
        IpAddr::V4(d) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(d, len);
            if let Some(IpAddr::V4(g)) = gw {
                b = b.gateway(g);
            }
            let mut m = b.scope(scope).build();
            if let Some(i) = oif {
                m.attributes.push(RouteAttribute::Oif(i));
            }
            return m;
        }
        IpAddr::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(d, len),
    };
    if let Some(IpAddr::V6(g)) = gw {
        b = b.gateway(g);
    }
    let mut m = b.scope(scope).build();
    if let Some(i) = oif {
        m.attributes.push(RouteAttribute::Oif(i));
    }
    m
}

/// An `unreachable` route: senders get ICMP unreachable at once.
pub fn unreachable(dst: IpAddr) -> RouteMessage {
    let len = if dst.is_ipv4() { 32 } else { 128 };
    let mut m = route(dst, len, None, None, RouteScope::Universe);
    m.header.kind = RouteType::Unreachable;
    m
}

pub async fn add_route(h: &Handle, m: RouteMessage, what: &str) -> Result<(), EndpointError> {
    match h.route().add(m).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(e) => Err(kernel(format!("adding route {what}"))(e)),
    }
}

pub async fn replace_route(h: &Handle, m: RouteMessage, what: &str) -> Result<(), EndpointError> {
    h.route()
        .add(m)
        .replace()
        .execute()
        .await
        .map_err(kernel(format!("replacing route {what}")))
}

/// Delete a route if present; true when one was deleted.
pub async fn del_route(h: &Handle, m: RouteMessage, what: &str) -> Result<bool, EndpointError> {
    match h.route().del(m).execute().await {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(kernel(format!("deleting route {what}"))(e)),
    }
}

/// Every route of the main table of `family`'s (as `(dst, len, kind, oif,
/// gateway)`).
pub async fn routes(
    h: &Handle,
    v6: bool,
) -> Result<Vec<(Option<IpAddr>, u8, RouteType, Option<u32>, Option<IpAddr>)>, EndpointError> {
    let msg = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    let all: Vec<RouteMessage> = h
        .route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(kernel("listing routes"))?;
    Ok(all
        .into_iter()
        .map(|m| {
            let mut dst = None;
            let mut oif = None;
            let mut gw = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                        dst = Some(IpAddr::V4(*d))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(d)) => {
                        dst = Some(IpAddr::V6(*d))
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(IpAddr::V6(*g)),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            (
                dst,
                m.header.destination_prefix_length,
                m.header.kind,
                oif,
                gw,
            )
        })
        .collect())
}

/// Write a sysctl of the calling thread's namespace.
pub fn sysctl(path: &str, value: &str) -> Result<(), EndpointError> {
    std::fs::write(Path::new("/proc/sys").join(path), value).map_err(|e| EndpointError::Kernel {
        what: format!("sysctl {path}={value}"),
        why: e.to_string(),
    })
}
