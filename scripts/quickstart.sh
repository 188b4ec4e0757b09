#!/usr/bin/env bash
# Set everything up, start two echo backends and `membrane up` on
# examples/quickstart, and curl through Envoy. Stops everything at the end;
# pass --keep to leave Membrane running in the foreground instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin="${CARGO_TARGET_DIR:-target}/debug/membrane"
api=/tmp/membrane-quickstart/api.sock
http_port=80
[ "$(id -u)" -ne 0 ] && http_port=8080

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$bin" echo --listen 127.0.10.1:3000 --namespace default --ingress quickstart --service echo-a --pod echo-a-0 &
pids+=($!)
"$bin" echo --listen 127.0.10.2:3000 --namespace default --ingress quickstart --service echo-b --pod echo-b-0 &
pids+=($!)
"$bin" --api-socket "$api" up examples/quickstart --http-port "$http_port" --envoy-admin-port 0 &
pids+=($!)

# Wait (bounded) for the Ingress to report its address: written only once
# Envoy has ACKed the configuration that serves it.
addr=""
for _ in $(seq 1 100); do
  addr=$("$bin" --api-socket "$api" get ingress quickstart -o json 2>/dev/null \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["status"]["loadBalancer"]["ingress"][0]["ip"])' 2>/dev/null || true)
  [ -n "$addr" ] && break
  sleep 0.2
done
[ -n "$addr" ] || { echo "quickstart: the Ingress never got an address" >&2; exit 1; }

"$bin" --api-socket "$api" get ingress
echo "+ curl http://$addr:$http_port/b/hello"
curl -sS --fail "http://$addr:$http_port/b/hello"
echo
if [ "${1:-}" = "--keep" ]; then
  echo "Membrane is running; try: $bin --api-socket $api status   (Ctrl-C stops it)"
  wait "${pids[2]}"
fi
