//! Harness for tests that boot real Linux guests under siovmm.
//!
//! Where a guest runs is decided here, once: **directly** on the host's /dev/kvm when it can
//! run an unmodified Linux kernel, otherwise inside the **nested QEMU-TCG sandbox** (a stock
//! Debian kernel whose own KVM, nested SVM, runs siovmm; the `siovmm-sandbox` crate and
//! docs/sandbox.md). All guest cases of one call share one sandbox boot. Override
//! with `SIOVMM_GUEST_MODE=direct` or `=sandbox`; `SIOVMM_HIDE_KVM=1` also means the sandbox.
//!
//! Every case runs under a time budget derived from its work (boot, ADIs, declared extra;
//! `siovmm_sandbox::budget`), and so does the sandbox as a whole.
//!
//! A case's guest prints `KEY=value` lines from its /init; results are parsed from the console.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use siovmm_sandbox::machine::{self, shell_quote, Hardware, SandboxImage, WorkDir};
use siovmm_sandbox::{budget, cpio, host_kvm};

pub use siovmm_sandbox::Assets;

/// What guest boots need beyond the sandbox itself (all made by tests/setup.sh).
pub const GUEST_FILES: &[&str] = &["vmlinux", "siovmm", "siov_adi.ko"];

/// Finds the assets guest boots need.
pub fn guest_assets() -> Result<Assets, String> {
    Assets::locate(GUEST_FILES)
}

/// Which image of the guest kernel to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// ELF vmlinux (PVH entry).
    Vmlinux,
    /// bzImage.
    BzImage,
}

impl Kernel {
    fn file(self) -> &'static str {
        match self {
            Kernel::Vmlinux => "vmlinux",
            Kernel::BzImage => "bzImage",
        }
    }
}

/// One siovmm run.
#[derive(Debug, Clone)]
pub struct GuestCase {
    /// Identifier (letters, digits, '-').
    pub name: String,
    /// Kernel image.
    pub kernel: Kernel,
    /// `--cpus`.
    pub cpus: u8,
    /// `--memory`.
    pub memory: String,
    /// `--cmdline`.
    pub cmdline: String,
    /// Shell script run as the guest's /init (after the common prologue).
    pub init: String,
    /// Further files for the guest's initramfs: (path, mode, contents).
    pub files: Vec<(String, u32, Vec<u8>)>,
    /// Further siovmm arguments (e.g. `--adi 64`).
    pub extra_args: Vec<String>,
    /// The siovmm binary to run (a static build, for the sandbox); `None` is the one
    /// tests/setup.sh built. Benchmarks set it to compare two builds in the same sandbox.
    pub vmm: Option<PathBuf>,
    /// Seconds of work an idle machine spends in this case beyond booting and working on its
    /// ADIs (see [`GuestCase::budget`]).
    pub extra_idle: Duration,
    /// Stop siovmm with SIGTERM after this long (sandbox runs only): for a guest that may
    /// wreck its own way to power off. siovmm then exits 143.
    pub stop_after: Option<Duration>,
    /// Sandbox runs only: start the case and go on to the next at once, so it runs alongside
    /// the cases after it. Its result (output, status) is collected after every other case,
    /// and its `seconds` then count from its start. Its siovmm's PID is in /tmp/NAME.pid.
    pub background: bool,
    /// Sandbox runs only: run this shell script as the step instead of a siovmm (for what a
    /// test does between guests: kill a process, read a daemon's counters). Its budget is
    /// [`budget::work`] of `extra_idle`.
    pub shell: Option<String>,
}

/// The common start of every guest /init: busybox applets, /proc, /sys, /dev, and the
/// boot-timer mark that says userspace was reached.
pub const INIT_PROLOGUE: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
devmem 0xfeb00000 8 123 2>/dev/null
echo GUEST-INIT-REACHED=1
";

impl GuestCase {
    /// A case with the usual defaults: 512M, `console=ttyS0 quiet`, the given /init body.
    pub fn new(name: &str, kernel: Kernel, cpus: u8, init_body: &str) -> Self {
        Self {
            name: name.into(),
            kernel,
            cpus,
            memory: "512M".into(),
            // SIOVMM_GUEST_CMDLINE replaces the default, e.g. to see a verbose boot when debugging.
            cmdline: std::env::var("SIOVMM_GUEST_CMDLINE").unwrap_or_else(|_| "console=ttyS0 quiet panic=-1".into()),
            init: format!("{INIT_PROLOGUE}{init_body}"),
            files: Vec::new(),
            extra_args: Vec::new(),
            vmm: None,
            extra_idle: Duration::ZERO,
            stop_after: None,
            background: false,
            shell: None,
        }
    }

    /// A sandbox step that runs `script` (sh) and takes `idle` on an idle machine.
    pub fn shell(name: &str, script: &str, idle: Duration) -> Self {
        let mut case = Self::new(name, Kernel::Vmlinux, 1, "");
        case.shell = Some(script.into());
        case.extra_idle = idle;
        case
    }

    /// ADIs given to the guest: the sum of its `--adi N` arguments, and one per `--vfio-user`
    /// device (an ADI of the device daemon).
    pub fn adis(&self) -> u32 {
        let own: u32 = self.extra_args.windows(2).filter(|w| w[0] == "--adi").filter_map(|w| w[1].parse::<u32>().ok()).sum();
        own + self.extra_args.iter().filter(|a| *a == "--vfio-user").count() as u32
    }

    /// How long this case may take: [`budget::guest`] of its ADIs and declared extra work
    /// (a shell step: [`budget::work`] of its declared work).
    pub fn budget(&self) -> Duration {
        if self.shell.is_some() {
            budget::work(self.extra_idle)
        } else {
            budget::guest(self.adis(), self.extra_idle)
        }
    }

