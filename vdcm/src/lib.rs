//! The VDCM (Virtual Device Composition Module): composes ADIs of a host SIOV device into a
//! guest as PCI functions, and takes them out again, while the guest runs. Free of KVM:
//! interrupts go through `siovmm_interrupts` (a router and an ioeventfd trait the VMM
//! implements with KVM), so everything here is unit-tested with fakes.
//!
//! Adding an ADI: open it for this guest on the guest's DMA binding (one for the guest's RAM,
//! or one per function behind a vIOMMU, as each function has its own source ID), allocate one
//! IMS entry per MSI-X vector, build the [`adi::AdiFunction`], place it where the guest's
//! `PciAllocator` says (up to 8 ADIs added together share a device number, as functions), give
//! BAR0 an address in its root bus's 32-bit window as firmware would, and map it: BAR0 on the
//! MMIO bus plus an ioeventfd on its doorbell, or, when the device offers a portal page, that
//! page mapped over the doorbell's (no exit per ring). Removing one undoes each step in reverse:
//! config space first (the guest reads all-ones from then on), BAR and doorbell, KVM routes,
//! the ADI (the device frees its IMS entries), its DMA binding, its BAR and device number.
//! Telling the guest (hotplug) is the VMM's business, not the VDCM's.

pub mod adi;
#[cfg(test)]
mod fakes;
pub mod fd_limit;
pub mod hypercall;
pub mod ims_quota;
pub mod ims_window;
pub mod iommu_dma;
pub mod remote_ims;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock, Weak};

use devices::bus::{lock, write_lock};
use devices::faults::GuestFaults;
use devices::iommu::vtd::VtdUnit;
use devices::pci::{Bdf, PciAllocator, PciRoot};
use devices::Bus;
use siovmm_vfio::dma::GuestRam;
use siovmm_vfio::siov::{self, AdiId, DmaHandle, Portal, PortalPage, SiovDevice};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use adi::{AdiFunction, AdiParts, BarMapper, BAR0_SIZE, DOORBELL};
pub use ims_quota::ImsQuota;
use siovmm_interrupts::{IoEvents, MsiRouter};

/// Most ADIs one guest gets: every function of every root bus (`arch::pci`).
pub const MAX_ADIS_PER_GUEST: u32 = arch::pci::PciTopology::max_functions();

/// Functions sharing one device number.
const FUNCTIONS_PER_DEVICE: usize = 8;

/// Errors composing ADIs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host device refused.
    #[error("SIOV device: {0}")]
    Device(#[from] siov::Error),
    /// Too many ADIs for one guest.
    #[error("{0} ADIs requested; a guest takes at most {MAX_ADIS_PER_GUEST}")]
    TooMany(u32),
    /// No device number or BAR space left on the guest's PCI topology.
    #[error("placing ADI {0}: {1}")]
    Placement(u32, devices::pci::AllocError),
    /// No ADI of this guest at that address.
    #[error("no ADI at {0}")]
    NoSuchFunction(Bdf),
    /// The ADI is already in this guest.
    #[error("ADI {0} is already in this guest")]
    AlreadyPresent(u32),
}

/// What the IMS hypercall asks of one function of the guest (docs/hypercall.md): an ADI of
/// the in-process device ([`AdiFunction`]), or a vfio-user ADI whose device has an IMS
/// mailbox ([`remote_ims::RemoteImsSlots`]). The caller has validated the arguments' ranges
/// and that the message names a vCPU of this VM.
pub trait PvIms: Send {
    /// IMS_ALLOC: `count` more slots, each backed by a host IMS entry; returns the first.
    fn pv_alloc(&mut self, count: u32) -> Result<u32, siovmm_hypercall::Status>;
    /// IMS_FREE of the group starting at `first`.
    fn pv_free(&mut self, first: u32) -> Result<(), siovmm_hypercall::Status>;
    /// IMS_COMPOSE: delivery of the guest's `message` set up for the slot; returns the host
    /// message the slot's entry writes (`message_result` form).
    fn pv_compose(&mut self, slot: u32, message: siovmm_interrupts::MsiMessage) -> Result<u64, siovmm_hypercall::Status>;
    /// IMS_MASK; unmasking delivers a pending interrupt once.
    fn pv_mask(&mut self, slot: u32, masked: bool) -> Result<(), siovmm_hypercall::Status>;
}

/// The guest's functions that take IMS hypercalls, by requester ID (bus << 8 | devfn), shared
/// with the hypercall endpoint so that added and removed ones are seen at once.
pub type AdiTable = Arc<RwLock<HashMap<u16, Arc<Mutex<dyn PvIms>>>>>;

