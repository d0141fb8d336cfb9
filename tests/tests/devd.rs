//! The SIOV device as its own process (issue 11): one `siovmm-devd` in the sandbox serves its
//! ADIs over vfio-user, and VMs take them with `--vfio-user`. In each guest the stock-kernel
//! test driver (tests/guest/siov_adi) binds every ADI and runs its self-test: every opcode
//! with a completion interrupt, a descriptor outside guest memory completing with an error, a
//! masked vector pending in the PBA and delivered once on unmask. The ADIs' config space,
//! registers and IMS-backed vectors come from the daemon; siovmm only virtualizes the PCI
//! function (BARs, MSI-X table) as it does for kernel VFIO.
//!
//! The VMs run one after another against the same daemon, whose device has exactly as many
//! IMS entries as its ADIs need: the third VM gets ADIs 0 and 1 again only if the first VM's
//! exit gave them and their IMS entries back. A VM with two in-process ADIs, in the same
//! sandbox, gives the figures the daemon's path is compared with.

use std::time::Duration;

use siovmm_tests::{guest_assets, run_cases_with_setup, CaseResult, GuestCase, Kernel, SandboxSetup};

/// ADIs of the daemon's device; 2 vectors each, and exactly that many IMS entries.
const DAEMON_ADIS: u32 = 5;

const SELFTEST: &str = r#"
insmod /siov_adi.ko || echo GUEST-INSMOD-FAILED=1
echo GUEST-ADI-BOUND=$(ls -d /sys/bus/pci/drivers/siov_adi/0000:* 2>/dev/null | wc -l)
pass=0
for d in /sys/bus/pci/drivers/siov_adi/0000:*; do
  echo 1 > $d/run
  r=$(cat $d/result)
  echo "GUEST-ADI-RESULT ${d##*/}: $r"
  case "$r" in PASS*) pass=$((pass+1));; esac
done
echo GUEST-ADI-PASS=$pass
echo GUEST-DMESG-ERRORS=$(dmesg | grep -iE 'siov_adi.*(fail|error)' | grep -vc 'module verification')
poweroff -f
"#;

fn sockets(adis: &[u32]) -> Vec<String> {
    adis.iter().flat_map(|a| ["--vfio-user".to_string(), format!("/run/devd/adi-{a}.sock")]).collect()
}

fn guest(name: &str, args: Vec<String>, assets: &siovmm_tests::Assets) -> GuestCase {
    let mut case = GuestCase::new(name, Kernel::Vmlinux, 1, SELFTEST).with_adi_driver(assets);
    case.memory = "256M".into();
    case.extra_args = args;
    case
}

/// The driver's figure `key` (e.g. `roundtrip_ns`) from each ADI's result line.
fn figures(r: &CaseResult, key: &str) -> Vec<u64> {
    r.lines_with("GUEST-ADI-RESULT")
        .iter()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")[..])?.parse().ok()))
        .collect()
}

fn check(r: &CaseResult, adis: usize) {
    let t = r.transcript();
    assert_eq!(r.value("GUEST-INIT-REACHED"), Some("1"), "{t}");
    assert_eq!(r.value("GUEST-INSMOD-FAILED"), None, "{t}");
    assert_eq!(r.value("GUEST-ADI-BOUND"), Some(adis.to_string().as_str()), "driver bound to every ADI:\n{t}");
    assert_eq!(r.value("GUEST-ADI-PASS"), Some(adis.to_string().as_str()), "self-test on every ADI:\n{t}");
    assert_eq!(r.value("GUEST-DMESG-ERRORS"), Some("0"), "{t}");
    assert_eq!(r.exit_code, Some(0), "{t}");
}

#[test]
fn vms_take_the_daemons_adis_and_give_them_back() {
    let assets = guest_assets().unwrap_or_else(|e| panic!("{e}"));
    let devd = assets.read("siovmm-devd").unwrap_or_else(|e| panic!("{e} (tests/setup.sh builds it)"));
    let ims = DAEMON_ADIS * 2;
    let script = format!(
        "mkdir -p /run/devd
SIOVMM_LOG=info /siovmm-devd --socket-dir /run/devd --adis {DAEMON_ADIS} --vectors 2 --ims-entries {ims} > /tmp/devd.log 2>&1 &
i=0; while [ ! -S /run/devd/adi-{last}.sock ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
echo SETUP-SOCKETS=$(ls /run/devd | wc -l)
",
        last = DAEMON_ADIS - 1
    );
    let setup = SandboxSetup {
        script,
        script_idle: Duration::from_secs(2),
        files: vec![("siovmm-devd".into(), 0o755, devd)],
        ..Default::default()
    };
    let cases = [
        guest("devd-first", sockets(&[0, 1]), &assets),
        guest("devd-second", sockets(&[2, 3, 4]), &assets),
        guest("devd-again", sockets(&[0, 1]), &assets),
        guest("in-process", vec!["--adi".into(), "2".into()], &assets),
    ];
    let (setup_result, results) = run_cases_with_setup(&cases, &setup).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(setup_result.value("SETUP-SOCKETS"), Some(DAEMON_ADIS.to_string().as_str()), "{}", setup_result.transcript());
    for (r, adis) in results.iter().zip([2, 3, 2, 2]) {
        check(r, adis);
    }
    for r in &results[..3] {
        let t = r.transcript();
        // Every ADI's doorbell an ioeventfd, and no request refused or lost.
        assert_eq!(r.lines_with("vfio-user (1 ioeventfds, 0 failed requests)").len(), r.lines_with("vfio-user (").len(), "{t}");
        assert!(!r.lines_with("vfio-user (").is_empty(), "{t}");
    }
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let daemon: Vec<u64> = results[..3].iter().flat_map(|r| figures(r, "roundtrip_ns")).collect();
    let own = figures(&results[3], "roundtrip_ns");
    let (daemon, own) = (median(daemon), median(own));
    println!(
        "doorbell→completion (polled NOOP, median per ADI): daemon over vfio-user {daemon} ns, in-process {own} ns, ratio {:.2}",
        daemon as f64 / own.max(1) as f64
    );
}
