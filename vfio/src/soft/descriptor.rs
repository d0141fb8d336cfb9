//! The software device's 64-byte work descriptor and 32-byte completion record, DSA-style
//! (Linux `uapi/linux/idxd.h` `dsa_hw_desc` / `dsa_completion_record`; DSA spec §8). Decoding
//! takes any 64 bytes: every field is range-checked when used, never trusted.

/// Descriptor size.
pub const DESC_SIZE: usize = 64;
/// Completion record size.
pub const COMPLETION_SIZE: usize = 32;

/// Operations.
pub mod opcode {
    /// Nothing; completes at once.
    pub const NOOP: u8 = 0x00;
    /// Copy `size` bytes from `src` to `dst` (overlap allowed, memmove semantics).
    pub const MEMMOVE: u8 = 0x03;
    /// Fill `size` bytes at `dst` with the 8-byte pattern held in the `src` field.
    pub const FILL: u8 = 0x04;
    /// Compare `size` bytes at `src` and `dst`.
    pub const COMPARE: u8 = 0x05;
    /// CRC-32C of `size` bytes at `src`, seeded with the u32 at descriptor offset 40.
    pub const CRC32C: u8 = 0x10;
}

/// Descriptor flags (bits 23:0 of the dword at offset 4).
pub mod flags {
    /// Fence: accepted, no effect (descriptors run in order).
    pub const FENCE: u32 = 0x1;
    /// Block on fault: accepted, no effect.
    pub const BOF: u32 = 0x2;
    /// Completion record address valid.
    pub const CRAV: u32 = 0x4;
    /// Request a completion record.
    pub const RCR: u32 = 0x8;
    /// Request a completion interrupt (through `int_handle`).
    pub const RCI: u32 = 0x10;
    /// All flags the device knows.
    pub const KNOWN: u32 = FENCE | BOF | CRAV | RCR | RCI;
}

/// Completion status codes (byte 0 of the completion record).
pub mod status {
    /// Not yet completed (what the submitter zeroes the record to).
    pub const NONE: u8 = 0x00;
    /// Success.
    pub const SUCCESS: u8 = 0x01;
    /// Success, predicate false: COMPARE found a difference.
    pub const FALSE_PREDICATE: u8 = 0x02;
    /// A source or destination address is outside the ADI's DMA space.
    pub const PAGE_FAULT: u8 = 0x03;
    /// Unknown opcode.
    pub const INVALID_OPCODE: u8 = 0x10;
    /// Unknown flag bits, or RCR without CRAV.
    pub const INVALID_FLAGS: u8 = 0x11;
    /// Transfer size 0 or above the device maximum.
    pub const INVALID_SIZE: u8 = 0x13;
    /// The interrupt handle names no IMS entry of this ADI.
    pub const INVALID_INT_HANDLE: u8 = 0x19;
}

/// Largest transfer per descriptor.
pub const MAX_TRANSFER: u32 = 1 << 20;

/// A decoded descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Operation.
    pub opcode: u8,
    /// Flags (24 bits).
    pub flags: u32,
    /// Where the completion record goes.
    pub completion_addr: u64,
    /// Source address (FILL: the pattern).
    pub src: u64,
    /// Destination address (COMPARE: second source).
    pub dst: u64,
    /// Bytes to process.
    pub size: u32,
    /// Interrupt handle (index into the ADI's handle table).
    pub int_handle: u16,
    /// CRC32C seed.
    pub crc_seed: u32,
}

fn u32_at(b: &[u8; DESC_SIZE], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8; DESC_SIZE], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | u64::from(u32_at(b, off + 4)) << 32
}

impl Descriptor {
    /// Decodes 64 bytes.
    pub fn decode(b: &[u8; DESC_SIZE]) -> Self {
        let word = u32_at(b, 4);
        Self {
            opcode: (word >> 24) as u8,
            flags: word & 0x00ff_ffff,
            completion_addr: u64_at(b, 8),
            src: u64_at(b, 16),
            dst: u64_at(b, 24),
            size: u32_at(b, 32),
            int_handle: u16::from_le_bytes([b[36], b[37]]),
            crc_seed: u32_at(b, 40),
        }
    }

    /// Encodes (for submitters: tests, benchmarks).
    pub fn encode(&self) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        b[4..8].copy_from_slice(&(u32::from(self.opcode) << 24 | (self.flags & 0x00ff_ffff)).to_le_bytes());
        b[8..16].copy_from_slice(&self.completion_addr.to_le_bytes());
        b[16..24].copy_from_slice(&self.src.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst.to_le_bytes());
        b[32..36].copy_from_slice(&self.size.to_le_bytes());
        b[36..38].copy_from_slice(&self.int_handle.to_le_bytes());
        b[40..44].copy_from_slice(&self.crc_seed.to_le_bytes());
        b
    }
}

/// A completion record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Status code.
    pub status: u8,
    /// COMPARE: 0 equal, 1 different.
    pub result: u8,
    /// Bytes processed (COMPARE: offset of the first difference).
    pub bytes_completed: u32,
    /// Faulting address for PAGE_FAULT.
    pub fault_addr: u64,
    /// CRC32C result.
    pub crc: u32,
}

impl Completion {
    /// A record carrying only a status.
    pub fn status(status: u8) -> Self {
        Self { status, ..Default::default() }
    }

    /// Encodes the record.
    pub fn encode(&self) -> [u8; COMPLETION_SIZE] {
        let mut b = [0u8; COMPLETION_SIZE];
        b[0] = self.status;
        b[1] = self.result;
        b[4..8].copy_from_slice(&self.bytes_completed.to_le_bytes());
        b[8..16].copy_from_slice(&self.fault_addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes a record (for submitters).
    pub fn decode(b: &[u8; COMPLETION_SIZE]) -> Self {
        Self {
            status: b[0],
            result: b[1],
            bytes_completed: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            fault_addr: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            crc: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let d = Descriptor {
            opcode: opcode::MEMMOVE,
            flags: flags::CRAV | flags::RCR | flags::RCI,
            completion_addr: 0x1122_3344_5566_7788,
            src: 0x1000,
            dst: 0x2000,
            size: 4096,
            int_handle: 7,
            crc_seed: 0xdead_beef,
        };
        let b = d.encode();
        assert_eq!(b[7], opcode::MEMMOVE);
        assert_eq!(b[4], 0x1c);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(u16::from_le_bytes([b[36], b[37]]), 7);
        assert_eq!(Descriptor::decode(&b), d);
        let c = Completion { status: status::SUCCESS, result: 1, bytes_completed: 9, fault_addr: 3, crc: 5 };
        assert_eq!(Completion::decode(&c.encode()), c);
    }

    #[test]
    fn arbitrary_bytes_decode() {
        let d = Descriptor::decode(&[0xff; DESC_SIZE]);
        assert_eq!(d.opcode, 0xff);
        assert_eq!(d.flags, 0x00ff_ffff);
        assert_eq!(d.size, u32::MAX);
    }
}
