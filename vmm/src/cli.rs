//! Command-line parsing and validation. Every error is one line naming the bad value, and
//! everything is checked before any VM exists.

use std::fs::File;

use arch::boot::sniff_format;
use siovmm_vfio::host::Iommu;
use siovmm_vfio::siov::{ImsStorage, PortalKind};

use crate::config::{BenchDevdOptions, BenchOptions, ImsPolicy, SiovBackend, SiovConfig, VmConfig, DEFAULT_CMDLINE, MAX_CPUS, MIN_MEMORY};
use siovmm_vdcm::MAX_ADIS_PER_GUEST;

/// The usage text (`--help`).
pub const USAGE: &str = "\
siovmm - a KVM virtual machine monitor for Scalable IOV assignable device interfaces

USAGE:
    siovmm --kernel PATH [--initramfs PATH] [--cmdline STR] [--cpus N] [--memory SIZE] [SIOV options]
    siovmm bench-siov [--adis N] [--ims N] [--rate-adis N] [--per-adi N]
    siovmm bench-devd [--rounds N] [--descriptors N] [--devd PATH]
    siovmm bench-devd --scale N [--devd PATH]
    siovmm bench-devd --probe SOCKET [--seconds S]

OPTIONS:
    --kernel PATH      Linux kernel to boot: ELF vmlinux (entered through its PVH note, or its
                       64-bit entry point) or bzImage.
    --initramfs PATH   initramfs (cpio, optionally compressed) handed to the kernel.
    --cmdline STR      kernel command line [default: console=ttyS0]. Printable ASCII, at most
                       2047 bytes.
    --cpus N           vCPUs, 1..=254 [default: 1].
    --memory SIZE      guest RAM: a number with an optional K, M, G or T suffix (powers of 1024);
                       a bare number means MiB. At least 32M, at most the host's RAM [default: 512M].