/// Maps portal pages into the guest's physical address space (the VMM does it with KVM memory
/// slots), so that a guest's doorbell store lands in the device's page without an exit.
pub trait PortalMaps: Send + Sync {
    /// Maps `page` at guest-physical `gpa` (page-aligned) until the returned guard drops.
    fn map(&self, gpa: u64, page: &PortalPage) -> std::io::Result<Box<dyn Send>>;
}

/// A composed function, its portal, and the page mapping while its BAR is placed.
struct Mapped {
    function: Arc<Mutex<AdiFunction>>,
    portal: Portal,
    page: Option<Box<dyn Send>>,
    /// Placements that failed (a guest may place its BAR anywhere, as often as it likes):
    /// counted, the first few logged.
    faults: GuestFaults,
}

/// Moves BAR0 windows on the MMIO bus and, with them, their doorbell ioeventfds or portal pages.
struct GuestBars {
    doorbells: Arc<dyn IoEvents>,
    portals: Option<Arc<dyn PortalMaps>>,
    mmio: Arc<Bus>,
    functions: Mutex<HashMap<Bdf, Mapped>>,
    /// Portal pages mapped so far (each placement of a BAR0 whose ADI has one).
    page_maps: std::sync::atomic::AtomicU64,
}

impl BarMapper for GuestBars {
    fn remap(&self, bdf: Bdf, old: Option<u64>, new: Option<u64>) -> bool {
        let mut functions = lock(&self.functions);
        let Some(m) = functions.get_mut(&bdf) else { return false };
        let doorbell = m.portal.doorbell();
        if let Some(base) = old {
            self.mmio.remove(base);
            // The page's guard unmaps it; without one the doorbell was an ioeventfd.
            if m.page.take().is_none() {
                if let Err(e) = self.doorbells.ioeventfd(doorbell, base + DOORBELL, false) {
                    m.faults.report(&format!("removing the doorbell ioeventfd at {:#x}", base + DOORBELL), e);
                }
            }
        }
        let Some(base) = new else { return false };
        // A guest placing the BAR over another device gets no mapping: the insert fails.
        if self.mmio.insert(m.function.clone(), base, BAR0_SIZE).is_err() {
            return false;
        }
        if let (Some(page), Some(maps)) = (m.portal.page(), &self.portals) {
            match maps.map(base + DOORBELL, page) {
                Ok(guard) => {
                    m.page = Some(guard);
                    self.page_maps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return true;
                }
                Err(e) => m.faults.report(&format!("mapping the portal page at {:#x} (an ioeventfd instead)", base + DOORBELL), e),
            }
        }
        // Without it, doorbell writes still arrive, as exits (counted as slow doorbells).
        if let Err(e) = self.doorbells.ioeventfd(doorbell, base + DOORBELL, true) {
            m.faults.report(&format!("doorbell ioeventfd at {:#x} (doorbells exit to siovmm)", base + DOORBELL), e);
        }
        true
    }
}

/// The guest side ADIs are composed into.
pub struct GuestSide {
    /// Guest memory (DMA without a vIOMMU).
    pub mem: GuestMemoryMmap,
    /// The guest's vIOMMU, through which ADI DMA is translated, if it has one.
    pub iommu: Option<Arc<VtdUnit>>,
    /// The MMIO bus BARs are mapped on.
    pub mmio: Arc<Bus>,
    /// Where doorbell ioeventfds are registered.
    pub doorbells: Arc<dyn IoEvents>,
    /// Where portal pages are mapped, for a device that offers them (`None`: doorbells are
    /// ioeventfds whatever the device offers).
    pub portals: Option<Arc<dyn PortalMaps>>,
    /// Delivers the ADIs' vectors.
    pub router: Arc<MsiRouter>,
    /// The PCI segment the functions appear on.
    pub pci: Arc<PciRoot>,
    /// The table the guest's hypercall endpoint looks ADIs up in.
    pub adis: AdiTable,
    /// Whether the guest has opted in to IMS (shared with its hypercall endpoint).
    pub ims_opt_in: ImsOptIn,
    /// The IMS entries the guest may take through its ADIs (shared with its hypercall
    /// endpoint, whose QUERY reports it).
    pub ims_quota: ImsQuota,
}

/// Whether a VM's guest has opted in to IMS through the hypercall (IMS_OPT_IN). Every guest
/// is told "no IMS" by the platform; only one that knows siovmm's interface overrides that,
/// and until it has, the trapped window is inert and IMS calls are refused, whatever the
/// policy offers (docs/ims-policy.md).
#[derive(Debug, Clone, Default)]
pub struct ImsOptIn(Arc<std::sync::atomic::AtomicBool>);

