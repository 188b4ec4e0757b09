//! `membrane-cni` driven exactly as a container runtime drives it
//! (environment + network configuration on stdin) against the agent's
//! endpoint manager, on network namespaces these tests create.
//! Root and iproute2 required (in CI a missing one fails the test).

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::json;

fn spec(dir: &tempfile::TempDir, cidrs: Vec<&'static str>) -> AgentSpec {
    AgentSpec {
        state_dir: dir.path().join("state"),
        socket: dir.path().join("cni.sock"),
        cidrs,
        unreachable_routes: false,
    }
}

#[test]
fn version_lists_supported_versions() {
    let out = plugin("VERSION", "", "", "", "", &json!({"cniVersion": "1.0.0"}));
    assert_eq!(out.code, 0, "{}", out.raw);
    let j = out.json.expect("json");
    assert_eq!(j["cniVersion"], "1.0.0");
    assert_eq!(j["supportedVersions"], json!(["1.0.0", "1.1.0"]));
    // An unsupported version is error 1.
    let bad = plugin(
        "ADD",
        "c",
        "/x",
        "eth0",
        "",
        &json!({"cniVersion": "0.3.1", "type": "membrane"}),
    );
    assert_eq!(bad.err_code(), Some(1), "{}", bad.raw);
    // A missing variable is error 4, naming it.
    let bad = plugin(
        "ADD",
        "",
        "/x",
        "eth0",
        "",
        &json!({"cniVersion": "1.0.0", "type": "membrane"}),
    );
    assert_eq!(bad.err_code(), Some(4), "{}", bad.raw);
    assert!(bad.raw.contains("CNI_CONTAINERID"), "{}", bad.raw);
}

