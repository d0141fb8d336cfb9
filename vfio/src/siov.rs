//! The interface to one host SIOV device.
//!
//! Vocabulary (Intel Scalable IOV spec; DSA spec §7.5):
//! - an **ADI** (Assignable Device Interface) is a lightweight slice of the device, here one
//!   work queue with a submission portal; siovmm's VDCM composes it into a guest as a PCIe
//!   function;
//! - the **IMS** (Interrupt Message Store) holds interrupt messages in device-specific storage:
//!   address, data and a mask bit, like an MSI-X entry, but allocated and freed dynamically, in
//!   groups, at any time after start-up;
//! - an **interrupt handle** is what a descriptor names to request a completion interrupt: an
//!   index into the table of IMS entries the VDCM gave the ADI.
//!
//! Division of labour (the split a host VDCM driver and a device daemon keep alike):
//! - the **device side** owns its IMS: it allocates entries to an ADI, composes the host
//!   message each entry writes (the VMM only reads it back), checks on every operation that
//!   the entry belongs to the ADI named, and frees an ADI's entries when the ADI is closed;
//! - **DMA** is bound by handle: the VMM registers an address space once ([`SiovDevice::dma_bind`],
//!   the PASID binding of real hardware) and opens ADIs on the handle; the device refuses an
//!   unknown handle and keeps a handle bound while an ADI uses it;
//! - the **portal** is what the device offers for submissions ([`Portal`]): today a doorbell
//!   eventfd; a portal page the VMM maps into the guest comes with the first backend that has
//!   one (the device daemon's shared page, issue 11).
//!
//! Delivery: a fired IMS entry signals the eventfd bound to it (VFIO's SET_IRQS model); siovmm
//! binds that eventfd to a KVM MSI route with irqfd, so no VMM thread sits on the path.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::dma::DmaSpace;

/// Index of an ADI on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AdiId(pub u32);

/// Index of an IMS entry on its device.
pub type ImsIndex = u32;

/// Where a device keeps its IMS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImsStorage {
    /// An MMIO table on the device: 16 bytes per entry, `{addr_lo, addr_hi, data, ctrl}`; a VMM
    /// can trap a guest's accesses to it.
    OnDevice,
    /// In memory next to each queue: entries the host writes (those behind a guest's MSI-X
    /// vectors) in the host's part of the queue context, entries an enlightened guest writes
    /// in its queue's IMS area ([`queue_ims`](crate::soft::queue_ims)). Nothing a VMM can
    /// trap, so a guest stores there only host-composed messages it got by hypercall.
    InMemory,
}

impl ImsStorage {
    /// The storage a command line names: `on-device` or `in-memory`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::OnDevice, Self::InMemory].into_iter().find(|s| s.name() == name)
    }

    /// Its name on a command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::OnDevice => "on-device",
            Self::InMemory => "in-memory",
        }
    }
}

/// What a device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// ADIs.
    pub adis: u32,
    /// IMS entries.
    pub ims_entries: u32,
    /// IMS storage kind.
    pub ims_storage: ImsStorage,
    /// Largest work queue, in descriptors.
    pub max_queue_size: u32,
    /// How ADIs take submissions.
    pub portal: PortalKind,
}

/// An interrupt message: what an MSI-X or IMS entry holds.
pub use siovmm_interrupts::MsiMessage;

/// One IMS entry as software sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImsEntry {
    /// The message.
    pub message: MsiMessage,
    /// Mask bit.
    pub masked: bool,
}

/// A DMA address space bound to the device (on hardware: a PASID with its page tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaHandle(pub u32);

/// A group of IMS entries from one `ims_alloc`: `count` consecutive indexes from `first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImsGroup {
    /// First index.
    pub first: ImsIndex,
    /// Number of entries.
    pub count: u32,
}

impl ImsGroup {
    /// The group's indexes.
    pub fn indexes(&self) -> impl Iterator<Item = ImsIndex> {
        self.first..self.first + self.count
    }
}

/// An ADI's work queue, as its guest set it up: a queue context in the ADI's DMA space.
///
/// Layout at `base` (all little-endian): `u32 tail` (written by the submitter, free-running),
/// `u32 head` (written by the device, free-running), `u64` address and `u32` entries of the
/// queue's in-memory IMS area (in-memory storage; 0 = none), 44 reserved bytes, then `size`
/// 64-byte descriptors. `size` is a power of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// DMA address of the queue context.
    pub base: u64,
    /// Descriptors in the ring.
    pub size: u32,
}

