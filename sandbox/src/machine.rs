//! The sandbox machine: QEMU-TCG (`-cpu max`, which emulates AMD SVM) booting the stock Debian
//! kernel on an initramfs we build, whose /init loads that kernel's KVM modules and runs a
//! script of ours. Whatever needs KVM runs there when the host's cannot
//! (docs/sandbox.md).
//!
//! A script reports through its console: `@@SANDBOX-ERROR` when the sandbox itself could not
//! be set up, `@@SANDBOX-DONE` when the script ran to its end.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::assets::Assets;
use crate::cpio::{busybox_root, Cpio};

/// The start of every sandbox /init: busybox, /proc, /sys, /dev, and KVM (nested SVM; VMX
/// where the emulated CPU has it). Nothing is mounted over /tmp: host programs are carried in
/// at their own paths (`ship`), which may lie under /tmp (a clone in /tmp was caught by a
/// clean-clone run); the initramfs root is writable as it is.
const PROLOGUE: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in irqbypass ccp kvm; do insmod /modules/$m.ko || echo \"@@SANDBOX-ERROR insmod $m\"; done
insmod /modules/kvm-amd.ko 2>/dev/null || insmod /modules/kvm-intel.ko 2>/dev/null
[ -c /dev/kvm ] || echo '@@SANDBOX-ERROR no /dev/kvm in the sandbox'
# One idle VM held for the sandbox's life, so that the sandbox kernel never live-patches its
# code while tests run (sandbox/ballast/kvm_ballast.c, docs/testing.md). KVM's deferred
# APIC keys settle one second (HZ) after the ballast's vCPU is reset: wait that out.
/kvm_ballast || echo '@@SANDBOX-ERROR kvm_ballast'
sleep 1.2
uptime_cs() { read u _ < /proc/uptime; echo ${u%.*}${u#*.}; }
# Flight recorder (docs/testing.md, Diagnosing failures): KVM's record of every guest shutdown
# (triple fault: SVM exit 0x7f, VMX exit 2) with the guest RIP before KVM resets the vCPU, of
# every exception KVM injected, and of the interrupts it injected (kept in a ring, printed only
# around a shutdown); kvm_flight_record prints and clears it after each step. The rare kinds
# have a trace instance of their own, so that interrupts of guests running side by side
# cannot push a shutdown out of the ring before it is printed.
t=/sys/kernel/tracing
r=$t/instances/rare
if mount -t tracefs tracefs $t 2>/dev/null && [ -d $t/events/kvm ] && mkdir $r; then
  echo 64 > $t/buffer_size_kb
  echo 256 > $r/buffer_size_kb
  if [ -d /sys/module/kvm_amd ]; then echo 'exit_reason == 127' > $r/events/kvm/kvm_exit/filter
  else echo 'exit_reason == 2' > $r/events/kvm/kvm_exit/filter; fi
  echo 1 > $r/events/kvm/kvm_exit/enable
  echo 1 > $r/events/kvm/kvm_inj_exception/enable
  echo 1 > $t/events/kvm/kvm_inj_virq/enable
fi
# The rare kinds, and after a guest shutdown the interrupts injected last (per CPU's ring).
kvm_flight_records() {
  if grep -q 'reason shutdown' $r/trace; then grep -v '^#' $t/trace | tail -n 80; fi
  grep -v '^#' $r/trace
}
kvm_flight_record() {
  [ -r $r/trace ] || return 0
  kvm_flight_records | tee -a /tmp/flight.log | while read -r l; do
    rip=${l##* rip 0x}; rip=${rip%% *}
    sym=''
    case $rip in ffffffff8*) sym=$(awk -v a=$rip '$1 <= a && $1 > b && ($2 == \"T\" || $2 == \"t\") { b = $1; n = $3 } END { if (n != \"\") print \" (sandbox kernel symbol: \" n \")\" }' /proc/kallsyms);; esac
    echo \"@@KVM-TRACE $l$sym\"
  done
  echo > $t/trace
  echo > $r/trace
}
# A stalled sandbox is asked for every CPU's backtrace by an NMI from the QEMU monitor
# (machine::diagnose_stall): unknown NMIs panic, and the panic prints all CPUs' backtraces
# and the flight recorder.
echo 1 > /proc/sys/kernel/unknown_nmi_panic
echo 80 > /proc/sys/kernel/panic_print
echo \"@@SANDBOX-UP $(cut -d' ' -f1 /proc/uptime)\"
";

/// Starts the message of a run that did not finish (its budget ran out, or it ended before
/// `@@SANDBOX-DONE`).
pub const UNFINISHED: &str = "the sandbox run did not finish";

/// Starts the message of a run in which QEMU ended before the script did.
const ENDED_EARLY: &str = "the sandbox run did not finish: it ended before its script did";

/// Starts the message of a run whose budget ran out.
const OUT_OF_BUDGET: &str = "the sandbox run did not finish: no end within its budget of";

/// Starts the message of a run in which the sandbox machine reset itself.
const RESET: &str = "the sandbox run did not finish: the sandbox machine reset itself";

/// A run that failed, with the console lines it printed before it did.
#[derive(Debug, Clone)]
pub struct RunFailure {
    /// What went wrong, one line first.
    pub message: String,
    /// Console lines up to the failure.
    pub lines: Vec<String>,
}

impl RunFailure {
    fn new(message: String, lines: Vec<String>) -> Self {
        Self { message, lines }
    }

    /// Whether the run was killed because its budget ran out.
    pub fn out_of_budget(&self) -> bool {
        self.message.starts_with(OUT_OF_BUDGET)
    }
}

/// An initramfs for the sandbox under construction.
#[derive(Debug)]
pub struct SandboxImage {
    cpio: Cpio,
}

impl SandboxImage {
    /// busybox, the KVM modules under /modules, nothing else yet.
    pub fn new(assets: &Assets) -> Result<Self, String> {
        let mut cpio = busybox_root(&assets.read("busybox")?);
        for m in ["irqbypass", "ccp", "kvm", "kvm-amd", "kvm-intel"] {
            cpio.file(&format!("modules/{m}.ko"), 0o644, &assets.read(&format!("modules/{m}.ko"))?);
        }
        cpio.file("kvm_ballast", 0o755, &assets.read("kvm_ballast")?);
        Ok(Self { cpio })
    }

    /// Adds a file (parents created as needed).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.cpio.file(path, mode, data);
        self
    }

    /// Finishes the image with /init = prologue, `script`, then `@@SANDBOX-DONE` and power-off.
    pub fn finish(mut self, script: &str) -> Vec<u8> {
        let init = format!("{PROLOGUE}{script}\necho '@@SANDBOX-DONE'\npoweroff -f\n");
        self.cpio.file("init", 0o755, init.as_bytes());
        self.cpio.finish()
    }

    /// Finishes the image with /init = prologue then `script`, which powers off itself.
    pub fn finish_raw(mut self, script: &str) -> Vec<u8> {
        let init = format!("{PROLOGUE}{script}");
        self.cpio.file("init", 0o755, init.as_bytes());
        self.cpio.finish()
    }
}

/// Kernel VFIO modules, in load order (tests/setup.sh puts them with the KVM ones).
pub const VFIO_MODULES: [&str; 5] = ["vfio", "vfio_iommu_type1", "vfio_virqfd", "vfio-pci-core", "vfio-pci"];

impl SandboxImage {
    /// Adds the kernel VFIO modules; [`load_vfio_script`] loads them.
    pub fn with_vfio(&mut self, assets: &Assets) -> Result<&mut Self, String> {
        for m in VFIO_MODULES {
            self.cpio.file(&format!("modules/{m}.ko"), 0o644, &assets.read(&format!("modules/{m}.ko"))?);
        }
        Ok(self)
    }
}

/// Script lines that load the kernel VFIO modules ([`SandboxImage::with_vfio`]) and bind
/// every PCI function with vendor `vendor` and device `device` (hex, no 0x) to vfio-pci.
pub fn load_vfio_script(vendor: &str, device: &str) -> String {
    let mut s = String::new();
    for m in VFIO_MODULES {
        s.push_str(&format!("insmod /modules/{m}.ko || echo '@@SANDBOX-ERROR insmod {m}'\n"));
    }
    s.push_str(&format!("echo {vendor} {device} > /sys/bus/pci/drivers/vfio-pci/new_id || echo '@@SANDBOX-ERROR binding {vendor}:{device} to vfio-pci'\n"));
    s
}

/// Hardware a sandbox has beyond the default (a `pc` machine with nothing but a serial port).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hardware {
    /// QEMU's emulated NVMe controller (1b36:0010: MSI-X, DMA) on this raw image, behind an
    /// emulated VT-d with interrupt remapping on a q35 machine: a device for kernel VFIO
    /// (docs/vfio.md; ../shared/guest-sandbox.md §2b). It is function 00:01.0.
    pub nvme_disk: Option<PathBuf>,
}

