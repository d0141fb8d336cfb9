//! The hardware-reduced ACPI power-management block the FADT points at
//! (`siovmm_acpi::pm`): a write of SLP_TYP=S5 with SLP_EN powers off, a write of the reset
//! value to the reset register resets. Reads return 0 (no wake status pending).

use std::sync::Arc;

use siovmm_acpi::pm;

use crate::{BusDevice, ExitReason, ShutdownSignal};

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
            o if o == u64::from(pm::SLEEP_CONTROL) => {
                let typ = (value >> pm::SLEEP_TYPE_SHIFT) & pm::SLEEP_TYPE_MASK;
                if value & pm::SLEEP_ENABLE != 0 && typ == pm::S5_SLEEP_TYPE {
                    self.shutdown.request(ExitReason::PowerOff);
                }
            }
            o if o == u64::from(pm::RESET) && value == pm::RESET_VALUE => {
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
        d.write(u64::from(pm::SLEEP_CONTROL), &[(5 << 2) | 0x20]);
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn other_sleep_states_and_noise_ignored() {
        let (mut d, s) = pm_dev();
        d.write(u64::from(pm::SLEEP_CONTROL), &[(3 << 2) | 0x20]); // S3
        d.write(u64::from(pm::SLEEP_CONTROL), &[5 << 2]); // no SLP_EN
        d.write(u64::from(pm::SLEEP_STATUS), &[0x80]); // clearing WAK_STS
        d.write(u64::from(pm::RESET), &[0x2]);
        d.write(3, &[]);
        assert_eq!(s.reason(), None);
        let mut b = [0xffu8];
        d.read(1, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn reset_register_resets() {
        let (mut d, s) = pm_dev();
        d.write(u64::from(pm::RESET), &[pm::RESET_VALUE]);
        assert_eq!(s.reason(), Some(ExitReason::Reset));
    }
}
