//! The rule model and its translation from CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy and Kubernetes NetworkPolicy.

use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use membrane_crds::{
    CidrRule, CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, IcmpRule, PolicyRule,
    PortProtocol,
};

use crate::PolicyError;
use crate::identity::Reserved;
use crate::labels::{
    LabelKey, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL, Requirement, Selector,
};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

/// Which policy, which rule list, which item: what `trace` reports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
    /// Index into `spec` + `specs` (0 = `spec`).
    pub spec: usize,
    /// `ingress`, `ingressDeny`, `egress` or `egressDeny`.
    pub section: &'static str,
    pub index: usize,
}

impl RuleRef {
    pub fn policy(&self) -> String {
        let kind = match self.kind {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        };
        match &self.namespace {
            Some(ns) => format!("{kind} {ns}/{}", self.name),
            None => format!("{kind} {}", self.name),
        }
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spec = if self.kind == PolicyKind::NetworkPolicy || self.spec == 0 {
            "spec".to_string()
        } else {
            format!("specs[{}]", self.spec - 1)
        };
        write!(
            f,
            "{} {spec}.{}[{}]",
            self.policy(),
            self.section,
            self.index
        )
    }
}

/// A set of peers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Every identity, inside and outside the cluster.
    All,
    /// Identities whose labels match.
    Endpoints(Selector),
    /// One reserved identity.
    Reserved(Reserved),
    /// Every identity of the cluster (endpoints and the reserved in-cluster ones).
    Cluster,
    /// World identities and CIDR identities (of one family, if given).
    World(Option<u8>),
    /// Addresses outside the cluster in `net` but in none of `except`.
    Cidr { net: IpNet, except: Vec<IpNet> },
}

/// One L4 match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum L4 {
    /// Protocol numbers and an inclusive port range.
    Ports { protos: Vec<u8>, lo: u16, hi: u16 },
    /// A named port of the destination endpoint.
    Named { protos: Vec<u8>, name: String },
    /// An ICMP (proto 1) or ICMPv6 (proto 58) type.
    Icmp { proto: u8, icmp_type: u8 },
}

/// One allow or deny item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub origin: RuleRef,
    /// Endpoints the rule applies to.
    pub subject: Selector,
    pub direction: Direction,
    pub deny: bool,
    pub peers: Vec<Peer>,
    /// `None`: every protocol and port (an L3-only rule).
    pub l4: Option<Vec<L4>>,
}

/// "A rule selecting these endpoints has this direction": default deny
/// unless the rule turned it off (`enableDefaultDeny`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Enforcement {
    pub origin: RuleRef,
    pub subject: Selector,
    pub direction: Direction,
    pub default_deny: bool,
}

/// Translated policies, ready to compile.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// Shared: a set merged from per-object translations (the agent) or
    /// copied for a change costs a pointer per rule, and a rule that did
    /// not change is the same allocation before and after.
    pub rules: Vec<Arc<Rule>>,
    pub enforcements: Vec<Enforcement>,
    /// Parts that were not translated; each names object and field. Parts
    /// in error never widen what is allowed (see [`Translator`]).
    pub errors: Vec<PolicyError>,
}

impl PolicySet {
    pub fn add_cnp(&mut self, p: &CiliumNetworkPolicy) {
        let ns = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = p.metadata.name.clone().unwrap_or_default();
        for (i, r) in p.rules().into_iter().enumerate() {
            let t = Translator {
                kind: PolicyKind::CiliumNetworkPolicy,
                namespace: Some(ns.clone()),
                name: name.clone(),
                spec: i,
            };
            t.rule(r, self);
        }
    }

    pub fn add_ccnp(&mut self, p: &CiliumClusterwideNetworkPolicy) {
        let name = p.metadata.name.clone().unwrap_or_default();
        for (i, r) in p.rules().into_iter().enumerate() {
            let t = Translator {
                kind: PolicyKind::CiliumClusterwideNetworkPolicy,
                namespace: None,
                name: name.clone(),
                spec: i,
            };
            t.rule(r, self);
        }
    }

