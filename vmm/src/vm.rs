//! Building and running one VM: KVM VM and memory, devices on their buses, kernel and ACPI
//! tables in guest memory, vCPU threads, and the event loop that waits for the end.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::boot::{self, BootInfo};
use arch::cpuid::VcpuTopology;
use arch::layout;
use devices::boot_timer::{BootTimer, BOOT_TIMER_ADDR};
use devices::iommu::vtd::{self, VtdConfig, VtdUnit};
use devices::pci::{Bdf, HostBridge, PciConfigIo, PciConfigMmio, PciRoot};
use siovmm_acpi::dmar;
use devices::serial::{InputReady, SerialDevice};
use devices::{acpi_pm::AcpiPm, cmos::Cmos, i8042::I8042Reset, Bus, ExitReason, ShutdownSignal};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::cli::{ImsPolicy, VmConfig};
use crate::vdcm::hypercall::{Hypercalls, HYPERCALL_ADDR};
use siovmm_hypercall as hc;
use crate::coalesced::CoalescedRing;
use crate::console::ConsoleInput;
use crate::vcpu::{self, Exits};
use crate::vdcm::kvm_routes::KvmRoutes;
use crate::vdcm::routes::MsiRouter;
use crate::vdcm::{AdiRequest, Vdcm};
use siovmm_vfio::soft::SoftSiovDevice;
use crate::Error;

/// KVM_SET_TSS_ADDR: three pages just below the BIOS area, outside RAM and our MMIO.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// KVM_SET_IDENTITY_MAP_ADDR: one page below the TSS (Intel real-mode support).
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(what, e)
}

/// Creates the VM and its memory; KVM capabilities siovmm relies on are checked first.
pub(crate) fn create_vm(kvm: &Kvm, memory: u64) -> Result<(VmFd, GuestMemoryMmap), Error> {
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::UserMemory, "user memory"),
        (Cap::SetTssAddr, "TSS address"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCap(name));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR).map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;

    let mem = crate::memory::create(&layout::ram_regions(memory)).map_err(Error::Memory)?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping is owned by `mem`, which lives as long as the VM (both are kept
        // until the process exits), and slots do not overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok((vm, mem))
}

/// The legacy and platform devices, wired to their buses.
pub(crate) struct Platform {
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    input_ready: Arc<InputReady>,
}

/// Puts `dev` on `bus` at `[base, base + len)`.
fn place(bus: &Bus, dev: Arc<Mutex<dyn devices::BusDevice>>, base: u64, len: u64) -> Result<(), Error> {
    bus.insert(dev, base, len).map_err(|e| Error::Device(e.to_string()))
}

pub(crate) fn build_platform(
    vm: &VmFd,
    shutdown: &Arc<ShutdownSignal>,
    start: Instant,
    console_out: Box<dyn std::io::Write + Send>,
) -> Result<Platform, Error> {
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd".into()))?;
    // The UART's interrupt goes eventfd → KVM irqfd → IOAPIC pin, never through a VMM thread.
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ).map_err(kvm_err("KVM_IRQFD (COM1)"))?;
    let input_ready = Arc::new(InputReady(EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd".into()))?));
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, input_ready.clone(), console_out)));
    place(&pio, serial.clone(), u64::from(layout::COM1_PORT), 8)?;
    place(&pio, Arc::new(Mutex::new(Cmos::new())), u64::from(layout::CMOS_PORT), 2)?;
    place(&pio, Arc::new(Mutex::new(I8042Reset::new(shutdown.clone()))), u64::from(layout::I8042_CMD_PORT), 1)?;
    place(
        &pio,
        Arc::new(Mutex::new(AcpiPm::new(shutdown.clone()))),
        u64::from(layout::ACPI_PM_PORT),
        u64::from(siovmm_acpi::pm::SIZE),
    )?;

    place(&mmio, Arc::new(Mutex::new(BootTimer::new(start))), BOOT_TIMER_ADDR, 1)?;
    Ok(Platform { pio, mmio, serial, input_ready })
}

