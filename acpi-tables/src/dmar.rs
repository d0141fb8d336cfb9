//! DMAR (Intel VT-d spec §8.1) and our SIOV policy table.
//!
//! DMAR: one DMA-remapping hardware unit (DRHD) with INCLUDE_PCI_ALL on segment 0, whose
//! registers `devices::iommu::vtd` emulates. Flags 0: no interrupt remapping, no x2APIC opt-out.
//!
//! SIOV (a table of our own, signature "SIOV", revision 1), after the header:
//! `u32 flags` — bit 0 **IMS_OPT_OUT**: the guest must not use IMS for siovmm's devices; it
//! uses MSI-X. Other bits are reserved (0). Then `u32` reserved. See docs/ims-policy.md.

use acpi_tables::sdt::Sdt;

use crate::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// DRHD flag: the unit covers every PCI device of its segment not claimed by another unit.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1;
/// SIOV table flag: guests must not use IMS.
pub const SIOV_IMS_OPT_OUT: u32 = 1;

/// The DMAR table for a unit at `register_base` translating `address_width` bits.
pub fn dmar(register_base: u64, address_width: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"DMAR", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // Host address width (N - 1), flags, 10 reserved bytes.
    t.append_slice(&[address_width - 1, 0]);
    t.append_slice(&[0; 10]);
    let mut drhd = Vec::with_capacity(16);
    drhd.extend_from_slice(&0u16.to_le_bytes()); // type 0: DRHD
    drhd.extend_from_slice(&16u16.to_le_bytes()); // length: no device scopes
    drhd.push(DRHD_INCLUDE_PCI_ALL);
    drhd.push(0);
    drhd.extend_from_slice(&0u16.to_le_bytes()); // segment
    drhd.extend_from_slice(&register_base.to_le_bytes());
    t.append_slice(&drhd);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// The SIOV policy table.
pub fn siov(flags: u32) -> Vec<u8> {
    let mut t = Sdt::new(*b"SIOV", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&flags.to_le_bytes());
    t.append_slice(&0u32.to_le_bytes());
    t.update_checksum();
    t.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmar_layout() {
        let t = dmar(0xfed9_0000, 48);
        assert_eq!(&t[..4], b"DMAR");
        assert_eq!(t.len(), 48 + 16);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize, t.len());
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!((t[36], t[37]), (47, 0), "HAW, flags");
        assert_eq!(u16::from_le_bytes([t[48], t[49]]), 0, "DRHD");
        assert_eq!(u16::from_le_bytes([t[50], t[51]]), 16);
        assert_eq!(t[52], DRHD_INCLUDE_PCI_ALL);
        assert_eq!(u64::from_le_bytes(t[56..64].try_into().unwrap()), 0xfed9_0000);
    }

    #[test]
    fn siov_layout() {
        let t = siov(SIOV_IMS_OPT_OUT);
        assert_eq!(&t[..4], b"SIOV");
        assert_eq!(t.len(), 44);
        assert_eq!(u32::from_le_bytes(t[36..40].try_into().unwrap()), SIOV_IMS_OPT_OUT);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }
}
