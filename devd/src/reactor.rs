//! Every ADI socket of the daemon served by a few threads instead of one thread per ADI:
//! thousands of ADIs must not cost thousands of threads (issue 11; issue 12 wants 10,000 per
//! host).
//!
//! One epoll set holds every ADI's listening socket, every client connection and every
//! refused connection, each registered one-shot (`EPOLLONESHOT`): an event wakes exactly one
//! server thread, which takes that socket's state out of the table, does one step (accept one
//! client, or read and answer one request), puts the state back and re-arms the socket. So no
//! two threads ever work on one ADI, and a busy ADI cannot starve the others: each gets one
//! request per wake-up, in the order epoll reports them.
//!
//! An ADI serves one client at a time: while it has one, its listening socket is closed (a
//! client connecting meanwhile is refused, ECONNREFUSED), and when the client leaves the
//! socket is bound again. A taken ADI thus costs the daemon one descriptor, its connection,
//! not two: at 10,000 ADIs in use that is the difference between fitting a 20,000 open-file
//! limit and not (issue 12). A client the device or its VM's limits cannot serve gets a
//! connection of its own that answers every request with the reason's errno, and the ADI goes
//! on listening.
//!
//! A step reads only when the socket is readable, but a message may arrive in parts: a read
//! (or a reply the client does not take) blocks for at most [`MESSAGE_TIMEOUT`], after which
//! the connection ends. A client that stalls mid-message thus holds one server thread for at
//! most that long, once per connection; the others keep serving.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use siovmm_vfio::siov::{AdiId, SiovDevice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::adi::{self, AdiBackend};
use crate::pool::{self, Pool};
use crate::server::{self, DeviceShape};

/// How long a step may wait for the rest of a message, or for a client to take a reply.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(1);

/// Tokens of refused connections start here (below it: ADI numbers).
const REFUSED: u64 = 1 << 32;

/// Where an ADI is.
enum AdiState {
    /// Waiting for a client (its listening socket armed).
    Listening,
    /// Serving one (the connection armed).
    /// (Boxed: a free ADI's entry stays small, and 10,000 of them are.)
    Serving { stream: UnixStream, backend: Box<AdiBackend>, pid: i32 },
}

/// An ADI's socket and where it is.
struct Adi {
    id: AdiId,
    /// Where its socket is bound.
    path: PathBuf,
    /// Its listening socket while it has no client (`None` while it has one, or if binding
    /// it again failed).
    listener: Option<UnixListener>,
    state: AdiState,
}

/// Something the epoll set reports on.
enum Entry {
    Adi(Adi),
    Refused { stream: UnixStream, errno: i32 },
}

/// What every server thread shares.
struct Shared {
    epoll: Epoll,
    /// By token; an entry is out of the table while a thread works on it.
    entries: Mutex<HashMap<u64, Entry>>,
    /// The last token given to a refused connection.
    last_refused: AtomicU64,
    device: Arc<dyn SiovDevice>,
    pool: Arc<Pool>,
    vectors: u16,
    shape: DeviceShape,
}

/// The server threads of one daemon.
#[derive(Debug)]
pub struct Reactor {
    threads: Vec<std::thread::JoinHandle<std::io::Error>>,
}

impl Reactor {
    /// Serves `listeners` (ADI, its bound socket) with `threads` threads. Each client gets its
    /// ADI opened on `device` with `vectors` IMS entries, within `pool`'s limits.
    pub fn start(
        listeners: Vec<(AdiId, UnixListener)>,
        device: Arc<dyn SiovDevice>,
        vectors: u16,
        pool: Arc<Pool>,
        threads: usize,
    ) -> std::io::Result<Self> {
        let (regions, irqs) = adi::layout(vectors);
        let shared = Arc::new(Shared {
            epoll: Epoll::new()?,
            entries: Mutex::new(HashMap::new()),
            last_refused: AtomicU64::new(REFUSED),
            device,
            pool,
            vectors,
            shape: DeviceShape { regions, irqs },
        });
        for (id, listener) in listeners {
            let path = listener
                .local_addr()?
                .as_pathname()
                .map(PathBuf::from)
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("ADI {}: its socket has no path", id.0)))?;
            // Accepting never blocks a server thread: a client that gave up is EAGAIN.
            listener.set_nonblocking(true)?;
            let token = u64::from(id.0);
            shared.epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(armed(), token))?;
            lock(&shared.entries).insert(token, Entry::Adi(Adi { id, path, listener: Some(listener), state: AdiState::Listening }));
        }
        let threads = (0..threads.max(1))
            .map(|n| {
                let shared = shared.clone();
                siovmm_seccomp::spawn(siovmm_seccomp::ThreadKind::DaemonServer, format!("devd-server{n}"), move || shared.serve())
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { threads })
    }

    /// How many threads serve the sockets.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Whether every server thread still runs.
    pub fn serving(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Waits for the server threads, which end only when waiting for events fails; returns why.
    pub fn join(self) -> std::io::Error {
        let mut last = std::io::Error::other("no server thread");
        for t in self.threads {
            last = t.join().unwrap_or_else(|_| std::io::Error::other("a server thread panicked"));
        }
        last
    }
}

