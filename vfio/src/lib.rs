//! Host devices for siovmm's guests: Scalable-IOV devices as the VDCM sees them, and VFIO
//! devices passed through whole.
//!
//! - [`siov`]: the interface to a SIOV device whose IMS and queues siovmm's VDCM drives: its
//!   Assignable Device Interfaces (ADIs), their work queues, and the device's Interrupt Message
//!   Store (IMS). Backends: the in-process software device below, and (planned) the device
//!   daemon over vfio-user. A *kernel* VFIO device is not one: there the host driver composes
//!   the ADI and owns IMS and queue setup, and siovmm sees a generic VFIO PCI function
//!   (regions and interrupt indexes) instead: [`pci`].
//! - [`pci`]: a VFIO PCI function as the guest sees it (virtual BARs, trapped MSI-X table and
//!   PBA with emulated masking, emulated MSI), over a backend trait for the device's regions
//!   and interrupt indexes; [`kernel`] is that backend for kernel VFIO (`vfio-ioctls`);
//!   [`host`] checks a host device can be passed through before any VM exists; [`mapping`]
//!   maps a region's pages into siovmm and says which of them the guest may reach directly.
//! - [`dma`]: the address space an ADI's DMA is checked against (the guest's memory map).
//! - [`soft`]: a software DSA-like data mover implementing the interface, with worker threads,
//!   for machines without SIOV hardware.

pub mod dma;
pub mod host;
pub mod kernel;
pub mod mapping;
pub mod pci;
pub mod siov;
pub mod soft;
pub mod user;
