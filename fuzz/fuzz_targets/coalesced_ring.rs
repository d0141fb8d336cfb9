//! KVM's coalesced-I/O ring as siovmm reads it: any header indexes and entries (addresses,
//! lengths and data come from guest writes), replayed onto buses. The replay ends, never
//! reads outside the page, and applies at most one ring's worth.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::coalesced::RingReader;
use devices::{Bus, BusDevice};
use libfuzzer_sys::fuzz_target;

/// Counts the writes it takes.
struct Count(Arc<Mutex<u64>>);

impl BusDevice for Count {
    fn read(&mut self, _: u64, _: &mut [u8]) {}
    fn write(&mut self, _: u64, _: &[u8]) {
        *siovmm_fuzz::lock(&self.0) += 1;
    }
}

fuzz_target!(|data: &[u8]| {
    // The page: the input, then zeros, in an 8-aligned 4 KiB buffer.
    let mut page = vec![0u64; 512];
    for (i, chunk) in data.chunks(8).take(512).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        page[i] = u64::from_le_bytes(b);
    }
    // SAFETY: the buffer is 4 KiB, 8-aligned, and outlives the reader.
    let mut ring = unsafe { RingReader::new(page.as_mut_ptr().cast(), 4096) };
    let (pio, mmio) = (Bus::new(), Bus::new());
    let writes = Arc::new(Mutex::new(0));
    let _ = pio.insert(Arc::new(Mutex::new(Count(writes.clone()))), 0, 1 << 16);
    let _ = mmio.insert(Arc::new(Mutex::new(Count(writes.clone()))), 0, u64::MAX);
    let replayed = ring.replay(&pio, &mmio);
    assert!(replayed < u64::from(ring.capacity()), "replayed {replayed}, more than the ring holds");
    assert!(*siovmm_fuzz::lock(&writes) <= replayed);
});
