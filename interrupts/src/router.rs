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
//! **Commits are deferred and batched.** KVM_SET_GSI_ROUTING replaces the whole table, so a
//! commit per change would make a guest that programs n vectors one at a time (as Linux does,
//! one MSI-X entry or IMS slot after another) cost O(n^2) entries copied. Instead a vector
//! whose route is new or changed is *pending*: it holds its GSI, the overflow injector
//! delivers its interrupts with the new message from the moment `bind` returns, and the
//! injector thread commits all pending routes in one KVM_SET_GSI_ROUTING, then moves each
//! pending vector to its irqfd (off the overflow set first: the injector is the only reader
//! of an overflow eventfd, and KVM_IRQFD delivers what arrived meanwhile, see
//! `irqfd_assign` in virt/kvm/eventfd.c). A commit happens once changes pause for
//! [`DEBOUNCE`], or at once when the pending changes are at least [`BATCH_MIN`] and at least
//! as many as the table holds, so that such a commit copies at most twice the changes it
//! commits: O(n) entries for n changes in a burst, however long. A guest that never pauses
//! keeps only its own changed vectors on the slower overflow path until it does. Unbinding
//! never commits: the irqfd goes at once and a stale route without an irqfd fires nothing;
//! the next commit drops it. GSIs come from the rust-vmm
//! `vm-allocator` `IdAllocator`, which hands freed ones out again, lowest first.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::msi::MsiMessage;
use crate::{lock, EpollThread, Watcher};

/// KVM's per-VM limit on routing entries.
pub const KVM_MAX_IRQ_ROUTES: u32 = 4096;
/// GSIs 0..24 stay routed to the IOAPIC pins.
pub const IOAPIC_GSIS: u32 = 24;
/// Routing entries the irqchips take: 24 IOAPIC pins and 16 PIC pins (see `kvm_routes`).
pub const IRQCHIP_ENTRIES: u32 = 40;
/// Most MSI routes a VM can have.
pub const MAX_MSI_ROUTES: u32 = KVM_MAX_IRQ_ROUTES - IRQCHIP_ENTRIES;

/// A commit waits this long after the last route change, so a burst of changes shares one.
pub const DEBOUNCE: Duration = Duration::from_millis(1);
/// Pending changes that commit without waiting, once they are also at least as many as the
/// table holds.
pub const BATCH_MIN: usize = 64;

/// The injector's own epoll tokens; overflow tokens count up from 0 and never reach them.
const CHANGED: u64 = u64::MAX - 1;
const COMMIT_DUE: u64 = u64::MAX - 2;
/// How long [`MsiRouter::settle`] waits for the injector.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The route is in KVM's table and the eventfd is an irqfd on it.
    Routed { gsi: u32, fd: Arc<EventFd> },
    /// The vector holds `gsi`, whose route (new or changed) is not committed yet; until the
    /// commit the overflow injector delivers it (`token`).
    Pending { gsi: u32, fd: Arc<EventFd>, token: u64 },
    /// No route for it: the overflow injector delivers it for good (`token`).
    Overflow { token: u64 },
    /// An INTx line: an IOAPIC input, outside the MSI GSIs this router hands out.
    Level { gsi: u32, fd: Arc<EventFd> },
}

struct State {
    /// The MSI routes as they should be (KVM has them once committed).
    routes: HashMap<u32, MsiMessage>,
    bindings: HashMap<VectorKey, Binding>,
    /// `None` when the route budget is 0.
    gsis: Option<IdAllocator>,
    next_token: u64,
    /// Vectors in [`Binding::Pending`].
    pending: HashSet<VectorKey>,
    /// `routes` differs from the table KVM holds.
    dirty: bool,
    /// Entries of the table KVM holds.
    committed: usize,
    /// Commits tried (for [`MsiRouter::settle`]).
    attempts: u64,
    /// Why the last commit failed, if it did.
    last_error: Option<std::io::ErrorKind>,
}

