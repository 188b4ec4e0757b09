//! Agent side: pod addresses out of the node's pod CIDRs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Cidr, Family, IpamError};

/// One address and who holds it (`<containerID>/<ifname>` for pods).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub addr: IpAddr,
    pub owner: String,
}

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    cidrs: Vec<Cidr>,
    allocations: Vec<Allocation>,
    /// Last address handed out per CIDR: allocation continues after it, so
    /// a just-released address is the last to be reused (and clients of the
    /// old pod keep failing fast on its unreachable route for longest).
    #[serde(default)]
    cursors: BTreeMap<Cidr, IpAddr>,
    #[serde(default)]
    released: BTreeSet<Cidr>,
}

/// A pod CIDR's state as the agent reports it in the CiliumNode's
/// `status.ipam.pod-cidrs` (Cilium's cluster-pool-v2beta).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CidrState {
    InUse,
    Depleted,
    Released,
}

impl CidrState {
    pub fn as_str(self) -> &'static str {
        match self {
            CidrState::InUse => "in-use",
            CidrState::Depleted => "depleted",
            CidrState::Released => "released",
        }
    }
    pub fn parse(s: &str) -> Option<CidrState> {
        Some(match s {
            "in-use" => CidrState::InUse,
            "depleted" => CidrState::Depleted,
            "released" => CidrState::Released,
            _ => return None,
        })
    }
}

/// Cilium's defaults: ask for another CIDR when fewer addresses than this
/// are free ...
pub const ALLOCATION_THRESHOLD: u128 = 8;
/// ... and give back an unused CIDR while more than this stay free.
pub const RELEASE_THRESHOLD: u128 = 16;

#[derive(Clone, Debug, Default)]
pub struct NodeAllocator {
    cidrs: Vec<Cidr>,
    by_addr: BTreeMap<IpAddr, String>,
    cursors: BTreeMap<Cidr, IpAddr>,
    /// CIDRs handed back: nothing is allocated from them any more.
    released: BTreeSet<Cidr>,
}

impl NodeAllocator {
    pub fn new(cidrs: Vec<Cidr>) -> NodeAllocator {
        NodeAllocator {
            cidrs,
            ..Default::default()
        }
    }

