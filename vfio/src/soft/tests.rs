//! The software device end to end: submission through the doorbell, execution on a worker
//! thread, completion records, and completion interrupts through IMS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::descriptor::{flags, opcode, status, Completion, Descriptor, COMPLETION_SIZE};
use super::{SoftSiovDevice, RING_OFFSET};
use crate::dma::{DmaSpace, GuestRam};
use crate::siov::*;

const QUEUE: u64 = 0x10000;
const SIZE: u32 = 8;
const RECORDS: u64 = 0x20000;

struct Rig {
    dev: SoftSiovDevice,
    ram: GuestRam,
    doorbell: Arc<EventFd>,
    irq: Arc<EventFd>,
    group: ImsGroup,
    tail: u32,
}

fn rig(storage: ImsStorage) -> Rig {
    let dev = SoftSiovDevice::new(4, 64, storage, 2).unwrap();
    let ram = GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
    let dma = dev.dma_bind(Arc::new(ram.clone())).unwrap();
    let doorbell = dev.open_adi(AdiId(0), dma).unwrap().doorbell().clone();
    let group = dev.ims_alloc(AdiId(0), 2).unwrap();
    let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    for i in group.indexes() {
        dev.ims_bind(AdiId(0), i, Some(irq.clone())).unwrap();
        dev.ims_set_mask(AdiId(0), i, false).unwrap();
    }
    dev.set_interrupt_handles(AdiId(0), &[Some(HandleTarget::Entry(group.first)), Some(HandleTarget::Entry(group.first + 1))]).unwrap();
    dev.configure_queue(AdiId(0), Some(QueueConfig { base: QUEUE, size: SIZE })).unwrap();
    Rig { dev, ram, doorbell, irq, group, tail: 0 }
}

impl Rig {
    /// Submits `d` with a completion record and interrupt request; returns the record address.
    fn submit(&mut self, mut d: Descriptor) -> u64 {
        let rec = RECORDS + u64::from(self.tail) * COMPLETION_SIZE as u64;
        self.ram.write(rec, &[0u8; COMPLETION_SIZE]).unwrap();
        d.completion_addr = rec;
        d.flags |= flags::CRAV | flags::RCR;
        let slot = u64::from(self.tail % SIZE);
        self.ram.write(QUEUE + RING_OFFSET + slot * 64, &d.encode()).unwrap();
        self.tail = self.tail.wrapping_add(1);
        self.ram.write(QUEUE, &self.tail.to_le_bytes()).unwrap();
        self.doorbell.write(1).unwrap();
        rec
    }

    fn wait(&self, rec: u64) -> Completion {
        wait_for_record(&self.ram, rec, Duration::from_secs(5), "descriptor")
    }

    fn run(&mut self, d: Descriptor) -> Completion {
        let rec = self.submit(d);
        self.wait(rec)
    }

    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}

