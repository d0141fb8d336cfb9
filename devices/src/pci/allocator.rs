//! Where functions and BARs go: device numbers on the topology's root buses, and BAR
//! addresses in each root bus's window (the rust-vmm `vm-allocator` AddressAllocator), as
//! firmware would assign them. Freed device numbers and BAR ranges are reused.

use std::collections::BTreeSet;

use arch::pci::{PciTopology, DEVICES_PER_BUS};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use super::Bdf;

/// Nothing left to allocate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every device number of every root bus is taken.
    #[error("no free PCI device number on any of the {0} root buses")]
    NoDevice(u8),
    /// The root bus's BAR window has no room.
    #[error("no room for a {size:#x}-byte BAR in root bus {bus}'s window")]
    NoBarSpace {
        /// The root bus.
        bus: u8,
        /// The BAR's size.
        size: u64,
    },
    /// No room for an I/O BAR: only root bus 0 has I/O space, and its range is small.
    #[error("no room for a {size:#x}-port I/O BAR on root bus {bus} (only bus 0 has I/O space: ports {start:#x}-{end:#x})", start = arch::layout::PCI_IO_BAR_START, end = u32::from(arch::layout::PCI_IO_BAR_START) + u32::from(arch::layout::PCI_IO_BAR_SIZE) - 1)]
    NoIoSpace {
        /// The root bus.
        bus: u8,
        /// The BAR's size.
        size: u64,
    },
    /// Not something this allocator handed out.
    #[error("{0} was not allocated")]
    NotAllocated(String),
}

/// Device numbers and 32-bit BAR windows of one guest's PCI segment.
#[derive(Debug)]
pub struct PciAllocator {
    topology: PciTopology,
    /// (bus, device) pairs in use.
    used: BTreeSet<(u8, u8)>,
    /// One allocator per root bus, over its share of the 32-bit window.
    bars: Vec<AddressAllocator>,
    /// Bus 0's I/O ports for BARs (`arch::layout::PCI_IO_BAR_START`).
    io: AddressAllocator,
}

impl PciAllocator {
    /// An allocator for `topology`, with bus 0's device 0 (the host bridge) taken.
    pub fn new(topology: PciTopology) -> Self {
        let bars = (0..topology.root_buses())
            .map(|b| {
                let (start, size) = topology.mmio32_window(b);
                AddressAllocator::new(start, size).expect("root-bus windows are non-empty and in range")
            })
            .collect();
        let mut used = BTreeSet::new();
        used.insert((0, 0));
        let io = AddressAllocator::new(u64::from(arch::layout::PCI_IO_BAR_START), u64::from(arch::layout::PCI_IO_BAR_SIZE))
            .expect("a non-empty port range");
        Self { topology, used, bars, io }
    }

    /// The topology it allocates on.
    pub fn topology(&self) -> PciTopology {
        self.topology
    }

    /// A free device number, lowest bus first; returns function 0's address.
    pub fn allocate_device(&mut self) -> Result<Bdf, AllocError> {
        for bus in 0..self.topology.root_buses() {
            for dev in 1..=DEVICES_PER_BUS {
                if self.used.insert((bus, dev)) {
                    return Ok(Bdf::new(bus, dev, 0));
                }
            }
        }
        Err(AllocError::NoDevice(self.topology.root_buses()))
    }

    /// Frees the device number `bdf` is on.
    pub fn free_device(&mut self, bdf: Bdf) -> Result<(), AllocError> {
        if (bdf.bus(), bdf.device()) == (0, 0) || !self.used.remove(&(bdf.bus(), bdf.device())) {
            return Err(AllocError::NotAllocated(bdf.to_string()));
        }
        Ok(())
    }

    /// A naturally aligned `size`-byte BAR (a power of two) in `bus`'s window.
    pub fn allocate_bar(&mut self, bus: u8, size: u64) -> Result<u64, AllocError> {
        let no_room = AllocError::NoBarSpace { bus, size };
        let a = self.bars.get_mut(usize::from(bus)).ok_or(no_room.clone())?;
        a.allocate(size, size, AllocPolicy::FirstMatch).map(|r| r.start()).map_err(|_| no_room)
    }

    /// A naturally aligned `size`-port I/O BAR (a power of two, at least 4) for a function
    /// on `bus`: only bus 0's host bridge decodes I/O.
    pub fn allocate_io_bar(&mut self, bus: u8, size: u64) -> Result<u64, AllocError> {
        let no_room = AllocError::NoIoSpace { bus, size };
        if bus != 0 {
            return Err(no_room);
        }
        let size = size.max(4);
        self.io.allocate(size, size, AllocPolicy::FirstMatch).map(|r| r.start()).map_err(|_| no_room)
    }