#[test]
fn add_check_del_round_trip_dual_stack() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("node");
    let agent = Agent::start(&node, &spec(&dir, vec!["10.123.1.0/24", "fd00:123:1::/64"]));
    let conf = conf(&agent.socket, "1.1.0");
    let pods: Vec<Netns> = (0..2).map(|_| Netns::new("pod")).collect();
    let mut results = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let out = plugin(
            "ADD",
            &format!("rt{i}"),
            &p.path(),
            "eth0",
            &format!("IgnoreUnknown=1;K8S_POD_NAME=web-{i}"),
            &conf,
        );
        assert_eq!(out.code, 0, "ADD: {}", out.raw);
        let r = out.json.expect("result");
        assert_eq!(r["cniVersion"], "1.1.0");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["sandbox"], p.path());
        let host = r["interfaces"][0]["name"]
            .as_str()
            .expect("host if")
            .to_string();
        assert!(host.starts_with("lxc") && host.len() <= 15, "{host}");
        assert!(
            node.links().contains(&host),
            "host side {host} in the node namespace"
        );
        let v4 = result_ip(&r, false).expect("v4");
        let v6 = result_ip(&r, true).expect("v6");
        assert!(v4.starts_with("10.123.1."), "{v4}");
        assert!(v6.starts_with("fd00:123:1::"), "{v6}");
        let mut have = p.addrs("eth0");
        have.sort();
        assert_eq!(have, vec![format!("{v4}/32"), format!("{v6}/128")]);
        let mtu = p.ip_json(&["link", "show", "eth0"])[0]["mtu"].as_u64();
        assert_eq!(mtu, Some(1450));
        results.push((r, v4, v6, host));
    }
    // The pods reach each other through the node (v4 and v6).
    pong_server(&pods[1].path(), "[::]:23080".parse().expect("addr"));
    for ip in [&results[1].1, &results[1].2] {
        let to = std::net::SocketAddr::new(ip.parse().expect("ip"), 23080);
        assert_eq!(
            ask(&pods[0].path(), to).expect("pod to pod"),
            "pong",
            "{to}"
        );
    }

    // CHECK with the ADD result as prevResult.
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = results[0].0.clone();
    let out = plugin("CHECK", "rt0", &pods[0].path(), "eth0", "", &check_conf);
    assert_eq!(out.code, 0, "CHECK: {}", out.raw);
    // A repeated ADD returns the same result.
    let again = plugin("ADD", "rt0", &pods[0].path(), "eth0", "", &conf);
    assert_eq!(again.code, 0, "{}", again.raw);
    assert_eq!(
        result_ip(again.json.as_ref().expect("json"), false),
        Some(results[0].1.clone())
    );

    // DEL removes everything; a second DEL succeeds too.
    let mut del_conf = conf.clone();
    del_conf["prevResult"] = results[0].0.clone();
    for _ in 0..2 {
        let out = plugin("DEL", "rt0", &pods[0].path(), "eth0", "", &del_conf);
        assert_eq!(out.code, 0, "DEL: {}", out.raw);
        assert!(out.raw.trim().is_empty(), "DEL prints nothing: {}", out.raw);
    }
    assert!(!pods[0].links().contains(&"eth0".to_string()));
    assert!(!node.links().contains(&results[0].3));
    // DEL without a namespace (already gone) succeeds.
    let out = plugin("DEL", "rt0", "", "eth0", "", &conf);
    assert_eq!(out.code, 0, "{}", out.raw);
    // CHECK of a deleted container fails with 3.
    let out = plugin("CHECK", "rt0", &pods[0].path(), "eth0", "", &check_conf);
    assert_eq!(out.err_code(), Some(3), "{}", out.raw);
    agent.stop();
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("node");
    let agent = Agent::start(&node, &spec(&dir, vec!["10.123.2.0/24"]));
    let conf = conf(&agent.socket, "1.0.0");
    let pods: Vec<Netns> = (0..50).map(|_| Netns::new("pod")).collect();
    let addrs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let conf = &conf;
                s.spawn(move || {
                    let out = plugin("ADD", &format!("cc{i}"), &p.path(), "eth0", "", conf);
                    assert_eq!(out.code, 0, "ADD {i}: {}", out.raw);
                    result_ip(out.json.as_ref().expect("json"), false).expect("ip")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let unique: BTreeSet<&String> = addrs.iter().collect();
    assert_eq!(unique.len(), 50, "duplicate addresses: {addrs:?}");
    for (p, a) in pods.iter().zip(&addrs) {
        assert_eq!(p.addrs("eth0"), vec![format!("{a}/32")]);
    }
    let lxc = node
        .links()
        .into_iter()
        .filter(|l| l.starts_with("lxc"))
        .count();
    assert_eq!(lxc, 50);
    for (i, p) in pods.iter().enumerate() {
        let out = plugin("DEL", &format!("cc{i}"), &p.path(), "eth0", "", &conf);
        assert_eq!(out.code, 0, "{}", out.raw);
    }
    assert_eq!(
        node.links()
            .into_iter()
            .filter(|l| l.starts_with("lxc"))
            .count(),
        0
    );
    agent.stop();
}

#[test]
fn check_detects_a_removed_route() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("node");
    let agent = Agent::start(&node, &spec(&dir, vec!["10.123.3.0/24"]));
    let conf = conf(&agent.socket, "1.1.0");
    let pod = Netns::new("pod");
    let out = plugin("ADD", "chk", &pod.path(), "eth0", "", &conf);
    assert_eq!(out.code, 0, "{}", out.raw);
    let mut check = conf.clone();
    check["prevResult"] = out.json.expect("json");
    assert_eq!(
        plugin("CHECK", "chk", &pod.path(), "eth0", "", &check).code,
        0
    );
    pod.ip(&["route", "del", "default"]);
    let out = plugin("CHECK", "chk", &pod.path(), "eth0", "", &check);
    assert_eq!(out.err_code(), Some(102), "{}", out.raw);
    assert!(out.raw.contains("default route"), "{}", out.raw);
    // CHECK without prevResult is a configuration error.
    let out = plugin("CHECK", "chk", &pod.path(), "eth0", "", &conf);
    assert_eq!(out.err_code(), Some(7), "{}", out.raw);
    agent.stop();
}

#[test]
fn gc_releases_attachments_not_listed() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("node");
    let s = spec(&dir, vec!["10.123.4.0/24"]);
    let agent = Agent::start(&node, &s);
    let conf = conf(&agent.socket, "1.1.0");
    let keep = Netns::new("pod");
    let leak = Netns::new("pod");
    let k = plugin("ADD", "keep", &keep.path(), "eth0", "", &conf);
    let l = plugin("ADD", "leak", &leak.path(), "eth0", "", &conf);
    assert_eq!((k.code, l.code), (0, 0), "{} {}", k.raw, l.raw);
    let leaked_ip = result_ip(l.json.as_ref().expect("json"), false).expect("ip");
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let out = plugin("GC", "", "", "", "", &gc);
    assert_eq!(out.code, 0, "GC: {}", out.raw);
    assert!(
        leak.links().iter().all(|l| l != "eth0"),
        "leaked attachment removed"
    );
    assert_eq!(keep.addrs("eth0").len(), 1, "listed attachment kept");
    let ipam: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.state_dir.join("ipam.json")).expect("ipam state"),
    )
    .expect("ipam json");
    let held: Vec<&str> = ipam["allocations"]
        .as_array()
        .expect("allocations")
        .iter()
        .filter_map(|a| a["addr"].as_str())
        .collect();
    assert_eq!(held.len(), 1, "{ipam}");
    assert!(
        !held.contains(&leaked_ip.as_str()),
        "leaked address released: {ipam}"
    );
    assert_eq!(
        node.links()
            .into_iter()
            .filter(|l| l.starts_with("lxc"))
            .count(),
        1
    );
    agent.stop();
}

