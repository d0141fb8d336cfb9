//! Hypercall IMS slots of a function whose device owns them: a vfio-user ADI of the device
//! daemon (docs/devd.md, "IMS for enlightened guests"). The device keeps the books and the
//! host IMS entries and answers through its IMS mailbox (`siovmm_vfio::user::ims_mailbox`);
//! what stays here is what only the VMM can do: the VM's quota (shared with its other ADIs),
//! and delivery into this VM — each composed slot's eventfd, handed to the device with
//! `SET_IRQS`, is bound to a KVM route carrying the guest's message, so the device's
//! interrupt reaches the guest without passing through siovmm, as with in-process ADIs.

use std::collections::BTreeMap;
use std::sync::Arc;

use siovmm_hypercall::Status;
use siovmm_interrupts::{FunctionId, MsiMessage, MsiRouter, VectorKey};
use siovmm_vfio::user::ims_mailbox::{ImsMailbox, Offer, Request};
use vmm_sys_util::eventfd::EventFd;

use crate::{ImsQuota, PvIms};

/// One function's slots, as the VMM sees them.
pub struct RemoteImsSlots {
    mailbox: Arc<dyn ImsMailbox>,
    function: FunctionId,
    router: Arc<MsiRouter>,
    quota: ImsQuota,
    /// Live groups: first slot → slots.
    groups: BTreeMap<u32, u32>,
    /// The eventfd of each slot composed so far.
    fds: BTreeMap<u32, Arc<EventFd>>,
}

impl std::fmt::Debug for RemoteImsSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteImsSlots").field("function", &self.function).field("groups", &self.groups).finish_non_exhaustive()
    }
}

impl RemoteImsSlots {
    /// Slots for the function at requester ID `rid` (its routes are that function's), counted
    /// against `quota`; asks the device what it offers.
    pub fn new(mailbox: Arc<dyn ImsMailbox>, rid: u16, router: Arc<MsiRouter>, quota: ImsQuota) -> Result<(Self, Offer), Status> {
        let offer = Offer::decode(mailbox.request(Request::Query)?);
        let slots = Self { mailbox, function: FunctionId::Vfio(rid), router, quota, groups: BTreeMap::new(), fds: BTreeMap::new() };
        Ok((slots, offer))
    }

    /// Slots held.
    pub fn held(&self) -> u32 {
        self.groups.values().sum()
    }

    /// Whether `slot` lies in a live group.
    fn live(&self, slot: u32) -> bool {
        self.groups.range(..=slot).next_back().is_some_and(|(&first, &count)| slot - first < count)
    }

    /// Whether a group of `count` slots from `first` ends within u32 and overlaps no live group
    /// (groups never overlap, so the last one starting before its end is the only candidate).
    fn fits(&self, first: u32, count: u32) -> bool {
        first.checked_add(count).is_some_and(|end| {
            self.groups.range(..end).next_back().is_none_or(|(&start, &held)| u64::from(start) + u64::from(held) <= u64::from(first))
        })
    }

    fn unbind(&mut self, slots: std::ops::Range<u32>) {
        let function = self.function;
        let bound: Vec<u32> = self.fds.range(slots).map(|(&s, _)| s).collect();
        if let Err(e) = self.router.unbind_all(bound.iter().map(|&s| VectorKey::ims(function, s))) {
            log::warn!("unbinding IMS slots of {function:?}: {e}");
        }
        for s in bound {
            self.fds.remove(&s);
        }
    }
}

impl PvIms for RemoteImsSlots {
    fn pv_alloc(&mut self, count: u32) -> Result<u32, Status> {
        if !self.quota.take(self.held(), count) {
            return Err(Status::Exhausted);
        }
        let answer = self.mailbox.request(Request::Alloc { count }).inspect_err(|_| self.quota.give(count))?;
        // The daemon is another process: its answer is checked like any message from outside.
        // A group that would end past u32 or overlap one this function holds is out of the
        // protocol. It is not recorded (the books stay one group per slot, so the quota and
        // FREE stay right) and not freed either: FREE names a group by its first slot, which
        // may be a live group's. The device frees it when the client resets or leaves the ADI.
        let Some(first) = u32::try_from(answer).ok().filter(|&first| self.fits(first, count)) else {
            log::warn!("{:?}: the device answered IMS_ALLOC of {count} with slot {answer:#x}, which this function cannot hold; refused", self.function);
            self.quota.give(count);
            return Err(Status::Exhausted);
        };
        self.groups.insert(first, count);
        Ok(first)
    }

