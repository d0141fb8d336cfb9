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
use arch::pci::PciTopology;
use devices::pci::{Bdf, HostBridge, PciAllocator, PciConfigIo, PciConfigMmio, PciRoot};
use siovmm_acpi::dmar;
use devices::serial::{InputReady, SerialDevice};
use devices::{acpi_pm::AcpiPm, cmos::Cmos, i8042::I8042Reset, Bus, ExitReason, ShutdownSignal};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::timerfd::TimerFd;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use crate::memory::GuestRam;
use crate::memslots::MemorySlots;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use siovmm_vdcm::hypercall::{Hypercalls, HYPERCALL_ADDR};
use crate::coalesced::CoalescedRing;
use crate::console::ConsoleInput;
use crate::vcpu::{self, Exits};
use crate::kvm_irq::KvmIrq;
use siovmm_interrupts::RouteBackend;
use siovmm_seccomp::ThreadKind;
use crate::hotplug::Hotplug;
use crate::device_manager::{DeviceManager, GuestParts};
use devices::bus::lock;
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

/// Creates the VM and its memory (`shared`: one memfd another process can map, for vfio-user
/// devices); KVM capabilities siovmm relies on are checked first.
pub(crate) fn create_vm(kvm: &Kvm, memory: u64, shared: bool) -> Result<(VmFd, GuestRam), Error> {
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

    let regions = layout::ram_regions(memory);
    let mem = if shared { crate::memory::create_shared(&regions) } else { crate::memory::create(&regions) }.map_err(Error::Memory)?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(crate::memory::Error::Regions(e.to_string())))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping is owned by `mem`, which the caller keeps at least as long as any
        // vCPU of this VM runs (the `Vm` drops its VM fd before its memory); slots do not overlap.
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
    bus.insert(dev, base, len).map_err(|e| Error::Place(base, e))
}

pub(crate) fn build_platform(
    irq: &dyn RouteBackend,
    shutdown: &Arc<ShutdownSignal>,
    start: Instant,
    console_out: Box<dyn std::io::Write + Send>,
) -> Result<Platform, Error> {
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd".into()))?;
    // The UART's interrupt goes eventfd → KVM irqfd → IOAPIC pin, never through a VMM thread.
    irq.irqfd(&serial_irq, layout::COM1_IRQ, true).map_err(io_err("KVM_IRQFD (COM1)".into()))?;
    let input_ready = Arc::new(InputReady(EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd".into()))?));
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, input_ready.clone(), console_out)));
    place(&pio, serial.clone(), u64::from(layout::COM1_PORT), 8)?;
    place(&pio, Arc::new(Mutex::new(Cmos::new())), u64::from(layout::CMOS_PORT), 2)?;
    place(&pio, Arc::new(Mutex::new(I8042Reset::new(shutdown.clone()))), u64::from(layout::I8042_CMD_PORT), 1)?;
    place(
        &pio,
        Arc::new(Mutex::new(AcpiPm::new(shutdown.clone()))),
        u64::from(layout::ACPI_PM_PORT),
        u64::from(devices::acpi_pm::regs::SIZE),
    )?;

    place(&mmio, Arc::new(Mutex::new(BootTimer::new(start))), BOOT_TIMER_ADDR, 1)?;
    Ok(Platform { pio, mmio, serial, input_ready })
}

/// A PCI segment with its host bridge, before functions are added.
pub(crate) fn pci_root() -> Arc<PciRoot> {
    let root = PciRoot::new();
    root.add(Bdf::new(0, 0, 0), Arc::new(Mutex::new(HostBridge::new())));
    Arc::new(root)
}

