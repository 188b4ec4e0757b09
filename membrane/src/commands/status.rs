//! `membrane status`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;
use serde_json::Value;

use crate::client::ApiClient;
use crate::commands::objects::text;

pub async fn run(api: &Path, output: Option<&str>) -> Result<ExitCode> {
    let report = ApiClient::new(api)
        .ok(Method::GET, "/v1/status", None)
        .await?;
    let rejected = report["rejected"].as_array().cloned().unwrap_or_default();
    match output {
        Some("json") => println!("{}", serde_json::to_string_pretty(&report)?),
        Some("yaml") => print!("{}", serde_yaml_ng::to_string(&report)?),
        _ => print!("{}", human(&report)),
    }
    // Envoy down (or not yet serving) is a failure like a rejected object:
    // nothing is served until it is back.
    let envoy_up = report["envoy"]["running"] == true && report["envoy"]["ready"] == true;
    Ok(if rejected.is_empty() && envoy_up {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn human(r: &Value) -> String {
    let mut out = String::new();
    let envoy = &r["envoy"];
    let running = envoy["running"].as_bool().unwrap_or(false);
    let ready = envoy["ready"].as_bool().unwrap_or(false);
    let admin = match envoy["admin_address"].as_str() {
        Some(tcp) => format!("{} and {tcp}", text(envoy, "/admin_socket")),
        None => text(envoy, "/admin_socket"),
    };
    out.push_str(&format!(
        "Envoy:     {} (pid {}, restarts {}, admin {})\n",
        match (running, ready) {
            (true, true) => "running, ready",
            (true, false) => "running, NOT READY",
            (false, _) => "NOT RUNNING",
        },
        text(envoy, "/pid"),
        text(envoy, "/restarts"),
        admin,
    ));
    if !running && let Some(e) = envoy["last_error"].as_str() {
        out.push_str(&format!(
            "           start failed {} time(s) in a row: {e}\n",
            text(envoy, "/start_failures")
        ));
    }
    if !running && let Some(e) = envoy["last_exit"].as_str() {
        out.push_str(&format!("           last exit: {e}\n"));
    }
    out.push_str(&format!("Node:      {}\n", text(r, "/node")));
    if r["datapath"]["mode"] == "ebpf" {
        let dp = &r["datapath"];
        let devices: Vec<&str> = dp["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect();
        out.push_str(&format!(
            "Datapath:  ebpf ({} services, {} backends, {} conntrack entries; devices {}; pins {})\n",
            text(dp, "/services"),
            text(dp, "/backends"),
            text(dp, "/conntrack_entries"),
            devices.join(","),
            text(dp, "/pin_dir"),
        ));
        // As `cilium status`: "Host Routing: BPF|Legacy", "Socket LB: …".
        let hr = &dp["host_routing"];
        if let Some(mode) = hr["mode"].as_str() {
            match hr["reason"].as_str() {
                Some(why) => out.push_str(&format!("  Host Routing:  {mode} ({why})\n")),
                None => out.push_str(&format!("  Host Routing:  {mode}\n")),
            }
        }
        if dp["socket_lb"]["enabled"] == true {
            out.push_str(&format!(
                "  Socket LB:     Enabled (cgroup {})\n",
                text(dp, "/socket_lb/cgroup_root")
            ));
        } else if dp["socket_lb"].is_object() {
            out.push_str("  Socket LB:     Disabled\n");
        }
    }
    out.push_str("xDS:\n");
    out.push_str(&xds_lines(&r["xds"]));
    let rejected = r["rejected"].as_array().cloned().unwrap_or_default();
    if rejected.is_empty() {
        out.push_str("Rejected:  none\n");
    } else {
        out.push_str(&format!("Rejected:  {}\n", rejected.len()));
        for item in rejected {
            out.push_str(&format!(
                "  {}\n    {}\n",
                text(&item, "/object"),
                text(&item, "/reason")
            ));
        }
    }
    let warnings = r["warnings"].as_array().cloned().unwrap_or_default();
    if !warnings.is_empty() {
        out.push_str(&format!("Warnings:  {}\n", warnings.len()));
        for item in warnings {
            out.push_str(&format!(
                "  {}\n    {}\n",
                text(&item, "/object"),
                text(&item, "/reason")
            ));
        }
    }
    out
}

/// One block per ADS stream, one line per resource type.
fn xds_lines(v: &Value) -> String {
    let streams = v["streams"].as_array().cloned().unwrap_or_default();
    if streams.is_empty() {
        return "  no Envoy connected\n".into();
    }
    let mut out = String::new();
    for s in streams {
        out.push_str(&format!(
            "  node {} (stream {})\n",
            text(&s, "/node_id"),
            text(&s, "/stream_id")
        ));
        out.push_str(&format!(
            "    {:<24} {:<18} {:<18} {:>9}  {}\n",
            "TYPE", "SENT", "ACKED", "RESOURCES", "LAST NACK"
        ));
        for (type_url, t) in s["types"].as_object().into_iter().flatten() {
            let short = type_url.rsplit('.').next().unwrap_or(type_url);
            let nack = match t.get("last_nack") {
                // One line, without the protobuf dump Envoy appends.
                Some(n) if !n.is_null() => format!(
                    "version {}: {}",
                    text(n, "/version"),
                    membrane_agent::nack::clean_detail(&text(n, "/error_detail"))
                ),
                _ => "-".into(),
            };
            out.push_str(&format!(
                "    {:<24} {:<18} {:<18} {:>9}  {}\n",
                short,
                text(t, "/sent_version"),
                text(t, "/acked_version"),
                text(t, "/acked_resources"),
                nack
            ));
        }
    }
    out
}
