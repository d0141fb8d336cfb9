//! Where the guest's console output goes on the host: through a filter that keeps the guest
//! from driving the host terminal, and a queue drained by a thread of its own, so that a host
//! side that stops reading (a full pipe, a suspended terminal) never stalls a vCPU.
//!
//! The filter passes text: printable ASCII, tab, newline, carriage return and backspace,
//! UTF-8 sequences of printable characters, and colour/style sequences (`ESC [ params m`,
//! SGR, which systemd and the kernel's own messages use). Everything else a terminal would act
//! on — other escape and control sequences (window titles, cursor moves, clearing the screen,
//! OSC 52 clipboard writes, the C1 controls and DEL) — is shown as text instead: `^[`, `^G`,
//! `\x9b`. The queue holds [`QUEUE_BYTES`]; past that, output is dropped and counted, as a UART
//! with nobody listening loses its bytes.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Console bytes held while the host side is slow; more are dropped.
pub const QUEUE_BYTES: usize = 1 << 20;
/// How long the queue may take to drain when the VM goes.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest parameter list an SGR sequence may have before it is shown as text.
const MAX_SGR_PARAMS: usize = 32;

/// Turns guest console bytes into bytes that are safe on a terminal.
#[derive(Debug, Default)]
pub struct TerminalFilter {
    state: FilterState,
}

#[derive(Debug, Default)]
enum FilterState {
    #[default]
    Text,
    /// After ESC.
    Escape,
    /// After `ESC [`, with the parameter bytes so far.
    Csi(Vec<u8>),
    /// Inside a UTF-8 sequence: the bytes so far and how many it needs in all.
    Utf8(Vec<u8>, usize),
}

impl TerminalFilter {
    /// Filters `input`, appending what may reach the terminal to `out`.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.push(b, out);
        }
    }

    fn push(&mut self, b: u8, out: &mut Vec<u8>) {
        match std::mem::take(&mut self.state) {
            FilterState::Text => self.text(b, out),
            FilterState::Escape if b == b'[' => self.state = FilterState::Csi(Vec::new()),
            FilterState::Escape => {
                out.extend_from_slice(b"^[");
                self.text(b, out);
            }
            FilterState::Csi(mut params) => {
                if b == b'm' {
                    out.extend_from_slice(b"\x1b[");
                    out.extend_from_slice(&params);
                    out.push(b'm');
                } else if (b.is_ascii_digit() || b == b';') && params.len() < MAX_SGR_PARAMS {
                    params.push(b);
                    self.state = FilterState::Csi(params);
                } else {
                    // Not colour: the whole sequence as text.
                    out.extend_from_slice(b"^[[");
                    out.extend_from_slice(&params);
                    self.text(b, out);
                }
            }
            FilterState::Utf8(mut bytes, need) => {
                if b & 0xc0 != 0x80 {
                    show_bytes(&bytes, out);
                    self.text(b, out);
                    return;
                }
                bytes.push(b);
                if bytes.len() < need {
                    self.state = FilterState::Utf8(bytes, need);
                    return;
                }
                match std::str::from_utf8(&bytes).ok().and_then(|s| s.chars().next()) {
                    // U+0080..U+009F are the C1 controls in UTF-8 clothing.
                    Some(c) if !c.is_control() => out.extend_from_slice(&bytes),
                    _ => show_bytes(&bytes, out),
                }
            }
        }
    }

    /// `b` in the text state.
    fn text(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            0x1b => self.state = FilterState::Escape,
            b'\t' | b'\n' | b'\r' | 0x08 | 0x20..=0x7e => out.push(b),
            0x00..=0x1f => out.extend_from_slice(&[b'^', b + 0x40]),
            0x7f => out.extend_from_slice(b"^?"),
            0xc2..=0xdf => self.state = FilterState::Utf8(vec![b], 2),
            0xe0..=0xef => self.state = FilterState::Utf8(vec![b], 3),
            0xf0..=0xf4 => self.state = FilterState::Utf8(vec![b], 4),
            _ => show_bytes(&[b], out),
        }
    }
}

/// Blocks every blockable signal in the calling thread: process signals (SIGINT, SIGTERM, ...)
/// belong to the VMM's own watcher, which a thread started before it would otherwise take them
/// from, with their default action.
fn block_signals() {
    // SAFETY: a sigset_t filled by sigfillset before use.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t; the old mask is not wanted.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// Bytes that are not text, shown as `\xNN`.
fn show_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    for b in bytes {
        out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
    }
}

