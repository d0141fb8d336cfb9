//! COM1: vm-superio's 16550A model behind a bus device, its interrupt on an eventfd that the
//! VMM binds to the UART's IOAPIC pin with irqfd, so the IRQ never passes through a VMM thread.
//!
//! Input flow control: vm-superio's receive FIFO holds 64 bytes. When the guest drains it,
//! `in_buffer_empty` fires `input_ready`, and the VMM pushes the next queued input bytes.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Interrupt line as an eventfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the VMM that the receive FIFO has room again.
#[derive(Debug)]
pub struct InputReady(pub EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The UART.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, Arc<InputReady>, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing its output to `out`.
    pub fn new(irq: EventFd, input_ready: Arc<InputReady>, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::with_events(EventFdTrigger(irq), input_ready, out) }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The UART has eight byte-wide registers; wider accesses see the first byte.
        if let (Ok(off @ 0..=7), Some(b)) = (u8::try_from(offset), data.first_mut()) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off @ 0..=7), Some(&b)) = (u8::try_from(offset), data.first()) {
            // An output error (stdout closed) loses the byte; the guest must not stall on it.
            let _ = self.uart.write(off, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (SerialDevice, Sink, EventFd, Arc<InputReady>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready = Arc::new(InputReady(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let sink = Sink::default();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), ready.clone(), Box::new(sink.clone()));
        (dev, sink, irq, ready)
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut d, sink, _, _) = uart();
        for b in b"hi\n" {
            d.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_raises_irq_and_drain_signals_ready() {
        let (mut d, _, irq, ready) = uart();
        d.write(1, &[0x01]); // IER: received-data interrupt
        assert_eq!(d.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b, [b'a']);
        d.read(0, &mut b);
        assert_eq!(b, [b'b']);
        assert!(ready.0.read().unwrap() >= 1);
    }

    #[test]
    fn fifo_limits_input_and_bad_offsets_are_harmless() {
        let (mut d, _, _, _) = uart();
        assert_eq!(d.enqueue_input(&[b'x'; 100]), 64);
        assert_eq!(d.enqueue_input(b"y"), 0);
        let mut b = [0u8; 4];
        d.read(8, &mut b);
        assert_eq!(b, [0; 4]);
        d.write(u64::MAX, &[1]);
    }
}
