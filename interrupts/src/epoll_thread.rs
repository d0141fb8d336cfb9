//! A thread that waits on an epoll set and hands each ready file descriptor's token to a
//! handler, until it is dropped. The one shape behind the router's overflow injector and the
//! software device's workers: both watch eventfds (vectors, doorbells) that are added and
//! removed while the thread runs.

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
        let watcher = Watcher(Arc::new(Epoll::new()?));
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        watcher.0.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (w, st) = (watcher.clone(), stop.clone());
        let thread = siovmm_seccomp::spawn(kind, name, move || {
            let mut events = vec![EpollEvent::default(); 64];
            while !st.load(Ordering::Acquire) {
                let n = match w.0.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for token in events[..n].iter().map(EpollEvent::data).filter(|&t| t != WAKE) {
                    on_ready(&w, token);
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
}
