//! Discovery documents (/version, /api, /apis, resource lists) and the
//! OpenAPI v3 documents kubectl reads: each PATCH operation names its kind
//! and the `fieldValidation` parameter, so kubectl leaves field validation
//! to the server instead of fetching schemas. Pure.

use serde_json::{Value, json};

use crate::resources::{Resource, group_versions};

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-membrane",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

pub fn api_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    })
}

fn group_doc(all: &[Resource], group: &str) -> Option<Value> {
    let versions: Vec<Value> = group_versions(all)
        .into_iter()
        .filter(|(g, _)| g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first()?.clone();
    Some(json!({"name": group, "versions": versions, "preferredVersion": preferred}))
}

pub fn api_group_list(all: &[Resource]) -> Value {
    let mut groups: Vec<String> = Vec::new();
    for (g, _) in group_versions(all) {
        if !g.is_empty() && !groups.contains(&g) {
            groups.push(g);
        }
    }
    let docs: Vec<Value> = groups.iter().filter_map(|g| group_doc(all, g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": docs})
}

pub fn api_group(all: &[Resource], group: &str) -> Option<Value> {
    let mut doc = group_doc(all, group)?;
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

pub fn resource_list(all: &[Resource], group: &str, version: &str) -> Option<Value> {
    let rows: Vec<&Resource> = all
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    let first = rows.first()?;
    let resources: Vec<Value> = rows.iter().flat_map(|r| r.discovery()).collect();
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": first.api_version(),
        "resources": resources,
    }))
}

/// `api/v1` or `apis/<group>/<version>`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The OpenAPI v3 root listing.
pub fn openapi_v3_root(all: &[Resource], hash: &str) -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in group_versions(all) {
        let p = gv_path(&g, &v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash}")}),
        );
    }
    json!({"paths": paths})
}

/// The OpenAPI v3 document of one group version: operations only, no
/// schemas (kubectl then computes patches from its built-in types).
pub fn openapi_v3_gv(all: &[Resource], gv_path_req: &str) -> Option<Value> {
    let rows: Vec<&Resource> = all
        .iter()
        .filter(|r| gv_path(&r.group, &r.version) == gv_path_req)
        .collect();
    if rows.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    for r in rows {
        let base = if r.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}/{{name}}",
                gv_path_req, r.plural
            )
        } else {
            format!("/{}/{}/{{name}}", gv_path_req, r.plural)
        };
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let params = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
            {"name": "force", "in": "query", "schema": {"type": "boolean"}},
        ]);
        let op = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", r.kind),
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
            })
        };
        paths.insert(
            base,
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Membrane", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::builtin;

    #[test]
    fn documents_cover_the_table() {
        let all = builtin();
        let core = resource_list(&all, "", "v1").expect("core");
        assert_eq!(core["groupVersion"], "v1");
        let names: Vec<&str> = core["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(names.contains(&"pods/status"));
        let groups = api_group_list(&all);
        assert!(
            groups["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .any(|g| g["name"] == "cilium.io")
        );
        let root = openapi_v3_root(&all, "h");
        assert!(root["paths"]["apis/cilium.io/v2"]["serverRelativeURL"].is_string());
        let doc = openapi_v3_gv(&all, "apis/cilium.io/v2").expect("doc");
        let patch = &doc["paths"]["/apis/cilium.io/v2/namespaces/{namespace}/ciliumenvoyconfigs/{name}"]
            ["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "CiliumEnvoyConfig"
        );
    }
}
