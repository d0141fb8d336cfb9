//! A software SIOV device: a DSA-like data mover whose ADIs are work queues.
//!
//! Submission: a guest writes descriptors into its queue ring (see `QueueConfig`), bumps the
//! ring's tail, and writes the ADI's doorbell register; the VMM binds that register to the
//! ADI's doorbell eventfd with KVM ioeventfd, so the write wakes a device worker thread
//! directly. Work runs on the device's own threads, never on the submitting vCPU.
//!
//! Completion: the worker writes the 32-byte completion record (status byte last, so a
//! submitter polling it sees a complete record), advances the ring head, and with RCI set fires
//! the IMS entry the descriptor's interrupt handle names.
//!
//! Fairness: ADIs of different guests share workers, so no queue may hold one. A doorbell buys
//! one *pass*: at most [`PASS_DESCRIPTORS`] descriptors, and none started once its transfers
//! exceed [`PASS_BYTES`] (at least one descriptor); a queue with more work goes to the back of
//! its worker's ready list (`EpollThread::spawn_requeueing`: served once per turn with the
//! doorbells that rang meanwhile, with no ring of its own, so a long queue costs no system
//! calls beyond its interrupts). No lock
//! is held while a descriptor executes: the ADI's state is locked to snapshot the queue and to
//! commit each completion, and a reset, reconfiguration or close in between bumps the ADI's
//! generation, so the pass in progress commits nothing more (the reset cancels the batch).
//!
//! A defect in a pass (a panic) halts only that ADI's queue, as a device reports a software
//! error on one work queue: counted in [`Stats::device_faults`], logged, and the queue serves
//! again once the guest resets or reconfigures it. The worker goes on serving the others.

pub mod descriptor;
pub mod doorbells;
pub mod engine;
pub mod ims;
pub mod portal;
pub mod queue_ims;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use siovmm_interrupts::{lock, EpollThread};
use vmm_sys_util::eventfd::EventFd;

use crate::dma::DmaSpace;
use crate::siov::{
    AdiId, DeviceInfo, DmaHandle, Error, Fired, HandleTarget, ImsGroup, ImsIndex, ImsStorage, MsiMessage, Portal,
    PortalKind, QueueConfig, SiovDevice,
};
use descriptor::{flags, status, Completion, Descriptor, COMPLETION_SIZE, DESC_SIZE};
use ims::ImsTable;

/// Offset of the descriptor ring in a queue context.
pub const RING_OFFSET: u64 = 64;
/// Largest queue.
pub const MAX_QUEUE_SIZE: u32 = 4096;
/// Most descriptors one pass of a queue runs before the other ADIs on its worker get a turn.
pub const PASS_DESCRIPTORS: u32 = 16;
/// Once the transfers (descriptor sizes) a pass ran exceed this many bytes, it starts no more.
pub const PASS_BYTES: u64 = 1 << 20;

/// Device counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Descriptors completed (any status).
    pub completed: AtomicU64,
    /// Completion interrupts delivered to an eventfd.
    pub interrupts: AtomicU64,
    /// Completion interrupts left pending (entry masked).
    pub interrupts_pending: AtomicU64,
    /// Completion interrupts dropped (bad handle, other ADI's entry, nothing bound).
    pub interrupts_dropped: AtomicU64,
    /// Queue errors (ring unreadable, tail beyond the ring).
    pub queue_errors: AtomicU64,
    /// Passes that failed inside the device (a panic): each halted its ADI's queue.
    pub device_faults: AtomicU64,
}

impl Stats {
    /// One `name value` line per counter, for status files.
    pub fn lines(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "completed {}\ninterrupts {}\ninterrupts_pending {}\ninterrupts_dropped {}\nqueue_errors {}\ndevice_faults {}\n",
            get(&self.completed),
            get(&self.interrupts),
            get(&self.interrupts_pending),
            get(&self.interrupts_dropped),
            get(&self.queue_errors),
            get(&self.device_faults)
        )
    }
}

