//! Server-side printing: `meta.k8s.io/v1` Tables for `kubectl get`, with
//! the columns kubectl shows for the built-in kinds, a CRD's
//! `additionalPrinterColumns` (simple `.a.b` paths), else Name and Age.
//! Pure (the current time is a parameter).

use serde_json::{Value, json};

use crate::resources::Resource;

/// What each row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// A column: (name, type, priority). Priority 1 shows with `-o wide`.
type Col = (&'static str, &'static str, u8);

/// Seconds since the Unix epoch of an RFC 3339 timestamp.
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// kubectl's short human duration ("5s", "3m2s", "4h", "12d", "2y").
pub fn human(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn age(obj: &Value, field: &Value, now: i64) -> Value {
    let t = field
        .as_str()
        .or_else(|| obj["metadata"]["creationTimestamp"].as_str())
        .and_then(parse_time);
    json!(
        t.map(|t| human(now - t))
            .unwrap_or_else(|| "<unknown>".into())
    )
}

fn or_none(s: String) -> Value {
    json!(if s.is_empty() {
        "<none>".to_string()
    } else {
        s
    })
}

fn strs(v: &Value, f: impl Fn(&Value) -> Option<String>) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(&f).collect())
        .unwrap_or_default()
}

fn lb_addresses(obj: &Value) -> Vec<String> {
    strs(&obj["status"]["loadBalancer"]["ingress"], |i| {
        i["ip"]
            .as_str()
            .or(i["hostname"].as_str())
            .map(String::from)
    })
}