/// Where [`Hardware::nvme_disk`]'s controller is in the sandbox.
pub const NVME_SYSFS: &str = "/sys/bus/pci/devices/0000:00:01.0";
/// With [`Hardware::nvme_disk`] comes QEMU's NE2000 (10ec:8029), a device whose only BAR is
/// an I/O BAR (256 ports) and whose only interrupt is INTx, here: what kernel VFIO passes
/// through I/O BARs with (docs/vfio.md). It has no network peer; sending works, nothing
/// arrives.
pub const NE2K_SYSFS: &str = "/sys/bus/pci/devices/0000:00:02.0";
/// The NE2000's MAC address, which its driver reads from the device's PROM through its ports.
pub const NE2K_MAC: &str = "52:54:00:51:0e:42";

impl Hardware {
    /// QEMU arguments and kernel parameters for this hardware.
    fn qemu(&self) -> (Vec<String>, &'static str) {
        let Some(disk) = &self.nvme_disk else { return (Vec::new(), "") };
        // aw-bits=48: the default 39-bit width cannot map a VMM's high addresses; intremap=on:
        // without it VFIO refuses the container (no interrupt remapping, EPERM).
        let args = [
            "-M".to_string(),
            "q35".into(),
            "-device".into(),
            "intel-iommu,intremap=on,aw-bits=48".into(),
            "-drive".into(),
            format!("file={},if=none,id=nv0,format=raw", disk.display()),
            "-device".into(),
            "nvme,serial=siovmm0,drive=nv0,addr=01.0".into(),
            "-device".into(),
            format!("ne2k_pci,addr=02.0,mac={NE2K_MAC}"),
        ];
        (args.to_vec(), "intel_iommu=on")
    }
}

/// The QEMU-TCG command line that boots the sandbox on `initrd`.
pub fn qemu_command(assets: &Assets, initrd: &Path) -> Command {
    qemu_command_on(assets, initrd, &Hardware::default())
}

