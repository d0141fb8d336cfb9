//! In-memory IMS kept in the queue's own memory, as the IMS design threads describe it: a
//! device whose interrupt messages live in its queues' metadata, where a VMM cannot trap them.
//!
//! The queue context (`siov::QueueConfig`) names the queue's **IMS area**: a `u64` DMA address
//! at offset 8 and a `u32` entry count at offset 16. Entry `n` is 16 bytes at `area + 16 n`, in
//! the MSI-X entry layout `{addr_lo, addr_hi, data, ctrl}`: ctrl bit 0 is the mask, written by
//! whoever owns the queue; bit 1 is pending, set by the device.
//!
//! The guest writes these entries, so every one is untrusted. It may store only a message the
//! host composed for it (the hypercall IMS_COMPOSE returns one): a remappable-format message
//! naming a host IMS entry, which stands for the host's interrupt-remapping entry. When the
//! device fires entry `n` it reads the entry; if masked it sets pending there; otherwise it
//! hands the message to "remapping" ([`remapped_entry`]), which delivers only through a host
//! entry allocated to **this** ADI, whose eventfd routes to the vector the host composed
//! the message for. A forged or stale message, another ADI's message, an area outside the
//! ADI's DMA space: dropped. The guest can only reach its own vectors.

use siovmm_interrupts::msi::{MsiEntry, CTRL_MASK, ENTRY_SIZE};

use super::ims::{remapped_entry, Aim, ImsTable};
use super::{read_u32, read_u64};
use crate::dma::DmaSpace;
use crate::siov::{AdiId, Error, Fired};

/// Queue-context offset of the IMS area's DMA address (`u64`).
pub const AREA: u64 = 8;
/// Queue-context offset of the IMS area's entry count (`u32`).
pub const ENTRIES: u64 = 16;
/// Most entries an area may have.
pub const MAX_ENTRIES: u32 = 0x8000;
/// Entry ctrl bit set by the device when it fired a masked entry.
pub const CTRL_PENDING: u32 = 2;

/// Where entry `n` sits, if the queue at `queue` has an area (16-byte aligned) that holds it.
fn entry_addr(dma: &dyn DmaSpace, queue: u64, n: u32) -> Option<u64> {
    let area = read_u64(dma, queue.checked_add(AREA)?)?;
    let entries = read_u32(dma, queue.checked_add(ENTRIES)?)?;
    if area == 0 || !area.is_multiple_of(ENTRY_SIZE as u64) || n >= entries.min(MAX_ENTRIES) {
        return None;
    }
    area.checked_add(u64::from(n) * ENTRY_SIZE as u64)
}

fn read_entry(dma: &dyn DmaSpace, addr: u64) -> Option<MsiEntry> {
    let mut b = [0u8; ENTRY_SIZE];
    dma.read(addr, &mut b).ok().map(|_| MsiEntry::from_bytes(&b))
}

fn write_ctrl(dma: &dyn DmaSpace, addr: u64, ctrl: u32) -> bool {
    dma.write(addr + 12, &ctrl.to_le_bytes()).is_ok()
}

/// Delivers through the host entry `message` names, if it is `adi`'s.
fn remap(message: siovmm_interrupts::MsiMessage, adi: AdiId, ims: &mut ImsTable) -> Aim {
    match remapped_entry(message) {
        Some(index) => ims.aim(index, adi),
        None => Aim::Dropped,
    }
}

/// Fires entry `n` of the IMS area of `adi`'s queue at `queue`.
pub fn fire(dma: &dyn DmaSpace, queue: u64, n: u32, adi: AdiId, ims: &mut ImsTable) -> Fired {
    aim(dma, queue, n, adi, ims).deliver()
}

/// [`fire`] up to the signal, which the caller makes once it has let go of `ims` ([`Aim`]).
pub fn aim(dma: &dyn DmaSpace, queue: u64, n: u32, adi: AdiId, ims: &mut ImsTable) -> Aim {
    let Some(addr) = entry_addr(dma, queue, n) else { return Aim::Dropped };
    let Some(entry) = read_entry(dma, addr) else { return Aim::Dropped };
    if entry.is_masked() {
        // The mark lives with the entry, where its owner reads it (the threads' "pending in
        // the queue metadata"); a queue memory that refuses the write loses the interrupt.
        return if write_ctrl(dma, addr, entry.control() | CTRL_PENDING) { Aim::Pending } else { Aim::Dropped };
    }
    remap(entry.message(), adi, ims)
}

