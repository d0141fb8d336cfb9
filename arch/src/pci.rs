//! The guest's PCI topology: how many root buses, where their configuration space (ECAM) and
//! BAR windows are. One value from which the ECAM mapping, MCFG and the DSDT's host bridges
//! are all derived, so they cannot disagree.
//!
//! Every root bus is its own host bridge in the DSDT (`\_SB_.PCIn`, PNP0A08, `_BBN` = n),
//! all in segment 0 and one ECAM window: the guest enumerates each root bus directly, with no
//! bridge to emulate (the arrangement QEMU's `pxb-pcie` uses). Each root bus gets an equal
//! share of the 32-bit and 64-bit BAR windows, so the host bridges' windows never overlap.

use crate::layout::{self, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START};

/// Most root buses: 16 MiB of ECAM, far below the IOAPIC and the other fixed MMIO.
pub const MAX_ROOT_BUSES: u8 = 16;
/// ECAM bytes per bus: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Device numbers a root bus gives to functions (bus 0's device 0 is the host bridge; the
/// other buses leave it free too, so every bus holds the same number).
pub const DEVICES_PER_BUS: u8 = 31;
/// Functions a root bus holds: 31 devices of 8 functions.
pub const FUNCTIONS_PER_BUS: u32 = DEVICES_PER_BUS as u32 * 8;


/// An invalid topology.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// No root bus, or more than [`MAX_ROOT_BUSES`].
    #[error("{0} PCI root buses; 1 to {MAX_ROOT_BUSES} are possible")]
    Buses(u32),
    /// More functions than the most root buses hold.
    #[error("{0} PCI functions; a guest holds at most {max}", max = u32::from(MAX_ROOT_BUSES) * FUNCTIONS_PER_BUS)]
    Functions(u32),
}

/// The root buses of segment 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciTopology {
    root_buses: u8,
}

impl Default for PciTopology {
    fn default() -> Self {
        Self { root_buses: 1 }
    }
}

impl PciTopology {
    /// `root_buses` root buses, numbered 0..root_buses.
    pub fn new(root_buses: u32) -> Result<Self, TopologyError> {
        match u8::try_from(root_buses) {
            Ok(n @ 1..=MAX_ROOT_BUSES) => Ok(Self { root_buses: n }),
            _ => Err(TopologyError::Buses(root_buses)),
        }
    }

    /// The fewest root buses that hold `functions` functions besides the host bridge.
    pub fn for_functions(functions: u32) -> Result<Self, TopologyError> {
        let buses = functions.div_ceil(FUNCTIONS_PER_BUS).max(1);
        Self::new(buses).map_err(|_| TopologyError::Functions(functions))
    }

    /// Most functions a guest can hold with every root bus.
    pub const fn max_functions() -> u32 {
        MAX_ROOT_BUSES as u32 * FUNCTIONS_PER_BUS
    }

    /// Number of root buses.
    pub fn root_buses(&self) -> u8 {
        self.root_buses
    }

    /// The ECAM window (start, size): one [`ECAM_BUS_SIZE`] per root bus.
    pub fn ecam(&self) -> (u64, u64) {
        (PCI_ECAM_START, u64::from(self.root_buses) * ECAM_BUS_SIZE)
    }

    /// Root bus `bus`'s share of the 32-bit BAR window (start, size), 1 MiB aligned.
    pub fn mmio32_window(&self, bus: u8) -> (u64, u64) {
        let share = (PCI_MMIO32_SIZE / u64::from(self.root_buses)) & !(ECAM_BUS_SIZE - 1);
        (PCI_MMIO32_START + u64::from(bus) * share, share)
    }

    /// Root bus `bus`'s share of the 64-bit BAR window (start, size) for `mem_size` of RAM.
    pub fn mmio64_window(&self, bus: u8, mem_size: u64) -> (u64, u64) {
        let (start, size) = layout::pci_mmio64_window(mem_size);
        let share = (size / u64::from(self.root_buses)) & !(ECAM_BUS_SIZE - 1);
        (start + u64::from(bus) * share, share)
    }
}

/// The first IOAPIC input PCI INTx lines are wired to (0-15 are the ISA IRQs).
pub const INTX_GSI_BASE: u32 = 16;
/// IOAPIC inputs for PCI INTx: the rest of the 24 KVM's in-kernel IOAPIC has.
pub const INTX_GSIS: u32 = layout::IOAPIC_PINS - INTX_GSI_BASE;

/// The IOAPIC input (GSI) that interrupt pin `pin` (1 = INTA# .. 4 = INTD#) of device
/// `device` on root bus `bus` is wired to: the lines rotate with the device number, as the
/// PCI-to-PCI Bridge Architecture §9.1 swizzle does, and with the bus, so that devices at
/// the same number on different root buses do not all share one. Level-triggered,
/// active-low and shareable, as PCI INTx is; the DSDT's `_PRT` of every host bridge says the
/// same (acpi-tables), and VFIO devices raise it through KVM irqfds with a resampler.
/// `None` for a pin that is not 1-4.
pub fn intx_gsi(bus: u8, device: u8, pin: u8) -> Option<u32> {
    (1..=4).contains(&pin).then(|| INTX_GSI_BASE + (u32::from(bus) + u32::from(device) + u32::from(pin) - 1) % INTX_GSIS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_lines_rotate_over_the_pci_inputs() {
        assert_eq!(INTX_GSIS, 8);
        assert_eq!(intx_gsi(0, 1, 1), Some(17));
        assert_eq!(intx_gsi(0, 1, 4), Some(20));
        assert_eq!(intx_gsi(0, 7, 2), Some(16), "wraps within 16..24");
        assert_eq!(intx_gsi(1, 1, 1), Some(18), "the next bus shifts by one");
        assert_eq!(intx_gsi(0, 1, 0), None, "no pin");
        assert_eq!(intx_gsi(0, 1, 5), None);
        for bus in 0..MAX_ROOT_BUSES {
            for device in 0..32 {
                for pin in 1..=4 {
                    assert!((16..24).contains(&intx_gsi(bus, device, pin).unwrap()));
                }
            }
        }
    }

    #[test]
    fn buses_windows_and_ecam_agree() {
        let one = PciTopology::default();
        assert_eq!(one.ecam(), (PCI_ECAM_START, 1 << 20));
        assert_eq!(one.mmio32_window(0), (PCI_MMIO32_START, PCI_MMIO32_SIZE));

        let t = PciTopology::for_functions(FUNCTIONS_PER_BUS * 4 + 1).unwrap();
        assert_eq!(t.root_buses(), 5);
        assert_eq!(t.ecam().1, 5 << 20);
        // Windows tile the 32-bit window without overlap, in bus order.
        let w: Vec<_> = (0..5).map(|b| t.mmio32_window(b)).collect();
        for pair in w.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0);
        }
        assert!(w[4].0 + w[4].1 <= PCI_MMIO32_START + PCI_MMIO32_SIZE);
        let (s0, z0) = t.mmio64_window(0, 1 << 30);
        assert_eq!(t.mmio64_window(1, 1 << 30).0, s0 + z0);

        assert_eq!(PciTopology::for_functions(0).unwrap().root_buses(), 1);
        assert_eq!(PciTopology::for_functions(FUNCTIONS_PER_BUS).unwrap().root_buses(), 1);
        assert_eq!(PciTopology::new(0), Err(TopologyError::Buses(0)));
        assert_eq!(PciTopology::new(17), Err(TopologyError::Buses(17)));
        assert!(matches!(PciTopology::for_functions(PciTopology::max_functions() + 1), Err(TopologyError::Functions(_))));
    }
}