#[derive(Default)]
struct AdiState {
    /// The DMA binding the ADI was opened on, and its space.
    binding: Option<DmaHandle>,
    dma: Option<Arc<dyn DmaSpace>>,
    /// The doorbell eventfd it rings (perhaps with other ADIs of its owner: `doorbells`) and
    /// the token its worker watches it by.
    doorbell: Option<(Arc<EventFd>, u64)>,
    queue: Option<QueueConfig>,
    head: u32,
    handles: Arc<[Option<HandleTarget>]>,
    /// Bumped by every open, close, reset and queue configuration: a pass that started under
    /// an older one commits nothing.
    generation: u64,
    /// A pass of this ADI's queue is running (on a worker or the portal poller).
    running: bool,
    /// A doorbell came while it ran: the pass rings again when it ends.
    again: bool,
}

impl AdiState {
    /// Starts the ADI over as `next` (opened or closed); a pass in progress keeps its claim on
    /// the queue and sees the new generation.
    fn replace(&mut self, next: AdiState) {
        *self = AdiState { generation: self.generation.wrapping_add(1), running: self.running, again: self.again, ..next };
    }

    /// The queue starts over (reset or reconfigured).
    fn restart_queue(&mut self, queue: Option<QueueConfig>) {
        self.queue = queue;
        self.head = 0;
        self.generation = self.generation.wrapping_add(1);
    }
}

/// A bound DMA space and how many open ADIs use it.
struct Binding {
    space: Arc<dyn DmaSpace>,
    users: u32,
}

#[derive(Default)]
struct Bindings {
    next: u32,
    bound: HashMap<u32, Binding>,
}

struct Shared {
    adis: Vec<Mutex<AdiState>>,
    dma: Mutex<Bindings>,
    ims: Mutex<ImsTable>,
    doorbells: Mutex<doorbells::Doorbells>,
    stats: Stats,
}

/// The software device.
pub struct SoftSiovDevice {
    info: DeviceInfo,
    shared: Arc<Shared>,
    /// Each waits on some of the doorbell eventfds (by their `doorbells` token) and runs the
    /// queues of the ADIs that ring them.
    workers: Vec<EpollThread>,
    /// Mapped portals and their poller, when ADIs have them.
    portals: Option<portal::Portals>,
}

impl std::fmt::Debug for SoftSiovDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftSiovDevice").field("info", &self.info).finish_non_exhaustive()
    }
}

impl SoftSiovDevice {
    /// A device with `adis` ADIs, `ims_entries` IMS entries in `storage` (at most
    /// [`ims::MAX_ENTRIES`]), served by `workers` threads (at least one).
    pub fn new(adis: u32, ims_entries: u32, storage: ImsStorage, workers: usize) -> std::io::Result<Self> {
        Self::with_portals(adis, ims_entries, storage, workers, PortalKind::Doorbell)
    }

    /// The same with `portal` submissions: [`PortalKind::Mapped`] gives each ADI a page the VMM
    /// maps into its guest, watched by a poller thread ([`portal`]).
    pub fn with_portals(adis: u32, ims_entries: u32, storage: ImsStorage, workers: usize, portal: PortalKind) -> std::io::Result<Self> {
        let table = ImsTable::new(storage, ims_entries);
        // What the table made (it caps the count), so `info` tells the truth.
        let ims_entries = table.len();
        let shared = Arc::new(Shared {
            adis: (0..adis).map(|_| Mutex::new(AdiState::default())).collect(),
            dma: Mutex::new(Bindings::default()),
            ims: Mutex::new(table),
            doorbells: Mutex::new(doorbells::Doorbells::new(1)),
            stats: Stats::default(),
        });
        let mut ws = Vec::new();
        for i in 0..workers.max(1) {
            let sh = shared.clone();
            ws.push(EpollThread::spawn_requeueing(format!("siov-worker{i}"), siovmm_seccomp::ThreadKind::DeviceWorker, move |_, token, signalled| {
                serve_doorbell(&sh, token, signalled)
            })?);
        }
        let portals = match portal {
            PortalKind::Doorbell => None,
            PortalKind::Mapped => {
                // The poller runs a rung queue itself, as a worker would on its doorbell.
                let sh = shared.clone();
                Some(portal::Portals::new(adis, move |adi| {
                    serve_adi(&sh, adi, false);
                })?)
            }
        };
        Ok(Self {
            info: DeviceInfo { adis, ims_entries, ims_storage: storage, max_queue_size: MAX_QUEUE_SIZE, portal },
            shared,
            workers: ws,
            portals,
        })
    }

