#!/usr/bin/env bash
# Command 1 of the README: set up a bare machine and boot the stock Debian kernel under
# siovmm to a busybox shell on this terminal. Extra arguments go to siovmm-demo
# (--cpus N, --memory SIZE, --bzimage).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/tests/setup.sh"
exec cargo run -q --release -p siovmm-tests --bin siovmm-demo -- "$@"
