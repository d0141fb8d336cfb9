//! `siovmm bench-devd`: the device daemon's fast path against the same device in siovmm's own
//! process, measured in one run (issue 11's "fast paths kept"). No guest and no KVM: the bench
//! plays both the guest and the VMM, so it runs on any machine of this kind.
//!
//! Two rigs, one ADI each, the same software device code (`siovmm_vfio::soft`, two worker
//! threads) and the same descriptors:
//! - **in-process**: the device inside this process, as `--adi N` runs it; the doorbell and the
//!   completion interrupt are the device's own eventfds;
//! - **daemon**: a `siovmm-devd` child serving the ADI over vfio-user, set up exactly as siovmm
//!   sets up a `--vfio-user` device: RAM one memfd DMA-mapped to the daemon, queue registers
//!   written through region writes, the completion vector's eventfd handed over with SET_IRQS,
//!   the doorbell the ioeventfd the daemon offers (GET_REGION_IO_FDS).
//!
//! In a guest, KVM writes the doorbell eventfd (ioeventfd) and reads the interrupt eventfd
//! (irqfd); here this thread does. Both paths then cross exactly what they cross in a guest,
//! minus KVM, which is the same for both. Figures, per rig, interleaved round by round and
//! reported as medians with the ratio daemon / in-process:
//! 1. doorbell → completion record, polled (the submitter spins on the status byte);
//! 2. doorbell → completion interrupt (the eventfd becomes readable);
//! 3. interrupt rate: one doorbell for a batch of descriptors with interrupts, signals per
//!    second until the last arrives.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use siovmm_vdcm::adi::{reg, DOORBELL};
use siovmm_vfio::dma::GuestRam as DmaRam;
use siovmm_vfio::pci::VfioBackend;
use siovmm_vfio::siov::{AdiId, HandleTarget, ImsStorage, QueueConfig, SiovDevice};
use siovmm_vfio::soft::descriptor::{flags, opcode, status, Descriptor, COMPLETION_SIZE};
use siovmm_vfio::soft::{SoftSiovDevice, RING_OFFSET};
use siovmm_vfio::user::UserDevice;
use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::config::BenchDevdOptions;
use crate::memory;

const RAM: u64 = 4 << 20;
const QUEUE: u64 = 0x1_0000;
const QUEUE_SIZE: u32 = 4096;
const RECORD: u64 = 0x20_0000;
/// Worker threads of the device on each side (the daemon's default).
const WORKERS: usize = 2;
/// How long one descriptor or interrupt may take before the bench gives up on a rig.
const STALL: Duration = Duration::from_secs(5);

/// One ADI ready for submissions: its guest memory, doorbell and completion eventfd.
struct Rig {
    name: &'static str,
    mem: GuestMemoryMmap,
    doorbell: EventFd,
    irq: EventFd,
    tail: u32,
}

impl Rig {
    /// Queues `d` (not yet rung).
    fn queue(&mut self, d: &Descriptor) -> Result<(), String> {
        let slot = u64::from(self.tail % QUEUE_SIZE);
        self.mem.write_slice(&d.encode(), GuestAddress(QUEUE + RING_OFFSET + slot * 64)).map_err(|e| e.to_string())?;
        self.tail = self.tail.wrapping_add(1);
        self.mem.write_obj(self.tail, GuestAddress(QUEUE)).map_err(|e| e.to_string())
    }

    fn ring(&self) -> Result<(), String> {
        self.doorbell.write(1).map_err(|e| format!("{}: doorbell: {e}", self.name))
    }

    /// Waits until the interrupt eventfd has counted `n` signals in all.
    fn wait_irqs(&self, n: u64) -> Result<(), String> {
        self.wait_irqs_within(n, STALL)
    }

