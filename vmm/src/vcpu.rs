//! vCPU setup and the run loop: one thread per vCPU, exits dispatched to the port-I/O and MMIO
//! buses, fatal exits turned into one line that says what happened and where.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arch::cpuid::{self, VcpuTopology};
use arch::regs::{self, EntryMode};
use devices::{Bus, ExitReason, ShutdownSignal};
use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::coalesced::CoalescedRing;
use crate::Error;

/// What a vCPU thread needs.
#[derive(Clone, Debug)]
pub struct Exits {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where a fatal exit is reported.
    pub shutdown: Arc<ShutdownSignal>,
    /// Writes KVM completed without exiting, to replay before handling any exit.
    pub coalesced: Option<Arc<Mutex<CoalescedRing>>>,
    /// Exit counters, reported by `SIOVMM_TRACE_STARTUP`.
    pub stats: Arc<ExitStats>,
    /// For the post-mortem of a triple fault: guest memory and the kernel's page-table root.
    pub post_mortem: Option<PostMortem>,
    /// Requests, from the signal watcher, that every vCPU report its state (SIGUSR1).
    pub state_requests: Arc<StateRequests>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN (EINTR); its handler does nothing.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + KICK_OFFSET
}

/// Offset of [`kick_signal`] from SIGRTMIN.
const KICK_OFFSET: i32 = 0;

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

vmm_sys_util::ioctl_iow_nr!(KVM_SET_SIGNAL_MASK, kvm_bindings::KVMIO, 0x8b, kvm_bindings::kvm_signal_mask);

/// `struct kvm_signal_mask` with the kernel's 8-byte sigset (signals 1-64) after it.
#[repr(C)]
struct KvmSignalMask {
    len: u32,
    sigset: [u8; 8],
}

/// Lets [`kick_signal`] reach the calling vCPU thread only while it is inside KVM_RUN: the
/// thread blocks the signal, and KVM_SET_SIGNAL_MASK (Documentation/virt/kvm/api.rst) gives
/// KVM_RUN the thread's mask without it. A kick sent while the thread handles an exit then
/// waits, pending, and makes the next KVM_RUN return EINTR at once; it never interrupts a
/// system call of the exit's handler. Unconfined, the post-mortem's kicks (every 100 ms when
/// no vCPU exits) made a vfio-user request's socket call fail with EINTR in a CI run, and the
/// client gave up its connection.
fn kick_only_in_kvm_run(vcpu: &VcpuFd) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data, filled by pthread_sigmask before use.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a null new set only reads the current mask into `mask`.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `mask` is a valid set and the kick signal a valid number.
    unsafe { libc::sigdelset(&mut mask, kick_signal()) };
    // The kernel's sigset is the first 8 bytes of glibc's (bit n-1 is signal n).
    // SAFETY: sigset_t is at least 8 bytes of plain data.
    let first: [u8; 8] = unsafe { std::ptr::read_unaligned((&mask as *const libc::sigset_t).cast()) };
    let arg = KvmSignalMask { len: 8, sigset: first };
    // SAFETY: KVM_SET_SIGNAL_MASK reads a kvm_signal_mask and `len` bytes of set after it,
    // which `arg` holds; the fd is a vCPU's.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_SET_SIGNAL_MASK(), &arg) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    let mut kick: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set and signal number; the old mask is not needed.
    let rc = unsafe {
        libc::sigemptyset(&mut kick);
        libc::sigaddset(&mut kick, kick_signal());
        libc::pthread_sigmask(libc::SIG_BLOCK, &kick, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Takes the pending kick off the calling vCPU thread after KVM_RUN returned EINTR: KVM
/// restores the thread's mask (kick blocked) before returning, so the signal stays pending
/// and would end every later KVM_RUN at once. `rt_sigtimedwait` with a zero timeout consumes
/// it without running the (empty) handler.
fn take_pending_kicks() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use; a zero timeout
    // polls; the siginfo is not wanted.
    unsafe {
        let mut kick: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut kick);
        libc::sigaddset(&mut kick, kick_signal());
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        while libc::sigtimedwait(&kick, std::ptr::null_mut(), &zero) == kick_signal() {}
    }
}

