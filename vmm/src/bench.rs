//! `siovmm bench-siov`: scale and interrupt-delivery figures, no guest boot.
//!
//! 1. **Compose**: one software SIOV device with `--adis` ADIs (default 10,000) and `--ims`
//!    IMS entries (default 16,384); its ADIs composed into as many VMs as needed (248 per VM:
//!    bus 0), each VM a real KVM VM with an in-kernel irqchip and one vCPU. Prints the time per
//!    ADI and the VMM's resident memory per ADI (RSS growth over the composition; guest RAM is
//!    mapped but untouched; KVM's kernel-side memory is not in RSS).
//! 2. **Delivery**: on `--rate-adis` ADIs the bench acts as the guest: enables MSI-X, programs
//!    and unmasks vector 0 (a KVM MSI route + irqfd), sets up a queue, and submits
//!    `--per-adi` NOOP descriptors with completion interrupts, then rings each doorbell. The
//!    device's workers run them and fire the IMS entries; the figure is interrupts/s from the
//!    first doorbell to the last delivery. The **baselines**, in the same process, write the
//!    same eventfds directly (raw irqfd signalling) as many times, from one thread and from as
//!    many threads as the device has workers. Seven rounds, each timing the device and then the
//!    baselines; medians and their ratios printed.
//! 3. **Routing**: 4,096 vectors bound one at a time on a fresh VM (as a guest programs them;
//!    4,056 get KVM routes, the rest the overflow path) until KVM holds every route, against
//!    the same vectors bound in one batch (one commit: the floor), and against what a commit
//!    per change costs KVM (the table written n times, growing: the router's old behaviour).
//!    Also at 1,024 vectors, so the time per vector shows whether the work grows linearly.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::pci::PciFunction;
use devices::{Bus, BusDevice};
use kvm_ioctls::Kvm;
use siovmm_vfio::siov::ImsStorage;
use siovmm_vfio::soft::descriptor::{flags, opcode, Descriptor};
use siovmm_vfio::soft::{SoftSiovDevice, RING_OFFSET};
use vm_memory::{Bytes, GuestAddress};

use crate::bench_devd::median;
use crate::config::BenchOptions;
use siovmm_vdcm::adi::{reg, MSIX_TABLE};
use crate::kvm_irq::KvmIrq;
use siovmm_interrupts::router::{MsiRouter, MAX_MSI_ROUTES};
use arch::pci::FUNCTIONS_PER_BUS;
use devices::pci::PciAllocator;
use siovmm_vdcm::{AdiOptions, AdiRequest, GuestSide, Vdcm};
use crate::vm::{create_vm, pci_root, raise_fd_limit};

/// `VmRSS` of process `pid` in bytes (0 if it cannot be read).
pub(crate) fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn rss_bytes() -> u64 {
    rss_of(std::process::id())
}

struct Guest {
    mem: vm_memory::GuestMemoryMmap,
    vdcm: Vdcm,
    router: Arc<MsiRouter>,
    _vcpu: kvm_ioctls::VcpuFd,
    _mmio: Arc<Bus>,
}

const QUEUE_SIZE: u32 = 4096;
/// The software device's worker threads, and the baseline's writer threads.
const DEVICE_WORKERS: usize = 2;
/// Delivery rounds, the device path and the baseline alternating (medians are printed).
const DELIVERY_ROUNDS: u32 = 7;
const QUEUE_STRIDE: u64 = 0x41000; // 64 + 4096 × 64, page-rounded
const QUEUE_AREA: u64 = 0x10_0000;

