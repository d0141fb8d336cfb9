//! Can this host's /dev/kvm run an unmodified Linux kernel?
//!
//! On machines whose KVM executes guest ring-0 code through the instruction emulator (the
//! `kvm_pvm` case in ../shared/guest-sandbox.md), FXSAVE is unimplemented and the guest stops
//! with KVM_EXIT_INTERNAL_ERROR; every Linux kernel executes FXSAVE. So: run `fxsave; hlt` in
//! real mode and see whether it reaches the HLT.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

/// Real-mode code at 0x1000: `fxsave [0x2000]` (0F AE 06 00 20), `hlt` (F4).
const PAYLOAD: [u8; 6] = [0x0f, 0xae, 0x06, 0x00, 0x20, 0xf4];

/// True when KVM ran FXSAVE natively.
pub fn host_kvm_runs_linux() -> bool {
    run_probe().unwrap_or(false)
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
        let exit = matches!(vcpu.run(), Ok(VcpuExit::Hlt));
        Some(exit)
    })();
    drop(vm);
    // SAFETY: unmapping the region mapped above; the VM using it is gone.
    unsafe { libc::munmap(mem, size) };
    answer
}
