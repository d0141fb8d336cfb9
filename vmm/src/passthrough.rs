//! Devices passed through to the guest as VFIO PCI functions, from either backend of the one
//! VFIO layer (`siovmm_vfio::pci::VfioBackend`):
//! - kernel VFIO (`--vfio`): one host IOMMU context, created with the first such device,
//!   holding all guest RAM for device DMA: a VFIO container (type1 IOMMU) holding each
//!   device's group, or (`--vfio-iommu iommufd`, feature `iommufd`) an iommufd I/O address
//!   space each device's cdev is bound and attached to. Both are `vfio_ioctls::VfioOps`, so
//!   everything after their creation is one path;
//! - vfio-user (`--vfio-user`): a device served by another process (the device daemon's
//!   ADIs), which gets guest RAM as the memfd behind it (DMA_MAP with the descriptor).
//!
//! Per device, a PCI function (`VfioPciFunction`) whose BARs are placed as firmware would,
//! mapped into the guest as memory slots wherever the device lets its pages be mmapped, and
//! trapped elsewhere (the MSI-X table and PBA always). docs/vfio.md.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use devices::bus::lock;
use devices::faults::GuestFaults;
use devices::pci::{Bdf, PciAllocator, PciRoot};
use devices::{Bus, BusDevice};
use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use siovmm_interrupts::{IoEvents, MsiRouter};
use siovmm_vfio::host::{HostDevice, Iommu};
use siovmm_vfio::kernel::KernelVfio;
use siovmm_vfio::mapping::{direct_ranges, RegionMapping, PAGE};
use siovmm_vfio::pci::{bars, Bar, BarOverlay, VfioBackend, VfioBarMapper, VfioPciFunction};
use siovmm_vfio::user::{IoEventFd as UserIoEventFd, UserDevice};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::SharedRam;
use crate::memslots::{MappedSlot, MemorySlots};

/// Why a device could not be passed through.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM VFIO device could not be created.
    #[error("creating the KVM VFIO device")]
    KvmDevice(#[source] kvm_ioctls::Error),
    /// The VFIO container, group or device refused.
    #[error("{what}")]
    Vfio {
        /// What was being done.
        what: String,
        /// VFIO's error.
        #[source]
        error: vfio_ioctls::VfioError,
    },
    /// A vfio-user device could not be reached or refused.
    #[error("{what}")]
    User {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        error: siovmm_vfio::user::Error,
    },
    /// iommufd asked for in a build without it (the CLI refuses this first).
    #[cfg(not(feature = "iommufd"))]
    #[error("--vfio-iommu iommufd: this siovmm was built without the iommufd feature")]
    IommufdNotBuilt,
    /// `/dev/iommu` could not be opened.
    #[cfg(feature = "iommufd")]
    #[error("opening /dev/iommu")]
    Iommufd(#[source] iommufd_ioctls::IommufdError),
    /// A vfio-user device needs guest RAM it can map, and this VM's is private.
    #[error("{0}: guest RAM is not shared (the VM was created without vfio-user devices)")]
    PrivateRam(String),
    /// Mapping the device's BAR pages into siovmm failed.
    #[error("{0}: mapping BAR {1}")]
    Mmap(String, u8, #[source] std::io::Error),
    /// A part of a BAR could not be served by siovmm instead of the device.
    #[error("{0}: virtualizing part of a BAR")]
    Overlay(String, #[source] siovmm_vfio::pci::OverlayError),
    /// A part of a BAR siovmm was to serve is mapped into the guest (the device let its pages
    /// be mmapped), where accesses never exit.
    #[error("{name}: BAR {bar} bytes {start:#x}..{end:#x} are mapped into the guest, so siovmm cannot serve them")]
    OverlayMapped {
        /// The device.
        name: String,
        /// The BAR.
        bar: u8,
        /// Where the part starts.
        start: u64,
        /// Where it ends.
        end: u64,
    },
    /// No device number or BAR space left.
    #[error("{0}: placing it on the guest's PCI segment")]
    Placement(String, #[source] devices::pci::AllocError),
}

/// The guest side a device is attached to.
pub(crate) struct Attach<'a> {
    pub(crate) pci: &'a Arc<PciRoot>,
    pub(crate) allocator: &'a mut PciAllocator,
    pub(crate) router: Arc<MsiRouter>,
    pub(crate) mmio: &'a Arc<Bus>,
    pub(crate) pio: &'a Arc<Bus>,
    pub(crate) slots: &'a Arc<MemorySlots>,
    pub(crate) ioevents: Arc<dyn IoEvents>,
}

/// A guest access to a trapped part of a passed-through BAR, handed to its function.
struct BarTrap {
    function: Arc<Mutex<VfioPciFunction>>,
    bar: u8,
}

impl BusDevice for BarTrap {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.function).bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.function).bar_write(self.bar, offset, data);
    }
}

