//! KVM memory slots beyond guest RAM: host mappings placed in the guest's physical address
//! space so the guest reaches them without an exit (a passed-through device's BAR pages, a
//! device's submission portal). Slot numbers come from a `vm-allocator` `IdAllocator` above
//! RAM's slots, so a freed slot is handed out again (KVM has a fixed number:
//! KVM_CAP_NR_MEMSLOTS).
//!
//! Used for passed-through devices' BAR pages (`passthrough`) and ADIs' mapped submission
//! portals ([`PortalSlots`]).

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_allocator::IdAllocator;

use devices::bus::lock;
use siovmm_vfio::mapping::RegionMapping;

/// Errors mapping or unmapping a slot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Every KVM slot is in use.
    #[error("no free KVM memory slot (KVM has {0})")]
    Exhausted(u32),
    /// Not page-aligned, empty, or wrapping.
    #[error("cannot map {len:#x} bytes at guest {gpa:#x}: not whole, aligned pages")]
    Unaligned {
        /// Guest physical address.
        gpa: u64,
        /// Bytes.
        len: u64,
    },
    /// KVM refused.
    #[error("KVM_SET_USER_MEMORY_REGION (slot {slot}): {error}")]
    Kvm {
        /// The slot.
        slot: u32,
        /// KVM's error.
        error: kvm_ioctls::Error,
    },
}

/// A host mapping in the guest, until [`MemorySlots::unmap`].
#[derive(Debug, PartialEq, Eq)]
pub struct MappedSlot {
    slot: u32,
    gpa: u64,
    len: u64,
}

impl MappedSlot {
    /// Where it is in the guest.
    #[cfg(test)]
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
}

/// The VM's slots above RAM.
pub struct MemorySlots {
    vm: Arc<VmFd>,
    ids: Mutex<IdAllocator>,
    limit: u32,
}

impl std::fmt::Debug for MemorySlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySlots").field("limit", &self.limit).finish_non_exhaustive()
    }
}

const PAGE: u64 = 4096;

impl MemorySlots {
    /// Slots `first..limit` of `vm` (RAM holds the ones below `first`).
    pub fn new(vm: Arc<VmFd>, first: u32, limit: u32) -> Option<Self> {
        let ids = IdAllocator::new(first, limit.checked_sub(1)?).ok()?;
        Some(Self { vm, ids: Mutex::new(ids), limit })
    }

    /// Maps `len` bytes of host memory at `host` into the guest at `gpa`.
    ///
    /// # Safety
    /// `host..host + len` must stay mapped (and not be reused for anything the guest must not
    /// reach) until the slot is unmapped or the VM is gone.
    pub unsafe fn map(&self, gpa: u64, len: u64, host: *mut u8) -> Result<MappedSlot, Error> {
        let aligned = gpa.is_multiple_of(PAGE) && len.is_multiple_of(PAGE) && (host as u64).is_multiple_of(PAGE);
        if len == 0 || !aligned || gpa.checked_add(len).is_none() {
            return Err(Error::Unaligned { gpa, len });
        }
        let slot = lock(&self.ids).allocate_id().map_err(|_| Error::Exhausted(self.limit))?;
        let region = kvm_userspace_memory_region { slot, flags: 0, guest_phys_addr: gpa, memory_size: len, userspace_addr: host as u64 };
        // SAFETY: the caller keeps the mapping alive while the slot exists (this function's
        // contract); KVM refuses a slot overlapping another.
        if let Err(error) = unsafe { self.vm.set_user_memory_region(region) } {
            self.release(slot);
            return Err(Error::Kvm { slot, error });
        }
        Ok(MappedSlot { slot, gpa, len })
    }

    /// Takes the mapping out of the guest; its slot is free again.
    pub fn unmap(&self, mapped: MappedSlot) -> Result<(), Error> {
        // A slot is deleted by setting its size to 0 (Documentation/virt/kvm/api.rst,
        // KVM_SET_USER_MEMORY_REGION).
        let region = kvm_userspace_memory_region { slot: mapped.slot, memory_size: 0, ..Default::default() };
        // SAFETY: deleting a slot this allocator created; no host memory is handed to KVM.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|error| Error::Kvm { slot: mapped.slot, error })?;
        self.release(mapped.slot);
        Ok(())
    }

    fn release(&self, slot: u32) {
        // Only IDs this allocator handed out come back here.
        let freed = lock(&self.ids).free_id(slot);
        debug_assert!(freed.is_ok(), "slot {slot} freed twice");
    }
}

/// ADI portal pages mapped as memory slots: the VDCM's `PortalMaps` with KVM.
pub struct PortalSlots(pub Arc<MemorySlots>);

/// One portal page in the guest: the slot, and this process's mapping of the page behind it.
struct PortalMapping {
    slots: Arc<MemorySlots>,
    slot: Option<MappedSlot>,
    page: Option<RegionMapping>,
}

impl Drop for PortalMapping {
    fn drop(&mut self) {
        // The slot goes first, so the guest never reaches unmapped host memory; a slot KVM
        // will not remove keeps its page mapped until siovmm exits, as passed-through BARs do.
        if let Some(slot) = self.slot.take() {
            if let Err(e) = self.slots.unmap(slot) {
                log::error!("unmapping a portal page: {e}; the page stays mapped until siovmm exits");
                std::mem::forget(self.page.take());
            }
        }
    }
}

impl siovmm_vdcm::PortalMaps for PortalSlots {
    fn map(&self, gpa: u64, page: &siovmm_vfio::siov::PortalPage) -> std::io::Result<Box<dyn Send>> {
        use std::os::fd::AsRawFd;
        let mapping = RegionMapping::new(page.file.as_raw_fd(), page.offset, 0, PAGE)?;
        let host = mapping.host(0).ok_or_else(|| std::io::Error::other("an empty portal mapping"))?;
        // SAFETY: `host` stays mapped while the slot exists: the mapping drops after the slot is
        // removed, or never (above).
        let slot = unsafe { self.0.map(gpa, PAGE, host) }.map_err(std::io::Error::other)?;
        Ok(Box::new(PortalMapping { slots: self.0.clone(), slot: Some(slot), page: Some(mapping) }))
    }
}