/// Makes `root` reachable through 0xCF8/0xCFC and ECAM.
pub(crate) fn attach_pci(platform: &Platform, root: &Arc<PciRoot>, topology: &PciTopology) -> Result<(), Error> {
    let root = root.clone();
    let (pio, mmio) = (&platform.pio, &platform.mmio);
    place(
        pio,
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        u64::from(layout::PCI_CONFIG_IO_START),
        u64::from(layout::PCI_CONFIG_IO_SIZE),
    )?;
    let (ecam, ecam_size) = topology.ecam();
    let config_mmio = PciConfigMmio::new(root, u16::from(topology.root_buses()));
    place(mmio, Arc::new(Mutex::new(config_mmio)), ecam, ecam_size)
}

/// Kernel, initramfs, command line, ACPI tables and boot information into guest memory.
/// `topology` is the one the VM's PCI devices were placed on: the ACPI tables describe it.
fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    topology: PciTopology,
    trace: &StartupTrace,
) -> Result<arch::regs::EntryMode, Error> {
    let kpath = config.kernel.display().to_string();
    let kfile = File::open(&config.kernel).map_err(io_err(format!("--kernel {kpath}")))?;
    let kernel = boot::load_kernel(mem, &kfile).map_err(|e| Error::Boot(format!("--kernel {kpath}"), e))?;
    trace.mark("kernel");
    let initramfs = match &config.initramfs {
        Some(path) => {
            let p = path.display().to_string();
            let f = File::open(path).map_err(io_err(format!("--initramfs {p}")))?;
            let mut f = arch::image::MappedImage::new(&f).map_err(io_err(format!("--initramfs {p}")))?;
            Some(
                boot::load_initramfs(mem, config.memory, &kernel, &mut f)
                    .map_err(|e| Error::Boot(format!("--initramfs {p}"), e))?,
            )
        }
        None => None,
    };
    let cmdline_len = boot::write_cmdline(mem, &config.cmdline).map_err(|e| Error::Boot("--cmdline".into(), e))?;
    // IMS policy: with --ims off guests must not use IMS; say so in the SIOV table and, with a
    // vIOMMU, through Caching Mode (docs/ims-policy.md).
    // "No IMS" for every guest; an enlightened one overrides it through the hypercall.
    let mut extra = vec![dmar::siov(dmar::SIOV_IMS_OPT_OUT)];
    if config.siov.viommu {
        extra.push(dmar::dmar(layout::VTD_START, 48));
    }
    let platform = siovmm_acpi::Platform { vcpus: config.cpus, mem_size: config.memory, pci: topology };
    let tables = siovmm_acpi::build(&platform, &extra)
?;
    mem.write_slice(&tables.bytes, GuestAddress(tables.base))
        .map_err(|e| Error::Memory(crate::memory::Error::Regions(format!("writing ACPI tables: {e}"))))?;
    boot::write_reset_stub(mem).map_err(|e| Error::Boot("the reset stub".into(), e))?;
    let info = BootInfo { mem_size: config.memory, initramfs, cmdline_len, rsdp: tables.rsdp_addr() };
    boot::write_boot_info(mem, &kernel, &info).map_err(|e| Error::Boot("boot information".into(), e))
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

/// SIGINT/SIGTERM/SIGHUP (stop) and SIGUSR1 (every vCPU reports its state,
/// [`vcpu::StateRequests`]) through a signalfd, so a signal is one more event on the loop.
struct SignalWatch {
    fd: OwnedFd,
    shutdown: Arc<ShutdownSignal>,
    state_requests: Arc<vcpu::StateRequests>,
}

const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Asks for a report of every vCPU's state; the VM runs on.
const STATE_SIGNAL: i32 = libc::SIGUSR1;

fn watched_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in STOP_SIGNALS.into_iter().chain([STATE_SIGNAL]) {
        // SAFETY: valid set and signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

impl SignalWatch {
    /// Blocks the stop signals in this thread (threads spawned later inherit the mask) and
    /// opens a signalfd for them.
    fn new(shutdown: Arc<ShutdownSignal>, state_requests: Arc<vcpu::StateRequests>) -> Result<Self, Error> {
        let set = watched_signal_set();
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
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) }, shutdown, state_requests })
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
        if n as usize != size {
            return;
        }
        match info.ssi_signo as i32 {
            STATE_SIGNAL => self.state_requests.ask(),
            signo => self.shutdown.request(ExitReason::Interrupted(signo)),
        }
    }
}

