//! An ADI's MSI-X vectors and the host IMS entries behind them.
//!
//! Vector v is backed by IMS entry `ims.first + v`, and interrupt handle v names it. The
//! guest's message for v becomes a KVM MSI route fed by an eventfd that the IMS entry signals
//! (made when the guest first programs the vector, so idle ADIs hold no file descriptors for
//! interrupts); the guest's masks (vector, function, enable) become the IMS entry's mask, so
//! the device keeps the pending bit, and the PBA reads it back from the device.
//!
//! The table's layout and mask semantics are `devices::pci::msix`'s; this module only turns
//! its changes into device and route operations.

use std::sync::Arc;

use devices::pci::msix::{Msix, VectorChange};
use siovmm_hypercall::Status;
use siovmm_interrupts::{FunctionId, MsiRouter, VectorKey};
use siovmm_vfio::siov::{self, AdiId, HandleTarget, ImsGroup, ImsIndex, SiovDevice};
use vmm_sys_util::eventfd::EventFd;

use devices::GuestFaults;

use super::MAX_MSIX_VECTORS;

/// The vectors of one ADI.
pub(crate) struct MsixVectors {
    adi: AdiId,
    msix: Msix,
    /// One entry per vector (the group may hold more than [`MAX_MSIX_VECTORS`]: the rest
    /// are unused).
    ims: ImsGroup,
    /// Per vector, the eventfd its IMS entry signals, once programmed.
    fds: Vec<Option<Arc<EventFd>>>,
    device: Arc<dyn SiovDevice>,
    router: Arc<MsiRouter>,
}

impl MsixVectors {
    /// One vector per entry of `ims` (at most [`MAX_MSIX_VECTORS`]), all masked and unbound.
    pub(crate) fn new(adi: AdiId, ims: ImsGroup, device: Arc<dyn SiovDevice>, router: Arc<MsiRouter>) -> Self {
        let vectors = ims.count.min(u32::from(MAX_MSIX_VECTORS)) as u16;
        Self { adi, msix: Msix::new(vectors), ims, fds: vec![None; usize::from(vectors)], device, router }
    }

    /// Number of vectors.
    pub(crate) fn count(&self) -> u16 {
        self.msix.vectors()
    }

    /// The interrupt handles the vectors take (handle v = vector v).
    pub(crate) fn handles(&self) -> impl Iterator<Item = Option<HandleTarget>> {
        self.ims.indexes().take(self.fds.len()).map(|i| Some(HandleTarget::Entry(i)))
    }

    /// Whether the guest enabled MSI-X.
    pub(crate) fn enabled(&self) -> bool {
        self.msix.enabled()
    }

    /// MSI-X message control as the guest reads it.
    pub(crate) fn message_control(&self) -> u16 {
        self.msix.message_control()
    }

    /// Bytes of the MSI-X table and of the PBA.
    pub(crate) fn table_size(&self) -> u64 {
        self.msix.table_size()
    }

    /// See [`MsixVectors::table_size`].
    pub(crate) fn pba_size(&self) -> u64 {
        self.msix.pba_size()
    }

    /// The guest wrote message control (enable, function mask): every vector it changes is
    /// routed or unrouted in one routing-table commit (one guest action, one KVM call).
    pub(crate) fn write_control(&mut self, control: u16, faults: &mut GuestFaults) {
        let changes = self.msix.write_message_control(control);
        self.apply_all(&changes, faults);
    }

    /// A guest read at `offset` in the table.
    pub(crate) fn read_table(&self, offset: u64, data: &mut [u8]) {
        self.msix.read_table(offset, data);
    }

    /// A guest write at `offset` in the table.
    pub(crate) fn write_table(&mut self, offset: u64, data: &[u8], faults: &mut GuestFaults) {
        if let Some(change) = self.msix.write_table(offset, data) {
            self.apply_all(&[change], faults);
        }
    }

