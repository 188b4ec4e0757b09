//! Operator side of cluster-pool IPAM: node pod CIDRs carved out of the
//! cluster pool (`--cluster-pool-ipv4-cidr` / `--cluster-pool-ipv4-mask-size`
//! and the IPv6 pair), as Cilium's operator records them in a CiliumNode's
//! `spec.ipam.podCIDRs`.

use std::collections::BTreeMap;

use crate::{Cidr, Family, IpamError};

#[derive(Clone, Debug)]
pub struct ClusterPool {
    pools: Vec<(Cidr, u8)>,
    used: BTreeMap<Cidr, String>,
}

impl ClusterPool {
    /// `pools`: (cluster CIDR, node mask size) per family.
    pub fn new(pools: Vec<(Cidr, u8)>) -> Result<ClusterPool, IpamError> {
        for (pool, mask) in &pools {
            if *mask < pool.prefix() || *mask > pool.family().bits() {
                return Err(IpamError::BadMask {
                    pool: *pool,
                    mask: *mask,
                });
            }
        }
        Ok(ClusterPool {
            pools,
            used: BTreeMap::new(),
        })
    }

    /// Record a CIDR a node already holds (read back from its CiliumNode).
    /// CIDRs outside the pool are ignored: they are someone else's.
    pub fn occupy(&mut self, node: &str, cidr: Cidr) {
        if self.pools.iter().any(|(p, _)| p.contains(cidr.addr())) {
            self.used.insert(cidr, node.to_string());
        }
    }

    pub fn node_cidrs(&self, node: &str) -> Vec<Cidr> {
        self.used
            .iter()
            .filter(|(_, n)| n.as_str() == node)
            .map(|(c, _)| *c)
            .collect()
    }

    /// One CIDR of every configured family for `node`: the ones it holds,
    /// else the first free ones.
    pub fn allocate(&mut self, node: &str) -> Result<Vec<Cidr>, IpamError> {
        let mut out = Vec::new();
        for (pool, mask) in self.pools.clone() {
            if let Some(c) = self
                .node_cidrs(node)
                .into_iter()
                .find(|c| c.family() == pool.family())
            {
                out.push(c);
                continue;
            }
            out.push(self.allocate_one(node, pool, mask)?);
        }
        Ok(out)
    }

    /// One more CIDR of `family` for `node` (dynamic allocation).
    pub fn allocate_more(&mut self, node: &str, family: Family) -> Result<Cidr, IpamError> {
        let (pool, mask) = self
            .pools
            .iter()
            .copied()
            .find(|(p, _)| p.family() == family)
            .ok_or(IpamError::NoPool { family })?;
        self.allocate_one(node, pool, mask)
    }

    fn allocate_one(&mut self, node: &str, pool: Cidr, mask: u8) -> Result<Cidr, IpamError> {
        let mut n = 0u128;
        while let Some(c) = pool.subnet(mask, n) {
            if !self.used.keys().any(|u| u.overlaps(&c)) {
                self.used.insert(c, node.to_string());
                return Ok(c);
            }
            n += 1;
        }
        Err(IpamError::ClusterPoolExhausted(pool))
    }

    /// The operator's pass over one node (cluster-pool-v2beta): CIDRs the
    /// agent released are withdrawn; when every CIDR of a family is
    /// depleted (or the node has none), one more is added. Returns the
    /// node's new `spec.ipam.podCIDRs`.
    pub fn reconcile_node(
        &mut self,
        node: &str,
        spec: &[Cidr],
        status: &BTreeMap<Cidr, crate::CidrState>,
    ) -> Result<Vec<Cidr>, IpamError> {
        use crate::CidrState;
        let mut out: Vec<Cidr> = Vec::new();
        for c in spec {
            if status.get(c) == Some(&CidrState::Released) {
                self.release(c);
            } else {
                self.occupy(node, *c);
                out.push(*c);
            }
        }
        for (pool, _) in self.pools.clone() {
            let family = pool.family();
            let mine: Vec<&Cidr> = out.iter().filter(|c| c.family() == family).collect();
            let exhausted = mine.is_empty()
                || mine
                    .iter()
                    .all(|c| status.get(*c) == Some(&CidrState::Depleted));
            if exhausted {
                out.push(self.allocate_more(node, family)?);
            }
        }
        Ok(out)
    }

    pub fn release(&mut self, cidr: &Cidr) {
        self.used.remove(cidr);
    }

    pub fn release_node(&mut self, node: &str) {
        self.used.retain(|_, n| n != node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_distinct_cidrs_and_keep_them() {
        let v4: Cidr = "10.123.0.0/22".parse().expect("v4");
        let v6: Cidr = "fd00:123::/48".parse().expect("v6");
        let mut p = ClusterPool::new(vec![(v4, 24), (v6, 64)]).expect("pool");
        p.occupy("b", "10.123.0.0/24".parse().expect("c"));
        let a = p.allocate("a").expect("a");
        assert_eq!(a[0].to_string(), "10.123.1.0/24");
        assert_eq!(a[1].to_string(), "fd00:123::/64");
        assert_eq!(p.allocate("a").expect("again"), a);
        p.allocate("c").expect("c");
        p.allocate("d").expect("d");
        assert_eq!(p.allocate("e"), Err(IpamError::ClusterPoolExhausted(v4)));
        p.release_node("c");
        assert_eq!(p.allocate("e").expect("e")[0].to_string(), "10.123.2.0/24");
        assert!(ClusterPool::new(vec![(v4, 20)]).is_err());
    }

    #[test]
    fn operator_adds_on_depletion_and_withdraws_released() {
        use crate::CidrState;
        let v4: Cidr = "10.123.0.0/26".parse().expect("v4");
        let mut p = ClusterPool::new(vec![(v4, 28)]).expect("pool");
        let first = p.reconcile_node("a", &[], &BTreeMap::new()).expect("first");
        assert_eq!(first.len(), 1);
        let status = BTreeMap::from([(first[0], CidrState::InUse)]);
        assert_eq!(p.reconcile_node("a", &first, &status).expect("same"), first);
        let status = BTreeMap::from([(first[0], CidrState::Depleted)]);
        let grown = p.reconcile_node("a", &first, &status).expect("grown");
        assert_eq!(grown.len(), 2);
        assert_ne!(grown[0], grown[1]);
        let status = BTreeMap::from([
            (grown[0], CidrState::InUse),
            (grown[1], CidrState::Released),
        ]);
        assert_eq!(
            p.reconcile_node("a", &grown, &status).expect("shrunk"),
            first
        );
        // The withdrawn CIDR is free for others.
        assert_eq!(p.allocate("b").expect("b")[0], grown[1]);
    }
}