/// Whether [`kick_signal`] may be sent: its (empty) handler is installed, once per process, at
/// the first call. Without it the signal's default action would end the process, so when it
/// cannot be installed no kick is ever sent.
pub fn can_kick() -> bool {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let ok = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).is_ok();
        if !ok {
            log::warn!("cannot install the vCPU kick handler; vCPUs are left to finish");
        }
        ok
    })
}

/// Asks every running vCPU to print its state once (registers, the event KVM is delivering,
/// and what the guest's own page tables say about RIP and CR2), without stopping the VM. The
/// test harness sends SIGUSR1 just before a guest's time budget runs out, so that a hung
/// guest leaves evidence of *where* it hung (docs/testing.md, "Diagnosing failures").
#[derive(Debug, Default)]
pub struct StateRequests {
    /// How many reports have been asked for.
    asked: AtomicU64,
    /// The vCPU threads in [`run`], to kick out of KVM_RUN; a thread removes itself before it
    /// ends, under this lock, so no signal goes to a thread that is gone.
    threads: Mutex<Vec<(u8, libc::pthread_t)>>,
    /// The latest report any vCPU gave (also logged).
    last: Mutex<Option<String>>,
}

impl StateRequests {
    /// Asks each vCPU for one report and kicks it out of KVM_RUN so it answers now.
    pub fn ask(&self) {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.kick();
    }

    /// Kicks every vCPU out of KVM_RUN once; each samples its CR3 on the way back in
    /// ([`PostMortem::tick`]).
    pub fn kick(&self) {
        if !can_kick() {
            return;
        }
        for &(_, thread) in devices::bus::lock(&self.threads).iter() {
            // SAFETY: `thread` is a live thread: it is listed only between `enter` and the
            // drop of its `Registered`, both under this lock.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// The latest report a vCPU gave, if any.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn last_report(&self) -> Option<String> {
        devices::bus::lock(&self.last).clone()
    }

    fn report(&self, line: String) {
        log::warn!("{line}");
        *devices::bus::lock(&self.last) = Some(line);
    }

    fn enter(self: &Arc<Self>, id: u8) -> Registered {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        devices::bus::lock(&self.threads).push((id, me));
        Registered { requests: self.clone(), id, answered: self.asked.load(Ordering::SeqCst) }
    }
}

/// A vCPU thread's place in [`StateRequests`], left when it is dropped.
struct Registered {
    requests: Arc<StateRequests>,
    id: u8,
    /// How many requests this vCPU has answered.
    answered: u64,
}

impl Registered {
    /// Whether a report was asked for since the last one (and marks it answered).
    fn take(&mut self) -> bool {
        let asked = self.requests.asked.load(Ordering::SeqCst);
        std::mem::replace(&mut self.answered, asked) != asked
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        devices::bus::lock(&self.requests.threads).retain(|&(id, _)| id != self.id);
    }
}

/// What a vCPU needs to say, after a triple fault, how the guest's own page tables map its
/// kernel's half of the address space (see [`arch::paging`]). AMD's KVM resets a vCPU that
/// shut down, so the faulting CR3 is gone: the vCPUs sample it instead, at most every
/// [`PostMortem::SAMPLE_EVERY`], at exits they take in kernel mode. Every process's tables
/// share the kernel's upper-half entries (Linux copies them at `pgd_alloc`), so any recent
/// kernel-mode CR3 walks the same kernel mappings. Each vCPU's own last sample, in whatever
/// mode, is kept too: a fault raised in user mode is judged against that process's tables and
/// the way that vCPU enters its kernel (IDT, TSS).
#[derive(Clone, Debug)]
pub struct PostMortem {
    /// Guest RAM.
    pub memory: GuestMemoryMmap,
    /// The last kernel-mode sample: (CR3, CR4.LA57, when).
    pub root: Arc<Mutex<Option<(u64, bool, Instant)>>>,
    /// Each vCPU's last sample, by vCPU ID.
    own: Arc<Mutex<BTreeMap<u8, OwnSample>>>,
}

/// What one vCPU last ran under, and how it enters its kernel from there.
#[derive(Clone, Copy, Debug)]
struct OwnSample {
    cr3: u64,
    five_level: bool,
    /// CS.DPL when sampled.
    cpl: u8,
    entry: arch::exception_entry::KernelEntry,
    at: Instant,
}

/// Where a vCPU's IDT and TSS are (IDTR, TR's base), from its special registers.
fn kernel_entry(sregs: &kvm_bindings::kvm_sregs) -> arch::exception_entry::KernelEntry {
    arch::exception_entry::KernelEntry { idt_base: sregs.idt.base, idt_limit: sregs.idt.limit, tss_base: sregs.tr.base }
}

/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// CR0.PG: paging on.
const CR0_PG: u64 = 1 << 31;
/// CR4.LA57: 5-level paging.
const CR4_LA57: u64 = 1 << 12;

impl PostMortem {
    /// How often a vCPU samples its CR3 (one KVM_GET_SREGS).
    pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
    /// The kernel's half as Linux lays it out: kernel image, modules, fixmap.
    const KERNEL_HALF: std::ops::RangeInclusive<u64> = 0xffff_ffff_8000_0000..=u64::MAX;
    /// At most this many ranges are listed (hostile tables could make thousands).
    const MAX_RANGES: usize = 64;