    fn initramfs(&self, assets: &Assets) -> Result<Vec<u8>, String> {
        let mut c = cpio::busybox_root(&assets.read("busybox")?);
        c.file("init", 0o755, self.init.as_bytes());
        for (path, mode, data) in &self.files {
            c.file(path, *mode, data);
        }
        Ok(c.finish())
    }

    fn args(&self, kernel: &Path, initramfs: &Path) -> Vec<String> {
        vec![
            "--kernel".into(),
            kernel.display().to_string(),
            "--initramfs".into(),
            initramfs.display().to_string(),
            "--cpus".into(),
            self.cpus.to_string(),
            "--memory".into(),
            self.memory.clone(),
            "--cmdline".into(),
            self.cmdline.clone(),
        ]
        .into_iter()
        .chain(self.extra_args.iter().cloned())
        .collect()
    }

    /// Adds the guest test driver (siov_adi.ko, built by tests/setup.sh) at /siov_adi.ko.
    pub fn with_adi_driver(mut self, assets: &Assets) -> Self {
        let driver = assets.read("siov_adi.ko").unwrap_or_else(|e| panic!("{e}"));
        self.files.push(("siov_adi.ko".into(), 0o644, driver));
        self
    }
}

/// What one case printed and how it ended.
#[derive(Debug, Clone, Default)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// siovmm's exit status, if it exited.
    pub exit_code: Option<i32>,
    /// Console and stderr lines, in order.
    pub lines: Vec<String>,
    /// Wall-clock seconds from siovmm's start to its exit.
    pub seconds: Option<f64>,
}

impl CaseResult {
    /// The number of the first `KEY=value` line; panics (with the transcript) without one.
    pub fn number(&self, key: &str) -> u64 {
        self.value(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key}:\n{}", self.transcript()))
    }

    /// The value of the first `KEY=value` line.
    pub fn value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.lines.iter().find_map(|l| l.trim().strip_prefix(prefix.as_str()))
    }

    /// Lines containing `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<&str> {
        self.lines.iter().filter(|l| l.contains(needle)).map(|s| s.as_str()).collect()
    }

    /// Milliseconds from siovmm's start to the guest's /init, from the boot-timer line.
    pub fn boot_timer_ms(&self) -> Option<f64> {
        self.lines.iter().find_map(|l| {
            l.split("siovmm: boot-timer: guest userspace at ")
                .nth(1)?
                .trim()
                .strip_suffix(" ms")?
                .parse()
                .ok()
        })
    }

    /// The whole transcript, for assertion messages.
    pub fn transcript(&self) -> String {
        let mut t = self.lines.join("\n");
        // Status 137: `timeout -s KILL` ended the case at its budget (sandbox) or the harness
        // did (directly). Say so first thing, so a missing value is not mistaken for a wrong one.
        if self.exit_code == Some(137) {
            t.push_str(&format!(
                "\n@@CASE {}: KILLED when its time budget ran out, after {:.0} s (docs/testing.md, Time budgets)",
                self.name,
                self.seconds.unwrap_or(0.0)
            ));
        }
        t
    }
}

/// Where guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On this host's /dev/kvm.
    Direct,
    /// Inside the QEMU-TCG sandbox.
    Sandbox,
}

/// Decides where guests run: `SIOVMM_GUEST_MODE`, else what the host's KVM can do.
pub fn placement() -> Placement {
    match std::env::var("SIOVMM_GUEST_MODE").as_deref() {
        Ok("direct") => Placement::Direct,
        Ok("sandbox") => Placement::Sandbox,
        _ if host_kvm::runs_linux() => Placement::Direct,
        _ => Placement::Sandbox,
    }
}

/// How long the sandbox's own kernel takes to reach a minimal busybox /init right now, in
/// seconds of its uptime: a yardstick of this machine's current speed, the condition under which
/// docs/sandbox.md: 4.0-4.3 s under QEMU 10. `None` where guests run directly.
pub fn sandbox_yardstick() -> Result<Option<f64>, String> {
    if placement() == Placement::Direct {
        return Ok(None);
    }
    let assets = Assets::locate(&[])?;
    let image = SandboxImage::new(&assets)?;
    let lines = machine::run(&assets, image.finish(""), budget::sandbox_boot())?;
    machine::up_at(&lines).map(Some).ok_or_else(|| format!("the sandbox kernel did not report its uptime:\n{}", lines.join("\n")))
}

/// Runs `cases`, all in one sandbox boot or one after another directly.
///
/// A sandbox run is retried in the cases `siovmm_sandbox::machine::run` names (up to twice
/// when the sandbox itself failed: it never reached its script, its kernel crashed or reset;
/// once, marked UNEXPLAINED, a run out of budget), and likewise when a guest triple-faulted or
/// hung with one of the recorded emulator signatures: see
/// [`run_sandbox_again_after_environment_failure`].
/// Other failures are final.
pub fn run_cases(cases: &[GuestCase]) -> Result<Vec<CaseResult>, String> {
    run_cases_with(cases, Retry::AsDocumented)
}

/// [`run_cases`] with no retry at all: for measuring how often boots fail
/// (`siovmm-bench --reliability`).
pub fn run_cases_once(cases: &[GuestCase]) -> Result<Vec<CaseResult>, String> {
    run_cases_with(cases, Retry::Never)
}

/// Whether a failed sandbox run is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    AsDocumented,
    Never,
}

/// Sandbox shell lines: wait (at most `secs`) until the shell `condition` holds.
pub fn wait_until(condition: &str, secs: u32) -> String {
    format!("i=0; until {condition} || [ $i -ge {} ]; do sleep 0.1; i=$((i+1)); done\n", secs * 10)
}