/// Runs the benchmark and prints its figures.
pub fn run(o: &BenchOptions) -> Result<(), String> {
    raise_fd_limit();
    let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let device = Arc::new(
        SoftSiovDevice::new(o.adis, o.ims, ImsStorage::OnDevice, DEVICE_WORKERS).map_err(|e| format!("software device: {e}"))?,
    );
    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let mut guests = Vec::new();
    let mut first = 0;
    while first < o.adis {
        // One root bus's worth per VM: the bench measures composition, not topology.
        let count = FUNCTIONS_PER_BUS.min(o.adis - first);
        let mem_size = QUEUE_AREA + u64::from(FUNCTIONS_PER_BUS) * QUEUE_STRIDE + (1 << 20);
        let (vm, mem) = create_vm(&kvm, mem_size.next_multiple_of(2 << 20), false).map_err(|e| crate::one_line(&e))?;
        // The VMs live until the process exits; the shared device keeps DMA handles on them.
        let mem = mem.leak();
        let vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let vm = Arc::new(vm);
        let mmio = Arc::new(Bus::new());
        let root = pci_root();
        let irq = Arc::new(KvmIrq(vm));
        let router = Arc::new(MsiRouter::new(irq.clone(), MAX_MSI_ROUTES).map_err(|e| e.to_string())?);
        let options = AdiOptions { vectors: 1, ims_trap: false, vcpus: 1 };
        let req = AdiRequest { first_adi: first, count, options };
        let guest = GuestSide {
            mem: mem.clone(),
            iommu: None,
            mmio: mmio.clone(),
            doorbells: irq,
            portals: None,
            router: router.clone(),
            pci: root,
            adis: Default::default(),
            ims_opt_in: Default::default(),
            ims_quota: Default::default(),
        };
        let mut slots = PciAllocator::new(Default::default());
        let vdcm = Vdcm::compose(guest, &mut slots, device.clone(), req).map_err(|e| e.to_string())?;
        guests.push(Guest { mem, vdcm, router, _vcpu: vcpu, _mmio: mmio });
        first += count;
    }
    let compose = t0.elapsed();
    let rss = rss_bytes().saturating_sub(rss0);
    println!(
        "compose: {} ADIs into {} VMs, {} IMS entries on the device: {:.1} ms total, {:.1} µs per ADI",
        o.adis,
        guests.len(),
        o.ims,
        compose.as_secs_f64() * 1000.0,
        compose.as_secs_f64() * 1e6 / f64::from(o.adis)
    );
    println!("memory: VMM resident set grew {:.1} MiB: {:.0} bytes per ADI", rss as f64 / (1 << 20) as f64, rss as f64 / f64::from(o.adis));

    // Delivery: act as the guest on the first `rate_adis` ADIs.
    let mut fds = Vec::new();
    let mut doorbells: Vec<(Arc<Mutex<siovmm_vdcm::adi::AdiFunction>>, vm_memory::GuestMemoryMmap, u64)> = Vec::new();
    'outer: for g in &guests {
        for (i, f) in g.vdcm.functions().iter().enumerate() {
            if fds.len() as u32 == o.rate_adis {
                break 'outer;
            }
            let mut func = lock(f);
            func.config_write(0x40 / 4, 2, &0x8000u16.to_le_bytes()); // MSI-X enable
            func.write(MSIX_TABLE, &0xfee0_0000u64.to_le_bytes());
            func.write(MSIX_TABLE + 8, &(0x30 + (i as u32 % 200)).to_le_bytes());
            func.write(MSIX_TABLE + 12, &0u32.to_le_bytes()); // unmask
            let queue = QUEUE_AREA + i as u64 * QUEUE_STRIDE;
            func.write(reg::QUEUE_BASE_LO, &(queue as u32).to_le_bytes());
            func.write(reg::QUEUE_BASE_HI, &((queue >> 32) as u32).to_le_bytes());
            func.write(reg::QUEUE_SIZE, &QUEUE_SIZE.to_le_bytes());
            func.write(reg::CONTROL, &1u32.to_le_bytes());
            let fd = func.vector_eventfd(0).ok_or("vector 0 has no eventfd after programming")?;
            fds.push(fd);
            let d = Descriptor { opcode: opcode::NOOP, flags: flags::RCI, int_handle: 0, ..Default::default() }.encode();
            // Every slot: the rounds go round the ring.
            for k in 0..QUEUE_SIZE {
                let slot = u64::from(k % QUEUE_SIZE);
                g.mem.write_slice(&d, GuestAddress(queue + RING_OFFSET + slot * 64)).map_err(|e| e.to_string())?;
            }
            drop(func);
            doorbells.push((f.clone(), g.mem.clone(), queue));
        }
    }
    // The guest's routes in KVM before the clock starts (the router commits them shortly after
    // the last change; until then the overflow injector delivers them).
    for g in &guests {
        g.router.settle().map_err(|e| format!("committing the routes: {e}"))?;
    }
    let total = u64::from(o.per_adi) * doorbells.len() as u64;
    let (mut device_rates, mut raw_one, mut raw_many) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..DELIVERY_ROUNDS {
        // The device path: each ADI's next `per_adi` NOOPs published and rung; timed from the
        // first doorbell to the last delivery. This thread sleeps while it waits: spinning, it
        // would take a core from the workers it is timing.
        let delivered0 = device.stats().interrupts.load(Ordering::Relaxed);
        let tail = o.per_adi.wrapping_mul(round + 1);
        let t1 = Instant::now();
        for (f, mem, queue) in &doorbells {
            mem.write_obj(tail, GuestAddress(*queue)).map_err(|e| e.to_string())?; // publish the tail
            lock(f).write(siovmm_vdcm::adi::DOORBELL, &1u32.to_le_bytes());
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while device.stats().interrupts.load(Ordering::Relaxed) - delivered0 < total {
            if Instant::now() > deadline {
                return Err("device path: not every interrupt was delivered within 120 s".into());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        device_rates.push(total as f64 / t1.elapsed().as_secs_f64());
        // Baselines: the same eventfds written directly, as many times, by one thread (the
        // figure issue 12 quotes) and by as many threads as the device has workers, each its
        // share of the ADIs as each worker has (per-thread parity).
        raw_one.push(raw_writes(&fds, o.per_adi, 1)?);
        raw_many.push(raw_writes(&fds, o.per_adi, DEVICE_WORKERS)?);
    }
    let ratios = |raw: &[f64]| device_rates.iter().zip(raw).map(|(d, r)| format!("{:.2}", d / r)).collect::<Vec<_>>().join(" ");
    let (one_ratios, many_ratios) = (ratios(&raw_one), ratios(&raw_many));
    let (dev_rate, one_rate, many_rate) = (median(device_rates), median(raw_one), median(raw_many));
    println!(
        "delivery: {total} completion interrupts from {} ADIs per round, {DELIVERY_ROUNDS} rounds alternating, medians: device -> IMS -> irqfd -> KVM {:.0}/s ({DEVICE_WORKERS} workers)",
        doorbells.len(),
        dev_rate
    );
    println!("  raw irqfd writes, 1 thread: {one_rate:.0}/s; ratio device / raw {:.2} (rounds {one_ratios})", dev_rate / one_rate);
    println!(
        "  raw irqfd writes, {DEVICE_WORKERS} threads: {many_rate:.0}/s; ratio device / raw {:.2} (rounds {many_ratios})",
        dev_rate / many_rate
    );
    for n in [1024, 4096] {
        route_binding(&kvm, n)?;
    }
    Ok(())
}

/// Interrupts/s writing each of `fds` `per_fd` times from `threads` threads, each its share of
/// the eventfds.
fn raw_writes(fds: &[Arc<vmm_sys_util::eventfd::EventFd>], per_fd: u32, threads: usize) -> Result<f64, String> {
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..threads)
            .map(|w| {
                scope.spawn(move || -> std::io::Result<()> {
                    for _ in 0..per_fd {
                        for fd in fds.iter().skip(w).step_by(threads) {
                            fd.write(1)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        writers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err(std::io::Error::other("a writer panicked"))))
    })
    .map_err(|e| e.to_string())?;
    Ok(fds.len() as f64 * f64::from(per_fd) / t0.elapsed().as_secs_f64())
}

/// Section 3 for `n` vectors: prints the three timings and their ratios.
fn route_binding(kvm: &Kvm, n: u32) -> Result<(), String> {
    use siovmm_interrupts::router::RouteBackend;
    use siovmm_interrupts::{FunctionId, MsiMessage, VectorKey};
    use vmm_sys_util::eventfd::EventFd;

    let key = |i: u32| VectorKey::msix(FunctionId::Adi(i / 2048), i % 2048);
    let msg = |i: u32| MsiMessage { address: 0xfee0_0000, data: 0x30 + i % 200 };
    /// A VM's routing backend, its vCPU (kept alive) and `n` eventfds.
    type Fresh = (Arc<KvmIrq>, Vec<Arc<EventFd>>, kvm_ioctls::VcpuFd);
    // Each run on its own VM and eventfds: KVM keeps a VM's irqfds until the VM goes.
    let fresh = || -> Result<Fresh, String> {
        let (vm, _mem) = create_vm(kvm, 2 << 20, false).map_err(|e| crate::one_line(&e))?;
        let vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let fds = (0..n).map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new)).collect::<Result<_, _>>().map_err(|e| format!("eventfd: {e}"))?;
        Ok((Arc::new(KvmIrq(Arc::new(vm))), fds, vcpu))
    };
    let bind = |one_at_a_time: bool| -> Result<(Duration, u64, u64), String> {
        let (irq, fds, _vcpu) = fresh()?;
        let router = MsiRouter::new(irq, MAX_MSI_ROUTES).map_err(|e| e.to_string())?;
        let t = Instant::now();
        if one_at_a_time {
            for i in 0..n {
                router.bind(key(i), fds[i as usize].clone(), msg(i)).map_err(|e| e.to_string())?;
            }
        } else {
            router.bind_all((0..n).map(|i| (key(i), fds[i as usize].clone(), msg(i)))).map_err(|e| e.to_string())?;
        }
        router.settle().map_err(|e| format!("committing the routes: {e}"))?;
        let elapsed = t.elapsed();
        let stats = router.stats();
        Ok((elapsed, stats.commits.load(Ordering::Relaxed), stats.entries_committed.load(Ordering::Relaxed)))
    };
    let (single, commits, entries) = bind(true)?;
    let (batch, ..) = bind(false)?;
    // A commit per change: the table KVM_SET_GSI_ROUTING gets after each of the n binds.
    let (irq, _fds, _vcpu) = fresh()?;
    let routes: Vec<(u32, MsiMessage)> = (0..n.min(MAX_MSI_ROUTES)).map(|i| (siovmm_interrupts::router::IOAPIC_GSIS + i, msg(i))).collect();
    let t = Instant::now();
    for k in 1..=routes.len() {
        irq.set_msi_routes(&routes[..k]).map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))?;
    }
    let per_change = t.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "routing: {n} vectors one at a time {:.1} ms ({:.2} µs per vector; {commits} commits, {entries} entries copied); \
         one batch {:.1} ms; a commit per change (KVM's work alone) {:.1} ms; one at a time / batch {:.2}, a commit per change / one at a time {:.1}",
        ms(single),
        single.as_secs_f64() * 1e6 / f64::from(n),
        ms(batch),
        ms(per_change),
        single.as_secs_f64() / batch.as_secs_f64(),
        per_change.as_secs_f64() / single.as_secs_f64()
    );
    Ok(())
}

