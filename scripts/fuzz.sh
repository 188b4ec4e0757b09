#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for a bounded time starting
# from its checked-in corpus (docs/fuzzing.md). Exits non-zero on the first
# crash and prints where the crashing input was saved.
#
#   scripts/fuzz.sh [TARGET...]     FUZZ_SECONDS=45 by default, per target
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-45}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
targets=(manifest cec_decode ingress_translate api_request lb)
[ $# -gt 0 ] && targets=("$@")

# cargo fuzz has no --locked: check the lock file first.
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
cargo fuzz build --sanitizer none --target-dir "$target_dir"

# New inputs go to a scratch corpus; the checked-in one is only read.
scratch="$target_dir/corpus"
artifacts="$target_dir/artifacts"
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "$artifacts/$t"
  echo "== fuzz $t (${seconds}s)"
  log="$target_dir/$t.log"
  # Marks the start, so only this run's crash files are reported.
  start="$target_dir/$t.start"
  touch "$start"
  if ! cargo fuzz run "$t" --sanitizer none --target-dir "$target_dir" \
      "$scratch/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=16384 \
      -artifact_prefix="$artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
    # libFuzzer's report (the panic message and the input) without
    # cargo-fuzz's own backtrace.
    grep -v -e '^ *[0-9]*: ' -e '^ *at ' "$log" | tail -n 40
    echo "fuzz $t FAILED; input saved as:"
    find "$artifacts/$t" -type f -newer "$start" | while read -r f; do
      echo "  $f"
      echo "  reproduce: cargo fuzz run $t --sanitizer none --target-dir $target_dir $f"
    done
    exit 1
  fi
  # libFuzzer's final stats: total runs and executions per second.
  grep -E "stat::number_of_executed_units|stat::average_exec_per_sec|Done [0-9]+ runs" "$log" || true
done
