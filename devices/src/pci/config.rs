//! A function's configuration space: 4 KiB of registers with a write mask, so the guest can
//! change only what the PCI specification makes writable.

/// Size of PCI Express configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Registers kept: the 256-byte PCI-compatible space. The extended space (0x100..0x1000)
/// reads as zero, which says "no extended capabilities"; storing only the first 256 bytes keeps
/// a function's shadow at 512 bytes, which matters with thousands of ADIs.
const DWORDS: usize = 64;

/// Standard header offsets (PCI Local Bus 3.0 §6.1).
pub mod offset {
    /// Vendor ID (15:0) and device ID (31:16).
    pub const ID: usize = 0x00;
    /// Command (15:0) and status (31:16).
    pub const COMMAND_STATUS: usize = 0x04;
    /// Revision (7:0) and class code (31:8).
    pub const CLASS_REVISION: usize = 0x08;
    /// Cache line (7:0), latency (15:8), header type (23:16), BIST (31:24).
    pub const HEADER_TYPE: usize = 0x0c;
    /// Interrupt line (7:0), pin (15:8).
    pub const INTERRUPT: usize = 0x3c;
}

/// Register contents plus which bits the guest may write.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Box<[u32; DWORDS]>,
    writable: Box<[u32; DWORDS]>,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfigSpace({:04x}:{:04x})", self.regs[0] & 0xffff, self.regs[0] >> 16)
    }
}

impl ConfigSpace {
    /// A type-0 header for (vendor, device) of class `class` (24-bit class code).
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = Self { regs: Box::new([0; DWORDS]), writable: Box::new([0; DWORDS]) };
        c.regs[offset::ID / 4] = u32::from(vendor) | u32::from(device) << 16;
        c.regs[offset::CLASS_REVISION / 4] = (class & 0xff_ffff) << 8 | u32::from(revision);
        // Command: I/O, memory, bus master, INTx disable are writable.
        c.writable[offset::COMMAND_STATUS / 4] = 0x0000_0407;
        // Cache line size and latency timer are plain read/write.
        c.writable[offset::HEADER_TYPE / 4] = 0x0000_ffff;
        // Interrupt line is scratch for the OS.
        c.writable[offset::INTERRUPT / 4] = 0x0000_00ff;
        c
    }

    /// Reads dword register `reg` (index, not byte offset); the extended space reads zero,
    /// beyond it all-ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        match self.regs.get(reg) {
            Some(v) => *v,
            None if reg < CONFIG_SPACE_SIZE / 4 => 0,
            None => u32::MAX,
        }
    }

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` within dword `reg`.
    /// Only bits marked writable change; malformed accesses are ignored.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let Some(mask) = self.writable.get(reg).copied() else { return };
        let (shift, value, width_mask) = match (offset, data.len()) {
            (o @ 0..=3, 1) => (o * 8, u32::from(data[0]), 0xffu32),
            (o @ (0 | 2), 2) => (o * 8, u32::from(u16::from_le_bytes([data[0], data[1]])), 0xffff),
            (0, 4) => (0, u32::from_le_bytes([data[0], data[1], data[2], data[3]]), u32::MAX),
            _ => return,
        };
        let mask = mask & (width_mask << shift);
        let old = self.regs[reg];
        self.regs[reg] = (old & !mask) | ((value << shift) & mask);
    }

    /// Sets a register's value as the device model (not the guest) sees fit.
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = value;
        }
    }

    /// Marks which bits of `reg` the guest may write.
    pub fn set_writable(&mut self, reg: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(reg) {
            *w = mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_read_only() {
        let mut c = ConfigSpace::new(0x1234, 0x5678, 0x060000, 1);
        assert_eq!(c.read_reg(0), 0x5678_1234);
        c.write_reg(0, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read_reg(0), 0x5678_1234);
        assert_eq!(c.read_reg(2), 0x0600_0001);
    }

    #[test]
    fn command_bits_masked_by_width_and_offset() {
        let mut c = ConfigSpace::new(1, 2, 0, 0);
        c.write_reg(1, 0, &[0xff, 0xff]);
        assert_eq!(c.read_reg(1), 0x0407);
        c.write_reg(1, 0, &[0x00]);
        assert_eq!(c.read_reg(1), 0x0400);
        c.write_reg(15, 0, &[0x0b]);
        assert_eq!(c.read_reg(15) & 0xff, 0x0b);
        c.write_reg(15, 1, &[0x01]); // interrupt pin: read-only
        assert_eq!(c.read_reg(15) >> 8 & 0xff, 0);
    }

    #[test]
    fn malformed_accesses_ignored() {
        let mut c = ConfigSpace::new(1, 2, 0, 0);
        c.write_reg(1, 1, &[0xff, 0xff]); // misaligned word
        c.write_reg(1, 3, &[0xff, 0xff, 0xff, 0xff]);
        c.write_reg(1, 0, &[0xff, 0xff, 0xff]);
        c.write_reg(5000, 0, &[1]);
        c.write_reg(0x40, 0, &[1, 2, 3, 4]);
        assert_eq!(c.read_reg(1), 0);
        assert_eq!(c.read_reg(0x40), 0, "extended space: no capabilities");
        assert_eq!(c.read_reg(5000), u32::MAX);
    }
}
