//! The software device's Interrupt Message Store.
//!
//! - **Allocation**: entries are handed out in groups of consecutive indexes, first fit, from a
//!   free-range map; frees merge neighbours. Any number of groups, any time after start-up.
//! - **Storage**: `OnDevice` keeps every entry in one table laid out like a device MMIO region
//!   (16 bytes: addr_lo, addr_hi, data, ctrl; ctrl bit 0 = mask), reachable through
//!   [`ImsTable::mmio_read`]/[`ImsTable::mmio_write`] so a VMM can trap it. `InMemory` keeps each
//!   entry in the queue context of the ADI it is assigned to; there is no MMIO view.
//! - **Delivery**: firing an entry for ADI `a` checks that the entry belongs to `a` (DSA checks
//!   the entry's PASID the same way), then signals its eventfd, or records it pending if masked.
//!   Unmasking delivers a pending interrupt exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use siovmm_interrupts::MsiEntry;

use crate::siov::{AdiId, Error, ImsEntry, ImsGroup, ImsIndex, ImsStorage, MsiMessage};

/// Bytes per entry in the MMIO layout; ctrl bit 0 masks it.
pub use siovmm_interrupts::msi::{CTRL_MASK, ENTRY_SIZE};

/// Per-entry state that is not part of the message.
#[derive(Debug, Default)]
struct Slot {
    allocated: bool,
    owner: Option<AdiId>,
    pending: bool,
    target: Option<Arc<EventFd>>,
}

/// Outcome of firing an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// The eventfd was signalled.
    Delivered,
    /// Masked: now pending.
    Pending,
    /// Dropped: not allocated, not this ADI's, or no eventfd bound.
    Dropped,
}

/// The IMS.
#[derive(Debug)]
pub struct ImsTable {
    storage: ImsStorage,
    slots: Vec<Slot>,
    /// OnDevice: the MMIO table (all entries). InMemory: unused.
    table: Vec<[u8; ENTRY_SIZE]>,
    /// InMemory: each ADI's queue-context IMS area, and where each entry sits in it.
    contexts: HashMap<AdiId, Vec<Option<[u8; ENTRY_SIZE]>>>,
    placement: HashMap<ImsIndex, (AdiId, usize)>,
    free: BTreeMap<u32, u32>,
    groups: HashMap<u32, u32>,
}

/// An entry in its stored form: the MSI-X entry layout (`siovmm_interrupts::msi`).
fn encode(e: &ImsEntry) -> [u8; ENTRY_SIZE] {
    MsiEntry::new(e.message, e.masked).to_bytes()
}

fn decode(b: &[u8; ENTRY_SIZE]) -> ImsEntry {
    let e = MsiEntry::from_bytes(b);
    ImsEntry { message: e.message(), masked: e.is_masked() }
}

const MASKED: ImsEntry = ImsEntry { message: MsiMessage { address: 0, data: 0 }, masked: true };

impl ImsTable {
    /// `entries` entries of `storage`.
    pub fn new(storage: ImsStorage, entries: u32) -> Self {
        let mut free = BTreeMap::new();
        if entries > 0 {
            free.insert(0, entries);
        }
        let table = match storage {
            ImsStorage::OnDevice => vec![encode(&MASKED); entries as usize],
            ImsStorage::InMemory => Vec::new(),
        };
        Self {
            storage,
            slots: (0..entries).map(|_| Slot::default()).collect(),
            table,
            contexts: HashMap::new(),
            placement: HashMap::new(),
            free,
            groups: HashMap::new(),
        }
    }

    /// Entries in total.
    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    /// True when the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Entries not allocated.
    pub fn free_entries(&self) -> u32 {
        self.free.values().sum()
    }

    /// Allocates `count` consecutive entries, masked.
    pub fn alloc(&mut self, count: u32) -> Result<ImsGroup, Error> {
        if count == 0 {
            return Err(Error::EmptyGroup);
        }
        let Some((&start, &len)) = self.free.iter().find(|(_, &len)| len >= count) else {
            let largest = self.free.values().copied().max().unwrap_or(0);
            return Err(Error::ImsExhausted { requested: count, free: largest });
        };
        self.free.remove(&start);
        if len > count {
            self.free.insert(start + count, len - count);
        }
        self.groups.insert(start, count);
        for i in start..start + count {
            self.slots[i as usize] = Slot { allocated: true, ..Slot::default() };
            if let Some(e) = self.table.get_mut(i as usize) {
                *e = encode(&MASKED);
            }
        }
        Ok(ImsGroup { first: start, count })
    }

