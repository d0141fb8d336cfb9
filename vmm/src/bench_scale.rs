//! `siovmm bench-devd --scale N`: N ADIs of one `siovmm-devd` live at once across KVM VMs in
//! this process (issue 12: "10,000 ADIs live across VMs served by one device daemon, compose
//! time and memory per ADI measured").
//!
//! The daemon serves N ADIs (one MSI-X vector each, 16,384 IMS entries); the bench creates VMs
//! as siovmm does (KVM VM, in-kernel irqchip, guest RAM one shared memfd) and gives each VM as
//! many of the daemon's ADIs as its PCI segment holds (16 root buses of 31 device numbers: a
//! passed-through device takes a device number of its own) through the device manager, exactly as
//! `--vfio-user` and `vm.add-vfio-user` attach them: connect, DMA-map guest RAM, reset, read
//! the config space, place BARs, take the doorbell ioeventfd. No guest runs, so no vector is
//! programmed. Printed: time per ADI, this process's resident memory per ADI, the daemon's
//! resident memory per ADI (both as growth over the composition) and the file descriptors
//! each side holds; then everything is released and the daemon's count of open ADIs checked
//! back at zero.
//!
//! Every ADI holds descriptors on both sides (the daemon: its listener, the connection, the
//! doorbell eventfd and guest RAM's memfd; siovmm: the connection and the doorbell), so the
//! bench raises its open-file limits first (the daemon, a child, inherits them); the hard
//! limit only with CAP_SYS_RESOURCE. On a machine whose hard limit is 20,000 that caps N at
//! about 4,900 (docs/devd.md).

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
use crate::vm::{create_vm, pci_root, raise_fd_limit_to};

/// Guest RAM per VM: nothing runs in it, but the daemon maps it for each ADI's DMA.
const VM_RAM: u64 = 64 << 20;
/// File descriptors per ADI on the daemon's side, the larger: its listener, and while a client
/// has the ADI the connection, the doorbell eventfd and the client's guest RAM memfd (siovmm
/// holds two: the connection and the doorbell).
const FDS_PER_ADI: u64 = 4;
/// How long the daemon may take to bind its sockets.
const STARTUP: Duration = Duration::from_secs(60);

/// Open file descriptors of process `pid`.
fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The daemon's count of ADIs open (its status file).
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
    // Serving once the last socket exists and the status file has been written.
    spawn_daemon(devd, "bench-scale", &args, STARTUP, |dir| siovmm_devd::socket_path(dir, adis - 1).exists() && adis_open(dir).is_some())
}

/// A VM with `sockets` attached through its device manager.
fn vm_with(kvm: &Kvm, sockets: &[PathBuf]) -> Result<DeviceManager, String> {
    let (vm, ram) = create_vm(kvm, VM_RAM, true).map_err(|e| crate::one_line(&e))?;
    let vm = Arc::new(vm);
    let ram_slots = ram.iter().count() as u32;
    let slots = MemorySlots::new(vm.clone(), ram_slots, kvm.get_nr_memslots() as u32).ok_or("no memory slots above RAM")?;
    let shared_ram = ram.shared();
    // The VMs live until the process exits: the daemon maps their memfds.
    let mem = ram.leak();
    let parts = GuestParts {
        mem,
        iommu: None,
        mmio: Arc::new(Bus::new()),
        irq: Arc::new(KvmIrq(vm.clone())),
        vm,
        slots: Arc::new(slots),
        shared_ram,
    };
    let topology = PciTopology::new(u32::from(MAX_ROOT_BUSES)).map_err(|e| e.to_string())?;
    let mut devices = DeviceManager::new(parts, SiovConfig::default(), 1, pci_root(), PciAllocator::new(topology));
    for socket in sockets {
        devices.add_vfio_user(socket).map_err(|e| crate::one_line(&e))?;
    }
    Ok(devices)
}

/// Runs the benchmark for `adis` ADIs and prints its figures.
pub fn run(o: &BenchDevdOptions, adis: u32) -> Result<(), String> {
    let devd = crate::bench_devd::devd_path(o)?;
    let wanted = u64::from(adis) * FDS_PER_ADI + 256;
    let limit = raise_fd_limit_to(wanted);
    if limit < wanted {
        return Err(format!(
            "{adis} ADIs need about {wanted} open files in the daemon; the limit is {limit} (raise the hard limit: ulimit -Hn, which needs CAP_SYS_RESOURCE)"
        ));
    }
    let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let daemon = start_daemon(&devd, adis)?;
    let pid = daemon.child.id();
    let me = std::process::id();
    let (daemon_rss0, daemon_fds0, rss0, fds0) = (rss_of(pid), fds_of(pid), rss_of(me), fds_of(me));
    let sockets: Vec<PathBuf> = (0..adis).map(|a| siovmm_devd::socket_path(&daemon.dir, a)).collect();
    let per_vm = usize::from(MAX_ROOT_BUSES) * usize::from(DEVICES_PER_BUS);
    let t0 = Instant::now();
    let mut vms = Vec::new();
    for chunk in sockets.chunks(per_vm) {
        vms.push(vm_with(&kvm, chunk)?);
    }
    let compose = t0.elapsed();
    // The daemon rewrites its status file every second.
    let live = wait_for_open(&daemon.dir, u64::from(adis));
    let (daemon_rss1, daemon_fds1, rss1, fds1) = (rss_of(pid), fds_of(pid), rss_of(me), fds_of(me));
    let n = f64::from(adis);
    println!("bench-devd --scale: {adis} ADIs of one siovmm-devd (1 vector each, 16,384 IMS entries) in {} KVM VMs of this process, {per_vm} each", vms.len());
    println!("  live: the daemon counts {} ADIs open", live.map_or("?".into(), |l| l.to_string()));
    println!("  compose (connect, DMA-map guest RAM, reset, config, BARs, doorbell): {:.2} s in all, {:.1} us per ADI", compose.as_secs_f64(), compose.as_secs_f64() * 1e6 / n);
    println!("  siovmm: RSS {} -> {} KiB, {:.0} bytes per ADI; fds {fds0} -> {fds1}", rss0 >> 10, rss1 >> 10, (rss1.saturating_sub(rss0)) as f64 / n);
    println!("  daemon: RSS {} -> {} KiB, {:.0} bytes per ADI; fds {daemon_fds0} -> {daemon_fds1}", daemon_rss0 >> 10, daemon_rss1 >> 10, (daemon_rss1.saturating_sub(daemon_rss0)) as f64 / n);
    if live != Some(u64::from(adis)) {
        return Err(format!("the daemon counts {live:?} ADIs open, not {adis}"));
    }
    let t1 = Instant::now();
    for vm in &mut vms {
        vm.release();
    }
    let release = t1.elapsed();
    let after = wait_for_open(&daemon.dir, 0);
    println!("  release: {:.2} s in all; the daemon counts {} ADIs open after", release.as_secs_f64(), after.map_or("?".into(), |l| l.to_string()));
    if after != Some(0) {
        return Err(format!("after release the daemon still counts {after:?} ADIs open"));
    }
    Ok(())
}