SIOV (Scalable IOV) options:
    --adi N            assign N ADIs of the host SIOV device to the guest, each a PCI function
                       (vendor 5356, device 0002); 248 per PCI root bus, buses added as needed.
                       Repeatable: counts add up. Up to 3968.
                       [default: 0]
    --adi-vectors N    MSI-X vectors per ADI, 1..=256, each backed by one IMS entry [default: 2]
    --siov-adis N      ADIs of the software SIOV device siovmm runs [default: 256]
    --siov-ims N       IMS entries of that device, 16..=65536 [default: 16384]
    --ims-storage S    where the device keeps IMS entries: on-device (an MMIO table) or
                       in-memory (in each queue's context) [default: on-device]
    --siov-portal P    how ADIs take submissions: doorbell (a register KVM turns into an
                       ioeventfd: one exit per ring) or mapped (a portal page mapped into the
                       guest, polled by the device: no exit) [default: doorbell]
    --ims P            IMS policy for the guest: off (unmodified guests: IMS disallowed, said by
                       the SIOV ACPI table and the vIOMMU's Caching Mode), trap (an enlightened
                       guest programs IMS slots in each ADI's BAR0 window, trapped by siovmm;
                       needs on-device IMS) or pv (it gets IMS vectors through the hypercall)
                       [default: off]
    --ims-per-adi N    most IMS entries the guest may take per ADI through the hypercall or
                       the trapped window, 1..=32768 (QUERY reports it) [default: 2048]
    --ims-per-vm N     most for all the guest's ADIs together, 1..=65536 [default: the
                       device's]
    --viommu           give the guest a virtual VT-d DMA-remapping unit (ACPI DMAR, one DRHD
                       with INCLUDE_PCI_ALL at 0xfed90000) that translates ADI DMA as the guest
                       programs it; with --ims off it reports Caching Mode (no IMS in this VM)
    --vfio PATH        pass a host device through with kernel VFIO: its sysfs directory
                       (/sys/bus/pci/devices/DDDD:BB:DD.F, or /sys/bus/mdev/devices/UUID),
                       bound to vfio-pci, its IOMMU group viable. Repeatable. Not with
                       --viommu. (docs/vfio.md)
    --vfio-iommu I     how kernel VFIO reaches the host IOMMU: container (/dev/vfio/vfio and
                       the group's /dev/vfio/N) or iommufd (the device's cdev and /dev/iommu:
                       Linux 6.6+, siovmm built with the iommufd feature) [default: container]
    --vfio-user SOCKET add the vfio-user PCI device served on this UNIX socket, such as an
                       ADI of siovmm-devd (docs/devd.md); guest RAM is then shared with the
                       device process. Repeatable. Not with --viommu.
    --max-msi-routes N KVM MSI routes siovmm may use, 0..=4056 (KVM's 4096 entries minus the
                       irqchip's 40); vectors beyond the budget are delivered by a VMM thread
                       with KVM_SIGNAL_MSI [default: 4056]

    --api-socket PATH  serve the HTTP API on a UNIX socket created at PATH (which must not
                       exist; removed at exit): VM info, add and remove ADIs, stop
                       (docs/api.md; siovmm-ctl is its command-line client)
    --vfio-user-dir DIR
                       the API may add vfio-user devices served on sockets under DIR (such as
                       siovmm-devd's ADIs); guest RAM is then shared. Only with --api-socket.
    --pci-buses N      PCI root buses, 1..=16 [default: the fewest that hold the devices given
                       at start]. Each has 31 device numbers: room for devices the API adds
                       (an ADI request takes one per 8 ADIs, a passed-through device one).

    --seccomp MODE     system calls each siovmm thread may make are limited to its kind's list
                       (vCPU, event loop, device worker, ...): on (a call outside it stops
                       siovmm, naming the thread and the call), log (the kernel logs it and
                       lets it run) or off [default: on] (docs/seccomp.md)

    -h, --help         print this help.
    -V, --version      print the version.

The guest's COM1 is siovmm's stdin/stdout. siovmm exits 0 when the guest powers off or
reboots, 1 when the VM fails (triple fault, KVM error; one line on stderr says what and where),
2 on bad arguments, 128+N when stopped by signal N (Ctrl-C: 130).
";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Boot a VM.
    Run(VmConfig),
    /// Print help.
    Help,
    /// Print the version.
    Version,
    /// Run the SIOV scale and delivery benchmark.
    BenchSiov(BenchOptions),
    /// Race the device daemon's fast path against the in-process device.
    BenchDevd(BenchDevdOptions),
}

/// A bad command line; the message is the whole error line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct CliError(pub String);

fn err<T>(msg: String) -> Result<T, CliError> {
    Err(CliError(msg))
}

/// Parses a size such as `512M`, `2G`, `1048576K`, or a bare MiB count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 20),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

fn host_ram() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page <= 0 {
        u64::MAX
    } else {
        (pages as u64).saturating_mul(page as u64)
    }
}

fn check_file(flag: &str, path: &str) -> Result<File, CliError> {
    let meta = std::fs::metadata(path).or_else(|e| err(format!("{flag} {path}: {e}")))?;
    if !meta.is_file() {
        return err(format!("{flag} {path}: not a regular file"));
    }
    File::open(path).or_else(|e| err(format!("{flag} {path}: {e}")))
}

/// Parses and validates `args` (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let args: Vec<String> = args.into_iter().collect();
    if args.first().map(String::as_str) == Some("bench-siov") {
        return parse_bench(&args[1..]).map(Command::BenchSiov);
    }
    if args.first().map(String::as_str) == Some("bench-devd") {
        return parse_bench_devd(&args[1..]).map(Command::BenchDevd);
    }
    let mut kernel = None;
    let mut initramfs = None;
    let mut cmdline = None;
    let mut cpus = None;
    let mut memory = None;
    let mut seccomp = None;
    let mut api_socket: Option<String> = None;
    let mut vfio_user_dir: Option<String> = None;
    let mut pci_buses: Option<String> = None;
    let mut vfio_iommu: Option<String> = None;
    let mut adis: Option<u32> = None;
    let mut siov_opts: Vec<(String, String)> = Vec::new();
    let mut vfio: Vec<std::path::PathBuf> = Vec::new();
    let mut vfio_user: Vec<std::path::PathBuf> = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let slot = match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--kernel" => &mut kernel,
            "--initramfs" => &mut initramfs,
            "--cmdline" => &mut cmdline,
            "--cpus" => &mut cpus,
            "--memory" => &mut memory,
            "--seccomp" => &mut seccomp,
            "--api-socket" => &mut api_socket,
            "--vfio-user-dir" => &mut vfio_user_dir,
            "--pci-buses" => &mut pci_buses,
            "--vfio-iommu" => &mut vfio_iommu,
            "--adi" => {
                let v = value_of(&flag, inline, &mut it)?;
                let n = parse_count("--adi", &v, 0, MAX_ADIS_PER_GUEST)?;
                let total = adis.unwrap_or(0) + n;
                if total > MAX_ADIS_PER_GUEST {
                    return err(format!("--adi {v}: {total} ADIs in all, a guest takes at most {MAX_ADIS_PER_GUEST}"));
                }
                adis = Some(total);
                continue;
            }
            "--vfio" => {
                vfio.push(value_of(&flag, inline, &mut it)?.into());
                continue;
            }
            "--vfio-user" => {
                vfio_user.push(value_of(&flag, inline, &mut it)?.into());
                continue;
            }
            "--viommu" => {
                if inline.is_some() {
                    return err("--viommu takes no value".into());
                }
                if siov_opts.iter().any(|(f, _)| f == "--viommu") {
                    return err("--viommu given more than once".into());
                }
                siov_opts.push((flag, String::new()));
                continue;
            }
            "--adi-vectors" | "--siov-adis" | "--siov-ims" | "--ims-storage" | "--siov-portal" | "--max-msi-routes" | "--ims"
            | "--ims-per-adi" | "--ims-per-vm" => {
                if siov_opts.iter().any(|(f, _)| *f == flag) {
                    return err(format!("{flag} given more than once"));
                }
                let v = value_of(&flag, inline, &mut it)?;
                siov_opts.push((flag, v));
                continue;
            }
            _ => return err(format!("unknown argument '{arg}' (see --help)")),
        };
        if slot.is_some() {
            return err(format!("{flag} given more than once"));
        }
        *slot = Some(value_of(&flag, inline, &mut it)?);
    }

    let kernel = kernel.ok_or_else(|| CliError("--kernel PATH is required (see --help)".into()))?;
    let cpus = match cpus {
        None => 1,
        Some(v) => match v.parse::<u32>() {
            Ok(n @ 1..) if n <= u32::from(MAX_CPUS) => n as u8,
            Ok(_) => return err(format!("--cpus {v}: must be between 1 and {MAX_CPUS}")),
            Err(_) => return err(format!("--cpus {v}: not a number")),
        },
    };
    let memory = match memory {
        None => 512 << 20,
        Some(v) => {
            let bytes = parse_size(&v)
                .ok_or_else(|| CliError(format!("--memory {v}: not a size (examples: 512M, 2G)")))?;
            if bytes < MIN_MEMORY {
                return err(format!("--memory {v}: at least {}M is needed", MIN_MEMORY >> 20));
            }
            if bytes % 4096 != 0 {
                return err(format!("--memory {v}: must be a multiple of 4K"));
            }
            let host = host_ram();
            if bytes > host {
                return err(format!("--memory {v}: more than this host's {}M of RAM", host >> 20));
            }
            bytes
        }
    };
    let seccomp = seccomp.map_or(Ok(siovmm_seccomp::Mode::On), |v| v.parse().map_err(CliError))?;
    let cmdline = cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if cmdline.len() >= arch::layout::CMDLINE_MAX_SIZE {
        return err(format!(
            "--cmdline: {} bytes, at most {} allowed",
            cmdline.len(),
            arch::layout::CMDLINE_MAX_SIZE - 1
        ));
    }
    if let Some(c) = cmdline.chars().find(|c| !(' '..='~').contains(c)) {
        return err(format!("--cmdline: character {c:?} is not printable ASCII"));
    }

    let mut siov = SiovConfig { adis: adis.unwrap_or(0), ..SiovConfig::default() };
    let SiovBackend::Software { adis: mut device_adis, ims_entries: mut device_ims, mut storage, mut portal } = siov.device;
    for (flag, v) in &siov_opts {
        match flag.as_str() {
            "--adi-vectors" => siov.vectors = parse_count(flag, v, 1, u32::from(siovmm_vdcm::adi::MAX_MSIX_VECTORS))? as u16,
            "--siov-adis" => device_adis = parse_count(flag, v, 1, 1 << 20)?,
            "--siov-ims" => device_ims = parse_count(flag, v, 16, siovmm_vfio::soft::ims::MAX_ENTRIES)?,
            "--viommu" => siov.viommu = true,
            "--ims" => {
                siov.ims = match v.as_str() {
                    "off" => ImsPolicy::Off,
                    "pv" => ImsPolicy::Pv,
                    "trap" => ImsPolicy::Trap,
                    _ => return err(format!("--ims {v}: must be off, trap or pv")),
                }
            }
            "--ims-per-adi" => siov.ims_per_adi = parse_count(flag, v, 1, siovmm_vdcm::adi::MAX_PV_SLOTS)?,
            "--ims-per-vm" => siov.ims_per_vm = parse_count(flag, v, 1, siovmm_vfio::soft::ims::MAX_ENTRIES)?,
            "--max-msi-routes" => siov.max_msi_routes = parse_count(flag, v, 0, siovmm_interrupts::router::MAX_MSI_ROUTES)?,
            "--siov-portal" => {
                let Some(kind) = PortalKind::from_name(v) else { return err(format!("--siov-portal {v}: must be doorbell or mapped")) };
                portal = kind;
            }
            _ => {
                let Some(named) = ImsStorage::from_name(v) else { return err(format!("--ims-storage {v}: must be on-device or in-memory")) };
                storage = named;
            }
        }
    }
    siov.device = SiovBackend::Software { adis: device_adis, ims_entries: device_ims, storage, portal };
    if siov.ims == ImsPolicy::Trap && storage != ImsStorage::OnDevice {
        return err("--ims trap: IMS in memory cannot be trapped; use --ims pv or --ims-storage on-device".into());
    }
    if siov.adis > device_adis {
        return err(format!("--adi {}: the SIOV device has only {device_adis} ADIs (--siov-adis)", siov.adis));
    }
    let ims_needed = u64::from(siov.adis) * u64::from(siov.vectors);
    if ims_needed > u64::from(device_ims) {
        return err(format!(
            "--adi {} × --adi-vectors {} needs {ims_needed} IMS entries; the device has {} (--siov-ims)",
            siov.adis, siov.vectors, device_ims
        ));
    }

    for (flag, given) in [("--vfio", !vfio.is_empty()), ("--vfio-user", !vfio_user.is_empty())] {
        if given && siov.viommu {
            return err(format!(
                "{flag} with --viommu: siovmm does not shadow the guest's IOMMU mappings into VFIO, so the device \
                 would DMA untranslated behind a remapping unit the guest trusts; drop --viommu"
            ));
        }
    }
    let functions = u64::from(siov.adis) + vfio.len() as u64 + vfio_user.len() as u64;
    if functions > u64::from(MAX_ADIS_PER_GUEST) {
        return err(format!(
            "--vfio: {} ADIs, {} VFIO and {} vfio-user devices; a guest takes at most {MAX_ADIS_PER_GUEST} functions",
            siov.adis,
            vfio.len(),
            vfio_user.len()
        ));
    }
    check_sockets(&vfio_user)?;
    let vfio_iommu = match vfio_iommu.as_deref() {
        None => Iommu::default(),
        Some(name) => match Iommu::from_name(name) {
            None => return err(format!("--vfio-iommu {name}: expected container or iommufd")),
            Some(Iommu::Iommufd) if !cfg!(feature = "iommufd") => {
                return err(format!("--vfio-iommu {name}: this siovmm was built without the iommufd feature (cargo build --features iommufd)"))
            }
            Some(i) => i,
        },
    };
    let vfio = siovmm_vfio::host::check_all(&vfio, std::path::Path::new(VFIO_DEV), vfio_iommu).map_err(|e| CliError(format!("--vfio {e}")))?;

    let mut kfile = check_file("--kernel", &kernel)?;
    match sniff_format(&mut kfile) {
        Ok(Some(_)) => {}
        Ok(None) => return err(format!("--kernel {kernel}: not an ELF vmlinux or bzImage kernel")),
        Err(e) => return err(format!("--kernel {kernel}: {e}")),
    }
    if let Some(path) = &initramfs {
        check_file("--initramfs", path)?;
    }
    let vfio_user_dir = match vfio_user_dir {
        None => None,
        Some(_) if api_socket.is_none() => {
            return err("--vfio-user-dir: only with --api-socket (it says where the API may take vfio-user devices from)".into())
        }
        Some(dir) => match std::fs::canonicalize(&dir) {
            Ok(p) if p.is_dir() => Some(p),
            Ok(_) => return err(format!("--vfio-user-dir {dir}: not a directory")),
            Err(e) => return err(format!("--vfio-user-dir {dir}: {e}")),
        },
    };
    let pci_buses = match pci_buses {
        None => None,
        Some(v) => Some(parse_count("--pci-buses", &v, 1, u32::from(arch::pci::MAX_ROOT_BUSES))? as u8),
    };
    let config = VmConfig {
        kernel: kernel.into(),
        initramfs: initramfs.map(Into::into),
        cmdline,
        cpus,
        memory,
        siov,
        vfio,
        vfio_iommu,
        vfio_user,
        seccomp,
        api_socket: api_socket.map(Into::into),
        vfio_user_dir,
        pci_buses,
    };
    let needed = config.needed_root_buses();
    if needed > arch::pci::MAX_ROOT_BUSES {
        return err(format!(
            "--vfio: {} ADIs, {} VFIO and {} vfio-user devices need {needed} PCI root buses; a guest has at most {}",
            config.siov.adis,
            config.vfio.len(),
            config.vfio_user.len(),
            arch::pci::MAX_ROOT_BUSES
        ));
    }
    if let Some(asked) = config.pci_buses.filter(|&b| b < needed) {
        return err(format!(
            "--pci-buses {asked}: the {} ADIs and {} devices given at start need {needed} root buses",
            config.siov.adis,
            config.vfio.len() + config.vfio_user.len()
        ));
    }
    Ok(Command::Run(config))
}