/// Sandbox shell lines that start the device daemon `command` (serving its ADIs in /run/devd)
/// in the background, logging at info level to /tmp/devd.log with its PID in /tmp/devd.pid,
/// wait (at most 20 s) until it serves (its status file names its PID: `siovmm_devd::serving`;
/// the sockets of a daemon killed before are there already) and print `KEY=` the number of
/// sockets there.
pub fn devd_start(command: &str, key: &str) -> String {
    format!(
        "mkdir -p /run/devd\nSIOVMM_LOG=info {command} >> /tmp/devd.log 2>&1 &\necho $! > /tmp/devd.pid\n{}echo {key}=$(ls /run/devd | grep -c sock)\n",
        wait_until("head -1 /run/devd/status 2>/dev/null | grep -qx \"pid $(cat /tmp/devd.pid)\"", 20)
    )
}

/// What a sandbox provides its cases beyond the default: hardware, kernel VFIO, and a setup
/// script run before them.
#[derive(Debug, Clone, Default)]
pub struct SandboxSetup {
    /// Emulated hardware.
    pub hardware: Hardware,
    /// Carry the kernel VFIO modules in (`machine::load_vfio_script` loads them).
    pub vfio: bool,
    /// Shell lines run as the step `sandbox-setup` before the cases (none when empty); what
    /// they print is that step's result.
    pub script: String,
    /// Seconds of work an idle machine spends in the setup script.
    pub script_idle: Duration,
    /// Further files for the sandbox's initramfs (path, mode, contents): programs the setup
    /// script starts, such as the device daemon.
    pub files: Vec<(String, u32, Vec<u8>)>,
}

impl SandboxSetup {
    /// A sandbox whose setup starts the device daemon ([`devd_start`], its result
    /// `SETUP-SOCKETS=`), with `siovmm-devd` (tests/setup.sh builds it) and `files` in it.
    pub fn with_devd(assets: &Assets, command: &str, mut files: Vec<(String, u32, Vec<u8>)>) -> Self {
        let devd = assets.read("siovmm-devd").unwrap_or_else(|e| panic!("{e} (tests/setup.sh builds it)"));
        files.insert(0, ("siovmm-devd".into(), 0o755, devd));
        Self { script: devd_start(command, "SETUP-SOCKETS"), script_idle: Duration::from_secs(2), files, ..Default::default() }
    }

    /// How long the setup step may take (nothing when there is no script).
    fn budget(&self) -> Duration {
        if self.script.is_empty() {
            Duration::ZERO
        } else {
            budget::work(self.script_idle)
        }
    }
}

/// The name of the setup step's result.
pub const SETUP_STEP: &str = "sandbox-setup";

/// Runs `cases` in one sandbox with `setup`, wherever the host's KVM could run them (the
/// hardware exists only there). Returns the setup step's result, then the cases'.
pub fn run_cases_with_setup(cases: &[GuestCase], setup: &SandboxSetup) -> Result<(CaseResult, Vec<CaseResult>), String> {
    let assets = guest_assets()?;
    check_names(cases)?;
    let mut results = run_sandbox_again_after_environment_failure(&assets, cases, setup)?;
    if results.first().map(|r| r.name.as_str()) != Some(SETUP_STEP) {
        return Err(format!("the sandbox did not report its setup step ({SETUP_STEP})"));
    }
    let first = results.remove(0);
    Ok((first, results))
}

fn check_names(cases: &[GuestCase]) -> Result<(), String> {
    for c in cases {
        if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-') || c.name == SETUP_STEP {
            return Err(format!("bad case name {:?}", c.name));
        }
    }
    Ok(())
}

fn run_cases_with(cases: &[GuestCase], retry: Retry) -> Result<Vec<CaseResult>, String> {
    let assets = guest_assets()?;
    check_names(cases)?;
    let setup = SandboxSetup::default();
    match placement() {
        Placement::Direct => run_direct(&assets, cases),
        Placement::Sandbox if retry == Retry::Never => run_sandbox(&assets, cases, retry, &setup),
        Placement::Sandbox => run_sandbox_again_after_environment_failure(&assets, cases, &setup),
    }
}

/// What siovmm prints when a vCPU triple-faulted and AMD's KVM reset it (no RIP survives).
const RESET_TRIPLE_FAULT: &str = "(KVM reset the vCPU)";