    /// The state saved at `path`, if any (CIDRs, allocations, cursors).
    pub fn load(path: &Path) -> Result<Option<NodeAllocator>, IpamError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(IpamError::State {
                    path: path.into(),
                    why: e.to_string(),
                });
            }
        };
        let p: Persisted = serde_json::from_slice(&bytes).map_err(|e| IpamError::State {
            path: path.into(),
            why: e.to_string(),
        })?;
        Ok(Some(NodeAllocator {
            cidrs: p.cidrs,
            by_addr: p
                .allocations
                .into_iter()
                .map(|a| (a.addr, a.owner))
                .collect(),
            cursors: p.cursors,
            released: p.released,
        }))
    }

    /// Write the state atomically (temp file + rename + fsync), so a crash
    /// leaves either the old or the new state, never a torn one.
    pub fn save(&self, path: &Path) -> Result<(), IpamError> {
        use std::io::Write;
        let err = |e: std::io::Error| IpamError::State {
            path: path.into(),
            why: e.to_string(),
        };
        let p = Persisted {
            cidrs: self.cidrs.clone(),
            allocations: self.allocations(),
            cursors: self.cursors.clone(),
            released: self.released.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&p).map_err(|e| IpamError::State {
            path: path.into(),
            why: e.to_string(),
        })?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        Ok(())
    }

    pub fn cidrs(&self) -> &[Cidr] {
        &self.cidrs
    }

    /// Replace the node's CIDRs (e.g. a new CiliumNode); allocations are
    /// kept even outside them, so nothing is handed out twice.
    pub fn set_cidrs(&mut self, cidrs: Vec<Cidr>) {
        // A CIDR the operator withdrew is no longer "released", it is gone.
        self.released.retain(|c| cidrs.contains(c));
        self.cidrs = cidrs;
    }

    pub fn add_cidr(&mut self, cidr: Cidr) {
        if !self.cidrs.contains(&cidr) {
            self.cidrs.push(cidr);
        }
    }

    pub fn allocations(&self) -> Vec<Allocation> {
        self.by_addr
            .iter()
            .map(|(a, o)| Allocation {
                addr: *a,
                owner: o.clone(),
            })
            .collect()
    }

    pub fn owner_of(&self, addr: IpAddr) -> Option<&str> {
        self.by_addr.get(&addr).map(String::as_str)
    }

    pub fn addrs_of(&self, owner: &str) -> Vec<IpAddr> {
        self.by_addr
            .iter()
            .filter(|(_, o)| o.as_str() == owner)
            .map(|(a, _)| *a)
            .collect()
    }

    /// The gateway (router) address of a CIDR: its first host address,
    /// never handed to a pod.
    pub fn gateway(&self, family: Family) -> Option<IpAddr> {
        self.cidrs
            .iter()
            .find(|c| c.family() == family)
            .and_then(|c| c.nth(1))
    }

    fn reserved(c: &Cidr, offset: u128) -> bool {
        offset <= 1 || (c.family() == Family::V4 && offset == c.size() - 1)
    }

    /// An address of `family` for `owner`: the one it already holds (a
    /// retried ADD), else the next free one after the cursor.
    pub fn allocate(&mut self, owner: &str, family: Family) -> Result<IpAddr, IpamError> {
        if let Some(a) = self
            .addrs_of(owner)
            .into_iter()
            .find(|a| Family::of(*a) == family)
        {
            return Ok(a);
        }
        let cidrs: Vec<Cidr> = self
            .cidrs
            .iter()
            .copied()
            .filter(|c| c.family() == family && !self.released.contains(c))
            .collect();
        if cidrs.is_empty() {
            return Err(IpamError::NoPool { family });
        }
        for c in &cidrs {
            let size = c.size();
            let start = self
                .cursors
                .get(c)
                .and_then(|a| c.offset(*a))
                .map_or(0, |o| o + 1);
            // Next fit finds a free address within (allocated + reserved + 1)
            // steps when one exists, so the scan is bounded even for a /64.
            let limit = size.min(self.by_addr.len() as u128 + 4);
            let mut off = start % size;
            for _ in 0..limit {
                if !Self::reserved(c, off)
                    && let Some(a) = c.nth(off)
                    && !self.by_addr.contains_key(&a)
                {
                    self.by_addr.insert(a, owner.to_string());
                    self.cursors.insert(*c, a);
                    return Ok(a);
                }
                off = (off + 1) % size;
            }
        }
        Err(IpamError::Exhausted {
            family,
            cidrs: cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Mark `addr` as held by `owner` (restoring state from the kernel).
    pub fn claim(&mut self, owner: &str, addr: IpAddr) {
        self.by_addr.insert(addr, owner.to_string());
    }

    /// Release everything `owner` holds; returns the addresses.
    pub fn release_owner(&mut self, owner: &str) -> Vec<IpAddr> {
        let addrs = self.addrs_of(owner);
        for a in &addrs {
            self.by_addr.remove(a);
        }
        addrs
    }

    fn used_in(&self, c: &Cidr) -> u128 {
        self.by_addr.keys().filter(|a| c.contains(**a)).count() as u128
    }

    fn free_in(&self, c: &Cidr) -> u128 {
        let reserved = if c.family() == Family::V4 { 3 } else { 2 };
        c.size()
            .saturating_sub(reserved)
            .saturating_sub(self.used_in(c))
    }

    /// Free addresses in the node's (not released) CIDRs of `family`.
    pub fn free(&self, family: Family) -> u128 {
        self.cidrs
            .iter()
            .filter(|c| c.family() == family && !self.released.contains(c))
            .map(|c| self.free_in(c))
            .sum()
    }

    /// Give back unused CIDRs while more than `threshold` addresses of
    /// their family stay free, later CIDRs first (as Cilium). The first
    /// CIDR of a family holds the gateway and is never given back.
    pub fn release_excess(&mut self, threshold: u128) -> Vec<Cidr> {
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            let mut free = self.free(family);
            let live: Vec<Cidr> = self
                .cidrs
                .iter()
                .copied()
                .filter(|c| c.family() == family && !self.released.contains(c))
                .collect();
            for c in live.iter().skip(1).rev() {
                let f = self.free_in(c);
                if self.used_in(c) == 0 && free.saturating_sub(f) > threshold {
                    free -= f;
                    self.released.insert(*c);
                    out.push(*c);
                }
            }
        }
        out
    }

    /// Every CIDR's state for the CiliumNode status: released ones as
    /// such; the others `depleted` when their family has fewer than
    /// `alloc_threshold` free addresses (the operator then adds a CIDR),
    /// else `in-use`.
    pub fn cidr_states(&self, alloc_threshold: u128) -> BTreeMap<Cidr, CidrState> {
        self.cidrs
            .iter()
            .map(|c| {
                let state = if self.released.contains(c) {
                    CidrState::Released
                } else if self.free(c.family()) < alloc_threshold {
                    CidrState::Depleted
                } else {
                    CidrState::InUse
                };
                (*c, state)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> Cidr {
        "10.123.5.0/29".parse().expect("cidr")
    }

    #[test]
    fn allocates_skipping_reserved_until_exhausted() {
        let mut n = NodeAllocator::new(vec![v4()]);
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(
                n.allocate(&format!("c{i}/eth0"), Family::V4)
                    .expect("free")
                    .to_string(),
            );
        }
        assert_eq!(
            got,
            [
                "10.123.5.2",
                "10.123.5.3",
                "10.123.5.4",
                "10.123.5.5",
                "10.123.5.6"
            ]
        );
        assert!(matches!(
            n.allocate("c9/eth0", Family::V4),
            Err(IpamError::Exhausted { .. })
        ));
        // The same owner gets its address again.
        assert_eq!(
            n.allocate("c1/eth0", Family::V4).expect("same").to_string(),
            "10.123.5.3"
        );
        assert_eq!(n.release_owner("c1/eth0").len(), 1);
        assert_eq!(n.free(Family::V4), 1);
        assert_eq!(
            n.allocate("c9/eth0", Family::V4)
                .expect("reuse")
                .to_string(),
            "10.123.5.3"
        );
        assert!(matches!(
            n.allocate("x", Family::V6),
            Err(IpamError::NoPool { .. })
        ));
    }

    #[test]
    fn states_follow_thresholds_and_unused_cidrs_are_released() {
        // Two /28s: 13 usable addresses each.
        let a: Cidr = "10.123.9.0/28".parse().expect("a");
        let b: Cidr = "10.123.9.16/28".parse().expect("b");
        let mut n = NodeAllocator::new(vec![a]);
        for i in 0..5 {
            n.allocate(&format!("p{i}"), Family::V4).expect("free");
        }
        assert_eq!(n.cidr_states(ALLOCATION_THRESHOLD)[&a], CidrState::InUse);
        n.allocate("p5", Family::V4).expect("free");
        // 7 free < 8: depleted, the operator adds a CIDR.
        assert_eq!(n.cidr_states(ALLOCATION_THRESHOLD)[&a], CidrState::Depleted);
        n.set_cidrs(vec![a, b]);
        assert!(
            n.cidr_states(ALLOCATION_THRESHOLD)
                .values()
                .all(|s| *s == CidrState::InUse)
        );
        // 20 free, b unused: giving it back would leave 7 < 16, so keep it.
        assert!(n.release_excess(RELEASE_THRESHOLD).is_empty());
        for i in 0..6 {
            n.release_owner(&format!("p{i}"));
        }
        // 26 free; without b 13 remain, not more than 16: still kept.
        assert!(n.release_excess(RELEASE_THRESHOLD).is_empty());
        let big: Cidr = "10.123.8.0/24".parse().expect("big");
        let mut m = NodeAllocator::new(vec![big, b]);
        assert_eq!(m.release_excess(RELEASE_THRESHOLD), vec![b]);
        assert_eq!(m.cidr_states(ALLOCATION_THRESHOLD)[&b], CidrState::Released);
        for i in 0..300 {
            if m.allocate(&format!("q{i}"), Family::V4).is_err() {
                break;
            }
        }
        assert!(
            m.allocations().iter().all(|x| big.contains(x.addr)),
            "nothing from a released CIDR"
        );
        // The operator withdraws it.
        m.set_cidrs(vec![big]);
        assert!(!m.cidr_states(ALLOCATION_THRESHOLD).contains_key(&b));
    }

    #[test]
    fn next_fit_delays_reuse_and_survives_save_load() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("ipam.json");
        let mut n = NodeAllocator::new(vec![v4(), "fd00:123::/64".parse().expect("v6")]);
        let a = n.allocate("a/eth0", Family::V4).expect("a");
        n.allocate("a/eth0", Family::V6).expect("a6");
        n.release_owner("a/eth0");
        n.save(&path).expect("save");
        let mut m = NodeAllocator::load(&path).expect("load").expect("present");
        let b = m.allocate("b/eth0", Family::V4).expect("b");
        assert_ne!(a, b, "a released address is not reused first");
        let b6 = m.allocate("b/eth0", Family::V6).expect("b6");
        assert_eq!(b6.to_string(), "fd00:123::3");
        assert_eq!(m.gateway(Family::V4).expect("gw").to_string(), "10.123.5.1");
        assert!(
            NodeAllocator::load(&dir.path().join("none"))
                .expect("ok")
                .is_none()
        );
    }
}
