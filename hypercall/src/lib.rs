//! The IMS hypercall ABI (docs/hypercall.md).
//!
//! Discovery: CPUID leaf [`CPUID_SIGNATURE_LEAF`] returns EAX = highest siovmm leaf and
//! EBX:ECX:EDX = "SiovmmHypCal"; leaf [`CPUID_INFO_LEAF`] returns EAX = ABI version,
//! EBX = flags ([`FLAG_IMS_ALLOWED`]), ECX:EDX = the hypercall register's guest-physical address
//! (low, high).
//!
//! Transport: the guest fills a 64-byte **argument block** in its own RAM (8-byte aligned) and
//! writes the block's guest-physical address with one 64-bit store to the hypercall register.
//! siovmm handles the call before the store retires and writes the result into the same block.
//!
//! Block layout (little-endian u64 words): `[0]` call number, `[1..=5]` arguments,
//! `[6]` status (written by siovmm: 0 or a negative [`Status`]), `[7]` result.
//! Everything in it is guest-controlled and validated by [`Call::decode`].

/// CPUID leaf with siovmm's hypercall signature (in the hypervisor range, above KVM's leaves).
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0100;
/// CPUID leaf with version, flags and the register address.
pub const CPUID_INFO_LEAF: u32 = 0x4000_0101;
/// "SiovmmHypCal" as EBX, ECX, EDX.
pub const SIGNATURE: [u32; 3] = [
    u32::from_le_bytes(*b"Siov"),
    u32::from_le_bytes(*b"mmHy"),
    u32::from_le_bytes(*b"pCal"),
];
/// ABI version (2: IMS_OPT_IN; 3: IMS_COMPOSE returns the host message, FLAG_IMS_IN_QUEUE).
pub const ABI_VERSION: u32 = 3;
/// Info flag: a guest that opts in (IMS_OPT_IN) may use IMS through this interface (pv mode).
/// The platform's "no IMS" hint (the SIOV table's IMS_OPT_OUT, Caching Mode) stays on for
/// every guest; only this flag and the opt-in say more.
pub const FLAG_IMS_ALLOWED: u32 = 1 << 0;
/// Info flag: a guest that opts in may program IMS slots in each ADI's trapped BAR0 window
/// (trap mode).
pub const FLAG_IMS_TRAP: u32 = 1 << 1;
/// Info flag (with [`FLAG_IMS_ALLOWED`]): the device keeps IMS in memory next to each queue,
/// where nothing traps it; the guest stores the message IMS_COMPOSE returns in entry `slot`
/// of its queue's IMS area (docs/hypercall.md). Without it the host programs the entry itself.
pub const FLAG_IMS_IN_QUEUE: u32 = 1 << 2;
/// Argument block size.
pub const BLOCK_SIZE: usize = 64;

/// Call numbers.
pub mod nr {
    /// `QUERY()` → result: IMS slots per ADI (bits 31:0) | ABI version << 32.
    pub const QUERY: u64 = 0;
    /// `IMS_ALLOC(adi, count)` → result: first slot of the group.
    pub const IMS_ALLOC: u64 = 1;
    /// `IMS_FREE(adi, first_slot)`.
    pub const IMS_FREE: u64 = 2;
    /// `IMS_COMPOSE(adi, slot, vector, apic_id)` → result: the host message
    /// ([`message_result`]); the slot's interrupt handle is the ADI's MSI-X vectors + slot.
    pub const IMS_COMPOSE: u64 = 3;
    /// `IMS_MASK(adi, slot, masked)`.
    pub const IMS_MASK: u64 = 4;
    /// `IMS_OPT_IN()` → result: the info flags. The guest declares that it knows this
    /// interface and overrides the platform's "no IMS" hint; until a guest has done so, every
    /// IMS call answers NOT_ALLOWED and the trapped window is inert, whatever the policy.
    pub const IMS_OPT_IN: u64 = 5;
}

/// Status codes (negative, written to word 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Unknown call number.
    NoSuchCall = -1,
    /// An argument is out of range (vector, count, reserved word nonzero).
    InvalidArgument = -2,
    /// The ADI is not assigned to this VM.
    NoSuchAdi = -3,
    /// The slot is not allocated to this ADI.
    NoSuchSlot = -4,
    /// No IMS entries left.
    Exhausted = -5,
    /// The VM's IMS policy does not allow guest IMS.
    NotAllowed = -6,
    // No status for a bad block: a block that is misaligned or not in RAM has nowhere to
    // receive one, so such a call is ignored (docs/hypercall.md, Transport).
}

impl Status {
    /// The status numbered `code` (what word 6 of a block holds), if there is one.
    pub fn from_code(code: i64) -> Option<Self> {
        [
            Self::Ok,
            Self::NoSuchCall,
            Self::InvalidArgument,
            Self::NoSuchAdi,
            Self::NoSuchSlot,
            Self::Exhausted,
            Self::NotAllowed,
        ]
        .into_iter()
        .find(|&s| s as i64 == code)
    }
}

