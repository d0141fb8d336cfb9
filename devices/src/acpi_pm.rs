//! The hardware-reduced ACPI power-management block the FADT points at
//! ([`regs`]): a write of SLP_TYP=S5 with SLP_EN powers off, a write of the reset
//! value to the reset register resets. Reads return 0 (no wake status pending).

use std::sync::Arc;

use crate::{BusDevice, ExitReason, ShutdownSignal};

/// The block's registers (offsets from `layout::ACPI_PM_PORT`); the FADT is built from these.
pub mod regs {
    /// Sleep control register (ACPI 6.5 §4.8.3.7): SLP_TYP in bits 4:2, SLP_EN bit 5.
    pub const SLEEP_CONTROL: u16 = 0;
    /// Sleep status register (§4.8.3.8): WAK_STS bit 7.
    pub const SLEEP_STATUS: u16 = 1;
    /// Reset register (§4.8.3.6).
    pub const RESET: u16 = 2;
    /// Number of ports the block decodes.
    pub const SIZE: u16 = 4;
    /// Value the guest writes to `RESET` to reset the platform.
    pub const RESET_VALUE: u8 = 0x1;
    /// SLP_TYP of S5 (soft-off), as the DSDT's `\_S5_` package says.
    pub const S5_SLEEP_TYPE: u8 = 5;
    /// SLP_EN bit in the sleep control register.
    pub const SLEEP_ENABLE: u8 = 1 << 5;
    /// Position of SLP_TYP in the sleep control register.
    pub const SLEEP_TYPE_SHIFT: u8 = 2;
    /// Mask of SLP_TYP (after shifting down).
    pub const SLEEP_TYPE_MASK: u8 = 0x7;
}

/// The PM register block.
#[derive(Debug)]
pub struct AcpiPm {
    shutdown: Arc<ShutdownSignal>,
}

impl AcpiPm {
    /// A PM block that reports to `shutdown`.
    pub fn new(shutdown: Arc<ShutdownSignal>) -> Self {
        Self { shutdown }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            o if o == u64::from(regs::SLEEP_CONTROL) => {
                let typ = (value >> regs::SLEEP_TYPE_SHIFT) & regs::SLEEP_TYPE_MASK;
                if value & regs::SLEEP_ENABLE != 0 && typ == regs::S5_SLEEP_TYPE {
                    self.shutdown.request(ExitReason::PowerOff);
                }
            }
            o if o == u64::from(regs::RESET) && value == regs::RESET_VALUE => {
                self.shutdown.request(ExitReason::Reset)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm_dev() -> (AcpiPm, Arc<ShutdownSignal>) {
        let s = Arc::new(ShutdownSignal::new().unwrap());
        (AcpiPm::new(s.clone()), s)
    }

    #[test]
    fn s5_powers_off() {
        let (mut d, s) = pm_dev();
        // What ACPICA's acpi_hw_extended_sleep writes: (SLP_TYP << 2) | SLP_EN.
        d.write(u64::from(regs::SLEEP_CONTROL), &[(5 << 2) | 0x20]);
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn other_sleep_states_and_noise_ignored() {
        let (mut d, s) = pm_dev();
        d.write(u64::from(regs::SLEEP_CONTROL), &[(3 << 2) | 0x20]); // S3
        d.write(u64::from(regs::SLEEP_CONTROL), &[5 << 2]); // no SLP_EN
        d.write(u64::from(regs::SLEEP_STATUS), &[0x80]); // clearing WAK_STS
        d.write(u64::from(regs::RESET), &[0x2]);
        d.write(3, &[]);
        assert_eq!(s.reason(), None);
        let mut b = [0xffu8];
        d.read(1, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn reset_register_resets() {
        let (mut d, s) = pm_dev();
        d.write(u64::from(regs::RESET), &[regs::RESET_VALUE]);
        assert_eq!(s.reason(), Some(ExitReason::Reset));
    }
}
