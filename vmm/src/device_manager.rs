//! The VM's device manager: its PCI segment, the allocator that places functions on it, the
//! interrupt router its functions share, its ADIs (through the VDCM), which can be added and
//! removed while the guest runs, and its passed-through VFIO devices.
//!
//! It does not talk to the guest: telling it about functions added and asking it to eject
//! them is `crate::hotplug`'s, driven by [`crate::vm::VmHandle`].

use std::sync::{Arc, Mutex};

use devices::bus::write_lock;
use devices::iommu::vtd::VtdUnit;
use devices::pci::{Bdf, PciAllocator, PciRoot};
use devices::Bus;
use siovmm_interrupts::router::MsiRouter;
use siovmm_vdcm::ims_window::{IMS_WINDOW, IMS_WINDOW_SIZE};
use siovmm_vdcm::remote_ims::{RemoteImsSlots, RemoteImsWindow};
use siovmm_vdcm::{AdiOptions, AdiTable, GuestSide, ImsOptIn, ImsQuota, Vdcm};
use kvm_ioctls::VmFd;
use siovmm_vfio::host::{HostDevice, Iommu};
use siovmm_vfio::siov::{AdiId, ImsStorage};
use vm_memory::GuestMemoryMmap;

use crate::config::{ImsPolicy, SiovConfig};
use crate::kvm_irq::KvmIrq;
use crate::memory::SharedRam;
use crate::memslots::MemorySlots;
use crate::passthrough::{Attach, Passthrough};
use crate::Error;

/// What ADIs are composed into: the VM's memory, buses and interrupt plumbing.
pub(crate) struct GuestParts {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) iommu: Option<Arc<VtdUnit>>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) irq: Arc<KvmIrq>,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) slots: Arc<MemorySlots>,
    /// Guest RAM's memfd, when it was created shared (for vfio-user devices).
    pub(crate) shared_ram: Option<SharedRam>,
    /// How kernel VFIO devices reach the host IOMMU (`--vfio-iommu`).
    pub(crate) vfio_iommu: Iommu,
}

/// What a VM's devices hold now, as an operator (and the leak tests) count it.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// ADIs in the guest.
    pub adis: usize,
    /// IMS entries of the VM's SIOV device allocated to ADIs (MSI-X backing, hypercall and
    /// trapped-window slots).
    pub ims_entries: u32,
    /// IMS slots the guest took itself (hypercall or trapped window) on all its ADIs,
    /// in-process and the device daemon's alike: what counts against `--ims-per-vm`.
    pub guest_ims_slots: u32,
    /// Guest vectors on KVM MSI routes.
    pub msi_routes: usize,
    /// Guest vectors on the overflow path (no route left).
    pub overflow_vectors: usize,
    /// Functions passed through (kernel VFIO and vfio-user).
    pub passed_through: usize,
}

/// The VM's devices that come and go.
pub(crate) struct DeviceManager {
    guest: GuestParts,
    siov: SiovConfig,
    vcpus: u32,
    pci: Arc<PciRoot>,
    slots: PciAllocator,
    adis: AdiTable,
    /// Whether the guest has opted in to IMS (its hypercall endpoint sets it; its ADIs read it).
    ims_opt_in: ImsOptIn,
    /// The IMS entries the guest may take through its ADIs (the hypercall's QUERY reports it).
    ims_quota: ImsQuota,
    /// Created with the first function that has vectors, so a VM without any has no
    /// overflow thread.
    router: Option<Arc<MsiRouter>>,
    /// Created with the first ADI, so a VM without ADIs has no SIOV device threads.
    vdcm: Option<Vdcm>,
    /// Created with the first passed-through device.
    passthrough: Option<Passthrough>,
    /// Set when the VM is released: nothing is added after that.
    released: bool,
}

impl DeviceManager {
    pub(crate) fn new(guest: GuestParts, siov: SiovConfig, vcpus: u32, pci: Arc<PciRoot>, slots: PciAllocator) -> Self {
        let ims_quota = ImsQuota::new(siov.ims_per_adi, siov.ims_per_vm);
        Self {
            guest,
            siov,
            vcpus,
            pci,
            slots,
            adis: AdiTable::default(),
            ims_opt_in: ImsOptIn::default(),
            ims_quota,
            router: None,
            vdcm: None,
            passthrough: None,
            released: false,
        }
    }

