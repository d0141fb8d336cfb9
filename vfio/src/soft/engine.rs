//! Executes one descriptor against an ADI's DMA space. Sizes are checked before any access;
//! an address outside the space ends the operation with PAGE_FAULT and the faulting address.

use super::descriptor::{flags, opcode, status, Completion, Descriptor, MAX_TRANSFER};
use crate::dma::{DmaFault, DmaSpace};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Continues a CRC-32C over `data` one byte at a time.
fn crc32c_bytes(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// Continues a CRC-32C over `data` with the CPU's CRC32 instruction, which computes exactly
/// this polynomial (Intel SDM Vol. 2A, "CRC32"): 8 bytes per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn crc32c_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut words = data.chunks_exact(8);
    let mut c = u64::from(crc);
    for w in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        c = _mm_crc32_u64(c, u64::from_le_bytes(word));
    }
    words.remainder().iter().fold(c as u32, |crc, &b| _mm_crc32_u8(crc, b))
}

/// Continues a CRC-32C over `data` (`crc` is the running value, pre- and post-inverted by the
/// caller convention of [`crc32c`]): with the CRC32 instruction where the CPU has it (a step
/// per byte was most of a 1 MiB CRC descriptor's time), else a table step per byte.
fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE4.2, checked just above.
        return unsafe { crc32c_sse42(crc, data) };
    }
    crc32c_bytes(crc, data)
}

/// CRC-32C of `data` starting from `seed` (0 for a plain CRC-32C).
pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c_update(!seed, data)
}

fn fault(f: DmaFault) -> Completion {
    Completion { status: status::PAGE_FAULT, fault_addr: f.addr, ..Default::default() }
}

/// `buf` filled with `pattern` repeated from its start: the pattern once, then the filled
/// part copied after itself (a few memcpys for a MiB, not a step per byte).
fn fill_repeating(buf: &mut [u8], pattern: &[u8; 8]) {
    let first = buf.len().min(pattern.len());
    buf[..first].copy_from_slice(&pattern[..first]);
    let mut filled = first;
    while filled < buf.len() {
        let n = filled.min(buf.len() - filled);
        buf.copy_within(..n, filled);
        filled += n;
    }
}

/// Chunk for reading large buffers.
const CHUNK: usize = 64 * 1024;

/// Checks flags and size; `None` when the descriptor may run.
pub fn validate(d: &Descriptor) -> Option<Completion> {
    if d.flags & !flags::KNOWN != 0 || (d.flags & flags::RCR != 0 && d.flags & flags::CRAV == 0) {
        return Some(Completion::status(status::INVALID_FLAGS));
    }
    let sized = matches!(d.opcode, opcode::MEMMOVE | opcode::FILL | opcode::COMPARE | opcode::CRC32C);
    if !sized && d.opcode != opcode::NOOP {
        return Some(Completion::status(status::INVALID_OPCODE));
    }
    if sized && (d.size == 0 || d.size > MAX_TRANSFER) {
        return Some(Completion::status(status::INVALID_SIZE));
    }
    None
}

