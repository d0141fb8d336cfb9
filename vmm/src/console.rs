//! The guest console on siovmm's terminal: stdin feeds COM1, COM1 writes stdout.
//!
//! On a terminal, input is switched to non-canonical, no-echo mode so keystrokes reach the
//! guest one by one and the guest does the echoing; ISIG stays on, so Ctrl-C still stops
//! siovmm. The previous mode is restored when the guard drops.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::serial::{InputReady, SerialDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

/// Restores the terminal mode on drop.
#[derive(Debug)]
pub struct TerminalGuard {
    saved: Option<libc::termios>,
}

impl TerminalGuard {
    /// Switches stdin to raw-ish mode if it is a terminal.
    pub fn new() -> Self {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer to a termios.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Self { saved: None };
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: valid fd and termios.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        Self { saved: Some(saved) }
    }
}

impl Default for TerminalGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restoring a termios obtained from tcgetattr on the same fd.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
    }
}

/// Moves host input into the UART as fast as the guest drains it.
#[derive(Debug)]
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    ready: Arc<InputReady>,
    pending: VecDeque<u8>,
    stdin_open: bool,
}

impl ConsoleInput {
    /// Input for `serial`; `ready` fires when its FIFO empties.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, ready: Arc<InputReady>) -> Self {
        Self { serial, ready, pending: VecDeque::new(), stdin_open: true }
    }

    fn flush(&mut self) {
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            let n = lock(&self.serial).enqueue_input(a);
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
        }
    }
}

/// Host bytes buffered while the guest is not reading; beyond this, input is dropped.
const MAX_PENDING: usize = 64 * 1024;

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        // Registration fails when stdin is a regular file (epoll refuses those); then the guest
        // simply gets no input.
        if ops.add(Events::new(&stdin, EventSet::IN)).is_err() {
            self.stdin_open = false;
        }
        let _ = ops.add(Events::new(&self.ready.0, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.ready.0.as_raw_fd() {
            let _ = self.ready.0.read();
            self.flush();
            return;
        }
        if events.fd() == libc::STDIN_FILENO {
            let mut buf = [0u8; 4096];
            // SAFETY: reading into a local buffer of the given length.
            let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                // Under a flood the excess is dropped, like a UART overrun.
                let room = MAX_PENDING.saturating_sub(self.pending.len());
                self.pending.extend(buf.iter().take((n as usize).min(room)));
                self.flush();
            } else if n == 0 || events.event_set().contains(EventSet::HANG_UP) {
                // EOF: stop watching stdin; the guest keeps running.
                let stdin = std::io::stdin();
                let _ = ops.remove(Events::new(&stdin, EventSet::IN));
                self.stdin_open = false;
            }
        }
    }
}
