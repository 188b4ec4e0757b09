//! `membrane lb …`: load-balancing tools.

use std::process::ExitCode;

use anyhow::Result;
use membrane_lb::maglev::Protocol;
use membrane_lb::{MaglevArgs, OutputFormat};

#[derive(clap::Subcommand, Debug)]
pub enum LbCommand {
    /// Print the Maglev lookup table Cilium would build for these backends.
    Maglev(MaglevCli),
}

#[derive(clap::Args, Debug)]
pub struct MaglevCli {
    /// Table size: 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521 or 131071.
    #[arg(short = 'm', value_parser = membrane_lb::cli::parse_table_size)]
    pub m: u32,
    /// Base64 of Cilium's 12-byte hash seed (default JLfvgnHc2kaSUFaI).
    #[arg(long)]
    pub seed: Option<String>,
    #[arg(long, default_value = "TCP")]
    pub proto: Protocol,
    #[arg(long, default_value_t = 0)]
    pub cluster_id: u32,
    /// list (one IP:port per slot) or rle (1-based ids, run-length).
    #[arg(long, default_value = "list")]
    pub format: OutputFormat,
    /// IP:PORT[;w=WEIGHT], e.g. 10.0.0.1:80 or [fd00::1]:80;w=50.
    #[arg(required = true)]
    pub backends: Vec<String>,
}

pub fn run(cmd: LbCommand) -> Result<ExitCode> {
    let LbCommand::Maglev(a) = cmd;
    let out = membrane_lb::maglev_command(MaglevArgs {
        m: a.m,
        seed: a.seed,
        proto: a.proto,
        cluster_id: a.cluster_id,
        format: a.format,
        backends: a.backends,
    })?;
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