fn armed() -> EventSet {
    EventSet::IN | EventSet::ONE_SHOT
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A client connection's timeouts: see [`MESSAGE_TIMEOUT`].
fn bounded(stream: &UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
    stream.set_write_timeout(Some(MESSAGE_TIMEOUT))
}

impl Shared {
    fn serve(&self) -> std::io::Error {
        let mut events = [EpollEvent::default(); 1];
        loop {
            match self.epoll.wait(-1, &mut events) {
                Ok(0) => continue,
                Ok(_) => self.step(events[0].data()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return e,
            }
        }
    }

    /// One step of the socket `token` names, then it is re-armed (or gone).
    fn step(&self, token: u64) {
        let Some(entry) = lock(&self.entries).remove(&token) else { return };
        match entry {
            Entry::Adi(adi) => {
                let adi = self.step_adi(adi);
                let (fd, listening) = match &adi.state {
                    AdiState::Listening => (adi.listener.as_ref().map(AsRawFd::as_raw_fd), true),
                    AdiState::Serving { stream, .. } => (Some(stream.as_raw_fd()), false),
                };
                lock(&self.entries).insert(token, Entry::Adi(adi));
                // The connection or listener is in the set (added disarmed when it was made, or
                // at start), or gone, which removed it: it is modified to re-arm it.
                let Some(fd) = fd else { return };
                if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(armed(), token)) {
                    log::error!("ADI {}: re-arming its {}: {e}", token, if listening { "socket" } else { "client" });
                }
            }
            Entry::Refused { stream, errno } => {
                if server::refuse_one(&stream, errno) {
                    let fd = stream.as_raw_fd();
                    lock(&self.entries).insert(token, Entry::Refused { stream, errno });
                    let _ = self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(armed(), token));
                }
                // Otherwise dropping the stream closes it, which takes it out of the set.
            }
        }
    }

    fn step_adi(&self, mut adi: Adi) -> Adi {
        adi.state = match std::mem::replace(&mut adi.state, AdiState::Listening) {
            AdiState::Listening => self.accept(&mut adi),
            AdiState::Serving { stream, mut backend, pid } => match server::serve_one(&stream, &self.shape, backend.as_mut()) {
                Ok(true) => AdiState::Serving { stream, backend, pid },
                ended => {
                    match ended {
                        Ok(_) => log::info!("ADI {}: client left", adi.id.0),
                        Err(e) => log::warn!("ADI {}: connection ended: {e}", adi.id.0),
                    }
                    // Closes the ADI; the device frees its IMS entries and DMA mappings.
                    drop(backend);
                    self.pool.give_back(pid, u32::from(self.vectors));
                    adi.listener = self.listen_again(&adi);
                    AdiState::Listening
                }
            },
        };
        adi
    }

    /// `adi`'s socket bound again once its client has left, in the set disarmed (`step` arms
    /// it). The file its closed listener left is removed first. `None` if that fails: the ADI
    /// is out of service, said once in the log.
    fn listen_again(&self, adi: &Adi) -> Option<UnixListener> {
        let bound = std::fs::remove_file(&adi.path)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .and_then(|()| UnixListener::bind(&adi.path))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(|l| {
                let event = EpollEvent::new(EventSet::ONE_SHOT, u64::from(adi.id.0));
                self.epoll.ctl(ControlOperation::Add, l.as_raw_fd(), event).map(|()| l)
            });
        bound.inspect_err(|e| log::error!("ADI {}: binding {} again: {e}; the ADI is out of service", adi.id.0, adi.path.display())).ok()
    }

    /// Accepts one client of `adi`: serving it (its listener closed meanwhile), or refusing
    /// it on a connection of its own.
    fn accept(&self, adi: &mut Adi) -> AdiState {
        let Some(listener) = &adi.listener else { return AdiState::Listening };
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    log::warn!("ADI {}: accepting: {e}", adi.id.0);
                }
                return AdiState::Listening;
            }
        };
        if let Err(e) = stream.set_nonblocking(false).and_then(|()| bounded(&stream)) {
            log::warn!("ADI {}: setting up a client: {e}", adi.id.0);
            return AdiState::Listening;
        }
        let pid = pool::peer_pid(&stream);
        if let Err(e) = self.pool.take(pid, u32::from(self.vectors)) {
            log::warn!("ADI {}: {e}", adi.id.0);
            self.refuse(stream, libc::EDQUOT);
            return AdiState::Listening;
        }
        // The VMM's process ID names its VM to the device, whose ADIs may share a doorbell;
        // a client whose ID cannot be known (0: another PID namespace) shares with nobody.
        let owner = u64::try_from(pid).ok().filter(|&p| p > 0);
        match AdiBackend::open(self.device.clone(), adi.id, self.vectors, owner) {
            Ok(backend) => {
                let backend = Box::new(backend.with_ims_account(self.pool.clone(), pid));
                log::info!("ADI {}: serving VMM pid {pid}", adi.id.0);
                let token = u64::from(adi.id.0);
                // Added disarmed (one-shot, no events): `step` arms it once the ADI's state is
                // back in the table, so no thread can see its events before that.
                if let Err(e) = self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::ONE_SHOT, token)) {
                    log::warn!("ADI {}: watching its client: {e}", adi.id.0);
                    self.pool.give_back(pid, u32::from(self.vectors));
                    return AdiState::Listening;
                }
                // Closed while the client has the ADI; bound again when it leaves. The path
                // stays, so a client connecting meanwhile is refused, not told it is gone.
                adi.listener = None;
                AdiState::Serving { stream, backend, pid }
            }
            Err(e) => {
                log::warn!("ADI {}: refused to VMM pid {pid}: {e}", adi.id.0);
                self.pool.give_back(pid, u32::from(self.vectors));
                self.refuse(stream, adi::device_error(e).raw_os_error().unwrap_or(libc::EIO));
                AdiState::Listening
            }
        }
    }

    /// Answers every request of `stream` with `errno` from now on, until the client leaves.
    fn refuse(&self, stream: UnixStream, errno: i32) {
        let token = self.last_refused.fetch_add(1, Ordering::Relaxed) + 1;
        let fd = stream.as_raw_fd();
        lock(&self.entries).insert(token, Entry::Refused { stream, errno });
        if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(armed(), token)).is_err() {
            lock(&self.entries).remove(&token);
        }
    }
}
