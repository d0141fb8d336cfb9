//! Tests on KVM with tiny real-mode payloads: memory slots, port-I/O and MMIO
//! exits reaching siovmm's devices, the serial console, power-off and triple-fault handling.
//! They avoid FPU/SSE and anything else an instruction-emulating KVM cannot run
//! (docs/sandbox.md), so they pass both there and on hardware virtualization.
//! Each is a `kvm_test!`: on the host's /dev/kvm when it can create VMs, else inside the
//! QEMU-TCG sandbox (siovmm_sandbox::kvm_test).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::regs::{self, EntryMode};
use devices::{ExitReason, ShutdownSignal};
use kvm_ioctls::Kvm;
use siovmm_sandbox::kvm_test;
use vm_memory::{Bytes, GuestAddress};

use crate::config::{SiovBackend, SiovConfig, VmConfig};
use crate::Error;
use siovmm_vfio::siov::ImsStorage;
use crate::vcpu::{self, Exits, PostMortem};
use crate::vm::Vm;
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

/// Runs one vCPU on a 64 MiB VM with siovmm's platform devices and PCI root until the VM stops;
/// `setup` writes guest memory and puts the vCPU where the test starts. Returns the stop
/// reason, console output, guest memory and the post-mortem lines a triple fault would print.
fn run_vcpu(
    setup: impl FnOnce(&kvm_ioctls::VcpuFd, &vm_memory::GuestMemoryMmap),
) -> (ExitReason, String, vm_memory::GuestMemoryMmap, Vec<String>) {
    run_vcpu_beside(setup, |_| {})
}

/// What a thread running beside the vCPU (see [`run_vcpu_beside`]) reaches.
struct Beside {
    requests: Arc<vcpu::StateRequests>,
    shutdown: Arc<ShutdownSignal>,
    console: Console,
    /// Set once the vCPU has stopped.
    stopped: Arc<std::sync::atomic::AtomicBool>,
    /// The vCPU's post-mortem (guest memory, the sampled root).
    post_mortem: PostMortem,
}

/// [`run_vcpu`] with `beside` running on another thread meanwhile (joined before returning).
fn run_vcpu_beside(
    setup: impl FnOnce(&kvm_ioctls::VcpuFd, &vm_memory::GuestMemoryMmap),
    beside: impl FnOnce(Beside) + Send + 'static,
) -> (ExitReason, String, vm_memory::GuestMemoryMmap, Vec<String>) {
    run_vcpu_with(setup, beside, None)
}

/// [`run_vcpu_beside`] with `port`'s device on the port-I/O bus, one byte wide.
fn run_vcpu_with(
    setup: impl FnOnce(&kvm_ioctls::VcpuFd, &vm_memory::GuestMemoryMmap),
    beside: impl FnOnce(Beside) + Send + 'static,
    port: Option<(u16, Arc<Mutex<dyn devices::BusDevice>>)>,
) -> (ExitReason, String, vm_memory::GuestMemoryMmap, Vec<String>) {
    let kvm = Kvm::new().expect("opening /dev/kvm");
    let (vm, mem) = create_vm(&kvm, 64 << 20, false).unwrap();
    let mem = mem.leak();
    let shutdown = Arc::new(ShutdownSignal::new().unwrap());
    let console = Console::default();
    let vm = Arc::new(vm);
    let platform = build_platform(&crate::kvm_irq::KvmIrq(vm.clone()), &shutdown, Instant::now(), Box::new(console.clone())).unwrap();
    attach_pci(&platform, &pci_root(), &Default::default()).unwrap();
    if let Some((port, device)) = port {
        platform.pio.insert(device, u64::from(port), 1).unwrap();
    }
    let vcpu = vm.create_vcpu(0).unwrap();
    setup(&vcpu, &mem);
    let exits = Exits {
        pio: platform.pio.clone(),
        mmio: platform.mmio.clone(),
        shutdown: shutdown.clone(),
        coalesced: None,
        stats: Default::default(),
        post_mortem: Some(PostMortem::new(mem.clone())),
        state_requests: Default::default(),
    };
    let post_mortem = exits.post_mortem.clone().unwrap();
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beside = {
        let b = Beside {
            requests: exits.state_requests.clone(),
            shutdown: shutdown.clone(),
            console: console.clone(),
            stopped: stopped.clone(),
            post_mortem: post_mortem.clone(),
        };
        std::thread::spawn(move || beside(b))
    };
    vcpu::run(vcpu, 0, exits);
    stopped.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Err(panic) = beside.join() {
        std::panic::resume_unwind(panic);
    }
    let out = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    let lines = post_mortem.report(0).into_iter().chain(post_mortem.report_own(0)).collect();
    (shutdown.reason().expect("a stop reason"), out, mem, lines)
}

/// Runs `code` at 0x1000 in 32-bit protected mode with flat segments (the PVH entry state,
/// set up by the same code that boots kernels) until the VM stops; returns the stop reason,
/// console output and guest memory.
fn run_payload(code: &[u8], idt_limit: u16) -> (ExitReason, String, vm_memory::GuestMemoryMmap) {
    let mode = EntryMode::Pvh { entry: CODE, start_info: 0 };
    let (reason, console, mem, _) = run_vcpu(|vcpu, mem| load_payload(vcpu, mem, code, &mode, |sregs| sregs.idt.limit = idt_limit));
    (reason, console, mem)
}

/// Writes `code` at [`CODE`] and puts the vCPU at it in `mode`'s entry state, with `adjust`
/// applied to the special registers.
fn load_payload(
    vcpu: &kvm_ioctls::VcpuFd,
    mem: &vm_memory::GuestMemoryMmap,
    code: &[u8],
    mode: &EntryMode,
    adjust: impl FnOnce(&mut kvm_bindings::kvm_sregs),
) {
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    regs::setup_sregs(mem, mode, &mut sregs).unwrap();
    adjust(&mut sregs);
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&regs::boot_regs(mode)).unwrap();
}

/// The 64-bit entry state a Linux kernel gets, at [`CODE`].
const LINUX64: EntryMode = EntryMode::Linux64 { entry: CODE, zero_page: 0x7000 };

/// A VM with one vCPU and `req`'s ADIs of `device` composed into it (no guest runs).
fn vm_with_adis(
    kvm: &Kvm,
    device: Arc<siovmm_vfio::soft::SoftSiovDevice>,
    req: siovmm_vdcm::AdiRequest,
) -> (siovmm_vdcm::Vdcm, kvm_ioctls::VcpuFd, vm_memory::GuestMemoryMmap) {
    use crate::kvm_irq::KvmIrq;
    use siovmm_interrupts::router::{MsiRouter, MAX_MSI_ROUTES};

    let (vm, mem) = create_vm(kvm, 64 << 20, false).unwrap();
    // The caller's device keeps DMA handles on this memory past this VM: never unmap it.
    let mem = mem.leak();
    let vcpu = vm.create_vcpu(0).unwrap();
    let vm = Arc::new(vm);
    let irq = Arc::new(KvmIrq(vm));
    let router = Arc::new(MsiRouter::new(irq.clone(), MAX_MSI_ROUTES).unwrap());
    let mmio = Arc::new(devices::Bus::new());
    let guest = siovmm_vdcm::GuestSide {
        mem: mem.clone(),
        iommu: None,
        mmio,
        doorbells: irq,
        portals: None,
        router,
        pci: pci_root(),
        adis: Default::default(),
        // An enlightened guest that has opted in to IMS (what trap mode's window needs).
        ims_opt_in: {
            let o = siovmm_vdcm::ImsOptIn::default();
            o.set();
            o
        },
        ims_quota: Default::default(),
    };
    let mut slots = devices::pci::PciAllocator::new(arch::pci::PciTopology::for_functions(req.count).unwrap());
    let vdcm = siovmm_vdcm::Vdcm::compose(guest, &mut slots, device, req).unwrap();
    (vdcm, vcpu, mem)
}

kvm_test! {
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
}

