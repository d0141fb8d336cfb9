//! The i8042 command port (0x64, the only one placed) as the guest drives it: only 0xFE to the command port asks
//! for a reset, and nothing else stops the VM.
#![no_main]

use std::sync::Arc;

use devices::i8042::I8042Reset;
use devices::{ExitReason, ShutdownSignal};
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{Access, Input};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Ok(shutdown) = ShutdownSignal::new() else { return };
    let shutdown = Arc::new(shutdown);
    let mut i8042 = I8042Reset::new(shutdown.clone());
    let mut asked = false;
    while let Some(a) = Access::next(&mut input, 1) {
        if let Access::Write { offset: 0, data, .. } = a {
            asked |= data[0] == 0xfe;
        }
        a.apply(&mut i8042);
    }
    match shutdown.reason() {
        None => assert!(!asked, "0xFE written to the command port but no reset"),
        Some(r) => assert!(asked && r == ExitReason::Reset, "stopped with {r:?} without the reset command"),
    }
});
