//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A `Bus` maps non-overlapping ranges to devices. Lookups are a B-tree search, so a bus with
//! thousands of ranges (one per assigned device interface) stays cheap on the exit path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting into a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The new range is empty or wraps around.
    #[error("invalid bus range {0:#x}+{1:#x}")]
    InvalidRange(u64, u64),
    /// The new range overlaps one already present.
    #[error("bus range {0:#x}+{1:#x} overlaps an existing device")]
    Overlap(u64, u64),
}

/// Shared, lockable device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of devices, each at a distinct address range. Ranges can change while vCPUs run
/// (a guest moving a BAR): lookups take a read lock only long enough to find the device, so a
/// device may itself insert or remove ranges while handling an access.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = read_lock(&self.ranges);
        f.debug_list().entries(ranges.iter().map(|(b, e)| (*b, e.len))).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::InvalidRange(base, len))?;
        let mut ranges = write_lock(&self.ranges);
        if let Some((b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(Error::Overlap(base, len));
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Ranges on the bus.
    pub fn len(&self) -> usize {
        read_lock(&self.ranges).len()
    }

    /// True when no device is on the bus.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the device whose range starts at `base`.
    pub fn remove(&self, base: u64) -> bool {
        write_lock(&self.ranges).remove(&base).is_some()
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let ranges = read_lock(&self.ranges);
        let (base, e) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the range.
        (offset.checked_add(size as u64)? <= e.len).then(|| (offset, e.device.clone()))
    }

    /// Dispatches a read; returns false (and fills all-ones) when nothing claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(&dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when nothing claims `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device (or a map of them) even if another vCPU thread panicked while holding it.
pub use siovmm_interrupts::{lock, read_lock, write_lock};

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x104, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(bus.write(0x10f, &[9]));
        assert_eq!(a.lock().unwrap().last, vec![(0xf, vec![9])]);
    }

    #[test]
    fn unclaimed_reads_all_ones_and_straddling_is_refused() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10).unwrap();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0xff, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        // Starts inside, ends outside.
        assert!(!bus.read(0x10e, &mut buf));
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.read(u64::MAX - 1, &mut buf));
    }

    #[test]
    fn overlaps_and_bad_ranges_rejected() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(bus.insert(d(), 0x10f, 1), Err(Error::Overlap(0x10f, 1)));
        assert_eq!(bus.insert(d(), 0xf8, 0x10), Err(Error::Overlap(0xf8, 0x10)));
        assert_eq!(bus.insert(d(), 0x0, 0), Err(Error::InvalidRange(0, 0)));
        assert_eq!(bus.insert(d(), u64::MAX, 2), Err(Error::InvalidRange(u64::MAX, 2)));
        bus.insert(d(), 0x110, 0x10).unwrap();
        assert!(bus.remove(0x100));
        bus.insert(d(), 0xf8, 0x10).unwrap();
    }
}