    fn pv_free(&mut self, first: u32) -> Result<(), Status> {
        let count = self.groups.remove(&first).ok_or(Status::NoSuchSlot)?;
        self.quota.give(count);
        // Routes first, so nothing the device still raises reaches the guest.
        self.unbind(first..first.saturating_add(count));
        self.mailbox.request(Request::Free { first }).map(drop)
    }

    fn pv_compose(&mut self, slot: u32, message: MsiMessage) -> Result<u64, Status> {
        if !self.live(slot) {
            return Err(Status::NoSuchSlot);
        }
        let fd = match self.fds.get(&slot) {
            Some(fd) => fd.clone(),
            None => {
                let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|_| Status::Exhausted)?);
                self.mailbox.bind(slot, &fd).map_err(|_| Status::NoSuchAdi)?;
                self.fds.insert(slot, fd.clone());
                fd
            }
        };
        self.router.bind(VectorKey::ims(self.function, slot), fd, message).map_err(|_| Status::Exhausted)?;
        self.mailbox.request(Request::Message { slot })
    }

    fn pv_mask(&mut self, slot: u32, masked: bool) -> Result<(), Status> {
        if !self.live(slot) {
            return Err(Status::NoSuchSlot);
        }
        self.mailbox.request(Request::Mask { slot, masked }).map(drop)
    }
}

