//! `siovmm bench-devd --scale N`: N ADIs of one `siovmm-devd` live at once across KVM VMs
//! (issue 12: "10,000 ADIs live across VMs served by one device daemon, compose time and
//! memory per ADI measured").
//!
//! The daemon serves N ADIs (one MSI-X vector each, 16,384 IMS entries). Each VM is a process
//! of its own, as each siovmm is: this binary again (`bench-devd --scale-child`), which creates
//! a KVM VM as siovmm does (in-kernel irqchip, guest RAM one shared memfd) and gives it as many
//! of the daemon's ADIs as its PCI segment holds (16 root buses of 31 device numbers: a
//! passed-through device takes a device number of its own) through the device manager, exactly
//! as `--vfio-user` and `vm.add-vfio-user` attach them: connect, DMA-map guest RAM, reset, read
//! the config space, place BARs, take the doorbell ioeventfd. No guest runs, so no vector is
//! programmed. The VMs are composed one after another; once all are, the figures: time per
//! ADI, the VMs' resident memory per ADI (growth over composition, summed), the daemon's
//! resident memory per ADI and the descriptors it holds; then every VM releases its ADIs and
//! exits and the daemon's count of open ADIs is checked back at zero.
//!
//! Descriptors: a VM holds two per ADI (the connection and the doorbell it was handed); the
//! daemon holds one per ADI in use (the connection; its listening socket is closed while the
//! ADI is taken, and the client's memfd is closed once mapped) and one doorbell eventfd per 8
//! ADIs of a VM (`--doorbell-share`), so 10,000 ADIs fit a 20,000 open-file limit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch::pci::{PciTopology, DEVICES_PER_BUS, MAX_ROOT_BUSES};
use devices::pci::PciAllocator;
use devices::Bus;
use kvm_ioctls::Kvm;
use vm_memory::GuestMemoryBackend;

use crate::bench::rss_of;
use crate::bench_devd::{spawn_daemon, Daemon};
use crate::config::{BenchDevdOptions, SiovConfig};
use crate::device_manager::{DeviceManager, GuestParts};
use crate::kvm_irq::KvmIrq;
use crate::memslots::MemorySlots;
use crate::vm::{create_vm, pci_root};

/// Guest RAM per VM: nothing runs in it, but the daemon maps it for each ADI's DMA.
const VM_RAM: u64 = 64 << 20;
/// The daemon's descriptors per ADI in use, rounded up: its connection, and an eighth of a
/// doorbell eventfd.
const DAEMON_FDS_PER_ADI: f64 = 1.125;
/// Descriptors the daemon holds besides (epoll, workers' eventfds, status, lock, stdio).
const DAEMON_FDS_BASE: u64 = 256;
/// How long the daemon may take to bind its sockets.
const STARTUP: Duration = Duration::from_secs(60);
/// How long one VM may take to compose its ADIs (496 take under a second on an idle machine).
const COMPOSE_LIMIT: Duration = Duration::from_secs(300);

/// Open file descriptors of process `pid`.
fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The daemon's count of open ADIs (its status file).
fn adis_open(dir: &Path) -> Option<u64> {
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("adis_open "))?.trim().parse().ok()
}

/// The daemon's count of open ADIs once it is `n`, or as it stands after 10 s.
fn wait_for_open(dir: &Path, n: u64) -> Option<u64> {
    let t0 = Instant::now();
    while adis_open(dir) != Some(n) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    adis_open(dir)
}

fn start_daemon(devd: &Path, adis: u32) -> Result<Daemon, String> {
    let args = ["--adis", &adis.to_string(), "--vectors", "1", "--ims-entries", "16384"].map(String::from);
    spawn_daemon(devd, "bench-scale", &args, STARTUP)
}

