use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::IpamError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// A network prefix with its host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(f: Family, n: u128) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, IpamError> {
        let f = Family::of(addr);
        let bad = |why: &str| IpamError::BadCidr {
            input: format!("{addr}/{prefix}"),
            why: why.into(),
        };
        if prefix > f.bits() {
            return Err(bad("prefix longer than the address"));
        }
        let c = Cidr { addr, prefix };
        if to_u128(addr) & !c.mask() != 0 {
            return Err(bad("host bits set"));
        }
        Ok(c)
    }
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
    fn host_bits(&self) -> u32 {
        (self.family().bits() - self.prefix) as u32
    }
    fn mask(&self) -> u128 {
        let bits = self.family().bits() as u32;
        let all = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        let host = self.host_bits();
        if host >= 128 {
            0
        } else {
            all & !((1u128 << host) - 1)
        }
    }
    /// Number of addresses (saturating at u128::MAX for a /0 of IPv6).
    pub fn size(&self) -> u128 {
        1u128.checked_shl(self.host_bits()).unwrap_or(u128::MAX)
    }
    pub fn contains(&self, a: IpAddr) -> bool {
        Family::of(a) == self.family() && to_u128(a) & self.mask() == to_u128(self.addr)
    }
    /// The `n`th address of the prefix.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        (n < self.size()).then(|| from_u128(self.family(), to_u128(self.addr) + n))
    }
    /// Offset of `a` in the prefix.
    pub fn offset(&self, a: IpAddr) -> Option<u128> {
        self.contains(a).then(|| to_u128(a) - to_u128(self.addr))
    }
    /// The `n`th sub-prefix of length `prefix`.
    pub fn subnet(&self, prefix: u8, n: u128) -> Option<Cidr> {
        if prefix < self.prefix || prefix > self.family().bits() {
            return None;
        }
        let count = 1u128.checked_shl((prefix - self.prefix) as u32)?;
        if n >= count {
            return None;
        }
        let step = 1u128.checked_shl((self.family().bits() - prefix) as u32)?;
        Some(Cidr {
            addr: from_u128(self.family(), to_u128(self.addr) + n * step),
            prefix,
        })
    }
    pub fn overlaps(&self, o: &Cidr) -> bool {
        self.family() == o.family() && (self.contains(o.addr) || o.contains(self.addr))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Cidr, IpamError> {
        let bad = |why: &str| IpamError::BadCidr {
            input: s.into(),
            why: why.into(),
        };
        let (a, p) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("missing /prefix"))?;
        let addr: IpAddr = a.parse().map_err(|_| bad("bad address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("bad prefix length"))?;
        Cidr::new(addr, prefix).map_err(|_| {
            if prefix > Family::of(addr).bits() {
                bad("prefix longer than the address")
            } else {
                bad("host bits set")
            }
        })
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_subnets() {
        let c: Cidr = "10.244.0.0/16".parse().expect("cidr");
        assert_eq!(c.subnet(24, 3).expect("sub").to_string(), "10.244.3.0/24");
        assert_eq!(c.subnet(24, 256), None);
        assert!(c.contains("10.244.9.9".parse().expect("ip")));
        assert!(!c.contains("10.245.0.1".parse().expect("ip")));
        assert!("10.244.0.1/16".parse::<Cidr>().is_err());
        assert!("10.244.0.0/33".parse::<Cidr>().is_err());
        let v6: Cidr = "fd00:123::/48".parse().expect("v6");
        assert_eq!(
            v6.subnet(64, 2).expect("sub").to_string(),
            "fd00:123:0:2::/64"
        );
        assert_eq!(v6.nth(1).expect("nth").to_string(), "fd00:123::1");
    }
}