    /// ADIs that [`SiovDevice::open_adi_for`] opens for one owner share a doorbell eventfd,
    /// up to `share` ADIs per eventfd ([`doorbells`]); 1 (the default) gives each ADI its own.
    /// For a device with no ADI open yet.
    pub fn share_doorbells(self, share: usize) -> Self {
        *lock(&self.shared.doorbells) = doorbells::Doorbells::new(share);
        self
    }

    /// Doorbell eventfds open.
    pub fn doorbell_fds(&self) -> usize {
        lock(&self.shared.doorbells).len()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Rings the mapped portals' poller passed on (0 without mapped portals).
    pub fn portal_rings(&self) -> u64 {
        self.portals.as_ref().map_or(0, portal::Portals::rings)
    }

    /// DMA bindings held.
    pub fn dma_bindings(&self) -> usize {
        lock(&self.shared.dma).bound.len()
    }

    /// MMIO view of an on-device IMS (see [`ImsTable::mmio_read`]).
    pub fn ims_mmio_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.shared.ims).mmio_read(offset, data);
    }

    /// MMIO write to an on-device IMS (see [`ImsTable::mmio_write`]).
    pub fn ims_mmio_write(&self, offset: u64, data: &[u8]) {
        lock(&self.shared.ims).mmio_write(offset, data);
    }

    fn adi(&self, adi: AdiId) -> Result<&Mutex<AdiState>, Error> {
        self.shared.adis.get(adi.0 as usize).ok_or(Error::NoSuchAdi(adi.0))
    }

    /// The worker that watches the doorbell eventfd of `token`.
    fn worker_for(&self, token: u64) -> &EpollThread {
        &self.workers[(token % self.workers.len() as u64) as usize]
    }

    /// Opens `adi` on `dma`, its doorbell shared with other ADIs of `owner` if one is named.
    fn open(&self, adi: AdiId, dma: DmaHandle, owner: Option<u64>) -> Result<Portal, Error> {
        let mut st = lock(self.adi(adi)?);
        if st.dma.is_some() {
            return Err(Error::AdiBusy(adi.0));
        }
        let mut bindings = lock(&self.shared.dma);
        let binding = bindings.bound.get_mut(&dma.0).ok_or(Error::NoSuchDma(dma.0))?;
        let mut doorbells = lock(&self.shared.doorbells);
        let joined = doorbells.join(adi.0, owner).map_err(|_| Error::Resources("eventfds"))?;
        if joined.new && self.worker_for(joined.token).watch(joined.fd.as_ref(), joined.token).is_err() {
            doorbells.leave(joined.token, adi.0);
            return Err(Error::Resources("epoll registrations"));
        }
        drop(doorbells);
        // `self.adi` checked the ADI exists, so it has a page.
        let page = self.portals.as_ref().and_then(|p| p.open(adi.0));
        let portal = match page {
            None => Portal::Doorbell(joined.fd.clone()),
            Some(page) => Portal::Mapped { page, doorbell: joined.fd.clone() },
        };
        binding.users += 1;
        st.replace(AdiState {
            binding: Some(dma),
            dma: Some(binding.space.clone()),
            doorbell: Some((joined.fd, joined.token)),
            ..AdiState::default()
        });
        Ok(portal)
    }
}

/// The doorbell eventfd of `token` rang (`signalled`), or a queue it rings for had more work
/// than its last pass: one pass of each queue it rings for (one ADI's, or a few of one owner's:
/// a queue with nothing new stops at once). Returns whether one has more: its worker calls
/// again in its next turn.
fn serve_doorbell(shared: &Shared, token: u64, signalled: bool) -> bool {
    let Some((fd, adis)) = lock(&shared.doorbells).members(token) else { return false };
    // Consumed before the passes look at the queues: a ring that comes while they run is
    // seen by the next wake-up, never lost.
    if signalled {
        let _ = fd.read();
    }
    let mut more = false;
    for &adi in adis.iter() {
        more |= serve_adi(shared, adi, true);
    }
    more
}

