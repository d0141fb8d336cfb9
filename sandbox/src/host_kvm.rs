//! What this host's `/dev/kvm` can do, decided once per process.
//!
//! Machines of our kind differ (docs/sandbox.md): some have no `/dev/kvm` at all,
//! some have one served by `kvm_pvm` that runs small payloads but executes guest ring-0 code
//! through an instruction emulator (no FXSAVE, so no Linux kernel), and a real server runs
//! everything. Two questions follow, asked by different users:
//! - [`usable`]: can a VM be created at all? (the KVM unit tests, `bench-siov`)
//! - [`runs_linux`]: can an unmodified Linux kernel run on it? (guest boots)
//!
//! `SIOVMM_HIDE_KVM=1` makes both answer "no", as on a machine without `/dev/kvm`, so the
//! sandbox path can be exercised anywhere (CI uses it; docs/testing.md).

use std::sync::OnceLock;
use std::time::Duration;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

/// The environment switch that hides the host's KVM from every test, benchmark and demo.
pub const HIDE_SWITCH: &str = "SIOVMM_HIDE_KVM";

/// Why the host's KVM is not used, or `Ok` when it is usable.
pub fn usable() -> Result<(), String> {
    static ANSWER: OnceLock<Result<(), String>> = OnceLock::new();
    ANSWER.get_or_init(check_usable).clone()
}

fn hidden() -> bool {
    std::env::var_os(HIDE_SWITCH).is_some_and(|v| !v.is_empty() && v != "0")
}

fn check_usable() -> Result<(), String> {
    if hidden() {
        return Err(format!("{HIDE_SWITCH} is set"));
    }
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm cannot be opened ({e})"))?;
    kvm.create_vm().map(drop).map_err(|e| format!("KVM_CREATE_VM failed ({e})"))
}

/// True when the host's KVM runs an unmodified Linux kernel natively.
pub fn runs_linux() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| usable().is_ok() && probe_fxsave(PROBE_BOUND).unwrap_or(false))
}

/// Whether the KVM this process runs on (the host's, or the sandbox's inside it) forgets a
/// vCPU's state on a triple fault: AMD's reinitializes the vCPU on a shutdown intercept
/// (arch/x86/kvm/svm/svm.c, shutdown_interception: "VMCB is undefined after a SHUTDOWN
/// intercept"), so no faulting RIP survives there; Intel's and kvm_pvm keep it.
pub fn resets_vcpu_on_shutdown() -> bool {
    std::path::Path::new("/sys/module/kvm_amd").exists()
}

/// How long the probe waits for `fxsave; hlt`. Native KVM runs it in microseconds; the
/// instruction-emulating `kvm_pvm` was measured spending 28 s of system time before it fails
/// (2026-11-22), which every guest test binary used to pay. A signal ends that KVM_RUN at once
/// (measured: 300 ms bound, KVM_RUN returned EINTR at 301 ms).
const PROBE_BOUND: Duration = Duration::from_secs(2);

/// Real-mode code at 0x1000: `fxsave [0x2000]` (0F AE 06 00 20), `hlt` (F4). Every Linux
/// kernel executes FXSAVE; an emulating KVM cannot.
const PAYLOAD: [u8; 6] = [0x0f, 0xae, 0x06, 0x00, 0x20, 0xf4];

extern "C" fn interrupt_kvm_run(_: libc::c_int) {}

/// Runs the payload on a vCPU thread; a signal interrupts KVM_RUN after `bound`.
fn probe_fxsave(bound: Duration) -> Option<bool> {
    // SAFETY: installs a handler that does nothing, only so that SIGUSR2 interrupts the
    // probe thread's ioctl with EINTR instead of killing the process. No SA_RESTART.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = interrupt_kvm_run as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = tx.send(run_probe());
    });
    let answer = match rx.recv_timeout(bound) {
        Ok(answer) => answer,
        Err(_) => {
            use std::os::unix::thread::JoinHandleExt;
            // Interrupt until the thread has left KVM_RUN (a signal between two ioctls is lost).
            loop {
                // SAFETY: the thread has not been joined, so its pthread_t is valid.
                unsafe { libc::pthread_kill(thread.as_pthread_t(), libc::SIGUSR2) };
                if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                    break;
                }
            }
            Some(false)
        }
    };
    let _ = thread.join();
    answer
}

fn run_probe() -> Option<bool> {
    let kvm = Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let size = 0x10000usize;
    // SAFETY: anonymous private mapping of `size` bytes; checked for MAP_FAILED below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: the mapping is `size` bytes long and PAYLOAD fits at offset 0x1000.
    unsafe { std::ptr::copy_nonoverlapping(PAYLOAD.as_ptr(), mem.cast::<u8>().add(0x1000), PAYLOAD.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: mem as u64,
    };
    let answer = (|| {
        // SAFETY: the mapping outlives the VM: it is unmapped only after the VM fds are dropped.
        unsafe { vm.set_user_memory_region(region) }.ok()?;
        let mut vcpu = vm.create_vcpu(0).ok()?;
        let mut sregs = vcpu.get_sregs().ok()?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).ok()?;
        let mut regs = vcpu.get_regs().ok()?;
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).ok()?;
        // EINTR (the bound passed) and an internal error (unemulated FXSAVE) both mean "no".
        Some(matches!(vcpu.run(), Ok(VcpuExit::Hlt)))
    })();
    drop(vm);
    // SAFETY: unmapping the region mapped above; the VM using it is gone.
    unsafe { libc::munmap(mem, size) };
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe ends within its bound whatever the KVM does, and agrees with a second run.
    /// Without a usable KVM there is nothing to probe, which is itself the answer checked.
    #[test]
    fn probe_is_bounded() {
        if usable().is_err() {
            assert!(!runs_linux());
            return;
        }
        let start = std::time::Instant::now();
        let first = probe_fxsave(Duration::from_millis(500));
        assert!(start.elapsed() < Duration::from_secs(5), "probe took {:?}", start.elapsed());
        assert!(first.is_some());
    }
}
