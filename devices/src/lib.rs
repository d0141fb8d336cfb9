//! Devices siovmm emulates in userspace, and the buses vCPU exits are dispatched on.
//!
//! Every method here takes guest-controlled offsets and data: they are decoded with checked
//! arithmetic and unknown accesses read as all-ones and drop writes, like an unclaimed bus.

pub mod acpi_pm;
pub mod boot_timer;
pub mod bus;
pub mod cmos;
pub mod coalesced;
pub mod console_out;
pub mod faults;
pub mod i8042;
pub mod iommu;
pub mod pci;
pub mod serial;
pub mod shutdown;

pub use bus::{Bus, BusDevice};
pub use faults::GuestFaults;
pub use shutdown::{ExitReason, ShutdownSignal};
