//! tc datapath vs an iptables DNAT baseline (the rules kube-proxy's iptables
//! proxier installs) in the same namespace topology: request/response
//! transactions per second (RR) and connections per second (CRR: connect,
//! one request, close), with 1 and with 10,000 services.
//!
//! The tc topology runs with eBPF host routing (its pods registered as local
//! endpoints, so both directions go by `bpf_redirect_peer`); a third
//! topology runs the same program with legacy (host stack) routing for the
//! pod ↔ pod single-stream TCP throughput comparison.
//!
//! A third mode, "tc + socket LB" (Cilium's default kube-proxy replacement
//! datapath), runs on the tc topology with the load generator in a child
//! process inside the client pod's namespace and in a cgroup this bench
//! creates (under the cgroup v2 hierarchy) with `SockLb` attached: the
//! ClusterIP is translated once at connect(), so the tc program only
//! forwards (host routing) and translates nothing; the bench checks that
//! (no `forward_*` counts during those rounds, one socket translation per
//! connection, getpeername showing the ClusterIP).
//!
//! How it measures (`BENCH_POLL`, default `busy`): the load generator spins
//! on non-blocking sockets pinned to one CPU; one server thread in this
//! process serves every backend's listener (bound in its namespace),
//! spinning on `epoll_wait` pinned to another CPU while traffic came in
//! during the last 50 ms, else blocking; so a transaction costs the network
//! path and no scheduler wake-up or CPU idle-state exit.
//! `BENCH_POLL=block`: blocking sockets, no pinning (the older method).
//! In both, a PM QoS request (`/dev/cpu_dma_latency` = 0) keeps idle CPUs
//! polling instead of halting for the run (`BENCH_IDLE_STATES=1` leaves
//! idle states on). Every transaction and connection is timed: latency
//! percentiles beside the rates, since on a shared machine the rates mostly
//! measure how often the spinning threads were descheduled.
//! RR runs on one connection and on `BENCH_CONNS` (default 4) connections
//! at once (one request in flight on each, one client thread); CRR on one.
//!
//! Run as root: `cargo bench -p membrane-ebpf --bench datapath` (release;
//! `--profile dev` for a quick look) (`BENCH_SECS`, `BENCH_ROUNDS`,
//! `BENCH_SERVICES` tune it; `BENCH_SERVICES=0` skips the many-services
//! round; `BENCH_COST_ONLY=1` only times the tc program with
//! `BPF_PROG_TEST_RUN`; `BENCH_PROFILE=iptables|tc|socklb` runs only that
//! mode's CRR for `BENCH_SECS`, to profile it). Needs iptables.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Netns, PinDir, Proc, Topology, backend_ip, prerequisites};
use membrane_ebpf::{Datapath, SockLb, Stat};
use membrane_lb::maglev::BackendState;
use membrane_lb::service::{
    Algorithm, Backend, DesiredState, FrontendType, L3n4Addr, Protocol, ServiceEntry, ServiceName,
};

const VIP: &str = "10.96.0.10";
/// The pod CIDR kube-proxy's local-traffic detector is given
/// (`--cluster-cidr`); every pod of the topology is in it.
const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// Port of the discard server next to each echo server (throughput).
const SINK_PORT: u16 = 8081;

/// A busy-polling server falls back to blocking after this long without
/// traffic, so idle servers of the other topologies leave the CPU alone.
const SPIN_IDLE: Duration = Duration::from_millis(50);

/// How client and servers wait for the network.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Poll {
    /// Non-blocking sockets, spinning, client and servers on separate CPUs.
    Busy,
    /// Blocking sockets, no pinning (the older method).
    Block,
}

impl Poll {
    fn from_env(v: Option<String>) -> Poll {
        match v.as_deref() {
            None | Some("busy") => Poll::Busy,
            Some("block") => Poll::Block,
            Some(other) => panic!("BENCH_POLL={other}: expected busy or block"),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Poll::Busy => "busy",
            Poll::Block => "block",
        }
    }
}