impl State {
    /// `key` routed as `gsi` with `msg` once the next commit lands; until then the injector
    /// delivers it as `token`.
    fn make_pending(&mut self, key: VectorKey, gsi: u32, fd: Arc<EventFd>, token: u64, msg: MsiMessage) {
        self.routes.insert(gsi, msg);
        self.bindings.insert(key, Binding::Pending { gsi, fd, token });
        self.pending.insert(key);
        self.dirty = true;
    }

    fn allocate_gsi(&mut self) -> Option<u32> {
        self.gsis.as_mut()?.allocate_id().ok()
    }

    fn free_gsi(&mut self, gsi: u32) {
        if let Some(a) = self.gsis.as_mut() {
            // Only GSIs this allocator handed out are ever freed here.
            let _ = a.free_id(gsi);
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token - 1
    }
}

/// What the router did, for reports and benchmarks.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Interrupts injected by the overflow thread (overflow vectors, and pending ones until
    /// their commit).
    pub overflow_injections: AtomicU64,
    /// KVM_SET_GSI_ROUTING calls that succeeded.
    pub commits: AtomicU64,
    /// MSI routes those calls carried, summed: the copying work the batching bounds.
    pub entries_committed: AtomicU64,
    /// KVM_SET_GSI_ROUTING calls KVM refused (their vectors stayed on the overflow path).
    pub commit_failures: AtomicU64,
    /// Pending vectors KVM refused an irqfd for at their commit (they stay on the overflow
    /// path, without a route).
    pub irqfd_refusals: AtomicU64,
}

/// Routes guest vectors; see the module documentation.
pub struct MsiRouter {
    shared: Arc<Shared>,
    /// The overflow injector, which also commits: waits on overflow and pending vectors'
    /// eventfds (token = epoll token), the change signal and the commit timer.
    injector: EpollThread,
}

impl std::fmt::Debug for MsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRouter").finish_non_exhaustive()
    }
}

struct Shared {
    backend: Arc<dyn RouteBackend>,
    state: Mutex<State>,
    /// Signalled after each commit attempt (with `state`).
    settled: Condvar,
    /// Overflow and pending vectors by epoll token: eventfd and the message to inject.
    vectors: Mutex<HashMap<u64, (Arc<EventFd>, MsiMessage)>>,
    stats: RouteStats,
    /// Tells the injector a route changed.
    changed: EventFd,
    /// Commit without waiting (set by [`MsiRouter::settle`]).
    flush: AtomicBool,
    /// Fires when a debounced commit is due; only the injector arms it.
    timer: Mutex<TimerFd>,
    /// [`DEBOUNCE`] unless a test asks otherwise.
    debounce: Duration,
}

impl MsiRouter {
    /// A router using at most `msi_routes` MSI routes (clamped to [`MAX_MSI_ROUTES`]).
    pub fn new(backend: Arc<dyn RouteBackend>, msi_routes: u32) -> std::io::Result<Self> {
        Self::with_debounce(backend, msi_routes, DEBOUNCE)
    }

