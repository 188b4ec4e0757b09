//! membrane_lb with structured inputs (`arbitrary`): the Maglev table build
//! against a literal port of Cilium's algorithm, the `lb maglev` command's
//! argument parsing, and Service/EndpointSlice → frontend/backend translation.
//!
//! Properties beyond "never panics":
//! - `lookup_table` equals the reference (materialised permutations, as in
//!   Cilium's `computeLookupTable`) slot for slot, and does not depend on the
//!   input order of the backends;
//! - translated frontends are unique and sorted, backends are sorted, unique,
//!   of the frontend's family and protocol, and each frontend's Maglev table
//!   only names selectable backends.
#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
    ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use libfuzzer_sys::fuzz_target;
use membrane_lb::maglev::{self, BackendState, MaglevBackend, MaglevConfig, Protocol};
use membrane_lb::service::{
    ANNOTATION_LB_ALGORITHM, BackendOverrides, L3n4Addr, LABEL_SERVICE_NAME, LbConfig, translate,
};
use membrane_lb::{MaglevArgs, OutputFormat, maglev_command};

/// Small primes keep the reference (N×M permutations) cheap; the larger ones
/// are Cilium's sizes.
const SIZES: [u32; 8] = [2, 3, 5, 7, 13, 251, 509, 1021];

#[derive(Arbitrary, Debug)]
struct Input {
    maglev: MaglevIn,
    command: CommandIn,
    services: Vec<SvcIn>,
    slices: Vec<SliceIn>,
    overrides: Vec<(IpIn, u16, ProtoIn, StateIn)>,
    node_addresses: Vec<IpIn>,
    maglev_default: bool,
}

#[derive(Arbitrary, Debug)]
struct MaglevIn {
    size: u8,
    seed: u32,
    backends: Vec<BackendIn>,
    rotate: u8,
}

