//! One ADI served to one vfio-user client: the device-side composition a host VDCM driver
//! would do (config space, BAR0's register file and doorbell, MSI-X vectors backed by IMS
//! entries), answering the client's region accesses, DMA maps and interrupt setup.
//!
//! Division of labour with the client (a VMM's generic VFIO PCI function, as with kernel
//! VFIO): the client virtualizes BAR addresses, the command register and the MSI-X table and
//! its masks; the device here says what the function *is* (config space, region 0 = BAR0,
//! the MSI-X interrupt index with one vector per IMS entry) and, for `SET_IRQS`, makes IMS
//! entry `first + v` signal the eventfd the client handed over for vector v, so a completion
//! interrupt goes from the device's worker straight to the client's KVM irqfd.
//!
//! BAR0 is `siovmm_vdcm::adi`'s layout (docs/siov-device.md): registers below 0x1000, the
//! doorbell at 0x1000. The doorbell is the device's own eventfd, handed to the client as an
//! ioeventfd (GET_REGION_IO_FDS) so that KVM signals the worker directly; a doorbell write
//! that arrives as a region write (a client without ioeventfds) signals the same eventfd.
//! Accesses outside what the layout defines read as zero and are dropped; nothing a client
//! sends can panic this code.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;

use devices::pci::msix::{CTRL_ENABLE, CTRL_FUNCTION_MASK};
use siovmm_hypercall::Status;
use siovmm_vdcm::adi::config::{AdiConfig, ConfigWrite};
use siovmm_vdcm::adi::ims_slots::ImsSlots;
use siovmm_vdcm::adi::registers::{Action, QueueRegisters};
use siovmm_vdcm::adi::slot_device::SlotDevice;
use siovmm_vdcm::adi::{BAR0_SIZE, DOORBELL, MAX_PV_SLOTS};
use siovmm_vfio::siov::{self, AdiId, DmaHandle, ImsGroup, ImsStorage, Portal, PortalPage, SiovDevice};
use siovmm_vfio::user::ims_mailbox::{self, Offer, Request, SlotState};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::dma::ClientMemory;
use crate::pool::Pool;

/// PCI Express config space: 4 KiB.
const CONFIG_SIZE: u64 = 4096;

fn einval() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}

/// The errno a device refusal is reported with.
pub fn device_error(e: siov::Error) -> std::io::Error {
    log::warn!("device: {e}");
    std::io::Error::from_raw_os_error(match e {
        siov::Error::ImsExhausted { .. } | siov::Error::Resources(_) => libc::ENOSPC,
        siov::Error::AdiBusy(_) => libc::EBUSY,
        _ => libc::EINVAL,
    })
}

/// The size of region `index` of an ADI: BAR0, config space, the IMS mailbox; 0 for the
/// PCI regions it does not have.
fn region_size(index: u32) -> u64 {
    match index {
        VFIO_PCI_BAR0_REGION_INDEX => BAR0_SIZE,
        VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE,
        ims_mailbox::REGION_INDEX => ims_mailbox::SIZE,
        _ => 0,
    }
}

