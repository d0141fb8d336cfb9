#!/usr/bin/env bash
# Boot-speed benchmark (docs/boot-performance.md): start -> guest /init -> exit, median of
# RUNS (default 5) runs, each in a fresh sandbox.
#
#   tests/bench.sh [RUNS]                    siovmm alone, plus a machine-speed yardstick
#   tests/bench.sh [RUNS] --reference        and libkrun (a rust-vmm VMM from crates.io, built
#                                            here as tests/reference/krun-ref) in the same sandboxes
#   tests/bench.sh [RUNS] --baseline BINARY  and any static VMM taking siovmm's boot flags
#   tests/bench.sh --exits [--reference]     instead: what one exit of each kind costs, timed by
#                                            a program in the guest (tests/guest/exit_cost)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/tests/setup.sh"

args=()
for a in "$@"; do
  if [ "$a" = "--reference" ]; then
    echo "bench: building the libkrun reference (tests/reference/krun-ref, static; a few minutes the first time)"
    (cd "$repo/tests/reference/krun-ref" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
        --locked --target x86_64-unknown-linux-gnu --target-dir "$repo/target/reference")
    args+=(--baseline "$repo/target/reference/x86_64-unknown-linux-gnu/release/krun-ref")
  else
    args+=("$a")
  fi
done
exec cargo run -q --release -p siovmm-tests --bin siovmm-bench -- "${args[@]}"
