//! One ADI composed into a guest as a PCI function (the VDCM's per-ADI device model).
//!
//! Config space: vendor 0x5356, device 0x0002, class 08/80/00; BAR0 64-bit, 32 KiB; an MSI-X
//! capability at 0x40 whose table and PBA live in BAR0.
//!
//! BAR0 (docs/siov-device.md has the full register map):
//! - 0x0000 registers, the slow path, emulated here: version, capabilities, queue base and
//!   size, control (enable, reset), status;
//! - 0x1000 doorbell, the fast path: a KVM ioeventfd signals the device's doorbell eventfd, so a
//!   submission never exits to siovmm (writes that do exit are forwarded the same way);
//! - 0x2000 MSI-X table, 0x3000 PBA, emulated here.
//!
//! Interrupts: MSI-X vector v is backed by IMS entry `ims.first + v`, and interrupt handle v
//! names it. The guest's message for v becomes a KVM MSI route fed by an eventfd that the IMS
//! entry signals; the guest's masks (vector, function, enable) become the IMS entry's mask,
//! so the device keeps the pending bit, and the PBA reads it back.

use std::sync::{Arc, Weak};

use devices::pci::msix::{Msix, VectorChange};
use devices::pci::{Bdf, ConfigSpace, PciFunction, SIOVMM_VENDOR_ID};
use devices::BusDevice;
use siovmm_hypercall::Status;
use siovmm_interrupts::{MsiMessage, MsiRouter, VectorKey};
use siovmm_vfio::siov::{self, AdiId, ImsGroup, SiovDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::ims_slots::{ImsSlots, PvSlot};
use crate::registers::{Action, QueueRegisters};

pub use crate::ims_slots::{IMS_WINDOW_SLOTS, MAX_PV_SLOTS};
pub use crate::registers::{reg, VERSION};

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
/// The trapped IMS window (`--ims trap`): 16-byte slots `{addr_lo, addr_hi, data, ctrl}`.
pub const IMS_WINDOW: u64 = 0x4000;
/// Window slot ctrl: bit 0 mask (RW), bit 1 pending (RO), bit 2 backed by a host IMS entry
/// (RO), bits 31:16 the slot's interrupt handle once backed (RO).
pub mod ims_ctrl {
    /// Mask.
    pub const MASK: u32 = 1;
    /// Pending.
    pub const PENDING: u32 = 2;
    /// Backed by a host IMS entry.
    pub const BACKED: u32 = 4;
}

const CAP_OFFSET: usize = 0x40;
/// The PCI Express capability, chained after MSI-X.
const PCIE_CAP_OFFSET: usize = 0x50;
/// PCI Express capability ID.
const CAP_ID_PCIE: u32 = 0x10;
/// PCIe Capabilities register: version 2, device/port type 1001b = Root Complex Integrated
/// Endpoint (PCIe Base 6.0 §7.5.3.2), which is what SIOV devices such as DSA are.
const PCIE_CAPS_RCIEP: u32 = 0x0092;
const CMD_MEMORY: u32 = 1 << 1;

/// Moves BAR windows on the guest's MMIO bus (and the doorbell ioeventfd with them).
pub trait BarMapper: Send + Sync {
    /// BAR0 of `bdf` moves from `old` to `new` (either may be "not mapped").
    fn remap(&self, bdf: Bdf, old: Option<u64>, new: Option<u64>);
}

/// The function.
pub struct AdiFunction {
    adi: AdiId,
    bdf: Bdf,
    config: ConfigSpace,
    msix: Msix,
    device: Arc<dyn SiovDevice>,
    ims: ImsGroup,
    /// Per vector, the eventfd its IMS entry signals; made when the guest first programs the
    /// vector, so idle ADIs hold no file descriptors for interrupts.
    vector_fds: Vec<Option<Arc<EventFd>>>,
    router: Arc<MsiRouter>,
    /// Weak: the mapper's bus holds this function while its BAR is mapped, so a strong
    /// reference would be a cycle that keeps the VM alive after release.
    mapper: Weak<dyn BarMapper>,
    doorbell: Arc<EventFd>,
    mapped: Option<u64>,
    /// BAR0's queue registers.
    regs: QueueRegisters,
    /// Doorbell writes that exited to siovmm instead of completing in KVM's ioeventfd.
    slow_doorbells: u64,
    /// Operations a guest access triggered that failed (see [`AdiFunction::failed`]).
    failures: u64,
    /// Hypercall IMS slots (slot s is interrupt handle `msix vectors + s`) and, in trap mode,
    /// the guest-visible IMS window backed by them.
    slots: ImsSlots,
    /// vCPUs of the VM (messages may only name these APIC IDs).
    vcpus: u32,
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

/// Failures of guest-triggered operations logged per function; later ones are only counted.
const LOGGED_FAILURES: u64 = 8;

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
    /// vCPUs of the VM.
    pub vcpus: u32,
}

impl std::fmt::Debug for AdiParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdiParts").field("adi", &self.adi).field("bdf", &self.bdf).finish_non_exhaustive()
    }
}

