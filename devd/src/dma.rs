//! A client's memory as the device's DMA space: the regions a VMM maps with vfio-user
//! `DMA_MAP` (a file descriptor, an offset in it, the IOVA and size), mapped shared into the
//! daemon.
//!
//! Every access is bounds-checked, all or nothing, by [`GuestRam`] (the same check the
//! in-process device uses); an address no mapping covers is a DMA fault, never a read of
//! daemon memory. Maps that overlap, wrap, or are not page-aligned are refused; an unmap must
//! name whole mappings. An access in flight holds the read lock, so an unmap waits for it and
//! the memory stays mapped while the device touches it.
//!
//! The client's descriptor is closed once its memory is mapped: a mapping keeps the memory,
//! and a daemon serving thousands of ADIs cannot keep a descriptor per DMA map beside each
//! ADI's connection (issue 12: 10,000 ADIs under a 20,000 open-file limit).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};

use siovmm_vfio::dma::{DmaFault, DmaSpace, GuestRam};
use siovmm_vfio::mapping::RegionMapping;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

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
        source: std::io::Error,
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

/// One DMA map: the memory, and the region describing it at its IOVA.
#[derive(Debug, Clone)]
struct Map {
    region: Arc<GuestRegionMmap>,
    _memory: Arc<RegionMapping>,
}

/// The maps and what accesses go through.
#[derive(Debug)]
struct Maps {
    /// Built from `maps`' regions, which point into their memory: declared first so that it
    /// is dropped before the memory is unmapped.
    ram: GuestRam,
    maps: Vec<Map>,
}

impl Default for Maps {
    fn default() -> Self {
        Self { ram: GuestRam(GuestMemoryMmap::default()), maps: Vec::new() }
    }
}

impl Maps {
    fn of(mut maps: Vec<Map>) -> Self {
        maps.sort_by_key(|m| m.region.start_addr().0);
        // `map` refused overlaps, so the regions are disjoint and sorted.
        let ram = GuestMemoryMmap::from_arc_regions(maps.iter().map(|m| m.region.clone()).collect()).unwrap_or_default();
        Self { ram: GuestRam(ram), maps }
    }
}

/// The client's DMA-mapped memory.
#[derive(Debug)]
pub struct ClientMemory {
    regions: RwLock<Maps>,
}

impl ClientMemory {
    /// An empty space: every access faults until the client maps memory.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { regions: RwLock::new(Maps::default()) })
    }

    /// Maps `size` bytes of `fd` from `offset` at IOVA `address`.
    pub fn map(&self, fd: Option<File>, offset: u64, address: u64, size: u64) -> Result<(), MapError> {
        let bad = MapError::BadRange { address, size };
        if size == 0 || !address.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) || !offset.is_multiple_of(PAGE) || address.checked_add(size).is_none() {
            return Err(bad);
        }
        let len = usize::try_from(size).map_err(|_| MapError::BadRange { address, size })?;
        let fd = fd.ok_or(MapError::NoFd(address))?;
        let memory = RegionMapping::new(fd.as_raw_fd(), offset, 0, size).map_err(|source| MapError::Mmap { address, source })?;
        // The mapping holds the memory; the descriptor is not needed any more.
        drop(fd);
        let host = memory.host(0).ok_or(MapError::BadRange { address, size })?;
        // SAFETY: `host` is the start of `memory`, `len` bytes mapped shared read-write; the
        // region is kept beside `memory` (a `Map`) and dropped before it (`Maps`), so it never
        // outlives the mapping; a raw region does not unmap on drop.
        let region = unsafe { MmapRegion::build_raw(host, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED) }
            .map_err(|e| MapError::Mmap { address, source: std::io::Error::other(e) })?;
        let region = GuestRegionMmap::new(region, GuestAddress(address)).ok_or(bad)?;
        let mut guard = devices_write(&self.regions);
        let end = address + size;
        if guard.maps.iter().any(|m| {
            let (start, len) = (m.region.start_addr().0, m.region.len());
            address < start + len && start < end
        }) {
            return Err(MapError::Overlap(address));
        }
        let mut maps = guard.maps.clone();
        maps.push(Map { region: Arc::new(region), _memory: Arc::new(memory) });
        *guard = Maps::of(maps);
        Ok(())
    }

    /// Unmaps every mapping inside `[address, address + size)`; refused if one straddles it.
    pub fn unmap(&self, address: u64, size: u64) -> Result<(), MapError> {
        let end = address.checked_add(size).ok_or(MapError::BadRange { address, size })?;
        let mut guard = devices_write(&self.regions);
        let inside = |m: &Map| m.region.start_addr().0 >= address && m.region.start_addr().0 + m.region.len() <= end;
        let touches = |m: &Map| m.region.start_addr().0 < end && address < m.region.start_addr().0 + m.region.len();
        if guard.maps.iter().any(|m| touches(m) && !inside(m)) {
            return Err(MapError::Partial { address, size });
        }
        *guard = Maps::of(guard.maps.iter().filter(|m| !inside(m)).cloned().collect());
        Ok(())
    }

    /// Unmaps everything (the client left).
    pub fn clear(&self) {
        *devices_write(&self.regions) = Maps::default();
    }

    /// Bytes mapped.
    pub fn mapped(&self) -> u64 {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).maps.iter().map(|m| m.region.len()).sum()
    }
}

fn devices_write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl DmaSpace for ClientMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).ram.read(addr, buf)
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), DmaFault> {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).ram.write(addr, buf)
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

    /// How many of this process's descriptors are memfds named `name`.
    fn open_memfds(name: &str) -> usize {
        let want = format!("/memfd:{name} ");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with(&want))
            .count()
    }

    #[test]
    fn the_clients_descriptor_is_closed_once_mapped_and_the_memory_stays() {
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"dma-close-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(0x2000).unwrap();
        let mem = ClientMemory::new();
        mem.map(Some(file), 0, 0x4000, 0x2000).unwrap();
        assert_eq!(open_memfds("dma-close-test"), 0, "no descriptor kept for the map");
        mem.write(0x5ff8, &[9; 8]).unwrap();
        let mut b = [0u8; 8];
        mem.read(0x5ff8, &mut b).unwrap();
        assert_eq!(b, [9; 8], "the mapping holds the memory");
        mem.unmap(0x4000, 0x2000).unwrap();
        assert!(mem.read(0x5ff8, &mut b).is_err());
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
