//! Shared-mode conflicts kept between changes.
//!
//! [`crate::merge_shared_preferring`] decides conflicts first come, first
//! served over every shared Ingress in merge order. [`Conflicts`] keeps the
//! outcome and, per claim (a host and path, an SNI name), the Ingresses
//! contending for it, so a change re-decides only the changed Ingresses
//! and those whose outcome a flip can reach through a shared claim — with
//! the same result as the merge from scratch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;

use crate::error::IngressError;
use crate::model::PathMatch;
use crate::shared::{
    IngressRejection, MergeKey, SharedPart, first_conflict, merge_key, recorded_sni_use,
    route_claims, sni_uses,
};

/// `(namespace, name)` of an Ingress.
pub(crate) type Id = (String, String);

type RouteClaim = (String, PathMatch, bool);

#[derive(Debug)]
struct Held {
    part: SharedPart,
    included: bool,
    conflict: Option<IngressError>,
}

/// Every shared part with its merge outcome, kept between changes.
#[derive(Debug, Default)]
pub(crate) struct Conflicts {
    /// In merge order.
    held: BTreeMap<MergeKey, Held>,
    key_of: HashMap<Id, MergeKey>,
    /// Per claim, the parts that make it, in merge order.
    routes: HashMap<RouteClaim, BTreeSet<MergeKey>>,
    snis: HashMap<String, BTreeSet<MergeKey>>,
    /// Parts whose outcome is not what their merge key assumed (serving or
    /// not): their key is read again from the next `serving`.
    rekey: Vec<Id>,
}

fn id_of(key: &MergeKey) -> Id {
    (key.2.clone(), key.3.clone())
}

impl Conflicts {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The part held for `id`.
    pub fn part(&self, id: &Id) -> Option<&SharedPart> {
        self.held.get(self.key_of.get(id)?).map(|h| &h.part)
    }

    /// The held part of `id` if the merge includes it.
    pub fn included(&self, id: &Id) -> Option<&SharedPart> {
        let h = self.held.get(self.key_of.get(id)?)?;
        h.included.then_some(&h.part)
    }

    /// Ids of every held part.
    pub fn ids(&self) -> impl Iterator<Item = &Id> {
        self.key_of.keys()
    }

    /// Included parts in merge order.
    pub fn included_ids(&self) -> Vec<Id> {
        self.held
            .iter()
            .filter(|(_, h)| h.included)
            .map(|(k, _)| id_of(k))
            .collect()
    }

    /// Parts left out, in merge order, with why.
    pub fn rejections(&self) -> Vec<IngressRejection> {
        self.held
            .iter()
            .filter_map(|(k, h)| {
                Some(IngressRejection {
                    namespace: k.2.clone(),
                    name: k.3.clone(),
                    error: h.conflict.clone()?,
                })
            })
            .collect()
    }