/// [`qemu_command`] with `hardware`.
pub fn qemu_command_on(assets: &Assets, initrd: &Path, hardware: &Hardware) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    // A sandbox never outlives the thread that started it: a harness killed (a `timeout`
    // around a test, Ctrl-C) would otherwise leave QEMU running on both cores.
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut qemu, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // `SIOVMM_SANDBOX_ACCEL` (e.g. `tcg,thread=single`) is for experiments on the emulation.
    let accel = std::env::var("SIOVMM_SANDBOX_ACCEL").unwrap_or_else(|_| "tcg,thread=multi".into());
    qemu.args(["-accel", &accel, "-cpu", "max", "-smp", "2", "-m", "3G"]);
    // Benchmarks ask for the sandbox's RAM to be touched up front: first touches of fresh host
    // memory were measured to vary by seconds on these machines, which is noise to a boot-time
    // figure (docs/boot-performance.md).
    if std::env::var_os("SIOVMM_SANDBOX_PREALLOC").is_some() {
        qemu.arg("-mem-prealloc");
    }
    qemu.args(["-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(assets.path("bzImage"))
        .arg("-initrd")
        .arg(initrd);
    // Debugging hooks: more sandbox kernel parameters (e.g. `nokaslr`, so that addresses read
    // from the QEMU monitor match the vmlinux symbols), more QEMU arguments (e.g. `-monitor
    // unix:/tmp/m.sock,server,nowait`, to read a stuck sandbox's registers).
    // `nokaslr`: the sandbox kernel's symbols sit at the vmlinux's link addresses, as a
    // vmlinux (PVH) guest's do, so the flight recorder can name guest RIPs from the sandbox's
    // /proc/kallsyms, and RIPs read through the monitor can be named too.
    let append = std::env::var("SIOVMM_SANDBOX_APPEND").unwrap_or_default();
    let (hardware_args, hardware_append) = hardware.qemu();
    qemu.args(["-append", format!("console=ttyS0 panic=-1 nokaslr {hardware_append} {append}").trim_end()]);
    qemu.args(hardware_args);
    if let Ok(extra) = std::env::var("SIOVMM_SANDBOX_QEMU_ARGS") {
        qemu.args(extra.split_whitespace());
    }
    qemu
}

/// A folder of this process's own, removed when dropped.
#[derive(Debug)]
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    /// Creates `$TMPDIR/siovmm-<what>-<pid>-<nanos>`.
    pub fn new(what: &str) -> Result<Self, String> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let d = std::env::temp_dir().join(format!("siovmm-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        Ok(Self(d))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots the sandbox on `image` with no terminal, and returns its console lines once the
/// script has finished. Fails on `@@SANDBOX-ERROR`, on a run that does not reach
/// `@@SANDBOX-DONE`, and when `budget` passes (then QEMU is killed).
///
/// Failures proven to be the sandbox's own are tried again up to [`PROVEN_RETRIES`] times,
/// each announced on stderr and kept in the retry log: a sandbox that never started the
/// script (no `@@SANDBOX-UP`: QEMU or the sandbox kernel failed before any of our code ran), a
/// sandbox whose own kernel crashed or reset itself (never a correct outcome), a stall on a
/// stale breakpoint. A run whose budget ran out otherwise (the silent whole-sandbox stalls of
/// docs/testing.md, not yet shown to be the environment's) is tried again once, marked
/// UNEXPLAINED with its console. Anything else is final; a final failure's message ends with
/// a line per attempt.
pub fn run(assets: &Assets, image: Vec<u8>, budget: Duration) -> Result<Vec<String>, String> {
    run_keeping_output(assets, image, budget).map_err(|f| f.message)
}

/// [`run`] on a sandbox with `hardware`.
pub fn run_on(assets: &Assets, image: Vec<u8>, budget: Duration, hardware: &Hardware) -> Result<Vec<String>, String> {
    run_retrying(assets, image, budget, std::env::var_os("SIOVMM_TEST_VERBOSE").is_some(), hardware).map_err(|f| f.message)
}

/// [`run`], echoing each console line to stderr as it arrives when `echo`.
pub fn run_with(assets: &Assets, image: Vec<u8>, budget: Duration, echo: bool) -> Result<Vec<String>, String> {
    run_retrying(assets, image, budget, echo, &Hardware::default()).map_err(|f| f.message)
}

/// [`run`], but a failed run also returns the console lines it had printed.
pub fn run_keeping_output(assets: &Assets, image: Vec<u8>, budget: Duration) -> Result<Vec<String>, RunFailure> {
    run_retrying(assets, image, budget, std::env::var_os("SIOVMM_TEST_VERBOSE").is_some(), &Hardware::default())
}

/// [`run`] without its retries: for measuring how often runs fail (`siovmm-bench --reliability`).
pub fn run_once(assets: &Assets, image: Vec<u8>, budget: Duration, hardware: &Hardware) -> Result<Vec<String>, String> {
    let (_dir, initrd) = write_image(image)?;
    let echo = std::env::var_os("SIOVMM_TEST_VERBOSE").is_some();
    run_inner(assets, &initrd, budget, echo, hardware).map_err(|f| f.message)
}

/// Writes `image` into a work folder of its own (removed when the returned guard drops).
fn write_image(image: Vec<u8>) -> Result<(WorkDir, PathBuf), String> {
    let dir = WorkDir::new("sandbox")?;
    let initrd = dir.0.join("sandbox.cpio");
    std::fs::write(&initrd, image).map_err(|e| format!("writing {}: {e}", initrd.display()))?;
    Ok((dir, initrd))
}

/// How many times a run may be tried again when every failure was proven to be the sandbox's
/// own (its kernel crashed or reset, it never started our script, the stale-INT3 stall): a
/// project CI run of 10d5421 met two in a row in one test (the sandbox machine reset itself,
/// then its kernel panicked in the next attempt), while the same test passed in every other
/// run. A failure not proven to be the environment's is tried again at most once.
pub const PROVEN_RETRIES: usize = 2;

fn run_retrying(assets: &Assets, image: Vec<u8>, budget: Duration, echo: bool, hardware: &Hardware) -> Result<Vec<String>, RunFailure> {
    let (_dir, initrd) = write_image(image).map_err(|e| RunFailure::new(e, Vec::new()))?;
    let mut tried: Vec<String> = Vec::new();
    loop {
        let f = match run_inner(assets, &initrd, budget, echo, hardware) {
            Ok(lines) => return Ok(lines),
            Err(f) => f,
        };
        let again = rerun_reason(&f).filter(|r| {
            let unproven = r.unproven || tried.iter().any(|t| t.starts_with(UNPROVEN_MARK));
            tried.len() < if unproven { 1 } else { PROVEN_RETRIES }
        });
        match again {
            Some(r) => {
                crate::retries::record(&format!("siovmm-sandbox: {}", r.why), &f.lines.join("\n"));
                tried.push(r.why);
            }
            None => return Err(with_attempts_summary(f, &tried)),
        }
    }
}

/// Marks a retry whose failure is not proven to be the environment's.
const UNPROVEN_MARK: &str = "UNEXPLAINED";

/// `f` with a last line naming every earlier attempt and what ended this one, so that the end
/// of a long transcript (all a CI excerpt may show) says what happened.
fn with_attempts_summary(mut f: RunFailure, tried: &[String]) -> RunFailure {
    let crash = sandbox_kernel_crashed(&f.lines).map(|c| format!("; the sandbox kernel's report: {c}")).unwrap_or_default();
    let mut summary = format!("\nsiovmm-sandbox: attempt {} failed: {}{crash}", tried.len() + 1, first_line(&f.message));
    for (i, why) in tried.iter().enumerate() {
        summary.push_str(&format!("\nsiovmm-sandbox: attempt {} failed, then {why}", i + 1));
    }
    f.message.push_str(&summary);
    f
}

/// Why a failed run is tried again.
#[derive(Debug)]
struct Rerun {
    why: String,
    /// Not shown to be the environment's: tried again once at most.
    unproven: bool,
}

impl Rerun {
    fn proven(why: String) -> Self {
        Self { why, unproven: false }
    }
}

/// Why a failed run is run once more, if it is (see [`run`]).
fn rerun_reason(f: &RunFailure) -> Option<Rerun> {
    if never_started(&f.lines) {
        return Some(Rerun::proven(format!("retrying: the sandbox never started its script ({})", first_line(&f.message))));
    }
    // The sandbox's own kernel crashed (seen: "BUG: TASK stack guard page was hit" in
    // exc_page_fault on siovmm's vcpu1 thread inside KVM_RUN, then a panic). No userspace
    // program may crash the kernel; that is a bug of the sandbox's kernel or of the emulation
    // under it, whatever the workload. Only when QEMU itself ended early: a guest kernel's
    // crash report reaches the same console, but ends only siovmm, never the sandbox.
    if f.message.starts_with(ENDED_EARLY) {
        return sandbox_kernel_crashed(&f.lines).map(|crash| Rerun::proven(format!("retrying: the sandbox's kernel crashed ({crash})")));
    }
    // The sandbox machine reset itself with no crash report: its kernel triple-faulted (or
    // the emulation reset it). No program in the sandbox can do that: siovmm never calls
    // reboot(2) and loads no kernel code.
    if f.message.starts_with(RESET) {
        return Some(Rerun::proven("retrying: the sandbox machine reset itself, with no crash report from its kernel".into()));
    }
    if f.message.starts_with(OUT_OF_BUDGET) {
        // The stall diagnosis (diagnose_stall) found the sandbox kernel's CPUs executing a
        // breakpoint: live patching of the kernel's own code (static keys flipped by KVM)
        // left a stale INT3 running under QEMU's multi-threaded TCG (docs/testing.md, "What
        // the failures were"). The kernel's code, not ours; the KVM ballast makes it rare.
        if stuck_on_stale_breakpoint(&f.lines) {
            return Some(Rerun::proven("retrying: the sandbox kernel was stuck on a breakpoint left by live code patching (QEMU-TCG)".into()));
        }
        // NOT proven to be the environment's: a stall with another signature. Every
        // occurrence leaves its console, with the stall diagnosis, in the log.
        return Some(Rerun { why: format!("{UNPROVEN_MARK} sandbox stall (issue 8, item 5), running once more"), unproven: true });
    }
    None
}

/// True when a stall diagnosis shows a sandbox CPU interrupted (by the diagnosis NMI) on the
/// INT3 handler's entry: the livelock of a breakpoint left by text patching.
pub fn stuck_on_stale_breakpoint(lines: &[String]) -> bool {
    let Some(from) = lines.iter().position(|l| l.starts_with("@@STALL-MONITOR")) else { return false };
    lines[from..].iter().any(|l| l.starts_with('[') && l.contains("] RIP: 0010:asm_exc_int3"))
}

/// True when a run's console shows that the sandbox never reached our script.
pub fn never_started(lines: &[String]) -> bool {
    up_at(lines).is_none()
}

/// The sandbox kernel's own crash report in a run's console, if any: a panic, an oops or a
/// `BUG:` line printed by the kernel (timestamped), not by a guest or a test.
pub fn sandbox_kernel_crashed(lines: &[String]) -> Option<String> {
    lines
        .iter()
        .filter(|l| l.starts_with('['))
        .find(|l| l.contains("] Kernel panic - not syncing") || l.contains("] BUG: ") || l.contains("] Oops: "))
        .map(|l| l.trim().to_string())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn run_inner(assets: &Assets, initrd: &Path, budget: Duration, echo: bool, hardware: &Hardware) -> Result<Vec<String>, RunFailure> {
    let monitor = initrd.with_file_name("monitor.sock");
    let _ = std::fs::remove_file(&monitor);
    let child = qemu_command_on(assets, initrd, hardware)
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RunFailure::new(format!("starting qemu-system-x86_64 (run tests/setup.sh): {e}"), Vec::new()))?;
    let (lines, status) = collect(child, budget, echo, Some(&monitor), false)?;
    if let Some(e) = lines.iter().find(|l| l.contains("@@SANDBOX-ERROR")) {
        return Err(RunFailure::new(format!("sandbox setup failed: {e}\n{}", lines.join("\n")), lines));
    }
    if !lines.iter().any(|l| l.contains("@@SANDBOX-DONE")) {
        // QEMU exits 0 when the sandbox resets (-no-reboot): with no crash report from the
        // sandbox kernel, that is a reset nobody asked for (a triple fault of the sandbox kernel).
        if status == Some(0) && up_at(&lines).is_some() && sandbox_kernel_crashed(&lines).is_none() {
            let last = lines.iter().rev().take(30).rev().cloned().collect::<Vec<_>>().join("\n");
            return Err(RunFailure::new(format!("{RESET} (QEMU exited 0 with no crash report; last output:)\n{last}"), lines));
        }
        return Err(RunFailure::new(format!("{ENDED_EARLY}:\n{}", lines.join("\n")), lines));
    }
    Ok(lines)
}

/// Seconds of sandbox uptime at which its /init started the script, from the console.
pub fn up_at(lines: &[String]) -> Option<f64> {
    lines.iter().find_map(|l| l.split("@@SANDBOX-UP ").nth(1)?.trim().parse().ok())
}

/// Reads a child's output line by line until it exits or `budget` passes (then kills it),
/// echoing every line to stderr as it arrives when `echo`. Returns the lines and the child's
/// exit status (`None` when a signal ended it).
pub fn collect_output(child: Child, budget: Duration, echo: bool) -> Result<(Vec<String>, Option<i32>), RunFailure> {
    collect(child, budget, echo, None, false)
}

/// [`collect_output`] of a VMM process, asked for its vCPUs' state (SIGUSR1) 6 and 3 seconds
/// before its budget runs out, as a [`vmm_step`] does in the sandbox.
pub fn collect_vmm_output(child: Child, budget: Duration, echo: bool) -> Result<(Vec<String>, Option<i32>), RunFailure> {
    collect(child, budget, echo, None, true)
}

/// How long a stalled sandbox is given, after [`diagnose_stall`], to print its backtraces.
const STALL_REPORT_GRACE: Duration = Duration::from_secs(30);

/// [`collect_output`]; when `monitor` (a QEMU sandbox's monitor socket) is given and the budget
/// runs out, the stall is diagnosed first and the sandbox given [`STALL_REPORT_GRACE`] to
/// print its report. The run still fails as out of budget, whatever it prints then.
fn collect(
    mut child: Child,
    budget: Duration,
    echo: bool,
    mut monitor: Option<&Path>,
    ask_state: bool,
) -> Result<(Vec<String>, Option<i32>), RunFailure> {
    let no_pipe = || RunFailure::new("the child has no output pipes".into(), Vec::new());
    let stdout = child.stdout.take().ok_or_else(no_pipe)?;
    let stderr = child.stderr.take().ok_or_else(no_pipe)?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let spawn_reader = |r: Box<dyn Read + Send>, tx: std::sync::mpsc::Sender<String>| {
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            while let Ok(n) = r.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf).replace('\r', "").trim_end_matches('\n').to_string();
                if tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        })
    };
    let readers = [spawn_reader(Box::new(stdout), tx.clone()), spawn_reader(Box::new(stderr), tx)];
    let mut deadline = Instant::now() + budget;
    let mut lines = Vec::new();
    let end = |child: &mut Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    let out_of_budget = |lines: &[String]| {
        // The last 60 lines; after a stall diagnosis, everything from 30 lines before it.
        let from = lines
            .iter()
            .position(|l| l.starts_with("@@STALL-MONITOR"))
            .map_or(lines.len().saturating_sub(60), |p| p.saturating_sub(30));
        let last = lines[from..].join("\n");
        RunFailure::new(format!("{OUT_OF_BUDGET} {} s; last output:\n{last}", budget.as_secs()), lines.to_vec())
    };
    let mut stalled = false;
    // When to ask a VMM for its vCPUs' state: 6 and 3 seconds before the deadline.
    let mut state_asks: Vec<Instant> = if ask_state {
        STATE_REPORT_LEADS.iter().filter_map(|lead| deadline.checked_sub(*lead)).collect()
    } else {
        Vec::new()
    };
    loop {
        if state_asks.first().is_some_and(|t| Instant::now() >= *t) {
            state_asks.remove(0);
            // SAFETY: kill(2) on the child's PID, which cannot be reused before we wait for it.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR1) };
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                if echo {
                    eprintln!("| {l}");
                }
                // A soft-lockup or RCU-stall report from the sandbox kernel is not a verdict:
                // when the host is oversubscribed, QEMU's vCPU threads go unscheduled while
                // the sandbox's clock runs on, and its watchdog then reports an idle CPU
                // (swapper, do_idle) "stuck" for tens of seconds, after which the run goes on
                // (docs/testing.md, "Under load"). Budgets decide whether a run is stuck.
                lines.push(l);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            if let Some(socket) = monitor.take() {
                stalled = true;
                for l in diagnose_stall(socket) {
                    if echo {
                        eprintln!("| {l}");
                    }
                    lines.push(l);
                }
                deadline = Instant::now() + STALL_REPORT_GRACE;
                continue;
            }
            end(&mut child);
            return Err(out_of_budget(&lines));
        }
    }
    for r in readers {
        let _ = r.join();
    }
    if stalled {
        end(&mut child);
        return Err(out_of_budget(&lines));
    }
    match child.wait() {
        Ok(status) => Ok((lines, status.code())),
        Err(e) => Err(RunFailure::new(format!("waiting for the child: {e}"), lines)),
    }
}