/// ADI `adi` was rung: one pass of its queue (see the module's fairness note). Whether the
/// queue has more: returned for a worker to come back to (`requeue`), or else its doorbell
/// rung again (the portal poller's passes).
fn serve_adi(shared: &Shared, adi: u32, requeue: bool) -> bool {
    let Some(cell) = shared.adis.get(adi as usize) else { return false };
    let adi = AdiId(adi);
    {
        let mut st = lock(cell);
        if st.running {
            st.again = true;
            return false;
        }
        st.running = true;
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| run_pass(adi, cell, shared)));
    let mut st = lock(cell);
    st.running = false;
    let more = match outcome {
        Ok(more) => more,
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
            log::error!("ADI {}: device fault serving its queue ({}); the queue is halted until reset", adi.0, what.unwrap_or("panic"));
            shared.stats.device_faults.fetch_add(1, Ordering::Relaxed);
            st.queue = None;
            false
        }
    };
    if std::mem::take(&mut st.again) || more {
        if requeue {
            return true;
        }
        if let Some((db, _)) = &st.doorbell {
            // A doorbell eventfd cannot overflow from one write; the next pass consumes it.
            let _ = db.write(1);
        }
    }
    false
}

/// A little-endian `u32` of queue memory, if the ADI's DMA space holds it.
fn read_u32(dma: &dyn DmaSpace, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    dma.read(addr, &mut b).ok().map(|_| u32::from_le_bytes(b))
}

/// A little-endian `u64` of queue memory, if the ADI's DMA space holds it.
fn read_u64(dma: &dyn DmaSpace, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    dma.read(addr, &mut b).ok().map(|_| u64::from_le_bytes(b))
}

/// Where ring slot `slot` of `q` is. `configure_queue` refused queues whose ring does not fit
/// below the top of the address space, so this cannot overflow.
fn slot_addr(q: &QueueConfig, slot: u32) -> u64 {
    q.base + RING_OFFSET + u64::from(slot) * DESC_SIZE as u64
}

