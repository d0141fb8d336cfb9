//! Boots the stock Debian kernel (as vmlinux and as bzImage, with 1 and 2 vCPUs) with a
//! busybox initramfs and checks, from inside the guest, what issue #2 promises (ending with
//! power-off and with reboot, each of which must end siovmm with status 0). All four runs
//! share one sandbox boot (see siovmm_tests::placement).

use siovmm_tests::{run_cases, CaseResult, GuestCase, Kernel};

const CHECKS: &str = r#"
echo GUEST-NPROC=$(nproc)
echo GUEST-MEMTOTAL-KB=$(awk '/^MemTotal/{print $2}' /proc/meminfo)
echo GUEST-PCI-DEVICES="$(ls /sys/bus/pci/devices | tr '\n' ' ')"
echo GUEST-HOSTBRIDGE-CLASS=$(cat /sys/bus/pci/devices/0000:00:00.0/class)
echo GUEST-HOSTBRIDGE-VENDOR=$(cat /sys/bus/pci/devices/0000:00:00.0/vendor)
echo GUEST-SMP="$(dmesg | grep -o 'Brought up .*')"
echo GUEST-ECAM="$(dmesg | grep -c 'MMCONFIG.*0xe0000000')"
pat='ACPI (BIOS )?(Error|Warning)|ACPI Exception|AE_[A-Z_]+ |ACPI: .*failed'
dmesg | grep -E "$pat" | sed 's/^/GUEST-ACPI-PROBLEM: /'
echo GUEST-ACPI-PROBLEMS=$(dmesg | grep -cE "$pat")
echo GUEST-SERIAL="$(dmesg | grep -o 'ttyS0 at I/O 0x3f8.*')"
echo GUEST-RTC-YEAR=$(cut -c1-4 /sys/class/rtc/rtc0/date 2>/dev/null)
echo GUEST-HOST-YEAR=HOSTYEAR
echo GUEST-ENDING=1
@ENDING@ -f
"#;

const MEMORY_MB: u64 = 512;

fn check(r: &CaseResult, cpus: u8) {
    let t = r.transcript();
    assert_eq!(r.value("GUEST-INIT-REACHED"), Some("1"), "{}: /init not reached:\n{t}", r.name);
    assert_eq!(r.value("GUEST-NPROC"), Some(cpus.to_string().as_str()), "{}: nproc:\n{t}", r.name);
    let mem_kb: u64 = r.value("GUEST-MEMTOTAL-KB").and_then(|v| v.parse().ok()).unwrap_or(0);
    // MemTotal excludes what the kernel reserves for itself: expect 85-100% of --memory.
    assert!(
        (MEMORY_MB * 1024 * 85 / 100..=MEMORY_MB * 1024).contains(&mem_kb),
        "{}: MemTotal {mem_kb} kB for --memory {MEMORY_MB}M:\n{t}",
        r.name
    );
    let pci = r.value("GUEST-PCI-DEVICES").unwrap_or("");
    assert!(pci.contains("0000:00:00.0"), "{}: host bridge missing from /sys/bus/pci/devices ({pci}):\n{t}", r.name);
    assert_eq!(r.value("GUEST-HOSTBRIDGE-CLASS"), Some("0x060000"), "{}:\n{t}", r.name);
    assert_eq!(r.value("GUEST-HOSTBRIDGE-VENDOR"), Some("0x5356"), "{}:\n{t}", r.name);
    assert_eq!(r.value("GUEST-ACPI-PROBLEMS"), Some("0"), "{}: ACPI errors in dmesg:\n{t}", r.name);
    assert_ne!(r.value("GUEST-ECAM"), Some("0"), "{}: ECAM (MCFG) not used:\n{t}", r.name);
    assert!(r.value("GUEST-SERIAL").is_some_and(|s| s.contains("16550A")), "{}: serial:\n{t}", r.name);
    if cpus > 1 {
        let smp = r.value("GUEST-SMP").unwrap_or("");
        assert!(smp.contains(&format!("{cpus} CPUs")), "{}: APs not started ({smp}):\n{t}", r.name);
    }
    assert_eq!(r.value("GUEST-RTC-YEAR"), r.value("GUEST-HOST-YEAR"), "{}: CMOS RTC (rtc0) date:\n{t}", r.name);
    assert_eq!(r.value("GUEST-ENDING"), Some("1"), "{}:\n{t}", r.name);
    assert_eq!(r.exit_code, Some(0), "{}: siovmm exit status after {} -f:\n{t}", r.name, ending(cpus));
}

/// How a case's guest ends: the 1-vCPU runs power off (ACPI S5), the 2-vCPU runs reboot (on this
/// hardware-reduced ACPI platform Linux restarts through the BIOS reset vector: siovmm's stub).
fn ending(cpus: u8) -> &'static str {
    if cpus == 1 {
        "poweroff"
    } else {
        "reboot"
    }
}

/// The host's current UTC year, to compare with the guest's RTC.
fn host_year() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // Good to the day for any date this test will run on: 365.2425-day years.
    (1970 + secs / 31_556_952).to_string()
}

#[test]
fn stock_kernel_boots_as_vmlinux_and_bzimage_with_1_and_2_vcpus() {
    let matrix = [(Kernel::Vmlinux, 1u8), (Kernel::Vmlinux, 2), (Kernel::BzImage, 1), (Kernel::BzImage, 2)];
    let cases: Vec<GuestCase> = matrix
        .iter()
        .map(|&(k, cpus)| GuestCase::new(&format!("{k:?}-{cpus}cpu").to_lowercase(), k, cpus, &CHECKS.replace("HOSTYEAR", &host_year()).replace("@ENDING@", ending(cpus))))
        .collect();
    // A guest that never ends: killed at its budget, after siovmm was asked (SIGUSR1) for its
    // vCPUs' state twice (docs/testing.md, "Diagnosing failures").
    let mut cases = cases;
    cases.push(GuestCase::new("hung-guest", Kernel::Vmlinux, 2, "echo GUEST-SPINNING\nwhile :; do :; done\n"));
    let results = run_cases(&cases).unwrap_or_else(|e| panic!("{e}"));
    for (r, &(_, cpus)) in results.iter().zip(matrix.iter()) {
        check(r, cpus);
        eprintln!("{}: ok in {:.1}s (guest /init at {:?} ms)", r.name, r.seconds.unwrap_or(0.0), r.boot_timer_ms());
    }
    let hung = &results[matrix.len()];
    let t = hung.transcript();
    assert_eq!(hung.exit_code, Some(137), "killed at its budget:\n{t}");
    assert!(hung.lines.iter().any(|l| l == "GUEST-SPINNING"), "{t}");
    let states = siovmm_sandbox::machine::vcpu_states(&hung.lines);
    for vcpu in 0..2 {
        let mine: Vec<_> = states.iter().filter(|s| s.vcpu == vcpu).collect();
        assert_eq!(mine.len(), 2, "vCPU {vcpu}: two state reports before the kill:\n{t}");
        // Wherever it was kicked (user loop, kernel, idle), its own tables map where it is.
        assert!(mine.iter().all(|s| s.rip_mapped_executable()), "vCPU {vcpu}: RIP mapped executable:\n{t}");
        // And a fault there would enter the kernel: the IDT gates, handlers and stacks of #PF
        // and #DF are mapped (what the harness checks before it calls a user-mode triple fault
        // the emulator's; arch::exception_entry).
        assert!(mine.iter().all(|s| s.enters_kernel_from_user()), "vCPU {vcpu}: kernel entry mapped:\n{t}");
    }
}
