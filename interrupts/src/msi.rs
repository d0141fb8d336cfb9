//! Interrupt messages and the one entry layout that holds them: the 16-byte MSI-X table entry
//! (PCIe Base 6.0 §7.7.2.3: message address low/high, data, vector control). siovmm's IMS
//! entries use it too, wherever they live (a device's MMIO, queue memory, siovmm's trapped
//! window), as Linux's unmerged IMS slot did (`irq-ims-msi.h`: `{addr_lo, addr_hi, data,
//! ctrl}`, ctrl bit 0 = mask).

/// An MSI message: what a device writes, where, to raise an interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Size of one entry.
pub const ENTRY_SIZE: usize = 16;
/// Vector control bit 0: the entry is masked.
pub const CTRL_MASK: u32 = 1;

/// One entry in the MSI-X/IMS layout, as four little-endian dwords.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiEntry {
    /// Dwords 0-3: address low, address high, data, vector control.
    pub dwords: [u32; 4],
}

impl Default for MsiEntry {
    /// The reset state: zero message, masked (PCIe Base 6.0 §7.7.2.3).
    fn default() -> Self {
        Self::masked()
    }
}

impl MsiEntry {
    /// A masked entry with no message.
    pub const fn masked() -> Self {
        Self { dwords: [0, 0, 0, CTRL_MASK] }
    }

    /// An entry holding `message`, masked or not.
    pub fn new(message: MsiMessage, masked: bool) -> Self {
        Self { dwords: [message.address as u32, (message.address >> 32) as u32, message.data, u32::from(masked)] }
    }

    /// The message it holds.
    pub fn message(&self) -> MsiMessage {
        MsiMessage { address: u64::from(self.dwords[1]) << 32 | u64::from(self.dwords[0]), data: self.dwords[2] }
    }

    /// Whether its own mask bit is set.
    pub fn is_masked(&self) -> bool {
        self.dwords[3] & CTRL_MASK != 0
    }

    /// The vector-control dword.
    pub fn control(&self) -> u32 {
        self.dwords[3]
    }

    /// Dword `i` (0..4) of the entry, 0 past it.
    pub fn dword(&self, i: usize) -> u32 {
        self.dwords.get(i).copied().unwrap_or(0)
    }

    /// Sets dword `i` (0..4); a write past the entry is ignored.
    pub fn set_dword(&mut self, i: usize, value: u32) {
        if let Some(d) = self.dwords.get_mut(i) {
            *d = value;
        }
    }

    /// The entry's 16 bytes in memory order.
    pub fn to_bytes(&self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        for (chunk, d) in b.chunks_exact_mut(4).zip(self.dwords) {
            chunk.copy_from_slice(&d.to_le_bytes());
        }
        b
    }

    /// The entry stored as `bytes`.
    pub fn from_bytes(bytes: &[u8; ENTRY_SIZE]) -> Self {
        let mut dwords = [0u32; 4];
        for (d, chunk) in dwords.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Self { dwords }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips_and_reads_by_dword() {
        let m = MsiMessage { address: 0x1_fee0_1000, data: 0x4041 };
        let e = MsiEntry::new(m, true);
        let b = e.to_bytes();
        assert_eq!(&b[0..4], &0xfee0_1000u32.to_le_bytes());
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[8..12], &0x4041u32.to_le_bytes());
        assert_eq!(&b[12..16], &CTRL_MASK.to_le_bytes());
        assert_eq!(MsiEntry::from_bytes(&b), e);
        assert_eq!((e.message(), e.is_masked()), (m, true));
        let mut e = MsiEntry::default();
        assert!(e.is_masked() && e.message() == MsiMessage::default());
        e.set_dword(3, 0);
        e.set_dword(4, 7);
        assert_eq!((e.is_masked(), e.dword(4)), (false, 0));
    }
}