kvm_test! {
    fn string_port_io_is_one_access_per_element() {
        // `rep outsb`/`rep insb` exit once with `count` elements of `size` bytes (kvm_run.io):
        // each element is its own access of the port, as on hardware.
        #[rustfmt::skip]
        let mut code = vec![
            0xfc,                               // cld
            0xbe, 0x40, 0x10, 0x00, 0x00,       // mov esi, 0x1040 ("abcd" below)
            0xb9, 0x04, 0x00, 0x00, 0x00,       // mov ecx, 4
            0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8 (COM1 THR)
            0xf3, 0x6e,                         // rep outsb
            0xbf, 0x00, 0x20, 0x00, 0x00,       // mov edi, 0x2000
            0xb9, 0x04, 0x00, 0x00, 0x00,       // mov ecx, 4
            0x66, 0xba, 0xfd, 0x03,             // mov dx, 0x3fd (COM1 LSR)
            0xf3, 0x6c,                         // rep insb
            0x66, 0xba, 0x00, 0x06,             // mov dx, 0x600 (ACPI sleep control)
            0xb0, 0x34, 0xee,                   // mov al, SLP_TYP=5 | SLP_EN; out dx, al
            0xf4, 0xeb, 0xfd,                   // hlt; jmp back
        ];
        code.resize(0x40, 0x90);
        code.extend_from_slice(b"abcd");
        let (reason, console, mem) = run_payload(&code, 0x3ff);
        assert_eq!(reason, ExitReason::PowerOff);
        assert_eq!(console, "abcd");
        // Four reads of the line status register, each "transmitter empty" (0x60).
        assert_eq!(mem.read_obj::<[u8; 4]>(GuestAddress(0x2000)).unwrap(), [0x60; 4]);
    }
}

kvm_test! {
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
}

kvm_test! {
    /// A guest restarting through the BIOS (Linux's BOOT_BIOS method, taken on hardware-reduced
    /// ACPI without EFI) jumps to real-mode F000:FFF0; siovmm's stub there resets through the i8042.
    fn bios_restart_reaches_the_reset_stub() {
        let (reason, _, _, _) = run_vcpu(|vcpu, mem| {
            arch::boot::write_reset_stub(mem).unwrap();
            // Where `ljmpw $0xf000, $0xfff0` from real mode lands (a new vCPU is in real mode).
            let mut sregs = vcpu.get_sregs().unwrap();
            sregs.cs.selector = 0xf000;
            sregs.cs.base = 0xf0000;
            vcpu.set_sregs(&sregs).unwrap();
            let mut r = vcpu.get_regs().unwrap();
            r.rip = 0xfff0;
            vcpu.set_regs(&r).unwrap();
        });
        assert_eq!(reason, ExitReason::Reset);
    }
}