    /// The VM's interrupt router, started on first use.
    fn router(&mut self) -> Result<Arc<MsiRouter>, Error> {
        if let Some(r) = &self.router {
            return Ok(r.clone());
        }
        let router = MsiRouter::new(self.guest.irq.clone(), self.siov.max_msi_routes)
            .map_err(|e| Error::Io("starting the MSI router".into(), e))?;
        Ok(self.router.insert(Arc::new(router)).clone())
    }

    /// The guest's IMS opt-in and quota, shared with its hypercall endpoint.
    pub(crate) fn guest_ims(&self) -> (ImsOptIn, ImsQuota) {
        (self.ims_opt_in.clone(), self.ims_quota.clone())
    }

    /// The table the hypercall endpoint reads; it follows every addition and removal.
    pub(crate) fn adi_table(&self) -> AdiTable {
        self.adis.clone()
    }

    /// The VDCM for this VM's first ADIs: the SIOV device opened, a router started.
    fn new_vdcm(&mut self) -> Result<Vdcm, Error> {
        // Every ADI holds a doorbell eventfd, and every programmed vector another.
        crate::vm::raise_fd_limit();
        let device = self.siov.device.open().map_err(|e| Error::Io("opening the SIOV device".into(), e))?;
        let router = self.router()?;
        let side = GuestSide {
            mem: self.guest.mem.clone(),
            iommu: self.guest.iommu.clone(),
            mmio: self.guest.mmio.clone(),
            doorbells: self.guest.irq.clone(),
            portals: Some(Arc::new(crate::memslots::PortalSlots(self.guest.slots.clone()))),
            router,
            pci: self.pci.clone(),
            adis: self.adis.clone(),
            ims_opt_in: self.ims_opt_in.clone(),
            ims_quota: self.ims_quota.clone(),
        };
        let options = AdiOptions { vectors: self.siov.vectors, ims_trap: self.siov.ims.traps_ims_window(), vcpus: self.vcpus };
        Ok(Vdcm::new(side, device, options)?)
    }

    /// Opens the VM's SIOV device and starts its VDCM, if not done yet (the first ADIs do it).
    pub(crate) fn prepare_adis(&mut self) -> Result<(), Error> {
        if self.released {
            return Err(Error::Released);
        }
        if self.vdcm.is_none() {
            self.vdcm = Some(self.new_vdcm()?);
        }
        Ok(())
    }

    /// Adds `count` ADIs of the VM's SIOV device (the lowest this VM does not hold); all or
    /// nothing. Returns where they are.
    pub(crate) fn add_adis(&mut self, count: u32) -> Result<Vec<Bdf>, Error> {
        self.prepare_adis()?;
        let device_adis = self.siov.device.adis();
        let Self { vdcm: Some(vdcm), slots, .. } = self else { return Err(Error::Released) };
        let held: std::collections::BTreeSet<u32> = vdcm.placement().iter().map(|(_, a)| a.0).collect();
        let adis: Vec<AdiId> = (0..device_adis).filter(|a| !held.contains(a)).take(count as usize).map(AdiId).collect();
        if adis.len() < count as usize {
            return Err(Error::NoFreeAdis { requested: count, free: adis.len() as u32 });
        }
        Ok(vdcm.add(&adis, slots)?)
    }

