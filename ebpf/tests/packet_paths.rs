//! `BPF_PROG_TEST_RUN` tests of the program's packet paths: real kernel,
//! real maps, hand-built frames; no interfaces involved.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use common::pkt::{self, ACK, SYN, TCP, UDP};
use common::{PinDir, prerequisites};
use membrane_ebpf::{Datapath, Stat};
use membrane_lb::maglev::BackendState;
use membrane_lb::service::{
    Algorithm, Backend, DesiredState, FrontendType, L3n4Addr, Protocol, ServiceEntry, ServiceName,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// NATed packets are either passed to the stack or redirected to the FIB's
/// next hop (which depends on the routes of the namespace the test runs in).
fn forwarded(ret: u32) -> bool {
    ret == TC_ACT_OK || ret == TC_ACT_REDIRECT
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn entry(
    vip: &str,
    port: u16,
    proto: Protocol,
    backends: &[&str],
    bport: u16,
    algorithm: Algorithm,
) -> ServiceEntry {
    let mut bs: Vec<Backend> = backends
        .iter()
        .map(|b| Backend {
            addr: L3n4Addr::new(ip(b), bport, proto),
            state: BackendState::Active,
            weight: 100,
            cluster_id: 0,
        })
        .collect();
    bs.sort_by_key(|b| b.addr);
    ServiceEntry {
        name: ServiceName {
            namespace: "default".into(),
            name: "echo".into(),
        },
        port_name: String::new(),
        frontend: L3n4Addr::new(ip(vip), port, proto),
        kind: FrontendType::ClusterIP,
        backends: bs,
        algorithm,
        affinity_timeout: None,
        affinity: Default::default(),
    }
}

fn state(mut entries: Vec<ServiceEntry>) -> DesiredState {
    entries.sort_by_key(|e| e.frontend);
    DesiredState { services: entries }
}

const BES: [&str; 3] = ["10.244.11.2", "10.244.12.2", "10.244.13.2"];

fn load(tag: &str, m: u32) -> Option<(PinDir, Datapath)> {
    if !prerequisites() {
        return None;
    }
    let pins = PinDir::new(tag);
    let dp = Datapath::load(pins.config(m)).expect("load datapath");
    Some((pins, dp))
}

fn run(dp: &Datapath, f: &[u8]) -> (u32, Vec<u8>) {
    dp.test_run(f).expect("BPF_PROG_TEST_RUN")
}

fn tcp4(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    pkt::frame(ip(src), sport, ip(dst), dport, TCP, flags, b"hello", false)
}

#[test]
fn forward_dnat_and_reverse_nat_ipv4_tcp() {
    let Some((_pins, mut dp)) = load("fwd4", 251) else {
        return;
    };
    dp.sync(&state(vec![entry(
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &BES,
        8080,
        Algorithm::Random,
    )]))
    .unwrap();

    let (ret, out) = run(&dp, &tcp4("10.244.1.2", 40000, "10.96.0.10", 80, SYN));
    assert!(forwarded(ret), "verdict {ret}");
    let p = pkt::parse(&out);
    assert_eq!(p.src, ip("10.244.1.2"));
    assert_eq!(p.sport, 40000);
    assert!(BES.iter().any(|b| ip(b) == p.dst), "DNAT to {}", p.dst);
    assert_eq!(p.dport, 8080);
    assert_eq!(dp.conntrack_len(), 1);
    assert_eq!(dp.rev_nat_len(), 1);

    // The reply from that backend gets the frontend back as its source.
    let reply = tcp4(&p.dst.to_string(), 8080, "10.244.1.2", 40000, SYN | ACK);
    let (ret, out) = run(&dp, &reply);
    assert!(forwarded(ret), "verdict {ret}");
    let r = pkt::parse(&out);
    assert_eq!((r.src, r.sport), (ip("10.96.0.10"), 80));
    assert_eq!((r.dst, r.dport), (ip("10.244.1.2"), 40000));

    // Packets that are neither service nor reply traffic pass untouched.
    let other = tcp4("10.244.1.2", 40001, "10.244.11.2", 9999, SYN);
    let (ret, out) = run(&dp, &other);
    assert_eq!(ret, TC_ACT_OK, "untouched packets go to the stack");
    assert_eq!(out, other);

    let st = dp.stats().unwrap();
    assert_eq!(st[&Stat::FwdNew], 1);
    assert_eq!(st[&Stat::RevNat], 1);
}

#[test]
fn established_flow_keeps_backend_new_flows_avoid_quarantined() {
    let Some((_pins, mut dp)) = load("est", 251) else {
        return;
    };
    let desired = state(vec![entry(
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &BES,
        8080,
        Algorithm::Random,
    )]);
    dp.sync(&desired).unwrap();
    let (_, out) = run(&dp, &tcp4("10.244.1.2", 41000, "10.96.0.10", 80, SYN));
    let chosen = pkt::parse(&out).dst;

    dp.update_backend_state(
        &L3n4Addr::new(chosen, 8080, Protocol::Tcp),
        BackendState::Quarantined,
    )
    .unwrap();
    let table = dp
        .kernel_table(&L3n4Addr::new(ip("10.96.0.10"), 80, Protocol::Tcp))
        .unwrap();
    assert_eq!(table.len(), 2, "quarantined backend still in the slots");

    // Established (ACK) packets of the flow stay on the quarantined backend.
    for _ in 0..5 {
        let (ret, out) = run(&dp, &tcp4("10.244.1.2", 41000, "10.96.0.10", 80, ACK));
        assert!(forwarded(ret), "verdict {ret}");
        assert_eq!(pkt::parse(&out).dst, chosen);
    }
    // New flows never reach it.
    for sport in 42000..42100 {
        let (ret, out) = run(&dp, &tcp4("10.244.1.2", sport, "10.96.0.10", 80, SYN));
        assert!(forwarded(ret), "verdict {ret}");
        assert_ne!(pkt::parse(&out).dst, chosen);
    }
    // A fresh SYN reusing the old tuple selects again.
    let (_, out) = run(&dp, &tcp4("10.244.1.2", 41000, "10.96.0.10", 80, SYN));
    assert_ne!(pkt::parse(&out).dst, chosen);
    assert!(dp.stats().unwrap()[&Stat::Reselect] >= 1);

    // Back to active: new flows may use it again.
    dp.update_backend_state(
        &L3n4Addr::new(chosen, 8080, Protocol::Tcp),
        BackendState::Active,
    )
    .unwrap();
    let mut seen = BTreeSet::new();
    for sport in 43000..43200 {
        let (_, out) = run(&dp, &tcp4("10.244.1.2", sport, "10.96.0.10", 80, SYN));
        seen.insert(pkt::parse(&out).dst);
    }
    assert!(seen.contains(&chosen));
    assert_eq!(seen.len(), 3);
}

#[test]
fn terminating_and_maintenance() {
    let Some((_pins, mut dp)) = load("term", 251) else {
        return;
    };
    let mut e = entry(
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &BES,
        8080,
        Algorithm::Maglev,
    );
    dp.sync(&state(vec![e.clone()])).unwrap();
    // Find a flow that lands on backend 0, then mark that backend terminating.
    let (sport, _) = (50000..50200)
        .map(|sp| {
            let (_, out) = run(&dp, &tcp4("10.244.1.2", sp, "10.96.0.10", 80, SYN));
            (sp, pkt::parse(&out).dst)
        })
        .find(|(_, d)| *d == ip(BES[0]))
        .expect("some flow hashes to backend 0");
    e.backends[0].state = BackendState::Terminating;
    dp.sync(&state(vec![e.clone()])).unwrap();
    let (_, out) = run(&dp, &tcp4("10.244.1.2", sport, "10.96.0.10", 80, ACK));
    assert_eq!(
        pkt::parse(&out).dst,
        ip(BES[0]),
        "terminating backend drains existing flows"
    );
    for sp in 51000..51100 {
        let (_, out) = run(&dp, &tcp4("10.244.1.2", sp, "10.96.0.10", 80, SYN));
        assert_ne!(pkt::parse(&out).dst, ip(BES[0]));
    }
    // Maintenance on the others: only the terminating one is left, and it
    // takes new flows (Cilium: terminating used when nothing is active).
    for b in &BES[1..] {
        dp.update_backend_state(
            &L3n4Addr::new(ip(b), 8080, Protocol::Tcp),
            BackendState::Maintenance,
        )
        .unwrap();
    }
    for sp in 52000..52050 {
        let (_, out) = run(&dp, &tcp4("10.244.1.2", sp, "10.96.0.10", 80, SYN));
        assert_eq!(pkt::parse(&out).dst, ip(BES[0]));
    }
    let list = dp.list();
    let states: Vec<BackendState> = list[0].backends.iter().map(|b| b.state).collect();
    assert_eq!(
        states,
        vec![
            BackendState::Terminating,
            BackendState::Maintenance,
            BackendState::Maintenance
        ]
    );
}

#[test]
fn no_backend_drops_and_counts() {
    let Some((_pins, mut dp)) = load("nobe", 251) else {
        return;
    };
    dp.sync(&state(vec![
        entry(
            "10.96.0.11",
            80,
            Protocol::Tcp,
            &[],
            8080,
            Algorithm::Random,
        ),
        entry(
            "10.96.0.12",
            80,
            Protocol::Tcp,
            &[],
            8080,
            Algorithm::Maglev,
        ),
    ]))
    .unwrap();
    for vip in ["10.96.0.11", "10.96.0.12"] {
        let (ret, _) = run(&dp, &tcp4("10.244.1.2", 40000, vip, 80, SYN));
        assert_eq!(ret, TC_ACT_SHOT);
    }
    assert_eq!(dp.stats().unwrap()[&Stat::DropNoBackend], 2);
    // Another port of the same address is not a frontend: passes.
    let (ret, _) = run(&dp, &tcp4("10.244.1.2", 40000, "10.96.0.11", 81, SYN));
    assert_eq!(ret, TC_ACT_OK);
}

#[test]
fn maglev_selection_follows_the_table_and_is_deterministic() {
    let Some((_pins, mut dp)) = load("maglev", 251) else {
        return;
    };
    let e = entry(
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &BES,
        8080,
        Algorithm::Maglev,
    );
    dp.sync(&state(vec![e.clone()])).unwrap();
    let fe = L3n4Addr::new(ip("10.96.0.10"), 80, Protocol::Tcp);
    let table = dp.kernel_table(&fe).unwrap();
    let cfg = dp.config().maglev;
    let want = e.maglev_table(&cfg, |a| dp.backend_id(a).unwrap());
    assert_eq!(table, want, "kernel table == Cilium's Maglev table");

    let mut first = Vec::new();
    for sp in 30000..30300 {
        let (_, out) = run(&dp, &tcp4("10.244.1.2", sp, "10.96.0.10", 80, SYN));
        first.push(pkt::parse(&out).dst);
    }
    let distinct: BTreeSet<_> = first.iter().collect();
    assert_eq!(distinct.len(), 3, "all backends used");
    // Same tuples after reloading into a fresh pin dir (no conntrack): same
    // choices, because the slot comes from a deterministic hash.
    let pins2 = PinDir::new("maglev2");
    let mut dp2 = Datapath::load(pins2.config(251)).unwrap();
    dp2.sync(&state(vec![e])).unwrap();
    for (i, sp) in (30000..30300).enumerate() {
        let (_, out) = run(&dp2, &tcp4("10.244.1.2", sp, "10.96.0.10", 80, SYN));
        assert_eq!(pkt::parse(&out).dst, first[i]);
    }
}

#[test]
fn ipv6_tcp_and_udp_with_checksums() {
    let Some((_pins, mut dp)) = load("v6", 251) else {
        return;
    };
    let bes6 = ["fd00:244:11::2", "fd00:244:12::2"];
    dp.sync(&state(vec![
        entry(
            "fd00:96::10",
            80,
            Protocol::Tcp,
            &bes6,
            8080,
            Algorithm::Random,
        ),
        entry(
            "fd00:96::10",
            53,
            Protocol::Udp,
            &bes6,
            5353,
            Algorithm::Maglev,
        ),
    ]))
    .unwrap();
    for (proto, port, bport) in [(TCP, 80u16, 8080u16), (UDP, 53, 5353)] {
        let f = pkt::frame(
            ip("fd00:244:1::2"),
            40000,
            ip("fd00:96::10"),
            port,
            proto,
            SYN,
            b"q",
            false,
        );
        let (ret, out) = run(&dp, &f);
        assert!(forwarded(ret), "verdict {ret}");
        let p = pkt::parse(&out);
        assert!(bes6.iter().any(|b| ip(b) == p.dst));
        assert_eq!(p.dport, bport);
        let reply = pkt::frame(
            p.dst,
            bport,
            ip("fd00:244:1::2"),
            40000,
            proto,
            SYN | ACK,
            b"a",
            false,
        );
        let (ret, out) = run(&dp, &reply);
        assert!(forwarded(ret), "verdict {ret}");
        let r = pkt::parse(&out);
        assert_eq!((r.src, r.sport), (ip("fd00:96::10"), port));
    }
}

#[test]
fn udp_ipv4_including_zero_checksum() {
    let Some((_pins, mut dp)) = load("udp4", 251) else {
        return;
    };
    dp.sync(&state(vec![entry(
        "10.96.0.53",
        53,
        Protocol::Udp,
        &BES,
        5353,
        Algorithm::Random,
    )]))
    .unwrap();
    let f = pkt::frame(
        ip("10.244.1.2"),
        40000,
        ip("10.96.0.53"),
        53,
        UDP,
        0,
        b"query",
        false,
    );
    let (_, out) = run(&dp, &f);
    let p = pkt::parse(&out);
    assert_eq!(p.dport, 5353);
    assert_ne!(p.l4_csum, 0);
    // "No checksum" stays "no checksum".
    let f = pkt::frame(
        ip("10.244.1.2"),
        40001,
        ip("10.96.0.53"),
        53,
        UDP,
        0,
        b"query",
        true,
    );
    let (_, out) = run(&dp, &f);
    let p = pkt::parse(&out);
    assert_eq!(p.dport, 5353);
    assert_eq!(p.l4_csum, 0);
}

#[test]
fn client_ip_session_affinity() {
    let Some((_pins, mut dp)) = load("aff", 251) else {
        return;
    };
    let mut e = entry(
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &BES,
        8080,
        Algorithm::Random,
    );
    e.affinity_timeout = Some(60);
    dp.sync(&state(vec![e])).unwrap();
    for client in ["10.244.1.2", "10.244.1.3", "10.244.1.4"] {
        let mut seen = BTreeSet::new();
        for sp in 40000..40050 {
            let (_, out) = run(&dp, &tcp4(client, sp, "10.96.0.10", 80, SYN));
            seen.insert(pkt::parse(&out).dst);
        }
        assert_eq!(seen.len(), 1, "client {client} stuck to one backend");
    }
    assert_eq!(dp.affinity_len(), 3);
    assert!(dp.stats().unwrap()[&Stat::AffinityHit] >= 3 * 49);
}

#[test]
fn sync_writes_differences_only_and_removes() {
    let Some((_pins, mut dp)) = load("diff", 251) else {
        return;
    };
    let a = entry(
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &BES,
        8080,
        Algorithm::Maglev,
    );
    let b = entry(
        "10.96.0.20",
        80,
        Protocol::Tcp,
        &BES[..2],
        8080,
        Algorithm::Random,
    );
    let r = dp.sync(&state(vec![a.clone(), b.clone()])).unwrap();
    assert_eq!((r.services_added, r.backends_added), (2, 3));
    assert_eq!(r.slots_written, 251 + 2);
    let r = dp.sync(&state(vec![a.clone(), b.clone()])).unwrap();
    assert_eq!(r, Default::default(), "unchanged state writes nothing");

    // Removing one of three Maglev backends rewrites only its slots (~1/3).
    let mut a2 = a.clone();
    a2.backends.pop();
    let r = dp.sync(&state(vec![a2.clone(), b.clone()])).unwrap();
    assert_eq!(r.services_updated, 1);
    assert!(r.slots_written > 40 && r.slots_written < 130, "{r:?}");
    // BES[2] is still used by nobody but... b uses BES[..2], so it goes.
    assert_eq!(r.backends_removed, 1);

    let r = dp.sync(&state(vec![a2])).unwrap();
    assert_eq!(r.services_removed, 1);
    let (ret, out) = run(&dp, &tcp4("10.244.1.2", 40000, "10.96.0.20", 80, SYN));
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(
        pkt::parse(&out).dst,
        ip("10.96.0.20"),
        "removed frontend no longer NATed"
    );
    assert_eq!(dp.list().len(), 1);
}

#[test]
fn restore_from_pinned_maps() {
    let Some((pins, mut dp)) = load("restore", 251) else {
        return;
    };
    let a = entry(
        "10.96.0.10",
        80,
        Protocol::Tcp,
        &BES,
        8080,
        Algorithm::Maglev,
    );
    dp.sync(&state(vec![a.clone()])).unwrap();
    dp.update_backend_state(
        &L3n4Addr::new(ip(BES[1]), 8080, Protocol::Tcp),
        BackendState::Quarantined,
    )
    .unwrap();
    let (_, out) = run(&dp, &tcp4("10.244.1.2", 40000, "10.96.0.10", 80, SYN));
    let chosen = pkt::parse(&out).dst;
    let before = dp.list();
    drop(dp);

    let mut dp = Datapath::load(pins.config(251)).unwrap();
    assert_eq!(
        dp.conntrack_len(),
        1,
        "conntrack survives in the pinned map"
    );
    let after = dp.list();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].id, before[0].id);
    assert_eq!(after[0].frontend, before[0].frontend);
    assert_eq!(
        dp.backend_overrides()
            .get(&L3n4Addr::new(ip(BES[1]), 8080, Protocol::Tcp)),
        Some(&BackendState::Quarantined),
        "operator state survives restart"
    );
    // The established flow still maps to its backend, and re-syncing the same
    // state writes nothing new.
    let (_, out) = run(&dp, &tcp4("10.244.1.2", 40000, "10.96.0.10", 80, ACK));
    assert_eq!(pkt::parse(&out).dst, chosen);
    let r = dp.sync(&state(vec![a])).unwrap();
    assert_eq!(r.slots_written, 0, "{r:?}");
    assert_eq!(r.backends_added, 0);

    // A different table size cannot silently reuse the pinned maps.
    drop(dp);
    let err = Datapath::load(pins.config(509))
        .err()
        .expect("M mismatch must fail");
    assert!(
        err.to_string().contains("remove the pin directory"),
        "{err}"
    );
}

