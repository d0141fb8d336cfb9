//! Mapped submission portals for the software device: one 4 KiB page per ADI that the VMM maps
//! into its guest where the doorbell register is (BAR0 + 0x1000), so that ringing the doorbell is
//! a plain store, with no exit at all — the way a hardware SIOV device's portal page is mapped
//! (DSA: the WQ portals in BAR2). Hardware sees the store on its bus; this device cannot, so a
//! poller thread reads each open ADI's page: a nonzero doorbell word (page offset 0) is a ring,
//! swapped back to zero, and the poller runs the ADI's queue itself (a hand-off to a worker
//! thread would cost a wake-up, and with the submitter spinning on its completion record,
//! a CPU: measured 2.5x slower doorbell-to-completion in the sandbox). A store of zero rings
//! nothing.
//!
//! Cost: the poller scans without sleeping (yielding the CPU between scans) for [`HOT`] after
//! each ring, since rings come in bursts, then backs off to sleeping [`IDLE_SLEEP`] between
//! scans, so an idle device costs a few thousand wake-ups a second and a ring after a quiet
//! spell waits about that long. With no ADI open it sleeps until one opens.
//!
//! The pages live in one memfd (`adis × 4 KiB` after a first page, sparse), so a VMM in another process can map an
//! ADI's page from the file and offset [`PortalPage`](crate::siov::PortalPage) names. Each guest
//! gets only its ADIs' pages; what it stores there reaches nothing but its own doorbell.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use siovmm_interrupts::lock;

use crate::mapping::RegionMapping;
use crate::siov::PortalPage;

/// Bytes per portal: one host page.
pub use crate::mapping::PAGE;
/// Where ADI 0's page is in the file: one page in, so that a vfio-user REGION_INFO can name
/// the file offset of a BAR whose portal page is its second (`siovmm-devd`'s BAR0 has the
/// doorbell at 0x1000): ADI `i`'s page is at `FIRST_PAGE + i * PAGE`, its BAR at `i * PAGE`.
pub const FIRST_PAGE: u64 = PAGE;
/// How long the poller sleeps between scans once rings stop coming.
pub const IDLE_SLEEP: Duration = Duration::from_micros(50);
/// How long after a ring the poller keeps scanning without sleeping.
pub const HOT: Duration = Duration::from_millis(2);

/// The pages: their memfd, mapped in this process.
struct Pages {
    file: Arc<File>,
    map: RegionMapping,
}

impl Pages {
    fn new(adis: u32) -> std::io::Result<Self> {
        let len = FIRST_PAGE + u64::from(adis.max(1)) * PAGE;
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"siovmm-portals".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor memfd_create just returned, owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len)?;
        let map = RegionMapping::new(file.as_raw_fd(), 0, 0, len)?;
        Ok(Self { file: Arc::new(file), map })
    }

    /// Where ADI `adi`'s page is in the file.
    fn offset(adi: u32) -> Option<u64> {
        u64::from(adi).checked_mul(PAGE)?.checked_add(FIRST_PAGE)
    }

    /// ADI `adi`'s doorbell word, if the device has that ADI.
    fn word(&self, adi: u32) -> Option<&AtomicU32> {
        // Pages are whole, so a page that starts inside the mapping holds its word.
        let host = self.map.host(Self::offset(adi)?)?;
        // SAFETY: inside the mapping, which lives as long as `self`; page-aligned so 4-byte
        // aligned; the memory is only ever accessed atomically here (the guest's stores are
        // single aligned stores).
        Some(unsafe { &*(host as *const AtomicU32) })
    }
}

#[derive(Default)]
struct Open {
    /// Open ADIs.
    adis: Vec<u32>,
}

struct State {
    open: Mutex<Open>,
    /// Bumped on every change of `open`, so the poller copies the list only then.
    generation: AtomicU64,
    changed: Condvar,
    stop: AtomicBool,
    /// Rings seen.
    rings: AtomicU64,
}

/// The portals of one device and their poller.
pub struct Portals {
    pages: Arc<Pages>,
    state: Arc<State>,
    poller: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Portals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portals").field("pages", &(self.pages.map.len() / PAGE)).finish_non_exhaustive()
    }
}

impl Portals {
    /// Pages for `adis` ADIs and a poller thread, which calls `ring(adi)` for each ring.
    pub fn new(adis: u32, ring: impl Fn(u32) + Send + 'static) -> std::io::Result<Self> {
        let pages = Arc::new(Pages::new(adis)?);
        let state = Arc::new(State {
            open: Mutex::new(Open::default()),
            generation: AtomicU64::new(0),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            rings: AtomicU64::new(0),
        });
        let (p, s) = (pages.clone(), state.clone());
        let poller = siovmm_seccomp::spawn(siovmm_seccomp::ThreadKind::DeviceWorker, "siov-portals".into(), move || poll(&p, &s, ring))?;
        Ok(Self { pages, state, poller: Some(poller) })
    }