    /// Frees a group returned by `alloc` (exactly that group).
    pub fn free(&mut self, group: ImsGroup) -> Result<(), Error> {
        if self.groups.get(&group.first) != Some(&group.count) {
            return Err(Error::ImsNotAllocated(group.first));
        }
        self.groups.remove(&group.first);
        for i in group.indexes() {
            self.slots[i as usize] = Slot::default();
            if let Some((adi, pos)) = self.placement.remove(&i) {
                if let Some(ctx) = self.contexts.get_mut(&adi) {
                    ctx[pos] = None;
                }
            }
            if let Some(e) = self.table.get_mut(i as usize) {
                *e = encode(&MASKED);
            }
        }
        // Merge with the neighbours.
        let mut start = group.first;
        let mut len = group.count;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
        Ok(())
    }

    fn slot(&self, index: ImsIndex) -> Result<&Slot, Error> {
        self.slots.get(index as usize).filter(|s| s.allocated).ok_or(Error::ImsNotAllocated(index))
    }

    fn slot_mut(&mut self, index: ImsIndex) -> Result<&mut Slot, Error> {
        self.slots.get_mut(index as usize).filter(|s| s.allocated).ok_or(Error::ImsNotAllocated(index))
    }

    /// Gives every entry of `group` to `adi`; for in-memory storage, places them in its context.
    pub fn assign(&mut self, group: ImsGroup, adi: AdiId) -> Result<(), Error> {
        if self.groups.get(&group.first) != Some(&group.count) {
            return Err(Error::ImsNotAllocated(group.first));
        }
        for i in group.indexes() {
            let old = self.read(i)?;
            if let Some((prev, pos)) = self.placement.remove(&i) {
                if let Some(ctx) = self.contexts.get_mut(&prev) {
                    ctx[pos] = None;
                }
            }
            self.slot_mut(i)?.owner = Some(adi);
            if self.storage == ImsStorage::InMemory {
                let ctx = self.contexts.entry(adi).or_default();
                let pos = match ctx.iter().position(Option::is_none) {
                    Some(p) => p,
                    None => {
                        ctx.push(None);
                        ctx.len() - 1
                    }
                };
                ctx[pos] = Some(encode(&old));
                self.placement.insert(i, (adi, pos));
            }
        }
        Ok(())
    }

    /// The entry's owner.
    pub fn owner(&self, index: ImsIndex) -> Result<Option<AdiId>, Error> {
        Ok(self.slot(index)?.owner)
    }

    /// Reads an entry.
    pub fn read(&self, index: ImsIndex) -> Result<ImsEntry, Error> {
        self.slot(index)?;
        Ok(match self.storage {
            ImsStorage::OnDevice => decode(&self.table[index as usize]),
            ImsStorage::InMemory => match self.placement.get(&index) {
                Some((adi, pos)) => self.contexts[adi][*pos].as_ref().map_or(MASKED, decode),
                // Not yet in any queue context: reads as masked and empty.
                None => MASKED,
            },
        })
    }

    /// Writes an entry; unmasking delivers a pending interrupt.
    pub fn program(&mut self, index: ImsIndex, entry: ImsEntry) -> Result<(), Error> {
        self.slot(index)?;
        let bytes = encode(&entry);
        match self.storage {
            ImsStorage::OnDevice => self.table[index as usize] = bytes,
            ImsStorage::InMemory => {
                // In-memory entries exist only inside an ADI's queue context.
                let (adi, pos) = *self.placement.get(&index).ok_or(Error::ImsNotAllocated(index))?;
                if let Some(ctx) = self.contexts.get_mut(&adi) {
                    ctx[pos] = Some(bytes);
                }
            }
        }
        if !entry.masked {
            self.deliver_pending(index);
        }
        Ok(())
    }

    /// Sets the mask bit only.
    pub fn set_mask(&mut self, index: ImsIndex, masked: bool) -> Result<(), Error> {
        let mut e = self.read(index)?;
        e.masked = masked;
        self.program(index, e)
    }