/// A PCI segment with its host bridge, before functions are added.
pub(crate) fn pci_root() -> PciRoot {
    let mut root = PciRoot::new();
    root.add(Bdf::new(0, 0, 0), Arc::new(Mutex::new(HostBridge::new())));
    root
}

/// Makes `root` reachable through 0xCF8/0xCFC and ECAM.
pub(crate) fn attach_pci(platform: &Platform, root: PciRoot) -> Result<(), Error> {
    let root = Arc::new(root);
    let (pio, mmio) = (&platform.pio, &platform.mmio);
    place(
        pio,
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        u64::from(layout::PCI_CONFIG_IO_START),
        u64::from(layout::PCI_CONFIG_IO_SIZE),
    )?;
    place(mmio, Arc::new(Mutex::new(PciConfigMmio::new(root, 1))), layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE)
}

/// The host SIOV device and the guest's ADIs, when `--adi` asks for any.
fn compose_adis(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    iommu: Option<&Arc<VtdUnit>>,
    root: &mut PciRoot,
    platform: &Platform,
    config: &VmConfig,
) -> Result<Option<Vdcm>, Error> {
    let s = &config.siov;
    if s.adis == 0 {
        return Ok(None);
    }
    let device = SoftSiovDevice::new(s.device_adis, s.device_ims, s.ims_storage, 2)
        .map_err(|e| Error::Io("starting the software SIOV device".into(), e))?;
    let router = MsiRouter::new(Arc::new(KvmRoutes(vm.clone())), s.max_msi_routes)
        .map_err(|e| Error::Io("starting the MSI router".into(), e))?;
    let req = AdiRequest {
        first_adi: 0,
        count: s.adis,
        vectors: s.vectors,
        ims_trap: s.ims == ImsPolicy::Trap,
        vcpus: u32::from(config.cpus),
    };
    Vdcm::compose(vm.clone(), mem, iommu, root, platform.mmio.clone(), Arc::new(device), Arc::new(router), req)
        .map(Some)
        .map_err(|e| Error::Device(e.to_string()))
}

/// Kernel, initramfs, command line, ACPI tables and boot information into guest memory.
fn load_guest(mem: &GuestMemoryMmap, config: &VmConfig, trace: &StartupTrace) -> Result<arch::regs::EntryMode, Error> {
    let kpath = config.kernel.display().to_string();
    let kfile = File::open(&config.kernel).map_err(io_err(format!("--kernel {kpath}")))?;
    let kernel = boot::load_kernel(mem, &kfile).map_err(|e| Error::Boot(format!("--kernel {kpath}: {e}")))?;
    trace.mark("kernel");
    let initramfs = match &config.initramfs {
        Some(path) => {
            let p = path.display().to_string();
            let f = File::open(path).map_err(io_err(format!("--initramfs {p}")))?;
            let mut f = arch::image::MappedImage::new(&f).map_err(io_err(format!("--initramfs {p}")))?;
            Some(
                boot::load_initramfs(mem, config.memory, &kernel, &mut f)
                    .map_err(|e| Error::Boot(format!("--initramfs {p}: {e}")))?,
            )
        }
        None => None,
    };
    let cmdline_len = boot::write_cmdline(mem, &config.cmdline).map_err(|e| Error::Boot(format!("--cmdline: {e}")))?;
    // IMS policy: with --ims off guests must not use IMS; say so in the SIOV table and, with a
    // vIOMMU, through Caching Mode (docs/ims-policy.md).
    let mut extra = vec![dmar::siov(if config.siov.ims == ImsPolicy::Off { dmar::SIOV_IMS_OPT_OUT } else { 0 })];
    if config.siov.viommu {
        extra.push(dmar::dmar(layout::VTD_START, 48));
    }
    let tables = siovmm_acpi::build(&siovmm_acpi::Platform { vcpus: config.cpus, mem_size: config.memory }, &extra)
        .map_err(|e| Error::Boot(e.to_string()))?;
    mem.write_slice(&tables.bytes, GuestAddress(tables.base))
        .map_err(|e| Error::Memory(format!("writing ACPI tables: {e}")))?;
    boot::write_reset_stub(mem).map_err(|e| Error::Boot(e.to_string()))?;
    let info = BootInfo { mem_size: config.memory, initramfs, cmdline_len, rsdp: tables.rsdp_addr() };
    boot::write_boot_info(mem, &kernel, &info).map_err(|e| Error::Boot(e.to_string()))
}

