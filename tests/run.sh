#!/usr/bin/env bash
# Command 2 of the README: set up a bare machine and run every test (docs/testing.md).
#   1. clippy, the docs check (every path the docs name exists: tests/check-docs.py), then
#      every test: unit tests, KVM tests (on this host's /dev/kvm when it can
#      create VMs, else inside the QEMU-TCG sandbox), CLI tests of the binary, and the
#      integration tests that boot the stock Debian kernel (in the sandbox where this host's
#      KVM cannot run Linux); then every fuzz target for 10 s (fuzz/run.sh);
#   2. the KVM tests once more with the host's KVM hidden (SIOVMM_HIDE_KVM=1), so the sandbox
#      path they take on machines without /dev/kvm is proven here too. Skipped when this host
#      has no /dev/kvm: step 1 already ran them that way.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
start=$(date +%s)
# Every run the harness tries again is kept here (siovmm_sandbox::retries) and summarized at
# the end, pass or fail: a retried failure must leave its evidence in the log.
retries="$repo/target/test-retries.log"
mkdir -p "$repo/target"
rm -f "$retries"
report_retries() {
  if [ -s "$retries" ]; then
    echo "run.sh: runs tried again (whole transcripts in $retries):"
    grep -E '^=== retry|state of vCPU|reason shutdown|post-mortem of|triple fault on|KILLED when|@@STALL-MONITOR' "$retries" | cut -c1-600
  else
    echo "run.sh: no run was tried again"
  fi
}
trap report_retries EXIT
"$repo/tests/setup.sh"
cargo clippy --workspace --all-targets -- -D warnings
# The iommufd path (docs/vfio.md) is behind a feature: linted, and its CLI tested, with it on.
cargo clippy -p vmm --all-targets --features iommufd -- -D warnings
cargo test -p vmm --features iommufd --bin siovmm -- cli::
python3 "$repo/tests/check-docs.py"
cargo test --workspace
# Every fuzz target for 10 s from its kept corpus (nightly, cargo-fuzz; docs/fuzzing.md).
"$repo/fuzz/run.sh" --seconds 10
if [ -e /dev/kvm ]; then
  echo "run.sh: the KVM tests again with the host's KVM hidden (SIOVMM_HIDE_KVM=1)"
  SIOVMM_HIDE_KVM=1 cargo test --workspace --exclude siovmm-tests
else
  echo "run.sh: this host has no /dev/kvm: every KVM test above ran in the sandbox"
fi
echo "run.sh: all tests passed in $(( $(date +%s) - start )) s"