    /// Pending bit.
    pub fn pending(&self, index: ImsIndex) -> Result<bool, Error> {
        Ok(self.slot(index)?.pending)
    }

    /// Binds the eventfd an entry signals.
    pub fn bind(&mut self, index: ImsIndex, target: Option<Arc<EventFd>>) -> Result<(), Error> {
        self.slot_mut(index)?.target = target;
        Ok(())
    }

    fn deliver_pending(&mut self, index: ImsIndex) {
        if let Some(slot) = self.slots.get_mut(index as usize) {
            if slot.pending {
                slot.pending = false;
                if let Some(t) = &slot.target {
                    let _ = t.write(1);
                }
            }
        }
    }

    /// Fires entry `index` on behalf of `adi`.
    pub fn fire(&mut self, index: ImsIndex, adi: AdiId) -> Fired {
        let masked = match self.read(index) {
            Ok(e) => e.masked,
            Err(_) => return Fired::Dropped,
        };
        let Some(slot) = self.slots.get_mut(index as usize) else { return Fired::Dropped };
        if slot.owner != Some(adi) {
            return Fired::Dropped;
        }
        if masked {
            slot.pending = true;
            return Fired::Pending;
        }
        match &slot.target {
            Some(t) if t.write(1).is_ok() => Fired::Delivered,
            _ => Fired::Dropped,
        }
    }

