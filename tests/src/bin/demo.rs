//! `siovmm-demo`: boots the stock Debian kernel under siovmm, with ADIs of the software SIOV
//! device and the test driver loaded, to a busybox shell on this terminal (inside the QEMU-TCG
//! sandbox where the host's KVM cannot run Linux directly).
//! Usage: siovmm-demo [--cpus N] [--memory SIZE] [--adi N] [--bzimage]

use siovmm_tests::{placement, run_interactive, GuestCase, Kernel};

const SHELL_INIT: &str = "[ -e /siov_adi.ko ] && insmod /siov_adi.ko
echo
echo 'siovmm guest: busybox shell on COM1. ADIs (PCI 5356:0002) and their driver:'
ls /sys/bus/pci/drivers/siov_adi 2>/dev/null | grep 0000 | sed 's/^/  /'
echo 'Try: for d in /sys/bus/pci/drivers/siov_adi/0000:*; do echo 1 > $d/run; cat $d/result; done'
echo '     grep siov_adi /proc/interrupts; nproc; cat /proc/meminfo; dmesg'
echo 'Leave the shell (exit or Ctrl-D) to power the guest off.'
setsid cttyhack sh
poweroff -f
";

fn main() {
    let mut cpus = 2u8;
    let mut memory = "512M".to_string();
    let mut kernel = Kernel::Vmlinux;
    let mut adis = 4u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cpus" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) => cpus = n,
                None => fail("--cpus needs a number"),
            },
            "--memory" => match args.next() {
                Some(m) => memory = m,
                None => fail("--memory needs a size"),
            },
            "--adi" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) => adis = n,
                None => fail("--adi needs a number"),
            },
            "--bzimage" => kernel = Kernel::BzImage,
            "-h" | "--help" => {
                println!("usage: siovmm-demo [--cpus N] [--memory SIZE] [--adi N] [--bzimage]");
                return;
            }
            other => fail(&format!("unknown argument '{other}'")),
        }
    }
    let assets = match siovmm_tests::guest_assets() {
        Ok(a) => a,
        Err(e) => fail(&e),
    };
    let mut case = GuestCase::new("demo", kernel, cpus, SHELL_INIT).with_adi_driver(&assets);
    case.memory = memory;
    case.cmdline = "console=ttyS0 quiet".into();
    case.extra_args = vec!["--adi".into(), adis.to_string()];
    eprintln!("siovmm-demo: booting {kernel:?} with {cpus} vCPUs, {}, {adis} ADIs ({:?})", case.memory, placement());
    match run_interactive(&case) {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("siovmm-demo: {msg}");
    std::process::exit(2);
}
