//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection (which Cilium's operator uses) does it: the leader renews
//! `renewTime` every retry period; a candidate takes the Lease over only
//! after its record (holder, renewTime) has not changed for the lease
//! duration as measured on the candidate's own clock (no clock
//! comparison across machines); every write is guarded by the Lease's
//! resourceVersion, so of two candidates exactly one wins. A leader that
//! cannot renew within the renew deadline, or sees another holder, stops
//! leading at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Cilium's operator Lease name.
pub const CILIUM_OPERATOR_LEASE: &str = "cilium-operator-resource-lock";

/// Timing and identity of one candidate.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per process.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Cilium's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn cilium_defaults(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: CILIUM_OPERATOR_LEASE.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Errors of one acquire/renew attempt.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("lease {namespace}/{name}: no answer within {after:?}")]
    Timeout {
        namespace: String,
        name: String,
        after: Duration,
    },
}

/// One candidate for leadership.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The last Lease record seen (holder, renewTime) and when it changed.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// Starts campaigning; the receiver reads `true` while this process leads.
    /// The campaign ends when every receiver is dropped or the task is
    /// aborted (before [`release`]).
    pub fn spawn(self) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(self.run(tx));
        (rx, task)
    }

    async fn run(mut self, tx: watch::Sender<bool>) {
        let mut last_renew: Option<Instant> = None;
        while !tx.is_closed() {
            let started = Instant::now();
            // A leader's attempt may take until its renew deadline, and no
            // longer: at the deadline it must know it has stopped leading.
            let attempt_limit = match last_renew.filter(|_| *tx.borrow()) {
                Some(t) => self
                    .config
                    .renew_deadline
                    .saturating_sub(t.elapsed())
                    .max(Duration::from_millis(1)),
                None => self.config.renew_deadline,
            };
            let outcome =
                match tokio::time::timeout(attempt_limit, self.try_acquire_or_renew()).await {
                    Ok(r) => r,
                    Err(_) => Err(LeaseError::Timeout {
                        namespace: self.config.namespace.clone(),
                        name: self.config.name.clone(),
                        after: attempt_limit,
                    }),
                };
            let leading = *tx.borrow();
            let now_leading = match outcome {
                Ok(true) => {
                    last_renew = Some(Instant::now());
                    true
                }
                // Someone else holds a live lease.
                Ok(false) => false,
                Err(e) => {
                    warn!(error = %e, "leader election: acquire/renew failed");
                    leading && last_renew.is_some_and(|t| t.elapsed() < self.config.renew_deadline)
                }
            };
            if now_leading != leading {
                if now_leading {
                    info!(identity = %self.config.identity, lease = %self.config.name, "leader election: became the leader");
                } else {
                    warn!(identity = %self.config.identity, lease = %self.config.name, "leader election: lost the lease; writes stop");
                }
                tx.send_replace(now_leading);
            }
            tokio::time::sleep_until(started + self.config.retry_period).await;
        }
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError::Api {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    /// One round: `Ok(true)` if this candidate holds the lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let now = MicroTime(Timestamp::now());
        let duration_secs = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let me = self.config.identity.clone();
        let existing = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.err(e))?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another candidate created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1));
        if changed {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let mine = holder.as_deref() == Some(me.as_str());
        let held_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.config.lease_duration);
        let expired = holder.is_none()
            || self
                .observed
                .as_ref()
                .is_some_and(|(_, _, seen)| seen.elapsed() >= held_for);
        if !mine && !expired {
            return Ok(false);
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: if mine {
                spec.acquire_time
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 }),
            ..spec
        });
        // Guarded by the resourceVersion just read: a concurrent writer wins
        // and this round is lost (409).
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// Gives the Lease up if `identity` holds it (a clean shutdown, as
/// Cilium's operator does with ReleaseOnCancel): the next candidate takes
/// over at its next attempt instead of after the lease duration.
pub async fn release(client: kube::Client, config: &LeaseConfig) -> Result<bool, LeaseError> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let err = |source| LeaseError::Api {
        namespace: config.namespace.clone(),
        name: config.name.clone(),
        source,
    };
    let Some(mut lease) = api.get_opt(&config.name).await.map_err(err)? else {
        return Ok(false);
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(false);
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        // Someone else wrote it meanwhile: it is not ours to release.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    fn lease_json(holder: &str, rv: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": CILIUM_OPERATOR_LEASE, "namespace": "kube-system", "resourceVersion": rv},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 3}
        })
    }

    async fn body_json(req: Request<Body>) -> serde_json::Value {
        let bytes = req.into_body().collect_bytes().await.expect("body");
        serde_json::from_slice(&bytes).expect("json body")
    }

    /// Pins the requests: a missing Lease is created with this identity;
    /// a Lease another live candidate holds is left alone; our own is
    /// renewed by a PUT carrying the resourceVersion read.
    #[tokio::test]
    async fn acquires_respects_a_live_holder_and_renews_with_the_resource_version() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let path = format!(
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{CILIUM_OPERATOR_LEASE}"
        );
        let server = tokio::spawn(async move {
            // Round 1: absent → create.
            let (req, send) = handle.next_request().await.expect("get");
            assert_eq!(
                (req.method().as_str(), req.uri().path()),
                ("GET", path.as_str())
            );
            send.send_response(
                Response::builder()
                    .status(404)
                    .body(Body::from(br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"not found"}"#.to_vec()))
                    .expect("response"),
            );
            let (req, send) = handle.next_request().await.expect("create");
            assert_eq!(req.method().as_str(), "POST");
            assert_eq!(
                req.uri().path(),
                "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"
            );
            let body = body_json(req).await;
            assert_eq!(body["spec"]["holderIdentity"], "me");
            assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
            // Round 2: someone else holds it, freshly observed → no write.
            let (req, send) = handle.next_request().await.expect("get");
            assert_eq!(req.method().as_str(), "GET");
            send.send_response(
                Response::builder()
                    .body(Body::from(
                        serde_json::to_vec(&lease_json("other", "7")).expect("json"),
                    ))
                    .expect("response"),
            );
            // Round 3: ours → PUT with the resourceVersion read.
            let (_req, send) = handle.next_request().await.expect("get");
            send.send_response(
                Response::builder()
                    .body(Body::from(
                        serde_json::to_vec(&lease_json("me", "9")).expect("json"),
                    ))
                    .expect("response"),
            );
            let (req, send) = handle.next_request().await.expect("put");
            assert_eq!(
                (req.method().as_str(), req.uri().path()),
                ("PUT", path.as_str())
            );
            let body = body_json(req).await;
            assert_eq!(body["metadata"]["resourceVersion"], "9");
            assert_eq!(body["spec"]["holderIdentity"], "me");
            assert_eq!(
                body["spec"]["leaseTransitions"], 3,
                "a renewal is no transition"
            );
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
        });
        let mut e = LeaderElector::new(client, LeaseConfig::cilium_defaults("kube-system", "me"));
        assert!(e.try_acquire_or_renew().await.expect("round 1"));
        assert!(!e.try_acquire_or_renew().await.expect("round 2"));
        assert!(e.try_acquire_or_renew().await.expect("round 3"));
        server.await.expect("mock server");
    }
}
