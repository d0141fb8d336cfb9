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

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::msix::MsiMessage;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// KVM's per-VM limit on routing entries.
pub const KVM_MAX_IRQ_ROUTES: u32 = 4096;
/// GSIs 0..24 stay routed to the IOAPIC pins.
pub const IOAPIC_GSIS: u32 = 24;
/// Routing entries the irqchips take: 24 IOAPIC pins and 16 PIC pins (see `kvm_routes`).
pub const IRQCHIP_ENTRIES: u32 = 40;
/// Most MSI routes a VM can have.
pub const MAX_MSI_ROUTES: u32 = KVM_MAX_IRQ_ROUTES - IRQCHIP_ENTRIES;

/// Identifies one guest vector (chosen by the caller, unique per router).
pub type VectorKey = u64;

/// What the router needs from KVM; a fake implements it in tests.
pub trait RouteBackend: Send + Sync {
    /// Replaces the routing table: IOAPIC pins plus these (gsi, message) MSI routes.
    fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()>;
    /// Binds (`true`) or unbinds an irqfd.
    fn irqfd(&self, fd: &EventFd, gsi: u32, assign: bool) -> std::io::Result<()>;
    /// Injects one MSI (KVM_SIGNAL_MSI).
    fn signal_msi(&self, msg: MsiMessage) -> std::io::Result<()>;
}

enum Binding {
    Routed { gsi: u32, fd: Arc<EventFd> },
    Overflow,
}

struct State {
    routes: HashMap<u32, MsiMessage>,
    bindings: HashMap<VectorKey, Binding>,
    free_gsis: Vec<u32>,
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
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for MsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRouter").finish_non_exhaustive()
    }
}

struct Overflow {
    epoll: Epoll,
    vectors: Mutex<HashMap<VectorKey, (Arc<EventFd>, MsiMessage)>>,
    stats: RouteStats,
    stop: AtomicBool,
    wake: EventFd,
}

const WAKE: u64 = u64::MAX;

impl MsiRouter {
    /// A router using at most `msi_routes` MSI routes (clamped to [`MAX_MSI_ROUTES`]).
    pub fn new(backend: Arc<dyn RouteBackend>, msi_routes: u32) -> std::io::Result<Self> {
        let max = IOAPIC_GSIS + msi_routes.min(MAX_MSI_ROUTES);
        let overflow = Arc::new(Overflow {
            epoll: Epoll::new()?,
            vectors: Mutex::new(HashMap::new()),
            stats: RouteStats::default(),
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        overflow.epoll.ctl(ControlOperation::Add, overflow.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE))?;
        let (o, b) = (overflow.clone(), backend.clone());
        let thread = std::thread::Builder::new().name("msi-overflow".into()).spawn(move || overflow_loop(&o, b.as_ref()))?;
        // Lowest GSIs first: pop from the end.
        let free_gsis = (IOAPIC_GSIS..max).rev().collect();
        Ok(Self {
            backend,
            state: Mutex::new(State { routes: HashMap::new(), bindings: HashMap::new(), free_gsis }),
            overflow,
            thread: Some(thread),
        })
    }

    /// Counters.
    pub fn stats(&self) -> &RouteStats {
        &self.overflow.stats
    }

    /// (routed, overflow) vectors.
    pub fn counts(&self) -> (usize, usize) {
        let st = lock(&self.state);
        let routed = st.bindings.values().filter(|b| matches!(b, Binding::Routed { .. })).count();
        (routed, st.bindings.len() - routed)
    }

    fn commit(&self, st: &State) -> std::io::Result<()> {
        let mut routes: Vec<(u32, MsiMessage)> = st.routes.iter().map(|(g, m)| (*g, *m)).collect();
        routes.sort_by_key(|r| r.0);
        self.backend.set_msi_routes(&routes)
    }

    /// Delivers `fd`'s signals to the guest as `msg`; rebinding an existing key updates it.
    pub fn bind(&self, key: VectorKey, fd: Arc<EventFd>, msg: MsiMessage) -> std::io::Result<()> {
        let mut st = lock(&self.state);
        match st.bindings.get(&key) {
            Some(Binding::Routed { gsi, fd: bound }) if Arc::ptr_eq(bound, &fd) => {
                let gsi = *gsi;
                st.routes.insert(gsi, msg);
                return self.commit(&st);
            }
            Some(Binding::Overflow) => {
                if let Some(v) = lock(&self.overflow.vectors).get_mut(&key) {
                    if Arc::ptr_eq(&v.0, &fd) {
                        v.1 = msg;
                        return Ok(());
                    }
                }
            }
            _ => {}
        }
        drop(st);
        self.unbind(key)?;
        let mut st = lock(&self.state);
        match st.free_gsis.pop() {
            Some(gsi) => {
                st.routes.insert(gsi, msg);
                if let Err(e) = self.commit(&st) {
                    st.routes.remove(&gsi);
                    st.free_gsis.push(gsi);
                    return Err(e);
                }
                self.backend.irqfd(&fd, gsi, true)?;
                st.bindings.insert(key, Binding::Routed { gsi, fd });
            }
            None => {
                self.overflow.epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, key))?;
                lock(&self.overflow.vectors).insert(key, (fd, msg));
                st.bindings.insert(key, Binding::Overflow);
            }
        }
        Ok(())
    }

    /// Stops delivering `key`'s interrupts.
    pub fn unbind(&self, key: VectorKey) -> std::io::Result<()> {
        let mut st = lock(&self.state);
        match st.bindings.remove(&key) {
            Some(Binding::Routed { gsi, fd }) => {
                self.backend.irqfd(&fd, gsi, false)?;
                st.routes.remove(&gsi);
                st.free_gsis.push(gsi);
                self.commit(&st)?;
            }
            Some(Binding::Overflow) => {
                if let Some((fd, _)) = lock(&self.overflow.vectors).remove(&key) {
                    let _ = self.overflow.epoll.ctl(ControlOperation::Delete, fd.as_raw_fd(), EpollEvent::default());
                }
            }
            None => {}
        }
        Ok(())
    }
}

