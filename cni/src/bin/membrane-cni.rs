//! `membrane-cni`: the CNI plugin binary a container runtime executes.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    // An unreadable stdin parses as an empty configuration: the plugin then
    // prints a decode error instead of dying silently.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let outcome = membrane_cni::run(&membrane_cni::Env::from_process(), &stdin);
    if let Some(out) = outcome.stdout {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{out}");
        let _ = stdout.flush();
    }
    std::process::exit(outcome.exit_code);
}
