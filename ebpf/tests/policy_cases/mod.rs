//! The upstream Kubernetes network-policy test model and the pod server
//! and probe scripts, shared by the veth harness (`policy_harness`, for
//! the Cilium cases) and the run through `membrane up` with pods from
//! `membrane-cni` (`membrane/tests/policy_model_cni.rs`, which includes
//! this file by path), and the packet probes both use. Pure data and
//! scripts: no harness types.
//!
//! Namespaces x, y, z (`ns=<name>`, `kubernetes.io/metadata.name`), pods
//! a, b, c in each (`pod=<name>`), servers on ports 80 and 81 over TCP and
//! UDP. Each step replaces the applied policies; its expected reachability
//! is written by hand from the upstream cases, independent of Membrane's
//! own model. Loopback cells are ignored, as upstream does.
#![allow(dead_code)]

use std::net::IpAddr;
use std::process::{Command, Stdio};

/// (namespace, pod) of the model.
pub const MODEL: [(&str, &str); 9] = [
    ("x", "a"),
    ("x", "b"),
    ("x", "c"),
    ("y", "a"),
    ("y", "b"),
    ("y", "c"),
    ("z", "a"),
    ("z", "b"),
    ("z", "c"),
];

/// The model's services: ports 80 and 81, TCP and UDP.
pub const SERVICES: [(L4, u16); 4] = [(L4::Tcp, 80), (L4::Tcp, 81), (L4::Udp, 80), (L4::Udp, 81)];

/// The named port every model pod declares (container port 81/TCP).
pub const NAMED_PORT: &str = "serve-81-tcp";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

/// One probed cell: source and destination (namespace, pod), protocol and
/// port.
#[derive(Debug, Clone, Copy)]
pub struct Cell<'a> {
    pub sn: &'a str,
    pub sp: &'a str,
    pub dn: &'a str,
    pub dp: &'a str,
    pub l4: L4,
    pub port: u16,
}

impl Cell<'_> {
    fn to(&self, ns: &str, pod: &str) -> bool {
        self.dn == ns && self.dp == pod
    }
    fn from(&self, ns: &str, pod: &str) -> bool {
        self.sn == ns && self.sp == pod
    }
}

/// One case: the policies in force (replacing the previous step's) and
/// the expected reachability of every cell.
pub struct Step {
    pub what: &'static str,
    /// Multi-document YAML; empty = no policy.
    pub policies: String,
    pub expect: fn(&Cell) -> bool,
}

pub fn np(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

/// The model's cases, in order (the last two are an update and a delete
/// of the same policy).
pub fn steps() -> Vec<Step> {
    vec![
        Step {
            what: "no policy",
            policies: String::new(),
            expect: |_| true,
        },
        Step {
            what: "default-deny ingress in x",
            policies: np(
                "deny-ingress",
                "x",
                "  podSelector: {}\n  policyTypes: [Ingress]\n",
            ),
            expect: |c| c.dn != "x",
        },
        Step {
            what: "deny-all in x, DNS egress allowed",
            policies: np(
                "deny-all-but-dns",
                "x",
                "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  egress: [{ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]}]\n",
            ),
            expect: |c| c.sn != "x" && c.dn != "x",
        },
        Step {
            what: "podSelector is namespace-scoped (x/a from x/b)",
            policies: np(
                "a-from-b",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
            ),
            expect: |c| !c.to("x", "a") || c.from("x", "b"),
        },
        Step {
            what: "namespaceSelector (x/a from y)",
            policies: np(
                "a-from-y",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n",
            ),
            expect: |c| !c.to("x", "a") || c.sn == "y",
        },
        Step {
            what: "port rules, two stacked policies (80 from y, 81 from x/b)",
            policies: np(
                "a-80-from-y",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n",
            ) + &np(
                "a-81-from-b",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 81}]}]\n",
            ),
            // NetworkPolicy ports default to TCP: UDP reaches x/a from nobody.
            expect: |c| {
                !c.to("x", "a")
                    || (c.l4 == L4::Tcp
                        && ((c.port == 80 && c.sn == "y") || (c.port == 81 && c.from("x", "b"))))
            },
        },
        Step {
            what: "a named port (x/a: serve-81-tcp)",
            policies: np(
                "named",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: serve-81-tcp}]}]\n",
            ),
            expect: |c| !c.to("x", "a") || (c.l4 == L4::Tcp && c.port == 81),
        },
        Step {
            what: "egress deny-all in x",
            policies: np(
                "deny-egress",
                "x",
                "  podSelector: {}\n  policyTypes: [Egress]\n",
            ),
            expect: |c| c.sn != "x",
        },
        Step {
            what: "allow-all ingress beside a narrower policy (union)",
            policies: np(
                "narrow",
                "x",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
            ) + &np("allow-all", "x", "  podSelector: {}\n  ingress: [{}]\n"),
            expect: |_| true,
        },
        Step {
            what: "before update (y/c from y/a)",
            policies: np(
                "moving",
                "y",
                "  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]\n",
            ),
            expect: |c| !c.to("y", "c") || c.from("y", "a"),
        },
        Step {
            what: "after update (y/c from y/b)",
            policies: np(
                "moving",
                "y",
                "  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
            ),
            expect: |c| !c.to("y", "c") || c.from("y", "b"),
        },
        Step {
            what: "after delete",
            policies: String::new(),
            expect: |_| true,
        },
    ]
}

