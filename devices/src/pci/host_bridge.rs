//! The host bridge at 00:00.0 (class 06/00/00), so the guest sees a root complex.

use super::config::ConfigSpace;
use super::{PciFunction, HOST_BRIDGE_DEVICE_ID, SIOVMM_VENDOR_ID};

/// Class code: bridge device, host bridge.
pub const CLASS_HOST_BRIDGE: u32 = 0x06_0000;

/// Host bridge function.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// The bridge with siovmm's IDs.
    pub fn new() -> Self {
        Self { config: ConfigSpace::new(SIOVMM_VENDOR_ID, HOST_BRIDGE_DEVICE_ID, CLASS_HOST_BRIDGE, 0) }
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }
}