kvm_test! {
    fn triple_fault_is_reported_with_rip() {
        // With an empty IDT, #UD from UD2 cannot be delivered: #GP, then #DF, then shutdown
        // (triple fault).
        let code = [0x0f, 0x0b, 0xf4];
        let (reason, _, _) = run_payload(&code, 0);
        let ExitReason::Failed(msg) = &reason else { panic!("expected a failure, got {reason:?}") };
        // SAFETY: gettid has no preconditions. run_payload runs the vCPU on this thread.
        let this = unsafe { libc::gettid() };
        let tid: i32 = msg
            .strip_prefix("triple fault on vCPU 0 (thread ")
            .and_then(|m| m.split(')').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no thread ID: {msg}"));
        assert_eq!(tid, this, "the thread that ran the vCPU: {msg}");
        let rest = msg.split_once(") ").map(|(_, r)| r).unwrap_or_default();
        if siovmm_sandbox::host_kvm::resets_vcpu_on_shutdown() {
            assert_eq!(rest, "at RIP unknown (KVM reset the vCPU)");
        } else {
            assert_eq!(rest, format!("at RIP {CODE:#x}"), "the UD2 at the payload's start");
        }
        assert!(!msg.contains('\n'));
        assert_eq!(reason.exit_code(), 1);
    }
}

kvm_test! {
    /// A triple fault's post-mortem: a 64-bit payload whose page tables also map the first
    /// GiB at the kernel's half (PML4 511, PDPT 510, as Linux maps its image) exits once in
    /// kernel mode (the vCPU samples CR3 there), then triple-faults (UD2, no IDT). The
    /// post-mortem reads those tables from guest memory after KVM has reset the vCPU.
    fn triple_fault_post_mortem_walks_the_sampled_tables() {
        use arch::layout::{PDE_START, PDPTE_START, PML4_START};
        #[rustfmt::skip]
        let code = [
            0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8 (COM1)
            0xb0, b'P', 0xee,                   // mov al, 'P'; out dx, al
            0x0f, 0x0b,                         // ud2
        ];
        let (reason, console, _, post_mortem) = run_vcpu(|vcpu, mem| {
            load_payload(vcpu, mem, &code, &LINUX64, |sregs| sregs.idt.limit = 0);
            mem.write_obj(PDPTE_START | 3, GuestAddress(PML4_START + 511 * 8)).unwrap();
            mem.write_obj(PDE_START | 3, GuestAddress(PDPTE_START + 510 * 8)).unwrap();
        });
        assert_eq!(console, "P");
        assert!(matches!(&reason, ExitReason::Failed(m) if m.starts_with("triple fault on vCPU 0")), "{reason:?}");
        let [kernel, user, entry] = &post_mortem[..] else { panic!("three lines: {post_mortem:?}") };
        assert!(kernel.starts_with(&format!("post-mortem of vCPU 0: kernel mappings under CR3 {PML4_START:#x} (sampled ")), "{kernel}");
        assert!(kernel.ends_with("read from guest memory after the fault: 0xffffffff80000000-0xffffffffbfffffff rwx"), "{kernel}");
        // The vCPU's own sample: the same tables (the payload has no process of its own), whose
        // lower half is the boot tables' identity map (the PDPT entry 510 added above shows at
        // 510 GiB too, PML4 entries 0 and 511 sharing that PDPT), and an IDT too short to enter.
        let own = format!("post-mortem of vCPU 0: under its own CR3 {PML4_START:#x} (CPL 0, sampled ");
        assert!(user.starts_with(&own), "{user}");
        assert!(user.ends_with("after the fault: user mappings 0x0-0x3fffffff rwx, 0x7f80000000-0x7fbfffffff rwx"), "{user}");
        assert!(entry.starts_with(&own), "{entry}");
        assert!(
            entry.ends_with("entry from user mode: #PF CANNOT ENTER: vector 14 lies beyond the IDT's limit 0x0; #DF CANNOT ENTER: vector 8 lies beyond the IDT's limit 0x0"),
            "{entry}"
        );
    }
}

kvm_test! {
    /// A guest that triple-faults before its first exit still gets a post-mortem: the event
    /// loop's tick (`PostMortem::tick`) kicks a vCPU that has sampled no root lately, and it
    /// samples on the way back in. The payload (the kernel-half tables of the test above)
    /// spins on a byte of its memory without exiting; the byte is set only once a root has
    /// been sampled (or after 20 s), and the payload then triple-faults (UD2, no IDT).
    fn a_triple_fault_before_any_exit_gets_its_post_mortem() {
        use arch::layout::{PDE_START, PDPTE_START, PML4_START};
        use std::time::Duration;
        #[rustfmt::skip]
        let code = [
            0x80, 0x3d, 0x04, 0x00, 0x00, 0x00, 0x00, // cmp byte [rip + 4], 0 (the byte after UD2)
            0x74, 0xf7,                               // je back to the cmp
            0x0f, 0x0b,                               // ud2
            0x00,                                     // the byte
        ];
        let go = GuestAddress(CODE + 11);
        let (reason, console, _, post_mortem) = run_vcpu_beside(
            |vcpu, mem| {
                load_payload(vcpu, mem, &code, &LINUX64, |sregs| sregs.idt.limit = 0);
                mem.write_obj(PDPTE_START | 3, GuestAddress(PML4_START + 511 * 8)).unwrap();
                mem.write_obj(PDE_START | 3, GuestAddress(PDPTE_START + 510 * 8)).unwrap();
            },
            move |b| {
                let deadline = Instant::now() + Duration::from_secs(20);
                while b.post_mortem.root.lock().unwrap().is_none() && Instant::now() < deadline {
                    // The event loop's timer, faster: the test waits on nothing else.
                    b.post_mortem.tick(&b.requests);
                    std::thread::sleep(Duration::from_millis(10));
                }
                b.post_mortem.memory.write_obj(1u8, go).unwrap();
            },
        );
        assert_eq!(console, "", "no exit: the payload prints nothing");
        assert!(matches!(&reason, ExitReason::Failed(m) if m.starts_with("triple fault on vCPU 0")), "{reason:?}");
        let post_mortem = post_mortem.first().expect("a CR3 sampled by a kick, without any exit of the guest's");
        assert!(post_mortem.starts_with(&format!("post-mortem of vCPU 0: kernel mappings under CR3 {PML4_START:#x} (sampled ")), "{post_mortem}");
        assert!(post_mortem.ends_with("read from guest memory after the fault: 0xffffffff80000000-0xffffffffbfffffff rwx"), "{post_mortem}");
    }
}

kvm_test! {
    /// Kicks reach a vCPU only inside KVM_RUN: while the thread handles an exit, a system call
    /// of the handler is never interrupted by one (EINTR), and the kicks sent meanwhile end
    /// the next KVM_RUN once, not every one after it. The payload writes a port whose device
    /// blocks in `read` on a pipe for 300 ms while another thread kicks the vCPU every 2 ms,
    /// then prints 'P' and spins until stopped.
    fn kicks_never_interrupt_an_exit_handler() {
        use std::sync::atomic::{AtomicI64, Ordering};
        use std::time::Duration;
        /// Port 0x80: a write blocks reading one byte from a pipe; records what `read` said.
        struct Slow {
            fd: std::os::fd::OwnedFd,
            result: Arc<AtomicI64>,
        }
        impl devices::BusDevice for Slow {
            fn read(&mut self, _: u64, _: &mut [u8]) {}
            fn write(&mut self, _: u64, _: &[u8]) {
                use std::os::fd::AsRawFd;
                let mut byte = 0u8;
                // SAFETY: reads one byte into `byte` from a pipe this device owns.
                let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
                let result = if n < 0 { -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) } else { n as i64 };
                self.result.store(result, Ordering::SeqCst);
            }
        }
        let (reader, writer) = {
            let mut fds = [0; 2];
            // SAFETY: pipe fills two descriptors we then own.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            use std::os::fd::FromRawFd;
            // SAFETY: fresh descriptors from pipe.
            unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
        };
        let result = Arc::new(AtomicI64::new(i64::MIN));
        let device: Arc<Mutex<dyn devices::BusDevice>> = Arc::new(Mutex::new(Slow { fd: reader, result: result.clone() }));
        #[rustfmt::skip]
        let code = [
            0xe6, 0x80,                         // out 0x80, al (blocks in the handler)
            0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8 (COM1)
            0xb0, b'P', 0xee,                   // mov al, 'P'; out dx, al
            0xeb, 0xfe,                         // jmp $
        ];
        let (reason, console, _, _) = run_vcpu_with(
            |vcpu, mem| load_payload(vcpu, mem, &code, &LINUX64, |_| {}),
            move |b| {
                let mut writer = writer;
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(300) {
                    b.requests.kick();
                    std::thread::sleep(Duration::from_millis(2));
                }
                use std::io::Write;
                writer.write_all(b"x").unwrap();
                let deadline = Instant::now() + Duration::from_secs(20);
                while b.console.0.lock().unwrap().is_empty() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                b.shutdown.request(ExitReason::PowerOff);
                while !b.stopped.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                    b.requests.kick();
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
            Some((0x80, device)),
        );
        assert_eq!(result.load(Ordering::SeqCst), 1, "the handler's read got its byte, never EINTR (-4)");
        assert_eq!(console, "P", "the guest went on after the handler");
        assert_eq!(reason, ExitReason::PowerOff, "stopped by request: the pending kicks did not wedge KVM_RUN");
    }
}

kvm_test! {
    /// SIGUSR1's state report (`vcpu::StateRequests`): a 64-bit payload prints 'P', then
    /// spins in kernel mode without exiting, as a hung guest does; asked from another thread,
    /// the vCPU is kicked out of KVM_RUN and reports its registers and what its own page
    /// tables map at RIP and CR2, and the VM runs on until it is stopped.
    fn a_spinning_vcpu_reports_its_state_on_request() {
        use arch::layout::PML4_START;
        use std::sync::atomic::Ordering;
        use std::time::Duration;
        #[rustfmt::skip]
        let code = [
            0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8 (COM1)
            0xb0, b'P', 0xee,                   // mov al, 'P'; out dx, al
            0xeb, 0xfe,                         // jmp $ (no exit from here on)
        ];
        let spin = CODE + 7;
        let (reason, console, _, _) = run_vcpu_beside(
            // A CR2 no table maps: the report must say so.
            |vcpu, mem| load_payload(vcpu, mem, &code, &LINUX64, |sregs| sregs.cr2 = 0x7f00_0000_0000),
            move |b| {
                let deadline = Instant::now() + Duration::from_secs(20);
                while b.console.0.lock().unwrap().is_empty() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Spinning now, or about to: a report taken at the port-I/O exit itself (the
                // request can be seen there before the vCPU runs on) has RIP at the OUT; ask
                // until the vCPU reports from the loop.
                let head = format!("state of vCPU 0: RIP {spin:#x} CPL 0 ");
                while !b.requests.last_report().is_some_and(|r| r.starts_with(&head)) && Instant::now() < deadline {
                    b.requests.ask();
                    std::thread::sleep(Duration::from_millis(20));
                }
                b.shutdown.request(ExitReason::PowerOff);
                while !b.stopped.load(Ordering::SeqCst) && Instant::now() < deadline {
                    b.requests.ask();
                    std::thread::sleep(Duration::from_millis(5));
                }
                let report = b.requests.last_report().expect("a report within 20 s");
                assert!(report.starts_with(&head), "{report}");
                assert!(report.contains(&format!(" CR2 0x7f0000000000 CR3 {PML4_START:#x} ")), "{report}");
                assert!(report.contains("; delivering: none; "), "{report}");
                // The identity map of the first GiB (2 MiB pages) covers the payload.
                assert!(report.contains("; RIP maps: 0x1007-0x1015 rwx; CR2 maps: nothing; entry from user mode: #PF "), "{report}");
            },
        );
        assert_eq!(console, "P");
        assert_eq!(reason, ExitReason::PowerOff, "the VM ran on after the report until it was stopped");
    }
}

kvm_test! {
    sandbox_idle_secs: 6;
    /// 4,096 vectors bound one at a time, as a guest programs them, then each given a new
    /// message one at a time (a guest moving every interrupt): the router's deferred commits
    /// copy O(n) routing entries in all, where a commit per change copied O(n^2). KVM takes the
    /// tables, and every routed vector ends as an irqfd that KVM consumes.
    fn binding_vectors_one_at_a_time_commits_linear_work() {
        use crate::kvm_irq::KvmIrq;
        use siovmm_interrupts::router::{MsiRouter, MAX_MSI_ROUTES};
        use siovmm_interrupts::{FunctionId, MsiMessage, VectorKey};
        use std::sync::atomic::Ordering;
        use vmm_sys_util::eventfd::EventFd;

        const N: u32 = 4096;
        let kvm = Kvm::new().unwrap();
        let (vm, _mem) = create_vm(&kvm, 64 << 20, false).unwrap();
        let _vcpu = vm.create_vcpu(0).unwrap();
        // Only the batched commits counted: no timed commit when this machine pauses the loop.
        let router = MsiRouter::with_debounce(Arc::new(KvmIrq(Arc::new(vm))), MAX_MSI_ROUTES, std::time::Duration::from_secs(3600)).unwrap();
        let fds: Vec<Arc<EventFd>> = (0..N).map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())).collect();
        let key = |i: u32| VectorKey::msix(FunctionId::Adi(i / 2048), i % 2048);
        let msg = |i: u32, round: u32| MsiMessage { address: 0xfee0_0000, data: 0x30 + (i + round) % 200 };
        let (mut commits, mut entries) = (0, 0);
        for round in 0..2 {
            let t = Instant::now();
            for i in 0..N {
                router.bind(key(i), fds[i as usize].clone(), msg(i, round)).unwrap();
            }
            router.settle().unwrap();
            let stats = router.stats();
            let (c, e) = (stats.commits.load(Ordering::Relaxed), stats.entries_committed.load(Ordering::Relaxed));
            println!(
                "{}: {N} vectors one at a time in {:.1} ms: {} commits, {} routing entries copied ({:.2} per change)",
                ["bind", "retarget"][round as usize],
                t.elapsed().as_secs_f64() * 1e3,
                c - commits,
                e - entries,
                (e - entries) as f64 / f64::from(MAX_MSI_ROUTES)
            );
            assert!(e - entries <= 3 * u64::from(MAX_MSI_ROUTES), "round {round}: {} entries for {MAX_MSI_ROUTES} routed changes", e - entries);
            (commits, entries) = (c, e);
            assert_eq!(router.counts(), (MAX_MSI_ROUTES as usize, (N - MAX_MSI_ROUTES) as usize));
            assert_eq!(stats.commit_failures.load(Ordering::Relaxed) + stats.irqfd_refusals.load(Ordering::Relaxed), 0);
        }
        // Routed vectors are irqfds now: KVM takes their signals at once.
        for fd in &fds[..MAX_MSI_ROUTES as usize] {
            fd.write(1).unwrap();
        }
        let untaken = fds[..MAX_MSI_ROUTES as usize].iter().filter(|fd| fd.read().is_ok()).count();
        assert_eq!(untaken, 0, "every routed vector's signal was taken by its irqfd");
    }
}

