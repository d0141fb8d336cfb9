//! The siovmm binary as a user meets it: argument errors, --help, Ctrl-C, and a guest that
//! triple-faults. Guests here are tiny hand-made ELF kernels, so no guest assets are needed.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use siovmm_sandbox::{kvm_test, kvm_test_needs};

// The KVM tests below start the siovmm binary: the sandbox needs it at the same path.
kvm_test_needs!(env!("CARGO_BIN_EXE_siovmm"));

fn siovmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_siovmm"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("siovmm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[path = "support/tiny_kernel.rs"]
mod tiny_kernel;

/// [`tiny_kernel::elf`] of `code` in a file named `name`.
fn tiny_kernel(name: &str, code: &[u8]) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, tiny_kernel::elf(code)).unwrap();
    p
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    let kernel = tiny_kernel("k-args", &[0xeb, 0xfe]);
    let k = kernel.to_str().unwrap();
    let not_kernel = tmp("not-a-kernel");
    std::fs::write(&not_kernel, b"just text").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--kernel", "/does/not/exist"], "--kernel /does/not/exist"),
        (vec!["--kernel", not_kernel.to_str().unwrap()], "not an ELF vmlinux or bzImage kernel"),
        (vec!["--kernel", k, "--cpus", "0"], "--cpus 0"),
        (vec!["--kernel", k, "--memory", "12Q"], "--memory 12Q"),
        (vec!["--kernel", k, "--memory", "1T1"], "--memory 1T1"),
        (vec!["--kernel", k, "--memory", "4M"], "--memory 4M"),
        (vec!["--kernel", k, "--initramfs", "/nope"], "--initramfs /nope"),
        (vec![], "--kernel PATH is required"),
        (vec!["--frobnicate"], "--frobnicate"),
        (vec!["--kernel", k, "--seccomp", "strict"], "--seccomp strict: not on, log or off"),
    ];
    for (args, needle) in cases {
        let out = siovmm().args(&args).stdin(Stdio::null()).output().unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line expected: {err}");
        assert!(err.starts_with("siovmm: ") && err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

#[test]
fn a_bad_log_level_exits_2_naming_it() {
    let out = siovmm().arg("--version").env("SIOVMM_LOG", "loud").output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim(), "siovmm: SIOVMM_LOG=loud: not a log level (off, error, warn, info, debug, trace)");
    let out = siovmm().arg("--version").env("SIOVMM_LOG", "debug").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
}

#[test]
fn help_and_version() {
    let out = siovmm().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--kernel", "--initramfs", "--cmdline", "--cpus", "--memory"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let out = siovmm().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("siovmm "));
}

kvm_test! {
    fn triple_fault_exits_1_naming_rip() {
        // UD2 in long mode with the boot IDT (limit 0): #UD → #GP → #DF → shutdown.
        let kernel = tiny_kernel("k-ud2", &[0x0f, 0x0b]);
        let out = siovmm()
            .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64M"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let rip = if siovmm_sandbox::host_kvm::resets_vcpu_on_shutdown() { "unknown (KVM reset the vCPU)" } else { "0x100078" };
        // "triple fault on vCPU 0 (thread TID) at RIP ...": the vCPU thread's ID ties the
        // line to the sandbox's flight record.
        let (head, tail) = err.trim().split_once(" (thread ").unwrap_or_else(|| panic!("no thread ID: {err}"));
        assert_eq!(head, "siovmm: triple fault on vCPU 0", "{err}");
        let (tid, rest) = tail.split_once(") ").unwrap_or_else(|| panic!("{err}"));
        assert!(tid.parse::<u32>().is_ok(), "{err}");
        assert_eq!(rest, format!("at RIP {rip}"), "{err}");
    }
}

kvm_test! {
    fn sigint_stops_cleanly_with_130() {
        // The guest spins (`jmp $`) until siovmm is interrupted.
        let kernel = tiny_kernel("k-spin", &[0xeb, 0xfe]);
        let mut child = siovmm()
            .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64M", "--cpus", "2"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(child.try_wait().unwrap().is_none(), "siovmm ended before the signal");
        // SAFETY: sending SIGINT to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "siovmm did not stop after SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(130), "{err}");
        assert_eq!(err.trim(), "siovmm: stopped by signal 2");
    }
}

kvm_test! {
    fn every_thread_runs_under_its_seccomp_filter_and_teardown_passes_it() {
        // On by default: every siovmm thread has exactly one filter (its own), the VM's
        // release runs under the event loop's, and `--seccomp off` installs none.
        let kernel = tiny_kernel("k-seccomp", &[0xeb, 0xfe]);
        for (mode, want) in [(None, "2 1"), (Some("off"), "0 0")] {
            let mut cmd = siovmm();
            cmd.args(["--kernel", kernel.to_str().unwrap(), "--memory", "64M", "--cpus", "2", "--adi", "4"]);
            if let Some(m) = mode {
                cmd.args(["--seccomp", m]);
            }
            let mut child = KillOnDrop(cmd.stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
            let child = &mut child.0;
            let ours = ["siovmm", "console-out", "siov-worker0", "siov-worker1", "msi-overflow", "vcpu0", "vcpu1", "pci-eject"];
            // A thread is named before it enters its filter, and the main thread enters its
            // own after starting the vCPUs: the census is taken once every thread has settled
            // (or at the deadline, where the assertions below say what did not).
            let pid = child.id();
            let census = siovmm_seccomp::thread_filters_settled(pid, Duration::from_secs(20), |census| {
                assert!(child.try_wait().unwrap().is_none(), "siovmm ended: {census:?}");
                ours.iter().all(|n| census.iter().any(|(name, state)| name == n && state == want))
            });
            for n in ours {
                assert!(census.iter().any(|(name, _)| name == n), "no {n} thread: {census:?}");
            }
            for (name, state) in census.iter().filter(|(name, _)| ours.contains(&name.as_str())) {
                assert_eq!(state, want, "{name} (mode {mode:?}): seccomp mode and filter count; {census:?}");
            }
            // SAFETY: sending SIGINT to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let status = child.wait().unwrap();
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            assert_eq!(status.code(), Some(130), "{err}");
            assert_eq!(err.trim(), "siovmm: stopped by signal 2");
        }
    }
}

/// A child process killed when the test lets go of it, so a failed assertion does not leave a
/// VM spinning.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
