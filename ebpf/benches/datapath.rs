//! tc datapath vs an iptables DNAT baseline (kube-proxy style rules) in the
//! same namespace topology: request/response transactions per second (RR,
//! one connection) and connections per second (CRR: connect, one request,
//! close), with 1 and with 10,000 services.
//!
//! The tc topology runs with eBPF host routing (its pods registered as local
//! endpoints, so packets go by `bpf_redirect_peer`); a third topology runs
//! the same program with legacy (host stack) routing for the pod ↔ pod
//! single-stream TCP throughput comparison.
//!
//! Run as root: `cargo bench -p membrane-ebpf --bench datapath` (release;
//! `--profile dev` for a quick look) (`BENCH_SECS`, `BENCH_ROUNDS`,
//! `BENCH_SERVICES` tune it; `BENCH_SERVICES=0` skips the many-services
//! round). Needs iptables.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{Netns, PinDir, Proc, Topology, backend_ip, prerequisites};
use membrane_ebpf::Datapath;
use membrane_lb::maglev::BackendState;
use membrane_lb::service::{
    Algorithm, Backend, DesiredState, FrontendType, L3n4Addr, Protocol, ServiceEntry, ServiceName,
};

const VIP: &str = "10.96.0.10";
const ECHO_ENV: &str = "MEMBRANE_BENCH_ECHO";

/// Port of the discard server next to each echo server (throughput).
const SINK_PORT: u16 = 8081;

/// Reads until EOF, then closes (the sender's drain marks the end).
fn sink_main() {
    let l = TcpListener::bind(("::", SINK_PORT)).expect("bind sink");
    for c in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut c = c;
            let mut buf = vec![0u8; 256 * 1024];
            while std::io::Read::read(&mut c, &mut buf)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        });
    }
}

/// The backend server: thread per connection, echoes `<name> <line>`.
fn echo_main(spec: &str) -> ! {
    let (name, port) = spec.split_once(':').expect("name:port");
    std::thread::spawn(sink_main);
    // Dual-stack (bindv6only is 0 in fresh namespaces).
    let l = TcpListener::bind(("::", port.parse::<u16>().expect("port"))).expect("bind");
    let name = name.to_string();
    for c in l.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut w = match c.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut r = BufReader::new(c);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if w.write_all(format!("{name} {line}").as_bytes()).is_err() {
                    break;
                }
                line.clear();
            }
        });
    }
    std::process::exit(0)
}

