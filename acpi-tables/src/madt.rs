//! MADT (ACPI 6.5 §5.2.12): one local APIC per vCPU, the IOAPIC, and LINT1 as NMI.

use acpi_tables::sdt::Sdt;
use arch::layout;

use crate::{Platform, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

const MADT_REVISION: u8 = 5;
const TYPE_LOCAL_APIC: u8 = 0;
const TYPE_IO_APIC: u8 = 1;
const TYPE_LOCAL_APIC_NMI: u8 = 4;
const LOCAL_APIC_ENABLED: u32 = 1;
/// IOAPIC ID; KVM's in-kernel IOAPIC resets with ID 0.
pub const IOAPIC_ID: u8 = 0;

/// The MADT for `platform`.
pub fn madt(platform: &Platform) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 36, MADT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&(layout::APIC_START as u32).to_le_bytes());
    // Flags: PCAT_COMPAT clear, the platform has no 8259 pair (hardware-reduced ACPI).
    t.append_slice(&0u32.to_le_bytes());
    for id in 0..platform.vcpus {
        let mut e = vec![TYPE_LOCAL_APIC, 8, id, id];
        e.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
        t.append_slice(&e);
    }
    let mut ioapic = vec![TYPE_IO_APIC, 12, IOAPIC_ID, 0];
    ioapic.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    t.append_slice(&ioapic);
    // All processors (UID 0xFF): LINT1 is NMI, flags conform to the bus.
    t.append_slice(&[TYPE_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lapic_per_vcpu_and_an_ioapic() {
        let t = madt(&Platform { vcpus: 3, mem_size: 1 << 30, pci: Default::default() });
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize, t.len());
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapics = 0;
        while off < t.len() {
            let (ty, len) = (t[off], t[off + 1] as usize);
            match ty {
                TYPE_LOCAL_APIC => lapics.push((t[off + 2], t[off + 3])),
                TYPE_IO_APIC => {
                    ioapics += 1;
                    assert_eq!(u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()), layout::IOAPIC_START as u32);
                }
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, t.len());
        assert_eq!(lapics, vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(ioapics, 1);
    }
}