/// The pages of one BAR the guest reaches without an exit: host mappings and the ranges of
/// them (offset in the BAR, length) that go into memory slots.
struct DirectBar {
    index: u8,
    mappings: Vec<RegionMapping>,
    ranges: Vec<(u64, u64)>,
}

impl DirectBar {
    /// The host address of BAR offset `offset`, if a mapping holds `len` bytes from there.
    fn host(&self, offset: u64, len: u64) -> Option<*mut u8> {
        self.mappings.iter().find_map(|m| {
            let at = offset.checked_sub(m.offset())?;
            (at.checked_add(len)? <= m.len()).then(|| m.host(at)).flatten()
        })
    }
}

/// Places a device's BARs where the guest puts them: the whole BAR on the MMIO bus (so
/// every access is served, even where no memory slot could be made), and its direct pages
/// as memory slots over it, which KVM serves before any exit.
struct BarPlacer {
    name: String,
    windows: Vec<(u64, u64)>,
    mmio: Arc<Bus>,
    /// The port bus, for I/O BARs (trapped: every access is a port exit).
    pio: Arc<Bus>,
    slots: Arc<MemorySlots>,
    function: OnceLock<Weak<Mutex<VfioPciFunction>>>,
    direct: OnceLock<Vec<DirectBar>>,
    /// Memory slots in use, per BAR index.
    live: Mutex<BTreeMap<u8, Vec<MappedSlot>>>,
    /// Places in BARs whose writes go to the device through an eventfd (a vfio-user
    /// server's GET_REGION_IO_FDS: the doorbell), made KVM ioeventfds wherever the BAR is.
    io_eventfds: Vec<(u8, UserIoEventFd)>,
    ioevents: Arc<dyn IoEvents>,
    /// Guest addresses of the ioeventfds registered, per BAR index.
    registered: Mutex<BTreeMap<u8, Vec<u64>>>,
    /// Set when a slot could not be removed: its host pages must then outlive the VM.
    stuck: std::sync::atomic::AtomicBool,
    /// Placements the guest asked for that failed (it may place BARs anywhere, as often as
    /// it likes): counted, the first few logged.
    faults: Mutex<GuestFaults>,
}

impl BarPlacer {
    /// Records a failed placement step.
    fn fault(&self, what: std::fmt::Arguments<'_>, error: impl std::fmt::Display) {
        lock(&self.faults).report(&what.to_string(), error);
    }

    /// Makes BAR `bar`'s eventfd places KVM ioeventfds at `base`.
    fn register_io_eventfds(&self, bar: u8, base: u64) {
        let mut at = Vec::new();
        for (_, e) in self.io_eventfds.iter().filter(|(b, _)| *b == bar) {
            let addr = base + e.offset;
            match self.ioevents.ioeventfd(&e.fd, addr, true) {
                Ok(()) => at.push(addr),
                // The write still reaches the device, as a trapped BAR access.
                Err(err) => self.fault(format_args!("ioeventfd at {addr:#x} (those writes exit to siovmm)"), err),
            }
        }
        lock(&self.registered).insert(bar, at);
    }

