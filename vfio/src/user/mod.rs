//! vfio-user as a [`VfioBackend`]: a PCI function served by another process over a UNIX
//! socket (the device daemon, or any vfio-user server), spoken by siovmm's own client.
//!
//! Why not the `vfio_user` crate's client (0.1.7): it ignores a reply's error flag and reads
//! the payload a successful reply would have had — after a refused REGION_READ it waits for
//! bytes that never come (a vCPU hung in an MMIO exit) or takes the next reply's bytes as data;
//! it checks no message id, and it has no timeout, so a stuck daemon hangs the vCPU that asked.
//! The protocol is small (the specification is interop/vfio-user.rst in QEMU's docs), so the client is here:
//!
//! - every reply is checked against its request (id, command, reply type, size) and an error
//!   reply becomes an `Err` with the server's errno; the connection stays usable;
//! - a reply that does not come within [`REPLY_TIMEOUT`], or one that breaks the protocol,
//!   marks the connection broken: it is shut down and every later access fails at once (reads
//!   return all ones, as a master abort does), so a dead or stuck daemon gives the guest device
//!   errors, never a hung vCPU;
//! - file descriptors travel as SCM_RIGHTS, at most the server's `max_msg_fds` per message
//!   (SET_IRQS is split); those the server sends back are kept where the protocol gives
//!   them a use (GET_REGION_IO_FDS's ioeventfds; REGION_INFO's file for the sparse-mmap areas,
//!   until mapped) and closed otherwise.
//!
//! Messages are little-endian packed structs, written and parsed field by field here.

pub mod ims_mailbox;
pub mod protocol;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vmm_sys_util::eventfd::EventFd;

pub use protocol::Command;
use protocol::{recv_header, send, u32_at, u64_at, Body, Header, FLAG_ERROR, FLAG_REPLY, FLAG_TYPE_MASK, HEADER, SCM_MAX_FD};

use crate::mapping::RegionMapping;
use crate::pci::{RegionInfo, VfioBackend};

/// How long a reply may take before the connection is given up. A device operation (an ADI
/// reset waits for its queue's work in flight) takes milliseconds; this is for a daemon that is
/// stopped or wedged, which would otherwise hold a vCPU forever.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a refused connection is tried again. A device daemon closes an ADI's socket while
/// a client has it and binds it again when the client leaves (siovmm-devd's reactor), so a VMM
/// taking an ADI another has just given back may find it refused, or its file briefly gone,
/// for the few milliseconds that takes.
pub const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// Largest reply payload accepted (the protocol's default `max_data_xfer_size`, plus room
/// for a reply's fixed part): a bigger size is a broken server, not a read to honour.
const MAX_REPLY: usize = protocol::MAX_TRANSFER + 64;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("connecting to {0}")]
    Connect(String, #[source] std::io::Error),
    /// The socket refused every connection for [`CONNECT_RETRY`].
    #[error("{0}: connection refused for {secs} s: another VM holds this device, or nothing serves it", secs = CONNECT_RETRY.as_secs())]
    Unavailable(String),
    /// Sending or receiving failed; the connection is now broken.
    #[error("{0:?}: the connection failed")]
    Io(Command, #[source] std::io::Error),
    /// The server answered outside the protocol; the connection is now broken.
    #[error("{0:?}: protocol violation by the server: {1}")]
    Protocol(Command, String),
    /// The server refused the request (its errno).
    #[error("{0:?}: refused by the server")]
    Refused(Command, #[source] std::io::Error),
    /// An earlier failure broke the connection.
    #[error("{0:?}: the connection to the device is broken")]
    Broken(Command),
    /// The device is not what siovmm can drive.
    #[error("{0}")]
    Unsupported(String),
}

/// The socket and the id of the next message; `None` once broken.
#[derive(Debug)]
struct Connection {
    stream: Option<UnixStream>,
    next_id: u16,
}

impl Connection {
    /// Sends `body` as `command` with `fds` and returns the reply's payload (after the header)
    /// and the descriptors that came with it.
    fn request(&mut self, command: Command, body: &[u8], fds: &[RawFd]) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        let Some(stream) = &self.stream else { return Err(Error::Broken(command)) };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let result = exchange(stream, id, command, body, fds);
        if let Err(Error::Io(..) | Error::Protocol(..)) = &result {
            // Whatever the server sends next cannot be matched to a request: give up the
            // connection rather than take one reply for another.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            self.stream = None;
        }
        result
    }
}

/// One request and its reply on `stream`.
fn exchange(stream: &UnixStream, id: u16, command: Command, body: &[u8], fds: &[RawFd]) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
    let io = |e: std::io::Error| Error::Io(command, e);
    let size = u32::try_from(HEADER + body.len()).map_err(|_| Error::Protocol(command, "request too large".into()))?;
    let header = Header { id, command: command as u16, size, flags: 0, error: 0 }.encode();
    send(stream, &[&header, body], fds).map_err(io)?;

    let mut raw = [0u8; HEADER];
    // Descriptors the server attached: kept for the caller, closed when it drops them.
    let received = recv_header(stream, &mut raw).map_err(io)?;
    let reply = Header::decode(&raw);
    let (reply_id, reply_command, reply_size, flags) = (reply.id, reply.command, reply.size as usize, reply.flags);
    let bad = |what: String| Err(Error::Protocol(command, what));
    if reply_id != id || reply_command != command as u16 {
        return bad(format!("reply {reply_id}/command {reply_command} to request {id}/command {}", command as u16));
    }
    if flags & FLAG_TYPE_MASK != FLAG_REPLY {
        return bad(format!("flags {flags:#x} are not a reply's"));
    }
    if !(HEADER..=HEADER + MAX_REPLY).contains(&reply_size) {
        return bad(format!("reply size {reply_size}"));
    }
    let mut payload = vec![0u8; reply_size - HEADER];
    (&*stream).read_exact(&mut payload).map_err(io)?;
    if flags & FLAG_ERROR != 0 {
        // Some servers leave the errno 0; the request failed all the same.
        let errno = if reply.error == 0 { libc::EIO } else { reply.error.min(i32::MAX as u32) as i32 };
        return Err(Error::Refused(command, std::io::Error::from_raw_os_error(errno)));
    }
    Ok((payload, received))
}

