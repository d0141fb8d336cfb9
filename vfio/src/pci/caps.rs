//! The device's MSI and MSI-X capabilities: found by walking its capability list, and the MSI
//! capability's registers kept here (PCI Local Bus 3.0 §6.7 list, §6.8.1 MSI, §6.8.2 MSI-X).

use siovmm_interrupts::MsiMessage;

const CAP_ID_MSI: u32 = 0x05;
const CAP_ID_MSIX: u32 = 0x11;
/// Status register: capability list present.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// A capability list longer than this is a loop (48 = (256 - 64) / 4).
const MAX_CAPS: usize = 48;

/// Where the device's MSI-X table and PBA are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsixCap {
    /// Byte offset of the capability in config space.
    pub offset: usize,
    /// Table size (1-2048).
    pub vectors: u16,
    pub table_bir: u8,
    pub table_offset: u64,
    pub pba_bir: u8,
    pub pba_offset: u64,
}

/// The capabilities siovmm virtualizes.
#[derive(Debug, Default)]
pub(crate) struct Capabilities {
    pub msix: Option<MsixCap>,
    pub msi: Option<MsiCap>,
}

impl Capabilities {
    /// Walks the list through `read` (dword register → value). A malformed list (pointer into
    /// the header, a loop) ends the walk; what was found so far is kept.
    pub(crate) fn discover(read: impl Fn(usize) -> u32) -> Self {
        let mut caps = Self::default();
        if read(1) >> 16 & STATUS_CAP_LIST == 0 {
            return caps;
        }
        let mut ptr = (read(0x34 / 4) & 0xfc) as usize;
        for _ in 0..MAX_CAPS {
            if ptr < 0x40 {
                break;
            }
            let header = read(ptr / 4);
            match header & 0xff {
                CAP_ID_MSIX if caps.msix.is_none() => {
                    let (table, pba) = (read(ptr / 4 + 1), read(ptr / 4 + 2));
                    caps.msix = Some(MsixCap {
                        offset: ptr,
                        vectors: ((header >> 16) & 0x7ff) as u16 + 1,
                        table_bir: (table & 7) as u8,
                        table_offset: u64::from(table & !7),
                        pba_bir: (pba & 7) as u8,
                        pba_offset: u64::from(pba & !7),
                    });
                }
                CAP_ID_MSI if caps.msi.is_none() => caps.msi = Some(MsiCap::new(ptr, header)),
                _ => {}
            }
            ptr = ((header >> 8) & 0xfc) as usize;
        }
        caps
    }
}

/// Message control bits.
const MSI_ENABLE: u16 = 1;
const MSI_64BIT: u16 = 1 << 7;
const MSI_PER_VECTOR_MASK: u16 = 1 << 8;

/// The MSI capability as the guest programs it (none of it reaches the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsiCap {
    offset: usize,
    /// Capability ID and next pointer (read-only, the device's).
    header: u16,
    control: u16,
    address: u64,
    data: u16,
    mask: u32,
}

impl MsiCap {
    fn new(offset: usize, header: u32) -> Self {
        // Keep what the device can do (64-bit, per-vector mask, multiple message capable);
        // enable and multiple message enable start clear.
        let control = (header >> 16) as u16 & (MSI_64BIT | MSI_PER_VECTOR_MASK | 0x000e);
        Self { offset, header: header as u16, control, address: 0, data: 0, mask: 0 }
    }

    fn wide(&self) -> bool {
        self.control & MSI_64BIT != 0
    }

    fn per_vector_mask(&self) -> bool {
        self.control & MSI_PER_VECTOR_MASK != 0
    }

    /// Dword index of (address high, data, mask, pending) relative to the first.
    fn layout(&self) -> (Option<usize>, usize, Option<usize>, Option<usize>) {
        let wide = usize::from(self.wide());
        let data = 2 + wide;
        let (mask, pending) = if self.per_vector_mask() { (Some(data + 1), Some(data + 2)) } else { (None, None) };
        (self.wide().then_some(2), data, mask, pending)
    }

    fn dwords(&self) -> usize {
        3 + usize::from(self.wide()) + if self.per_vector_mask() { 2 } else { 0 }
    }

    /// Whether dword register `reg` is in the capability.
    pub(crate) fn contains(&self, reg: usize) -> bool {
        (self.offset / 4..self.offset / 4 + self.dwords()).contains(&reg)
    }

    /// Whether `reg` is the pending-bits register (read from the vectors, not kept here).
    pub(crate) fn is_pending_reg(&self, reg: usize) -> bool {
        self.layout().3.is_some_and(|p| reg == self.offset / 4 + p)
    }

    /// The guest-visible value of dword `reg`, if it is in the capability (pending reads 0
    /// here; the caller fills it in).
    pub(crate) fn read(&self, reg: usize) -> Option<u32> {
        if !self.contains(reg) {
            return None;
        }
        let (high, data, mask, _) = self.layout();
        let i = reg - self.offset / 4;
        Some(match i {
            0 => u32::from(self.header) | u32::from(self.control) << 16,
            1 => self.address as u32,
            i if Some(i) == high => (self.address >> 32) as u32,
            i if i == data => u32::from(self.data),
            i if Some(i) == mask => self.mask,
            _ => 0,
        })
    }

    /// A guest write of the whole dword `reg` (already merged with its current value);
    /// returns whether routing may have changed.
    pub(crate) fn write(&mut self, reg: usize, value: u32) -> bool {
        if !self.contains(reg) {
            return false;
        }
        let (high, data, mask, _) = self.layout();
        match reg - self.offset / 4 {
            0 => {
                // Writable: enable (bit 0) and multiple message enable (6:4), at most capable.
                let control = (value >> 16) as u16;
                let capable = (self.control >> 1) & 7;
                let enabled = ((control >> 4) & 7).min(capable);
                self.control = self.control & !(MSI_ENABLE | 0x0070) | control & MSI_ENABLE | enabled << 4;
            }
            1 => self.address = self.address & !0xffff_ffff | u64::from(value & !3),
            i if Some(i) == high => self.address = self.address & 0xffff_ffff | u64::from(value) << 32,
            i if i == data => self.data = value as u16,
            i if Some(i) == mask => self.mask = value,
            _ => return false,
        }
        true
    }

    /// Whether MSI is enabled.
    pub(crate) fn enabled(&self) -> bool {
        self.control & MSI_ENABLE != 0
    }

    /// Vectors the guest enabled (multiple message enable, a power of two).
    pub(crate) fn vectors_enabled(&self) -> u32 {
        1 << ((self.control >> 4) & 7)
    }

    /// Vector `v`'s message (data with its low bits replaced by `v`, §6.8.1.6) and mask.
    pub(crate) fn vector(&self, v: u32) -> (MsiMessage, bool) {
        let n = self.vectors_enabled();
        let data = u32::from(self.data) & !(n - 1) | v & (n - 1);
        (MsiMessage { address: self.address, data }, self.per_vector_mask() && self.mask >> v & 1 != 0)
    }
}
