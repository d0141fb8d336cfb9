//! The CMOS/RTC ports (0x70-0x71) as the guest drives them, the clock fixed.
#![no_main]

use devices::cmos::Cmos;
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{drive, Input};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut cmos = Cmos::with_clock(|| 1_795_448_298);
    drive(&mut cmos, 2, &mut input);
});
