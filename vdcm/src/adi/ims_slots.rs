//! An ADI's guest-programmable IMS slots, as plain state: the slot numbers the hypercall hands
//! out (groups of consecutive slots, each backed by a host IMS entry; freed numbers reused,
//! lowest first), which also back the trapped IMS window's slots (`crate::ims_window`). What programming a slot *does* (device entries, routes) is the
//! function's (`adi/mod.rs`); this module only keeps the books, so it is tested alone.

use std::sync::Arc;

use siovmm_vfio::siov::{HandleTarget, ImsGroup, ImsIndex};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vmm_sys_util::eventfd::EventFd;

/// Most hypercall slots one ADI may hold at once.
pub const MAX_PV_SLOTS: u32 = 0x8000;

/// One hypercall-managed slot: its host IMS entry and, once composed, the eventfd it signals.
#[derive(Debug, Clone)]
pub struct PvSlot {
    /// The host IMS entry.
    pub index: ImsIndex,
    /// The eventfd bound to the entry, made on first compose.
    pub fd: Option<Arc<EventFd>>,
}

/// The books of one ADI's hypercall slots.
#[derive(Debug)]
pub struct ImsSlots {
    /// Groups by first slot.
    groups: Vec<(u32, ImsGroup)>,
    /// Free slot numbers.
    space: AddressAllocator,
    /// By slot number; `None` when free.
    slots: Vec<Option<PvSlot>>,
}

impl Default for ImsSlots {
    fn default() -> Self {
        Self::new()
    }
}

impl ImsSlots {
    /// No slots.
    pub fn new() -> Self {
        Self { groups: Vec::new(), space: AddressAllocator::new(0, u64::from(MAX_PV_SLOTS)).expect("a non-empty slot space"), slots: Vec::new() }
    }

    /// Reserves `count` consecutive slot numbers, the lowest free range that fits.
    pub fn reserve(&mut self, count: u32) -> Option<u32> {
        let range = self.space.allocate(u64::from(count.max(1)), 1, AllocPolicy::FirstMatch).ok()?;
        Some(range.start() as u32)
    }

    /// Gives back numbers [`ImsSlots::reserve`] returned but that got no group.
    pub fn unreserve(&mut self, first: u32, count: u32) {
        self.free_numbers(first, count);
    }

    fn free_numbers(&mut self, first: u32, count: u32) {
        if let Ok(range) = RangeInclusive::new(u64::from(first), u64::from(first + count.max(1) - 1)) {
            // Only ranges this allocator handed out come back here.
            let _ = self.space.free(&range);
        }
    }

    /// Records `group` on the slots reserved from `first`.
    pub fn fill(&mut self, first: u32, group: ImsGroup) {
        let end = (first + group.count) as usize;
        if self.slots.len() < end {
            self.slots.resize_with(end, || None);
        }
        for (slot, index) in (first..).zip(group.indexes()) {
            self.slots[slot as usize] = Some(PvSlot { index, fd: None });
        }
        self.groups.push((first, group));
    }

    /// Forgets the group starting at `first` and frees its slot numbers; returns the group.
    pub fn release(&mut self, first: u32) -> Option<ImsGroup> {
        let at = self.groups.iter().position(|(f, _)| *f == first)?;
        let (_, group) = self.groups.remove(at);
        for slot in first..first + group.count {
            self.slots[slot as usize] = None;
        }
        self.free_numbers(first, group.count);
        Some(group)
    }

    /// The first slot of some live group, if any (to free them all, one by one).
    pub fn first_group(&self) -> Option<u32> {
        self.groups.first().map(|(first, _)| *first)
    }

    /// Slots held (in live groups).
    pub fn held(&self) -> u32 {
        self.groups.iter().map(|(_, g)| g.count).sum()
    }

    /// A live slot.
    pub fn slot_mut(&mut self, slot: u32) -> Option<&mut PvSlot> {
        self.slots.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// A live slot's host IMS entry.
    pub fn index(&self, slot: u32) -> Option<ImsIndex> {
        self.slots.get(slot as usize).and_then(|s| s.as_ref()).map(|s| s.index)
    }

    /// What each slot's handle fires, in slot order (`None` where free), for the handle table:
    /// its host IMS entry, or with `in_queue` the entry of the same number in the queue's IMS
    /// area, where the guest stores the host message.
    pub fn handles(&self, in_queue: bool) -> impl Iterator<Item = Option<HandleTarget>> + '_ {
        (0u32..).zip(&self.slots).map(move |(n, s)| {
            s.as_ref().map(|s| if in_queue { HandleTarget::Queue(n) } else { HandleTarget::Entry(s.index) })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(first: u32, count: u32) -> ImsGroup {
        ImsGroup { first, count }
    }

    #[test]
    fn slot_numbers_are_reused_lowest_first() {
        let mut s = ImsSlots::new();
        let a = s.reserve(4).unwrap();
        s.fill(a, group(100, 4));
        let b = s.reserve(2).unwrap();
        s.fill(b, group(200, 2));
        assert_eq!((a, b), (0, 4));
        assert_eq!(s.index(5), Some(201));
        let entries = [100, 101, 102, 103, 200, 201].map(|i| Some(HandleTarget::Entry(i)));
        assert_eq!(s.handles(false).collect::<Vec<_>>(), entries);
        assert_eq!(s.handles(true).collect::<Vec<_>>(), (0..6).map(|n| Some(HandleTarget::Queue(n))).collect::<Vec<_>>());
        assert_eq!(s.release(1), None, "not a group's first slot");
        assert_eq!(s.release(0), Some(group(100, 4)));
        assert_eq!(s.index(0), None);
        assert_eq!(s.reserve(2), Some(0));
        s.unreserve(0, 2);
        // Freed neighbours merge again (vm-allocator merges with free neighbours of two or
        // more slots; a single free slot beside a freed range stays apart).
        assert_eq!(s.reserve(4), Some(0));
        assert_eq!(s.release(4), Some(group(200, 2)));
    }

    #[test]
    fn the_slot_space_is_bounded() {
        let mut s = ImsSlots::new();
        assert_eq!(s.reserve(MAX_PV_SLOTS), Some(0));
        assert_eq!(s.reserve(1), None);
    }
}
