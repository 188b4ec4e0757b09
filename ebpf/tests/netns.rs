//! Real traffic through the tc datapath in network namespaces: a node, a
//! client pod, three backend pods with echo servers, an external host.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::{
    NODE_EXT_IP, PinDir, Topology, ask, backend_ip, backend_ip6, connect, prerequisites,
    which_backend, which_backend_udp,
};
use membrane_ebpf::{Datapath, Stat};
use membrane_lb::maglev::BackendState;
use membrane_lb::service::{
    Algorithm, Backend, DesiredState, FrontendType, L3n4Addr, Protocol, ServiceEntry, ServiceName,
};

const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc(vip: &str, port: u16, proto: Protocol, bes: &[String], alg: Algorithm) -> ServiceEntry {
    let mut backends: Vec<Backend> = bes
        .iter()
        .map(|b| Backend {
            addr: L3n4Addr::new(ip(b), 8080, proto),
            state: BackendState::Active,
            weight: 100,
            cluster_id: 0,
        })
        .collect();
    backends.sort_by_key(|b| b.addr);
    ServiceEntry {
        name: ServiceName {
            namespace: "default".into(),
            name: "echo".into(),
        },
        port_name: String::new(),
        frontend: L3n4Addr::new(ip(vip), port, proto),
        kind: FrontendType::ClusterIP,
        backends,
        algorithm: alg,
        affinity_timeout: None,
        affinity: Default::default(),
    }
}

fn desired(mut v: Vec<ServiceEntry>) -> DesiredState {
    v.sort_by_key(|e| e.frontend);
    DesiredState { services: v }
}

fn all_bes() -> Vec<String> {
    (1..=3).map(backend_ip).collect()
}

fn setup(tag: &str) -> Option<(PinDir, Topology, Datapath)> {
    if !prerequisites() {
        return None;
    }
    let pins = PinDir::new(tag);
    let topo = Topology::new(tag);
    let mut dp = Datapath::load(pins.config(251)).expect("load");
    topo.attach_all(&mut dp);
    Some((pins, topo, dp))
}

fn addr(vip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(vip), port)
}

#[test]
fn clusterip_tcp_and_udp_spread_across_backends() {
    let Some((_pins, topo, mut dp)) = setup("spread") else {
        return;
    };
    dp.sync(&desired(vec![
        svc(VIP, 80, Protocol::Tcp, &all_bes(), Algorithm::Random),
        svc(VIP, 53, Protocol::Udp, &all_bes(), Algorithm::Random),
    ]))
    .unwrap();
    let (tcp, udp) = topo.client_run(|| {
        let mut tcp: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..60 {
            let b = which_backend(addr(VIP, 80)).expect("TCP via ClusterIP");
            *tcp.entry(b).or_default() += 1;
        }
        let mut udp: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..60 {
            let b = which_backend_udp(addr(VIP, 53)).expect("UDP via ClusterIP");
            *udp.entry(b).or_default() += 1;
        }
        (tcp, udp)
    });
    let names: BTreeSet<String> = ["be1", "be2", "be3"].map(String::from).into();
    assert_eq!(
        tcp.keys().cloned().collect::<BTreeSet<_>>(),
        names,
        "{tcp:?}"
    );
    assert_eq!(
        udp.keys().cloned().collect::<BTreeSet<_>>(),
        names,
        "{udp:?}"
    );
    let st = dp.stats().unwrap();
    // A reused client port meets its old conntrack entry: not "new".
    assert!(st[&Stat::FwdNew] >= 100, "{st:?}");
    assert!(st[&Stat::RevNat] >= 120, "{st:?}");
    assert_eq!(st[&Stat::DropRewrite], 0);
}

#[test]
fn quarantine_excludes_a_backend() {
    let Some((_pins, topo, mut dp)) = setup("quar") else {
        return;
    };
    dp.sync(&desired(vec![svc(
        VIP,
        80,
        Protocol::Tcp,
        &all_bes(),
        Algorithm::Random,
    )]))
    .unwrap();
    let be2 = L3n4Addr::new(ip(&backend_ip(2)), 8080, Protocol::Tcp);
    dp.update_backend_state(&be2, BackendState::Quarantined)
        .unwrap();
    let seen = topo.client_run(|| {
        (0..45)
            .map(|_| which_backend(addr(VIP, 80)).expect("TCP"))
            .collect::<BTreeSet<_>>()
    });
    assert_eq!(seen, ["be1", "be3"].map(String::from).into());
    let list = dp.list();
    let st: Vec<(String, BackendState)> = list[0]
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.state))
        .collect();
    assert!(
        st.contains(&(be2.to_string(), BackendState::Quarantined)),
        "{st:?}"
    );

    dp.update_backend_state(&be2, BackendState::Active).unwrap();
    let seen = topo.client_run(|| {
        (0..45)
            .map(|_| which_backend(addr(VIP, 80)).expect("TCP"))
            .collect::<BTreeSet<_>>()
    });
    assert!(seen.contains("be2"), "{seen:?}");
}