    /// A guest read at `offset` in the PBA: the device's pending bits.
    pub(crate) fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let (device, adi, first) = (&self.device, self.adi, self.ims.first);
        self.msix.read_pba(offset, data, |v| device.ims_pending(adi, first + u32::from(v)).unwrap_or(false));
    }

    /// The eventfd behind `vector`, once the guest has programmed it.
    pub(crate) fn eventfd(&self, vector: u16) -> Option<Arc<EventFd>> {
        self.fds.get(usize::from(vector)).cloned().flatten()
    }

    /// Routes (or unroutes, MSI-X being off) the changed vectors with one commit, then sets
    /// each one's mask on its IMS entry (unmasking delivers a pending interrupt, once).
    fn apply_all(&mut self, changes: &[VectorChange], faults: &mut GuestFaults) {
        let function = FunctionId::Adi(self.adi.0);
        let key = |c: &VectorChange| VectorKey::msix(function, u32::from(c.vector));
        // Each change with the IMS entry behind its vector (a vector the group lacks changes nothing).
        let changes: Vec<(&VectorChange, ImsIndex)> =
            changes.iter().filter_map(|c| Some((c, self.ims.indexes().nth(usize::from(c.vector))?))).collect();
        if !self.msix.enabled() {
            faults.record("unbinding MSI-X vectors", self.router.unbind_all(changes.iter().map(|(c, _)| key(c))));
        } else {
            let mut binds = Vec::new();
            for &(c, ims_index) in changes.iter().filter(|(c, _)| !c.masked || c.message.address != 0) {
                let Some(slot) = self.fds.get_mut(usize::from(c.vector)) else { continue };
                let fd = bound_eventfd(self.device.as_ref(), self.adi, slot, ims_index);
                if let Some(fd) = faults.record("binding an eventfd to an IMS entry", fd) {
                    // A route for the guest's message: the guest can only name its own APICs,
                    // since the route lives in its own VM.
                    binds.push((key(c), fd, c.message));
                }
            }
            faults.record("binding MSI-X vectors", self.router.bind_all(binds));
        }
        for (c, ims_index) in changes {
            faults.record("masking an IMS entry", self.device.ims_set_mask(self.adi, ims_index, c.masked));
        }
    }
}