impl AdiFunction {
    /// Builds the function; binds one eventfd per vector to its IMS entry and sets the ADI's
    /// interrupt handles.
    pub fn new(p: AdiParts) -> Result<Self, siov::Error> {
        let vectors = p.ims.count.min(u32::from(MAX_MSIX_VECTORS)) as u16;
        let msix = Msix::new(vectors);
        let mut config = ConfigSpace::new(SIOVMM_VENDOR_ID, ADI_DEVICE_ID, ADI_CLASS, 1);
        // Status: capability list present. Command: memory decode on (firmware assigned BAR0).
        config.set_reg(1, 1 << 20 | CMD_MEMORY);
        if p.multifunction {
            config.set_reg(3, 0x80 << 16);
        }
        // BAR0: 64-bit memory, size BAR0_SIZE; BAR1 is its upper half.
        config.set_reg(4, (p.bar0 as u32 & !0xf) | 0x4);
        config.set_reg(5, (p.bar0 >> 32) as u32);
        config.set_writable(4, !(BAR0_SIZE as u32 - 1) & !0xf);
        config.set_writable(5, u32::MAX);
        config.set_reg(0x2c / 4, u32::from(SIOVMM_VENDOR_ID) | u32::from(ADI_DEVICE_ID) << 16);
        config.set_reg(0x34 / 4, CAP_OFFSET as u32);
        config.set_reg(CAP_OFFSET / 4 + 1, MSIX_TABLE as u32); // BIR 0
        config.set_reg(CAP_OFFSET / 4 + 2, MSIX_PBA as u32); // BIR 0
        // PCI Express capability (§7.5.3): an RCiEP has no link, slot or root registers.
        let pcie = PCIE_CAP_OFFSET / 4;
        config.set_reg(pcie, CAP_ID_PCIE | PCIE_CAPS_RCIEP << 16);
        config.set_reg(pcie + 1, 1 << 15); // Device Capabilities: role-based error reporting, 128 B payload
        config.set_reg(pcie + 2, 0x2810); // Device Control reset value: MRRS 512 B, relaxed ordering, no snoop
        config.set_writable(pcie + 2, 0x0000_7fff); // Device Control is RW; Device Status stays 0

        let vector_fds = vec![None; usize::from(vectors)];
        let handles: Vec<_> = p.ims.indexes().take(usize::from(vectors)).map(Some).collect();
        p.device.set_interrupt_handles(p.adi, &handles)?;
        let f = Self {
            adi: p.adi,
            bdf: p.bdf,
            config,
            msix,
            device: p.device,
            ims: p.ims,
            vector_fds,
            router: p.router,
            mapper: p.mapper,
            doorbell: p.doorbell,
            mapped: None,
            regs: QueueRegisters::default(),
            slow_doorbells: 0,
            failures: 0,
            slots: ImsSlots::new(p.ims_trap),
            vcpus: p.vcpus,
        };
        Ok(f)
    }

    /// Maps BAR0 where config space says, if memory decode is on. Call after construction.
    pub fn update_bar_mapping(&mut self) {
        let lo = self.config.read_reg(4);
        let hi = self.config.read_reg(5);
        let addr = u64::from(hi) << 32 | u64::from(lo & !0xf);
        let decode = self.config.read_reg(1) & CMD_MEMORY != 0;
        // While the guest sizes the BAR (all-ones written) or has not placed it, leave it unmapped.
        let sizing = lo & !0xf == !(BAR0_SIZE as u32 - 1) & !0xf && hi == u32::MAX;
        let new = (decode && addr != 0 && !sizing && addr.checked_add(BAR0_SIZE).is_some()).then_some(addr);
        if new != self.mapped {
            // Once the VDCM is gone (the VM is being released) nothing moves any more.
            if let Some(mapper) = self.mapper.upgrade() {
                mapper.remap(self.bdf, self.mapped, new);
            }
            self.mapped = new;
        }
    }

    /// Takes BAR0 off the guest's bus (the function is being removed).
    pub fn unmap_bar(&mut self) {
        if let (Some(old), Some(mapper)) = (self.mapped, self.mapper.upgrade()) {
            mapper.remap(self.bdf, Some(old), None);
        }
        self.mapped = None;
    }