#[test]
fn maglev_flows_stick_through_backend_churn() {
    let Some((_pins, topo, mut dp)) = setup("churn") else {
        return;
    };
    let bes = all_bes();
    dp.sync(&desired(vec![
        svc(VIP, 80, Protocol::Tcp, &bes, Algorithm::Maglev),
        svc(VIP, 53, Protocol::Udp, &bes, Algorithm::Maglev),
    ]))
    .unwrap();

    // Long-lived TCP connections, spread by Maglev over all backends.
    let mut conns = topo.client_run(|| {
        (0..24)
            .map(|_| {
                let mut c = connect(addr(VIP, 80)).expect("connect");
                let b = ask(&mut c, "first").expect("ask");
                (c, b)
            })
            .collect::<Vec<_>>()
    });
    let used: BTreeSet<&String> = conns.iter().map(|(_, b)| b).collect();
    assert_eq!(used.len(), 3, "Maglev used every backend: {used:?}");

    // UDP from fixed source ports: the flow hash (and so the Maglev slot)
    // depends only on the tuple.
    let ports: Vec<u16> = (41000..41060).collect();
    let udp_round = |topo: &Topology| -> Vec<String> {
        topo.client_run(|| {
            ports
                .iter()
                .map(|p| {
                    let u = UdpSocket::bind(("0.0.0.0", *p)).expect("bind");
                    u.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    u.send_to(b"x", addr(VIP, 53)).unwrap();
                    let mut buf = [0u8; 64];
                    let (n, _) = u.recv_from(&mut buf).expect("UDP reply");
                    String::from_utf8_lossy(&buf[..n])
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .to_string()
                })
                .collect()
        })
    };
    let before = udp_round(&topo);

    // Churn: be3 leaves the service.
    dp.sync(&desired(vec![
        svc(VIP, 80, Protocol::Tcp, &bes[..2], Algorithm::Maglev),
        svc(VIP, 53, Protocol::Udp, &bes[..2], Algorithm::Maglev),
    ]))
    .unwrap();
    // Established connections on be1/be2 keep their backend.
    for (c, b) in conns.iter_mut().filter(|(_, b)| b != "be3") {
        assert_eq!(
            &ask(c, "again").expect("established flow survives churn"),
            b
        );
    }
    // New TCP flows never go to be3.
    let fresh = topo.client_run(|| {
        (0..30)
            .map(|_| which_backend(addr(VIP, 80)).expect("TCP"))
            .collect::<BTreeSet<_>>()
    });
    assert!(!fresh.contains("be3"), "{fresh:?}");

    // be3 comes back: established flows still keep their backend.
    let all = |dp: &mut membrane_ebpf::Datapath, bes: &[String]| {
        dp.sync(&desired(vec![
            svc(VIP, 80, Protocol::Tcp, bes, Algorithm::Maglev),
            svc(VIP, 53, Protocol::Udp, bes, Algorithm::Maglev),
        ]))
        .unwrap();
    };
    all(&mut dp, &bes);
    for (c, b) in conns.iter_mut().filter(|(_, b)| b != "be3") {
        assert_eq!(
            &ask(c, "third").expect("established flow survives churn"),
            b
        );
    }
    // The long-lived connections end here: flushing conntrack under them
    // while the table differs would move their next segment (a delayed
    // ACK, a FIN) to another backend, which is what conntrack is for.
    drop(conns);

    // Without conntrack, the same UDP tuples hash to the new table: flows
    // that were on be1/be2 stay there (Maglev's minimal disruption).
    all(&mut dp, &bes[..2]);
    dp.flush_conntrack().unwrap();
    let after = udp_round(&topo);
    let (mut kept, mut total) = (0, 0);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(a, "be3");
        if b != "be3" {
            total += 1;
            if a == b {
                kept += 1;
            }
        }
    }
    assert!(total > 10 && kept * 10 >= total * 9, "kept {kept}/{total}");

    // be3 back again: the same table as at first.
    all(&mut dp, &bes);
    dp.flush_conntrack().unwrap();
    assert_eq!(udp_round(&topo), before, "same table, same choices");
}

#[test]
fn established_connection_survives_reload_from_pinned_maps() {
    let Some((pins, topo, mut dp)) = setup("reload") else {
        return;
    };
    let d = desired(vec![svc(
        VIP,
        80,
        Protocol::Tcp,
        &all_bes(),
        Algorithm::Maglev,
    )]);
    dp.sync(&d).unwrap();
    let (mut conn, b) = topo.client_run(|| {
        let mut c = connect(addr(VIP, 80)).expect("connect");
        let b = ask(&mut c, "one").expect("ask");
        (c, b)
    });

    // The agent goes away: pinned links keep the program running.
    drop(dp);
    assert_eq!(ask(&mut conn, "two").expect("works with no agent"), b);
    topo.client_run(|| which_backend(addr(VIP, 80)).expect("new flows with no agent"));

    // A new agent loads from the pins and swaps the program in atomically.
    let mut dp = Datapath::load(pins.config(251)).expect("reload");
    assert!(dp.conntrack_len() >= 1);
    topo.attach_all(&mut dp);
    let r = dp.sync(&d).unwrap();
    assert_eq!(
        r.slots_written, 0,
        "restored state needs no rewrites: {r:?}"
    );
    for i in 0..5 {
        assert_eq!(
            ask(&mut conn, &format!("after{i}")).expect("survives reload"),
            b
        );
    }
    topo.client_run(|| which_backend(addr(VIP, 80)).expect("new flows after reload"));
}