/// Each `--vfio-user` path is a UNIX socket, given once (whether a server listens there is
/// found out when the VM connects).
fn check_sockets(paths: &[std::path::PathBuf]) -> Result<(), CliError> {
    use std::os::unix::fs::FileTypeExt;
    for (i, path) in paths.iter().enumerate() {
        let shown = path.display();
        match std::fs::metadata(path) {
            Err(e) => return err(format!("--vfio-user {shown}: {e}")),
            Ok(m) if !m.file_type().is_socket() => return err(format!("--vfio-user {shown}: not a UNIX socket")),
            Ok(_) => {}
        }
        if paths[..i].iter().any(|p| p == path) {
            return err(format!("--vfio-user {shown}: given twice"));
        }
    }
    Ok(())
}

/// A flag's value: given inline (`--flag=value`) or as the next argument.
fn value_of(flag: &str, inline: Option<String>, rest: &mut impl Iterator<Item = String>) -> Result<String, CliError> {
    inline.or_else(|| rest.next()).ok_or_else(|| CliError(format!("{flag} needs a value")))
}

/// Where the VFIO character devices are.
pub(crate) const VFIO_DEV: &str = "/dev/vfio";

/// A benchmark's arguments as (flag, value) pairs, in order: every flag takes one value.
fn flag_values(args: &[String]) -> impl Iterator<Item = Result<(&str, &str), CliError>> {
    args.chunks(2).map(|p| match p {
        [flag, v] => Ok((flag.as_str(), v.as_str())),
        [flag, ..] => Err(CliError(format!("{flag} needs a value"))),
        [] => Err(CliError("an empty argument pair".into())),
    })
}

