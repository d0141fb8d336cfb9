//! One ADI composed into a guest as a PCI function (the VDCM's per-ADI device model), split by
//! concept:
//! - [`config`]: config space (identity, BAR0, the MSI-X and PCIe capabilities) and where
//!   BAR0 sits on the guest's bus;
//! - [`registers`]: BAR0's register file, the slow path (queue base and size, control, status);
//! - [`vectors`]: the MSI-X vectors and the host IMS entries behind them;
//! - [`ims_slots`]: the IMS slots an enlightened guest programs, by hypercall or through the
//!   trapped window (`crate::ims_window`, which this function backs).
//!
//! This module ties them to the device and the guest's bus: it decodes BAR0 accesses, turns
//! register and window writes into device operations, and answers the hypercalls.
//!
//! BAR0, 32 KiB (docs/siov-device.md has the full register map):
//! - 0x0000 registers, emulated here;
//! - 0x1000 doorbell, the fast path: a KVM ioeventfd signals the device's doorbell eventfd, so a
//!   submission never exits to siovmm (writes that do exit are forwarded the same way);
//! - 0x2000 MSI-X table, 0x3000 PBA, emulated here;
//! - 0x4000 the trapped IMS window (`--ims trap`; inert otherwise).

pub mod config;
pub mod ims_slots;
pub mod registers;
pub mod slot_device;
mod vectors;

use std::sync::{Arc, Weak};

use devices::pci::{Bdf, PciFunction};
use devices::{BusDevice, GuestFaults};
use siovmm_hypercall::Status;
use siovmm_interrupts::{FunctionId, MsiMessage, MsiRouter, VectorKey};
use siovmm_vfio::siov::{self, AdiId, ImsGroup, SiovDevice};
use siovmm_vfio::user::ims_mailbox::SlotState;
use vmm_sys_util::eventfd::EventFd;

use config::{AdiConfig, Bar0Window, ConfigWrite};
use ims_slots::ImsSlots;
use slot_device::SlotDevice;
use registers::{Action, QueueRegisters};
use vectors::MsixVectors;

use crate::ims_window::{ImsWindow, WindowBacking};
use crate::PvIms;

pub use config::BarMapper;
pub use crate::ims_window::{ims_ctrl, IMS_WINDOW, IMS_WINDOW_SLOTS};
pub use ims_slots::MAX_PV_SLOTS;
pub use registers::{reg, VERSION};

/// Device ID of an ADI function.
pub const ADI_DEVICE_ID: u16 = 0x0002;
/// Class code: system peripheral, other.
pub const ADI_CLASS: u32 = 0x08_8000;
/// BAR0 size.
pub const BAR0_SIZE: u64 = 0x8000;
/// Doorbell offset in BAR0.
pub const DOORBELL: u64 = 0x1000;
/// MSI-X table offset in BAR0.
pub const MSIX_TABLE: u64 = 0x2000;
/// MSI-X PBA offset in BAR0.
pub const MSIX_PBA: u64 = 0x3000;
/// Most MSI-X vectors: the table must fit between MSIX_TABLE and MSIX_PBA (4 KiB).
pub const MAX_MSIX_VECTORS: u16 = ((MSIX_PBA - MSIX_TABLE) / 16) as u16;
/// The function.
pub struct AdiFunction {
    adi: AdiId,
    bdf: Bdf,
    config: AdiConfig,
    bar0: Bar0Window,
    vectors: MsixVectors,
    device: Arc<dyn SiovDevice>,
    router: Arc<MsiRouter>,
    doorbell: Arc<EventFd>,
    /// BAR0's queue registers.
    regs: QueueRegisters,
    /// Doorbell writes that exited to siovmm instead of completing in KVM's ioeventfd.
    slow_doorbells: u64,
    faults: GuestFaults,
    /// Hypercall IMS slots (slot s is interrupt handle `msix vectors + s`).
    slots: ImsSlots,
    /// In trap mode, the guest-visible IMS window, backed by hypercall slots.
    window: Option<ImsWindow>,
    ims_quota: crate::ImsQuota,
    /// The device keeps IMS in memory: the guest stores each slot's host message in its
    /// queue's IMS area, where mask and pending live too (`siovmm_vfio::soft::queue_ims`).
    in_queue: bool,
}

