//! Hypercall IMS slots of a function whose device owns them: a vfio-user ADI of the device
//! daemon (docs/devd.md, "IMS for enlightened guests"), taken by the guest's hypercalls
//! (`--ims pv`) or by siovmm's trapped window in front of the ADI's BAR0 (`--ims trap`,
//! [`RemoteImsWindow`]). The device keeps the books and the
//! host IMS entries and answers through its IMS mailbox (`siovmm_vfio::user::ims_mailbox`);
//! what stays here is what only the VMM can do: the VM's quota (shared with its other ADIs),
//! and delivery into this VM — each composed slot's eventfd, handed to the device with
//! `SET_IRQS`, is bound to a KVM route carrying the guest's message, so the device's
//! interrupt reaches the guest without passing through siovmm, as with in-process ADIs.

use std::collections::BTreeMap;
use std::sync::Arc;

use siovmm_hypercall::Status;
use siovmm_interrupts::{FunctionId, MsiMessage, MsiRouter, VectorKey};
use siovmm_vfio::pci::BarOverlay;
use siovmm_vfio::user::ims_mailbox::{ImsMailbox, Offer, Request, SlotState};
use vmm_sys_util::eventfd::EventFd;

use crate::ims_window::{ImsWindow, WindowBacking};
use crate::{ImsOptIn, ImsQuota, PvIms};

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
        // The hypercall endpoint refuses an empty group first; an empty group kept here could
        // shadow a live one starting at the same slot.
        if count == 0 {
            return Err(Status::InvalidArgument);
        }
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

impl WindowBacking for RemoteImsSlots {
    fn slot_state(&self, slot: u32) -> Option<SlotState> {
        if !self.live(slot) {
            return None;
        }
        self.mailbox.request(Request::State { slot }).ok().map(SlotState::decode)
    }
}

/// The trapped IMS window of a daemon ADI (`--ims trap`): siovmm serves BAR0's window itself
/// (a `siovmm_vfio::pci::BarOverlay` on the vfio-user function, so the daemon never sees the
/// guest's messages), each backed slot one of the daemon's mailbox slots routed into this VM.
#[derive(Debug)]
pub struct RemoteImsWindow {
    window: ImsWindow,
    slots: RemoteImsSlots,
}

impl RemoteImsWindow {
    /// The window of the function `slots` serves, live once the guest opted in (`opt_in`), in
    /// a VM of `vcpus` vCPUs.
    pub fn new(name: String, slots: RemoteImsSlots, opt_in: ImsOptIn, vcpus: u32) -> Self {
        Self { window: ImsWindow::new(name, opt_in, vcpus), slots }
    }

    /// Slots backing the window's entries.
    pub fn held(&self) -> u32 {
        self.slots.held()
    }

    /// Backing operations that failed so far.
    pub fn failures(&self) -> u64 {
        self.window.failures()
    }
}

impl BarOverlay for RemoteImsWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if ImsWindow::is_dword(offset, data.len()) {
            data.copy_from_slice(&self.window.read(offset, &self.slots).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (true, Ok(dword)) = (ImsWindow::is_dword(offset, data.len()), <[u8; 4]>::try_from(data)) {
            self.window.write(offset, u32::from_le_bytes(dword), &mut self.slots);
        }
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
        /// What STATE says of every slot.
        pending: std::sync::atomic::AtomicBool,
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
                Request::State { slot } => Ok(SlotState { pending: self.pending.load(std::sync::atomic::Ordering::Relaxed), handle: 2 + slot }.encode()),
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
        assert_eq!(slots.pv_alloc(0), Err(Status::InvalidArgument), "an empty group");
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

    #[test]
    fn a_trapped_window_in_front_of_a_daemon_adi_backs_its_slots_with_mailbox_slots() {
        use crate::ims_window::ims_ctrl;
        let quota = ImsQuota::new(2, 16);
        let (slots, mailbox, routes) = setup(quota.clone());
        let opt_in = ImsOptIn::default();
        let mut w = RemoteImsWindow::new("adi-0.sock".into(), slots, opt_in.clone(), 1);
        let program = |w: &mut RemoteImsWindow, slot: u64, data: u32, ctrl: u32| {
            for (i, v) in [0xfee0_0000u32, 0, data, ctrl].into_iter().enumerate() {
                w.write(slot * 16 + i as u64 * 4, &v.to_le_bytes());
            }
        };
        let ctrl = |w: &mut RemoteImsWindow, slot: u64| {
            let mut b = [0u8; 4];
            w.read(slot * 16 + 12, &mut b);
            u32::from_le_bytes(b)
        };
        program(&mut w, 0, 0x41, 0);
        assert_eq!((w.held(), ctrl(&mut w, 0)), (0, 0), "inert until the guest opts in");
        opt_in.set();
        program(&mut w, 0, 0x41, 0);
        assert_eq!(ctrl(&mut w, 0), ims_ctrl::BACKED | 2 << 16, "backed by mailbox slot 0, the daemon's handle 2 + 0");
        program(&mut w, 1, 0x42, ims_ctrl::MASK);
        assert_eq!(w.held(), 1, "a masked slot takes nothing");
        program(&mut w, 1, 0x42, 0);
        program(&mut w, 2, 0x43, 0);
        assert_eq!((w.held(), quota.held()), (2, 2), "the third is past the per-ADI quota");
        assert_eq!(ctrl(&mut w, 2) & ims_ctrl::BACKED, 0);
        w.slots.router.settle().unwrap();
        let messages = routes.messages();
        assert!([0x41, 0x42].iter().all(|&d| messages.contains(&MsiMessage { address: 0xfee0_0000, data: d })), "{messages:x?}");
        assert_eq!(*mailbox.bound.lock().unwrap(), [0, 1]);
        mailbox.pending.store(true, std::sync::atomic::Ordering::Relaxed);
        program(&mut w, 0, 0x41, ims_ctrl::MASK);
        assert_eq!(ctrl(&mut w, 0), ims_ctrl::MASK | ims_ctrl::PENDING | ims_ctrl::BACKED | 2 << 16);
        let asked = mailbox.requests.lock().unwrap().clone();
        assert!(asked.contains(&Request::Mask { slot: 0, masked: true }) && asked.contains(&Request::State { slot: 0 }));
        let mut wide = [0u8; 8];
        w.read(0, &mut wide);
        assert_eq!(wide, [0; 8], "only dword accesses are served");
        w.write(16 * 1024, &1u32.to_le_bytes());
        assert_eq!(w.failures(), 0);
        drop(w);
        assert_eq!((quota.held(), committed_routes(&routes)), (0, 0), "the window's slots go with it");
    }

    fn committed_routes(routes: &FakeRoutes) -> usize {
        routes.irqfds.lock().unwrap().len()
    }
}