impl ImsOptIn {
    /// Whether the guest has opted in.
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records the guest's opt-in (for the VM's lifetime).
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Forgets the opt-in: for fuzz targets that reuse one VM's state for many guests
    /// (feature `test-util`); a VM never does.
    #[cfg(feature = "test-util")]
    pub fn clear(&self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl std::fmt::Debug for GuestSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSide").field("iommu", &self.iommu.is_some()).finish_non_exhaustive()
    }
}

/// How every ADI of one guest is composed.
#[derive(Clone, Copy, Debug)]
pub struct AdiOptions {
    /// MSI-X vectors per ADI.
    pub vectors: u16,
    /// Whether the guest may program IMS through each ADI's trapped window.
    pub ims_trap: bool,
    /// vCPUs of the VM.
    pub vcpus: u32,
}

/// What a guest asks for at start-up: `count` ADIs from `first_adi`.
#[derive(Clone, Copy, Debug)]
pub struct AdiRequest {
    /// First ADI of the host device to use.
    pub first_adi: u32,
    /// How many.
    pub count: u32,
    /// How each is composed.
    pub options: AdiOptions,
}

/// One ADI in the guest.
struct Placed {
    adi: AdiId,
    function: Arc<Mutex<AdiFunction>>,
    /// BAR0's firmware-assigned address, reserved in the allocator until removal.
    bar0: u64,
    /// The function's own DMA binding (behind a vIOMMU).
    dma: Option<DmaHandle>,
}

/// The ADIs of one guest.
pub struct Vdcm {
    device: Arc<dyn SiovDevice>,
    guest: GuestSide,
    options: AdiOptions,
    /// Moves BARs. The functions refer to it weakly.
    bars: Arc<GuestBars>,
    placed: BTreeMap<Bdf, Placed>,
    /// The binding of the guest's RAM all ADIs share when there is no vIOMMU.
    shared_dma: Option<DmaHandle>,
}

impl std::fmt::Debug for Vdcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vdcm").field("adis", &self.placed.len()).finish_non_exhaustive()
    }
}

/// Where the DMA of the function at `bdf` goes: the vIOMMU's view for its source ID, or
/// guest RAM.
pub fn dma_space(
    mem: &GuestMemoryMmap,
    iommu: Option<&Arc<VtdUnit>>,
    bdf: Bdf,
) -> Arc<dyn siovmm_vfio::dma::DmaSpace> {
    match iommu {
        Some(unit) => Arc::new(iommu_dma::VtdDma { unit: unit.clone(), sid: bdf.0, ram: GuestRam(mem.clone()) }),
        None => Arc::new(GuestRam(mem.clone())),
    }
}

impl Vdcm {
    /// A VDCM for `guest` with no ADIs yet.
    pub fn new(guest: GuestSide, device: Arc<dyn SiovDevice>, options: AdiOptions) -> Result<Self, Error> {
        // Without a vIOMMU every ADI of the guest DMAs into the same space: one binding.
        let shared_dma = match guest.iommu {
            None => Some(device.dma_bind(dma_space(&guest.mem, None, Bdf::new(0, 0, 0)))?),
            Some(_) => None,
        };
        let bars = Arc::new(GuestBars {
            doorbells: guest.doorbells.clone(),
            portals: guest.portals.clone(),
            mmio: guest.mmio.clone(),
            functions: Mutex::new(HashMap::new()),
            page_maps: Default::default(),
        });
        Ok(Self {
            device,
            guest,
            options,
            bars,
            placed: BTreeMap::new(),
            shared_dma,
        })
    }

    /// Composes `req.count` ADIs of `device` into `guest`, placed by `slots`.
    pub fn compose(
        guest: GuestSide,
        slots: &mut PciAllocator,
        device: Arc<dyn SiovDevice>,
        req: AdiRequest,
    ) -> Result<Self, Error> {
        if req.count > MAX_ADIS_PER_GUEST {
            return Err(Error::TooMany(req.count));
        }
        let mut vdcm = Self::new(guest, device, req.options)?;
        let adis: Vec<AdiId> = (0..req.count).map(|i| AdiId(req.first_adi + i)).collect();
        vdcm.add(&adis, slots)?;
        Ok(vdcm)
    }