/// Columns and cells of one built-in kind; `None` for the generic layout.
fn builtin(res: &Resource, obj: &Value, now: i64) -> Option<(Vec<Col>, Vec<Value>)> {
    let name = json!(obj["metadata"]["name"]);
    let created = age(obj, &Value::Null, now);
    let spec = &obj["spec"];
    Some(match (res.group.as_str(), res.kind.as_str()) {
        ("", "Namespace") => (
            vec![
                ("Name", "string", 0),
                ("Status", "string", 0),
                ("Age", "string", 0),
            ],
            vec![
                name,
                json!(obj["status"]["phase"].as_str().unwrap_or("")),
                created,
            ],
        ),
        ("", "Service") => {
            let ty = spec["type"].as_str().unwrap_or("ClusterIP");
            let ports = strs(&spec["ports"], |p| {
                let proto = p["protocol"].as_str().unwrap_or("TCP");
                Some(match p["nodePort"].as_i64() {
                    Some(np) => format!("{}:{np}/{proto}", p["port"]),
                    None => format!("{}/{proto}", p["port"]),
                })
            });
            let mut external = lb_addresses(obj);
            external.extend(strs(&spec["externalIPs"], |v| v.as_str().map(String::from)));
            let external = if external.is_empty() && ty == "LoadBalancer" {
                json!("<pending>")
            } else {
                or_none(external.join(","))
            };
            let selector = spec["selector"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            (
                vec![
                    ("Name", "string", 0),
                    ("Type", "string", 0),
                    ("Cluster-IP", "string", 0),
                    ("External-IP", "string", 0),
                    ("Port(s)", "string", 0),
                    ("Age", "string", 0),
                    ("Selector", "string", 1),
                ],
                vec![
                    name,
                    json!(ty),
                    or_none(spec["clusterIP"].as_str().unwrap_or_default().to_string()),
                    external,
                    or_none(ports.join(",")),
                    created,
                    or_none(selector),
                ],
            )
        }
        ("networking.k8s.io", "Ingress") => {
            let hosts = strs(&spec["rules"], |r| r["host"].as_str().map(String::from));
            let ports = if spec["tls"].as_array().is_some_and(|t| !t.is_empty()) {
                "80, 443"
            } else {
                "80"
            };
            (
                vec![
                    ("Name", "string", 0),
                    ("Class", "string", 0),
                    ("Hosts", "string", 0),
                    ("Address", "string", 0),
                    ("Ports", "string", 0),
                    ("Age", "string", 0),
                ],
                vec![
                    name,
                    or_none(
                        spec["ingressClassName"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    json!(if hosts.is_empty() {
                        "*".to_string()
                    } else {
                        hosts.join(",")
                    }),
                    json!(lb_addresses(obj).join(",")),
                    json!(ports),
                    created,
                ],
            )
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            let ports = strs(&obj["ports"], |p| p["port"].as_i64().map(|n| n.to_string()));
            let addrs: Vec<String> = obj["endpoints"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .flat_map(|ep| strs(&ep["addresses"], |a| a.as_str().map(String::from)))
                        .collect()
                })
                .unwrap_or_default();
            let endpoints = if addrs.len() > 3 {
                format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
            } else if addrs.is_empty() {
                "<unset>".into()
            } else {
                addrs.join(",")
            };
            (
                vec![
                    ("Name", "string", 0),
                    ("AddressType", "string", 0),
                    ("Ports", "string", 0),
                    ("Endpoints", "string", 0),
                    ("Age", "string", 0),
                ],
                vec![
                    name,
                    json!(obj["addressType"]),
                    json!(if ports.is_empty() {
                        "<unset>".into()
                    } else {
                        ports.join(",")
                    }),
                    json!(endpoints),
                    created,
                ],
            )
        }
        ("", "ConfigMap") => {
            let n = obj["data"].as_object().map_or(0, |m| m.len())
                + obj["binaryData"].as_object().map_or(0, |m| m.len());
            (
                vec![
                    ("Name", "string", 0),
                    ("Data", "integer", 0),
                    ("Age", "string", 0),
                ],
                vec![name, json!(n), created],
            )
        }
        ("", "Secret") => {
            let n = obj["data"].as_object().map_or(0, |m| m.len());
            (
                vec![
                    ("Name", "string", 0),
                    ("Type", "string", 0),
                    ("Data", "integer", 0),
                    ("Age", "string", 0),
                ],
                vec![name, json!(obj["type"]), json!(n), created],
            )
        }
        ("", "Pod") => {
            let total = spec["containers"].as_array().map_or(0, Vec::len);
            let statuses = obj["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|c| c["restartCount"].as_i64())
                .sum();
            (
                vec![
                    ("Name", "string", 0),
                    ("Ready", "string", 0),
                    ("Status", "string", 0),
                    ("Restarts", "string", 0),
                    ("Age", "string", 0),
                    ("Node", "string", 1),
                ],
                vec![
                    name,
                    json!(format!("{ready}/{total}")),
                    json!(obj["status"]["phase"].as_str().unwrap_or("Pending")),
                    json!(restarts.to_string()),
                    created,
                    or_none(spec["nodeName"].as_str().unwrap_or_default().to_string()),
                ],
            )
        }
        ("", "Node") => {
            let ready = obj["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map(|c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            (
                vec![
                    ("Name", "string", 0),
                    ("Status", "string", 0),
                    ("Roles", "string", 0),
                    ("Age", "string", 0),
                    ("Version", "string", 0),
                ],
                vec![
                    name,
                    json!(ready),
                    json!("<none>"),
                    created,
                    json!(
                        obj["status"]["nodeInfo"]["kubeletVersion"]
                            .as_str()
                            .unwrap_or("")
                    ),
                ],
            )
        }
        ("", "Event") => {
            let last = if obj["lastTimestamp"].is_string() {
                &obj["lastTimestamp"]
            } else {
                &obj["eventTime"]
            };
            let involved = &obj["involvedObject"];
            (
                vec![
                    ("Last Seen", "string", 0),
                    ("Type", "string", 0),
                    ("Reason", "string", 0),
                    ("Object", "string", 0),
                    ("Message", "string", 0),
                ],
                vec![
                    age(obj, last, now),
                    json!(obj["type"]),
                    json!(obj["reason"]),
                    json!(format!(
                        "{}/{}",
                        involved["kind"]
                            .as_str()
                            .unwrap_or_default()
                            .to_ascii_lowercase(),
                        involved["name"].as_str().unwrap_or_default()
                    )),
                    json!(obj["message"]),
                ],
            )
        }
        ("networking.k8s.io", "IngressClass") => (
            vec![
                ("Name", "string", 0),
                ("Controller", "string", 0),
                ("Parameters", "string", 0),
                ("Age", "string", 0),
            ],
            vec![
                name,
                json!(spec["controller"].as_str().unwrap_or("")),
                json!(if spec["parameters"].is_object() {
                    "<set>"
                } else {
                    "<none>"
                }),
                created,
            ],
        ),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => (
            vec![("Name", "string", 0), ("Created At", "date", 0)],
            vec![name, json!(obj["metadata"]["creationTimestamp"])],
        ),
        ("coordination.k8s.io", "Lease") => (
            vec![
                ("Name", "string", 0),
                ("Holder", "string", 0),
                ("Age", "string", 0),
            ],
            vec![
                name,
                json!(spec["holderIdentity"].as_str().unwrap_or("")),
                created,
            ],
        ),
        _ => return None,
    })
}

/// Value at a simple JSONPath (`.spec.a.b`).
fn at<'a>(obj: &'a Value, path: &str) -> &'a Value {
    path.trim_start_matches('.')
        .split('.')
        .fold(obj, |cur, seg| &cur[seg])
}

/// A Table of `objects` of `res` (printer columns of a CRD in `crd`).
pub fn table(
    res: &Resource,
    objects: &[Value],
    rv: &str,
    crd: Option<&Value>,
    include: Include,
    now: i64,
) -> Value {
    let printer: Vec<Value> = crd
        .and_then(|c| c["spec"]["versions"].as_array())
        .and_then(|vs| vs.iter().find(|v| v["name"] == res.version.as_str()))
        .and_then(|v| v["additionalPrinterColumns"].as_array().cloned())
        .unwrap_or_default();
    let mut definitions: Option<Vec<Value>> = None;
    let mut rows = Vec::new();
    for obj in objects {
        let (cols, cells): (Vec<Value>, Vec<Value>) = match builtin(res, obj, now) {
            Some((cols, cells)) => (
                cols.iter()
                    .map(|(n, t, p)| column(n, t, *p, n == &"Name"))
                    .collect(),
                cells,
            ),
            None => {
                let mut cols = vec![column("Name", "string", 0, true)];
                let mut cells = vec![json!(obj["metadata"]["name"])];
                for c in &printer {
                    let name = c["name"].as_str().unwrap_or_default();
                    let ty = c["type"].as_str().unwrap_or("string");
                    let prio = c["priority"].as_u64().unwrap_or(0) as u8;
                    let v = at(obj, c["jsonPath"].as_str().unwrap_or_default());
                    cols.push(json!({"name": name, "type": ty, "format": "", "description": c["description"].as_str().unwrap_or_default(), "priority": prio}));
                    cells.push(if ty == "date" {
                        age(obj, v, now)
                    } else if v.is_null() {
                        json!("<none>")
                    } else {
                        v.clone()
                    });
                }
                if !printer.iter().any(|c| c["name"] == "Age") {
                    cols.push(column("Age", "string", 0, false));
                    cells.push(age(obj, &Value::Null, now));
                }
                (cols, cells)
            }
        };
        definitions.get_or_insert(cols);
        let object = match include {
            Include::None => Value::Null,
            Include::Metadata => json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }),
            Include::Object => obj.clone(),
        };
        let mut row = json!({"cells": cells});
        if !object.is_null() {
            row["object"] = object;
        }
        rows.push(row);
    }
    let definitions = definitions.unwrap_or_else(|| {
        let probe = json!({"metadata": {}});
        match builtin(res, &probe, now) {
            Some((cols, _)) => cols
                .iter()
                .map(|(n, t, p)| column(n, t, *p, n == &"Name"))
                .collect(),
            None => vec![
                column("Name", "string", 0, true),
                column("Age", "string", 0, false),
            ],
        }
    });
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

