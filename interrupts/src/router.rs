//! Guest MSI delivery from eventfds: KVM MSI routes + irqfd, with an overflow path.
//!
//! Each guest vector backed by a device interrupt is an eventfd the device signals. The fast
//! path gives it a GSI with an MSI route (the guest's address/data) and binds the eventfd with
//! KVM_IRQFD: KVM injects on the signalling thread, no VMM thread involved.
//!
//! KVM allows 4096 routing entries per VM (KVM_MAX_IRQ_ROUTES, include/linux/kvm_host.h); the
//! irqchip routes take 40 of them (24 IOAPIC pins, 16 PIC pins), leaving 4056 for MSI routes.
//! A guest with more live vectors than that still gets every
//! interrupt: vectors beyond the route budget go to the **overflow injector**, a VMM thread that
//! waits on their eventfds and injects each interrupt with KVM_SIGNAL_MSI (no route needed,
//! one ioctl per interrupt). Routes are given first-come; the docs describe the trade-off.
//!
//! Ordering: a GSI's route is committed before its irqfd is registered, and the irqfd is
//! removed before the GSI is freed (an irqfd on a GSI without a route fires nothing).
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so each commit costs O(routes):
//! [`MsiRouter::bind_all`] binds many vectors with one commit. GSIs come from the rust-vmm
//! `vm-allocator` `IdAllocator`, which hands freed ones out again, lowest first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

use crate::{lock, EpollThread};
use crate::msi::MsiMessage;

/// KVM's per-VM limit on routing entries.
pub const KVM_MAX_IRQ_ROUTES: u32 = 4096;
/// GSIs 0..24 stay routed to the IOAPIC pins.
pub const IOAPIC_GSIS: u32 = 24;
/// Routing entries the irqchips take: 24 IOAPIC pins and 16 PIC pins (see `kvm_routes`).
pub const IRQCHIP_ENTRIES: u32 = 40;
/// Most MSI routes a VM can have.
pub const MAX_MSI_ROUTES: u32 = KVM_MAX_IRQ_ROUTES - IRQCHIP_ENTRIES;

/// Which of a function's vector spaces a vector is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VectorSource {
    /// An MSI-X table entry, by index.
    MsiX,
    /// A vector of the MSI capability, by index (multiple-message MSI).
    Msi,
    /// A guest-programmed IMS slot (through the hypercall or the trapped window), by slot.
    Ims,
    /// The legacy INTx line (index 0): a level-triggered IOAPIC input, not a message.
    Intx,
}

/// The function a vector belongs to. ADIs and passed-through devices are numbered apart, so
/// an ADI's ID can never name a VFIO device's vectors or the reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FunctionId {
    /// An ADI, by its ID on the host device.
    Adi(u32),
    /// A VFIO device (kernel VFIO or vfio-user), by its requester ID in the guest
    /// (bus << 8 | devfn).
    Vfio(u16),
}

/// Identifies one guest vector of one function, unique per router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VectorKey {
    /// The function.
    pub function: FunctionId,
    /// The vector space.
    pub source: VectorSource,
    /// The vector's index in it.
    pub index: u32,
}

impl VectorKey {
    /// MSI-X vector `index` of `function`.
    pub fn msix(function: FunctionId, index: u32) -> Self {
        Self { function, source: VectorSource::MsiX, index }
    }

    /// MSI vector `index` of `function`.
    pub fn msi(function: FunctionId, index: u32) -> Self {
        Self { function, source: VectorSource::Msi, index }
    }

    /// IMS slot `index` of `function`.
    pub fn ims(function: FunctionId, index: u32) -> Self {
        Self { function, source: VectorSource::Ims, index }
    }

    /// The INTx line of `function`.
    pub fn intx(function: FunctionId) -> Self {
        Self { function, source: VectorSource::Intx, index: 0 }
    }
}