    /// Starts watching ADI `adi`'s page (cleared first); returns the page. `None` for an ADI
    /// the device does not have.
    pub fn open(&self, adi: u32) -> Option<PortalPage> {
        self.pages.word(adi)?.store(0, Ordering::Release);
        let mut open = lock(&self.state.open);
        open.adis.retain(|a| *a != adi);
        open.adis.push(adi);
        self.state.generation.fetch_add(1, Ordering::AcqRel);
        self.state.changed.notify_all();
        Some(PortalPage { file: self.pages.file.clone(), offset: Pages::offset(adi)? })
    }

    /// Stops watching ADI `adi`'s page. A scan already under way when this is called may
    /// still pass one ring of `adi` on (close does not wait for the poller: its caller holds the
    /// ADI's lock, which a ring needs); the device ignores rings of an ADI that is not open, and
    /// the poller's next scan no longer reads the page.
    pub fn close(&self, adi: u32) {
        let mut open = lock(&self.state.open);
        open.adis.retain(|a| *a != adi);
        self.state.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Rings the poller passed on.
    pub fn rings(&self) -> u64 {
        self.state.rings.load(Ordering::Relaxed)
    }
}

impl Drop for Portals {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        {
            let _open = lock(&self.state.open);
            self.state.changed.notify_all();
        }
        if let Some(t) = self.poller.take() {
            let _ = t.join();
        }
    }
}

/// The poller: scans the open ADIs' doorbell words until the device goes.
fn poll(pages: &Pages, state: &State, ring: impl Fn(u32)) {
    let mut seen = u64::MAX;
    let mut adis: Vec<u32> = Vec::new();
    let mut last_ring = std::time::Instant::now();
    while !state.stop.load(Ordering::Acquire) {
        let generation = state.generation.load(Ordering::Acquire);
        if generation != seen {
            let mut open = lock(&state.open);
            while open.adis.is_empty() && !state.stop.load(Ordering::Acquire) {
                open = state.changed.wait(open).unwrap_or_else(|e| e.into_inner());
            }
            adis.clone_from(&open.adis);
            seen = state.generation.load(Ordering::Acquire);
            continue;
        }
        let mut rung = false;
        for &adi in &adis {
            if pages.word(adi).is_some_and(|w| w.swap(0, Ordering::AcqRel) != 0) {
                rung = true;
                state.rings.fetch_add(1, Ordering::Relaxed);
                ring(adi);
            }
        }
        if rung {
            last_ring = std::time::Instant::now();
        } else if last_ring.elapsed() < HOT {
            std::thread::yield_now();
        } else {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use vmm_sys_util::eventfd::EventFd;

    /// A VMM's view: the page mapped from the file and offset the device handed out.
    fn store(page: &PortalPage, value: u32) {
        use std::os::unix::fs::FileExt;
        page.file.write_all_at(&value.to_le_bytes(), page.offset).unwrap();
    }

    fn wait_for(fd: &EventFd) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if fd.read().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn a_store_to_an_open_page_rings_that_adis_doorbell_only() {
        let (a, b) = (Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()), Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let (ra, rb) = (a.clone(), b.clone());
        let portals = Portals::new(4, move |adi| {
            let fd = match adi {
                1 => &ra,
                3 => &rb,
                _ => panic!("ADI {adi} was never opened"),
            };
            fd.write(1).unwrap();
        })
        .unwrap();
        let page_a = portals.open(1).unwrap();
        let page_b = portals.open(3).unwrap();
        assert_eq!((page_a.offset, page_b.offset), (FIRST_PAGE + PAGE, FIRST_PAGE + 3 * PAGE));
        store(&page_a, 1);
        assert!(wait_for(&a), "ADI 1 rung");
        assert!(b.read().is_err(), "ADI 3 not");
        store(&page_b, 0);
        std::thread::sleep(Duration::from_millis(20));
        assert!(b.read().is_err(), "a zero store rings nothing");
        store(&page_b, 0xdead_beef);
        assert!(wait_for(&b));
        portals.close(1);
        // One more ring of ADI 3 first: a scan that began before `close` may still read ADI 1's
        // page (see `close`), but the scan that rings ADI 3 after the store below has read ADI
        // 1's word before that store, and every scan after it starts with the new list.
        store(&page_b, 1);
        assert!(wait_for(&b));
        store(&page_a, 1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.read().is_err(), "a closed ADI's page is not watched");
        assert_eq!(portals.rings(), 3);
        // Reopened: the stale store is cleared, not taken as a ring.
        portals.open(1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.read().is_err());
    }

    #[test]
    fn an_adi_beyond_the_pages_is_refused() {
        let portals = Portals::new(2, |_| {}).unwrap();
        assert!(portals.open(2).is_none());
    }
}