/// Runs the sandbox, and again when a guest triple-faulted with one of the signatures the
/// sandbox's flight recorder shows (docs/testing.md, "What the failures were, and the
/// retries"): up to [`machine::PROVEN_RETRIES`] times while every failure was proven to be the
/// environment's, once when one was not (marked UNEXPLAINED). The signatures:
/// - the CPU was delivering an external interrupt: recorded while the emulated CPU delivered
///   the guest's local APIC timer (vector 0xec) to a vCPU halted in `native_safe_halt`, a path
///   of KVM's in-kernel LAPIC and nested SVM under QEMU-TCG that no siovmm code is on. **Not
///   proven to be the environment's**: marked UNEXPLAINED;
/// - the CPU was delivering a page fault whose error code no x86 CPU produces (RSVD without
///   P): raised by QEMU-TCG's own page walker, so the emulated CPU broke the architecture
///   ([`machine::GuestShutdown::while_delivering_impossible_page_fault`]); why its walk met
///   reserved bits is not proven either, so it is marked UNEXPLAINED too;
/// - the CPU was delivering a not-present page fault on an instruction fetch at a RIP that
///   siovmm's post-mortem (the guest's page tables read from its memory after the fault) maps
///   present and executable: the tables say present, the emulated CPU said not present, and
///   Linux never unmaps its own text, so the fault was not raised by the guest's tables.
///   Retried as the environment's;
/// - a not-present fetch where the tables map nothing (a jump into the empty module area), at
///   one of the RIPs where libkrun's guests took the very same fault in the same sandboxes
///   ([`REFERENCE_FETCH_FAULTS`], `siovmm-bench --reliability --together 5`): the
///   emulator's, shown by another VMM, so retried as the environment's. A not-present fetch
///   anywhere else is not.
///
/// Any other triple fault (another event, or none being delivered, or no flight record) fails
/// the test at once. Each failed attempt's whole transcript goes to stderr and the retry log,
/// so every occurrence in CI leaves its evidence, and the last run must pass every check.
///
/// The same when a guest *hung* with the emulator's signature ([`hang_with_emulator_signature`]).
///
/// Why more than once: the project's CI run of 559acbc failed `tests/tests/devd.rs` (15 guest
/// boots in one sandbox) with a proven fetch fault in its first attempt and a second failure in
/// its rerun, as the sandbox-level failures once did (`machine::PROVEN_RETRIES`).
fn run_sandbox_again_after_environment_failure(assets: &Assets, cases: &[GuestCase], setup: &SandboxSetup) -> Result<Vec<CaseResult>, String> {
    let mut tried: Vec<String> = Vec::new();
    loop {
        let results = run_sandbox(assets, cases, Retry::AsDocumented, setup)?;
        let (failed, what, signature) = match triple_fault_with_emulator_signature(&results) {
            Some((failed, signature)) => (failed, "triple fault", signature),
            None => match hang_with_emulator_signature(&results) {
                Some((failed, signature)) => (failed, "hang", signature),
                None => return Ok(results),
            },
        };
        if !may_run_again(&tried, &signature) {
            // The checks fail on this run, with its transcript; the retry log has the others.
            return Ok(results);
        }
        let why = format!("siovmm-tests: guest {what} in case {} {signature} (docs/testing.md)", failed.name);
        siovmm_sandbox::retries::record(&why, &failed.transcript());
        tried.push(why);
    }
}

/// How a retried failure not proven to be the environment's is marked.
const UNEXPLAINED: &str = "UNEXPLAINED";

/// Whether a run that failed with `signature`, after the failures `tried` were each run
/// again, is run again: up to [`machine::PROVEN_RETRIES`] times when every failure was proven
/// to be the environment's, once when any was not.
fn may_run_again(tried: &[String], signature: &str) -> bool {
    let unproven = signature.contains(UNEXPLAINED) || tried.iter().any(|t| t.contains(UNEXPLAINED));
    tried.len() < if unproven { 1 } else { machine::PROVEN_RETRIES }
}

fn run_direct(assets: &Assets, cases: &[GuestCase]) -> Result<Vec<CaseResult>, String> {
    let dir = WorkDir::new("guest")?;
    let mut results = Vec::new();
    for case in cases {
        if case.stop_after.is_some() || case.background || case.shell.is_some() {
            return Err(format!("case {}: stop_after, background and shell are for sandbox runs only", case.name));
        }
        let initrd = dir.0.join(format!("{}.cpio", case.name));
        std::fs::write(&initrd, case.initramfs(assets)?).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let child = Command::new(case.vmm.clone().unwrap_or_else(|| assets.path("siovmm")))
            .args(case.args(&assets.path(case.kernel.file()), &initrd))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting siovmm: {e}"))?;
        let verbose = std::env::var_os("SIOVMM_TEST_VERBOSE").is_some();
        // Killed at its budget: status 137, as `timeout -s KILL` gives in the sandbox.
        let (lines, exit_code) = match machine::collect_vmm_output(child, case.budget(), verbose) {
            Ok(done) => done,
            Err(f) if f.out_of_budget() => (f.lines, Some(137)),
            Err(f) => return Err(format!("case {}: {}", case.name, f.message)),
        };
        results.push(CaseResult { name: case.name.clone(), exit_code, lines, seconds: Some(start.elapsed().as_secs_f64()) });
    }
    Ok(results)
}

