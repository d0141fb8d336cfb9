//! What siovmm is asked to do, validated: the VM's configuration and the benchmark's options.
//! The command line parses into these types (`cli`); everything else reads them.

use std::path::PathBuf;
use std::sync::Arc;

use siovmm_vfio::host::{HostDevice, Iommu};
use siovmm_vfio::siov::{ImsStorage, PortalKind, SiovDevice};
use siovmm_vfio::soft::SoftSiovDevice;

/// Fewest MiB a Linux guest can boot in with its kernel and initramfs.
pub const MIN_MEMORY: u64 = 32 << 20;
/// Most vCPUs: APIC IDs are 8-bit in our MADT and xAPIC mode.
pub const MAX_CPUS: u8 = 254;
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// Which host SIOV device the guest's ADIs come from (the device daemon over vfio-user joins
/// this list with issue 11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiovBackend {
    /// The software DSA-like device, created inside siovmm's process for this VM.
    Software {
        /// ADIs of the device.
        adis: u32,
        /// IMS entries of the device.
        ims_entries: u32,
        /// Where it keeps them.
        storage: ImsStorage,
        /// How its ADIs take submissions.
        portal: PortalKind,
    },
}

/// Worker threads of an in-process software device.
const SOFTWARE_DEVICE_WORKERS: usize = 2;

impl SiovBackend {
    /// ADIs the device has.
    pub fn adis(&self) -> u32 {
        match self {
            Self::Software { adis, .. } => *adis,
        }
    }

    /// Where the device keeps IMS.
    pub fn ims_storage(&self) -> ImsStorage {
        match self {
            Self::Software { storage, .. } => *storage,
        }
    }

    /// Opens (for the software device: creates) the device.
    pub fn open(&self) -> std::io::Result<Arc<dyn SiovDevice>> {
        match *self {
            Self::Software { adis, ims_entries, storage, portal } => {
                Ok(Arc::new(SoftSiovDevice::with_portals(adis, ims_entries, storage, SOFTWARE_DEVICE_WORKERS, portal)?))
            }
        }
    }
}

/// The host SIOV device and the guest's share of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiovConfig {
    /// ADIs assigned to the guest.
    pub adis: u32,
    /// MSI-X vectors per ADI.
    pub vectors: u16,
    /// The device they come from.
    pub device: SiovBackend,
    /// KVM routes siovmm may use.
    pub max_msi_routes: u32,
    /// Give the guest a virtual VT-d unit.
    pub viommu: bool,
    /// IMS policy.
    pub ims: ImsPolicy,
    /// Most IMS entries the guest may take per ADI through the hypercall or trapped windows.
    pub ims_per_adi: u32,
    /// Most for all its ADIs together (`u32::MAX`: as many as the device has).
    pub ims_per_vm: u32,
}

/// What a guest may do with IMS (docs/ims-policy.md). Read only through its methods, so that
/// each consequence of the policy is decided here once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImsPolicy {
    /// Guests must not use IMS; MSI-X only.
    Off,
    /// Guests may get IMS vectors through the hypercall.
    Pv,
    /// Guests may program IMS slots in each ADI's trapped window (on-device IMS).
    Trap,
}

impl ImsPolicy {
    /// What a guest that opts in through the hypercall gets. The platform's "no IMS" hint (the
    /// SIOV table's opt-out flag; Caching Mode with a vIOMMU) is on under every policy, so an
    /// unmodified guest never tries IMS; the policy only decides what an opt-in unlocks.
    /// `storage` is where the VM's device keeps IMS (in queue memory, the guest stores the
    /// host messages it gets).
    pub fn offer(self, storage: ImsStorage) -> siovmm_vdcm::hypercall::ImsOffer {
        use siovmm_vdcm::hypercall::ImsOffer;
        match self {
            Self::Off => ImsOffer::None,
            Self::Pv => ImsOffer::Pv { in_queue: storage == ImsStorage::InMemory },
            Self::Trap => ImsOffer::Trap,
        }
    }

    /// Whether each ADI's BAR0 carries the trapped IMS window.
    pub fn traps_ims_window(self) -> bool {
        self == Self::Trap
    }

}

