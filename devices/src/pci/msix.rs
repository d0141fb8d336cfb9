//! MSI-X emulation (PCI Local Bus 3.0 §6.8.2): the capability's message control, the vector
//! table and the pending-bit array, as a guest programs them.
//!
//! Pure: guest accesses go in, [`VectorChange`]s come out, and the owner applies them (for an
//! ADI: a KVM MSI route plus the mask of the backing IMS entry). A vector is *effectively masked*
//! when MSI-X is disabled, the function mask is set, or its own mask bit is set; every access
//! that changes a vector's message or effective mask reports it, and nothing else does.
//! Pending bits are the owner's (the IMS entry holds them), supplied when the PBA is read.
//! Every offset and size comes from the guest: out-of-range, misaligned or odd-sized accesses
//! read as zero and are dropped.

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: mask bit.
pub const VECTOR_MASKED: u32 = 1;
/// Most vectors a function may have.
pub const MAX_VECTORS: u16 = 2048;

pub use siovmm_interrupts::MsiMessage;
use siovmm_interrupts::MsiEntry;

/// A vector whose message or effective mask changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VectorChange {
    /// Vector index.
    pub vector: u16,
    /// Its message now.
    pub message: MsiMessage,
    /// Whether it is effectively masked now.
    pub masked: bool,
}

/// Reset state: every vector masked (§6.8.2.9).
type Entry = MsiEntry;

/// One function's MSI-X state.
#[derive(Clone, Debug)]
pub struct Msix {
    entries: Vec<Entry>,
    enabled: bool,
    function_mask: bool,
}

impl Msix {
    /// `vectors` vectors (1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: u16) -> Self {
        let n = vectors.clamp(1, MAX_VECTORS);
        Self { entries: vec![Entry::default(); usize::from(n)], enabled: false, function_mask: false }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Table size in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// PBA size in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Message control as the capability reports it.
    pub fn message_control(&self) -> u16 {
        (self.vectors() - 1)
            | if self.enabled { CTRL_ENABLE } else { 0 }
            | if self.function_mask { CTRL_FUNCTION_MASK } else { 0 }
    }

    fn masked(&self, e: &Entry) -> bool {
        !self.enabled || self.function_mask || e.is_masked()
    }

    fn change(&self, vector: usize) -> VectorChange {
        let e = &self.entries[vector];
        VectorChange {
            vector: vector as u16,
            message: e.message(),
            masked: self.masked(e),
        }
    }

    /// The current state of `vector`, if it exists.
    pub fn vector(&self, vector: u16) -> Option<VectorChange> {
        (usize::from(vector) < self.entries.len()).then(|| self.change(usize::from(vector)))
    }

    /// A guest write to message control; only enable and function mask are writable.
    pub fn write_message_control(&mut self, value: u16) -> Vec<VectorChange> {
        let before: Vec<bool> = self.entries.iter().map(|e| self.masked(e)).collect();
        self.enabled = value & CTRL_ENABLE != 0;
        self.function_mask = value & CTRL_FUNCTION_MASK != 0;
        (0..self.entries.len()).filter(|&i| before[i] != self.masked(&self.entries[i])).map(|i| self.change(i)).collect()
    }

    fn decode(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let vector = usize::try_from(offset / ENTRY_SIZE).ok().filter(|&v| v < self.entries.len())?;
        Some((vector, (offset % ENTRY_SIZE / 4) as usize))
    }