/// Sets entry `n`'s mask bit; unmasking a pending entry clears the mark and delivers it once.
pub fn set_mask(dma: &dyn DmaSpace, queue: u64, n: u32, masked: bool, adi: AdiId, ims: &mut ImsTable) -> Result<Option<Fired>, Error> {
    let addr = entry_addr(dma, queue, n).ok_or(Error::NoQueueEntry(n))?;
    let entry = read_entry(dma, addr).ok_or(Error::NoQueueEntry(n))?;
    let ctrl = entry.control();
    if masked {
        return if write_ctrl(dma, addr, ctrl | CTRL_MASK) { Ok(None) } else { Err(Error::NoQueueEntry(n)) };
    }
    if !write_ctrl(dma, addr, ctrl & !(CTRL_MASK | CTRL_PENDING)) {
        return Err(Error::NoQueueEntry(n));
    }
    Ok((ctrl & CTRL_PENDING != 0).then(|| remap(entry.message(), adi, ims).deliver()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::dma::GuestRam;
    use crate::siov::{ImsStorage, MsiMessage};
    use crate::soft::ims::host_message;

    const Q: u64 = 0x1000;
    const AREA_AT: u64 = 0x2000;
    const A: AdiId = AdiId(0);

    struct Rig {
        ram: GuestRam,
        ims: ImsTable,
        fd: Arc<EventFd>,
        index: u32,
    }

    /// A queue with a 4-entry area and one host entry of ADI A, unmasked and bound.
    fn rig() -> Rig {
        let ram = GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        ram.write(Q + AREA, &AREA_AT.to_le_bytes()).unwrap();
        ram.write(Q + ENTRIES, &4u32.to_le_bytes()).unwrap();
        let mut ims = ImsTable::new(ImsStorage::InMemory, 16);
        let g = ims.alloc(AdiId(9), 3).unwrap(); // another ADI's entries first
        assert_eq!(g.first, 0);
        let index = ims.alloc(A, 1).unwrap().first;
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        ims.bind(A, index, Some(fd.clone())).unwrap();
        ims.set_mask(A, index, false).unwrap();
        Rig { ram, ims, fd, index }
    }

    impl Rig {
        fn store(&self, n: u64, message: MsiMessage, ctrl: u32) {
            self.ram.write(AREA_AT + 16 * n, &MsiEntry::new(message, false).to_bytes()[..12]).unwrap();
            self.ram.write(AREA_AT + 16 * n + 12, &ctrl.to_le_bytes()).unwrap();
        }
        fn ctrl(&self, n: u64) -> u32 {
            read_u32(&self.ram, AREA_AT + 16 * n + 12).unwrap()
        }
        fn signals(&self) -> u64 {
            self.fd.read().unwrap_or(0)
        }
        fn fire(&mut self, n: u32) -> Fired {
            fire(&self.ram, Q, n, A, &mut self.ims)
        }
    }

    #[test]
    fn a_stored_host_message_delivers_through_its_entry() {
        let mut r = rig();
        r.store(2, host_message(r.index), 0);
        assert_eq!(r.fire(2), Fired::Delivered);
        assert_eq!(r.signals(), 1);
    }

    #[test]
    fn masked_entries_go_pending_in_queue_memory_and_deliver_once_on_unmask() {
        let mut r = rig();
        r.store(1, host_message(r.index), CTRL_MASK);
        assert_eq!(r.fire(1), Fired::Pending);
        assert_eq!(r.fire(1), Fired::Pending);
        assert_eq!((r.ctrl(1), r.signals()), (CTRL_MASK | CTRL_PENDING, 0));
        assert_eq!(set_mask(&r.ram, Q, 1, false, A, &mut r.ims), Ok(Some(Fired::Delivered)));
        assert_eq!((r.ctrl(1), r.signals()), (0, 1), "delivered once, mark cleared");
        assert_eq!(set_mask(&r.ram, Q, 1, false, A, &mut r.ims), Ok(None), "nothing pending any more");
        assert_eq!(set_mask(&r.ram, Q, 1, true, A, &mut r.ims), Ok(None));
        assert_eq!(r.ctrl(1), CTRL_MASK);
        assert_eq!(set_mask(&r.ram, Q, 4, true, A, &mut r.ims), Err(Error::NoQueueEntry(4)), "past the area");
    }

    #[test]
    fn forged_foreign_and_misplaced_messages_raise_nothing() {
        let mut r = rig();
        // The guest's own compatibility-format message, another ADI's host entry, a free entry.
        for (n, message) in [(0, MsiMessage { address: 0xfee0_0000, data: 0x41 }), (1, host_message(0)), (2, host_message(15))] {
            r.store(n, message, 0);
            assert_eq!(r.fire(n as u32), Fired::Dropped, "entry {n}");
        }
        r.store(3, host_message(r.index), 0);
        assert_eq!(r.fire(4), Fired::Dropped, "past the area's entries");
        // An area the queue context places badly: unaligned, outside the DMA space, none.
        for (area, entries) in [(AREA_AT + 8, 4u32), (u64::MAX - 15, 4), (0, 4), (AREA_AT, u32::MAX)] {
            r.ram.write(Q + AREA, &area.to_le_bytes()).unwrap();
            r.ram.write(Q + ENTRIES, &entries.to_le_bytes()).unwrap();
            let expect = if entries == u32::MAX { Fired::Delivered } else { Fired::Dropped };
            assert_eq!(r.fire(3), expect, "area {area:#x}, {entries} entries");
        }
        assert_eq!(fire(&r.ram, u64::MAX - 4, 0, A, &mut r.ims), Fired::Dropped, "queue context itself outside");
        assert_eq!(r.signals(), 1, "only the last, well-formed one");
    }
}
