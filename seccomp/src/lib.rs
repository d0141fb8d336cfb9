//! seccomp filters for siovmm's threads: each kind of thread (vCPU, event loop, device worker,
//! overflow injector, console writer, the device daemon's servers) gets an allow-list of the
//! system calls it needs, built with the rust-vmm `seccompiler` crate and installed by the
//! thread itself as it starts ([`spawn`], or [`enter`] for a thread that already runs).
//!
//! The process chooses a [`Mode`] once ([`install`]), before it starts the threads that will be
//! filtered; a process that never calls it (tests, other users of the library crates) runs
//! unfiltered. Under [`Mode::On`] a system call outside the thread's list stops the process: a
//! one-line report names the thread kind and the call, then the process dies of `SIGSYS`
//! ([`trap`]). Under [`Mode::Log`] the kernel logs the call (audit record type 1326, in the
//! kernel log) and lets it run. docs/seccomp.md has the lists and how to read a report.
//!
//! Filters stack: a thread keeps the filter of the thread that spawned it. Every filtered kind
//! here is spawned by a thread that has none yet (the main thread filters itself last), so each
//! thread runs under exactly its own list; a later spawner that is already filtered must allow
//! `clone3`, and its child then runs under both lists.

mod filters;
mod trap;

use std::collections::BTreeMap;
use std::sync::{mpsc, OnceLock};

use seccompiler::{BpfProgram, SeccompAction};

/// What a system call outside a thread's list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The process reports the call and dies of SIGSYS.
    On,
    /// The kernel logs the call and lets it run.
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(format!("--seccomp {s}: not on, log or off")),
        }
    }
}

/// The kinds of threads siovmm and its device daemon run; each has its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN and the device emulation its exits reach.
    Vcpu,
    /// siovmm's main thread once the VM runs: the event loop, then the VM's release.
    EventLoop,
    /// Runs the software SIOV device's queues (doorbell workers and the portal poller).
    DeviceWorker,
    /// Injects MSIs that found no free KVM route (KVM_SIGNAL_MSI).
    OverflowInjector,
    /// Writes the guest's console to stdout.
    Console,
    /// Serves the device daemon's ADI sockets (vfio-user).
    DaemonServer,
    /// The device daemon's main thread once its servers run: waits for them.
    DaemonMain,
    /// Serves the HTTP API (`--api-socket`): adds and removes ADIs in the running VM.
    Api,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        Self::Vcpu,
        Self::EventLoop,
        Self::DeviceWorker,
        Self::OverflowInjector,
        Self::Console,
        Self::DaemonServer,
        Self::DaemonMain,
        Self::Api,
    ];

    /// The kind's name in reports and docs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::EventLoop => "event-loop",
            Self::DeviceWorker => "device-worker",
            Self::OverflowInjector => "overflow-injector",
            Self::Console => "console",
            Self::DaemonServer => "daemon-server",
            Self::DaemonMain => "daemon-main",
            Self::Api => "api",
        }
    }

    /// Its position in [`ThreadKind::ALL`] (the declaration order).
    fn index(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why filters could not be set up or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kind's filter did not compile (a bug in the lists).
    #[error("building the {0} thread's seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    /// The kernel refused a filter.
    #[error("installing the {0} thread's seccomp filter")]
    Apply(ThreadKind, #[source] seccompiler::Error),
    /// The kernel has no seccomp filters (CONFIG_SECCOMP_FILTER).
    #[error("this kernel has no seccomp filters (use --seccomp off to run without them)")]
    Unsupported,
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// [`install`] was called before with another mode.
    #[error("seccomp mode already chosen ({0:?})")]
    AlreadyChosen(Mode),
}

/// The process's choice and its compiled filters.
struct Policy {
    mode: Mode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Chooses the process's mode and compiles every kind's filter. Call once, before spawning
/// threads that [`spawn`] or [`enter`] should filter.
pub fn install(mode: Mode) -> Result<(), Error> {
    if let Some(p) = POLICY.get() {
        return if p.mode == mode { Ok(()) } else { Err(Error::AlreadyChosen(p.mode)) };
    }
    let mut programs = BTreeMap::new();
    if mode != Mode::Off {
        // SAFETY: PR_GET_SECCOMP takes no pointer; it fails with EINVAL without seccomp.
        if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
            return Err(Error::Unsupported);
        }
        let mismatch = if mode == Mode::On { SeccompAction::Trap } else { SeccompAction::Log };
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        for kind in ThreadKind::ALL {
            let program = filters::program(kind, mismatch.clone(), pid).map_err(|e| Error::Build(kind, e))?;
            programs.insert(kind, program);
        }
        if mode == Mode::On {
            trap::install_handler().map_err(Error::Handler)?;
        }
        quiet_panics();
    }
    let chosen = POLICY.get_or_init(|| Policy { mode, programs });
    if chosen.mode == mode {
        Ok(())
    } else {
        Err(Error::AlreadyChosen(chosen.mode))
    }
}

/// Reports panics in one line, without a backtrace: resolving one opens the executable and
/// maps its debug information, which no thread's list allows, so with `RUST_BACKTRACE` set a
/// panic the code catches and survives (a device fault in the software device) would
/// otherwise end the process at the first `openat`.
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("thread '{name}' panicked at {at}: {what} (no backtrace under seccomp filters: --seccomp off gives one)");
    }));
}

