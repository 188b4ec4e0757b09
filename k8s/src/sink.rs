//! The output seam of Membrane's controllers. The Ingress controller, LB
//! IPAM, Ingress status and the agent's ACK reports write through a
//! [`Sink`]; whether that is the in-process store (`membrane up`) or the
//! Kubernetes API (`membrane operator` / `membrane agent`) is decided once,
//! where the process is wired, and no controller logic depends on it.
//!
//! [`KubeSink`] keeps writes off the reconcile pass: a pass only enqueues;
//! one writer task per process drains the queue with a few writes in
//! flight, coalescing by object (the latest desired state of an object
//! wins; a repeat of the write in flight is dropped, and so is anything
//! queued for that object before the repeat), retrying failures
//! with exponential backoff and a conflict at once. Behind a leader gate it
//! writes only while the gate is open and drops everything queued the
//! moment it closes: the next leader derives its writes from the state it
//! reads, not from what this process had queued.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use membrane_store::{Object, ObjectKey, Store};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::events::EventRecorder;
use crate::write::{WriteError, Writer};

/// A Warning Event about one object (a rejection), deduplicated by the
/// recorder: the same warning again raises its count, not a new Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub regarding: ObjectKey,
    /// The object's uid, so `kubectl describe` finds the Event.
    pub uid: Option<String>,
    /// CamelCase reason, e.g. `InvalidIngress`.
    pub reason: String,
    /// Human-readable note naming the offending field.
    pub note: String,
}

/// Where controllers write what they generate.
pub trait Sink: Send + Sync {
    /// Create or update objects (all fields the controller sets).
    fn apply_all(&self, objs: Vec<Object>);
    /// Delete an object; one already gone is fine.
    fn delete(&self, key: &ObjectKey);
    /// Replace an object's status.
    fn status(&self, key: &ObjectKey, status: Value);
    /// Record a Warning Event.
    fn warn(&self, warning: Warning);
}

/// Writes into the in-process store, synchronously.
#[derive(Clone, Debug)]
pub struct StoreSink(pub Store);

impl Sink for StoreSink {
    fn apply_all(&self, objs: Vec<Object>) {
        self.0.apply_all(objs);
    }
    fn delete(&self, key: &ObjectKey) {
        self.0.delete(key);
    }
    fn status(&self, key: &ObjectKey, status: Value) {
        self.0.update_status(key, status);
    }
    fn warn(&self, warning: Warning) {
        // The store has no Events: rejections reach the user through
        // `membrane status` (the agent's rejection list) instead.
        debug!(object = %warning.regarding, reason = %warning.reason, "warning");
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Apply(Box<Object>),
    Delete(ObjectKey),
    Status(ObjectKey, Value),
    Warn(Warning),
}

/// What one queued write is about: later writes to the same slot replace
/// earlier ones still queued.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Object(ObjectKey),
    Status(ObjectKey),
    Event(ObjectKey, String, String),
}

impl Op {
    fn slot(&self) -> Slot {
        match self {
            Op::Apply(o) => Slot::Object(o.key()),
            Op::Delete(k) => Slot::Object(k.clone()),
            Op::Status(k, _) => Slot::Status(k.clone()),
            Op::Warn(w) => Slot::Event(w.regarding.clone(), w.reason.clone(), w.note.clone()),
        }
    }
}

struct Queued {
    op: Op,
    seq: u64,
    attempts: u32,
    due: Instant,
}

/// Writes to a Kubernetes API from a queue (see the module docs).
#[derive(Clone)]
pub struct KubeSink {
    tx: mpsc::UnboundedSender<Op>,
}

impl std::fmt::Debug for KubeSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSink").finish_non_exhaustive()
    }
}

impl KubeSink {
    /// Starts the writer task. With a `gate`, writes happen only while it
    /// reads `true` (leadership); without, always.
    pub fn spawn(
        writer: Writer,
        recorder: Option<EventRecorder>,
        gate: Option<watch::Receiver<bool>>,
    ) -> KubeSink {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(rx, writer, recorder, gate));
        KubeSink { tx }
    }

    fn send(&self, op: Op) {
        // The writer only stops with the runtime.
        let _ = self.tx.send(op);
    }
}

impl Sink for KubeSink {
    fn apply_all(&self, objs: Vec<Object>) {
        for o in objs {
            self.send(Op::Apply(Box::new(o)));
        }
    }
    fn delete(&self, key: &ObjectKey) {
        self.send(Op::Delete(key.clone()));
    }
    fn status(&self, key: &ObjectKey, status: Value) {
        self.send(Op::Status(key.clone(), status));
    }
    fn warn(&self, warning: Warning) {
        self.send(Op::Warn(warning));
    }
}