    /// Records an operation a guest access triggered that failed: counted always, logged
    /// for the first few per function (a hostile guest must not be able to flood the log).
    /// Nothing on a guest path is discarded silently.
    fn failed<T, E: std::fmt::Display>(&mut self, what: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.failures += 1;
                if self.failures <= LOGGED_FAILURES {
                    log::warn!("ADI {} ({}): {what}: {e}", self.adi.0, self.bdf);
                }
                None
            }
        }
    }

    /// Guest-triggered operations that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    fn apply(&mut self, change: VectorChange) {
        let Some(index) = self.ims.indexes().nth(usize::from(change.vector)) else { return };
        let key = VectorKey::msix(self.adi.0, u32::from(change.vector));
        if !self.msix.enabled() {
            let r = self.router.unbind(key);
            self.failed("unbinding an MSI-X vector", r);
        } else if !change.masked || change.message.address != 0 {
            let Some(fd) = self.vector_fd(change.vector, index) else { return };
            // A route for the guest's message: the guest can only name its own APICs, since the
            // route lives in its own VM.
            let r = self.router.bind(key, fd, change.message);
            self.failed("binding an MSI-X vector", r);
        }
        // Mask (or unmask: the device then delivers a pending interrupt, once).
        let r = self.device.ims_set_mask(self.adi, index, change.masked);
        self.failed("masking an IMS entry", r);
    }

    /// Requester ID (bus << 8 | devfn) of the function.
    pub fn requester_id(&self) -> u16 {
        self.bdf.0
    }

    /// Gives the device the handle table: MSI-X vectors first, then hypercall slots.
    fn publish_handles(&self) -> Result<(), siov::Error> {
        let mut handles: Vec<Option<siov::ImsIndex>> =
            self.ims.indexes().take(self.vector_fds.len()).map(Some).collect();
        handles.extend(self.slots.handles());
        self.device.set_interrupt_handles(self.adi, &handles)
    }

    /// Hypercall IMS_ALLOC: `count` more IMS entries for this ADI; returns the first slot.
    pub fn pv_alloc(&mut self, count: u32) -> Result<u32, Status> {
        let first = self.slots.reserve(count).ok_or(Status::Exhausted)?;
        let Ok(group) = self.device.ims_alloc(self.adi, count) else {
            self.slots.unreserve(first, count);
            return Err(Status::Exhausted);
        };
        self.slots.fill(first, group);
        self.publish_handles().map_err(|_| Status::Exhausted)?;
        Ok(first)
    }

    /// Hypercall IMS_FREE of the group starting at `first`.
    pub fn pv_free(&mut self, first: u32) -> Result<(), Status> {
        let group = self.slots.release(first).ok_or(Status::NoSuchSlot)?;
        for slot in first..first + group.count {
            let r = self.router.unbind(VectorKey::ims(self.adi.0, slot));
            self.failed("unbinding an IMS slot", r);
        }
        // Revoke the handles before the entries go back to the device.
        let r = self.publish_handles();
        self.failed("publishing interrupt handles", r);
        self.device.ims_free(self.adi, group).map_err(|_| Status::NoSuchSlot)
    }

    fn pv_slot(&mut self, slot: u32) -> Result<&mut PvSlot, Status> {
        self.slots.slot_mut(slot).ok_or(Status::NoSuchSlot)
    }

    /// Hypercall IMS_COMPOSE: the host composes the message raising `message` (already
    /// validated against this VM's vCPUs) and programs the slot: its IMS entry signals an
    /// eventfd routed to that message in this VM only. Returns the slot's interrupt handle.
    pub fn pv_compose(&mut self, slot: u32, message: MsiMessage) -> Result<u64, Status> {
        let key = VectorKey::ims(self.adi.0, slot);
        let handle = self.vector_fds.len() as u64 + u64::from(slot);
        let (device, adi) = (self.device.clone(), self.adi);
        let s = self.pv_slot(slot)?;
        let fd = bound_eventfd(device.as_ref(), adi, &mut s.fd, s.index)?;
        self.router.bind(key, fd, message).map_err(|_| Status::Exhausted)?;
        Ok(handle)
    }

    /// A guest read of the trapped IMS window; inert (zeros) outside trap mode.
    fn read_window(&self, offset: u64) -> u32 {
        let Some((dword, backing)) = self.slots.window_read(offset) else { return 0 };
        if offset % 16 != 12 {
            return dword;
        }
        let mut ctrl = dword & ims_ctrl::MASK;
        if let Some(b) = backing {
            if self.slots.index(b).is_some_and(|i| self.device.ims_pending(self.adi, i).unwrap_or(false)) {
                ctrl |= ims_ctrl::PENDING;
            }
            ctrl |= ims_ctrl::BACKED | (self.vector_fds.len() as u32 + b) << 16;
        }
        ctrl
    }

    /// A guest write to the trapped IMS window: the guest's own message for a slot becomes a
    /// host IMS entry (allocated on first use) routed to that message, like an MSI-X entry.
    fn write_window(&mut self, offset: u64, value: u32) {
        let Some((slot, entry, backing)) = self.slots.window_write(offset, value) else { return };
        let message = entry.message();
        let valid = msi_destination(message).is_some_and(|d| d < self.vcpus) && (message.data & 0xff) >= 32;
        if entry.is_masked() || !valid {
            // Masked, or a message naming nothing of this VM: the entry raises nothing.
            if let Some(b) = backing {
                let r = self.pv_mask(b, true);
                self.failed("masking a trapped IMS slot", r);
            }
            return;
        }
        let backing = match backing {
            Some(b) => b,
            None => match self.pv_alloc(1) {
                Ok(b) => b,
                Err(_) => return, // IMS exhausted: the slot stays unbacked (ctrl says so)
            },
        };
        self.slots.set_backing(slot, backing);
        let composed = self.pv_compose(backing, message);
        if self.failed("composing a trapped IMS slot", composed).is_some() {
            let r = self.pv_mask(backing, false);
            self.failed("unmasking a trapped IMS slot", r);
        }
    }

    /// Hypercall IMS_MASK. Unmasking delivers a pending interrupt once.
    pub fn pv_mask(&mut self, slot: u32, masked: bool) -> Result<(), Status> {
        let index = self.pv_slot(slot)?.index;
        self.device.ims_set_mask(self.adi, index, masked).map_err(|_| Status::NoSuchSlot)
    }

    /// Doorbell writes that reached siovmm (0 when the ioeventfd fast path took them all).
    pub fn slow_doorbells(&self) -> u64 {
        self.slow_doorbells
    }

    /// The eventfd behind `vector`, once the guest has programmed it.
    pub fn vector_eventfd(&self, vector: u16) -> Option<Arc<EventFd>> {
        self.vector_fds.get(usize::from(vector)).cloned().flatten()
    }

    /// The vector's eventfd, made and bound to its IMS entry on first use.
    fn vector_fd(&mut self, vector: u16, index: siov::ImsIndex) -> Option<Arc<EventFd>> {
        let slot = self.vector_fds.get_mut(usize::from(vector))?;
        bound_eventfd(self.device.as_ref(), self.adi, slot, index).ok()
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match self.regs.write(offset, value) {
            None => {}
            Some(Action::Reset) => {
                let r = self.device.reset_adi(self.adi);
                self.failed("resetting the ADI", r);
                let r = self.publish_handles();
                self.failed("publishing interrupt handles", r);
            }
            Some(Action::Queue(queue)) => {
                let accepted = self.device.configure_queue(self.adi, queue).is_ok();
                self.regs.enabled(queue.is_some(), accepted);
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let caps = self.device.info().max_queue_size.min(0xffff) | u32::from(self.msix.vectors()) << 16;
        self.regs.read(offset, caps)
    }
}

/// The eventfd in `slot`, or a new one bound to IMS entry `index` (kept in `slot`) on first use.
/// Fails with EXHAUSTED when no eventfd can be made, NO_SUCH_SLOT when the entry refuses it.
fn bound_eventfd(
    device: &dyn SiovDevice,
    adi: AdiId,
    slot: &mut Option<Arc<EventFd>>,
    index: siov::ImsIndex,
) -> Result<Arc<EventFd>, Status> {
    if let Some(fd) = slot {
        return Ok(fd.clone());
    }
    let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|_| Status::Exhausted)?);
    device.ims_bind(adi, index, Some(fd.clone())).map_err(|_| Status::NoSuchSlot)?;
    *slot = Some(fd.clone());
    Ok(fd)
}