    pub fn add_network_policy(&mut self, p: &NetworkPolicy) {
        translate_np(p, self);
    }
}

/// Translates one rule of one policy.
struct Translator {
    kind: PolicyKind,
    namespace: Option<String>,
    name: String,
    spec: usize,
}

/// The peer and port fields shared by the four rule lists.
struct Item<'a> {
    endpoints: Option<&'a [LabelSelector]>,
    requires: Option<&'a [LabelSelector]>,
    cidr: Option<&'a [String]>,
    cidr_set: Option<&'a [CidrRule]>,
    entities: Option<&'a [String]>,
    /// Peer fields Membrane cannot resolve (groups, FQDNs, services,
    /// nodes): present means "these peers", resolved to none.
    unresolvable: Vec<&'static str>,
    ports: Option<Vec<&'a [PortProtocol]>>,
    icmps: Option<&'a [IcmpRule]>,
    /// Set when a port rule carries L7 rules Membrane cannot enforce.
    l7: bool,
}

impl Translator {
    fn origin(&self, section: &'static str, index: usize) -> RuleRef {
        RuleRef {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            spec: self.spec,
            section,
            index,
        }
    }

    fn object(&self) -> String {
        let o = self.origin("", 0);
        o.policy()
    }

    fn field(&self) -> String {
        if self.spec == 0 {
            "spec".into()
        } else {
            format!("specs[{}]", self.spec - 1)
        }
    }

