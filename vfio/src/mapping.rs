//! A device region's pages mapped into siovmm's address space, and which of them a VMM may
//! hand to the guest directly (as KVM memory slots) rather than trap.

use std::os::fd::RawFd;
use std::ptr::NonNull;

/// Host page size these mappings are made of (x86-64).
pub const PAGE: u64 = 4096;

/// `len` bytes of a device region, at `offset` in the region, mapped shared into this
/// process (`mmap` of the device file); unmapped on drop.
#[derive(Debug)]
pub struct RegionMapping {
    offset: u64,
    len: u64,
    addr: NonNull<u8>,
}

// SAFETY: the mapping is device memory shared with the device; nothing here hands out
// references to it, only its address, and every access to it is the caller's (a guest's,
// through KVM) with no Rust aliasing involved.
unsafe impl Send for RegionMapping {}
// SAFETY: as for Send: the struct itself is immutable after creation.
unsafe impl Sync for RegionMapping {}

impl RegionMapping {
    /// Maps `len` bytes of `fd` at file offset `file_offset`, which is region offset `offset`.
    pub fn new(fd: RawFd, file_offset: u64, offset: u64, len: u64) -> std::io::Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE) || !file_offset.is_multiple_of(PAGE) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not whole pages"));
        }
        let file_offset = libc::off_t::try_from(file_offset).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a new shared mapping chosen by the kernel (no address given); it replaces
        // nothing of ours, and `fd` is only read by the call.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, file_offset)
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast()).ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        Ok(Self { offset, len, addr })
    }

    /// Where in the region it starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address of region offset `offset + at`, if it is inside.
    pub fn host(&self, at: u64) -> Option<*mut u8> {
        // SAFETY: `at` is inside the mapping, so the pointer stays inside it.
        (at < self.len).then(|| unsafe { self.addr.as_ptr().add(at as usize) })
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made, which nothing else owns.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len as usize) };
    }
}

/// The ranges (offset, length) of a BAR that can go to the guest directly: the parts of the
/// mmap-able `areas` outside the `trapped` ranges, in whole pages. Both inputs are (offset,
/// length) pairs in the BAR; the result is sorted.
pub fn direct_ranges(areas: &[(u64, u64)], trapped: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, len) in areas {
        // Whole pages only: a partial page would expose what lies beside it.
        let (Some(first), Some(end)) = (start.div_ceil(PAGE).checked_mul(PAGE), start.checked_add(len).map(|e| e / PAGE * PAGE))
        else {
            continue;
        };
        let mut pieces: Vec<(u64, u64)> = vec![(first, end)].into_iter().filter(|(a, b)| a < b).collect();
        for &(t, tlen) in trapped {
            let (t0, t1) = (t / PAGE * PAGE, t.saturating_add(tlen).div_ceil(PAGE).saturating_mul(PAGE));
            pieces = pieces
                .into_iter()
                .flat_map(|(a, b)| [(a, b.min(t0)), (a.max(t1), b)])
                .filter(|(a, b)| a < b)
                .collect();
        }
        out.extend(pieces.into_iter().map(|(a, b)| (a, b - a)));
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trapped_pages_are_cut_out_of_the_mappable_areas() {
        // A 16 KiB BAR with the MSI-X table at 0x2000 (one page) and the PBA at 0x3000.
        assert_eq!(direct_ranges(&[(0, 0x4000)], &[(0x2000, 0x1000), (0x3000, 0x1000)]), vec![(0, 0x2000)]);
        // A table in the middle splits the area; a partial-page trap takes its whole page.
        assert_eq!(direct_ranges(&[(0, 0x8000)], &[(0x3010, 0x20)]), vec![(0, 0x3000), (0x4000, 0x4000)]);
        // Sparse areas are kept apart; parts of pages at their edges are left to trap.
        assert_eq!(direct_ranges(&[(0x800, 0x2000), (0x6000, 0x1000)], &[]), vec![(0x1000, 0x1000), (0x6000, 0x1000)]);
        // Nothing left, and a sub-page area.
        assert!(direct_ranges(&[(0, 0x1000)], &[(0, 0x10)]).is_empty());
        assert!(direct_ranges(&[(0, 0x100)], &[]).is_empty());
        // Hostile sizes do not wrap.
        assert!(direct_ranges(&[(u64::MAX - 10, 100)], &[]).is_empty());
        assert_eq!(direct_ranges(&[(0, 0x2000)], &[(u64::MAX - 5, 10)]), vec![(0, 0x2000)]);
    }

    #[test]
    fn a_mapping_of_a_file_reads_what_the_file_holds() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join(format!("siovmm-mapping-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let m = RegionMapping::new(f.as_raw_fd(), 4096, 0x1000, 4096).unwrap();
        // SAFETY: reading one byte inside a live file mapping.
        assert_eq!(unsafe { m.host(10).unwrap().read_volatile() }, 7);
        assert!(m.host(4096).is_none());
        assert_eq!((m.offset(), m.len()), (0x1000, 4096));
        assert!(RegionMapping::new(f.as_raw_fd(), 0, 0, 100).is_err());
        drop(m);
        std::fs::remove_file(&path).unwrap();
    }
}
