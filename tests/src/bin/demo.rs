//! `siovmm-demo`: boots the stock Debian kernel under siovmm to a busybox shell on this
//! terminal (inside the QEMU-TCG sandbox where the host's KVM cannot run Linux directly).
//! Usage: siovmm-demo [--cpus N] [--memory SIZE] [--bzimage]

use siovmm_tests::{placement, run_interactive, GuestCase, Kernel};

const SHELL_INIT: &str = "echo
echo 'siovmm guest: busybox shell on COM1. Try: nproc, cat /proc/meminfo, lspci -k, dmesg.'
echo 'Leave the shell (exit or Ctrl-D) to power the guest off.'
setsid cttyhack sh
poweroff -f
";

fn main() {
    let mut cpus = 2u8;
    let mut memory = "512M".to_string();
    let mut kernel = Kernel::Vmlinux;
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
            "--bzimage" => kernel = Kernel::BzImage,
            "-h" | "--help" => {
                println!("usage: siovmm-demo [--cpus N] [--memory SIZE] [--bzimage]");
                return;
            }
            other => fail(&format!("unknown argument '{other}'")),
        }
    }
    let mut case = GuestCase::new("demo", kernel, cpus, SHELL_INIT);
    case.memory = memory;
    case.cmdline = "console=ttyS0 quiet".into();
    eprintln!("siovmm-demo: booting {kernel:?} with {cpus} vCPUs, {} ({:?})", case.memory, placement());
    match run_interactive(&case) {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("siovmm-demo: {msg}");
    std::process::exit(2);
}
