//! A fake VFIO device for tests and fuzzing (feature `test-util`): config space and BAR0 in
//! memory, SET_IRQS recorded.

use std::sync::Mutex;

use vfio_bindings::bindings::vfio::{VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX};
use vmm_sys_util::eventfd::EventFd;

use super::{RegionInfo, VfioBackend, CONFIG_REGION};

/// A device like QEMU's NVMe controller as vfio-pci shows it: BAR0 16 KiB 64-bit memory with
/// the MSI-X table at 0x2000 and PBA at 0x3000 (4 vectors), an MSI capability (64-bit,
/// per-vector mask, 4 vectors capable), BAR2 an I/O BAR of 256 bytes, ROM present.
#[derive(Debug)]
pub struct FakeDevice {
    pub(crate) config: Mutex<Vec<u8>>,
    pub(crate) bar0: Mutex<Vec<u8>>,
    /// (index, start, count) per SET_IRQS; count 0 = disable.
    pub(crate) irq_sets: Mutex<Vec<(u32, u32, usize)>>,
    /// Interrupt indexes given an unmask eventfd.
    pub(crate) unmasks: Mutex<Vec<u32>>,
    /// Whether the device offers its INTx through VFIO (the interrupt pin says A either way).
    pub(crate) intx: bool,
}

/// Where the fake's capabilities are.
pub const MSIX_CAP: usize = 0x40;
/// Where the fake's MSI capability is.
pub const MSI_CAP: usize = 0x50;

impl FakeDevice {
    /// The device, INTx not offered.
    pub fn new() -> Self {
        let mut c = vec![0u8; 4096];
        let mut put = |off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(0x00, 0x0010_1b36);
        put(0x04, 0x0010_0000); // status: capability list
        put(0x10, 0x0000_0004); // BAR0: 64-bit memory (the host's address bits are irrelevant)
        put(0x18, 0x0000_0001); // BAR2: I/O
        put(0x30, 0xfffe_0000); // ROM, present on the device
        put(0x34, MSIX_CAP as u32);
        put(0x3c, 0x0000_0100); // interrupt pin A on the device
        put(MSIX_CAP, 0x11 | (MSI_CAP as u32) << 8 | 3 << 16); // 4 vectors
        put(MSIX_CAP + 4, 0x2000); // table in BAR0
        put(MSIX_CAP + 8, 0x3000); // PBA in BAR0
        put(MSI_CAP, 0x05 | (2 << 1 | 1 << 7 | 1 << 8) << 16); // 4 capable (MMC 2), 64-bit, PVM
        put(0x68, 0xdead_beef); // a vendor register past the capabilities
        Self { config: Mutex::new(c), bar0: Mutex::new(vec![0; 0x4000]), irq_sets: Mutex::new(Vec::new()), unmasks: Mutex::default(), intx: false }
    }

    /// `len` bytes of the device's own config space at `offset`.
    pub fn config_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[offset..offset + len].to_vec()
    }

    /// The device with its INTx offered.
    pub fn with_intx() -> Self {
        Self { intx: true, ..Self::new() }
    }
}

impl VfioBackend for FakeDevice {
    fn region(&self, index: u32) -> RegionInfo {
        match index {
            0 => RegionInfo { size: 0x4000, mmap: true },
            2 => RegionInfo { size: 0x100, mmap: false },
            6 => RegionInfo { size: 0x2_0000, mmap: false },
            CONFIG_REGION => RegionInfo { size: 4096, mmap: false },
            _ => RegionInfo::default(),
        }
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) {
        let src = match index {
            CONFIG_REGION => self.config.lock().unwrap(),
            0 => self.bar0.lock().unwrap(),
            _ => return data.fill(0xff),
        };
        let o = offset as usize;
        data.copy_from_slice(&src[o..o + data.len()]);
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) {
        let mut dst = match index {
            CONFIG_REGION => self.config.lock().unwrap(),
            0 => self.bar0.lock().unwrap(),
            _ => return,
        };
        let o = offset as usize;
        dst[o..o + data.len()].copy_from_slice(data);
    }
    fn irq_count(&self, index: u32) -> u32 {
        match index {
            VFIO_PCI_MSI_IRQ_INDEX => 1,
            VFIO_PCI_MSIX_IRQ_INDEX => 4,
            VFIO_PCI_INTX_IRQ_INDEX => u32::from(self.intx),
            _ => 0,
        }
    }
    fn set_irqs(&self, index: u32, start: u32, fds: &[&EventFd]) -> std::io::Result<()> {
        self.irq_sets.lock().unwrap().push((index, start, fds.len()));
        Ok(())
    }
    fn map_region(&self, _index: u32) -> std::io::Result<Vec<crate::mapping::RegionMapping>> {
        Ok(Vec::new())
    }
    fn disable_irqs(&self, index: u32) -> std::io::Result<()> {
        self.irq_sets.lock().unwrap().push((index, 0, 0));
        Ok(())
    }
    fn set_irq_unmask(&self, index: u32, _fd: &EventFd) -> std::io::Result<()> {
        self.unmasks.lock().unwrap().push(index);
        Ok(())
    }
}

impl Default for FakeDevice {
    fn default() -> Self {
        Self::new()
    }
}
