//! The trapped IMS window (`--ims trap`, docs/ims-policy.md): 1,024 slots of 16 bytes,
//! `{addr_lo, addr_hi, data, ctrl}` as in an MSI-X table, at BAR0 + 0x4000 of an ADI, where an
//! enlightened guest of a device with on-device IMS writes its own interrupt messages. Every
//! access traps to the VMM: a slot holding a valid message (0xFEEx_xxxx naming a vCPU of this
//! VM, vector >= 32), unmasked, is backed by one hypercall slot of the function
//! ([`WindowBacking`]), that is a host IMS entry whose eventfd is routed to the guest's
//! message in this VM only, as a host's interrupt remapping would. Masking the slot (or
//! writing a message naming nothing of this VM) masks the backing.
//!
//! One window for both kinds of ADI: in-process ones (`adi/mod.rs`, backed by the function's
//! own slots) and the device daemon's (`remote_ims.rs`: siovmm serves the window in front of
//! the daemon's BAR0, backed by slots the daemon keeps behind its IMS mailbox).

use devices::GuestFaults;
use siovmm_interrupts::MsiEntry;
use siovmm_vfio::user::ims_mailbox::SlotState;

use crate::adi::msi_destination;
use crate::{ImsOptIn, PvIms};

/// Where the window starts in BAR0.
pub const IMS_WINDOW: u64 = 0x4000;
/// Slots in the window.
pub const IMS_WINDOW_SLOTS: u32 = 1024;
/// Bytes of the window (it ends where the ADI's 32 KiB BAR0 does).
pub const IMS_WINDOW_SIZE: u64 = IMS_WINDOW_SLOTS as u64 * 16;

/// A window slot's ctrl dword: bit 0 mask (RW), bit 1 pending (RO), bit 2 backed by a host IMS
/// entry (RO), bits 31:16 the slot's interrupt handle once backed (RO).
pub mod ims_ctrl {
    /// Mask.
    pub const MASK: u32 = 1;
    /// Pending.
    pub const PENDING: u32 = 2;
    /// Backed by a host IMS entry.
    pub const BACKED: u32 = 4;
}

/// What backs a window's slots: the function's hypercall slots, and what the ctrl dword
/// reports of one.
pub trait WindowBacking: PvIms {
    /// Whether an interrupt is pending on a live slot, and its interrupt handle; `None` for a
    /// slot the function does not hold.
    fn slot_state(&self, slot: u32) -> Option<SlotState>;
}

/// One slot: the entry as the guest wrote it (unwritten: the masked reset entry, `MsiEntry`'s
/// default), and the hypercall slot backing it once it held a valid message.
#[derive(Debug, Clone, Copy, Default)]
struct WindowSlot {
    entry: MsiEntry,
    backing: Option<u32>,
}

/// One function's window.
#[derive(Debug)]
pub struct ImsWindow {
    /// Slots written so far (the rest read as a masked, empty entry).
    slots: Vec<WindowSlot>,
    /// The window is live only once the guest opted in to IMS: a guest told "no IMS" that
    /// writes here is not programming IMS.
    opt_in: ImsOptIn,
    /// vCPUs of the VM (messages may only name these APIC IDs).
    vcpus: u32,
    /// Backing operations that failed (counted, the first few logged).
    faults: GuestFaults,
}

impl ImsWindow {
    /// An empty window of the function named `name`, in a VM of `vcpus` vCPUs.
    pub fn new(name: String, opt_in: ImsOptIn, vcpus: u32) -> Self {
        Self { slots: Vec::new(), opt_in, vcpus, faults: GuestFaults::new(format!("{name}: IMS window")) }
    }

    /// Backing operations that failed so far.
    pub fn failures(&self) -> u64 {
        self.faults.count()
    }

    /// Whether `len` bytes at `offset` of the window are one dword the window serves (the
    /// caller ignores any other access: reads as zero, writes dropped).
    pub fn is_dword(offset: u64, len: usize) -> bool {
        offset < IMS_WINDOW_SIZE && len == 4 && offset.is_multiple_of(4)
    }

