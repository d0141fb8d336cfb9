//! Harness for tests that boot real Linux guests under siovmm.
//!
//! Where a guest runs is decided here, once: **directly** on the host's /dev/kvm when it can
//! run an unmodified Linux kernel, otherwise inside a **nested QEMU-TCG sandbox** (a stock
//! Debian kernel whose own KVM, nested SVM, runs siovmm; see ../shared/guest-sandbox.md). All
//! guest cases of one call share one sandbox boot. Override with `SIOVMM_GUEST_MODE=direct` or
//! `=sandbox`.
//!
//! A case's guest prints `KEY=value` lines from its /init; results are parsed from the console.

pub mod cpio;
pub mod probe;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest kernel, modules, busybox and the static siovmm prepared by tests/setup.sh.
#[derive(Debug, Clone)]
pub struct Assets {
    /// Folder holding them.
    pub dir: PathBuf,
}

impl Assets {
    /// Finds the assets (`$SIOVMM_ASSETS`, else `<workspace>/target/guest-assets`).
    pub fn locate() -> Result<Self, String> {
        let dir = std::env::var_os("SIOVMM_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-assets"));
        for f in ["bzImage", "vmlinux", "busybox", "siovmm", "modules/kvm.ko", "siov_adi.ko"] {
            if !dir.join(f).exists() {
                return Err(format!("{} is missing: run tests/setup.sh first", dir.join(f).display()));
            }
        }
        Ok(Self { dir })
    }

    /// Path of one asset.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Contents of one asset.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("reading {}: {e}", self.path(name).display()))
    }
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
        }
    }

    fn initramfs(&self, assets: &Assets) -> Vec<u8> {
        let mut c = cpio::busybox_root(&assets.read("busybox"));
        c.file("init", 0o755, self.init.as_bytes());
        for (path, mode, data) in &self.files {
            c.file(path, *mode, data);
        }
        c.finish()
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
        self.files.push(("siov_adi.ko".into(), 0o644, assets.read("siov_adi.ko")));
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
        self.lines.join("\n")
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

/// Decides where guests run: `SIOVMM_GUEST_MODE`, else a probe of the host's KVM.
pub fn placement() -> Placement {
    match std::env::var("SIOVMM_GUEST_MODE").as_deref() {
        Ok("direct") => Placement::Direct,
        Ok("sandbox") => Placement::Sandbox,
        _ if probe::host_kvm_runs_linux() => Placement::Direct,
        _ => Placement::Sandbox,
    }
}

fn work_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "siovmm-guest-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).expect("creating a work folder");
    d
}

/// How long the sandbox's own kernel takes to reach a minimal busybox /init right now, in
/// seconds of its uptime: a yardstick of this machine's current speed, the condition under which
/// ../shared/guest-sandbox.md measured 2.5-3 s. `None` where guests run directly.
pub fn sandbox_yardstick() -> Result<Option<f64>, String> {
    if placement() == Placement::Direct {
        return Ok(None);
    }
    let assets = Assets::locate()?;
    let dir = work_dir();
    let mut root = cpio::busybox_root(&assets.read("busybox"));
    root.file(
        "init",
        0o755,
        b"#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\necho \"@@YARDSTICK $(/bin/busybox cut -d' ' -f1 /proc/uptime)\"\n/bin/busybox poweroff -f\n",
    );
    let initrd = dir.join("yardstick.cpio");
    let run = std::fs::write(&initrd, root.finish())
        .map_err(|e| e.to_string())
        .and_then(|_| sandbox_output(&assets, &initrd, Duration::from_secs(120)));
    let _ = std::fs::remove_dir_all(&dir);
    let lines = run?;
    lines
        .iter()
        .find_map(|l| l.split("@@YARDSTICK ").nth(1)?.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| format!("the sandbox kernel did not report its uptime:\n{}", lines.join("\n")))
}

