//! Kernel VFIO as a [`VfioBackend`]: a device opened through the rust-vmm `vfio-ioctls`
//! crate (container/group with the type1 IOMMU), its regions read and written through the
//! device file, its interrupts set with `VFIO_DEVICE_SET_IRQS`.
//!
//! The crate's `enable_irq` always programs vectors from 0; vectors added after enable need
//! `SET_IRQS(start, count)`, so that ioctl is issued here directly (linux
//! include/uapi/linux/vfio.h, struct vfio_irq_set: a header followed by one s32 eventfd per
//! vector).

use std::os::fd::{AsRawFd, RawFd};

use vfio_bindings::bindings::vfio::{
    vfio_irq_set, VFIO_BASE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE,
};
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ptr;
use vmm_sys_util::ioctl_io_nr;

use crate::mapping::{RegionMapping, PAGE};
use crate::pci::{RegionInfo, VfioBackend};

ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE.into(), VFIO_BASE + 10);

/// A kernel VFIO device.
pub struct KernelVfio {
    device: VfioDevice,
}

impl std::fmt::Debug for KernelVfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelVfio").field("fd", &self.device.as_raw_fd()).finish()
    }
}

impl KernelVfio {
    /// Wraps an opened device.
    pub fn new(device: VfioDevice) -> Self {
        Self { device }
    }

    /// The device (for reset, mmap of its regions).
    pub fn device(&self) -> &VfioDevice {
        &self.device
    }

    /// `VFIO_DEVICE_SET_IRQS` with `buf` from [`irq_set_buffer`].
    fn set_irqs_raw(&self, buf: &[u32]) -> std::io::Result<()> {
        // SAFETY: the buffer holds a vfio_irq_set header followed by `count` eventfds, as
        // argsz says; the kernel reads no further, and the fds stay open during the call.
        let ret = unsafe { ioctl_with_ptr(&self.device, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether `len` bytes at `offset` lie inside region `index` (the crate's own check adds
    /// without overflow protection).
    fn inside(&self, index: u32, offset: u64, len: usize) -> bool {
        offset.checked_add(len as u64).is_some_and(|end| end <= self.device.get_region_size(index))
    }
}

/// The argument of `VFIO_DEVICE_SET_IRQS` that attaches `fds[i]` to vector `start + i` of
/// interrupt `index` for `action` (ACTION_TRIGGER: the device signals it; ACTION_UNMASK: a
/// signal unmasks the vector): the header, then one eventfd per vector, in u32 words (which
/// keeps the header aligned).
fn irq_set_buffer(index: u32, start: u32, fds: &[RawFd], action: u32) -> Vec<u32> {
    let header = std::mem::size_of::<vfio_irq_set>();
    let argsz = header + std::mem::size_of_val(fds);
    let mut buf = Vec::with_capacity(argsz / 4);
    buf.extend([argsz as u32, VFIO_IRQ_SET_DATA_EVENTFD | action, index, start, fds.len() as u32]);
    buf.extend(fds.iter().map(|&fd| fd as u32));
    debug_assert_eq!(buf.len() * 4, argsz);
    buf
}

impl VfioBackend for KernelVfio {
    fn region(&self, index: u32) -> RegionInfo {
        RegionInfo {
            size: self.device.get_region_size(index),
            mmap: self.device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP != 0,
        }
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) {
        // A read the device refuses returns all ones, as a master abort does.
        data.fill(0xff);
        if self.inside(index, offset, data.len()) {
            self.device.region_read(index, data, offset);
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) {
        if self.inside(index, offset, data.len()) {
            self.device.region_write(index, data, offset);
        }
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.device.get_irq_info(index).map_or(0, |i| i.count)
    }

    fn set_irqs(&self, index: u32, start: u32, fds: &[&EventFd]) -> std::io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        self.set_irqs_raw(&irq_set_buffer(index, start, &raw, VFIO_IRQ_SET_ACTION_TRIGGER))
    }

    fn set_irq_unmask(&self, index: u32, fd: &EventFd) -> std::io::Result<()> {
        self.set_irqs_raw(&irq_set_buffer(index, 0, &[fd.as_raw_fd()], VFIO_IRQ_SET_ACTION_UNMASK))
    }

    fn disable_irqs(&self, index: u32) -> std::io::Result<()> {
        self.device.disable_irq(index).map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn map_region(&self, index: u32) -> std::io::Result<Vec<RegionMapping>> {
        let size = self.device.get_region_size(index);
        if self.device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 || size < PAGE {
            return Ok(Vec::new());
        }
        // A sparse-mmap capability lists the only areas that may be mapped (older vfio-pci
        // leaves the MSI-X table out this way); otherwise the whole region may.
        let areas: Vec<(u64, u64)> = self
            .device
            .get_region_caps(index)
            .into_iter()
            .find_map(|cap| match cap {
                VfioRegionInfoCap::SparseMmap(sparse) => Some(sparse.areas.iter().map(|a| (a.offset, a.size)).collect()),
                _ => None,
            })
            .unwrap_or_else(|| vec![(0, size)]);
        let base = self.device.get_region_offset(index);
        areas
            .into_iter()
            .filter(|&(offset, len)| len >= PAGE && offset.is_multiple_of(PAGE) && offset.checked_add(len).is_some_and(|e| e <= size))
            .map(|(offset, len)| RegionMapping::new(self.device.as_raw_fd(), base + offset, offset, len / PAGE * PAGE))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_irqs_argument_is_the_uapi_layout() {
        // struct vfio_irq_set { argsz, flags, index, start, count, data[] }: 20 bytes, then s32s.
        assert_eq!(std::mem::size_of::<vfio_irq_set>(), 20);
        let b = irq_set_buffer(2, 5, &[10, 11, 12], VFIO_IRQ_SET_ACTION_TRIGGER);
        assert_eq!(b, vec![32, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 2, 5, 3, 10, 11, 12]);
        assert_eq!(irq_set_buffer(1, 0, &[], VFIO_IRQ_SET_ACTION_TRIGGER), vec![20, 0x24, 1, 0, 0]);
        // INTx's resample eventfd: DATA_EVENTFD (1 << 2) | ACTION_UNMASK (1 << 4), index 0.
        assert_eq!(irq_set_buffer(0, 0, &[7], VFIO_IRQ_SET_ACTION_UNMASK), vec![24, 0x14, 0, 0, 1, 7]);
    }
}
