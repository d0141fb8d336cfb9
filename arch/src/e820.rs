//! The e820 memory map handed to the guest (through boot_params or the PVH memmap).

use crate::layout::*;

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved: the OS must not use it.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The memory map for `mem_size` bytes of RAM.
///
/// 640 KiB..1 MiB (legacy area holding our ACPI tables) is reserved, and so is the ECAM window,
/// which Linux wants reserved before it trusts MCFG. The rest of the 32-bit hole is left out so
/// the guest may place PCI BARs there.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: LOW_RAM_END, kind: E820_RAM },
        E820Entry { addr: LOW_RAM_END, size: HIMEM_START - LOW_RAM_END, kind: E820_RESERVED },
    ];
    let low_end = low_ram_end(mem_size);
    if low_end > HIMEM_START {
        map.push(E820Entry { addr: HIMEM_START, size: low_end - HIMEM_START, kind: E820_RAM });
    }
    map.push(E820Entry { addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, kind: E820_RESERVED });
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: RAM_64BIT_START,
            size: mem_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum()
    }

    #[test]
    fn ram_adds_up_minus_legacy_hole() {
        for mem in [64u64 << 20, 512 << 20, 3 << 30, 5 << 30] {
            let map = memory_map(mem);
            assert_eq!(ram_total(&map), mem - (HIMEM_START - LOW_RAM_END), "mem {mem:#x}");
        }
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        let map = memory_map(5 << 30);
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{:?}", pair);
        }
        assert!(map.len() <= PVH_MEMMAP_MAX_ENTRIES);
    }

    #[test]
    fn ecam_is_reserved() {
        let map = memory_map(512 << 20);
        assert!(map.iter().any(|e| e.addr == PCI_ECAM_START && e.kind == E820_RESERVED));
    }
}