    fn unregister_io_eventfds(&self, bar: u8) {
        let at = lock(&self.registered).remove(&bar).unwrap_or_default();
        for ((_, e), addr) in self.io_eventfds.iter().filter(|(b, _)| *b == bar).zip(at) {
            if let Err(err) = self.ioevents.ioeventfd(&e.fd, addr, false) {
                self.fault(format_args!("removing the ioeventfd at {addr:#x}"), err);
            }
        }
    }

    fn unmap_slots(&self, bar: u8) {
        let slots = lock(&self.live).remove(&bar).unwrap_or_default();
        for slot in slots {
            if let Err(e) = self.slots.unmap(slot) {
                log::error!("{}: BAR {bar}: {e}; its pages stay mapped until siovmm exits", self.name);
                self.stuck.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn map_slots(&self, bar: u8, base: u64) {
        let Some(direct) = self.direct.get().and_then(|d| d.iter().find(|d| d.index == bar)) else { return };
        let mut mapped = Vec::new();
        for &(offset, len) in &direct.ranges {
            let Some(host) = direct.host(offset, len) else { continue };
            // SAFETY: `host` is inside a mapping of the device's region that this placer owns;
            // it is unmapped only after every slot over it is gone (`Passthrough::release`),
            // or never (`stuck`).
            match unsafe { self.slots.map(base + offset, len, host) } {
                Ok(slot) => mapped.push(slot),
                // Accesses there still work: the whole BAR is on the MMIO bus.
                Err(e) => self.fault(format_args!("BAR {bar} at {:#x} (those accesses exit to siovmm)", base + offset), e),
            }
        }
        lock(&self.live).insert(bar, mapped);
    }
}

impl BarPlacer {
    /// Puts BAR `bar` on `bus` at `base`, trapping every access there, if it lies wholly in
    /// one of `windows` (`which` names them in the fault line). As on real hardware, the host
    /// bridge forwards only its windows: a BAR the guest puts elsewhere (over its local APIC,
    /// or in another root bus's window) is not reachable, rather than shadowing what is there;
    /// and a BAR over another device's range gets no place either.
    fn trap_bar(&self, bus: &Bus, windows: &[(u64, u64)], which: &str, bar: Bar, base: u64) -> bool {
        if !inside_windows(windows, base, bar.size) {
            self.fault(format_args!("BAR {} at {base:#x}", bar.index), format_args!("outside {which}; not placed"));
            return false;
        }
        let Some(function) = self.function.get().and_then(Weak::upgrade) else { return false };
        if let Err(e) = bus.insert(Arc::new(Mutex::new(BarTrap { function, bar: bar.index })), base, bar.size) {
            self.fault(format_args!("BAR {} not placed", bar.index), e);
            return false;
        }
        true
    }
}

impl VfioBarMapper for BarPlacer {
    fn remap(&self, _bdf: Bdf, bar: Bar, old: Option<u64>, new: Option<u64>) -> bool {
        if bar.io {
            // On the port bus: every access exits to siovmm and goes to the device as a region
            // access (VFIO maps no ports). Ports are root bus 0's only (the DSDT).
            if let Some(base) = old {
                self.pio.remove(base);
            }
            let io = (u64::from(arch::layout::PCI_IO_BAR_START), u64::from(arch::layout::PCI_IO_BAR_SIZE));
            return new.is_some_and(|base| self.trap_bar(&self.pio, &[io], "the I/O BAR ports", bar, base));
        }
        if let Some(base) = old {
            self.unregister_io_eventfds(bar.index);
            self.unmap_slots(bar.index);
            self.mmio.remove(base);
        }
        let Some(base) = new else { return false };
        if !self.trap_bar(&self.mmio, &self.windows, "the PCI windows", bar, base) {
            return false;
        }
        self.map_slots(bar.index, base);
        self.register_io_eventfds(bar.index, base);
        true
    }
}

/// A device's backend in the VFIO layer.
enum Backend {
    Kernel(Arc<KernelVfio>),
    User(Arc<UserDevice>),
}

impl Backend {
    fn as_dyn(&self) -> Arc<dyn VfioBackend> {
        match self {
            Self::Kernel(k) => k.clone(),
            Self::User(u) => u.clone(),
        }
    }

    /// Puts the device back in its power-on state.
    fn reset(&self, name: &str) {
        match self {
            Self::Kernel(k) => {
                k.device().reset();
            }
            Self::User(u) => {
                if let Err(e) = u.reset() {
                    log::warn!("{name}: reset: {e}");
                }
            }
        }
    }
}

/// One passed-through device. Field order is drop order: the BAR mappings go before the
/// device file (or socket), whose last close releases the device to its host.
struct Passed {
    name: String,
    bdf: Bdf,
    function: Arc<Mutex<VfioPciFunction>>,
    placer: Arc<BarPlacer>,
    backend: Backend,
    bars: Vec<(Bar, u64)>,
}

/// The VM's passed-through devices, and for kernel VFIO its host IOMMU context.
pub(crate) struct Passthrough {
    vm: Arc<VmFd>,
    /// Created with the first kernel VFIO device: a VM with vfio-user devices only needs no
    /// `/dev/vfio`.
    iommu: Option<Arc<dyn VfioOps>>,
    /// Which kind `iommu` is made as (`--vfio-iommu`).
    kind: Iommu,
    mem: GuestMemoryMmap,
    /// The memfd behind guest RAM, when it is shared (vfio-user devices DMA through it).
    shared: Option<SharedRam>,
    devices: Vec<Passed>,
    /// Guest RAM is mapped for DMA in `iommu` (after the first device gave it its IOMMU).
    dma_mapped: bool,
}

impl Passthrough {
    /// Passthrough for the VM `vm` with memory `mem` (`shared` when a device process may map it).
    /// `kind` says how kernel VFIO devices will reach the host IOMMU.
    pub(crate) fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap, shared: Option<SharedRam>, kind: Iommu) -> Self {
        Self { vm, iommu: None, kind, mem, shared, devices: Vec::new(), dma_mapped: false }
    }

    /// The VM's host IOMMU context, tied to it through the KVM VFIO device (which tells KVM
    /// that devices may DMA, for cache coherency on hosts that need it; with iommufd, KVM
    /// learns of each device's cdev instead of its group).
    fn iommu(&mut self) -> Result<Arc<dyn VfioOps>, Error> {
        if let Some(c) = &self.iommu {
            return Ok(c.clone());
        }
        let mut kvm_vfio = kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_VFIO, fd: 0, flags: 0 };
        let kvm_device = Arc::new(VfioDeviceFd::new_from_kvm(self.vm.create_device(&mut kvm_vfio).map_err(Error::KvmDevice)?));
        let iommu: Arc<dyn VfioOps> = match self.kind {
            Iommu::Container => Arc::new(
                VfioContainer::new(Some(kvm_device)).map_err(|error| Error::Vfio { what: "opening /dev/vfio/vfio".into(), error })?,
            ),
            #[cfg(feature = "iommufd")]
            Iommu::Iommufd => {
                let fd = Arc::new(iommufd_ioctls::IommuFd::new().map_err(Error::Iommufd)?);
                // One I/O address space for the VM, made here: guest RAM is mapped into it
                // once, whichever devices come and go.
                Arc::new(
                    vfio_ioctls::VfioIommufd::new(fd, None, Some(kvm_device))
                        .map_err(|error| Error::Vfio { what: "allocating an iommufd I/O address space".into(), error })?,
                )
            }
            #[cfg(not(feature = "iommufd"))]
            Iommu::Iommufd => return Err(Error::IommufdNotBuilt),
        };
        Ok(self.iommu.insert(iommu).clone())
    }

    /// Opens `host`, resets it, maps guest RAM for its DMA (once per IOMMU context), and adds it
    /// to the guest's PCI segment with its memory BARs placed. Returns its guest address.
    pub(crate) fn attach(&mut self, host: &HostDevice, guest: Attach<'_>) -> Result<Bdf, Error> {
        let name = host.name.clone();
        let vfio_error = |what: &str| {
            let what = format!("{name}: {what}");
            move |error| Error::Vfio { what, error }
        };
        let iommu = self.iommu()?;
        // With iommufd the crate binds the device's cdev to the iommufd and attaches it to
        // the I/O address space; with a container it adds the device's group.
        let attach_ioas = self.kind == Iommu::Iommufd;
        let device = VfioDevice::new(&host.sysfs, iommu.clone(), attach_ioas).map_err(vfio_error("opening the device"))?;
        // A device that keeps state from its last user (another VM, a host driver) starts clean.
        device.reset();
        if !self.dma_mapped {
            map_guest_ram(iommu.as_ref(), &self.mem).map_err(vfio_error("mapping guest RAM for DMA"))?;
            self.dma_mapped = true;
        }
        self.place(name, Backend::Kernel(Arc::new(KernelVfio::new(device))), guest)
    }

    /// Connects to the vfio-user device at `socket`, lets it DMA to all guest RAM (the memfd
    /// behind it, region by region), resets it, and adds it to the guest's PCI segment.
    pub(crate) fn attach_user(&mut self, socket: &std::path::Path, guest: Attach<'_>) -> Result<Bdf, Error> {
        let name = socket.display().to_string();
        let user_error = |what: &str| {
            let what = format!("{name}: {what}");
            move |error| Error::User { what, error }
        };
        let Some(SharedRam { file, regions }) = &self.shared else { return Err(Error::PrivateRam(name)) };
        let device = UserDevice::connect(socket).map_err(user_error("connecting"))?;
        for r in regions {
            device.dma_map(r.guest, r.size, std::os::fd::AsRawFd::as_raw_fd(file.as_ref()), r.offset).map_err(user_error("mapping guest RAM for DMA"))?;
        }
        device.reset().map_err(user_error("resetting"))?;
        self.place(name, Backend::User(Arc::new(device)), guest)
    }

    /// Adds a device opened on either backend to the guest's PCI segment, its BARs placed
    /// and its mmap-able pages ready to become memory slots.
    fn place(&mut self, name: String, backend: Backend, guest: Attach<'_>) -> Result<Bdf, Error> {
        let device = backend.as_dyn();
        // Read once: over vfio-user each config read is a message.
        let all_bars = bars(device.as_ref());
        let mut io_eventfds = Vec::new();
        if let Backend::User(user) = &backend {
            for bar in all_bars.iter().filter(|b| !b.io) {
                match user.io_eventfds(u32::from(bar.index)) {
                    Ok(fds) => io_eventfds.extend(fds.into_iter().map(|f| (bar.index, f))),
                    // Correct without them, only slower: every write is a message.
                    Err(e) => log::warn!("{name}: BAR {}: no ioeventfds: {e}", bar.index),
                }
            }
        }
        let bdf = guest.allocator.allocate_device().map_err(|e| Error::Placement(name.clone(), e))?;
        let mut placement = Vec::new();
        for &bar in &all_bars {
            if bar.io {
                // Ports are few and bus 0's only: a device that cannot have them keeps its
                // other BARs, and its driver sees the I/O BAR unimplemented (most drivers of
                // devices with both use the memory one).
                match guest.allocator.allocate_io_bar(bdf.bus(), bar.size) {
                    Ok(port) => placement.push((bar, port)),
                    Err(e) => log::warn!("{name}: BAR {} left out: {e}", bar.index),
                }
                continue;
            }
            match guest.allocator.allocate_bar(bdf.bus(), bar.size) {
                Ok(address) => placement.push((bar, address)),
                Err(e) => {
                    release_placement(guest.allocator, bdf, &placement);
                    return Err(Error::Placement(name, e));
                }
            }
        }
        // The windows the DSDT gives this function's root bus (its host bridge's _CRS).
        let (topology, ram) = (guest.allocator.topology(), self.mem.iter().map(|r| r.len()).sum());
        let placer_name = format!("VFIO device {name} at {bdf}");
        let placer = Arc::new(BarPlacer {
            faults: Mutex::new(GuestFaults::new(placer_name.clone())),
            name: placer_name,
            windows: vec![topology.mmio32_window(bdf.bus()), topology.mmio64_window(bdf.bus(), ram)],
            mmio: guest.mmio.clone(),
            pio: guest.pio.clone(),
            slots: guest.slots.clone(),
            function: OnceLock::new(),
            direct: OnceLock::new(),
            live: Mutex::new(BTreeMap::new()),
            stuck: false.into(),
            io_eventfds,
            ioevents: guest.ioevents.clone(),
            registered: Mutex::new(BTreeMap::new()),
        });
        let mapper: Weak<dyn VfioBarMapper> = Arc::downgrade(&(placer.clone() as Arc<dyn VfioBarMapper>));
        let function = VfioPciFunction::new(bdf, device.clone(), &placement, guest.router, mapper);
        let mut direct = Vec::new();
        for (bar, _) in placement.iter().filter(|(b, _)| b.mmap) {
            let mappings = match device.map_region(u32::from(bar.index)) {
                Ok(m) => m,
                Err(e) => {
                    release_placement(guest.allocator, bdf, &placement);
                    return Err(Error::Mmap(name, bar.index, e));
                }
            };
            let areas: Vec<(u64, u64)> = mappings.iter().map(|m| (m.offset(), m.len())).collect();
            let ranges = direct_ranges(&areas, &function.trapped_pages(bar.index, PAGE));
            direct.push(DirectBar { index: bar.index, mappings, ranges });
        }
        let _ = placer.direct.set(direct);
        let function = Arc::new(Mutex::new(function));
        let _ = placer.function.set(Arc::downgrade(&function));
        guest.pci.add(bdf, function.clone());
        log::info!("{name}: passed through at {bdf}, BARs {placement:x?}");
        drop(device);
        self.devices.push(Passed { name, bdf, function, placer, backend, bars: placement });
        Ok(bdf)
    }

    /// One line per device: where it is and how many BAR accesses reached siovmm.
    /// Devices attached.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.devices.len()
    }