/// A place in a region where writes may go to the device through an eventfd (the server's
/// GET_REGION_IO_FDS answer): the client makes it a KVM ioeventfd.
#[derive(Debug)]
pub struct IoEventFd {
    /// Offset in the region.
    pub offset: u64,
    /// Bytes (0: any access size).
    pub size: u64,
    /// The eventfd the device watches.
    pub fd: EventFd,
}

/// What the server says about a region.
#[derive(Debug, Clone, Copy, Default)]
struct Region {
    size: u64,
    flags: u32,
    /// The server offered pages of it to map (see [`Mappable`]).
    mmap: bool,
}

/// Device-specific regions (after the PCI ones) asked about: what siovmm looks for there (the
/// IMS mailbox) comes first; a server announcing more is not asked about each.
const EXTRA_REGIONS: u32 = 4;

/// The mmap-able part of a region as REGION_INFO offered it: the file that came with the
/// reply, where region offset 0 is in it, and the areas. Kept until the region is mapped,
/// then closed (the mapping holds the pages).
#[derive(Debug)]
struct Mappable {
    fd: OwnedFd,
    offset: u64,
    areas: Vec<(u64, u64)>,
}

/// What REGION_INFO says of a region: its facts, its mmap-able part, a device-specific
/// region's (type, subtype).
type RegionAnswer = (Region, Option<Mappable>, Option<(u32, u32)>);

/// Largest REGION_INFO reply asked for (32 bytes and a sparse-mmap capability of
/// `protocol::MAX_SPARSE_AREAS` areas fit).
const MAX_REGION_INFO: u32 = 4096;

/// A PCI function served over vfio-user.
#[derive(Debug)]
pub struct UserDevice {
    name: String,
    connection: Mutex<Connection>,
    regions: Vec<Region>,
    /// By region index, until [`VfioBackend::map_region`] takes it.
    mappable: Mutex<Vec<Option<Mappable>>>,
    irqs: Vec<u32>,
    /// The IMS mailbox's region index, if the device has one (see [`UserDevice::ims_mailbox`]).
    ims_mailbox: Option<u32>,
    /// Descriptors per message the server accepts.
    max_fds: usize,
    /// Bytes per region access the server accepts.
    max_transfer: usize,
    /// Accesses that failed (refused, or the connection broken), for the VM's summary.
    failures: AtomicU64,
}