/// Asks a sandbox whose budget ran out what it is doing, through its QEMU monitor: every
/// CPU's registers (`info registers -a`: RIP, and HLT=1 for a CPU that is halted), then an
/// NMI to every CPU, which the prologue turns into a panic printing all CPUs' backtraces and
/// the flight recorder on the console. Returns the register lines, each prefixed
/// `@@STALL-MONITOR`; a monitor that does not answer (QEMU itself stuck) is said so.
pub fn diagnose_stall(socket: &Path) -> Vec<String> {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut report = vec![format!("@@STALL-MONITOR out of budget: asking the sandbox through {}", socket.display())];
    let answer = (|| -> std::io::Result<String> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"info registers -a\n")?;
        let mut text = Vec::new();
        let mut buf = [0u8; 8192];
        // The answer ends when the monitor goes quiet (no end marker in the protocol).
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || text.len() > 1 << 20 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"nmi\n")?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    })();
    match answer {
        Ok(text) => report.extend(
            text.lines()
                .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
                .filter(|l| l.starts_with("CPU#") || l.starts_with("RIP=") || l.starts_with("CR0="))
                .map(|l| format!("@@STALL-MONITOR {l}")),
        ),
        Err(e) => report.push(format!("@@STALL-MONITOR the QEMU monitor did not answer: {e}")),
    }
    report
}

/// `ulimit` commands giving what the sandbox's script runs next this process's open-file
/// limits: a program written against the host's (20,000 on our machines; the sandbox's init
/// has 1,024 soft, 4,096 hard) meets the same ones there.
pub fn same_fd_limits() -> String {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return String::new();
    }
    format!("ulimit -Hn {}\nulimit -Sn {}\n", r.rlim_max, r.rlim_cur)
}

/// Script lines that run `command` (already quoted for the shell) as the step `name`, killed
/// when `budget` runs out (busybox `timeout -s KILL`: status 137), its output on the console
/// between `@@STEP name` and `@@STEP-END name STATUS CENTISECONDS` (see [`steps`]).
pub fn step(name: &str, budget: Duration, command: &str) -> String {
    format!(
        "echo '@@STEP {name}'\nt0=$(uptime_cs)\ntimeout -s KILL {} {command} </dev/null 2>&1\nrc=$?\nkvm_flight_record\necho \"@@STEP-END {name} $rc $(( $(uptime_cs) - t0 ))\"\n",
        budget.as_secs()
    )
}

/// [`step`] for a command that *is* a VMM process (busybox's `timeout` execs it, so `$!` is
/// its PID): 6 and 3 seconds before the budget's kill, the step sends it SIGUSR1, on which
/// siovmm has every vCPU print its state (`state of vCPU N: ...`, parsed by [`vcpu_states`]),
/// so a guest that hangs leaves where and in what fault it hung. A step that ends in time
/// sends nothing (its watcher is killed; a `sleep` it leaves behind signals no one).
pub fn vmm_step(name: &str, budget: Duration, command: &str) -> String {
    let secs = budget.as_secs();
    let [first, second] = STATE_REPORT_LEADS.map(|lead| lead.as_secs());
    let (wait, gap) = (secs.saturating_sub(first).max(1), first - second);
    format!(
        "echo '@@STEP {name}'\nt0=$(uptime_cs)\ntimeout -s KILL {secs} {command} </dev/null 2>&1 &\nvmm=$!\n\
         ( sleep {wait}; kill -USR1 $vmm 2>/dev/null; sleep {gap}; kill -USR1 $vmm 2>/dev/null ) &\nreport=$!\n\
         wait $vmm\nrc=$?\nkill $report 2>/dev/null\nkvm_flight_record\n\
         echo \"@@STEP-END {name} $rc $(( $(uptime_cs) - t0 ))\"\n"
    )
}

/// How long before a VMM's budget runs out it is asked for its vCPUs' state, twice (in the
/// sandbox by [`vmm_step`], directly by [`collect_vmm_output`]).
const STATE_REPORT_LEADS: [Duration; 2] = [Duration::from_secs(6), Duration::from_secs(3)];

