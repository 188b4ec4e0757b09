//! A small ordered set for the pipeline's "who uses this name or address"
//! tables.
//!
//! Nearly every resource name and address has one user, and a `BTreeSet`
//! allocates a whole node (eleven slots) for it: at 10,000 routes those
//! nodes were about a tenth of the agent's heap. A sorted `Vec` holds one
//! user in one slot and keeps the same ordered queries.

/// Distinct values in ascending order.
#[derive(Debug, Clone)]
pub(super) struct Users<T>(Vec<T>);

impl<T> Default for Users<T> {
    fn default() -> Self {
        Users(Vec::new())
    }
}

impl<T: Ord> Users<T> {
    /// Adds `v`; false when it was already there.
    pub(super) fn insert(&mut self, v: T) -> bool {
        match self.0.binary_search(&v) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, v);
                true
            }
        }
    }

    /// Removes `v`; false when it was not there.
    pub(super) fn remove(&mut self, v: &T) -> bool {
        match self.0.binary_search(v) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    /// The values ordered after `after` (all of them when `None`).
    pub(super) fn after(&self, after: Option<&T>) -> &[T] {
        match after {
            Some(a) => &self.0[self.0.partition_point(|v| v <= a)..],
            None => &self.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::ops::Bound;

    use super::Users;

    /// Random inserts and removes keep the same contents and the same
    /// "after" answers as a `BTreeSet`.
    #[test]
    fn behaves_as_an_ordered_set() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % 16
        };
        let mut users = Users::default();
        let mut set = BTreeSet::new();
        for _ in 0..2_000 {
            let v = next();
            if next() < 10 {
                assert_eq!(users.insert(v), set.insert(v));
            } else {
                assert_eq!(users.remove(&v), set.remove(&v));
            }
            assert_eq!(
                users.iter().copied().collect::<Vec<_>>(),
                set.iter().copied().collect::<Vec<_>>()
            );
            let a = next();
            let want: Vec<u64> = set
                .range((Bound::Excluded(a), Bound::Unbounded))
                .copied()
                .collect();
            assert_eq!(users.after(Some(&a)), want.as_slice());
            assert_eq!(users.after(None).len(), set.len());
            assert_eq!(users.is_empty(), set.is_empty());
        }
    }
}
