//! siovmm: boots a Linux guest on KVM and (as the project grows) composes SIOV assignable
//! device interfaces into it. See docs/architecture.md.

mod api;
mod bench;
mod bench_devd;
mod bench_scale;
mod cli;
mod coalesced;
mod config;
mod console;
mod device_manager;
mod hotplug;
#[cfg(test)]
mod kvm_tests;
mod kvm_irq;
mod memory;
mod memslots;
mod passthrough;
mod vcpu;
mod vm;

use std::process::ExitCode;

use devices::ExitReason;

/// Why siovmm could not run the VM. Each prints as one line for the user: the message, then
/// each underlying cause after ": " ([`one_line`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM lacks a capability siovmm needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// Guest memory could not be set up.
    #[error("guest memory")]
    Memory(#[source] memory::Error),
    /// The kernel, initramfs, command line or boot information could not be loaded.
    #[error("{0}")]
    Boot(String, #[source] arch::boot::Error),
    /// The boot vCPU's registers could not be set up.
    #[error("boot registers")]
    Registers(#[source] arch::regs::Error),
    /// A device could not be placed on its bus.
    #[error("placing a device at {0:#x}")]
    Place(u64, #[source] devices::bus::Error),
    /// ADIs could not be composed into the guest.
    #[error("composing ADIs")]
    Adis(#[from] siovmm_vdcm::Error),
    /// The ACPI tables could not be built.
    #[error("ACPI tables")]
    Acpi(#[from] siovmm_acpi::Error),
    /// The event loop failed.
    #[error("{0}")]
    Events(&'static str, #[source] event_manager::Error),
    /// An OS call failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// A host device could not be passed through.
    #[error("passing a VFIO device through")]
    Vfio(#[from] passthrough::Error),
    /// The main thread could not enter the event loop's seccomp filter.
    #[error("entering the event loop's seccomp filter")]
    Seccomp(#[source] siovmm_seccomp::Error),
    /// The VM has been released; nothing can be added to it.
    #[error("the VM has been released")]
    Released,
    /// The SIOV device has fewer ADIs this VM does not already hold than asked for.
    #[error("{requested} ADIs requested; the SIOV device has {free} this VM does not already hold")]
    NoFreeAdis {
        /// Asked for.
        requested: u32,
        /// Available.
        free: u32,
    },
    /// A vfio-user device offers IMS slots kept where this VM's policy does not say.
    #[error("{socket}: its device keeps IMS {device}, but this VM was started with --ims-storage {vm} (the guest's IMS_IN_QUEUE flag is one for the whole VM)")]
    ImsStorageMismatch {
        /// The device's socket.
        socket: String,
        /// Where the device keeps IMS.
        device: &'static str,
        /// Where the VM says IMS is kept.
        vm: &'static str,
    },
    /// A vfio-user device's IMS mailbox did not answer.
    #[error("{socket}: asking its IMS mailbox what it offers: {status}")]
    ImsMailbox {
        /// The device's socket.
        socket: String,
        /// What it answered.
        status: siovmm_hypercall::Status,
    },
    /// No device at this address.
    #[error("no device 0000:{0}")]
    NoDevice(devices::pci::Bdf),
    /// The guest uses the device and cannot be asked to let it go (it takes no hotplug events).
    #[error("0000:{0} is in use by the guest (bus mastering, MSI or MSI-X on), and the guest takes no hotplug events: release it in the guest first (unbind its driver, or remove it from the guest's PCI bus)")]
    InUse(devices::pci::Bdf),
    /// Function 0 of a slot whose other functions stay: without it the guest finds none of them.
    #[error("0000:{bdf} is function 0 of a slot whose other functions ({others}) stay: a guest finds a slot's functions through function 0, so it leaves last")]
    FunctionZeroLast {
        /// The function asked for.
        bdf: devices::pci::Bdf,
        /// The others, comma-separated.
        others: String,
    },
}

/// An error and its causes as one line: "what: why: deeper why".
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
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

/// A benchmark's exit status: 0, or 1 with its error named on stderr.
fn bench_exit(name: &str, result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("siovmm: {name}: {e}");
            ExitCode::from(1)
        }
    }
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
        cli::Command::BenchSiov(o) => return bench_exit("bench-siov", bench::run(&o)),
        cli::Command::BenchDevd(o) => {
            return bench_exit("bench-devd", match (&o.scale_child, o.scale, &o.probe) {
                (Some((dir, first, count)), _, _) => bench_scale::child(dir, *first, *count),
                (None, _, Some(socket)) => bench_devd::probe(socket, o.probe_seconds),
                (None, Some(adis), None) => bench_scale::run(&o, adis),
                (None, None, None) => bench_devd::run(&o),
            })
        }
        cli::Command::Run(c) => c,
    };
    // Before any thread starts: each enters its kind's filter as it begins (docs/seccomp.md).
    if let Err(e) = siovmm_seccomp::install(config.seccomp) {
        eprintln!("siovmm: --seccomp: {}", one_line(&e));
        return ExitCode::from(1);
    }
    // Bound before anything is built: a bad path is the user's error (exit 2), found first.
    let api_socket = match config.api_socket.as_deref().map(api::ApiSocket::bind).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("siovmm: {e}");
            return ExitCode::from(2);
        }
    };
    let terminal = console::TerminalGuard::new();
    // The VM is released (vCPUs joined, ADIs closed, memory unmapped) before siovmm exits.
    // The guest's console reaches stdout filtered and queued (devices::console_out): guest bytes
    // never drive the terminal, and a stdout nobody reads never stalls a vCPU.
    let console = match devices::console_out::ConsoleOutput::spawn(std::io::stdout()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("siovmm: starting the console output thread: {e}");
            return ExitCode::from(1);
        }
    };
    let result = vm::Vm::build(&config, Box::new(console)).and_then(|mut vm| {
        // Stopped (and its socket removed) when `run` returns, before the VM is released.
        let _api = match api_socket {
            Some(socket) => Some(api::ApiThread::spawn(socket, api::VmApi::new(vm.handle(), &config))?),
            None => None,
        };
        vm.run()
    });
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
            eprintln!("siovmm: {}", one_line(&e));
            1
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
