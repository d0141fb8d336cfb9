//! What the fuzz targets share: reading a fuzzer's bytes as a guest's accesses, and the
//! fixtures the targets drive (an ADI composed on the software device with KVM faked, a VFIO
//! function on a fake device, guest memory). docs/fuzzing.md.
//!
//! Every fixture is built fresh for each input, so a crash found by one input reproduces from
//! that input alone.

use std::sync::{Arc, Mutex};

use devices::pci::{PciAllocator, PciRoot};
use devices::{Bus, BusDevice};
use siovmm_interrupts::fake::FakeRoutes;
use siovmm_interrupts::{IoEvents, MsiRouter};
use siovmm_vdcm::adi::AdiFunction;
use siovmm_vdcm::{AdiOptions, AdiTable, GuestSide, ImsOptIn, ImsQuota, Vdcm};
use siovmm_vfio::siov::{AdiId, ImsStorage};
use siovmm_vfio::soft::SoftSiovDevice;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The fuzzer's bytes, read front to back; reads past the end give `None`.
#[derive(Debug)]
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    /// The next byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    /// True when every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One guest access to a device: KVM hands a device 1 to 8 bytes at an offset inside the range
/// it was placed at.
#[derive(Debug, Clone, Copy)]
pub enum Access {
    /// A read of `len` bytes.
    Read { offset: u64, len: usize },
    /// A write of the first `len` bytes of `data`.
    Write { offset: u64, len: usize, data: [u8; 8] },
}

impl Access {
    /// The next access to a device of `span` bytes: a byte for read or write and the length,
    /// an offset (taken modulo `span`), and for writes eight data bytes.
    pub fn next(input: &mut Input<'_>, span: u64) -> Option<Self> {
        let kind = input.u8()?;
        let len = usize::from(kind & 7) + 1;
        let offset = u64::from(input.u32()?) % span.max(1);
        if kind & 0x80 == 0 {
            Some(Self::Read { offset, len })
        } else {
            let data = input.bytes(8)?.try_into().ok()?;
            Some(Self::Write { offset, len, data })
        }
    }

    /// The same access `base` bytes further on (into one part of a larger range).
    pub fn at(self, base: u64) -> Self {
        match self {
            Self::Read { offset, len } => Self::Read { offset: offset + base, len },
            Self::Write { offset, len, data } => Self::Write { offset: offset + base, len, data },
        }
    }

    /// Performs the access on `device`.
    pub fn apply(self, device: &mut dyn BusDevice) {
        match self {
            Self::Read { offset, len } => device.read(offset, &mut [0u8; 8][..len]),
            Self::Write { offset, len, data } => device.write(offset, &data[..len]),
        }
    }
}

/// Applies every access the input holds to `device` (of `span` bytes).
pub fn drive(device: &mut dyn BusDevice, span: u64, input: &mut Input<'_>) {
    while let Some(a) = Access::next(input, span) {
        a.apply(device);
    }
}

/// Guest memory: 1 MiB at 0 and 64 KiB at 4 GiB, with a hole between.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 16)])
        .unwrap_or_else(|e| panic!("guest memory: {e}"))
}

/// KVM's ioeventfds, faked: accepted.
#[derive(Debug)]
struct NoIoEvents;