/// Ends the event loop once a stop is requested.
struct ShutdownWatch {
    shutdown: Arc<ShutdownSignal>,
}

impl MutEventSubscriber for ShutdownWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.shutdown.eventfd(), EventSet::IN));
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.shutdown.eventfd().read();
    }
}

/// SIGINT/SIGTERM/SIGHUP through a signalfd, so a signal is one more event on the loop.
struct SignalWatch {
    fd: OwnedFd,
    shutdown: Arc<ShutdownSignal>,
}

const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in STOP_SIGNALS {
        // SAFETY: valid set and signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

impl SignalWatch {
    /// Blocks the stop signals in this thread (threads spawned later inherit the mask) and
    /// opens a signalfd for them.
    fn new(shutdown: Arc<ShutdownSignal>) -> Result<Self, Error> {
        let set = stop_signal_set();
        // SAFETY: valid set; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(Error::Io("blocking signals".into(), std::io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: valid set; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io("signalfd".into(), std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) }, shutdown })
    }
}

impl MutEventSubscriber for SignalWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.fd, EventSet::IN));
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading one siginfo record into a buffer of exactly its size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        if n as usize == size {
            self.shutdown.request(ExitReason::Interrupted(info.ssi_signo as i32));
        }
    }
}

/// With `SIOVMM_TRACE_STARTUP` set, prints how long each start-up phase took (stderr); the
/// boot-performance notes in docs/ were measured with it.
struct StartupTrace {
    start: Instant,
    enabled: bool,
}

impl StartupTrace {
    fn mark(&self, phase: &str) {
        if self.enabled {
            eprintln!("siovmm: startup: {phase} done at {:.1} ms", self.start.elapsed().as_secs_f64() * 1000.0);
        }
    }
}