/// The regions and interrupts every ADI has (what `DEVICE_GET_REGION_INFO` and
/// `DEVICE_GET_IRQ_INFO` answer): the PCI ones, then the IMS mailbox's region and interrupt
/// index (`siovmm_vfio::user::ims_mailbox`), whose vector n is hypercall slot n.
pub fn layout(vectors: u16) -> (Vec<ServerRegion>, Vec<IrqInfo>) {
    let regions = (0..=ims_mailbox::REGION_INDEX)
        .map(|index| {
            let size = region_size(index);
            let flags = if size > 0 { VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE } else { 0 };
            ServerRegion {
                region_info: vfio_region_info { argsz: 0, flags, index, cap_offset: 0, size, offset: 0 },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect();
    let irqs = (0..=ims_mailbox::IRQ_INDEX)
        .map(|index| IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: match index {
                VFIO_PCI_MSIX_IRQ_INDEX => u32::from(vectors),
                ims_mailbox::IRQ_INDEX => MAX_PV_SLOTS,
                _ => 0,
            },
        })
        .collect();
    (regions, irqs)
}

/// One ADI opened for one client. Dropping it closes the ADI (the device frees its IMS
/// entries) and unbinds the client's memory.
pub struct AdiBackend {
    device: Arc<dyn SiovDevice>,
    adi: AdiId,
    dma: DmaHandle,
    memory: Arc<ClientMemory>,
    doorbell: Arc<EventFd>,
    /// The portal page, when the device maps portals.
    page: Option<PortalPage>,
    ims: ImsGroup,
    config: AdiConfig,
    regs: QueueRegisters,
    /// The client's eventfd per vector, once set.
    vector_fds: Vec<Option<Arc<EventFd>>>,
    /// MSI-X message control's enable and function-mask bits as the client last wrote them.
    msix_bits: u16,
    /// The hypercall slots the client's guest took through the IMS mailbox, made at its first
    /// allocation (most ADIs never get one, and a daemon holds thousands).
    slots: Option<Box<ImsSlots>>,
    /// The device keeps IMS in queue memory.
    in_queue: bool,
    /// The reply to the last mailbox request.
    mailbox_reply: [u8; 16],
    /// Where the slots' IMS entries are counted against the client VMM's limit.
    account: Option<(Arc<Pool>, i32)>,
}

impl std::fmt::Debug for AdiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdiBackend").field("adi", &self.adi).field("ims", &self.ims).finish_non_exhaustive()
    }
}