/// What the router needs from KVM; a fake implements it in tests.
pub trait RouteBackend: Send + Sync {
    /// Replaces the routing table: IOAPIC pins plus these (gsi, message) MSI routes.
    fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()>;
    /// Binds (`true`) or unbinds an irqfd.
    fn irqfd(&self, fd: &EventFd, gsi: u32, assign: bool) -> std::io::Result<()>;
    /// Injects one MSI (KVM_SIGNAL_MSI).
    fn signal_msi(&self, msg: MsiMessage) -> std::io::Result<()>;
    /// Binds (`Some(resample)`) or unbinds (`None`) a level-triggered irqfd on IOAPIC input
    /// `gsi` (KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE): a signal of `fd` asserts the line, and
    /// when the guest's EOI lowers it again `resample` is signalled, so the device side can
    /// re-arm its interrupt (vfio-pci unmasks INTx on it).
    fn intx_irqfd(&self, fd: &EventFd, resample: Option<&EventFd>, gsi: u32) -> std::io::Result<()>;
}

enum Binding {
    Routed { gsi: u32, fd: Arc<EventFd> },
    Overflow,
    /// An INTx line: an IOAPIC input, outside the MSI GSIs this router hands out.
    Level { gsi: u32, fd: Arc<EventFd> },
}

struct State {
    routes: HashMap<u32, MsiMessage>,
    bindings: HashMap<VectorKey, Binding>,
    /// `None` when the route budget is 0.
    gsis: Option<IdAllocator>,
    /// Epoll tokens of overflow vectors (an epoll event carries one u64).
    tokens: HashMap<VectorKey, u64>,
    next_token: u64,
}

impl State {
    fn allocate_gsi(&mut self) -> Option<u32> {
        self.gsis.as_mut()?.allocate_id().ok()
    }

    fn free_gsi(&mut self, gsi: u32) {
        if let Some(a) = self.gsis.as_mut() {
            // Only GSIs this allocator handed out are ever freed here.
            let _ = a.free_id(gsi);
        }
    }
}

/// How many vectors take each path.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Interrupts injected by the overflow thread.
    pub overflow_injections: AtomicU64,
}

/// Routes guest vectors; see the module documentation.
pub struct MsiRouter {
    backend: Arc<dyn RouteBackend>,
    state: Mutex<State>,
    overflow: Arc<Overflow>,
    /// The overflow injector: waits on overflow vectors' eventfds (token = epoll token).
    injector: EpollThread,
}

impl std::fmt::Debug for MsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRouter").finish_non_exhaustive()
    }
}

struct Overflow {
    /// By epoll token.
    vectors: Mutex<HashMap<u64, (Arc<EventFd>, MsiMessage)>>,
    stats: RouteStats,
}

impl MsiRouter {
    /// A router using at most `msi_routes` MSI routes (clamped to [`MAX_MSI_ROUTES`]).
    pub fn new(backend: Arc<dyn RouteBackend>, msi_routes: u32) -> std::io::Result<Self> {
        let max = IOAPIC_GSIS + msi_routes.min(MAX_MSI_ROUTES);
        let overflow = Arc::new(Overflow { vectors: Mutex::new(HashMap::new()), stats: RouteStats::default() });
        let (o, b) = (overflow.clone(), backend.clone());
        let injector = EpollThread::spawn("msi-overflow".into(), siovmm_seccomp::ThreadKind::OverflowInjector, move |token| inject_overflow(&o, b.as_ref(), token))?;
        let gsis = (max > IOAPIC_GSIS).then(|| IdAllocator::new(IOAPIC_GSIS, max - 1)).transpose().map_err(std::io::Error::other)?;
        Ok(Self {
            backend,
            state: Mutex::new(State {
                routes: HashMap::new(),
                bindings: HashMap::new(),
                gsis,
                tokens: HashMap::new(),
                next_token: 0,
            }),
            overflow,
            injector,
        })
    }

    /// Counters.
    pub fn stats(&self) -> &RouteStats {
        &self.overflow.stats
    }

    /// (routed, overflow) message vectors; INTx lines are neither.
    pub fn counts(&self) -> (usize, usize) {
        let st = lock(&self.state);
        let routed = st.bindings.values().filter(|b| matches!(b, Binding::Routed { .. })).count();
        let overflow = st.bindings.values().filter(|b| matches!(b, Binding::Overflow)).count();
        (routed, overflow)
    }