    /// The lower half, where a process's own mappings live (47 bits; 56 with LA57 would
    /// only add ranges no 4-level guest has).
    const USER_HALF: std::ops::RangeInclusive<u64> = 0..=0x7fff_ffff_ffff;

    /// Samples nothing yet; reads `memory` after a triple fault.
    pub fn new(memory: GuestMemoryMmap) -> Self {
        Self { memory, root: Arc::default(), own: Arc::default() }
    }

    fn sample(&self, vcpu: &VcpuFd, id: u8) {
        let Ok(sregs) = vcpu.get_sregs() else { return };
        // 64-bit paging only: the walks read 4- and 5-level tables.
        if sregs.cr0 & CR0_PG == 0 || sregs.efer & EFER_LMA == 0 {
            return;
        }
        let five_level = sregs.cr4 & CR4_LA57 != 0;
        if sregs.cs.dpl == 0 {
            self.keep(sregs.cr3, five_level);
        }
        let sample = OwnSample { cr3: sregs.cr3, five_level, cpl: sregs.cs.dpl, entry: kernel_entry(&sregs), at: Instant::now() };
        devices::bus::lock(&self.own).insert(id, sample);
    }

    /// Keeps `cr3` as the root to walk after a fault, unless its tables map nothing of the
    /// kernel's half: the identity-only tables siovmm boots a 64-bit kernel with, which it
    /// leaves within microseconds; a root from before the switch would hide the kernel's own.
    fn keep(&self, cr3: u64, five_level: bool) {
        if arch::paging::maps_top_entry(&self.memory, cr3) {
            *devices::bus::lock(&self.root) = Some((cr3, five_level, Instant::now()));
        }
    }

    /// Called every [`PostMortem::SAMPLE_EVERY`] from the event loop: when no vCPU has
    /// sampled a root for that long, kicks them all so that they do. vCPUs sample at their
    /// exits, and a guest can run for long without one (in-kernel LAPIC, no port I/O): the
    /// project's CI saw a guest triple-fault 0.36 s into its boot, inside `clear_bss`, before
    /// its first exit, and with nothing sampled its post-mortem could not say whether its own
    /// tables mapped the faulting instruction (docs/testing.md). A kick costs one exit and
    /// one KVM_GET_SREGS per vCPU, ten times a second at most.
    pub fn tick(&self, vcpus: &StateRequests) {
        let fresh = devices::bus::lock(&self.root).is_some_and(|(_, _, at)| at.elapsed() < Self::SAMPLE_EVERY);
        if !fresh {
            vcpus.kick();
        }
    }