/// A VM with `sockets` attached through its device manager.
fn vm_with(kvm: &Kvm, sockets: &[PathBuf]) -> Result<DeviceManager, String> {
    let (vm, ram) = create_vm(kvm, VM_RAM, true).map_err(|e| crate::one_line(&e))?;
    let vm = Arc::new(vm);
    let ram_slots = ram.iter().count() as u32;
    let slots = MemorySlots::new(vm.clone(), ram_slots, kvm.get_nr_memslots() as u32).ok_or("no memory slots above RAM")?;
    let shared_ram = ram.shared();
    // The VM lives until its process exits: the daemon maps its memfd.
    let mem = ram.leak();
    let parts = GuestParts {
        mem,
        iommu: None,
        mmio: Arc::new(Bus::new()),
        pio: Arc::new(Bus::new()),
        irq: Arc::new(KvmIrq(vm.clone())),
        vm,
        slots: Arc::new(slots),
        shared_ram,
        vfio_iommu: siovmm_vfio::host::Iommu::Container,
    };
    let topology = PciTopology::new(u32::from(MAX_ROOT_BUSES)).map_err(|e| e.to_string())?;
    let mut devices = DeviceManager::new(parts, SiovConfig::default(), 1, pci_root(), PciAllocator::new(topology));
    for socket in sockets {
        devices.add_vfio_user(socket).map_err(|e| crate::one_line(&e))?;
    }
    Ok(devices)
}

/// One VM's process (`bench-devd --scale-child DIR,FIRST,COUNT`): composes ADIs FIRST..
/// FIRST+COUNT of the daemon serving DIR into a VM, prints `composed MICROS RSS_BEFORE
/// RSS_AFTER`, waits for its standard input to close, releases them, prints `released MICROS`.
pub fn child(dir: &Path, first: u32, count: u32) -> Result<(), String> {
    use std::io::{Read, Write};
    siovmm_vdcm::fd_limit::raise_open_file_limit(u64::from(count) * 2 + 256);
    let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let me = std::process::id();
    let sockets: Vec<PathBuf> = (first..first + count).map(|a| siovmm_devd::socket_path(dir, a)).collect();
    let rss0 = rss_of(me);
    let t0 = Instant::now();
    let mut vm = vm_with(&kvm, &sockets)?;
    let compose = t0.elapsed();
    let mut out = std::io::stdout();
    writeln!(out, "composed {} {rss0} {}", compose.as_micros(), rss_of(me)).and_then(|()| out.flush()).map_err(|e| e.to_string())?;
    // Held until the parent has taken its figures and closes our input.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let t1 = Instant::now();
    vm.release();
    writeln!(out, "released {}", t1.elapsed().as_micros()).map_err(|e| e.to_string())?;
    Ok(())
}

/// A VM's process, composed.
struct VmProcess {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    compose: Duration,
    rss_growth: u64,
}

impl VmProcess {
    /// Starts the process for ADIs `first..first + count` and waits for it to compose them.
    fn compose(dir: &Path, first: u32, count: u32) -> Result<Self, String> {
        use std::io::BufRead;
        let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
        let mut child = std::process::Command::new(exe)
            .arg("bench-devd")
            .arg("--scale-child")
            .arg(format!("{},{first},{count}", dir.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting a VM process: {e}"))?;
        let stdout = child.stdout.take().ok_or("no output from a VM process")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        // Its one line, or nothing once it fails (it says why on stderr, which is ours).
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let line = lines.next();
            let _ = tx.send(());
            (line, lines)
        });
        if rx.recv_timeout(COMPOSE_LIMIT).is_err() {
            // Stuck: killed, which ends its output and the reader.
            let _ = child.kill();
        }
        let (line, lines) = reader.join().map_err(|_| "reading a VM process")?;
        let line = match line {
            Some(Ok(l)) => l,
            _ => {
                let status = child.wait().map_err(|e| e.to_string())?;
                return Err(format!("the VM process for ADIs {first}..{} failed ({status})", first + count));
            }
        };
        let f: Vec<u64> = line.strip_prefix("composed ").unwrap_or_default().split(' ').filter_map(|v| v.parse().ok()).collect();
        let [micros, rss0, rss1] = f[..] else { return Err(format!("a VM process said '{line}'")) };
        Ok(Self { child, lines, compose: Duration::from_micros(micros), rss_growth: rss1.saturating_sub(rss0) })
    }