    /// [`MsiRouter::new`] with commits due `debounce` after the last change: tests that count
    /// the batched commits alone give it a long one, so no pause of a busy machine adds a
    /// timed commit.
    pub fn with_debounce(backend: Arc<dyn RouteBackend>, msi_routes: u32, debounce: Duration) -> std::io::Result<Self> {
        let max = IOAPIC_GSIS + msi_routes.min(MAX_MSI_ROUTES);
        let gsis = (max > IOAPIC_GSIS).then(|| IdAllocator::new(IOAPIC_GSIS, max - 1)).transpose().map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            backend,
            state: Mutex::new(State {
                routes: HashMap::new(),
                bindings: HashMap::new(),
                gsis,
                next_token: 0,
                pending: HashSet::new(),
                dirty: false,
                committed: 0,
                attempts: 0,
                last_error: None,
            }),
            settled: Condvar::new(),
            vectors: Mutex::new(HashMap::new()),
            stats: RouteStats::default(),
            changed: EventFd::new(libc::EFD_NONBLOCK)?,
            flush: AtomicBool::new(false),
            timer: Mutex::new(TimerFd::new()?),
            debounce,
        });
        let sh = shared.clone();
        let injector = EpollThread::spawn("msi-overflow".into(), siovmm_seccomp::ThreadKind::OverflowInjector, move |w, token| match token {
            CHANGED => sh.on_change(w),
            COMMIT_DUE => sh.on_commit_due(w),
            token => sh.inject_overflow(token),
        })?;
        injector.watch(&shared.changed, CHANGED)?;
        injector.watch(&*lock(&shared.timer), COMMIT_DUE)?;
        Ok(Self { shared, injector })
    }

    /// Counters.
    pub fn stats(&self) -> &RouteStats {
        &self.shared.stats
    }

    /// (routed, overflow) message vectors: routed counts those holding a route, committed or
    /// pending; INTx lines are neither.
    pub fn counts(&self) -> (usize, usize) {
        let st = lock(&self.shared.state);
        let routed = st.bindings.values().filter(|b| matches!(b, Binding::Routed { .. } | Binding::Pending { .. })).count();
        let overflow = st.bindings.values().filter(|b| matches!(b, Binding::Overflow { .. })).count();
        (routed, overflow)
    }

    /// Commits every pending route change now and waits until the injector has: KVM then
    /// holds exactly the routes bound, and every routed vector is an irqfd. For tests, and
    /// for whoever must see KVM's table as the router sees it. Fails with the commit's error
    /// (its vectors stay on the overflow path), or if the injector does not answer.
    pub fn settle(&self) -> std::io::Result<()> {
        let sh = &self.shared;
        let st = lock(&sh.state);
        if st.pending.is_empty() && !st.dirty {
            return Ok(());
        }
        let attempts = st.attempts;
        sh.flush.store(true, Ordering::Release);
        sh.changed.write(1)?;
        let (st, _) = sh
            .settled
            .wait_timeout_while(st, SETTLE_TIMEOUT, |st| st.attempts == attempts)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (st.attempts == attempts, st.last_error) {
            (true, _) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the MSI router's injector did not commit")),
            (false, Some(kind)) => Err(std::io::Error::new(kind, "KVM refused the MSI routing table")),
            (false, None) => Ok(()),
        }
    }

    /// Raises IOAPIC input `gsi` (an INTx line, below [`IOAPIC_GSIS`]) while `fd` is
    /// signalled, until the guest's EOI, which signals `resample`: level-triggered delivery
    /// with no VMM thread on it. Several functions may share a line, each with its own fds.
    pub fn bind_intx(&self, key: VectorKey, gsi: u32, fd: Arc<EventFd>, resample: &EventFd) -> std::io::Result<()> {
        if gsi >= IOAPIC_GSIS {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("GSI {gsi} is not an IOAPIC input")));
        }
        let mut st = lock(&self.shared.state);
        if st.bindings.contains_key(&key) {
            self.detach_locked(&mut st, key)?;
        }
        self.shared.backend.intx_irqfd(&fd, Some(resample), gsi)?;
        st.bindings.insert(key, Binding::Level { gsi, fd });
        Ok(())
    }

    /// Delivers `fd`'s signals to the guest as `msg` from now on; rebinding an existing key
    /// updates it. The route itself is committed later (module documentation).
    pub fn bind(&self, key: VectorKey, fd: Arc<EventFd>, msg: MsiMessage) -> std::io::Result<()> {
        self.bind_all([(key, fd, msg)])
    }

    /// [`MsiRouter::bind`] for many vectors. Stops at the first vector that cannot be
    /// watched (the ones before it stay bound).
    pub fn bind_all(&self, vectors: impl IntoIterator<Item = (VectorKey, Arc<EventFd>, MsiMessage)>) -> std::io::Result<()> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        let mut changed = false;
        let result = vectors.into_iter().try_for_each(|(key, fd, msg)| {
            changed |= self.bind_locked(&mut st, key, fd, msg)?;
            Ok(())
        });
        if changed {
            // The injector decides when to commit; a failed write means a signal is already
            // there (the counter cannot overflow from 1s).
            let _ = sh.changed.write(1);
        }
        result
    }

    /// One vector of [`MsiRouter::bind_all`]; true when a route is now pending.
    fn bind_locked(&self, st: &mut State, key: VectorKey, fd: Arc<EventFd>, msg: MsiMessage) -> std::io::Result<bool> {
        let sh = &self.shared;
        match st.bindings.get(&key) {
            Some(Binding::Routed { gsi, fd: bound }) if Arc::ptr_eq(bound, &fd) => {
                let gsi = *gsi;
                if st.routes.get(&gsi) == Some(&msg) {
                    return Ok(false);
                }
                // A new message for a committed route: the irqfd would still carry the old
                // one, so the vector goes to the overflow injector until the commit.
                // Off KVM first, then watched: a signal in between waits in the counter, which
                // epoll reports (level-triggered). Never both at once: the injector would
                // then read an eventfd KVM had emptied.
                let token = st.token();
                sh.backend.irqfd(&fd, gsi, false)?;
                if let Err(e) = self.watch(&fd, token, msg) {
                    // Back on its committed route with the old message; the caller hears why.
                    let _ = sh.backend.irqfd(&fd, gsi, true);
                    return Err(e);
                }
                st.make_pending(key, gsi, fd, token, msg);
                return Ok(true);
            }
            Some(Binding::Pending { gsi, fd: bound, token }) if Arc::ptr_eq(bound, &fd) => {
                let (gsi, token) = (*gsi, *token);
                if let Some(v) = lock(&sh.vectors).get_mut(&token) {
                    v.1 = msg;
                }
                st.routes.insert(gsi, msg);
                return Ok(true);
            }
            Some(Binding::Overflow { token }) => {
                let token = *token;
                if let Some(v) = lock(&sh.vectors).get_mut(&token).filter(|v| Arc::ptr_eq(&v.0, &fd)) {
                    v.1 = msg;
                    return Ok(false);
                }
                self.detach_locked(st, key)?;
            }
            Some(_) => self.detach_locked(st, key)?,
            None => {}
        }
        let token = st.token();
        self.watch(&fd, token, msg)?;
        match st.allocate_gsi() {
            Some(gsi) => {
                st.make_pending(key, gsi, fd, token, msg);
                Ok(true)
            }
            None => {
                st.bindings.insert(key, Binding::Overflow { token });
                Ok(false)
            }
        }
    }

    fn watch(&self, fd: &Arc<EventFd>, token: u64, msg: MsiMessage) -> std::io::Result<()> {
        self.shared.watch(self.injector.watcher(), fd, token, msg)
    }

    /// Stops delivering `key`'s interrupts.
    pub fn unbind(&self, key: VectorKey) -> std::io::Result<()> {
        let mut st = lock(&self.shared.state);
        self.detach_locked(&mut st, key)
    }

    /// Stops delivering every vector of `function` (its device is going); returns how many
    /// vectors were bound.
    pub fn unbind_function(&self, function: FunctionId) -> std::io::Result<usize> {
        let mut st = lock(&self.shared.state);
        let keys: Vec<VectorKey> = st.bindings.keys().filter(|k| k.function == function).copied().collect();
        self.detach_locked_all(&mut st, &keys)
    }

    /// [`MsiRouter::unbind`] for many vectors; returns how many were bound. Every vector is
    /// detached even if one irqfd refuses.
    pub fn unbind_all(&self, keys: impl IntoIterator<Item = VectorKey>) -> std::io::Result<usize> {
        let mut st = lock(&self.shared.state);
        let keys: Vec<VectorKey> = keys.into_iter().filter(|k| st.bindings.contains_key(k)).collect();
        self.detach_locked_all(&mut st, &keys)
    }

    fn detach_locked_all(&self, st: &mut State, keys: &[VectorKey]) -> std::io::Result<usize> {
        let mut first_error = None;
        for key in keys {
            if let Err(e) = self.detach_locked(st, *key) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(keys.len()), Err)
    }

    /// Removes `key`'s binding. Its route, if committed, stays in KVM's table without an
    /// irqfd (it fires nothing) until the next commit.
    fn detach_locked(&self, st: &mut State, key: VectorKey) -> std::io::Result<()> {
        let sh = &self.shared;
        match st.bindings.remove(&key) {
            Some(Binding::Routed { gsi, fd }) => {
                // Detach first: if KVM refuses, the GSI stays taken (leaked, never reused with
                // a stale irqfd still on it).
                sh.backend.irqfd(&fd, gsi, false)?;
                st.routes.remove(&gsi);
                st.free_gsi(gsi);
                st.dirty = true;
            }
            Some(Binding::Pending { gsi, fd, token }) => {
                // The fd is being forgotten; failing to remove it from epoll changes nothing.
                let _ = self.injector.unwatch(fd.as_ref());
                lock(&sh.vectors).remove(&token);
                st.pending.remove(&key);
                st.routes.remove(&gsi);
                st.free_gsi(gsi);
                st.dirty = true;
            }
            Some(Binding::Level { gsi, fd }) => {
                if let Err(e) = sh.backend.intx_irqfd(&fd, None, gsi) {
                    st.bindings.insert(key, Binding::Level { gsi, fd });
                    return Err(e);
                }
            }
            Some(Binding::Overflow { token }) => {
                if let Some((fd, _)) = lock(&sh.vectors).remove(&token) {
                    let _ = self.injector.unwatch(fd.as_ref());
                }
            }
            None => {}
        }
        Ok(())
    }
}

