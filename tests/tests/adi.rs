//! ADIs in a real guest (issue #3): one boot of the stock kernel with 64 ADIs of the software
//! SIOV device. The guest driver (tests/guest/siov_adi) binds every ADI, enables MSI-X and runs
//! its self-test on each: every opcode with a completion interrupt, results checked, a
//! descriptor outside guest memory completing with an error, and a masked vector that raises
//! nothing, shows pending in the PBA, and delivers exactly once when unmasked.

use siovmm_tests::{run_cases, CaseResult, GuestCase, Kernel};

const ADIS: u32 = 64;

const SELFTEST: &str = r#"
insmod /siov_adi.ko || echo GUEST-INSMOD-FAILED=1
echo GUEST-ADI-BOUND=$(ls -d /sys/bus/pci/drivers/siov_adi/0000:* 2>/dev/null | wc -l)
# Linux sees a PCI Express function (4 KiB config space) with the PCIe capability at 0x50.
echo GUEST-ADI-CFGSIZE=$(stat -c %s /sys/bus/pci/devices/0000:00:01.0/config)
echo GUEST-ADI-PCIECAP=$(od -An -tx1 -j 80 -N 4 /sys/bus/pci/devices/0000:00:01.0/config | tr -d ' ')
pass=0
for d in /sys/bus/pci/drivers/siov_adi/0000:*; do
  echo 1 > $d/run
  r=$(cat $d/result)
  case "$r" in PASS*) pass=$((pass+1)); last="$r";; *) echo "GUEST-ADI-FAIL ${d##*/}: $r";; esac
