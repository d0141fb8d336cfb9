//! The one i8042 behaviour a guest without a PS/2 controller still relies on: writing 0xFE
//! (pulse reset line) to the command port resets the machine. The status register reads 0
//! (both buffers empty), so a guest polling it before the reset never spins.
//! Keyboard and mouse are not emulated; the FADT says there is no 8042.

use std::sync::Arc;

use crate::{BusDevice, ExitReason, ShutdownSignal};

/// i8042 command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// Reset-only i8042 at port 0x64.
#[derive(Debug)]
pub struct I8042Reset {
    shutdown: Arc<ShutdownSignal>,
}

impl I8042Reset {
    /// Reports resets to `shutdown`.
    pub fn new(shutdown: Arc<ShutdownSignal>) -> Self {
        Self { shutdown }
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&CMD_RESET_CPU) {
            self.shutdown.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fe_resets() {
        let s = Arc::new(ShutdownSignal::new().unwrap());
        let mut d = I8042Reset::new(s.clone());
        d.write(0, &[0xaa]);
        assert_eq!(s.reason(), None);
        d.write(0, &[CMD_RESET_CPU]);
        assert_eq!(s.reason(), Some(ExitReason::Reset));
    }
}
