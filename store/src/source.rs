use std::future::Future;

use crate::store::ScopeUpdate;
use crate::{Object, ObjectKey, Store, StoreError};

/// A source of objects (a manifest directory, later kube reflectors).
///
/// A source writes through its [`SourceWriter`], which remembers which keys
/// it owns in which scope (a file, a watched kind): an initial listing is a
/// [`SourceWriter::replace_scope`], later events are applies and deletes.
pub trait Source: Send + 'static {
    fn name(&self) -> String;
    fn run(self, writer: SourceWriter) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store as seen by one source: writes are recorded as claims of the
/// source (per scope), so a source can later retract exactly what it wrote.
///
/// When two scopes declare the same object the last write wins; when one of
/// them lets go, the other's version is applied again rather than deleted.
#[derive(Clone, Debug)]
pub struct SourceWriter {
    store: Store,
    source: String,
}

/// The scope of writes made through [`SourceWriter::apply`].
pub const DEFAULT_SCOPE: &str = "";

impl SourceWriter {
    pub(crate) fn new(store: Store, source: &str) -> SourceWriter {
        SourceWriter {
            store,
            source: source.to_string(),
        }
    }

    pub fn source_name(&self) -> &str {
        &self.source
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Upserts an object, owned in the default scope.
    pub fn apply(&self, obj: Object) {
        self.apply_in(DEFAULT_SCOPE, obj);
    }

    /// Upserts an object, owned in `scope`.
    pub fn apply_in(&self, scope: &str, obj: Object) {
        self.store.apply_in_scope(&self.source, scope, obj);
    }

    /// Drops this source's claims on `key` (in every scope) and deletes the
    /// object unless another scope still declares it.
    pub fn delete(&self, key: &ObjectKey) {
        self.store.release_from_source(&self.source, key);
    }

    /// Atomically makes the set owned under `scope` equal to `objs`: upserts
    /// them and releases what the scope owned before and no longer has.
    pub fn replace_scope(&self, scope: &str, objs: Vec<Object>) {
        self.update_scopes(vec![ScopeUpdate {
            scope: scope.to_string(),
            objects: objs,
            keep_missing: false,
        }]);
    }

    /// Upserts `objs` into `scope` without releasing anything it owned
    /// before (for a scope that could only be read in part).
    pub fn upsert_scope(&self, scope: &str, objs: Vec<Object>) {
        self.update_scopes(vec![ScopeUpdate {
            scope: scope.to_string(),
            objects: objs,
            keep_missing: true,
        }]);
    }

    /// Several scope updates as one atomic store change, so that objects
    /// moving between scopes never disappear in between.
    pub fn update_scopes(&self, updates: Vec<ScopeUpdate>) {
        self.store.update_scopes(&self.source, updates);
    }

    /// Scopes that currently own at least one object.
    pub fn scopes(&self) -> Vec<String> {
        self.store.scopes_of(&self.source)
    }

    /// Records (or clears) a problem for a scope; the scope is the origin
    /// shown to users, so sources name scopes descriptively (`file x.yaml`).
    pub fn set_problem(&self, scope: &str, problem: Option<String>) {
        self.store.set_problem(scope, problem);
    }
}
