#!/usr/bin/env bash
# Set up and run every test: formatting, lints, unit/golden/integration tests
# (real Envoy) and the Ingress conformance suite. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo test --workspace --locked
echo "== ingress conformance"
target="${CARGO_TARGET_DIR:-target}"
# Upstream waits 5 minutes for the foreign-class scenario and 60 s after
# scaling; CI shortens both (the report says so).
"$target/debug/membrane" conformance ingress \
  --ingress-class-wait 20s --scale-settle 3s \
  --report "$target/conformance-ingress.json"
echo "== ingress conformance, eBPF datapath (Ingress VIP redirected on lo)"
# The pins outlive the run (forwarding survives agent restarts); removing
# them detaches the program from lo.
pins=/sys/fs/bpf/membrane-conformance-$$
trap 'rm -rf "$pins"' EXIT
"$target/debug/membrane" conformance ingress \
  --ingress-class-wait 20s --scale-settle 3s \
  --up-arg=--datapath --up-arg=ebpf --up-arg=--datapath-devices --up-arg=lo \
  --up-arg=--bpf-pin-dir --up-arg="$pins" \
  --report "$target/conformance-ingress-ebpf.json"
echo "== fuzz (each target for a bounded time; docs/fuzzing.md)"
# fuzz/ is a workspace of its own: the root fmt and clippy skip it.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked -- -D warnings
FUZZ_SECONDS="${FUZZ_SECONDS:-45}" scripts/fuzz.sh
