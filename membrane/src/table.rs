//! kubectl-like tables for `membrane get`.

use serde_json::Value;

use crate::commands::objects::text;

/// Turns one object into the cells of its row.
type RowFn = fn(&Value) -> Vec<String>;

/// Render `items` of `kind` as an aligned table.
pub fn render(kind: &str, items: &[Value], with_namespace: bool) -> String {
    let kind = kind.to_lowercase();
    let (headers, row): (Vec<&str>, RowFn) = match kind.as_str() {
        "ingress" | "ingresses" | "ing" => (
            vec!["NAME", "CLASS", "HOSTS", "ADDRESS", "PORTS"],
            ingress_row,
        ),
        "service" | "services" | "svc" => (
            vec!["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"],
            service_row,
        ),
        "endpointslice" | "endpointslices" => (vec!["NAME", "PORTS", "ENDPOINTS"], slice_row),
        "cec"
        | "ciliumenvoyconfig"
        | "ciliumenvoyconfigs"
        | "ccec"
        | "ciliumclusterwideenvoyconfig"
        | "ciliumclusterwideenvoyconfigs" => (vec!["NAME", "RESOURCES"], cec_row),
        "secret" | "secrets" => (vec!["NAME", "TYPE", "DATA"], secret_row),
        _ => (vec!["NAME"], |v| vec![text(v, "/metadata/name")]),
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut head: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    if with_namespace {
        head.insert(0, "NAMESPACE".into());
    }
    rows.push(head);
    for item in items {
        let mut r = row(item);
        if with_namespace {
            r.insert(0, text(item, "/metadata/namespace"));
        }
        rows.push(r);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn ingress_row(v: &Value) -> Vec<String> {
    let hosts: Vec<String> = v
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| text(r, "/host"))
        .map(|h| if h.is_empty() { "*".into() } else { h })
        .collect();
    let address: Vec<String> = v
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|i| {
            let ip = text(i, "/ip");
            if ip.is_empty() {
                text(i, "/hostname")
            } else {
                ip
            }
        })
        .collect();
    let tls = v
        .pointer("/spec/tls")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    vec![
        text(v, "/metadata/name"),
        or_none(text(v, "/spec/ingressClassName")),
        if hosts.is_empty() {
            "*".into()
        } else {
            hosts.join(",")
        },
        address.join(","),
        if tls { "80, 443".into() } else { "80".into() },
    ]
}

fn service_row(v: &Value) -> Vec<String> {
    let ports: Vec<String> = v
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = text(p, "/protocol");
            format!(
                "{}/{}",
                text(p, "/port"),
                if proto.is_empty() {
                    "TCP".into()
                } else {
                    proto
                }
            )
        })
        .collect();
    let external = text(v, "/status/loadBalancer/ingress/0/ip");
    vec![
        text(v, "/metadata/name"),
        or_none(text(v, "/spec/type")).replace("<none>", "ClusterIP"),
        or_none(text(v, "/spec/clusterIP")),
        if external.is_empty() {
            "<none>".into()
        } else {
            external
        },
        ports.join(","),
    ]
}

fn slice_row(v: &Value) -> Vec<String> {
    let ports: Vec<String> = v
        .pointer("/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| text(p, "/port"))
        .collect();
    let eps: Vec<String> = v
        .pointer("/endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|e| {
            e.pointer("/addresses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    vec![
        text(v, "/metadata/name"),
        ports.join(","),
        or_none(eps.join(",")),
    ]
}

fn cec_row(v: &Value) -> Vec<String> {
    let n = v
        .pointer("/spec/resources")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    vec![text(v, "/metadata/name"), n.to_string()]
}

fn secret_row(v: &Value) -> Vec<String> {
    let n = v
        .pointer("/data")
        .and_then(Value::as_object)
        .map_or(0, |m| m.len());
    vec![text(v, "/metadata/name"), text(v, "/type"), n.to_string()]
}
