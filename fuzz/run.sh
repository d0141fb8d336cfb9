#!/usr/bin/env bash
# Runs every fuzz target (docs/fuzzing.md):
#   fuzz/run.sh [--runs N | --seconds S] [--keep] [TARGET...]
# each target for N executions (-runs) or S seconds (default: 10 seconds, what tests/run.sh
# uses so a regression fails CI), starting from its kept corpus (fuzz/corpus/TARGET), with new
# inputs going to a scratch directory. With --keep, the inputs that add coverage are merged
# into the kept corpus afterwards (libFuzzer -merge=1), to be committed. Prints libFuzzer's final stats per target;
# exits non-zero on the first crash, hang (-timeout 10 s per input) or leak, leaving the
# reproducer in fuzz/artifacts/TARGET.
# Installs what it needs: the nightly toolchain (rustup) and cargo-fuzz.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
limit=(-max_total_time=10)
targets=()
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) limit=(-runs="$2"); shift 2 ;;
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --keep) keep=1; shift ;;
    *) targets+=("$1"); shift ;;
  esac
done
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +stable install cargo-fuzz --locked --version 0.13.1
fi
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
cargo +nightly fuzz build --release
for t in "${targets[@]}"; do
  scratch=$(mktemp -d)
  log=$(mktemp)
  mkdir -p "corpus/$t"
  echo "fuzz: $t (${limit[*]})"
  start=$(date +%s)
  status=0
  cargo +nightly fuzz run --release "$t" "$scratch" "corpus/$t" -- \
    "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -detect_leaks=1 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|ERROR|SUMMARY|panicked|Test unit written' "$log" || true
  echo "fuzz: $t finished in $(( $(date +%s) - start )) s, status $status"
  if [ "$status" != 0 ]; then
    tail -n 60 "$log"
    exit "$status"
  fi
  if [ "$keep" = 1 ]; then
    cargo +nightly fuzz run --release "$t" "corpus/$t" "$scratch" -- -merge=1 >"$log" 2>&1
    echo "fuzz: $t corpus kept: $(ls "corpus/$t" | wc -l) inputs"
  fi
  rm -rf "$scratch" "$log"
done
