//! The VDCM (Virtual Device Composition Module): composes ADIs of a host SIOV device into a
//! guest as PCI functions. Free of KVM: interrupts go through `siovmm_interrupts` (a router
//! and an ioeventfd trait the VMM implements with KVM), so everything here is unit-tested with
//! fakes.
//!
//! Per ADI: open it for this guest on the guest's DMA binding (one for the guest's RAM, or one
//! per function behind a vIOMMU, as each function has its own source ID), allocate one IMS
//! entry per MSI-X vector, build the [`adi::AdiFunction`], place it where the guest's
//! `PciAllocator` says (8 functions per device, devices filling root bus 0, then 1, ...), give
//! BAR0 an address in its root bus's 32-bit window as firmware would, and map it: BAR0 on the
//! MMIO bus plus an ioeventfd on its doorbell.

pub mod adi;
pub mod hypercall;
pub mod ims_slots;
pub mod iommu_dma;
pub mod registers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use devices::bus::lock;
use devices::iommu::vtd::VtdUnit;
use devices::pci::{Bdf, PciAllocator, PciRoot};
use devices::Bus;
use siovmm_vfio::dma::GuestRam;
use siovmm_vfio::siov::{self, AdiId, DmaHandle, Portal, SiovDevice};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use adi::{AdiFunction, AdiParts, BarMapper, BAR0_SIZE, DOORBELL};
use siovmm_interrupts::{IoEvents, MsiRouter};

/// Most ADIs one guest gets: every function of every root bus (`arch::pci`).
pub const MAX_ADIS_PER_GUEST: u32 = arch::pci::PciTopology::max_functions();

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
}

/// A composed function and its doorbell.
type Placed = (Arc<Mutex<AdiFunction>>, Arc<EventFd>);

/// Moves BAR0 windows on the MMIO bus and their doorbell ioeventfds.
struct GuestBars {
    doorbells: Arc<dyn IoEvents>,
    mmio: Arc<Bus>,
    functions: Mutex<HashMap<Bdf, Placed>>,
}

impl BarMapper for GuestBars {
    fn remap(&self, bdf: Bdf, old: Option<u64>, new: Option<u64>) {
        let functions = lock(&self.functions);
        let Some((func, doorbell)) = functions.get(&bdf) else { return };
        if let Some(base) = old {
            self.mmio.remove(base);
            if let Err(e) = self.doorbells.ioeventfd(doorbell, base + DOORBELL, false) {
                log::warn!("{bdf}: removing the doorbell ioeventfd at {:#x}: {e}", base + DOORBELL);
            }
        }
        if let Some(base) = new {
            // A guest placing the BAR over another device gets no mapping: the insert fails.
            if self.mmio.insert(func.clone(), base, BAR0_SIZE).is_ok() {
                // Without it, doorbell writes still arrive, as exits (counted as slow doorbells).
                if let Err(e) = self.doorbells.ioeventfd(doorbell, base + DOORBELL, true) {
                    log::warn!("{bdf}: doorbell ioeventfd at {:#x}: {e}; doorbells exit to siovmm", base + DOORBELL);
                }
            }
        }
    }
}

/// The ADIs of one guest.
pub struct Vdcm {
    device: Arc<dyn SiovDevice>,
    /// Moves BARs. Held only to own it: the functions refer to it weakly.
    #[allow(dead_code)]
    bars: Arc<GuestBars>,
    router: Arc<MsiRouter>,
    functions: Vec<Arc<Mutex<AdiFunction>>>,
    adis: Vec<AdiId>,
    /// DMA bindings on the device, unbound once the ADIs using them are closed.
    dma: Vec<DmaHandle>,
}

impl std::fmt::Debug for Vdcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vdcm").field("adis", &self.adis.len()).finish_non_exhaustive()
    }
}