fn rust_echo(ns: &Netns, name: &str, port: u16) -> Proc {
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(exe)
        .env(ECHO_ENV, format!("{name}:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn echo");
    Proc(child)
}

fn linger0(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn rr(addr: SocketAddr, secs: f64) -> f64 {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        w.write_all(b"x\n").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        n += 1;
    }
    linger0(r.get_ref());
    n as f64 / start.elapsed().as_secs_f64()
}

/// Single-stream TCP throughput in Gbit/s: write for `secs`, then wait for
/// the receiver to have read everything (its close after our EOF).
fn stream(addr: SocketAddr, secs: f64) -> f64 {
    let mut s = TcpStream::connect(addr).expect("connect");
    let buf = vec![0x5au8; 128 * 1024];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        s.write_all(&buf).expect("write");
        bytes += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = [0u8; 16];
    while std::io::Read::read(&mut s, &mut rest)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
    bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Registers the topology's pods as local endpoints (host routing).
fn register_pods(t: &Topology, dp: &mut Datapath) {
    let pods: Vec<(String, Vec<std::net::IpAddr>)> = std::iter::once((
        "hc".to_string(),
        vec![
            "10.244.1.2".parse().unwrap(),
            "fd00:244:1::2".parse().unwrap(),
        ],
    ))
    .chain((1..=3).map(|i| {
        (
            format!("hb{i}"),
            vec![
                backend_ip(i).parse().unwrap(),
                common::backend_ip6(i).parse().unwrap(),
            ],
        )
    }))
    .collect();
    t.node.run(|| {
        for (ifname, addrs) in &pods {
            dp.upsert_endpoint(ifname, addrs, false, None)
                .expect("register endpoint");
        }
    });
}

fn crr(addr: SocketAddr, secs: f64) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    let mut line = String::new();
    let mut slow = 0;
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        let s = TcpStream::connect(addr).expect("connect");
        if t.elapsed().as_millis() > 100 {
            slow += 1;
        }
        s.set_nodelay(true).unwrap();
        // RST on close: no TIME_WAIT pile-up on the client's ports.
        linger0(&s);
        let mut w = s.try_clone().unwrap();
        w.write_all(b"x\n").unwrap();
        let mut r = BufReader::new(s);
        line.clear();
        r.read_line(&mut line).unwrap();
        n += 1;
    }
    if slow > 0 {
        eprintln!("crr: {slow} of {n} connects took > 100 ms");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn entry(vip: std::net::IpAddr, bes: &[String]) -> ServiceEntry {
    ServiceEntry {
        name: ServiceName {
            namespace: "bench".into(),
            name: vip.to_string(),
        },
        port_name: String::new(),
        frontend: L3n4Addr::new(vip, 80, Protocol::Tcp),
        kind: FrontendType::ClusterIP,
        backends: bes
            .iter()
            .map(|b| Backend {
                addr: L3n4Addr::new(b.parse().unwrap(), 8080, Protocol::Tcp),
                state: BackendState::Active,
                weight: 100,
                cluster_id: 0,
            })
            .collect(),
        algorithm: Algorithm::Random,
        affinity_timeout: None,
        affinity: Default::default(),
    }
}

/// 10.97.0.0/16 addresses for the filler services.
fn filler_vip(i: usize) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(
        10,
        97,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

fn desired(extra: usize, bes: &[String]) -> DesiredState {
    let mut v: Vec<ServiceEntry> = (0..extra).map(|i| entry(filler_vip(i), bes)).collect();
    v.push(entry(VIP.parse().unwrap(), bes));
    v.sort_by_key(|e| e.frontend);
    DesiredState { services: v }
}

/// kube-proxy's shape: KUBE-SERVICES → KUBE-SVC-* (statistic random) →
/// KUBE-SEP-* (DNAT). The measured service comes last in KUBE-SERVICES.
fn iptables_rules(extra: usize, bes: &[String]) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut chains = String::new();
    let mut rules = String::new();
    let mut svc = |idx: usize, vip: String| {
        chains.push_str(&format!(":KUBE-SVC-{idx} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{idx}\n"
        ));
        let n = bes.len();
        for (k, b) in bes.iter().enumerate() {
            chains.push_str(&format!(":KUBE-SEP-{idx}-{k} - [0:0]\n"));
            let left = n - k;
            if left > 1 {
                rules.push_str(&format!(
                    "-A KUBE-SVC-{idx} -m statistic --mode random --probability {:.5} -j KUBE-SEP-{idx}-{k}\n",
                    1.0 / left as f64
                ));
            } else {
                rules.push_str(&format!("-A KUBE-SVC-{idx} -j KUBE-SEP-{idx}-{k}\n"));
            }
            rules.push_str(&format!(
                "-A KUBE-SEP-{idx}-{k} -p tcp -m tcp -j DNAT --to-destination {b}:8080\n"
            ));
        }
    };
    for i in 0..extra {
        svc(i, filler_vip(i).to_string());
    }
    svc(extra, VIP.to_string());
    r.push_str(&chains);
    r.push_str("-A PREROUTING -j KUBE-SERVICES\n");
    r.push_str(&rules);
    r.push_str("COMMIT\n");
    r
}

fn iptables_restore(ns: &Netns, rules: &str) {
    let mut c = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-restore (install iptables)");
    c.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "iptables-restore failed");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if let Ok(spec) = std::env::var(ECHO_ENV) {
        echo_main(&spec);
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !prerequisites() {
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let many: usize = std::env::var("BENCH_SERVICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let bes: Vec<String> = (1..=3).map(backend_ip).collect();
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();

    let pins = PinDir::new("bench");
    let ipt = Topology::with_servers("bipt", rust_echo);
    let tc = Topology::with_servers("btc", rust_echo);
    for t in [&ipt, &tc] {
        t.client.sysctl("net.ipv4.ip_local_port_range=1024 65535");
    }
    let mut cfg = pins.config(251);
    cfg.max_services = (many + 16) as u32;
    let mut dp = Datapath::load(cfg).expect("load");
    tc.attach_all(&mut dp);
    assert_eq!(
        dp.host_routing(),
        &membrane_ebpf::HostRouting::Bpf,
        "the kernel lacks eBPF host routing"
    );
    register_pods(&tc, &mut dp);

    // Pod ↔ pod single-stream TCP throughput: host routing vs the host
    // stack (the same program with --enable-host-legacy-routing).
    {
        let lpins = PinDir::new("bench-legacy");
        let leg = Topology::with_servers("bleg", rust_echo);
        let mut lcfg = lpins.config(251);
        lcfg.host_routing = false;
        let mut ldp = Datapath::load(lcfg).expect("load legacy");
        leg.attach_all(&mut ldp);
        let sink: SocketAddr = format!("{}:{SINK_PORT}", backend_ip(1)).parse().unwrap();
        let (mut h, mut l) = (vec![], vec![]);
        for _ in 0..rounds {
            h.push(tc.client.run(|| stream(sink, secs)));
            l.push(leg.client.run(|| stream(sink, secs)));
        }
        let (h, l) = (median(h), median(l));
        println!("| pod → pod TCP stream | Gbit/s |");
        println!("|---|---:|");
        println!("| host stack (legacy routing) | {l:.2} |");
        println!("| eBPF host routing | {h:.2} |");
        println!("host routing / host stack: ×{:.2}", h / l);
        println!();
    }

    println!("| services | mode | RR tx/s | CRR conn/s |");
    println!("|---:|---|---:|---:|");
    let mut results = Vec::new();
    let sizes: Vec<usize> = if many == 0 { vec![0] } else { vec![0, many] };
    for extra in sizes {
        let t0 = Instant::now();
        iptables_restore(&ipt.node, &iptables_rules(extra, &bes));
        let ipt_setup = t0.elapsed();
        let t0 = Instant::now();
        dp.sync(&desired(extra, &bes)).expect("sync");
        let tc_setup = t0.elapsed();
        eprintln!(
            "{} services: iptables-restore {ipt_setup:?}, datapath sync {tc_setup:?}",
            extra + 1
        );
        let (mut ir, mut ic, mut tr, mut tcc) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            ir.push(ipt.client.run(|| rr(vip, secs)));
            tr.push(tc.client.run(|| rr(vip, secs)));
            ic.push(ipt.client.run(|| crr(vip, secs)));
            tcc.push(tc.client.run(|| crr(vip, secs)));
        }
        let (ir, ic, tr, tcc) = (median(ir), median(ic), median(tr), median(tcc));
        println!("| {} | iptables DNAT | {ir:.0} | {ic:.0} |", extra + 1);
        println!(
            "| {} | membrane tc (host routing) | {tr:.0} | {tcc:.0} |",
            extra + 1
        );
        results.push((extra + 1, ir, ic, tr, tcc));
    }
    println!();
    for (n, ir, ic, tr, tcc) in &results {
        println!(
            "{n} services: tc/iptables RR ×{:.2}, CRR ×{:.2}; RR latency iptables {:.1} µs, tc {:.1} µs",
            tr / ir,
            tcc / ic,
            1e6 / ir,
            1e6 / tr
        );
    }
    if let [(_, i1, _, t1, _), (_, in_, _, tn, _)] = results.as_slice() {
        println!(
            "RR latency change 1 → {} services: iptables {:+.1} %, tc {:+.1} %",
            many + 1,
            (i1 / in_ - 1.0) * 100.0,
            (t1 / tn - 1.0) * 100.0
        );
    }
    drop(dp);
}