/// A TCP and UDP server on each port given as an argument, answering `ok`
/// (one accept/datagram at a time; the probes are short).
pub const SERVER_PY: &str = r#"
import selectors, socket, sys
sel = selectors.DefaultSelector()
for p in map(int, sys.argv[1:]):
    t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(('::', p)); t.listen(512); t.setblocking(False)
    sel.register(t, selectors.EVENT_READ, 't')
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(('::', p)); u.setblocking(False)
    sel.register(u, selectors.EVENT_READ, 'u')
while True:
    for k, _ in sel.select():
        s = k.fileobj
        try:
            if k.data == 't':
                c, _ = s.accept(); c.sendall(b'ok'); c.close()
            else:
                d, a = s.recvfrom(2048); s.sendto(b'ok', a)
        except OSError:
            pass
"#;

/// `MULTI_PY tcp|udp PORT DST...`: probes every destination at once,
/// prints one 1/0 per destination.
const MULTI_PY: &str = r#"
import socket, sys, threading
mode, port, dsts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
res = [0] * len(dsts)
def one(i, dst):
    fam = socket.AF_INET6 if ':' in dst else socket.AF_INET
    try:
        if mode == 'tcp':
            s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(0.8)
            s.connect((dst, port)); res[i] = int(s.recv(2) == b'ok')
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(0.8)
            s.sendto(b'hi', (dst, port)); d, a = s.recvfrom(64); res[i] = int(d == b'ok')
    except OSError:
        pass
ts = [threading.Thread(target=one, args=(i, d)) for i, d in enumerate(dsts)]
for t in ts: t.start()
for t in ts: t.join()
print(' '.join(map(str, res)))
"#;

/// TCP or UDP probes from network namespace `from` to every address in
/// `dsts` at once (0.8 s timeout each).
pub fn probe_many(from: &str, dsts: &[IpAddr], l4: L4, port: u16) -> Vec<bool> {
    let mode = match l4 {
        L4::Tcp => "tcp",
        L4::Udp => "udp",
    };
    let out = Command::new("ip")
        .args(["netns", "exec", from, "python3", "-c", MULTI_PY, mode])
        .arg(port.to_string())
        .args(dsts.iter().map(ToString::to_string))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run probes");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<bool> = text.split_whitespace().map(|x| x == "1").collect();
    assert_eq!(v.len(), dsts.len(), "probe output {text:?}");
    v
}

/// One model pod as a harness sees it.
pub struct ModelPod<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    /// Its network namespace (`ip netns` name).
    pub netns: &'a str,
    pub ip: IpAddr,
}

/// A cell whose probe disagreed with the step's expectation.
#[derive(Debug, Clone)]
pub struct Wrong {
    /// Indices into the pods given to [`wrong_cells`].
    pub src: usize,
    pub dst: usize,
    pub l4: L4,
    pub port: u16,
    pub got: bool,
}

impl Wrong {
    pub fn describe(&self, pods: &[ModelPod]) -> String {
        let (s, d) = (&pods[self.src], &pods[self.dst]);
        format!(
            "{}/{} -> {}/{} {:?}/{}: got {}, want {}",
            s.ns, s.name, d.ns, d.name, self.l4, self.port, self.got, !self.got
        )
    }
}

