//! Tests on the host's /dev/kvm with tiny real-mode payloads: memory slots, port-I/O and MMIO
//! exits reaching siovmm's devices, the serial console, power-off and triple-fault handling.
//! They avoid FPU/SSE and anything else an instruction-emulating KVM cannot run
//! (../shared/guest-sandbox.md §1), so they pass both there and on hardware virtualization.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::regs::{self, EntryMode};
use devices::{ExitReason, ShutdownSignal};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

use crate::vcpu::{self, Exits};
use crate::vm::{attach_pci, build_platform, create_vm, pci_root};

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const CODE: u64 = 0x1000;

/// Runs `code` at 0x1000 in 32-bit protected mode with flat segments (the PVH entry state,
/// set up by the same code that boots kernels) until the VM stops; returns the stop reason,
/// console output and guest memory.
fn run_payload(code: &[u8], idt_limit: u16) -> (ExitReason, String, vm_memory::GuestMemoryMmap) {
    let kvm = Kvm::new().expect("/dev/kvm is needed for these tests");
    let (vm, mem) = create_vm(&kvm, 64 << 20).unwrap();
    let shutdown = Arc::new(ShutdownSignal::new().unwrap());
    let console = Console::default();
    let platform = build_platform(&vm, &shutdown, Instant::now(), Box::new(console.clone())).unwrap();
    attach_pci(&platform, pci_root()).unwrap();
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mode = EntryMode::Pvh { entry: CODE, start_info: 0 };
    let mut sregs = vcpu.get_sregs().unwrap();
    regs::setup_sregs(&mem, &mode, &mut sregs).unwrap();
    sregs.idt.limit = idt_limit;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&regs::boot_regs(&mode)).unwrap();
    let exits = Exits {
        pio: platform.pio.clone(),
        mmio: platform.mmio.clone(),
        shutdown: shutdown.clone(),
        coalesced: None,
        stats: Default::default(),
    };
    vcpu::run(vcpu, 0, exits);
    let out = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    (shutdown.reason().expect("a stop reason"), out, mem)
}

#[test]
fn pio_mmio_serial_and_poweroff() {
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8 (COM1)
        0xb0, b'O', 0xee,                   // mov al, 'O'; out dx, al
        0xb0, b'K', 0xee,                   // mov al, 'K'; out dx, al
        0xb8, 0x00, 0x00, 0x00, 0x80,       // mov eax, 0x80000000 (00:00.0, register 0)
        0x66, 0xba, 0xf8, 0x0c, 0xef,       // mov dx, 0xcf8; out dx, eax
        0x66, 0xba, 0xfc, 0x0c, 0xed,       // mov dx, 0xcfc; in eax, dx
        0xa3, 0x00, 0x20, 0x00, 0x00,       // mov [0x2000], eax
        0xa1, 0x00, 0x00, 0x00, 0xe0,       // mov eax, [0xe0000000] (ECAM 00:00.0)
        0xa3, 0x04, 0x20, 0x00, 0x00,       // mov [0x2004], eax
        0xa1, 0x00, 0x00, 0x80, 0xe0,       // mov eax, [0xe0800000] (ECAM, absent bus 8)
        0xa3, 0x08, 0x20, 0x00, 0x00,       // mov [0x2008], eax
        0x66, 0xba, 0x00, 0x06,             // mov dx, 0x600 (ACPI sleep control)
        0xb0, 0x34, 0xee,                   // mov al, SLP_TYP=5 | SLP_EN; out dx, al
        0xf4, 0xeb, 0xfd,                   // hlt; jmp back
    ];
    let (reason, console, mem) = run_payload(&code, 0x3ff);
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(console, "OK");
    let id = u32::from(devices::pci::SIOVMM_VENDOR_ID) | u32::from(devices::pci::HOST_BRIDGE_DEVICE_ID) << 16;
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), id, "config read through 0xCF8/0xCFC");
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2004)).unwrap(), id, "config read through ECAM");
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2008)).unwrap(), u32::MAX, "absent function reads all-ones");
}

#[test]
fn acpi_reset_register_ends_with_reset() {
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0x02, 0x06, // mov dx, 0x602 (ACPI reset register)
        0xb0, 0x01, 0xee,       // mov al, 1; out dx, al
        0xf4, 0xeb, 0xfd,
    ];
    let (reason, _, _) = run_payload(&code, 0x3ff);
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(reason.exit_code(), 0);
}

#[test]
fn triple_fault_is_reported_with_rip() {
    // With an empty IDT, #UD from UD2 cannot be delivered: #GP, then #DF, then shutdown
    // (triple fault).
    let code = [0x0f, 0x0b, 0xf4];
    let (reason, _, _) = run_payload(&code, 0);
    let ExitReason::Failed(msg) = &reason else { panic!("expected a failure, got {reason:?}") };
    assert!(msg.starts_with("triple fault on vCPU 0 at RIP 0x"), "{msg}");
    assert!(!msg.contains('\n'));
    assert_eq!(reason.exit_code(), 1);
}

/// More guest vectors than KVM has routes: 5,000 vectors on one VM. The first 4,056 get KVM MSI
/// routes with irqfd (KVM consumes the eventfd when it injects), the rest the overflow path
/// (siovmm's thread consumes it and injects with KVM_SIGNAL_MSI). Every signal is taken.
#[test]
fn more_vectors_than_kvm_routes_are_all_delivered() {
    use crate::vdcm::kvm_routes::KvmRoutes;
    use crate::vdcm::routes::{MsiRouter, MAX_MSI_ROUTES};
    use devices::pci::msix::MsiMessage;
    use std::sync::atomic::Ordering;
    use vmm_sys_util::eventfd::EventFd;

    let kvm = Kvm::new().unwrap();
    let (vm, _mem) = create_vm(&kvm, 64 << 20).unwrap();
    let _vcpu = vm.create_vcpu(0).unwrap();
    let vm = Arc::new(vm);
    let router = MsiRouter::new(Arc::new(KvmRoutes(vm.clone())), MAX_MSI_ROUTES).unwrap();
    let fds: Vec<Arc<EventFd>> = (0..5000).map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())).collect();
    for (i, fd) in fds.iter().enumerate() {
        // Fixed delivery to APIC 0, vector 0x30 + i % 200.
        let msg = MsiMessage { address: 0xfee0_0000, data: 0x30 + (i as u32 % 200) };
        router.bind(i as u64, fd.clone(), msg).unwrap();
    }
    assert_eq!(router.counts(), (MAX_MSI_ROUTES as usize, 5000 - MAX_MSI_ROUTES as usize));
    for fd in &fds {
        fd.write(1).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while router.stats().overflow_injections.load(Ordering::Relaxed) < u64::from(5000 - MAX_MSI_ROUTES) {
        assert!(std::time::Instant::now() < deadline, "overflow path did not inject everything");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let untaken = fds.iter().filter(|fd| fd.read().is_ok()).count();
    assert_eq!(untaken, 0, "every signal was taken by KVM (irqfd) or the overflow injector");
}
