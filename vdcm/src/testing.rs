//! What tests of the VDCM and of the VMM do to an ADI as its guest driver would (this crate's
//! tests, and others' with the `test-util` feature).

use devices::pci::PciFunction;
use devices::BusDevice;

use crate::adi::{AdiFunction, MSIX_TABLE};

/// Enables MSI-X on `f` and programs and unmasks its first two vectors (vector 0x40 + v to
/// APIC 0): each vector then holds its IMS entry's binding and a route.
pub fn program_two_vectors(f: &mut AdiFunction) {
    f.config_write(0x40 / 4, 2, &devices::pci::msix::CTRL_ENABLE.to_le_bytes());
    for v in 0..2u64 {
        f.write(MSIX_TABLE + v * 16, &0xfee0_0000u32.to_le_bytes());
        f.write(MSIX_TABLE + v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
        f.write(MSIX_TABLE + v * 16 + 12, &0u32.to_le_bytes());
    }
}