/// Runs one pass of `adi`'s queue: descriptors between its head and the tail the submitter
/// published, within the pass budget. Returns whether work remains.
fn run_pass(adi: AdiId, cell: &Mutex<AdiState>, shared: &Shared) -> bool {
    let (q, dma, mut head, handles, generation) = {
        let st = lock(cell);
        let (Some(q), Some(dma)) = (st.queue, st.dma.clone()) else { return false };
        (q, dma, st.head, st.handles.clone(), st.generation)
    };
    let queue_error = || {
        shared.stats.queue_errors.fetch_add(1, Ordering::Relaxed);
        false
    };
    let Some(tail) = read_u32(dma.as_ref(), q.base) else { return queue_error() };
    // A tail more than a ring ahead is a submitter bug (or hostile): stop, run nothing.
    if tail.wrapping_sub(head) > q.size {
        return queue_error();
    }
    let (mut ran, mut bytes) = (0u32, 0u64);
    while head != tail {
        if ran == PASS_DESCRIPTORS || bytes > PASS_BYTES {
            return true;
        }
        let mut raw = [0u8; DESC_SIZE];
        if dma.read(slot_addr(&q, head % q.size), &mut raw).is_err() {
            return queue_error();
        }
        let desc = Descriptor::decode(&raw);
        let handle = (desc.flags & flags::RCI != 0).then(|| handles.get(usize::from(desc.int_handle)).copied().flatten());
        let completion = match (engine::validate(&desc), handle) {
            (Some(bad), _) => bad,
            // DSA checks the handle before running the descriptor.
            (None, Some(None)) => Completion::status(status::INVALID_INT_HANDLE),
            (None, _) => engine::execute(&desc, dma.as_ref()),
        };
        ran += 1;
        bytes += u64::from(desc.size);
        head = head.wrapping_add(1);
        // Commit under the ADI's lock, unless a reset, reconfiguration or close came meanwhile.
        let mut st = lock(cell);
        if st.generation != generation {
            return false;
        }
        if desc.flags & flags::RCR != 0 && desc.flags & flags::CRAV != 0 {
            let rec = completion.encode();
            // Status byte last: a polling submitter never sees a half-written record.
            let ok = dma.write(desc.completion_addr.wrapping_add(1), &rec[1..COMPLETION_SIZE]).is_ok()
                && dma.write(desc.completion_addr, &rec[..1]).is_ok();
            if !ok {
                shared.stats.queue_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        st.head = head;
        // The ring header was readable a moment ago; a write refused now (the guest unmapped
        // it) is the guest's queue error, counted like the others.
        if dma.write(q.base + 4, &head.to_le_bytes()).is_err() {
            shared.stats.queue_errors.fetch_add(1, Ordering::Relaxed);
        }
        shared.stats.completed.fetch_add(1, Ordering::Relaxed);
        if let Some(Some(target)) = handle {
            if completion.status != status::INVALID_INT_HANDLE {
                let mut ims = lock(&shared.ims);
                let aim = match target {
                    HandleTarget::Entry(index) => ims.aim(index, adi),
                    HandleTarget::Queue(n) => queue_ims::aim(dma.as_ref(), q.base, n, adi, &mut ims),
                };
                // Signalled with the table let go: the other workers' interrupts go meanwhile.
                drop(ims);
                let fired = aim.deliver();
                let counter = match fired {
                    Fired::Delivered => &shared.stats.interrupts,
                    Fired::Pending => &shared.stats.interrupts_pending,
                    Fired::Dropped => &shared.stats.interrupts_dropped,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    false
}

impl SiovDevice for SoftSiovDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn ims_free_entries(&self) -> u32 {
        lock(&self.shared.ims).free_entries()
    }

    fn dma_bind(&self, space: Arc<dyn DmaSpace>) -> Result<DmaHandle, Error> {
        let mut b = lock(&self.shared.dma);
        // Handles are never reused while the device lives, so a stale one cannot name a newer
        // binding of another guest.
        let id = b.next;
        b.next = id.checked_add(1).ok_or(Error::Resources("DMA handles"))?;
        b.bound.insert(id, Binding { space, users: 0 });
        Ok(DmaHandle(id))
    }

    fn dma_unbind(&self, handle: DmaHandle) -> Result<(), Error> {
        let mut b = lock(&self.shared.dma);
        match b.bound.get(&handle.0) {
            None => Err(Error::NoSuchDma(handle.0)),
            Some(binding) if binding.users > 0 => Err(Error::DmaInUse(handle.0)),
            Some(_) => {
                b.bound.remove(&handle.0);
                Ok(())
            }
        }
    }

    fn open_adi(&self, adi: AdiId, dma: DmaHandle) -> Result<Portal, Error> {
        self.open(adi, dma, None)
    }

    fn open_adi_for(&self, adi: AdiId, dma: DmaHandle, owner: u64) -> Result<Portal, Error> {
        self.open(adi, dma, Some(owner))
    }

    fn close_adi(&self, adi: AdiId) -> Result<(), Error> {
        let mut st = lock(self.adi(adi)?);
        let Some((_, token)) = st.doorbell.take() else { return Err(Error::AdiNotOpen(adi.0)) };
        // The last ADI to leave an eventfd takes it off its worker. Deleting a registered fd
        // from our own epoll fails only if it was never added, which `open` rules out; the fd
        // closes with the last Arc either way.
        if let Some(db) = lock(&self.shared.doorbells).leave(token, adi.0) {
            if let Err(e) = self.worker_for(token).unwatch(db.as_ref()) {
                log::warn!("ADI {}: removing its doorbell from the worker: {e}", adi.0);
            }
        }
        if let Some(p) = &self.portals {
            p.close(adi.0);
        }
        if let Some(h) = st.binding {
            if let Some(b) = lock(&self.shared.dma).bound.get_mut(&h.0) {
                b.users = b.users.saturating_sub(1);
            }
        }
        st.replace(AdiState::default());
        drop(st);
        lock(&self.shared.ims).free_all(adi);
        Ok(())
    }

    fn reset_adi(&self, adi: AdiId) -> Result<(), Error> {
        let mut st = lock(self.adi(adi)?);
        if st.dma.is_none() {
            return Err(Error::AdiNotOpen(adi.0));
        }
        st.restart_queue(None);
        st.handles = Arc::new([]);
        Ok(())
    }

    fn configure_queue(&self, adi: AdiId, queue: Option<QueueConfig>) -> Result<(), Error> {
        let mut st = lock(self.adi(adi)?);
        if st.dma.is_none() {
            return Err(Error::AdiNotOpen(adi.0));
        }
        if let Some(q) = queue {
            if !q.size.is_power_of_two() || q.size > MAX_QUEUE_SIZE {
                return Err(Error::BadQueue("size must be a power of two up to 4096"));
            }
            if !q.base.is_multiple_of(64) {
                return Err(Error::BadQueue("base must be 64-byte aligned"));
            }
            // The header and the whole ring below the top of the address space, so that no
            // slot address computed later can wrap.
            let ring = RING_OFFSET + u64::from(q.size) * DESC_SIZE as u64;
            if q.base.checked_add(ring - 1).is_none() {
                return Err(Error::BadQueue("the ring must end below the top of the address space"));
            }
        }
        st.restart_queue(queue);
        Ok(())
    }

    fn set_interrupt_handles(&self, adi: AdiId, handles: &[Option<HandleTarget>]) -> Result<(), Error> {
        let ims = lock(&self.shared.ims);
        for &h in handles.iter().flatten() {
            match h {
                HandleTarget::Entry(index) if ims.owner(index) != Some(adi) => return Err(Error::ImsNotAllocated(index)),
                HandleTarget::Queue(n) if self.info.ims_storage != ImsStorage::InMemory || n >= queue_ims::MAX_ENTRIES => {
                    return Err(Error::NoQueueEntry(n))
                }
                _ => {}
            }
        }
        drop(ims);
        let mut st = lock(self.adi(adi)?);
        st.handles = handles.into();
        Ok(())
    }

    fn ims_alloc(&self, adi: AdiId, count: u32) -> Result<ImsGroup, Error> {
        // Hold the ADI's state so it cannot close between the check and the allocation.
        let st = lock(self.adi(adi)?);
        if st.dma.is_none() {
            return Err(Error::AdiNotOpen(adi.0));
        }
        lock(&self.shared.ims).alloc(adi, count)
    }

    fn ims_free(&self, adi: AdiId, group: ImsGroup) -> Result<(), Error> {
        lock(&self.shared.ims).free(adi, group)
    }

    fn ims_message(&self, adi: AdiId, index: ImsIndex) -> Result<MsiMessage, Error> {
        lock(&self.shared.ims).read(adi, index).map(|e| e.message)
    }

    fn ims_set_mask(&self, adi: AdiId, index: ImsIndex, masked: bool) -> Result<(), Error> {
        lock(&self.shared.ims).set_mask(adi, index, masked)
    }

    fn ims_pending(&self, adi: AdiId, index: ImsIndex) -> Result<bool, Error> {
        lock(&self.shared.ims).pending(adi, index)
    }

    fn queue_ims_set_mask(&self, adi: AdiId, n: u32, masked: bool) -> Result<Option<Fired>, Error> {
        let st = lock(self.adi(adi)?);
        let (Some(q), Some(dma)) = (st.queue, st.dma.as_ref()) else { return Err(Error::NoQueueEntry(n)) };
        queue_ims::set_mask(dma.as_ref(), q.base, n, masked, adi, &mut lock(&self.shared.ims))
    }

    fn ims_bind(&self, adi: AdiId, index: ImsIndex, target: Option<Arc<EventFd>>) -> Result<(), Error> {
        lock(&self.shared.ims).bind(adi, index, target)
    }
}

#[cfg(test)]
mod tests;
