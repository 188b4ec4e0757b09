//! Proxy ports for listeners a CEC declares without an address, as Cilium
//! allocates them: stable per listener name for as long as it exists.
//!
//! A listener's search starts at a place derived from its name (as
//! Cilium starts at a random place in the range), not at the start of the
//! range: the port a name gets then does not depend on which names came
//! and went before it, so an agent restart, or a pass over changed CECs
//! instead of all of them, gives the same port.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;

/// Hands out free TCP ports from a range, remembering who holds which.
#[derive(Debug)]
pub struct ProxyPorts {
    range: RangeInclusive<u16>,
    by_listener: BTreeMap<String, u16>,
}

impl ProxyPorts {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Self {
            range,
            by_listener: BTreeMap::new(),
        }
    }

    /// The port of `listener`, allocating one that is free on 127.0.0.1 and
    /// not in `reserved`. `None` when the range is exhausted.
    pub fn port_for(&mut self, listener: &str, reserved: &BTreeSet<u16>) -> Option<u16> {
        if let Some(p) = self.by_listener.get(listener) {
            return Some(*p);
        }
        let taken: BTreeSet<u16> = self.by_listener.values().copied().collect();
        let (lo, hi) = (*self.range.start(), *self.range.end());
        if lo > hi {
            return None;
        }
        let len = u64::from(hi - lo) + 1;
        let start = fnv1a(listener.as_bytes()) % len;
        let port = (0..len)
            .filter_map(|i| u16::try_from(u64::from(lo) + (start + i) % len).ok())
            .find(|p| {
                !taken.contains(p)
                    && !reserved.contains(p)
                    && TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).is_ok()
            })?;
        self.by_listener.insert(listener.to_owned(), port);
        Some(port)
    }

    /// Forget listeners that no longer exist so their ports can be reused.
    pub fn retain(&mut self, live: &BTreeSet<String>) {
        self.by_listener.retain(|name, _| live.contains(name));
    }
}

/// FNV-1a: a hash that stays the same across builds and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stable_and_distinct() {
        let mut p = ProxyPorts::new(20000..=20100);
        let none = BTreeSet::new();
        let a = p.port_for("a", &none).unwrap();
        let b = p.port_for("b", &none).unwrap();
        assert_ne!(a, b);
        assert_eq!(p.port_for("a", &none), Some(a));
        p.retain(&BTreeSet::from(["b".to_owned()]));
        let reserved = BTreeSet::from([a]);
        assert_ne!(p.port_for("c", &reserved), Some(a));
    }

    #[test]
    fn a_name_gets_its_port_whatever_came_before() {
        let none = BTreeSet::new();
        let mut fresh = ProxyPorts::new(21000..=21999);
        let want = fresh.port_for("default/c/l", &none);
        let mut busy = ProxyPorts::new(21000..=21999);
        for i in 0..20 {
            busy.port_for(&format!("other/{i}"), &none);
        }
        busy.retain(&BTreeSet::new());
        assert_eq!(busy.port_for("default/c/l", &none), want);
    }

    #[test]
    fn exhausted_range_gives_none() {
        let mut p = ProxyPorts::new(20200..=20200);
        let none = BTreeSet::new();
        assert!(p.port_for("a", &none).is_some());
        assert_eq!(p.port_for("b", &none), None);
    }
}
