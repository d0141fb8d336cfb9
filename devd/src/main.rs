//! `siovmm-devd --socket-dir DIR [--adis N] [--vectors V] [--ims-entries N] [--ims on-device|in-memory] [--workers N]
//! [--doorbell-share N] [--portals doorbell|mapped] [--server-threads N] [--max-adis-per-vm N] [--max-ims-per-vm N] [--seccomp on|log|off]`
//!
//! Serves ADI i of one software SIOV device on `DIR/adi-i.sock` (vfio-user) until killed.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use siovmm_devd::reactor::Reactor;
use siovmm_devd::socket_path;
use siovmm_vfio::siov::{AdiId, ImsStorage, PortalKind, SiovDevice};
use siovmm_vfio::soft::SoftSiovDevice;

const USAGE: &str = "usage: siovmm-devd --socket-dir DIR [--adis N] [--vectors V] [--ims-entries N] [--ims on-device|in-memory]
       [--workers N] [--doorbell-share N] [--portals KIND] [--server-threads N] [--max-adis-per-vm N]
       [--max-ims-per-vm N] [--seccomp MODE]

Serves ADI i of one software SIOV device as a vfio-user device on DIR/adi-i.sock.
  --adis N          ADIs (default 4, at most 16384)
  --vectors V       MSI-X vectors per ADI, each backed by an IMS entry (default 2, 1..=256)
  --ims-entries N   IMS entries of the device (default 16384)
  --ims KIND        where the device keeps IMS: on-device (default) or in-memory
  --workers N       device worker threads (default 2, 1..=64)
  --doorbell-share N  ADIs of one VMM that share a doorbell eventfd (default 8, 1..=64; a ring
                    runs a pass of each of them: fewer open files, a little more work per ring)
  --portals KIND    how a guest rings: doorbell (default: a write KVM turns into an eventfd
                    signal) or mapped (BAR0's doorbell page offered for mmap: a plain store,
                    no exit, watched by a poller thread that scans the open ADIs' pages)
  --server-threads N  threads serving every ADI's socket (default 2, 1..=64)
  --max-adis-per-vm N   ADIs one VMM may hold at a time (default: no limit)
  --max-ims-per-vm N    IMS entries one VMM's ADIs may hold (default: no limit)
  --seccomp MODE    each thread's system calls limited to its kind's list: on (a call outside
                    it stops the daemon, naming the thread and call), log (the kernel logs it)
                    or off (default on; docs/seccomp.md)

DIR/status holds the totals in use (adis_open, ims_entries_in_use, clients), rewritten at
every change, and the device's counters (completed, interrupts, interrupts_pending,
interrupts_dropped, queue_errors, device_faults), rewritten every second. A VMM is told apart by its process ID; when it exits or is killed, its sockets
close and its ADIs and IMS entries go back to the device at once.
";

#[derive(Debug)]
struct Options {
    dir: PathBuf,
    adis: u32,
    vectors: u16,
    ims_entries: u32,
    storage: ImsStorage,
    workers: usize,
    doorbell_share: usize,
    portals: PortalKind,
    server_threads: usize,
    limits: siovmm_devd::pool::Limits,
    seccomp: siovmm_seccomp::Mode,
}

fn number<T: std::str::FromStr + PartialOrd>(flag: &str, value: Option<String>, range: std::ops::RangeInclusive<T>) -> Result<T, String> {
    let value = value.ok_or(format!("{flag} needs a value"))?;
    value.parse::<T>().ok().filter(|n| range.contains(n)).ok_or(format!("{flag} {value}: not a number in the allowed range"))
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut o = Options { dir: PathBuf::new(), adis: 4, vectors: 2, ims_entries: 16384, storage: ImsStorage::OnDevice, workers: 2, doorbell_share: DEFAULT_DOORBELL_SHARE, portals: PortalKind::Doorbell, server_threads: 2, limits: Default::default(), seccomp: siovmm_seccomp::Mode::On };
    let mut dir = None;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--help" | "-h" => return Ok(None),
            "--socket-dir" => dir = Some(PathBuf::from(args.next().ok_or("--socket-dir needs a value")?)),
            "--adis" => o.adis = number(&flag, args.next(), 1..=siovmm_devd::MAX_ADIS)?,
            "--vectors" => o.vectors = number(&flag, args.next(), 1..=256)?,
            "--ims-entries" => o.ims_entries = number(&flag, args.next(), 1..=1 << 20)?,
            "--workers" => o.workers = number(&flag, args.next(), 1..=64)?,
            "--doorbell-share" => o.doorbell_share = number(&flag, args.next(), 1..=64)?,
            "--server-threads" => o.server_threads = number(&flag, args.next(), 1..=64)?,
            "--max-adis-per-vm" => o.limits.adis_per_vm = Some(number(&flag, args.next(), 1..=siovmm_devd::MAX_ADIS)?),
            "--max-ims-per-vm" => o.limits.ims_per_vm = Some(number(&flag, args.next(), 1..=1 << 20)?),
            "--seccomp" => o.seccomp = args.next().ok_or("--seccomp needs a value")?.parse()?,
            "--portals" => {
                let name = args.next();
                o.portals = name.as_deref().and_then(PortalKind::from_name).ok_or(format!(
                    "--portals {}: not doorbell or mapped",
                    name.as_deref().unwrap_or("(nothing)")
                ))?;
            }
            "--ims" => {
                let name = args.next();
                o.storage = name.as_deref().and_then(ImsStorage::from_name).ok_or_else(|| {
                    format!("--ims {}: not on-device or in-memory", name.as_deref().unwrap_or("(nothing)"))
                })?;
            }
            other => return Err(format!("{other}: unknown argument (--help lists them)")),
        }
    }
    let dir = dir.ok_or("--socket-dir is required")?;
    if !dir.is_dir() {
        return Err(format!("--socket-dir {}: not a directory", dir.display()));
    }
    o.dir = dir;
    Ok(Some(o))
}