/// One vCPU's state as siovmm reports it on SIGUSR1 (`vcpu::StateRequests`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// The vCPU.
    pub vcpu: u32,
    /// Where it was.
    pub rip: u64,
    /// The last page-fault address.
    pub cr2: u64,
    /// What the guest's own tables map at RIP (`0xA-0xB rwx` items), as printed.
    pub rip_maps: String,
    /// What they map at CR2.
    pub cr2_maps: String,
    /// How an exception raised in user mode would enter the kernel (`#PF enters at ...;
    /// #DF enters at ...`, or `CANNOT ENTER: why`), as printed.
    pub entry_from_user: String,
}

impl VcpuState {
    /// Whether the guest's tables map CR2 present and executable.
    pub fn cr2_mapped_executable(&self) -> bool {
        maps_executable(&self.cr2_maps, self.cr2)
    }

    /// Whether the guest's tables map RIP present and executable.
    pub fn rip_mapped_executable(&self) -> bool {
        maps_executable(&self.rip_maps, self.rip)
    }

    /// Whether a page fault and a double fault raised in user mode enter the kernel through
    /// mapped IDT gates, handlers and stacks.
    pub fn enters_kernel_from_user(&self) -> bool {
        self.entry_from_user.contains("#PF enters at ") && self.entry_from_user.contains("#DF enters at ")
    }
}

/// Whether a printed list of mappings (`0xA-0xB r-x, ...`) has `address` in an executable one.
fn maps_executable(list: &str, address: u64) -> bool {
    executable_ranges(list).iter().any(|r| r.contains(&address))
}

/// The executable ranges of a mapping list as siovmm prints it (`0xA-0xB r-x, 0xC-0xD rw-`,
/// `arch::paging::Mapping`), in order, adjacent ones merged.
fn executable_ranges(list: &str) -> Vec<std::ops::RangeInclusive<u64>> {
    let mut out: Vec<std::ops::RangeInclusive<u64>> = Vec::new();
    for item in list.split(", ") {
        let mut parts = item.split_whitespace();
        let (Some((a, b)), Some(access)) = (parts.next().and_then(|r| r.split_once('-')), parts.next()) else { continue };
        let (Some(a), Some(b)) = (hex(a), hex(b)) else { continue };
        if !access.ends_with('x') {
            continue;
        }
        match out.last_mut() {
            Some(prev) if prev.end().checked_add(1) == Some(a) => *prev = *prev.start()..=b,
            _ => out.push(a..=b),
        }
    }
    out
}

/// A hexadecimal number, with or without `0x`.
fn hex(v: &str) -> Option<u64> {
    u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
}

/// The hexadecimal number that follows `key` in `line`.
fn hex_after(line: &str, key: &str) -> Option<u64> {
    hex(line.split(key).nth(1)?.split_whitespace().next()?)
}

/// The vCPU state reports siovmm printed in `lines`, in order.
pub fn vcpu_states(lines: &[String]) -> Vec<VcpuState> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.split("state of vCPU ").nth(1)?;
            Some(VcpuState {
                vcpu: rest.split(':').next()?.parse().ok()?,
                rip: hex_after(rest, ": RIP ")?,
                cr2: hex_after(rest, " CR2 ")?,
                rip_maps: rest.split("; RIP maps: ").nth(1)?.split("; CR2 maps: ").next()?.to_string(),
                cr2_maps: rest.split("; CR2 maps: ").nth(1)?.split("; entry from user mode: ").next()?.to_string(),
                entry_from_user: rest.split("; entry from user mode: ").nth(1).unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// How many not-present page faults on an instruction fetch (error code 0x10 in kernel mode,
/// 0x14 in user mode) the flight recorder saw KVM inject, in `lines`.
pub fn injected_fetch_faults(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.starts_with("@@KVM-TRACE") && (l.contains("kvm_inj_exception: #PF (0x10)") || l.contains("kvm_inj_exception: #PF (0x14)")))
        .count()
}

/// What one [`step`] did, read back from the console.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepResult {
    /// The step's name.
    pub name: String,
    /// Its exit status (137 when its budget ran out).
    pub status: Option<i32>,
    /// Seconds it took, by the sandbox's clock.
    pub seconds: Option<f64>,
    /// Console lines it printed.
    pub output: Vec<String>,
}

/// The steps that finished, in order, from a sandbox console.
pub fn steps(lines: &[String]) -> Vec<StepResult> {
    let mut done = Vec::new();
    let mut current: Option<StepResult> = None;
    for line in lines {
        // A marker can follow output that did not end its line: a VMM killed with SIGKILL
        // mid-line, whose output a background step replays before its end marker (seen:
        // devd.rs's `vm-killed`, a step lost in a clean-clone CI run). The text before the
        // marker is the step's output.
        let line = match line.find("@@STEP") {
            Some(at) if at > 0 => {
                if let Some(r) = current.as_mut() {
                    r.output.push(line[..at].to_string());
                }
                &line[at..]
            }
            _ => line.as_str(),
        };
        if let Some(name) = line.strip_prefix("@@STEP ") {
            current = Some(StepResult { name: name.trim().to_string(), ..Default::default() });
        } else if let Some(rest) = line.strip_prefix("@@STEP-END ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(status), Some(cs)) = (parts.next(), parts.next(), parts.next()) else { continue };
            if let Some(mut r) = current.take().filter(|r| r.name == name) {
                r.status = status.parse().ok();
                r.seconds = cs.parse::<f64>().ok().map(|c| c / 100.0);
                done.push(r);
            }
        } else if let Some(r) = current.as_mut() {
            r.output.push(line.to_string());
        }
    }
    done
}

/// A guest shutdown (triple fault) as the flight recorder saw it (`@@KVM-TRACE` lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShutdown {
    /// The vCPU thread's ID (the record's task), which siovmm's triple-fault line names too.
    pub thread: Option<u32>,
    /// The vCPU.
    pub vcpu: u32,
    /// The guest RIP at the shutdown, before KVM reset the vCPU.
    pub rip: u64,
    /// The event the CPU was delivering when it shut down (SVM EXITINTINFO / VMX IDT-vectoring
    /// information: bit 31 valid, bits 10:8 type, bits 7:0 vector).
    pub delivering: u32,
    /// The error code of the exception being delivered (EXITINTINFO's upper half).
    pub error_code: u32,
    /// The sandbox kernel's symbol at `rip` (the guest's too when it runs the same vmlinux).
    pub symbol: Option<String>,
}

impl GuestShutdown {
    /// Whether the CPU shut down while delivering an external interrupt (type 0) to the
    /// guest: the signature of the nested-virtualization failure docs/testing.md describes.
    pub fn while_delivering_external_interrupt(&self) -> Option<u8> {
        (self.delivering & 0x8000_0000 != 0 && (self.delivering >> 8) & 7 == 0).then_some(self.delivering as u8)
    }

    /// Whether the CPU shut down while delivering a page fault whose error code no x86 CPU
    /// produces: RSVD (bit 3) set with P (bit 0) clear. The SDM (Vol. 3A §4.7) rules it out,
    /// since reserved bits are only checked in present entries; KVM's own page walker sets
    /// both bits together (arch/x86/kvm/mmu/paging_tmpl.h); QEMU 7.2's TCG walker sets RSVD
    /// alone (target/i386/tcg/sysemu/excp_helper.c, `do_fault_rsvd`). Such a fault was raised
    /// by the sandbox's emulated MMU, not delivered by KVM or siovmm.
    pub fn while_delivering_impossible_page_fault(&self) -> bool {
        let valid = self.delivering & 0x8000_0000 != 0;
        let exception = (self.delivering >> 8) & 7 == 3;
        let page_fault = self.delivering & 0xff == 14;
        valid && exception && page_fault && self.error_code & 0b1000 != 0 && self.error_code & 1 == 0
    }

