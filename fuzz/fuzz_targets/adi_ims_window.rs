//! An enlightened guest's trapped IMS window (BAR0 0x4000 on), opted in to IMS: slots
//! written with any message, masked and unmasked, beside the MSI-X table and config accesses
//! that move BAR0; a per-ADI quota of 16 entries and a VM quota of 48 on a device of 64. The
//! quotas hold throughout, and every entry comes back when the ADIs go.
#![no_main]

use std::sync::{LazyLock, Mutex};

use devices::pci::PciConfigMmio;
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{adi_step, AdiGuest, Input};
use siovmm_vdcm::adi::BAR0_SIZE;

static GUEST: LazyLock<Mutex<AdiGuest>> = LazyLock::new(|| Mutex::new(AdiGuest::new(2, 2, true)));

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    AdiGuest::session(&GUEST, |g| {
        if input.u8().is_some_and(|b| b & 1 == 1) {
            g.opt_in.set();
        }
        let mut ecam = PciConfigMmio::new(g.pci.clone(), 1);
        // BAR0's upper half is the window: offsets in [0x2000, 0x8000) reach the MSI-X
        // table, the PBA and the window.
        while adi_step(g, &mut ecam, &mut input, BAR0_SIZE) {
            assert!(g.quota.held() <= 48, "VM quota exceeded: {}", g.quota.held());
        }
    });
});