/// A case's siovmm arguments inside the sandbox, quoted for the shell.
fn sandbox_args(case: &GuestCase) -> String {
    case.args(Path::new(&format!("/guest/{}", case.kernel.file())), Path::new(&format!("/guest/{}.cpio", case.name)))
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a case's siovmm binary is inside the sandbox.
fn sandbox_vmm(case: &GuestCase) -> String {
    match case.vmm {
        Some(_) => format!("/vmm/{}", case.name),
        None => "/siovmm".into(),
    }
}

/// The sandbox script: every case a [`machine::step`] under its own budget (status 137 when it
/// runs out).
fn sandbox_script(cases: &[GuestCase], setup: &SandboxSetup) -> String {
    let mut s = String::from(
        "echo \"@@SANDBOX-INFO thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled) defrag=$(cat /sys/kernel/mm/transparent_hugepage/defrag)\"
",
    );
    // Debugging hook: shell commands to run in the sandbox before the cases.
    if let Ok(prelude) = std::env::var("SIOVMM_SANDBOX_PRELUDE") {
        s.push_str(&prelude);
        s.push('\n');
    }
    if std::env::var_os("SIOVMM_TRACE_STARTUP").is_some() {
        s.push_str("export SIOVMM_TRACE_STARTUP=1\n");
    }
    if !setup.script.is_empty() {
        s.push_str(&machine::step(SETUP_STEP, setup.budget(), "sh /setup.sh"));
    }
    for case in cases {
        if case.shell.is_some() {
            s.push_str(&machine::step(&case.name, case.budget(), &format!("sh /steps/{}.sh", case.name)));
            continue;
        }
        let stop = case.stop_after.map(|d| format!("timeout -s TERM {} ", d.as_secs())).unwrap_or_default();
        let command = format!("{stop}{} {}", sandbox_vmm(case), sandbox_args(case));
        if case.background {
            // Started now, under its own budget. busybox's timeout execs the command in its own
            // process (a child does the timing), so $! is siovmm's PID.
            let n = &case.name;
            s.push_str(&format!(
                "timeout -s KILL {} {command} </dev/null > /tmp/{n}.out 2>&1 &\nbg_{}=$!\necho $! > /tmp/{n}.pid\n",
                case.budget().as_secs(),
                n.replace('-', "_")
            ));
            continue;
        }
        s.push_str(&machine::vmm_step(&case.name, case.budget(), &command));
        s.push_str("echo \"@@SANDBOX-INFO $(grep -E '^thp_fault_(alloc|fallback) ' /proc/vmstat | tr '\\n' ' ') $(grep MemFree /proc/meminfo)\"\n");
    }
    // Background cases report last: each waits for its process (within its budget, which
    // its own timeout enforces) and replays what it printed as its step's output.
    for case in cases.iter().filter(|c| c.background) {
        let (n, var) = (&case.name, case.name.replace('-', "_"));
        // Its guest's flight records were printed by whichever step ended after them: all of
        // them, kept in /tmp/flight.log (the ones not yet collected are added to it first,
        // printed once), go with it too (each names its vCPU thread, which ties it to one VM).
        s.push_str(&format!(
            "echo '@@STEP {n}'\nt0=$(uptime_cs)\nwait $bg_{var}\nrc=$?\ncat /tmp/{n}.out\nkvm_flight_record > /dev/null\n\
             [ -f /tmp/flight.log ] && sed 's/^/@@KVM-TRACE /' /tmp/flight.log\necho \"@@STEP-END {n} $rc $(( $(uptime_cs) - t0 ))\"\n"
        ));
    }
    s
}

/// The sandbox's initramfs: the static siovmm (and any other build a case names), the guest
/// kernels the cases use, and each case's initramfs.
fn sandbox_image(assets: &Assets, cases: &[GuestCase]) -> Result<SandboxImage, String> {
    let mut image = SandboxImage::new(assets)?;
    image.file("siovmm", 0o755, &assets.read("siovmm")?);
    for case in cases {
        if let Some(path) = &case.vmm {
            let binary = std::fs::read(path).map_err(|e| format!("reading siovmm binary {}: {e}", path.display()))?;
            image.file(&format!("vmm/{}", case.name), 0o755, &binary);
        }
    }
    let mut kernels: Vec<Kernel> = cases.iter().filter(|c| c.shell.is_none()).map(|c| c.kernel).collect();
    kernels.sort_by_key(|k| k.file());
    kernels.dedup();
    for k in kernels {
        image.file(&format!("guest/{}", k.file()), 0o644, &assets.read(k.file())?);
    }
    for case in cases {
        match &case.shell {
            Some(script) => image.file(&format!("steps/{}.sh", case.name), 0o755, script.as_bytes()),
            None => image.file(&format!("guest/{}.cpio", case.name), 0o644, &case.initramfs(assets)?),
        };
    }
    Ok(image)
}

/// Instruction addresses of the stock guest kernel (target/guest-assets, Debian 6.1.0-56) where
/// guests of the reference VMM, libkrun, triple-faulted with a not-present instruction fetch in
/// the sandbox, exactly as siovmm's guests did (2026-11-23, docs/testing.md "Guests side by
/// side"): the module area of a kernel that loaded no module, so nothing is mapped there.
pub const REFERENCE_FETCH_FAULTS: [u64; 2] = [0xffff_ffff_c035_120c, 0xffff_ffff_c035_320c];

/// The first case whose guest triple-faulted (KVM reset the vCPU) with a signature of the
/// emulator in the flight record, and that signature in words.
fn triple_fault_with_emulator_signature(results: &[CaseResult]) -> Option<(&CaseResult, String)> {
    results.iter().find_map(|r| {
        let fault = r.lines.iter().find(|l| l.contains("siovmm: triple fault on vCPU") && l.contains(RESET_TRIPLE_FAULT))?;
        // With guests running side by side, only the records of this VM's faulting vCPU thread.
        let thread: Option<u32> = fault.split("(thread ").nth(1).and_then(|t| t.split(')').next()).and_then(|t| t.parse().ok());
        let shutdowns = machine::guest_shutdowns(&r.lines);
        let signature = shutdowns.iter().filter(|s| thread.is_none() || s.thread.is_none() || s.thread == thread).find_map(|s| {
            if let Some(vector) = s.while_delivering_external_interrupt() {
                Some(format!("{UNEXPLAINED}: the CPU was delivering interrupt vector {vector:#x}"))
            } else if s.while_delivering_impossible_page_fault() {
                Some(format!(
                    "{UNEXPLAINED}: the emulated CPU was delivering a page fault with error code {:#x}, which no x86 \
                     CPU produces (RSVD without P: QEMU-TCG's page walker)",
                    s.error_code
                ))
            } else if s.while_delivering_not_present_fetch_fault() && s.post_mortem_maps_code_at_rip(&r.lines) {
                Some(format!(
                    "(the environment's): the emulated CPU raised a not-present page fault fetching the instruction at \
                     {:#x}{}, which the guest's own page tables, read from its memory after the fault (siovmm's \
                     post-mortem), map present and executable",
                    s.rip,
                    s.symbol.as_deref().map(|x| format!(" ({x})")).unwrap_or_default()
                ))
            } else if s.while_delivering_user_fetch_fault()
                && s.post_mortem_maps_code_at_rip(&r.lines)
                && s.post_mortem_user_entry_mapped(&r.lines)
            {
                Some(format!(
                    "(the environment's): the emulated CPU raised a not-present page fault fetching the user-mode \
                     instruction at {:#x}, which the process's own page tables map present and executable, and could \
                     not deliver it although that vCPU's IDT gates, handlers and stacks for #PF and #DF are mapped \
                     (siovmm's post-mortem, read from guest memory after the fault)",
                    s.rip
                ))
            } else if s.while_delivering_not_present_fetch_fault() && REFERENCE_FETCH_FAULTS.contains(&s.rip) {
                Some(format!(
                    "(the environment's): the emulated CPU raised a not-present page fault fetching the instruction at \
                     {:#x}, where guests of the reference VMM (libkrun) took the same fault in the same sandbox",
                    s.rip
                ))
            } else {
                None
            }
        })?;
        Some((r, signature))
    })
}

/// At least this many not-present instruction-fetch faults injected into a guest that then
/// hung. Boots that go well have KVM inject none (tests/tests/boot.rs's five guests: five
/// #UD, no #PF, 2026-11-23); the hang seen had thousands.
const HANG_FETCH_FAULTS: usize = 100;

/// A case killed at its budget whose guest was stuck on one instruction fetch the CPU kept
/// calling not present while the guest's own page tables map it present and executable
/// (docs/testing.md, "A guest stuck on a fetch fault"). All of:
/// - the flight recorder saw KVM inject at least [`HANG_FETCH_FAULTS`] not-present fetch
///   faults during the case;
/// - every one (at least two, 3 s apart) of siovmm's state reports of some vCPU has it at
///   RIP == CR2: at the very instruction whose fetch faulted last, not past it;
/// - those reports say the guest's tables, read from its memory, map that address present
///   and executable.
///
/// After a page fault the CPU drops its translations of the faulting address (Intel SDM
/// Vol. 3A §4.10.4.1), so fetching again from a page the tables map present succeeds on a
/// correct CPU whatever the guest's handler did; a vCPU that stays put on such a fetch for
/// seconds is the emulated CPU's doing (QEMU-TCG's nested SVM). Retried as the
/// environment's.
fn hang_with_emulator_signature(results: &[CaseResult]) -> Option<(&CaseResult, String)> {
    results.iter().find_map(|r| {
        if r.exit_code != Some(137) {
            return None;
        }
        let faults = machine::injected_fetch_faults(&r.lines);
        if faults < HANG_FETCH_FAULTS {
            return None;
        }
        let states = machine::vcpu_states(&r.lines);
        // A vCPU's first report, when every report of it shows it stuck there.
        let s = states.iter().find(|first| {
            let mut mine = states.iter().filter(|s| s.vcpu == first.vcpu);
            mine.clone().count() >= 2 && mine.all(|s| s.rip == s.cr2 && s.cr2_mapped_executable() && s.cr2 == first.cr2)
        })?;
        let stuck = s.vcpu;
        Some((
            r,
            format!(
                "(the environment's): hung while KVM injected {faults} not-present instruction-fetch faults; every \
                 state report had vCPU {stuck} at RIP {:#x} == CR2, which the guest's own page tables map present and \
                 executable ({})",
                s.rip, s.cr2_maps
            ),
        ))
    })
}

fn run_sandbox(assets: &Assets, cases: &[GuestCase], retry: Retry, setup: &SandboxSetup) -> Result<Vec<CaseResult>, String> {
    let mut image = sandbox_image(assets, cases)?;
    if setup.vfio {
        image.with_vfio(assets)?;
    }
    let steps = cases.len() + usize::from(!setup.script.is_empty());
    if !setup.script.is_empty() {
        image.file("setup.sh", 0o755, setup.script.as_bytes());
    }
    for (path, mode, data) in &setup.files {
        image.file(path, *mode, data);
    }
    let image = image.finish(&sandbox_script(cases, setup));
    let total = budget::sandbox_boot() + setup.budget() + cases.iter().map(GuestCase::budget).sum::<Duration>();
    let lines = match retry {
        Retry::AsDocumented => machine::run_on(assets, image, total, &setup.hardware)?,
        Retry::Never => machine::run_once(assets, image, total, &setup.hardware)?,
    };
    let results: Vec<CaseResult> = machine::steps(&lines)
        .into_iter()
        .map(|r| CaseResult { name: r.name, exit_code: r.status, lines: r.output, seconds: r.seconds })
        .collect();
    if results.len() != steps {
        let missing: Vec<&str> = cases.iter().map(|c| c.name.as_str()).filter(|n| !results.iter().any(|r| r.name == *n)).collect();
        return Err(format!("sandbox reported {} of {steps} steps (missing: {}); its console:\n{}", results.len(), missing.join(", "), lines.join("\n")));
    }
    Ok(results)
}

/// Boots `case` with the terminal attached (stdin/stdout inherited): directly, or inside the
/// sandbox, where siovmm runs on the sandbox's console with a controlling terminal so Ctrl-C
/// reaches it. Returns siovmm's exit status (in the sandbox: the sandbox's).
pub fn run_interactive(case: &GuestCase) -> Result<i32, String> {
    let assets = guest_assets()?;
    let dir = WorkDir::new("guest")?;
    let status = match placement() {
        Placement::Direct => {
            let initrd = dir.0.join("guest.cpio");
            std::fs::write(&initrd, case.initramfs(&assets)?).map_err(|e| e.to_string())?;
            Command::new(assets.path("siovmm"))
                .args(case.args(&assets.path(case.kernel.file()), &initrd))
                .status()
                .map_err(|e| format!("starting siovmm: {e}"))?
        }
        Placement::Sandbox => {
            let script = format!(
                "echo '[sandbox] starting siovmm: the guest console follows (exit its shell to power off)'
setsid cttyhack /siovmm {}
echo \"[sandbox] siovmm exited with status $?\"
poweroff -f
",
                sandbox_args(case)
            );
            let initrd = dir.0.join("sandbox.cpio");
            let image = sandbox_image(&assets, std::slice::from_ref(case))?.finish_raw(&script);
            std::fs::write(&initrd, image).map_err(|e| e.to_string())?;
            machine::qemu_command(&assets, &initrd).status().map_err(|e| format!("starting qemu-system-x86_64: {e}"))?
        }
    };
    Ok(status.code().unwrap_or(1))
}

/// siovmm's flags, as a [`GuestCase`] passes them, turned into Cloud Hypervisor's, for a case
/// whose VMM is this script (the binary at `/cloud-hypervisor` in the sandbox, from
/// [`cloud_hypervisor_binary`]): `--vfio-user SOCKET` becomes `--user-device socket=SOCKET` (guest
/// RAM shared, which vfio-user needs), `--vfio PATH` becomes `--device path=PATH`.
const CLOUD_HYPERVISOR_WRAPPER: &str = r#"#!/bin/sh
user=""; dev=""; shared=off
while [ $# -gt 1 ]; do
  case "$1" in
    --kernel) kernel=$2;; --initramfs) initramfs=$2;; --cmdline) cmdline=$2;;
    --cpus) cpus=$2;; --memory) memory=$2;;
    --vfio-user) user="$user socket=$2"; shared=on;; --vfio) dev="$dev path=$2";;
  esac
  shift 2