    /// Whether the CPU shut down while delivering a page fault on an instruction fetch from a
    /// page it found not present (error code: I/D set; P, RSVD and U/S clear).
    pub fn while_delivering_not_present_fetch_fault(&self) -> bool {
        let valid = self.delivering & 0x8000_0000 != 0;
        let exception = (self.delivering >> 8) & 7 == 3;
        let page_fault = self.delivering & 0xff == 14;
        valid && exception && page_fault && self.error_code & 0b1_1101 == 0b1_0000
    }

    /// Whether the CPU shut down while delivering a page fault on a user-mode instruction fetch
    /// from a page it found not present (error code: I/D and U/S set; P and RSVD clear).
    pub fn while_delivering_user_fetch_fault(&self) -> bool {
        let valid = self.delivering & 0x8000_0000 != 0;
        let exception = (self.delivering >> 8) & 7 == 3;
        let page_fault = self.delivering & 0xff == 14;
        valid && exception && page_fault && self.error_code & 0b1_1101 == 0b1_0100
    }

    /// Whether siovmm's post-mortem of this vCPU (in `lines`) lists the instruction at the
    /// shutdown RIP, all 15 bytes an instruction may span, as mapped present and executable
    /// by the guest's own page tables: the kernel's half under the last kernel-mode root, the
    /// user half under the vCPU's own last root if sampled at most
    /// [`POST_MORTEM_FRESH_MS`] before the fault.
    pub fn post_mortem_maps_code_at_rip(&self, lines: &[String]) -> bool {
        let ranges = post_mortem_executable(lines, self.vcpu);
        let covered = |a: u64| ranges.iter().any(|r| r.contains(&a));
        covered(self.rip) && covered(self.rip.saturating_add(14))
    }

    /// Whether siovmm's post-mortem of this vCPU says a page fault and a double fault raised
    /// in user mode enter the kernel through mapped structures (IDT gate, handler, stack:
    /// `arch::exception_entry`), under the vCPU's own root sampled at most
    /// [`POST_MORTEM_FRESH_MS`] before the fault.
    pub fn post_mortem_user_entry_mapped(&self, lines: &[String]) -> bool {
        post_mortem_own_lines(lines, self.vcpu).any(|l| {
            l.split("entry from user mode: ").nth(1).is_some_and(|e| e.contains("#PF enters at ") && e.contains("#DF enters at "))
        })
    }
}

/// A post-mortem line about a vCPU's own last root counts only when that root was sampled at
/// most this long before the fault: the vCPU could have switched to another process since.
pub const POST_MORTEM_FRESH_MS: u64 = 1000;

/// siovmm's post-mortem lines about `vcpu`'s own last root, sampled recently enough.
fn post_mortem_own_lines(lines: &[String], vcpu: u32) -> impl Iterator<Item = &String> {
    let prefix = format!("post-mortem of vCPU {vcpu}: under its own CR3 ");
    lines.iter().filter(move |l| {
        l.contains(&prefix)
            && l.split("sampled ").nth(1).and_then(|t| t.split(" ms").next()).and_then(|ms| ms.parse::<u64>().ok()).is_some_and(|ms| ms <= POST_MORTEM_FRESH_MS)
    })
}

/// The executable ranges siovmm's triple-fault post-mortem of `vcpu` lists
/// (`siovmm: warn: post-mortem of vCPU N: kernel mappings ...: 0xA-0xB r-x, ...`, and the
/// user mappings under its own root, if fresh), adjacent ones merged.
pub fn post_mortem_executable(lines: &[String], vcpu: u32) -> Vec<std::ops::RangeInclusive<u64>> {
    let kernel = format!("post-mortem of vCPU {vcpu}: kernel mappings ");
    let mut ranges: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(&kernel))
        .take(1)
        .filter_map(|l| l.split("after the fault: ").nth(1))
        .flat_map(executable_ranges)
        .collect();
    ranges.extend(post_mortem_own_lines(lines, vcpu).filter_map(|l| l.split("user mappings ").nth(1)).flat_map(executable_ranges));
    ranges
}

/// The guest shutdowns the flight recorder reported in `lines`.
pub fn guest_shutdowns(lines: &[String]) -> Vec<GuestShutdown> {
    lines
        .iter()
        .filter(|l| l.starts_with("@@KVM-TRACE") && l.contains(" kvm_exit: ") && l.contains(" reason shutdown "))
        .filter_map(|l| {
            Some(GuestShutdown {
                // "@@KVM-TRACE vcpu0-138 [001] ...": the thread is the task name's PID suffix.
                thread: l.split_whitespace().nth(1).and_then(|t| t.rsplit_once('-')).and_then(|(_, tid)| tid.parse().ok()),
                vcpu: l.split(" kvm_exit: vcpu ").nth(1)?.split_whitespace().next()?.parse().ok()?,
                rip: hex_after(l, " rip ")?,
                delivering: hex_after(l, " intr_info ")? as u32,
                error_code: hex_after(l, " error_code ").unwrap_or(0) as u32,
                symbol: l.split("(sandbox kernel symbol: ").nth(1).map(|s| s.trim_end_matches(')').to_string()),
            })
        })
        .collect()
}

