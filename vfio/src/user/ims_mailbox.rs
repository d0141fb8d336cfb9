//! The IMS mailbox: how a VMM asks a vfio-user SIOV device for IMS slots on behalf of an
//! enlightened guest (the IMS hypercall, docs/hypercall.md, or the trapped IMS window the VMM
//! serves in the ADI's BAR0), where the device, not the VMM,
//! owns the IMS entries (docs/devd.md, "IMS for enlightened guests").
//!
//! vfio-user has no message for it, and a VFIO device says what else it offers through
//! device-specific regions and interrupt indexes (as kernel vfio-pci variant drivers do):
//! - a **region** after the standard PCI ones, named by a region-type capability
//!   ([`REGION_TYPE`], [`REGION_SUBTYPE`]), [`SIZE`] bytes: a 16-byte [`Request`] written at
//!   offset 0 runs it; the 16-byte reply (status, result) is read at [`REPLY`]. The VMM
//!   serializes its calls per device (one connection, one client);
//! - an **interrupt index** ([`IRQ_INDEX`]) whose vector n is slot n: `SET_IRQS` with an
//!   eventfd binds the slot's host IMS entry to it (the VMM routes that eventfd to the guest's
//!   vector with KVM irqfd, so the interrupt never passes through the VMM), as `SET_IRQS` of
//!   the MSI-X index binds vectors.
//!
//! Status codes are the hypercall's ([`Status`]), so the VMM passes them on unchanged.

use siovmm_hypercall::Status;
use vfio_bindings::bindings::vfio::{VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_TYPE_PCI_VENDOR_TYPE};

/// Where a device that has the mailbox puts it: the first index after the PCI regions.
pub const REGION_INDEX: u32 = VFIO_PCI_NUM_REGIONS;
/// Its region type: vendor-specific, siovmm's PCI vendor ID.
pub const REGION_TYPE: u32 = VFIO_REGION_TYPE_PCI_VENDOR_TYPE | devices::pci::SIOVMM_VENDOR_ID as u32;
/// Its subtype: the IMS mailbox.
pub const REGION_SUBTYPE: u32 = 1;
/// Bytes of the region: a request and a reply.
pub const SIZE: u64 = 32;
/// Where the reply to the last request is read.
pub const REPLY: u64 = 16;
/// The interrupt index whose vector n is IMS slot n: the first after the PCI ones.
pub const IRQ_INDEX: u32 = VFIO_PCI_NUM_IRQS;

/// A mailbox request (16 bytes: op, two arguments, a reserved word that must be 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// What the device offers ([`Offer`]).
    Query,
    /// `count` more slots for this ADI, each backed by a host IMS entry, masked; returns the
    /// first (the lowest free range that fits; numbers of freed groups are reused).
    Alloc {
        /// Slots, 1..=the hypercall's group limit.
        count: u32,
    },
    /// Frees the group [`Request::Alloc`] returned `first` for: its entries unbound and back
    /// in the device's pool, interrupt handles naming its slots revoked.
    Free {
        /// The group's first slot.
        first: u32,
    },
    /// The host message slot `slot`'s entry writes (hypercall `message_result` form:
    /// data << 32 | address), the one a guest stores where the device keeps IMS in memory.
    Message {
        /// The slot.
        slot: u32,
    },
    /// Masks or unmasks the slot; unmasking delivers a pending interrupt once. Where IMS is
    /// in queue memory, sets the mask bit stored there and commits it.
    Mask {
        /// The slot.
        slot: u32,
        /// The new mask state.
        masked: bool,
    },
    /// What a trapped IMS window reports of the slot ([`SlotState`]): whether an interrupt
    /// is pending on its entry, and the interrupt handle descriptors name it by.
    State {
        /// The slot.
        slot: u32,
    },
}

impl Request {
    /// Its 16 bytes.
    pub fn encode(self) -> [u8; 16] {
        let (op, a, b) = match self {
            Self::Query => (0, 0, 0),
            Self::Alloc { count } => (1, count, 0),
            Self::Free { first } => (2, first, 0),
            Self::Message { slot } => (3, slot, 0),
            Self::Mask { slot, masked } => (4, slot, u32::from(masked)),
            Self::State { slot } => (5, slot, 0),
        };
        let mut out = [0u8; 16];
        for (i, word) in [op, a, b].into_iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Read back from exactly 16 bytes; `None` for anything else, an unknown op, an unused
    /// argument or the reserved word not 0, or a mask state other than 0 and 1.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 16 {
            return None;
        }
        let word = |i: usize| u32::from_le_bytes([bytes[i * 4], bytes[i * 4 + 1], bytes[i * 4 + 2], bytes[i * 4 + 3]]);
        let (op, a, b, reserved) = (word(0), word(1), word(2), word(3));
        if reserved != 0 {
            return None;
        }
        let request = match (op, b) {
            (0, 0) if a == 0 => Self::Query,
            (1, 0) => Self::Alloc { count: a },
            (2, 0) => Self::Free { first: a },
            (3, 0) => Self::Message { slot: a },
            (4, 0 | 1) => Self::Mask { slot: a, masked: b == 1 },
            (5, 0) => Self::State { slot: a },
            _ => return None,
        };
        Some(request)
    }
}

