//! The API server a store mirrors. In `membrane up` the store is fed by
//! watches of the embedded Kubernetes API; the local API (`membrane
//! apply/delete/get`) must write into that API, not into the mirror, and
//! read from it so an apply is visible to the very next get (the mirror
//! lags by one watch event).

use std::sync::Arc;

use crate::{Change, Kind, Object, ObjectKey};

/// Where a store's writes really go, and where reads see them at once.
/// Synchronous: call it off the async workers.
pub trait Upstream: Send + Sync + 'static {
    /// Applies every object (server-side apply, document order). Results in
    /// input order; an error names the object and why the API refused it.
    fn apply(&self, objs: &[Object]) -> Vec<Result<Change, String>>;
    /// Deletes every key; `Ok(false)` when it was not there.
    fn delete(&self, keys: &[ObjectKey]) -> Vec<Result<bool, String>>;
    fn get(&self, key: &ObjectKey) -> Result<Option<Object>, String>;
    /// Objects of `kind`, in `namespace` or all, sorted by key.
    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Object>, String>;
}

/// A shared handle to an [`Upstream`].
pub type SharedUpstream = Arc<dyn Upstream>;