/// What an interrupt handle fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandleTarget {
    /// A host IMS entry of the ADI, which the host programmed.
    Entry(ImsIndex),
    /// Entry `n` of the IMS area in the ADI's queue memory (in-memory storage), which the
    /// guest wrote with a host-composed message; the device reads it when it fires and checks
    /// that the message names a host entry of this ADI.
    Queue(u32),
}

/// How a submitter reaches an ADI's queue.
#[derive(Debug, Clone)]
pub enum Portal {
    /// A doorbell eventfd: the VMM registers it as a KVM ioeventfd on the guest's doorbell
    /// register, so a guest's write wakes the device without a VMM thread (software device).
    Doorbell(Arc<EventFd>),
    /// A portal page the VMM maps into the guest over the doorbell register's page, so a
    /// guest's doorbell store completes with no exit; `doorbell` takes the writes that still
    /// exit (the page could not be mapped where the guest put the BAR).
    Mapped {
        /// The page.
        page: PortalPage,
        /// The device's doorbell eventfd.
        doorbell: Arc<EventFd>,
    },
}

impl Portal {
    /// The doorbell eventfd (with a mapped page: for writes that exit).
    pub fn doorbell(&self) -> &Arc<EventFd> {
        match self {
            Portal::Doorbell(d) | Portal::Mapped { doorbell: d, .. } => d,
        }
    }

    /// The page to map, if the portal has one.
    pub fn page(&self) -> Option<&PortalPage> {
        match self {
            Portal::Doorbell(_) => None,
            Portal::Mapped { page, .. } => Some(page),
        }
    }
}

/// One 4 KiB page of a file (a memfd, or a device's mmap-able region) that a VMM maps into its
/// guest as a submission portal.
#[derive(Debug, Clone)]
pub struct PortalPage {
    /// The file.
    pub file: Arc<std::fs::File>,
    /// The page's offset in it (4 KiB-aligned).
    pub offset: u64,
}

/// How a device's ADIs take submissions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PortalKind {
    /// A doorbell register the VMM turns into an ioeventfd (one exit to KVM per ring).
    #[default]
    Doorbell,
    /// A page mapped into the guest (no exit per ring).
    Mapped,
}

impl PortalKind {
    /// The kind a command line names: `doorbell` or `mapped`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "doorbell" => Some(Self::Doorbell),
            "mapped" => Some(Self::Mapped),
            _ => None,
        }
    }
}

/// Outcome of firing an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// The eventfd was signalled.
    Delivered,
    /// Masked: now pending.
    Pending,
    /// Dropped: not allocated, not this ADI's, no eventfd bound, or (queue memory) a message
    /// that names no host entry of the ADI.
    Dropped,
}