#[test]
fn agent_down_is_try_again_later_and_leaves_nothing() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let pod = Netns::new("pod");
    let conf = conf(&dir.path().join("absent.sock"), "1.0.0");
    let before = pod.links();
    for cmd in ["ADD", "DEL"] {
        let out = plugin(cmd, "down", &pod.path(), "eth0", "", &conf);
        assert_eq!(out.err_code(), Some(11), "{cmd}: {}", out.raw);
        assert_eq!(out.json.as_ref().expect("json")["cniVersion"], "1.0.0");
    }
    assert_eq!(pod.links(), before, "nothing configured in the pod");
    assert!(pod.addrs("eth0").is_empty());
}

#[test]
fn agent_restarted_in_the_middle_of_adds() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("node");
    let s = spec(&dir, vec!["10.123.5.0/24"]);
    let agent = Agent::start(&node, &s);
    let conf = conf(&agent.socket, "1.0.0");
    let pods: Vec<Netns> = (0..30).map(|_| Netns::new("pod")).collect();
    // Stop the agent while ADDs are in flight: the ones cut short answer 11.
    let outs: Vec<Out> = std::thread::scope(|sc| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let conf = &conf;
                sc.spawn(move || plugin("ADD", &format!("rs{i}"), &p.path(), "eth0", "", conf))
            })
            .collect();
        // Once some are done, the agent goes away mid-batch.
        let ipam = s.state_dir.join("ipam.json");
        for _ in 0..500 {
            let n = std::fs::read_to_string(&ipam)
                .map(|t| t.matches("\"owner\"").count())
                .unwrap_or(0);
            if n >= 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        agent.stop();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for o in &outs {
        assert!(
            o.code == 0 || o.err_code() == Some(11),
            "either done or try again: {}",
            o.raw
        );
    }
    let interrupted = outs.iter().filter(|o| o.code != 0).count();
    // The restarted agent finishes every retried ADD.
    let agent = Agent::start(&node, &s);
    let mut addrs = Vec::new();
    for (i, (p, o)) in pods.iter().zip(&outs).enumerate() {
        let r = if o.code == 0 {
            o.json.clone().expect("json")
        } else {
            let again = plugin("ADD", &format!("rs{i}"), &p.path(), "eth0", "", &conf);
            assert_eq!(again.code, 0, "retry {i}: {}", again.raw);
            again.json.expect("json")
        };
        let ip = result_ip(&r, false).expect("ip");
        assert_eq!(p.addrs("eth0"), vec![format!("{ip}/32")], "pod {i}");
        addrs.push(ip);
    }
    let unique: BTreeSet<&String> = addrs.iter().collect();
    assert_eq!(
        unique.len(),
        pods.len(),
        "no duplicate after restart: {addrs:?}"
    );
    assert_eq!(
        node.links()
            .into_iter()
            .filter(|l| l.starts_with("lxc"))
            .count(),
        pods.len()
    );
    eprintln!(
        "{interrupted} of {} ADDs were cut short by the restart",
        pods.len()
    );
    agent.stop();
}

#[test]
fn pool_exhaustion_fails_cleanly_and_recovers() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("node");
    // A /29: 8 addresses minus network, gateway and broadcast.
    let agent = Agent::start(&node, &spec(&dir, vec!["10.123.6.0/29"]));
    let conf = conf(&agent.socket, "1.1.0");
    let pods: Vec<Netns> = (0..6).map(|_| Netns::new("pod")).collect();
    for (i, p) in pods.iter().take(5).enumerate() {
        let out = plugin("ADD", &format!("ex{i}"), &p.path(), "eth0", "", &conf);
        assert_eq!(out.code, 0, "{}", out.raw);
    }
    let status = plugin("STATUS", "", "", "", "", &conf);
    assert_eq!(status.err_code(), Some(50), "{}", status.raw);
    let out = plugin("ADD", "ex5", &pods[5].path(), "eth0", "", &conf);
    assert_eq!(out.err_code(), Some(100), "{}", out.raw);
    assert!(out.raw.contains("exhausted"), "{}", out.raw);
    assert!(
        !pods[5].links().contains(&"eth0".to_string()),
        "nothing half-configured"
    );
    assert_eq!(
        node.links()
            .into_iter()
            .filter(|l| l.starts_with("lxc"))
            .count(),
        5
    );
    assert_eq!(
        plugin("DEL", "ex0", &pods[0].path(), "eth0", "", &conf).code,
        0
    );
    assert_eq!(plugin("STATUS", "", "", "", "", &conf).code, 0);
    let out = plugin("ADD", "ex5", &pods[5].path(), "eth0", "", &conf);
    assert_eq!(out.code, 0, "{}", out.raw);
    agent.stop();
}

