//! siovmm: boots a Linux guest on KVM and (as the project grows) composes SIOV assignable
//! device interfaces into it. See docs/architecture.md.

mod bench;
mod cli;
mod coalesced;
mod config;
mod console;
#[cfg(test)]
mod kvm_tests;
mod kvm_irq;
mod memory;
mod vcpu;
mod vm;

use std::process::ExitCode;

use devices::ExitReason;

/// Why siovmm could not run the VM. Each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// KVM lacks a capability siovmm needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel, initramfs or boot information could not be loaded.
    #[error("{0}")]
    Boot(String),
    /// A device could not be set up.
    #[error("device setup: {0}")]
    Device(String),
    /// An OS call failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// Log lines go to stderr as `siovmm: LEVEL: message`.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("siovmm: {}: {}", record.level().as_str().to_lowercase(), record.args());
        }
    }
    fn flush(&self) {}
}

/// Turns on the `log` facade at the level `SIOVMM_LOG` names (off, error, warn, info, debug,
/// trace; default warn).
fn init_logging() -> Result<(), String> {
    let level = match std::env::var("SIOVMM_LOG") {
        Ok(v) => v.parse::<log::LevelFilter>().map_err(|_| format!("SIOVMM_LOG={v}: not a log level (off, error, warn, info, debug, trace)"))?,
        Err(_) => log::LevelFilter::Warn,
    };
    log::set_logger(&StderrLog).map_err(|e| e.to_string())?;
    log::set_max_level(level);
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = init_logging() {
        eprintln!("siovmm: {e}");
        return ExitCode::from(2);
    }
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("siovmm: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match command {
        cli::Command::Help => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        cli::Command::Version => {
            println!("siovmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        cli::Command::BenchSiov(o) => {
            return match bench::run(&o) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("siovmm: bench-siov: {e}");
                    ExitCode::from(1)
                }
            };
        }
        cli::Command::Run(c) => c,
    };
    let terminal = console::TerminalGuard::new();
    // The VM is released (vCPUs joined, ADIs closed, memory unmapped) before siovmm exits.
    let result = vm::Vm::build(&config, Box::new(std::io::stdout())).and_then(|mut vm| vm.run());
    drop(terminal);
    let code = match result {
        Ok(reason) => {
            match &reason {
                ExitReason::Failed(what) => eprintln!("siovmm: {what}"),
                ExitReason::Interrupted(sig) => eprintln!("siovmm: stopped by signal {sig}"),
                ExitReason::PowerOff | ExitReason::Reset => {}
            }
            reason.exit_code()
        }
        Err(e) => {
            eprintln!("siovmm: {e}");
            1
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
