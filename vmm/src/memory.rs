//! Guest RAM: anonymous memory mapped so KVM can back it with 2 MiB pages, or, when another
//! process must reach it (a vfio-user device daemon DMAs into it), one memfd mapped shared.
//!
//! Each region's host mapping starts on a 2 MiB boundary (guest regions start on one too) and
//! is eligible for transparent huge pages. Then KVM can install 2 MiB stage-2
//! mappings, so the guest's first touch of its memory costs one fault per 2 MiB instead of
//! one per 4 KiB. Under nested virtualization every such fault is a full exit to the
//! outer hypervisor; measured in the sandbox, this was most of the boot time
//! (docs/boot-performance.md).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

const HUGE_PAGE: usize = 2 << 20;

/// True when transparent huge pages are enabled only for MADV_HUGEPAGE regions.
fn thp_needs_madvise() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.contains("[madvise]"))
        .unwrap_or(false)
}

/// Maps `size` bytes at a 2 MiB-aligned host address, with huge pages where the host allows;
/// with `file`, `size` bytes of it from the offset given, shared, at that address instead.
fn map_aligned(size: usize, file: Option<(&File, u64)>) -> std::io::Result<*mut u8> {
    let len = size.checked_add(HUGE_PAGE).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous private mapping; the result is checked for MAP_FAILED.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = len - head - size;
    // SAFETY: both ranges lie inside the mapping created above and are not used afterwards.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Where THP is opt-in only, opt in. Where it is "always", do not: MADV_HUGEPAGE also
        // opts into direct compaction on fault (defrag=madvise, the default), which was measured
        // to stall kernel loading by seconds. Advisory either way: 4 KiB pages still work.
        if file.is_none() && thp_needs_madvise() {
            libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
    }
    if let Some((file, offset)) = file {
        let offset = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: replaces (MAP_FIXED) exactly the anonymous range reserved above, which
        // nothing else uses; the result is checked.
        let at = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset,
            )
        };
        if at == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: the reserved range above, not used by anyone.
            unsafe { libc::munmap(aligned as *mut libc::c_void, size) };
            return Err(e);
        }
    }
    Ok(aligned as *mut u8)
}

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A region is larger than this host's address space.
    #[error("a region of {0} bytes is too large")]
    TooLarge(u64),
    /// mmap failed.
    #[error("mapping {0} MiB")]
    Map(u64, #[source] std::io::Error),
    /// vm-memory refused the mapping or the region list.
    #[error("{0}")]
    Regions(String),
}

/// Guest RAM and the host mappings behind it, which are unmapped when this drops. Clones of
/// the memory (`GuestMemoryMmap` is a shared handle) handed to devices must not outlive it:
/// the `Vm` owns every such device and drops them, and joins their threads, first.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    /// (host address, size) of each mapping.
    mappings: Vec<(usize, usize)>,
    /// The memfd behind shared RAM, and where each region is in it.
    shared: Option<SharedRam>,
}

/// Guest RAM as another process maps it: one memfd, and where each region is in it.
#[derive(Debug, Clone)]
pub struct SharedRam {
    /// The memfd.
    pub file: Arc<File>,
    /// Guest regions, in order.
    pub regions: Vec<SharedRegion>,
}

/// Where a region of shared guest RAM is in its memfd (what a vfio-user DMA_MAP sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedRegion {
    /// Guest-physical start.
    pub guest: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in the memfd.
    pub offset: u64,
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl GuestRam {
    /// The memfd and regions, for RAM created shared.
    pub fn shared(&self) -> Option<SharedRam> {
        self.shared.clone()
    }

    /// The memory, its mappings kept until the process exits: for tools and tests whose VMs
    /// live as long as the process, where no drop order guarantees the devices go first.
    pub fn leak(mut self) -> GuestMemoryMmap {
        self.mappings.clear();
        self.mem.clone()
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for &(addr, size) in &self.mappings {
            // SAFETY: a mapping `create` made and nothing else unmaps; no user is left (above).
            if unsafe { libc::munmap(addr as *mut libc::c_void, size) } != 0 {
                log::warn!("unmapping guest RAM at {addr:#x}: {}", std::io::Error::last_os_error());
            }
        }
    }
}

/// Guest RAM for `regions` of (guest address, size), private to this process.
pub fn create(regions: &[(u64, u64)]) -> Result<GuestRam, Error> {
    create_with(regions, None)
}