    /// One line: the vCPU's state now, for a guest that hangs rather than faults. The event
    /// KVM is delivering (an exception it re-injects after an exit, or one pending) and CR2
    /// (the last page-fault address) say which fault the guest is in; the guest's own page
    /// tables, walked from the live CR3, say whether RIP and CR2 are mapped. A CPU raising a
    /// not-present fault on an address its tables map present, over and over, is the
    /// emulated CPU's doing: Linux either fixes a fault or reports it, it does not loop.
    pub(crate) fn state_report(&self, vcpu: &VcpuFd, id: u8) -> String {
        let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
            return format!("state of vCPU {id}: registers unreadable");
        };
        let event = match vcpu.get_vcpu_events() {
            Ok(e) if e.exception.injected != 0 || e.exception.pending != 0 => format!(
                "exception {} {}{}",
                if e.exception.injected != 0 { "injected" } else { "pending" },
                e.exception.nr,
                if e.exception.has_error_code != 0 { format!(" error {:#x}", e.exception.error_code) } else { String::new() }
            ),
            Ok(e) if e.interrupt.injected != 0 => format!("interrupt injected {:#x}", e.interrupt.nr),
            Ok(_) => "none".into(),
            Err(e) => format!("unreadable ({e})"),
        };
        let paged = sregs.cr0 & CR0_PG != 0 && sregs.efer & EFER_LMA != 0;
        let five_level = sregs.cr4 & CR4_LA57 != 0;
        let maps = |range: std::ops::RangeInclusive<u64>| -> String {
            if !paged {
                return "no 64-bit paging".into();
            }
            let found = arch::paging::mappings(&self.memory, sregs.cr3, five_level, range);
            if found.is_empty() {
                "nothing".into()
            } else {
                found.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", ")
            }
        };
        // The 15 bytes an instruction may span, unless they would cross into the other half.
        let rip_end = regs.rip.checked_add(14).filter(|e| (e >> 63) == (regs.rip >> 63)).unwrap_or(regs.rip);
        format!(
            "state of vCPU {id}: RIP {:#x} CPL {} RFLAGS {:#x} CR0 {:#x} CR2 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}; \
             delivering: {event}; RIP maps: {}; CR2 maps: {}; {}",
            regs.rip,
            sregs.cs.dpl,
            regs.rflags,
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.efer,
            maps(regs.rip..=rip_end),
            maps(sregs.cr2..=sregs.cr2),
            if paged {
                self.entry_from_user(sregs.cr3, five_level, &kernel_entry(&sregs))
            } else {
                "entry from user mode: no 64-bit paging".into()
            },
        )
    }

    /// Whether a page fault and a double fault raised in user mode under `cr3` enter the
    /// kernel through mapped structures (`arch::exception_entry`), in words.
    fn entry_from_user(&self, cr3: u64, five_level: bool, entry: &arch::exception_entry::KernelEntry) -> String {
        let path = |vector: u8, name: &str| match arch::exception_entry::from_user(&self.memory, cr3, five_level, entry, vector) {
            Ok(path) => format!("{name} {path}"),
            Err(why) => format!("{name} CANNOT ENTER: {why}"),
        };
        format!("entry from user mode: {}; {}", path(14, "#PF"), path(8, "#DF"))
    }

    /// One line: the present ranges of the kernel's half under the last sampled root.
    pub(crate) fn report(&self, id: u8) -> Option<String> {
        let (cr3, five_level, at) = (*devices::bus::lock(&self.root))?;
        Some(format!(
            "post-mortem of vCPU {id}: kernel mappings under CR3 {cr3:#x} (sampled {} ms before), read from guest memory after the fault: {}",
            at.elapsed().as_millis(),
            self.listed(cr3, five_level, Self::KERNEL_HALF)
        ))
    }

    /// The present ranges of `range` under `cr3`, as a post-mortem lists them: at most
    /// [`PostMortem::MAX_RANGES`], then how many more; "none" when there are none.
    fn listed(&self, cr3: u64, five_level: bool, range: std::ops::RangeInclusive<u64>) -> String {
        let ranges = arch::paging::mappings(&self.memory, cr3, five_level, range);
        let mut list: Vec<String> = ranges.iter().take(Self::MAX_RANGES).map(|m| m.to_string()).collect();
        if ranges.len() > Self::MAX_RANGES {
            list.push(format!("and {} more", ranges.len() - Self::MAX_RANGES));
        }
        if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        }
    }

    /// Two lines about the vCPU's own last sample, for a fault raised in user mode: the present
    /// ranges of the lower half under its CR3, and whether a page fault (and a double fault)
    /// raised there can enter the kernel through its IDT and TSS, read from guest memory now.
    pub(crate) fn report_own(&self, id: u8) -> Vec<String> {
        let Some(s) = devices::bus::lock(&self.own).get(&id).copied() else { return Vec::new() };
        let head = format!(
            "post-mortem of vCPU {id}: under its own CR3 {:#x} (CPL {}, sampled {} ms before), read from guest memory after the fault:",
            s.cr3,
            s.cpl,
            s.at.elapsed().as_millis()
        );
        vec![
            format!("{head} user mappings {}", self.listed(s.cr3, s.five_level, Self::USER_HALF)),
            format!("{head} {}", self.entry_from_user(s.cr3, s.five_level, &s.entry)),
        ]
    }
}

