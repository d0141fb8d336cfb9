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

use kvm_bindings::{kvm_coalesced_mmio, KVM_COALESCED_MMIO_PAGE_OFFSET};

/// Header of `struct kvm_coalesced_mmio_ring` (include/uapi/linux/kvm.h): `first` is ours
/// (the consumer), `last` is KVM's (the producer); entries follow.
#[repr(C)]
struct RingHeader {
    first: u32,
    last: u32,
}

/// The VM's ring page, mapped from a vCPU fd.
#[derive(Debug)]
pub struct CoalescedRing {
    page: *mut u8,
    page_size: usize,
    capacity: u32,
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
        let capacity =
            ((page_size - std::mem::size_of::<RingHeader>()) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        Ok(Self { page: page.cast(), page_size, capacity })
    }

    /// Takes the oldest queued write, if any.
    pub fn pop(&mut self) -> Option<kvm_coalesced_mmio> {
        let header = self.page.cast::<RingHeader>();
        // SAFETY: `header` points at the start of the mapped ring page; `last` is written by
        // KVM, so it is read volatilely, then fenced before the entry is read. The fields are
        // reached through raw pointers only: a Rust reference to memory the kernel writes
        // concurrently would promise the compiler it does not change.
        let (first, last) = unsafe {
            (
                std::ptr::read_volatile(std::ptr::addr_of!((*header).first)),
                std::ptr::read_volatile(std::ptr::addr_of!((*header).last)),
            )
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        if first == last || first >= self.capacity {
            return None;
        }
        // SAFETY: `first < capacity`, so the entry lies inside the page.
        let entry = unsafe {
            let entries = self.page.add(std::mem::size_of::<RingHeader>()).cast::<kvm_coalesced_mmio>();
            std::ptr::read_volatile(entries.add(first as usize))
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: `first` is the consumer index, ours to advance.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*header).first), (first + 1) % self.capacity) };
        Some(entry)
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `map`.
        unsafe { libc::munmap(self.page.cast(), self.page_size) };
    }
}
