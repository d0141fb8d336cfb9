//! The software device's Interrupt Message Store.
//!
//! - **Allocation**: entries are handed out to one ADI in groups of consecutive indexes, first
//!   fit, from a free-range map; frees merge neighbours. Any number of groups, any time after
//!   start-up; closing an ADI frees all of its groups. Every operation names the ADI and is
//!   refused for an entry that is not that ADI's.
//! - **Messages**: the device composes each entry's host message at allocation
//!   ([`host_message`]); the VMM reads it, masks and unmasks, and binds the eventfd.
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

use crate::siov::{AdiId, Error, Fired, ImsEntry, ImsGroup, ImsIndex, ImsStorage, MsiMessage};

/// An interrupt decided but not yet signalled: the table's lock is shared by every worker of
/// the device, so the eventfd write (a system call, and KVM's injection behind it) is made
/// after the lock is let go, letting workers deliver in parallel. A mask or rebind that comes
/// in between does not stop a signal already decided, as an MSI already on its way to the
/// host bridge is not recalled by a mask write behind it; a target unbound meanwhile is an
/// eventfd nothing listens on any more (each is one VM's own, never reused by another).
#[derive(Debug)]
pub enum Aim {
    /// Unmasked and bound: this eventfd is to be written.
    Signal(Arc<EventFd>),
    /// Masked: marked pending.
    Pending,
    /// Not the ADI's entry, or nothing bound.
    Dropped,
}

impl Aim {
    /// Signals the eventfd, if there is one to signal.
    pub fn deliver(self) -> Fired {
        match self {
            Aim::Signal(fd) if fd.write(1).is_ok() => Fired::Delivered,
            Aim::Pending => Fired::Pending,
            _ => Fired::Dropped,
        }
    }
}

/// Bytes per entry in the MMIO layout; ctrl bit 0 masks it.
pub use siovmm_interrupts::msi::{CTRL_MASK, ENTRY_SIZE};

/// Per-entry state that is not part of the message.
#[derive(Debug, Default)]
struct Slot {
    /// The ADI the entry is allocated to; `None` when free.
    owner: Option<AdiId>,
    pending: bool,
    target: Option<Arc<EventFd>>,
}

/// Most entries: each host message names its entry by a 16-bit interrupt-remapping handle.
pub const MAX_ENTRIES: u32 = 1 << 16;

/// The host message entry `index` writes: VT-d's remappable format (VT-d 4.1 §5.1.5.2), whose
/// 16-bit handle names the host interrupt-remapping entry set up for this IMS entry. A
/// hardware device's host driver gets such a message from the host's interrupt domain; the
/// software device delivers through the bound eventfd, so the message only identifies.
pub fn host_message(index: ImsIndex) -> MsiMessage {
    let handle = index & 0xffff;
    MsiMessage { address: u64::from(0xfee0_0000 | (handle & 0x7fff) << 5 | 1 << 4 | (handle >> 15) << 2), data: 0 }
}

/// The host IMS entry a host message names: the inverse of [`host_message`], as the host's
/// interrupt remapping reads a remappable-format message (address 0xFEEx_xxxx with bit 4 set,
/// handle in bits 19:5 and 2, SHV clear so the data is not used). `None` for anything else,
/// such as a guest's own compatibility-format message.
pub fn remapped_entry(message: MsiMessage) -> Option<ImsIndex> {
    let a = message.address;
    if a >> 20 != 0xfee || a & (1 << 4) == 0 || a & (1 << 3) != 0 || a & 0b11 != 0 {
        return None;
    }
    Some((((a >> 5) & 0x7fff) | ((a >> 2) & 1) << 15) as ImsIndex)
}

/// The IMS.
#[derive(Debug)]
pub struct ImsTable {
    storage: ImsStorage,
    slots: Vec<Slot>,
    /// OnDevice: the MMIO table (all entries). InMemory: unused.
    table: Vec<[u8; ENTRY_SIZE]>,
    /// InMemory: each ADI's queue-context IMS area, and where each entry sits in it.
    contexts: HashMap<AdiId, QueueContext>,
    placement: HashMap<ImsIndex, (AdiId, usize)>,
    free: BTreeMap<u32, u32>,
    /// Allocated groups: first index → (count, owner).
    groups: HashMap<u32, (u32, AdiId)>,
}

