//! One module per subcommand.

pub mod apiserver;
pub mod bench;
pub mod clustermesh;
pub mod conformance;
pub mod echo;
pub mod embedded;
pub mod endpoint;
pub mod lb;
pub mod objects;
pub mod policy;
pub mod roles;
pub mod service;
pub mod status;
pub mod translate;
pub mod up;

use std::path::Path;

use anyhow::{Context, Result};

/// Read a file, or stdin for `-`.
pub fn read_input(file: &Path) -> Result<String> {
    if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    }
}