    /// Adds `adis` to the guest, up to 8 per device number; all or nothing. Returns where
    /// each landed.
    pub fn add(&mut self, adis: &[AdiId], slots: &mut PciAllocator) -> Result<Vec<Bdf>, Error> {
        let total = self.placed.len() as u64 + adis.len() as u64;
        if total > u64::from(MAX_ADIS_PER_GUEST) {
            return Err(Error::TooMany(total.min(u64::from(u32::MAX)) as u32));
        }
        let mut added = Vec::with_capacity(adis.len());
        for chunk in adis.chunks(FUNCTIONS_PER_DEVICE) {
            let result = slots.allocate_device().map_err(|e| Error::Placement(chunk[0].0, e)).and_then(|slot| {
                for (i, &adi) in chunk.iter().enumerate() {
                    let bdf = Bdf::new(slot.bus(), slot.device(), i as u8);
                    let multifunction = i == 0 && chunk.len() > 1;
                    if let Err(e) = self.add_one(adi, bdf, multifunction, slots) {
                        if i == 0 {
                            Self::free_device_number(slots, slot);
                        }
                        return Err(e);
                    }
                    added.push(bdf);
                }
                Ok(())
            });
            if let Err(e) = result {
                // Undo this call's additions, newest first.
                for bdf in added.iter().rev() {
                    if let Err(undo) = self.remove(*bdf, slots) {
                        log::warn!("undoing the addition of {bdf}: {undo}");
                    }
                }
                return Err(e);
            }
        }
        Ok(added)
    }

    fn free_device_number(slots: &mut PciAllocator, slot: Bdf) {
        if let Err(e) = slots.free_device(slot) {
            log::warn!("freeing device number {slot}: {e}");
        }
    }

    /// One ADI at `bdf`; on failure everything this call took is given back.
    fn add_one(&mut self, adi: AdiId, bdf: Bdf, multifunction: bool, slots: &mut PciAllocator) -> Result<(), Error> {
        if self.placed.values().any(|p| p.adi == adi) {
            return Err(Error::AlreadyPresent(adi.0));
        }
        let (dma, own_dma) = match self.shared_dma {
            Some(h) => (h, None),
            None => {
                let h = self.device.dma_bind(dma_space(&self.guest.mem, self.guest.iommu.as_ref(), bdf))?;
                (h, Some(h))
            }
        };
        let undo_dma = |device: &Arc<dyn SiovDevice>| {
            if let Some(h) = own_dma {
                if let Err(e) = device.dma_unbind(h) {
                    log::warn!("unbinding DMA handle {}: {e}", h.0);
                }
            }
        };
        let portal = match self.device.open_adi(adi, dma) {
            Ok(p) => p,
            Err(e) => {
                undo_dma(&self.device);
                return Err(e.into());
            }
        };
        let composed = self.compose_function(adi, bdf, multifunction, portal.doorbell().clone(), slots);
        let (function, bar0) = match composed {
            Ok(f) => f,
            Err(e) => {
                // Closing frees the IMS entries the ADI was given.
                if let Err(close) = self.device.close_adi(adi) {
                    log::warn!("closing ADI {}: {close}", adi.0);
                }
                undo_dma(&self.device);
                return Err(e);
            }
        };
        lock(&self.bars.functions).insert(bdf, Mapped { function: function.clone(), portal, page: None, faults: GuestFaults::new(format!("{bdf}'s BAR0")) });
        self.guest.pci.add(bdf, function.clone());
        write_lock(&self.guest.adis).insert(bdf.0, function.clone() as Arc<Mutex<dyn PvIms>>);
        lock(&function).update_bar_mapping();
        self.placed.insert(bdf, Placed { adi, function, bar0, dma: own_dma });
        Ok(())
    }

    /// IMS entries, BAR0 and the function model of an opened ADI.
    fn compose_function(
        &self,
        adi: AdiId,
        bdf: Bdf,
        multifunction: bool,
        doorbell: Arc<EventFd>,
        slots: &mut PciAllocator,
    ) -> Result<(Arc<Mutex<AdiFunction>>, u64), Error> {
        let ims = self.device.ims_alloc(adi, u32::from(self.options.vectors))?;
        let bar0 = slots.allocate_bar(bdf.bus(), BAR0_SIZE).map_err(|e| Error::Placement(adi.0, e))?;
        let function = AdiFunction::new(AdiParts {
            adi,
            bdf,
            multifunction,
            ims,
            device: self.device.clone(),
            doorbell,
            router: self.guest.router.clone(),
            mapper: Arc::downgrade(&self.bars) as Weak<dyn BarMapper>,
            bar0,
            ims_trap: self.options.ims_trap,
            ims_opt_in: self.guest.ims_opt_in.clone(),
            ims_quota: self.guest.ims_quota.clone(),
            vcpus: self.options.vcpus,
        });
        match function {
            Ok(f) => Ok((Arc::new(Mutex::new(f)), bar0)),
            Err(e) => {
                if let Err(free) = slots.free_bar(bdf.bus(), bar0, BAR0_SIZE) {
                    log::warn!("freeing BAR0 {bar0:#x} of {bdf}: {free}");
                }
                Err(e.into())
            }
        }
    }

