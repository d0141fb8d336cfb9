//! Host Scalable-IOV devices, as siovmm's VDCM sees them.
//!
//! - [`siov`]: the interface to one host SIOV device: its Assignable Device Interfaces (ADIs),
//!   their work queues, and the device's Interrupt Message Store (IMS). A kernel-VFIO backend
//!   (an ADI exposed as a VFIO device by a host driver, IMS entries driven through
//!   VFIO_DEVICE_SET_IRQS) implements the same trait; that backend is not written yet.
//! - [`dma`]: the address space an ADI's DMA is checked against (the guest's memory map).
//! - [`soft`]: a software DSA-like data mover implementing the interface, with worker threads,
//!   for machines without SIOV hardware.

pub mod dma;
pub mod siov;
pub mod soft;