/// The destination APIC ID of a guest MSI message, if it is a plain fixed/lowest-priority
/// message to the local APIC range (address 0xFEEx_xxxx, extended destination ID honoured).
pub fn msi_destination(message: MsiMessage) -> Option<u32> {
    if message.address >> 20 != 0xfee {
        return None;
    }
    let dest = ((message.address >> 12) & 0xff) as u32 | (((message.address >> 5) & 0x7f) as u32) << 8;
    Some(dest)
}

impl std::fmt::Debug for AdiFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdiFunction").field("adi", &self.adi).field("bdf", &self.bdf.to_string()).finish_non_exhaustive()
    }
}

/// What composing one ADI needs.
pub struct AdiParts {
    /// The ADI (already opened for this guest).
    pub adi: AdiId,
    /// Where the guest sees it.
    pub bdf: Bdf,
    /// Whether it is function 0 of a multi-function slot.
    pub multifunction: bool,
    /// Its IMS entries, one per vector, allocated to the ADI.
    pub ims: ImsGroup,
    /// The host device.
    pub device: Arc<dyn SiovDevice>,
    /// The doorbell the device listens on.
    pub doorbell: Arc<EventFd>,
    /// Guest MSI routing.
    pub router: Arc<MsiRouter>,
    /// BAR mover (owned by the VDCM).
    pub mapper: Weak<dyn BarMapper>,
    /// BAR0's initial guest address (as firmware would assign it).
    pub bar0: u64,
    /// Whether the guest may program IMS slots through the trapped window.
    pub ims_trap: bool,
    /// Whether the guest has opted in to IMS: the window is inert until then.
    pub ims_opt_in: crate::ImsOptIn,
    /// The VM's quota the ADI's hypercall and window slots count against.
    pub ims_quota: crate::ImsQuota,
    /// vCPUs of the VM.
    pub vcpus: u32,
}

impl Drop for AdiFunction {
    /// The ADI's slots leave with it (the device takes the entries back when the ADI closes):
    /// the VM's quota gets them back.
    fn drop(&mut self) {
        self.ims_quota.give(self.slots.held());
    }
}

impl std::fmt::Debug for AdiParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdiParts").field("adi", &self.adi).field("bdf", &self.bdf).finish_non_exhaustive()
    }
}

impl AdiFunction {
    /// Builds the function and gives the device the ADI's interrupt handles (one per vector).
    /// BAR0 is not on the bus until [`AdiFunction::update_bar_mapping`].
    pub fn new(p: AdiParts) -> Result<Self, siov::Error> {
        let vectors = MsixVectors::new(p.adi, p.ims, p.device.clone(), p.router.clone());
        let handles: Vec<_> = vectors.handles().collect();
        p.device.set_interrupt_handles(p.adi, &handles)?;
        let in_queue = p.device.info().ims_storage == siov::ImsStorage::InMemory;
        Ok(Self {
            adi: p.adi,
            bdf: p.bdf,
            config: AdiConfig::new(p.bar0, p.multifunction),
            bar0: Bar0Window::new(p.bdf, p.mapper),
            vectors,
            device: p.device,
            router: p.router,
            doorbell: p.doorbell,
            regs: QueueRegisters::default(),
            slow_doorbells: 0,
            faults: GuestFaults::new(format!("ADI {} ({})", p.adi.0, p.bdf)),
            slots: ImsSlots::new(),
            window: p.ims_trap.then(|| ImsWindow::new(format!("ADI {} ({})", p.adi.0, p.bdf), p.ims_opt_in, p.vcpus)),
            ims_quota: p.ims_quota,
            in_queue,
        })
    }

    /// Whether the guest is using the function: bus mastering or MSI-X on. A driver turns
    /// both on when it binds and off when it unbinds (Linux: `pci_disable_device`,
    /// `pci_free_irq_vectors`); removing a function in use pulls it from under the driver.
    pub fn in_use(&self) -> bool {
        self.config.bus_master() || self.vectors.enabled()
    }

