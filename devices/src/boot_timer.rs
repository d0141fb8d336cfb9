//! Boot-timing probe: a guest write of `MAGIC` to this one-byte MMIO register makes siovmm
//! report, on stderr, how long after siovmm started the write happened (the first such write;
//! later ones are ignored). A guest's /init does
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
    /// Reported already: the mark is a one-time event, and a guest writing it in a loop must
    /// not flood siovmm's stderr.
    reported: bool,
}

impl BootTimer {
    /// Times from `start`.
    pub fn new(start: Instant) -> Self {
        Self { start, reported: false }
    }

    /// The line for a write of `data` at `offset`, the first time the mark is written.
    fn mark(&mut self, offset: u64, data: &[u8]) -> Option<String> {
        if self.reported || offset != 0 || data.first() != Some(&MAGIC) {
            return None;
        }
        self.reported = true;
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        Some(format!("siovmm: boot-timer: guest userspace at {ms:.1} ms"))
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(line) = self.mark(offset, data) {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_is_reported_once() {
        let mut t = BootTimer::new(Instant::now());
        assert_eq!(t.mark(0, &[MAGIC - 1]), None);
        assert_eq!(t.mark(1, &[MAGIC]), None);
        assert!(t.mark(0, &[MAGIC]).is_some_and(|l| l.starts_with("siovmm: boot-timer: guest userspace at ")));
        assert_eq!(t.mark(0, &[MAGIC]), None, "a guest writing it again prints nothing");
    }
}