/// Polls the completion record at `rec` until the device has written its status byte (last).
fn wait_for_record(ram: &GuestRam, rec: u64, within: Duration, what: &str) -> Completion {
    let deadline = Instant::now() + within;
    loop {
        let mut b = [0u8; COMPLETION_SIZE];
        ram.read(rec, &mut b).unwrap();
        if b[0] != status::NONE {
            return Completion::decode(&b);
        }
        assert!(Instant::now() < deadline, "{what} never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn with_irq(opcode: u8, src: u64, dst: u64, size: u32) -> Descriptor {
    Descriptor { opcode, flags: flags::RCI, src, dst, size, int_handle: 1, ..Default::default() }
}

#[test]
fn every_opcode_completes_with_an_interrupt() {
    for storage in [ImsStorage::OnDevice, ImsStorage::InMemory] {
        let mut r = rig(storage);
        r.ram.write(0x3000, b"123456789").unwrap();
        assert_eq!(r.run(with_irq(opcode::NOOP, 0, 0, 0)).status, status::SUCCESS);
        assert_eq!(r.run(with_irq(opcode::MEMMOVE, 0x3000, 0x4000, 9)).status, status::SUCCESS);
        assert_eq!(r.run(with_irq(opcode::FILL, 0x4141_4141_4141_4141, 0x5000, 16)).status, status::SUCCESS);
        assert_eq!(r.run(with_irq(opcode::COMPARE, 0x3000, 0x4000, 9)).status, status::SUCCESS);
        let c = r.run(with_irq(opcode::CRC32C, 0x3000, 0, 9));
        assert_eq!((c.status, c.crc), (status::SUCCESS, 0xe306_9283));
        // Interrupts land right after the records; give the worker a moment.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(r.interrupts(), 5, "{storage:?}");
        let mut head = [0u8; 4];
        r.ram.read(QUEUE + 4, &mut head).unwrap();
        assert_eq!(u32::from_le_bytes(head), 5, "device publishes its head");
        let mut filled = [0u8; 16];
        r.ram.read(0x5000, &mut filled).unwrap();
        assert_eq!(filled, [0x41; 16]);
    }
}

#[test]
fn ring_wraps_many_times() {
    let mut r = rig(ImsStorage::OnDevice);
    for i in 0..100u32 {
        let c = r.run(Descriptor { opcode: opcode::FILL, src: u64::from(i), dst: 0x6000, size: 8, ..Default::default() });
        assert_eq!(c.status, status::SUCCESS);
    }
    assert_eq!(r.dev.stats().completed.load(std::sync::atomic::Ordering::Relaxed), 100);
    assert_eq!(r.interrupts(), 0, "no RCI, no interrupt");
}

#[test]
fn bad_handles_and_bad_addresses() {
    let mut r = rig(ImsStorage::OnDevice);
    let mut d = with_irq(opcode::NOOP, 0, 0, 0);
    d.int_handle = 2; // only handles 0 and 1 exist
    assert_eq!(r.run(d).status, status::INVALID_INT_HANDLE);
    assert_eq!(r.run(with_irq(opcode::MEMMOVE, 4 << 20, 0x1000, 64)).status, status::PAGE_FAULT);
    assert_eq!(r.run(with_irq(0x42, 0, 0, 1)).status, status::INVALID_OPCODE);
    std::thread::sleep(Duration::from_millis(20));
    // The fault and invalid opcode still complete (with an interrupt); the bad handle does not.
    assert_eq!(r.interrupts(), 2);
    // A record address outside guest memory: the descriptor still retires, nothing is written.
    let d = Descriptor { opcode: opcode::NOOP, flags: flags::CRAV | flags::RCR, completion_addr: u64::MAX - 8, ..Default::default() };
    let slot = u64::from(r.tail % SIZE);
    r.ram.write(QUEUE + RING_OFFSET + slot * 64, &d.encode()).unwrap();
    r.tail += 1;
    r.ram.write(QUEUE, &r.tail.to_le_bytes()).unwrap();
    r.doorbell.write(1).unwrap();
    let c = r.run(Descriptor { opcode: opcode::NOOP, ..Default::default() });
    assert_eq!(c.status, status::SUCCESS, "queue still works");
}

#[test]
fn tail_beyond_the_ring_runs_nothing() {
    let r = rig(ImsStorage::OnDevice);
    r.ram.write(QUEUE, &(SIZE + 1).to_le_bytes()).unwrap();
    r.doorbell.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let s = r.dev.stats();
    assert_eq!(s.completed.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(s.queue_errors.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[test]
fn masked_entry_holds_the_interrupt_until_unmasked() {
    let mut r = rig(ImsStorage::InMemory);
    let entry = r.group.first + 1;
    r.dev.ims_set_mask(AdiId(0), entry, true).unwrap();
    r.run(with_irq(opcode::NOOP, 0, 0, 0));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.interrupts(), 0);
    assert!(r.dev.ims_pending(AdiId(0), entry).unwrap());
    r.dev.ims_set_mask(AdiId(0), entry, false).unwrap();
    assert_eq!(r.interrupts(), 1);
    assert!(!r.dev.ims_pending(AdiId(0), entry).unwrap());
    assert_eq!(r.interrupts(), 0, "delivered once");
}

/// The IMS design threads' in-memory case end to end: the guest stores host messages in its
/// queue's IMS area; completions read them there; mask and pending live there too.
#[test]
fn guest_stored_messages_in_queue_memory() {
    use super::queue_ims::{AREA, CTRL_PENDING, ENTRIES};
    const AREA_AT: u64 = 0x30000;
    let mut r = rig(ImsStorage::InMemory);
    // A host entry for the guest (as IMS_ALLOC and IMS_COMPOSE make it): bound, unmasked.
    let mine = r.dev.ims_alloc(AdiId(0), 1).unwrap().first;
    r.dev.ims_bind(AdiId(0), mine, Some(r.irq.clone())).unwrap();
    r.dev.ims_set_mask(AdiId(0), mine, false).unwrap();
    let handles = [Some(HandleTarget::Entry(r.group.first)), None, Some(HandleTarget::Queue(0)), Some(HandleTarget::Queue(1))];
    r.dev.set_interrupt_handles(AdiId(0), &handles).unwrap();
    r.ram.write(QUEUE + AREA, &AREA_AT.to_le_bytes()).unwrap();
    r.ram.write(QUEUE + ENTRIES, &2u32.to_le_bytes()).unwrap();
    let message = r.dev.ims_message(AdiId(0), mine).unwrap();
    let ram = r.ram.clone();
    let store = |n: u64, m: MsiMessage, ctrl: u32| {
        let e = siovmm_interrupts::MsiEntry::new(m, false).to_bytes();
        ram.write(AREA_AT + 16 * n, &e[..12]).unwrap();
        ram.write(AREA_AT + 16 * n + 12, &ctrl.to_le_bytes()).unwrap();
    };
    store(0, message, 0);
    store(1, MsiMessage { address: 0xfee0_0000, data: 0x41 }, 0); // the guest's own message
    let on = |h: u16| Descriptor { int_handle: h, ..with_irq(opcode::NOOP, 0, 0, 0) };
    let settle = || std::thread::sleep(Duration::from_millis(20));
    for _ in 0..3 {
        assert_eq!(r.run(on(2)).status, status::SUCCESS);
        settle();
        assert_eq!(r.interrupts(), 1, "every completion delivers through the stored message");
    }
    assert_eq!(r.run(on(3)).status, status::SUCCESS);
    settle();
    assert_eq!(r.interrupts(), 0, "a message the host did not compose raises nothing");
    store(0, message, siovmm_interrupts::msi::CTRL_MASK);
    r.run(on(2));
    r.run(on(2));
    settle();
    let mut ctrl = [0u8; 4];
    r.ram.read(AREA_AT + 12, &mut ctrl).unwrap();
    assert_eq!((r.interrupts(), u32::from_le_bytes(ctrl)), (0, 1 | CTRL_PENDING), "masked: pending in queue memory");
    assert_eq!(r.dev.queue_ims_set_mask(AdiId(0), 0, false), Ok(Some(Fired::Delivered)));
    assert_eq!(r.interrupts(), 1, "delivered once on unmask");
    assert_eq!(r.dev.queue_ims_set_mask(AdiId(0), 2, false), Err(Error::NoQueueEntry(2)));
    let s = r.dev.stats();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((count(&s.interrupts), count(&s.interrupts_pending), count(&s.interrupts_dropped)), (3, 2, 1));
}

#[test]
fn an_adi_cannot_use_another_adis_entries() {
    let mut r = rig(ImsStorage::OnDevice);
    let other_dma = r.dev.dma_bind(Arc::new(r.ram.clone())).unwrap();
    r.dev.open_adi(AdiId(1), other_dma).unwrap();
    let other = r.dev.ims_alloc(AdiId(1), 1).unwrap();
    assert_eq!(r.dev.ims_set_mask(AdiId(0), other.first, false), Err(Error::ImsNotAllocated(other.first)));
    assert_eq!(r.dev.ims_bind(AdiId(0), other.first, None), Err(Error::ImsNotAllocated(other.first)));
    assert_eq!(r.dev.ims_free(AdiId(0), other), Err(Error::ImsNotAllocated(other.first)));
    let entry = |i| Some(HandleTarget::Entry(i));
    assert_eq!(r.dev.set_interrupt_handles(AdiId(0), &[entry(other.first)]), Err(Error::ImsNotAllocated(other.first)));
    assert_eq!(r.dev.set_interrupt_handles(AdiId(0), &[entry(9999)]), Err(Error::ImsNotAllocated(9999)));
    assert_eq!(r.dev.set_interrupt_handles(AdiId(0), &[Some(HandleTarget::Queue(0))]), Err(Error::NoQueueEntry(0)), "on-device IMS has no queue entries");
    // A revoked handle (None) fails the descriptor like an unknown one.
    r.dev.set_interrupt_handles(AdiId(0), &[None, entry(r.group.first + 1)]).unwrap();
    let mut d = with_irq(opcode::NOOP, 0, 0, 0);
    d.int_handle = 0;
    assert_eq!(r.run(d).status, status::INVALID_INT_HANDLE);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.interrupts(), 0);
}

#[test]
fn adi_lifecycle_errors() {
    let r = rig(ImsStorage::OnDevice);
    let dma = r.dev.dma_bind(Arc::new(r.ram.clone())).unwrap();
    assert!(matches!(r.dev.open_adi(AdiId(0), dma), Err(Error::AdiBusy(0))));
    assert!(matches!(r.dev.open_adi(AdiId(9), dma), Err(Error::NoSuchAdi(9))));
    assert!(matches!(r.dev.open_adi(AdiId(1), DmaHandle(999)), Err(Error::NoSuchDma(999))));
    assert_eq!(r.dev.configure_queue(AdiId(1), None), Err(Error::AdiNotOpen(1)));
    assert_eq!(r.dev.ims_alloc(AdiId(1), 1), Err(Error::AdiNotOpen(1)));
    assert!(matches!(r.dev.configure_queue(AdiId(0), Some(QueueConfig { base: 0, size: 3 })), Err(Error::BadQueue(_))));
    assert!(matches!(r.dev.configure_queue(AdiId(0), Some(QueueConfig { base: 8, size: 4 })), Err(Error::BadQueue(_))));
    r.dev.reset_adi(AdiId(0)).unwrap();
    r.dev.close_adi(AdiId(0)).unwrap();
    assert_eq!(r.dev.close_adi(AdiId(0)), Err(Error::AdiNotOpen(0)));
    assert!(r.dev.open_adi(AdiId(0), dma).is_ok());
}

#[test]
fn a_dma_binding_stays_while_an_adi_uses_it() {
    let dev = SoftSiovDevice::new(2, 64, ImsStorage::OnDevice, 1).unwrap();
    let ram = GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let dma = dev.dma_bind(Arc::new(ram)).unwrap();
    dev.open_adi(AdiId(0), dma).unwrap();
    dev.open_adi(AdiId(1), dma).unwrap();
    assert_eq!(dev.dma_unbind(dma), Err(Error::DmaInUse(dma.0)));
    dev.close_adi(AdiId(0)).unwrap();
    assert_eq!(dev.dma_unbind(dma), Err(Error::DmaInUse(dma.0)), "ADI 1 still uses it");
    dev.close_adi(AdiId(1)).unwrap();
    dev.dma_unbind(dma).unwrap();
    assert_eq!(dev.dma_unbind(dma), Err(Error::NoSuchDma(dma.0)));
    assert!(matches!(dev.open_adi(AdiId(0), dma), Err(Error::NoSuchDma(_))), "an unbound handle opens nothing");
    let again = dev.dma_bind(Arc::new(GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap()))).unwrap();
    assert_ne!(again, dma, "handles are not reused");
    assert_eq!(dev.dma_bindings(), 1);
}

#[test]
fn closing_an_adi_returns_its_ims_entries() {
    let dev = SoftSiovDevice::new(2, 64, ImsStorage::InMemory, 1).unwrap();
    let ram = GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let dma = dev.dma_bind(Arc::new(ram)).unwrap();
    for _ in 0..3 {
        dev.open_adi(AdiId(0), dma).unwrap();
        dev.open_adi(AdiId(1), dma).unwrap();
        dev.ims_alloc(AdiId(0), 30).unwrap();
        let kept = dev.ims_alloc(AdiId(1), 4).unwrap();
        dev.ims_alloc(AdiId(0), 30).unwrap();
        assert_eq!(dev.ims_free_entries(), 0);
        dev.close_adi(AdiId(0)).unwrap();
        assert_eq!(dev.ims_free_entries(), 60, "ADI 0's 60 entries back");
        assert_eq!(dev.ims_message(AdiId(1), kept.first), Ok(super::ims::host_message(kept.first)));
        dev.close_adi(AdiId(1)).unwrap();
        assert_eq!(dev.ims_free_entries(), 64);
    }
}

#[test]
fn sixteen_thousand_entries_and_ten_thousand_adis() {
    let dev = SoftSiovDevice::new(10_000, 16_384, ImsStorage::OnDevice, 2).unwrap();
    assert_eq!(dev.info().adis, 10_000);
    let ram = GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
    let dma = dev.dma_bind(Arc::new(ram)).unwrap();
    let mut groups = Vec::new();
    for adi in 0..8192 {
        dev.open_adi(AdiId(adi), dma).unwrap();
        groups.push((AdiId(adi), dev.ims_alloc(AdiId(adi), 2).unwrap()));
    }
    assert!(matches!(dev.ims_alloc(AdiId(0), 1), Err(Error::ImsExhausted { .. })));
    for (adi, g) in groups.drain(..4096) {
        dev.ims_free(adi, g).unwrap();
    }
    assert_eq!(dev.ims_alloc(AdiId(0), 8192).unwrap().count, 8192);
}

/// A mapped portal: a store into the ADI's page (what the guest's doorbell write becomes when
/// the VMM maps the page) runs the queue; nobody writes the doorbell eventfd.
#[test]
fn a_store_to_the_mapped_portal_runs_the_queue() {
    use std::os::unix::fs::FileExt;
    let dev = SoftSiovDevice::with_portals(2, 64, ImsStorage::OnDevice, 1, PortalKind::Mapped).unwrap();
    assert_eq!(dev.info().portal, PortalKind::Mapped);
    let ram = GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
    let dma = dev.dma_bind(Arc::new(ram.clone())).unwrap();
    let portal = dev.open_adi(AdiId(1), dma).unwrap();
    let page = portal.page().expect("a mapped portal has a page").clone();
    assert_eq!(page.offset, super::portal::FIRST_PAGE + 4096, "ADI 1's page");
    dev.configure_queue(AdiId(1), Some(QueueConfig { base: QUEUE, size: SIZE })).unwrap();
    for round in 1..=3u32 {
        let d = Descriptor { opcode: opcode::NOOP, flags: flags::CRAV | flags::RCR, completion_addr: RECORDS, ..Default::default() };
        ram.write(RECORDS, &[0u8; COMPLETION_SIZE]).unwrap();
        ram.write(QUEUE + RING_OFFSET + u64::from(round - 1) * 64, &d.encode()).unwrap();
        ram.write(QUEUE, &round.to_le_bytes()).unwrap();
        page.file.write_all_at(&1u32.to_le_bytes(), page.offset).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut b = [0u8; 1];
            ram.read(RECORDS, &mut b).unwrap();
            if b[0] == status::SUCCESS {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: the portal store ran nothing");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(dev.portal_rings(), 3);
    dev.close_adi(AdiId(1)).unwrap();
}

/// A queue of `size` descriptors on its own guest RAM ("another VM"), opened on `dev`.
struct Lane {
    ram: GuestRam,
    adi: AdiId,
    doorbell: Arc<EventFd>,
    size: u32,
    tail: std::cell::Cell<u32>,
}

const BIG_QUEUE: u32 = 4096;
const MIB: u32 = 1 << 20;

fn lane(dev: &SoftSiovDevice, adi: u32, space: Arc<dyn DmaSpace>, ram: GuestRam, size: u32) -> Lane {
    let dma = dev.dma_bind(space).unwrap();
    let doorbell = dev.open_adi(AdiId(adi), dma).unwrap().doorbell().clone();
    dev.configure_queue(AdiId(adi), Some(QueueConfig { base: QUEUE, size })).unwrap();
    Lane { ram, adi: AdiId(adi), doorbell, size, tail: Default::default() }
}

/// A lane opened for `owner`, its doorbell perhaps shared.
fn owned_lane(dev: &SoftSiovDevice, adi: u32, owner: u64, ram: GuestRam) -> Lane {
    let dma = dev.dma_bind(Arc::new(ram.clone())).unwrap();
    let doorbell = dev.open_adi_for(AdiId(adi), dma, owner).unwrap().doorbell().clone();
    dev.configure_queue(AdiId(adi), Some(QueueConfig { base: QUEUE, size: 8 })).unwrap();
    Lane { ram, adi: AdiId(adi), doorbell, size: 8, tail: Default::default() }
}

#[test]
fn adis_of_one_owner_share_a_doorbell_and_each_ring_runs_the_right_queue() {
    let dev = SoftSiovDevice::new(8, 64, ImsStorage::OnDevice, 2).unwrap().share_doorbells(2);
    let lanes: Vec<Lane> = (0..3).map(|adi| owned_lane(&dev, adi, 7, ram(1 << 20))).collect();
    let other = owned_lane(&dev, 3, 8, ram(1 << 20));
    assert!(Arc::ptr_eq(&lanes[0].doorbell, &lanes[1].doorbell), "two of owner 7's ADIs to an eventfd");
    assert!(!Arc::ptr_eq(&lanes[1].doorbell, &lanes[2].doorbell));
    assert!(!Arc::ptr_eq(&lanes[2].doorbell, &other.doorbell), "owner 8 never shares owner 7's");
    assert_eq!(dev.doorbell_fds(), 3);
    // A ring of the shared eventfd runs the queue that has work, whichever ADI of the group
    // it is, and every ADI's NOOPs complete through its group's eventfd.
    for round in 0..3 {
        for lane in lanes.iter().chain([&other]) {
            assert_eq!(lane.noop().status, status::SUCCESS, "round {round}, ADI {}", lane.adi.0);
            assert_eq!(lane.head(), round + 1);
        }
    }
    // The group's eventfd stays while one ADI rings it, and goes with the last.
    dev.close_adi(AdiId(0)).unwrap();
    assert_eq!(dev.doorbell_fds(), 3);
    assert_eq!(lanes[1].noop().status, status::SUCCESS, "ADI 1 still rings the shared eventfd");
    dev.close_adi(AdiId(1)).unwrap();
    assert_eq!(dev.doorbell_fds(), 2);
    dev.close_adi(AdiId(2)).unwrap();
    dev.close_adi(AdiId(3)).unwrap();
    assert_eq!(dev.doorbell_fds(), 0);
}

fn ram(bytes: usize) -> GuestRam {
    GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).unwrap())
}

impl Lane {
    /// Writes `descs` into the ring after the last submission, publishes the tail and rings
    /// the doorbell.
    fn submit_all(&self, descs: impl IntoIterator<Item = Descriptor>) {
        let mut tail = self.tail.get();
        for d in descs {
            self.ram.write(QUEUE + RING_OFFSET + u64::from(tail % self.size) * 64, &d.encode()).unwrap();
            tail = tail.wrapping_add(1);
        }
        self.tail.set(tail);
        self.ram.write(QUEUE, &tail.to_le_bytes()).unwrap();
        self.doorbell.write(1).unwrap();
    }

    /// The queue starts over at slot 0 (reset and configured again, with `size` slots).
    fn restart(&mut self, dev: &SoftSiovDevice, size: u32) {
        dev.configure_queue(self.adi, Some(QueueConfig { base: QUEUE, size })).unwrap();
        self.ram.write(QUEUE + 4, &0u32.to_le_bytes()).unwrap();
        (self.size, self.tail) = (size, Default::default());
    }

    fn head(&self) -> u32 {
        let mut b = [0u8; 4];
        self.ram.read(QUEUE + 4, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// Submits a NOOP with a completion record and waits for it (up to a minute).
    fn noop(&self) -> Completion {
        let d = Descriptor { opcode: opcode::NOOP, flags: flags::CRAV | flags::RCR, completion_addr: RECORDS, ..Default::default() };
        self.ram.write(RECORDS, &[0u8; COMPLETION_SIZE]).unwrap();
        self.submit_all([d]);
        wait_for_record(&self.ram, RECORDS, Duration::from_secs(60), &format!("ADI {}'s NOOP", self.adi.0))
    }
}

/// 4,096 one-MiB copies: seconds of work behind one doorbell.
fn long_batch() -> impl Iterator<Item = Descriptor> {
    (0..BIG_QUEUE).map(|_| Descriptor { opcode: opcode::MEMMOVE, src: 1 << 20, dst: 2 << 20, size: MIB, ..Default::default() })
}

#[test]
fn one_adis_long_batch_does_not_hold_up_another_vms_adi_on_the_same_worker() {
    // One worker serves both ADIs, as ADIs share workers.
    let dev = SoftSiovDevice::new(2, 64, ImsStorage::OnDevice, 1).unwrap();
    let a_ram = ram(4 << 20);
    let a = lane(&dev, 0, Arc::new(a_ram.clone()), a_ram, BIG_QUEUE);
    let b_ram = ram(1 << 20);
    let b = lane(&dev, 1, Arc::new(b_ram.clone()), b_ram, 8);
    a.submit_all(long_batch());
    // Counted from B's doorbell, not from A's: how far the worker got with A before this
    // thread rang B's is this thread's scheduling (a CI run on a busy machine saw 64), not
    // the worker's fairness.
    let rung = a.head();
    assert_eq!(b.noop().status, status::SUCCESS);
    // The other ADI waited for a pass of A's queue or two, not for the batch.
    let done = a.head().wrapping_sub(rung);
    assert!(done < 64, "A completed {done} of {BIG_QUEUE} one-MiB copies between B's doorbell and B's NOOP ({rung} before)");
}

#[test]
fn a_reset_returns_at_once_and_cancels_the_batch_in_progress() {
    let dev = SoftSiovDevice::new(1, 64, ImsStorage::OnDevice, 1).unwrap();
    let a_ram = ram(4 << 20);
    let mut a = lane(&dev, 0, Arc::new(a_ram.clone()), a_ram, BIG_QUEUE);
    a.submit_all(long_batch());
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.head() < 2 {
        assert!(Instant::now() < deadline, "the batch never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    dev.reset_adi(a.adi).unwrap();
    let completed = || dev.stats().completed.load(std::sync::atomic::Ordering::Relaxed);
    let (after_reset, head) = (completed(), a.head());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!((completed(), a.head()), (after_reset, head), "nothing completes after the reset");
    assert!(head < BIG_QUEUE);
    // The reset ADI works again once its queue is configured.
    a.restart(&dev, 8);
    assert_eq!(a.noop().status, status::SUCCESS);
}

/// Guest RAM whose accesses at one address panic, as a defect in a DMA path would.
struct Defective(GuestRam, u64);
impl DmaSpace for Defective {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), crate::dma::DmaFault> {
        assert_ne!(addr, self.1, "defective DMA path");
        self.0.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), crate::dma::DmaFault> {
        self.0.write(addr, buf)
    }
}

#[test]
fn a_panic_serving_one_adi_halts_that_queue_and_the_worker_serves_the_others() {
    let dev = SoftSiovDevice::new(2, 64, ImsStorage::OnDevice, 1).unwrap();
    let a_ram = ram(1 << 20);
    let mut a = lane(&dev, 0, Arc::new(Defective(a_ram.clone(), 0x8000)), a_ram, 8);
    let b_ram = ram(1 << 20);
    let b = lane(&dev, 1, Arc::new(b_ram.clone()), b_ram, 8);
    a.submit_all([Descriptor { opcode: opcode::MEMMOVE, src: 0x8000, dst: 0x9000, size: 64, ..Default::default() }]);
    assert_eq!(b.noop().status, status::SUCCESS, "the worker outlived the panic");
    assert_eq!(dev.stats().device_faults.load(std::sync::atomic::Ordering::Relaxed), 1);
    // A's queue is halted until the guest resets or reconfigures it.
    a.submit_all([Descriptor { opcode: opcode::NOOP, ..Default::default() }]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(a.head(), 0);
    dev.reset_adi(a.adi).unwrap();
    a.restart(&dev, 8);
    assert_eq!(a.noop().status, status::SUCCESS);
    assert_eq!(b.noop().status, status::SUCCESS);
}

#[test]
fn a_queue_whose_ring_would_wrap_the_address_space_is_refused() {
    let dev = SoftSiovDevice::new(1, 64, ImsStorage::OnDevice, 1).unwrap();
    let dma = dev.dma_bind(Arc::new(ram(4096))).unwrap();
    dev.open_adi(AdiId(0), dma).unwrap();
    let top = u64::MAX - 63; // 64-byte aligned; header and ring past the end of the address space
    assert!(matches!(dev.configure_queue(AdiId(0), Some(QueueConfig { base: top, size: 8 })), Err(Error::BadQueue(_))));
    let last_fit = u64::MAX - (RING_OFFSET + 8 * 64) + 1;
    assert!(dev.configure_queue(AdiId(0), Some(QueueConfig { base: last_fit, size: 8 })).is_ok(), "ends exactly at the top");
    assert!(matches!(dev.configure_queue(AdiId(0), Some(QueueConfig { base: last_fit + 64, size: 8 })), Err(Error::BadQueue(_))));
}
