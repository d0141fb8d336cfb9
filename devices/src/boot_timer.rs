//! Boot-timing probe: a guest write of `MAGIC` to this one-byte MMIO register makes siovmm
//! report, on stderr, how long after siovmm started the write happened. A guest's /init does
//! `devmem 0xfeb00000 8 123` (busybox) to mark "userspace reached". Benchmarks use it; a guest
//! that never writes it is unaffected.

use std::time::Instant;

use crate::BusDevice;

/// Guest-physical address (in the 32-bit hole, not announced to the guest OS).
pub const BOOT_TIMER_ADDR: u64 = 0xfeb0_0000;
/// The value that marks the event.
pub const MAGIC: u8 = 123;

/// The probe.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
}

impl BootTimer {
    /// Times from `start`.
    pub fn new(start: Instant) -> Self {
        Self { start }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&MAGIC) {
            let ms = self.start.elapsed().as_secs_f64() * 1000.0;
            eprintln!("siovmm: boot-timer: guest userspace at {ms:.1} ms");
        }
    }
}