    /// MMIO view of an on-device table: a read of 4 or 8 bytes at `offset`. In-memory storage
    /// has no MMIO view and reads all-ones.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if self.storage != ImsStorage::OnDevice || !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let within = (offset % ENTRY_SIZE as u64) as usize;
        let idx = usize::try_from(offset / ENTRY_SIZE as u64).unwrap_or(usize::MAX);
        if let Some(e) = self.table.get(idx) {
            data.copy_from_slice(&e[within..within + data.len()]);
        }
    }

    /// MMIO write of 4 or 8 bytes to an on-device table. Unallocated entries ignore writes;
    /// only the mask bit of ctrl is writable.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if self.storage != ImsStorage::OnDevice || !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let within = (offset % ENTRY_SIZE as u64) as usize;
        // Index from a guest-controlled offset: convert without truncation, then bound it.
        let Some(idx) = u32::try_from(offset / ENTRY_SIZE as u64).ok().filter(|&i| (i as usize) < self.table.len())
        else {
            return;
        };
        if self.slot(idx).is_err() {
            return;
        }
        let mut bytes = self.table[idx as usize];
        bytes[within..within + data.len()].copy_from_slice(data);
        let mut ctrl = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        ctrl &= CTRL_MASK;
        bytes[12..16].copy_from_slice(&ctrl.to_le_bytes());
        // `slot(idx)` was checked above, so programming it cannot fail.
        if let Err(e) = self.program(idx, decode(&bytes)) {
            debug_assert!(false, "IMS entry {idx} checked, then refused: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evt() -> Arc<EventFd> {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn groups_allocate_free_and_merge() {
        let mut t = ImsTable::new(ImsStorage::OnDevice, 16_384);
        let a = t.alloc(2048).unwrap();
        let b = t.alloc(10_000).unwrap();
        let c = t.alloc(4336).unwrap();
        assert_eq!((a.first, b.first, c.first), (0, 2048, 12_048));
        assert_eq!(t.free_entries(), 0);
        assert_eq!(t.alloc(1), Err(Error::ImsExhausted { requested: 1, free: 0 }));
        t.free(b).unwrap();
        assert_eq!(t.alloc(10_001), Err(Error::ImsExhausted { requested: 10_001, free: 10_000 }));
        t.free(a).unwrap();
        // a and b merged: one run of 12048.
        assert_eq!(t.alloc(12_048).unwrap().first, 0);
        assert_eq!(t.free(ImsGroup { first: 5, count: 1 }), Err(Error::ImsNotAllocated(5)));
        assert_eq!(t.free(c), Ok(()));
        assert_eq!(t.free(c), Err(Error::ImsNotAllocated(c.first)));
        assert_eq!(t.alloc(0), Err(Error::EmptyGroup));
    }

    #[test]
    fn mask_pending_and_single_delivery() {
        for storage in [ImsStorage::OnDevice, ImsStorage::InMemory] {
            let mut t = ImsTable::new(storage, 64);
            let g = t.alloc(4).unwrap();
            t.assign(g, AdiId(1)).unwrap();
            let e = evt();
            t.bind(g.first, Some(e.clone())).unwrap();
            assert!(t.read(g.first).unwrap().masked, "{storage:?}: new entries are masked");
            assert_eq!(t.fire(g.first, AdiId(1)), Fired::Pending);
            assert_eq!(t.fire(g.first, AdiId(1)), Fired::Pending);
            assert!(t.pending(g.first).unwrap());
            assert!(e.read().is_err(), "{storage:?}: nothing delivered while masked");
            let msg = ImsEntry { message: MsiMessage { address: 0xfee0_0000, data: 0x41 }, masked: false };
            t.program(g.first, msg).unwrap();
            assert_eq!(e.read().unwrap(), 1, "{storage:?}: pending delivered once on unmask");
            assert!(!t.pending(g.first).unwrap());
            assert_eq!(t.read(g.first).unwrap(), msg);
            assert_eq!(t.fire(g.first, AdiId(1)), Fired::Delivered);
            assert_eq!(e.read().unwrap(), 1);
            // Another ADI cannot fire it.
            assert_eq!(t.fire(g.first, AdiId(2)), Fired::Dropped);
            assert!(e.read().is_err());
            t.set_mask(g.first, true).unwrap();
            assert_eq!(t.fire(g.first, AdiId(1)), Fired::Pending);
            t.set_mask(g.first, false).unwrap();
            assert_eq!(e.read().unwrap(), 1);
        }
    }

    #[test]
    fn in_memory_entries_live_in_queue_contexts() {
        let mut t = ImsTable::new(ImsStorage::InMemory, 32);
        let g = t.alloc(2).unwrap();
        let unmasked = ImsEntry { message: MsiMessage { address: 1, data: 2 }, masked: false };
        // Not placed in any queue context yet: nothing to program.
        assert_eq!(t.program(g.first, unmasked), Err(Error::ImsNotAllocated(g.first)));
        t.assign(g, AdiId(7)).unwrap();
        t.program(g.first, unmasked).unwrap();
        assert_eq!(t.contexts[&AdiId(7)].len(), 2);
        // No MMIO view.
        let mut b = [0u8; 4];
        t.mmio_read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
        t.mmio_write(12, &0u32.to_le_bytes());
        // Moving the group to another ADI moves the entries.
        t.assign(g, AdiId(8)).unwrap();
        assert_eq!(t.read(g.first).unwrap(), unmasked);
        assert_eq!(t.owner(g.first).unwrap(), Some(AdiId(8)));
        t.free(g).unwrap();
        assert!(t.read(g.first).is_err());
    }

    #[test]
    fn on_device_mmio_view() {
        let mut t = ImsTable::new(ImsStorage::OnDevice, 32);
        let g = t.alloc(1).unwrap();
        t.assign(g, AdiId(0)).unwrap();
        let base = u64::from(g.first) * ENTRY_SIZE as u64;
        t.mmio_write(base, &0xfee0_1000u32.to_le_bytes());
        t.mmio_write(base + 8, &0x55u32.to_le_bytes());
        t.mmio_write(base + 12, &0xffff_fffeu32.to_le_bytes()); // only the mask bit is writable
        let e = t.read(g.first).unwrap();
        assert_eq!(e, ImsEntry { message: MsiMessage { address: 0xfee0_1000, data: 0x55 }, masked: false });
        let mut b = [0u8; 8];
        t.mmio_read(base, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_1000);
        // Misaligned, odd sizes, out of range and unallocated entries are ignored.
        t.mmio_write(base + 2, &[1, 2, 3, 4]);
        t.mmio_write(base, &[1, 2]);
        t.mmio_write(31 * 16, &1u32.to_le_bytes());
        t.mmio_write(1 << 40, &1u32.to_le_bytes());
        let mut b = [0u8; 4];
        t.mmio_read(1 << 40, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(t.read(g.first).unwrap().message.address, 0xfee0_1000);
        assert!(t.read(31).is_err());
    }
}