/// What a device's mailbox offers (the answer to [`Request::Query`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// Most slots one ADI may hold at once.
    pub slots_per_adi: u32,
    /// The device keeps IMS in queue memory: the guest stores each slot's host message in its
    /// queue's IMS area (docs/siov-device.md), where mask and pending live too.
    pub in_queue: bool,
}

impl Offer {
    /// As [`Request::Query`]'s result: slots per ADI in bits 63:32, bit 0 in-queue storage.
    pub fn encode(self) -> u64 {
        u64::from(self.slots_per_adi) << 32 | u64::from(self.in_queue)
    }

    /// Read back from a result.
    pub fn decode(result: u64) -> Self {
        Self { slots_per_adi: (result >> 32) as u32, in_queue: result & 1 != 0 }
    }
}

/// A slot's state (the answer to [`Request::State`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    /// An interrupt is pending on the slot's entry (raised while masked).
    pub pending: bool,
    /// The interrupt handle that names the slot in a descriptor.
    pub handle: u32,
}

impl SlotState {
    /// As [`Request::State`]'s result: the handle in bits 63:32, bit 0 pending.
    pub fn encode(self) -> u64 {
        u64::from(self.handle) << 32 | u64::from(self.pending)
    }

    /// Read back from a result.
    pub fn decode(result: u64) -> Self {
        Self { handle: (result >> 32) as u32, pending: result & 1 != 0 }
    }
}

/// A reply's 16 bytes: the status (i32; 0 or a hypercall status code), 4 reserved bytes, the
/// result (u64, 0 on failure).
pub fn encode_reply(result: Result<u64, Status>) -> [u8; 16] {
    let (status, value) = match result {
        Ok(v) => (0i32, v),
        Err(s) => (s as i32, 0),
    };
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&status.to_le_bytes());
    out[8..].copy_from_slice(&value.to_le_bytes());
    out
}

/// A reply read back; a status this ABI does not have reads as INVALID_ARGUMENT.
pub fn decode_reply(bytes: &[u8; 16]) -> Result<u64, Status> {
    let status = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let mut value = [0u8; 8];
    value.copy_from_slice(&bytes[8..]);
    match status {
        0 => Ok(u64::from_le_bytes(value)),
        s => Err(Status::from_code(i64::from(s)).filter(|&s| s != Status::Ok).unwrap_or(Status::InvalidArgument)),
    }
}

/// A device's IMS mailbox as a VMM reaches it ([`super::UserDevice`] over vfio-user).
pub trait ImsMailbox: Send + Sync {
    /// Runs one request; a device that cannot be reached reads as NO_SUCH_ADI.
    fn request(&self, request: Request) -> Result<u64, Status>;
    /// Has slot `slot`'s entry signal `fd` (SET_IRQS of [`IRQ_INDEX`]).
    fn bind(&self, slot: u32, fd: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<()>;
}

impl ImsMailbox for super::UserDevice {
    fn request(&self, request: Request) -> Result<u64, Status> {
        self.ims_request(request)
    }
    fn bind(&self, slot: u32, fd: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<()> {
        self.ims_bind(slot, fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_malformed_ones_are_refused() {
        for r in [
            Request::Query,
            Request::Alloc { count: 7 },
            Request::Free { first: 3 },
            Request::Message { slot: 9 },
            Request::Mask { slot: 2, masked: true },
            Request::Mask { slot: 2, masked: false },
            Request::State { slot: 5 },
        ] {
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
        let mut bad = Request::Mask { slot: 1, masked: true }.encode();
        bad[8] = 2;
        assert_eq!(Request::decode(&bad), None, "a mask state of 2");
        let mut reserved = Request::Alloc { count: 1 }.encode();
        reserved[12] = 1;
        assert_eq!(Request::decode(&reserved), None, "the reserved word set");
        let mut state = Request::State { slot: 1 }.encode();
        state[8] = 1;
        assert_eq!(Request::decode(&state), None, "STATE with a second argument");
        let mut unused = Request::Free { first: 1 }.encode();
        unused[8] = 1;
        assert_eq!(Request::decode(&unused), None, "an unused argument set");
        assert_eq!(Request::decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None, "op 9");
        assert_eq!(Request::decode(&Request::Query.encode()[..8]), None, "short");
    }

    #[test]
    fn replies_and_offers_round_trip() {
        assert_eq!(decode_reply(&encode_reply(Ok(0xfee0_0000_0000_0041))), Ok(0xfee0_0000_0000_0041));
        for s in [Status::NoSuchSlot, Status::Exhausted, Status::InvalidArgument] {
            assert_eq!(decode_reply(&encode_reply(Err(s))), Err(s));
        }
        let mut odd = [0u8; 16];
        odd[..4].copy_from_slice(&(-77i32).to_le_bytes());
        assert_eq!(decode_reply(&odd), Err(Status::InvalidArgument), "an unknown status");
        let offer = Offer { slots_per_adi: 2048, in_queue: true };
        assert_eq!(Offer::decode(offer.encode()), offer);
        let state = SlotState { pending: true, handle: 0x1_0002 };
        assert_eq!(SlotState::decode(state.encode()), state);
    }
}