    fn err(&self, field: String, msg: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            object: self.object(),
            field,
            message: msg.into(),
        }
    }

    /// A selector of this policy: a CNP's selectors are confined to its
    /// namespace unless they name one (or a reserved label).
    fn peer_selector(&self, s: &LabelSelector, field: &str) -> Result<Selector, PolicyError> {
        let sel = Selector::from_k8s(s, field).map_err(|e| e.in_object(&self.object()))?;
        Ok(match (&self.namespace, self.kind) {
            (Some(ns), PolicyKind::CiliumNetworkPolicy)
                if !sel.mentions(POD_NAMESPACE_LABEL) && !sel.mentions_reserved() =>
            {
                sel.in_namespace(ns)
            }
            // A CCNP's `{}` peer means every pod of the cluster, not every
            // identity (cilium/cilium#12890).
            (_, PolicyKind::CiliumClusterwideNetworkPolicy) if sel.0.is_empty() => {
                sel.and(Requirement::Exists(LabelKey::k8s(POD_NAMESPACE_LABEL)))
            }
            _ => sel,
        })
    }

    fn rule(&self, r: &PolicyRule, out: &mut PolicySet) {
        let f = self.field();
        let subject = match &r.endpoint_selector {
            Some(s) => {
                let sel = match Selector::from_k8s(s, &format!("{f}.endpointSelector")) {
                    Ok(s) => s,
                    Err(e) => {
                        out.errors.push(e.in_object(&self.object()));
                        return;
                    }
                };
                match &self.namespace {
                    Some(ns) if self.kind == PolicyKind::CiliumNetworkPolicy => {
                        sel.in_namespace(ns)
                    }
                    _ => sel,
                }
            }
            None => {
                if r.node_selector.is_some() {
                    out.errors.push(self.err(
                        format!("{f}.nodeSelector"),
                        "host policies (nodeSelector) are not enforced yet; rule ignored",
                    ));
                } else {
                    out.errors.push(self.err(
                        format!("{f}.endpointSelector"),
                        "missing (one of endpointSelector or nodeSelector is required)",
                    ));
                }
                return;
            }
        };
        let dd = r.enable_default_deny.as_ref();
        let dd_in = dd.and_then(|d| d.ingress).unwrap_or(true);
        let dd_eg = dd.and_then(|d| d.egress).unwrap_or(true);
        let has_in = r.ingress.as_ref().is_some_and(|v| !v.is_empty())
            || r.ingress_deny.as_ref().is_some_and(|v| !v.is_empty());
        let has_eg = r.egress.as_ref().is_some_and(|v| !v.is_empty())
            || r.egress_deny.as_ref().is_some_and(|v| !v.is_empty());
        if has_in {
            out.enforcements.push(Enforcement {
                origin: self.origin("ingress", 0),
                subject: subject.clone(),
                direction: Direction::Ingress,
                default_deny: dd_in,
            });
        }
        if has_eg {
            out.enforcements.push(Enforcement {
                origin: self.origin("egress", 0),
                subject: subject.clone(),
                direction: Direction::Egress,
                default_deny: dd_eg,
            });
        }
        for (i, x) in r.ingress.iter().flatten().enumerate() {
            let mut unres = Vec::new();
            if x.from_groups.is_some() {
                unres.push("fromGroups");
            }
            if x.from_nodes.is_some() {
                unres.push("fromNodes");
            }
            let item = Item {
                endpoints: x.from_endpoints.as_deref(),
                requires: x.from_requires.as_deref(),
                cidr: x.from_cidr.as_deref(),
                cidr_set: x.from_cidr_set.as_deref(),
                entities: x.from_entities.as_deref(),
                unresolvable: unres,
                ports: x
                    .to_ports
                    .as_ref()
                    .map(|v| v.iter().map(|p| p.ports.as_slice()).collect()),
                icmps: x.icmps.as_deref(),
                l7: x.to_ports.iter().flatten().any(needs_proxy),
            };
            self.item(item, &subject, Direction::Ingress, false, "ingress", i, out);
        }
        for (i, x) in r.ingress_deny.iter().flatten().enumerate() {
            let mut unres = Vec::new();
            if x.from_groups.is_some() {
                unres.push("fromGroups");
            }
            if x.from_nodes.is_some() {
                unres.push("fromNodes");
            }
            let item = Item {
                endpoints: x.from_endpoints.as_deref(),
                requires: x.from_requires.as_deref(),
                cidr: x.from_cidr.as_deref(),
                cidr_set: x.from_cidr_set.as_deref(),
                entities: x.from_entities.as_deref(),
                unresolvable: unres,
                ports: x
                    .to_ports
                    .as_ref()
                    .map(|v| v.iter().map(|p| p.ports.as_slice()).collect()),
                icmps: x.icmps.as_deref(),
                l7: false,
            };
            self.item(
                item,
                &subject,
                Direction::Ingress,
                true,
                "ingressDeny",
                i,
                out,
            );
        }
        for (i, x) in r.egress.iter().flatten().enumerate() {
            let mut unres = Vec::new();
            if x.to_groups.is_some() {
                unres.push("toGroups");
            }
            if x.to_fqdns.is_some() {
                unres.push("toFQDNs");
            }
            if x.to_services.is_some() {
                unres.push("toServices");
            }
            if x.to_nodes.is_some() {
                unres.push("toNodes");
            }
            let item = Item {
                endpoints: x.to_endpoints.as_deref(),
                requires: x.to_requires.as_deref(),
                cidr: x.to_cidr.as_deref(),
                cidr_set: x.to_cidr_set.as_deref(),
                entities: x.to_entities.as_deref(),
                unresolvable: unres,
                ports: x
                    .to_ports
                    .as_ref()
                    .map(|v| v.iter().map(|p| p.ports.as_slice()).collect()),
                icmps: x.icmps.as_deref(),
                l7: x.to_ports.iter().flatten().any(needs_proxy),
            };
            self.item(item, &subject, Direction::Egress, false, "egress", i, out);
        }
        for (i, x) in r.egress_deny.iter().flatten().enumerate() {
            let mut unres = Vec::new();
            if x.to_groups.is_some() {
                unres.push("toGroups");
            }
            if x.to_services.is_some() {
                unres.push("toServices");
            }
            if x.to_nodes.is_some() {
                unres.push("toNodes");
            }
            let item = Item {
                endpoints: x.to_endpoints.as_deref(),
                requires: x.to_requires.as_deref(),
                cidr: x.to_cidr.as_deref(),
                cidr_set: x.to_cidr_set.as_deref(),
                entities: x.to_entities.as_deref(),
                unresolvable: unres,
                ports: x
                    .to_ports
                    .as_ref()
                    .map(|v| v.iter().map(|p| p.ports.as_slice()).collect()),
                icmps: x.icmps.as_deref(),
                l7: false,
            };
            self.item(
                item,
                &subject,
                Direction::Egress,
                true,
                "egressDeny",
                i,
                out,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn item(
        &self,
        x: Item<'_>,
        subject: &Selector,
        direction: Direction,
        deny: bool,
        section: &'static str,
        index: usize,
        out: &mut PolicySet,
    ) {
        let origin = self.origin(section, index);
        let base = format!("{}.{section}[{index}]", self.field());
        let res = self.item_inner(&x, &base, direction);
        let (peers, l4) = match res {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(e);
                if deny {
                    // A deny we cannot read denies everything rather than
                    // nothing: a broken deny must not open traffic.
                    (vec![Peer::All], None)
                } else {
                    return;
                }
            }
        };
        for f in &x.unresolvable {
            out.errors.push(self.err(
                format!("{base}.{f}"),
                "not supported by Membrane yet; these peers select nothing",
            ));
        }
        if x.l7 {
            out.errors.push(self.err(
                format!("{base}.toPorts"),
                "L7 rules are not enforced by Membrane yet; the port rule allows nothing",
            ));
            return;
        }
        out.rules.push(Arc::new(Rule {
            origin,
            subject: subject.clone(),
            direction,
            deny,
            peers,
            l4,
        }));
    }

    fn item_inner(
        &self,
        x: &Item<'_>,
        base: &str,
        direction: Direction,
    ) -> Result<(Vec<Peer>, Option<Vec<L4>>), PolicyError> {
        let pfx = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        let mut peers = Vec::new();
        let mut any_field = !x.unresolvable.is_empty();
        if let Some(eps) = x.endpoints {
            any_field = true;
            for (i, s) in eps.iter().enumerate() {
                peers.push(Peer::Endpoints(
                    self.peer_selector(s, &format!("{base}.{pfx}Endpoints[{i}]"))?,
                ));
            }
        }
        if let Some(req) = x.requires
            && !req.is_empty()
        {
            return Err(self.err(
                format!("{base}.{pfx}Requires"),
                "deprecated in Cilium and not supported",
            ));
        }
        if let Some(c) = x.cidr {
            any_field = true;
            for (i, s) in c.iter().enumerate() {
                let net =
                    parse_cidr(s).map_err(|m| self.err(format!("{base}.{pfx}CIDR[{i}]"), m))?;
                peers.push(Peer::Cidr {
                    net,
                    except: Vec::new(),
                });
            }
        }
        if let Some(c) = x.cidr_set {
            any_field = true;
            for (i, r) in c.iter().enumerate() {
                let f = format!("{base}.{pfx}CIDRSet[{i}]");
                let Some(cidr) = &r.cidr else {
                    // A CIDR group we cannot resolve selects nothing.
                    continue;
                };
                let net = parse_cidr(cidr).map_err(|m| self.err(format!("{f}.cidr"), m))?;
                let mut except = Vec::new();
                for (j, e) in r.except.iter().enumerate() {
                    let en = parse_cidr(e).map_err(|m| self.err(format!("{f}.except[{j}]"), m))?;
                    if !net.contains(&en) {
                        return Err(self.err(
                            format!("{f}.except[{j}]"),
                            format!("{en} is not inside {net}"),
                        ));
                    }
                    except.push(en);
                }
                peers.push(Peer::Cidr { net, except });
            }
        }
        if let Some(ents) = x.entities {
            any_field = true;
            for (i, e) in ents.iter().enumerate() {
                if let Some(p) = entity(e) {
                    peers.extend(p);
                } else {
                    return Err(self.err(
                        format!("{base}.{pfx}Entities[{i}]"),
                        format!("unknown entity {e:?}"),
                    ));
                }
            }
        }
        let mut l4: Option<Vec<L4>> = None;
        if let Some(prs) = &x.ports {
            let v = l4.get_or_insert_with(Vec::new);
            for (i, ports) in prs.iter().enumerate() {
                if ports.is_empty() {
                    // `toPorts: [{}]` or only L7: every port.
                    v.push(L4::Ports {
                        protos: vec![PROTO_TCP, PROTO_UDP, PROTO_SCTP],
                        lo: 0,
                        hi: u16::MAX,
                    });
                }
                for (j, p) in ports.iter().enumerate() {
                    let f = format!("{base}.toPorts[{i}].ports[{j}]");
                    v.push(self.port(p, &f)?);
                }
            }
        }
        if let Some(icmps) = x.icmps {
            let v = l4.get_or_insert_with(Vec::new);
            for (i, r) in icmps.iter().enumerate() {
                for (j, f) in r.fields.iter().enumerate() {
                    let field = format!("{base}.icmps[{i}].fields[{j}]");
                    let (proto, v6) = match f.family.as_deref().unwrap_or("IPv4") {
                        "IPv4" => (PROTO_ICMP, false),
                        "IPv6" => (PROTO_ICMPV6, true),
                        o => {
                            return Err(self.err(
                                format!("{field}.family"),
                                format!("{o:?} is not IPv4 or IPv6"),
                            ));
                        }
                    };
                    let t = icmp_type(&f.icmp_type, v6)
                        .map_err(|m| self.err(format!("{field}.type"), m))?;
                    v.push(L4::Icmp {
                        proto,
                        icmp_type: t,
                    });
                }
            }
        }
        if !any_field {
            // No peer field: with an L4 part, every peer (Cilium's L4-only
            // rule); without one (`ingress: [{}]`), nobody.
            if l4.is_some() {
                peers.push(Peer::All);
            }
        }
        Ok((peers, l4))
    }

    fn port(&self, p: &PortProtocol, field: &str) -> Result<L4, PolicyError> {
        let protos = match p
            .protocol
            .as_deref()
            .unwrap_or("ANY")
            .to_ascii_uppercase()
            .as_str()
        {
            "TCP" => vec![PROTO_TCP],
            "UDP" => vec![PROTO_UDP],
            "SCTP" => vec![PROTO_SCTP],
            "ANY" => vec![PROTO_TCP, PROTO_UDP, PROTO_SCTP],
            o => {
                return Err(self.err(
                    format!("{field}.protocol"),
                    format!("{o:?} is not TCP, UDP, SCTP or ANY"),
                ));
            }
        };
        port_range(&p.port, p.end_port, protos).map_err(|m| self.err(format!("{field}.port"), m))
    }
}

fn port_range(port: &str, end: Option<i32>, protos: Vec<u8>) -> Result<L4, String> {
    if port.is_empty() {
        return Ok(L4::Ports {
            protos,
            lo: 0,
            hi: u16::MAX,
        });
    }
    match port.parse::<u32>() {
        Ok(0) => Ok(L4::Ports {
            protos,
            lo: 0,
            hi: u16::MAX,
        }),
        Ok(n) if n <= u16::MAX as u32 => {
            let lo = n as u16;
            let hi = match end {
                None | Some(0) => lo,
                Some(e) if e >= n as i32 && e <= u16::MAX as i32 => e as u16,
                Some(e) => return Err(format!("endPort {e} is not in {n}..=65535")),
            };
            Ok(L4::Ports { protos, lo, hi })
        }
        Ok(n) => Err(format!("port {n} is out of range")),
        Err(_) => {
            let valid = !port.is_empty()
                && port.len() <= 15
                && port
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && port.chars().any(|c| c.is_ascii_lowercase());
            if !valid {
                return Err(format!("{port:?} is neither a port number nor a port name"));
            }
            Ok(L4::Named {
                protos,
                name: port.to_string(),
            })
        }
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    // Cilium accepts a bare address as a host prefix.
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not a CIDR"))
}

/// A port rule Membrane cannot enforce in L3/L4: L7 rules, SNI, TLS
/// interception or a listener all need the proxy.
fn needs_proxy(p: &membrane_crds::PortRule) -> bool {
    p.rules.is_some()
        || p.listener.is_some()
        || !p.server_names.is_empty()
        || p.terminating_tls.is_some()
        || p.originating_tls.is_some()
}

/// Cilium's entities.
pub fn entity(name: &str) -> Option<Vec<Peer>> {
    Some(match name {
        "all" => vec![Peer::All],
        "world" => vec![Peer::World(None)],
        "world-ipv4" => vec![Peer::World(Some(4))],
        "world-ipv6" => vec![Peer::World(Some(6))],
        "cluster" => vec![Peer::Cluster],
        "host" => vec![Peer::Reserved(Reserved::Host)],
        "remote-node" => vec![Peer::Reserved(Reserved::RemoteNode)],
        "kube-apiserver" => vec![Peer::Reserved(Reserved::KubeApiserver)],
        "ingress" => vec![Peer::Reserved(Reserved::Ingress)],
        "health" => vec![Peer::Reserved(Reserved::Health)],
        "init" => vec![Peer::Reserved(Reserved::Init)],
        "unmanaged" => vec![Peer::Reserved(Reserved::Unmanaged)],
        "none" => vec![],
        _ => return None,
    })
}

const ICMP4_NAMES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

const ICMP6_NAMES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

/// An ICMP type by number or by Cilium's name for the family.
pub fn icmp_type(t: &IntOrString, v6: bool) -> Result<u8, String> {
    let names = if v6 { ICMP6_NAMES } else { ICMP4_NAMES };
    match t {
        IntOrString::Int(n) => u8::try_from(*n).map_err(|_| format!("type {n} is not 0..=255")),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<u8>() {
                return Ok(n);
            }
            names
                .iter()
                .find(|(k, _)| k == s)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    format!(
                        "unknown {} type name {s:?}",
                        if v6 { "ICMPv6" } else { "ICMP" }
                    )
                })
        }
    }
}