impl IoEvents for NoIoEvents {
    fn ioeventfd(&self, _: &EventFd, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// ADIs composed into a guest on the software device, KVM faked (routes, ioeventfds).
pub struct AdiGuest {
    pub vdcm: Vdcm,
    pub mem: GuestMemoryMmap,
    pub routes: Arc<FakeRoutes>,
    pub opt_in: ImsOptIn,
    pub quota: ImsQuota,
    pub mmio: Arc<Bus>,
    pub pci: Arc<PciRoot>,
    slots: PciAllocator,
    adis: u32,
}

impl AdiGuest {
    /// A guest that will hold `adis` ADIs of `vectors` MSI-X vectors, the IMS window trapped
    /// when `ims_trap`, on a device of 64 IMS entries (small, so exhaustion is reached) with
    /// one worker thread. The ADIs come with [`AdiGuest::session`].
    pub fn new(adis: u32, vectors: u16, ims_trap: bool) -> Self {
        let device = Arc::new(SoftSiovDevice::new(adis, 64, ImsStorage::OnDevice, 1).unwrap_or_else(|e| panic!("device: {e}")));
        let mem = guest_memory();
        let routes = Arc::new(FakeRoutes::default());
        let router = Arc::new(MsiRouter::new(routes.clone(), 16).unwrap_or_else(|e| panic!("router: {e}")));
        let mmio = Arc::new(Bus::new());
        let pci = Arc::new(PciRoot::new());
        let (opt_in, quota) = (ImsOptIn::default(), ImsQuota::new(16, 48));
        let side = GuestSide {
            mem: mem.clone(),
            iommu: None,
            mmio: mmio.clone(),
            doorbells: Arc::new(NoIoEvents),
            portals: None,
            router,
            pci: pci.clone(),
            adis: AdiTable::default(),
            ims_opt_in: opt_in.clone(),
            ims_quota: quota.clone(),
        };
        let options = AdiOptions { vectors, ims_trap, vcpus: 2 };
        let vdcm = Vdcm::new(side, device, options).unwrap_or_else(|e| panic!("VDCM: {e}"));
        let slots = PciAllocator::new(arch::pci::PciTopology::for_functions(adis).unwrap_or_default());
        Self { vdcm, mem, routes, opt_in, quota, mmio, pci, slots, adis }
    }

    /// One guest's life on this VM, built once per process (threads and mappings are the
    /// costly part): the ADIs composed afresh (not opted in to IMS), `f` run, then every ADI
    /// released and checked to have given back its irqfds and IMS entries. So each input
    /// meets ADIs as composed and a crash reproduces from its input alone.
    pub fn session(shared: &Mutex<Self>, f: impl FnOnce(&Self)) {
        let mut g = lock(shared);
        g.opt_in.clear();
        let ids: Vec<AdiId> = (0..g.adis).map(AdiId).collect();
        let AdiGuest { vdcm, slots, .. } = &mut *g;
        vdcm.add(&ids, slots).unwrap_or_else(|e| panic!("composing: {e}"));
        f(&g);
        let AdiGuest { vdcm, slots, .. } = &mut *g;
        for (bdf, _) in vdcm.placement() {
            vdcm.remove(bdf, slots).unwrap_or_else(|e| panic!("releasing {bdf}: {e}"));
        }
        assert!(lock(&g.routes.irqfds).is_empty(), "irqfds left bound after the ADIs were released");
        g.routes.forget_history();
        assert_eq!(g.quota.held(), 0, "IMS entries still counted after the ADIs were released");
        assert!(g.mmio.is_empty(), "BARs left on the MMIO bus after the ADIs were released");
    }

    /// The guest's first ADI.
    pub fn first(&self) -> Arc<Mutex<AdiFunction>> {
        self.vdcm.functions().into_iter().next().unwrap_or_else(|| panic!("no ADI"))
    }
}

/// One step of a guest driving its ADIs: an ECAM config access to the functions of device 1
/// (the ADIs are 00:01.0 and up), an access to the first ADI's BAR0 registers as the MMIO
/// bus delivers it (`bar0_span` bytes from its base), or an MMIO access anywhere in the low
/// 4 GiB (wherever the guest placed BARs, overlapping or not). Returns false at the input's end.
pub fn adi_step(g: &AdiGuest, ecam: &mut devices::pci::PciConfigMmio, input: &mut Input<'_>, bar0_span: u64) -> bool {
    let Some(target) = input.u8() else { return false };
    match target % 3 {
        0 => {
            let Some(a) = Access::next(input, 0x8000) else { return false };
            a.at(0x8000).apply(ecam);
        }
        1 => {
            let Some(a) = Access::next(input, bar0_span) else { return false };
            a.apply(&mut *lock(&g.first()));
        }
        _ => {
            let Some(a) = Access::next(input, 1 << 32) else { return false };
            match a {
                Access::Read { offset, len } => {
                    g.mmio.read(offset, &mut [0u8; 8][..len]);
                }
                Access::Write { offset, len, data } => {
                    g.mmio.write(offset, &data[..len]);
                }
            }
        }
    }
    true
}

/// Locks, ignoring poison (a fuzz target stops at the first panic anyway).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
