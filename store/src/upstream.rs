//! The API server a store mirrors. In `membrane up` the store is fed by
//! watches of the embedded Kubernetes API; the local API (`membrane
//! apply/delete/get`) must write into that API, not into the mirror, and
//! read from it so an apply is visible to the very next get (the mirror
//! lags by one watch event). Components that write the store directly
//! (the CNI's CiliumNode) keep working: on a mirroring store, [`Store::apply`],
//! [`Store::update_status`] and [`Store::delete`] also write to the API, in
//! order, from one background thread (the mirror has the write at once; the
//! API's version replaces it when its watch event arrives).
//!
//! [`Store::apply`]: crate::Store::apply
//! [`Store::update_status`]: crate::Store::update_status
//! [`Store::delete`]: crate::Store::delete

use std::sync::{Arc, mpsc};

use serde_json::Value;

use crate::{Change, Kind, Object, ObjectKey};

/// Where a store's writes really go, and where reads see them at once.
/// Synchronous: call it off the async workers.
pub trait Upstream: Send + Sync + 'static {
    /// Applies every object (server-side apply, document order). Results in
    /// input order; an error names the object and why the API refused it.
    fn apply(&self, objs: &[Object]) -> Vec<Result<Change, String>>;
    /// Deletes every key; `Ok(false)` when it was not there.
    fn delete(&self, keys: &[ObjectKey]) -> Vec<Result<bool, String>>;
    /// Replaces an object's status.
    fn status(&self, key: &ObjectKey, status: Value) -> Result<(), String>;
    fn get(&self, key: &ObjectKey) -> Result<Option<Object>, String>;
    /// Objects of `kind`, in `namespace` or all, sorted by key.
    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Object>, String>;
}

/// A shared handle to an [`Upstream`].
pub type SharedUpstream = Arc<dyn Upstream>;

/// A direct write to a mirroring store, on its way to the API.
pub(crate) enum Forward {
    Apply(Box<Object>),
    Status(ObjectKey, Value),
    Delete(ObjectKey),
}

/// What a store mirrors: the API the local API reads and writes, and the
/// ordered queue of direct writes to `writer`.
pub(crate) struct Mirror {
    pub(crate) api: SharedUpstream,
    forward: mpsc::Sender<Forward>,
}

impl Mirror {
    /// Starts the forwarding thread (it ends when the store is dropped).
    pub(crate) fn new(api: SharedUpstream, writer: SharedUpstream) -> std::io::Result<Mirror> {
        let (forward, rx) = mpsc::channel::<Forward>();
        std::thread::Builder::new()
            .name("store-upstream".into())
            .spawn(move || {
                for op in rx {
                    let (what, result) = match op {
                        Forward::Apply(obj) => (
                            obj.key(),
                            writer.apply(std::slice::from_ref(&*obj)).pop().map(|r| r.map(drop)),
                        ),
                        Forward::Status(key, status) => {
                            let r = writer.status(&key, status);
                            (key, Some(r))
                        }
                        Forward::Delete(key) => {
                            let r = writer.delete(std::slice::from_ref(&key)).pop();
                            (key, r.map(|r| r.map(drop)))
                        }
                    };
                    if let Some(Err(e)) = result {
                        tracing::warn!(object = %what, error = %e, "writing to the API the store mirrors");
                    }
                }
            })?;
        Ok(Mirror { api, forward })
    }

    pub(crate) fn send(&self, op: Forward) {
        // The thread only ends with the store.
        let _ = self.forward.send(op);
    }
}