fn column(name: &str, ty: &str, priority: u8, is_name: bool) -> Value {
    json!({
        "name": name,
        "type": ty,
        "format": if is_name { "name" } else { "" },
        "description": "",
        "priority": priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::builtin as table_rows;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_time("1970-01-02T00:00:01Z"), Some(86_401));
        assert_eq!(
            parse_time("2024-02-29T23:59:59.123456Z"),
            Some(1_709_251_199)
        );
        assert_eq!(parse_time("garbage"), None);
        assert_eq!(human(5), "5s");
        assert_eq!(human(185), "3m5s");
        assert_eq!(human(3600 * 5 + 60), "5h1m");
        assert_eq!(human(86_400 * 3), "3d");
        assert_eq!(human(86_400 * 800), "2y");
    }

    #[test]
    fn service_and_generic_rows() {
        let all = table_rows();
        let svc = all.iter().find(|r| r.kind == "Service").expect("svc");
        let obj = json!({"metadata": {"name": "a", "creationTimestamp": "1970-01-01T00:00:00Z"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1", "selector": {"app": "a"},
                     "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}});
        let t = table(svc, &[obj], "7", None, Include::Metadata, 60);
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "a",
                "LoadBalancer",
                "10.96.0.1",
                "<pending>",
                "80:30080/TCP",
                "60s",
                "app=a"
            ])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["columnDefinitions"][6]["priority"], 1);
        let cec = all
            .iter()
            .find(|r| r.kind == "CiliumEnvoyConfig")
            .expect("cec");
        let t = table(cec, &[], "7", None, Include::None, 0);
        assert_eq!(t["columnDefinitions"].as_array().map(Vec::len), Some(2));
        let crd = json!({"spec": {"versions": [{"name": "v2", "additionalPrinterColumns": [
            {"name": "Size", "type": "integer", "jsonPath": ".spec.size"}]}]}});
        let t = table(
            cec,
            &[json!({"metadata": {"name": "x"}, "spec": {"size": 3}})],
            "7",
            Some(&crd),
            Include::None,
            0,
        );
        assert_eq!(t["rows"][0]["cells"], json!(["x", 3, "<unknown>"]));
    }
}
