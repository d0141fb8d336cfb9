//! What [`crate::Mode::On`] does with a system call outside a thread's list: the filter returns
//! `SECCOMP_RET_TRAP`, so the kernel skips the call and raises SIGSYS in the thread; the handler
//! writes one line to stderr naming the thread kind and the call, then makes the same call
//! again with the same arguments. The filter traps it again, now with SIGSYS blocked (it is
//! being handled), and for a blocked forced signal the kernel restores the default action
//! (kernel/signal.c `force_sig_info_to_task`): the process dies of SIGSYS, as it would under
//! `SECCOMP_RET_KILL_PROCESS`, but the user learns which call to look at.
//!
//! Opening a file is the exception: `open` and `openat` outside a list fail with EACCES
//! (the handler sets the call's return value) and the thread goes on, after one line naming
//! the path. glibc opens files behind the caller's back, and handles failure: its malloc reads
//! `/proc/sys/vm/overcommit_memory` the first time any thread's arena heap shrinks
//! (`check_may_shrink_heap`, sysdeps/unix/sysv/linux/malloc-sysdep.h; on failure it assumes
//! not "2" and releases memory with madvise instead). A guest with 1,024 ADIs made a vCPU
//! thread and the overflow injector shrink theirs, and killing the VM for it would be wrong;
//! the file stays unopened either way.
//!
//! The handler only reads a thread-local byte (and, for an open, the path the caller passed),
//! formats into a stack buffer and calls `write`, which every list allows: nothing in it
//! allocates or locks.

use std::cell::Cell;

use crate::ThreadKind;

thread_local! {
    /// The calling thread's kind, as [`ThreadKind::index`]; `u8::MAX` before it entered one.
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

pub(crate) fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(kind.index()));
}

/// Installs the SIGSYS handler for the whole process.
pub(crate) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler is an `extern "C"` function of the
    // SA_SIGINFO shape and stays valid for the process's life.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Byte offset of `si_syscall` in a SIGSYS `siginfo_t` (include/uapi/asm-generic/siginfo.h:
/// three ints, padding to 16, then `_sigsys { void *_call_addr; int _syscall; ... }`).
const SI_SYSCALL: usize = 24;

/// The most bytes of a refused open's path that are reported.
const PATH_SHOWN: usize = 96;

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGSYS siginfo, which holds `_syscall` at SI_SYSCALL.
    let call = unsafe { info.cast::<u8>().add(SI_SYSCALL).cast::<i32>().read_unaligned() };
    let kind = KIND.try_with(Cell::get).unwrap_or(u8::MAX);
    let kind = ThreadKind::ALL.get(usize::from(kind)).map_or("unfiltered", |k| k.name());
    let path_register = match i64::from(call) {
        libc::SYS_open => Some(libc::REG_RDI),
        libc::SYS_openat => Some(libc::REG_RSI),
        _ => None,
    };
    if let Some(register) = path_register {
        // SAFETY: `context` is the ucontext the kernel passed with SA_SIGINFO; the registers
        // saved there are restored when the handler returns, RAX as the call's result.
        let regs = unsafe { &mut (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        let mut line = Line::default();
        line.push(b"seccomp: a ");
        line.push(kind.as_bytes());
        line.push(b" thread tried to open ");
        // SAFETY: the path argument of the open the thread itself was making: a string its
        // caller passed to the kernel, read up to its NUL or PATH_SHOWN bytes.
        unsafe { line.c_string(regs[register as usize] as *const u8, PATH_SHOWN) };
        line.push(b": refused with EACCES (docs/seccomp.md)\n");
        // SAFETY: writing our stack buffer to stderr.
        unsafe { libc::write(2, line.bytes.as_ptr().cast(), line.len) };
        regs[libc::REG_RAX as usize] = -i64::from(libc::EACCES);
        return;
    }
    let mut line = Line::default();
    line.push(b"seccomp: a ");
    line.push(kind.as_bytes());
    line.push(b" thread made system call ");
    line.number(call);
    line.push(b", which its filter does not allow: stopping (docs/seccomp.md)\n");
    // SAFETY: writing our stack buffer to stderr; `context` is the ucontext the kernel passed
    // with SA_SIGINFO, whose saved registers hold the trapped call's arguments.
    unsafe {
        libc::write(2, line.bytes.as_ptr().cast(), line.len);
        let regs = &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        let arg = |r: libc::c_int| regs[r as usize];
        libc::syscall(
            libc::c_long::from(call),
            arg(libc::REG_RDI),
            arg(libc::REG_RSI),
            arg(libc::REG_RDX),
            arg(libc::REG_R10),
            arg(libc::REG_R8),
            arg(libc::REG_R9),
        );
        // Not reached: the repeated call is trapped with SIGSYS blocked, which kills.
        libc::abort();
    }
}

/// A line built without allocating.
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self { bytes: [0; 256], len: 0 }
    }
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    /// Appends the NUL-terminated string at `s`, at most `max` bytes of it.
    ///
    /// # Safety
    /// `s` is null or points at a readable string that ends with NUL or runs at least `max`
    /// bytes.
    unsafe fn c_string(&mut self, s: *const u8, max: usize) {
        if s.is_null() {
            self.push(b"(null)");
            return;
        }
        for i in 0..max {
            // SAFETY: within the string, by the caller's promise.
            let b = unsafe { s.add(i).read() };
            if b == 0 {
                return;
            }
            self.push(&[b]);
        }
        self.push(b"...");
    }

    fn number(&mut self, n: i32) {
        let mut digits = [0u8; 11];
        let mut i = digits.len();
        let mut v = i64::from(n).unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_format_numbers_and_stop_at_their_end() {
        let mut l = Line::default();
        l.push(b"call ");
        l.number(0);
        l.push(b" ");
        l.number(435);
        l.push(b" ");
        l.number(-7);
        assert_eq!(&l.bytes[..l.len], b"call 0 435 -7");
        for _ in 0..100 {
            l.push(b"xyz");
        }
        assert_eq!(l.len, 256);
    }

    #[test]
    fn paths_are_cut_at_their_nul_or_the_limit() {
        let mut l = Line::default();
        // SAFETY: NUL-terminated literals, and a null pointer.
        unsafe {
            l.c_string(c"/proc/sys/vm/overcommit_memory".as_ptr().cast(), PATH_SHOWN);
            l.push(b" ");
            l.c_string(c"abcdef".as_ptr().cast(), 3);
            l.push(b" ");
            l.c_string(std::ptr::null(), 3);
        }
        assert_eq!(&l.bytes[..l.len], b"/proc/sys/vm/overcommit_memory abc... (null)");
    }
}
