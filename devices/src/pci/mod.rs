//! The guest's PCI Express root complex: segment 0, reachable through configuration
//! mechanism #1 (ports 0xCF8/0xCFC) and ECAM (MCFG). Functions are addressed by
//! bus/device/function on any of the root buses of `arch::pci::PciTopology`, where
//! [`PciAllocator`] places functions and their BARs.

mod allocator;
pub mod bar;
mod config;
mod host_bridge;
pub mod hotplug;
pub mod msix;
mod root;

pub use allocator::{AllocError, PciAllocator};
pub use config::{ConfigSpace, CONFIG_SPACE_SIZE};
pub use host_bridge::HostBridge;
pub use root::{decode_cf8, decode_ecam, Bdf, PciConfigIo, PciConfigMmio, PciFunction, PciRoot};

/// Our PCI vendor ID. Not assigned by the PCI-SIG: siovmm's virtual functions only ever exist
/// inside its guests (documented in docs/architecture.md).
pub const SIOVMM_VENDOR_ID: u16 = 0x5356; // "SV"
/// Device ID of the host bridge.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0001;