kvm_test! {
    /// More guest vectors than KVM has routes: 5,000 vectors on one VM, the first 100 bound one
    /// at a time (as a guest programs them), the rest in one batch.
    /// The first 4,056 get KVM MSI routes with irqfd (KVM consumes the eventfd when it
    /// injects), the rest the overflow path (siovmm's thread consumes it and injects with
    /// KVM_SIGNAL_MSI). Every signal is taken.
    fn more_vectors_than_kvm_routes_are_all_delivered() {
        use crate::kvm_irq::KvmIrq;
        use siovmm_interrupts::router::{MsiRouter, MAX_MSI_ROUTES};
        use siovmm_interrupts::{MsiMessage, VectorKey};
        use std::sync::atomic::Ordering;
        use vmm_sys_util::eventfd::EventFd;

        let kvm = Kvm::new().unwrap();
        let (vm, _mem) = create_vm(&kvm, 64 << 20, false).unwrap();
        let _vcpu = vm.create_vcpu(0).unwrap();
        let vm = Arc::new(vm);
        let router = MsiRouter::new(Arc::new(KvmIrq(vm.clone())), MAX_MSI_ROUTES).unwrap();
        let fds: Vec<Arc<EventFd>> = (0..5000).map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())).collect();
        // Fixed delivery to APIC 0, vector 0x30 + i % 200.
        let vector = |i: usize| {
            let msg = MsiMessage { address: 0xfee0_0000, data: 0x30 + (i as u32 % 200) };
            (VectorKey::msix(siovmm_interrupts::FunctionId::Adi(i as u32 / 2048), i as u32 % 2048), fds[i].clone(), msg)
        };
        for i in 0..100 {
            let (key, fd, msg) = vector(i);
            router.bind(key, fd, msg).unwrap();
        }
        router.bind_all((100..fds.len()).map(vector)).unwrap();
        assert_eq!(router.counts(), (MAX_MSI_ROUTES as usize, 5000 - MAX_MSI_ROUTES as usize));
        // The routes in KVM, every routed vector an irqfd: what this test is about.
        router.settle().unwrap();
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
}

kvm_test! {
    /// The hypercall endpoint against a real VM with two composed ADIs: every call, every refusal,
    /// and the argument-block transport.
    fn hypercalls_manage_only_this_vms_adis() {
        use siovmm_vdcm::hypercall::{Hypercalls, ImsOffer};
        use siovmm_vdcm::AdiRequest;
        use devices::pci::Bdf;
        use devices::BusDevice;
        use siovmm_hypercall::{Call, Status, BLOCK_SIZE};
        use siovmm_vfio::siov::ImsStorage;
        use siovmm_vfio::soft::SoftSiovDevice;

        let kvm = Kvm::new().unwrap();
        // On-device IMS: the host programs each entry (the in-queue case, where the guest
        // stores the message, is the device's own test and the guest's, tests/tests/ims_policy.rs).
        let device = Arc::new(SoftSiovDevice::new(8, 1024, ImsStorage::OnDevice, 1).unwrap());
        let req = AdiRequest { first_adi: 0, count: 2, options: siovmm_vdcm::AdiOptions { vectors: 2, ims_trap: false, vcpus: 1 } };
        let (vdcm, _vcpu, mem) = vm_with_adis(&kvm, device, req);
        let adi0 = Bdf::new(0, 1, 0).0;
        let adi1 = Bdf::new(0, 1, 1).0;
        let mut calls = Hypercalls::new(mem.clone(), vdcm.table(), 1, ImsOffer::Pv { in_queue: false }, Default::default());
        assert_eq!(calls.execute(Call::ImsAlloc { adi: adi0, count: 1 }), Err(Status::NotAllowed), "before the opt-in");
        assert!(calls.execute(Call::ImsOptIn).is_ok());

        assert_eq!(calls.execute(Call::Query).map(|v| v >> 32), Ok(u64::from(siovmm_hypercall::ABI_VERSION)));
        assert_eq!(calls.execute(Call::ImsAlloc { adi: 0x0200, count: 4 }), Err(Status::NoSuchAdi));
        assert_eq!(calls.execute(Call::ImsAlloc { adi: adi0, count: 300 }), Ok(0));
        assert_eq!(calls.execute(Call::ImsAlloc { adi: adi0, count: 2 }), Ok(300));
        assert_eq!(calls.execute(Call::ImsAlloc { adi: adi1, count: 1000 }), Err(Status::Exhausted), "1024 entries in all");
        // The host message of each slot's entry comes back: entries 0-3 are the two ADIs'
        // MSI-X vectors, so slot 0 is entry 4 and slot 301 entry 305.
        assert_eq!(host_entry(calls.execute(Call::ImsCompose { adi: adi0, slot: 0, vector: 0x40, apic_id: 0 })), Ok(Some(4)));
        assert_eq!(host_entry(calls.execute(Call::ImsCompose { adi: adi0, slot: 301, vector: 0x41, apic_id: 0 })), Ok(Some(305)));
        assert_eq!(calls.execute(Call::ImsCompose { adi: adi0, slot: 302, vector: 0x41, apic_id: 0 }), Err(Status::NoSuchSlot));
        assert_eq!(calls.execute(Call::ImsCompose { adi: adi0, slot: 0, vector: 0x40, apic_id: 1 }), Err(Status::InvalidArgument), "no vCPU 1");
        // ADI 1 cannot touch ADI 0's slots.
        assert_eq!(calls.execute(Call::ImsMask { adi: adi1, slot: 0, masked: false }), Err(Status::NoSuchSlot));
        assert_eq!(calls.execute(Call::ImsMask { adi: adi0, slot: 0, masked: false }), Ok(0));
        assert_eq!(calls.execute(Call::ImsFree { adi: adi0, first: 1 }), Err(Status::NoSuchSlot));
        assert_eq!(calls.execute(Call::ImsFree { adi: adi0, first: 0 }), Ok(0));
        assert_eq!(calls.execute(Call::ImsFree { adi: adi0, first: 0 }), Err(Status::NoSuchSlot));
        assert_eq!(calls.execute(Call::ImsMask { adi: adi0, slot: 0, masked: true }), Err(Status::NoSuchSlot), "freed");

        // Transport: block in guest RAM, status and result written back.
        let block = 0x8000u64;
        mem.write_slice(&Call::ImsAlloc { adi: adi1, count: 3 }.encode(), GuestAddress(block)).unwrap();
        calls.write(0, &block.to_le_bytes());
        let mut out = [0u8; BLOCK_SIZE];
        mem.read_slice(&mut out, GuestAddress(block)).unwrap();
        assert_eq!(i64::from_le_bytes(out[48..56].try_into().unwrap()), 0);
        assert_eq!(u64::from_le_bytes(out[56..64].try_into().unwrap()), 0, "first slot of ADI 1");
        // Malformed: unknown call; misaligned or out-of-RAM blocks are ignored without writes.
        let mut bad = [0u8; BLOCK_SIZE];
        bad[0] = 77;
        mem.write_slice(&bad, GuestAddress(block)).unwrap();
        calls.write(0, &block.to_le_bytes());
        mem.read_slice(&mut out, GuestAddress(block)).unwrap();
        assert_eq!(i64::from_le_bytes(out[48..56].try_into().unwrap()), Status::NoSuchCall as i64);
        calls.write(0, &(block + 4).to_le_bytes());
        calls.write(0, &(1u64 << 40).to_le_bytes());
        calls.write(0, &block.to_le_bytes()[..4]);
        // Policy off: only QUERY answers.
        let off = Hypercalls::new(mem.clone(), vdcm.table(), 1, ImsOffer::None, Default::default());
        assert_eq!(off.execute(Call::ImsOptIn), Err(Status::NotAllowed));
        assert_eq!(off.execute(Call::ImsAlloc { adi: adi0, count: 1 }), Err(Status::NotAllowed));
        assert!(off.execute(Call::Query).is_ok());
    }
}