/// Holds a PM QoS CPU latency request of 0 µs while alive (the kernel
/// drops it when the file is closed): idle CPUs then poll instead of
/// halting, so waking a thread on an idle CPU costs no idle-state exit —
/// on this VM's haltpoll cpuidle that is a VM exit per wake-up, which
/// otherwise dominates a one-connection ping-pong on an idle machine.
struct CpuLatency(#[allow(dead_code)] Option<std::fs::File>);

impl CpuLatency {
    fn zero() -> Self {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
        match f {
            Ok(f) => CpuLatency(Some(f)),
            Err(e) => {
                eprintln!("no PM QoS request (/dev/cpu_dma_latency: {e}); idle states stay on");
                CpuLatency(None)
            }
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(
        r,
        0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: as above; cpu < CPU_SETSIZE (it came from allowed_cpus).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// Client on the first allowed CPU, servers on the second (when there is one).
fn client_cpu() -> usize {
    allowed_cpus()[0]
}
fn server_cpu() -> usize {
    let c = allowed_cpus();
    *c.get(1).unwrap_or(&c[0])
}

/// Reads until EOF, then closes (the sender's drain marks the end).
fn sink(l: TcpListener, cpu: Option<usize>) {
    if let Some(c) = cpu {
        pin_to(c);
    }
    for c in l.incoming().flatten() {
        std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin_to(cpu);
            }
            let mut c = c;
            let mut buf = vec![0u8; 256 * 1024];
            while c.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        });
    }
}

/// Thread per connection, blocking reads; echoes `<name> <line>`.
fn block_server(name: String, l: TcpListener) {
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
}

/// Token bit marking a listener in the epoll set.
const LISTENER: u64 = 1 << 63;

fn epoll_add(ep: i32, fd: i32, token: u64) {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: ep and fd are open descriptors; ev is a valid event.
    let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(r, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
}

/// One thread serving every backend's listener (they arrive on `rx`, each
/// bound in its backend's namespace), echoing `<name> <line>`. It spins on
/// `epoll_wait` with a zero timeout while traffic came in during the last
/// `SPIN_IDLE`, else blocks, so idle topologies leave the CPU alone. One
/// thread for all backends: separate spinning servers on one CPU would
/// time-share it and a request would wait for its server's turn.
fn busy_server(rx: mpsc::Receiver<(String, TcpListener)>, cpu: usize) {
    struct Conn {
        s: TcpStream,
        listener: usize,
        pending: Vec<u8>,
    }
    pin_to(cpu);
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        ep >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    let mut listeners: Vec<(Vec<u8>, TcpListener)> = Vec::new();
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next = 0u64;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut buf = [0u8; 4096];
    let mut out = Vec::with_capacity(256);
    let mut last = Instant::now();
    loop {
        while let Ok((name, l)) = rx.try_recv() {
            l.set_nonblocking(true).expect("nonblocking listener");
            epoll_add(ep, l.as_raw_fd(), LISTENER | listeners.len() as u64);
            listeners.push((format!("{name} ").into_bytes(), l));
        }
        let timeout = if last.elapsed() < SPIN_IDLE { 0 } else { 20 };
        // SAFETY: events is a valid buffer of 64 entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 64, timeout) };
        if n <= 0 {
            continue;
        }
        last = Instant::now();
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token & LISTENER != 0 {
                let li = (token & !LISTENER) as usize;
                while let Ok((s, _)) = listeners[li].1.accept() {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = s.set_nodelay(true);
                    epoll_add(ep, s.as_raw_fd(), next);
                    conns.insert(
                        next,
                        Conn {
                            s,
                            listener: li,
                            pending: Vec::new(),
                        },
                    );
                    next += 1;
                }
                continue;
            }
            let Some(c) = conns.get_mut(&token) else {
                continue;
            };
            let keep = match c.s.read(&mut buf) {
                Ok(0) => false,
                Ok(k) => {
                    c.pending.extend_from_slice(&buf[..k]);
                    let mut ok = true;
                    while let Some(p) = c.pending.iter().position(|&b| b == b'\n') {
                        out.clear();
                        out.extend_from_slice(&listeners[c.listener].0);
                        out.extend(c.pending.drain(..=p));
                        // Replies are tiny: the socket buffer always has room.
                        if c.s.write_all(&out).is_err() {
                            ok = false;
                            break;
                        }
                    }
                    ok
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => true,
                Err(_) => false,
            };
            if !keep {
                // Closing the socket takes it out of the epoll set.
                conns.remove(&token);
            }
        }
    }
}

/// Serves the backends in this process: an echo listener (`port`) and a
/// discard listener (`SINK_PORT`) bound in each backend's namespace.
/// Topology wants a child process per backend; it gets a placeholder
/// (`sleep`), killed with the topology.
struct Servers {
    poll: Poll,
    busy: Option<mpsc::Sender<(String, TcpListener)>>,
}

impl Servers {
    fn new(poll: Poll) -> Self {
        let busy = (poll == Poll::Busy).then(|| {
            let (tx, rx) = mpsc::channel();
            let cpu = server_cpu();
            std::thread::spawn(move || busy_server(rx, cpu));
            tx
        });
        Servers { poll, busy }
    }

    fn spawn(&self) -> impl Fn(&Netns, &str, u16) -> Proc + '_ {
        move |ns: &Netns, name: &str, port: u16| {
            let (echo, discard) = ns.run(|| {
                // Dual-stack (bindv6only is 0 in fresh namespaces).
                (
                    TcpListener::bind(("::", port)).expect("bind echo"),
                    TcpListener::bind(("::", SINK_PORT)).expect("bind sink"),
                )
            });
            let cpu = (self.poll == Poll::Busy).then(server_cpu);
            std::thread::spawn(move || sink(discard, cpu));
            match &self.busy {
                Some(tx) => tx.send((name.to_string(), echo)).expect("server thread"),
                None => {
                    let name = name.to_string();
                    std::thread::spawn(move || block_server(name, echo));
                }
            }
            Proc(
                Command::new("sleep")
                    .arg("infinity")
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("spawn sleep"),
            )
        }
    }
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

/// Spins until `s` (non-blocking) has delivered a whole reply line.
fn spin_reply(s: &mut TcpStream, buf: &mut [u8]) {
    loop {
        match s.read(buf) {
            Ok(0) => panic!("server closed the connection"),
            Ok(n) if buf[..n].contains(&b'\n') => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Transactions per second over `conns` connections, one request in flight
/// on each.
/// A round's rate (per second) and, with one request in flight, every
/// transaction's (or connection's) latency in nanoseconds.
type Run = (f64, Vec<u32>);

fn ns(d: Duration) -> u32 {
    d.as_nanos().min(u32::MAX as u128) as u32
}

fn rr(poll: Poll, addr: SocketAddr, secs: f64, conns: usize) -> Run {
    match poll {
        Poll::Block => rr_block(addr, secs),
        Poll::Busy => rr_busy(addr, secs, conns),
    }
}

fn rr_block(addr: SocketAddr, secs: f64) -> Run {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    let mut t = start;
    while t < deadline {
        w.write_all(b"x\n").expect("write");
        line.clear();
        r.read_line(&mut line).expect("read");
        let now = Instant::now();
        lat.push(ns(now - t));
        t = now;
    }
    linger0(r.get_ref());
    (lat.len() as f64 / start.elapsed().as_secs_f64(), lat)
}

fn rr_busy(addr: SocketAddr, secs: f64, conns: usize) -> Run {
    pin_to(client_cpu());
    let mut socks: Vec<TcpStream> = (0..conns)
        .map(|_| {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let mut buf = [0u8; 256];
    // Warm up: one transaction each (the server accepts and settles).
    for s in &mut socks {
        s.write_all(b"x\n").expect("write");
        spin_reply(s, &mut buf);
    }
    for s in &mut socks {
        s.write_all(b"x\n").expect("write");
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    let mut lat = Vec::new();
    let mut t = start;
    'run: loop {
        for s in &mut socks {
            match s.read(&mut buf) {
                Ok(0) => panic!("server closed the connection"),
                Ok(k) => {
                    // One request in flight, so a newline completes it.
                    if buf[..k].contains(&b'\n') {
                        n += 1;
                        s.write_all(b"x\n").expect("write");
                        if conns == 1 {
                            // The clock read is the send time of the next.
                            let now = Instant::now();
                            lat.push(ns(now - t));
                            t = now;
                            if now >= deadline {
                                break 'run;
                            }
                        } else if n.is_multiple_of(64) && Instant::now() >= deadline {
                            break 'run;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
    let el = start.elapsed().as_secs_f64();
    for s in &socks {
        linger0(s);
    }
    (n as f64 / el, lat)
}

/// Connections per second: connect, one request, close (RST, so no
/// TIME_WAIT pile-up on the client's ports).
fn crr(poll: Poll, addr: SocketAddr, secs: f64) -> Run {
    if poll == Poll::Busy {
        pin_to(client_cpu());
    }
    let start = Instant::now();
    let mut n = 0u64;
    let mut slow = 0;
    let mut buf = [0u8; 256];
    let mut line = String::new();
    let mut lat = Vec::new();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        // A blocking connect does not sleep here: the SYN, SYN-ACK and ACK
        // are all handled in the softirq that sending the SYN runs.
        let mut s = TcpStream::connect(addr).expect("connect");
        if t.elapsed().as_millis() > 100 {
            slow += 1;
        }
        s.set_nodelay(true).expect("nodelay");
        linger0(&s);
        match poll {
            Poll::Busy => {
                s.set_nonblocking(true).expect("nonblocking");
                s.write_all(b"x\n").expect("write");
                spin_reply(&mut s, &mut buf);
            }
            Poll::Block => {
                s.write_all(b"x\n").expect("write");
                let mut r = BufReader::new(s);
                line.clear();
                r.read_line(&mut line).expect("read");
            }
        }
        lat.push(ns(t.elapsed()));
        n += 1;
    }
    if slow > 0 {
        eprintln!("crr: {slow} of {n} connects took > 100 ms");
    }
    (n as f64 / start.elapsed().as_secs_f64(), lat)
}

/// Single-stream TCP throughput in Gbit/s: write for `secs`, then wait for
/// the receiver to have read everything (its close after our EOF).
fn stream(poll: Poll, addr: SocketAddr, secs: f64) -> f64 {
    if poll == Poll::Busy {
        pin_to(client_cpu());
    }
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
    while s.read(&mut rest).map(|n| n > 0).unwrap_or(false) {}
    bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Registers the topology's pods as local endpoints (host routing).
fn register_pods(t: &Topology, dp: &mut Datapath) {
    let pods: Vec<(String, Vec<std::net::IpAddr>)> = std::iter::once((
        "hc".to_string(),
        vec![
            "10.244.1.2".parse().expect("ip"),
            "fd00:244:1::2".parse().expect("ip"),
        ],
    ))
    .chain((1..=3).map(|i| {
        (
            format!("hb{i}"),
            vec![
                backend_ip(i).parse().expect("ip"),
                common::backend_ip6(i).parse().expect("ip"),
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
                addr: L3n4Addr::new(b.parse().expect("ip"), 8080, Protocol::Tcp),
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
    v.push(entry(VIP.parse().expect("vip"), bes));
    v.sort_by_key(|e| e.frontend);
    DesiredState { services: v }
}

/// What kube-proxy's iptables proxier (pkg/proxy/iptables/proxier.go)
/// installs for ClusterIP services with `--cluster-cidr` set, `--random-fully`
/// supported and `nf_conntrack_tcp_be_liberal` off: the jump rules from the
/// built-in chains (INPUT/FORWARD/OUTPUT in filter, PREROUTING/OUTPUT/
/// POSTROUTING in nat), KUBE-FORWARD (INVALID drop, masquerade-mark accept,
/// RELATED,ESTABLISHED accept), KUBE-SERVICES → KUBE-SVC-* (off-cluster
/// sources marked for masquerade, then one `statistic` rule per endpoint)
/// → KUBE-SEP-* (hairpin mark, DNAT), KUBE-MARK-MASQ and KUBE-POSTROUTING,
/// and the NodePort tail rule. The measured service comes last in
/// KUBE-SERVICES (the worst case for the rule walk).
fn iptables_rules(extra: usize, bes: &[String]) -> String {
    let mut f = String::from("*filter\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        f.push_str(&format!(":{c} - [0:0]\n"));
    }
    let new = "-m conntrack --ctstate NEW";
    for (chain, jumps) in [
        (
            "INPUT",
            vec![
                (
                    new,
                    "kubernetes load balancer firewall",
                    "KUBE-PROXY-FIREWALL",
                ),
                (
                    "",
                    "kubernetes health check service ports",
                    "KUBE-NODEPORTS",
                ),
                (
                    new,
                    "kubernetes externally-visible service portals",
                    "KUBE-EXTERNAL-SERVICES",
                ),
                ("", "", "KUBE-FIREWALL"),
            ],
        ),
        (
            "FORWARD",
            vec![
                (
                    new,
                    "kubernetes load balancer firewall",
                    "KUBE-PROXY-FIREWALL",
                ),
                ("", "kubernetes forwarding rules", "KUBE-FORWARD"),
                (new, "kubernetes service portals", "KUBE-SERVICES"),
                (
                    new,
                    "kubernetes externally-visible service portals",
                    "KUBE-EXTERNAL-SERVICES",
                ),
            ],
        ),
        (
            "OUTPUT",
            vec![
                (
                    new,
                    "kubernetes load balancer firewall",
                    "KUBE-PROXY-FIREWALL",
                ),
                (new, "kubernetes service portals", "KUBE-SERVICES"),
                ("", "", "KUBE-FIREWALL"),
            ],
        ),
    ] {
        for (m, comment, target) in jumps {
            let c = if comment.is_empty() {
                String::new()
            } else {
                format!(" -m comment --comment \"{comment}\"")
            };
            f.push_str(&format!("-A {chain} {m}{c} -j {target}\n"));
        }
    }
    f.push_str(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
         -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
    );
    f.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    f.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
    );
    f.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    f.push_str("COMMIT\n");

    let mut chains = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    let mut svc = |idx: usize, vip: String| {
        let name = format!("bench/svc-{idx}:http");
        let cip =
            format!("-m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip} --dport 80");
        chains.push_str(&format!(":KUBE-SVC-{idx:016} - [0:0]\n"));
        rules.push_str(&format!("-A KUBE-SERVICES {cip} -j KUBE-SVC-{idx:016}\n"));
        rules.push_str(&format!(
            "-A KUBE-SVC-{idx:016} {cip} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ\n"
        ));
        let n = bes.len();
        for (k, b) in bes.iter().enumerate() {
            let sep = format!("KUBE-SEP-{idx:014}{k:02}");
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            let left = n - k;
            let stat = if left > 1 {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            rules.push_str(&format!(
                "-A KUBE-SVC-{idx:016} -m comment --comment \"{name} -> {b}:8080\"{stat} -j {sep}\n"
            ));
            rules.push_str(&format!(
                "-A {sep} -m comment --comment {name} -s {b}/32 -j KUBE-MARK-MASQ\n"
            ));
            rules.push_str(&format!(
                "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {b}:8080\n"
            ));
        }
    };
    for i in 0..extra {
        svc(i, filler_vip(i).to_string());
    }
    svc(extra, VIP.to_string());
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS\n",
    );
    f.push_str(&chains);
    f.push_str(&rules);
    f.push_str("COMMIT\n");
    f
}

fn iptables_restore(ns: &Netns, rules: &str) {
    let mut c = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-restore (install iptables)");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("write rules");
    assert!(c.wait().expect("wait").success(), "iptables-restore failed");
}

/// `Ip: InReceives` and `Ip: ForwDatagrams` of the calling thread's
/// network namespace: what its IP stack received and forwarded.
fn ip_counters() -> [u64; 2] {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (h, v) = (lines.next().expect("Ip header"), lines.next().expect("Ip"));
    let vals: Vec<&str> = v.split_whitespace().collect();
    ["InReceives", "ForwDatagrams"].map(|name| {
        let i = h
            .split_whitespace()
            .position(|f| f == name)
            .unwrap_or_else(|| panic!("no {name} in /proc/net/snmp"));
        vals.get(i)
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("bad {name} value"))
    })
}

fn delta(a: [u64; 2], b: [u64; 2]) -> [u64; 2] {
    [b[0] - a[0], b[1] - a[1]]
}

/// 10th, 50th and 90th percentile in µs (0 when empty).
fn percentiles(v: &mut [u32]) -> [f64; 3] {
    if v.is_empty() {
        return [0.0; 3];
    }
    v.sort_unstable();
    [0.1, 0.5, 0.9].map(|q| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0)
}

/// Median, and the spread as (max − min) / median in percent.
fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v[v.len() / 2];
    (m, (v[v.len() - 1] - v[0]) / m * 100.0)
}

fn sysctl_read(k: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", k.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_string())
}

fn sysctl_write(k: &str, v: &str) -> bool {
    std::fs::write(format!("/proc/sys/{}", k.replace('.', "/")), v).is_ok()
}

/// Restores `kernel.bpf_stats_enabled` on drop (also on panic).
struct StatsOn(Option<String>);

impl StatsOn {
    fn new() -> Self {
        let old = sysctl_read("kernel.bpf_stats_enabled");
        sysctl_write("kernel.bpf_stats_enabled", "1");
        StatsOn(old)
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            sysctl_write("kernel.bpf_stats_enabled", old);
        }
    }
}

/// Offload settings of the node's veths, as `ethtool -k` reports them.
fn offloads(ns: &Netns, dev: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ethtool", "-k", dev])
        .output();
    let Ok(out) = out else {
        return "ethtool missing".into();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    [
        "tx-checksumming",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
    ]
    .iter()
    .filter_map(|k| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{k}:")))
            .map(|l| l.trim().to_string())
    })
    .collect::<Vec<_>>()
    .join(", ")
}

fn env<T: std::str::FromStr>(k: &str, default: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// First argument of the socket LB client (a child process of the bench).
const SOCK_CLIENT: &str = "--sock-client";

/// A cgroup v2 directory of the bench's own for the socket LB client,
/// removed on drop (after its processes exited; the programs attached to
/// it go with it).
struct SockCgroup(std::path::PathBuf);

impl SockCgroup {
    fn new() -> Self {
        // cgroup v2 at /sys/fs/cgroup, or (hybrid hosts) at its unified/.
        let base = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("cgroup.threads").exists())
            .expect("no cgroup v2 hierarchy for the socket LB client");
        let p = base.join(format!("membrane-bench-{}-socklb", std::process::id()));
        let _ = std::fs::remove_dir(&p);
        std::fs::create_dir(&p).expect("mkdir cgroup");
        SockCgroup(p)
    }
}

impl Drop for SockCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The child: `--sock-client rr|crr busy|block ADDR SECS CONNS`, already in
/// the socket LB's cgroup and the client pod's namespace. Checks that
/// getpeername shows the service (the socket LB's reverse translation),
/// runs, and writes the rate (f64) and the latencies (u32 ns), little
/// endian, to stdout.
fn sock_client(args: &[String]) {
    let [mode, poll, addr, secs, conns] = args else {
        panic!("{SOCK_CLIENT}: expected MODE POLL ADDR SECS CONNS, got {args:?}");
    };
    let poll = Poll::from_env(Some(poll.clone()));
    let addr: SocketAddr = addr.parse().expect("ADDR");
    let secs: f64 = secs.parse().expect("SECS");
    let conns: usize = conns.parse().expect("CONNS");
    let s = TcpStream::connect(addr).expect("connect");
    assert_eq!(
        s.peer_addr().expect("getpeername"),
        addr,
        "getpeername does not show the service"
    );
    linger0(&s);
    drop(s);
    let (rate, lat) = match mode.as_str() {
        "rr" => rr(poll, addr, secs, conns),
        "crr" => crr(poll, addr, secs),
        other => panic!("{SOCK_CLIENT}: unknown mode {other}"),
    };
    let mut out = Vec::with_capacity(8 + 4 * lat.len());
    out.extend_from_slice(&rate.to_le_bytes());
    for l in lat {
        out.extend_from_slice(&l.to_le_bytes());
    }
    std::io::stdout().write_all(&out).expect("stdout");
}

/// Runs the load generator as a child process in `cg` and `ns` (see
/// [`sock_client`]).
fn sock_run(
    cg: &SockCgroup,
    ns: &Netns,
    poll: Poll,
    mode: &str,
    addr: SocketAddr,
    secs: f64,
    conns: usize,
) -> Run {
    let exe = std::env::current_exe().expect("current_exe");
    // Into the cgroup first (sockets take their cgroup from the process
    // that makes them), then the namespace, then the bench binary again.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} \"$0\" \"$@\"",
        cg.0.display(),
        ns.name
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .arg(&exe)
        .args([
            SOCK_CLIENT,
            mode,
            poll.name(),
            &addr.to_string(),
            &secs.to_string(),
            &conns.to_string(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("spawn the socket LB client");
    assert!(out.status.success(), "socket LB client failed: {out:?}");
    let b = &out.stdout;
    assert!(b.len() >= 8, "socket LB client wrote {} bytes", b.len());
    let rate = f64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let lat = b[8..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    (rate, lat)
}

/// Counters that show whether the tc program translated anything.
fn tc_counts(dp: &Datapath) -> [u64; 3] {
    let st = dp.stats().expect("stats");
    [
        st[&Stat::FwdNew] + st[&Stat::FwdEstablished] + st[&Stat::RevNat],
        st[&Stat::SockTranslate],
        st[&Stat::HostRoutePeer],
    ]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(SOCK_CLIENT) {
        sock_client(&args[2..]);
        return;
    }
    if !prerequisites() {
        return;
    }
    let secs: f64 = env("BENCH_SECS", 2.0);
    let rounds: usize = env("BENCH_ROUNDS", 3);
    let many: usize = env("BENCH_SERVICES", 10_000);
    let conns: usize = env("BENCH_CONNS", 4);
    let poll = Poll::from_env(std::env::var("BENCH_POLL").ok());
    let pm_qos = std::env::var("BENCH_IDLE_STATES").is_err();
    let _latency = pm_qos.then(CpuLatency::zero);
    let bes: Vec<String> = (1..=3).map(backend_ip).collect();
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("vip");
    println!(
        "method: {} polling{}; {}; {rounds} rounds × {secs} s, interleaved; median and spread",
        poll.name(),
        if poll == Poll::Busy {
            format!(
                ", client on CPU {}, servers on CPU {}",
                client_cpu(),
                server_cpu()
            )
        } else {
            String::new()
        },
        if pm_qos {
            "CPU idle states off (PM QoS cpu_dma_latency 0)"
        } else {
            "CPU idle states on"
        },
    );

    let servers = Servers::new(poll);
    let pins = PinDir::new("dpb");
    let ipt = Topology::with_servers("dpb-ipt", servers.spawn());
    let tc = Topology::with_servers("dpb-tc", servers.spawn());
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
    if std::env::var("BENCH_COST_ONLY").is_ok() {
        dp.sync(&desired(0, &bes)).expect("sync");
        program_cost(&dp);
        return;
    }

    // tc + socket LB: the same topology and program, the client in a
    // cgroup with the socket LB attached.
    let sock_cg = SockCgroup::new();
    let sock = SockLb::attach(dp.config(), &sock_cg.0).expect("attach socket LB");

    // One mode's CRR alone for BENCH_SECS, to profile it (`perf record`):
    // BENCH_PROFILE=iptables|tc|socklb.
    if let Ok(mode) = std::env::var("BENCH_PROFILE") {
        iptables_restore(&ipt.node, &iptables_rules(0, &bes));
        dp.sync(&desired(0, &bes)).expect("sync");
        let (rate, mut lat) = match mode.as_str() {
            "iptables" => ipt.client.run(|| crr(poll, vip, secs)),
            "tc" => tc.client.run(|| crr(poll, vip, secs)),
            "socklb" => sock_run(&sock_cg, &tc.client, poll, "crr", vip, secs, 1),
            other => panic!("BENCH_PROFILE={other}: expected iptables, tc or socklb"),
        };
        let p = percentiles(&mut lat);
        println!(
            "{mode} CRR: {rate:.0} conn/s, p10 / p50 / p90 {:.1} / {:.1} / {:.1} µs",
            p[0], p[1], p[2]
        );
        drop(sock);
        let _ = SockLb::remove_pins(&dp.config().pin_dir, &sock_cg.0);
        return;
    }

    // Pod ↔ pod single-stream TCP throughput: host routing vs the host
    // stack (the same program with --enable-host-legacy-routing).
    {
        let lpins = PinDir::new("dpb-legacy");
        let leg = Topology::with_servers("dpb-leg", servers.spawn());
        let mut lcfg = lpins.config(251);
        lcfg.host_routing = false;
        let mut ldp = Datapath::load(lcfg).expect("load legacy");
        leg.attach_all(&mut ldp);
        for (t, what) in [(&tc, "host routing"), (&leg, "host stack")] {
            println!(
                "offloads ({what}): node hc: {}; pod eth0: {}",
                offloads(&t.node, "hc"),
                offloads(&t.client, "eth0")
            );
        }
        let sink: SocketAddr = format!("{}:{SINK_PORT}", backend_ip(1))
            .parse()
            .expect("sink");
        let (mut h, mut l) = (vec![], vec![]);
        for _ in 0..rounds {
            h.push(tc.client.run(|| stream(poll, sink, secs)));
            l.push(leg.client.run(|| stream(poll, sink, secs)));
        }
        let ((h, hs), (l, ls)) = (summary(h), summary(l));
        println!();
        println!("| pod → pod TCP stream | Gbit/s | spread |");
        println!("|---|---:|---:|");
        println!("| host stack (legacy routing) | {l:.2} | {ls:.0} % |");
        println!("| eBPF host routing | {h:.2} | {hs:.0} % |");
        println!("host routing / host stack: ×{:.2}", h / l);
        println!();
    }

    let rr_n = format!("RR ×{conns} conns tx/s");
    println!(
        "| services | mode | RR tx/s | RR p10 / p50 / p90 µs | {rr_n} | CRR conn/s | CRR p10 / p50 / p90 µs |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
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
        let ipt_before = ipt.node.run(ip_counters);
        let tc_before = tc.node.run(ip_counters);
        let peer_before = dp.stats().expect("stats")[&Stat::HostRoutePeer];
        let mut m: [Vec<f64>; 9] = Default::default();
        let mut l: [Vec<u32>; 9] = Default::default();
        let mut add = |i: usize, (rate, lat): Run| {
            m[i].push(rate);
            l[i].extend(lat);
        };
        // Socket LB rounds: what the tc program did meanwhile, and how
        // many connections the client made.
        let mut sock_tc = [0u64; 3];
        let mut sock_conns = 0u64;
        let mut sock = |mode: &str, c: usize| -> Run {
            let before = tc_counts(&dp);
            let r = sock_run(&sock_cg, &tc.client, poll, mode, vip, secs, c);
            let after = tc_counts(&dp);
            for i in 0..3 {
                sock_tc[i] += after[i] - before[i];
            }
            // The getpeername probe, and the run's own connections.
            sock_conns += 1 + if mode == "crr" {
                r.1.len() as u64
            } else {
                c as u64
            };
            r
        };
        for _ in 0..rounds {
            add(6, sock("rr", 1));
            if poll == Poll::Busy {
                add(7, sock("rr", conns));
            }
            add(8, sock("crr", 1));
            add(0, ipt.client.run(|| rr(poll, vip, secs, 1)));
            add(1, tc.client.run(|| rr(poll, vip, secs, 1)));
            if poll == Poll::Busy {
                add(2, ipt.client.run(|| rr(poll, vip, secs, conns)));
                add(3, tc.client.run(|| rr(poll, vip, secs, conns)));
            }
            add(4, ipt.client.run(|| crr(poll, vip, secs)));
            add(5, tc.client.run(|| crr(poll, vip, secs)));
        }
        let p: Vec<[f64; 3]> = l.iter_mut().map(|v| percentiles(v)).collect();
        let ipt_ip = delta(ipt_before, ipt.node.run(ip_counters));
        let tc_ip = delta(tc_before, tc.node.run(ip_counters));
        let peer = dp.stats().expect("stats")[&Stat::HostRoutePeer] - peer_before - sock_tc[2];
        let s: Vec<(f64, f64)> = m
            .into_iter()
            .map(|v| if v.is_empty() { (0.0, 0.0) } else { summary(v) })
            .collect();
        for (mode, r1, rn, c, pr, pc) in [
            (
                "iptables DNAT (kube-proxy rules)",
                s[0],
                s[2],
                s[4],
                p[0],
                p[4],
            ),
            ("membrane tc (host routing)", s[1], s[3], s[5], p[1], p[5]),
            (
                "membrane tc + socket LB (Cilium's KPR default)",
                s[6],
                s[7],
                s[8],
                p[6],
                p[8],
            ),
        ] {
            println!(
                "| {} | {mode} | {:.0} ± {:.0} % | {:.1} / {:.1} / {:.1} | {:.0} ± {:.0} % \
                 | {:.0} ± {:.0} % | {:.1} / {:.1} / {:.1} |",
                extra + 1,
                r1.0,
                r1.1 / 2.0,
                pr[0],
                pr[1],
                pr[2],
                rn.0,
                rn.1 / 2.0,
                c.0,
                c.1 / 2.0,
                pc[0],
                pc[1],
                pc[2],
            );
        }
        results.push((extra + 1, s, p, ipt_ip, tc_ip, peer));
        // crr() counts a connection only once its reply came back; the
        // last one of a round may have been cut short by the deadline,
        // so the translations are at least the connections counted.
        println!(
            "socket LB rounds: {} connections, {} socket translations; meanwhile the tc program \
             translated {} packets (forward + reverse NAT) and delivered {} by bpf_redirect_peer",
            sock_conns, sock_tc[1], sock_tc[0], sock_tc[2]
        );
        assert_eq!(sock_tc[0], 0, "the tc program translated socket LB traffic");
        assert!(
            sock_tc[1] >= sock_conns,
            "fewer socket translations ({}) than connections ({sock_conns})",
            sock_tc[1]
        );
    }
    println!("(± = half the max − min spread over the rounds, in % of the median)");
    println!();
    for (n, s, p, ipt_ip, tc_ip, peer) in &results {
        println!(
            "{n} services: tc + socket LB/iptables RR ×{:.2} (1 conn), ×{:.2} ({conns} conns), \
             CRR ×{:.2}; by median latency RR ×{:.2}, CRR ×{:.2}; by p10 latency RR ×{:.2}, \
             CRR ×{:.2}; tc + socket LB/tc CRR ×{:.2}",
            s[6].0 / s[0].0,
            if s[2].0 > 0.0 { s[7].0 / s[2].0 } else { 0.0 },
            s[8].0 / s[4].0,
            p[0][1] / p[6][1],
            p[4][1] / p[8][1],
            p[0][0] / p[6][0],
            p[4][0] / p[8][0],
            s[8].0 / s[5].0,
        );
        println!(
            "{n} services: tc/iptables RR ×{:.2} (1 conn), ×{:.2} ({conns} conns), CRR ×{:.2}; \
             by median latency RR ×{:.2}, CRR ×{:.2}; by p10 latency RR ×{:.2}, CRR ×{:.2}",
            s[1].0 / s[0].0,
            if s[2].0 > 0.0 { s[3].0 / s[2].0 } else { 0.0 },
            s[5].0 / s[4].0,
            p[0][1] / p[1][1],
            p[4][1] / p[5][1],
            p[0][0] / p[1][0],
            p[4][0] / p[5][0],
        );
        println!(
            "  node IP stack during the rounds: iptables node received {} and forwarded {} \
             packets; tc node received {} and forwarded {} ({peer} went by bpf_redirect_peer)",
            ipt_ip[0], ipt_ip[1], tc_ip[0], tc_ip[1]
        );
    }
    if let [(_, _, p1, ..), (_, _, pn, ..)] = results.as_slice() {
        println!(
            "RR median latency change 1 → {} services: iptables {:+.1} %, tc {:+.1} %",
            many + 1,
            (pn[0][1] / p1[0][1] - 1.0) * 100.0,
            (pn[1][1] / p1[1][1] - 1.0) * 100.0
        );
    }

    // The tc program's own cost per packet, from the kernel's run-time
    // statistics; measured apart from the rounds above because collecting
    // them costs two clock reads per run.
    {
        let _on = StatsOn::new();
        dp.sync(&desired(0, &bes)).expect("sync");
        let (t0, n0) = dp.program_run_stats().expect("prog stats");
        tc.client.run(|| rr(poll, vip, secs.min(2.0), 1).0);
        let (t1, n1) = dp.program_run_stats().expect("prog stats");
        let tc_conns = tc
            .client
            .run(|| crr(poll, vip, secs.min(2.0)).1.len() as u64);
        let (t2, n2) = dp.program_run_stats().expect("prog stats");
        sock_run(&sock_cg, &tc.client, poll, "rr", vip, secs.min(2.0), 1);
        let (t3, n3) = dp.program_run_stats().expect("prog stats");
        let sock_conns = sock_run(&sock_cg, &tc.client, poll, "crr", vip, secs.min(2.0), 1)
            .1
            .len() as u64;
        let (t4, n4) = dp.program_run_stats().expect("prog stats");
        let per = |t: Duration, n: u64| {
            if n == 0 {
                0.0
            } else {
                t.as_nanos() as f64 / n as f64
            }
        };
        println!(
            "tc program cost (kernel.bpf_stats_enabled): RR {:.0} ns/packet over {} packets, \
             CRR {:.0} ns/packet over {} packets",
            per(t1 - t0, n1 - n0),
            n1 - n0,
            per(t2 - t1, n2 - n1),
            n2 - n1
        );
        println!(
            "tc program cost with the socket LB (no translation in tc): RR {:.0} ns/packet over \
             {} packets, CRR {:.0} ns/packet over {} packets",
            per(t3 - t2, n3 - n2),
            n3 - n2,
            per(t4 - t3, n4 - n3),
            n4 - n3
        );
        // Per connection (CRR): how many packets the program saw and its
        // total time, with and without the socket LB.
        let conn = |t: Duration, n: u64, c: u64| {
            if c == 0 {
                (0.0, 0.0)
            } else {
                (n as f64 / c as f64, t.as_nanos() as f64 / c as f64 / 1000.0)
            }
        };
        let (tp, tt) = conn(t2 - t1, n2 - n1, tc_conns);
        let (sp, st) = conn(t4 - t3, n4 - n3, sock_conns);
        println!(
            "tc program per CRR connection: tc {tp:.1} packets, {tt:.2} µs; tc + socket LB \
             {sp:.1} packets, {st:.2} µs"
        );
    }
    program_cost(&dp);
    drop(sock);
    let _ = SockLb::remove_pins(&dp.config().pin_dir, &sock_cg.0);
    drop(sock_cg);
    drop(dp);
}

/// The tc program alone, timed by the kernel with `BPF_PROG_TEST_RUN`: an
/// established flow's request (client → ClusterIP: DNAT + redirect_peer)
/// and its reply (reverse NAT + redirect_peer), each the median of 20,000
/// single runs (the program rewrites the frame, so a repeated run would see
/// another packet), and pod → pod traffic that is no service (the
/// rewritten request, run 1,000,000 times in a row). No skb copy-on-write
/// here (a test-run skb is not a clone), so the live figure is higher.
fn program_cost(dp: &Datapath) {
    use common::pkt::{ACK, SYN, TCP, frame, parse};
    let client: std::net::IpAddr = "10.244.1.2".parse().expect("ip");
    let vip_ip: std::net::IpAddr = VIP.parse().expect("ip");
    let payload = b"x\n";
    let syn = frame(client, 40_000, vip_ip, 80, TCP, SYN, &[], false);
    let (verdict, out) = dp.test_run(&syn).expect("test run");
    let be = parse(&out);
    assert_ne!(be.dst, vip_ip, "SYN not translated (verdict {verdict})");
    let request = frame(client, 40_000, vip_ip, 80, TCP, ACK, payload, false);
    let reply = frame(be.dst, be.dport, client, 40_000, TCP, ACK, payload, false);
    let direct = frame(client, 40_000, be.dst, be.dport, TCP, ACK, payload, false);
    // The socket LB's flows in both directions: to the backend directly,
    // and its reply (no reverse NAT entry: another client port).
    let direct_reply = frame(be.dst, be.dport, client, 40_001, TCP, ACK, payload, false);
    const TC_ACT_REDIRECT: u32 = 7;
    let single = |f: &[u8]| {
        let mut v: Vec<Duration> = (0..20_000)
            .map(|_| {
                let (r, d) = dp.test_run_repeat(f, 1).expect("test run");
                assert_eq!(r, TC_ACT_REDIRECT, "expected bpf_redirect_peer");
                d
            })
            .collect();
        v.sort();
        v[v.len() / 2]
    };
    // New flows: a SYN from another client port each time (conntrack and
    // reverse NAT entries written).
    let mut syns: Vec<Duration> = (0..20_000u32)
        .map(|i| {
            let f = frame(
                client,
                1024 + (i % 60_000) as u16,
                vip_ip,
                80,
                TCP,
                SYN,
                &[],
                false,
            );
            let (r, d) = dp.test_run_repeat(&f, 1).expect("test run");
            assert_eq!(r, TC_ACT_REDIRECT, "expected bpf_redirect_peer");
            d
        })
        .collect();
    syns.sort();
    let (r, d) = dp.test_run_repeat(&direct, 1_000_000).expect("test run");
    assert_eq!(r, TC_ACT_REDIRECT, "expected bpf_redirect_peer");
    let (r, dr) = dp
        .test_run_repeat(&direct_reply, 1_000_000)
        .expect("test run");
    assert_eq!(r, TC_ACT_REDIRECT, "expected bpf_redirect_peer");
    println!(
        "tc program alone (BPF_PROG_TEST_RUN): established request {:?}, reply {:?}, \
         new flow (SYN) {:?} (medians of 20,000 single runs); pod → pod, no service \
         (a socket LB flow): request {d:?}, reply {dr:?} (means of 1,000,000 in a row)",
        single(&request),
        single(&reply),
        syns[syns.len() / 2]
    );
}