impl UserDevice {
    /// Connects to the server at `socket`, negotiates the version and reads the device's
    /// regions and interrupts. Fails unless it is a PCI device.
    pub fn connect(socket: &Path) -> Result<Self, Error> {
        Self::connect_with_timeout(socket, REPLY_TIMEOUT)
    }

    /// [`UserDevice::connect`] with another reply timeout.
    pub fn connect_with_timeout(socket: &Path, timeout: Duration) -> Result<Self, Error> {
        let name = socket.display().to_string();
        let stream = connect_retrying(socket, CONNECT_RETRY).map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Error::Unavailable(name.clone()),
            _ => Error::Connect(name.clone(), e),
        })?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| Error::Connect(name.clone(), e))?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| Error::Connect(name.clone(), e))?;
        let mut connection = Connection { stream: Some(stream), next_id: 0 };

        // VERSION: major 0, minor 1, and what this client accepts, as a NUL-terminated JSON
        // object. The reply's capabilities bound what siovmm sends.
        let caps = format!(r#"{{"capabilities":{{"max_msg_fds":{SCM_MAX_FD},"max_data_xfer_size":{}}}}}"#, 1 << 20);
        let body = Body::default().u16(0).u16(1).bytes(caps.as_bytes()).bytes(&[0]).0;
        let (reply, _) = connection.request(Command::Version, &body, &[])?;
        let (max_fds, max_transfer) = parse_version(&reply).map_err(|what| Error::Protocol(Command::Version, what))?;

        let (info, _) = connection.request(Command::DeviceGetInfo, &Body::default().u32(16).u32(0).u32(0).u32(0).0, &[])?;
        let (flags, regions, irqs) = match (u32_at(&info, 4), u32_at(&info, 8), u32_at(&info, 12)) {
            (Some(f), Some(r), Some(i)) => (f, r, i),
            _ => return Err(Error::Protocol(Command::DeviceGetInfo, format!("{}-byte reply", info.len()))),
        };
        if flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(Error::Unsupported(format!("{name}: not a PCI device (flags {flags:#x})")));
        }
        // Only the PCI indexes are used (BARs, ROM, config; INTx, MSI, MSI-X, ...), and the
        // first device-specific ones: a server announcing millions is not asked about each.
        let infos = (0..regions.min(VFIO_PCI_NUM_REGIONS + EXTRA_REGIONS))
            .map(|index| region_info(&mut connection, index))
            .collect::<Result<Vec<_>, _>>()?;
        // A readable and writable region of the mailbox's type and size.
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let ims_mailbox = (0u32..).zip(&infos).find_map(|(index, (r, _, kind))| {
            let typed = *kind == Some((ims_mailbox::REGION_TYPE, ims_mailbox::REGION_SUBTYPE));
            (typed && r.flags & rw == rw && r.size >= ims_mailbox::SIZE).then_some(index)
        });
        let (regions, mappable): (Vec<Region>, Vec<Option<Mappable>>) = infos.into_iter().map(|(r, m, _)| (r, m)).unzip();
        let irqs = (0..irqs.min(VFIO_PCI_NUM_IRQS))
            .map(|index| {
                let (reply, _) = connection.request(Command::IrqInfo, &Body::default().u32(16).u32(0).u32(index).u32(0).0, &[])?;
                u32_at(&reply, 12).ok_or_else(|| Error::Protocol(Command::IrqInfo, format!("{}-byte reply", reply.len())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name,
            connection: Mutex::new(connection),
            regions,
            mappable: Mutex::new(mappable),
            irqs,
            ims_mailbox,
            max_fds,
            max_transfer,
            failures: AtomicU64::new(0),
        })
    }

    /// The socket it was reached at.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Accesses that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether an earlier failure gave up the connection.
    pub fn broken(&self) -> bool {
        self.lock().stream.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn request(&self, command: Command, body: &[u8], fds: &[RawFd]) -> Result<Vec<u8>, Error> {
        self.request_with_fds(command, body, fds).map(|(payload, _)| payload)
    }

    /// One SET_IRQS message: DATA_EVENTFD with `action` for `fds.len()` vectors of `index`
    /// from `start`, the eventfds travelling with it.
    fn set_irqs_message(&self, action: u32, index: u32, start: u32, fds: &[RawFd]) -> std::io::Result<()> {
        let body = Body::default().u32(20).u32(VFIO_IRQ_SET_DATA_EVENTFD | action).u32(index).u32(start).u32(fds.len() as u32).0;
        self.request(Command::SetIrqs, &body, fds).map(drop).map_err(std::io::Error::other)
    }

    fn request_with_fds(&self, command: Command, body: &[u8], fds: &[RawFd]) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        let result = self.lock().request(command, body, fds);
        if let Err(e) = &result {
            // The first failures are worth a line; a broken connection would repeat forever.
            if self.failures.fetch_add(1, Ordering::Relaxed) < 8 {
                log::warn!("vfio-user {}: {e}", self.name);
            }
        }
        result
    }

    /// Lets the device DMA to `[iova, iova + size)`, backed by `fd` from `offset` (DMA_MAP,
    /// read and write).
    pub fn dma_map(&self, iova: u64, size: u64, fd: RawFd, offset: u64) -> Result<(), Error> {
        let body = Body::default().u32(32).u32(3).u64(offset).u64(iova).u64(size).0;
        self.request(Command::DmaMap, &body, &[fd]).map(drop)
    }

    /// Takes a DMA mapping away (DMA_UNMAP).
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), Error> {
        let body = Body::default().u32(24).u32(0).u64(iova).u64(size).0;
        self.request(Command::DmaUnmap, &body, &[]).map(drop)
    }

    /// Resets the device (DEVICE_RESET).
    pub fn reset(&self) -> Result<(), Error> {
        self.request(Command::Reset, &[], &[]).map(drop)
    }

    /// The ioeventfds the server offers for region `index` (GET_REGION_IO_FDS): writes the
    /// guest makes there can go from KVM straight to the device. Sub-regions of other types,
    /// with a datamatch, outside the region, or naming a descriptor that did not come, are
    /// left out (those accesses keep going through REGION_WRITE).
    pub fn io_eventfds(&self, index: u32) -> Result<Vec<IoEventFd>, Error> {
        const MAX_ENTRIES: usize = 64;
        let argsz = (16 + MAX_ENTRIES * protocol::IO_FD_ENTRY) as u32;
        let body = Body::default().u32(argsz).u32(0).u32(index).u32(0).0;
        let (reply, fds) = self.request_with_fds(Command::RegionIoFds, &body, &[])?;
        let bad = |what: String| Error::Protocol(Command::RegionIoFds, what);
        let count = u32_at(&reply, 12).ok_or_else(|| bad(format!("{}-byte reply", reply.len())))? as usize;
        let region = self.regions.get(index as usize).map_or(0, |r| r.size);
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut out = Vec::new();
        for i in 0..count.min(MAX_ENTRIES) {
            let at = 16 + i * protocol::IO_FD_ENTRY;
            let (Some(offset), Some(size), Some(fd_index), Some(kind), Some(flags)) =
                (u64_at(&reply, at), u64_at(&reply, at + 8), u32_at(&reply, at + 16), u32_at(&reply, at + 20), u32_at(&reply, at + 24))
            else {
                return Err(bad(format!("{count} sub-regions in a {}-byte reply", reply.len())));
            };
            let inside = offset.checked_add(size.max(1)).is_some_and(|end| end <= region);
            if kind != protocol::IO_FD_TYPE_IOEVENTFD || flags != 0 || !inside {
                log::info!("vfio-user {}: region {index} sub-region {offset:#x}+{size:#x} (type {kind}, flags {flags:#x}) not used", self.name);
                continue;
            }
            // The descriptor may be shared by several sub-regions: duplicate it for each.
            let Some(Some(fd)) = fds.get(fd_index as usize) else {
                return Err(bad(format!("sub-region {i} names descriptor {fd_index} of {}", fds.len())));
            };
            let fd = fd.try_clone().map_err(|e| Error::Io(Command::RegionIoFds, e))?;
            // SAFETY: a descriptor this process owns (just duplicated), moved into the EventFd.
            // Should the server have sent something else, KVM refuses it as an ioeventfd.
            let fd = unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) };
            out.push(IoEventFd { offset, size, fd });
        }
        fds.clear();
        Ok(out)
    }

    /// The region index of the device's IMS mailbox ([`ims_mailbox`]), if it has one.
    pub fn ims_mailbox(&self) -> Option<u32> {
        self.ims_mailbox
    }

    /// Runs one IMS mailbox request: the request written, the reply read back. A device that
    /// cannot be reached, or answers out of the protocol, reads as NO_SUCH_ADI (the ADI is
    /// gone as far as the guest can tell); the connection's failure is logged and counted.
    pub fn ims_request(&self, request: ims_mailbox::Request) -> Result<u64, siovmm_hypercall::Status> {
        let gone = siovmm_hypercall::Status::NoSuchAdi;
        let index = self.ims_mailbox().ok_or(gone)?;
        let write = Self::region_access_body(index, 0, 16).bytes(&request.encode()).0;
        self.request(Command::RegionWrite, &write, &[]).map_err(|_| gone)?;
        let read = Self::region_access_body(index, ims_mailbox::REPLY, 16).0;
        let reply = self.request(Command::RegionRead, &read, &[]).map_err(|_| gone)?;
        let bytes: [u8; 16] = reply.get(16..).and_then(|b| b.try_into().ok()).ok_or(gone)?;
        ims_mailbox::decode_reply(&bytes)
    }

    /// Binds IMS slot `slot` to `fd` (SET_IRQS of the mailbox's interrupt index): the device
    /// signals it when the slot's entry fires.
    pub fn ims_bind(&self, slot: u32, fd: &EventFd) -> std::io::Result<()> {
        self.set_irqs_message(VFIO_IRQ_SET_ACTION_TRIGGER, ims_mailbox::IRQ_INDEX, slot, &[fd.as_raw_fd()])
    }

    fn inside(&self, index: u32, offset: u64, len: usize) -> bool {
        let Some(region) = self.regions.get(index as usize) else { return false };
        len <= self.max_transfer && offset.checked_add(len as u64).is_some_and(|end| end <= region.size)
    }

    fn region_access_body(index: u32, offset: u64, len: usize) -> Body {
        Body::default().u64(offset).u32(index).u32(len as u32)
    }
}