    /// Has it release its ADIs and exit; returns the time the release took.
    fn release(mut self) -> Result<Duration, String> {
        drop(self.child.stdin.take());
        let line = self.lines.next().and_then(Result::ok).unwrap_or_default();
        let status = self.child.wait().map_err(|e| e.to_string())?;
        let micros = line.strip_prefix("released ").and_then(|m| m.parse().ok()).filter(|_| status.success());
        micros.map(Duration::from_micros).ok_or_else(|| format!("a VM process ended with {status} ('{line}')"))
    }
}

/// Runs the benchmark for `adis` ADIs and prints its figures.
pub fn run(o: &BenchDevdOptions, adis: u32) -> Result<(), String> {
    let devd = crate::bench_devd::devd_path(o)?;
    // The daemon, a child, inherits this limit.
    let wanted = (f64::from(adis) * DAEMON_FDS_PER_ADI) as u64 + DAEMON_FDS_BASE;
    let limit = siovmm_vdcm::fd_limit::raise_open_file_limit(wanted);
    if limit < wanted {
        return Err(format!(
            "{adis} ADIs need about {wanted} open files in the daemon; the limit is {limit} (raise the hard limit: ulimit -Hn, which needs CAP_SYS_RESOURCE)"
        ));
    }
    Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let daemon = start_daemon(&devd, adis)?;
    let pid = daemon.child.id();
    let (daemon_rss0, daemon_fds0) = (rss_of(pid), fds_of(pid));
    let per_vm = u32::from(MAX_ROOT_BUSES) * u32::from(DEVICES_PER_BUS);
    let mut vms = Vec::new();
    let mut first = 0;
    while first < adis {
        let count = per_vm.min(adis - first);
        vms.push(VmProcess::compose(&daemon.dir, first, count)?);
        first += count;
    }
    let compose: Duration = vms.iter().map(|v| v.compose).sum();
    let vm_rss: u64 = vms.iter().map(|v| v.rss_growth).sum();
    let vm_fds: usize = vms.iter().map(|v| fds_of(v.child.id())).sum();
    // The daemon rewrites its status file every second.
    let live = wait_for_open(&daemon.dir, u64::from(adis));
    let (daemon_rss1, daemon_fds1) = (rss_of(pid), fds_of(pid));
    let n = f64::from(adis);
    println!("bench-devd --scale: {adis} ADIs of one siovmm-devd (1 vector each, 16,384 IMS entries) in {} KVM VMs, a process each, up to {per_vm} ADIs per VM", vms.len());
    println!("  live: the daemon counts {} ADIs open", live.map_or("?".into(), |l| l.to_string()));
    println!("  compose (connect, DMA-map guest RAM, reset, config, BARs, doorbell): {:.2} s in all, {:.1} us per ADI", compose.as_secs_f64(), compose.as_secs_f64() * 1e6 / n);
    println!("  VMs: RSS grew {} KiB in all, {:.0} bytes per ADI; {vm_fds} fds in all, {:.2} per ADI", vm_rss >> 10, vm_rss as f64 / n, vm_fds as f64 / n);
    println!(
        "  daemon: RSS {} -> {} KiB, {:.0} bytes per ADI; fds {daemon_fds0} -> {daemon_fds1}, {:.3} per ADI (limit {limit})",
        daemon_rss0 >> 10,
        daemon_rss1 >> 10,
        (daemon_rss1.saturating_sub(daemon_rss0)) as f64 / n,
        daemon_fds1.saturating_sub(daemon_fds0) as f64 / n
    );
    if live != Some(u64::from(adis)) {
        return Err(format!("the daemon counts {live:?} ADIs open, not {adis}"));
    }
    let mut release = Duration::ZERO;
    for vm in vms {
        release += vm.release()?;
    }
    let after = wait_for_open(&daemon.dir, 0);
    println!("  release: {:.2} s in all; the daemon counts {} ADIs open after", release.as_secs_f64(), after.map_or("?".into(), |l| l.to_string()));
    if after != Some(0) {
        return Err(format!("after release the daemon still counts {after:?} ADIs open"));
    }
    Ok(())
}