    /// [`Rig::wait_irqs`], giving up after `stall` without one.
    fn wait_irqs_within(&self, n: u64, stall: Duration) -> Result<(), String> {
        let mut seen = 0;
        while seen < n {
            let mut p = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&self.irq), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut p, 1, stall.as_millis() as i32) };
            if r <= 0 {
                return Err(format!("{}: {seen} of {n} interrupts arrived within {stall:?}", self.name));
            }
            seen += self.irq.read().unwrap_or(0);
        }
        Ok(())
    }

    /// Mean doorbell → completion record, polled, over `n` NOOPs.
    fn polled(&mut self, n: u32) -> Result<Duration, String> {
        let d = Descriptor { opcode: opcode::NOOP, flags: flags::CRAV | flags::RCR, completion_addr: RECORD, ..Default::default() };
        let mut total = Duration::ZERO;
        for _ in 0..n {
            self.mem.write_slice(&[0u8; COMPLETION_SIZE], GuestAddress(RECORD)).map_err(|e| e.to_string())?;
            self.queue(&d)?;
            let t0 = Instant::now();
            self.ring()?;
            loop {
                let s: u8 = self.mem.read_obj(GuestAddress(RECORD)).map_err(|e| e.to_string())?;
                if s != status::NONE {
                    break;
                }
                if t0.elapsed() > STALL {
                    return Err(format!("{}: a NOOP did not complete within {STALL:?}", self.name));
                }
                std::hint::spin_loop();
            }
            total += t0.elapsed();
        }
        Ok(total / n)
    }

    /// Mean doorbell → interrupt over `n` NOOPs with completion interrupts (handle 1).
    fn until_interrupt(&mut self, n: u32) -> Result<Duration, String> {
        self.until_interrupt_within(n, STALL)
    }

    /// [`Rig::until_interrupt`], a NOOP lost once its interrupt has not come within `stall`.
    fn until_interrupt_within(&mut self, n: u32, stall: Duration) -> Result<Duration, String> {
        let d = Descriptor { opcode: opcode::NOOP, flags: flags::RCI, int_handle: 1, ..Default::default() };
        let mut total = Duration::ZERO;
        for _ in 0..n {
            self.queue(&d)?;
            let t0 = Instant::now();
            self.ring()?;
            self.wait_irqs_within(1, stall)?;
            total += t0.elapsed();
        }
        Ok(total / n)
    }

    /// Interrupts per second: `n` NOOPs with interrupts, one doorbell.
    fn rate(&mut self, n: u32) -> Result<f64, String> {
        let d = Descriptor { opcode: opcode::NOOP, flags: flags::RCI, int_handle: 1, ..Default::default() };
        for _ in 0..n {
            self.queue(&d)?;
        }
        let t0 = Instant::now();
        self.ring()?;
        self.wait_irqs(u64::from(n))?;
        Ok(f64::from(n) / t0.elapsed().as_secs_f64())
    }
}

/// The in-process rig: the software device in this process.
fn in_process() -> Result<(Rig, Arc<SoftSiovDevice>), String> {
    let device = Arc::new(SoftSiovDevice::new(1, 64, ImsStorage::OnDevice, WORKERS).map_err(|e| format!("software device: {e}"))?);
    let mem = memory::create(&[(0, RAM)]).map_err(|e| e.to_string())?.leak();
    let dma = device.dma_bind(Arc::new(DmaRam(mem.clone()))).map_err(|e| e.to_string())?;
    let portal = device.open_adi(AdiId(0), dma).map_err(|e| e.to_string())?;
    let doorbell = portal.doorbell();
    let ims = device.ims_alloc(AdiId(0), 2).map_err(|e| e.to_string())?;
    let irq = EventFd::new(0).map_err(|e| e.to_string())?;
    let cq = ims.first + 1;
    device.ims_bind(AdiId(0), cq, Some(Arc::new(irq.try_clone().map_err(|e| e.to_string())?))).map_err(|e| e.to_string())?;
    device.ims_set_mask(AdiId(0), cq, false).map_err(|e| e.to_string())?;
    let handles = [Some(HandleTarget::Entry(ims.first)), Some(HandleTarget::Entry(cq))];
    device.set_interrupt_handles(AdiId(0), &handles).map_err(|e| e.to_string())?;
    device.configure_queue(AdiId(0), Some(QueueConfig { base: QUEUE, size: QUEUE_SIZE })).map_err(|e| e.to_string())?;
    let doorbell = doorbell.try_clone().map_err(|e| e.to_string())?;
    Ok((Rig { name: "in-process", mem, doorbell, irq, tail: 0 }, device))
}