/// Connects to `socket`, trying again for `within` while it refuses or its file is missing
/// (see [`CONNECT_RETRY`]); a file that was never there fails at once.
fn connect_retrying(socket: &Path, within: Duration) -> std::io::Result<UnixStream> {
    let existed = socket.exists();
    let deadline = std::time::Instant::now() + within;
    loop {
        match UnixStream::connect(socket) {
            Err(e) if std::time::Instant::now() < deadline => match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {}
                // Between the old file's removal and the new socket's bind.
                std::io::ErrorKind::NotFound if existed => {}
                _ => return Err(e),
            },
            done => return done,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Region `index`'s REGION_INFO: asked with room for a reply without capabilities, and again
/// with the room the reply says it needs when it has some (as VFIO_DEVICE_GET_REGION_INFO is
/// used). A region with a sparse-mmap capability and a file with the reply is mappable; a
/// device-specific one names its (type, subtype).
fn region_info(connection: &mut Connection, index: u32) -> Result<RegionAnswer, Error> {
    let ask = |connection: &mut Connection, argsz: u32| {
        let body = Body::default().u32(argsz).u32(0).u32(index).u32(0).u64(0).u64(0).0;
        connection.request(Command::RegionInfo, &body, &[])
    };
    let (mut reply, mut fds) = ask(connection, protocol::REGION_INFO as u32)?;
    let needed = u32_at(&reply, 0).unwrap_or(0);
    let flags = u32_at(&reply, 4).unwrap_or(0);
    if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && needed as usize > protocol::REGION_INFO && needed <= MAX_REGION_INFO {
        (reply, fds) = ask(connection, needed)?;
    }
    let (Some(flags), Some(size), Some(offset)) = (u32_at(&reply, 4), u64_at(&reply, 16), u64_at(&reply, 24)) else {
        return Err(Error::Protocol(Command::RegionInfo, format!("region {index}: {}-byte reply", reply.len())));
    };
    let areas = protocol::sparse_areas(&reply);
    let mappable = match fds.into_iter().next() {
        Some(fd) if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && !areas.is_empty() => Some(Mappable { fd, offset, areas }),
        _ => None,
    };
    Ok((Region { size, flags, mmap: mappable.is_some() }, mappable, protocol::region_type(&reply)))
}

/// The server's `max_msg_fds` and `max_data_xfer_size` from its VERSION reply (major 0; the
/// JSON may be absent, then the protocol's defaults hold: 1 descriptor, 1 MiB).
fn parse_version(reply: &[u8]) -> Result<(usize, usize), String> {
    let major = reply.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]])).ok_or("no version numbers")?;
    if major != 0 {
        return Err(format!("major version {major} (siovmm speaks 0)"));
    }
    let json = reply.get(4..).unwrap_or_default();
    let json = &json[..json.iter().position(|&b| b == 0).unwrap_or(json.len())];
    let (mut fds, mut transfer) = (1u64, 1u64 << 20);
    if !json.is_empty() {
        let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("capabilities: {e}"))?;
        let caps = &value["capabilities"];
        fds = caps["max_msg_fds"].as_u64().unwrap_or(fds);
        transfer = caps["max_data_xfer_size"].as_u64().unwrap_or(transfer);
    }
    Ok((fds.clamp(1, SCM_MAX_FD as u64) as usize, transfer.clamp(8, 1 << 20) as usize))
}