#[test]
fn unreachable_route_after_del_fails_connections_at_once() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("node");
    // Like a real node: a default route out of an uplink, so an address
    // without a route of its own would be sent on and time out.
    node.ip(&[
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "uplink-peer",
    ]);
    node.ip(&["link", "set", "uplink", "up"]);
    node.ip(&["link", "set", "uplink-peer", "up"]);
    node.ip(&["addr", "add", "10.123.250.1/24", "dev", "uplink"]);
    node.ip(&["route", "add", "default", "via", "10.123.250.2"]);
    let mut s = spec(&dir, vec!["10.123.7.0/29"]);
    s.unreachable_routes = true;
    let agent = Agent::start(&node, &s);
    let conf = conf(&agent.socket, "1.0.0");
    let client = Netns::new("pod");
    let server = Netns::new("pod");
    assert_eq!(
        plugin("ADD", "client", &client.path(), "eth0", "", &conf).code,
        0
    );
    let out = plugin("ADD", "server", &server.path(), "eth0", "", &conf);
    assert_eq!(out.code, 0, "{}", out.raw);
    let old = result_ip(out.json.as_ref().expect("json"), false).expect("ip");
    assert_eq!(
        plugin("DEL", "server", &server.path(), "eth0", "", &conf).code,
        0
    );
    let routes = node.ip(&["route", "show", "type", "unreachable"]);
    assert!(
        routes.contains(&old),
        "unreachable route for {old}: {routes}"
    );
    // The client learns at once: ICMP host unreachable, not a timeout.
    let tcp = client.exec(&["bash", "-c", &format!("exec 3<>/dev/tcp/{old}/80")]);
    let err = String::from_utf8_lossy(&tcp.stderr);
    assert!(!tcp.status.success());
    assert!(err.contains("No route to host"), "connect error: {err}");
    // Reusing the address removes the unreachable route. The /29 has five
    // addresses and allocation is next-fit, so four more ADDs wrap round.
    let more: Vec<Netns> = (0..4).map(|_| Netns::new("pod")).collect();
    let mut reused = false;
    for (i, p) in more.iter().enumerate() {
        let out = plugin("ADD", &format!("m{i}"), &p.path(), "eth0", "", &conf);
        assert_eq!(out.code, 0, "{}", out.raw);
        reused |=
            result_ip(out.json.as_ref().expect("json"), false).as_deref() == Some(old.as_str());
    }
    assert!(reused, "{old} handed out again");
    let routes = node.ip(&["route", "show", "type", "unreachable"]);
    assert!(
        !routes.contains(&old),
        "unreachable route removed on reuse: {routes}"
    );
    agent.stop();
}

#[test]
fn restarted_agent_marks_endpoints_without_interface_not_ready() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("node");
    let s = spec(&dir, vec!["10.123.8.0/24"]);
    let agent = Agent::start(&node, &s);
    let conf = conf(&agent.socket, "1.0.0");
    let (a, b) = (Netns::new("pod"), Netns::new("pod"));
    let ra = plugin("ADD", "keep", &a.path(), "eth0", "", &conf);
    let rb = plugin("ADD", "lost", &b.path(), "eth0", "", &conf);
    assert_eq!((ra.code, rb.code), (0, 0));
    agent.stop();
    // The pod's namespace (and with it the veth pair) vanishes while the
    // agent is down.
    drop(b);
    // Namespaces are torn down asynchronously; wait for the veth to go.
    let mut gone = false;
    for _ in 0..500 {
        if node.links().iter().filter(|l| l.starts_with("lxc")).count() == 1 {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        gone,
        "veth of the deleted namespace still there: {:?}",
        node.links()
    );
    let agent = Agent::start(&node, &s);
    let eps: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.state_dir.join("endpoints.json")).expect("endpoints"),
    )
    .expect("json");
    let state = |cid: &str| {
        eps.as_array()
            .expect("list")
            .iter()
            .find(|e| e["container_id"] == cid)
            .map(|e| e["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(state("keep").as_deref(), Some("ready"));
    assert_eq!(state("lost").as_deref(), Some("not-ready"));
    let mut check = conf.clone();
    check["prevResult"] = ra.json.expect("json");
    assert_eq!(
        plugin("CHECK", "keep", &a.path(), "eth0", "", &check).code,
        0
    );
    // GC with only the live attachment listed releases the lost one.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    assert_eq!(plugin("GC", "", "", "", "", &gc).code, 0);
    let eps: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.state_dir.join("endpoints.json")).expect("endpoints"),
    )
    .expect("json");
    let ids: Vec<&str> = eps
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["container_id"].as_str())
        .collect();
    assert_eq!(ids, ["keep"]);
    agent.stop();
}
