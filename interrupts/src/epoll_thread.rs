//! A thread that waits on an epoll set and hands each ready file descriptor's token to a
//! handler, until it is dropped. The one shape behind the router's overflow injector and the
//! software device's workers: both watch eventfds (vectors, doorbells) that are added and
//! removed while the thread runs.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use siovmm_seccomp::ThreadKind;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The token of the thread's own wake-up eventfd; no watched fd may use it.
const WAKE: u64 = u64::MAX;

/// Changes the set of fds an [`EpollThread`] waits on. The thread's handler gets one, so it
/// can change the set itself (the router's commits move vectors off its overflow set).
#[derive(Clone)]
pub struct Watcher(Arc<Epoll>);

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Watcher").field(&self.0.as_raw_fd()).finish()
    }
}

impl Watcher {
    /// Watches `fd` for input, reported as `token` (any value but `u64::MAX`).
    pub fn watch(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        if token == WAKE {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "epoll token u64::MAX is the thread's own"));
        }
        self.0.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
    }

    /// Stops watching `fd`.
    pub fn unwatch(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.0.ctl(ControlOperation::Delete, fd.as_raw_fd(), EpollEvent::default())
    }
}

/// The thread and its epoll set. Dropping it stops and joins the thread (after the handler
/// call in progress, if any, returns).
pub struct EpollThread {
    watcher: Watcher,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EpollThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpollThread").field("epoll", &self.watcher).finish_non_exhaustive()
    }
}

impl EpollThread {
    /// Starts thread `name` under `kind`'s seccomp filter, calling `on_ready(watcher, token)`
    /// for each watched fd that is readable.
    pub fn spawn(name: String, kind: ThreadKind, mut on_ready: impl FnMut(&Watcher, u64) + Send + 'static) -> io::Result<Self> {
        Self::spawn_requeueing(name, kind, move |w, token, _| {
            on_ready(w, token);
            false
        })
    }

    /// [`EpollThread::spawn`] with a handler that may ask to be called again for the same
    /// token: `on_ready(watcher, token, signalled)` returning true puts the token at the back
    /// of the thread's own ready list, served once per turn after the fds epoll reports
    /// (polled without blocking while the list has tokens). `signalled` says whether epoll
    /// reported the token (its fd has a signal to consume) or the list did (none). What a
    /// handler that rings its own eventfd for another turn would get, without the three
    /// system calls of the ring, the wait and the read: the software device's workers use it
    /// for a queue with more work than one pass.
    pub fn spawn_requeueing(
        name: String,
        kind: ThreadKind,
        mut on_ready: impl FnMut(&Watcher, u64, bool) -> bool + Send + 'static,
    ) -> io::Result<Self> {
        let watcher = Watcher(Arc::new(Epoll::new()?));
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        watcher.0.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (w, st) = (watcher.clone(), stop.clone());
        let thread = siovmm_seccomp::spawn(kind, name, move || {
            let mut events = vec![EpollEvent::default(); 64];
            let mut again: VecDeque<u64> = VecDeque::new();
            while !st.load(Ordering::Acquire) {
                let timeout = if again.is_empty() { -1 } else { 0 };
                let n = match w.0.wait(timeout, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for token in events[..n].iter().map(EpollEvent::data).filter(|&t| t != WAKE) {
                    if on_ready(&w, token, true) && !again.contains(&token) {
                        again.push_back(token);
                    }
                }
                // One turn of the tokens waiting, then epoll again.
                for _ in 0..again.len() {
                    let Some(token) = again.pop_front() else { break };
                    if on_ready(&w, token, false) {
                        again.push_back(token);
                    }
                }
            }
        })?;
        Ok(Self { watcher, wake, stop, thread: Some(thread) })
    }

    /// Changes the set from any thread.
    pub fn watcher(&self) -> &Watcher {
        &self.watcher
    }

    /// See [`Watcher::watch`].
    pub fn watch(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        self.watcher.watch(fd, token)
    }

    /// See [`Watcher::unwatch`].
    pub fn unwatch(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.watcher.unwatch(fd)
    }
}

impl Drop for EpollThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // If the wake-up cannot be written the thread may sleep on: joining it would hang.
        if self.wake.write(1).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn ready_fds_reach_the_handler_by_token_until_unwatched_and_drop_joins() {
        let (a, b) = (EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let fds = [(7, a.try_clone().unwrap()), (9, b.try_clone().unwrap())];
        let (tx, rx) = mpsc::channel();
        // The handler consumes the signal, as the real ones do (epoll is level-triggered).
        let t = EpollThread::spawn("epoll-test".into(), ThreadKind::DeviceWorker, move |_, token| {
            let fd = &fds.iter().find(|(t, _)| *t == token).unwrap().1;
            tx.send((token, fd.read().unwrap())).unwrap();
        })
        .unwrap();
        t.watch(&a, 7).unwrap();
        t.watch(&b, 9).unwrap();
        assert_eq!(t.watch(&a, WAKE).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        b.write(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok((9, 3)));
        t.unwatch(&b).unwrap();
        b.write(1).unwrap();
        a.write(2).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok((7, 2)));
        drop(t);
        // Joined: its handler (and so the sender) went with it, and b, unwatched, was never read.
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Err(mpsc::RecvTimeoutError::Disconnected));
        assert_eq!(b.read().unwrap(), 1);
    }

    #[test]
    fn a_token_asked_again_is_served_in_turn_with_the_others_without_a_signal() {
        let (a, b) = (EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (tx, rx) = mpsc::channel();
        let mut left = 3;
        let consume = a.try_clone().unwrap();
        // Token 1 wants three calls in all, consuming its signal when it has one.
        let t = EpollThread::spawn_requeueing("epoll-again".into(), ThreadKind::DeviceWorker, move |_, token, signalled| {
            if signalled {
                consume.read().unwrap();
            }
            tx.send((token, signalled)).unwrap();
            if token == 1 {
                left -= 1;
                left > 0
            } else {
                false
            }
        })
        .unwrap();
        t.watch(&a, 1).unwrap();
        t.watch(&b, 2).unwrap();
        a.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok((1, true)));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok((1, false)), "asked again: called with no signal");
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok((1, false)));
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "done: not called again");
        drop(t);
    }
}
