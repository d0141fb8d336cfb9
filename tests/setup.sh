#!/usr/bin/env bash
# Prepares everything the sandbox boots need, from a bare Debian 12 machine:
#   - apt packages: qemu-system-x86 (the TCG sandbox, QEMU 10 from bookworm-backports),
#     busybox-static, acpica-tools (iasl -d), xz-utils, and the guest kernel's linux-headers to
#     build the guest test driver;
#   - the stock Debian guest kernel that linux-image-amd64 currently depends on: bzImage, the ELF
#     vmlinux recovered from it, and the KVM modules the sandbox loads;
#   - a static siovmm binary to drop into the sandbox's initramfs, and a static guest program
#     that measures exit costs (tests/guest/exit_cost, for siovmm-bench --exits).
# Idempotent: reruns only redo what is missing. Everything lands in $SIOVMM_ASSETS
# (default: <repo>/target/guest-assets).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
assets=${SIOVMM_ASSETS:-$repo/target/guest-assets}
mkdir -p "$assets"

need_pkgs=()
for p in qemu-system-x86 busybox-static acpica-tools xz-utils cpio gcc libc6-dev make; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ] || [ ! -f "$assets/.apt-updated" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  touch "$assets/.apt-updated"
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  fi
fi

# The sandbox's emulator: QEMU 10 from bookworm-backports, not Debian 12's QEMU 7.2, whose TCG
# broke nested guests' boots (triple faults on instruction fetches from mapped pages, whole
# sandboxes stalled): 5 guests side by side finished 4 of 10 boots under 7.2 and 20 of 20 under
# 10.0 on the same machine the same hour (docs/testing.md, "The emulator").
# Its major version, 0 when there is none (never failing, under set -e and pipefail).
qemu_major() { { qemu-system-x86_64 --version 2>/dev/null || true; } | awk 'NR==1{split($4, v, "."); m=v[1]} END{print m+0}'; }
major=$(qemu_major)
if [ "$major" -lt 10 ]; then
  export DEBIAN_FRONTEND=noninteractive
  cat > /etc/apt/sources.list.d/siovmm-bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
  major=$(qemu_major)
  [ "$major" -ge 10 ] || { echo "setup: QEMU 10 from bookworm-backports did not install: $(qemu-system-x86_64 --version | head -1)" >&2; exit 1; }
fi

# The kernel ABI package linux-image-amd64 depends on today (never a wildcard: that pulls every ABI).
abi_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$abi_pkg" ] || { echo "setup: cannot find the linux-image ABI package" >&2; exit 1; }
kver=${abi_pkg#linux-image-}
echo "$kver" > "$assets/kernel-version"
# Modules from the same package: KVM (loaded by every sandbox), kernel VFIO (loaded by the
# sandboxes that pass a device through, docs/vfio.md), and the stock NVMe driver with what it
# needs (loaded, in this order, by the guest that drives the passed-through controller), and
# the stock NE2000 driver, whose device has only an I/O BAR (docs/vfio.md, "I/O BARs").
sandbox_modules="virt/lib/irqbypass.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko arch/x86/kvm/kvm-intel.ko
  drivers/vfio/vfio.ko drivers/vfio/vfio_iommu_type1.ko drivers/vfio/vfio_virqfd.ko drivers/vfio/pci/vfio-pci-core.ko drivers/vfio/pci/vfio-pci.ko"
guest_modules="lib/crc64.ko crypto/crc64_rocksoft_generic.ko lib/crc64-rocksoft.ko crypto/crct10dif_common.ko crypto/crct10dif_generic.ko
  lib/crc-t10dif.ko block/t10-pi.ko drivers/nvme/host/nvme-core.ko drivers/nvme/host/nvme.ko
  drivers/net/ethernet/8390/8390.ko drivers/net/ethernet/8390/ne2k-pci.ko"
modules_missing=0
for m in $sandbox_modules; do [ -f "$assets/modules/$(basename "$m")" ] || modules_missing=1; done
for m in $guest_modules; do [ -f "$assets/guest-modules/$(basename "$m")" ] || modules_missing=1; done
if [ ! -f "$assets/bzImage" ] || [ ! -f "$assets/vmlinux" ] || [ "$modules_missing" = 1 ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download "$abi_pkg" >/dev/null 2>&1)
  dpkg-deb -x "$tmp"/"$abi_pkg"_*.deb "$tmp/x"
  cp "$tmp/x/boot/vmlinuz-$kver" "$assets/bzImage"
  # Recover the ELF vmlinux: the bzImage payload is XZ; find its magic and decompress from there.
  python3 - "$assets/bzImage" "$assets/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
off = data.find(b'\xfd7zXZ\x00')
if off < 0:
    sys.exit("setup: no XZ payload in bzImage")
d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
out = d.decompress(data[off:])
if out[:4] != b'\x7fELF':
    sys.exit("setup: decompressed payload is not ELF")
open(sys.argv[2], 'wb').write(out)
PY
  mdir="$tmp/x/lib/modules/$kver/kernel"
  copy_modules() { # DIR MODULES...
    local dir=$1; shift
    rm -rf "${assets:?}/$dir"; mkdir -p "$assets/$dir"
    for m in "$@"; do
      f="$mdir/$m"; [ -f "$f" ] || f="$f.xz"
      [ -f "$f" ] || { echo "setup: module $m missing from $abi_pkg" >&2; exit 1; }
      case "$f" in *.xz) xz -dc "$f" > "$assets/$dir/$(basename "${m}")";; *) cp "$f" "$assets/$dir/";; esac
    done
  }
  # shellcheck disable=SC2086 # word lists
  copy_modules modules $sandbox_modules
  # shellcheck disable=SC2086
  copy_modules guest-modules $guest_modules
  rm -rf "$tmp"
