//! A boot image (kernel or initramfs) read through a memory mapping, for linux-loader.
//!
//! linux-loader copies each ELF segment (or the bzImage body, or the initramfs) from a
//! `ReadVolatile` source into guest RAM. With a plain `File` that copy is `read(2)`: the host
//! kernel copies from its page cache into guest RAM that has never been touched, so one thread
//! both zeroes every fresh page and copies into it. Through a mapping, the copy is ours, and a
//! large one is split across threads: zeroing and copying a 60 MB vmlinux then runs on every
//! host CPU at once. File pages are read in (populated) per copy, not at mapping time, so an
//! oversized image is refused on its size before anything is read.
//!
//! Measured in the nested sandbox on the 66 MB vmlinux (docs/boot-performance.md): `read(2)` into
//! fresh memory 0.70 s; populating a mapping of the file 0.04 s; zeroing fresh memory alone
//! 0.33-0.45 s; the copy itself 0.04-0.06 s.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::Error as VolatileError;
use vm_memory::{ReadVolatile, VolatileSlice};

/// Copies smaller than this stay on the calling thread: a thread costs more than it saves.
const PARALLEL_MIN: usize = 4 << 20;
/// At most this many threads per copy.
const MAX_THREADS: usize = 8;

/// A read-only, private mapping of a whole file, with a read position.
#[derive(Debug)]
pub struct MappedImage {
    ptr: *const u8,
    len: usize,
    pos: u64,
}

// SAFETY: the mapping is read-only and owned by this value; it is only read.
unsafe impl Send for MappedImage {}

impl MappedImage {
    /// Maps all of `file` (nothing is read yet: a caller can check the size first). An empty
    /// file maps to an empty image.
    pub fn new(file: &File) -> io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len()).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Ok(Self { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0, pos: 0 });
        }
        // SAFETY: a new private read-only mapping of an open file; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr as *const u8, len, pos: 0 })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives. Another process
        // may rewrite the file meanwhile: bytes read are then stale or new, and linux-loader
        // validates what it reads. (Truncating it would make reads past the new end raise
        // SIGBUS, as with any mapped file; images stay mapped only while they are copied.)
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes from the read position on.
    fn rest(&self) -> &[u8] {
        let start = usize::try_from(self.pos).unwrap_or(usize::MAX).min(self.len);
        &self.bytes()[start..]
    }
}

impl Drop for MappedImage {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping created in `new`, which nothing uses any more.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

impl Read for MappedImage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = self.rest();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for MappedImage {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => (self.len as u64).checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the image"))?;
        self.pos = target;
        Ok(target)
    }
}

/// Reads the file pages behind `bytes` into the mapping in one call, so the copy does not fault
/// page by page. Best effort: without MADV_POPULATE_READ (Linux < 5.14) the copy faults instead.
fn populate(bytes: &[u8]) {
    let start = (bytes.as_ptr() as usize) & !4095;
    let len = bytes.as_ptr() as usize + bytes.len() - start;
    // SAFETY: advice on pages of our own read-only mapping (rounded down to its page); it
    // changes no contents.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_POPULATE_READ) };
}

/// How many threads to copy `len` bytes with.
fn threads_for(len: usize) -> usize {
    if len < PARALLEL_MIN {
        return 1;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.min(MAX_THREADS).min(len / (PARALLEL_MIN / 2)).max(1)
}

/// Copies `src` to `dst` (`src.len()` bytes), in `threads` page-aligned pieces at once.
///
/// SAFETY: `dst` must be valid for writes of `src.len()` bytes, not overlap `src`, and not be
/// accessed by anything else during the call.
unsafe fn copy_split(dst: *mut u8, src: &[u8], threads: usize) {
    let len = src.len();
    if threads <= 1 {
        // SAFETY: by the function's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len) };
        return;
    }
    let piece = len.div_ceil(threads).next_multiple_of(4096);
    let dst = dst as usize;
    let copy = |to: usize, chunk: &[u8]| {
        // SAFETY: the chunks are disjoint parts of `src`, and `to` is the matching disjoint
        // part of `dst`, which the caller guarantees is writable and unshared.
        unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), to as *mut u8, chunk.len()) };
    };
    std::thread::scope(|s| {
        for (i, chunk) in src.chunks(piece).enumerate() {
            let to = dst + i * piece;
            // A thread that cannot be created (process limits) costs speed, not the copy.
            if std::thread::Builder::new().spawn_scoped(s, move || copy(to, chunk)).is_err() {
                copy(to, chunk);
            }
        }
    });
}