impl VfioBackend for UserDevice {
    fn region(&self, index: u32) -> RegionInfo {
        // Mappable when the server offered pages of it (the sparse-mmap areas); every other
        // access is a message, or an ioeventfd's signal.
        let region = self.regions.get(index as usize).filter(|r| r.flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE) != 0);
        RegionInfo { size: region.map_or(0, |r| r.size), mmap: region.is_some_and(|r| r.mmap) }
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if !self.inside(index, offset, data.len()) {
            return;
        }
        let body = Self::region_access_body(index, offset, data.len()).0;
        // The reply echoes offset, region and count, then the data.
        if let Ok(reply) = self.request(Command::RegionRead, &body, &[]) {
            match reply.get(16..) {
                Some(bytes) if bytes.len() == data.len() => data.copy_from_slice(bytes),
                _ => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) {
        if self.inside(index, offset, data.len()) {
            let body = Self::region_access_body(index, offset, data.len()).bytes(data).0;
            let _ = self.request(Command::RegionWrite, &body, &[]);
        }
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.irqs.get(index as usize).copied().unwrap_or(0)
    }

    fn set_irqs(&self, index: u32, start: u32, fds: &[&EventFd]) -> std::io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        for (n, chunk) in raw.chunks(self.max_fds).enumerate() {
            let first = start + (n * self.max_fds) as u32;
            self.set_irqs_message(VFIO_IRQ_SET_ACTION_TRIGGER, index, first, chunk)?;
        }
        Ok(())
    }

