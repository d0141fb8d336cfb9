//! How many IMS entries a guest may take for itself, beyond the one behind each MSI-X vector:
//! the slots it allocates through the hypercall and the trapped-window slots it programs (each
//! backed by a hypercall slot), counted per ADI and for the whole VM. One guest must not drain
//! a device other guests share: the device has 16,384 entries, an ADI's slot numbers go to
//! 32,768. QUERY reports [`ImsQuota::slots_per_adi`], so a guest knows its limit up front.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::adi::MAX_PV_SLOTS;

/// Default most entries one ADI may hold: MSI-X's per-function maximum.
pub const DEFAULT_PER_ADI: u32 = 2048;

#[derive(Debug)]
struct Books {
    per_adi: u32,
    per_vm: u32,
    held: AtomicU32,
}

/// One VM's IMS quota, shared by its ADIs and its hypercall endpoint.
#[derive(Debug, Clone)]
pub struct ImsQuota(Arc<Books>);

impl Default for ImsQuota {
    /// [`DEFAULT_PER_ADI`] per ADI; the VM bounded only by the device.
    fn default() -> Self {
        Self::new(DEFAULT_PER_ADI, u32::MAX)
    }
}

impl ImsQuota {
    /// At most `per_adi` entries per ADI (capped at the slot numbers an ADI has) and `per_vm`
    /// for all of the VM's ADIs together.
    pub fn new(per_adi: u32, per_vm: u32) -> Self {
        Self(Arc::new(Books { per_adi: per_adi.min(MAX_PV_SLOTS), per_vm, held: AtomicU32::new(0) }))
    }

    /// The most one ADI can hold: what QUERY tells the guest.
    pub fn slots_per_adi(&self) -> u32 {
        self.0.per_adi.min(self.0.per_vm)
    }

    /// Entries the VM's ADIs hold now.
    pub fn held(&self) -> u32 {
        self.0.held.load(Ordering::Acquire)
    }

    /// Takes `count` entries for an ADI that holds `adi_held`; false (nothing taken) if either
    /// the ADI's or the VM's quota would be exceeded.
    pub fn take(&self, adi_held: u32, count: u32) -> bool {
        if adi_held.checked_add(count).is_none_or(|n| n > self.0.per_adi) {
            return false;
        }
        let per_vm = self.0.per_vm;
        self.0.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_add(count).filter(|&n| n <= per_vm)).is_ok()
    }

    /// Gives back `count` entries [`ImsQuota::take`] took.
    pub fn give(&self, count: u32) {
        let _ = self.0.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| Some(h.saturating_sub(count)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_adi_and_per_vm_limits_hold_and_freed_entries_come_back() {
        let q = ImsQuota::new(100, 150);
        assert_eq!(q.slots_per_adi(), 100);
        assert!(q.take(0, 100));
        assert!(!q.take(100, 1), "the ADI's quota is full");
        assert!(q.take(0, 50), "another ADI takes the rest of the VM's");
        assert!(!q.take(0, 1), "the VM's quota is full");
        assert_eq!(q.held(), 150);
        q.give(60);
        assert!(q.take(40, 60));
        assert!(!q.take(u32::MAX, 1), "no overflow");
        assert_eq!(ImsQuota::new(u32::MAX, u32::MAX).slots_per_adi(), MAX_PV_SLOTS);
        assert_eq!(ImsQuota::new(4096, 1000).slots_per_adi(), 1000);
    }
}