    /// Each device's guest address, and whether it is served over vfio-user.
    pub(crate) fn devices(&self) -> Vec<(Bdf, bool)> {
        self.devices.iter().map(|d| (d.bdf, matches!(d.backend, Backend::User(_)))).collect()
    }

    pub(crate) fn summary(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| {
                let t = lock(&d.function).trapped_accesses();
                let kind = match &d.backend {
                    Backend::Kernel(_) => "VFIO".to_string(),
                    Backend::User(u) => {
                        // Pages the server offered for mmap (a mapped portal), which go to the
                        // guest as memory wherever it places the BAR.
                        let pages: u64 = d.placer.direct.get().map_or(0, |bars| bars.iter().flat_map(|b| &b.ranges).map(|(_, len)| len / PAGE).sum());
                        format!("vfio-user ({} ioeventfds, {pages} pages mapped, {} failed requests)", d.placer.io_eventfds.len(), u.failures())
                    }
                };
                format!("{kind} {} at {}: {} MSI-X table/PBA accesses and {} other BAR accesses trapped", d.name, d.bdf, t.msix, t.other)
            })
            .collect()
    }

    /// Whether the vfio-user device served at `socket` is attached.
    pub(crate) fn has_socket(&self, socket: &std::path::Path) -> bool {
        let name = socket.display().to_string();
        self.devices.iter().any(|d| matches!(d.backend, Backend::User(_)) && d.name == name)
    }

    /// Whether the host device named `name` (its canonical sysfs directory's last component,
    /// `HostDevice::name`) is attached through kernel VFIO.
    pub(crate) fn has_host(&self, name: &str) -> bool {
        self.devices.iter().any(|d| matches!(d.backend, Backend::Kernel(_)) && d.name == name)
    }

    /// Whether the guest is using the device at `bdf` (`VfioPciFunction::in_use`); `None`
    /// when no device is there.
    pub(crate) fn in_use(&self, bdf: Bdf) -> Option<bool> {
        self.devices.iter().find(|d| d.bdf == bdf).map(|d| lock(&d.function).in_use())
    }

    /// Takes the device at `bdf` out of the running guest, as [`Passthrough::release`] does
    /// every device, and closes it: a vfio-user server gets its device back; a kernel VFIO
    /// device's group leaves the container (and with the last one, guest RAM is unmapped
    /// from the IOMMU first, as at release), so that another VM can take it.
    /// The vfio-user device at `bdf`, if that is what is there.
    pub(crate) fn user_device(&self, bdf: Bdf) -> Option<Arc<UserDevice>> {
        self.devices.iter().find(|d| d.bdf == bdf).and_then(|d| match &d.backend {
            Backend::User(user) => Some(user.clone()),
            Backend::Kernel(_) => None,
        })
    }

    /// Has siovmm serve bytes `start..start + size` of BAR `bar` of the device at `bdf` with
    /// `overlay` instead of the device (`VfioPciFunction::overlay`); refused where the device
    /// let those pages be mapped into the guest.
    pub(crate) fn overlay(&self, bdf: Bdf, bar: u8, start: u64, size: u64, overlay: Box<dyn BarOverlay>) -> Result<(), Error> {
        let Some(d) = self.devices.iter().find(|d| d.bdf == bdf) else { return Ok(()) };
        let end = start.saturating_add(size);
        let direct = d.placer.direct.get().into_iter().flatten().filter(|b| b.index == bar);
        if direct.flat_map(|b| &b.ranges).any(|&(at, len)| at < end && start < at.saturating_add(len)) {
            return Err(Error::OverlayMapped { name: d.name.clone(), bar, start, end });
        }
        lock(&d.function).overlay(bar, start, size, overlay).map_err(|e| Error::Overlay(d.name.clone(), e))
    }

    pub(crate) fn detach(&mut self, bdf: Bdf, pci: &PciRoot, allocator: &mut PciAllocator) -> Result<(), Error> {
        let Some(at) = self.devices.iter().position(|d| d.bdf == bdf) else { return Ok(()) };
        let d = self.devices.remove(at);
        self.take_out(&d, pci, allocator);
        let kernel_left = self.devices.iter().any(|x| matches!(x.backend, Backend::Kernel(_)));
        if matches!(d.backend, Backend::Kernel(_)) && !kernel_left {
            self.unmap_guest_ram();
        }
        log::info!("{}: removed from {bdf}", d.name);
        forget_if_stuck(d);
        Ok(())
    }

    /// Unmaps guest RAM from the host IOMMU, if mapped: while a device is still in it (a
    /// container's last group leaving takes the IOMMU, and every mapping, away, after which
    /// an unmap is refused). The next kernel VFIO device maps it again.
    fn unmap_guest_ram(&mut self) {
        if let (true, Some(iommu)) = (std::mem::take(&mut self.dma_mapped), &self.iommu) {
            let unmapped = self.mem.iter().try_for_each(|r| iommu.vfio_dma_unmap(r.start_addr().raw_value(), r.len() as usize));
            if let Err(e) = unmapped {
                log::warn!("unmapping guest RAM from the host IOMMU ({}): {e}", self.kind.name());
            }
        }
    }

    /// Takes `d` out of the guest and gives it back clean: off config space, interrupts off,
    /// BARs unmapped, reset, guest RAM unmapped for a vfio-user device, its addresses freed.
    fn take_out(&self, d: &Passed, pci: &PciRoot, allocator: &mut PciAllocator) {
        pci.remove(d.bdf);
        {
            let mut f = lock(&d.function);
            // What siovmm served in the device's place (a trapped IMS window and its routes)
            // goes before the device is reset.
            f.remove_overlays();
            f.disable_interrupts();
            f.unmap_bars();
            if f.failures() > 0 {
                log::warn!("{}: {} failed operations while the guest drove it", d.name, f.failures());
            }
        }
        d.backend.reset(&d.name);
        if let (Backend::User(u), Some(shared)) = (&d.backend, &self.shared) {
            for r in &shared.regions {
                if let Err(e) = u.dma_unmap(r.guest, r.size) {
                    log::warn!("{}: {e}", d.name);
                }
            }
        }
        release_placement(allocator, d.bdf, &d.bars);
    }

    /// Takes every device out of the guest and gives it back clean: interrupts off, BARs
    /// unmapped, reset, closed (the group leaves the container), then guest RAM unmapped from
    /// the IOMMU. Another VM can take the devices afterwards.
    pub(crate) fn release(&mut self, pci: &PciRoot, allocator: &mut PciAllocator) {
        for d in &self.devices {
            self.take_out(d, pci, allocator);
        }
        self.unmap_guest_ram();
        for d in self.devices.drain(..) {
            forget_if_stuck(d);
        }
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        if !self.devices.is_empty() || self.dma_mapped {
            log::warn!("VFIO devices dropped without release; the kernel resets them as their files close");
        }
    }
}