/// The IMS area of one ADI's queue context: entry slots, and the free ones among them (so
/// placing an entry is O(1) however many the ADI holds).
#[derive(Debug, Default)]
struct QueueContext {
    entries: Vec<Option<[u8; ENTRY_SIZE]>>,
    holes: Vec<usize>,
}

impl QueueContext {
    fn place(&mut self, entry: [u8; ENTRY_SIZE]) -> usize {
        match self.holes.pop() {
            Some(pos) => {
                self.entries[pos] = Some(entry);
                pos
            }
            None => {
                self.entries.push(Some(entry));
                self.entries.len() - 1
            }
        }
    }

    fn clear(&mut self, pos: usize) {
        if let Some(slot @ Some(_)) = self.entries.get_mut(pos) {
            *slot = None;
            self.holes.push(pos);
        }
    }
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
    /// `entries` entries of `storage` (at most [`MAX_ENTRIES`]; more are not made).
    pub fn new(storage: ImsStorage, entries: u32) -> Self {
        let entries = entries.min(MAX_ENTRIES);
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

    /// Allocates `count` consecutive entries to `adi`, each masked with its host message; for
    /// in-memory storage they are placed in the ADI's queue context.
    pub fn alloc(&mut self, adi: AdiId, count: u32) -> Result<ImsGroup, Error> {
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
        self.groups.insert(start, (count, adi));
        for i in start..start + count {
            self.slots[i as usize] = Slot { owner: Some(adi), ..Slot::default() };
            let entry = encode(&ImsEntry { message: host_message(i), masked: true });
            match self.storage {
                ImsStorage::OnDevice => self.table[i as usize] = entry,
                ImsStorage::InMemory => {
                    let pos = self.contexts.entry(adi).or_default().place(entry);
                    self.placement.insert(i, (adi, pos));
                }
            }
        }
        Ok(ImsGroup { first: start, count })
    }

    /// Frees a group `alloc` gave `adi` (exactly that group).
    pub fn free(&mut self, adi: AdiId, group: ImsGroup) -> Result<(), Error> {
        if self.groups.get(&group.first) != Some(&(group.count, adi)) {
            return Err(Error::ImsNotAllocated(group.first));
        }
        self.groups.remove(&group.first);
        for i in group.indexes() {
            self.slots[i as usize] = Slot::default();
            if let Some((owner, pos)) = self.placement.remove(&i) {
                if let Some(ctx) = self.contexts.get_mut(&owner) {
                    ctx.clear(pos);
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

    /// Frees every group of `adi` (its ADI is closed); returns how many entries went back.
    pub fn free_all(&mut self, adi: AdiId) -> u32 {
        let groups: Vec<ImsGroup> = self
            .groups
            .iter()
            .filter(|(_, (_, owner))| *owner == adi)
            .map(|(&first, &(count, _))| ImsGroup { first, count })
            .collect();
        let mut freed = 0;
        for g in groups {
            if self.free(adi, g).is_ok() {
                freed += g.count;
            }
        }
        self.contexts.remove(&adi);
        freed
    }

    /// The entry, if it is allocated to `adi`.
    fn slot(&self, adi: AdiId, index: ImsIndex) -> Result<&Slot, Error> {
        self.slots.get(index as usize).filter(|s| s.owner == Some(adi)).ok_or(Error::ImsNotAllocated(index))
    }

    fn slot_mut(&mut self, adi: AdiId, index: ImsIndex) -> Result<&mut Slot, Error> {
        self.slots.get_mut(index as usize).filter(|s| s.owner == Some(adi)).ok_or(Error::ImsNotAllocated(index))
    }

    /// The entry's owner, if it is allocated.
    pub fn owner(&self, index: ImsIndex) -> Option<AdiId> {
        self.slots.get(index as usize).and_then(|s| s.owner)
    }

    /// Reads an entry of `adi`.
    pub fn read(&self, adi: AdiId, index: ImsIndex) -> Result<ImsEntry, Error> {
        self.slot(adi, index)?;
        Ok(self.stored(index))
    }

    /// An allocated entry as stored.
    fn stored(&self, index: ImsIndex) -> ImsEntry {
        match self.storage {
            ImsStorage::OnDevice => decode(&self.table[index as usize]),
            ImsStorage::InMemory => match self.placement.get(&index) {
                Some((adi, pos)) => {
                    self.contexts.get(adi).and_then(|c| c.entries.get(*pos).copied().flatten()).map_or(MASKED, |b| decode(&b))
                }
                None => MASKED,
            },
        }
    }

    /// Stores an allocated entry; unmasking delivers a pending interrupt.
    fn store(&mut self, index: ImsIndex, entry: ImsEntry) {
        let bytes = encode(&entry);
        match self.storage {
            ImsStorage::OnDevice => self.table[index as usize] = bytes,
            ImsStorage::InMemory => {
                if let Some(&(adi, pos)) = self.placement.get(&index) {
                    if let Some(slot) = self.contexts.get_mut(&adi).and_then(|c| c.entries.get_mut(pos)) {
                        *slot = Some(bytes);
                    }
                }
            }
        }
        if !entry.masked {
            self.deliver_pending(index);
        }
    }

    /// Sets the mask bit of an entry of `adi`.
    pub fn set_mask(&mut self, adi: AdiId, index: ImsIndex, masked: bool) -> Result<(), Error> {
        let mut e = self.read(adi, index)?;
        e.masked = masked;
        self.store(index, e);
        Ok(())
    }

    /// Pending bit.
    pub fn pending(&self, adi: AdiId, index: ImsIndex) -> Result<bool, Error> {
        Ok(self.slot(adi, index)?.pending)
    }

    /// Binds the eventfd an entry of `adi` signals.
    pub fn bind(&mut self, adi: AdiId, index: ImsIndex, target: Option<Arc<EventFd>>) -> Result<(), Error> {
        self.slot_mut(adi, index)?.target = target;
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
        self.aim(index, adi).deliver()
    }

    /// Fires entry `index` on behalf of `adi` up to the signal: a masked entry is marked
    /// pending here, an unmasked one gives the eventfd to signal, which the caller does once
    /// it has let go of the table (see [`Aim`]).
    pub fn aim(&mut self, index: ImsIndex, adi: AdiId) -> Aim {
        let masked = match self.read(adi, index) {
            Ok(e) => e.masked,
            Err(_) => return Aim::Dropped,
        };
        let Some(slot) = self.slots.get_mut(index as usize) else { return Aim::Dropped };
        if masked {
            slot.pending = true;
            return Aim::Pending;
        }
        slot.target.clone().map_or(Aim::Dropped, Aim::Signal)
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
        if self.owner(idx).is_none() {
            return;
        }
        let mut bytes = self.table[idx as usize];
        bytes[within..within + data.len()].copy_from_slice(data);
        let mut ctrl = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        ctrl &= CTRL_MASK;
        bytes[12..16].copy_from_slice(&ctrl.to_le_bytes());
        self.store(idx, decode(&bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evt() -> Arc<EventFd> {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    const A: AdiId = AdiId(1);
    const B: AdiId = AdiId(2);

    #[test]
    fn host_messages_name_their_entry_and_nothing_else_does() {
        for i in [0, 1, 0x7fff, 0x8000, 0xabcd, 0xffff] {
            assert_eq!(remapped_entry(host_message(i)), Some(i));
        }
        // A guest's own message (compatibility format), SHV set, high address bits, garbage.
        for address in [0xfee0_0000, 0xfee0_0018, 0x1_fee0_0010, 0xfed0_0010, 0xfee0_0011, 0] {
            assert_eq!(remapped_entry(MsiMessage { address, data: 0 }), None, "{address:#x}");
        }
    }

    #[test]
    fn groups_allocate_free_and_merge() {
        let mut t = ImsTable::new(ImsStorage::OnDevice, 16_384);
        let a = t.alloc(A, 2048).unwrap();
        let b = t.alloc(A, 10_000).unwrap();
        let c = t.alloc(B, 4336).unwrap();
        assert_eq!((a.first, b.first, c.first), (0, 2048, 12_048));
        assert_eq!(t.free_entries(), 0);
        assert_eq!(t.alloc(A, 1), Err(Error::ImsExhausted { requested: 1, free: 0 }));
        t.free(A, b).unwrap();
        assert_eq!(t.alloc(A, 10_001), Err(Error::ImsExhausted { requested: 10_001, free: 10_000 }));
        t.free(A, a).unwrap();
        // a and b merged: one run of 12048.
        assert_eq!(t.alloc(A, 12_048).unwrap().first, 0);
        assert_eq!(t.free(A, ImsGroup { first: 5, count: 1 }), Err(Error::ImsNotAllocated(5)));
        assert_eq!(t.free(A, c), Err(Error::ImsNotAllocated(c.first)), "another ADI's group");
        assert_eq!(t.free(B, c), Ok(()));
        assert_eq!(t.free(B, c), Err(Error::ImsNotAllocated(c.first)));
        assert_eq!(t.alloc(A, 0), Err(Error::EmptyGroup));
    }

    #[test]
    fn closing_an_adi_frees_all_its_groups_and_only_its() {
        for storage in [ImsStorage::OnDevice, ImsStorage::InMemory] {
            let mut t = ImsTable::new(storage, 64);
            let a1 = t.alloc(A, 4).unwrap();
            let b1 = t.alloc(B, 8).unwrap();
            let a2 = t.alloc(A, 16).unwrap();
            assert_eq!(t.free_all(A), 20, "{storage:?}");
            assert_eq!(t.free_entries(), 56);
            assert!(t.read(A, a1.first).is_err() && t.read(A, a2.first).is_err());
            assert!(t.read(B, b1.first).unwrap().masked, "{storage:?}: B's entries stay");
            assert_eq!(t.free_all(A), 0);
        }
    }

    #[test]
    fn the_device_composes_each_entrys_host_message() {
        for storage in [ImsStorage::OnDevice, ImsStorage::InMemory] {
            let mut t = ImsTable::new(storage, 1 << 16);
            let g = t.alloc(A, 1 << 16).unwrap();
            for i in [0, 1, 0x7fff, 0x8000, 0xffff] {
                let e = t.read(A, i).unwrap();
                assert!(e.masked);
                assert_eq!(e.message, host_message(i));
            }
            // Remappable format: bit 4 set, handle[14:0] in bits 19:5, handle[15] in bit 2.
            assert_eq!(host_message(0x8001).address, 0xfee0_0000 | 1 << 5 | 1 << 4 | 1 << 2);
            let distinct: std::collections::HashSet<_> = g.indexes().map(host_message).collect();
            assert_eq!(distinct.len(), 1 << 16, "every entry has its own handle");
        }
        assert_eq!(ImsTable::new(ImsStorage::OnDevice, u32::MAX).len(), MAX_ENTRIES);
    }

    #[test]
    fn aiming_decides_under_the_table_and_signals_only_when_delivered() {
        let mut t = ImsTable::new(ImsStorage::OnDevice, 16);
        let g = t.alloc(A, 2).unwrap();
        let e = evt();
        t.bind(A, g.first, Some(e.clone())).unwrap();
        assert!(matches!(t.aim(g.first, A), Aim::Pending), "masked: marked pending, nothing to signal");
        assert!(t.pending(A, g.first).unwrap());
        assert_eq!(e.read().ok(), None);
        t.set_mask(A, g.first, false).unwrap();
        assert_eq!(e.read().ok(), Some(1), "the pending one, on unmask");
        let Aim::Signal(target) = t.aim(g.first, A) else { panic!("an unmasked, bound entry is signalled") };
        assert!(Arc::ptr_eq(&target, &e));
        assert_eq!(e.read().ok(), None, "aiming writes nothing: the caller signals once the table is let go");
        drop(t);
        assert_eq!(Aim::Signal(target).deliver(), Fired::Delivered);
        assert_eq!(e.read().ok(), Some(1));
        let mut t = ImsTable::new(ImsStorage::OnDevice, 16);
        let g = t.alloc(A, 1).unwrap();
        t.set_mask(A, g.first, false).unwrap();
        assert!(matches!(t.aim(g.first, A), Aim::Dropped), "nothing bound");
        assert!(matches!(t.aim(g.first, B), Aim::Dropped), "another ADI's entry");
    }

    #[test]
    fn mask_pending_and_single_delivery() {
        for storage in [ImsStorage::OnDevice, ImsStorage::InMemory] {
            let mut t = ImsTable::new(storage, 64);
            let g = t.alloc(A, 4).unwrap();
            let e = evt();
            t.bind(A, g.first, Some(e.clone())).unwrap();
            assert!(t.read(A, g.first).unwrap().masked, "{storage:?}: new entries are masked");
            assert_eq!(t.fire(g.first, A), Fired::Pending);
            assert_eq!(t.fire(g.first, A), Fired::Pending);
            assert!(t.pending(A, g.first).unwrap());
            assert!(e.read().is_err(), "{storage:?}: nothing delivered while masked");
            t.set_mask(A, g.first, false).unwrap();
            assert_eq!(e.read().unwrap(), 1, "{storage:?}: pending delivered once on unmask");
            assert!(!t.pending(A, g.first).unwrap());
            assert_eq!(t.fire(g.first, A), Fired::Delivered);
            assert_eq!(e.read().unwrap(), 1);
            // Another ADI can neither fire it nor touch it.
            assert_eq!(t.fire(g.first, B), Fired::Dropped);
            assert!(e.read().is_err());
            assert_eq!(t.set_mask(B, g.first, true), Err(Error::ImsNotAllocated(g.first)));
            assert_eq!(t.bind(B, g.first, None), Err(Error::ImsNotAllocated(g.first)));
            assert_eq!(t.pending(B, g.first), Err(Error::ImsNotAllocated(g.first)));
            t.set_mask(A, g.first, true).unwrap();
            assert_eq!(t.fire(g.first, A), Fired::Pending);
            t.set_mask(A, g.first, false).unwrap();
            assert_eq!(e.read().unwrap(), 1);
        }
    }

    #[test]
    fn in_memory_entries_live_in_queue_contexts() {
        let mut t = ImsTable::new(ImsStorage::InMemory, 32);
        let g = t.alloc(AdiId(7), 2).unwrap();
        assert_eq!(t.contexts[&AdiId(7)].entries.len(), 2);
        t.set_mask(AdiId(7), g.first, false).unwrap();
        assert_eq!(
            t.contexts[&AdiId(7)].entries[0].map(|b| decode(&b)),
            Some(ImsEntry { message: host_message(g.first), masked: false })
        );
        // No MMIO view.
        let mut b = [0u8; 4];
        t.mmio_read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
        t.mmio_write(12, &1u32.to_le_bytes());
        assert!(!t.read(AdiId(7), g.first).unwrap().masked);
        t.free(AdiId(7), g).unwrap();
        assert!(t.read(AdiId(7), g.first).is_err());
        assert!(t.contexts[&AdiId(7)].entries.iter().all(Option::is_none), "freed entries leave the context");
        // Their places are taken again before the context grows.
        t.alloc(AdiId(7), 2).unwrap();
        assert_eq!(t.contexts[&AdiId(7)].entries.len(), 2);
    }

    #[test]
    fn on_device_mmio_view() {
        let mut t = ImsTable::new(ImsStorage::OnDevice, 32);
        let g = t.alloc(AdiId(0), 1).unwrap();
        let base = u64::from(g.first) * ENTRY_SIZE as u64;
        t.mmio_write(base, &0xfee0_1000u32.to_le_bytes());
        t.mmio_write(base + 8, &0x55u32.to_le_bytes());
        t.mmio_write(base + 12, &0xffff_fffeu32.to_le_bytes()); // only the mask bit is writable
        let e = t.read(AdiId(0), g.first).unwrap();
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
        assert_eq!(t.read(AdiId(0), g.first).unwrap().message.address, 0xfee0_1000);
        assert!(t.read(AdiId(0), 31).is_err());
        assert_eq!(t.owner(31), None);
    }
}