/// Runs `d`. Call [`validate`] first; `execute` re-checks and never panics on any input.
pub fn execute(d: &Descriptor, dma: &dyn DmaSpace) -> Completion {
    if let Some(bad) = validate(d) {
        return bad;
    }
    let size = d.size as usize;
    let done = |bytes: usize| Completion { status: status::SUCCESS, bytes_completed: bytes as u32, ..Default::default() };
    match d.opcode {
        opcode::NOOP => done(0),
        opcode::MEMMOVE => {
            let mut buf = vec![0u8; size];
            if let Err(f) = dma.read(d.src, &mut buf) {
                return fault(f);
            }
            match dma.write(d.dst, &buf) {
                Ok(()) => done(size),
                Err(f) => fault(f),
            }
        }
        opcode::FILL => {
            let mut buf = vec![0u8; size];
            fill_repeating(&mut buf, &d.src.to_le_bytes());
            match dma.write(d.dst, &buf) {
                Ok(()) => done(size),
                Err(f) => fault(f),
            }
        }
        opcode::COMPARE => {
            let mut a = vec![0u8; CHUNK.min(size)];
            let mut b = vec![0u8; CHUNK.min(size)];
            let mut off = 0usize;
            while off < size {
                let n = CHUNK.min(size - off);
                if let Err(f) = dma.read(d.src.wrapping_add(off as u64), &mut a[..n]) {
                    return fault(f);
                }
                if let Err(f) = dma.read(d.dst.wrapping_add(off as u64), &mut b[..n]) {
                    return fault(f);
                }
                // Equal chunks (the common case) are one memcmp; only a differing one is scanned.
                if let Some(i) = (a[..n] != b[..n]).then(|| a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y)).flatten() {
                    return Completion {
                        status: status::FALSE_PREDICATE,
                        result: 1,
                        bytes_completed: (off + i) as u32,
                        ..Default::default()
                    };
                }
                off += n;
            }
            done(size)
        }
        opcode::CRC32C => {
            let mut buf = vec![0u8; CHUNK.min(size)];
            let mut crc = !d.crc_seed;
            let mut off = 0usize;
            while off < size {
                let n = CHUNK.min(size - off);
                if let Err(f) = dma.read(d.src.wrapping_add(off as u64), &mut buf[..n]) {
                    return fault(f);
                }
                crc = crc32c_update(crc, &buf[..n]);
                off += n;
            }
            Completion { crc: !crc, ..done(size) }
        }
        _ => Completion::status(status::INVALID_OPCODE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::GuestRam;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn ram() -> GuestRam {
        GuestRam(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap())
    }

    fn desc(opcode: u8, src: u64, dst: u64, size: u32) -> Descriptor {
        Descriptor { opcode, src, dst, size, ..Default::default() }
    }

    #[test]
    fn crc32c_known_values() {
        assert_eq!(crc32c(0, b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(0, b""), 0);
        // Seeding continues a CRC.
        assert_eq!(crc32c(crc32c(0, b"1234"), b"56789"), 0xe306_9283);
        // The CRC32 instruction gives what the table gives, at every length and start.
        let data: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 200] {
                let d = &data[start..start + len];
                assert_eq!(crc32c_update(!0, d), crc32c_bytes(!0, d), "start {start} len {len}");
            }
        }
    }

    #[test]
    fn every_opcode() {
        let r = ram();
        r.write(0x1000, b"hello, siov world").unwrap();
        assert_eq!(execute(&desc(opcode::NOOP, 0, 0, 0), &r).status, status::SUCCESS);

        let c = execute(&desc(opcode::MEMMOVE, 0x1000, 0x2000, 17), &r);
        assert_eq!((c.status, c.bytes_completed), (status::SUCCESS, 17));
        let mut out = [0u8; 17];
        r.read(0x2000, &mut out).unwrap();
        assert_eq!(&out, b"hello, siov world");

        let c = execute(&desc(opcode::FILL, 0x0807_0605_0403_0201, 0x3000, 10), &r);
        assert_eq!(c.status, status::SUCCESS);
        let mut f = [0u8; 11];
        r.read(0x3000, &mut f).unwrap();
        assert_eq!(f, [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 0]);

        assert_eq!(execute(&desc(opcode::COMPARE, 0x1000, 0x2000, 17), &r).status, status::SUCCESS);
        r.write(0x2005, b"!").unwrap();
        let c = execute(&desc(opcode::COMPARE, 0x1000, 0x2000, 17), &r);
        assert_eq!((c.status, c.result, c.bytes_completed), (status::FALSE_PREDICATE, 1, 5));

        r.write(0x4000, b"123456789").unwrap();
        let c = execute(&desc(opcode::CRC32C, 0x4000, 0, 9), &r);
        assert_eq!((c.status, c.crc), (status::SUCCESS, 0xe306_9283));
    }

    #[test]
    fn memmove_overlap_and_large_compare() {
        let r = ram();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        r.write(0x10_0000, &data).unwrap();
        // Overlapping forward move.
        assert_eq!(execute(&desc(opcode::MEMMOVE, 0x10_0000, 0x10_0010, 200_000), &r).status, status::SUCCESS);
        let mut out = vec![0u8; 200_000];
        r.read(0x10_0010, &mut out).unwrap();
        assert_eq!(out, data);
        // Compare across chunk boundaries, difference in the third chunk.
        r.write(0x20_0000, &data).unwrap();
        r.write(0x30_0000, &data).unwrap();
        r.write(0x30_0000 + 150_000, &[0xaa]).unwrap();
        let c = execute(&desc(opcode::COMPARE, 0x20_0000, 0x30_0000, 200_000), &r);
        assert_eq!((c.status, c.bytes_completed), (status::FALSE_PREDICATE, 150_000));
    }

    #[test]
    fn malformed_descriptors_get_error_status() {
        let r = ram();
        assert_eq!(execute(&desc(0x7f, 0, 0, 1), &r).status, status::INVALID_OPCODE);
        assert_eq!(execute(&desc(opcode::MEMMOVE, 0, 0x100, 0), &r).status, status::INVALID_SIZE);
        assert_eq!(execute(&desc(opcode::MEMMOVE, 0, 0x100, MAX_TRANSFER + 1), &r).status, status::INVALID_SIZE);
        let mut d = desc(opcode::NOOP, 0, 0, 0);
        d.flags = 0x80_0000;
        assert_eq!(execute(&d, &r).status, status::INVALID_FLAGS);
        d.flags = flags::RCR; // record requested without a valid address
        assert_eq!(execute(&d, &r).status, status::INVALID_FLAGS);
    }

    #[test]
    fn out_of_range_addresses_fault_and_write_nothing() {
        let r = ram();
        let end = 4u64 << 20;
        let c = execute(&desc(opcode::MEMMOVE, end - 8, 0x1000, 16), &r);
        assert_eq!((c.status, c.fault_addr), (status::PAGE_FAULT, end - 8));
        let c = execute(&desc(opcode::FILL, 0xffff_ffff_ffff_ffff, end - 4, 8), &r);
        assert_eq!(c.status, status::PAGE_FAULT);
        assert_eq!(r.0.read_obj::<u32>(GuestAddress(end - 4)).unwrap(), 0, "no partial fill");
        for (s, d) in [(u64::MAX, 0), (0, u64::MAX), (u64::MAX - 3, u64::MAX - 3)] {
            assert_eq!(execute(&desc(opcode::COMPARE, s, d, 8), &r).status, status::PAGE_FAULT);
            assert_eq!(execute(&desc(opcode::CRC32C, s, d, 8), &r).status, if s == 0 { status::SUCCESS } else { status::PAGE_FAULT });
        }
    }

    #[test]
    fn a_fill_repeats_its_pattern_over_any_size() {
        let pattern = 0x0807_0605_0403_0201u64.to_le_bytes();
        for size in [1usize, 7, 8, 9, 15, 16, 17, 100, 4096, 4099, 65_537] {
            let mut buf = vec![0u8; size];
            fill_repeating(&mut buf, &pattern);
            assert!(buf.iter().enumerate().all(|(i, &b)| b == pattern[i % 8]), "size {size}");
        }
    }
}