/// Maps every region of guest RAM for device DMA at its guest-physical address, through
/// either kind of host IOMMU context.
fn map_guest_ram(iommu: &dyn VfioOps, mem: &GuestMemoryMmap) -> Result<(), vfio_ioctls::VfioError> {
    mem.iter().try_for_each(|region| {
        let host = region.get_host_address(MemoryRegionAddress(0)).map_err(|_| vfio_ioctls::VfioError::GetHostAddress)?;
        // SAFETY: guest RAM stays mapped for as long as the IOMMU context exists (the device
        // manager, which owns it, is released before guest memory), and siovmm never makes
        // Rust references into guest memory (vm-memory accesses it volatilely).
        unsafe { iommu.vfio_dma_map(region.start_addr().raw_value(), region.len() as usize, host) }
    })
}

/// Whether `[base, base + size)` lies wholly inside one of `windows` ((start, size) pairs).
fn inside_windows(windows: &[(u64, u64)], base: u64, size: u64) -> bool {
    let end = base.checked_add(size);
    windows.iter().any(|&(start, len)| base >= start && end.is_some_and(|end| start.checked_add(len).is_some_and(|w| end <= w)))
}

/// Drops a device taken out of the guest, except its BAR pages when a memory slot still
/// points at them (a slot KVM refused to delete): those must never be reused.
fn forget_if_stuck(d: Passed) {
    if d.placer.stuck.load(std::sync::atomic::Ordering::Relaxed) {
        std::mem::forget(d.placer);
    }
}

