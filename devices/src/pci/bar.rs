//! Where a BAR the guest programmed is in use (PCI Local Bus 3.0 §6.2.5.1), shared by every
//! function model with BARs (ADIs, passed-through devices).

/// The address space and width of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarSpace {
    /// I/O space (16-bit port addresses behind a 32-bit register).
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (two registers).
    Mem64,
}

impl BarSpace {
    /// The bits the BAR's register(s) hold.
    fn register_mask(self) -> u64 {
        match self {
            Self::Io | Self::Mem32 => u64::from(u32::MAX),
            Self::Mem64 => u64::MAX,
        }
    }

    /// One past the highest address a BAR in this space may reach.
    fn limit(self) -> u128 {
        match self {
            Self::Io => 1 << 16,
            Self::Mem32 => 1 << 32,
            Self::Mem64 => 1 << 64,
        }
    }
}

/// Where a BAR of `size` bytes (a power of two) at `address` (flag bits cleared) should be
/// mapped, or `None` while it must not be: its decode bit in the command register is off, it is
/// unplaced (0), it holds the sizing pattern (all address bits set) or it would run past the
/// top of its space.
pub fn placement(address: u64, size: u64, space: BarSpace, decode: bool) -> Option<u64> {
    let sizing = address == !(size - 1) & space.register_mask();
    let fits = u128::from(address) + u128::from(size) <= space.limit();
    (decode && address != 0 && !sizing && fits).then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_placement_sizing_and_limits() {
        assert_eq!(placement(0xc000_0000, 0x8000, BarSpace::Mem64, true), Some(0xc000_0000));
        assert_eq!(placement(0xc000_0000, 0x8000, BarSpace::Mem64, false), None, "decode off");
        assert_eq!(placement(0, 0x8000, BarSpace::Mem64, true), None, "unplaced");
        assert_eq!(placement(0xffff_ffff_ffff_8000, 0x8000, BarSpace::Mem64, true), None, "64-bit sizing pattern");
        assert_eq!(placement(0xffff_8000, 0x8000, BarSpace::Mem32, true), None, "32-bit sizing pattern");
        assert_eq!(placement(0xffff_8000, 0x8000, BarSpace::Mem64, true), Some(0xffff_8000), "a 64-bit BAR below 4 GiB");
        assert_eq!(placement(0xffff_ff00, 0x100, BarSpace::Io, true), None, "I/O sizing pattern");
        assert_eq!(placement(0xff00, 0x100, BarSpace::Io, true), Some(0xff00));
        assert_eq!(placement(0x1_0000, 0x100, BarSpace::Io, true), None, "past 64 KiB of ports");
        assert_eq!(placement(0xffff_ffff_ffff_0000, 0x8000, BarSpace::Mem64, true), Some(0xffff_ffff_ffff_0000));
    }
}
