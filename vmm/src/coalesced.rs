//! KVM's coalesced-I/O ring: writes to registered ports complete inside KVM without an exit
//! and are queued in a per-VM ring page that siovmm replays, in order, before it handles the
//! next exit of any vCPU.
//!
//! Used for the PCI CONFIG_ADDRESS port (0xCF8), as QEMU does: every type-1 configuration
//! access is a write to 0xCF8 followed by a read of 0xCFC, so this halves the exits of config
//! space scans. Under nested virtualization each exit costs ~100 µs, and the guest kernel's
//! early PCI scans (256 buses × 32 slots on AMD family 0Fh CPUs) dominated boot time.
//!
//! Ordering: the replay happens under one lock, before the exit that follows; a 0xCF8 write is
//! therefore applied before the 0xCFC read that depends on it.

use std::os::fd::AsRawFd;

use devices::coalesced::RingReader;
use kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET;

/// The VM's ring page, mapped from a vCPU fd, and its reader (devices::coalesced).
#[derive(Debug)]
pub struct CoalescedRing {
    page: *mut u8,
    page_size: usize,
    reader: RingReader,
}

// SAFETY: the mapping is process-wide shared memory; all access goes through `&mut self`,
// and users serialize with a mutex.
unsafe impl Send for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring through `vcpu_fd`.
    pub fn map(vcpu_fd: &impl AsRawFd) -> std::io::Result<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let offset = (KVM_COALESCED_MMIO_PAGE_OFFSET as usize * page_size) as libc::off_t;
        // SAFETY: mapping one page of the vCPU fd at the offset KVM documents for the ring;
        // checked for MAP_FAILED.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                offset,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = page.cast::<u8>();
        // SAFETY: the page is mapped read-write (page-aligned) until `drop` unmaps it, after
        // the reader's last use.
        let reader = unsafe { RingReader::new(page, page_size) };
        Ok(Self { page, page_size, reader })
    }

    /// The ring's reader.
    pub fn reader(&mut self) -> &mut RingReader {
        &mut self.reader
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `map`.
        unsafe { libc::munmap(self.page.cast(), self.page_size) };
    }
}