impl Drop for RemoteImsSlots {
    /// The function is leaving the VM: its routes go, and the VM's quota gets its slots back
    /// (the device frees their entries when the client resets or leaves the ADI).
    fn drop(&mut self) {
        self.unbind(0..u32::MAX);
        self.quota.give(self.held());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::fakes::FakeRoutes;

    /// A device's mailbox that hands out slot numbers from 0 upwards and records what it was
    /// asked; `full` makes allocations fail as an exhausted device's do.
    #[derive(Default)]
    struct FakeMailbox {
        requests: Mutex<Vec<Request>>,
        bound: Mutex<Vec<u32>>,
        next: Mutex<u32>,
        full: std::sync::atomic::AtomicBool,
        /// Slot numbers to answer the next allocations with (last first), as a faulty or hostile
        /// device would.
        answers: Mutex<Vec<u64>>,
    }

    impl ImsMailbox for FakeMailbox {
        fn request(&self, request: Request) -> Result<u64, Status> {
            self.requests.lock().unwrap().push(request);
            match request {
                Request::Query => Ok(Offer { slots_per_adi: 64, in_queue: true }.encode()),
                Request::Alloc { .. } if self.full.load(std::sync::atomic::Ordering::Relaxed) => Err(Status::Exhausted),
                Request::Alloc { count } => {
                    if let Some(answer) = self.answers.lock().unwrap().pop() {
                        return Ok(answer);
                    }
                    let mut next = self.next.lock().unwrap();
                    *next += count;
                    Ok(u64::from(*next - count))
                }
                Request::Message { slot } => Ok(u64::from(0x4000 + slot) << 32 | 0xfee0_0000),
                Request::Free { .. } | Request::Mask { .. } => Ok(0),
            }
        }
        fn bind(&self, slot: u32, _: &EventFd) -> std::io::Result<()> {
            self.bound.lock().unwrap().push(slot);
            Ok(())
        }
    }

    fn setup(quota: ImsQuota) -> (RemoteImsSlots, Arc<FakeMailbox>, Arc<FakeRoutes>) {
        let mailbox = Arc::new(FakeMailbox::default());
        let routes = Arc::new(FakeRoutes::default());
        let router = Arc::new(MsiRouter::new(routes.clone(), 64).unwrap());
        let (slots, offer) = RemoteImsSlots::new(mailbox.clone(), 0x0108, router, quota).unwrap();
        assert_eq!(offer, Offer { slots_per_adi: 64, in_queue: true });
        (slots, mailbox, routes)
    }

    /// What KVM holds once the router committed: the routed messages and bound irqfds.
    fn committed(slots: &RemoteImsSlots, routes: &FakeRoutes) -> (Vec<MsiMessage>, usize) {
        slots.router.settle().unwrap();
        (routes.messages(), routes.irqfds.lock().unwrap().len())
    }

    #[test]
    fn composed_slots_are_routed_in_this_vm_and_freed_ones_unrouted() {
        let quota = ImsQuota::new(8, 10);
        let (mut slots, mailbox, routes) = setup(quota.clone());
        assert_eq!(slots.pv_alloc(4), Ok(0));
        assert_eq!(quota.held(), 4);
        let guest = MsiMessage { address: 0xfee0_1000, data: 0x41 };
        assert_eq!(slots.pv_compose(2, guest), Ok(0x4002_u64 << 32 | 0xfee0_0000), "the device's host message");
        let again = MsiMessage { data: 0x42, ..guest };
        assert_eq!(slots.pv_compose(2, again), Ok(0x4002_u64 << 32 | 0xfee0_0000), "retargeted");
        assert_eq!(*mailbox.bound.lock().unwrap(), [2], "the eventfd is handed over once");
        assert_eq!(committed(&slots, &routes), (vec![again], 1), "one route, carrying the guest's message");
        assert_eq!(slots.pv_compose(4, guest), Err(Status::NoSuchSlot), "past the group");
        assert_eq!(slots.pv_mask(4, false), Err(Status::NoSuchSlot));
        assert_eq!(slots.pv_mask(2, false), Ok(()));
        assert_eq!(slots.pv_free(1), Err(Status::NoSuchSlot), "not a group's first slot");
        assert_eq!(slots.pv_free(0), Ok(()));
        assert_eq!(committed(&slots, &routes), (vec![], 0), "unrouted");
        assert_eq!(quota.held(), 0);
        assert_eq!(slots.pv_compose(2, guest), Err(Status::NoSuchSlot), "freed");
        assert_eq!(mailbox.requests.lock().unwrap().last(), Some(&Request::Free { first: 0 }));
    }

    #[test]
    fn quotas_hold_and_nothing_is_kept_when_the_device_refuses() {
        let quota = ImsQuota::new(8, 10);
        let (mut slots, mailbox, _) = setup(quota.clone());
        assert_eq!(slots.pv_alloc(9), Err(Status::Exhausted), "past the per-ADI quota");
        assert_eq!(mailbox.requests.lock().unwrap().len(), 1, "the device is not asked: only QUERY went");
        mailbox.full.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(slots.pv_alloc(2), Err(Status::Exhausted));
        assert_eq!(quota.held(), 0, "given back");
        mailbox.full.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(slots.pv_alloc(8), Ok(0));
        let (mut other, _, _) = setup(quota.clone());
        assert_eq!(other.pv_alloc(3), Err(Status::Exhausted), "past the VM's quota, shared with other functions");
        assert_eq!(other.pv_alloc(2), Ok(0));
        drop(slots);
        assert_eq!(quota.held(), 2, "a function that leaves gives its slots back");
    }

    #[test]
    fn slot_numbers_a_device_should_not_answer_are_refused_and_leave_the_books_as_they_were() {
        let quota = ImsQuota::new(16, 16);
        let (mut slots, mailbox, _) = setup(quota.clone());
        assert_eq!(slots.pv_alloc(4), Ok(0));
        for (answer, why) in [
            (0, "the same group again"),
            (2, "inside a live group"),
            (u64::from(u32::MAX) - 1, "ends past u32"),
            (1 << 32, "not a u32"),
        ] {
            mailbox.answers.lock().unwrap().push(answer);
            assert_eq!(slots.pv_alloc(4), Err(Status::Exhausted), "{why}");
            assert_eq!((slots.held(), quota.held()), (4, 4), "{why}: nothing recorded, the quota given back");
        }
        mailbox.answers.lock().unwrap().push(u64::from(u32::MAX) - 4);
        assert_eq!(slots.pv_alloc(4), Ok(u32::MAX - 4), "the last four slots a u32 numbers");
        mailbox.answers.lock().unwrap().push(4);
        assert_eq!(slots.pv_alloc(4), Ok(4), "right after the first group");
        assert_eq!(quota.held(), 12);
        assert_eq!(slots.pv_free(0), Ok(()));
        assert_eq!(quota.held(), 8, "the first group, and only it, freed");
        assert!(!mailbox.requests.lock().unwrap().iter().any(|r| matches!(r, Request::Free { first } if *first != 0)), "nothing refused was freed");
    }
}