    /// Applies `changes` (a part, or `None` when the Ingress is no longer
    /// shared) and decides again what they can reach. `serving` must be
    /// the included set of the previous update (any set for the first):
    /// it places newcomers, as in [`crate::merge_shared_preferring`].
    /// Returns the ids whose included part may have changed.
    pub fn update<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (Id, Option<&'a SharedPart>)>,
        serving: &BTreeSet<Id>,
    ) -> BTreeSet<Id> {
        let mut touched: BTreeSet<Id> = BTreeSet::new();
        let mut claims_r: HashSet<RouteClaim> = HashSet::new();
        let mut claims_s: HashSet<String> = HashSet::new();
        let mut suspects: BTreeSet<MergeKey> = BTreeSet::new();

        let mut todo: Vec<(Id, Option<SharedPart>)> = Vec::new();
        for id in std::mem::take(&mut self.rekey) {
            // Re-placed with its own part unless a change replaces it.
            if let Some(p) = self.part(&id) {
                let p = p.clone();
                todo.push((id, Some(p)));
            }
        }
        for (id, part) in changes {
            let same = match (self.part(&id), part) {
                (Some(old), Some(new)) => old == new,
                (None, None) => true,
                _ => false,
            };
            if !same {
                todo.push((id, part.cloned()));
            }
        }
        for (id, part) in todo {
            if let Some(old) = self.key_of.remove(&id) {
                let Some(held) = self.held.remove(&old) else {
                    continue;
                };
                for (host, path, d) in route_claims(&held.part) {
                    let claim = (host.to_owned(), path.clone(), d);
                    if let Some(set) = self.routes.get_mut(&claim) {
                        set.remove(&old);
                        if set.is_empty() {
                            self.routes.remove(&claim);
                        }
                    }
                    claims_r.insert(claim);
                }
                for (host, _) in sni_uses(&held.part) {
                    if let Some(set) = self.snis.get_mut(host) {
                        set.remove(&old);
                        if set.is_empty() {
                            self.snis.remove(host);
                        }
                    }
                    claims_s.insert(host.to_owned());
                }
            }
            touched.insert(id.clone());
            let Some(part) = part else { continue };
            let key = merge_key(&part, serving);
            for (host, path, d) in route_claims(&part) {
                let claim = (host.to_owned(), path.clone(), d);
                self.routes
                    .entry(claim.clone())
                    .or_default()
                    .insert(key.clone());
                claims_r.insert(claim);
            }
            for (host, _) in sni_uses(&part) {
                self.snis
                    .entry(host.to_owned())
                    .or_default()
                    .insert(key.clone());
                claims_s.insert(host.to_owned());
            }
            suspects.insert(key.clone());
            self.key_of.insert(id, key.clone());
            self.held.insert(
                key,
                Held {
                    part,
                    included: false,
                    conflict: None,
                },
            );
        }
        // Everyone contending for a claim that gained, lost or moved a
        // contender.
        for c in &claims_r {
            suspects.extend(self.routes.get(c).into_iter().flatten().cloned());
        }
        for h in &claims_s {
            suspects.extend(self.snis.get(h).into_iter().flatten().cloned());
        }

        // In merge order, so everything a part's outcome depends on (the
        // outcomes of older contenders) is final when it is decided.
        while let Some(key) = suspects.pop_first() {
            let Some(held) = self.held.get(&key) else {
                continue;
            };
            let conflict = self.decide(&key, &held.part);
            let included = conflict.is_none();
            let flipped = included != held.included;
            let later = (Bound::Excluded(&key), Bound::Unbounded);
            if flipped {
                touched.insert(id_of(&key));
                for (host, path, d) in route_claims(&held.part) {
                    let claim = (host.to_owned(), path.clone(), d);
                    if let Some(set) = self.routes.get(&claim) {
                        suspects.extend(set.range::<MergeKey, _>(later).cloned());
                    }
                }
                for (host, _) in sni_uses(&held.part) {
                    if let Some(set) = self.snis.get(host) {
                        suspects.extend(set.range::<MergeKey, _>(later).cloned());
                    }
                }
            }
            if let Some(h) = self.held.get_mut(&key) {
                h.included = included;
                h.conflict = conflict;
            }
        }
        // Only a part placed or flipped now can have a key that assumed
        // (`!key.1`: serving) another outcome than it has: the next
        // `serving` places these again.
        self.rekey = touched
            .iter()
            .filter(|id| {
                self.key_of
                    .get(*id)
                    .and_then(|k| Some((k, self.held.get(k)?)))
                    .is_some_and(|(k, h)| h.included == k.1)
            })
            .cloned()
            .collect();
        touched
    }

    /// The conflict that keeps the part at `key` out, given the outcomes of
    /// the parts before it.
    fn decide(&self, key: &MergeKey, part: &SharedPart) -> Option<IngressError> {
        let before = (Bound::Unbounded, Bound::Excluded(key));
        let owner = |set: &BTreeSet<MergeKey>| -> Option<&SharedPart> {
            set.range::<MergeKey, _>(before)
                .rev()
                .filter_map(|k| self.held.get(k))
                .find(|h| h.included)
                .map(|h| &h.part)
        };
        first_conflict(
            part,
            |host, path, d| {
                self.routes
                    .get(&(host.to_owned(), path.clone(), d))
                    .and_then(owner)
            },
            |host| {
                let o = self.snis.get(host).and_then(owner)?;
                Some((o, recorded_sni_use(o, host)?))
            },
        )
    }
}