#[test]
fn redirected_frontend_without_listener_is_dropped_and_counted() {
    let Some((_pins, mut dp)) = load("redir", 251) else {
        return;
    };
    let fe = L3n4Addr::new(ip("10.96.0.20"), 80, Protocol::Tcp);
    let udp_fe = L3n4Addr::new(ip("10.96.0.20"), 53, Protocol::Udp);
    let want: std::collections::BTreeMap<L3n4Addr, std::net::SocketAddr> = [
        (fe, "10.96.0.20:80".parse().unwrap()),
        (udp_fe, "10.96.0.20:53".parse().unwrap()),
    ]
    .into();
    assert_eq!(dp.sync_redirects(&want).unwrap(), 2);
    assert_eq!(
        dp.sync_redirects(&want).unwrap(),
        0,
        "no difference, no write"
    );
    assert_eq!(dp.redirects(), &want);

    // No socket listens in this namespace: the SYN is dropped (not
    // forwarded anywhere with its ClusterIP destination) and counted.
    let syn = tcp4("10.244.1.2", 40000, "10.96.0.20", 80, SYN);
    let (ret, _) = run(&dp, &syn);
    assert_eq!(ret, TC_ACT_SHOT);
    // UDP is not proxied: it passes to the stack unchanged.
    let udp = pkt::frame(
        ip("10.244.1.2"),
        40000,
        ip("10.96.0.20"),
        53,
        UDP,
        0,
        b"q",
        false,
    );
    let (ret, out) = run(&dp, &udp);
    assert_eq!((ret, out), (TC_ACT_OK, udp));
    let st = dp.stats().unwrap();
    assert_eq!(st[&Stat::DropNoListener], 1);
    assert_eq!(st[&Stat::FwdNew], 0);

    dp.sync_redirects(&Default::default()).unwrap();
    assert!(dp.redirects().is_empty());
    let (ret, out) = run(&dp, &syn);
    assert_eq!((ret, out), (TC_ACT_OK, syn), "no longer redirected");
}