impl PciFunction for AdiFunction {
    fn config_read(&mut self, reg: usize) -> u32 {
        if reg == CAP_OFFSET / 4 {
            return u32::from(devices::pci::msix::CAP_ID_MSIX)
                | (PCIE_CAP_OFFSET as u32) << 8
                | u32::from(self.msix.message_control()) << 16;
        }
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg == CAP_OFFSET / 4 {
            // Message control is the upper half of the capability's first dword.
            let mut dword = (u32::from(self.msix.message_control()) << 16).to_le_bytes();
            let start = offset as usize;
            if start + data.len() <= 4 {
                dword[start..start + data.len()].copy_from_slice(data);
                let control = u16::from_le_bytes([dword[2], dword[3]]);
                if start + data.len() > 2 {
                    for change in self.msix.write_message_control(control) {
                        self.apply(change);
                    }
                }
            }
            return;
        }
        self.config.write_reg(reg, offset, data);
        if reg == 1 || reg == 4 || reg == 5 {
            self.update_bar_mapping();
        }
    }
}

impl BusDevice for AdiFunction {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < DOORBELL && data.len() == 4 && o % 4 == 0 => {
                data.copy_from_slice(&self.read_register(o).to_le_bytes());
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_size()).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + self.msix.pba_size()).contains(&o) => {
                let (device, adi, first) = (&self.device, self.adi, self.ims.first);
                self.msix.read_pba(o - MSIX_PBA, data, |v| device.ims_pending(adi, first + u32::from(v)).unwrap_or(false));
            }
            o if (IMS_WINDOW..BAR0_SIZE).contains(&o) && data.len() == 4 && o % 4 == 0 => {
                data.copy_from_slice(&self.read_window(o - IMS_WINDOW).to_le_bytes());
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < DOORBELL && data.len() == 4 && o % 4 == 0 => {
                self.write_register(o, u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            }
            // Reached only when the ioeventfd did not take the write (e.g. before it exists).
            o if (DOORBELL..DOORBELL + 8).contains(&o) => {
                self.slow_doorbells += 1;
                let r = self.doorbell.write(1);
                self.failed("ringing the doorbell", r);
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_size()).contains(&o) => {
                if let Some(change) = self.msix.write_table(o - MSIX_TABLE, data) {
                    self.apply(change);
                }
            }
            o if (IMS_WINDOW..BAR0_SIZE).contains(&o) && data.len() == 4 && o % 4 == 0 => {
                self.write_window(o - IMS_WINDOW, u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The function against the software device and a fake route backend: no KVM.
    use super::*;
    use siovmm_interrupts::RouteBackend;
    use siovmm_vfio::dma::GuestRam;
    use siovmm_vfio::siov::{ImsStorage, Portal};
    use siovmm_vfio::soft::SoftSiovDevice;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// Routes as KVM would hold them; refuses every change while `refuse` is set.
    #[derive(Default)]
    struct FakeRoutes {
        routes: Mutex<Vec<(u32, MsiMessage)>>,
        refuse: AtomicBool,
    }

    impl RouteBackend for FakeRoutes {
        fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()> {
            if self.refuse.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            *self.routes.lock().unwrap() = routes.to_vec();
            Ok(())
        }
        fn irqfd(&self, _: &EventFd, _: u32, _: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn signal_msi(&self, _: MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct NoBars;
    impl BarMapper for NoBars {
        fn remap(&self, _: Bdf, _: Option<u64>, _: Option<u64>) {}
    }

    fn function(routes: Arc<FakeRoutes>) -> AdiFunction {
        let device = Arc::new(SoftSiovDevice::new(1, 64, ImsStorage::OnDevice, 1).unwrap());
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let dma = device.dma_bind(Arc::new(GuestRam(mem))).unwrap();
        let Portal::Doorbell(doorbell) = device.open_adi(AdiId(0), dma).unwrap();
        let ims = device.ims_alloc(AdiId(0), 2).unwrap();
        let mapper: Arc<dyn BarMapper> = Arc::new(NoBars);
        AdiFunction::new(AdiParts {
            adi: AdiId(0),
            bdf: Bdf::new(0, 1, 0),
            multifunction: false,
            ims,
            device,
            doorbell,
            router: Arc::new(MsiRouter::new(routes, 16).unwrap()),
            // Dropped at once: the test never moves the BAR.
            mapper: Arc::downgrade(&mapper),
            bar0: 0xc000_0000,
            ims_trap: false,
            vcpus: 1,
        })
        .unwrap()
    }

    /// The guest enables MSI-X and programs vector 0 with `message`, unmasked.
    fn program_vector0(f: &mut AdiFunction, data: u32) {
        f.config_write(CAP_OFFSET / 4, 2, &(devices::pci::msix::CTRL_ENABLE).to_le_bytes());
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
    fn a_failed_route_is_counted_not_dropped() {
        let routes = Arc::new(FakeRoutes::default());
        let mut f = function(routes.clone());
        routes.refuse.store(true, Ordering::Relaxed);
        program_vector0(&mut f, 0x41);
        assert!(routes.routes.lock().unwrap().is_empty());
        assert!(f.failures() >= 1, "the refused bind was not recorded");
    }
}
