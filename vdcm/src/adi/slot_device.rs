//! The device half of an ADI's hypercall IMS slots: what allocating, binding, composing and
//! masking a slot asks of the SIOV device. Shared by siovmm's in-process functions
//! ([`super::AdiFunction`]) and the device daemon's vfio-user ADIs, which take the same calls
//! through their IMS mailbox (`siovmm_vfio::user::ims_mailbox`). The books are
//! [`ImsSlots`]'; quotas, routes and handle tables stay with the caller.

use std::sync::Arc;

use siovmm_hypercall::Status;
use siovmm_vfio::siov::{AdiId, ImsGroup, SiovDevice};
use vmm_sys_util::eventfd::EventFd;

use super::ims_slots::ImsSlots;

/// One ADI of a device, as its hypercall slots see it.
#[derive(Clone, Copy)]
pub struct SlotDevice<'a> {
    /// The device.
    pub device: &'a dyn SiovDevice,
    /// The ADI.
    pub adi: AdiId,
    /// The device keeps IMS in queue memory (the guest stores host messages there, and mask
    /// and pending live there).
    pub in_queue: bool,
}

impl std::fmt::Debug for SlotDevice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotDevice").field("adi", &self.adi).field("in_queue", &self.in_queue).finish_non_exhaustive()
    }
}

impl SlotDevice<'_> {
    /// Takes `count` entries from the device for new slots, masked: the lowest free slot
    /// numbers that fit; returns the first. EXHAUSTED when numbers or entries run out.
    pub fn alloc(&self, slots: &mut ImsSlots, count: u32) -> Result<u32, Status> {
        let first = slots.reserve(count).ok_or(Status::Exhausted)?;
        match self.device.ims_alloc(self.adi, count) {
            Ok(group) => {
                slots.fill(first, group);
                Ok(first)
            }
            Err(_) => {
                slots.unreserve(first, count);
                Err(Status::Exhausted)
            }
        }
    }

    /// Forgets the group starting at `first` (its numbers free again); returns its entries,
    /// which go back to the device with [`SlotDevice::give_back`] once no handle names them.
    pub fn release(&self, slots: &mut ImsSlots, first: u32) -> Result<ImsGroup, Status> {
        slots.release(first).ok_or(Status::NoSuchSlot)
    }

    /// Returns a released group's entries to the device.
    pub fn give_back(&self, group: ImsGroup) -> Result<(), Status> {
        self.device.ims_free(self.adi, group).map_err(|_| Status::NoSuchSlot)
    }

    /// Has slot `slot`'s entry signal `fd` from now on (kept with the slot).
    pub fn bind(&self, slots: &mut ImsSlots, slot: u32, fd: Arc<EventFd>) -> Result<(), Status> {
        let s = slots.slot_mut(slot).ok_or(Status::NoSuchSlot)?;
        self.device.ims_bind(self.adi, s.index, Some(fd.clone())).map_err(|_| Status::NoSuchSlot)?;
        s.fd = Some(fd);
        Ok(())
    }

    /// The slot's eventfd, made and bound on first use.
    pub fn eventfd(&self, slots: &mut ImsSlots, slot: u32) -> Result<Arc<EventFd>, Status> {
        if let Some(fd) = slots.slot_mut(slot).ok_or(Status::NoSuchSlot)?.fd.clone() {
            return Ok(fd);
        }
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|_| Status::Exhausted)?);
        self.bind(slots, slot, fd.clone())?;
        Ok(fd)
    }

    /// The slot is composed (its delivery set up): returns the host message its entry writes
    /// (hypercall `message_result` form). In queue memory the guest's own mask bit governs from
    /// now on, so the host entry is unmasked; it only remaps.
    pub fn composed(&self, slots: &ImsSlots, slot: u32) -> Result<u64, Status> {
        let index = slots.index(slot).ok_or(Status::NoSuchSlot)?;
        if self.in_queue {
            self.device.ims_set_mask(self.adi, index, false).map_err(|_| Status::NoSuchSlot)?;
        }
        let host = self.device.ims_message(self.adi, index).map_err(|_| Status::NoSuchSlot)?;
        siovmm_hypercall::message_result(host.address, host.data).ok_or(Status::InvalidArgument)
    }

    /// Whether an interrupt is pending on the slot's host entry (raised while masked).
    pub fn pending(&self, slots: &ImsSlots, slot: u32) -> Result<bool, Status> {
        let index = slots.index(slot).ok_or(Status::NoSuchSlot)?;
        self.device.ims_pending(self.adi, index).map_err(|_| Status::NoSuchSlot)
    }

    /// Masks or unmasks the slot; unmasking delivers a pending interrupt once. In queue memory
    /// this sets the mask bit stored there and commits it.
    pub fn mask(&self, slots: &ImsSlots, slot: u32, masked: bool) -> Result<(), Status> {
        let index = slots.index(slot).ok_or(Status::NoSuchSlot)?;
        let r = if self.in_queue {
            self.device.queue_ims_set_mask(self.adi, slot, masked).map(drop)
        } else {
            self.device.ims_set_mask(self.adi, index, masked)
        };
        r.map_err(|_| Status::NoSuchSlot)
    }
}