impl ReadVolatile for MappedImage {
    fn read_volatile<B: BitmapSlice>(&mut self, buf: &mut VolatileSlice<B>) -> Result<usize, VolatileError> {
        let rest = self.rest();
        let src = &rest[..rest.len().min(buf.len())];
        let n = src.len();
        if n == 0 {
            return Ok(0);
        }
        populate(src);
        let dst = buf.ptr_guard_mut().as_ptr();
        // SAFETY: `dst` covers `buf.len() >= n` writable bytes of guest memory, which cannot
        // overlap our read-only file mapping; the guest is not running while images load.
        unsafe { copy_split(dst, src, threads_for(n)) };
        buf.bitmap().mark_dirty(0, n);
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn file_with(data: &[u8]) -> File {
        let mut f = tempfile();
        f.write_all(data).unwrap();
        f.rewind().unwrap();
        f
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!("siovmm-image-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn reads_and_seeks_like_a_file() {
        let data = pattern(10_000);
        let mut img = MappedImage::new(&file_with(&data)).unwrap();
        let mut head = [0u8; 16];
        img.read_exact(&mut head).unwrap();
        assert_eq!(head, data[..16]);
        assert_eq!(img.seek(SeekFrom::End(-4)).unwrap(), 9_996);
        let mut tail = Vec::new();
        img.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, data[9_996..]);
        assert!(img.seek(SeekFrom::Current(-20_000)).is_err());
        // Past the end reads nothing, as with a file.
        img.seek(SeekFrom::Start(50_000)).unwrap();
        assert_eq!(img.read(&mut head).unwrap(), 0);
    }

    #[test]
    fn copies_into_guest_memory_small_and_split() {
        // 20 MiB crosses PARALLEL_MIN, so the copy is split across threads where there are CPUs.
        for len in [1usize, 4095, 3 << 20, 20 << 20] {
            let data = pattern(len);
            let mut img = MappedImage::new(&file_with(&data)).unwrap();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
            img.seek(SeekFrom::Start(0)).unwrap();
            mem.read_exact_volatile_from(GuestAddress(0x1000), &mut img, len).unwrap();
            let mut back = vec![0u8; len];
            mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
            assert!(back == data, "len {len}");
            // The byte after the image is untouched.
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000 + len as u64)).unwrap(), 0);
        }
    }

    #[test]
    fn short_image_is_a_partial_read_not_a_panic() {
        let mut img = MappedImage::new(&file_with(&pattern(100))).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(mem.read_exact_volatile_from(GuestAddress(0), &mut img, 200).is_err());
        let empty = MappedImage::new(&file_with(&[])).unwrap();
        assert_eq!(empty.rest().len(), 0);
    }

    #[test]
    fn split_sizes_cover_everything() {
        assert_eq!(threads_for(1), 1);
        assert_eq!(threads_for(PARALLEL_MIN - 1), 1);
        assert!(threads_for(64 << 20) >= 1 && threads_for(64 << 20) <= MAX_THREADS);
        // Uneven lengths split into page-aligned pieces, the last one short.
        for threads in [2, 3, 8] {
            let src = pattern((5 << 20) + 123);
            let mut dst = vec![0u8; src.len()];
            // SAFETY: `dst` is a separate buffer of the same length, used by nothing else.
            unsafe { copy_split(dst.as_mut_ptr(), &src, threads) };
            assert!(dst == src, "{threads} threads");
        }
    }
}
