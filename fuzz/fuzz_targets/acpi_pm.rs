//! The ACPI PM block (PM1 event/control, reset register) as the guest drives it.
#![no_main]

use std::sync::Arc;

use devices::acpi_pm::AcpiPm;
use devices::ShutdownSignal;
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{drive, Input};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Ok(shutdown) = ShutdownSignal::new() else { return };
    let mut pm = AcpiPm::new(Arc::new(shutdown));
    drive(&mut pm, u64::from(devices::acpi_pm::regs::SIZE), &mut input);
});