/// The host IMS entry an IMS_COMPOSE result names.
fn host_entry(result: Result<u64, siovmm_hypercall::Status>) -> Result<Option<u32>, siovmm_hypercall::Status> {
    let message = |m: u64| siovmm_interrupts::MsiMessage { address: m & 0xffff_ffff, data: (m >> 32) as u32 };
    result.map(|m| siovmm_vfio::soft::ims::remapped_entry(message(m)))
}

kvm_test! {
    /// Trap mode: the guest's own messages written into an ADI's IMS window become host IMS
    /// entries; messages naming no vCPU of this VM, or reserved vectors, are not backed; in other
    /// modes the window is inert.
    fn trapped_ims_window() {
        use siovmm_vdcm::adi::{ims_ctrl, IMS_WINDOW};
        use siovmm_vdcm::AdiRequest;
        use devices::BusDevice;
        use siovmm_vfio::siov::ImsStorage;
        use siovmm_vfio::soft::SoftSiovDevice;

        let kvm = Kvm::new().unwrap();
        for trap in [true, false] {
            let device = Arc::new(SoftSiovDevice::new(2, 64, ImsStorage::OnDevice, 1).unwrap());
            let req = AdiRequest { first_adi: 0, count: 1, options: siovmm_vdcm::AdiOptions { vectors: 2, ims_trap: trap, vcpus: 1 } };
            let (vdcm, _vcpu, _mem) = vm_with_adis(&kvm, device, req);
            let function = vdcm.functions()[0].clone();
            let mut f = function.lock().unwrap();
            let write_slot = |f: &mut siovmm_vdcm::adi::AdiFunction, slot: u64, addr: u32, data: u32, ctrl: u32| {
                let base = IMS_WINDOW + slot * 16;
                f.write(base, &addr.to_le_bytes());
                f.write(base + 4, &0u32.to_le_bytes());
                f.write(base + 8, &data.to_le_bytes());
                f.write(base + 12, &ctrl.to_le_bytes());
            };
            let ctrl = |f: &mut siovmm_vdcm::adi::AdiFunction, slot: u64| {
                let mut b = [0u8; 4];
                f.read(IMS_WINDOW + slot * 16 + 12, &mut b);
                u32::from_le_bytes(b)
            };
            write_slot(&mut f, 0, 0xfee0_0000, 0x40, 0); // APIC 0, vector 0x40, unmasked
            write_slot(&mut f, 1, 0xfee0_1000, 0x41, 0); // APIC 1: not a vCPU of this VM
            write_slot(&mut f, 2, 0xfee0_0000, 0x05, 0); // reserved vector
            write_slot(&mut f, 3, 0xfeb0_0000, 0x42, 0); // not an interrupt address
            if trap {
                assert_eq!(ctrl(&mut f, 0), ims_ctrl::BACKED | 2 << 16, "backed, handle 2 (after 2 MSI-X vectors)");
                for slot in 1..4 {
                    assert_eq!(ctrl(&mut f, slot) & ims_ctrl::BACKED, 0, "slot {slot} must not be backed");
                }
                write_slot(&mut f, 0, 0xfee0_0000, 0x40, ims_ctrl::MASK);
                assert_eq!(ctrl(&mut f, 0) & ims_ctrl::MASK, ims_ctrl::MASK);
                // Beyond the window's slots: ignored.
                f.write(IMS_WINDOW + 1024 * 16, &1u32.to_le_bytes());
            } else {
                for slot in 0..4 {
                    let mut b = [0u8; 4];
                    f.read(IMS_WINDOW + slot * 16, &mut b);
                    assert_eq!((u32::from_le_bytes(b), ctrl(&mut f, slot)), (0, 0), "window inert");
                }
            }
        }
    }
}

kvm_test! {
    /// Two VMs sharing one SIOV device: each VM's hypercalls reach only its own ADIs. Both guests
    /// see their first ADI at 00:01.0; VM B naming that requester ID gets its own ADI, never VM A's,
    /// and cannot touch the slots VM A allocated.
    fn hypercalls_cannot_reach_another_vms_adis() {
        use siovmm_vdcm::hypercall::{Hypercalls, ImsOffer};
        use siovmm_vdcm::AdiRequest;
        use devices::pci::Bdf;
        use siovmm_hypercall::{Call, Status};
        use siovmm_vfio::siov::ImsStorage;
        use siovmm_vfio::soft::SoftSiovDevice;

        let kvm = Kvm::new().unwrap();
        let device = Arc::new(SoftSiovDevice::new(4, 256, ImsStorage::InMemory, 1).unwrap());
        let mut endpoints = Vec::new();
        let mut keep = Vec::new();
        for first_adi in [0u32, 1] {
            let req = AdiRequest { first_adi, count: 1, options: siovmm_vdcm::AdiOptions { vectors: 2, ims_trap: false, vcpus: 1 } };
            let (vdcm, vcpu, mem) = vm_with_adis(&kvm, device.clone(), req);
            let calls = Hypercalls::new(mem, vdcm.table(), 1, ImsOffer::Pv { in_queue: true }, Default::default());
            assert!(calls.execute(Call::ImsOptIn).is_ok());
            endpoints.push(calls);
            keep.push((vdcm, vcpu));
        }
        let rid = Bdf::new(0, 1, 0).0;
        // VM A allocates 8 slots on its ADI (host ADI 0).
        assert_eq!(endpoints[0].execute(Call::ImsAlloc { adi: rid, count: 8 }), Ok(0));
        // VM B names the same requester ID: that is its own ADI (host ADI 1), which has no slots.
        for slot in 0..8 {
            assert_eq!(
                endpoints[1].execute(Call::ImsCompose { adi: rid, slot, vector: 0x40, apic_id: 0 }),
                Err(Status::NoSuchSlot)
            );
            assert_eq!(endpoints[1].execute(Call::ImsMask { adi: rid, slot, masked: false }), Err(Status::NoSuchSlot));
        }
        assert_eq!(endpoints[1].execute(Call::ImsFree { adi: rid, first: 0 }), Err(Status::NoSuchSlot));
        // VM A's slots still work for VM A: slot 7 is host entry 11 (after 2×2 MSI-X entries).
        let composed = endpoints[0].execute(Call::ImsCompose { adi: rid, slot: 7, vector: 0x40, apic_id: 0 });
        assert_eq!(host_entry(composed), Ok(Some(11)));
        // And the device says which ADI owns what: 256 - 2×2 MSI-X - 8 entries are left.
        assert_eq!(siovmm_vfio::siov::SiovDevice::ims_free_entries(device.as_ref()), 244);
    }
}

kvm_test! {
    /// An ADI's configuration space: capability list MSI-X → PCI Express (RCiEP), BAR0 sizing.
    fn adi_config_space() {
        use siovmm_vdcm::adi::BAR0_SIZE;
        use siovmm_vdcm::AdiRequest;
        use devices::pci::PciFunction;
        use siovmm_vfio::siov::ImsStorage;
        use siovmm_vfio::soft::SoftSiovDevice;

        let kvm = Kvm::new().unwrap();
        let device = Arc::new(SoftSiovDevice::new(1, 64, ImsStorage::OnDevice, 1).unwrap());
        let req = AdiRequest { first_adi: 0, count: 1, options: siovmm_vdcm::AdiOptions { vectors: 2, ims_trap: false, vcpus: 1 } };
        let (vdcm, _vcpu, _mem) = vm_with_adis(&kvm, device, req);
        let function = vdcm.functions()[0].clone();
        let mut f = function.lock().unwrap();
        assert_eq!(f.config_read(0), 0x0002_5356);
        assert_ne!(f.config_read(1) & (1 << 20), 0, "capability list");
        assert_eq!(f.config_read(0x34 / 4) & 0xff, 0x40);
        let msix = f.config_read(0x40 / 4);
        assert_eq!((msix & 0xff, (msix >> 8) & 0xff, (msix >> 16) & 0x7ff), (0x11, 0x50, 1), "MSI-X, 2 vectors");
        let pcie = f.config_read(0x50 / 4);
        assert_eq!((pcie & 0xff, (pcie >> 8) & 0xff, pcie >> 16), (0x10, 0, 0x0092), "PCIe v2 RCiEP, end of list");
        // BAR0 sizing: all-ones reads back the size mask with the 64-bit type bits.
        let bar = f.config_read(4);
        f.config_write(4, 0, &u32::MAX.to_le_bytes());
        assert_eq!(f.config_read(4), !(BAR0_SIZE as u32 - 1) & !0xf | 0x4);
        f.config_write(4, 0, &bar.to_le_bytes());
        assert_eq!(f.config_read(4), bar);
    }
}

