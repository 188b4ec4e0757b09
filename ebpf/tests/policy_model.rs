//! The upstream Kubernetes network-policy test model (namespaces x, y, z
//! with pods a, b, c; `pod=<name>`, `ns=<name>`) on veth pods made by the
//! test and programmed straight from `membrane_policy` (no agent): each
//! case of `policy_cases` applied, then every pod × pod cell probed with
//! real packets over TCP and UDP 80 and 81 (in parallel) against the
//! hand-written reachability. The same cases run through `membrane up`
//! with pods from `membrane-cni` in `membrane/tests/policy_model_cni.rs`;
//! this one isolates the datapath and names Membrane's model and deciding
//! rule for each wrong cell.

mod common;
mod policy_cases;
mod policy_harness;

use common::{PinDir, prerequisites};
use policy_cases::{L4, MODEL, ModelPod, steps, wrong_cells};
use policy_harness::{PolicyHarness, PolicyTopology, Probe};

#[test]
fn kubernetes_policy_model() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("model");
    let topo = PolicyTopology::new("model", &MODEL);
    let mut h = PolicyHarness::new(&pins, &topo.node, topo.cluster(), topo.pods.clone());
    let pods: Vec<ModelPod> = topo
        .pods
        .iter()
        .map(|p| ModelPod {
            ns: &p.endpoint.namespace,
            name: &p.endpoint.name,
            netns: &p.netns,
            ip: p.v4(),
        })
        .collect();
    for step in steps() {
        h.apply(&step.policies);
        let wrong = wrong_cells(&pods, &step);
        if wrong.is_empty() {
            continue;
        }
        // Name Membrane's model and deciding rule for each wrong cell.
        let explained: Vec<String> = wrong
            .iter()
            .map(|w| {
                let p = match w.l4 {
                    L4::Tcp => Probe::Tcp(w.port),
                    L4::Udp => Probe::Udp(w.port),
                };
                let (model, why) = h.expect(pods[w.src].ip, pods[w.dst].ip, p);
                format!("{} (Membrane's model: {model:?}, {why})", w.describe(&pods))
            })
            .collect();
        panic!(
            "{}: {} wrong cells:\n{}",
            step.what,
            wrong.len(),
            explained.join("\n")
        );
    }
}