    /// A guest read of the vector table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((v, dword)) = self.decode(offset, data.len()) else { return };
        let e = self.entries[v];
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&e.dword(dword + i).to_le_bytes());
        }
    }

    /// A guest write to the vector table; returns the vector's new state if it changed.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Option<VectorChange> {
        let (v, dword) = self.decode(offset, data.len())?;
        let old = self.change(v);
        for (i, chunk) in data.chunks(4).enumerate() {
            let w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let w = match dword + i {
                0 => w & !0x3,           // dword aligned (§6.8.2.4)
                3 => w & VECTOR_MASKED, // other bits reserved
                _ => w,
            };
            self.entries[v].set_dword(dword + i, w);
        }
        let new = self.change(v);
        (new != old).then_some(new)
    }

    /// A guest read of the PBA; `pending(v)` says whether vector `v` has a pending interrupt.
    pub fn read_pba(&self, offset: u64, data: &mut [u8], pending: impl Fn(u16) -> bool) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) || offset >= self.pba_size() {
            return;
        }
        let first = offset * 8;
        for bit in 0..data.len() * 8 {
            let v = first + bit as u64;
            if v < self.entries.len() as u64 && pending(v as u16) {
                data[bit / 8] |= 1 << (bit % 8);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(m: &mut Msix, v: u64, addr: u64, data: u32, masked: bool) -> Vec<VectorChange> {
        let base = v * ENTRY_SIZE;
        let mut out: Vec<VectorChange> = Vec::new();
        out.extend(m.write_table(base, &addr.to_le_bytes()));
        out.extend(m.write_table(base + 8, &data.to_le_bytes()));
        out.extend(m.write_table(base + 12, &u32::from(masked).to_le_bytes()));
        out
    }

    #[test]
    fn reset_state_and_control() {
        let mut m = Msix::new(3);
        assert_eq!(m.message_control(), 2);
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
        assert!(m.vector(0).unwrap().masked);
        assert!(m.vector(3).is_none());
        // Enabling with every vector masked changes nothing effective.
        assert!(m.write_message_control(CTRL_ENABLE).is_empty());
        assert_eq!(m.message_control(), 2 | CTRL_ENABLE);
        // Read-only bits (table size) stay.
        m.write_message_control(0x07ff | CTRL_ENABLE);
        assert_eq!(m.message_control() & 0x7ff, 2);
    }

    #[test]
    fn unmask_reports_and_function_mask_covers_all() {
        let mut m = Msix::new(2);
        m.write_message_control(CTRL_ENABLE);
        let ch = write(&mut m, 1, 0xfee0_0000, 0x4041, false);
        assert_eq!(
            ch.last(),
            Some(&VectorChange { vector: 1, message: MsiMessage { address: 0xfee0_0000, data: 0x4041 }, masked: false })
        );
        let ch = m.write_message_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert_eq!(ch.len(), 1, "only vector 1 was unmasked");
        assert!(ch[0].masked);
        let ch = m.write_message_control(CTRL_ENABLE);
        assert!(!ch[0].masked);
        // Disabling MSI-X masks effectively.
        assert!(m.write_message_control(0)[0].masked);
        // A write that changes nothing reports nothing.
        m.write_message_control(CTRL_ENABLE);
        assert!(m.write_table(16 + 8, &0x4041u32.to_le_bytes()).is_none());
    }

    #[test]
    fn table_reads_back_and_reserved_bits_dropped() {
        let mut m = Msix::new(1);
        m.write_table(0, &0xfee0_1003u32.to_le_bytes());
        m.write_table(12, &0xffff_ffffu32.to_le_bytes());
        let mut b = [0u8; 8];
        m.read_table(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_1000);
        let mut c = [0u8; 4];
        m.read_table(12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 1);
    }

    #[test]
    fn hostile_accesses_ignored() {
        let mut m = Msix::new(2);
        assert!(m.write_table(2, &[1, 2, 3, 4]).is_none());
        assert!(m.write_table(0, &[1, 2]).is_none());
        assert!(m.write_table(32, &[1, 2, 3, 4]).is_none());
        assert!(m.write_table(u64::MAX - 3, &[1, 2, 3, 4]).is_none());
        let mut b = [0xaau8; 4];
        m.read_table(1 << 60, &mut b);
        assert_eq!(b, [0; 4]);
        let mut p = [0xaau8; 8];
        m.read_pba(8, &mut p, |_| true);
        assert_eq!(p, [0; 8]);
    }

    #[test]
    fn pba_from_owner() {
        let m = Msix::new(70);
        let mut p = [0u8; 8];
        m.read_pba(0, &mut p, |v| v == 1 || v == 63);
        assert_eq!(u64::from_le_bytes(p), 1 << 1 | 1 << 63);
        m.read_pba(8, &mut p, |v| v == 64 || v == 69 || v == 70);
        assert_eq!(u64::from_le_bytes(p), 1 | 1 << 5, "vector 70 does not exist");
        let mut d = [0u8; 4];
        m.read_pba(4, &mut d, |v| v == 33);
        assert_eq!(u32::from_le_bytes(d), 1 << 1);
    }
}
