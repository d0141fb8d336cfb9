//! COM1 (vm-superio's 16550A behind siovmm's serial device) as the guest drives it, with host
//! input arriving between accesses; everything the guest transmits goes through the console
//! filter, whose output must never hold a control sequence other than SGR colour.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::console_out::TerminalFilter;
use devices::serial::{InputReady, SerialDevice};
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{Access, Input};
use vmm_sys_util::eventfd::EventFd;

/// The host side of the console: the filter, and everything it let through.
struct Filtered(TerminalFilter, Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Filtered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::new();
        self.0.filter(buf, &mut out);
        siovmm_fuzz::lock(&self.1).extend_from_slice(&out);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every ESC the filter let through starts `ESC [ digits-and-semicolons m`.
fn only_colour_sequences(out: &[u8]) -> bool {
    out.iter().enumerate().filter(|(_, b)| **b == 0x1b).all(|(i, _)| {
        let rest = &out[i + 1..];
        rest.first() == Some(&b'[')
            && rest[1..].iter().position(|b| !(b.is_ascii_digit() || *b == b';')).is_some_and(|end| rest[1 + end] == b'm')
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let (Ok(irq), Ok(ready)) = (EventFd::new(libc::EFD_NONBLOCK), EventFd::new(libc::EFD_NONBLOCK)) else { return };
    let shown = Arc::new(Mutex::new(Vec::new()));
    let mut com1 = SerialDevice::new(irq, Arc::new(InputReady(ready)), Box::new(Filtered(TerminalFilter::default(), shown.clone())));
    while let Some(kind) = input.u8() {
        if kind < 0x20 {
            // Host input: up to 31 bytes.
            let Some(bytes) = input.bytes(usize::from(kind)) else { break };
            com1.enqueue_input(bytes);
        } else {
            let Some(a) = Access::next(&mut input, 8) else { break };
            a.apply(&mut com1);
        }
    }
    let shown = siovmm_fuzz::lock(&shown);
    assert!(only_colour_sequences(&shown), "a control sequence reached the terminal: {:?}", String::from_utf8_lossy(&shown));
});
