//! Numeric security identities: Cilium's reserved ones, one per distinct
//! endpoint label set, one per CIDR a policy names.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::labels::{Label, LabelSet, SOURCE_CIDR, SOURCE_RESERVED};

/// Cilium's reserved identities, with Cilium's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reserved {
    Host = 1,
    World = 2,
    Unmanaged = 3,
    Health = 4,
    Init = 5,
    RemoteNode = 6,
    KubeApiserver = 7,
    Ingress = 8,
    WorldIpv4 = 9,
    WorldIpv6 = 10,
}

impl Reserved {
    pub const ALL: [Reserved; 10] = [
        Reserved::Host,
        Reserved::World,
        Reserved::Unmanaged,
        Reserved::Health,
        Reserved::Init,
        Reserved::RemoteNode,
        Reserved::KubeApiserver,
        Reserved::Ingress,
        Reserved::WorldIpv4,
        Reserved::WorldIpv6,
    ];

    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            Reserved::Host => "host",
            Reserved::World => "world",
            Reserved::Unmanaged => "unmanaged",
            Reserved::Health => "health",
            Reserved::Init => "init",
            Reserved::RemoteNode => "remote-node",
            Reserved::KubeApiserver => "kube-apiserver",
            Reserved::Ingress => "ingress",
            Reserved::WorldIpv4 => "world-ipv4",
            Reserved::WorldIpv6 => "world-ipv6",
        }
    }

    pub fn from_id(id: u32) -> Option<Reserved> {
        Reserved::ALL.into_iter().find(|r| r.id() == id)
    }

    pub fn is_world(self) -> bool {
        matches!(
            self,
            Reserved::World | Reserved::WorldIpv4 | Reserved::WorldIpv6
        )
    }
}

/// First identity of endpoints (Cilium's cluster-local range starts at 256).
pub const FIRST_ENDPOINT_IDENTITY: u32 = 256;
/// First CIDR identity (Cilium's node-local scope, 1 << 24).
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;
/// The wildcard identity in map keys ("any peer").
pub const ANY_IDENTITY: u32 = 0;

/// What an identity stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityKind {
    Reserved(Reserved),
    Endpoint,
    Cidr(IpNet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub id: u32,
    pub kind: IdentityKind,
    pub labels: LabelSet,
}

impl IdentityInfo {
    /// Outside the cluster: world identities and CIDR identities.
    pub fn is_world(&self) -> bool {
        match &self.kind {
            IdentityKind::Reserved(r) => r.is_world(),
            IdentityKind::Cidr(_) => true,
            IdentityKind::Endpoint => false,
        }
    }
}

/// Allocates identities and keeps them stable across recomputations (a
/// label set or CIDR keeps its number while it exists).
#[derive(Debug, Clone)]
pub struct Identities {
    by_id: BTreeMap<u32, IdentityInfo>,
    by_labels: BTreeMap<LabelSet, u32>,
    by_cidr: BTreeMap<IpNet, u32>,
    next_endpoint: u32,
    next_cidr: u32,
}

impl Default for Identities {
    fn default() -> Self {
        let mut by_id = BTreeMap::new();
        for r in Reserved::ALL {
            let mut labels = LabelSet::reserved(r.name());
            if r.is_world() {
                labels.0.insert(Label::new(SOURCE_RESERVED, "world", ""));
            }
            by_id.insert(
                r.id(),
                IdentityInfo {
                    id: r.id(),
                    kind: IdentityKind::Reserved(r),
                    labels,
                },
            );
        }
        Identities {
            by_id,
            by_labels: BTreeMap::new(),
            by_cidr: BTreeMap::new(),
            next_endpoint: FIRST_ENDPOINT_IDENTITY,
            next_cidr: FIRST_CIDR_IDENTITY,
        }
    }
}

impl Identities {
    /// The identity of an endpoint's label set.
    pub fn endpoint(&mut self, labels: &LabelSet) -> u32 {
        if let Some(id) = self.by_labels.get(labels) {
            return *id;
        }
        let id = self.next_endpoint;
        self.next_endpoint += 1;
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(
            id,
            IdentityInfo {
                id,
                kind: IdentityKind::Endpoint,
                labels: labels.clone(),
            },
        );
        id
    }

    /// The identity of a CIDR (normalised to its network address).
    pub fn cidr(&mut self, net: IpNet) -> u32 {
        let net = net.trunc();
        if let Some(id) = self.by_cidr.get(&net) {
            return *id;
        }
        let id = self.next_cidr;
        self.next_cidr += 1;
        self.by_cidr.insert(net, id);
        let mut labels = LabelSet::default();
        labels
            .0
            .insert(Label::new(SOURCE_CIDR, &net.to_string(), ""));
        labels.0.insert(Label::new(SOURCE_RESERVED, "world", ""));
        self.by_id.insert(
            id,
            IdentityInfo {
                id,
                kind: IdentityKind::Cidr(net),
                labels,
            },
        );
        id
    }

    pub fn get(&self, id: u32) -> Option<&IdentityInfo> {
        self.by_id.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &IdentityInfo> {
        self.by_id.values()
    }

    pub fn cidrs(&self) -> impl Iterator<Item = (&IpNet, &u32)> {
        self.by_cidr.iter()
    }

    pub fn by_labels(&self, labels: &LabelSet) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }
}

/// Longest-prefix map from addresses to identities (the ipcache's content).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpCache {
    pub entries: BTreeMap<IpNet, u32>,
}

impl IpCache {
    /// World defaults: 0.0.0.0/0 → world-ipv4, ::/0 → world-ipv6.
    pub fn with_world() -> Self {
        let mut entries = BTreeMap::new();
        if let Ok(n) = "0.0.0.0/0".parse() {
            entries.insert(n, Reserved::WorldIpv4.id());
        }
        if let Ok(n) = "::/0".parse() {
            entries.insert(n, Reserved::WorldIpv6.id());
        }
        IpCache { entries }
    }

    pub fn insert(&mut self, net: IpNet, id: u32) {
        self.entries.insert(net.trunc(), id);
    }

    pub fn insert_ip(&mut self, ip: IpAddr, id: u32) {
        self.entries.insert(IpNet::from(ip), id);
    }

    /// Longest-prefix match.
    pub fn lookup(&self, ip: IpAddr) -> u32 {
        self.entries
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or(match ip {
                IpAddr::V4(_) => Reserved::WorldIpv4.id(),
                IpAddr::V6(_) => Reserved::WorldIpv6.id(),
            })
    }
}
