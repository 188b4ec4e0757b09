//! `membrane_endpoint::routing::Router` against the real kernel, in a
//! network namespace this test creates (root; under `CI=true` a missing
//! prerequisite fails instead of skipping): tunnel mode creates
//! `cilium_vxlan` with the node-derived MAC, routes go through it with the
//! neighbour and FDB entries (an IPv6 CIDR through the tunnel via the
//! node's derived link-local next hop); a restart in native mode removes the
//! device and routes via the node address of each family instead; routes of
//! the protocol that are not wanted go; stop removes everything.
//!
//! Namespace `mbn-rt-*`, addresses in 10.213.0.0/16, UDP port 13472.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;

use membrane_endpoint::netlink;
use membrane_endpoint::routing::{PeerRoute, RouteMode, Router, TUNNEL_DEVICE};

fn prerequisites() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip {
        return true;
    }
    let why = format!("needs root ({root}) and iproute2 ({ip})");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI: {why}");
    eprintln!("skipping: {why}");
    false
}

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tunnel_then_native_then_stop() {
    if !prerequisites() {
        return;
    }
    let ns = Netns(format!("mbn-rt-{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .expect("ip")
            .success()
    );
    ip(
        &ns.0,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ],
    );
    ip(&ns.0, &["link", "set", "eth1", "up"]);
    ip(&ns.0, &["addr", "add", "10.213.251.1/24", "dev", "eth0"]);
    ip(
        &ns.0,
        &["addr", "add", "fd00:213:251::1/64", "dev", "eth0", "nodad"],
    );
    ip(&ns.0, &["link", "set", "eth0", "up"]);
    let path = PathBuf::from(format!("/var/run/netns/{}", ns.0));
    let local = Ipv4Addr::new(10, 213, 251, 1);
    let peer: IpAddr = "10.213.251.2".parse().expect("ip");
    let peer6: IpAddr = "fd00:213:251::2".parse().expect("ip");
    let v6_cidr = "fd00:213:5::/120";
    // In tunnel mode the IPv6 CIDR's node address is the IPv4 endpoint.
    let wanted: BTreeSet<PeerRoute> = ["10.213.5.0/24", "10.213.6.0/24", v6_cidr]
        .iter()
        .map(|c| PeerRoute {
            cidr: c.parse().expect("cidr"),
            node_ip: peer,
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // Tunnel mode.
    let w = wanted.clone();
    let p = path.clone();
    rt.block_on(netlink::in_netns(&p, move |h| async move {
        let detected = membrane_endpoint::routing::detect_node_ip(&h).await?;
        assert_eq!(detected, Some(IpAddr::V4(local)));
        let both = membrane_endpoint::routing::detect_node_ips(&h).await?;
        assert_eq!(
            both,
            [IpAddr::V4(local), "fd00:213:251::1".parse().expect("ip")]
        );
        let mut r = Router::start(RouteMode::Tunnel { local, port: 13472 }).await?;
        r.apply(&w).await?;
        // Idempotent.
        r.apply(&w).await?;
        Ok(())
    }))
    .expect("tunnel mode");
    let link = ip(&ns.0, &["-d", "link", "show", TUNNEL_DEVICE]);
    assert!(link.contains("0a:4d:0a:d5:fb:01"), "{link}");
    assert!(link.contains("dstport 13472"), "{link}");
    let routes = ip(&ns.0, &["route", "show", "proto", "77"]);
    assert!(
        routes.contains("10.213.5.0/24 via 10.213.251.2 dev cilium_vxlan onlink"),
        "{routes}"
    );
    let routes6 = ip(&ns.0, &["-6", "route", "show", "proto", "77"]);
    assert!(
        routes6.contains(&format!(
            "{v6_cidr} via fe80::a4d:ad5:fb02 dev cilium_vxlan"
        )),
        "{routes6}"
    );
    let neigh = ip(&ns.0, &["neigh", "show", "dev", TUNNEL_DEVICE]);
    assert!(
        neigh.contains("10.213.251.2 lladdr 0a:4d:0a:d5:fb:02 PERMANENT"),
        "{neigh}"
    );
    let neigh6 = ip(&ns.0, &["-6", "neigh", "show", "dev", TUNNEL_DEVICE]);
    assert!(
        neigh6.contains("fe80::a4d:ad5:fb02 lladdr 0a:4d:0a:d5:fb:02 PERMANENT"),
        "{neigh6}"
    );
    let fdb = Command::new("bridge")
        .args(["-n", &ns.0, "fdb", "show", "dev", TUNNEL_DEVICE])
        .output()
        .expect("bridge");
    let fdb = String::from_utf8_lossy(&fdb.stdout);
    assert!(fdb.contains("0a:4d:0a:d5:fb:02 dst 10.213.251.2"), "{fdb}");

    // A stale route of the protocol, then a restart in native mode with one
    // CIDR fewer (the agent was not stopped cleanly).
    ip(
        &ns.0,
        &[
            "route",
            "add",
            "10.213.99.0/24",
            "via",
            "10.213.251.2",
            "proto",
            "77",
        ],
    );
    // Native: the IPv6 CIDR via the node's IPv6 address.
    let fewer: BTreeSet<PeerRoute> = [
        PeerRoute {
            cidr: "10.213.5.0/24".parse().expect("cidr"),
            node_ip: peer,
        },
        PeerRoute {
            cidr: v6_cidr.parse().expect("cidr"),
            node_ip: peer6,
        },
    ]
    .into();
    let p = path.clone();
    rt.block_on(netlink::in_netns(&p, move |_| async move {
        let mut r = Router::start(RouteMode::Native).await?;
        r.apply(&fewer).await?;
        Ok(())
    }))
    .expect("native mode");
    let ok = Command::new("ip")
        .args(["-n", &ns.0, "link", "show", TUNNEL_DEVICE])
        .output()
        .expect("ip")
        .status
        .success();
    assert!(!ok, "cilium_vxlan left in native mode");
    let routes = ip(&ns.0, &["route", "show", "proto", "77"]);
    assert_eq!(
        routes.trim(),
        "10.213.5.0/24 via 10.213.251.2 dev eth0",
        "{routes}"
    );
    let routes6 = ip(&ns.0, &["-6", "route", "show", "proto", "77"]);
    assert!(
        routes6.contains(&format!("{v6_cidr} via fd00:213:251::2 dev eth0")),
        "{routes6}"
    );

    // Stop removes every route of the protocol.
    rt.block_on(netlink::in_netns(&path, move |_| async move {
        Router::start(RouteMode::Native).await?.stop().await
    }))
    .expect("stop");
    assert_eq!(ip(&ns.0, &["route", "show", "proto", "77"]).trim(), "");
    assert_eq!(
        ip(&ns.0, &["-6", "route", "show", "proto", "77"]).trim(),
        ""
    );
}
