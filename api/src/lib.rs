//! siovmm's HTTP API: what an operator does to a running VM from outside (docs/api.md,
//! docs/api.yaml for the OpenAPI description).
//!
//! - [`http`]: one HTTP/1.1 request per connection, parsed with `httparse`, with hard limits on
//!   head and body size (a client is as hostile as a guest: it may be any local process that
//!   can open the socket).
//! - [`server`]: the endpoints, JSON in and out with `serde`, and the loop that serves a UNIX
//!   socket on one thread until told to stop. What the endpoints act on is a [`VmControl`],
//!   so the API is tested here with a fake VM and the VMM implements it over its VM.
//! - [`client`]: one request to a socket, for `siovmm-ctl` and the tests.

pub mod client;
pub mod http;
pub mod server;

use serde::{Deserialize, Serialize};

/// The path prefix of every endpoint.
pub const PREFIX: &str = "/api/v1";

/// What `GET /api/v1/vm.info` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The VM's PCI functions that came from siovmm's options or the API.
    pub devices: Vec<DeviceInfo>,
    /// IMS entries of the VM's SIOV device allocated to its ADIs.
    pub ims_entries: u32,
    /// IMS slots the guest took itself (hypercall or trapped window) on all its ADIs,
    /// in-process and the device daemon's alike.
    pub guest_ims_slots: u32,
    /// Guest vectors on KVM MSI routes.
    pub kvm_routes: usize,
    /// Guest vectors delivered by the overflow injector (no KVM route left for them).
    pub overflow_vectors: usize,
}

/// One device of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    /// Its PCI address in the guest (`SSSS:BB:DD.F`), which is also its id in the API.
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
}

/// Where a device comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// An ADI of the VM's in-process software SIOV device (`--adi`).
    Adi,
    /// A host PCI function through kernel VFIO (`--vfio`).
    Vfio,
    /// A device served over vfio-user, such as an ADI of the device daemon (`--vfio-user`).
    VfioUser,
}

/// `PUT /api/v1/vm.add-adi`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddAdis {
    /// How many ADIs, 1 to [`AddAdis::MAX`]: all are added or none.
    pub count: u32,
}

impl AddAdis {
    /// The most one request adds (a guest holds at most 16 root buses × 248 functions).
    pub const MAX: u32 = 3968;
}

/// What `PUT /api/v1/vm.add-adi` answers: the devices added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Added {
    /// The new devices, in the order they were added.
    pub devices: Vec<DeviceInfo>,
}

/// `PUT /api/v1/vm.add-vfio-user`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddVfioUser {
    /// The UNIX socket the device is served on, inside the directory siovmm was given
    /// (`--vfio-user-dir`).
    pub socket: String,
}

/// `PUT /api/v1/vm.add-vfio`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddVfio {
    /// The host device's sysfs directory (`/sys/bus/pci/devices/DDDD:BB:DD.F`), bound to
    /// vfio-pci, as `--vfio` takes it.
    pub path: String,
}

/// `PUT /api/v1/vm.remove-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveDevice {
    /// The device's id ([`DeviceInfo::id`]).
    pub id: String,
    /// How long the guest has to eject the device's slot once asked, in milliseconds (0 to
    /// [`RemoveDevice::MAX_EJECT_TIMEOUT_MS`]; [`RemoveDevice::EJECT_TIMEOUT_MS`] when
    /// absent). After that siovmm removes the device anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eject_timeout_ms: Option<u32>,
}

impl RemoveDevice {
    /// The guest's time to eject when the request names none.
    pub const EJECT_TIMEOUT_MS: u32 = 10_000;
    /// The longest a request may give the guest.
    pub const MAX_EJECT_TIMEOUT_MS: u32 = 600_000;
}

/// What `PUT /api/v1/vm.remove-device` answers: the device is gone, and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Removed {
    /// The device removed.
    pub id: String,
    /// Whether the guest ejected it when asked (false: it did not answer in time, or it does
    /// not handle hotplug events, and the device was taken away without its consent).
    pub ejected_by_guest: bool,
}

/// `GET /api/v1/vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    /// siovmm's version.
    pub version: String,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// One line saying what was wrong, naming the bad value.
    pub error: String,
}

/// Why a request failed: an HTTP status and one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// What was wrong.
    pub message: String,
}

impl ApiError {
    /// 400: the request itself is wrong (its JSON, a value out of range).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into() }
    }
    /// 403: outside what this VM was allowed (a socket outside `--vfio-user-dir`).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self { status: 403, message: message.into() }
    }
    /// 404: no such device (or endpoint).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: 404, message: message.into() }
    }
    /// 409: the VM's state forbids it now (the device is in use, nothing left to add).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self { status: 409, message: message.into() }
    }
    /// 500: siovmm failed doing it.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: 500, message: message.into() }
    }
    /// 501: valid, but siovmm cannot do it yet.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self { status: 501, message: message.into() }
    }
}

/// What the API acts on: one running VM. Every call is all or nothing: when it fails, the
/// VM is as it was.
pub trait VmControl: Send + Sync {
    /// The VM now.
    fn info(&self) -> Result<VmInfo, ApiError>;
    /// Adds `count` ADIs.
    fn add_adis(&self, count: u32) -> Result<Vec<DeviceInfo>, ApiError>;
    /// Adds the vfio-user device served at `socket`.
    fn add_vfio_user(&self, socket: &str) -> Result<DeviceInfo, ApiError>;
    /// Passes the host device at sysfs `path` through with kernel VFIO.
    fn add_vfio(&self, path: &str) -> Result<DeviceInfo, ApiError>;
    /// Removes the device `id`: asks the guest to eject its slot, waits up to `eject_timeout`
    /// for it, then removes it. A guest that does not handle hotplug events is not asked:
    /// then the removal is refused while the guest uses the device.
    fn remove_device(&self, id: &str, eject_timeout: std::time::Duration) -> Result<Removed, ApiError>;
    /// Asks the VM to stop (as SIGTERM does); the VMM exits once it has released it.
    fn shutdown(&self) -> Result<(), ApiError>;
}