    /// IMS entries the ADI holds beyond its MSI-X vectors' (hypercall and window slots).
    pub fn ims_slots_held(&self) -> u32 {
        self.slots.held()
    }

    /// Maps BAR0 where config space says, if memory decode is on. Call after construction.
    pub fn update_bar_mapping(&mut self) {
        self.bar0.place(self.config.bar0());
    }

    /// Takes BAR0 off the guest's bus (the function is being removed).
    pub fn unmap_bar(&mut self) {
        self.bar0.place(None);
    }

    /// Guest-triggered operations that failed so far.
    pub fn failures(&self) -> u64 {
        self.faults.count() + self.window.as_ref().map_or(0, ImsWindow::failures)
    }

    /// Requester ID (bus << 8 | devfn) of the function.
    pub fn requester_id(&self) -> u16 {
        self.bdf.0
    }

    /// Gives the device the handle table: MSI-X vectors first, then hypercall slots.
    fn publish_handles(&self) -> Result<(), siov::Error> {
        let mut handles: Vec<_> = self.vectors.handles().collect();
        handles.extend(self.slots.handles(self.in_queue));
        self.device.set_interrupt_handles(self.adi, &handles)
    }

    /// The device half of the hypercall slots, and their books.
    fn slot_device(&mut self) -> (SlotDevice<'_>, &mut ImsSlots) {
        (SlotDevice { device: self.device.as_ref(), adi: self.adi, in_queue: self.in_queue }, &mut self.slots)
    }

    /// A guest read of the trapped IMS window; inert (zeros) outside trap mode.
    fn read_window(&self, offset: u64) -> u32 {
        self.window.as_ref().map_or(0, |w| w.read(offset, self))
    }

    /// A guest write to the trapped IMS window (dropped outside trap mode).
    fn write_window(&mut self, offset: u64, value: u32) {
        // The window drives this function's slots, so it is out of `self` meanwhile.
        if let Some(mut window) = self.window.take() {
            window.write(offset, value, self);
            self.window = Some(window);
        }
    }

    /// Doorbell writes that reached siovmm (0 when the ioeventfd fast path took them all).
    pub fn slow_doorbells(&self) -> u64 {
        self.slow_doorbells
    }

    /// The eventfd behind `vector`, once the guest has programmed it.
    pub fn vector_eventfd(&self, vector: u16) -> Option<Arc<EventFd>> {
        self.vectors.eventfd(vector)
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match self.regs.write(offset, value) {
            None => {}
            Some(Action::Reset) => {
                self.faults.record("resetting the ADI", self.device.reset_adi(self.adi));
                let r = self.publish_handles();
                self.faults.record("publishing interrupt handles", r);
            }
            Some(Action::Queue(queue)) => {
                let accepted = self.device.configure_queue(self.adi, queue).is_ok();
                self.regs.enabled(queue.is_some(), accepted);
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let caps = self.device.info().max_queue_size.min(0xffff) | u32::from(self.vectors.count()) << 16;
        self.regs.read(offset, caps)
    }
}

impl PciFunction for AdiFunction {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read(reg, self.vectors.message_control())
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        match self.config.write(reg, offset, data, self.vectors.message_control()) {
            ConfigWrite::Stored => {}
            ConfigWrite::Placement => self.update_bar_mapping(),
            ConfigWrite::MsixControl(control) => self.vectors.write_control(control, &mut self.faults),
        }
    }
}

/// A dword-aligned 4-byte access below `end`.
fn dword_access(offset: u64, len: usize, end: u64) -> bool {
    offset < end && len == 4 && offset.is_multiple_of(4)
}

impl PvIms for AdiFunction {
    /// Hypercall IMS_ALLOC: `count` more IMS entries for this ADI; returns the first slot.
    fn pv_alloc(&mut self, count: u32) -> Result<u32, Status> {
        if !self.ims_quota.take(self.slots.held(), count) {
            return Err(Status::Exhausted);
        }
        let (device, slots) = self.slot_device();
        let allocated = device.alloc(slots, count);
        let first = allocated.inspect_err(|_| self.ims_quota.give(count))?;
        self.publish_handles().map_err(|_| Status::Exhausted)?;
        Ok(first)
    }