/// Every [`vcpu::PostMortem::SAMPLE_EVERY`], makes sure some vCPU has sampled a page-table
/// root lately ([`vcpu::PostMortem::tick`]), so that a triple fault before any exit still
/// gets its post-mortem.
struct PostMortemTicker {
    timer: TimerFd,
    post_mortem: vcpu::PostMortem,
    vcpus: Arc<vcpu::StateRequests>,
}

impl PostMortemTicker {
    /// Armed now (timerfd_settime is not in the event loop's filter); ticks before the vCPUs
    /// run find none to kick.
    fn new(post_mortem: vcpu::PostMortem, vcpus: Arc<vcpu::StateRequests>) -> Result<Self, Error> {
        let every = vcpu::PostMortem::SAMPLE_EVERY;
        let mut timer = TimerFd::new().map_err(|e| Error::Io("timerfd for the post-mortem".into(), e.into()))?;
        timer.reset(every, Some(every)).map_err(|e| Error::Io("arming the post-mortem timer".into(), e.into()))?;
        Ok(Self { timer, post_mortem, vcpus })
    }
}

impl MutEventSubscriber for PostMortemTicker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::warn!("post-mortem timer not watched ({e}): a triple fault before any exit gets none");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Expirations missed while busy count as one tick.
        if self.timer.wait().is_ok() {
            self.post_mortem.tick(&self.vcpus);
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

/// One VM and everything it owns: guest memory, the KVM VM, its devices, vCPU threads and
/// the event loop.
///
/// Lifecycle: [`Vm::build`] creates and configures everything (no vCPU runs yet);
/// [`Vm::run`] starts the vCPUs and serves the event loop until a stop is requested (by the
/// guest, a signal, or [`VmHandle::stop`] from another thread); meanwhile a [`VmHandle`] adds
/// and removes ADIs; dropping the `Vm` releases it all: vCPU threads are stopped and joined,
/// ADIs are closed, then the VM fd and guest memory go.
pub struct Vm {
    // Field order is drop order (after `Drop::drop` has joined the vCPUs): the event loop and
    // devices first, then the VM fd, guest memory last.
    vcpus: VcpuThreads,
    pending_vcpus: Vec<kvm_ioctls::VcpuFd>,
    event_loop: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    devices: Arc<Mutex<DeviceManager>>,
    /// Tells the guest about devices added and asks it to eject devices removed.
    hotplug: Arc<Hotplug>,
    /// Removes the functions of slots the guest ejects on its own, while the VM runs.
    eject_thread: Option<std::thread::JoinHandle<()>>,
    iommu: Option<Arc<VtdUnit>>,
    exits: Exits,
    // Owned so that they live exactly as long as the VM: buses and devices, the KVM VM, and
    // the guest memory its slots point at.
    #[allow(dead_code)]
    platform: Platform,
    #[allow(dead_code)]
    fd: Arc<VmFd>,
    #[allow(dead_code)]
    memory: GuestRam,
    shutdown: Arc<ShutdownSignal>,
    coalesce: bool,
    trace: StartupTrace,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("vcpus", &self.pending_vcpus.len().max(self.vcpus.0.len())).finish_non_exhaustive()
    }
}

/// Controls a [`Vm`] from any thread, while it runs: stop it, add and remove ADIs. (Only
/// tests use it yet; the API will.) It does not keep the VM alive: once the VM is released,
/// every call fails with [`Error::Released`].
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone)]
pub struct VmHandle {
    shutdown: Arc<ShutdownSignal>,
    #[cfg_attr(not(test), allow(dead_code))]
    devices: std::sync::Weak<Mutex<DeviceManager>>,
    hotplug: std::sync::Weak<Hotplug>,
}