/// Parses `bench-siov` options.
pub fn parse_bench(args: &[String]) -> Result<BenchOptions, CliError> {
    let mut o = BenchOptions::default();
    for pair in flag_values(args) {
        let (flag, v) = pair?;
        match flag {
            "--adis" => o.adis = parse_count(flag, v, 1, 1 << 20)?,
            "--ims" => o.ims = parse_count(flag, v, 16, siovmm_vfio::soft::ims::MAX_ENTRIES)?,
            "--rate-adis" => o.rate_adis = parse_count(flag, v, 1, 4096)?,
            "--per-adi" => o.per_adi = parse_count(flag, v, 1, 4000)?,
            _ => return Err(CliError(format!("bench-siov: unknown argument '{flag}'"))),
        }
    }
    if o.ims < o.adis {
        return Err(CliError(format!("--ims {}: fewer IMS entries than --adis {} (one vector each)", o.ims, o.adis)));
    }
    o.rate_adis = o.rate_adis.min(o.adis);
    Ok(o)
}

/// Parses `bench-devd` options.
pub fn parse_bench_devd(args: &[String]) -> Result<BenchDevdOptions, CliError> {
    let mut o = BenchDevdOptions::default();
    for pair in flag_values(args) {
        let (flag, v) = pair?;
        match flag {
            "--rounds" => o.rounds = parse_count(flag, v, 1, 1000)?,
            "--descriptors" => o.descriptors = parse_count(flag, v, 1, 1_000_000)?,
            "--scale" => o.scale = Some(parse_count(flag, v, 1, siovmm_devd::MAX_ADIS)?),
            "--probe" => {
                if !std::path::Path::new(v).exists() {
                    return err(format!("--probe {v}: no such socket"));
                }
                o.probe = Some(v.into());
            }
            "--seconds" => o.probe_seconds = parse_count(flag, v, 1, 86_400)?,
            "--scale-child" => {
                let mut parts = v.rsplitn(3, ',');
                let (count, first, dir) = (parts.next(), parts.next(), parts.next());
                let number = |n: Option<&str>| n.and_then(|n| n.parse::<u32>().ok());
                let (Some(count), Some(first), Some(dir)) = (number(count), number(first), dir) else {
                    return err(format!("--scale-child {v}: not DIR,FIRST,COUNT"));
                };
                o.scale_child = Some((dir.into(), first, count));
            }
            "--devd" => {
                if !std::path::Path::new(v).is_file() {
                    return err(format!("--devd {v}: no such file"));
                }
                o.devd = Some(v.into());
            }
            _ => return Err(CliError(format!("bench-devd: unknown argument '{flag}'"))),
        }
    }
    Ok(o)
}