    /// A guest read of the dword at `offset` (see [`ImsWindow::is_dword`]): as written (the
    /// ctrl dword's mask bit, with pending, backed and the handle); 0 until the guest opted in.
    pub fn read(&self, offset: u64, backing: &dyn WindowBacking) -> u32 {
        if !self.opt_in.get() {
            return 0;
        }
        let (slot, dword) = ((offset / 16) as usize, ((offset % 16) / 4) as usize);
        let w = self.slots.get(slot).copied().unwrap_or_default();
        if dword != 3 {
            return w.entry.dword(dword);
        }
        let mut ctrl = w.entry.dword(3) & ims_ctrl::MASK;
        if let Some(b) = w.backing {
            ctrl |= ims_ctrl::BACKED;
            if let Some(state) = backing.slot_state(b) {
                ctrl |= if state.pending { ims_ctrl::PENDING } else { 0 } | (state.handle << 16);
            }
        }
        ctrl
    }

    /// A guest write of `value` to the dword at `offset` (see [`ImsWindow::is_dword`]): the
    /// slot's message becomes a host IMS entry (taken on first use) routed to that message.
    pub fn write(&mut self, offset: u64, value: u32, backing: &mut dyn WindowBacking) {
        if !self.opt_in.get() {
            return;
        }
        let slot = (offset / 16) as usize;
        if slot >= IMS_WINDOW_SLOTS as usize {
            return;
        }
        if self.slots.len() <= slot {
            self.slots.resize(slot + 1, WindowSlot::default());
        }
        let dword = ((offset % 16) / 4) as usize;
        let value = match dword {
            0 => value & !3,
            3 => value & ims_ctrl::MASK,
            _ => value,
        };
        let w = &mut self.slots[slot];
        w.entry.set_dword(dword, value);
        let (entry, backed) = (w.entry, w.backing);
        let message = entry.message();
        let valid = msi_destination(message).is_some_and(|d| d < self.vcpus) && (message.data & 0xff) >= 32;
        if entry.is_masked() || !valid {
            // Masked, or a message naming nothing of this VM: the entry raises nothing.
            if let Some(b) = backed {
                self.faults.record("masking a trapped IMS slot", backing.pv_mask(b, true));
            }
            return;
        }
        let b = match backed {
            Some(b) => b,
            None => match backing.pv_alloc(1) {
                Ok(b) => b,
                Err(_) => return, // IMS exhausted: the slot stays unbacked (ctrl says so)
            },
        };
        self.slots[slot].backing = Some(b);
        if self.faults.record("composing a trapped IMS slot", backing.pv_compose(b, message)).is_some() {
            self.faults.record("unmasking a trapped IMS slot", backing.pv_mask(b, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use siovmm_hypercall::Status;
    use siovmm_interrupts::MsiMessage;

    use super::*;

    /// Slots handed out from 0, each remembering its message and mask; `limit` slots at most.
    #[derive(Default)]
    struct FakeBacking {
        slots: BTreeMap<u32, (Option<MsiMessage>, bool)>,
        limit: u32,
        pending: bool,
    }

    impl PvIms for FakeBacking {
        fn pv_alloc(&mut self, count: u32) -> Result<u32, Status> {
            let first = self.slots.len() as u32;
            if first + count > self.limit {
                return Err(Status::Exhausted);
            }
            for s in first..first + count {
                self.slots.insert(s, (None, true));
            }
            Ok(first)
        }
        fn pv_free(&mut self, _: u32) -> Result<(), Status> {
            unreachable!("the window never frees")
        }
        fn pv_compose(&mut self, slot: u32, message: MsiMessage) -> Result<u64, Status> {
            self.slots.get_mut(&slot).ok_or(Status::NoSuchSlot)?.0 = Some(message);
            Ok(0)
        }
        fn pv_mask(&mut self, slot: u32, masked: bool) -> Result<(), Status> {
            self.slots.get_mut(&slot).ok_or(Status::NoSuchSlot)?.1 = masked;
            Ok(())
        }
    }

    impl WindowBacking for FakeBacking {
        fn slot_state(&self, slot: u32) -> Option<SlotState> {
            self.slots.contains_key(&slot).then_some(SlotState { pending: self.pending, handle: 2 + slot })
        }
    }

    fn program(w: &mut ImsWindow, b: &mut FakeBacking, slot: u64, [addr, data, ctrl]: [u32; 3]) {
        for (i, v) in [addr, 0, data, ctrl].into_iter().enumerate() {
            w.write(slot * 16 + i as u64 * 4, v, b);
        }
    }

    fn window(vcpus: u32) -> (ImsWindow, FakeBacking, ImsOptIn) {
        let opt_in = ImsOptIn::default();
        (ImsWindow::new("ADI 0".into(), opt_in.clone(), vcpus), FakeBacking { limit: 3, ..Default::default() }, opt_in)
    }

    #[test]
    fn valid_unmasked_messages_are_backed_and_routed_and_the_rest_are_not() {
        let (mut w, mut b, opt_in) = window(2);
        program(&mut w, &mut b, 0, [0xfee0_0000, 0x45, 0]);
        assert!(b.slots.is_empty() && w.read(8, &b) == 0, "inert until the guest opts in");
        opt_in.set();
        // An unwritten slot reads as a masked, empty entry.
        assert_eq!((w.read(16 * 9, &b), w.read(16 * 9 + 12, &b)), (0, ims_ctrl::MASK));
        program(&mut w, &mut b, 0, [0xfee0_1003, 0x45, 0xffff_fffe]);
        assert_eq!(w.read(0, &b), 0xfee0_1000, "the address's low two bits are not kept");
        assert_eq!(w.read(12, &b), ims_ctrl::BACKED | 2 << 16, "backed, handle 2, the written RO bits dropped");
        assert_eq!(b.slots[&0], (Some(MsiMessage { address: 0xfee0_1000, data: 0x45 }), false), "composed and unmasked");
        program(&mut w, &mut b, 1, [0xfee0_0000 | 5 << 12, 0x45, 0]);
        program(&mut w, &mut b, 2, [0xfee0_0000, 0x1f, 0]);
        program(&mut w, &mut b, 3, [0xfed0_0000, 0x45, 0]);
        assert_eq!(b.slots.len(), 1, "APIC 5 of a 2-vCPU VM, vector 0x1f, or not an MSI address: nothing backed");
        assert_eq!(w.read(16 + 12, &b) & ims_ctrl::BACKED, 0);
        w.write(12, ims_ctrl::MASK, &mut b);
        assert!(b.slots[&0].1, "the ctrl mask masks the backing");
        b.pending = true;
        assert_eq!(w.read(12, &b), ims_ctrl::MASK | ims_ctrl::PENDING | ims_ctrl::BACKED | 2 << 16);
        w.write(12, 0, &mut b);
        assert_eq!(b.slots.len(), 1, "the same backing again");
        assert!(!b.slots[&0].1);
        program(&mut w, &mut b, 0, [0xfee0_0000 | 9 << 12, 0x45, 0]);
        assert!(b.slots[&0].1, "retargeted at nothing of this VM: masked");
        assert_eq!(w.failures(), 0);
    }

    #[test]
    fn exhausted_slots_stay_unbacked_and_the_window_ends_at_its_last_slot() {
        let (mut w, mut b, opt_in) = window(1);
        opt_in.set();
        for slot in 0..4 {
            program(&mut w, &mut b, slot, [0xfee0_0000, 0x40, 0]);
        }
        assert_eq!(b.slots.len(), 3);
        assert_eq!(w.read(3 * 16 + 12, &b) & ims_ctrl::BACKED, 0, "the fourth: no entry left");
        w.write(IMS_WINDOW_SIZE, 0xfee0_0000, &mut b);
        assert_eq!(w.slots.len(), 4, "past the last slot: nothing kept");
        assert!(ImsWindow::is_dword(IMS_WINDOW_SIZE - 4, 4));
        assert!(!ImsWindow::is_dword(IMS_WINDOW_SIZE, 4) && !ImsWindow::is_dword(2, 4) && !ImsWindow::is_dword(0, 8));
    }
}
