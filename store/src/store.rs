use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use tokio::sync::watch;

use crate::{Kind, Object, ObjectKey, Typed};

/// A persistent (structurally shared) ordered map: a snapshot is an O(1)
/// clone, and a write while snapshots are alive copies only the path to the
/// changed entry, not the whole map (which made every write O(objects) and
/// a bulk load quadratic).
type Objects = imbl::OrdMap<ObjectKey, Arc<Object>>;

/// What an apply did, as kubectl reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

impl Change {
    /// kubectl's word for it: `created`, `configured`, `unchanged`.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Configured => "configured",
            Change::Unchanged => "unchanged",
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one object at one revision (see [`Store::changes_since`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyChangeKind {
    Created,
    /// Anything outside `status` changed (metadata or spec).
    Updated,
    /// Only `status` changed ([`Store::update_status`]).
    StatusUpdated,
    Deleted,
}

/// One entry of the store's change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyChange {
    pub revision: u64,
    pub key: ObjectKey,
    pub kind: KeyChangeKind,
}

/// What changed since a revision a consumer last saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Every object change in order (problems, which have no key, bump the
    /// revision without an entry).
    Keys(Vec<KeyChange>),
    /// The consumer fell behind the bounded log (or never read): it must
    /// re-read the whole snapshot.
    Resync,
}

impl Changes {
    /// Whether nothing changed (a resync always counts as a change).
    pub fn is_empty(&self) -> bool {
        matches!(self, Changes::Keys(k) if k.is_empty())
    }
}

impl Changes {
    /// Whether any change is to an object of one of `kinds` (a resync
    /// counts for every kind).
    pub fn touch_any(&self, kinds: &[Kind]) -> bool {
        match self {
            Changes::Resync => true,
            Changes::Keys(keys) => keys.iter().any(|c| kinds.contains(&c.key.kind)),
        }
    }
}

/// One consumer's place in the change log: each [`ChangeCursor::advance`]
/// returns what changed since the previous call ([`Changes::Resync`] the
/// first time, and whenever the consumer fell behind the bounded log).
#[derive(Clone, Copy, Debug, Default)]
pub struct ChangeCursor {
    seen: Option<u64>,
}

impl ChangeCursor {
    /// The changes since the last call. A snapshot taken after this call
    /// holds at least them (later ones are read again next time).
    pub fn advance(&mut self, store: &Store) -> Changes {
        let (rev, changes) = match self.seen {
            Some(seen) => store.changes_since(seen),
            None => (store.revision(), Changes::Resync),
        };
        self.seen = Some(rev);
        changes
    }
}

/// Entries kept in the change log (about 1 MiB); a consumer further
/// behind resyncs. Only bulk loads get that far ahead of a reader, and for
/// those one full pass is the cheaper way anyway.
pub const CHANGE_LOG_CAPACITY: usize = 8_192;

/// The typed object store shared by sources (writers) and controllers
/// (readers). Cloning is cheap; all clones share one store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    tx: watch::Sender<u64>,
    /// The API this store mirrors, if any (see [`crate::Upstream`]).
    upstream: std::sync::OnceLock<crate::upstream::Mirror>,
}

/// Which source scope claims an object, with the version it supplied.
type ScopeId = (String, String);

#[derive(Default)]
struct State {
    /// Shared with snapshots; writes copy only what they touch.
    objects: Objects,
    revision: u64,
    problems: BTreeMap<String, String>,
    /// What each source scope declares. A claim shares the object the
    /// store holds for it (no second copy of every watched object); it
    /// remembers whether the declared object carried a status, since a
    /// claim re-applied on release restores only what was declared.
    scopes: BTreeMap<ScopeId, BTreeMap<ObjectKey, Claim>>,
    /// The latest object changes, oldest first, at most
    /// [`CHANGE_LOG_CAPACITY`].
    log: VecDeque<KeyChange>,
    /// Changes at or below this revision may have left the log.
    log_floor: u64,
}

/// One scope's version of an object: the stored object its write produced.
#[derive(Clone, Debug)]
struct Claim {
    object: Arc<Object>,
    with_status: bool,
}