    /// Removes the ADI at `bdf` and gives back everything it held.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn remove_adi(&mut self, bdf: Bdf) -> Result<AdiId, Error> {
        if self.released {
            return Err(Error::Released);
        }
        let Self { vdcm: Some(vdcm), slots, .. } = self else {
            return Err(Error::Adis(siovmm_vdcm::Error::NoSuchFunction(bdf)));
        };
        Ok(vdcm.remove(bdf, slots)?)
    }

    /// The VM's ADIs: where each is and which host ADI it is.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn adis(&self) -> Vec<(Bdf, AdiId)> {
        self.vdcm.as_ref().map(Vdcm::placement).unwrap_or_default()
    }

    /// Every device that came from siovmm's options or was added since, in address order.
    pub(crate) fn devices(&self) -> Vec<(Bdf, siovmm_api::DeviceKind)> {
        use siovmm_api::DeviceKind;
        let mut all: Vec<(Bdf, DeviceKind)> = self.adis().into_iter().map(|(bdf, _)| (bdf, DeviceKind::Adi)).collect();
        if let Some(p) = &self.passthrough {
            all.extend(p.devices().into_iter().map(|(bdf, user)| (bdf, if user { DeviceKind::VfioUser } else { DeviceKind::Vfio })));
        }
        all.sort_unstable_by_key(|d| d.0);
        all
    }

    /// The kind of the device at `bdf`, if there is one.
    pub(crate) fn kind(&self, bdf: Bdf) -> Option<siovmm_api::DeviceKind> {
        self.devices().into_iter().find(|d| d.0 == bdf).map(|d| d.1)
    }

    /// Every function in `bdf`'s slot (its bus and device number), `bdf` included if present.
    pub(crate) fn slot_functions(&self, bdf: Bdf) -> Vec<Bdf> {
        self.devices().into_iter().map(|d| d.0).filter(|f| (f.bus(), f.device()) == (bdf.bus(), bdf.device())).collect()
    }

    /// Whether the guest is using the device at `bdf` (bus mastering, MSI or MSI-X on: see
    /// `AdiFunction::in_use`, `VfioPciFunction::in_use`); `None` when there is none.
    pub(crate) fn in_use(&self, bdf: Bdf) -> Option<bool> {
        if let Some(function) = self.vdcm.as_ref().and_then(|v| v.function(bdf)) {
            return Some(devices::bus::lock(function.as_ref()).in_use());
        }
        self.passthrough.as_ref()?.in_use(bdf)
    }

    /// Removes the device at `bdf`, whatever it is, and gives back everything it held.
    pub(crate) fn remove_device(&mut self, bdf: Bdf) -> Result<(), Error> {
        use siovmm_api::DeviceKind;
        match self.kind(bdf) {
            Some(DeviceKind::Adi) => self.remove_adi(bdf).map(drop),
            Some(DeviceKind::VfioUser | DeviceKind::Vfio) => self.remove_passed_through(bdf),
            None => Err(Error::NoDevice(bdf)),
        }
    }

    /// What the VM's devices hold now.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn usage(&self) -> Usage {
        let (msi_routes, overflow_vectors) = self.router.as_ref().map_or((0, 0), |r| r.counts());
        Usage {
            adis: self.vdcm.as_ref().map_or(0, Vdcm::len),
            ims_entries: self.vdcm.as_ref().map_or(0, Vdcm::ims_entries_in_use),
            guest_ims_slots: self.ims_quota.held(),
            msi_routes,
            overflow_vectors,
            passed_through: self.passthrough.as_ref().map_or(0, Passthrough::len),
        }
    }

    /// The VDCM, if the VM has had ADIs.
    pub(crate) fn vdcm_ref(&self) -> Option<&Vdcm> {
        self.vdcm.as_ref()
    }

    /// Passes the host device `host` through to the guest (checked already: `host::check`).
    /// Returns its guest address.
    pub(crate) fn add_vfio(&mut self, host: &HostDevice) -> Result<Bdf, Error> {
        self.with_passthrough(|p, attach| p.attach(host, attach))
    }

    /// Adds the vfio-user device served at `socket` (an ADI of the device daemon, or any
    /// vfio-user PCI device). Returns its guest address. (Every programmed vector holds an
    /// eventfd: the VM's build raised the fd limit for them.)
    pub(crate) fn add_vfio_user(&mut self, socket: &std::path::Path) -> Result<Bdf, Error> {
        let bdf = self.with_passthrough(|p, attach| p.attach_user(socket, attach))?;
        if let Err(e) = self.offer_remote_ims(socket, bdf) {
            // Nothing is left half-added: the device goes back to its server.
            if let Err(undo) = self.remove_passed_through(bdf) {
                log::warn!("{}: taking it out again: {undo}", socket.display());
            }
            return Err(e);
        }
        Ok(bdf)
    }

    /// Under `--ims pv` or `--ims trap`, a vfio-user device with an IMS mailbox (the device
    /// daemon's ADIs) gives the guest IMS slots the device keeps, which siovmm routes into this
    /// VM and counts against its quota (`siovmm_vdcm::remote_ims`): with pv, the function at
    /// `bdf` takes the guest's IMS hypercalls; with trap, siovmm serves the trapped IMS window
    /// in front of its BAR0 (`RemoteImsWindow`), as for in-process ADIs. The device's IMS must
    /// be kept where the VM's `--ims-storage` says: the guest learns that from one CPUID flag
    /// for the whole VM.
    fn offer_remote_ims(&mut self, socket: &std::path::Path, bdf: Bdf) -> Result<(), Error> {
        let policy = self.siov.ims;
        if policy == ImsPolicy::Off {
            return Ok(());
        }
        let Some(device) = self.passthrough.as_ref().and_then(|p| p.user_device(bdf)) else { return Ok(()) };
        if device.ims_mailbox().is_none() {
            return Ok(());
        }
        let router = self.router()?;
        let socket = socket.display().to_string();
        let (slots, offer) = RemoteImsSlots::new(device, bdf.0, router, self.ims_quota.clone())
            .map_err(|status| Error::ImsMailbox { socket: socket.clone(), status })?;
        let vm = self.siov.device.ims_storage();
        let device = if offer.in_queue { ImsStorage::InMemory } else { ImsStorage::OnDevice };
        if device != vm {
            return Err(Error::ImsStorageMismatch { socket, device: device.name(), vm: vm.name() });
        }
        if policy.traps_ims_window() {
            let window = RemoteImsWindow::new(format!("{socket} at {bdf}"), slots, self.ims_opt_in.clone(), self.vcpus);
            let Some(p) = self.passthrough.as_ref() else { return Ok(()) };
            p.overlay(bdf, 0, IMS_WINDOW, IMS_WINDOW_SIZE, Box::new(window))?;
        } else {
            write_lock(&self.adis).insert(bdf.0, Arc::new(Mutex::new(slots)));
        }
        Ok(())
    }

    /// Whether the host device named `name` is passed through already.
    pub(crate) fn has_vfio(&self, name: &str) -> bool {
        self.passthrough.as_ref().is_some_and(|p| p.has_host(name))
    }

    /// Takes the passed-through device at `bdf` out of the running guest: a vfio-user
    /// device's server gets it back, a kernel VFIO device is reset and its group leaves the
    /// VM's container (another VM can take it).
    pub(crate) fn remove_passed_through(&mut self, bdf: Bdf) -> Result<(), Error> {
        if self.released {
            return Err(Error::Released);
        }
        // Its IMS slots' routes go first (the device frees the slots when it is reset).
        write_lock(&self.adis).remove(&bdf.0);
        let Self { pci, slots, passthrough: Some(p), .. } = self else { return Ok(()) };
        Ok(p.detach(bdf, pci, slots)?)
    }

    /// Whether a vfio-user device served at `socket` is in the VM already.
    pub(crate) fn has_vfio_user(&self, socket: &std::path::Path) -> bool {
        self.passthrough.as_ref().is_some_and(|p| p.has_socket(socket))
    }

    /// Runs `add` with the VM's passthrough (made on first use) and the guest side to attach to.
    fn with_passthrough(
        &mut self,
        add: impl FnOnce(&mut Passthrough, Attach<'_>) -> Result<Bdf, crate::passthrough::Error>,
    ) -> Result<Bdf, Error> {
        if self.released {
            return Err(Error::Released);
        }
        let router = self.router()?;
        let Self { pci, slots, guest, .. } = self;
        let passthrough = self
            .passthrough
            .get_or_insert_with(|| Passthrough::new(guest.vm.clone(), guest.mem.clone(), guest.shared_ram.clone(), guest.vfio_iommu));
        let attach = Attach { pci, allocator: slots, router, mmio: &guest.mmio, pio: &guest.pio, slots: &guest.slots, ioevents: guest.irq.clone() };
        Ok(add(passthrough, attach)?)
    }

    /// One line per passed-through device on what reached siovmm.
    pub(crate) fn vfio_summary(&self) -> Vec<String> {
        self.passthrough.as_ref().map(Passthrough::summary).unwrap_or_default()
    }

    /// The VM's memory slots above RAM.
    #[cfg(test)]
    pub(crate) fn memory_slots(&self) -> Arc<MemorySlots> {
        self.guest.slots.clone()
    }

    /// Closes every ADI and gives back every passed-through device (the VM is going); later
    /// calls fail with [`Error::Released`].
    pub(crate) fn release(&mut self) {
        self.released = true;
        self.vdcm = None;
        write_lock(&self.adis).clear();
        if let Some(mut p) = self.passthrough.take() {
            p.release(&self.pci, &mut self.slots);
        }
    }
}