impl Default for SiovConfig {
    fn default() -> Self {
        Self {
            adis: 0,
            vectors: 2,
            device: SiovBackend::Software { adis: 256, ims_entries: 16_384, storage: ImsStorage::OnDevice, portal: PortalKind::Doorbell },
            max_msi_routes: siovmm_interrupts::router::MAX_MSI_ROUTES,
            viommu: false,
            ims: ImsPolicy::Off,
            ims_per_adi: siovmm_vdcm::ims_quota::DEFAULT_PER_ADI,
            ims_per_vm: u32::MAX,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub cpus: u8,
    /// RAM in bytes.
    pub memory: u64,
    /// SIOV device and ADIs.
    pub siov: SiovConfig,
    /// Host devices passed through with kernel VFIO, checked (`--vfio`).
    pub vfio: Vec<HostDevice>,
    /// How kernel VFIO devices reach the host IOMMU, at start and added later (`--vfio-iommu`).
    pub vfio_iommu: Iommu,
    /// Sockets of vfio-user devices, checked to be sockets (`--vfio-user`).
    pub vfio_user: Vec<PathBuf>,
    /// What a thread's system call outside its seccomp list does (`--seccomp`).
    pub seccomp: siovmm_seccomp::Mode,
    /// Where to serve the HTTP API (`--api-socket`).
    pub api_socket: Option<PathBuf>,
    /// The directory whose vfio-user sockets the API may attach, canonical (`--vfio-user-dir`).
    pub vfio_user_dir: Option<PathBuf>,
    /// Root buses asked for (`--pci-buses`): room for devices the API adds later. Otherwise
    /// the fewest that hold the devices given at start.
    pub pci_buses: Option<u8>,
}

impl VmConfig {
    /// The PCI root buses the VM needs: enough for its ADIs and passed-through devices (the
    /// CLI checked the count).
    pub fn pci_topology(&self) -> arch::pci::PciTopology {
        let needed = self.needed_root_buses();
        let buses = self.pci_buses.map_or(needed, |asked| asked.max(needed));
        arch::pci::PciTopology::new(u32::from(buses)).unwrap_or_default()
    }

    /// The fewest root buses that hold the devices given at start: `--adi`'s ADIs packed 8 to
    /// a device number, each passed-through device on a number of its own.
    pub fn needed_root_buses(&self) -> u8 {
        let numbers = self.siov.adis.div_ceil(8) + (self.vfio.len() + self.vfio_user.len()) as u32;
        let buses = numbers.div_ceil(u32::from(arch::pci::DEVICES_PER_BUS)).max(1);
        u8::try_from(buses).unwrap_or(u8::MAX)
    }
}

/// Options of `bench-siov`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// ADIs of the device, all composed.
    pub adis: u32,
    /// IMS entries of the device.
    pub ims: u32,
    /// ADIs used for the delivery figure.
    pub rate_adis: u32,
    /// Descriptors per ADI in the delivery figure.
    pub per_adi: u32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { adis: 10_000, ims: 16_384, rate_adis: 64, per_adi: 4000 }
    }
}


/// Options of `bench-devd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchDevdOptions {
    /// Rounds; each measures both rigs.
    pub rounds: u32,
    /// Descriptors per figure, round and rig.
    pub descriptors: u32,
    /// The daemon binary (default: `siovmm-devd` next to siovmm).
    pub devd: Option<PathBuf>,
    /// Instead of the fast-path figures, this many of the daemon's ADIs live at once across
    /// VMs (`bench_scale`).
    pub scale: Option<u32>,
    /// One of those VMs, in a process of its own (`--scale-child DIR,FIRST,COUNT`, which
    /// `--scale` passes; not for users): the daemon's socket directory and the ADIs it takes.
    pub scale_child: Option<(PathBuf, u32, u32)>,
    /// Instead, drive the ADI a running daemon serves at this socket for `probe_seconds`
    /// (`bench_devd::probe`).
    pub probe: Option<PathBuf>,
    /// How long `--probe` runs.
    pub probe_seconds: u32,
}

impl Default for BenchDevdOptions {
    fn default() -> Self {
        Self { rounds: 7, descriptors: 20_000, devd: None, scale: None, scale_child: None, probe: None, probe_seconds: 10 }
    }
}
