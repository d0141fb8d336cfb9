//! An ADI's BAR0 register file (docs/siov-device.md has the map): the queue's base and size,
//! control and status. Plain state: a guest write returns what the device must do
//! ([`Action`]); the function (`adi/mod.rs`) does it and reports back ([`QueueRegisters::enabled`]).

use siovmm_vfio::siov::QueueConfig;

/// Register offsets in BAR0.
pub mod reg {
    /// Version (RO).
    pub const VERSION: u64 = 0x00;
    /// Capabilities (RO): 15:0 largest queue, 31:16 MSI-X vectors (= interrupt handles).
    pub const CAPS: u64 = 0x04;
    /// Queue context DMA address, low half (RW).
    pub const QUEUE_BASE_LO: u64 = 0x08;
    /// Queue context DMA address, high half (RW).
    pub const QUEUE_BASE_HI: u64 = 0x0c;
    /// Queue size in descriptors, a power of two (RW).
    pub const QUEUE_SIZE: u64 = 0x10;
    /// Control (RW): bit 0 enable the queue, bit 1 reset the ADI (self-clearing).
    pub const CONTROL: u64 = 0x14;
    /// Status (RO): bit 0 queue enabled, bit 1 last enable failed (bad base/size).
    pub const STATUS: u64 = 0x18;
}

/// Register-file version the guest reads (major 1, minor 0).
pub const VERSION: u32 = 0x0001_0000;
const CTRL_ENABLE: u32 = 1;
const CTRL_RESET: u32 = 2;
const STATUS_ENABLED: u32 = 1;
const STATUS_ERROR: u32 = 2;

/// What a guest write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reset the ADI (the registers are already cleared).
    Reset,
    /// Enable the queue with this configuration (`Some`) or disable it (`None`); report the
    /// outcome with [`QueueRegisters::enabled`].
    Queue(Option<QueueConfig>),
}

/// The registers' values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueRegisters {
    queue_base: u64,
    queue_size: u32,
    control: u32,
    status: u32,
}

impl QueueRegisters {
    /// A guest read; `caps` is the CAPS value (the function's).
    pub fn read(&self, offset: u64, caps: u32) -> u32 {
        match offset {
            reg::VERSION => VERSION,
            reg::CAPS => caps,
            reg::QUEUE_BASE_LO => self.queue_base as u32,
            reg::QUEUE_BASE_HI => (self.queue_base >> 32) as u32,
            reg::QUEUE_SIZE => self.queue_size,
            reg::CONTROL => self.control,
            reg::STATUS => self.status,
            _ => 0,
        }
    }

    /// A guest write of a dword register; read-only and unknown offsets are ignored.
    pub fn write(&mut self, offset: u64, value: u32) -> Option<Action> {
        match offset {
            reg::QUEUE_BASE_LO => self.queue_base = (self.queue_base & !0xffff_ffff) | u64::from(value),
            reg::QUEUE_BASE_HI => self.queue_base = (self.queue_base & 0xffff_ffff) | u64::from(value) << 32,
            reg::QUEUE_SIZE => self.queue_size = value,
            reg::CONTROL if value & CTRL_RESET != 0 => {
                *self = Self::default();
                return Some(Action::Reset);
            }
            reg::CONTROL => {
                self.control = value & CTRL_ENABLE;
                let enable = value & CTRL_ENABLE != 0;
                return Some(Action::Queue(enable.then_some(QueueConfig { base: self.queue_base, size: self.queue_size })));
            }
            _ => {}
        }
        None
    }

    /// The device's answer to an [`Action::Queue`]: whether it took the configuration.
    pub fn enabled(&mut self, requested: bool, accepted: bool) {
        if accepted {
            self.status = if requested { STATUS_ENABLED } else { 0 };
        } else {
            self.control = 0;
            self.status = STATUS_ERROR;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enable_reports_and_reset_clears() {
        let mut r = QueueRegisters::default();
        assert_eq!(r.write(reg::QUEUE_BASE_LO, 0x1000), None);
        assert_eq!(r.write(reg::QUEUE_BASE_HI, 0x2), None);
        assert_eq!(r.write(reg::QUEUE_SIZE, 64), None);
        assert_eq!(r.write(reg::STATUS, 0xff), None, "read-only");
        let want = QueueConfig { base: 0x2_0000_1000, size: 64 };
        assert_eq!(r.write(reg::CONTROL, CTRL_ENABLE), Some(Action::Queue(Some(want))));
        r.enabled(true, true);
        assert_eq!((r.read(reg::CONTROL, 0), r.read(reg::STATUS, 0)), (CTRL_ENABLE, STATUS_ENABLED));
        assert_eq!(r.read(reg::QUEUE_BASE_HI, 0), 2);
        // A refused configuration: control clears, status says so.
        assert_eq!(r.write(reg::CONTROL, CTRL_ENABLE), Some(Action::Queue(Some(want))));
        r.enabled(true, false);
        assert_eq!((r.read(reg::CONTROL, 0), r.read(reg::STATUS, 0)), (0, STATUS_ERROR));
        assert_eq!(r.write(reg::CONTROL, CTRL_RESET | CTRL_ENABLE), Some(Action::Reset));
        assert_eq!(r, QueueRegisters::default());
        assert_eq!((r.read(reg::VERSION, 0), r.read(reg::CAPS, 0x0002_1000)), (VERSION, 0x0002_1000));
    }
}
