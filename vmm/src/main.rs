//! siovmm: boots a Linux guest on KVM and (as the project grows) composes SIOV assignable
//! device interfaces into it. See docs/architecture.md.

mod bench;
mod cli;
mod coalesced;
mod config;
mod console;
#[cfg(test)]
mod kvm_tests;
mod memory;
mod vcpu;
mod vdcm;
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

fn main() -> ExitCode {
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