impl Claim {
    /// The object as the scope declared it, to apply again.
    fn declared(&self) -> Object {
        let mut obj = (*self.object).clone();
        if !self.with_status {
            obj.clear_status();
        }
        obj
    }
}

/// One change to the set of objects a source scope owns, see
/// [`crate::SourceWriter::update_scopes`].
#[derive(Clone, Debug)]
pub struct ScopeUpdate {
    pub scope: String,
    pub objects: Vec<Object>,
    /// When true, objects the scope owned before and are not in `objects`
    /// stay (used when part of a scope could not be read); when false they
    /// are released.
    pub keep_missing: bool,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl Store {
    pub fn new() -> Store {
        let (tx, _) = watch::channel(0);
        Store {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                tx,
                upstream: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Marks this store as a mirror of an API: the local API writes into
    /// and reads from `api`; direct writes to this store ([`Self::apply`],
    /// [`Self::update_status`], [`Self::delete`]) are also made through
    /// `writer` (see [`crate::Upstream`]). Set once; later calls are ignored.
    pub fn set_upstream(
        &self,
        api: crate::SharedUpstream,
        writer: crate::SharedUpstream,
    ) -> std::io::Result<()> {
        if self.inner.upstream.get().is_none() {
            let _ = self
                .inner
                .upstream
                .set(crate::upstream::Mirror::new(api, writer)?);
        }
        Ok(())
    }

    /// The API this store mirrors, if it mirrors one.
    pub fn upstream(&self) -> Option<crate::SharedUpstream> {
        self.inner.upstream.get().map(|m| m.api.clone())
    }

    fn forward(&self, op: impl FnOnce() -> crate::upstream::Forward) {
        if let Some(m) = self.inner.upstream.get() {
            m.send(op());
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-written in
        // a way readers could not handle; keep serving.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` under the lock and notifies subscribers once if anything changed.
    fn write<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.lock();
        let before = state.revision;
        let out = f(&mut state);
        if state.revision != before {
            self.inner.tx.send_replace(state.revision);
        }
        out
    }

    /// Inserts or replaces an object, setting metadata as the API server
    /// would: namespace `default` for namespaced kinds when empty, `uid`
    /// (kept if given, else stable per key), `creationTimestamp` on create,
    /// `resourceVersion` (the store revision) on every real change,
    /// `generation` 1 on create and +1 when anything outside metadata and
    /// status changes. A missing status keeps the stored one. Unchanged
    /// content gives [`Change::Unchanged`] and no notification.
    pub fn apply(&self, obj: Object) -> Change {
        self.forward(|| crate::upstream::Forward::Apply(Box::new(obj.clone())));
        self.write(|state| state.apply(obj))
    }

    /// Applies several objects as one atomic change (one notification);
    /// results are in input order. For the apply API, which validates every
    /// document first and then applies all of them.
    pub fn apply_all(&self, objs: Vec<Object>) -> Vec<Change> {
        for o in &objs {
            self.forward(|| crate::upstream::Forward::Apply(Box::new(o.clone())));
        }
        self.write(|state| objs.into_iter().map(|o| state.apply(o)).collect())
    }

    /// Deletes several objects as one atomic change; results in input order.
    pub fn delete_all(&self, keys: &[ObjectKey]) -> Vec<Option<Object>> {
        for k in keys {
            self.forward(|| crate::upstream::Forward::Delete(k.clone()));
        }
        self.write(|state| keys.iter().map(|k| state.delete(k, true)).collect())
    }

    /// Deletes an object; deleting a Namespace deletes every object in it.
    /// Returns the deleted object.
    pub fn delete(&self, key: &ObjectKey) -> Option<Object> {
        self.forward(|| crate::upstream::Forward::Delete(key.clone()));
        self.write(|state| state.delete(key, true))
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Arc<Object>> {
        self.lock().objects.get(key).cloned()
    }

    /// Objects of a kind, optionally in one namespace (ignored for
    /// cluster-scoped kinds), sorted by key.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Arc<Object>> {
        let objects = self.lock().objects.clone();
        range(&objects, kind, namespace).cloned().collect()
    }

    /// A clone of one typed object.
    pub fn get_typed<T: Typed>(&self, ns: &str, name: &str) -> Option<T> {
        let obj = self.get(&ObjectKey::new(T::KIND, ns, name))?;
        T::from_object(&obj).cloned()
    }

    /// A consistent view of every object at one revision. Cheap: the map is
    /// shared until the next write.
    pub fn snapshot(&self) -> StoreSnapshot {
        let state = self.lock();
        StoreSnapshot {
            revision: state.revision,
            objects: state.objects.clone(),
        }
    }

    /// Replaces `status` only (no generation bump; no-op if equal). Returns
    /// false if the object is gone, its kind has no status, or `status` does
    /// not fit the kind's status type.
    pub fn update_status(&self, key: &ObjectKey, status: Value) -> bool {
        self.forward(|| crate::upstream::Forward::Status(key.clone(), status.clone()));
        self.write(|state| {
            let Some(existing) = state.objects.get(key) else {
                return false;
            };
            let mut updated = (**existing).clone();
            if let Err(e) = updated.set_status_value(status) {
                tracing::warn!(object = %key, error = %e, "status update rejected");
                return false;
            }
            if updated == **existing {
                return true;
            }
            let rv = state.next_revision();
            updated.meta_mut().resource_version = Some(rv.to_string());
            state.objects.insert(key.clone(), Arc::new(updated));
            state.log(key.clone(), KeyChangeKind::StatusUpdated);
            true
        })
    }

    /// Receives the revision, bumped on every change (objects or problems).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.tx.subscribe()
    }

    /// The object changes after revision `since`, and the revision they
    /// lead to (read a snapshot at or after it to see their content).
    /// [`Changes::Resync`] when the bounded log no longer reaches back to
    /// `since`. A consumer keeps the returned revision for its next call.
    pub fn changes_since(&self, since: u64) -> (u64, Changes) {
        let state = self.lock();
        (state.revision, state.changes_since(since))
    }

    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Records (or clears, with `None`) a problem found by a source, keyed by
    /// its origin (e.g. `file examples/x.yaml`).
    pub fn set_problem(&self, origin: &str, problem: Option<String>) {
        self.write(|state| state.set_problem(origin, problem))
    }

    pub fn problems(&self) -> BTreeMap<String, String> {
        self.lock().problems.clone()
    }

    /// A writer for a source named `source`; see [`crate::SourceWriter`].
    pub fn writer(&self, source: &str) -> crate::SourceWriter {
        crate::SourceWriter::new(self.clone(), source)
    }

    /// Runs a source on the tokio runtime, writing into this store.
    pub fn spawn_source<S: crate::Source>(
        &self,
        source: S,
    ) -> tokio::task::JoinHandle<Result<(), crate::StoreError>> {
        let writer = self.writer(&source.name());
        tokio::spawn(source.run(writer))
    }

    // ---- scope ownership, used by SourceWriter ----

    pub(crate) fn update_scopes(&self, source: &str, updates: Vec<ScopeUpdate>) {
        self.write(|state| state.update_scopes(source, updates))
    }

    pub(crate) fn apply_in_scope(&self, source: &str, scope: &str, obj: Object) {
        self.write(|state| state.apply_in_scope(source, scope, obj))
    }

    pub(crate) fn release_from_source(&self, source: &str, key: &ObjectKey) {
        self.write(|state| {
            let mut released = false;
            for ((src, _), claims) in state.scopes.iter_mut() {
                if src == source {
                    released |= claims.remove(key).is_some();
                }
            }
            state.scopes.retain(|_, claims| !claims.is_empty());
            if released || state.objects.contains_key(key) {
                state.release(key);
            }
        })
    }

    pub(crate) fn scopes_of(&self, source: &str) -> Vec<String> {
        self.lock()
            .scopes
            .keys()
            .filter(|(src, _)| src == source)
            .map(|(_, scope)| scope.clone())
            .collect()
    }
}

impl State {
    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Records a change of `key` at the current revision.
    fn log(&mut self, key: ObjectKey, kind: KeyChangeKind) {
        while self.log.len() >= CHANGE_LOG_CAPACITY {
            if let Some(old) = self.log.pop_front() {
                self.log_floor = old.revision;
            }
        }
        self.log.push_back(KeyChange {
            revision: self.revision,
            key,
            kind,
        });
    }

    fn changes_since(&self, since: u64) -> Changes {
        if since >= self.revision {
            return Changes::Keys(Vec::new());
        }
        if since < self.log_floor {
            return Changes::Resync;
        }
        // Entries are in revision order: skip what the consumer saw.
        let start = self.log.partition_point(|c| c.revision <= since);
        Changes::Keys(self.log.range(start..).cloned().collect())
    }

    fn apply(&mut self, mut obj: Object) -> Change {
        obj.normalize();
        let key = obj.key();
        {
            let meta = obj.meta_mut();
            meta.resource_version = None;
            meta.managed_fields = None;
        }
        let existing = self.objects.get(&key).cloned();
        let mut status_only = false;
        let change = match existing {
            Some(existing) => {
                if obj.status_is_none() {
                    obj.copy_status_from(&existing);
                }
                let old = existing.meta();
                let meta = obj.meta_mut();
                if meta.uid.is_none() {
                    meta.uid.clone_from(&old.uid);
                }
                if meta.creation_timestamp.is_none() {
                    meta.creation_timestamp.clone_from(&old.creation_timestamp);
                }
                meta.generation = old.generation;
                meta.resource_version.clone_from(&old.resource_version);
                if obj == *existing {
                    return Change::Unchanged;
                }
                if obj.body() != existing.body() {
                    let meta = obj.meta_mut();
                    meta.generation = Some(meta.generation.unwrap_or(0) + 1);
                } else if obj.meta() == existing.meta() {
                    // Only the status differs: a status write that reached
                    // the store as a whole object (a watcher's event).
                    status_only = true;
                }
                Change::Configured
            }
            None => {
                obj.default_status();
                let meta = obj.meta_mut();
                if meta.uid.is_none() {
                    meta.uid = Some(stable_uid(&key));
                }
                if meta.creation_timestamp.is_none() {
                    // The API server stores seconds.
                    let now = Timestamp::from_second(Timestamp::now().as_second())
                        .unwrap_or_else(|_| Timestamp::now());
                    meta.creation_timestamp = Some(Time(now));
                }
                meta.generation = Some(1);
                Change::Created
            }
        };
        let rv = self.next_revision();
        obj.meta_mut().resource_version = Some(rv.to_string());
        let kind = match change {
            Change::Created => KeyChangeKind::Created,
            _ if status_only => KeyChangeKind::StatusUpdated,
            _ => KeyChangeKind::Updated,
        };
        self.objects.insert(key.clone(), Arc::new(obj));
        self.log(key, kind);
        change
    }

    /// Deletes `key`. For a Namespace, also deletes the objects in it: all
    /// of them when `cascade_all`, else only those no source claims (a source
    /// still declaring an object keeps it, so a namespace that briefly
    /// disappears from a manifest file does not take other files down).
    fn delete(&mut self, key: &ObjectKey, cascade_all: bool) -> Option<Object> {
        let objects = &mut self.objects;
        let removed = objects.remove(key)?;
        if key.kind == Kind::Namespace {
            let claimed: BTreeSet<&ObjectKey> = self
                .scopes
                .values()
                .flat_map(|claims| claims.keys())
                .collect();
            let doomed: Vec<ObjectKey> = objects
                .keys()
                .filter(|k| k.kind.namespaced() && k.namespace == key.name)
                .filter(|k| cascade_all || !claimed.contains(k))
                .cloned()
                .collect();
            for k in &doomed {
                objects.remove(k);
            }
            self.next_revision();
            for k in doomed {
                self.log(k, KeyChangeKind::Deleted);
            }
        } else {
            self.next_revision();
        }
        self.log(key.clone(), KeyChangeKind::Deleted);
        Some(Arc::unwrap_or_clone(removed))
    }

    fn set_problem(&mut self, origin: &str, problem: Option<String>) {
        let changed = match problem {
            Some(p) => self.problems.insert(origin.to_string(), p.clone()).as_ref() != Some(&p),
            None => self.problems.remove(origin).is_some(),
        };
        if changed {
            self.next_revision();
        }
    }

    fn apply_in_scope(&mut self, source: &str, scope: &str, mut obj: Object) {
        obj.normalize();
        let key = obj.key();
        let with_status = !obj.status_is_none();
        self.apply(obj);
        if let Some(object) = self.objects.get(&key).cloned() {
            self.scopes
                .entry((source.to_string(), scope.to_string()))
                .or_default()
                .insert(
                    key,
                    Claim {
                        object,
                        with_status,
                    },
                );
        }
    }

    fn update_scopes(&mut self, source: &str, updates: Vec<ScopeUpdate>) {
        // Claims first, then objects, then releases: an object moving from
        // one scope to another (a renamed file) never disappears.
        let mut orphans = Vec::new();
        for update in updates {
            let id = (source.to_string(), update.scope);
            let mut claims = BTreeMap::new();
            for mut obj in update.objects {
                obj.normalize();
                let key = obj.key();
                let with_status = !obj.status_is_none();
                self.apply(obj);
                if let Some(object) = self.objects.get(&key).cloned() {
                    claims.insert(
                        key,
                        Claim {
                            object,
                            with_status,
                        },
                    );
                }
            }
            let old = self.scopes.remove(&id).unwrap_or_default();
            for (key, claim) in old {
                if claims.contains_key(&key) {
                    continue;
                }
                if update.keep_missing {
                    claims.insert(key, claim);
                } else {
                    orphans.push(key);
                }
            }
            if !claims.is_empty() {
                self.scopes.insert(id, claims);
            }
        }
        for key in orphans {
            self.release(&key);
        }
    }

    /// An object lost a claim: if another scope still declares it, that
    /// version is applied; otherwise it is deleted.
    fn release(&mut self, key: &ObjectKey) {
        let other = self
            .scopes
            .values()
            .find_map(|claims| claims.get(key))
            .map(Claim::declared);
        match other {
            Some(obj) => {
                self.apply(obj);
            }
            None => {
                self.delete(key, false);
            }
        }
    }
}

/// A consistent, immutable view of the store at one revision.
#[derive(Clone, Debug)]
pub struct StoreSnapshot {
    revision: u64,
    objects: Objects,
}

impl StoreSnapshot {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Arc<Object>> {
        self.objects.get(key)
    }

    /// Objects of a kind, optionally in one namespace (ignored for
    /// cluster-scoped kinds), sorted by key.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> impl Iterator<Item = &Arc<Object>> {
        range(&self.objects, kind, namespace)
    }

    pub fn typed<'a, T: Typed + 'a>(
        &'a self,
        namespace: Option<&str>,
    ) -> impl Iterator<Item = &'a T> {
        self.list(T::KIND, namespace)
            .filter_map(|o| T::from_object(o))
    }

    pub fn get_typed<T: Typed>(&self, ns: &str, name: &str) -> Option<&T> {
        T::from_object(self.objects.get(&ObjectKey::new(T::KIND, ns, name))?)
    }

    /// Every object, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<Object>)> {
        self.objects.iter()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

fn range<'a>(
    objects: &'a Objects,
    kind: Kind,
    namespace: Option<&str>,
) -> impl Iterator<Item = &'a Arc<Object>> + use<'a> {
    let namespace = namespace.filter(|_| kind.namespaced()).map(str::to_string);
    let start = ObjectKey {
        kind,
        namespace: namespace.clone().unwrap_or_default(),
        name: String::new(),
    };
    objects
        .range(start..)
        .take_while(move |(k, _)| {
            k.kind == kind && namespace.as_ref().is_none_or(|ns| &k.namespace == ns)
        })
        .map(|(_, o)| o)
}

/// A UUID-shaped id derived from the key (FNV-1a, 128 bit), so that the same
/// object gets the same uid across runs and golden outputs stay stable.
fn stable_uid(key: &ObjectKey) -> String {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    let text = format!("{}/{}/{}", key.kind.kind_name(), key.namespace, key.name);
    for b in text.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    // Mark as a version-8 (custom) RFC 9562 UUID.
    h = (h & !(0xf << 76)) | (0x8 << 76);
    h = (h & !(0x3 << 62)) | (0x2 << 62);
    let s = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..32]
    )
}
