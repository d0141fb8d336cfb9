//! `on-kvm`: runs a program where KVM is. On the host when its `/dev/kvm` can create VMs,
//! otherwise inside the QEMU-TCG sandbox (the program and its shared libraries carried in at
//! their own paths, its output streamed here, killed when `--budget` runs out: status 137).
//! Exits with the program's status.
//!
//! Usage: on-kvm [--budget SECONDS] PROGRAM [ARGS...]
//! (`SIOVMM_HIDE_KVM=1` forces the sandbox; assets from tests/setup.sh.)

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use siovmm_sandbox::machine::{self, shell_quote, SandboxImage};
use siovmm_sandbox::{budget, host_kvm, ship, Assets};

const USAGE: &str = "usage: on-kvm [--budget SECONDS] PROGRAM [ARGS...]";

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("on-kvm: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<u8, String> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut program_budget = Duration::from_secs(1800);
    if args.first().map(String::as_str) == Some("--budget") {
        let v = args.get(1).ok_or(USAGE)?;
        let secs: u64 = v.parse().ok().filter(|s| *s > 0).ok_or_else(|| format!("--budget {v}: not a positive number of seconds"))?;
        program_budget = Duration::from_secs(secs);
        args.drain(..2);
    }
    if args.is_empty() || args[0].starts_with('-') {
        return Err(USAGE.into());
    }
    let program = std::fs::canonicalize(&args[0]).map_err(|e| format!("{}: {e}", args[0]))?;
    match host_kvm::usable() {
        Ok(()) => {
            eprintln!("on-kvm: running on the host's /dev/kvm");
            let status = Command::new(&program).args(&args[1..]).status().map_err(|e| format!("{}: {e}", program.display()))?;
            Ok(status.code().map_or(1, |c| c.clamp(0, 255) as u8))
        }
        Err(why) => {
            eprintln!("on-kvm: host KVM not used ({why}): running inside the QEMU-TCG sandbox");
            in_sandbox(&program, &args[1..], program_budget)
        }
    }
}

fn in_sandbox(program: &PathBuf, args: &[String], program_budget: Duration) -> Result<u8, String> {
    let assets = Assets::locate(&[])?;
    let mut image = SandboxImage::new(&assets)?;
    ship::ship(&mut image, std::slice::from_ref(program))?;
    let mut command = shell_quote(&program.display().to_string());
    for a in args {
        command.push(' ');
        command.push_str(&shell_quote(a));
    }
    let script = format!("cd /tmp\n{}{}", machine::same_fd_limits(), machine::step("program", program_budget, &command));
    let lines = machine::run_with(&assets, image.finish(&script), budget::sandbox_boot() + program_budget, true)?;
    machine::steps(&lines)
        .first()
        .and_then(|r| r.status)
        .map(|s| s.clamp(0, 255) as u8)
        .ok_or_else(|| "the sandbox did not report the program's status".into())
}