done
exec /cloud-hypervisor --kernel "$kernel" --initramfs "$initramfs" --cmdline "$cmdline" \
  --cpus boot="$cpus" --memory size="$memory",shared=$shared ${user:+--user-device $user} ${dev:+--device $dev} \
  --serial tty --console off
"#;

/// Writes [`CLOUD_HYPERVISOR_WRAPPER`] to a file for [`GuestCase::vmm`].
pub fn cloud_hypervisor_wrapper() -> PathBuf {
    let path = std::env::temp_dir().join(format!("siovmm-ch-wrapper-{}", std::process::id()));
    std::fs::write(&path, CLOUD_HYPERVISOR_WRAPPER).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// The static Cloud Hypervisor binary `$SIOVMM_CLOUD_HYPERVISOR` names, as a sandbox file at
/// `/cloud-hypervisor`, for the comparisons that need one (docs/devd.md, docs/vfio.md). Nothing
/// of Cloud Hypervisor is in this repository; tests using it are `#[ignore]`d, as CI cannot
/// build it.
pub fn cloud_hypervisor_binary() -> (String, u32, Vec<u8>) {
    let path = std::env::var_os("SIOVMM_CLOUD_HYPERVISOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("set SIOVMM_CLOUD_HYPERVISOR to a static cloud-hypervisor binary (docs/devd.md)"));
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ("cloud-hypervisor".into(), 0o755, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proven_environment_failures_run_again_twice_unexplained_ones_once() {
        let proven = "(the environment's): the emulated CPU raised a not-present page fault";
        let unexplained = "UNEXPLAINED: the CPU was delivering interrupt vector 0xec";
        let tried = |whys: &[&str]| whys.iter().map(|w| format!("siovmm-tests: guest triple fault in case c {w}")).collect::<Vec<_>>();
        assert!(may_run_again(&tried(&[]), proven));
        assert!(may_run_again(&tried(&[proven]), proven));
        assert!(!may_run_again(&tried(&[proven, proven]), proven));
        assert!(may_run_again(&tried(&[]), unexplained));
        assert!(!may_run_again(&tried(&[proven]), unexplained));
        assert!(!may_run_again(&tried(&[unexplained]), proven));
    }

    #[test]
    fn only_triple_faults_with_an_emulator_signature_rerun() {
        let case = |lines: &[&str]| CaseResult { name: "c".into(), lines: lines.iter().map(|l| l.to_string()).collect(), ..Default::default() };
        let fine = case(&["GUEST-X=1"]);
        let check_failed = case(&["GUEST-ADI-FAIL 0000:00:01.0: FAIL 6 completion interrupts"]);
        let other_stop = case(&["siovmm: KVM internal error (suberror 1) on vCPU 0 at RIP 0x1000"]);
        let reset = "siovmm: triple fault on vCPU 0 at RIP unknown (KVM reset the vCPU)";
        let record = |intr_info: &str, error_code: &str| {
            format!("@@KVM-TRACE vcpu0-161 [000] ..... 52.356979: kvm_exit: vcpu 0 reason shutdown rip 0xffffffff81a592eb info1 0x0 info2 0x0 intr_info {intr_info} error_code {error_code}")
        };
        let unrecorded = case(&[reset]);
        let own_exception = case(&[reset, &record("0x80000b0e", "0x00000010")]);
        let rsvd_present = case(&[reset, &record("0x80000b0e", "0x00000019")]);
        let interrupted = case(&[reset, &record("0x800000ec", "0x00000000")]);
        let impossible = case(&[reset, &record("0x80000b0e", "0x00000018")]);
        let none = [fine.clone(), check_failed, other_stop, unrecorded, own_exception, rsvd_present];
        assert!(triple_fault_with_emulator_signature(&none).is_none());
        let first = [fine.clone(), interrupted.clone()];
        let found = triple_fault_with_emulator_signature(&first).unwrap();
        assert_eq!(found.0.lines, interrupted.lines);
        assert!(found.1.starts_with("UNEXPLAINED") && found.1.contains("0xec"), "{}", found.1);
        let second = [fine, impossible.clone()];
        let found = triple_fault_with_emulator_signature(&second).unwrap();
        assert_eq!(found.0.lines, impossible.lines);
        assert!(found.1.contains("0x18") && found.1.contains("no x86 CPU"), "{}", found.1);
        // Guests side by side: another VM's vCPU thread's record says nothing about this one.
        let own_thread = "siovmm: triple fault on vCPU 0 (thread 161) at RIP unknown (KVM reset the vCPU)";
        let other_thread = "siovmm: triple fault on vCPU 0 (thread 162) at RIP unknown (KVM reset the vCPU)";
        assert!(triple_fault_with_emulator_signature(&[case(&[other_thread, &record("0x800000ec", "0x00000000")])]).is_none());
        assert!(triple_fault_with_emulator_signature(&[case(&[own_thread, &record("0x800000ec", "0x00000000")])]).is_some());
        // A not-present fetch where nothing is mapped: the environment's only at a RIP the
        // reference VMM's guests faulted at too.
        let at = |rip: &str| format!("@@KVM-TRACE vcpu0-161 [000] ..... 52.3: kvm_exit: vcpu 0 reason shutdown rip {rip} info1 0x0 info2 0x0 intr_info 0x80000b0e error_code 0x00000010");
        let seen_under_libkrun = case(&[reset, &at("0xffffffffc035120c")]);
        let found = triple_fault_with_emulator_signature(std::slice::from_ref(&seen_under_libkrun)).unwrap();
        assert!(found.1.contains("libkrun") && found.1.contains("0xffffffffc035120c"), "{}", found.1);
        assert!(triple_fault_with_emulator_signature(&[case(&[reset, &at("0xffffffffc035120d")])]).is_none());
    }

    #[test]
    fn only_hangs_stuck_on_a_mapped_fetch_rerun() {
        let faults = vec!["@@KVM-TRACE vcpu0-445 [000] ..... 97.626203: kvm_inj_exception: #PF (0x10)".to_string(); HANG_FETCH_FAULTS];
        let state = |rip: &str, cr2: &str, maps: &str| {
            format!(
                "siovmm: warn: state of vCPU 0: RIP {rip} CPL 0 RFLAGS 0x2 CR0 0x80050033 CR2 {cr2} CR3 0x2000 CR4 0x350ef0 \
                 EFER 0xd01; delivering: exception injected 14 error 0x10; RIP maps: {maps}; CR2 maps: {maps}"
            )
        };
        let text = "0xffffffff81000000-0xffffffff811fffff r-x";
        let at = state("0xffffffff8107505b", "0xffffffff8107505b", text);
        let case = |code: i32, extra: &[String]| CaseResult {
            name: "c".into(),
            exit_code: Some(code),
            lines: faults.iter().chain(extra).cloned().collect(),
            ..Default::default()
        };
        let stuck = case(137, &[at.clone(), at.clone()]);
        let found = hang_with_emulator_signature(std::slice::from_ref(&stuck)).expect("the documented signature");
        assert!(found.1.contains("RIP 0xffffffff8107505b == CR2") && found.1.contains(&format!("{} not-present", HANG_FETCH_FAULTS)), "{}", found.1);
        // Each condition missing in turn: not killed at its budget, one report only, fewer
        // faults, RIP past CR2, CR2 not mapped, CR2 mapped but not executable, CR2 moving.
        assert!(hang_with_emulator_signature(&[case(1, &[at.clone(), at.clone()])]).is_none());
        assert!(hang_with_emulator_signature(&[case(137, std::slice::from_ref(&at))]).is_none());
        let few = CaseResult { lines: stuck.lines[1..].to_vec(), ..stuck.clone() };
        assert!(hang_with_emulator_signature(&[few]).is_none());
        let moved_on = state("0xffffffff81075060", "0xffffffff8107505b", text);
        assert!(hang_with_emulator_signature(&[case(137, &[at.clone(), moved_on])]).is_none());
        let unmapped = state("0xffffffffc035120c", "0xffffffffc035120c", "nothing");
        assert!(hang_with_emulator_signature(&[case(137, &[unmapped.clone(), unmapped])]).is_none());
        let data = state("0x40f2ea", "0x40f2ea", "0x40f000-0x40ffff rw-");
        assert!(hang_with_emulator_signature(&[case(137, &[data.clone(), data])]).is_none());
        let other = state("0xffffffff81075100", "0xffffffff81075100", text);
        assert!(hang_with_emulator_signature(&[case(137, &[at, other])]).is_none());
    }

    #[test]
    fn background_cases_start_at_once_and_report_last() {
        let mut bg = GuestCase::new("bg-vm", Kernel::Vmlinux, 1, "");
        bg.background = true;
        let fg = GuestCase::new("fg", Kernel::Vmlinux, 1, "");
        let sh = GuestCase::shell("probe", "echo hi", Duration::from_secs(1));
        let script = sandbox_script(&[bg, fg, sh], &SandboxSetup::default());
        let at = |needle: &str| script.find(needle).unwrap_or_else(|| panic!("{needle} not in {script}"));
        assert!(at("> /tmp/bg-vm.out 2>&1 &") < at("@@STEP fg"), "started before the foreground case");
        assert!(at("@@STEP fg") < at("@@STEP probe"));
        assert!(at("sh /steps/probe.sh") < at("@@STEP bg-vm"), "reported after every other case");
        assert!(script.contains("wait $bg_bg_vm"), "{script}");
        assert_eq!(GuestCase::shell("s", "", Duration::from_secs(2)).budget(), budget::work(Duration::from_secs(2)));
    }

    #[test]
    fn budgets_follow_the_adis() {
        let mut c = GuestCase::new("b", Kernel::Vmlinux, 1, "");
        let plain = c.budget();
        c.extra_args = ["--adi", "32", "--ims", "pv", "--adi", "32"].map(String::from).to_vec();
        assert_eq!(c.adis(), 64);
        assert_eq!(c.budget(), budget::guest(64, Duration::ZERO));
        assert!(c.budget() > plain);
    }
}