/// How many exits of each kind the vCPUs took.
#[derive(Debug, Default)]
pub struct ExitStats {
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Writes replayed from the coalesced ring (each one an exit saved).
    pub coalesced: AtomicU64,
}

impl std::fmt::Display for ExitStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} port I/O exits, {} MMIO exits, {} coalesced writes",
            self.pio.load(Ordering::Relaxed),
            self.mmio.load(Ordering::Relaxed),
            self.coalesced.load(Ordering::Relaxed)
        )
    }
}

impl Exits {
    /// Applies queued coalesced writes, oldest first.
    fn replay_coalesced(&self) {
        let Some(ring) = &self.coalesced else { return };
        let replayed = devices::bus::lock(ring).reader().replay(&self.pio, &self.mmio);
        self.stats.coalesced.fetch_add(replayed, Ordering::Relaxed);
    }
}

/// Programs CPUID for one vCPU: KVM's supported set patched for `topo`, plus siovmm's
/// hypercall leaves announcing `(flags, register address)`.
pub fn configure_cpuid(vcpu: &VcpuFd, supported: &CpuId, topo: &VcpuTopology, hypercall: (u32, u64)) -> Result<(), Error> {
    let mut entries = supported.as_slice().to_vec();
    cpuid::patch(&mut entries, topo);
    cpuid::add_hypercall_leaves(
        &mut entries,
        (siovmm_hypercall::CPUID_SIGNATURE_LEAF, siovmm_hypercall::CPUID_INFO_LEAF),
        siovmm_hypercall::SIGNATURE,
        siovmm_hypercall::ABI_VERSION,
        hypercall.0,
        hypercall.1,
    );
    let cpuid = CpuId::from_entries(&entries).map_err(|_| Error::Kvm("building CPUID", kvm_ioctls::Error::new(libc::E2BIG)))?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))
}

/// Puts the boot vCPU at the kernel's entry.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, mode: &EntryMode) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    regs::setup_sregs(mem, mode, &mut sregs).map_err(Error::Registers)?;
    vcpu.set_sregs(&sregs).map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs::boot_regs(mode)).map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
    vcpu.set_fpu(&regs::boot_fpu()).map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
    Ok(())
}

fn rip(vcpu: &VcpuFd) -> String {
    let regs = vcpu.get_regs();
    let sregs = vcpu.get_sregs();
    match (regs, sregs) {
        // On AMD, KVM reinitializes the vCPU after a shutdown intercept (the VMCB is undefined
        // then), so the state reads as the reset vector: say so rather than name a bogus RIP.
        (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.base == 0xffff_0000 => "unknown (KVM reset the vCPU)".into(),
        (Ok(r), _) => format!("{:#x}", r.rip),
        _ => "unknown".into(),
    }
}

/// The element size of the port-I/O exit a vCPU is in. A string instruction (`rep insb`,
/// `rep outsw`, ...) exits once with `count` elements of `size` bytes one after another in the
/// data area (`kvm_run.io`, Documentation/virt/kvm/api.rst); kvm-ioctls hands over the whole
/// area, so the size is read from the vCPU's `kvm_run` page, each element being its own access.
struct PioWidth(*const kvm_bindings::kvm_run);

impl PioWidth {
    fn of(vcpu: &mut VcpuFd) -> Self {
        Self(vcpu.get_kvm_run())
    }

    /// The current exit's element size (1, 2 or 4); the whole area if KVM says something else.
    fn get(&self) -> usize {
        // SAFETY: the pointer is to the vCPU's kvm_run mapping, which lives as long as the
        // VcpuFd this loop owns; `io` is the union member KVM filled for the port-I/O exit being
        // handled, and its `size` field lies outside the data area the exit's slice borrows.
        let size = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.0).__bindgen_anon_1.io.size)) };
        match size {
            1 | 2 | 4 => usize::from(size),
            _ => usize::MAX,
        }
    }
}

