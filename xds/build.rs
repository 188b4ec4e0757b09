//! Locates the protobuf descriptor set that the `envoy-types` crate ships
//! (`src/generated/types.bin`) so the codec can embed it without a copy being
//! committed here. The path comes from `cargo metadata`, which knows where the
//! resolved envoy-types sources live (registry, vendor dir or git checkout).

use std::path::PathBuf;
use std::process::Command;

#[path = "src/descriptor_index.rs"]
mod descriptor_index;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MEMBRANE_ENVOY_TYPES_BIN");

    let path = match std::env::var_os("MEMBRANE_ENVOY_TYPES_BIN") {
        Some(p) => PathBuf::from(p),
        None => match locate() {
            Ok(p) => p,
            Err(e) => panic!("cannot locate envoy-types descriptor set: {e}"),
        },
    };
    if !path.is_file() {
        panic!("envoy-types descriptor set not found at {}", path.display());
    }
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rerun-if-changed=src/descriptor_index.rs");

    // The set without source comments is what the binary embeds, and its
    // index as static tables (see src/descriptor_index.rs).
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let set = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("reading the descriptor set {}: {e}", path.display()));
    let set = descriptor_index::strip_source_info(&set)
        .unwrap_or_else(|e| panic!("reading the descriptor set {}: {e}", path.display()));
    let embedded = out_dir.join("envoy_types.bin");
    std::fs::write(&embedded, &set)
        .unwrap_or_else(|e| panic!("writing {}: {e}", embedded.display()));
    println!("cargo:rustc-env=ENVOY_TYPES_BIN={}", embedded.display());
    println!("cargo:rustc-env=ENVOY_TYPES_SOURCE_BIN={}", path.display());
    let index = descriptor_index::index(&set)
        .unwrap_or_else(|e| panic!("indexing the descriptor set {}: {e}", path.display()));
    let out = out_dir.join("descriptor_index.rs");
    std::fs::write(&out, descriptor_index::render(&index))
        .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}

fn locate() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?;
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--manifest-path",
        ])
        .arg(PathBuf::from(&manifest_dir).join("Cargo.toml"))
        .output()
        .map_err(|e| format!("running cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("parsing cargo metadata: {e}"))?;

    // The envoy-types package id our own package depends on (there may be
    // several versions in the graph).
    let own_dep = meta["resolve"]["nodes"].as_array().and_then(|nodes| {
        nodes.iter().find_map(|n| {
            let id = n["id"].as_str()?;
            let is_self = meta["packages"].as_array()?.iter().any(|p| {
                p["id"].as_str() == Some(id) && p["name"].as_str() == Some("membrane-xds")
            });
            if !is_self {
                return None;
            }
            n["deps"].as_array()?.iter().find_map(|d| {
                (d["name"].as_str() == Some("envoy_types"))
                    .then(|| d["pkg"].as_str().map(str::to_owned))
                    .flatten()
            })
        })
    });

    let packages = meta["packages"]
        .as_array()
        .ok_or("cargo metadata has no packages")?;
    let pkg = packages
        .iter()
        .find(|p| match &own_dep {
            Some(id) => p["id"].as_str() == Some(id.as_str()),
            None => p["name"].as_str() == Some("envoy-types"),
        })
        .ok_or("envoy-types is not in the dependency graph")?;
    let manifest = pkg["manifest_path"]
        .as_str()
        .ok_or("envoy-types has no manifest_path")?;
    let dir = PathBuf::from(manifest)
        .parent()
        .map(|p| p.to_path_buf())
        .ok_or("bad manifest path")?;
    Ok(dir.join("src/generated/types.bin"))
}