#[test]
fn nodeport_from_external_host() {
    let Some((_pins, topo, mut dp)) = setup("nodeport") else {
        return;
    };
    let mut np = svc(
        NODE_EXT_IP,
        30080,
        Protocol::Tcp,
        &all_bes(),
        Algorithm::Random,
    );
    np.kind = FrontendType::NodePort;
    let mut npu = svc(
        NODE_EXT_IP,
        30053,
        Protocol::Udp,
        &all_bes(),
        Algorithm::Random,
    );
    npu.kind = FrontendType::NodePort;
    dp.sync(&desired(vec![np, npu])).unwrap();
    let (tcp, udp) = topo.external.run(|| {
        let tcp: BTreeSet<String> = (0..45)
            .map(|_| which_backend(addr(NODE_EXT_IP, 30080)).expect("NodePort TCP"))
            .collect();
        let udp: BTreeSet<String> = (0..45)
            .map(|_| which_backend_udp(addr(NODE_EXT_IP, 30053)).expect("NodePort UDP"))
            .collect();
        (tcp, udp)
    });
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    assert_eq!(udp.len(), 3, "{udp:?}");
}

#[test]
fn ipv6_clusterip() {
    let Some((_pins, topo, mut dp)) = setup("v6") else {
        return;
    };
    let bes6: Vec<String> = (1..=3).map(backend_ip6).collect();
    dp.sync(&desired(vec![
        svc(VIP6, 80, Protocol::Tcp, &bes6, Algorithm::Maglev),
        svc(VIP6, 53, Protocol::Udp, &bes6, Algorithm::Random),
    ]))
    .unwrap();
    let (tcp, udp) = topo.client_run(|| {
        let tcp: BTreeSet<String> = (0..45)
            .map(|_| which_backend(addr(VIP6, 80)).expect("IPv6 TCP"))
            .collect();
        let udp: BTreeSet<String> = (0..45)
            .map(|_| which_backend_udp(addr(VIP6, 53)).expect("IPv6 UDP"))
            .collect();
        (tcp, udp)
    });
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    assert_eq!(udp.len(), 3, "{udp:?}");
}

#[test]
fn kubernetes_service_and_endpointslice_end_to_end() {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use membrane_lb::service::{BackendOverrides, LbConfig, translate};

    let Some((_pins, topo, mut dp)) = setup("k8s") else {
        return;
    };
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "echo", "namespace": "default",
                     "annotations": {"service.cilium.io/lb-algorithm": "maglev"}},
        "spec": {"type": "NodePort", "clusterIP": VIP, "clusterIPs": [VIP, VIP6],
                 "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "nodePort": 30080}]}
    }))
    .unwrap();
    let eps = |fam: &str, addrs: Vec<String>| -> EndpointSlice {
        let endpoints: Vec<serde_json::Value> = addrs
            .into_iter()
            .map(|a| serde_json::json!({"addresses": [a], "conditions": {"ready": true}}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("echo-{fam}"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": fam,
            "ports": [{"name": "tcp", "port": 8080}],
            "endpoints": endpoints
        }))
        .unwrap()
    };
    let slices = vec![
        eps("IPv4", all_bes()),
        eps("IPv6", (1..=3).map(backend_ip6).collect()),
    ];
    let cfg = LbConfig {
        node_addresses: vec![ip(NODE_EXT_IP)],
        ..LbConfig::default()
    };
    let t = translate(&[svc], &slices, &cfg, &BackendOverrides::new());
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let r = dp.sync(&t.state).unwrap();
    assert_eq!(r.services_added, 3, "ClusterIP v4 + v6 + NodePort");
    assert!(r.errors.is_empty());

    let v4: BTreeSet<String> = topo.client_run(|| {
        (0..30)
            .map(|_| which_backend(addr(VIP, 80)).expect("v4"))
            .collect()
    });
    let v6: BTreeSet<String> = topo.client_run(|| {
        (0..30)
            .map(|_| which_backend(addr(VIP6, 80)).expect("v6"))
            .collect()
    });
    let np: BTreeSet<String> = topo.external.run(|| {
        (0..30)
            .map(|_| which_backend(addr(NODE_EXT_IP, 30080)).expect("nodeport"))
            .collect()
    });
    assert_eq!((v4.len(), v6.len(), np.len()), (3, 3, 3));
    let list = dp.list();
    assert_eq!(list.len(), 3);
    assert!(list.iter().all(|s| s.algorithm == Algorithm::Maglev));
    assert!(
        list.iter()
            .all(|s| s.name.as_ref().map(|n| n.to_string()) == Some("default/echo".into()))
    );
}
