//! The x86_64 guest platform siovmm builds: where things live in guest-physical memory,
//! the e820 map, the CPUID a guest sees, and the register state a kernel is entered with.
//!
//! Everything here is pure (no KVM calls) so it can be unit-tested; `vmm` applies it.

pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod image;
pub mod layout;
pub mod exception_entry;
pub mod paging;
pub mod pci;
pub mod regs;
