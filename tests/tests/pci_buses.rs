//! More ADIs than one PCI root bus holds: 250 ADIs fill root bus 0 (248 functions) and go on
//! to root bus 1, its own host bridge in the DSDT (`\_SB_.PCI1`, `_BBN` 1) and in MCFG. The
//! stock kernel must find both root buses and all 250 functions, and the ADIs on bus 1 must
//! work: BARs in bus 1's window, the driver bound, MSI-X delivered.

use siovmm_tests::{run_cases, GuestCase, Kernel};

const ADIS: u32 = 250;

const SCRIPT: &str = r#"
# The driver takes 2 MSI-X vectors per ADI; 500 do not fit the x86 vector space of 2 vCPUs
# (about 200 per CPU), so it binds only to the first ADI of bus 0 and to those on bus 1:
# every other ADI is kept from it with driver_override.
echo GUEST-ADIS=$(grep -l 0x5356 /sys/bus/pci/devices/*/vendor | xargs -n1 dirname | xargs -I{} cat {}/device | grep -c 0x0002)
for f in /sys/bus/pci/devices/0000:00:*; do
  [ "$(cat $f/device)" = 0x0002 ] && [ "${f##*/}" != 0000:00:01.0 ] && echo none > $f/driver_override
done
insmod /siov_adi.ko || echo GUEST-INSMOD-FAILED=1
echo GUEST-ADI-BOUND=$(ls -d /sys/bus/pci/drivers/siov_adi/0000:* 2>/dev/null | wc -l)
echo GUEST-BUS1-ADIS=$(ls -d /sys/bus/pci/drivers/siov_adi/0000:01:* 2>/dev/null | wc -l)
# The kernel log is too small to keep boot messages past 250 ADIs' probes: ask sysfs.
echo GUEST-ROOT-BUSES=$(ls /sys/class/pci_bus | tr '\n' ' ')
echo GUEST-BUS1-FUNCTIONS=$(ls -d /sys/bus/pci/devices/0000:01:* 2>/dev/null | wc -l)
for f in /sys/bus/pci/devices/0000:01:*; do echo "GUEST-BUS1-DEV ${f##*/} $(cat $f/vendor):$(cat $f/device) driver=$(basename $(readlink $f/driver 2>/dev/null) 2>/dev/null) irq=$(cat $f/irq)"; done
# BAR0 of the first ADI on bus 1 (resource line 0: start end flags).
echo GUEST-BUS1-BAR0=$(head -1 /sys/bus/pci/devices/0000:01:01.0/resource | cut -d' ' -f1)
dmesg | grep -E '0000:01:' | tail -5 | sed 's/^/GUEST-PCI: /'
pass=0
for d in /sys/bus/pci/drivers/siov_adi/0000:01:* /sys/bus/pci/drivers/siov_adi/0000:00:01.0; do
  echo 1 > $d/run
  r=$(cat $d/result)
  case "$r" in PASS*) pass=$((pass+1));; *) echo "GUEST-ADI-FAIL ${d##*/}: $r";; esac
done
echo GUEST-ADI-PASS=$pass
echo GUEST-PCI-ERRORS=$(dmesg | grep -ciE 'pci.*(conflict|can.t claim|no space|failed to assign)')
dmesg | grep -iE 'pci.*(conflict|can.t claim|no space|failed to assign)' | sed 's/^/GUEST-DMESG: /'
poweroff -f
"#;

#[test]
fn adis_beyond_one_root_bus_work_on_the_next() {
    let assets = siovmm_tests::guest_assets().unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("SIOVMM_TRACE_STARTUP", "1");
    let mut case = GuestCase::new("adi250-two-buses", Kernel::Vmlinux, 2, SCRIPT).with_adi_driver(&assets);
    case.extra_args = vec!["--adi".into(), ADIS.to_string()];
    let r = run_cases(&[case]).unwrap_or_else(|e| panic!("{e}")).remove(0);
    let t = r.transcript();
    assert_eq!(r.value("GUEST-INIT-REACHED"), Some("1"), "{t}");
    assert_eq!(r.value("GUEST-INSMOD-FAILED"), None, "{t}");
    assert_eq!(r.value("GUEST-ADIS"), Some("250"), "the guest sees every ADI:\n{t}");
    assert_eq!(r.value("GUEST-ADI-BOUND"), Some("3"), "driver bound to 00:01.0 and bus 1's two ADIs:\n{t}");
    assert_eq!(r.value("GUEST-BUS1-ADIS"), Some("2"), "ADIs 249 and 250 on bus 1:\n{t}");
    assert_eq!(r.value("GUEST-ROOT-BUSES"), Some("0000:00 0000:01"), "{t}");
    assert_eq!(r.value("GUEST-BUS1-FUNCTIONS"), Some("2"), "{t}");
    // Root bus 1's share of the 32-bit window starts at 0xD000_0000 (two buses, 256 MiB each).
    assert_eq!(r.value("GUEST-BUS1-BAR0"), Some("0x00000000d0000000"), "{t}");
    assert_eq!(r.value("GUEST-ADI-PASS"), Some("3"), "self-tests on bus 1 and bus 0:\n{t}");
    assert_eq!(r.value("GUEST-PCI-ERRORS"), Some("0"), "{t}");
    assert!(r.lines_with("guest-triggered operations failed").iter().any(|l| l.contains("; 0 guest-triggered operations failed")), "{t}");
    assert_eq!(r.exit_code, Some(0), "{t}");
}
