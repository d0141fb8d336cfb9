//! 1,024 ADIs in one guest (issue 12: "≥ 1,024 ADIs in one guest, every ADI's self-test
//! passing"). One PCI root bus holds 248 functions, so the ADIs fill root buses 0 to 3 and go
//! on to root bus 4, each bus its own host bridge in the DSDT (`\_SB_.PCIn`, `_BBN` n) and in
//! MCFG, with its own share of the BAR windows. The stock kernel must find all five root buses
//! and all 1,024 functions, and every ADI must work: BARs in its bus's window, the driver
//! bound, a self-test (descriptors, completion, MSI-X) passing.

use siovmm_tests::{run_cases, GuestCase, Kernel};

const ADIS: u32 = 1024;

/// ADIs the driver holds at once. It takes 2 MSI-X vectors per ADI, and 2 vCPUs have about
/// 200 free x86 vectors each: 2,048 vectors do not fit, so the guest binds, self-tests and
/// unbinds the ADIs 96 at a time (192 vectors).
const BATCH: u32 = 96;

/// The guest's script: every ADI kept from the driver (driver_override), then batch after
/// batch bound (drivers_probe), self-tested and unbound.
fn script() -> String {
    format!(
        r#"
adis=$(for f in /sys/bus/pci/devices/*; do [ "$(cat $f/vendor)" = 0x5356 ] && [ "$(cat $f/device)" = 0x0002 ] && echo ${{f##*/}}; done)
set -- $adis
echo GUEST-ADIS=$#
for a in $adis; do echo none > /sys/bus/pci/devices/$a/driver_override; done
insmod /siov_adi.ko || echo GUEST-INSMOD-FAILED=1
echo GUEST-BOUND-AT-LOAD=$(ls -d /sys/bus/pci/drivers/siov_adi/0000:* 2>/dev/null | wc -l)
echo GUEST-ROOT-BUSES=$(ls /sys/class/pci_bus | tr '\n' ' ')
# Per root bus: how many functions, and BAR0 of its first ADI (resource line 0: start end flags).
for b in 00 01 02 03 04; do
  echo "GUEST-BUS $b functions=$(ls -d /sys/bus/pci/devices/0000:$b:* 2>/dev/null | wc -l) bar0=$(head -1 /sys/bus/pci/devices/0000:$b:01.0/resource 2>/dev/null | cut -d' ' -f1)"
done
pass=0; batches=0; most=0
while [ $# -gt 0 ]; do
  batch=""; n=0
  while [ $# -gt 0 ] && [ $n -lt {BATCH} ]; do batch="$batch $1"; shift; n=$((n+1)); done
  for a in $batch; do
    echo siov_adi > /sys/bus/pci/devices/$a/driver_override
    echo $a > /sys/bus/pci/drivers_probe
  done
  bound=$(ls -d /sys/bus/pci/drivers/siov_adi/0000:* 2>/dev/null | wc -l)
  [ $bound -gt $most ] && most=$bound
  for a in $batch; do
    d=/sys/bus/pci/drivers/siov_adi/$a
    if [ -e $d/run ]; then echo 1 > $d/run; r=$(cat $d/result); else r="not bound"; fi
    case "$r" in PASS*) pass=$((pass+1));; *) echo "GUEST-ADI-FAIL $a: $r";; esac
  done
  for a in $batch; do
    echo $a > /sys/bus/pci/drivers/siov_adi/unbind 2>/dev/null
    echo none > /sys/bus/pci/devices/$a/driver_override
  done
  batches=$((batches+1))
done
echo GUEST-BATCHES=$batches
echo GUEST-MOST-BOUND=$most
echo GUEST-ADI-PASS=$pass
echo GUEST-STILL-BOUND=$(ls -d /sys/bus/pci/drivers/siov_adi/0000:* 2>/dev/null | wc -l)
echo GUEST-PCI-ERRORS=$(dmesg | grep -ciE 'pci.*(conflict|can.t claim|no space|failed to assign)')
dmesg | grep -iE 'pci.*(conflict|can.t claim|no space|failed to assign)' | sed 's/^/GUEST-DMESG: /'
poweroff -f
"#
    )
}

#[test]
fn a_thousand_adis_on_five_root_buses_all_work() {
    let assets = siovmm_tests::guest_assets().unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("SIOVMM_TRACE_STARTUP", "1");
    let mut case = GuestCase::new("adi1024-five-buses", Kernel::Vmlinux, 2, &script()).with_adi_driver(&assets);
    case.extra_args = vec!["--adi".into(), ADIS.to_string(), "--siov-adis".into(), ADIS.to_string()];
    let r = run_cases(&[case]).unwrap_or_else(|e| panic!("{e}")).remove(0);
    let t = r.transcript();
    assert_eq!(r.value("GUEST-INIT-REACHED"), Some("1"), "{t}");
    assert_eq!(r.value("GUEST-INSMOD-FAILED"), None, "{t}");
    assert_eq!(r.value("GUEST-ADIS"), Some("1024"), "the guest sees every ADI:\n{t}");
    assert_eq!(r.value("GUEST-BOUND-AT-LOAD"), Some("0"), "driver_override kept every ADI from the driver:\n{t}");
    assert_eq!(r.value("GUEST-ROOT-BUSES"), Some("0000:00 0000:01 0000:02 0000:03 0000:04"), "{t}");
    // 248 ADIs on each full bus (devices 1-31), bus 0's host bridge beside them, the other 32
    // on bus 4; each bus's first ADI at the start of its share of the 32-bit window: 512 MiB
    // from 0xC000_0000 split five ways, rounded down to 1 MiB (arch::pci), 0x660_0000 each.
    for (bus, functions) in [(0u64, 249), (1, 248), (2, 248), (3, 248), (4, 32)] {
        let bar0 = format!("0x{:016x}", 0xC000_0000u64 + bus * 0x660_0000);
        let want = format!("GUEST-BUS {bus:02} functions={functions} bar0={bar0}");
        assert_eq!(r.lines_with(&format!("GUEST-BUS {bus:02} ")), [want.as_str()], "{t}");
    }
    assert_eq!(r.value("GUEST-BATCHES"), Some(ADIS.div_ceil(BATCH).to_string().as_str()), "{t}");
    assert_eq!(r.value("GUEST-MOST-BOUND"), Some(BATCH.to_string().as_str()), "a whole batch bound at once:\n{t}");
    assert_eq!(r.value("GUEST-ADI-PASS"), Some("1024"), "every ADI's self-test:\n{t}");
    assert_eq!(r.value("GUEST-STILL-BOUND"), Some("0"), "{t}");
    assert_eq!(r.value("GUEST-PCI-ERRORS"), Some("0"), "{t}");
    // Binding 2,048 vectors a batch at a time shrank glibc's malloc arenas on a vCPU thread and
    // the overflow injector, which opens /proc/sys/vm/overcommit_memory then: refused by the
    // seccomp handler, it must not stop the VM (seccomp/src/trap.rs).
    assert_eq!(r.lines_with("made system call"), Vec::<&str>::new(), "{t}");
    assert!(r.lines_with("guest-triggered operations failed").iter().any(|l| l.contains("; 0 guest-triggered operations failed")), "{t}");
    assert_eq!(r.exit_code, Some(0), "{t}");
}