/// What a guest asks for.
#[derive(Clone, Copy, Debug)]
pub struct AdiRequest {
    /// First ADI of the host device to use.
    pub first_adi: u32,
    /// How many.
    pub count: u32,
    /// MSI-X vectors per ADI.
    pub vectors: u16,
    /// Whether the guest may program IMS through each ADI's trapped window.
    pub ims_trap: bool,
    /// vCPUs of the VM.
    pub vcpus: u32,
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

/// The guest side ADIs are composed into.
pub struct GuestSide<'a> {
    /// Guest memory (DMA without a vIOMMU).
    pub mem: &'a GuestMemoryMmap,
    /// The guest's vIOMMU, through which ADI DMA is translated, if it has one.
    pub iommu: Option<&'a Arc<VtdUnit>>,
    /// The MMIO bus BARs are mapped on.
    pub mmio: Arc<Bus>,
    /// Where doorbell ioeventfds are registered.
    pub doorbells: Arc<dyn IoEvents>,
    /// Delivers the ADIs' vectors.
    pub router: Arc<MsiRouter>,
}

impl std::fmt::Debug for GuestSide<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSide").field("iommu", &self.iommu.is_some()).finish_non_exhaustive()
    }
}

impl Vdcm {
    /// Composes `req.count` ADIs of `device` into `guest`, on the PCI segment `root`, where
    /// `slots` gives them device numbers (eight ADIs per device, as functions) and BARs.
    pub fn compose(
        guest: GuestSide<'_>,
        root: &mut PciRoot,
        slots: &mut PciAllocator,
        device: Arc<dyn SiovDevice>,
        req: AdiRequest,
    ) -> Result<Self, Error> {
        if req.count > MAX_ADIS_PER_GUEST {
            return Err(Error::TooMany(req.count));
        }
        let GuestSide { mem, iommu, mmio, doorbells, router } = guest;
        let bars = Arc::new(GuestBars { doorbells, mmio, functions: Mutex::new(HashMap::new()) });
        // Built up in place, so that a failure part-way releases what was composed (Drop).
        let mut vdcm = Self {
            device: device.clone(),
            bars: bars.clone(),
            router: router.clone(),
            functions: Vec::new(),
            adis: Vec::new(),
            dma: Vec::new(),
        };
        // Without a vIOMMU every ADI of the guest DMAs into the same space: one binding.
        let shared_dma = match iommu {
            None => {
                let h = device.dma_bind(dma_space(mem, None, Bdf::new(0, 0, 0)))?;
                vdcm.dma.push(h);
                Some(h)
            }
            Some(_) => None,
        };
        let mut slot = Bdf::new(0, 0, 0);
        for i in 0..req.count {
            let adi = AdiId(req.first_adi + i);
            let placement = |e| Error::Placement(adi.0, e);
            if i % 8 == 0 {
                slot = slots.allocate_device().map_err(placement)?;
            }
            let bdf = Bdf::new(slot.bus(), slot.device(), (i % 8) as u8);
            let dma = match shared_dma {
                Some(h) => h,
                None => {
                    let h = device.dma_bind(dma_space(mem, iommu, bdf))?;
                    vdcm.dma.push(h);
                    h
                }
            };
            let Portal::Doorbell(doorbell) = device.open_adi(adi, dma)?;
            vdcm.adis.push(adi);
            let ims = device.ims_alloc(adi, u32::from(req.vectors))?;
            let multifunction = i % 8 == 0 && i + 1 < req.count;
            let bar0 = slots.allocate_bar(bdf.bus(), BAR0_SIZE).map_err(placement)?;
            let func = AdiFunction::new(AdiParts {
                adi,
                bdf,
                multifunction,
                ims,
                device: device.clone(),
                doorbell: doorbell.clone(),
                router: router.clone(),
                mapper: Arc::downgrade(&bars) as Weak<dyn BarMapper>,
                bar0,
                ims_trap: req.ims_trap,
                vcpus: req.vcpus,
            })?;
            let func = Arc::new(Mutex::new(func));
            lock(&bars.functions).insert(bdf, (func.clone(), doorbell));
            root.add(bdf, func.clone());
            lock(&func).update_bar_mapping();
            vdcm.functions.push(func);
        }
        Ok(vdcm)
    }

    /// The composed functions.
    pub fn functions(&self) -> &[Arc<Mutex<AdiFunction>>] {
        &self.functions
    }

