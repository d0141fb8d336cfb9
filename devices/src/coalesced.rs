//! KVM's coalesced-I/O ring, read: writes to registered ports or MMIO ranges that KVM completed
//! without an exit, queued in a per-VM page, replayed in order onto the buses before the next
//! exit is handled. The page itself is mapped by the VMM (vmm/src/coalesced.rs); this is the
//! part that reads it, so it can be tested and fuzzed over any memory.
//!
//! The page is `struct kvm_coalesced_mmio_ring` (include/uapi/linux/kvm.h): a `first` index
//! (ours, the consumer), a `last` index (KVM's, the producer), then entries of
//! `struct kvm_coalesced_mmio`. Each entry's address, length and data come from a guest write;
//! the indexes are KVM's. Neither is trusted: an entry's length is cut to its 8 data bytes,
//! and indexes outside the ring read as an empty ring, so no replay runs past the page or
//! forever.

use crate::Bus;

/// One queued write, laid out as `struct kvm_coalesced_mmio`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoalescedWrite {
    /// Guest-physical address or port.
    pub phys_addr: u64,
    /// Bytes written (at most 8 are kept).
    pub len: u32,
    /// 1 for port I/O, else MMIO.
    pub pio: u32,
    /// The bytes.
    pub data: [u8; 8],
}

/// The ring's two indexes, laid out as the header of `struct kvm_coalesced_mmio_ring`.
#[repr(C)]
struct RingHeader {
    first: u32,
    last: u32,
}

/// A reader of one ring page.
#[derive(Debug)]
pub struct RingReader {
    page: *mut u8,
    capacity: u32,
}

// SAFETY: the page is shared memory valid for the reader's life (`new`'s contract); all access
// goes through `&mut self`, and users serialize with a mutex.
unsafe impl Send for RingReader {}

impl RingReader {
    /// A reader of the ring in the `size` bytes at `page`.
    ///
    /// # Safety
    /// `page` must be valid for reads and writes of `size` bytes, aligned to 8, for as long
    /// as the reader is used; only KVM (or a test) writes it besides the reader.
    pub unsafe fn new(page: *mut u8, size: usize) -> Self {
        let entries = size.saturating_sub(std::mem::size_of::<RingHeader>()) / std::mem::size_of::<CoalescedWrite>();
        Self { page, capacity: entries as u32 }
    }

    /// Entries the ring holds.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Takes the oldest queued write, if any.
    pub fn pop(&mut self) -> Option<CoalescedWrite> {
        let header = self.page.cast::<RingHeader>();
        // SAFETY: `header` is the start of the page (`new`'s contract); `last` is written by
        // KVM, so both indexes are read volatilely through raw pointers (a Rust reference to
        // memory the kernel writes concurrently would promise it does not change), then
        // fenced before the entry is read.
        let (first, last) = unsafe {
            (std::ptr::read_volatile(std::ptr::addr_of!((*header).first)), std::ptr::read_volatile(std::ptr::addr_of!((*header).last)))
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        if first == last || first >= self.capacity || last >= self.capacity {
            return None;
        }
        // SAFETY: `first < capacity`, so the entry lies inside the page.
        let entry = unsafe {
            let entries = self.page.add(std::mem::size_of::<RingHeader>()).cast::<CoalescedWrite>();
            std::ptr::read_volatile(entries.add(first as usize))
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: `first` is the consumer index, ours to advance.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*header).first), (first + 1) % self.capacity) };
        Some(entry)
    }

    /// Applies every queued write, oldest first, to `pio` or `mmio`; returns how many. At most
    /// one ring's worth: a producer that keeps writing cannot hold the caller.
    pub fn replay(&mut self, pio: &Bus, mmio: &Bus) -> u64 {
        let mut n = 0;
        while n < u64::from(self.capacity) {
            let Some(e) = self.pop() else { break };
            n += 1;
            let data = &e.data[..(e.len as usize).min(e.data.len())];
            if e.pio == 1 {
                pio.write(e.phys_addr, data);
            } else {
                mmio.write(e.phys_addr, data);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A ring page in a buffer, written as KVM would.
    struct Page(Vec<u64>);

    impl Page {
        fn new() -> Self {
            Self(vec![0; 512])
        }
        fn reader(&mut self) -> RingReader {
            // SAFETY: the buffer is 4 KiB, 8-aligned, and outlives the reader in each test.
            unsafe { RingReader::new(self.0.as_mut_ptr().cast(), 4096) }
        }
        fn set(&mut self, first: u32, last: u32) {
            self.0[0] = u64::from(first) | u64::from(last) << 32;
        }
        fn put(&mut self, slot: usize, w: CoalescedWrite) {
            let at = 1 + slot * 3;
            self.0[at] = w.phys_addr;
            self.0[at + 1] = u64::from(w.len) | u64::from(w.pio) << 32;
            self.0[at + 2] = u64::from_le_bytes(w.data);
        }
    }

    /// Writes a device took: (offset, bytes).
    type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    #[derive(Default)]
    struct Log(Writes);
    impl crate::BusDevice for Log {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn writes_replay_in_order_onto_their_bus_with_lengths_cut_to_the_data() {
        let mut page = Page::new();
        let mut ring = page.reader();
        assert_eq!(ring.capacity(), (4096 - 8) / 24);
        let (pio, mmio) = (Bus::new(), Bus::new());
        let (ports, memory) = (Log::default(), Log::default());
        let (p, m) = (ports.0.clone(), memory.0.clone());
        pio.insert(Arc::new(Mutex::new(ports)), 0xcf8, 8).unwrap();
        mmio.insert(Arc::new(Mutex::new(memory)), 0x1000, 0x100).unwrap();
        page.put(169, CoalescedWrite { phys_addr: 0xcf8, len: 4, pio: 1, data: *b"abcdefgh" });
        page.put(0, CoalescedWrite { phys_addr: 0x1010, len: 200, pio: 0, data: *b"ABCDEFGH" });
        page.set(169, 1);
        assert_eq!(ring.replay(&pio, &mmio), 2);
        assert_eq!(*p.lock().unwrap(), vec![(0, b"abcd".to_vec())]);
        assert_eq!(*m.lock().unwrap(), vec![(0x10, b"ABCDEFGH".to_vec())], "length cut to the 8 data bytes");
        assert_eq!(ring.pop(), None, "consumed up to last");
    }

    #[test]
    fn indexes_outside_the_ring_read_as_empty() {
        let mut page = Page::new();
        let mut ring = page.reader();
        let cap = ring.capacity();
        for (first, last) in [(cap, 0), (0, cap), (u32::MAX, 3), (5, u32::MAX)] {
            page.set(first, last);
            assert_eq!(ring.pop(), None, "first {first}, last {last}");
        }
        // A page too small for even one entry holds none.
        let mut tiny = [0u64; 2];
        // SAFETY: 16 valid, aligned bytes.
        let mut r = unsafe { RingReader::new(tiny.as_mut_ptr().cast(), 16) };
        assert_eq!(r.capacity(), 0);
        assert_eq!(r.pop(), None);
    }
}