    /// Hypercall IMS_FREE of the group starting at `first`.
    fn pv_free(&mut self, first: u32) -> Result<(), Status> {
        let (device, slots) = self.slot_device();
        let group = device.release(slots, first)?;
        self.ims_quota.give(group.count);
        let function = FunctionId::Adi(self.adi.0);
        let r = self.router.unbind_all((first..first + group.count).map(|slot| VectorKey::ims(function, slot)));
        self.faults.record("unbinding IMS slots", r);
        // Revoke the handles before the entries go back to the device.
        let r = self.publish_handles();
        self.faults.record("publishing interrupt handles", r);
        self.slot_device().0.give_back(group)
    }

    /// Hypercall IMS_COMPOSE: the host sets up delivery of the guest's `message` (already
    /// validated against this VM's vCPUs) for the slot, as a host sets up an interrupt-remapping
    /// entry: the slot's IMS entry signals an eventfd routed to that message in this VM only.
    /// Returns the host message the entry writes (hypercall `message_result` form), which the
    /// guest stores in its queue's IMS area when the device keeps IMS there.
    fn pv_compose(&mut self, slot: u32, message: MsiMessage) -> Result<u64, Status> {
        let key = VectorKey::ims(FunctionId::Adi(self.adi.0), slot);
        let (device, slots) = self.slot_device();
        let fd = device.eventfd(slots, slot)?;
        self.router.bind(key, fd, message).map_err(|_| Status::Exhausted)?;
        let (device, slots) = self.slot_device();
        device.composed(slots, slot)
    }