/// Probes every (src, dst) cell of `step` for every model service, one
/// prober per source pod in parallel; returns the cells that disagree.
pub fn wrong_cells(pods: &[ModelPod], step: &Step) -> Vec<Wrong> {
    let mut wrong = Vec::new();
    for (l4, port) in SERVICES {
        let rows: Vec<(usize, Vec<usize>, Vec<bool>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..pods.len())
                .map(|s| {
                    sc.spawn(move || {
                        let dsts: Vec<usize> = (0..pods.len()).filter(|d| *d != s).collect();
                        let ips: Vec<IpAddr> = dsts.iter().map(|d| pods[*d].ip).collect();
                        let got = probe_many(pods[s].netns, &ips, l4, port);
                        (s, dsts, got)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|j| j.join().expect("probe thread"))
                .collect()
        });
        for (s, dsts, got) in rows {
            for (d, got) in dsts.into_iter().zip(got) {
                let cell = Cell {
                    sn: pods[s].ns,
                    sp: pods[s].name,
                    dn: pods[d].ns,
                    dp: pods[d].name,
                    l4,
                    port,
                };
                if got != (step.expect)(&cell) {
                    wrong.push(Wrong {
                        src: s,
                        dst: d,
                        l4,
                        port,
                        got,
                    });
                }
            }
        }
    }
    wrong
}

/// `probe MODE DST PORT_OR_TYPE [SRC] [ICMP_ID]`: exit 0 when the peer
/// answered, 1 on timeout or refusal.
pub const PROBE_PY: &str = r#"
import socket, struct, sys, time
mode, dst, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != '-' else None
ident = int(sys.argv[5]) if len(sys.argv) > 5 else 0x4d42
v6 = ':' in dst
fam = socket.AF_INET6 if v6 else socket.AF_INET
T = 0.8
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
try:
    if mode == 'tcp':
        s = socket.socket(fam, socket.SOCK_STREAM)
        if src: s.bind((src, 0))
        s.settimeout(T); s.connect((dst, arg))
        s.settimeout(T); ok = s.recv(2) == b'ok'
        sys.exit(0 if ok else 1)
    if mode == 'udp':
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if src: s.bind((src, 0))
        s.settimeout(T); s.sendto(b'hi', (dst, arg))
        d, a = s.recvfrom(64)
        sys.exit(0 if d == b'ok' else 1)
    if mode == 'udp-refused':
        # An ICMP port unreachable must reach the sender: a connected UDP
        # socket reports it as ECONNREFUSED.
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if src: s.bind((src, 0))
        s.connect((dst, arg)); s.settimeout(T)
        s.send(b'hi')
        try:
            s.recv(64)
        except ConnectionRefusedError:
            sys.exit(0)
        sys.exit(1)
    if mode == 'icmp-error':
        # An unsolicited destination-unreachable quoting a flow nobody has.
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        inner = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 28, 1, 0, 64, 17, 0,
                            socket.inet_aton(dst), socket.inet_aton('192.0.2.99'))
        inner += struct.pack('!HHHH', 1234, arg, 8, 0)
        body = b'\0\0\0\0' + inner
        msg = struct.pack('!BBH', 3, 3, 0) + body
        msg = struct.pack('!BBH', 3, 3, csum(msg)) + body
        s.sendto(msg, (dst, 0))
        sys.exit(0)
    if mode == 'late-reply':
        # From port 40000 to dst:arg; the peer answers at once and again
        # after the delay in argv[5] ms (see LATE_PEER_PY); exit 0 when the
        # second answer arrives.
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((src or ('::' if v6 else '0.0.0.0'), 40000))
        s.settimeout(T); s.sendto(b'hi', (dst, arg))
        s.recvfrom(64)
        s.settimeout(ident / 1000.0 + 1.0)
        d, a = s.recvfrom(64)
        sys.exit(0 if d == b'again' else 1)
    if mode == 'icmp':
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        s = socket.socket(fam, socket.SOCK_RAW, proto)
        if src: s.bind((src, 0))
        typ = arg
        body = struct.pack('!HH', ident, 1) + b'membrane-policy-test' + (b'\0' * 12 if typ == 13 else b'')
        hdr = struct.pack('!BBH', typ, 0, 0) + body
        if not v6:
            hdr = struct.pack('!BBH', typ, 0, csum(hdr)) + body
        want = {8: 0, 13: 14, 128: 129, 0: 0, 129: 129}.get(typ, -1)
        s.sendto(hdr, (dst, 0))
        end = time.time() + T
        while time.time() < end:
            s.settimeout(max(0.01, end - time.time()))
            d, a = s.recvfrom(2048)
            if not v6: d = d[(d[0] & 0xf) * 4:]
            if a[0] != dst: continue
            if d[0] == want and struct.unpack('!H', d[4:6])[0] == ident:
                sys.exit(0)
        sys.exit(1)
except (OSError, socket.timeout):
    sys.exit(1)
"#;

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Tcp(u16),
    Udp(u16),
    /// UDP to a closed port: succeeds when the ICMP port unreachable
    /// comes back (an error related to the sender's flow).
    UdpRefused(u16),
    /// Sends an unsolicited IPv4 destination unreachable (always "succeeds").
    IcmpError(u16),
    /// UDP from port 40000 to a [`LATE_PEER_PY`] peer on this port whose
    /// second answer comes after the given milliseconds: succeeds when
    /// that late answer arrives.
    LateReply(u16, u16),
    /// ICMP or ICMPv6 (by destination family) of this type, with an id.
    Icmp(u8, u16),
}

/// Sends one probe from namespace `from` (optionally from address `src`).
pub fn probe(from: &str, dst: IpAddr, p: Probe, src: Option<IpAddr>) -> bool {
    let (mode, arg, id) = match p {
        Probe::Tcp(port) => ("tcp", port.to_string(), 0),
        Probe::Udp(port) => ("udp", port.to_string(), 0),
        Probe::UdpRefused(port) => ("udp-refused", port.to_string(), 0),
        Probe::IcmpError(port) => ("icmp-error", port.to_string(), 0),
        Probe::LateReply(port, ms) => ("late-reply", port.to_string(), ms),
        Probe::Icmp(t, id) => ("icmp", t.to_string(), id),
    };
    let src = src.map_or("-".to_string(), |s| s.to_string());
    Command::new("ip")
        .args(["netns", "exec", from, "python3", "-c", PROBE_PY, mode])
        .arg(dst.to_string())
        .arg(arg)
        .arg(src)
        .arg(id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