impl AdiBackend {
    /// Opens `adi` on `device` for the VM `owner` names (its VMM's process ID; `None`: not
    /// known, so its doorbell is its own) with `vectors` MSI-X vectors, each backed by one IMS
    /// entry.
    pub fn open(device: Arc<dyn SiovDevice>, adi: AdiId, vectors: u16, owner: Option<u64>) -> Result<Self, siov::Error> {
        let memory = ClientMemory::new();
        let dma = device.dma_bind(memory.clone())?;
        // A mapped portal page is not offered over vfio-user yet: the doorbell serves.
        let opened = match owner {
            Some(owner) => device.open_adi_for(adi, dma, owner),
            None => device.open_adi(adi, dma),
        };
        let opened = opened.and_then(|portal: Portal| {
            let doorbell = (portal.doorbell().clone(), portal.page().cloned());
            let ims = device.ims_alloc(adi, u32::from(vectors)).inspect_err(|_| {
                let _ = device.close_adi(adi);
            })?;
            Ok((doorbell, ims))
        });
        let ((doorbell, page), ims) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = device.dma_unbind(dma);
                return Err(e);
            }
        };
        let in_queue = device.info().ims_storage == ImsStorage::InMemory;
        let backend = Self {
            device,
            adi,
            dma,
            memory,
            doorbell,
            page,
            ims,
            config: AdiConfig::new(0, false),
            regs: QueueRegisters::default(),
            vector_fds: vec![None; usize::from(vectors)],
            msix_bits: 0,
            slots: None,
            in_queue,
            mailbox_reply: ims_mailbox::encode_reply(Err(Status::NoSuchCall)),
            account: None,
        };
        backend.publish_handles()?;
        Ok(backend)
    }

    /// Counts the IMS entries of the hypercall slots the client's guest takes against VMM
    /// `pid`'s limit in `pool` (its ADIs' vectors are counted there already).
    pub fn with_ims_account(mut self, pool: Arc<Pool>, pid: i32) -> Self {
        self.account = Some((pool, pid));
        self
    }

    /// Interrupt handle v fires vector v's IMS entry; handle `vectors + s` hypercall slot s
    /// (its entry, or with IMS in queue memory the entry stored in the queue's IMS area).
    fn publish_handles(&self) -> Result<(), siov::Error> {
        let mut handles: Vec<_> = self.ims.indexes().map(|i| Some(siov::HandleTarget::Entry(i))).collect();
        if let Some(slots) = &self.slots {
            handles.extend(slots.handles(self.in_queue));
        }
        self.device.set_interrupt_handles(self.adi, &handles)
    }

    /// The device half of the hypercall slots, and their books.
    fn slot_device(&mut self) -> (SlotDevice<'_>, &mut ImsSlots) {
        let slots = self.slots.get_or_insert_with(|| Box::new(ImsSlots::new()));
        (SlotDevice { device: self.device.as_ref(), adi: self.adi, in_queue: self.in_queue }, slots)
    }

    /// Runs one IMS mailbox request (the IMS hypercall's device half, docs/devd.md).
    fn mailbox(&mut self, request: Request) -> Result<u64, Status> {
        // Only an allocation makes the books; a request about slots before one names none.
        if self.slots.is_none() && matches!(request, Request::Free { .. } | Request::Message { .. } | Request::Mask { .. } | Request::State { .. }) {
            return Err(Status::NoSuchSlot);
        }
        match request {
            Request::Query => Ok(Offer { slots_per_adi: MAX_PV_SLOTS, in_queue: self.in_queue }.encode()),
            Request::Alloc { count } => {
                if count == 0 || count > siovmm_hypercall::MAX_GROUP {
                    return Err(Status::InvalidArgument);
                }
                if let Some((pool, pid)) = &self.account {
                    pool.take_ims(*pid, count).map_err(|e| {
                        log::warn!("ADI {}: {e}", self.adi.0);
                        Status::Exhausted
                    })?;
                }
                let (device, slots) = self.slot_device();
                let allocated = device.alloc(slots, count);
                let first = allocated.inspect_err(|_| self.give_ims(count))?;
                self.publish_handles().map_err(|e| {
                    log::warn!("ADI {}: publishing interrupt handles: {e}", self.adi.0);
                    Status::Exhausted
                })?;
                Ok(u64::from(first))
            }
            Request::Free { first } => {
                let (device, slots) = self.slot_device();
                let group = device.release(slots, first)?;
                self.give_ims(group.count);
                // Revoke the handles before the entries go back to the device.
                if let Err(e) = self.publish_handles() {
                    log::warn!("ADI {}: publishing interrupt handles: {e}", self.adi.0);
                }
                self.slot_device().0.give_back(group).map(|()| 0)
            }
            Request::Message { slot } => {
                let (device, slots) = self.slot_device();
                device.composed(slots, slot)
            }
            Request::Mask { slot, masked } => {
                let (device, slots) = self.slot_device();
                device.mask(slots, slot, masked).map(|()| 0)
            }
            // For a VMM's trapped IMS window: what its control word reports.
            Request::State { slot } => {
                let handle = self.ims.count + slot;
                let (device, slots) = self.slot_device();
                Ok(SlotState { pending: device.pending(slots, slot)?, handle }.encode())
            }
        }
    }

    fn give_ims(&self, count: u32) {
        if let Some((pool, pid)) = &self.account {
            pool.give_ims(*pid, count);
        }
    }

    /// Frees every hypercall slot (a device reset, or the client leaving).
    fn free_slots(&mut self) {
        while let Some(first) = self.slots.as_ref().and_then(|s| s.first_group()) {
            if let Err(s) = self.mailbox(Request::Free { first }) {
                log::warn!("ADI {}: freeing IMS slots from {first}: {s}", self.adi.0);
            }
        }
    }

    /// A mailbox region write: a whole request at offset 0 runs it; anything else is ignored.
    fn mailbox_write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let result = Request::decode(data).ok_or(Status::InvalidArgument).and_then(|r| self.mailbox(r));
        self.mailbox_reply = ims_mailbox::encode_reply(result);
    }

    /// A mailbox region read: the reply to the last request at [`ims_mailbox::REPLY`], zeros
    /// elsewhere.
    fn mailbox_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = at.checked_sub(ims_mailbox::REPLY).and_then(|r| self.mailbox_reply.get(r as usize)).copied().unwrap_or(0);
        }
    }

    /// MSI-X message control as the device reports it: the table size, and the enable and
    /// function-mask bits as written. What they do is the client's (it owns the MSI-X table and
    /// its masks), but they read back as written, as kernel vfio-pci's virtualized config space
    /// does: a client that passes the guest's reads through (Cloud Hypervisor) lets Linux's
    /// read-modify-write of the control word (`pci_msix_clear_and_set_ctrl`) see its own
    /// enable bit, instead of clearing it.
    fn msix_control(&self) -> u16 {
        (self.ims.count.saturating_sub(1) & 0x7ff) as u16 | self.msix_bits
    }

    fn caps(&self) -> u32 {
        self.device.info().max_queue_size.min(0xffff) | self.ims.count << 16
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let dword = self.config.read((at / 4) as usize, self.msix_control()).to_le_bytes();
            *byte = dword[(at % 4) as usize];
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        // Within one dword (the client splits larger writes), as PCI config cycles are.
        if offset % 4 + data.len() as u64 > 4 {
            return;
        }
        match self.config.write((offset / 4) as usize, offset % 4, data, self.msix_control()) {
            // BAR placement and MSI-X enable are the client's; the device has nothing to do.
            ConfigWrite::Stored | ConfigWrite::Placement => {}
            ConfigWrite::MsixControl(value) => self.msix_bits = value & (CTRL_ENABLE | CTRL_FUNCTION_MASK),
        }
    }

    fn bar0_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset < DOORBELL && data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.regs.read(offset, self.caps()).to_le_bytes());
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if (DOORBELL..DOORBELL + 8).contains(&offset) {
            return self.doorbell.write(1);
        }
        if offset >= DOORBELL || data.len() != 4 || !offset.is_multiple_of(4) {
            return Ok(());
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match self.regs.write(offset, value) {
            None => {}
            Some(Action::Reset) => {
                self.device.reset_adi(self.adi).map_err(device_error)?;
                self.publish_handles().map_err(device_error)?;
            }
            Some(Action::Queue(queue)) => {
                let accepted = self.device.configure_queue(self.adi, queue).is_ok();
                self.regs.enabled(queue.is_some(), accepted);
            }
        }
        Ok(())
    }

    /// Points vector `v`'s IMS entry at `fd` (unmasked), or unbinds and masks it.
    fn bind_vector(&mut self, v: u32, fd: Option<Arc<EventFd>>) -> Result<(), siov::Error> {
        let index = self.ims.first + v;
        let masked = fd.is_none();
        self.device.ims_bind(self.adi, index, fd.clone())?;
        self.device.ims_set_mask(self.adi, index, masked)?;
        self.vector_fds[v as usize] = fd;
        Ok(())
    }

    /// The vectors the client has bound.
    pub fn bound_vectors(&self) -> usize {
        self.vector_fds.iter().filter(|f| f.is_some()).count()
    }

    /// Hypercall slots the client's guest holds.
    pub fn ims_slots_held(&self) -> u32 {
        self.slots.as_ref().map_or(0, |s| s.held())
    }

    /// SET_IRQS of the IMS mailbox's interrupt index: slot `start + i`'s entry signals
    /// `fds[i]` from now on. Only eventfd triggers, only for live slots; all or nothing
    /// checked first.
    fn bind_slots(&mut self, flags: u32, start: u32, count: u32, fds: Vec<File>) -> Result<(), std::io::Error> {
        if flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 || flags & VFIO_IRQ_SET_DATA_EVENTFD == 0 || fds.len() != count as usize {
            return Err(einval());
        }
        let end = start.checked_add(count).ok_or_else(einval)?;
        if (start..end).any(|slot| self.slots.as_ref().and_then(|s| s.index(slot)).is_none()) {
            return Err(einval());
        }
        for (slot, fd) in (start..end).zip(fds) {
            let (device, slots) = self.slot_device();
            device.bind(slots, slot, client_eventfd(fd)).map_err(|_| einval())?;
        }
        Ok(())
    }
}