fi
cp /bin/busybox "$assets/busybox"

# The guest test driver (tests/guest/siov_adi), built against the guest kernel's own headers.
if ! dpkg -s "linux-headers-$kver" >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >/dev/null
fi
modsrc="$repo/tests/guest/siov_adi"
if [ ! -f "$assets/siov_adi.ko" ] || [ "$modsrc/siov_adi.c" -nt "$assets/siov_adi.ko" ]; then
  build=$(mktemp -d)
  cp "$modsrc"/siov_adi.c "$modsrc"/Makefile "$build/"
  if ! make -s -C "/usr/src/linux-headers-$kver" M="$build" modules >"$build/make.log" 2>&1; then
    cat "$build/make.log" >&2
    echo "setup: building the guest driver failed" >&2
    exit 1
  fi
  cp "$build/siov_adi.ko" "$assets/siov_adi.ko"
  rm -rf "$build"
fi

# The guest exit-cost probe (siovmm-bench --exits): a static program for the busybox guest.
probe_src="$repo/tests/guest/exit_cost/exit_cost.c"
if [ ! -f "$assets/exit_cost" ] || [ "$probe_src" -nt "$assets/exit_cost" ]; then
  gcc -O2 -static -Wall -Werror -o "$assets/exit_cost" "$probe_src"
fi

# The sandbox's KVM ballast (sandbox/ballast/kvm_ballast.c: no kernel code patching while
# tests run; docs/testing.md).
ballast_src="$repo/sandbox/ballast/kvm_ballast.c"
if [ ! -f "$assets/kvm_ballast" ] || [ "$ballast_src" -nt "$assets/kvm_ballast" ]; then
  gcc -O2 -static -Wall -Werror -o "$assets/kvm_ballast" "$ballast_src"
fi

# Static siovmm, its API client and the device daemon for the sandbox initramfs. siovmm has
# the iommufd feature, so that tests/tests/vfio.rs checks its refusal on the sandbox's kernel.
if [ "${SIOVMM_SKIP_BUILD:-0}" != 1 ]; then
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
      --target x86_64-unknown-linux-gnu --target-dir "$repo/target/static" -p vmm -p siovmm-devd --features vmm/iommufd)
  cp "$repo/target/static/x86_64-unknown-linux-gnu/release/siovmm" "$assets/siovmm"
  cp "$repo/target/static/x86_64-unknown-linux-gnu/release/siovmm-devd" "$assets/siovmm-devd"
  cp "$repo/target/static/x86_64-unknown-linux-gnu/release/siovmm-ctl" "$assets/siovmm-ctl"
fi
echo "setup: assets ready in $assets (guest kernel $kver)"