    /// Hypercall IMS_MASK. Unmasking delivers a pending interrupt once. In queue memory this
    /// sets the mask bit stored there and commits it: a pending interrupt the device marked
    /// there is delivered once.
    fn pv_mask(&mut self, slot: u32, masked: bool) -> Result<(), Status> {
        let (device, slots) = self.slot_device();
        device.mask(slots, slot, masked)
    }
}

impl WindowBacking for AdiFunction {
    fn slot_state(&self, slot: u32) -> Option<SlotState> {
        let index = self.slots.index(slot)?;
        let pending = self.device.ims_pending(self.adi, index).unwrap_or(false);
        Some(SlotState { pending, handle: u32::from(self.vectors.count()) + slot })
    }
}

impl BusDevice for AdiFunction {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (table, pba) = (self.vectors.table_size(), self.vectors.pba_size());
        match offset {
            o if dword_access(o, data.len(), DOORBELL) => data.copy_from_slice(&self.read_register(o).to_le_bytes()),
            o if (MSIX_TABLE..MSIX_TABLE + table).contains(&o) => self.vectors.read_table(o - MSIX_TABLE, data),
            o if (MSIX_PBA..MSIX_PBA + pba).contains(&o) => self.vectors.read_pba(o - MSIX_PBA, data),
            o if o >= IMS_WINDOW && ImsWindow::is_dword(o - IMS_WINDOW, data.len()) => {
                data.copy_from_slice(&self.read_window(o - IMS_WINDOW).to_le_bytes());
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let dword = || data.get(..4).map_or(0, |d| u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
        match offset {
            o if dword_access(o, data.len(), DOORBELL) => self.write_register(o, dword()),
            // Reached only when the ioeventfd did not take the write (e.g. before it exists).
            o if (DOORBELL..DOORBELL + 8).contains(&o) => {
                self.slow_doorbells += 1;
                self.faults.record("ringing the doorbell", self.doorbell.write(1));
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.vectors.table_size()).contains(&o) => {
                self.vectors.write_table(o - MSIX_TABLE, data, &mut self.faults);
            }
            o if o >= IMS_WINDOW && ImsWindow::is_dword(o - IMS_WINDOW, data.len()) => self.write_window(o - IMS_WINDOW, dword()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The function against the software device and a fake route backend: no KVM.
    use super::*;
    use crate::fakes::FakeRoutes;
    use siovmm_vfio::dma::GuestRam;
    use siovmm_vfio::siov::ImsStorage;
    use siovmm_vfio::soft::SoftSiovDevice;
    use std::sync::atomic::Ordering;

    struct NoBars;
    impl BarMapper for NoBars {
        fn remap(&self, _: Bdf, _: Option<u64>, _: Option<u64>) -> bool {
            true
        }
    }

    fn function(routes: Arc<FakeRoutes>) -> AdiFunction {
        function_with(routes, false, crate::ImsOptIn::default())
    }

    fn function_with(routes: Arc<FakeRoutes>, ims_trap: bool, ims_opt_in: crate::ImsOptIn) -> AdiFunction {
        function_in(ImsStorage::OnDevice, routes, ims_trap, ims_opt_in).0
    }

    fn function_in(
        storage: ImsStorage,
        routes: Arc<FakeRoutes>,
        ims_trap: bool,
        ims_opt_in: crate::ImsOptIn,
    ) -> (AdiFunction, GuestRam) {
        function_of(storage, routes, ims_trap, ims_opt_in, 2)
    }

    /// [`function_in`] with `vectors` MSI-X vectors.
    fn function_of(
        storage: ImsStorage,
        routes: Arc<FakeRoutes>,
        ims_trap: bool,
        ims_opt_in: crate::ImsOptIn,
        vectors: u32,
    ) -> (AdiFunction, GuestRam) {
        let device = Arc::new(SoftSiovDevice::new(1, 64 + vectors, storage, 1).unwrap());
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let ram = GuestRam(mem);
        let dma = device.dma_bind(Arc::new(ram.clone())).unwrap();
        let doorbell = device.open_adi(AdiId(0), dma).unwrap().doorbell().clone();
        let ims = device.ims_alloc(AdiId(0), vectors).unwrap();
        let mapper: Arc<dyn BarMapper> = Arc::new(NoBars);
        AdiFunction::new(AdiParts {
            adi: AdiId(0),
            bdf: Bdf::new(0, 1, 0),
            multifunction: false,
            ims,
            device,
            doorbell,
            router: Arc::new(MsiRouter::new(routes, 16 + vectors).unwrap()),
            // Dropped at once: the test never moves the BAR.
            mapper: Arc::downgrade(&mapper),
            bar0: 0xc000_0000,
            ims_trap,
            ims_opt_in,
            ims_quota: crate::ImsQuota::default(),
            vcpus: 1,
        })
        .map(|f| (f, ram))
        .unwrap()
    }

    /// In-memory IMS: IMS_COMPOSE hands back the host message for the guest to store in its
    /// queue's IMS area; the slot's handle reads that area; IMS_MASK writes the mask there.
    #[test]
    fn in_queue_slots_give_the_guest_its_host_message() {
        use siovmm_vfio::dma::DmaSpace;
        use siovmm_vfio::soft::{ims, queue_ims};
        let routes = Arc::new(FakeRoutes::default());
        let (mut f, ram) = function_in(ImsStorage::InMemory, routes.clone(), false, crate::ImsOptIn::default());
        let (queue, area) = (0x1000u64, 0x8000u64);
        f.device.configure_queue(f.adi, Some(siov::QueueConfig { base: queue, size: 16 })).unwrap();
        ram.write(queue + queue_ims::AREA, &area.to_le_bytes()).unwrap();
        ram.write(queue + queue_ims::ENTRIES, &4u32.to_le_bytes()).unwrap();
        assert_eq!(f.pv_alloc(2), Ok(0));
        let guest = MsiMessage { address: 0xfee0_0000, data: 0x51 };
        let result = f.pv_compose(1, guest).unwrap();
        let host = MsiMessage { address: result & 0xffff_ffff, data: (result >> 32) as u32 };
        let entry = ims::remapped_entry(host).expect("a remappable host message");
        assert_eq!(f.slots.index(1), Some(entry), "it names the slot's own host entry");
        assert_ne!(host, guest, "the guest never stores its own message");
        f.router.settle().unwrap();
        assert_eq!(routes.routes.lock().unwrap().last().map(|r| r.1), Some(guest), "the route carries the guest's");
        // Retargeting (the guest moved the vector): the same slot, a new route message, the same
        // host message, so what the guest stored stays valid.
        let moved = MsiMessage { address: 0xfee0_0000, data: 0x62 };
        assert_eq!(f.pv_compose(1, moved), Ok(result));
        f.router.settle().unwrap();
        let now: Vec<_> = routes.routes.lock().unwrap().iter().map(|r| r.1).collect();
        assert!(now.contains(&moved) && !now.contains(&guest), "the slot's one route now carries {moved:?}: {now:?}");
        f.pv_mask(1, true).unwrap();
        let mut ctrl = [0u8; 4];
        ram.read(area + 16 + 12, &mut ctrl).unwrap();
        assert_eq!(u32::from_le_bytes(ctrl), 1, "the mask lives in queue memory");
        f.pv_mask(1, false).unwrap();
        assert_eq!(f.pv_mask(2, false), Err(Status::NoSuchSlot));
        assert_eq!(f.failures(), 0);
    }

    #[test]
    fn the_trapped_window_is_inert_until_the_guest_opts_in() {
        let opt_in = crate::ImsOptIn::default();
        let mut f = function_with(Arc::new(FakeRoutes::default()), true, opt_in.clone());
        // Slot 0: a valid message for vCPU 0, vector 0x45, unmasked.
        let program = |f: &mut AdiFunction| {
            for (i, v) in [0xfee0_0000u32, 0, 0x45, 0].into_iter().enumerate() {
                f.write_window(i as u64 * 4, v);
            }
        };
        program(&mut f);
        assert_eq!(f.read_window(12), 0, "not opted in: nothing backed, nothing to read");
        assert_eq!(f.read_window(8), 0);
        opt_in.set();
        program(&mut f);
        assert_eq!(f.read_window(8), 0x45);
        assert_ne!(f.read_window(12) & ims_ctrl::BACKED, 0, "opted in: the slot is backed by a host IMS entry");
    }

    #[test]
    fn trapped_window_slots_count_against_the_quota_and_come_back_with_the_adi() {
        let opt_in = crate::ImsOptIn::default();
        opt_in.set();
        let mut f = function_with(Arc::new(FakeRoutes::default()), true, opt_in);
        let quota = crate::ImsQuota::new(3, 100);
        f.ims_quota = quota.clone();
        for slot in 0..4u64 {
            for (i, v) in [0xfee0_0000u32, 0, 0x45, 0].into_iter().enumerate() {
                f.write_window(slot * 16 + i as u64 * 4, v);
            }
        }
        let backed = |f: &AdiFunction, slot: u64| f.read_window(slot * 16 + 12) & ims_ctrl::BACKED != 0;
        assert!((0..3).all(|s| backed(&f, s)), "three slots within the ADI's quota");
        assert!(!backed(&f, 3), "the fourth is over it and stays unbacked");
        assert_eq!((f.ims_slots_held(), quota.held()), (3, 3));
        drop(f);
        assert_eq!(quota.held(), 0, "the ADI's entries are the VM's again");
    }

    #[test]
    fn a_function_is_in_use_while_bus_mastering_or_msix_is_on() {
        let mut f = function(Arc::new(FakeRoutes::default()));
        assert!(!f.in_use(), "as firmware leaves it: memory decode only");
        // The command register (dword 1): a driver's pci_enable_device + pci_set_master.
        f.config_write(1, 0, &0x0006u16.to_le_bytes());
        assert!(f.in_use());
        f.config_write(1, 0, &0x0002u16.to_le_bytes());
        assert!(!f.in_use(), "pci_disable_device clears bus mastering");
        let control = config::MSIX_CAP_OFFSET / 4;
        f.config_write(control, 2, &devices::pci::msix::CTRL_ENABLE.to_le_bytes());
        assert!(f.in_use(), "MSI-X on");
        f.config_write(control, 2, &0u16.to_le_bytes());
        assert!(!f.in_use());
    }

    #[test]
    fn an_msix_enable_or_disable_is_one_routing_commit_for_all_vectors() {
        let routes = Arc::new(FakeRoutes::default());
        let (mut f, _) = function_of(ImsStorage::OnDevice, routes.clone(), false, crate::ImsOptIn::default(), 256);
        // Linux programs the table with MSI-X disabled, then enables it.
        for v in 0..256u64 {
            f.write(MSIX_TABLE + v * 16, &0xfee0_0000u32.to_le_bytes());
            f.write(MSIX_TABLE + v * 16 + 8, &(0x40 + v as u32 % 0xb0).to_le_bytes());
            f.write(MSIX_TABLE + v * 16 + 12, &0u32.to_le_bytes());
        }
        assert!(routes.log.lock().unwrap().is_empty(), "nothing routed while disabled");
        let control = config::MSIX_CAP_OFFSET / 4;
        for round in 0..2 {
            f.config_write(control, 2, &devices::pci::msix::CTRL_ENABLE.to_le_bytes());
            f.router.settle().unwrap();
            assert_eq!(routes.routes.lock().unwrap().len(), 256, "round {round}: every vector routed");
            f.config_write(control, 2, &0u16.to_le_bytes());
            f.router.settle().unwrap();
            assert!(routes.routes.lock().unwrap().is_empty());
        }
        assert_eq!(routes.log.lock().unwrap().len(), 4, "one commit per enable and per disable (each waited for here)");
        assert_eq!(f.failures(), 0);
    }

    /// The guest enables MSI-X and programs vector 0 with `message`, unmasked.
    fn program_vector0(f: &mut AdiFunction, data: u32) {
        f.config_write(config::MSIX_CAP_OFFSET / 4, 2, &(devices::pci::msix::CTRL_ENABLE).to_le_bytes());
        f.write(MSIX_TABLE, &0xfee0_0000u32.to_le_bytes());
        f.write(MSIX_TABLE + 8, &data.to_le_bytes());
        f.write(MSIX_TABLE + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn a_programmed_vector_gets_the_guests_route() {
        let routes = Arc::new(FakeRoutes::default());
        let mut f = function(routes.clone());
        program_vector0(&mut f, 0x41);
        let msg = MsiMessage { address: 0xfee0_0000, data: 0x41 };
        f.router.settle().unwrap();
        assert_eq!(routes.routes.lock().unwrap().iter().map(|r| r.1).collect::<Vec<_>>(), vec![msg]);
        assert_eq!(f.failures(), 0);
    }

    #[test]
    fn freed_hypercall_slots_are_reused() {
        let mut f = function(Arc::new(FakeRoutes::default()));
        assert_eq!(f.pv_alloc(10), Ok(0));
        assert_eq!(f.pv_alloc(10), Ok(10));
        f.pv_free(0).unwrap();
        assert_eq!(f.pv_alloc(5), Ok(0), "the lowest free range");
        assert_eq!(f.pv_alloc(5), Ok(5));
        assert_eq!(f.pv_alloc(10), Ok(20));
        assert_eq!(f.pv_free(3), Err(Status::NoSuchSlot), "not the first slot of a group");
        // Allocating and freeing forever never runs out of slot numbers (it did at 32,768).
        for _ in 0..4000 {
            let first = f.pv_alloc(10).unwrap();
            assert_eq!(first, 30);
            f.pv_free(first).unwrap();
        }
        assert_eq!(f.failures(), 0);
    }

    #[test]
    fn a_refused_routing_table_leaves_the_vector_delivered_not_dropped() {
        let routes = Arc::new(FakeRoutes::default());
        let mut f = function(routes.clone());
        routes.refuse.store(true, Ordering::Relaxed);
        program_vector0(&mut f, 0x41);
        assert!(f.router.settle().is_err());
        assert!(routes.routes.lock().unwrap().is_empty());
        assert!(f.router.stats().commit_failures.load(Ordering::Relaxed) > 0);
        // The vector's interrupts reach the guest through the overflow injector meanwhile.
        let fd = f.vectors.eventfd(0).expect("vector 0's eventfd");
        fd.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while routes.injected.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the interrupt never arrived");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        routes.refuse.store(false, Ordering::Relaxed);
        f.router.settle().unwrap();
        assert_eq!(routes.messages(), vec![MsiMessage { address: 0xfee0_0000, data: 0x41 }]);
    }
}
