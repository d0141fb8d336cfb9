#!/usr/bin/env bash
# Command 2 of the README: set up a bare machine and run every test.
#   unit tests, tests on this host's /dev/kvm with tiny payloads, CLI tests of the binary,
#   and the integration tests that boot the stock Debian kernel (in the QEMU-TCG sandbox
#   where this host's KVM cannot run Linux directly).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/tests/setup.sh"
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
