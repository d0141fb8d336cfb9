//! IMS policy in real guests (issues #4 and #11), five boots in one sandbox. Every guest is told
//! "no IMS" (the SIOV table's IMS_OPT_OUT and, with the vIOMMU, Caching Mode) whatever the
//! policy; the test driver, enlightened by default, opts in through the hypercall where the
//! CPUID flags say the policy offers IMS, after checking that IMS calls are refused before:
//! - `--ims off --viommu`: the stock kernel finds the DMAR unit, reads Caching Mode, turns DMA
//!   remapping on (Debian's default) and drives ADIs correctly through it; the driver sees
//!   IMS disallowed and uses MSI-X;
//! - the same with `intel_iommu=off`: the unit stays off, ADIs work untranslated;
//! - `--ims pv` with in-memory IMS: the driver finds the hypercall, allocates 256 IMS vectors
//!   on one ADI beyond its 2 MSI-X vectors, stores the host message IMS_COMPOSE returns for
//!   each in its queue's IMS area, and every one is delivered from there; a masked entry gets
//!   its pending mark in queue memory and is delivered once on the IMS_MASK commit; the
//!   guest's own message stored in place of the host's raises nothing; handles it was not
//!   given raise nothing, nor does a raw message written to the (inert) IMS window; hypercalls
//!   naming an ADI that is not its own fail;
//! - `--ims trap` with on-device IMS: the driver writes its own messages into 256 slots of the
//!   ADI's IMS window, siovmm traps them, every vector is delivered, a masked slot holds its
//!   interrupt pending until unmasked, and a message naming no vCPU of the VM is not backed;
//! - `--ims pv` with the driver loaded as an unmodified one (`enlightened=0`: it obeys the
//!   platform's signals): it sees "no IMS" and uses MSI-X only, and siovmm opens nothing.

use siovmm_tests::{run_cases, CaseResult, GuestCase, Kernel};

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
echo GUEST-DRIVER-MODE="$(cat /sys/bus/pci/drivers/siov_adi/0000:00:01.0/mode)"
echo GUEST-ADI-RESULT="$(cat /sys/bus/pci/drivers/siov_adi/0000:00:01.0/result)"
echo GUEST-IMS-LINES=$(grep -c siov_adi-ims /proc/interrupts)
echo GUEST-IMS-IRQS=$(grep siov_adi-ims /proc/interrupts | awk '{s+=$2+$3} END {print s+0}')
echo GUEST-HINT-NO-IMS=$(dmesg | grep -c 'platform hint: no IMS')
echo GUEST-OPTED-IN=$(dmesg | grep -c 'opted in to IMS over the platform hint')
echo GUEST-DRIVER-ERRORS=$(dmesg | grep -iE 'siov_adi.*(error|fail)' | grep -vc 'module verification')
poweroff -f
"#;

const ADIS: &str = "8";

fn common(r: &CaseResult, adis: &str) {
    let t = r.transcript();
    assert!(r.value("GUEST-DMAR-UNIT").is_some_and(|u| u.contains("ver 1:0")), "{}: DMAR unit not found:\n{t}", r.name);
    assert_eq!(r.value("GUEST-IOMMU-PROBLEMS"), Some("0"), "{}: DMAR/IOMMU errors:\n{t}", r.name);

    assert_eq!(r.value("GUEST-ADI-PASS"), Some(adis), "{}: ADI self-tests:\n{t}", r.name);
    assert_eq!(r.value("GUEST-MSIX-MODE"), Some(adis), "{}: MSI-X vectors in use:\n{t}", r.name);
    assert_eq!(r.exit_code, Some(0), "{t}");
}