    /// Takes the ADI at `bdf` out of the guest and gives back everything it held. Returns
    /// the ADI, which another guest may now open.
    pub fn remove(&mut self, bdf: Bdf, slots: &mut PciAllocator) -> Result<AdiId, Error> {
        let placed = self.placed.remove(&bdf).ok_or(Error::NoSuchFunction(bdf))?;
        // The guest stops seeing it: config space, hypercalls, BAR and doorbell.
        self.guest.pci.remove(bdf);
        write_lock(&self.guest.adis).remove(&bdf.0);
        lock(&placed.function).unmap_bar();
        lock(&self.bars.functions).remove(&bdf);
        // Then its interrupts, the ADI itself (the device frees its IMS entries) and its DMA.
        if let Err(e) = self.guest.router.unbind_function(siovmm_interrupts::FunctionId::Adi(placed.adi.0)) {
            log::warn!("{bdf}: removing the routes of ADI {}: {e}", placed.adi.0);
        }
        if let Err(e) = self.device.close_adi(placed.adi) {
            log::warn!("{bdf}: closing ADI {}: {e}", placed.adi.0);
        }
        if let Some(h) = placed.dma {
            if let Err(e) = self.device.dma_unbind(h) {
                log::warn!("{bdf}: unbinding DMA handle {}: {e}", h.0);
            }
        }
        if let Err(e) = slots.free_bar(bdf.bus(), placed.bar0, BAR0_SIZE) {
            log::warn!("{bdf}: freeing BAR0 {:#x}: {e}", placed.bar0);
        }
        let slot = Bdf::new(bdf.bus(), bdf.device(), 0);
        if !self.placed.keys().any(|b| b.bus() == bdf.bus() && b.device() == bdf.device()) {
            Self::free_device_number(slots, slot);
        }
        Ok(placed.adi)
    }

    /// The composed functions, by address.
    pub fn functions(&self) -> Vec<Arc<Mutex<AdiFunction>>> {
        self.placed.values().map(|p| p.function.clone()).collect()
    }

    /// The function at `bdf`, if it is one of the guest's ADIs.
    pub fn function(&self, bdf: Bdf) -> Option<Arc<Mutex<AdiFunction>>> {
        self.placed.get(&bdf).map(|p| p.function.clone())
    }

    /// Where the guest's ADIs are, with the host ADI each is.
    pub fn placement(&self) -> Vec<(Bdf, AdiId)> {
        self.placed.iter().map(|(bdf, p)| (*bdf, p.adi)).collect()
    }

    /// ADIs in the guest.
    pub fn len(&self) -> usize {
        self.placed.len()
    }

    /// True when the guest has no ADIs.
    pub fn is_empty(&self) -> bool {
        self.placed.is_empty()
    }

    /// IMS entries of the SIOV device allocated to ADIs now.
    pub fn ims_entries_in_use(&self) -> u32 {
        self.device.info().ims_entries.saturating_sub(self.device.ims_free_entries())
    }

    /// The functions by requester ID, kept current, for the hypercall endpoint.
    pub fn table(&self) -> AdiTable {
        self.guest.adis.clone()
    }

    /// How guest vectors are delivered, for the start-up trace.
    pub fn delivery_summary(&self) -> String {
        let router = &self.guest.router;
        let (routed, overflow) = router.counts();
        let functions = self.functions();
        let slow: u64 = functions.iter().map(|f| lock(f).slow_doorbells()).sum();
        let failures: u64 = functions.iter().map(|f| lock(f).failures()).sum();
        let stats = router.stats();
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "{} ADIs; {routed} vectors on KVM routes, {overflow} on the overflow path ({} injections); \
             {} route commits ({} entries, {} refused); \
             {slow} doorbell writes exited to siovmm; {} portal pages mapped; {failures} guest-triggered operations failed",
            functions.len(),
            count(&stats.overflow_injections),
            count(&stats.commits),
            count(&stats.entries_committed),
            count(&stats.commit_failures),
            self.bars.page_maps.load(std::sync::atomic::Ordering::Relaxed)
        )
    }
}