done
echo "GUEST-ADI-LAST=$last"
# Retarget every live completion vector to CPU 1 (Linux rewrites the MSI-X entry: new
# destination, same vector), then run everything again.
for n in $(grep siov_adi-cq /proc/interrupts | cut -d: -f1); do echo 2 > /proc/irq/$n/smp_affinity; done
pass=0
handled=0
for d in /sys/bus/pci/drivers/siov_adi/0000:*; do
  echo 1 > $d/run
  r=$(cat $d/result)
  # The driver's own count of completion interrupts its handler took since probe.
  case "$r" in PASS*) pass=$((pass+1)); n=${r#*irqs=}; handled=$((handled + ${n%% *}));; *) echo "GUEST-ADI-FAIL2 ${d##*/}: $r";; esac
done
echo GUEST-ADI-PASS-RETARGETED=$pass
echo GUEST-CQ-HANDLED=$handled
echo GUEST-CQ-ON-CPU1=$(grep siov_adi-cq /proc/interrupts | awk '{s+=$3} END {print s}')

echo GUEST-ADI-PASS=$pass
# Completion interrupts per /proc/interrupts: one line per ADI ("siov_adi-cq"), summed over CPUs.
echo GUEST-CQ-LINES=$(grep -c siov_adi-cq /proc/interrupts)
echo GUEST-CQ-IRQS=$(grep siov_adi-cq /proc/interrupts | awk '{n=0; for(i=2;i<=NF;i++){ if ($i ~ /^[0-9]+$/) n+=$i; else break }; s+=n} END {print s}')
grep siov_adi-cq /proc/interrupts | head -2 | sed 's/^/GUEST-IRQLINE: /'
dmesg | grep -iE 'siov_adi.*(fail|error)' | grep -v 'module verification' | sed 's/^/GUEST-DMESG: /'
echo GUEST-DMESG-ERRORS=$(dmesg | grep -iE 'siov_adi.*(fail|error)' | grep -vc 'module verification')
poweroff -f
"#;

fn check(r: &CaseResult) {
    let t = r.transcript();
    assert_eq!(r.value("GUEST-INIT-REACHED"), Some("1"), "{t}");
    assert_eq!(r.value("GUEST-INSMOD-FAILED"), None, "{t}");
    assert_eq!(r.value("GUEST-ADI-BOUND"), Some(ADIS.to_string().as_str()), "driver bound to every ADI:\n{t}");
    assert_eq!(r.value("GUEST-ADI-CFGSIZE"), Some("4096"), "{t}");
    assert_eq!(r.value("GUEST-ADI-PCIECAP"), Some("10009200"), "{t}");
    assert_eq!(r.value("GUEST-ADI-PASS"), Some(ADIS.to_string().as_str()), "self-test on every ADI:\n{t}");
    assert_eq!(r.value("GUEST-CQ-LINES"), Some(ADIS.to_string().as_str()), "{t}");
    assert_eq!(r.value("GUEST-ADI-PASS-RETARGETED"), Some(ADIS.to_string().as_str()), "after retargeting:\n{t}");
    // Two self-tests per ADI, each 7 descriptors with interrupts + 1 delivered on unmask: the
    // driver's handlers took exactly that many.
    let number = |key: &str| -> u32 { r.value(key).and_then(|v| v.parse().ok()).unwrap_or(0) };
    assert_eq!(number("GUEST-CQ-HANDLED"), ADIS * 16, "interrupts the driver handled:\n{t}");
    // /proc/interrupts may count fewer: an edge that arrives while the same IRQ's handler runs
    // on the other CPU (an affinity move makes that possible) is run again by that CPU's loop
    // but counted once (kernel/irq/chip.c, handle_edge_irq: IRQS_PENDING). Seen once in a loaded
    // run (1,023 of 1,024). Every such coalesced edge is accounted for below.
    let counted = number("GUEST-CQ-IRQS");
    assert!(counted <= ADIS * 16, "more interrupts counted than handled: {counted}\n{t}");
    let coalesced = ADIS * 16 - counted;
    assert!(coalesced <= ADIS, "{coalesced} edges coalesced: more than one per ADI\n{t}");
    // x86 Linux moves an MSI when its next interrupt arrives (the first one after the affinity
    // write still lands on the old CPU), then rewrites the live entry: the other 7 of the second
    // run land on CPU 1 through the rewritten route (less any coalesced there).
    let on_cpu1 = number("GUEST-CQ-ON-CPU1");
    assert!(on_cpu1 + coalesced >= ADIS * 7, "retargeted interrupts on CPU 1: {on_cpu1} ({coalesced} coalesced)\n{t}");
    assert_eq!(r.value("GUEST-DMESG-ERRORS"), Some("0"), "{t}");
    // The fast path: every doorbell write completed in KVM (ioeventfd), none reached siovmm.
    let summary = r.lines_with("doorbell writes exited to siovmm");
    assert!(summary.iter().any(|l| l.contains("; 0 doorbell writes exited")), "{t}");
    assert_eq!(r.exit_code, Some(0), "{t}");
}

/// Two guests in one sandbox boot: on-device IMS with every vector on a KVM route and doorbells
/// as KVM ioeventfds, and in-memory IMS with the route budget cut to 64 so half of the 128
/// vectors take the overflow path (what a guest beyond KVM's 4096 routes gets) and mapped
/// portals (each ADI's doorbell page mapped into the guest, polled by the device). Both must
/// see every interrupt.
#[test]
fn sixty_four_adis_run_every_opcode_with_interrupts() {
    let assets = siovmm_tests::guest_assets().unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("SIOVMM_TRACE_STARTUP", "1");
    let mut routed = GuestCase::new("adi64-routed", Kernel::Vmlinux, 2, SELFTEST).with_adi_driver(&assets);
    routed.extra_args = vec!["--adi".into(), ADIS.to_string()];
    let mut overflow = GuestCase::new("adi64-overflow", Kernel::Vmlinux, 2, SELFTEST).with_adi_driver(&assets);
    overflow.extra_args = ["--adi", "32", "--adi", "32", "--ims-storage", "in-memory", "--max-msi-routes", "64", "--siov-portal", "mapped"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for r in run_cases(&[routed, overflow]).unwrap_or_else(|e| panic!("{e}")) {
        check(&r);
        // Each ADI's portal page mapped wherever BAR0 was placed (at least once each; Linux's BAR
        // sizing takes the BAR off and puts it back), or none with doorbell portals.
        let summary = r.lines_with("doorbell writes exited to siovmm");
        let pages: Option<u32> = summary.first().and_then(|l| l.split("; ").find_map(|p| p.strip_suffix(" portal pages mapped")?.parse().ok()));
        let mapped = r.name == "adi64-overflow";
        assert!(pages.is_some_and(|n| if mapped { n >= ADIS } else { n == 0 }), "{pages:?} portal pages:\n{}", r.transcript());
        eprintln!("{}: {}", r.name, r.value("GUEST-ADI-LAST").unwrap_or("?"));
        for l in r.lines_with("siovmm: startup: run") {
            eprintln!("{}: {l}", r.name);
        }
    }
}