/// The eventfd in `slot`, or a new one bound to IMS entry `index` (kept in `slot`) on first use.
/// Fails with EXHAUSTED when no eventfd can be made, NO_SUCH_SLOT when the entry refuses it.
pub(crate) fn bound_eventfd(
    device: &dyn SiovDevice,
    adi: AdiId,
    slot: &mut Option<Arc<EventFd>>,
    index: siov::ImsIndex,
) -> Result<Arc<EventFd>, Status> {
    if let Some(fd) = slot {
        return Ok(fd.clone());
    }
    let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|_| Status::Exhausted)?);
    device.ims_bind(adi, index, Some(fd.clone())).map_err(|_| Status::NoSuchSlot)?;
    *slot = Some(fd.clone());
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{FakeIms, FakeRoutes};
    use devices::pci::msix::{CTRL_ENABLE, CTRL_FUNCTION_MASK};
    use siovmm_interrupts::MsiMessage;

    const FIRST: siov::ImsIndex = 100;

    fn vectors(count: u32) -> (MsixVectors, Arc<FakeIms>, Arc<FakeRoutes>, GuestFaults) {
        let device = Arc::new(FakeIms::default());
        let routes = Arc::new(FakeRoutes::default());
        let router = Arc::new(MsiRouter::new(routes.clone(), 64).unwrap());
        let v = MsixVectors::new(AdiId(0), ImsGroup { first: FIRST, count }, device.clone(), router);
        let faults = GuestFaults::new("ADI 0");
        (v, device, routes, faults)
    }

    /// The routes KVM holds once the router committed what it was given.
    fn committed(v: &MsixVectors, routes: &FakeRoutes) -> Vec<MsiMessage> {
        v.router.settle().unwrap();
        routes.messages()
    }

    fn program(v: &mut MsixVectors, vector: u64, data: u32, masked: bool, faults: &mut GuestFaults) {
        let base = vector * 16;
        v.write_table(base, &0xfee0_0000u32.to_le_bytes(), faults);
        v.write_table(base + 8, &data.to_le_bytes(), faults);
        v.write_table(base + 12, &u32::from(masked).to_le_bytes(), faults);
    }

    #[test]
    fn vector_v_is_ims_entry_first_plus_v() {
        let (v, ..) = vectors(4);
        assert_eq!(v.count(), 4);
        assert_eq!(v.handles().collect::<Vec<_>>(), [100, 101, 102, 103].map(|i| Some(HandleTarget::Entry(i))));
        // A group larger than the table backs only as many vectors as the table holds.
        let (v, ..) = vectors(u32::from(MAX_MSIX_VECTORS) + 10);
        assert_eq!(v.count(), MAX_MSIX_VECTORS);
        assert_eq!(v.handles().count(), usize::from(MAX_MSIX_VECTORS));
    }

    #[test]
    fn the_guests_masks_become_the_ims_entrys_mask_and_routes_follow_enable() {
        let (mut v, device, routes, mut faults) = vectors(4);
        // Programmed while MSI-X is off: no route, entry masked, no eventfd yet.
        program(&mut v, 1, 0x41, false, &mut faults);
        assert!(committed(&v, &routes).is_empty());
        assert_eq!(device.masked.lock().unwrap().get(&101), Some(&true));
        assert!(v.eventfd(1).is_none());
        // Enabled: vector 1 is routed to the guest's message and its entry unmasked, bound to
        // the vector's eventfd; vector 0 (never programmed, masked as at reset) is not touched:
        // its entry stays as the device allocated it, masked and unbound.
        v.write_control(CTRL_ENABLE, &mut faults);
        assert_eq!(committed(&v, &routes), vec![MsiMessage { address: 0xfee0_0000, data: 0x41 }]);
        assert_eq!(device.masked.lock().unwrap().get(&101), Some(&false));
        assert_eq!(device.masked.lock().unwrap().get(&100), None);
        let fd = v.eventfd(1).expect("vector 1's eventfd");
        assert!(Arc::ptr_eq(&fd, &device.bound.lock().unwrap()[&101]));
        assert!(!device.bound.lock().unwrap().contains_key(&100));
        // Function mask: every entry masked, the route kept (the device holds pending bits).
        v.write_control(CTRL_ENABLE | CTRL_FUNCTION_MASK, &mut faults);
        assert!(device.masked.lock().unwrap().values().all(|m| *m));
        assert_eq!(committed(&v, &routes).len(), 1);
        // Reprogrammed masked, then unmasked with a new message: one route, the new message.
        v.write_control(CTRL_ENABLE, &mut faults);
        program(&mut v, 1, 0x42, false, &mut faults);
        assert_eq!(committed(&v, &routes), vec![MsiMessage { address: 0xfee0_0000, data: 0x42 }]);
        assert!(Arc::ptr_eq(&fd, &v.eventfd(1).unwrap()), "the eventfd is made once");
        // Disabled: the route goes.
        v.write_control(0, &mut faults);
        assert!(committed(&v, &routes).is_empty());
        assert_eq!(faults.count(), 0);
    }

    #[test]
    fn the_pba_reads_the_devices_pending_bits() {
        let (mut v, device, _, mut faults) = vectors(4);
        v.write_control(CTRL_ENABLE, &mut faults);
        device.pending.lock().unwrap().extend([100, 102]);
        let mut pba = [0u8; 8];
        v.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b101);
        assert_eq!(v.pba_size(), 8);
        assert_eq!(v.table_size(), 64);
    }

    #[test]
    fn a_refused_table_leaves_the_vector_delivered_by_the_injector() {
        let (mut v, _, routes, mut faults) = vectors(2);
        routes.refuse.store(true, std::sync::atomic::Ordering::Relaxed);
        v.write_control(CTRL_ENABLE, &mut faults);
        program(&mut v, 0, 0x41, false, &mut faults);
        assert!(v.router.settle().is_err(), "KVM refused the table");
        // Not the guest's doing, and its interrupts still arrive, with its message.
        assert_eq!(faults.count(), 0);
        v.eventfd(0).unwrap().write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while routes.injected.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the interrupt never arrived");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(*routes.injected.lock().unwrap(), vec![MsiMessage { address: 0xfee0_0000, data: 0x41 }]);
    }
}