impl Drop for Vdcm {
    fn drop(&mut self) {
        // Close the ADIs so another guest can take them (the device frees their IMS entries),
        // then drop the DMA bindings nothing uses any more. The VM is going: its buses and
        // routes go with it.
        for p in self.placed.values() {
            if let Err(e) = self.device.close_adi(p.adi) {
                log::warn!("closing ADI {}: {e}", p.adi.0);
            }
        }
        for h in self.placed.values().filter_map(|p| p.dma).chain(self.shared_dma) {
            if let Err(e) = self.device.dma_unbind(h) {
                log::warn!("unbinding DMA handle {}: {e}", h.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Composition on a shared software device with fakes for KVM: no /dev/kvm.
    use super::*;
    use siovmm_vfio::siov::ImsStorage;
    use siovmm_vfio::soft::SoftSiovDevice;
    use siovmm_hypercall::Status;

    /// KVM's ioeventfds, which these tests do not look at.
    struct NoIoEvents;
    impl IoEvents for NoIoEvents {
        fn ioeventfd(&self, _: &EventFd, _: u64, _: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Guest {
        vdcm: Vdcm,
        pci: Arc<PciRoot>,
        mmio: Arc<Bus>,
        router: Arc<MsiRouter>,
        slots: PciAllocator,
    }

    fn guest(device: &Arc<SoftSiovDevice>, mem: &GuestMemoryMmap, buses: u32) -> Guest {
        guest_with(device, mem, buses, Arc::new(NoIoEvents), None, ImsQuota::default())
    }

    fn guest_with(
        device: &Arc<SoftSiovDevice>,
        mem: &GuestMemoryMmap,
        buses: u32,
        doorbells: Arc<dyn IoEvents>,
        portals: Option<Arc<dyn PortalMaps>>,
        ims_quota: ImsQuota,
    ) -> Guest {
        let mmio = Arc::new(Bus::new());
        let router = Arc::new(MsiRouter::new(Arc::new(crate::fakes::FakeRoutes::default()), 64).unwrap());
        let pci = Arc::new(PciRoot::new());
        let side = GuestSide {
            mem: mem.clone(),
            iommu: None,
            mmio: mmio.clone(),
            doorbells,
            portals,
            router: router.clone(),
            pci: pci.clone(),
            adis: AdiTable::default(),
            ims_opt_in: ImsOptIn::default(),
            ims_quota,
        };
        let options = AdiOptions { vectors: 2, ims_trap: false, vcpus: 1 };
        let vdcm = Vdcm::new(side, device.clone(), options).unwrap();
        let slots = PciAllocator::new(arch::pci::PciTopology::for_functions(buses * 248).unwrap());
        Guest { vdcm, pci, mmio, router, slots }
    }

    fn compose(device: &Arc<SoftSiovDevice>, mem: &GuestMemoryMmap, count: u32) -> Result<Guest, Error> {
        let mut g = guest(device, mem, 1);
        let adis: Vec<AdiId> = (0..count).map(AdiId).collect();
        g.vdcm.add(&adis, &mut g.slots)?;
        Ok(g)
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Doorbell ioeventfds and portal pages as a list of live (kind, address) pairs.
    #[derive(Default)]
    struct Doorbells(Arc<Mutex<Vec<(&'static str, u64)>>>);
    impl IoEvents for Doorbells {
        fn ioeventfd(&self, _: &EventFd, addr: u64, add: bool) -> std::io::Result<()> {
            let mut live = lock(&self.0);
            if add {
                live.push(("ioeventfd", addr));
            } else {
                live.retain(|&l| l != ("ioeventfd", addr));
            }
            Ok(())
        }
    }
    struct PageGuard(Arc<Mutex<Vec<(&'static str, u64)>>>, u64);
    impl Drop for PageGuard {
        fn drop(&mut self) {
            let gpa = self.1;
            lock(&self.0).retain(|&l| l != ("page", gpa));
        }
    }
    impl PortalMaps for Doorbells {
        fn map(&self, gpa: u64, page: &PortalPage) -> std::io::Result<Box<dyn Send>> {
            assert_eq!(page.offset % 4096, 0);
            lock(&self.0).push(("page", gpa));
            Ok(Box::new(PageGuard(self.0.clone(), gpa)))
        }
    }

    #[test]
    fn a_mapped_portal_follows_bar0_instead_of_an_ioeventfd() {
        use devices::pci::PciFunction;
        use siovmm_vfio::siov::PortalKind;
        let device = Arc::new(SoftSiovDevice::with_portals(2, 16, ImsStorage::OnDevice, 1, PortalKind::Mapped).unwrap());
        let live = Arc::new(Mutex::new(Vec::new()));
        let (events, maps) = (Arc::new(Doorbells(live.clone())), Arc::new(Doorbells(live.clone())));
        let mut g = guest_with(&device, &memory(), 1, events, Some(maps), ImsQuota::default());
        let bdf = g.vdcm.add(&[AdiId(0)], &mut g.slots).unwrap()[0];
        let bar0 = g.vdcm.placed[&bdf].bar0;
        assert_eq!(*lock(&live), [("page", bar0 + DOORBELL)], "the page over the doorbell, no ioeventfd");
        // The guest moves BAR0: the page moves with it.
        let f = g.vdcm.functions()[0].clone();
        let moved = bar0 + 0x10_0000;
        lock(&f).config_write(4, 0, &(moved as u32).to_le_bytes());
        assert_eq!(*lock(&live), [("page", moved + DOORBELL)]);
        assert!(g.vdcm.delivery_summary().contains("; 2 portal pages mapped"), "{}", g.vdcm.delivery_summary());
        g.vdcm.remove(bdf, &mut g.slots).unwrap();
        assert!(lock(&live).is_empty(), "unmapped with the ADI");
        // Without a mapper, the same device's doorbell is an ioeventfd.
        let live = Arc::new(Mutex::new(Vec::new()));
        let mut g = guest_with(&device, &memory(), 1, Arc::new(Doorbells(live.clone())), None, ImsQuota::default());
        let bdf = g.vdcm.add(&[AdiId(1)], &mut g.slots).unwrap()[0];
        let bar0 = g.vdcm.placed[&bdf].bar0;
        assert_eq!(*lock(&live), [("ioeventfd", bar0 + DOORBELL)]);
    }

    #[test]
    fn a_bar0_moved_onto_another_device_maps_nothing_and_its_next_move_removes_only_its_own() {
        use devices::pci::PciFunction;
        let device = Arc::new(SoftSiovDevice::new(2, 16, ImsStorage::OnDevice, 1).unwrap());
        let live = Arc::new(Mutex::new(Vec::new()));
        let mut g = guest_with(&device, &memory(), 1, Arc::new(Doorbells(live.clone())), None, ImsQuota::default());
        let bdfs = g.vdcm.add(&[AdiId(0), AdiId(1)], &mut g.slots).unwrap();
        let (bar_a, bar_b) = (g.vdcm.placed[&bdfs[0]].bar0, g.vdcm.placed[&bdfs[1]].bar0);
        let a = g.vdcm.placed[&bdfs[0]].function.clone();
        // ADI A's BAR0 placed over B's: the bus refuses it, so A is simply not mapped.
        lock(&a).config_write(4, 0, &(bar_b as u32).to_le_bytes());
        assert_eq!(g.mmio.len(), 1, "B alone is on the bus");
        assert_eq!(*lock(&live), [("ioeventfd", bar_b + DOORBELL)], "only B's doorbell");
        // A moves on: B, which A never owned, stays; A maps at its new place.
        let free = bar_a + 0x10_0000;
        lock(&a).config_write(4, 0, &(free as u32).to_le_bytes());
        assert_eq!(g.mmio.len(), 2);
        let mut id = [0u8; 4];
        assert!(g.mmio.read(bar_b + DOORBELL, &mut id), "B's BAR0 still answers");
        assert_eq!(*lock(&live), [("ioeventfd", bar_b + DOORBELL), ("ioeventfd", free + DOORBELL)]);
        // A taken off the bus (memory decoding off) and removed leaves B as it was.
        g.vdcm.remove(bdfs[0], &mut g.slots).unwrap();
        assert_eq!((g.mmio.len(), lock(&live).clone()), (1, vec![("ioeventfd", bar_b + DOORBELL)]));
    }

    #[test]
    fn one_guest_cannot_take_the_ims_entries_another_guest_needs() {
        // 64 entries: each guest's 2 ADIs hold 2 × 2 for MSI-X.
        let device = Arc::new(SoftSiovDevice::new(4, 64, ImsStorage::OnDevice, 1).unwrap());
        let mem = memory();
        let quota = ImsQuota::new(16, 24);
        let mut a = guest_with(&device, &mem, 1, Arc::new(NoIoEvents), None, quota.clone());
        let a_bdfs = a.vdcm.add(&[AdiId(0), AdiId(1)], &mut a.slots).unwrap();
        let mut b = guest(&device, &mem, 1);
        b.vdcm.add(&[AdiId(2), AdiId(3)], &mut b.slots).unwrap();
        let fa: Vec<_> = a_bdfs.iter().map(|bdf| a.vdcm.placed[bdf].function.clone()).collect();
        // Per ADI: 16, then no more for that ADI.
        assert_eq!(lock(&fa[0]).pv_alloc(16), Ok(0));
        assert_eq!(lock(&fa[0]).pv_alloc(1), Err(Status::Exhausted));
        // Per VM: 24 across both ADIs.
        assert_eq!(lock(&fa[1]).pv_alloc(8), Ok(0));
        assert_eq!(lock(&fa[1]).pv_alloc(1), Err(Status::Exhausted));
        assert_eq!(quota.held(), 24);
        // The other guest still gets what the device has left: 64 - 8 (MSI-X) - 24.
        let fb = b.vdcm.functions()[0].clone();
        assert_eq!(lock(&fb).pv_alloc(32), Ok(0));
        assert_eq!(device.ims_free_entries(), 0);
        // Freed and removed entries are the VM's again.
        lock(&fa[1]).pv_free(0).unwrap();
        assert_eq!(quota.held(), 16);
        drop(fa);
        a.vdcm.remove(a_bdfs[0], &mut a.slots).unwrap();
        assert_eq!(quota.held(), 0);
    }

    #[test]
    fn a_released_guests_adis_and_ims_entries_go_back_to_the_device() {
        // Exactly enough IMS entries for one guest's 8 ADIs × 2 vectors.
        let device = Arc::new(SoftSiovDevice::new(8, 16, ImsStorage::OnDevice, 1).unwrap());
        let mem = memory();
        for round in 0..3 {
            let g = compose(&device, &mem, 8).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(g.vdcm.functions().len(), 8);
            assert_eq!(device.ims_free_entries(), 0);
            assert_eq!(device.dma_bindings(), 1, "one binding for the guest's RAM");
            assert!(matches!(compose(&device, &mem, 1), Err(Error::Device(_))), "the device is full while the guest lives");
            // The guest goes: its VDCM, PCI segment and buses.
            drop(g);
            assert_eq!(device.ims_free_entries(), 16);
            assert_eq!(device.dma_bindings(), 0);
        }
    }

    #[test]
    fn removed_adis_give_everything_back_and_serve_another_guest() {
        let device = Arc::new(SoftSiovDevice::new(16, 64, ImsStorage::OnDevice, 1).unwrap());
        let mem = memory();
        let mut a = compose(&device, &mem, 8).unwrap();
        let placement = a.vdcm.placement();
        assert_eq!(placement.len(), 8);
        for f in a.vdcm.functions() {
            crate::testing::program_two_vectors(&mut lock(&f));
        }
        assert_eq!(a.router.counts(), (16, 0));
        assert_eq!((a.pci.len(), a.mmio.len(), device.ims_free_entries()), (8, 8, 48));
        // Take three away, function 0 of the slot among them.
        let mut freed = Vec::new();
        for (bdf, adi) in [placement[0], placement[3], placement[7]] {
            assert_eq!(a.vdcm.remove(bdf, &mut a.slots).unwrap(), adi);
            freed.push(adi);
            let mut data = [0u8; 4];
            a.pci.read(bdf, 0, 0, &mut data);
            assert_eq!(data, [0xff; 4], "{bdf} is gone from config space");
            assert!(!a.vdcm.table().read().unwrap().contains_key(&bdf.0), "and from the hypercall table");
        }
        assert!(matches!(a.vdcm.remove(placement[0].0, &mut a.slots), Err(Error::NoSuchFunction(_))));
        assert_eq!(a.router.counts(), (10, 0), "their routes are gone");
        assert_eq!((a.pci.len(), a.mmio.len(), device.ims_free_entries()), (5, 5, 54));
        // Another guest takes them.
        let mut b = guest(&device, &mem, 1);
        let placed = b.vdcm.add(&freed, &mut b.slots).unwrap();
        assert_eq!(placed.len(), 3);
        assert_eq!(device.ims_free_entries(), 48);
        // An ADI already in the guest, or open elsewhere, is refused and changes nothing.
        assert!(matches!(b.vdcm.add(&[freed[0]], &mut b.slots), Err(Error::AlreadyPresent(_))));
        assert!(matches!(b.vdcm.add(&[placement[1].1], &mut b.slots), Err(Error::Device(siov::Error::AdiBusy(_)))));
        assert_eq!((b.pci.len(), device.ims_free_entries(), device.dma_bindings()), (3, 48, 2));
        // Everything out of A, then A adds them back into the device numbers it freed.
        for (bdf, _) in a.vdcm.placement() {
            a.vdcm.remove(bdf, &mut a.slots).unwrap();
        }
        assert_eq!((a.pci.len(), a.mmio.len(), a.router.counts()), (0, 0, (0, 0)));
        let again = a.vdcm.add(&[AdiId(8), AdiId(9)], &mut a.slots).unwrap();
        assert_eq!(again[0], placement[0].0, "the lowest device number again");
    }

    #[test]
    fn a_failed_addition_leaves_the_guest_and_the_device_as_they_were() {
        // 16 IMS entries: 8 ADIs × 2 fit, the 9th does not.
        let device = Arc::new(SoftSiovDevice::new(16, 16, ImsStorage::OnDevice, 1).unwrap());
        let mem = memory();
        let mut g = compose(&device, &mem, 3).unwrap();
        let before = (g.pci.len(), g.mmio.len(), device.ims_free_entries(), g.vdcm.len());
        let adis: Vec<AdiId> = (3..9).map(AdiId).collect();
        assert!(matches!(g.vdcm.add(&adis, &mut g.slots), Err(Error::Device(siov::Error::ImsExhausted { .. }))));
        assert_eq!((g.pci.len(), g.mmio.len(), device.ims_free_entries(), g.vdcm.len()), before);
        // The ADIs the failed call opened were closed again: another call can take them.
        assert_eq!(g.vdcm.add(&adis[..5], &mut g.slots).unwrap().len(), 5);
    }
}
