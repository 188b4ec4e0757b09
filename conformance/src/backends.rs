//! Echo "pods": in-process echo servers, each on its own loopback address and port 3000,
//! standing in for upstream's echo Deployments.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::echo::{self, EchoIdentity};
use crate::objects::{BackendRef, ECHO_PORT, PodAddr, random_suffix};

/// Pods live in 127.1.0.0/16, away from Membrane's load-balancer pool (127.0.100.0/24).
const POOL_BASE: u32 = u32::from_be_bytes([127, 1, 0, 0]);
const POOL_SIZE: u32 = 1 << 16;
/// Process-wide cursor so concurrent runs (tests) rarely collide; collisions are retried.
static NEXT: AtomicU32 = AtomicU32::new(0);

fn next_candidate() -> Ipv4Addr {
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % POOL_SIZE;
        // Skip .0 and .255 host parts: legal on loopback, but confusing in reports.
        let last = n & 0xff;
        if last != 0 && last != 0xff {
            return Ipv4Addr::from(POOL_BASE + n);
        }
    }
}

/// Binds the next free pool address on port 3000.
pub async fn bind_pod_listener() -> io::Result<TcpListener> {
    let mut last_err = None;
    for _ in 0..1024 {
        let addr = SocketAddr::from((next_candidate(), ECHO_PORT));
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free pod address")))
}

/// One running echo server.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl Pod {
    pub async fn start(identity: EchoIdentity) -> io::Result<Pod> {
        let listener = bind_pod_listener().await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let name = identity.pod.clone();
        let task = tokio::spawn(echo::serve(listener, identity, async {
            let _ = rx.await;
        }));
        Ok(Pod {
            name,
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub fn pod_addr(&self) -> PodAddr {
        PodAddr {
            name: self.name.clone(),
            ip: self.addr.ip(),
        }
    }

    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            // serve() bounds its own grace period; this only guards against a stuck task.
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                tracing::warn!(pod = %self.name, "echo pod did not stop in time");
            }
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// upstream's echo Deployment `<ingress>-<service>` with its pods.
#[derive(Debug)]
pub struct Deployment {
    pub namespace: String,
    pub ingress: String,
    pub backend: BackendRef,
    /// ReplicaSet pod-template-hash stand-in, shared by the pods.
    pub hash: String,
    /// Name of the EndpointSlice listing the pods.
    pub slice_name: String,
    pub pods: Vec<Pod>,
}

impl Deployment {
    pub fn new(namespace: &str, ingress: &str, backend: BackendRef) -> Self {
        Deployment {
            namespace: namespace.to_owned(),
            ingress: ingress.to_owned(),
            slice_name: format!("{}-{}", backend.service, random_suffix(5)),
            hash: random_suffix(10),
            backend,
            pods: Vec::new(),
        }
    }

    pub fn name(&self) -> String {
        self.backend.deployment(&self.ingress)
    }

    fn identity(&self) -> EchoIdentity {
        EchoIdentity {
            namespace: self.namespace.clone(),
            ingress: self.ingress.clone(),
            service: self.backend.service.clone(),
            pod: format!("{}-{}-{}", self.name(), self.hash, random_suffix(5)),
        }
    }

    /// Starts or stops pods until `replicas` run.
    pub async fn scale(&mut self, replicas: usize) -> io::Result<()> {
        while self.pods.len() < replicas {
            let pod = Pod::start(self.identity()).await?;
            tracing::debug!(pod = %pod.name, addr = %pod.addr, "echo pod started");
            self.pods.push(pod);
        }
        while self.pods.len() > replicas {
            if let Some(mut p) = self.pods.pop() {
                p.stop().await;
            }
        }
        Ok(())
    }

    pub fn pod_addrs(&self) -> Vec<PodAddr> {
        self.pods.iter().map(Pod::pod_addr).collect()
    }

    pub async fn stop(&mut self) {
        for p in &mut self.pods {
            p.stop().await;
        }
        self.pods.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pods_get_distinct_pool_addresses_and_answer() {
        let b = BackendRef {
            service: "echo-service".into(),
            port_name: String::new(),
            port: 8080,
        };
        let mut d = Deployment::new("ns-x", "load-balancing", b);
        d.scale(3).await.unwrap();
        let addrs = d.pod_addrs();
        assert_eq!(addrs.len(), 3);
        let mut ips: Vec<_> = addrs.iter().map(|p| p.ip).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 3);
        for p in &d.pods {
            let std::net::IpAddr::V4(v4) = p.addr.ip() else {
                panic!("v4 expected")
            };
            assert_eq!(v4.octets()[..2], [127, 1]);
            assert_eq!(p.addr.port(), 3000);
            let rest = p.name.strip_prefix("load-balancing-echo-service-").unwrap();
            let (hash, suffix) = rest.split_once('-').unwrap();
            assert_eq!((hash.len(), suffix.len()), (10, 5), "{}", p.name);
            assert_eq!(hash, d.hash);
        }
        // A pod answers with its own identity.
        let (req, resp) = crate::client::capture_round_trip(
            "GET",
            "http",
            "h",
            "/x",
            &d.pods[1].addr.ip().to_string(),
            crate::client::Ports {
                http: 3000,
                https: 3000,
            },
        )
        .await
        .unwrap();
        assert_eq!(resp.status_code, 200);
        assert_eq!(req.pod, d.pods[1].name);
        assert_eq!(req.namespace, "ns-x");
        d.scale(1).await.unwrap();
        assert_eq!(d.pods.len(), 1);
        d.stop().await;
        assert!(d.pods.is_empty());
        // Stopped pods no longer accept connections.
        assert!(
            tokio::net::TcpStream::connect(addrs[2].ip.to_string() + ":3000")
                .await
                .is_err()
        );
    }
}