/// How a vCPU exit ends the VM. `AtRip` failures get the vCPU's RIP appended once the exit's
/// borrow of the vCPU has ended.
enum Stop {
    Reason(ExitReason),
    AtRip(String),
}

/// Runs `vcpu` until the VM stops. Never returns an error: failures become a shutdown request.
pub fn run(mut vcpu: VcpuFd, id: u8, exits: Exits) {
    let mut sampled: Option<Instant> = None;
    if let Err(e) = kick_only_in_kvm_run(&vcpu) {
        exits.shutdown.request(ExitReason::Failed(format!("vCPU {id}: confining kicks to KVM_RUN (KVM_SET_SIGNAL_MASK): {e}")));
        return;
    }
    let mut requests = exits.state_requests.enter(id);
    let pio_width = PioWidth::of(&mut vcpu);
    loop {
        let stop = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                exits.stats.pio.fetch_add(1, Ordering::Relaxed);
                exits.replay_coalesced();
                for element in data.chunks_mut(pio_width.get()) {
                    exits.pio.read(u64::from(port), element);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                exits.stats.pio.fetch_add(1, Ordering::Relaxed);
                exits.replay_coalesced();
                for element in data.chunks(pio_width.get()) {
                    exits.pio.write(u64::from(port), element);
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                exits.stats.mmio.fetch_add(1, Ordering::Relaxed);
                exits.replay_coalesced();
                exits.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                exits.stats.mmio.fetch_add(1, Ordering::Relaxed);
                exits.replay_coalesced();
                exits.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Stop::Reason(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Stop::Reason(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => Stop::AtRip(format!("guest crashed (vCPU {id})")),
                other => Stop::AtRip(format!("unexpected KVM system event {other} on vCPU {id}")),
            }),
            Ok(VcpuExit::Shutdown) => {
                if let Some(p) = &exits.post_mortem {
                    for line in p.report(id).into_iter().chain(p.report_own(id)) {
                        log::warn!("{line}");
                    }
                }
                // The thread ID ties the sandbox's flight record (which names the vCPU thread
                // that shut down) to this VM when several run at once.
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                Some(Stop::AtRip(format!("triple fault on vCPU {id} (thread {tid})")))
            }
            Ok(VcpuExit::InternalError) => Some(Stop::AtRip(String::new())),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(Stop::AtRip(format!(
                "KVM entry failure (hardware reason {reason:#x}, host CPU {cpu}) on vCPU {id}"
            ))),
            Ok(VcpuExit::Hlt) => Some(Stop::AtRip(format!("vCPU {id} halted"))),
            Ok(VcpuExit::Intr) => None,
            Ok(other) => Some(Stop::AtRip(format!("unhandled exit {other:?} on vCPU {id}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (a state request, a stop, or [`PostMortem::tick`]): sample now.
                take_pending_kicks();
                sampled = None;
                None
            }
            Err(e) => Some(Stop::Reason(ExitReason::Failed(format!("KVM_RUN failed on vCPU {id}: {e}")))),
        };
        if let Some(stop) = stop {
            let reason = match stop {
                Stop::Reason(r) => r,
                Stop::AtRip(what) if what.is_empty() => {
                    // SAFETY: KVM filled the `internal` member of the exit union: this is a
                    // KVM_EXIT_INTERNAL_ERROR exit.
                    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    ExitReason::Failed(format!("KVM internal error (suberror {suberror}) on vCPU {id} at RIP {}", rip(&vcpu)))
                }
                Stop::AtRip(what) => ExitReason::Failed(format!("{what} at RIP {}", rip(&vcpu))),
            };
            exits.shutdown.request(reason);
            return;
        }
        if exits.shutdown.is_requested() {
            return;
        }
        if requests.take() {
            exits.state_requests.report(match &exits.post_mortem {
                Some(p) => p.state_report(&vcpu, id),
                None => format!("state of vCPU {id}: guest memory not at hand"),
            });
        }
        if let Some(p) = &exits.post_mortem {
            if sampled.is_none_or(|t| t.elapsed() >= PostMortem::SAMPLE_EVERY) {
                p.sample(&vcpu, id);
                sampled = Some(Instant::now());
            }
        }
    }
}