impl std::fmt::Display for Status {
    /// The status's name in docs/hypercall.md.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Ok => "OK",
            Status::NoSuchCall => "NO_SUCH_CALL",
            Status::InvalidArgument => "INVALID_ARGUMENT",
            Status::NoSuchAdi => "NO_SUCH_ADI",
            Status::NoSuchSlot => "NO_SUCH_SLOT",
            Status::Exhausted => "EXHAUSTED",
            Status::NotAllowed => "NOT_ALLOWED",
        })
    }
}

/// A decoded, range-checked call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Limits and version.
    Query,
    /// Allocate `count` IMS slots for the ADI at PCI address `adi` (bus << 8 | devfn).
    ImsAlloc {
        /// Requester ID of the ADI function.
        adi: u16,
        /// 1..=MAX_GROUP.
        count: u32,
    },
    /// Free the group starting at `first`.
    ImsFree {
        /// ADI.
        adi: u16,
        /// First slot of the group.
        first: u32,
    },
    /// Have the host compose and program the message raising `vector` on `apic_id`.
    ImsCompose {
        /// ADI.
        adi: u16,
        /// Slot.
        slot: u32,
        /// Guest vector, 32..=255.
        vector: u8,
        /// Destination APIC ID.
        apic_id: u32,
    },
    /// Override the "no IMS" hint for this VM (when the policy offers IMS).
    ImsOptIn,
    /// Mask or unmask a slot.
    ImsMask {
        /// ADI.
        adi: u16,
        /// Slot.
        slot: u32,
        /// New mask state.
        masked: bool,
    },
}

/// Most slots one IMS_ALLOC may ask for.
pub const MAX_GROUP: u32 = 2048;

fn word(b: &[u8; BLOCK_SIZE], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_le_bytes(w)
}

fn adi(v: u64) -> Result<u16, Status> {
    u16::try_from(v).map_err(|_| Status::InvalidArgument)
}

fn slot(v: u64) -> Result<u32, Status> {
    u32::try_from(v).map_err(|_| Status::InvalidArgument)
}

impl Call {
    /// Decodes words 0..=5 of a block. Unused argument words must be zero, so a later ABI can
    /// give them meaning.
    pub fn decode(b: &[u8; BLOCK_SIZE]) -> Result<Call, Status> {
        let args: [u64; 5] = [word(b, 1), word(b, 2), word(b, 3), word(b, 4), word(b, 5)];
        let unused_zero = |from: usize| if args[from..].iter().all(|&a| a == 0) { Ok(()) } else { Err(Status::InvalidArgument) };
        match word(b, 0) {
            nr::QUERY => {
                unused_zero(0)?;
                Ok(Call::Query)
            }
            nr::IMS_ALLOC => {
                unused_zero(2)?;
                let count = slot(args[1])?;
                if count == 0 || count > MAX_GROUP {
                    return Err(Status::InvalidArgument);
                }
                Ok(Call::ImsAlloc { adi: adi(args[0])?, count })
            }
            nr::IMS_FREE => {
                unused_zero(2)?;
                Ok(Call::ImsFree { adi: adi(args[0])?, first: slot(args[1])? })
            }
            nr::IMS_COMPOSE => {
                unused_zero(4)?;
                let vector = u8::try_from(args[2]).ok().filter(|v| *v >= 32).ok_or(Status::InvalidArgument)?;
                let apic_id = u32::try_from(args[3]).map_err(|_| Status::InvalidArgument)?;
                Ok(Call::ImsCompose { adi: adi(args[0])?, slot: slot(args[1])?, vector, apic_id })
            }
            nr::IMS_MASK => {
                unused_zero(3)?;
                let masked = match args[2] {
                    0 => false,
                    1 => true,
                    _ => return Err(Status::InvalidArgument),
                };
                Ok(Call::ImsMask { adi: adi(args[0])?, slot: slot(args[1])?, masked })
            }
            nr::IMS_OPT_IN => {
                unused_zero(0)?;
                Ok(Call::ImsOptIn)
            }
            _ => Err(Status::NoSuchCall),
        }
    }