/// Boots the VM described by `config` and runs it to the end.
pub fn run(config: &VmConfig) -> Result<ExitReason, Error> {
    let start = Instant::now();
    let trace = StartupTrace { start, enabled: std::env::var_os("SIOVMM_TRACE_STARTUP").is_some() };
    let shutdown = Arc::new(ShutdownSignal::new().map_err(io_err("eventfd".into()))?);
    let signals = SignalWatch::new(shutdown.clone())?;

    if config.siov.adis > 0 {
        crate::bench::raise_fd_limit();
    }
    let kvm = Kvm::new().map_err(|e| Error::Kvm("opening /dev/kvm", e))?;
    let (vm, mem) = create_vm(&kvm, config.memory)?;
    let vm = Arc::new(vm);
    trace.mark("VM and memory");
    let platform = build_platform(&vm, &shutdown, start, Box::new(std::io::stdout()))?;
    let iommu = if config.siov.viommu {
        // Caching Mode is the "no IMS in this VM" hint; with IMS allowed it is clear (the unit
        // caches nothing, so either value is truthful).
        let caching_mode = config.siov.ims == ImsPolicy::Off;
        let unit = Arc::new(VtdUnit::new(mem.clone(), VtdConfig { caching_mode }));
        place(&platform.mmio, Arc::new(Mutex::new(unit.clone())), layout::VTD_START, vtd::REG_SIZE)?;
        Some(unit)
    } else {
        None
    };
    let mut root = pci_root();
    let vdcm = compose_adis(&vm, &mem, iommu.as_ref(), &mut root, &platform, config)?;
    if let Some(v) = &vdcm {
        let calls = Hypercalls::new(mem.clone(), v.by_requester_id(), u32::from(config.cpus), config.siov.ims == ImsPolicy::Pv);
        place(&platform.mmio, Arc::new(Mutex::new(calls)), HYPERCALL_ADDR, 8)?;
    }
    attach_pci(&platform, root)?;
    trace.mark("devices");
    let entry = load_guest(&mem, config, &trace)?;
    trace.mark("kernel, initramfs and ACPI tables loaded");

    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let coalesce = kvm.check_extension(Cap::CoalescedMmio) && kvm.check_extension(Cap::CoalescedPio);
    let mut exits = Exits {
        pio: platform.pio.clone(),
        mmio: platform.mmio.clone(),
        shutdown: shutdown.clone(),
        coalesced: None,
        stats: Default::default(),
    };
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for id in 0..config.cpus {
        let vcpu = vm.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        if id == 0 && coalesce {
            // The ring page is per VM; mapping it through the first vCPU serves all of them.
            let ring = CoalescedRing::map(&vcpu).map_err(io_err("mapping the coalesced I/O ring".into()))?;
            vm.register_coalesced_mmio(IoEventAddress::Pio(u64::from(layout::PCI_CONFIG_IO_START)), 4)
                .map_err(kvm_err("KVM_REGISTER_COALESCED_MMIO (0xCF8)"))?;
            exits.coalesced = Some(Arc::new(Mutex::new(ring)));
        }
        let topo = VcpuTopology {
            vcpu_id: id,
            vcpu_count: config.cpus,
            tsc_khz: vcpu.get_tsc_khz().unwrap_or(0),
            tsc_deadline,
        };
        let ims_flags = match config.siov.ims {
            ImsPolicy::Off => 0,
            ImsPolicy::Pv => hc::FLAG_IMS_ALLOWED,
            ImsPolicy::Trap => hc::FLAG_IMS_TRAP,
        };
        let hypercall = (ims_flags, HYPERCALL_ADDR);
        vcpu::configure_cpuid(&vcpu, &supported, &topo, hypercall)?;
        if id == 0 {
            vcpu::configure_boot_vcpu(&vcpu, &mem, &entry)?;
        }
        vcpus.push(vcpu);
    }

    trace.mark("vCPUs configured");
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| Error::Io("event manager".into(), std::io::Error::other(format!("{e:?}"))))?;
    em.add_subscriber(Arc::new(Mutex::new(ShutdownWatch { shutdown: shutdown.clone() })));
    em.add_subscriber(Arc::new(Mutex::new(signals)));
    em.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(platform.serial.clone(), platform.input_ready.clone()))));

    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let exits = exits.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(vcpu, id as u8, exits))
            .map_err(io_err("spawning a vCPU thread".into()))?;
    }

    while shutdown.reason().is_none() {
        em.run().map_err(|e| Error::Io("event loop".into(), std::io::Error::other(format!("{e:?}"))))?;
    }
    trace.mark(&format!("run ({}, coalesced 0xCF8 {})", exits.stats, if coalesce { "on" } else { "off" }));
    if let Some(v) = &vdcm {
        trace.mark(&format!("run ({})", v.delivery_summary()));
    }
    if let Some(unit) = &iommu {
        trace.mark(&format!("run (vIOMMU: {} DMA page translations)", unit.translations()));
    }
    // vCPU threads are not joined: a vCPU may sit in KVM_RUN until the process exits, which
    // the caller does next. Guest memory and the VM fd stay alive until then.
    std::mem::forget(mem);
    std::mem::forget(vm);
    std::mem::forget(vdcm);
    Ok(shutdown.reason().unwrap_or(ExitReason::Failed("VM stopped without a reason".into())))
}
