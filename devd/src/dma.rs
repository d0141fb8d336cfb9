//! A client's memory as the device's DMA space: the regions a VMM maps with vfio-user
//! `DMA_MAP` (a file descriptor, an offset in it, the IOVA and size), mapped shared into the
//! daemon.
//!
//! Every access is bounds-checked, all or nothing, by [`GuestRam`] (the same check the
//! in-process device uses); an address no mapping covers is a DMA fault, never a read of
//! daemon memory. Maps that overlap, wrap, or are not page-aligned are refused; an unmap must
//! name whole mappings. An access in flight holds the read lock, so an unmap waits for it and
//! the memory stays mapped while the device touches it.

use std::fs::File;
use std::sync::{Arc, RwLock};

use siovmm_vfio::dma::{DmaFault, DmaSpace, GuestRam};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

/// Page size DMA maps are aligned to.
const PAGE: u64 = 4096;

/// Why a map or unmap was refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Zero size, not page-aligned, or past the end of the address space.
    #[error("DMA range {address:#x}+{size:#x} is empty, unaligned or wraps")]
    BadRange {
        /// IOVA.
        address: u64,
        /// Bytes.
        size: u64,
    },
    /// The client sent no file descriptor (this daemon needs shared memory).
    #[error("DMA map of {0:#x} came without a file descriptor")]
    NoFd(u64),
    /// Mapping the descriptor failed.
    #[error("mapping the client's memory at {address:#x}")]
    Mmap {
        /// IOVA.
        address: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The range overlaps a mapping already there.
    #[error("DMA range {0:#x} overlaps an existing mapping")]
    Overlap(u64),
    /// An unmap that does not name whole mappings.
    #[error("DMA unmap of {address:#x}+{size:#x} does not cover whole mappings")]
    Partial {
        /// IOVA.
        address: u64,
        /// Bytes.
        size: u64,
    },
}

/// The client's DMA-mapped memory.
#[derive(Debug)]
pub struct ClientMemory {
    regions: RwLock<(Vec<Arc<GuestRegionMmap>>, GuestRam)>,
}

impl ClientMemory {
    /// An empty space: every access faults until the client maps memory.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { regions: RwLock::new((Vec::new(), GuestRam(GuestMemoryMmap::default()))) })
    }

    /// Maps `size` bytes of `fd` from `offset` at IOVA `address`.
    pub fn map(&self, fd: Option<File>, offset: u64, address: u64, size: u64) -> Result<(), MapError> {
        let bad = MapError::BadRange { address, size };
        if size == 0 || !address.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) || !offset.is_multiple_of(PAGE) || address.checked_add(size).is_none() {
            return Err(bad);
        }
        let len = usize::try_from(size).map_err(|_| bad)?;
        let fd = fd.ok_or(MapError::NoFd(address))?;
        let region = MmapRegion::from_file(FileOffset::new(fd, offset), len).map_err(|source| MapError::Mmap { address, source })?;
        let region = GuestRegionMmap::new(region, GuestAddress(address)).ok_or(MapError::BadRange { address, size })?;
        let mut guard = devices_write(&self.regions);
        let end = address + size;
        if guard.0.iter().any(|r| {
            let (start, len) = (r.start_addr().0, r.len());
            address < start + len && start < end
        }) {
            return Err(MapError::Overlap(address));
        }
        let mut regions = guard.0.clone();
        regions.push(Arc::new(region));
        regions.sort_by_key(|r| r.start_addr().0);
        let memory = GuestMemoryMmap::from_arc_regions(regions.clone()).map_err(|_| MapError::Overlap(address))?;
        *guard = (regions, GuestRam(memory));
        Ok(())
    }

    /// Unmaps every mapping inside `[address, address + size)`; refused if one straddles it.
    pub fn unmap(&self, address: u64, size: u64) -> Result<(), MapError> {
        let end = address.checked_add(size).ok_or(MapError::BadRange { address, size })?;
        let mut guard = devices_write(&self.regions);
        let inside = |r: &Arc<GuestRegionMmap>| r.start_addr().0 >= address && r.start_addr().0 + r.len() <= end;
        let touches = |r: &Arc<GuestRegionMmap>| r.start_addr().0 < end && address < r.start_addr().0 + r.len();
        if guard.0.iter().any(|r| touches(r) && !inside(r)) {
            return Err(MapError::Partial { address, size });
        }
        let regions: Vec<_> = guard.0.iter().filter(|r| !inside(r)).cloned().collect();
        let memory = GuestMemoryMmap::from_arc_regions(regions.clone()).unwrap_or_default();
        *guard = (regions, GuestRam(memory));
        Ok(())
    }

    /// Unmaps everything (the client left).
    pub fn clear(&self) {
        *devices_write(&self.regions) = (Vec::new(), GuestRam(GuestMemoryMmap::default()));
    }

    /// Bytes mapped.
    pub fn mapped(&self) -> u64 {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).0.iter().map(|r| r.len()).sum()
    }
}

fn devices_write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl DmaSpace for ClientMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).1.read(addr, buf)
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), DmaFault> {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).1.write(addr, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A memfd of `size` bytes.
    pub(crate) fn memfd(size: u64) -> File {
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"test-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn accesses_reach_the_file_and_stop_at_its_end() {
        let file = memfd(0x4000);
        let mem = ClientMemory::new();
        assert!(mem.read(0x10000, &mut [0; 4]).is_err(), "nothing mapped yet");
        mem.map(Some(file.try_clone().unwrap()), 0x1000, 0x10000, 0x2000).unwrap();
        mem.write(0x11ffc, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, 0x2ffc).unwrap();
        assert_eq!(b, [1, 2, 3, 4], "shared with the client's file at offset + 0x1000");
        assert!(mem.write(0x11ffe, &[0; 4]).is_err(), "crosses the end: all or nothing");
        assert!(mem.read(0xfffc, &mut [0; 8]).is_err(), "starts before the mapping");
        assert_eq!(mem.mapped(), 0x2000);
    }

    #[test]
    fn bad_maps_and_unmaps_are_refused() {
        let file = memfd(0x4000);
        let mem = ClientMemory::new();
        let f = || Some(file.try_clone().unwrap());
        assert!(matches!(mem.map(f(), 0, 0x1001, 0x1000), Err(MapError::BadRange { .. })));
        assert!(matches!(mem.map(f(), 0, 0x1000, 0), Err(MapError::BadRange { .. })));
        assert!(matches!(mem.map(f(), 0, !0xfff_u64, 0x2000), Err(MapError::BadRange { .. })));
        assert!(matches!(mem.map(None, 0, 0x1000, 0x1000), Err(MapError::NoFd(0x1000))));
        mem.map(f(), 0, 0x10000, 0x2000).unwrap();
        assert!(matches!(mem.map(f(), 0, 0x11000, 0x2000), Err(MapError::Overlap(0x11000))));
        mem.map(f(), 0x2000, 0x12000, 0x2000).unwrap();
        assert!(matches!(mem.unmap(0x11000, 0x2000), Err(MapError::Partial { .. })));
        mem.unmap(0x10000, 0x2000).unwrap();
        assert!(mem.read(0x10000, &mut [0; 4]).is_err());
        mem.read(0x12000, &mut [0; 4]).unwrap();
        mem.clear();
        assert_eq!(mem.mapped(), 0);
    }
}