/// A decimal count in `min..=max`.
pub fn parse_count(flag: &str, v: &str, min: u32, max: u32) -> Result<u32, CliError> {
    match v.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => err(format!("{flag} {v}: must be between {min} and {max}")),
        Err(_) => err(format!("{flag} {v}: not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn bench_devd_options() {
        let Ok(Command::BenchDevd(o)) = parse(args(&["bench-devd", "--rounds", "3", "--descriptors", "100"])) else {
            panic!("bench-devd not parsed")
        };
        assert_eq!((o.rounds, o.descriptors, o.devd), (3, 100, None));
        let Ok(Command::BenchDevd(o)) = parse(args(&["bench-devd", "--scale-child", "/tmp/a,b,496,4"])) else { panic!("not parsed") };
        assert_eq!(o.scale_child, Some(("/tmp/a,b".into(), 496, 4)), "the directory may hold commas");
        for (bad, says) in [
            (&["bench-devd", "--rounds", "0"][..], "--rounds 0: must be between 1 and 1000"),
            (&["bench-devd", "--devd", "/no/such/devd"][..], "--devd /no/such/devd: no such file"),
            (&["bench-devd", "--fast", "1"][..], "bench-devd: unknown argument '--fast'"),
            (&["bench-devd", "--rounds"][..], "--rounds needs a value"),
            (&["bench-devd", "--probe", "/no/such.sock"][..], "--probe /no/such.sock: no such socket"),
            (&["bench-devd", "--probe", "/", "--seconds", "0"][..], "--seconds 0: must be between 1 and 86400"),
            (&["bench-devd", "--scale-child", "/tmp,x,3"][..], "--scale-child /tmp,x,3: not DIR,FIRST,COUNT"),
        ] {
            assert_eq!(parse(args(bad)).err().map(|e| e.0), Some(says.to_string()));
        }
    }

    /// A temporary file, removed when dropped; its path derefs as `&str`.
    struct TempPath(String);

    impl std::ops::Deref for TempPath {
        type Target = str;
        fn deref(&self) -> &str {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A file holding `bytes`, unique per call: tests run in parallel.
    fn temp_file(bytes: &[u8]) -> TempPath {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("siovmm-cli-test-{}-{n}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        TempPath(p.to_string_lossy().into_owned())
    }

    /// A file with an ELF magic.
    fn fake_kernel() -> TempPath {
        temp_file(b"\x7fELF\x02\x01\x01")
    }

    fn parse_err(a: &[&str]) -> String {
        parse(args(a)).unwrap_err().0
    }

    #[test]
    fn pci_buses_give_room_and_are_checked_against_what_is_given() {
        let k = fake_kernel();
        let Ok(Command::Run(c)) = parse(args(&["--kernel", &k, "--pci-buses", "3"])) else { panic!("not parsed") };
        assert_eq!((c.pci_buses, c.pci_topology().root_buses()), (Some(3), 3));
        let Ok(Command::Run(c)) = parse(args(&["--kernel", &k, "--adi", "300", "--siov-adis", "300", "--siov-ims", "1024"])) else {
            panic!("not parsed")
        };
        // 300 ADIs take 38 device numbers: two root buses.
        assert_eq!((c.pci_buses, c.pci_topology().root_buses()), (None, 2));
        for (bad, says) in [
            (&["--kernel", &k, "--pci-buses", "0"][..], "--pci-buses 0: must be between 1 and 16"),
            (&["--kernel", &k, "--pci-buses", "17"][..], "--pci-buses 17: must be between 1 and 16"),
            (&["--kernel", &k, "--pci-buses", "1", "--adi", "300", "--siov-adis", "300", "--siov-ims", "1024"][..], "--pci-buses 1: the 300 ADIs and 0 devices given at start need 2 root buses"),
        ] {
            assert_eq!(parse_err(bad), says, "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1024"), Some(1 << 30));
        assert_eq!(parse_size("65536K"), Some(64 << 20));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size("18446744073709551615T"), None);
    }

    #[test]
    fn defaults_and_forms() {
        let k = fake_kernel();
        let Command::Run(c) = parse(args(&["--kernel", &k])).unwrap() else { panic!() };
        assert_eq!((c.cpus, c.memory, c.cmdline.as_str()), (1, 512 << 20, DEFAULT_CMDLINE));
        let Command::Run(c) =
            parse(args(&["--kernel", &k, "--cpus", "2", "--memory", "256M", "--cmdline", "quiet x=1"])).unwrap()
        else {
            panic!()
        };
        assert_eq!((c.cpus, c.memory, c.cmdline.as_str()), (2, 256 << 20, "quiet x=1"));
        let Command::Run(c) = parse(args(&[&format!("--kernel={}", &*k), "--cpus=3"])).unwrap() else { panic!() };
        assert_eq!(c.cpus, 3);
        assert_eq!(c.siov, SiovConfig::default());
        let Command::Run(c) = parse(args(&[
            "--kernel", &k, "--adi", "40", "--adi=24", "--adi-vectors", "4", "--ims-storage", "in-memory",
            "--siov-ims", "20000", "--max-msi-routes", "100", "--siov-portal", "mapped", "--ims-per-adi", "64",
            "--ims-per-vm=1000",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            c.siov,
            SiovConfig {
                adis: 64,
                vectors: 4,
                device: SiovBackend::Software { adis: 256, ims_entries: 20_000, storage: ImsStorage::InMemory, portal: PortalKind::Mapped },
                max_msi_routes: 100,
                viommu: false,
                ims: ImsPolicy::Off,
                ims_per_adi: 64,
                ims_per_vm: 1000,
            }
        );
        assert_eq!(parse(args(&["--help"])).unwrap(), Command::Help);
        assert_eq!(parse(args(&["-V"])).unwrap(), Command::Version);
    }

    #[test]
    fn errors_name_the_bad_value() {
        let k = fake_kernel();
        assert_eq!(parse_err(&["--kernel", &k, "--cpus", "0"]), "--cpus 0: must be between 1 and 254");
        assert_eq!(parse_err(&["--kernel", &k, "--ims-per-adi", "40000"]), "--ims-per-adi 40000: must be between 1 and 32768");
        assert_eq!(parse_err(&["--kernel", &k, "--ims-per-vm", "0"]), "--ims-per-vm 0: must be between 1 and 65536");
        assert_eq!(parse_err(&["--kernel", &k, "--cpus", "x"]), "--cpus x: not a number");
        assert_eq!(parse_err(&["--kernel", &k, "--cpus", "300"]), "--cpus 300: must be between 1 and 254");
        assert!(parse_err(&["--kernel", &k, "--memory", "lots"]).starts_with("--memory lots: not a size"));
        assert!(parse_err(&["--kernel", &k, "--memory", "1M"]).starts_with("--memory 1M: at least 32M"));
        assert!(parse_err(&["--kernel", &k, "--memory", "1000T"]).starts_with("--memory 1000T: more than this host"));
        assert!(parse_err(&["--kernel", &k, "--memory", "33555455K"]).contains("multiple of 4K"));
        assert!(parse_err(&["--kernel", "/nonexistent/vmlinux"]).starts_with("--kernel /nonexistent/vmlinux: "));
        assert_eq!(parse_err(&["--kernel", "/"]), "--kernel /: not a regular file");
        let nk = temp_file(b"hello");
        let nk: &str = &nk;
        assert_eq!(parse_err(&["--kernel", nk]), format!("--kernel {nk}: not an ELF vmlinux or bzImage kernel"));
        assert!(parse_err(&["--kernel", &k, "--initramfs", "/nope"]).starts_with("--initramfs /nope: "));
        assert_eq!(parse_err(&["--kernel"]), "--kernel needs a value");
        assert_eq!(parse_err(&["--cpus", "1"]), "--kernel PATH is required (see --help)");
        assert_eq!(parse_err(&["--bogus"]), "unknown argument '--bogus' (see --help)");
        assert_eq!(parse_err(&["--kernel", &k, "--cpus", "1", "--cpus", "2"]), "--cpus given more than once");
        assert!(parse_err(&["--kernel", &k, "--cmdline", "a\tb"]).contains("not printable ASCII"));
        assert!(parse_err(&["--kernel", &k, "--cmdline", &"x".repeat(3000)]).contains("at most 2047"));
        assert_eq!(parse_err(&["--kernel", &k, "--adi", "x"]), "--adi x: not a number");
        assert!(parse_err(&["--kernel", &k, "--adi", "3000", "--adi", "1000"]).contains("4000 ADIs in all, a guest takes at most 3968"));
        // 300 ADIs fit the guest (two root buses) but not the default device.
        assert!(parse_err(&["--kernel", &k, "--adi", "200", "--adi", "100"]).contains("the SIOV device has only 256 ADIs"));
        assert!(parse_err(&["--kernel", &k, "--adi", "10", "--siov-adis", "5"]).contains("only 5 ADIs"));
        assert!(parse_err(&["--kernel", &k, "--adi", "100", "--adi-vectors", "200"]).contains("needs 20000 IMS entries"));
        assert_eq!(parse_err(&["--kernel", &k, "--ims-storage", "disk"]), "--ims-storage disk: must be on-device or in-memory");
        assert_eq!(parse_err(&["--kernel", &k, "--siov-portal", "mmio"]), "--siov-portal mmio: must be doorbell or mapped");
        assert_eq!(parse_err(&["--kernel", &k, "--max-msi-routes", "5000"]), "--max-msi-routes 5000: must be between 0 and 4056");
        assert_eq!(parse_err(&["--kernel", &k, "--adi-vectors", "0"]), "--adi-vectors 0: must be between 1 and 256");
        assert_eq!(parse_err(&["--kernel", &k, "--adi-vectors", "257"]), "--adi-vectors 257: must be between 1 and 256");
        assert_eq!(parse_err(&["--kernel", &k, "--ims", "posted"]), "--ims posted: must be off, trap or pv");
        assert!(parse_err(&["--kernel", &k, "--ims", "trap", "--ims-storage", "in-memory"]).starts_with("--ims trap: IMS in memory cannot be trapped"));
        assert_eq!(parse_err(&["--kernel", &k, "--siov-ims", "2", "--siov-ims", "3"]), "--siov-ims given more than once");
        // Host devices are checked before anything else exists (the checks themselves:
        // siovmm_vfio::host's tests, on a fake sysfs; the sandbox test, on a real one).
        assert_eq!(parse_err(&["--kernel", &k, "--vfio", "/sys/bus/pci/devices/0000:ff:1f.7"]), "--vfio /sys/bus/pci/devices/0000:ff:1f.7: no such device");
        assert_eq!(parse_err(&["--kernel", &k, "--vfio"]), "--vfio needs a value");
        assert_eq!(parse_err(&["--kernel", &k, "--vfio-iommu", "type1"]), "--vfio-iommu type1: expected container or iommufd");
        if cfg!(feature = "iommufd") {
            // The device's checks then look for its cdev and /dev/iommu (host.rs's tests).
            let Command::Run(c) = parse(args(&["--kernel", &k, "--vfio-iommu", "iommufd"])).unwrap() else { panic!() };
            assert_eq!(c.vfio_iommu, Iommu::Iommufd);
        } else {
            assert_eq!(
                parse_err(&["--kernel", &k, "--vfio-iommu", "iommufd"]),
                "--vfio-iommu iommufd: this siovmm was built without the iommufd feature (cargo build --features iommufd)"
            );
        }
        let Command::Run(c) = parse(args(&["--kernel", &k, "--vfio-iommu=container"])).unwrap() else { panic!() };
        assert_eq!(c.vfio_iommu, Iommu::Container);
        assert!(parse_err(&["--kernel", &k, "--vfio", "/x", "--viommu"]).starts_with("--vfio with --viommu: siovmm does not shadow"));
        assert!(parse_err(&["--kernel", &k, "--vfio-user", "/x", "--viommu"]).starts_with("--vfio-user with --viommu: siovmm does not shadow"));
        assert_eq!(parse_err(&["--kernel", &k, "--vfio-user", "/nonexistent.sock"]), "--vfio-user /nonexistent.sock: No such file or directory (os error 2)");
        assert_eq!(parse_err(&["--kernel", &k, "--vfio-user", &k]), format!("--vfio-user {}: not a UNIX socket", &*k));
        let dir = std::env::temp_dir().join(format!("siovmm-cli-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("adi.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let sock = sock.to_str().unwrap();
        match parse(args(&["--kernel", &k, "--vfio-user", sock])) {
            Ok(Command::Run(c)) => assert_eq!(c.vfio_user, vec![std::path::PathBuf::from(sock)]),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_err(&["--kernel", &k, "--vfio-user", sock, "--vfio-user", sock]), format!("--vfio-user {sock}: given twice"));
        std::fs::remove_dir_all(&dir).unwrap();
        for e in [parse_err(&["--kernel", &k, "--cpus", "0"]), parse_err(&["--kernel", "/nonexistent"])] {
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