/// How a device left the guest ([`VmHandle::remove_device`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removal {
    /// The guest ejected it when asked.
    pub ejected_by_guest: bool,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle").finish_non_exhaustive()
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl VmHandle {
    /// Requests the stop; [`Vm::run`] returns `reason` (unless the VM stopped first).
    pub fn stop(&self, reason: ExitReason) {
        self.shutdown.request(reason);
    }

    fn devices(&self) -> Result<Arc<Mutex<DeviceManager>>, Error> {
        self.devices.upgrade().ok_or(Error::Released)
    }

    /// Adds `count` ADIs to the VM; all or nothing. Returns their addresses, announced to
    /// the guest (`crate::hotplug`).
    pub fn add_adis(&self, count: u32) -> Result<Vec<Bdf>, Error> {
        let added = lock(self.devices()?.as_ref()).add_adis(count)?;
        if let Some(h) = self.hotplug.upgrade() {
            h.announce(&added);
        }
        Ok(added)
    }

    /// Removes the ADI at `bdf`; its IMS entries, routes, DMA binding and addresses go back.
    pub fn remove_adi(&self, bdf: Bdf) -> Result<siovmm_vfio::siov::AdiId, Error> {
        lock(self.devices()?.as_ref()).remove_adi(bdf)
    }

    /// What the VM's devices hold now (ADIs, IMS entries, routes).
    pub fn usage(&self) -> Result<crate::device_manager::Usage, Error> {
        Ok(lock(self.devices()?.as_ref()).usage())
    }

    /// Runs `f` on the ADI at `bdf`, as the guest's driver would reach it (tests).
    #[cfg(test)]
    pub(crate) fn with_adi<T>(&self, bdf: Bdf, f: impl FnOnce(&mut siovmm_vdcm::adi::AdiFunction) -> T) -> Result<T, Error> {
        let devices = self.devices()?;
        let function = lock(devices.as_ref()).vdcm_ref().and_then(|v| v.function(bdf));
        let function = function.ok_or(Error::Adis(siovmm_vdcm::Error::NoSuchFunction(bdf)))?;
        let mut f_locked = lock(function.as_ref());
        Ok(f(&mut f_locked))
    }

    /// The VM's ADIs: address and host ADI.
    pub fn adis(&self) -> Result<Vec<(Bdf, siovmm_vfio::siov::AdiId)>, Error> {
        Ok(lock(self.devices()?.as_ref()).adis())
    }

    /// Adds the vfio-user device served at `socket` to the running VM; returns its address.
    pub fn add_vfio_user(&self, socket: &std::path::Path) -> Result<Bdf, Error> {
        let bdf = lock(self.devices()?.as_ref()).add_vfio_user(socket)?;
        if let Some(h) = self.hotplug.upgrade() {
            h.announce(&[bdf]);
        }
        Ok(bdf)
    }

    /// Passes the host device `host` through (checked already: `host::check`); announced to
    /// the guest.
    pub fn add_vfio(&self, host: &siovmm_vfio::host::HostDevice) -> Result<Bdf, Error> {
        let bdf = lock(self.devices()?.as_ref()).add_vfio(host)?;
        if let Some(h) = self.hotplug.upgrade() {
            h.announce(&[bdf]);
        }
        Ok(bdf)
    }

    /// Whether the host device named `name` (`0000:00:04.0`) is passed through to this VM.
    pub fn has_vfio(&self, name: &str) -> Result<bool, Error> {
        Ok(lock(self.devices()?.as_ref()).has_vfio(name))
    }

    /// Whether a vfio-user device served at `socket` is in the VM.
    pub fn has_vfio_user(&self, socket: &std::path::Path) -> Result<bool, Error> {
        Ok(lock(self.devices()?.as_ref()).has_vfio_user(socket))
    }

    /// Every device of the VM: address and kind.
    pub fn devices_list(&self) -> Result<Vec<(Bdf, siovmm_api::DeviceKind)>, Error> {
        Ok(lock(self.devices()?.as_ref()).devices())
    }

    /// Removes the device at `bdf` (an ADI, a vfio-user or a kernel VFIO device). A guest that takes
    /// hotplug events is asked to eject its slot and given `eject_timeout`; then the device is
    /// removed whether it did or not, and the slot's other functions, which the guest's eject
    /// took with it, are announced again. A guest that does not is not asked: the device is
    /// removed unless the guest uses it ([`Error::InUse`]: nothing changed). Function 0 of a
    /// slot goes last ([`Error::FunctionZeroLast`]).
    pub fn remove_device(&self, bdf: Bdf, eject_timeout: std::time::Duration) -> Result<Removal, Error> {
        let devices = self.devices()?;
        let mates = {
            let d = lock(devices.as_ref());
            match d.kind(bdf) {
                None => return Err(Error::NoDevice(bdf)),
                Some(_) => d.slot_functions(bdf),
            }
        };
        let others: Vec<Bdf> = mates.into_iter().filter(|&f| f != bdf).collect();
        if bdf.function() == 0 && !others.is_empty() {
            let others = others.iter().map(|f| format!("0000:{f}")).collect::<Vec<_>>().join(", ");
            return Err(Error::FunctionZeroLast { bdf, others });
        }
        let hotplug = self.hotplug.upgrade().filter(|h| h.guest_listens());
        let ejected_by_guest = hotplug.as_ref().is_some_and(|h| h.eject(bdf, eject_timeout));
        {
            let mut d = lock(devices.as_ref());
            if hotplug.is_none() && d.in_use(bdf) == Some(true) {
                return Err(Error::InUse(bdf));
            }
            d.remove_device(bdf)?;
        }
        if let Some(h) = &hotplug {
            if !others.is_empty() {
                h.announce(&others);
            }
        }
        Ok(Removal { ejected_by_guest })
    }

    /// The guest ejected slot `device` of `bus` on its own: every function in it is removed
    /// (function 0 last), nothing asked, the guest having let go of them already.
    pub fn remove_ejected_slot(&self, bus: u8, device: u8) -> Result<(), Error> {
        let devices = self.devices()?;
        let mut d = lock(devices.as_ref());
        let mut functions = d.slot_functions(Bdf::new(bus, device, 0));
        functions.sort_unstable_by_key(|f| std::cmp::Reverse(f.function()));
        let mut removed = 0;
        for bdf in functions {
            match d.remove_device(bdf) {
                Ok(()) => removed += 1,
                Err(e) => log::warn!("0000:{bdf}, ejected by the guest: removing it: {e}"),
            }
        }
        if removed > 0 {
            log::info!("the guest ejected slot 0000:{bus:02x}:{device:02x}: {removed} functions removed");
        }
        Ok(())
    }
}

