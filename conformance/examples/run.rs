//! Runs the suite against an already running Membrane:
//! `cargo run -p membrane-conformance --example run -- --api-socket PATH [--features DIR]
//!  [--ingress-class-wait SECS] [--scale-settle SECS] [--report FILE] [--http-port N]
//!  [--https-port N] [--ingress-class NAME]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use membrane_conformance::{RunOptions, run};

#[tokio::main]
async fn main() -> ExitCode {
    let mut opts = RunOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(v) = args.next() else {
            eprintln!("{flag} needs a value");
            return ExitCode::from(2);
        };
        let secs = |v: &str| v.parse::<f64>().map(Duration::from_secs_f64);
        let ok = match flag.as_str() {
            "--api-socket" => {
                opts.api_socket = PathBuf::from(&v);
                true
            }
            "--features" => {
                opts.features = PathBuf::from(&v);
                true
            }
            "--report" => {
                opts.report = Some(PathBuf::from(&v));
                true
            }
            "--ingress-class" => {
                opts.ingress_class = v.clone();
                true
            }
            "--ingress-class-wait" => secs(&v).map(|d| opts.ingress_class_wait = d).is_ok(),
            "--scale-settle" => secs(&v).map(|d| opts.scale_settle = d).is_ok(),
            "--http-port" => v.parse().map(|p| opts.http_port = p).is_ok(),
            "--https-port" => v.parse().map(|p| opts.https_port = p).is_ok(),
            _ => false,
        };
        if !ok {
            eprintln!("bad argument {flag} {v}");
            return ExitCode::from(2);
        }
    }
    match run(opts).await {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
