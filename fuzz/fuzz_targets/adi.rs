//! An ADI as a hostile guest reaches it: ECAM config accesses (BAR sizing and placement,
//! command register, MSI-X capability), BAR0 registers (queue set-up, doorbell, MSI-X table
//! and PBA), and MMIO anywhere the guest may have placed BARs, interleaved; two ADIs of two
//! vectors on the software device, KVM faked. Nothing panics, KVM's ordering rule holds (the
//! fake checks every irqfd has a route), and once the ADIs are released no irqfd, IMS entry or
//! BAR mapping is left (AdiGuest::session).
#![no_main]

use std::sync::{LazyLock, Mutex};

use devices::pci::PciConfigMmio;
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{adi_step, AdiGuest, Input};
use siovmm_vdcm::adi::BAR0_SIZE;

static GUEST: LazyLock<Mutex<AdiGuest>> = LazyLock::new(|| Mutex::new(AdiGuest::new(2, 2, false)));

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    AdiGuest::session(&GUEST, |g| {
        let mut ecam = PciConfigMmio::new(g.pci.clone(), 1);
        while adi_step(g, &mut ecam, &mut input, BAR0_SIZE) {}
    });
});