    fn set_irq_unmask(&self, index: u32, fd: &EventFd) -> std::io::Result<()> {
        self.set_irqs_message(VFIO_IRQ_SET_ACTION_UNMASK, index, 0, &[fd.as_raw_fd()])
    }

    fn disable_irqs(&self, index: u32) -> std::io::Result<()> {
        let body = Body::default().u32(20).u32(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER).u32(index).u32(0).u32(0).0;
        self.request(Command::SetIrqs, &body, &[]).map(drop).map_err(std::io::Error::other)
    }

    /// Maps the areas the server offered, from the file that came with REGION_INFO (then
    /// closed: the mappings hold the pages). Areas that are not whole pages inside the region
    /// are left out (trapped, as for kernel VFIO); a second call maps nothing.
    fn map_region(&self, index: u32) -> std::io::Result<Vec<RegionMapping>> {
        let taken = self.mappable.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(index as usize).and_then(Option::take);
        let (Some(m), Some(region)) = (taken, self.regions.get(index as usize)) else { return Ok(Vec::new()) };
        let page = crate::mapping::PAGE;
        m.areas
            .into_iter()
            .filter(|&(at, len)| len >= page && at.is_multiple_of(page) && len.is_multiple_of(page) && at.checked_add(len).is_some_and(|end| end <= region.size))
            .map(|(at, len)| {
                let file_offset = m.offset.checked_add(at).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
                RegionMapping::new(m.fd.as_raw_fd(), file_offset, at, len)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    /// What the fake server answers: a reply's flags, errno and payload, or raw bytes, or a
    /// reply header claiming a size, or nothing at all (a wedged server).
    enum Answer {
        Reply(u32, u32, Vec<u8>),
        Raw(Vec<u8>),
        Size(u32),
        Silence,
    }

    /// A vfio-user server that answers the connection handshake like a PCI device with one
    /// 4 KiB BAR0, 256-byte config space and 4 MSI-X vectors, and every later request with
    /// `answer(command, body, descriptors received)`.
    fn fake_server(
        dir: &Path,
        max_fds: u32,
        answer: impl Fn(u16, &[u8], usize) -> Answer + Send + 'static,
    ) -> std::path::PathBuf {
        let path = dir.join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            loop {
                let mut header = [0u8; HEADER];
                let Ok(fds) = recv_header(&stream, &mut header) else { return };
                let id = u16::from_le_bytes([header[0], header[1]]);
                let command = u16::from_le_bytes([header[2], header[3]]);
                let mut body = vec![0u8; u32_at(&header, 4).unwrap() as usize - HEADER];
                (&stream).read_exact(&mut body).unwrap();
                let answer = match command {
                    1 => {
                        let caps = format!(r#"{{"capabilities":{{"max_msg_fds":{max_fds}}}}}"#);
                        Answer::Reply(1, 0, Body::default().u16(0).u16(1).bytes(caps.as_bytes()).bytes(&[0]).0)
                    }
                    4 => Answer::Reply(1, 0, Body::default().u32(16).u32(VFIO_DEVICE_FLAGS_PCI).u32(9).u32(5).0),
                    5 => {
                        let index = u32_at(&body, 8).unwrap();
                        let size = match index {
                            0 => 4096,
                            7 => 256,
                            _ => 0,
                        };
                        Answer::Reply(1, 0, Body::default().u32(32).u32(3).u32(index).u32(0).u64(size).u64(0).0)
                    }
                    7 => {
                        let index = u32_at(&body, 8).unwrap();
                        Answer::Reply(1, 0, Body::default().u32(16).u32(1).u32(index).u32(if index == 2 { 4 } else { 0 }).0)
                    }
                    _ => answer(command, &body, fds.len()),
                };
                let bytes = match answer {
                    Answer::Reply(flags, errno, payload) => {
                        Body::default().u16(id).u16(command).u32((HEADER + payload.len()) as u32).u32(flags).u32(errno).bytes(&payload).0
                    }
                    Answer::Raw(bytes) => bytes,
                    Answer::Size(size) => Body::default().u16(id).u16(command).u32(size).u32(1).u32(0).0,
                    Answer::Silence => {
                        std::thread::sleep(Duration::from_secs(3));
                        return;
                    }
                };
                if std::io::Write::write_all(&mut &stream, &bytes).is_err() {
                    return;
                }
            }
        });
        path
    }

    fn tempdir() -> std::path::PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("siovmm-user-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_handshake_reads_regions_and_interrupts() {
        let dir = tempdir();
        let device = UserDevice::connect(&fake_server(&dir, 4, |_, _, _| Answer::Silence)).unwrap();
        assert_eq!(device.region(0).size, 4096);
        assert_eq!(device.region(7).size, 256);
        assert_eq!(device.region(1).size, 0);
        assert_eq!(device.region(99).size, 0);
        assert_eq!(device.irq_count(2), 4);
        assert_eq!(device.irq_count(0), 0);
        assert_eq!(device.max_fds, 4);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_refused_read_is_all_ones_and_the_connection_survives() {
        let dir = tempdir();
        let reads = Arc::new(AtomicU32::new(0));
        let seen = reads.clone();
        let path = fake_server(&dir, 1, move |command, body, _| {
            assert_eq!(command, Command::RegionRead as u16);
            if seen.fetch_add(1, Ordering::Relaxed) == 0 {
                // An error reply carries no data (the crate's client would wait for 4 bytes).
                Answer::Reply(FLAG_REPLY | FLAG_ERROR, libc::EINVAL as u32, Vec::new())
            } else {
                Answer::Reply(1, 0, Body::default().bytes(&body[..16]).u32(0x1234_5678).0)
            }
        });
        let device = UserDevice::connect(&path).unwrap();
        let mut data = [0u8; 4];
        device.region_read(0, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(device.failures(), 1);
        device.region_read(0, 0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1234_5678);
        assert!(!device.broken());
        // Outside the region: not even asked.
        device.region_read(0, 4094, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(reads.load(Ordering::Relaxed), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_mismatched_reply_breaks_the_connection() {
        let dir = tempdir();
        // A reply with another message's id.
        let path = fake_server(&dir, 1, |command, _, _| {
            Answer::Raw(Body::default().u16(999).u16(command).u32(HEADER as u32).u32(1).u32(0).0)
        });
        let device = UserDevice::connect(&path).unwrap();
        let error = device.reset().unwrap_err();
        assert!(matches!(error, Error::Protocol(Command::Reset, _)), "{error}");
        assert!(device.broken());
        assert!(matches!(device.reset().unwrap_err(), Error::Broken(Command::Reset)));
        let mut data = [0u8; 4];
        device.region_read(7, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_huge_reply_size_is_refused_unread() {
        let dir = tempdir();
        let path = fake_server(&dir, 1, |_, _, _| Answer::Size(u32::MAX));
        let device = UserDevice::connect(&path).unwrap();
        let error = device.reset().unwrap_err();
        assert!(matches!(&error, Error::Protocol(Command::Reset, what) if what == "reply size 4294967295"), "{error:?}");
        assert!(device.broken());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_silent_server_times_out_instead_of_hanging_the_caller() {
        let dir = tempdir();
        let path = fake_server(&dir, 1, |_, _, _| Answer::Silence);
        let device = UserDevice::connect_with_timeout(&path, Duration::from_millis(200)).unwrap();
        let error = device.reset().unwrap_err();
        assert!(matches!(error, Error::Io(Command::Reset, _)), "{error}");
        assert!(device.broken());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn set_irqs_sends_at_most_the_servers_descriptors_per_message() {
        let dir = tempdir();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let seen = messages.clone();
        let path = fake_server(&dir, 2, move |command, body, fds| {
            assert_eq!(command, Command::SetIrqs as u16);
            let fields: Vec<u32> = (0..5).map(|i| u32_at(body, i * 4).unwrap()).collect();
            seen.lock().unwrap().push((fields, fds));
            Answer::Reply(1, 0, Vec::new())
        });
        let device = UserDevice::connect(&path).unwrap();
        let fds: Vec<EventFd> = (0..5).map(|_| EventFd::new(0).unwrap()).collect();
        let refs: Vec<&EventFd> = fds.iter().collect();
        device.set_irqs(2, 1, &refs).unwrap();
        device.disable_irqs(2).unwrap();
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let none = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        assert_eq!(
            *messages.lock().unwrap(),
            vec![
                (vec![20, trigger, 2, 1, 2], 2),
                (vec![20, trigger, 2, 3, 2], 2),
                (vec![20, trigger, 2, 5, 1], 1),
                (vec![20, none, 2, 0, 0], 0),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_refusing_socket_is_tried_for_a_while_then_named_in_one_line() {
        let dir = tempdir();
        let path = dir.join("closed.sock");
        // A socket file nothing listens on: what a daemon leaves while a client has the ADI.
        drop(UnixListener::bind(&path).unwrap());
        let t0 = std::time::Instant::now();
        let e = UserDevice::connect(&path).unwrap_err();
        assert!(t0.elapsed() >= CONNECT_RETRY, "tried again for {:?}", t0.elapsed());
        assert_eq!(e.to_string(), format!("{}: connection refused for 1 s: another VM holds this device, or nothing serves it", path.display()));
        // Listening again before the time is up: connected.
        let again = path.clone();
        let binder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::remove_file(&again).unwrap();
            let l = UnixListener::bind(&again).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(l);
        });
        assert!(connect_retrying(&path, CONNECT_RETRY).is_ok());
        binder.join().unwrap();
        // A path that never existed fails at once.
        let t0 = std::time::Instant::now();
        assert!(matches!(UserDevice::connect(&dir.join("none.sock")), Err(Error::Connect(..))));
        assert!(t0.elapsed() < CONNECT_RETRY);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_version_reply_bounds_what_is_sent() {
        assert_eq!(parse_version(&Body::default().u16(0).u16(1).0), Ok((1, 1 << 20)));
        let json = br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":65536}}"#;
        assert_eq!(parse_version(&Body::default().u16(0).u16(1).bytes(json).bytes(&[0]).0), Ok((16, 65536)));
        let huge = br#"{"capabilities":{"max_msg_fds":100000}}"#;
        assert_eq!(parse_version(&Body::default().u16(0).u16(1).bytes(huge).0), Ok((SCM_MAX_FD, 1 << 20)));
        assert!(parse_version(&Body::default().u16(1).u16(0).0).is_err());
        assert!(parse_version(&Body::default().u16(0).u16(0).bytes(b"{not json").0).is_err());
        assert!(parse_version(&[]).is_err());
    }
}