impl Drop for AdiBackend {
    fn drop(&mut self) {
        // The device frees every entry of the ADI when it closes; the client VMM's count
        // gets the slots' back.
        self.give_ims(self.ims_slots_held());
        if let Err(e) = self.device.close_adi(self.adi) {
            log::warn!("closing ADI {}: {e}", self.adi.0);
        }
        if let Err(e) = self.device.dma_unbind(self.dma) {
            log::warn!("unbinding ADI {}'s DMA: {e}", self.adi.0);
        }
        self.memory.clear();
    }
}

/// A descriptor a client passed with SET_IRQS, as the eventfd the device signals.
fn client_eventfd(fd: File) -> Arc<EventFd> {
    // SAFETY: `fd` is a descriptor the client passed us and we own; an eventfd is the only
    // thing the protocol allows here, and a wrong kind only makes the device's writes fail.
    Arc::new(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

/// EINVAL unless `len` bytes at `offset` lie inside region `region`, one the ADI has (its
/// config space, BAR0 or the IMS mailbox).
fn check_access(region: u32, offset: u64, len: usize) -> Result<(), std::io::Error> {
    let size = region_size(region);
    if size == 0 {
        return Err(einval());
    }
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(einval());
    }
    Ok(())
}

impl ServerBackend for AdiBackend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), std::io::Error> {
        check_access(region, offset, data.len())?;
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config_read(offset, data),
            ims_mailbox::REGION_INDEX => self.mailbox_read(offset, data),
            _ => self.bar0_read(offset, data),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        check_access(region, offset, data.len())?;
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                self.config_write(offset, data);
                Ok(())
            }
            ims_mailbox::REGION_INDEX => {
                self.mailbox_write(offset, data);
                Ok(())
            }
            _ => self.bar0_write(offset, data),
        }
    }

    fn dma_map(&mut self, _flags: DmaMapFlags, offset: u64, address: u64, size: u64, fd: Option<File>) -> Result<(), std::io::Error> {
        self.memory.map(fd, offset, address, size).map_err(|e| {
            log::warn!("ADI {}: {e}", self.adi.0);
            einval()
        })
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> Result<(), std::io::Error> {
        self.memory.unmap(address, size).map_err(|e| {
            log::warn!("ADI {}: {e}", self.adi.0);
            einval()
        })
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        for v in 0..self.ims.count {
            self.bind_vector(v, None).map_err(device_error)?;
        }
        self.free_slots();
        self.regs = QueueRegisters::default();
        self.device.reset_adi(self.adi).map_err(device_error)?;
        self.publish_handles().map_err(device_error)
    }

    fn set_irqs(&mut self, index: u32, flags: u32, start: u32, count: u32, fds: Vec<File>) -> Result<(), std::io::Error> {
        if index == ims_mailbox::IRQ_INDEX {
            return self.bind_slots(flags, start, count, fds);
        }
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            return if count == 0 { Ok(()) } else { Err(einval()) };
        }
        if flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
            return Err(einval());
        }
        if flags & VFIO_IRQ_SET_DATA_NONE != 0 && count == 0 {
            // Disable: every vector unbound and masked.
            for v in 0..self.ims.count {
                self.bind_vector(v, None).map_err(device_error)?;
            }
            return Ok(());
        }
        if flags & VFIO_IRQ_SET_DATA_EVENTFD == 0 || fds.len() != count as usize {
            return Err(einval());
        }
        let end = start.checked_add(count).filter(|&e| e <= self.ims.count).ok_or_else(einval)?;
        for (v, fd) in (start..end).zip(fds) {
            self.bind_vector(v, Some(client_eventfd(fd))).map_err(device_error)?;
        }
        Ok(())
    }
}