/// Gives a device's number and BAR ranges back.
fn release_placement(allocator: &mut PciAllocator, bdf: Bdf, bars: &[(Bar, u64)]) {
    for (bar, address) in bars {
        let freed = if bar.io { allocator.free_io_bar(*address, bar.size) } else { allocator.free_bar(bdf.bus(), *address, bar.size) };
        if let Err(e) = freed {
            log::warn!("{bdf}: {e}");
        }
    }
    if let Err(e) = allocator.free_device(bdf) {
        log::warn!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_is_placed_only_wholly_inside_a_window() {
        let windows = [(0xc000_0000, 0x2000_0000), (1 << 32, 1 << 34)];
        assert!(inside_windows(&windows, 0xc000_0000, 0x4000));
        assert!(inside_windows(&windows, 0xdfff_c000, 0x4000));
        assert!(!inside_windows(&windows, 0xdfff_e000, 0x4000), "runs past the window's end");
        assert!(!inside_windows(&windows, 0xfee0_0000, 0x1000), "the local APIC is not a BAR window");
        assert!(!inside_windows(&windows, 0x1000_0000, 0x4000), "nor is RAM");
        assert!(inside_windows(&windows, 1 << 33, 0x4000));
        assert!(!inside_windows(&windows, u64::MAX - 0xfff, 0x4000), "wraps");
    }
}