/// Kubernetes NetworkPolicy, with Cilium's translation.
fn translate_np(p: &NetworkPolicy, out: &mut PolicySet) {
    let ns = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = p.metadata.name.clone().unwrap_or_default();
    let object = format!("NetworkPolicy {ns}/{name}");
    let origin = |section: &'static str, index: usize| RuleRef {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some(ns.clone()),
        name: name.clone(),
        spec: 0,
        section,
        index,
    };
    let err = |field: String, message: String| PolicyError::Invalid {
        object: object.clone(),
        field,
        message,
    };
    let Some(spec) = &p.spec else {
        return;
    };
    let subject = match Selector::from_k8s(
        &spec.pod_selector.clone().unwrap_or_default(),
        "spec.podSelector",
    ) {
        Ok(s) => s.in_namespace(&ns),
        Err(e) => {
            out.errors.push(e.in_object(&object));
            return;
        }
    };
    let types: Vec<String> = match &spec.policy_types {
        Some(t) if !t.is_empty() => t.clone(),
        _ => {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.is_some() {
                t.push("Egress".into());
            }
            t
        }
    };
    let peer = |pp: &NetworkPolicyPeer, field: String| -> Result<Vec<Peer>, PolicyError> {
        if let Some(b) = &pp.ip_block {
            let net = parse_cidr(&b.cidr).map_err(|m| err(format!("{field}.ipBlock.cidr"), m))?;
            let mut except = Vec::new();
            for (j, e) in b.except.iter().flatten().enumerate() {
                let en =
                    parse_cidr(e).map_err(|m| err(format!("{field}.ipBlock.except[{j}]"), m))?;
                except.push(en);
            }
            return Ok(vec![Peer::Cidr { net, except }]);
        }
        let pods = match &pp.pod_selector {
            Some(s) => Selector::from_k8s(s, &format!("{field}.podSelector"))
                .map_err(|e| e.in_object(&object))?,
            None => Selector::default(),
        };
        let sel = match &pp.namespace_selector {
            None => pods.in_namespace(&ns),
            Some(nsel) => {
                let nsel = Selector::from_k8s(nsel, &format!("{field}.namespaceSelector"))
                    .map_err(|e| e.in_object(&object))?;
                // Namespace labels appear on pods under a prefix; any
                // namespace means "a pod", never the world (cilium#4513).
                let mut s = pods.and(Requirement::Exists(LabelKey::k8s(POD_NAMESPACE_LABEL)));
                for r in nsel.0 {
                    s = s.and(prefix_ns(r));
                }
                s
            }
        };
        Ok(vec![Peer::Endpoints(sel)])
    };
    let ports = |ps: &Option<Vec<NetworkPolicyPort>>,
                 field: String|
     -> Result<Option<Vec<L4>>, PolicyError> {
        let Some(ps) = ps else { return Ok(None) };
        if ps.is_empty() {
            return Ok(None);
        }
        let mut v = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            let f = format!("{field}.ports[{i}]");
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => PROTO_TCP,
                "UDP" => PROTO_UDP,
                "SCTP" => PROTO_SCTP,
                o => {
                    return Err(err(
                        format!("{f}.protocol"),
                        format!("{o:?} is not TCP, UDP or SCTP"),
                    ));
                }
            };
            let port = match &p.port {
                None => String::new(),
                Some(IntOrString::Int(n)) => n.to_string(),
                Some(IntOrString::String(s)) => s.clone(),
            };
            v.push(
                port_range(&port, p.end_port, vec![proto])
                    .map_err(|m| err(format!("{f}.port"), m))?,
            );
        }
        Ok(Some(v))
    };
    for (dir, section) in [
        (Direction::Ingress, "ingress"),
        (Direction::Egress, "egress"),
    ] {
        let ty = if dir == Direction::Ingress {
            "Ingress"
        } else {
            "Egress"
        };
        if !types.iter().any(|t| t == ty) {
            continue;
        }
        out.enforcements.push(Enforcement {
            origin: origin(section, 0),
            subject: subject.clone(),
            direction: dir,
            default_deny: true,
        });
        let items: Vec<NpItem<'_>> = match dir {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), &r.ports))
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), &r.ports))
                .collect(),
        };
        let pf = if dir == Direction::Ingress {
            "from"
        } else {
            "to"
        };
        for (i, (peers, ps)) in items.into_iter().enumerate() {
            let base = format!("spec.{section}[{i}]");
            let res = (|| -> Result<Rule, PolicyError> {
                let peers = match peers {
                    // Empty or missing: every source/destination.
                    None => vec![Peer::All],
                    Some(v) if v.is_empty() => vec![Peer::All],
                    Some(v) => {
                        let mut out = Vec::new();
                        for (j, pp) in v.iter().enumerate() {
                            out.extend(peer(pp, format!("{base}.{pf}[{j}]"))?);
                        }
                        out
                    }
                };
                Ok(Rule {
                    origin: origin(section, i),
                    subject: subject.clone(),
                    direction: dir,
                    deny: false,
                    peers,
                    l4: ports(ps, base.clone())?,
                })
            })();
            match res {
                Ok(r) => out.rules.push(Arc::new(r)),
                Err(e) => out.errors.push(e),
            }
        }
    }
}

type NpItem<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    &'a Option<Vec<NetworkPolicyPort>>,
);

/// A namespace-selector requirement, applied to the pod's copy of its
/// namespace's labels.
fn prefix_ns(r: Requirement) -> Requirement {
    let k = |k: LabelKey| LabelKey::k8s(&format!("{NAMESPACE_LABELS_PREFIX}{}", k.key));
    match r {
        Requirement::In(key, v) => Requirement::In(k(key), v),
        Requirement::NotIn(key, v) => Requirement::NotIn(k(key), v),
        Requirement::Exists(key) => Requirement::Exists(k(key)),
        Requirement::DoesNotExist(key) => Requirement::DoesNotExist(k(key)),
    }
}