/// Backoff after the `attempts`-th failure: 100 ms doubling up to 10 s.
fn backoff(attempts: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << attempts.saturating_sub(1).min(7));
    Duration::from_millis(ms.min(10_000))
}

struct Queue {
    items: BTreeMap<Slot, Queued>,
    seq: u64,
}

impl Queue {
    fn push(&mut self, op: Op) {
        self.seq += 1;
        self.items.insert(
            op.slot(),
            Queued {
                op,
                seq: self.seq,
                attempts: 0,
                due: Instant::now(),
            },
        );
    }
}

/// Writes in flight at once: the API answers each in milliseconds, and
/// hundreds of objects written one by one would keep an Ingress waiting
/// for seconds.
const PARALLEL: usize = 16;

/// A finished write: its slot, op, seq, attempts so far, and outcome.
type Landed = (Slot, Arc<Op>, u64, u32, Result<(), WriteError>);
type Flight = futures::future::BoxFuture<'static, Landed>;

async fn write_loop(
    mut rx: mpsc::UnboundedReceiver<Op>,
    writer: Writer,
    recorder: Option<EventRecorder>,
    mut gate: Option<watch::Receiver<bool>>,
) {
    use futures::StreamExt;
    let mut queue = Queue {
        items: BTreeMap::new(),
        seq: 0,
    };
    let mut flights: futures::stream::FuturesUnordered<Flight> = Default::default();
    // The op of every slot in flight: the same op again is dropped (a pass
    // repeating a write it cannot see yet), a different one waits its turn.
    let mut flying: BTreeMap<Slot, Arc<Op>> = BTreeMap::new();
    let open = |gate: &Option<watch::Receiver<bool>>| gate.as_ref().is_none_or(|g| *g.borrow());
    let enqueue = |queue: &mut Queue, flying: &BTreeMap<Slot, Arc<Op>>, op: Op| {
        let slot = op.slot();
        if flying.get(&slot).is_some_and(|f| **f == op) {
            // The write in flight is again the latest desired state: a
            // different write queued for the slot meanwhile is older and
            // must not land after it (a report acked -> pending -> acked
            // would end as pending, and an agent that writes its report
            // only when it changes would never correct it).
            queue.items.remove(&slot);
            return;
        }
        queue.push(op);
    };
    loop {
        let next_due = queue.items.values().map(|q| q.due).min();
        let is_open = open(&gate);
        tokio::select! {
            op = rx.recv() => match op {
                Some(op) => enqueue(&mut queue, &flying, op),
                None => return,
            },
            Some((slot, op, seq, attempts, result)) = flights.next(), if !flights.is_empty() => {
                flying.remove(&slot);
                while let Ok(op) = rx.try_recv() {
                    enqueue(&mut queue, &flying, op);
                }
                if let Err(e) = result {
                    let op = Arc::try_unwrap(op).unwrap_or_else(|shared| (*shared).clone());
                    retry(&mut queue, slot, Queued { op, seq, attempts, due: Instant::now() }, e);
                }
            }
            _ = sleep_until(next_due), if next_due.is_some() && is_open => {}
            r = gate_changed(&mut gate) => if r.is_err() { return },
        }
        while let Ok(op) = rx.try_recv() {
            enqueue(&mut queue, &flying, op);
        }
        if !open(&gate) {
            // Losing the lease stops writing at once: queued writes are
            // dropped and those in flight abandoned.
            if !queue.items.is_empty() || !flights.is_empty() {
                debug!(
                    dropped = queue.items.len() + flights.len(),
                    "not leading: writes dropped"
                );
            }
            queue.items.clear();
            flights = Default::default();
            flying.clear();
            continue;
        }
        let now = Instant::now();
        // A status waits for a write of its object in flight or queued
        // before it: the status subresource of an object not created yet
        // is not found. (A write of the object queued after the status does
        // not hold it back: a pass repeating an apply must not starve it.)
        let object_pending = |s: &Slot, seq: u64| match s {
            Slot::Status(k) => {
                let object = Slot::Object(k.clone());
                flying.contains_key(&object)
                    || queue.items.get(&object).is_some_and(|o| o.seq < seq)
            }
            _ => false,
        };
        let mut due: Vec<(u64, Slot)> = queue
            .items
            .iter()
            .filter(|(s, q)| q.due <= now && !flying.contains_key(*s) && !object_pending(s, q.seq))
            .map(|(s, q)| (q.seq, s.clone()))
            .collect();
        due.sort();
        for (_, slot) in due.into_iter().take(PARALLEL.saturating_sub(flights.len())) {
            let Some(q) = queue.items.remove(&slot) else {
                continue;
            };
            let op = Arc::new(q.op);
            flying.insert(slot.clone(), op.clone());
            let (writer, recorder) = (writer.clone(), recorder.clone());
            let (seq, attempts) = (q.seq, q.attempts);
            flights.push(Box::pin(async move {
                let result = perform(&writer, recorder.as_ref(), &op).await;
                (slot, op, seq, attempts, result)
            }));
        }
    }
}

