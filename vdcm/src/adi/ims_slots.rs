//! An ADI's guest-programmable IMS slots, as plain state: the slot numbers the hypercall hands
//! out (groups of consecutive slots, each backed by a host IMS entry; freed numbers reused,
//! lowest first), and, in trap mode, the guest-visible IMS window whose programmed slots are
//! backed by such slots. What programming a slot *does* (device entries, routes) is the
//! function's (`adi/mod.rs`); this module only keeps the books, so it is tested alone.

use std::sync::Arc;

use siovmm_interrupts::MsiEntry;
use siovmm_vfio::siov::{HandleTarget, ImsGroup, ImsIndex};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vmm_sys_util::eventfd::EventFd;

/// Most hypercall slots one ADI may hold at once.
pub const MAX_PV_SLOTS: u32 = 0x8000;
/// Slots in the trapped IMS window (16 bytes each, in BAR0 from `adi::IMS_WINDOW`).
pub const IMS_WINDOW_SLOTS: u32 = 1024;

/// One hypercall-managed slot: its host IMS entry and, once composed, the eventfd it signals.
#[derive(Debug, Clone)]
pub struct PvSlot {
    /// The host IMS entry.
    pub index: ImsIndex,
    /// The eventfd bound to the entry, made on first compose.
    pub fd: Option<Arc<EventFd>>,
}

/// One slot of the trapped window: the entry as the guest wrote it (the MSI-X/IMS layout),
/// and the hypercall slot backing it once it held a valid message.
#[derive(Debug, Clone, Copy, Default)]
struct WindowSlot {
    entry: MsiEntry,
    backing: Option<u32>,
}

/// The books of one ADI's hypercall slots and trapped window.
#[derive(Debug)]
pub struct ImsSlots {
    /// Groups by first slot.
    groups: Vec<(u32, ImsGroup)>,
    /// Free slot numbers.
    space: AddressAllocator,
    /// By slot number; `None` when free.
    slots: Vec<Option<PvSlot>>,
    /// The trapped window, when the VM is in trap mode.
    window: Option<Vec<WindowSlot>>,
}

impl ImsSlots {
    /// No slots; a trapped window when `trap`.
    pub fn new(trap: bool) -> Self {
        Self {
            groups: Vec::new(),
            space: AddressAllocator::new(0, u64::from(MAX_PV_SLOTS)).expect("a non-empty slot space"),
            slots: Vec::new(),
            window: trap.then(Vec::new),
        }
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

    /// Whether the trapped window exists (trap mode).
    pub fn has_window(&self) -> bool {
        self.window.is_some()
    }

    /// A guest read of dword `offset / 4` of the window: the dword as written (the control
    /// dword's own bits only) and the backing slot, if any. `None` without a window.
    pub fn window_read(&self, offset: u64) -> Option<(u32, Option<u32>)> {
        let window = self.window.as_ref()?;
        let (slot, dword) = ((offset / 16) as usize, ((offset % 16) / 4) as usize);
        Some(match window.get(slot) {
            Some(w) => (w.entry.dword(dword), w.backing),
            None => (MsiEntry::masked().dword(dword), None),
        })
    }

    /// A guest write of `value` to dword `offset / 4` of the window (address dword-aligned,
    /// control: only the mask bit kept); returns the slot, its entry now and its backing.
    /// `None` without a window or past its last slot.
    pub fn window_write(&mut self, offset: u64, value: u32) -> Option<(usize, MsiEntry, Option<u32>)> {
        let window = self.window.as_mut()?;
        let slot = (offset / 16) as usize;
        if slot >= IMS_WINDOW_SLOTS as usize {
            return None;
        }
        if window.len() <= slot {
            window.resize(slot + 1, WindowSlot::default());
        }
        let dword = ((offset % 16) / 4) as usize;
        let value = match dword {
            0 => value & !3,
            3 => value & siovmm_interrupts::msi::CTRL_MASK,
            _ => value,
        };
        let w = &mut window[slot];
        w.entry.set_dword(dword, value);
        Some((slot, w.entry, w.backing))
    }

    /// Records that window slot `slot` is backed by hypercall slot `backing`.
    pub fn set_backing(&mut self, slot: usize, backing: u32) {
        if let Some(w) = self.window.as_mut().and_then(|w| w.get_mut(slot)) {
            w.backing = Some(backing);
        }
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
        let mut s = ImsSlots::new(false);
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
        let mut s = ImsSlots::new(false);
        assert_eq!(s.reserve(MAX_PV_SLOTS), Some(0));
        assert_eq!(s.reserve(1), None);
    }

    #[test]
    fn the_window_keeps_what_the_guest_wrote_in_the_entry_layout() {
        let mut none = ImsSlots::new(false);
        assert_eq!(none.window_read(0), None);
        assert_eq!(none.window_write(0, 1), None);

        let mut s = ImsSlots::new(true);
        // An unwritten slot reads masked.
        assert_eq!(s.window_read(16 + 12), Some((1, None)));
        s.window_write(16, 0xfee0_1003).unwrap();
        s.window_write(16 + 8, 0x41).unwrap();
        let (slot, entry, backing) = s.window_write(16 + 12, 0xffff_fffe).unwrap();
        assert_eq!((slot, backing), (1, None));
        assert_eq!((entry.message().address, entry.message().data, entry.is_masked()), (0xfee0_1000, 0x41, false));
        s.set_backing(1, 7);
        assert_eq!(s.window_read(16 + 12), Some((0, Some(7))));
        assert_eq!(s.window_write(u64::from(IMS_WINDOW_SLOTS) * 16, 1), None);
    }
}