struct Queue {
    bytes: VecDeque<u8>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when bytes arrive or the writer closes (to the drain thread), and when the
    /// queue empties (to the closing writer).
    changed: Condvar,
    dropped: AtomicU64,
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Queue> {
    shared.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The guest console's host side: filters, queues, and writes on its own thread.
pub struct ConsoleOutput {
    filter: TerminalFilter,
    /// What the filter made of the current write (kept: the UART writes a byte at a time).
    filtered: Vec<u8>,
    shared: Arc<Shared>,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOutput").field("dropped", &self.dropped()).finish_non_exhaustive()
    }
}

impl ConsoleOutput {
    /// Starts the thread writing to `out`.
    pub fn spawn(mut out: impl Write + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { bytes: VecDeque::new(), closed: false }),
            changed: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let drain = siovmm_seccomp::spawn(siovmm_seccomp::ThreadKind::Console, "console-out".into(), move || {
            block_signals();
            let mut chunk = Vec::new();
            loop {
                let mut q = lock(&sh);
                while q.bytes.is_empty() && !q.closed {
                    q = sh.changed.wait(q).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if q.bytes.is_empty() {
                    return;
                }
                chunk.clear();
                chunk.extend(q.bytes.drain(..));
                sh.changed.notify_all();
                drop(q);
                // A host side that went away (closed stdout) loses the output; the guest
                // goes on.
                if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
                    sh.dropped.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        })?;
        Ok(Self { filter: TerminalFilter::default(), filtered: Vec::new(), shared, drain: Some(drain) })
    }

    /// Bytes dropped so far (queue full, or the host side refused them).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Write for ConsoleOutput {
    /// Never blocks on the host side: what does not fit in the queue is dropped and counted.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let safe = &mut self.filtered;
        safe.clear();
        self.filter.filter(buf, safe);
        let mut q = lock(&self.shared);
        let room = QUEUE_BYTES.saturating_sub(q.bytes.len());
        let taken = safe.len().min(room);
        q.bytes.extend(&safe[..taken]);
        drop(q);
        if taken < safe.len() {
            self.shared.dropped.fetch_add((safe.len() - taken) as u64, Ordering::Relaxed);
        }
        self.shared.changed.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleOutput {
    /// Lets the queue drain for up to [`DRAIN_TIMEOUT`], then leaves the thread behind (a
    /// host side that never reads must not keep siovmm from exiting).
    fn drop(&mut self) {
        let mut q = lock(&self.shared);
        q.closed = true;
        self.shared.changed.notify_all();
        let (q, waited) = self
            .shared
            .changed
            .wait_timeout_while(q, DRAIN_TIMEOUT, |q| !q.bytes.is_empty())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let drained = !waited.timed_out();
        drop(q);
        if drained {
            if let Some(t) = self.drain.take() {
                // The thread has taken the last bytes; this waits for their write only.
                let _ = t.join();
            }
        }
        let dropped = self.dropped();
        if dropped > 0 || !drained {
            log::warn!("guest console: {dropped} bytes dropped (the host side did not take them in time)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filtered(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        TerminalFilter::default().filter(input, &mut out);
        out
    }

    #[test]
    fn text_and_colour_pass_control_sequences_become_text() {
        assert_eq!(filtered(b"login: \tok\r\n\x08"), b"login: \tok\r\n\x08");
        assert_eq!(filtered("[ \x1b[0;32m OK \x1b[0m] é ✓ 🦀".as_bytes()), "[ \x1b[0;32m OK \x1b[0m] é ✓ 🦀".as_bytes());
        // A window title, clearing the screen, a cursor move, a clipboard write, a bell.
        assert_eq!(filtered(b"\x1b]0;pwned\x07"), b"^[]0;pwned^G");
        assert_eq!(filtered(b"\x1b[2J\x1b[10;1H"), b"^[[2J^[[10;1H");
        assert_eq!(filtered(b"\x1b]52;c;ZXZpbA==\x1b\\"), b"^[]52;c;ZXZpbA==^[\\");
        // C1 controls, alone or UTF-8 encoded, DEL, and bytes that are not UTF-8.
        assert_eq!(filtered(b"\x9b2J"), b"\\x9b2J");
        assert_eq!(filtered(b"\xc2\x9b2J"), b"\\xc2\\x9b2J");
        assert_eq!(filtered(b"\x7f\xff\xe2\x9cA"), b"^?\\xff\\xe2\\x9cA");
        // An over-long SGR is not let through whole.
        let long = [b"\x1b[".as_slice(), &[b'1'; 40], b"m"].concat();
        assert!(!filtered(&long).contains(&0x1b));
    }

    #[test]
    fn sequences_split_across_writes_are_filtered_the_same() {
        let mut f = TerminalFilter::default();
        let mut out = Vec::new();
        for b in b"\x1b[1mA\x1b]2;x\x07" {
            f.filter(&[*b], &mut out);
        }
        assert_eq!(out, b"\x1b[1mA^[]2;x^G");
    }

    /// A host side that takes nothing until released.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);
    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.0;
            let _open = cv.wait_while(open.lock().unwrap(), |open| !*open).unwrap();
            self.1.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_host_side_that_stops_reading_loses_bytes_but_never_blocks_the_writer() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut out = ConsoleOutput::spawn(Stuck(gate.clone(), got.clone())).unwrap();
        // Three times the queue, written while the host side takes nothing: every write returns.
        for _ in 0..3 * QUEUE_BYTES / 4096 {
            assert_eq!(out.write(&[b'x'; 4096]).unwrap(), 4096);
        }
        let dropped = out.dropped();
        // At most the queue and the one chunk the thread took before it stuck were kept.
        assert!(dropped >= QUEUE_BYTES as u64, "{dropped} bytes dropped");
        // Released, it gets what the queue held, then later output in order.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !lock(&out.shared).bytes.is_empty() {
            assert!(std::time::Instant::now() < deadline, "the queue drains once the host side reads");
            std::thread::sleep(Duration::from_millis(1));
        }
        out.write_all(b"end\n").unwrap();
        drop(out);
        let got = got.lock().unwrap();
        assert_eq!(got.len() as u64 + dropped, (3 * QUEUE_BYTES + 4) as u64);
        assert!(got.ends_with(b"xend\n"));
    }
}
