//! Each thread kind's filter in a child process (filters cannot be removed, so every probe is
//! a process of its own): a system call outside the list stops the process under `on` with a
//! report naming the thread kind and the call, and runs and reaches the kernel log under `log`.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Output, Stdio};

use siovmm_seccomp::{Mode, ThreadKind};

/// The probe's forbidden call: `personality(0xffffffff)` only reads the persona, and no list
/// has it.
const FORBIDDEN: i64 = libc::SYS_personality;

/// A file the probe opens: the one glibc's malloc reads when an arena heap first shrinks.
const OPENED: &str = "/proc/sys/vm/overcommit_memory";

/// Kinds whose lists open files (the daemon's status file; the API's kernel VFIO devices).
const OPENING: [ThreadKind; 3] = [ThreadKind::DaemonServer, ThreadKind::DaemonMain, ThreadKind::Api];

/// Runs [`probe`] in a child process of this test binary; returns its output and process ID.
fn run_probe(mode: &str, kinds: &[ThreadKind]) -> (Output, u32) {
    let kinds: Vec<_> = kinds.iter().map(|k| k.name()).collect();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "probe", "--ignored", "--nocapture", "--test-threads=1"])
        .env("SECCOMP_PROBE", format!("{mode}:{}", kinds.join(",")))
        .env("RUST_BACKTRACE", "full")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (child.wait_with_output().unwrap(), pid)
}

/// In the child: chooses the mode, then for each kind spawns a thread under its filter that
/// writes a line (allowed everywhere), makes the forbidden call and writes what it returned.
#[test]
#[ignore = "a child process of the tests below"]
fn probe() {
    let spec = std::env::var("SECCOMP_PROBE").expect("SECCOMP_PROBE names the mode and kinds");
    let (mode, kinds) = spec.split_once(':').unwrap();
    siovmm_seccomp::install(mode.parse::<Mode>().unwrap()).unwrap();
    for name in kinds.split(',') {
        let kind = *ThreadKind::ALL.iter().find(|k| k.name() == name).unwrap();
        let name = kind.name();
        let opens = mode == "on";
        let t = siovmm_seccomp::spawn(kind, format!("probe-{name}"), move || {
            println!("{name}: entered");
            // A panic the thread catches, as the software device catches a device fault: its
            // report needs nothing outside the list, even with RUST_BACKTRACE set.
            let caught = std::panic::catch_unwind(|| panic!("probe fault"));
            println!("{name}: caught a panic: {}", caught.is_err());
            // What glibc's malloc opens from any thread (not under `log`: the kernel's audit
            // records are rate-limited, and the test below counts those of the forbidden call).
            if opens {
                match std::fs::File::open(OPENED) {
                    Ok(_) => println!("{name}: open: ok"),
                    Err(e) => println!("{name}: open: {:?}", e.kind()),
                }
            }
            // SAFETY: personality(0xffffffff) only reads the calling process's persona.
            let r = unsafe { libc::syscall(FORBIDDEN, 0xffff_ffffu64) };
            println!("{name}: personality returned {r}");
        })
        .unwrap();
        t.join().unwrap();
    }
    println!("probe survived");
}

#[test]
fn on_stops_the_process_naming_the_thread_kind_and_call() {
    use std::os::unix::process::ExitStatusExt;
    for kind in ThreadKind::ALL {
        let (out, _) = run_probe("on", &[kind]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{kind}: {:?}\n{stdout}\n{stderr}", out.status);
        assert!(stdout.contains(&format!("{kind}: entered")), "{kind}: {stdout}");
        assert!(stdout.contains(&format!("{kind}: caught a panic: true")), "{kind}: {stdout}\n{stderr}");
        assert!(stderr.contains("panicked at") && stderr.contains("probe fault (no backtrace under seccomp filters"), "{kind}: {stderr}");
        assert!(!stdout.contains("personality returned"), "{kind}: {stdout}");
        let report = format!("seccomp: a {kind} thread made system call {FORBIDDEN}, which its filter does not allow");
        assert!(stderr.contains(&report), "{kind}: {stderr}");
        // An open outside the list fails with EACCES, named, and the thread goes on.
        let refusal = format!("seccomp: a {kind} thread tried to open {OPENED}: refused with EACCES (docs/seccomp.md)");
        if OPENING.contains(&kind) {
            assert!(stdout.contains(&format!("{kind}: open: ok")), "{kind}: {stdout}");
            assert!(!stderr.contains(&refusal), "{kind}: {stderr}");
        } else {
            assert!(stdout.contains(&format!("{kind}: open: PermissionDenied")), "{kind}: {stdout}\n{stderr}");
            assert!(stderr.contains(&refusal), "{kind}: {stderr}");
        }
    }
}

#[test]
fn off_filters_nothing() {
    let (out, _) = run_probe("off", &ThreadKind::ALL);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("probe survived"), "{stdout}");
}

/// The kernel log from now on (`/dev/kmsg`, read without blocking).
struct KernelLog(std::fs::File);

impl KernelLog {
    fn from_now() -> Self {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .expect("reading the kernel log (/dev/kmsg) needs root, as the test command runs");
        // SAFETY: lseek on an fd we own.
        assert!(unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, libc::SEEK_END) } >= 0);
        Self(f)
    }

    /// Records written since, as text.
    fn records(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // A record overwritten before we read it: go on with the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) => panic!("reading /dev/kmsg: {e}"),
            }
        }
        out
    }
}

#[test]
fn log_lets_the_call_run_and_the_kernel_logs_it_for_every_kind() {
    let mut log = KernelLog::from_now();
    let (out, pid) = run_probe("log", &ThreadKind::ALL);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    for kind in ThreadKind::ALL {
        // personality(0xffffffff) returns the persona (PER_LINUX, 0): the call ran.
        assert!(stdout.contains(&format!("{kind}: personality returned 0")), "{kind}: {stdout}");
    }
    assert!(stdout.contains("probe survived"), "{stdout}");
    // kauditd prints asynchronously: wait for one record per kind (seven, within printk's
    // burst of ten).
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while seen.len() < ThreadKind::ALL.len() && std::time::Instant::now() < deadline {
        for record in log.records() {
            let ours = record.contains(&format!(" pid={pid} ")) && record.contains("type=1326");
            if ours && record.contains(&format!("syscall={FORBIDDEN} ")) {
                if let Some(kind) = ThreadKind::ALL.iter().find(|k| record.contains(&format!("comm=\"{}\"", comm(k.name())))) {
                    seen.push(*kind);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ThreadKind::ALL.to_vec(), "kernel log records of the forbidden call, by thread");
}

/// The probe thread's name as the kernel keeps it (`comm`): "probe-" and the kind, cut to 15
/// bytes.
fn comm(kind: &str) -> String {
    format!("probe-{kind}").chars().take(15).collect()
}