/// Doorbell eventfds are shared by this many ADIs of one VMM unless `--doorbell-share` says
/// otherwise: a ring then costs at most 7 passes that find nothing, and 10,000 ADIs in use
/// need 1,250 eventfds instead of 10,000 (docs/devd.md).
const DEFAULT_DOORBELL_SHARE: usize = 8;

/// Takes the directory for this daemon: an exclusive lock on `DIR/devd.lock`, held while the
/// daemon lives (the kernel drops it when the process ends, however it ends). A socket file
/// found under the lock was left by a daemon that is gone and is removed. A probe by
/// connecting cannot tell: a socket whose ADI is taken has no listener.
fn take_dir(dir: &std::path::Path) -> Result<std::fs::File, String> {
    let path = dir.join("devd.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => format!("{}: another siovmm-devd serves this directory", dir.display()),
            _ => format!("{}: locking: {e}", path.display()),
        });
    }
    Ok(file)
}

/// Removes a socket file left by a daemon that is gone (the directory's lock is held).
fn clear_stale(path: &std::path::Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{}: removing a stale socket: {e}", path.display())),
        _ => Ok(()),
    }
}

fn run(o: Options) -> Result<(), String> {
    let _lock = take_dir(&o.dir)?;
    // Each ADI holds a listener while free and its connection while taken, and a few of one
    // VMM's share a doorbell eventfd (docs/devd.md).
    let fds = siovmm_vdcm::fd_limit::raise_open_file_limit(0);
    let adis = u64::from(o.adis);
    // In use: each ADI's connection and its share of a doorbell; and a descriptor per vector
    // a guest programs (the eventfd KVM's irqfd waits on).
    let needed = adis + adis.div_ceil(o.doorbell_share as u64) + adis * u64::from(o.vectors) + 64;
    if needed > fds {
        log::warn!("{} ADIs may need {needed} open files when all are in use with every vector programmed; the limit is {fds}", o.adis);
    }
    // Before any thread starts: each enters its kind's filter as it begins (docs/seccomp.md).
    siovmm_seccomp::install(o.seccomp).map_err(|e| format!("--seccomp: {e}"))?;
    let soft = SoftSiovDevice::with_portals(o.adis, o.ims_entries, o.storage, o.workers, o.portals).map_err(|e| format!("creating the device: {e}"))?;
    let soft = Arc::new(soft.share_doorbells(o.doorbell_share));
    let device: Arc<dyn SiovDevice> = soft.clone();
    let needed = u64::from(o.adis) * u64::from(o.vectors);
    if needed > u64::from(device.info().ims_entries) {
        log::warn!("{} ADIs x {} vectors need {needed} IMS entries; the device has {}: ADIs past them wait for a free group", o.adis, o.vectors, device.info().ims_entries);
    }
    let mut listeners = Vec::new();
    for adi in 0..o.adis {
        let path = socket_path(&o.dir, adi);
        clear_stale(&path)?;
        let listener = std::os::unix::net::UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        listeners.push((AdiId(adi), listener));
    }
    // Every socket listens (a client connecting now waits in its backlog until the reactor
    // takes it): the status file, naming this daemon's PID, is written first now and says so
    // (docs/devd.md, "Ready").
    let pool = Arc::new(siovmm_devd::pool::Pool::new(o.limits, Some(o.dir.join("status"))).with_counters(Box::new(move || format!("{}portal_rings {}\n", soft.stats().lines(), soft.portal_rings()))));
    let reactor = Reactor::start(listeners, device, o.vectors, pool.clone(), o.server_threads).map_err(|e| format!("starting the server: {e}"))?;
    eprintln!("siovmm-devd: serving {} ADIs on {}/adi-N.sock with {} threads", o.adis, o.dir.display(), reactor.threads());
    siovmm_seccomp::enter(siovmm_seccomp::ThreadKind::DaemonMain).map_err(|e| format!("--seccomp: {e}"))?;
    // The device's counters move on their own: the status file follows them every second.
    while reactor.serving() {
        std::thread::sleep(std::time::Duration::from_secs(1));
        pool.refresh();
    }
    Err(format!("the server stopped: {}", reactor.join()))
}

/// Log lines to stderr as `siovmm-devd: LEVEL: message` (level from `SIOVMM_LOG`, default warn).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        // The crate logs every client hang-up as an error-level line of its own; ours say it.
        if self.enabled(r.metadata()) && r.target().starts_with("siovmm") {
            eprintln!("siovmm-devd: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    let level = std::env::var("SIOVMM_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(level);
    }
    match parse(std::env::args().skip(1)) {
        Ok(None) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(o)) => match run(o) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("siovmm-devd: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("siovmm-devd: {e}");
            ExitCode::from(2)
        }
    }
}