/// Runs `cases`, all in one sandbox boot or one after another directly.
pub fn run_cases(cases: &[GuestCase]) -> Result<Vec<CaseResult>, String> {
    let assets = Assets::locate()?;
    for c in cases {
        if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-') {
            return Err(format!("bad case name {:?}", c.name));
        }
    }
    let dir = work_dir();
    let result = match placement() {
        Placement::Direct => run_direct(&assets, &dir, cases),
        Placement::Sandbox => run_sandbox_retrying(&assets, &dir, cases),
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Reads a child's output line by line until it exits or `timeout` passes (then kills it).
fn collect_output(mut child: std::process::Child, timeout: Duration) -> Result<(Vec<String>, Option<i32>), String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
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
    let t1 = spawn_reader(Box::new(stdout), tx.clone());
    let t2 = spawn_reader(Box::new(stderr), tx);
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    let verbose = std::env::var_os("SIOVMM_TEST_VERBOSE").is_some();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                if verbose {
                    eprintln!("| {l}");
                }
                // The sandbox's own kernel reporting a CPU stuck (inside KVM_RUN) does not recover;
                // stop now instead of waiting for the timeout.
                let stuck = l.contains("watchdog: BUG: soft lockup");
                lines.push(l);
                if stuck {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{ENVIRONMENT_FAILURE}: the sandbox kernel reports a soft lockup; output:\n{}", lines.join("\n")));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{ENVIRONMENT_FAILURE}: guest run timed out after {}s; last output:\n{}",
                timeout.as_secs(),
                lines.iter().rev().take(40).rev().cloned().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    let _ = (t1.join(), t2.join());
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok((lines, status.code()))
}

fn run_direct(assets: &Assets, dir: &Path, cases: &[GuestCase]) -> Result<Vec<CaseResult>, String> {
    let mut results = Vec::new();
    for case in cases {
        let initrd = dir.join(format!("{}.cpio", case.name));
        std::fs::write(&initrd, case.initramfs(assets)).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let child = Command::new(case.vmm.clone().unwrap_or_else(|| assets.path("siovmm")))
            .args(case.args(&assets.path(case.kernel.file()), &initrd))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting siovmm: {e}"))?;
        let (lines, code) = collect_output(child, Duration::from_secs(120))?;
        results.push(CaseResult {
            name: case.name.clone(),
            exit_code: code,
            lines,
            seconds: Some(start.elapsed().as_secs_f64()),
        });
    }
    Ok(results)
}

/// The start of the sandbox's /init: busybox, /proc, /sys, /dev and KVM (nested SVM; VMX where
/// the emulated CPU has it).
const SANDBOX_PROLOGUE: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in irqbypass ccp kvm; do insmod /modules/$m.ko || echo \"@@SANDBOX-ERROR insmod $m\"; done
insmod /modules/kvm-amd.ko 2>/dev/null || insmod /modules/kvm-intel.ko 2>/dev/null
";

/// A case's siovmm arguments inside the sandbox, quoted for the shell.
fn sandbox_args(case: &GuestCase) -> String {
    case.args(Path::new(&format!("/guest/{}", case.kernel.file())), Path::new(&format!("/guest/{}.cpio", case.name)))
        .into_iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
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

/// The sandbox's own /init: load KVM, run every case, report, power off.
fn sandbox_init(cases: &[GuestCase]) -> String {
    let mut s = String::from(SANDBOX_PROLOGUE);
    s.push_str(
        "[ -c /dev/kvm ] || echo '@@SANDBOX-ERROR no /dev/kvm in the sandbox'
echo \"@@SANDBOX-INFO thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled) defrag=$(cat /sys/kernel/mm/transparent_hugepage/defrag)\"
uptime_cs() { read u _ < /proc/uptime; echo ${u%.*}${u#*.}; }
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
    for case in cases {
        s.push_str(&format!(
            "echo '@@CASE {name}'\nt0=$(uptime_cs)\n{vmm} {args} </dev/null 2>&1\nrc=$?\nt1=$(uptime_cs)\necho \"@@EXIT {name} $rc $((t1 - t0))\"\necho \"@@SANDBOX-INFO $(grep -E '^thp_fault_(alloc|fallback) ' /proc/vmstat | tr '\\n' ' ') $(grep MemFree /proc/meminfo)\"\n",
            name = case.name,
            vmm = sandbox_vmm(case),
            args = sandbox_args(case)
        ));
    }
    s.push_str("echo '@@SANDBOX-DONE'\npoweroff -f\n");
    s
}

/// The sandbox's initramfs: KVM modules, the static siovmm, the guest kernels the cases use,
/// each case's initramfs, and `init`.
fn sandbox_initramfs(assets: &Assets, cases: &[GuestCase], init: &str) -> Vec<u8> {
    let mut outer = cpio::busybox_root(&assets.read("busybox"));
    outer.dir("modules").dir("guest");
    for m in ["irqbypass", "ccp", "kvm", "kvm-amd", "kvm-intel"] {
        outer.file(&format!("modules/{m}.ko"), 0o644, &assets.read(&format!("modules/{m}.ko")));
    }
    outer.file("siovmm", 0o755, &assets.read("siovmm"));
    if cases.iter().any(|c| c.vmm.is_some()) {
        outer.dir("vmm");
    }
    for case in cases {
        if let Some(path) = &case.vmm {
            let binary = std::fs::read(path).unwrap_or_else(|e| panic!("reading siovmm binary {}: {e}", path.display()));
            outer.file(&format!("vmm/{}", case.name), 0o755, &binary);
        }
    }
    let mut kernels: Vec<Kernel> = cases.iter().map(|c| c.kernel).collect();
    kernels.dedup();
    kernels.sort_by_key(|k| k.file());
    kernels.dedup();
    for k in kernels {
        outer.file(&format!("guest/{}", k.file()), 0o644, &assets.read(k.file()));
    }
    for case in cases {
        outer.file(&format!("guest/{}.cpio", case.name), 0o644, &case.initramfs(assets));
    }
    outer.file("init", 0o755, init.as_bytes());
    outer.finish()
}

/// The QEMU-TCG command line of the sandbox.
fn sandbox_qemu(assets: &Assets, initrd: &Path) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "3G"]);
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
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"]);
    qemu
}

/// Marks failures of the nested sandbox itself rather than of a guest check.
const ENVIRONMENT_FAILURE: &str = "sandbox environment failure";

/// What a triple fault looks like when KVM has reset the vCPU (AMD): no state to blame.
const RESET_TRIPLE_FAULT: &str = "triple fault on vCPU";

/// Runs the sandbox, and once more if the first attempt failed in a way this nested QEMU-TCG
/// environment was seen to fail on its own (docs/boot-performance.md and the session notes):
/// the sandbox kernel stuck in KVM_RUN (soft lockup), a run that never finished, or a guest
/// triple fault. Each retry is announced on stderr with its reason; a second failure is final,
/// and every guest check still has to pass.
fn run_sandbox_retrying(assets: &Assets, dir: &Path, cases: &[GuestCase]) -> Result<Vec<CaseResult>, String> {
    let first = run_sandbox(assets, dir, cases);
    match retry_reason(&first) {
        Some(reason) => {
            eprintln!("siovmm-tests: retrying the sandbox once after: {reason}");
            run_sandbox(assets, dir, cases)
        }
        None => first,
    }
}

/// Why a sandbox run deserves one more attempt, if it does.
fn retry_reason(run: &Result<Vec<CaseResult>, String>) -> Option<String> {
    match run {
        Err(e) if e.starts_with(ENVIRONMENT_FAILURE) => e.lines().next().map(str::to_string),
        Ok(results) => results.iter().find_map(|r| r.lines_with(RESET_TRIPLE_FAULT).first().map(|l| l.to_string())),
        Err(_) => None,
    }
}

/// Boots the sandbox on `initrd` without a terminal and returns its console lines.
fn sandbox_output(assets: &Assets, initrd: &Path, timeout: Duration) -> Result<Vec<String>, String> {
    let child = sandbox_qemu(assets, initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64 (run tests/setup.sh): {e}"))?;
    collect_output(child, timeout).map(|(lines, _)| lines)
}

fn run_sandbox(assets: &Assets, dir: &Path, cases: &[GuestCase]) -> Result<Vec<CaseResult>, String> {
    let initrd = dir.join("sandbox.cpio");
    std::fs::write(&initrd, sandbox_initramfs(assets, cases, &sandbox_init(cases))).map_err(|e| e.to_string())?;
    let lines = sandbox_output(assets, &initrd, Duration::from_secs(90 + 60 * cases.len() as u64))?;
    if let Some(e) = lines.iter().find(|l| l.contains("@@SANDBOX-ERROR")) {
        return Err(format!("sandbox setup failed: {e}\n{}", lines.join("\n")));
    }
    if !lines.iter().any(|l| l.contains("@@SANDBOX-DONE")) {
        return Err(format!("{ENVIRONMENT_FAILURE}: the sandbox did not finish:\n{}", lines.join("\n")));
    }
    let mut results = Vec::new();
    let mut current: Option<CaseResult> = None;
    for line in lines {
        if let Some(name) = line.strip_prefix("@@CASE ") {
            current = Some(CaseResult { name: name.trim().to_string(), ..Default::default() });
        } else if let Some(rest) = line.strip_prefix("@@EXIT ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(code), Some(cs)) = (parts.next(), parts.next(), parts.next()) else { continue };
            if let Some(mut r) = current.take() {
                if r.name == name {
                    r.exit_code = code.parse().ok();
                    r.seconds = cs.parse::<f64>().ok().map(|c| c / 100.0);
                    results.push(r);
                }
            }
        } else if let Some(r) = current.as_mut() {
            r.lines.push(line);
        }
    }
    if results.len() != cases.len() {
        return Err(format!("sandbox reported {} of {} cases", results.len(), cases.len()));
    }
    Ok(results)
}

/// Boots `case` with the terminal attached (stdin/stdout inherited): directly, or inside the
/// sandbox, where siovmm runs on the sandbox's console with a controlling terminal so Ctrl-C
/// reaches it. Returns siovmm's exit status (in the sandbox: the sandbox's).
pub fn run_interactive(case: &GuestCase) -> Result<i32, String> {
    let assets = Assets::locate()?;
    let dir = work_dir();
    let status = match placement() {
        Placement::Direct => {
            let initrd = dir.join("guest.cpio");
            std::fs::write(&initrd, case.initramfs(&assets)).map_err(|e| e.to_string())?;
            Command::new(assets.path("siovmm"))
                .args(case.args(&assets.path(case.kernel.file()), &initrd))
                .status()
                .map_err(|e| format!("starting siovmm: {e}"))?
        }
        Placement::Sandbox => {
            let init = format!(
                "{SANDBOX_PROLOGUE}echo '[sandbox] starting siovmm: the guest console follows (exit its shell to power off)'
setsid cttyhack /siovmm {}
echo \"[sandbox] siovmm exited with status $?\"
poweroff -f
",
                sandbox_args(case)
            );
            let initrd = dir.join("sandbox.cpio");
            std::fs::write(&initrd, sandbox_initramfs(&assets, std::slice::from_ref(case), &init))
                .map_err(|e| e.to_string())?;
            sandbox_qemu(&assets, &initrd).status().map_err(|e| format!("starting qemu-system-x86_64: {e}"))?
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    fn case(lines: &[&str]) -> CaseResult {
        CaseResult { name: "c".into(), exit_code: Some(0), lines: lines.iter().map(|l| l.to_string()).collect(), seconds: None }
    }

    #[test]
    fn only_environment_failures_are_retried() {
        assert!(retry_reason(&Ok(vec![case(&["GUEST-X=1"])])).is_none(), "a passing or check-failing run is final");
        assert!(retry_reason(&Err("bad case name".into())).is_none());
        let e = format!("{ENVIRONMENT_FAILURE}: the sandbox kernel reports a soft lockup; output:\nmore");
        assert_eq!(retry_reason(&Err(e)).as_deref(), Some("sandbox environment failure: the sandbox kernel reports a soft lockup; output:"));
        let tf = case(&["GUEST-X=1", "siovmm: triple fault on vCPU 0 at RIP unknown (KVM reset the vCPU)"]);
        assert!(retry_reason(&Ok(vec![case(&[]), tf])).is_some_and(|r| r.contains("triple fault")));
    }
}
