#!/usr/bin/env bash
# Boot-speed benchmark (docs/boot-performance.md): start -> guest /init -> exit, median of
# RUNS (default 5) runs, each in a fresh sandbox.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/tests/setup.sh"
exec cargo run -q --release -p siovmm-tests --bin siovmm-bench -- "$@"