    /// Frees an I/O BAR [`PciAllocator::allocate_io_bar`] returned.
    pub fn free_io_bar(&mut self, addr: u64, size: u64) -> Result<(), AllocError> {
        let not = || AllocError::NotAllocated(format!("I/O BAR {addr:#x}+{size:#x}"));
        let range = RangeInclusive::new(addr, addr + size.max(4) - 1).map_err(|_| not())?;
        self.io.free(&range).map_err(|_| not())
    }

    /// Frees a BAR [`PciAllocator::allocate_bar`] returned.
    pub fn free_bar(&mut self, bus: u8, addr: u64, size: u64) -> Result<(), AllocError> {
        let not = || AllocError::NotAllocated(format!("BAR {addr:#x}+{size:#x} on bus {bus}"));
        let range = RangeInclusive::new(addr, addr + size - 1).map_err(|_| not())?;
        self.bars.get_mut(usize::from(bus)).ok_or_else(not)?.free(&range).map_err(|_| not())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch::pci::FUNCTIONS_PER_BUS;

    #[test]
    fn devices_fill_bus_0_from_1_then_the_next_bus_and_are_reused() {
        let mut a = PciAllocator::new(PciTopology::new(2).unwrap());
        let first = a.allocate_device().unwrap();
        assert_eq!(first, Bdf::new(0, 1, 0));
        let all: Vec<Bdf> = std::iter::once(first).chain((1..62).map(|_| a.allocate_device().unwrap())).collect();
        assert_eq!(all[30], Bdf::new(0, 31, 0));
        assert_eq!(all[31], Bdf::new(1, 1, 0));
        assert_eq!(a.allocate_device(), Err(AllocError::NoDevice(2)));
        a.free_device(Bdf::new(1, 5, 3)).unwrap();
        assert_eq!(a.allocate_device().unwrap(), Bdf::new(1, 5, 0));
        assert!(a.free_device(Bdf::new(0, 0, 0)).is_err(), "the host bridge stays");
        assert_eq!(u32::from(DEVICES_PER_BUS) * 8, FUNCTIONS_PER_BUS);
    }

    #[test]
    fn bars_stay_in_their_bus_window_aligned_and_are_reused() {
        let t = PciTopology::new(2).unwrap();
        let mut a = PciAllocator::new(t);
        let (w1, s1) = t.mmio32_window(1);
        let b = a.allocate_bar(1, 0x8000).unwrap();
        assert_eq!(b, w1);
        let c = a.allocate_bar(1, 0x8000).unwrap();
        assert_eq!(c, w1 + 0x8000);
        a.free_bar(1, b, 0x8000).unwrap();
        assert_eq!(a.allocate_bar(1, 0x8000).unwrap(), b);
        assert!(a.free_bar(1, 0x1234, 0x8000).is_err());
        // Half the window fits once beside the two small BARs (natural alignment), then not.
        assert_eq!(a.allocate_bar(1, s1 / 2).unwrap(), w1 + s1 / 2);
        assert_eq!(a.allocate_bar(1, s1 / 2), Err(AllocError::NoBarSpace { bus: 1, size: s1 / 2 }));
        assert!(a.allocate_bar(2, 0x8000).is_err(), "no bus 2");
    }

    #[test]
    fn io_bars_go_to_bus_0s_ports_aligned_and_are_reused() {
        let mut a = PciAllocator::new(PciTopology::new(2).unwrap());
        assert_eq!(a.allocate_io_bar(0, 0x100), Ok(0xc000));
        assert_eq!(a.allocate_io_bar(0, 0x20), Ok(0xc100));
        assert_eq!(a.allocate_io_bar(0, 0x100), Ok(0xc200), "naturally aligned");
        assert_eq!(a.allocate_io_bar(1, 0x20), Err(AllocError::NoIoSpace { bus: 1, size: 0x20 }), "bus 1 has no I/O space");
        a.free_io_bar(0xc000, 0x100).unwrap();
        assert_eq!(a.allocate_io_bar(0, 0x100), Ok(0xc000));
        assert!(a.free_io_bar(0xd000, 0x100).is_err());
        assert!(a.allocate_io_bar(0, 0x4000).is_err(), "the range is taken in part");
        assert_eq!(a.allocate_io_bar(0, 0x2000), Ok(0xe000));
        assert_eq!(
            AllocError::NoIoSpace { bus: 3, size: 8 }.to_string(),
            "no room for a 0x8-port I/O BAR on root bus 3 (only bus 0 has I/O space: ports 0xc000-0xffff)"
        );
    }
}
