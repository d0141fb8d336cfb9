//! `krun-ref`: boots a guest with libkrun (crates.io; a rust-vmm-based VMM of Firecracker
//! lineage) from siovmm's own command-line flags, so that siovmm's boot benchmark can run it as
//! a same-sandbox baseline (`tests/bench.sh --reference`). Only the flags the benchmark uses:
//!   krun-ref --kernel VMLINUX --initramfs FILE --cmdline STR --cpus N --memory SIZE(M|G)
//! libkrun's x86 machine has no ACPI: the guest ends with `reboot -f` (i8042 reset), not poweroff.
use std::ffi::CString;

fn fail(msg: String) -> ! {
    eprintln!("krun-ref: {msg}");
    std::process::exit(2)
}

fn mib(size: &str) -> u32 {
    let (n, unit) = size.split_at(size.len() - 1);
    let n: u32 = n.parse().unwrap_or_else(|_| fail(format!("--memory {size}: not a size")));
    match unit {
        "M" | "m" => n,
        "G" | "g" => n * 1024,
        _ => fail(format!("--memory {size}: use M or G")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        let i = args.iter().position(|a| a == flag).unwrap_or_else(|| fail(format!("{flag} is required")));
        args.get(i + 1).cloned().unwrap_or_else(|| fail(format!("{flag} needs a value")))
    };
    let cstr = |s: String| CString::new(s).unwrap_or_else(|_| fail("NUL in an argument".into()));
    let (kernel, initramfs, cmdline) = (cstr(get("--kernel")), cstr(get("--initramfs")), cstr(get("--cmdline")));
    let cpus: u8 = get("--cpus").parse().unwrap_or_else(|_| fail("--cpus: not a number".into()));
    let memory = mib(&get("--memory"));
    let check = |what: &str, r: i32| {
        if r < 0 {
            eprintln!("krun-ref: {what} failed: errno {}", -r);
            std::process::exit(1)
        }
    };
    check("krun_set_log_level", krun::krun_set_log_level(1));
    let ctx = krun::krun_create_ctx();
    check("krun_create_ctx", ctx);
    let ctx = ctx as u32;
    check("krun_set_vm_config", krun::krun_set_vm_config(ctx, cpus, memory));
    check("krun_disable_implicit_console", krun::krun_disable_implicit_console(ctx));
    check("krun_disable_implicit_vsock", krun::krun_disable_implicit_vsock(ctx));
    // SAFETY: fds 0 and 1 are this process's stdin and stdout; libkrun takes them over.
    check("krun_add_serial_console_default", unsafe { krun::krun_add_serial_console_default(ctx, 0, 1) });
    // SAFETY: the strings live until the process exits; format 1 is ELF.
    check("krun_set_kernel", unsafe { krun::krun_set_kernel(ctx, kernel.as_ptr(), 1, initramfs.as_ptr(), cmdline.as_ptr()) });
    let r = krun::krun_start_enter(ctx);
    eprintln!("krun-ref: krun_start_enter returned {r}");
    std::process::exit(if r < 0 { 1 } else { r });
}