/// Guest RAM for `regions` in one memfd mapped shared, so that a device process can map the
/// same memory ([`GuestRam::shared`]). Transparent huge pages then follow the host's
/// `shmem_enabled`, not `enabled`.
pub fn create_shared(regions: &[(u64, u64)]) -> Result<GuestRam, Error> {
    let total: u64 = regions.iter().map(|r| r.1).sum();
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"siovmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Map(total >> 20, std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(total).map_err(|e| Error::Map(total >> 20, e))?;
    create_with(regions, Some(Arc::new(file)))
}

fn create_with(regions: &[(u64, u64)], file: Option<Arc<File>>) -> Result<GuestRam, Error> {
    let mut out = Vec::with_capacity(regions.len());
    // Filled as mappings are made, so that a failure part-way unmaps what was mapped.
    let mut ram = GuestRam { mem: GuestMemoryMmap::default(), mappings: Vec::new(), shared: file.clone().map(|file| SharedRam { file, regions: Vec::new() }) };
    let mut offset = 0u64;
    for &(start, size) in regions {
        let bytes = usize::try_from(size).map_err(|_| Error::TooLarge(size))?;
        let ptr = map_aligned(bytes, file.as_deref().map(|f| (f, offset))).map_err(|e| Error::Map(size >> 20, e))?;
        ram.mappings.push((ptr as usize, bytes));
        if let Some(shared) = &mut ram.shared {
            shared.regions.push(SharedRegion { guest: start, size, offset });
        }
        offset += size;
        let flags = if file.is_some() { libc::MAP_SHARED } else { libc::MAP_PRIVATE | libc::MAP_ANONYMOUS };
        // SAFETY: `ptr` is a mapping of exactly `bytes` bytes that nothing else in this process
        // uses, unmapped only when `ram` drops, after every user of the memory.
        let region = unsafe {
            MmapRegion::build_raw(ptr, bytes, libc::PROT_READ | libc::PROT_WRITE, flags)
        }
        .map_err(|e| Error::Regions(e.to_string()))?;
        out.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(Error::Regions("guest region wraps around".into()))?);
    }
    ram.mem = GuestMemoryMmap::from_regions(out).map_err(|e| Error::Regions(e.to_string()))?;
    Ok(ram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn vm_size_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmSize:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
    }

    #[test]
    fn dropped_ram_is_unmapped() {
        // 1 GiB reserved, never touched: the address space says whether it was given back.
        // (Tests on other threads map and unmap too; a leak of 1 GiB stands far above them.)
        let before = vm_size_kib();
        for _ in 0..4 {
            drop(create(&[(0, 1 << 30)]).unwrap());
        }
        let after = vm_size_kib();
        assert!(after < before + (512 << 10), "VmSize grew from {before} KiB to {after} KiB: guest RAM not unmapped");
    }

    #[test]
    fn regions_are_aligned_and_usable() {
        let mem = create(&[(0, 8 << 20), (4 << 30, 4 << 20)]).unwrap();
        for addr in [0u64, 4 << 30] {
            let host = mem.get_host_address(GuestAddress(addr)).unwrap() as usize;
            assert_eq!(host % HUGE_PAGE, 0);
        }
        mem.write_obj(0xdead_beefu32, GuestAddress((4 << 30) + 100)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress((4 << 30) + 100)).unwrap(), 0xdead_beef);
        assert!(mem.read_obj::<u32>(GuestAddress(9 << 20)).is_err());
    }

    #[test]
    fn shared_ram_is_the_memfd() {
        use std::os::unix::fs::FileExt;
        let mem = create_shared(&[(0, 4 << 20), (4 << 30, 2 << 20)]).unwrap();
        let SharedRam { file, regions } = mem.shared().unwrap();
        assert_eq!(
            regions,
            [SharedRegion { guest: 0, size: 4 << 20, offset: 0 }, SharedRegion { guest: 4 << 30, size: 2 << 20, offset: 4 << 20 }]
        );
        mem.write_obj(0x1234_5678u32, GuestAddress((4 << 30) + 8)).unwrap();
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, (4 << 20) + 8).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x1234_5678, "the second region at its offset in the file");
        file.write_all_at(&7u32.to_le_bytes(), 16).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(16)).unwrap(), 7, "another mapping of the file sees the same memory");
        let host = mem.get_host_address(GuestAddress(4 << 30)).unwrap() as usize;
        assert_eq!(host % HUGE_PAGE, 0);
        assert!(create(&[(0, 2 << 20)]).unwrap().shared().is_none());
    }
}
