//! What the daemon has handed out, across all clients: ADIs open and IMS entries in use, per
//! client VMM (told apart by the connecting process's PID, SO_PEERCRED) and in all, with the
//! per-VM limits the operator set. A VMM's connections all close when it exits or is killed,
//! and each close gives its ADI and IMS entries back here at once.
//!
//! The totals are also written to `status` in the socket directory after every change
//! (`adis_open`, `ims_entries_in_use`, `clients`; written whole, then renamed into place), for
//! operators and tests to read, followed by the device's counters when the pool has them
//! ([`Pool::with_counters`]; [`Pool::refresh`] rewrites the file with their current values).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;

/// Per-VM limits (`None`: only the device's own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// ADIs one VMM may hold.
    pub adis_per_vm: Option<u32>,
    /// IMS entries one VMM's ADIs may hold.
    pub ims_per_vm: Option<u32>,
}

/// Why a client was refused an ADI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The VM's ADI limit.
    #[error("VMM pid {pid} holds {held} ADIs, its limit (--max-adis-per-vm)")]
    Adis {
        /// The VMM.
        pid: i32,
        /// What it holds.
        held: u32,
    },
    /// The VM's IMS limit.
    #[error("VMM pid {pid} holds {held} IMS entries; {wanted} more exceed its limit of {limit} (--max-ims-per-vm)")]
    Ims {
        /// The VMM.
        pid: i32,
        /// What it holds.
        held: u32,
        /// What this ADI needs.
        wanted: u32,
        /// The limit.
        limit: u32,
    },
}

#[derive(Debug, Default, Clone, Copy)]
struct Held {
    adis: u32,
    ims: u32,
}

/// Lines (`name value`) that follow the totals in the status file.
pub type Counters = Box<dyn Fn() -> String + Send + Sync>;

/// The daemon's accounting.
pub struct Pool {
    limits: Limits,
    by_vm: Mutex<BTreeMap<i32, Held>>,
    status: Option<PathBuf>,
    counters: Option<Counters>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("limits", &self.limits).field("by_vm", &self.by_vm).field("status", &self.status).finish()
    }
}

/// The PID of the process at the other end of `stream` (0 if the kernel does not say).
pub fn peer_pid(stream: &UnixStream) -> i32 {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, which is that large.
    let r = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    if r == 0 {
        cred.pid
    } else {
        0
    }
}

impl Pool {
    /// A pool with `limits`, writing its totals to `status` (if given).
    pub fn new(limits: Limits, status: Option<PathBuf>) -> Self {
        let pool = Self { limits, by_vm: Mutex::new(BTreeMap::new()), status, counters: None };
        pool.write_status(&BTreeMap::new());
        pool
    }

    /// The status file also carries `counters()` (e.g. the device's), from now on.
    pub fn with_counters(mut self, counters: Counters) -> Self {
        self.counters = Some(counters);
        self.refresh();
        self
    }