/// The daemon and its socket directory, removed when dropped.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where `siovmm-devd` is: `--devd`, else next to this executable.
pub(crate) fn devd_path(o: &BenchDevdOptions) -> Result<PathBuf, String> {
    if let Some(p) = &o.devd {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding siovmm's own path: {e}"))?;
    let p = exe.with_file_name("siovmm-devd");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} not found: build it (cargo build --release -p siovmm-devd) or pass --devd PATH", p.display()))
    }
}

/// Starts `devd` with `args` on a fresh socket directory (`siovmm-<what>-PID` in the temporary
/// directory) and waits up to `within` until it serves (`siovmm_devd::serving`).
pub(crate) fn spawn_daemon(devd: &Path, what: &str, args: &[String], within: Duration) -> Result<Daemon, String> {
    let dir = std::env::temp_dir().join(format!("siovmm-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Its messages go to a file in its directory, shown if it fails to start.
    let log = dir.join("devd.log");
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(devd)
        .arg("--socket-dir")
        .arg(&dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", devd.display()))?;
    let daemon = Daemon { child, dir };
    let t0 = Instant::now();
    while !siovmm_devd::serving(&daemon.dir, daemon.child.id()) {
        if t0.elapsed() > within {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("{} did not start serving within {within:?}: {}", devd.display(), said.trim()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(daemon)
}

fn start_daemon(devd: &Path) -> Result<(Daemon, PathBuf), String> {
    let args = ["--adis", "1", "--vectors", "2", "--ims-entries", "64", "--workers", &WORKERS.to_string()].map(String::from);
    let daemon = spawn_daemon(devd, "bench-devd", &args, STALL)?;
    let socket = siovmm_devd::socket_path(&daemon.dir, 0);
    Ok((daemon, socket))
}

/// The daemon rig: the ADI over vfio-user, set up as siovmm sets up `--vfio-user`.
fn daemon(devd: &Path) -> Result<(Rig, Daemon, UserDevice), String> {
    let (daemon, socket) = start_daemon(devd)?;
    let (rig, adi) = connect_rig(&socket)?;
    Ok((rig, daemon, adi))
}

/// The ADI served at `socket`, set up as siovmm sets up `--vfio-user`: guest RAM one memfd
/// DMA-mapped, the queue enabled by region writes, vector 1's eventfd by SET_IRQS, the
/// doorbell the offered ioeventfd.
fn connect_rig(socket: &Path) -> Result<(Rig, UserDevice), String> {
    let ram = memory::create_shared(&[(0, RAM)]).map_err(|e| e.to_string())?;
    let shared = ram.shared().ok_or("shared RAM without its memfd")?;
    let adi = UserDevice::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    for r in &shared.regions {
        adi.dma_map(r.guest, r.size, std::os::fd::AsRawFd::as_raw_fd(shared.file.as_ref()), r.offset)
            .map_err(|e| format!("DMA_MAP: {e}"))?;
    }
    let bar0 = VFIO_PCI_BAR0_REGION_INDEX;
    adi.region_write(bar0, reg::QUEUE_BASE_LO, &(QUEUE as u32).to_le_bytes());
    adi.region_write(bar0, reg::QUEUE_BASE_HI, &((QUEUE >> 32) as u32).to_le_bytes());
    adi.region_write(bar0, reg::QUEUE_SIZE, &QUEUE_SIZE.to_le_bytes());
    adi.region_write(bar0, reg::CONTROL, &1u32.to_le_bytes());
    let mut st = [0u8; 4];
    adi.region_read(bar0, reg::STATUS, &mut st);
    if u32::from_le_bytes(st) & 1 == 0 {
        return Err(format!("the daemon's ADI did not enable its queue (status {:#x})", u32::from_le_bytes(st)));
    }
    let misc = EventFd::new(0).map_err(|e| e.to_string())?;
    let irq = EventFd::new(0).map_err(|e| e.to_string())?;
    adi.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[&misc, &irq]).map_err(|e| format!("SET_IRQS: {e}"))?;
    let doorbell = adi
        .io_eventfds(bar0)
        .map_err(|e| format!("GET_REGION_IO_FDS: {e}"))?
        .into_iter()
        .find(|f| f.offset == DOORBELL)
        .ok_or("the daemon offered no doorbell ioeventfd")?
        .fd;
    let mem = ram.leak();
    Ok((Rig { name: "daemon", mem, doorbell, irq, tail: 0 }, adi))
}

/// `bench-devd --probe SOCKET --seconds S`: takes the ADI a running daemon serves at SOCKET as
/// a VMM with no guest would (`connect_rig`) and, for S seconds, submits NOOPs one at a time,
/// each waited for by its completion interrupt, 20 a second. A line per second says how many
/// completed and the slowest; the first that does not complete within 10 s ends the probe
/// with an error. What another VM's ADI sees while something else uses the same device
/// (tests/tests/hostile.rs runs it beside a hostile guest).
pub fn probe(socket: &Path, seconds: u32) -> Result<(), String> {
    use std::io::Write;
    let (mut rig, _adi) = connect_rig(socket)?;
    let (t0, mut done, mut slowest) = (Instant::now(), 0u64, Duration::ZERO);
    let mut last_report = 0;
    while t0.elapsed() < Duration::from_secs(u64::from(seconds)) {
        let took = rig.until_interrupt_within(1, PROBE_STALL).map_err(|e| format!("probe: after {done} NOOPs: {e}"))?;
        slowest = slowest.max(took);
        done += 1;
        let now = t0.elapsed().as_secs();
        if now > last_report {
            last_report = now;
            println!("probe: {now} s: {done} NOOPs completed with their interrupts, slowest {:.1} ms", slowest.as_secs_f64() * 1e3);
            let _ = std::io::stdout().flush();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("probe: done: {done} NOOPs in {seconds} s, every one completed, slowest {:.1} ms", slowest.as_secs_f64() * 1e3);
    Ok(())
}

/// How long a probe's NOOP may take before it counts as lost.
const PROBE_STALL: Duration = Duration::from_secs(10);

pub(crate) fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs the benchmark and prints its figures.
pub fn run(o: &BenchDevdOptions) -> Result<(), String> {
    let devd = devd_path(o)?;
    let (mut local, _device) = in_process()?;
    let (mut remote, _daemon, _adi) = daemon(&devd)?;
    let batch = o.descriptors.min(QUEUE_SIZE - 1);
    println!(
        "bench-devd: {} rounds; per round and rig {} polled NOOPs, {} NOOPs each waited for its interrupt, \
         one batch of {batch} with interrupts; {WORKERS} device workers each side",
        o.rounds, o.descriptors, o.descriptors
    );
    let mut figures: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..o.rounds {
        // Alternate which rig goes first, so a drift in the machine's load hits both alike.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let rig = if i == 0 { &mut local } else { &mut remote };
            let polled = micros(rig.polled(o.descriptors)?);
            let irq = micros(rig.until_interrupt(o.descriptors)?);
            let rate = rig.rate(batch)?;
            println!("  round {round} {:>10}: polled {polled:8.2} us, to interrupt {irq:8.2} us, {rate:10.0} interrupts/s", rig.name);
            figures[i].push((polled, irq, rate));
        }
    }
    let m = |i: usize, f: fn(&(f64, f64, f64)) -> f64| median(figures[i].iter().map(f).collect());
    let row = |what: &str, unit: &str, f: fn(&(f64, f64, f64)) -> f64, goal: &str| {
        let (a, b) = (m(0, f), m(1, f));
        let digits = if unit == "us" { 2 } else { 0 };
        println!("{what:<33} in-process {a:10.digits$} {unit}, daemon {b:10.digits$} {unit}, daemon/in-process {:.2} ({goal})", b / a);
    };
    println!("medians over {} rounds:", o.rounds);
    row("doorbell -> completion record", "us", |f| f.0, "goal <= 1.1");
    row("doorbell -> completion interrupt", "us", |f| f.1, "goal <= 1.1");
    row("interrupt rate", "/s", |f| f.2, "goal >= 0.9");
    Ok(())
}