    /// Raises IOAPIC input `gsi` (an INTx line, below [`IOAPIC_GSIS`]) while `fd` is
    /// signalled, until the guest's EOI, which signals `resample`: level-triggered delivery
    /// with no VMM thread on it. Several functions may share a line, each with its own fds.
    pub fn bind_intx(&self, key: VectorKey, gsi: u32, fd: Arc<EventFd>, resample: &EventFd) -> std::io::Result<()> {
        if gsi >= IOAPIC_GSIS {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("GSI {gsi} is not an IOAPIC input")));
        }
        let mut st = lock(&self.state);
        if st.bindings.contains_key(&key) {
            self.unbind_locked(&mut st, key)?;
        }
        self.backend.intx_irqfd(&fd, Some(resample), gsi)?;
        st.bindings.insert(key, Binding::Level { gsi, fd });
        Ok(())
    }

    fn commit(&self, st: &State) -> std::io::Result<()> {
        let mut routes: Vec<(u32, MsiMessage)> = st.routes.iter().map(|(g, m)| (*g, *m)).collect();
        routes.sort_by_key(|r| r.0);
        self.backend.set_msi_routes(&routes)
    }

    /// Delivers `fd`'s signals to the guest as `msg`; rebinding an existing key updates it.
    pub fn bind(&self, key: VectorKey, fd: Arc<EventFd>, msg: MsiMessage) -> std::io::Result<()> {
        self.bind_all([(key, fd, msg)])
    }

    /// [`MsiRouter::bind`] for many vectors, with one routing-table commit for them all.
    pub fn bind_all(&self, vectors: impl IntoIterator<Item = (VectorKey, Arc<EventFd>, MsiMessage)>) -> std::io::Result<()> {
        let mut st = lock(&self.state);
        let mut dirty = false;
        let mut new_routes: Vec<(VectorKey, u32, Arc<EventFd>)> = Vec::new();
        for (key, fd, msg) in vectors {
            match st.bindings.get(&key) {
                Some(Binding::Routed { gsi, fd: bound }) if Arc::ptr_eq(bound, &fd) => {
                    let gsi = *gsi;
                    st.routes.insert(gsi, msg);
                    dirty = true;
                    continue;
                }
                Some(Binding::Overflow) => {
                    let token = st.tokens.get(&key).copied();
                    let retargeted = token.is_some_and(|t| match lock(&self.overflow.vectors).get_mut(&t) {
                        Some(v) if Arc::ptr_eq(&v.0, &fd) => {
                            v.1 = msg;
                            true
                        }
                        _ => false,
                    });
                    if retargeted {
                        continue;
                    }
                    self.unbind_locked(&mut st, key)?;
                }
                Some(Binding::Routed { .. } | Binding::Level { .. }) => self.unbind_locked(&mut st, key)?,
                None => {}
            }
            if let Some(gsi) = st.allocate_gsi() {
                st.routes.insert(gsi, msg);
                dirty = true;
                new_routes.push((key, gsi, fd));
            } else {
                let token = st.next_token;
                st.next_token += 1;
                self.injector.watch(fd.as_ref(), token)?;
                lock(&self.overflow.vectors).insert(token, (fd, msg));
                st.tokens.insert(key, token);
                st.bindings.insert(key, Binding::Overflow);
            }
        }
        if dirty {
            if let Err(e) = self.commit(&st) {
                for (_, gsi, _) in &new_routes {
                    st.routes.remove(gsi);
                    st.free_gsi(*gsi);
                }
                return Err(e);
            }
        }
        let mut pending = new_routes.into_iter();
        while let Some((key, gsi, fd)) = pending.next() {
            if let Err(e) = self.backend.irqfd(&fd, gsi, true) {
                // This vector and the ones not yet bound lose their routes again.
                for (_, gsi, _) in std::iter::once((key, gsi, fd)).chain(pending) {
                    st.routes.remove(&gsi);
                    st.free_gsi(gsi);
                }
                let _ = self.commit(&st);
                return Err(e);
            }
            st.bindings.insert(key, Binding::Routed { gsi, fd });
        }
        Ok(())
    }

    /// Stops delivering `key`'s interrupts.
    pub fn unbind(&self, key: VectorKey) -> std::io::Result<()> {
        let mut st = lock(&self.state);
        self.unbind_locked(&mut st, key)
    }

    /// Stops delivering every vector of `function` (its device is going), with one
    /// routing-table commit; returns how many vectors were bound.
    pub fn unbind_function(&self, function: FunctionId) -> std::io::Result<usize> {
        let mut st = lock(&self.state);
        let keys: Vec<VectorKey> = st.bindings.keys().filter(|k| k.function == function).copied().collect();
        self.unbind_locked_all(&mut st, &keys)
    }

    /// [`MsiRouter::unbind`] for many vectors, with one routing-table commit for them all;
    /// returns how many were bound. Every vector is detached even if one irqfd refuses.
    pub fn unbind_all(&self, keys: impl IntoIterator<Item = VectorKey>) -> std::io::Result<usize> {
        let mut st = lock(&self.state);
        let keys: Vec<VectorKey> = keys.into_iter().filter(|k| st.bindings.contains_key(k)).collect();
        self.unbind_locked_all(&mut st, &keys)
    }

    fn unbind_locked_all(&self, st: &mut State, keys: &[VectorKey]) -> std::io::Result<usize> {
        let mut routed = false;
        let mut first_error = None;
        for key in keys {
            match self.detach_locked(st, *key) {
                Ok(r) => routed |= r,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if routed {
            self.commit(st)?;
        }
        first_error.map_or(Ok(keys.len()), Err)
    }

    fn unbind_locked(&self, st: &mut State, key: VectorKey) -> std::io::Result<()> {
        if self.detach_locked(st, key)? {
            self.commit(st)?;
        }
        Ok(())
    }

    /// Removes `key`'s binding without committing the routing table; true when it had a route
    /// (so the table needs a commit).
    fn detach_locked(&self, st: &mut State, key: VectorKey) -> std::io::Result<bool> {
        match st.bindings.remove(&key) {
            Some(Binding::Routed { gsi, fd }) => {
                // Detach first: if KVM refuses, the GSI stays taken (leaked, never reused with
                // a stale irqfd still on it).
                self.backend.irqfd(&fd, gsi, false)?;
                st.routes.remove(&gsi);
                st.free_gsi(gsi);
                Ok(true)
            }
            Some(Binding::Level { gsi, fd }) => {
                if let Err(e) = self.backend.intx_irqfd(&fd, None, gsi) {
                    st.bindings.insert(key, Binding::Level { gsi, fd });
                    return Err(e);
                }
                Ok(false)
            }
            Some(Binding::Overflow) => {
                let token = st.tokens.remove(&key);
                if let Some((fd, _)) = token.and_then(|t| lock(&self.overflow.vectors).remove(&t)) {
                    // The fd is being forgotten; failing to remove it from epoll changes nothing.
                    let _ = self.injector.unwatch(fd.as_ref());
                }
                Ok(false)
            }
            None => Ok(false),
        }
    }
}

/// Delivers overflow vector `token`'s signals: one KVM_SIGNAL_MSI per signal (the eventfd's
/// counter says how many arrived).
fn inject_overflow(o: &Overflow, backend: &dyn RouteBackend, token: u64) {
    let target = lock(&o.vectors).get(&token).map(|(fd, msg)| (fd.clone(), *msg));
    if let Some((fd, msg)) = target {
        let count = fd.read().unwrap_or(0);
        for _ in 0..count {
            if backend.signal_msi(msg).is_ok() {
                o.stats.overflow_injections.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeRoutes;
    use std::time::{Duration, Instant};
    use std::os::fd::AsRawFd;

    fn msg(v: u32) -> MsiMessage {
        MsiMessage { address: 0xfee0_0000, data: 0x4000 | v }
    }

    fn evt() -> Arc<EventFd> {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn intx_lines_are_level_irqfds_on_ioapic_inputs() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 4).unwrap();
        let (a, b) = (FunctionId::Vfio(0x08), FunctionId::Vfio(0x10));
        let (fa, fb, resample) = (evt(), evt(), evt());
        router.bind_intx(VectorKey::intx(a), 17, fa.clone(), &resample).unwrap();
        // Two functions share a line, each with its own irqfd.
        router.bind_intx(VectorKey::intx(b), 17, fb.clone(), &resample).unwrap();
        assert_eq!(fake.intx.lock().unwrap().len(), 2);
        assert!(fake.routes.lock().unwrap().is_empty() && fake.log.lock().unwrap().is_empty(), "no MSI route, no commit");
        assert_eq!(router.counts(), (0, 0), "not message vectors");
        assert!(router.bind_intx(VectorKey::intx(a), IOAPIC_GSIS, evt(), &resample).is_err(), "not an IOAPIC input");
        // Rebinding replaces; a function's removal takes its line with it.
        router.bind_intx(VectorKey::intx(a), 18, fa.clone(), &resample).unwrap();
        assert_eq!(fake.intx.lock().unwrap().iter().filter(|x| x.0 == 18).count(), 1);
        assert_eq!(router.unbind_function(a).unwrap(), 1);
        assert_eq!(*fake.intx.lock().unwrap(), vec![(17, fb.as_raw_fd(), resample.as_raw_fd())]);
        router.unbind(VectorKey::intx(b)).unwrap();
        assert!(fake.intx.lock().unwrap().is_empty());
    }

    #[test]
    fn a_functions_vectors_go_together_in_one_commit() {
        let fake = Arc::new(FakeRoutes::default());
        // 3 routes: function 1's three vectors take them, function 2's two overflow.
        let router = MsiRouter::new(fake.clone(), 3).unwrap();
        for (f, n) in [(1, 3), (2, 2)] {
            for i in 0..n {
                router.bind(VectorKey::msix(FunctionId::Adi(f), i), evt(), msg(i)).unwrap();
            }
        }
        router.bind(VectorKey::ims(FunctionId::Adi(2), 0), evt(), msg(9)).unwrap();
        assert_eq!(router.counts(), (3, 3));
        fake.log.lock().unwrap().clear();
        assert_eq!(router.unbind_function(FunctionId::Adi(1)).unwrap(), 3);
        assert_eq!(*fake.log.lock().unwrap(), vec!["routes 0".to_string()], "one commit");
        assert!(fake.irqfds.lock().unwrap().is_empty());
        assert_eq!(router.counts(), (0, 3));
        assert_eq!(router.unbind_function(FunctionId::Adi(2)).unwrap(), 3, "overflow and IMS vectors too");
        assert_eq!(router.counts(), (0, 0));
        assert_eq!(router.unbind_function(FunctionId::Adi(2)).unwrap(), 0);
        // The freed routes serve the next function.
        router.bind(VectorKey::msix(FunctionId::Adi(3), 0), evt(), msg(0)).unwrap();
        assert_eq!(router.counts(), (1, 0));
    }

    #[test]
    fn routes_first_then_overflow_and_every_interrupt_arrives() {
        let fake = Arc::new(FakeRoutes::default());
        // Room for 2 MSI routes only.
        let router = MsiRouter::new(fake.clone(), 2).unwrap();
        let fds: Vec<_> = (0..5).map(|_| evt()).collect();
        for (i, fd) in fds.iter().enumerate() {
            router.bind(VectorKey::msix(FunctionId::Adi(7), i as u32), fd.clone(), msg(i as u32)).unwrap();
        }
        assert_eq!(router.counts(), (2, 3));
        assert_eq!(fake.irqfds.lock().unwrap().len(), 2);
        assert_eq!(fake.routes.lock().unwrap()[0], (IOAPIC_GSIS, msg(0)));
        // Signal the overflow vectors: each arrives as one KVM_SIGNAL_MSI with its message.
        for fd in &fds[2..] {
            fd.write(1).unwrap();
        }
        fds[4].write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while router.stats().overflow_injections.load(Ordering::Relaxed) < 4 {
            assert!(Instant::now() < deadline, "overflow injections missing");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut got: Vec<u32> = fake.injected.lock().unwrap().iter().map(|m| m.data & 0xff).collect();
        got.sort();
        assert_eq!(got, vec![2, 3, 4, 4]);
    }

    #[test]
    fn rebinding_updates_and_unbinding_frees() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 1).unwrap();
        let (a, b) = (evt(), evt());
        let (k1, k2, k3) = (VectorKey::msix(FunctionId::Adi(1), 0), VectorKey::ims(FunctionId::Adi(1), 0), VectorKey::msix(FunctionId::Adi(2), 0));
        router.bind(k1, a.clone(), msg(1)).unwrap();
        router.bind(k2, b.clone(), msg(2)).unwrap();
        assert_eq!(router.counts(), (1, 1));
        // Retarget the routed vector: same GSI, new message.
        router.bind(k1, a.clone(), msg(9)).unwrap();
        assert_eq!(*fake.routes.lock().unwrap(), vec![(IOAPIC_GSIS, msg(9))]);
        // Retarget the overflow vector: it stays there, with the new message.
        router.bind(k2, b.clone(), msg(8)).unwrap();
        b.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.injected.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "overflow injection missing");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(*fake.injected.lock().unwrap(), vec![msg(8)]);
        // Free the route; the next vector bound gets it.
        router.unbind(k1).unwrap();
        assert!(fake.routes.lock().unwrap().is_empty());
        assert!(fake.irqfds.lock().unwrap().is_empty());
        let c = evt();
        router.bind(k3, c, msg(3)).unwrap();
        assert_eq!(router.counts(), (1, 1));
        router.unbind(k2).unwrap();
        router.unbind(k2).unwrap();
        assert_eq!(router.counts(), (1, 0));
    }

    #[test]
    fn limits_are_clamped_and_a_batch_commits_once() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 1_000_000).unwrap();
        let n = MAX_MSI_ROUTES + 2;
        let fds: Vec<_> = (0..n).map(|_| evt()).collect();
        router.bind_all((0..n).map(|i| (VectorKey::msix(FunctionId::Adi(i / 256), i % 256), fds[i as usize].clone(), msg(i)))).unwrap();
        assert_eq!(router.counts(), (MAX_MSI_ROUTES as usize, 2));
        assert_eq!(*fake.log.lock().unwrap(), vec![format!("routes {MAX_MSI_ROUTES}")]);
        let routes = fake.routes.lock().unwrap().clone();
        assert_eq!((routes[0].0, routes.last().unwrap().0), (IOAPIC_GSIS, IOAPIC_GSIS + MAX_MSI_ROUTES - 1));
    }

    #[test]
    fn a_refused_irqfd_gives_its_gsi_and_route_back() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 4).unwrap();
        fake.refuse_irqfd.store(true, std::sync::atomic::Ordering::Relaxed);
        let keys: Vec<_> = (0..3).map(|i| VectorKey::msix(FunctionId::Adi(0), i)).collect();
        assert!(router.bind_all(keys.iter().map(|&k| (k, evt(), msg(k.index)))).is_err());
        assert_eq!(router.counts(), (0, 0), "nothing bound");
        assert!(fake.routes.lock().unwrap().is_empty(), "no route left in the table");
        fake.refuse_irqfd.store(false, std::sync::atomic::Ordering::Relaxed);
        // All four GSIs are free again: four vectors get routes, none overflows.
        let fds: Vec<_> = (0..4).map(|_| evt()).collect();
        router.bind_all((0..4).map(|i| (VectorKey::msix(FunctionId::Adi(1), i), fds[i as usize].clone(), msg(i)))).unwrap();
        assert_eq!(router.counts(), (4, 0));
    }

    #[test]
    fn freed_gsis_are_reused_lowest_first_and_no_budget_means_overflow() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 4).unwrap();
        let fds: Vec<_> = (0..4).map(|_| evt()).collect();
        for (i, fd) in fds.iter().enumerate() {
            router.bind(VectorKey::msix(FunctionId::Adi(0), i as u32), fd.clone(), msg(i as u32)).unwrap();
        }
        router.unbind(VectorKey::msix(FunctionId::Adi(0), 2)).unwrap();
        router.unbind(VectorKey::msix(FunctionId::Adi(0), 1)).unwrap();
        router.bind(VectorKey::msix(FunctionId::Adi(1), 0), evt(), msg(10)).unwrap();
        assert!(fake.routes.lock().unwrap().contains(&(IOAPIC_GSIS + 1, msg(10))));

        let none = MsiRouter::new(Arc::new(FakeRoutes::default()), 0).unwrap();
        none.bind(VectorKey::msix(FunctionId::Adi(0), 0), evt(), msg(1)).unwrap();
        assert_eq!(none.counts(), (0, 1));
    }
}