impl Shared {
    /// Hands `fd` to the injector as `token`, delivering `msg` (known to it before any
    /// signal can be reported).
    fn watch(&self, w: &Watcher, fd: &Arc<EventFd>, token: u64, msg: MsiMessage) -> std::io::Result<()> {
        lock(&self.vectors).insert(token, (fd.clone(), msg));
        w.watch(fd.as_ref(), token).inspect_err(|_| {
            lock(&self.vectors).remove(&token);
        })
    }

    /// A route changed (or [`MsiRouter::settle`] asks): commit now, or arm the timer.
    fn on_change(&self, w: &Watcher) {
        let _ = self.changed.read();
        let mut st = lock(&self.state);
        let flush = self.flush.swap(false, Ordering::AcqRel);
        if flush || st.pending.len() >= BATCH_MIN.max(st.committed) {
            self.commit(&mut st, w);
        } else if !st.pending.is_empty() {
            // A timer that cannot be armed leaves the vectors on the overflow path until the
            // next change: slower, still delivered.
            let _ = lock(&self.timer).reset(self.debounce, None);
        }
    }

    fn on_commit_due(&self, w: &Watcher) {
        let mut st = lock(&self.state);
        self.commit(&mut st, w);
    }

    /// Writes the table and moves every pending vector to its irqfd; disarms the timer
    /// (which also clears its expiry, so it stops being readable).
    fn commit(&self, st: &mut State, w: &Watcher) {
        let _ = lock(&self.timer).clear();
        st.attempts += 1;
        if !st.dirty && st.pending.is_empty() {
            st.last_error = None;
            self.settled.notify_all();
            return;
        }
        let mut table: Vec<(u32, MsiMessage)> = st.routes.iter().map(|(g, m)| (*g, *m)).collect();
        table.sort_unstable_by_key(|r| r.0);
        if let Err(e) = self.backend.set_msi_routes(&table) {
            // The pending vectors stay with the injector; the next change tries again.
            self.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            st.last_error = Some(e.kind());
            self.settled.notify_all();
            return;
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats.entries_committed.fetch_add(table.len() as u64, Ordering::Relaxed);
        st.last_error = None;
        st.committed = table.len();
        st.dirty = false;
        for key in std::mem::take(&mut st.pending) {
            let Some(Binding::Pending { gsi, fd, token }) = st.bindings.remove(&key) else { continue };
            // Off the overflow set first (this thread is its only reader), then the irqfd,
            // which delivers a signal that arrived in between.
            let _ = w.unwatch(fd.as_ref());
            let Some((_, msg)) = lock(&self.vectors).remove(&token) else { continue };
            if self.backend.irqfd(&fd, gsi, true).is_ok() {
                st.bindings.insert(key, Binding::Routed { gsi, fd });
                continue;
            }
            // Refused (EBUSY: the eventfd is an irqfd elsewhere): delivered by the injector
            // for good, and its GSI given back.
            self.stats.irqfd_refusals.fetch_add(1, Ordering::Relaxed);
            st.routes.remove(&gsi);
            st.free_gsi(gsi);
            st.dirty = true;
            if self.watch(w, &fd, token, msg).is_ok() {
                st.bindings.insert(key, Binding::Overflow { token });
            }
        }
        self.settled.notify_all();
    }

    /// Delivers overflow vector `token`'s signals: one KVM_SIGNAL_MSI per signal (the
    /// eventfd's counter says how many arrived).
    fn inject_overflow(&self, token: u64) {
        let target = lock(&self.vectors).get(&token).map(|(fd, msg)| (fd.clone(), *msg));
        if let Some((fd, msg)) = target {
            let count = fd.read().unwrap_or(0);
            for _ in 0..count {
                if self.backend.signal_msi(msg).is_ok() {
                    self.stats.overflow_injections.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeRoutes;
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    fn msg(v: u32) -> MsiMessage {
        MsiMessage { address: 0xfee0_0000, data: 0x4000 | v }
    }

    fn evt() -> Arc<EventFd> {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    /// Waits (5 s at most) until the fake has seen `n` KVM_SIGNAL_MSI injections.
    fn wait_injected(fake: &FakeRoutes, n: usize) -> Vec<MsiMessage> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = fake.injected.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "{} of {n} injections", got.len());
            std::thread::sleep(Duration::from_millis(2));
        }
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
        router.settle().unwrap();
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
    fn a_functions_vectors_go_together_and_unbinding_never_commits() {
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
        router.settle().unwrap();
        assert_eq!(fake.irqfds.lock().unwrap().len(), 3);
        fake.log.lock().unwrap().clear();
        assert_eq!(router.unbind_function(FunctionId::Adi(1)).unwrap(), 3);
        assert!(fake.log.lock().unwrap().is_empty(), "irqfds off, no commit");
        assert!(fake.irqfds.lock().unwrap().is_empty());
        assert_eq!(fake.routes.lock().unwrap().len(), 3, "stale routes stay, firing nothing");
        assert_eq!(router.counts(), (0, 3));
        assert_eq!(router.unbind_function(FunctionId::Adi(2)).unwrap(), 3, "overflow and IMS vectors too");
        assert_eq!(router.counts(), (0, 0));
        assert_eq!(router.unbind_function(FunctionId::Adi(2)).unwrap(), 0);
        router.settle().unwrap();
        assert_eq!(*fake.log.lock().unwrap(), vec!["routes 0".to_string()], "one commit drops them all");
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
        router.settle().unwrap();
        assert_eq!(fake.irqfds.lock().unwrap().len(), 2);
        assert_eq!(fake.routes.lock().unwrap()[0], (IOAPIC_GSIS, msg(0)));
        // Signal the overflow vectors: each arrives as one KVM_SIGNAL_MSI with its message.
        for fd in &fds[2..] {
            fd.write(1).unwrap();
        }
        fds[4].write(1).unwrap();
        let mut got: Vec<u32> = wait_injected(&fake, 4).iter().map(|m| m.data & 0xff).collect();
        got.sort();
        assert_eq!(got, vec![2, 3, 4, 4]);
        assert_eq!(router.stats().overflow_injections.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_pending_vector_is_delivered_by_the_injector_until_its_commit_then_by_its_irqfd() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 4).unwrap();
        let (k, fd) = (VectorKey::msix(FunctionId::Adi(1), 0), evt());
        // A refused table keeps it pending: its interrupts still arrive, with its message.
        fake.refuse.store(true, Ordering::Relaxed);
        router.bind(k, fd.clone(), msg(1)).unwrap();
        assert!(router.settle().is_err(), "the table was refused");
        assert_eq!(router.stats().commit_failures.load(Ordering::Relaxed), 1);
        fd.write(1).unwrap();
        assert_eq!(wait_injected(&fake, 1), vec![msg(1)]);
        // A new message while pending: the injector uses it at once.
        router.bind(k, fd.clone(), msg(2)).unwrap();
        fd.write(1).unwrap();
        assert_eq!(wait_injected(&fake, 2), vec![msg(1), msg(2)]);
        fake.refuse.store(false, Ordering::Relaxed);
        router.settle().unwrap();
        assert_eq!(*fake.routes.lock().unwrap(), vec![(IOAPIC_GSIS, msg(2))]);
        assert_eq!(fake.irqfds.lock().unwrap().get(&IOAPIC_GSIS), Some(&fd.as_raw_fd()));
        // Now KVM's: the injector no longer reads it (the fake's irqfd leaves the count).
        fd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(fake.injected.lock().unwrap().len(), 2);
        assert_eq!(fd.read().unwrap(), 1);
    }

    #[test]
    fn a_routed_vector_with_a_new_message_goes_to_the_injector_until_the_next_commit() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 1).unwrap();
        let (k, fd) = (VectorKey::msix(FunctionId::Adi(1), 0), evt());
        router.bind(k, fd.clone(), msg(1)).unwrap();
        router.settle().unwrap();
        let commits = router.stats().commits.load(Ordering::Relaxed);
        // The same message again changes nothing.
        router.bind(k, fd.clone(), msg(1)).unwrap();
        router.settle().unwrap();
        assert_eq!(router.stats().commits.load(Ordering::Relaxed), commits);
        // Hold the injector's commits back (a refused table) to see the vector between.
        fake.refuse.store(true, Ordering::Relaxed);
        router.bind(k, fd.clone(), msg(7)).unwrap();
        assert!(fake.irqfds.lock().unwrap().is_empty(), "off the old route at once");
        fd.write(1).unwrap();
        assert_eq!(wait_injected(&fake, 1), vec![msg(7)], "the new message, never the old one");
        fake.refuse.store(false, Ordering::Relaxed);
        router.settle().unwrap();
        assert_eq!(*fake.routes.lock().unwrap(), vec![(IOAPIC_GSIS, msg(7))]);
        assert_eq!(fake.irqfds.lock().unwrap().len(), 1);
        assert_eq!(router.counts(), (1, 0));
    }

    #[test]
    fn changes_one_at_a_time_commit_on_their_own_and_in_batches() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), MAX_MSI_ROUTES).unwrap();
        // A few: the timer commits them (no settle).
        let fds: Vec<_> = (0..5).map(|_| evt()).collect();
        for (i, fd) in fds.iter().enumerate() {
            router.bind(VectorKey::msix(FunctionId::Adi(0), i as u32), fd.clone(), msg(i as u32)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.irqfds.lock().unwrap().len() < 5 {
            assert!(Instant::now() < deadline, "the debounce timer never committed");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(router.counts(), (5, 0));
        // Every route KVM may hold, one bind at a time: O(n) entries copied, not O(n^2).
        // Counted without timed commits (a pause of this machine would add one).
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::with_debounce(fake.clone(), MAX_MSI_ROUTES, Duration::from_secs(3600)).unwrap();
        let n = MAX_MSI_ROUTES;
        let fds: Vec<_> = (0..n).map(|_| evt()).collect();
        for (i, fd) in fds.iter().enumerate() {
            router.bind(VectorKey::msix(FunctionId::Adi(i as u32 / 256), i as u32 % 256), fd.clone(), msg(i as u32)).unwrap();
        }
        router.settle().unwrap();
        let (commits, entries) = (router.stats().commits.load(Ordering::Relaxed), router.stats().entries_committed.load(Ordering::Relaxed));
        assert!(entries <= 3 * u64::from(MAX_MSI_ROUTES), "{entries} entries in {commits} commits for {MAX_MSI_ROUTES} binds");
        assert_eq!(fake.irqfds.lock().unwrap().len(), MAX_MSI_ROUTES as usize);
        assert_eq!(router.counts(), (MAX_MSI_ROUTES as usize, 0));
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
        router.settle().unwrap();
        assert_eq!(*fake.routes.lock().unwrap(), vec![(IOAPIC_GSIS, msg(9))]);
        // Retarget the overflow vector: it stays there, with the new message.
        router.bind(k2, b.clone(), msg(8)).unwrap();
        b.write(1).unwrap();
        assert_eq!(wait_injected(&fake, 1), vec![msg(8)]);
        // Free the route; the next vector bound gets it.
        router.unbind(k1).unwrap();
        assert!(fake.irqfds.lock().unwrap().is_empty());
        router.settle().unwrap();
        assert!(fake.routes.lock().unwrap().is_empty());
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
        router.settle().unwrap();
        assert_eq!(*fake.log.lock().unwrap(), vec![format!("routes {MAX_MSI_ROUTES}")]);
        let routes = fake.routes.lock().unwrap().clone();
        assert_eq!((routes[0].0, routes.last().unwrap().0), (IOAPIC_GSIS, IOAPIC_GSIS + MAX_MSI_ROUTES - 1));
    }

    #[test]
    fn a_refused_irqfd_gives_its_gsi_back_and_the_injector_keeps_delivering() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 4).unwrap();
        fake.refuse_irqfd.store(true, Ordering::Relaxed);
        let keys: Vec<_> = (0..3).map(|i| VectorKey::msix(FunctionId::Adi(0), i)).collect();
        let first: Vec<_> = (0..3).map(|_| evt()).collect();
        router.bind_all(keys.iter().map(|&k| (k, first[k.index as usize].clone(), msg(k.index)))).unwrap();
        router.settle().unwrap();
        assert_eq!(router.stats().irqfd_refusals.load(Ordering::Relaxed), 3);
        assert_eq!(router.counts(), (0, 3), "on the overflow path");
        first[1].write(1).unwrap();
        assert_eq!(wait_injected(&fake, 1), vec![msg(1)]);
        router.settle().unwrap();
        assert!(fake.routes.lock().unwrap().is_empty(), "no route left in the table");
        fake.refuse_irqfd.store(false, Ordering::Relaxed);
        // All four GSIs are free again: four vectors get routes, none overflows.
        let fds: Vec<_> = (0..4).map(|_| evt()).collect();
        router.bind_all((0..4).map(|i| (VectorKey::msix(FunctionId::Adi(1), i), fds[i as usize].clone(), msg(i)))).unwrap();
        router.settle().unwrap();
        assert_eq!(router.counts(), (4, 3));
        assert_eq!(fake.irqfds.lock().unwrap().len(), 4);
    }

    #[test]
    fn freed_gsis_are_reused_lowest_first_and_no_budget_means_overflow() {
        let fake = Arc::new(FakeRoutes::default());
        let router = MsiRouter::new(fake.clone(), 4).unwrap();
        let fds: Vec<_> = (0..4).map(|_| evt()).collect();
        for (i, fd) in fds.iter().enumerate() {
            router.bind(VectorKey::msix(FunctionId::Adi(0), i as u32), fd.clone(), msg(i as u32)).unwrap();
        }
        router.settle().unwrap();
        router.unbind(VectorKey::msix(FunctionId::Adi(0), 2)).unwrap();
        router.unbind(VectorKey::msix(FunctionId::Adi(0), 1)).unwrap();
        router.bind(VectorKey::msix(FunctionId::Adi(1), 0), evt(), msg(10)).unwrap();
        router.settle().unwrap();
        assert!(fake.routes.lock().unwrap().contains(&(IOAPIC_GSIS + 1, msg(10))));

        let none = MsiRouter::new(Arc::new(FakeRoutes::default()), 0).unwrap();
        none.bind(VectorKey::msix(FunctionId::Adi(0), 0), evt(), msg(1)).unwrap();
        assert_eq!(none.counts(), (0, 1));
    }
}