/// Errors of the device interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No such ADI.
    #[error("ADI {0} does not exist")]
    NoSuchAdi(u32),
    /// The ADI is already open.
    #[error("ADI {0} is already in use")]
    AdiBusy(u32),
    /// The ADI is not open.
    #[error("ADI {0} is not open")]
    AdiNotOpen(u32),
    /// Not enough free IMS entries.
    #[error("IMS exhausted: {requested} entries requested, {free} free")]
    ImsExhausted {
        /// Requested.
        requested: u32,
        /// Free in the largest run.
        free: u32,
    },
    /// The index or group is not allocated, or not the caller's.
    #[error("IMS entry {0} is not allocated to this caller")]
    ImsNotAllocated(ImsIndex),
    /// Bad queue configuration.
    #[error("invalid queue configuration: {0}")]
    BadQueue(&'static str),
    /// A zero-sized request.
    #[error("an IMS group needs at least one entry")]
    EmptyGroup,
    /// The DMA handle is not bound to this device.
    #[error("DMA handle {0} is not bound")]
    NoSuchDma(u32),
    /// The DMA handle is still used by an open ADI.
    #[error("DMA handle {0} is still used by an open ADI")]
    DmaInUse(u32),
    /// The ADI has no queue, or its queue memory has no IMS area holding that entry.
    #[error("the ADI's queue memory has no IMS entry {0}")]
    NoQueueEntry(u32),
    /// The device cannot take more of something (eventfds, threads, DMA bindings).
    #[error("the device is out of resources: {0}")]
    Resources(&'static str),
}

/// One host SIOV device.
///
/// Every ADI-scoped call names the ADI; the device checks that an IMS entry or group named
/// with it is that ADI's, so one guest's VMM can never reach another guest's interrupts.
pub trait SiovDevice: Send + Sync {
    /// What the device offers.
    fn info(&self) -> DeviceInfo;

    /// IMS entries not allocated to any ADI now (of `info().ims_entries`).
    fn ims_free_entries(&self) -> u32;

    /// Binds a DMA address space (the guest's memory, or its vIOMMU's view for one function);
    /// ADIs opened on the handle DMA into it.
    fn dma_bind(&self, space: Arc<dyn DmaSpace>) -> Result<DmaHandle, Error>;
    /// Unbinds a handle; refused while an open ADI uses it.
    fn dma_unbind(&self, handle: DmaHandle) -> Result<(), Error>;

    /// Takes ADI `adi` for one guest, its DMA going to the space bound as `dma`.
    fn open_adi(&self, adi: AdiId, dma: DmaHandle) -> Result<Portal, Error>;
    /// [`SiovDevice::open_adi`] for the VM `owner` names (any number its caller keeps per VM):
    /// the device may give ADIs of one owner a shared doorbell eventfd, so that serving
    /// thousands of ADIs does not take a descriptor each. A device that shares nothing opens
    /// the ADI as `open_adi` does.
    fn open_adi_for(&self, adi: AdiId, dma: DmaHandle, owner: u64) -> Result<Portal, Error> {
        let _ = owner;
        self.open_adi(adi, dma)
    }
    /// Resets and releases the ADI and frees every IMS entry allocated to it.
    fn close_adi(&self, adi: AdiId) -> Result<(), Error>;
    /// Resets the ADI: queue disabled, counters cleared, interrupt handles dropped.
    fn reset_adi(&self, adi: AdiId) -> Result<(), Error>;
    /// Sets up and enables the ADI's queue, or disables it (`None`).
    fn configure_queue(&self, adi: AdiId, queue: Option<QueueConfig>) -> Result<(), Error>;
    /// Sets the ADI's interrupt-handle table: handle `h` fires `handles[h]`; `None` is a
    /// revoked handle (descriptors naming it complete with "invalid interrupt handle"). Every
    /// [`HandleTarget::Entry`] must be this ADI's (the device checks ownership on each
    /// interrupt too, as DSA checks the entry's PASID); [`HandleTarget::Queue`] needs
    /// in-memory storage.
    fn set_interrupt_handles(&self, adi: AdiId, handles: &[Option<HandleTarget>]) -> Result<(), Error>;

    /// Allocates `count` IMS entries to the open ADI `adi` (for in-memory IMS: in its queue
    /// context), each masked and holding the message the device composed for it.
    fn ims_alloc(&self, adi: AdiId, count: u32) -> Result<ImsGroup, Error>;
    /// Frees a group `ims_alloc` gave `adi`; its entries are masked and unbound first.
    fn ims_free(&self, adi: AdiId, group: ImsGroup) -> Result<(), Error>;
    /// The host message entry `index` writes when it fires (composed by the device side, as
    /// a host's interrupt domain would; the VMM never chooses it).
    fn ims_message(&self, adi: AdiId, index: ImsIndex) -> Result<MsiMessage, Error>;
    /// Sets the mask bit. Unmasking delivers a pending interrupt, once.
    fn ims_set_mask(&self, adi: AdiId, index: ImsIndex, masked: bool) -> Result<(), Error>;
    /// Whether an interrupt arrived while the entry was masked and is not yet delivered.
    fn ims_pending(&self, adi: AdiId, index: ImsIndex) -> Result<bool, Error>;
    /// Sets the mask bit of entry `n` of the IMS area in the ADI's queue memory (in-memory
    /// storage) for its guest; unmasking an entry the device marked pending clears the mark
    /// and delivers the interrupt once, through the message stored there (the commit a
    /// guest needs after unmasking, as Linux's IMS `irq_bus_unlock` commits queue-memory
    /// changes). Returns what became of a pending interrupt.
    fn queue_ims_set_mask(&self, adi: AdiId, n: u32, masked: bool) -> Result<Option<Fired>, Error>;
    /// Binds the eventfd the entry signals (`None` unbinds: interrupts are then dropped).
    fn ims_bind(&self, adi: AdiId, index: ImsIndex, target: Option<Arc<EventFd>>) -> Result<(), Error>;
}