/// A failed write goes back into the queue, unless a newer one for the
/// same slot arrived meanwhile.
fn retry(queue: &mut Queue, slot: Slot, q: Queued, e: WriteError) {
    // A status for an object that is gone has nothing left to do, nor has
    // an Event in a namespace that is gone.
    if matches!(
        (&q.op, &e),
        (
            Op::Status(..) | Op::Warn(..),
            WriteError::Refused { code: 404, .. }
        )
    ) {
        debug!(error = %e, "write about a deleted object dropped");
        return;
    }
    // A write into a namespace that is gone or being deleted can never
    // land; the next pass derives what is still wanted from what it reads.
    if let WriteError::Refused {
        code: 403 | 404,
        message,
        ..
    } = &e
        && (message.contains("because it is being terminated")
            || (message.starts_with("namespaces \"") && message.ends_with("not found")))
    {
        warn!(error = %e, "namespace gone: write dropped");
        return;
    }
    if queue.items.contains_key(&slot) {
        return;
    }
    let attempts = q.attempts + 1;
    let delay = if matches!(e, WriteError::Conflict { .. }) {
        Duration::ZERO
    } else {
        backoff(attempts)
    };
    warn!(error = %e, attempts, retry_in_ms = delay.as_millis() as u64, "write failed; retrying");
    queue.items.insert(
        slot,
        Queued {
            due: Instant::now() + delay,
            attempts,
            ..q
        },
    );
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn gate_changed(
    gate: &mut Option<watch::Receiver<bool>>,
) -> Result<(), watch::error::RecvError> {
    match gate {
        Some(g) => g.changed().await,
        None => std::future::pending().await,
    }
}

async fn perform(
    writer: &Writer,
    recorder: Option<&EventRecorder>,
    op: &Op,
) -> Result<(), WriteError> {
    match op {
        Op::Apply(o) => writer.apply(o).await,
        Op::Delete(k) => writer.delete(k).await,
        Op::Status(k, s) => writer.apply_status(k, s.clone()).await,
        Op::Warn(w) => match recorder {
            Some(r) => r.warn(w).await,
            None => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(1600));
        assert_eq!(backoff(30), Duration::from_millis(10_000));
    }

    /// Only the leader writes: nothing goes out while the gate is closed,
    /// what was queued then is dropped, and a write made while open is a
    /// server-side apply of the status with the operator's field manager.
    #[tokio::test]
    async fn writes_only_while_the_gate_is_open() {
        use http::{Request, Response};
        use kube::client::Body;
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let (gate_tx, gate_rx) = watch::channel(false);
        let sink = KubeSink::spawn(
            Writer::new(client, crate::OPERATOR_MANAGER),
            None,
            Some(gate_rx),
        );
        let key = ObjectKey::new(membrane_store::Kind::Ingress, "a", "web");
        let quiet = Duration::from_millis(300);
        sink.status(
            &key,
            serde_json::json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}),
        );
        assert!(
            tokio::time::timeout(quiet, handle.next_request())
                .await
                .is_err(),
            "a standby wrote"
        );
        gate_tx.send_replace(true);
        assert!(
            tokio::time::timeout(quiet, handle.next_request())
                .await
                .is_err(),
            "a write queued while standing by went out"
        );
        sink.status(
            &key,
            serde_json::json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.2"}]}}),
        );
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
            .await
            .expect("the leader writes")
            .expect("request");
        assert_eq!(req.method().as_str(), "PATCH");
        assert_eq!(
            req.uri().path(),
            "/apis/networking.k8s.io/v1/namespaces/a/ingresses/web/status"
        );
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert!(query.contains("fieldManager=membrane-operator"), "{query}");
        assert!(query.contains("force=true"), "{query}");
        let bytes = req.into_body().collect_bytes().await.expect("body");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            body["status"]["loadBalancer"]["ingress"][0]["ip"],
            "10.0.0.2"
        );
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("response"),
        );
    }

    /// A status queued after its object's apply is sent only once that
    /// apply is answered: the status of an object not created yet is 404.
    #[tokio::test]
    async fn a_status_waits_for_its_objects_apply() {
        use http::{Request, Response};
        use kube::client::Body;
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let sink = KubeSink::spawn(Writer::new(client, crate::AGENT_MANAGER), None, None);
        let obj = Object::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s", "namespace": "a"},
            "spec": {"ports": [{"port": 80}]},
        }))
        .expect("service");
        let key = obj.key();
        sink.apply_all(vec![obj]);
        sink.status(
            &key,
            serde_json::json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}),
        );
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
            .await
            .expect("the apply goes out")
            .expect("request");
        assert_eq!(req.uri().path(), "/api/v1/namespaces/a/services/s");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), handle.next_request())
                .await
                .is_err(),
            "the status went out before its object's apply was answered"
        );
        let bytes = req.into_body().collect_bytes().await.expect("body");
        send.send_response(
            Response::builder()
                .body(Body::from(bytes.to_vec()))
                .expect("response"),
        );
        let (req, _send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
            .await
            .expect("the status goes out")
            .expect("request");
        assert_eq!(req.uri().path(), "/api/v1/namespaces/a/services/s/status");
    }

    type Mock = tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >;

    /// The next request within `wait`: its path, JSON body and responder.
    async fn next_write(
        handle: &mut Mock,
        wait: Duration,
    ) -> Option<(
        String,
        serde_json::Value,
        tower_test::mock::SendResponse<http::Response<kube::client::Body>>,
    )> {
        let (req, send) = tokio::time::timeout(wait, handle.next_request())
            .await
            .ok()??;
        let path = req.uri().path().to_owned();
        let bytes = req.into_body().collect_bytes().await.ok()?;
        let body = serde_json::from_slice(&bytes).ok()?;
        Some((path, body, send))
    }

    /// Status X is in flight, Y is queued behind it, then X is desired
    /// again: X is what the object must end with. Sending Y after X would
    /// leave it stale, and an agent that publishes its ACK report only
    /// when it changes (acked -> pending -> acked) would never correct it.
    #[tokio::test]
    async fn a_repeat_of_the_write_in_flight_drops_an_older_queued_write() {
        use http::{Request, Response};
        use kube::client::Body;
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let sink = KubeSink::spawn(Writer::new(client, crate::AGENT_MANAGER), None, None);
        let report = ObjectKey::new(membrane_store::Kind::Ingress, "a", "web");
        let other = ObjectKey::new(membrane_store::Kind::Ingress, "a", "other");
        let acked = serde_json::json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}});
        let pending = serde_json::json!({"loadBalancer": {}});
        sink.status(&report, acked.clone());
        let wait = Duration::from_secs(10);
        let (path, first, in_flight) = next_write(&mut handle, wait)
            .await
            .expect("the first write goes out");
        assert!(path.ends_with("/ingresses/web/status"), "{path}");
        assert_eq!(first["status"], acked);
        sink.status(&report, pending.clone());
        sink.status(&report, acked.clone());
        // A write of another object queued last goes out once the writer
        // has taken in everything before it, while the first is in flight.
        sink.status(&other, pending.clone());
        let (path, body, send) = next_write(&mut handle, wait)
            .await
            .expect("the other write goes out");
        assert!(path.ends_with("/ingresses/other/status"), "{path}");
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("response"),
        );
        in_flight.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&first).expect("json")))
                .expect("response"),
        );
        // Whatever goes out after that must not leave the object pending.
        let mut last = acked.clone();
        let quiet = Duration::from_millis(500);
        while let Some((path, body, send)) = next_write(&mut handle, quiet).await {
            if path.ends_with("/ingresses/web/status") {
                last = body["status"].clone();
            }
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
        }
        assert_eq!(last, acked, "an older queued write landed after the latest");
    }

    #[test]
    fn later_writes_to_an_object_replace_queued_ones() {
        let key = ObjectKey::new(membrane_store::Kind::Service, "a", "s");
        let mut q = Queue {
            items: BTreeMap::new(),
            seq: 0,
        };
        q.push(Op::Status(key.clone(), serde_json::json!({"a": 1})));
        q.push(Op::Delete(key.clone()));
        q.push(Op::Status(key.clone(), serde_json::json!({"a": 2})));
        assert_eq!(q.items.len(), 2);
        match &q.items[&Slot::Status(key)].op {
            Op::Status(_, v) => assert_eq!(v["a"], 2),
            other => panic!("unexpected {other:?}"),
        }
    }
}