/// Quotes `arg` for the sandbox's shell.
pub fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_read_back_one_by_one() {
        let script = step("a", Duration::from_secs(20), "/bin/true");
        assert!(script.contains("timeout -s KILL 20 /bin/true </dev/null 2>&1"), "{script}");
        let console: Vec<String> = [
            "noise",
            "@@STEP a",
            "running 1 test",
            "@@STEP-END a 0 123",
            "between steps",
            "@@STEP b",
            "thread panicked at boom",
            "@@STEP-END b 137 6000",
            // A killed VMM's last line, cut short, then the end marker on the same line.
            "@@STEP k",
            "GUEST-LOOP-RESULT 1 0000:00:01.0: PA@@STEP-END k 137 12",
            "@@STEP c",
            "never ended",
        ]
        .map(String::from)
        .to_vec();
        let r = steps(&console);
        assert_eq!(r.len(), 3, "a step without its end is not reported");
        assert_eq!((r[0].name.as_str(), r[0].status, r[0].output.as_slice()), ("a", Some(0), ["running 1 test".to_string()].as_slice()));
        assert!((r[0].seconds.unwrap() - 1.23).abs() < 1e-9);
        assert_eq!((r[1].name.as_str(), r[1].status), ("b", Some(137)));
        assert_eq!((r[2].name.as_str(), r[2].status, r[2].output.as_slice()), ("k", Some(137), ["GUEST-LOOP-RESULT 1 0000:00:01.0: PA".to_string()].as_slice()));
    }

    #[test]
    fn vmm_steps_ask_for_the_vcpus_state_before_the_kill() {
        let script = vmm_step("g", Duration::from_secs(60), "/siovmm --x");
        assert!(script.contains("timeout -s KILL 60 /siovmm --x </dev/null 2>&1 &\nvmm=$!\n"), "{script}");
        assert!(script.contains("( sleep 54; kill -USR1 $vmm 2>/dev/null; sleep 3; kill -USR1 $vmm"), "{script}");
        assert!(script.contains("wait $vmm\nrc=$?\nkill $report"), "{script}");
        assert!(vmm_step("g", Duration::from_secs(2), "x").contains("( sleep 1;"), "never a negative sleep");
        // Read back like any step.
        let console: Vec<String> = ["@@STEP g", "x", "@@STEP-END g 137 6000"].map(String::from).to_vec();
        assert_eq!(steps(&console)[0].status, Some(137));
    }

    #[test]
    fn vcpu_state_reports_and_fetch_fault_records_are_read_back() {
        let console: Vec<String> = [
            "@@KVM-TRACE vcpu0-445 [000] .....    97.626203: kvm_inj_exception: #PF (0x10)",
            "@@KVM-TRACE vcpu0-445 [000] .....    97.626295: kvm_inj_exception: #PF (0x14)",
            "@@KVM-TRACE vcpu0-445 [000] .....    97.626296: kvm_inj_exception: #PF (0x11)",
            "@@KVM-TRACE vcpu0-445 [000] .....    97.626297: kvm_inj_exception: #GP (0x0)",
            "siovmm: warn: state of vCPU 1: RIP 0xffffffff8107505b CPL 0 RFLAGS 0x2 CR0 0x80050033 CR2 0xffffffff8107505b \
             CR3 0x2000 CR4 0x350ef0 EFER 0xd01; delivering: exception injected 14 error 0x10; \
             RIP maps: 0xffffffff81000000-0xffffffff811fffff r-x; CR2 maps: 0xffffffff81000000-0xffffffff811fffff r-x",
            "siovmm: warn: state of vCPU 0: RIP 0x40f2ea CPL 3 RFLAGS 0x2 CR0 0x80050033 CR2 0x40f2ea CR3 0x2000 \
             CR4 0x350ef0 EFER 0xd01; delivering: none; RIP maps: nothing; CR2 maps: nothing",
            "siovmm: warn: state of vCPU 0: RIP 0x40f2ea CPL 3 RFLAGS 0x2 CR0 0x80050033 CR2 0x40f2ea CR3 0x2000 \
             CR4 0x350ef0 EFER 0xd01; delivering: none; RIP maps: 0x40f000-0x40ffff rw-; CR2 maps: 0x40f000-0x40ffff rw-; \
             entry from user mode: #PF enters at 0xffffffff81a00b20 on stack 0xfffffe0000003000 (RSP0); #DF enters at 0xffffffff81a01060 on stack 0xfffffe000000c000 (IST2)",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(injected_fetch_faults(&console), 2, "kernel and user fetches, not present; nothing else");
        let states = vcpu_states(&console);
        assert_eq!(states.len(), 3);
        assert_eq!((states[0].vcpu, states[0].rip, states[0].cr2), (1, 0xffff_ffff_8107_505b, 0xffff_ffff_8107_505b));
        assert!(states[0].cr2_mapped_executable());
        assert!(states[0].rip_mapped_executable());
        assert_eq!(states[2].rip_maps, "0x40f000-0x40ffff rw-");
        assert!(!states[2].rip_mapped_executable());
        assert!(!states[1].cr2_mapped_executable(), "nothing mapped");
        assert!(!states[2].cr2_mapped_executable(), "mapped, not executable");
        assert!(states[2].enters_kernel_from_user() && !states[1].enters_kernel_from_user());
    }

    #[test]
    fn a_fetch_fault_on_code_the_post_mortem_maps() {
        let shutdown = |rip: u64, error_code: u32| GuestShutdown { thread: None, vcpu: 1, rip, delivering: 0x8000_0b0e, error_code, symbol: None };
        let console: Vec<String> = [
            "siovmm: warn: post-mortem of vCPU 0: kernel mappings under CR3 0x2000 (sampled 1 ms before), read from guest memory after the fault: 0xffffffff81000000-0xffffffff811fffff r-x",
            "siovmm: warn: post-mortem of vCPU 1: kernel mappings under CR3 0x1000 (sampled 3 ms before), read from guest memory after the fault: \
             0xffffffff81000000-0xffffffff811fffff r-x, 0xffffffff81200000-0xffffffff81200fff r-x, 0xffffffff81201000-0xffffffff81201fff rw-",
            "siovmm: triple fault on vCPU 1 at RIP unknown (KVM reset the vCPU)",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(post_mortem_executable(&console, 1), [0xffff_ffff_8100_0000..=0xffff_ffff_8120_0fff]);
        assert!(shutdown(0xffff_ffff_8107_505b, 0x10).while_delivering_not_present_fetch_fault());
        assert!(!shutdown(0xffff_ffff_8107_505b, 0x11).while_delivering_not_present_fetch_fault(), "protection fault");
        assert!(!shutdown(0xffff_ffff_8107_505b, 0x18).while_delivering_not_present_fetch_fault(), "RSVD");
        assert!(!shutdown(0xffff_ffff_8107_505b, 0x02).while_delivering_not_present_fetch_fault(), "a write");
        assert!(shutdown(0xffff_ffff_8107_505b, 0x10).post_mortem_maps_code_at_rip(&console));
        assert!(shutdown(0xffff_ffff_811f_fff8, 0x10).post_mortem_maps_code_at_rip(&console), "across two listed ranges");
        assert!(!shutdown(0xffff_ffff_8120_0ff8, 0x10).post_mortem_maps_code_at_rip(&console), "runs into a non-executable page");
        assert!(!shutdown(0xffff_ffff_c035_120c, 0x10).post_mortem_maps_code_at_rip(&console), "nothing mapped there");
        let other_vcpu = GuestShutdown { vcpu: 2, ..shutdown(0xffff_ffff_8107_505b, 0x10) };
        assert!(!other_vcpu.post_mortem_maps_code_at_rip(&console), "no post-mortem of that vCPU");
    }

    #[test]
    fn a_user_fetch_fault_on_code_and_an_entry_the_post_mortem_maps() {
        // The CI of eef6230 (tests/tests/boot.rs, the hung-guest case): vCPU 1 shut down at
        // busybox's RIP 0x530cc4 delivering #PF with error code 0x14.
        let shutdown = |rip: u64, error_code: u32| GuestShutdown { thread: None, vcpu: 1, rip, delivering: 0x8000_0b0e, error_code, symbol: None };
        let own = |ms: u32, rest: &str| {
            format!("siovmm: warn: post-mortem of vCPU 1: under its own CR3 0x1ffbc000 (CPL 3, sampled {ms} ms before), read from guest memory after the fault: {rest}")
        };
        let entered = "entry from user mode: #PF enters at 0xffffffff81a00b20 on stack 0xfffffe0000003000 (RSP0); \
                       #DF enters at 0xffffffff81a01060 on stack 0xfffffe000000c000 (IST2)";
        let console = |ms: u32, entry: &str| -> Vec<String> {
            vec![
                "siovmm: warn: post-mortem of vCPU 1: kernel mappings under CR3 0x2a10000 (sampled 2 ms before), read from guest memory after the fault: 0xffffffff81000000-0xffffffff81e01fff r-x".into(),
                own(ms, "user mappings 0x400000-0x5c2fff r-x, 0x5c3000-0x5f0fff rw-"),
                own(ms, entry),
            ]
        };
        let fault = shutdown(0x530cc4, 0x14);
        assert!(fault.while_delivering_user_fetch_fault());
        assert!(!fault.while_delivering_not_present_fetch_fault(), "the kernel-mode signature is another");
        assert!(!shutdown(0x530cc4, 0x15).while_delivering_user_fetch_fault(), "protection fault");
        assert!(!shutdown(0x530cc4, 0x06).while_delivering_user_fetch_fault(), "a write");
        assert!(!shutdown(0x530cc4, 0x10).while_delivering_user_fetch_fault(), "supervisor");
        let good = console(2, entered);
        assert_eq!(post_mortem_executable(&good, 1), [0xffff_ffff_8100_0000..=0xffff_ffff_81e0_1fff, 0x40_0000..=0x5c_2fff]);
        assert!(fault.post_mortem_maps_code_at_rip(&good) && fault.post_mortem_user_entry_mapped(&good));
        assert!(!shutdown(0x5c_3000, 0x14).post_mortem_maps_code_at_rip(&good), "data, not code");
        let stale = console(1500, entered);
        assert!(!fault.post_mortem_maps_code_at_rip(&stale), "a sample 1.5 s old may be another process's");
        assert!(!fault.post_mortem_user_entry_mapped(&stale));
        let broken = console(2, "entry from user mode: #PF CANNOT ENTER: handler 0xffffffff81a00b20 not mapped; #DF enters at 0x1 on stack 0x2 (IST2)");
        assert!(fault.post_mortem_maps_code_at_rip(&broken));
        assert!(!fault.post_mortem_user_entry_mapped(&broken), "a guest whose own entry is broken");
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn only_a_sandbox_that_never_reached_its_script_never_started() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(never_started(&lines(&[])));
        assert!(never_started(&lines(&["[    1.0] Linux version 6.1", "[    2.0] Freeing initrd memory"])));
        assert!(!never_started(&lines(&["@@SANDBOX-UP 3.74", "siovmm: triple fault on vCPU 1"])));
    }

    #[test]
    fn sandbox_kernel_crashes_are_recognised() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let crash = lines(&["@@SANDBOX-UP 3.4", "[  113.776929] BUG: TASK stack guard page was hit at 000000009ee0a561", "[  116.3] Kernel panic - not syncing: corrupted stack end"]);
        assert_eq!(sandbox_kernel_crashed(&crash).as_deref(), Some("[  113.776929] BUG: TASK stack guard page was hit at 000000009ee0a561"));
        // A guest's or a test's words are not the sandbox kernel's.
        assert!(sandbox_kernel_crashed(&lines(&["GUEST-DMESG: BUG: something", "siovmm: Kernel panic - not syncing"])).is_none());
        assert!(sandbox_kernel_crashed(&lines(&["[   26.4] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"])).is_none());
    }

    #[test]
    fn what_is_run_once_more() {
        let failure = |message: &str, l: &[&str]| RunFailure::new(message.into(), l.iter().map(|s| s.to_string()).collect());
        let up = "@@SANDBOX-UP 3.4";
        let crash = "[  113.7] BUG: TASK stack guard page was hit";
        assert!(rerun_reason(&failure(ENDED_EARLY, &["[ 1.0] Linux version"])).is_some_and(|r| !r.unproven && r.why.contains("never started")));
        assert!(rerun_reason(&failure(ENDED_EARLY, &[up, crash])).is_some_and(|r| !r.unproven && r.why.contains("kernel crashed")));
        assert!(rerun_reason(&failure(OUT_OF_BUDGET, &[up])).is_some_and(|r| r.unproven && r.why.starts_with("UNEXPLAINED")));
        let stall = "@@STALL-MONITOR out of budget: asking the sandbox through /tmp/m.sock";
        let int3 = "[    4.856931] RIP: 0010:asm_exc_int3+0x0/0x40";
        assert!(rerun_reason(&failure(OUT_OF_BUDGET, &[up, stall, int3])).is_some_and(|r| !r.unproven && r.why.contains("breakpoint")));
        // The breakpoint must be in the diagnosis, not anywhere before it.
        assert!(rerun_reason(&failure(OUT_OF_BUDGET, &[up, int3, stall])).is_some_and(|r| r.unproven && r.why.starts_with("UNEXPLAINED")));
        assert!(rerun_reason(&failure(RESET, &[up])).is_some_and(|r| !r.unproven && r.why.contains("reset itself")));
        // A guest's crash inside a sandbox that ran on is not the sandbox's.
        assert!(rerun_reason(&failure(OUT_OF_BUDGET, &[up, crash])).is_some_and(|r| r.unproven && r.why.starts_with("UNEXPLAINED")));
        assert!(rerun_reason(&failure(ENDED_EARLY, &[up, "GUEST-X=1"])).is_none());
        assert!(rerun_reason(&failure("sandbox setup failed: @@SANDBOX-ERROR insmod kvm", &[up])).is_none());
        }

    #[test]
    fn a_final_failure_ends_with_a_line_per_attempt() {
        let lines = ["@@SANDBOX-UP 3.4", "[   34.2] Kernel panic - not syncing: stack-protector"].map(String::from).to_vec();
        let f = RunFailure::new(format!("{ENDED_EARLY}:\n(transcript)"), lines);
        let tried = ["retrying: the sandbox machine reset itself, with no crash report from its kernel".to_string()];
        let m = with_attempts_summary(f, &tried).message;
        let tail: Vec<&str> = m.lines().rev().take(2).collect();
        assert_eq!(tail[1], format!("siovmm-sandbox: attempt 2 failed: {ENDED_EARLY}:; the sandbox kernel's report: [   34.2] Kernel panic - not syncing: stack-protector"));
        assert_eq!(tail[0], format!("siovmm-sandbox: attempt 1 failed, then {}", tried[0]));
    }

    #[test]
    fn guest_shutdowns_are_read_from_the_flight_recorder() {
        let lines: Vec<String> = [
            "@@KVM-TRACE vcpu0-161     [000] .....    50.506991: kvm_inj_exception: #UD",
            "@@KVM-TRACE vcpu0-161     [000] .....    52.356979: kvm_exit: vcpu 0 reason shutdown rip 0xffffffff81a592eb info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x800000ec error_code 0x00000000 (sandbox kernel symbol: native_safe_halt)",
            "@@KVM-TRACE kvm_tests::trip-101     [001] .....     5.341016: kvm_exit: vcpu 1 reason shutdown rip 0x1000 info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x80000306 error_code 0x00000000",
            "@@KVM-TRACE vcpu1-119     [000] .....    34.317683: kvm_exit: vcpu 1 reason shutdown rip 0xffffffff8107e916 info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x80000b0e error_code 0x00000018 (sandbox kernel symbol: native_write_msr)",
            "@@KVM-TRACE vcpu1-119     [000] .....    34.317683: kvm_exit: vcpu 1 reason shutdown rip 0xffffffffc035120c info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x80000b0e error_code 0x00000010",
            "@@KVM-TRACE vcpu1-119     [000] .....    34.317683: kvm_exit: vcpu 1 reason shutdown rip 0xffffffffc035120c info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x80000b0e error_code 0x00000019",
            "guest output mentioning reason shutdown rip 0x1",
        ]
        .map(String::from)
        .to_vec();
        let s = guest_shutdowns(&lines);
        assert_eq!(s.len(), 5);
        assert_eq!((s[0].vcpu, s[0].rip, s[0].symbol.as_deref()), (0, 0xffff_ffff_81a5_92eb, Some("native_safe_halt")));
        assert_eq!(s[0].while_delivering_external_interrupt(), Some(0xec));
        // A #UD (type 3, exception) being delivered: a guest's own exception cascade.
        assert_eq!((s[1].vcpu, s[1].rip, s[1].symbol.as_deref()), (1, 0x1000, None));
        assert_eq!(s[1].while_delivering_external_interrupt(), None);
        // Page faults: RSVD without P is impossible on hardware; not-present and RSVD with P
        // are ordinary.
        assert_eq!(s[2].error_code, 0x18);
        let impossible: Vec<bool> = s.iter().map(GuestShutdown::while_delivering_impossible_page_fault).collect();
        assert_eq!(impossible, [false, false, true, false, false]);
    }

    #[test]
    fn a_stall_is_diagnosed_through_the_monitor() {
        use std::io::Write;
        let dir = WorkDir::new("stall-test").unwrap();
        let socket = dir.0.join("monitor.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // A fake QEMU monitor: the banner, the registers of two CPUs, then whatever is asked next.
        let monitor = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut asked = vec![0u8; 18];
            s.write_all(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ").unwrap();
            s.read_exact(&mut asked).unwrap();
            assert_eq!(&asked, b"info registers -a\n");
            for cpu in 0..2 {
                write!(s, "\r\nCPU#{cpu}\r\nRAX=0 RBX=0\r\nRIP=ffffffff81a592eb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\nCR0=80050033 CR2=0\r\n").unwrap();
            }
            let mut next = Vec::new();
            s.read_to_end(&mut next).unwrap();
            String::from_utf8(next).unwrap()
        });
        let report = diagnose_stall(&socket);
        assert_eq!(monitor.join().unwrap(), "nmi\n");
        assert_eq!(report.iter().filter(|l| l.starts_with("@@STALL-MONITOR RIP=ffffffff81a592eb") && l.ends_with("HLT=1")).count(), 2, "{report:?}");
        assert_eq!(report.iter().filter(|l| l.starts_with("@@STALL-MONITOR CPU#")).count(), 2, "{report:?}");
        assert!(!report.iter().any(|l| l.contains("RAX")), "{report:?}");

        let silent = diagnose_stall(&dir.0.join("absent.sock"));
        assert!(silent.iter().any(|l| l.contains("the QEMU monitor did not answer")), "{silent:?}");
    }

    #[test]
    fn output_past_the_budget_is_unfinished() {
        let child = Command::new("sh")
            .args(["-c", "echo first; sleep 5; echo never"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let RunFailure { message: e, lines } = collect_output(child, Duration::from_millis(500), false).unwrap_err();
        assert_eq!(lines, ["first"]);
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(e.starts_with(UNFINISHED) && e.contains("first") && !e.contains("never"), "{e}");
    }
}