#[test]
fn ims_off_pv_and_trap_in_real_guests() {
    let assets = siovmm_tests::guest_assets().unwrap_or_else(|e| panic!("{e}"));
    let mut on = GuestCase::new("viommu-default", Kernel::Vmlinux, 2, CHECKS).with_adi_driver(&assets);
    on.extra_args = vec!["--adi".into(), ADIS.into(), "--viommu".into()];
    let mut off = on.clone();
    off.name = "viommu-off".into();
    off.cmdline.push_str(" intel_iommu=off");
    let mut pv = GuestCase::new("ims-pv", Kernel::Vmlinux, 2, CHECKS).with_adi_driver(&assets);
    pv.extra_args = ["--adi", "1", "--ims", "pv", "--ims-storage", "in-memory", "--viommu"].iter().map(|s| s.to_string()).collect();
    std::env::set_var("SIOVMM_TRACE_STARTUP", "1");
    let mut trap = GuestCase::new("ims-trap", Kernel::Vmlinux, 2, CHECKS).with_adi_driver(&assets);
    trap.extra_args = ["--adi", "1", "--ims", "trap"].iter().map(|s| s.to_string()).collect();
    let mut unmodified = GuestCase::new("ims-pv-unmodified", Kernel::Vmlinux, 2, &CHECKS.replace("insmod /siov_adi.ko", "insmod /siov_adi.ko enlightened=0"))
        .with_adi_driver(&assets);
    unmodified.extra_args = pv.extra_args.clone();
    let results = run_cases(&[on, off, pv, trap, unmodified]).unwrap_or_else(|e| panic!("{e}"));
    let translations = |r: &CaseResult| -> u64 {
        r.lines
            .iter()
            .find_map(|l| l.split("vIOMMU: ").nth(1)?.split(' ').next()?.parse().ok())
            .unwrap_or(u64::MAX)
    };
    for r in &results[..2] {
        common(r, ADIS);
        let t = r.transcript();
        assert_eq!(r.value("GUEST-SIOV-TABLE"), Some("00000001"), "{}: SIOV table IMS_OPT_OUT:\n{t}", r.name);
        assert_eq!(r.value("GUEST-DRIVER-MODE"), Some("msix 0"), "{}: IMS must be off:\n{t}", r.name);
        assert_eq!(r.value("GUEST-IMS-LINES"), Some("0"), "{t}");
        assert_eq!(r.value("GUEST-OPTED-IN"), Some("0"), "{}: the policy offers nothing to opt in to:\n{t}", r.name);
    }
    // Under every policy the platform says "no IMS"; the enlightened driver overrides it.
    for r in &results[2..4] {
        let t = r.transcript();
        assert_eq!(r.value("GUEST-SIOV-TABLE"), Some("00000001"), "{}: IMS_OPT_OUT stays on:\n{t}", r.name);
        assert_eq!(r.value("GUEST-HINT-NO-IMS"), Some("1"), "{t}");
        assert_eq!(r.value("GUEST-OPTED-IN"), Some("1"), "{t}");
        assert_eq!(r.value("GUEST-DRIVER-ERRORS"), Some("0"), "IMS refused before the opt-in:\n{t}");
    }
    // IMS through the hypercall, stored in queue memory: 256 vectors on one ADI, each
    // delivered once, on top of MSI-X; then one on the unmask commit and one after the forged
    // message is replaced by the host's again.
    let p = &results[2];
    let t_pv = p.transcript();
    common(p, "1");
    assert_eq!(p.value("GUEST-DMAR-CM"), Some("1"), "Caching Mode even where IMS is offered:\n{t_pv}");
    assert_eq!(p.value("GUEST-DRIVER-MODE"), Some("ims-pv-queue 256"), "{t_pv}");
    assert!(p.value("GUEST-ADI-RESULT").is_some_and(|r| r.starts_with("PASS") && r.contains(" ims=258 ")), "{t_pv}");
    assert_eq!(p.value("GUEST-IMS-LINES"), Some("256"), "{t_pv}");
    assert_eq!(p.value("GUEST-IMS-IRQS"), Some("258"), "{t_pv}");
    // Trap mode: 256 trapped slots, each delivered once, plus one delivered on unmask.
    let tr = &results[3];
    let t_tr = tr.transcript();
    assert_eq!(tr.value("GUEST-DMAR-UNIT"), Some(""), "no vIOMMU in this case:\n{t_tr}");
    assert_eq!(tr.value("GUEST-DRIVER-MODE"), Some("ims-trap 256"), "{t_tr}");
    assert!(tr.value("GUEST-ADI-RESULT").is_some_and(|r| r.starts_with("PASS") && r.contains(" ims=257 ")), "{t_tr}");
    assert_eq!(tr.value("GUEST-IMS-LINES"), Some("256"), "{t_tr}");
    assert_eq!(tr.value("GUEST-IMS-IRQS"), Some("257"), "{t_tr}");
    assert_eq!(tr.value("GUEST-ADI-PASS"), Some("1"), "{t_tr}");
    assert_eq!(tr.exit_code, Some(0), "{t_tr}");
    // An unmodified guest under --ims pv: it sees "no IMS" and never uses it.
    let u = &results[4];
    let t_u = u.transcript();
    common(u, "1");
    assert_eq!(u.value("GUEST-SIOV-TABLE"), Some("00000001"), "{t_u}");
    assert_eq!(u.value("GUEST-DMAR-CM"), Some("1"), "{t_u}");
    assert_eq!(u.value("GUEST-HINT-NO-IMS"), Some("1"), "{t_u}");
    assert_eq!(u.value("GUEST-DRIVER-MODE"), Some("msix 0"), "{t_u}");
    assert_eq!(u.value("GUEST-IMS-LINES"), Some("0"), "{t_u}");
    assert_eq!(u.value("GUEST-OPTED-IN"), Some("0"), "{t_u}");
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
