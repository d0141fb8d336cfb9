//! Guest RAM: anonymous memory mapped so KVM can back it with 2 MiB pages.
//!
//! Each region's host mapping starts on a 2 MiB boundary (guest regions start on one too) and
//! is eligible for transparent huge pages. Then KVM can install 2 MiB stage-2
//! mappings, so the guest's first touch of its memory costs one fault per 2 MiB instead of
//! one per 4 KiB. Under nested virtualization every such fault is a full exit to the
//! outer hypervisor; measured in the sandbox, this was most of the boot time
//! (docs/boot-performance.md).

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

const HUGE_PAGE: usize = 2 << 20;

/// True when transparent huge pages are enabled only for MADV_HUGEPAGE regions.
fn thp_needs_madvise() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.contains("[madvise]"))
        .unwrap_or(false)
}

/// Maps `size` bytes at a 2 MiB-aligned host address, with huge pages where the host allows.
fn map_aligned(size: usize) -> std::io::Result<*mut u8> {
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
        if thp_needs_madvise() {
            libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
    }
    Ok(aligned as *mut u8)
}

/// Guest RAM for `regions` of (guest address, size).
pub fn create(regions: &[(u64, u64)]) -> Result<GuestMemoryMmap, String> {
    let mut out = Vec::with_capacity(regions.len());
    for &(start, size) in regions {
        let size = usize::try_from(size).map_err(|_| format!("region of {size} bytes is too large"))?;
        let ptr = map_aligned(size).map_err(|e| format!("mapping {} MiB: {e}", size >> 20))?;
        // SAFETY: `ptr` is a private mapping of exactly `size` bytes that nothing else uses. It is
        // never unmapped (raw-pointer regions are not owned), so it outlives every user.
        let region = unsafe {
            MmapRegion::build_raw(ptr, size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
        }
        .map_err(|e| e.to_string())?;
        out.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or("guest region wraps around")?);
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

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
}
