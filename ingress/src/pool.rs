//! The LoadBalancer address pool (`--lb-pool`) and a Service's LB address:
//! shared by the operator's LB IPAM, which hands addresses out, and the
//! agent, which binds them and keeps CEC listeners off them.

use std::net::Ipv4Addr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Service;

/// An IPv4 CIDR pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    base: u32,
    prefix: u8,
}

/// A malformed `--lb-pool`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("--lb-pool {0:?}: expected an IPv4 CIDR such as 127.0.100.0/24")]
pub struct PoolError(String);

impl FromStr for Pool {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        let err = || PoolError(s.to_owned());
        let (ip, prefix) = s.split_once('/').ok_or_else(err)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        if !(8..=32).contains(&prefix) {
            return Err(err());
        }
        let mask = if prefix == 32 {
            u32::MAX
        } else {
            !(u32::MAX >> prefix)
        };
        Ok(Pool {
            base: u32::from(ip) & mask,
            prefix,
        })
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 32 {
            u32::MAX
        } else {
            !(u32::MAX >> self.prefix)
        };
        u32::from(ip) & mask == self.base
    }

    /// Usable host addresses: the network and broadcast addresses are skipped
    /// for pools larger than /31.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        let (first, last) = if size > 2 {
            (1, size - 2)
        } else {
            (0, size - 1)
        };
        let base = u64::from(self.base);
        (first..=last).map(move |off| Ipv4Addr::from((base + off) as u32))
    }
}

/// The LB address of a Service, if it has one.
pub fn lb_ip(svc: &Service) -> Option<Ipv4Addr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .ip
        .as_deref()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_enumerates_pools() {
        let p: Pool = "127.0.100.0/24".parse().unwrap();
        assert!(p.contains("127.0.100.7".parse().unwrap()));
        assert!(!p.contains("127.0.101.7".parse().unwrap()));
        let hosts: Vec<_> = p.hosts().collect();
        assert_eq!(hosts.len(), 254);
        assert_eq!(hosts[0], Ipv4Addr::new(127, 0, 100, 1));
        assert!("127.0.100.0".parse::<Pool>().is_err());
        assert!("nope/24".parse::<Pool>().is_err());
        let one: Pool = "10.0.0.5/32".parse().unwrap();
        assert_eq!(
            one.hosts().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(10, 0, 0, 5)]
        );
    }
}