    /// The functions by requester ID (bus << 8 | devfn), for the hypercall endpoint.
    pub fn by_requester_id(&self) -> HashMap<u16, Arc<Mutex<AdiFunction>>> {
        self.functions.iter().map(|f| (lock(f).requester_id(), f.clone())).collect()
    }

    /// How guest vectors are delivered, for the start-up trace.
    pub fn delivery_summary(&self) -> String {
        let (routed, overflow) = self.router.counts();
        let slow: u64 = self.functions.iter().map(|f| lock(f).slow_doorbells()).sum();
        let failures: u64 = self.functions.iter().map(|f| lock(f).failures()).sum();
        format!(
            "{} ADIs; {routed} vectors on KVM routes, {overflow} on the overflow path ({} injections); \
             {slow} doorbell writes exited to siovmm; {failures} guest-triggered operations failed",
            self.functions.len(),
            self.router.stats().overflow_injections.load(std::sync::atomic::Ordering::Relaxed)
        )
    }
}

impl Drop for Vdcm {
    fn drop(&mut self) {
        // Close the ADIs so another guest can take them (the device frees their IMS entries),
        // then drop the DMA bindings nothing uses any more.
        for adi in &self.adis {
            if let Err(e) = self.device.close_adi(*adi) {
                log::warn!("closing ADI {}: {e}", adi.0);
            }
        }
        for h in &self.dma {
            if let Err(e) = self.device.dma_unbind(*h) {
                log::warn!("unbinding DMA handle {}: {e}", h.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Composition on a shared software device with fakes for KVM: no /dev/kvm.
    use super::*;
    use siovmm_interrupts::{MsiMessage, RouteBackend};
    use siovmm_vfio::siov::ImsStorage;
    use siovmm_vfio::soft::SoftSiovDevice;

    struct NoKvm;
    impl RouteBackend for NoKvm {
        fn set_msi_routes(&self, _: &[(u32, MsiMessage)]) -> std::io::Result<()> {
            Ok(())
        }
        fn irqfd(&self, _: &EventFd, _: u32, _: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn signal_msi(&self, _: MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl IoEvents for NoKvm {
        fn ioeventfd(&self, _: &EventFd, _: u64, _: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn compose(device: &Arc<SoftSiovDevice>, mem: &GuestMemoryMmap, count: u32) -> Result<(Vdcm, PciRoot, Arc<Bus>), Error> {
        let mmio = Arc::new(Bus::new());
        let router = Arc::new(MsiRouter::new(Arc::new(NoKvm), 64).unwrap());
        let guest = GuestSide { mem, iommu: None, mmio: mmio.clone(), doorbells: Arc::new(NoKvm), router };
        let mut root = PciRoot::new();
        let mut slots = PciAllocator::new(arch::pci::PciTopology::for_functions(count).unwrap());
        let req = AdiRequest { first_adi: 0, count, vectors: 2, ims_trap: false, vcpus: 1 };
        let vdcm = Vdcm::compose(guest, &mut root, &mut slots, device.clone(), req)?;
        Ok((vdcm, root, mmio))
    }

    #[test]
    fn a_released_guests_adis_and_ims_entries_go_back_to_the_device() {
        // Exactly enough IMS entries for one guest's 8 ADIs × 2 vectors.
        let device = Arc::new(SoftSiovDevice::new(8, 16, ImsStorage::OnDevice, 1).unwrap());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        for round in 0..3 {
            let (vdcm, root, mmio) = compose(&device, &mem, 8).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(vdcm.functions().len(), 8);
            assert_eq!(device.ims_free_entries(), 0);
            assert_eq!(device.dma_bindings(), 1, "one binding for the guest's RAM");
            assert!(matches!(compose(&device, &mem, 1), Err(Error::Device(_))), "the device is full while the guest lives");
            // The guest goes: its VDCM, PCI segment and buses.
            drop((vdcm, root, mmio));
            assert_eq!(device.ims_free_entries(), 16);
            assert_eq!(device.dma_bindings(), 0);
        }
    }
}
