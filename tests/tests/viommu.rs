//! The virtual VT-d unit and the "no IMS" policy, in real guests (issue #4, part 1): the stock
//! kernel finds the DMAR unit, reads Caching Mode, turns DMA remapping on (Debian's default) and
//! drives ADIs correctly through it; with `intel_iommu=off` it leaves the unit off and drives
//! them untranslated. Both boots share one sandbox.

use siovmm_tests::{run_cases, Assets, CaseResult, GuestCase, Kernel};

const CHECKS: &str = r#"
echo GUEST-DMAR-UNIT="$(dmesg | grep -o 'dmar0: reg_base_addr fed90000.*')"
echo GUEST-DMAR-CM=$(dmesg | grep -c 'IOMMU batching disallowed due to virtualization')
echo GUEST-DMAR-ENABLED=$(dmesg | grep -c 'Intel(R) Virtualization Technology for Directed I/O')
echo GUEST-IOMMU-GROUP=$(ls /sys/bus/pci/devices/0000:00:01.0/iommu_group >/dev/null 2>&1 && echo yes || echo no)
pat='DMAR:.*([Ee]rror|[Ff]ault|[Ff]ail|[Bb]roken|[Ww]arn)|DMAR-IR|iommu.*[Ee]rror|ACPI (BIOS )?(Error|Warning)'
dmesg | grep -E "$pat" | sed 's/^/GUEST-IOMMU-PROBLEM: /'
echo GUEST-IOMMU-PROBLEMS=$(dmesg | grep -cE "$pat")
echo GUEST-SIOV-TABLE=$(ls /sys/firmware/acpi/tables/SIOV >/dev/null 2>&1 && od -An -tx4 -j36 -N4 /sys/firmware/acpi/tables/SIOV | tr -d ' ')
insmod /siov_adi.ko
pass=0
for d in /sys/bus/pci/drivers/siov_adi/0000:*; do
  echo 1 > $d/run
  case "$(cat $d/result)" in PASS*) pass=$((pass+1));; *) echo "GUEST-ADI-FAIL ${d##*/}: $(cat $d/result)";; esac
done
echo GUEST-ADI-PASS=$pass
echo GUEST-MSIX-MODE=$(grep -c siov_adi-cq /proc/interrupts)
poweroff -f
"#;

const ADIS: &str = "8";

fn common(r: &CaseResult) {
    let t = r.transcript();
    assert!(r.value("GUEST-DMAR-UNIT").is_some_and(|u| u.contains("ver 1:0")), "{}: DMAR unit not found:\n{t}", r.name);
    assert_eq!(r.value("GUEST-IOMMU-PROBLEMS"), Some("0"), "{}: DMAR/IOMMU errors:\n{t}", r.name);
    assert_eq!(r.value("GUEST-SIOV-TABLE"), Some("00000001"), "{}: SIOV table IMS_OPT_OUT:\n{t}", r.name);
    assert_eq!(r.value("GUEST-ADI-PASS"), Some(ADIS), "{}: ADI self-tests:\n{t}", r.name);
    assert_eq!(r.value("GUEST-MSIX-MODE"), Some(ADIS), "{}: driver in MSI-X mode:\n{t}", r.name);
    assert_eq!(r.exit_code, Some(0), "{t}");
}

#[test]
fn dmar_unit_with_caching_mode_translates_adi_dma_or_stays_off() {
    let assets = Assets::locate().unwrap_or_else(|e| panic!("{e}"));
    let mut on = GuestCase::new("viommu-default", Kernel::Vmlinux, 2, CHECKS).with_adi_driver(&assets);
    on.extra_args = vec!["--adi".into(), ADIS.into(), "--viommu".into()];
    let mut off = on.clone();
    off.name = "viommu-off".into();
    off.cmdline.push_str(" intel_iommu=off");
    std::env::set_var("SIOVMM_TRACE_STARTUP", "1");
    let results = run_cases(&[on, off]).unwrap_or_else(|e| panic!("{e}"));
    let translations = |r: &CaseResult| -> u64 {
        r.lines
            .iter()
            .find_map(|l| l.split("vIOMMU: ").nth(1)?.split(' ').next()?.parse().ok())
            .unwrap_or(u64::MAX)
    };
    for r in &results {
        common(r);
    }
    let (t_on, t_off) = (results[0].transcript(), results[1].transcript());
    // Remapping on: Caching Mode seen, translation enabled, devices in IOMMU groups; every ADI
    // DMA went through the guest's IOVA tables (the self-tests check the data).
    assert_eq!(results[0].value("GUEST-DMAR-CM"), Some("1"), "{t_on}");
    assert_eq!(results[0].value("GUEST-DMAR-ENABLED"), Some("1"), "{t_on}");
    assert_eq!(results[0].value("GUEST-IOMMU-GROUP"), Some("yes"), "{t_on}");
    assert!((1..u64::MAX).contains(&translations(&results[0])), "ADI DMA was not translated:\n{t_on}");
    // intel_iommu=off: the unit is found but not used.
    assert_eq!(results[1].value("GUEST-DMAR-ENABLED"), Some("0"), "{t_off}");
    assert_eq!(results[1].value("GUEST-IOMMU-GROUP"), Some("no"), "{t_off}");
    assert_eq!(translations(&results[1]), 0, "{t_off}");
}