#[derive(Arbitrary, Debug)]
struct BackendIn {
    addr: IpIn,
    port: u16,
    proto: ProtoIn,
    cluster_id: u8,
    weight: WeightIn,
    state: StateIn,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum WeightIn {
    Default,
    Zero,
    One,
    Any(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ProtoIn {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum StateIn {
    Active,
    Terminating,
    Quarantined,
    Maintenance,
}

/// Mostly a few addresses, so services, slices and overrides collide.
#[derive(Arbitrary, Debug, Clone)]
enum IpIn {
    V4(u8),
    V6(u8),
    AnyV4([u8; 4]),
    AnyV6([u16; 8]),
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct CommandIn {
    m: u32,
    seed: Option<String>,
    proto: ProtoIn,
    cluster_id: u32,
    rle: bool,
    backends: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct SvcIn {
    namespace: u8,
    name: u8,
    ty: u8,
    cluster_ips: Vec<IpIn>,
    external_ips: Vec<IpIn>,
    lb_ips: Vec<Option<IpIn>>,
    ports: Vec<PortIn>,
    algorithm: Option<String>,
    affinity: Option<Option<i32>>,
}

#[derive(Arbitrary, Debug)]
struct PortIn {
    name: Option<u8>,
    port: PortNum,
    proto: Option<ProtoText>,
    node_port: Option<PortNum>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PortNum {
    Http,
    Small(u8),
    Any(i32),
}

#[derive(Arbitrary, Debug)]
enum ProtoText {
    Known(ProtoIn),
    Lower(ProtoIn),
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct SliceIn {
    namespace: u8,
    service: Option<u8>,
    family: u8,
    ports: Vec<PortIn>,
    endpoints: Vec<EndpointIn>,
}

#[derive(Arbitrary, Debug)]
struct EndpointIn {
    addresses: Vec<IpIn>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

fn ip(i: &IpIn) -> Option<IpAddr> {
    match i {
        IpIn::V4(n) => Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n % 8))),
        IpIn::V6(n) => Some(IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            0,
            u16::from(n % 8),
        ))),
        IpIn::AnyV4(o) => Some(IpAddr::from(*o)),
        IpIn::AnyV6(s) => Some(IpAddr::from(*s)),
        IpIn::Text(s) => s.parse().ok(),
    }
}

fn ip_text(i: &IpIn) -> String {
    match i {
        IpIn::Text(s) => s.clone(),
        other => ip(other).map(|a| a.to_string()).unwrap_or_default(),
    }
}

fn proto(p: ProtoIn) -> Protocol {
    match p {
        ProtoIn::Tcp => Protocol::Tcp,
        ProtoIn::Udp => Protocol::Udp,
        ProtoIn::Sctp => Protocol::Sctp,
    }
}

fn state(s: StateIn) -> BackendState {
    match s {
        StateIn::Active => BackendState::Active,
        StateIn::Terminating => BackendState::Terminating,
        StateIn::Quarantined => BackendState::Quarantined,
        StateIn::Maintenance => BackendState::Maintenance,
    }
}

fn port(p: PortNum) -> i32 {
    match p {
        PortNum::Http => 80,
        PortNum::Small(n) => i32::from(n % 4) + 8080,
        PortNum::Any(n) => n,
    }
}

fn proto_text(p: &ProtoText) -> String {
    match p {
        ProtoText::Known(p) => proto(*p).as_str().to_owned(),
        ProtoText::Lower(p) => proto(*p).as_str().to_ascii_lowercase(),
        ProtoText::Text(s) => s.clone(),
    }
}

fn small_name(n: u8) -> String {
    ["default", "a", "b", "kube-system"][usize::from(n % 4)].to_owned()
}

/// Cilium's `computeLookupTable` with the permutations materialised.
fn reference(m: u32, seed: u32, backends: &[MaglevBackend]) -> Vec<u32> {
    let mut infos: Vec<(String, &MaglevBackend)> =
        backends.iter().map(|b| (b.hash_string(), b)).collect();
    infos.sort_by(|a, b| a.0.cmp(&b.0));
    let (m, mu, l) = (u64::from(m), m as usize, infos.len());
    let weight_sum: u64 = infos.iter().map(|(_, b)| u64::from(b.weight)).sum();
    let mut counter: Vec<f64> = infos
        .iter()
        .map(|(_, b)| f64::from(b.weight) / l as f64)
        .collect();
    let weights_used = weight_sum / l as u64 > 1;
    let mut perm = vec![0u64; l * mu];
    for (i, (s, _)) in infos.iter().enumerate() {
        let (offset, skip) = maglev::offset_and_skip(s.as_bytes(), m as u32, seed);
        perm[i * mu] = u64::from(offset);
        for j in 1..mu {
            perm[i * mu + j] = (perm[i * mu + j - 1] + u64::from(skip)) % m;
        }
    }
    let mut next = vec![0usize; l];
    let mut entry: Vec<Option<u32>> = vec![None; mu];
    for n in 0..m {
        let mut i = (n as usize) % l;
        loop {
            let b = infos[i].1;
            if weights_used {
                if (n + 1) * u64::from(b.weight) < counter[i] as u64 {
                    i = (i + 1) % l;
                    continue;
                }
                counter[i] += weight_sum as f64;
            }
            let mut c = perm[i * mu + next[i]] as usize;
            while entry[c].is_some() {
                next[i] += 1;
                c = perm[i * mu + next[i]] as usize;
            }
            entry[c] = Some(b.id);
            next[i] += 1;
            break;
        }
    }
    entry
        .into_iter()
        .map(|e| e.expect("every slot filled"))
        .collect()
}

fn check_maglev(input: &MaglevIn) {
    // Now and then one of Cilium's larger sizes (up to 131071 slots).
    let large = input.size >= 246;
    let m = if large {
        maglev::ALLOWED_M[usize::from(input.size - 246) % maglev::ALLOWED_M.len()]
    } else {
        SIZES[usize::from(input.size) % SIZES.len()]
    };
    let max_backends = if large { 8 } else { 32 };
    let cfg = MaglevConfig::new(m, input.seed).expect("prime");
    let mut seen = HashSet::new();
    let mut backends = Vec::new();
    for (i, b) in input.backends.iter().take(max_backends).enumerate() {
        let Some(addr) = ip(&b.addr) else { continue };
        let mb = MaglevBackend {
            addr,
            port: b.port,
            proto: proto(b.proto),
            cluster_id: u32::from(b.cluster_id % 4),
            weight: match b.weight {
                WeightIn::Default => maglev::DEFAULT_BACKEND_WEIGHT,
                WeightIn::Zero => 0,
                WeightIn::One => 1,
                WeightIn::Any(w) => w,
            },
            state: state(b.state),
            id: i as u32 + 1,
        };
        // Cilium keys backends by address: no two share a hash string.
        if seen.insert(mb.hash_string()) {
            backends.push(mb);
        }
    }
    let table = maglev::lookup_table(&cfg, &backends);
    if backends.is_empty() {
        assert!(table.is_empty());
    } else {
        assert_eq!(
            table,
            reference(m, input.seed, &backends),
            "differs from Cilium's"
        );
        let mut rotated = backends.clone();
        let k = usize::from(input.rotate) % rotated.len();
        rotated.rotate_left(k);
        assert_eq!(
            table,
            maglev::lookup_table(&cfg, &rotated),
            "depends on input order"
        );
    }
    let built = maglev::build_table(&cfg, &backends);
    let participants: HashSet<u32> = maglev::participants(&backends)
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(
        built.len(),
        if participants.is_empty() {
            0
        } else {
            m as usize
        }
    );
    assert!(built.iter().all(|id| participants.contains(id)));
    let _ = maglev::rle(&built);
}

fn check_command(c: &CommandIn) {
    let args = MaglevArgs {
        // Cilium's three smallest sizes (the table is printed in full), or
        // anything, which is rejected unless it is one of the others.
        m: if c.m.is_multiple_of(4) {
            c.m
        } else {
            maglev::ALLOWED_M[(c.m % 3) as usize]
        },
        seed: c.seed.clone(),
        proto: proto(c.proto),
        cluster_id: c.cluster_id,
        format: if c.rle {
            OutputFormat::Rle
        } else {
            OutputFormat::List
        },
        backends: c.backends.iter().take(16).cloned().collect(),
    };
    if maglev::ALLOWED_M.contains(&args.m) && args.m > 1021 {
        return;
    }
    if let Ok(out) = maglev_command(args.clone()) {
        assert!(out.ends_with('\n'));
        if args.format == OutputFormat::List {
            assert_eq!(out.lines().count(), args.m as usize);
        }
    }
    let _ = maglev::seed_from_b64(c.seed.as_deref().unwrap_or_default());
}

fn service(s: &SvcIn) -> Service {
    let ty = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName", ""][usize::from(s.ty % 5)];
    let mut annotations = BTreeMap::new();
    if let Some(a) = &s.algorithm {
        annotations.insert(ANNOTATION_LB_ALGORITHM.to_owned(), a.clone());
    }
    let ports: Vec<ServicePort> = s
        .ports
        .iter()
        .take(4)
        .map(|p| ServicePort {
            name: p.name.map(small_name),
            port: port(p.port),
            protocol: p.proto.as_ref().map(proto_text),
            node_port: p.node_port.map(port),
            ..Default::default()
        })
        .collect();
    Service {
        metadata: ObjectMeta {
            namespace: Some(small_name(s.namespace)),
            name: Some(small_name(s.name)),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: (!ty.is_empty()).then(|| ty.to_owned()),
            cluster_ips: Some(s.cluster_ips.iter().take(3).map(ip_text).collect()),
            external_ips: Some(s.external_ips.iter().take(3).map(ip_text).collect()),
            ports: Some(ports),
            session_affinity: s.affinity.map(|_| "ClientIP".to_owned()),
            session_affinity_config: s.affinity.flatten().map(|t| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(t),
                }),
            }),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    s.lb_ips
                        .iter()
                        .take(3)
                        .map(|i| LoadBalancerIngress {
                            ip: i.as_ref().map(ip_text),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        }),
    }
}

fn slice(s: &SliceIn, i: usize) -> EndpointSlice {
    let labels = s
        .service
        .map(|n| BTreeMap::from([(LABEL_SERVICE_NAME.to_owned(), small_name(n))]));
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(small_name(s.namespace)),
            name: Some(format!("slice-{i}")),
            labels,
            ..Default::default()
        },
        address_type: ["IPv4", "IPv6", "FQDN"][usize::from(s.family % 3)].to_owned(),
        ports: Some(
            s.ports
                .iter()
                .take(4)
                .map(|p| EndpointPort {
                    name: p.name.map(small_name),
                    port: Some(port(p.port)),
                    protocol: p.proto.as_ref().map(proto_text),
                    ..Default::default()
                })
                .collect(),
        ),
        endpoints: Some(
            s.endpoints
                .iter()
                .take(8)
                .map(|e| Endpoint {
                    addresses: e.addresses.iter().take(4).map(ip_text).collect(),
                    conditions: Some(EndpointConditions {
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

fn check_translate(input: &Input) {
    let services: Vec<Service> = input.services.iter().take(6).map(service).collect();
    let slices: Vec<EndpointSlice> = input
        .slices
        .iter()
        .take(6)
        .enumerate()
        .map(|(i, s)| slice(s, i))
        .collect();
    let mut overrides = BackendOverrides::new();
    for (a, p, pr, st) in input.overrides.iter().take(8) {
        if let Some(a) = ip(a) {
            overrides.insert(L3n4Addr::new(a, *p, proto(*pr)), state(*st));
        }
    }
    let cfg = LbConfig {
        default_algorithm: if input.maglev_default {
            membrane_lb::service::Algorithm::Maglev
        } else {
            membrane_lb::service::Algorithm::Random
        },
        node_addresses: input.node_addresses.iter().take(3).filter_map(ip).collect(),
    };
    let t = translate(&services, &slices, &cfg, &overrides);
    let maglev_cfg = MaglevConfig::new(251, 7).expect("prime");
    for pair in t.state.services.windows(2) {
        assert!(
            pair[0].frontend < pair[1].frontend,
            "frontends not unique and sorted"
        );
    }
    for e in &t.state.services {
        assert_eq!(t.state.get(&e.frontend), Some(e));
        for pair in e.backends.windows(2) {
            assert!(
                pair[0].addr < pair[1].addr,
                "backends not unique and sorted"
            );
        }
        for b in &e.backends {
            assert_eq!(b.addr.addr.is_ipv6(), e.frontend.addr.is_ipv6());
            assert_eq!(b.addr.proto, e.frontend.proto);
            assert_ne!(b.addr.port, 0);
        }
        let ids: Vec<L3n4Addr> = e.backends.iter().map(|b| b.addr).collect();
        let id = |a: &L3n4Addr| ids.iter().position(|x| x == a).map_or(0, |p| p as u32 + 1);
        let selectable: HashSet<u32> = e.selectable().iter().map(|b| id(&b.addr)).collect();
        let table = e.maglev_table(&maglev_cfg, id);
        assert_eq!(table.len(), if selectable.is_empty() { 0 } else { 251 });
        assert!(table.iter().all(|i| selectable.contains(i)));
    }
    for err in &t.errors {
        assert!(!err.field.is_empty());
    }
}

fuzz_target!(|input: Input| {
    check_maglev(&input.maglev);
    check_command(&input.command);
    check_translate(&input);
});