impl Drop for MsiRouter {
    fn drop(&mut self) {
        self.overflow.stop.store(true, Ordering::Release);
        let _ = self.overflow.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn overflow_loop(o: &Overflow, backend: &dyn RouteBackend) {
    let mut events = vec![EpollEvent::default(); 64];
    while !o.stop.load(Ordering::Acquire) {
        let n = match o.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let key = ev.data();
            if key == WAKE {
                continue;
            }
            let target = lock(&o.vectors).get(&key).map(|(fd, msg)| (fd.clone(), *msg));
            if let Some((fd, msg)) = target {
                // One injection per signal: the counter says how many arrived.
                let count = fd.read().unwrap_or(0);
                for _ in 0..count {
                    if backend.signal_msi(msg).is_ok() {
                        o.stats.overflow_injections.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Fake {
        routes: Mutex<Vec<(u32, MsiMessage)>>,
        irqfds: Mutex<HashMap<u32, i32>>,
        injected: Mutex<Vec<MsiMessage>>,
        log: Mutex<Vec<String>>,
    }

    impl RouteBackend for Fake {
        fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()> {
            *self.routes.lock().unwrap() = routes.to_vec();
            self.log.lock().unwrap().push(format!("routes {}", routes.len()));
            Ok(())
        }
        fn irqfd(&self, fd: &EventFd, gsi: u32, assign: bool) -> std::io::Result<()> {
            let routed = self.routes.lock().unwrap().iter().any(|r| r.0 == gsi);
            // The kernel ordering rule this module promises.
            assert!(routed, "irqfd {} on gsi {gsi} without a route", if assign { "bound" } else { "unbound" });
            if assign {
                self.irqfds.lock().unwrap().insert(gsi, fd.as_raw_fd());
            } else {
                self.irqfds.lock().unwrap().remove(&gsi);
            }
            Ok(())
        }
        fn signal_msi(&self, msg: MsiMessage) -> std::io::Result<()> {
            self.injected.lock().unwrap().push(msg);
            Ok(())
        }
    }

    fn msg(v: u32) -> MsiMessage {
        MsiMessage { address: 0xfee0_0000, data: 0x4000 | v }
    }

    fn evt() -> Arc<EventFd> {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn routes_first_then_overflow_and_every_interrupt_arrives() {
        let fake = Arc::new(Fake::default());
        // Room for 2 MSI routes only.
        let router = MsiRouter::new(fake.clone(), 2).unwrap();
        let fds: Vec<_> = (0..5).map(|_| evt()).collect();
        for (i, fd) in fds.iter().enumerate() {
            router.bind(i as u64, fd.clone(), msg(i as u32)).unwrap();
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
        let fake = Arc::new(Fake::default());
        let router = MsiRouter::new(fake.clone(), 1).unwrap();
        let (a, b) = (evt(), evt());
        router.bind(1, a.clone(), msg(1)).unwrap();
        router.bind(2, b.clone(), msg(2)).unwrap();
        assert_eq!(router.counts(), (1, 1));
        // Retarget the routed vector: same GSI, new message.
        router.bind(1, a.clone(), msg(9)).unwrap();
        assert_eq!(*fake.routes.lock().unwrap(), vec![(IOAPIC_GSIS, msg(9))]);
        // Free the route; the next vector bound gets it.
        router.unbind(1).unwrap();
        assert!(fake.routes.lock().unwrap().is_empty());
        assert!(fake.irqfds.lock().unwrap().is_empty());
        let c = evt();
        router.bind(3, c, msg(3)).unwrap();
        assert_eq!(router.counts(), (1, 1));
        router.unbind(2).unwrap();
        router.unbind(2).unwrap();
        assert_eq!(router.counts(), (1, 0));
    }

    #[test]
    fn limits_are_clamped() {
        let fake = Arc::new(Fake::default());
        let router = MsiRouter::new(fake, 1_000_000).unwrap();
        assert_eq!(lock(&router.state).free_gsis.len() as u32, MAX_MSI_ROUTES);
    }
}