#[path = "../tests/support/tiny_kernel.rs"]
mod tiny_kernel;

/// Open files and threads of this process, by kind (an fd's link target with any numeric
/// suffix cut, e.g. "anon_inode:kvm-vcpu"; a thread's name with its digits cut).
fn process_resources() -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        let kind = target.to_string_lossy().split(':').take(2).collect::<Vec<_>>().join(":");
        *counts.entry(format!("fd {kind}")).or_default() += 1;
    }
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if is_kernel_user_worker(&e.path()) {
            continue;
        }
        let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        *counts.entry(format!("thread {}", name.trim().trim_end_matches(|c: char| c.is_ascii_digit()))).or_default() += 1;
    }
    counts
}

/// Whether the thread at `task` (a /proc/self/task/TID directory) is a worker the kernel runs
/// inside this process on its own account (`PF_USER_WORKER`, include/linux/sched.h, Linux 6.4+):
/// KVM's NX-huge-page recovery thread ("kvm-nx-lpage-recovery", a vhost_task whose start and end
/// the kernel decides: CI once saw it in a census taken while a VM ran and gone from the next one,
/// with the same VM still running), io_uring workers. They are not siovmm's, so a census of what
/// siovmm leaves behind leaves them out. The flags are field 9 of `stat`, the
/// seventh after the parenthesised name (proc(5)).
fn is_kernel_user_worker(task: &std::path::Path) -> bool {
    const PF_USER_WORKER: u64 = 0x4000;
    let Ok(stat) = std::fs::read_to_string(task.join("stat")) else { return false };
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_name.split_whitespace().nth(6).and_then(|f| f.parse::<u64>().ok()).is_some_and(|flags| flags & PF_USER_WORKER != 0)
}

/// A 2-vCPU VM whose guest spins (`jmp $`), with 8 ADIs of a software device of
/// `device_adis` ADIs and 64 IMS entries; the kernel is written to a fresh temporary directory
/// `dir`, which the caller removes.
fn spinning_vm(name: &str, device_adis: u32) -> (std::path::PathBuf, VmConfig) {
    let dir = std::env::temp_dir().join(format!("siovmm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("spin");
    std::fs::write(&kernel, tiny_kernel::elf(&[0xeb, 0xfe])).unwrap(); // jmp $
    let config = VmConfig {
        kernel,
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        cpus: 2,
        memory: 64 << 20,
        siov: SiovConfig {
            adis: 8,
            device: SiovBackend::Software { adis: device_adis, ims_entries: 64, storage: ImsStorage::OnDevice, portal: Default::default() },
            ..SiovConfig::default()
        },
        vfio: Vec::new(),
        vfio_iommu: Default::default(),
        vfio_user: Vec::new(),
        seccomp: siovmm_seccomp::Mode::Off,
        api_socket: None,
        vfio_user_dir: None,
        pci_buses: None,
    };
    (dir, config)
}

/// What this process holds, for the leak tests: open files and threads by kind
/// ([`process_resources`]), and its resident and virtual memory in KiB.
fn process_memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |key: &str| -> u64 {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
    };
    (field("VmRSS:"), field("VmSize:"))
}

/// Stops a VM when dropped, so a failed assertion in a test's control thread still ends
/// the VM and the failure is reported.
struct StopOnDrop(crate::vm::VmHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop(ExitReason::Interrupted(libc::SIGTERM));
    }
}

/// Runs a [`spinning_vm`] while `control` drives it from another thread, given the VM's handle
/// and its guest's reach (the MMIO bus, KVM's interrupt side); the VM is stopped (SIGTERM)
/// when `control` returns or fails. Returns what `control` returned, and the stopped VM (not
/// yet released) with its directory, which the caller removes.
fn drive_spinning_vm<T: Send + 'static>(
    name: &str,
    device_adis: u32,
    control: impl FnOnce(crate::vm::VmHandle, Arc<devices::Bus>, crate::kvm_irq::KvmIrq) -> T + Send + 'static,
) -> (T, Vm, std::path::PathBuf) {
    let (dir, config) = spinning_vm(name, device_adis);
    let mut vm = Vm::build(&config, Box::new(std::io::sink())).unwrap();
    let (handle, (mmio, irq)) = (vm.handle(), vm.guest_reach());
    let thread = std::thread::spawn(move || {
        let _stop = StopOnDrop(handle.clone());
        control(handle, mmio, irq)
    });
    assert_eq!(vm.run().unwrap(), ExitReason::Interrupted(libc::SIGTERM));
    (thread.join().unwrap(), vm, dir)
}