    /// Rewrites the status file (the counters move without the pool knowing).
    pub fn refresh(&self) {
        let by_vm = self.lock();
        self.write_status(&by_vm);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Held>> {
        self.by_vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts an ADI of `ims` entries for VMM `pid`, unless that passes one of its limits.
    pub fn take(&self, pid: i32, ims: u32) -> Result<(), Refused> {
        let mut by_vm = self.lock();
        let held = by_vm.get(&pid).copied().unwrap_or_default();
        if self.limits.adis_per_vm.is_some_and(|l| held.adis >= l) {
            return Err(Refused::Adis { pid, held: held.adis });
        }
        if let Some(limit) = self.limits.ims_per_vm.filter(|&l| held.ims.saturating_add(ims) > l) {
            return Err(Refused::Ims { pid, held: held.ims, wanted: ims, limit });
        }
        by_vm.insert(pid, Held { adis: held.adis + 1, ims: held.ims + ims });
        self.write_status(&by_vm);
        Ok(())
    }

    /// Counts `count` more IMS entries for VMM `pid` (hypercall slots its guest asked for
    /// through an ADI it holds), unless that passes its IMS limit.
    pub fn take_ims(&self, pid: i32, count: u32) -> Result<(), Refused> {
        let mut by_vm = self.lock();
        let held = by_vm.get(&pid).copied().unwrap_or_default();
        if let Some(limit) = self.limits.ims_per_vm.filter(|&l| held.ims.saturating_add(count) > l) {
            return Err(Refused::Ims { pid, held: held.ims, wanted: count, limit });
        }
        by_vm.entry(pid).or_default().ims = held.ims.saturating_add(count);
        self.write_status(&by_vm);
        Ok(())
    }

    /// Gives back what [`Pool::take_ims`] counted.
    pub fn give_ims(&self, pid: i32, count: u32) {
        let mut by_vm = self.lock();
        if let Some(h) = by_vm.get_mut(&pid) {
            h.ims = h.ims.saturating_sub(count);
        }
        self.write_status(&by_vm);
    }

    /// Gives back what [`Pool::take`] counted.
    pub fn give_back(&self, pid: i32, ims: u32) {
        let mut by_vm = self.lock();
        if let Some(h) = by_vm.get_mut(&pid) {
            h.adis = h.adis.saturating_sub(1);
            h.ims = h.ims.saturating_sub(ims);
            if h.adis == 0 {
                by_vm.remove(&pid);
            }
        }
        self.write_status(&by_vm);
    }

    /// (ADIs open, IMS entries in use, client VMMs).
    pub fn totals(&self) -> (u32, u32, usize) {
        let by_vm = self.lock();
        (by_vm.values().map(|h| h.adis).sum(), by_vm.values().map(|h| h.ims).sum(), by_vm.len())
    }

    fn write_status(&self, by_vm: &BTreeMap<i32, Held>) {
        let Some(path) = &self.status else { return };
        // The PID first: a daemon writes this file first once every ADI's socket listens
        // (main.rs), so a file naming the PID of the daemon one started says it serves, where
        // sockets and a status file a killed daemon left say nothing.
        let mut text = format!(
            "pid {}\nadis_open {}\nims_entries_in_use {}\nclients {}\n",
            std::process::id(),
            by_vm.values().map(|h| h.adis).sum::<u32>(),
            by_vm.values().map(|h| h.ims).sum::<u32>(),
            by_vm.len()
        );
        if let Some(counters) = &self.counters {
            text.push_str(&counters());
        }
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            log::warn!("{}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_per_vm_and_freed_entries_count_again() {
        let pool = Pool::new(Limits { adis_per_vm: Some(2), ims_per_vm: Some(5) }, None);
        pool.take(10, 2).unwrap();
        pool.take(10, 2).unwrap();
        assert_eq!(pool.take(10, 1), Err(Refused::Adis { pid: 10, held: 2 }));
        pool.take(11, 2).unwrap();
        pool.take(11, 3).unwrap();
        assert_eq!(pool.totals(), (4, 9, 2));
        pool.give_back(10, 2);
        assert_eq!(pool.take(10, 2), Ok(()), "the freed ADI counts again");
        let pool = Pool::new(Limits { adis_per_vm: None, ims_per_vm: Some(5) }, None);
        pool.take(1, 4).unwrap();
        assert_eq!(pool.take(1, 2), Err(Refused::Ims { pid: 1, held: 4, wanted: 2, limit: 5 }));
        pool.give_back(1, 4);
        assert_eq!(pool.totals(), (0, 0, 0));
    }

    #[test]
    fn hypercall_slots_count_against_the_same_ims_limit() {
        let pool = Pool::new(Limits { adis_per_vm: None, ims_per_vm: Some(10) }, None);
        pool.take(3, 2).unwrap();
        pool.take_ims(3, 8).unwrap();
        assert_eq!(pool.take_ims(3, 1), Err(Refused::Ims { pid: 3, held: 10, wanted: 1, limit: 10 }));
        assert_eq!(pool.take(3, 1), Err(Refused::Ims { pid: 3, held: 10, wanted: 1, limit: 10 }), "nor another ADI's vectors");
        assert_eq!(pool.totals(), (1, 10, 1));
        pool.give_ims(3, 8);
        pool.give_back(3, 2);
        assert_eq!(pool.totals(), (0, 0, 0));
    }

    #[test]
    fn the_status_file_follows_every_change() {
        let dir = std::env::temp_dir().join(format!("siovmm-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = dir.join("status");
        let totals = |adis: u32, ims: u32, clients: usize| {
            format!("pid {}\nadis_open {adis}\nims_entries_in_use {ims}\nclients {clients}\n", std::process::id())
        };
        let pool = Pool::new(Limits::default(), Some(status.clone()));
        assert_eq!(std::fs::read_to_string(&status).unwrap(), totals(0, 0, 0));
        pool.take(7, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&status).unwrap(), totals(1, 2, 1));
        pool.give_back(7, 2);
        assert_eq!(std::fs::read_to_string(&status).unwrap(), totals(0, 0, 0));
        // Counters follow the totals; refresh rewrites them as they move.
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = ticks.clone();
        let pool = pool.with_counters(Box::new(move || format!("ticks {}\n", seen.load(std::sync::atomic::Ordering::Relaxed))));
        assert!(std::fs::read_to_string(&status).unwrap().ends_with("clients 0\nticks 0\n"));
        ticks.store(5, std::sync::atomic::Ordering::Relaxed);
        pool.refresh();
        assert!(std::fs::read_to_string(&status).unwrap().ends_with("clients 0\nticks 5\n"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