impl Vm {
    /// Builds the VM described by `config`: memory, devices, ADIs, guest images and ACPI tables
    /// in memory, vCPUs configured. Nothing runs until [`Vm::run`].
    pub fn build(config: &VmConfig, console_out: Box<dyn std::io::Write + Send>) -> Result<Self, Error> {
        let start = Instant::now();
        let trace = StartupTrace { start, enabled: std::env::var_os("SIOVMM_TRACE_STARTUP").is_some() };
        let shutdown = Arc::new(ShutdownSignal::new().map_err(io_err("eventfd".into()))?);
        let state_requests = Arc::new(vcpu::StateRequests::default());
        let signals = SignalWatch::new(shutdown.clone(), state_requests.clone())?;

        let kvm = Kvm::new().map_err(|e| Error::Kvm("opening /dev/kvm", e))?;
        // Shared when a vfio-user device may map it: one given now, or one the API may add.
        let (fd, memory) = create_vm(&kvm, config.memory, !config.vfio_user.is_empty() || config.vfio_user_dir.is_some())?;
        if !config.vfio_user.is_empty() || config.api_socket.is_some() {
            // Every programmed vector of a passed-through device holds an eventfd; raised now,
            // by this unfiltered thread, also for what the API adds later.
            raise_fd_limit();
        }
        let fd = Arc::new(fd);
        let ram_slots = memory.iter().count() as u32;
        let slots = MemorySlots::new(fd.clone(), ram_slots, kvm.get_nr_memslots() as u32)
            .map(Arc::new)
            .ok_or(Error::MissingCap("KVM_CAP_NR_MEMSLOTS beyond guest RAM's slots"))?;
        trace.mark("VM and memory");
        // The VM's one way to KVM's interrupt plumbing: pins, MSI routes, irqfds, ioeventfds.
        let irq = Arc::new(KvmIrq(fd.clone()));
        let platform = build_platform(irq.as_ref(), &shutdown, start, console_out)?;
        let ims = config.siov.ims.offer(config.siov.device.ims_storage());
        let iommu = if config.siov.viommu {
            // Caching Mode is the "no IMS in this VM" hint, on under every policy (the unit
            // caches nothing, so it is truthful).
            let unit = Arc::new(VtdUnit::new(memory.clone(), VtdConfig { caching_mode: true }));
            place(&platform.mmio, Arc::new(Mutex::new(unit.clone())), layout::VTD_START, vtd::REG_SIZE)?;
            Some(unit)
        } else {
            None
        };
        let topology = config.pci_topology();
        let root = pci_root();
        let parts = GuestParts {
            mem: memory.clone(),
            iommu: iommu.clone(),
            mmio: platform.mmio.clone(),
            pio: platform.pio.clone(),
            irq: irq.clone(),
            vm: fd.clone(),
            slots: slots.clone(),
            shared_ram: memory.shared(),
            vfio_iommu: config.vfio_iommu,
        };
        let vcpu_count = u32::from(config.cpus);
        let mut devices = DeviceManager::new(parts, config.siov.clone(), vcpu_count, root.clone(), PciAllocator::new(topology));
        if config.siov.adis > 0 {
            devices.add_adis(config.siov.adis)?;
        } else if config.api_socket.is_some() {
            // ADIs may come through the API: the SIOV device and the MSI router (their
            // threads, the fd limit) are set up now, by this unfiltered thread; the API
            // thread's list has no clone or prlimit.
            devices.prepare_adis()?;
        }
        for host in &config.vfio {
            let bdf = devices.add_vfio(host)?;
            trace.mark(&format!("VFIO device {} at {bdf}", host.name));
        }
        for socket in &config.vfio_user {
            let bdf = devices.add_vfio_user(socket)?;
            trace.mark(&format!("vfio-user device {} at {bdf}", socket.display()));
        }
        // Always there, as CPUID announces it: a VM's ADIs may come later.
        let calls = Hypercalls::new(memory.clone(), devices.adi_table(), vcpu_count, ims, devices.guest_ims());
        place(&platform.mmio, Arc::new(Mutex::new(calls)), HYPERCALL_ADDR, 8)?;
        attach_pci(&platform, &root, &topology)?;
        // The DSDT's slots and event device (siovmm_acpi) speak to these registers.
        let hotplug = Arc::new(Hotplug::new(irq.clone(), topology.root_buses(), &platform.mmio)?);
        trace.mark("devices");
        let entry = load_guest(&memory, config, topology, &trace)?;
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
            post_mortem: Some(vcpu::PostMortem::new(memory.clone())),
            state_requests,
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for id in 0..config.cpus {
            let vcpu = fd.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            if id == 0 && coalesce {
                // The ring page is per VM; mapping it through the first vCPU serves all of them.
                let ring = CoalescedRing::map(&vcpu).map_err(io_err("mapping the coalesced I/O ring".into()))?;
                fd.register_coalesced_mmio(IoEventAddress::Pio(u64::from(layout::PCI_CONFIG_IO_START)), 4)
                    .map_err(kvm_err("KVM_REGISTER_COALESCED_MMIO (0xCF8)"))?;
                exits.coalesced = Some(Arc::new(Mutex::new(ring)));
            }
            let topo = VcpuTopology {
                vcpu_id: id,
                vcpu_count: config.cpus,
                tsc_khz: vcpu.get_tsc_khz().unwrap_or(0),
                tsc_deadline,
            };
            vcpu::configure_cpuid(&vcpu, &supported, &topo, (ims.flags(), HYPERCALL_ADDR))?;
            if id == 0 {
                vcpu::configure_boot_vcpu(&vcpu, &memory, &entry)?;
            }
            vcpus.push(vcpu);
        }
        trace.mark("vCPUs configured");

        let mut event_loop: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| Error::Events("starting the event manager", e))?;
        event_loop.add_subscriber(Arc::new(Mutex::new(ShutdownWatch { shutdown: shutdown.clone() })));
        event_loop.add_subscriber(Arc::new(Mutex::new(signals)));
        event_loop
            .add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(platform.serial.clone(), platform.input_ready.clone()))));
        if let Some(post_mortem) = &exits.post_mortem {
            let ticker = PostMortemTicker::new(post_mortem.clone(), exits.state_requests.clone())?;
            event_loop.add_subscriber(Arc::new(Mutex::new(ticker)));
        }
        Ok(Self {
            vcpus: VcpuThreads(Vec::new()),
            pending_vcpus: vcpus,
            event_loop,
            devices: Arc::new(Mutex::new(devices)),
            hotplug,
            eject_thread: None,
            iommu,
            exits,
            platform,
            fd,
            memory,
            shutdown,
            coalesce,
            trace,
        })
    }

    /// The VM's MMIO bus and KVM interrupt side, as its guest reaches them (tests).
    #[cfg(test)]
    pub(crate) fn guest_reach(&self) -> (Arc<Bus>, KvmIrq) {
        (self.platform.mmio.clone(), KvmIrq(self.fd.clone()))
    }

    /// The VM's memory slots above RAM.
    #[cfg(test)]
    pub(crate) fn memory_slots(&self) -> Arc<MemorySlots> {
        lock(&self.devices).memory_slots()
    }

    /// A handle that controls this VM from another thread.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn handle(&self) -> VmHandle {
        VmHandle { shutdown: self.shutdown.clone(), devices: Arc::downgrade(&self.devices), hotplug: Arc::downgrade(&self.hotplug) }
    }

    /// Starts the vCPUs and serves the event loop until the VM stops; returns why it stopped.
    /// The vCPU threads are stopped and joined before it returns.
    ///
    /// The calling thread enters the event loop's seccomp filter once the vCPUs run, and keeps
    /// it: the VM's release (on drop) happens under it too.
    pub fn run(&mut self) -> Result<ExitReason, Error> {
        // The kick handler is installed now: the filter below has no rt_sigaction.
        vcpu::can_kick();
        // A slot the guest ejects on its own loses its functions here, under the API thread's
        // filter: the same removals as `vm.remove-device`. Started, and named, before the
        // vCPUs, so that whoever counts this VM's threads once its vCPUs run finds it there.
        // (`siovmm_seccomp::spawn` returns once the thread, named, has entered its filter.)
        let (hotplug, handle) = (self.hotplug.clone(), self.handle());
        let ejects = siovmm_seccomp::spawn(ThreadKind::Api, "pci-eject".into(), move || {
            while let Some(slots) = hotplug.wait_guest_ejects() {
                for (bus, device) in slots {
                    if let Err(e) = handle.remove_ejected_slot(bus, device) {
                        log::warn!("slot 0000:{bus:02x}:{device:02x}, ejected by the guest: {e}");
                    }
                }
            }
        })
        .map_err(io_err("spawning the pci-eject thread".into()))?;
        self.eject_thread = Some(ejects);
        for (id, vcpu) in std::mem::take(&mut self.pending_vcpus).into_iter().enumerate() {
            let exits = self.exits.clone();
            let thread = siovmm_seccomp::spawn(ThreadKind::Vcpu, format!("vcpu{id}"), move || vcpu::run(vcpu, id as u8, exits))
                .map_err(io_err("spawning a vCPU thread".into()));
            match thread {
                Ok(t) => self.vcpus.0.push(t),
                Err(e) => {
                    self.shutdown.request(ExitReason::Failed(e.to_string()));
                    self.vcpus.stop_and_join();
                    return Err(e);
                }
            }
        }
        let served = siovmm_seccomp::enter(ThreadKind::EventLoop).map_err(Error::Seccomp).and_then(|()| self.serve());
        // Whatever ended the loop, no vCPU runs past this point.
        if self.shutdown.reason().is_none() {
            self.shutdown.request(ExitReason::Failed("the event loop failed".into()));
        }
        self.vcpus.stop_and_join();
        self.end_hotplug();
        served?;
        let trace = &self.trace;
        trace.mark(&format!("run ({}, coalesced 0xCF8 {})", self.exits.stats, if self.coalesce { "on" } else { "off" }));
        let devices = lock(&self.devices);
        if let Some(v) = devices.vdcm_ref() {
            trace.mark(&format!("run ({})", v.delivery_summary()));
        }
        for line in devices.vfio_summary() {
            trace.mark(&format!("run ({line})"));
        }
        drop(devices);
        if let Some(unit) = &self.iommu {
            trace.mark(&format!("run (vIOMMU: {} DMA page translations)", unit.translations()));
        }
        Ok(self.shutdown.reason().unwrap_or(ExitReason::Failed("VM stopped without a reason".into())))
    }

    /// No guest will answer an eject now: a removal waiting for one (on the API thread,
    /// stopped once the VM ends) goes on at once, and the pci-eject thread ends and is joined.
    fn end_hotplug(&mut self) {
        self.hotplug.stop();
        if let Some(t) = self.eject_thread.take() {
            let _ = t.join();
        }
    }

    fn serve(&mut self) -> Result<(), Error> {
        while self.shutdown.reason().is_none() {
            self.event_loop.run().map_err(|e| Error::Events("the event loop", e))?;
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.shutdown.reason().is_none() {
            self.shutdown.request(ExitReason::Failed("VM released".into()));
        }
        self.vcpus.stop_and_join();
        // A run that failed to start its vCPUs left the pci-eject thread waiting.
        self.end_hotplug();
        // ADIs closed now, while guest memory is certainly mapped: a handle in another thread
        // may hold the device manager a moment longer, but finds it released.
        lock(&self.devices).release();
    }
}

/// The running vCPU threads.
struct VcpuThreads(Vec<std::thread::JoinHandle<()>>);

impl VcpuThreads {
    /// Stops every vCPU thread and waits for it. The shutdown request is already set, and a
    /// vCPU thread checks it after each exit; a vCPU inside KVM_RUN (a guest spinning, or
    /// halted) is kicked out by a signal, sent again until the thread ends, since one sent
    /// just before it enters KVM_RUN would be missed.
    fn stop_and_join(&mut self) {
        let can_kick = vcpu::can_kick();
        for t in self.0.drain(..) {
            while !t.is_finished() {
                use vmm_sys_util::signal::Killable;
                if can_kick {
                    let _ = t.kill(vcpu::kick_signal());
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let _ = t.join();
        }
    }
}

/// Raises the open-file soft limit to the hard limit (`siovmm_vdcm::fd_limit`).
pub(crate) fn raise_fd_limit() {
    siovmm_vdcm::fd_limit::raise_open_file_limit(0);
}
