//! The IMS hypercall endpoint as a guest calls it: any 64-byte argument block, decoded and
//! executed against two ADIs under any IMS policy, and the transport itself (the block's
//! address stored to the hypercall register: misaligned, outside RAM, across the hole). The
//! VM's IMS quota (48 entries, 16 per ADI) holds after every call.
#![no_main]

use std::sync::{LazyLock, Mutex};

use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{AdiGuest, Input};
use siovmm_hypercall::{Call, BLOCK_SIZE};
use siovmm_vdcm::hypercall::{Hypercalls, ImsOffer};
use vm_memory::{Bytes, GuestAddress};

/// Guests without and with the trapped window.
static GUESTS: [LazyLock<Mutex<AdiGuest>>; 2] =
    [LazyLock::new(|| Mutex::new(AdiGuest::new(2, 2, false))), LazyLock::new(|| Mutex::new(AdiGuest::new(2, 2, true)))];

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(policy) = input.u8() else { return };
    let offer = match policy % 4 {
        0 => ImsOffer::None,
        1 => ImsOffer::Pv { in_queue: false },
        2 => ImsOffer::Pv { in_queue: true },
        _ => ImsOffer::Trap,
    };
    AdiGuest::session(&GUESTS[usize::from(matches!(offer, ImsOffer::Trap))], |g| {
        let mut calls = Hypercalls::new(g.mem.clone(), g.vdcm.table(), 2, offer, (g.opt_in.clone(), g.quota.clone()));
        while let Some(kind) = input.u8() {
            if kind & 1 == 0 {
                let Some(Ok(block)) = input.bytes(BLOCK_SIZE).map(<&[u8; BLOCK_SIZE]>::try_from) else { break };
                if let Ok(call) = Call::decode(block) {
                    let _ = calls.execute(call);
                }
            } else {
                // The block written into guest memory, then its address stored to the register.
                let (Some(at), Some(block)) = (input.u64(), input.bytes(BLOCK_SIZE)) else { break };
                let _ = g.mem.write_slice(block, GuestAddress(at));
                calls.write(0, &at.to_le_bytes());
            }
            assert!(g.quota.held() <= 48, "VM quota exceeded: {}", g.quota.held());
        }
    });
});