/// Waits until both vCPU threads of a [`spinning_vm`] run.
fn wait_for_vcpu_threads() {
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while process_resources().get("thread vcpu") != Some(&2) {
        assert!(Instant::now() < deadline, "vCPU threads never started");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

kvm_test! {
    alone;
    sandbox_idle_secs: 20;
    /// 100 VMs with ADIs, each built, run (2 vCPUs spinning in the guest) until its vCPU
    /// threads run, stopped from another thread and dropped, in one process: every vCPU
    /// thread, device worker, overflow thread, eventfd, KVM fd and guest RAM mapping goes with
    /// it. Counted after a warm-up VM (the allocator and KVM's module state settle) and
    /// printed.
    fn a_hundred_released_vms_leave_nothing_behind() {
        const VMS: u32 = 100;
        let (dir, config) = spinning_vm("release", 8);
        let cycle = || {
            let mut vm = Vm::build(&config, Box::new(std::io::sink())).unwrap();
            let stopper = StopOnDrop(vm.handle());
            let t = std::thread::spawn(move || {
                wait_for_vcpu_threads();
                drop(stopper);
            });
            let reason = vm.run().unwrap();
            t.join().unwrap();
            assert_eq!(reason, ExitReason::Interrupted(libc::SIGTERM));
            drop(vm);
        };
        cycle();
        let before = process_resources();
        let (rss_before, size_before) = process_memory_kib();
        let start = Instant::now();
        for _ in 0..VMS {
            cycle();
        }
        let seconds = start.elapsed().as_secs_f64();
        let after = process_resources();
        let (rss_after, size_after) = process_memory_kib();
        std::fs::remove_dir_all(&dir).unwrap();
        eprintln!(
            "{VMS} VMs (8 ADIs, 2 vCPUs, 64 MiB each) in {seconds:.1} s: RSS {rss_before} -> {rss_after} KiB, \
             VmSize {size_before} -> {size_after} KiB; open files and threads before {before:?}, after {after:?}"
        );
        assert_eq!(before, after, "released VMs left files or threads behind");
        let kvm_fds = |r: &std::collections::BTreeMap<String, usize>| r.iter().filter(|(k, _)| k.contains("kvm-")).map(|(_, n)| n).sum::<usize>();
        assert_eq!(kvm_fds(&after), 0, "VM or vCPU fds still open: {after:?}");
        assert!(!after.keys().any(|k| k.starts_with("thread vcpu")), "{after:?}");
        // Each VM maps 64 MiB of guest RAM and touches some of it: a VM left mapped shows.
        assert!(size_after < size_before + (16 << 10), "VmSize grew by {} KiB over {VMS} VMs", size_after.saturating_sub(size_before));
        assert!(rss_after < rss_before + (4 << 10), "RSS grew by {} KiB over {VMS} VMs", rss_after.saturating_sub(rss_before));
    }
}

kvm_test! {
    alone;
    sandbox_idle_secs: 100;
    /// 10,000 ADI compose/release cycles in one VM: each ADI is added, its MSI-X enabled and
    /// two vectors programmed (two KVM routes, its IMS entries bound), then removed. After a
    /// warm-up, open files, threads, the VM's IMS entries and KVM routes end where they started
    /// and RSS stays flat; the counts are printed. (The VM does not run: with vCPUs running the
    /// cycles cost the same, and `adis_come_and_go_while_the_guest_runs` covers that case.
    /// Nearly all of the ~8 ms a cycle takes here, on the host's KVM or in the sandbox, is the
    /// kernel's KVM_IOEVENTFD deassign of the doorbell.)
    fn ten_thousand_adi_cycles_leave_nothing_behind() {
        const CYCLES: u32 = 10_000;
        const WARM_UP: u32 = 200;
        let (dir, config) = spinning_vm("adi-cycles", 9);
        let vm = Vm::build(&config, Box::new(std::io::sink())).unwrap();
        let handle = vm.handle();
        let at_boot = handle.usage().unwrap();
        let cycle = || {
            let bdf = handle.add_adis(1).unwrap()[0];
            handle.with_adi(bdf, siovmm_vdcm::testing::program_two_vectors).unwrap();
            let during = handle.usage().unwrap();
            handle.remove_adi(bdf).unwrap();
            during
        };
        for _ in 0..WARM_UP {
            cycle();
        }
        let before = (process_resources(), handle.usage().unwrap());
        let (rss_before, _) = process_memory_kib();
        let start = Instant::now();
        let mut during = Default::default();
        for _ in 0..CYCLES {
            during = cycle();
        }
        let seconds = start.elapsed().as_secs_f64();
        let after = (process_resources(), handle.usage().unwrap());
        let (rss_after, _) = process_memory_kib();
        eprintln!(
            "{CYCLES} ADI cycles in {seconds:.1} s ({:.0} us each): usage at boot {at_boot:?}, with the cycled ADI {during:?}, \
             after {:?}; RSS {rss_before} -> {rss_after} KiB; open files and threads {:?} -> {:?}",
            seconds * 1e6 / f64::from(CYCLES),
            after.1,
            before.0,
            after.0
        );
        assert_eq!(at_boot.adis, 8);
        assert_eq!(during.adis, 9);
        assert_eq!(during.msi_routes, at_boot.msi_routes + 2, "the cycled ADI's two vectors are routed");
        assert!(during.ims_entries > at_boot.ims_entries, "the cycled ADI holds IMS entries");
        assert_eq!(after.1, at_boot, "IMS entries and routes back where they were");
        assert_eq!(before, after, "ADI cycles left files, threads, IMS entries or routes behind");
        // 10,000 cycles: 100 bytes left per cycle would show as 1 MiB.
        assert!(rss_after < rss_before + 1024, "RSS grew by {} KiB over {CYCLES} cycles", rss_after.saturating_sub(rss_before));
        drop(vm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

kvm_test! {
    alone;
    /// ADIs added to and removed from a running VM (2 vCPUs spinning in the guest) through its
    /// handle, 50 times over: the device's ADIs are handed out and back, a request beyond
    /// them changes nothing, the process's file descriptors and threads end where they
    /// started, and once the VM is released the handle refuses.
    fn adis_come_and_go_while_the_guest_runs() {
        let (handle, vm, dir) = drive_spinning_vm("hotplug", 20, |handle, _, _| {
            let at_boot = handle.adis().unwrap();
            assert_eq!(at_boot.len(), 8);
            // Counted once both vCPU threads run (Vm::run starts them beside this thread).
            wait_for_vcpu_threads();
            let before = process_resources();
            for round in 0..50 {
                let added = handle.add_adis(12).unwrap_or_else(|e| panic!("round {round}: {}", crate::one_line(&e)));
                assert_eq!(added.len(), 12);
                assert_eq!(handle.adis().unwrap().len(), 20);
                // The device has 20 ADIs: a 21st is refused, and nothing changes.
                assert!(matches!(handle.add_adis(1), Err(Error::NoFreeAdis { requested: 1, free: 0 })));
                assert_eq!(handle.adis().unwrap().len(), 20);
                for bdf in &added {
                    handle.remove_adi(*bdf).unwrap();
                }
                assert!(matches!(handle.remove_adi(added[0]), Err(Error::Adis(siovmm_vdcm::Error::NoSuchFunction(_)))));
            }
            assert_eq!(handle.adis().unwrap(), at_boot, "the boot-time ADIs stay where they were");
            let after = process_resources();
            assert_eq!(before, after, "add/remove cycles left something behind");
            // One of the boot-time ADIs goes; an ADI added now is alone in a slot of its own
            // (function 0), as a hotplugged device is.
            let (bdf, adi) = at_boot[3];
            assert_eq!(handle.remove_adi(bdf).unwrap(), adi);
            let added = handle.add_adis(1).unwrap();
            assert_eq!(added[0].function(), 0);
            assert!(!at_boot.iter().any(|(b, _)| b.device() == added[0].device()), "{added:?} in a boot-time slot");
            assert_eq!(handle.adis().unwrap().len(), 8);
            handle
        });
        drop(vm);
        assert!(matches!(handle.add_adis(1), Err(Error::Released)));
        assert!(matches!(handle.adis(), Err(Error::Released)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

kvm_test! {
    alone;
    /// Removal through the handle with ACPI PCI hotplug (docs/hotplug.md), the guest's side
    /// played by this test: a guest that has not unmasked the hotplug event pin is not asked
    /// (an ADI it uses is refused, one it does not use goes at once); once the pin is unmasked,
    /// a removal asks for the slot's eject (PCID) and ends at the guest's `_EJ0` (PCEJ), or
    /// after the timeout without it; the slot's other functions are announced again (PCIU);
    /// function 0 of a slot with others left is refused. Nothing refused changes anything.
    fn removal_asks_a_guest_that_listens_to_eject() {
        use devices::pci::hotplug::{BUS_STRIDE, PCEJ, PCID, PCIU};
        use devices::pci::PciFunction;
        use std::time::Duration;
        let (pending, vm, dir) = drive_spinning_vm("eject", 8, |handle, mmio, irq| {
            let register = |offset: u64| {
                let mut b = [0u8; 4];
                assert!(mmio.read(arch::layout::PCI_HOTPLUG_START + offset, &mut b));
                u32::from_le_bytes(b)
            };
            let adis: Vec<_> = handle.adis().unwrap().into_iter().map(|(b, _)| b).collect();
            assert_eq!(adis.len(), 8, "one slot, functions 0-7");
            let (f0, f1, f2, f3) = (adis[0], adis[1], adis[2], adis[3]);
            let long = Duration::from_secs(20);
            // Not listening: nobody is asked; the ADI the guest drives (bus master) stays.
            handle.with_adi(f1, |f| f.config_write(1, 0, &[0x06, 0x00])).unwrap();
            assert!(matches!(handle.remove_device(f1, long), Err(Error::InUse(b)) if b == f1));
            let t = Instant::now();
            assert_eq!(handle.remove_device(f2, long).unwrap(), crate::vm::Removal { ejected_by_guest: false });
            assert!(t.elapsed() < Duration::from_secs(5), "not asked, not waited for: {:?}", t.elapsed());
            assert_eq!(register(PCID), 0, "no eject was requested");
            // The guest takes hotplug events now; it ejects what it is asked to.
            irq.set_ioapic_pin_masked(arch::layout::PCI_HOTPLUG_GSI as usize, false).unwrap();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let guest = {
                let (mmio, stop) = (mmio.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut ejected = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut b = [0u8; 4];
                        mmio.read(arch::layout::PCI_HOTPLUG_START + PCID, &mut b);
                        if b != [0; 4] {
                            mmio.write(arch::layout::PCI_HOTPLUG_START + PCEJ, &b);
                            ejected += 1;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    ejected
                })
            };
            register(PCIU);
            let t = Instant::now();
            assert_eq!(handle.remove_device(f1, long).unwrap(), crate::vm::Removal { ejected_by_guest: true }, "in use, and ejected");
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
            assert_eq!(register(PCIU), 1 << f0.device(), "the slot's other functions announced again");
            assert!(matches!(handle.remove_device(f0, long), Err(Error::FunctionZeroLast { bdf, .. }) if bdf == f0));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(guest.join().unwrap(), 1);
            // A guest that does not answer: the device goes after the timeout anyway.
            let t = Instant::now();
            assert_eq!(handle.remove_device(f3, Duration::from_millis(300)).unwrap(), crate::vm::Removal { ejected_by_guest: false });
            assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
            assert_eq!(register(PCID), 0, "the unanswered request was withdrawn: a late eject would take the slot's other functions");
            assert_eq!(register(PCIU), 1 << f0.device(), "the slot announced again");
            assert_eq!(handle.adis().unwrap().len(), 5);
            assert!(matches!(handle.remove_device(f3, long), Err(Error::NoDevice(b)) if b == f3));
            // One root bus, one block of registers: the next bus's is not there.
            assert!(!mmio.read(arch::layout::PCI_HOTPLUG_START + BUS_STRIDE + PCIU, &mut [0u8; 4]));
            // A removal waiting for an eject when the VM stops (as this returns) ends then, not
            // at its timeout.
            let pending = {
                let handle = handle.clone();
                std::thread::spawn(move || handle.remove_device(adis[4], Duration::from_secs(600)))
            };
            std::thread::sleep(Duration::from_millis(50));
            pending
        });
        let stopped = Instant::now();
        while !pending.is_finished() {
            assert!(stopped.elapsed() < std::time::Duration::from_secs(10), "a pending removal held the VM's end");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(matches!(pending.join().unwrap(), Ok(crate::vm::Removal { ejected_by_guest: false })));
        drop(vm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

kvm_test! {
    alone;
    /// A slot the guest ejects on its own (its `_EJ0` writes PCEJ with no request: a user's
    /// `echo 0 > /sys/bus/pci/slots/N/power`) loses its functions while the VM runs, through
    /// the VM's pci-eject thread; a slot with nothing in it changes nothing.
    fn a_slot_the_guest_ejects_on_its_own_is_removed() {
        use devices::pci::hotplug::PCEJ;
        use std::time::Duration;
        let ((), vm, dir) = drive_spinning_vm("own-eject", 8, |handle, mmio, _| {
            let adis: Vec<_> = handle.adis().unwrap().into_iter().map(|(b, _)| b).collect();
            assert_eq!(adis.len(), 8);
            let slot = adis[0].device();
            // An empty slot first: nothing there, nothing removed.
            mmio.write(arch::layout::PCI_HOTPLUG_START + PCEJ, &(1u32 << (slot + 1)).to_le_bytes());
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(handle.adis().unwrap().len(), 8);
            mmio.write(arch::layout::PCI_HOTPLUG_START + PCEJ, &(1u32 << slot).to_le_bytes());
            let t = Instant::now();
            while !handle.adis().unwrap().is_empty() {
                assert!(t.elapsed() < Duration::from_secs(10), "the ejected slot's functions are still there");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        drop(vm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Above the 64 MiB of RAM of [`storing_guest`], inside the boot identity map.
const GPA: u64 = 0x2000_0000;
/// What [`storing_guest`] stores there.
const MAGIC: u32 = 0x1234_5678;

/// A VM (1 vCPU, 64 MiB) whose kernel stores [`MAGIC`] at [`GPA`] and spins; its directory.
fn storing_guest(name: &str) -> (std::path::PathBuf, Vm) {
    let dir = std::env::temp_dir().join(format!("siovmm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("store");
    // mov dword [GPA], MAGIC; jmp $
    let mut code = vec![0xc7, 0x04, 0x25];
    code.extend_from_slice(&(GPA as u32).to_le_bytes());
    code.extend_from_slice(&MAGIC.to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xfe]);
    std::fs::write(&kernel, tiny_kernel::elf(&code)).unwrap();
    let config = VmConfig {
        kernel,
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        cpus: 1,
        memory: 64 << 20,
        siov: SiovConfig::default(),
        vfio: Vec::new(),
        vfio_iommu: Default::default(),
        vfio_user: Vec::new(),
        seccomp: siovmm_seccomp::Mode::Off,
        api_socket: None,
        vfio_user_dir: None,
        pci_buses: None,
    };
    (dir, Vm::build(&config, Box::new(std::io::sink())).unwrap())
}

kvm_test! {
    /// An ADI's portal page (a page of a file, here the software device's memfd) mapped through
    /// `PortalSlots` is guest memory: the guest's store lands in the device's page with no
    /// exit, where the device's poller reads it. Dropping the mapping frees the slot.
    fn a_mapped_portal_page_takes_the_guests_store() {
        use siovmm_vdcm::PortalMaps;
        use siovmm_vfio::siov::{PortalKind, SiovDevice};
        use siovmm_vfio::soft::SoftSiovDevice;
        let (dir, mut vm) = storing_guest("portal");
        let slots = vm.memory_slots();
        let device = SoftSiovDevice::with_portals(2, 16, siovmm_vfio::siov::ImsStorage::OnDevice, 1, PortalKind::Mapped).unwrap();
        let ram = siovmm_vfio::dma::GuestRam(vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
        let dma = device.dma_bind(Arc::new(ram)).unwrap();
        // ADI 1: its page is the memfd's second, so the offset is honoured too.
        let portal = device.open_adi(siovmm_vfio::siov::AdiId(1), dma).unwrap();
        let page = portal.page().unwrap().clone();
        let maps = crate::memslots::PortalSlots(slots.clone());
        let guard = maps.map(GPA, &page).unwrap();
        assert!(maps.map(GPA, &page).is_err(), "a second mapping over the first is refused");
        let handle = vm.handle();
        let watcher = std::thread::spawn(move || {
            let deadline = Instant::now() + std::time::Duration::from_secs(20);
            // The device's poller takes the store (a nonzero doorbell word) as a ring and
            // swaps the word back to zero.
            while device.portal_rings() == 0 && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            handle.stop(ExitReason::Interrupted(libc::SIGTERM));
            device.portal_rings()
        });
        assert_eq!(vm.run().unwrap(), ExitReason::Interrupted(libc::SIGTERM));
        assert_eq!(watcher.join().unwrap(), 1, "the guest's store did not reach the device's portal page");
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(page.file.as_ref(), &mut word, page.offset).unwrap();
        assert_eq!(word, [0; 4], "the ring was taken");
        drop(guard);
        let again = maps.map(GPA, &portal.page().unwrap().clone()).unwrap();
        drop(again);
        drop(vm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

kvm_test! {
    /// A host page mapped into a memory slot above RAM is guest memory: the guest's store
    /// lands in it without an exit. KVM refuses an overlapping slot, a bad range is refused
    /// before KVM sees it, and an unmapped slot's number is handed out again.
    fn a_host_page_in_a_memory_slot_is_guest_memory() {
        let (dir, mut vm) = storing_guest("memslot");
        let slots = vm.memory_slots();
        // SAFETY: a fresh anonymous shared page, unmapped at the end of the test after the VM
        // (and so its slot) is gone.
        let page = unsafe {
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(page, libc::MAP_FAILED);
        let host = page.cast::<u8>();
        // SAFETY: `page` outlives the VM and every slot made here.
        let map = |gpa: u64| unsafe { slots.map(gpa, 4096, host) };
        let mapped = map(GPA).unwrap();
        assert_eq!(mapped.gpa(), GPA);
        assert!(matches!(map(GPA), Err(crate::memslots::Error::Kvm { .. })), "overlap");
        assert!(matches!(map(GPA + 1), Err(crate::memslots::Error::Unaligned { .. })));
        assert!(matches!(map(!4095) /* the last page: it would wrap */, Err(crate::memslots::Error::Unaligned { .. })));
        let handle = vm.handle();
        let address = host as usize;
        let watcher = std::thread::spawn(move || {
            let deadline = Instant::now() + std::time::Duration::from_secs(20);
            // SAFETY: the page stays mapped until after this thread is joined.
            let read = || unsafe { std::ptr::read_volatile(address as *const u32) };
            while read() != MAGIC && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            handle.stop(ExitReason::Interrupted(libc::SIGTERM));
            read()
        });
        assert_eq!(vm.run().unwrap(), ExitReason::Interrupted(libc::SIGTERM));
        assert_eq!(watcher.join().unwrap(), MAGIC, "the guest's store did not reach the host page");
        // Unmapped, the slot number is free: the next map takes it again.
        let first = format!("{mapped:?}");
        slots.unmap(mapped).unwrap();
        let again = map(GPA).unwrap();
        assert_eq!(format!("{again:?}"), first);
        slots.unmap(again).unwrap();
        drop(vm);
        // SAFETY: mapped above, no slot refers to it any more.
        unsafe { libc::munmap(page, 4096) };
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