impl crate::server::RegionIoFds for AdiBackend {
    fn region_type(&self, index: u32) -> Option<(u32, u32)> {
        (index == ims_mailbox::REGION_INDEX).then_some((ims_mailbox::REGION_TYPE, ims_mailbox::REGION_SUBTYPE))
    }

    fn io_eventfds(&self, index: u32) -> Vec<crate::server::IoEventFd> {
        if index == VFIO_PCI_BAR0_REGION_INDEX {
            vec![crate::server::io_eventfd(DOORBELL, 8, self.doorbell.as_ref())]
        } else {
            Vec::new()
        }
    }

    /// With mapped portals (`--portals mapped`), BAR0's doorbell page is the ADI's portal
    /// page: a client that maps it there turns a guest's ring into a plain store, with no exit
    /// and no message (the ioeventfd stays offered for a client that does not map it).
    fn region_mmap(&self, index: u32) -> Option<crate::server::RegionMmap> {
        let page = self.page.as_ref().filter(|_| index == VFIO_PCI_BAR0_REGION_INDEX)?;
        Some(crate::server::RegionMmap {
            fd: page.file.as_raw_fd(),
            // The page is at the region's doorbell offset; `FIRST_PAGE` keeps this whole.
            offset: page.offset.checked_sub(DOORBELL)?,
            areas: vec![(DOORBELL, siovmm_vfio::soft::portal::PAGE)],
        })
    }
}