    /// Encodes a call (guests, tests).
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let w: [u64; 6] = match *self {
            Call::Query => [nr::QUERY, 0, 0, 0, 0, 0],
            Call::ImsAlloc { adi, count } => [nr::IMS_ALLOC, adi.into(), count.into(), 0, 0, 0],
            Call::ImsFree { adi, first } => [nr::IMS_FREE, adi.into(), first.into(), 0, 0, 0],
            Call::ImsCompose { adi, slot, vector, apic_id } => {
                [nr::IMS_COMPOSE, adi.into(), slot.into(), vector.into(), apic_id.into(), 0]
            }
            Call::ImsMask { adi, slot, masked } => [nr::IMS_MASK, adi.into(), slot.into(), masked.into(), 0, 0],
            Call::ImsOptIn => [nr::IMS_OPT_IN, 0, 0, 0, 0, 0],
        };
        let mut b = [0u8; BLOCK_SIZE];
        for (i, v) in w.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Writes status and result into words 6 and 7.
pub fn complete(block: &mut [u8; BLOCK_SIZE], result: Result<u64, Status>) {
    let (status, value) = match result {
        Ok(v) => (Status::Ok as i64, v),
        Err(s) => (s as i64, 0),
    };
    block[48..56].copy_from_slice(&status.to_le_bytes());
    block[56..64].copy_from_slice(&value.to_le_bytes());
}

/// IMS_COMPOSE's result word: the host message's address in bits 31:0 and its data in bits
/// 63:32 (an x86 interrupt message's address is 32 bits: 0xFEEx_xxxx). `None` for an address
/// that does not fit, which no x86 interrupt domain composes.
pub fn message_result(address: u64, data: u32) -> Option<u64> {
    u32::try_from(address).ok().map(|a| u64::from(data) << 32 | u64::from(a))
}

/// The x86 MSI message raising `vector` on `apic_id` (fixed delivery, edge, physical
/// destination; Intel SDM Vol. 3 §11.11). APIC IDs above 255 use the extended destination ID
/// (address bits 11:5), as KVM's KVM_FEATURE_MSI_EXT_DEST_ID defines.
pub fn compose_msi(vector: u8, apic_id: u32) -> Option<(u64, u32)> {
    if apic_id > 0x7fff {
        return None;
    }
    let address = 0xfee0_0000u64 | u64::from(apic_id & 0xff) << 12 | u64::from(apic_id >> 8) << 5;
    Some((address, u32::from(vector)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(words: [u64; 6]) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        for (i, v) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn every_call_round_trips() {
        let calls = [
            Call::Query,
            Call::ImsAlloc { adi: 0x0108, count: 256 },
            Call::ImsFree { adi: 0x0108, first: 12 },
            Call::ImsCompose { adi: 0x0008, slot: 3, vector: 0x41, apic_id: 1 },
            Call::ImsMask { adi: 0x0008, slot: 3, masked: true },
            Call::ImsMask { adi: 0x0008, slot: 3, masked: false },
            Call::ImsOptIn,
        ];
        for c in calls {
            assert_eq!(Call::decode(&c.encode()), Ok(c));
        }
    }

    #[test]
    fn every_bad_argument_is_refused() {
        use Status::*;
        let cases: [([u64; 6], Status); 13] = [
            ([99, 0, 0, 0, 0, 0], NoSuchCall),
            ([u64::MAX, 0, 0, 0, 0, 0], NoSuchCall),
            ([nr::QUERY, 1, 0, 0, 0, 0], InvalidArgument),
            ([nr::IMS_ALLOC, 8, 0, 0, 0, 0], InvalidArgument),
            ([nr::IMS_ALLOC, 8, u64::from(MAX_GROUP) + 1, 0, 0, 0], InvalidArgument),
            ([nr::IMS_ALLOC, 1 << 16, 1, 0, 0, 0], InvalidArgument),
            ([nr::IMS_ALLOC, 8, 1, 7, 0, 0], InvalidArgument),
            ([nr::IMS_FREE, 8, 1 << 32, 0, 0, 0], InvalidArgument),
            ([nr::IMS_COMPOSE, 8, 0, 31, 0, 0], InvalidArgument),
            ([nr::IMS_COMPOSE, 8, 0, 256, 0, 0], InvalidArgument),
            ([nr::IMS_COMPOSE, 8, 0, 0x40, 1 << 32, 0], InvalidArgument),
            ([nr::IMS_MASK, 8, 0, 2, 0, 0], InvalidArgument),
            ([nr::IMS_OPT_IN, 1, 0, 0, 0, 0], InvalidArgument),
        ];
        for (w, want) in cases {
            assert_eq!(Call::decode(&block(w)), Err(want), "{w:x?}");
        }
    }

    #[test]
    fn completion_words() {
        let mut b = [0u8; BLOCK_SIZE];
        complete(&mut b, Err(Status::NoSuchAdi));
        assert_eq!(i64::from_le_bytes(b[48..56].try_into().unwrap()), -3);
        complete(&mut b, Ok(77));
        assert_eq!(i64::from_le_bytes(b[48..56].try_into().unwrap()), 0);
        assert_eq!(u64::from_le_bytes(b[56..64].try_into().unwrap()), 77);
    }

    #[test]
    fn msi_composition() {
        assert_eq!(compose_msi(0x41, 1), Some((0xfee0_1000, 0x41)));
        assert_eq!(compose_msi(0x41, 0x123), Some((0xfee2_3000 | 1 << 5, 0x41)));
        assert_eq!(compose_msi(0x41, 0x8000), None);
        assert_eq!(message_result(0xfee0_0210, 7), Some(7 << 32 | 0xfee0_0210));
        assert_eq!(message_result(1 << 32, 0), None);
        assert_eq!(&SIGNATURE.map(u32::to_le_bytes).concat(), b"SiovmmHypCal");
    }
}