/// Puts the calling thread under `kind`'s filter (nothing if the mode is off or not chosen).
/// A thread enters once: filters cannot be removed, and a second one would stack.
pub fn enter(kind: ThreadKind) -> Result<(), Error> {
    let Some(policy) = POLICY.get() else { return Ok(()) };
    let Some(program) = policy.programs.get(&kind) else { return Ok(()) };
    trap::set_thread_kind(kind);
    seccompiler::apply_filter(program).map_err(|e| Error::Apply(kind, e))
}

/// Spawns thread `name` running `f` under `kind`'s filter. Returns once the thread has entered
/// its filter, or the error that kept it from doing so (the thread then ends without running
/// `f`).
pub fn spawn<T: Send + 'static>(
    kind: ThreadKind,
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let (tx, rx) = mpsc::sync_channel(1);
    let handle = std::thread::Builder::new().name(name).spawn(move || {
        let entered = enter(kind);
        let ok = entered.is_ok();
        let _ = tx.send(entered);
        if !ok {
            // Ends the thread without a panic message: the spawner reports the error.
            std::panic::resume_unwind(Box::new(()));
        }
        f()
    })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::other(format!("the {kind} thread ended before entering its seccomp filter"))),
    }
}

/// Each thread of process `pid`: its name and "MODE FILTERS" as /proc reports them
/// (`Seccomp`, `Seccomp_filters` of `/proc/PID/task/TID/status`; "2 1" is one filter in
/// filter mode). What the tests of siovmm and its daemon check every thread against.
/// A thread that ends between the directory listing and the read of its status is not
/// listed: it has no filter left to report (a CI run once saw one as a nameless "? ?").
pub fn thread_filters(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        // The name from the status just read, so name and filter belong to one live thread.
        let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("").trim().to_string();
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map_or("?".into(), |v| v.trim().to_string());
        threads.push((name, format!("{} {}", field("Seccomp:"), field("Seccomp_filters:"))));
    }
    threads
}

/// [`thread_filters`] of `pid`, taken again every 10 ms until `settled` holds for it or
/// `timeout` passed (then as it is): threads are named before they enter their filter, so a
/// census taken at once can catch one between the two.
pub fn thread_filters_settled(pid: u32, timeout: std::time::Duration, mut settled: impl FnMut(&[(String, String)]) -> bool) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let census = thread_filters(pid);
        if settled(&census) || std::time::Instant::now() >= deadline {
            return census;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_a_bad_one_is_named() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert_eq!("yes".parse::<Mode>(), Err("--seccomp yes: not on, log or off".to_string()));
    }

    #[test]
    fn every_kind_compiles_under_both_actions() {
        for kind in ThreadKind::ALL {
            for action in [SeccompAction::Trap, SeccompAction::Log] {
                let p = filters::program(kind, action, 1).unwrap_or_else(|e| panic!("{kind}: {e}"));
                assert!(!p.is_empty(), "{kind}");
            }
        }
    }

    #[test]
    fn kinds_have_distinct_names_and_indices() {
        let mut names: Vec<_> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ThreadKind::ALL.len());
        for (i, k) in ThreadKind::ALL.iter().enumerate() {
            assert_eq!(usize::from(k.index()), i);
        }
    }

    #[test]
    fn this_process_s_threads_are_listed_unfiltered() {
        let threads = thread_filters(std::process::id());
        assert!(!threads.is_empty());
        assert!(threads.iter().all(|(_, s)| s == "0 0"), "{threads:?}");
    }

    #[test]
    fn threads_ending_during_a_census_are_left_out() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::spawn(|| ()).join().unwrap();
                }
            })
        };
        for _ in 0..2000 {
            let threads = thread_filters(std::process::id());
            assert!(threads.iter().all(|(n, s)| !n.is_empty() && s == "0 0"), "{threads:?}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().unwrap();
    }
}
