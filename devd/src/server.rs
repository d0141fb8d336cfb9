//! The daemon's vfio-user server: one client connection, its requests answered by a device
//! backend (the `vfio_user` crate's `ServerBackend` trait, which `adi::AdiBackend` implements).
//!
//! Why not the crate's `Server::run` (0.1.7): it answers GET_REGION_IO_FDS as unsupported, so
//! every doorbell write would cross siovmm and this socket instead of going from KVM to the
//! device; it allocates a REGION_READ buffer of whatever size the client names before any
//! check; it panics on a VERSION payload without a NUL; and where it refuses a request before
//! reading its body, the body's bytes are then parsed as the next header. Here every message
//! is read whole (its size checked first) before anything is decided, so a refused request
//! leaves the connection in step; a message no server could parse ends the connection, never
//! the daemon. Wire format: `siovmm_vfio::user::protocol`.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use siovmm_vfio::user::protocol::{
    recv_header, send, u32_at, u64_at, Body, Command, Header, FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY, FLAG_TYPE_MASK, HEADER,
    IO_FD_ENTRY, IO_FD_TYPE_IOEVENTFD, MAX_TRANSFER,
};
use siovmm_vfio::user::protocol;
use vfio_bindings::bindings::vfio::{VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_REGION_INFO_FLAG_MMAP};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};

/// Descriptors accepted per message (what VERSION announces as `max_msg_fds`).
pub const MAX_FDS: usize = 16;

/// Largest message accepted: a region write of [`MAX_TRANSFER`] bytes and its fixed part.
const MAX_MESSAGE: usize = HEADER + 16 + MAX_TRANSFER;

/// A place in a region whose writes the device takes through an eventfd.
#[derive(Debug, Clone, Copy)]
pub struct IoEventFd {
    /// Offset in the region.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// The eventfd (owned by the backend, open while it lives).
    pub fd: RawFd,
}

/// Pages of a region the client may map instead of accessing them by message: the file, the
/// file offset of the region's start, and the areas (offset, length in the region).
#[derive(Debug, Clone)]
pub struct RegionMmap {
    /// The file (owned by the backend, open while it lives).
    pub fd: RawFd,
    /// Where region offset 0 is in the file.
    pub offset: u64,
    /// The mmap-able areas.
    pub areas: Vec<(u64, u64)>,
}

/// What the server needs of a device beyond `ServerBackend`.
pub trait RegionIoFds {
    /// The ioeventfds of region `index` (GET_REGION_IO_FDS).
    fn io_eventfds(&self, index: u32) -> Vec<IoEventFd>;
    /// The mmap-able part of region `index` (REGION_INFO's sparse-mmap capability and the
    /// descriptor sent with it), if it has one.
    fn region_mmap(&self, _index: u32) -> Option<RegionMmap> {
        None
    }
    /// The (type, subtype) of device-specific region `index` (REGION_INFO's region-type
    /// capability), if it is one.
    fn region_type(&self, _index: u32) -> Option<(u32, u32)> {
        None
    }
}

/// What a device is: its regions and interrupts (DEVICE_GET_INFO, GET_REGION_INFO and
/// GET_IRQ_INFO answer from these).
pub struct DeviceShape {
    /// Regions, by index.
    pub regions: Vec<ServerRegion>,
    /// Interrupt types, by index.
    pub irqs: Vec<IrqInfo>,
}

impl std::fmt::Debug for DeviceShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: Vec<u64> = self.regions.iter().map(|r| r.region_info.size).collect();
        f.debug_struct("DeviceShape").field("region_sizes", &sizes).field("irqs", &self.irqs).finish()
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the socket failed.
    #[error("the connection failed")]
    Io(#[from] std::io::Error),
    /// The client sent what cannot be a message.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// A refusal: the errno of the error reply.
type Refusal = i32;

fn errno(e: &std::io::Error) -> Refusal {
    e.raw_os_error().unwrap_or(libc::EINVAL)
}

/// What a request is answered with.
struct Answer {
    payload: Vec<u8>,
    fds: Vec<RawFd>,
}

impl From<Vec<u8>> for Answer {
    fn from(payload: Vec<u8>) -> Self {
        Self { payload, fds: Vec::new() }
    }
}

/// A command as received: header, body, and the descriptors that came with it.
struct Request {
    header: Header,
    body: Vec<u8>,
    files: Vec<File>,
}

/// One command read whole: its header checked (size first, so nothing is allocated for a size
/// no message can have), its body read, the descriptors that came with it. `None`: the client
/// left.
fn read_command(stream: &UnixStream) -> Result<Option<Request>, Error> {
    let mut raw = [0u8; HEADER];
    let fds = match recv_header(stream, &mut raw) {
        Ok(fds) => fds,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let header = Header::decode(&raw);
    let size = header.size as usize;
    if !(HEADER..=MAX_MESSAGE).contains(&size) {
        return Err(Error::Protocol(format!("message size {size}")));
    }
    if header.flags & FLAG_TYPE_MASK != 0 {
        return Err(Error::Protocol(format!("flags {:#x} are not a command's", header.flags)));
    }
    let mut body = vec![0u8; size - HEADER];
    (&*stream).read_exact(&mut body)?;
    if fds.len() > MAX_FDS {
        return Err(Error::Protocol(format!("{} descriptors in one message", fds.len())));
    }
    Ok(Some(Request { header, body, files: fds.into_iter().map(File::from).collect() }))
}

/// Sends the reply to `request`: the answer, or an error reply carrying the errno.
fn reply(stream: &UnixStream, request: &Header, result: Result<Answer, Refusal>) -> std::io::Result<()> {
    let (flags, error, answer) = match result {
        Ok(answer) => (FLAG_REPLY, 0, answer),
        Err(e) => {
            log::debug!("command {} refused: errno {e}", request.command);
            (FLAG_REPLY | FLAG_ERROR, e as u32, Answer::from(Vec::new()))
        }
    };
    let header = Header { id: request.id, command: request.command, size: (HEADER + answer.payload.len()) as u32, flags, error };
    send(stream, &[&header.encode(), &answer.payload], &answer.fds)
}

/// Serves one request of the client on `stream`: `Ok(true)` when one was answered,
/// `Ok(false)` when the client left. Called when the socket is readable; a message that
/// arrives only in part blocks for at most the socket's read timeout (see `reactor`).
pub fn serve_one<B: ServerBackend + RegionIoFds>(stream: &UnixStream, shape: &DeviceShape, backend: &mut B) -> Result<bool, Error> {
    let Some(Request { header, body, files }) = read_command(stream)? else { return Ok(false) };
    let result = match Command::from_u16(header.command) {
        Some(command) => handle(command, &body, files, shape, backend),
        None => Err(libc::ENOSYS),
    };
    if header.flags & FLAG_NO_REPLY == 0 || result.is_err() {
        reply(stream, &header, result)?;
    }
    Ok(true)
}

/// Answers one request on `stream` with `errno` (a client the daemon cannot serve learns why
/// at its first request): false when the client left or the connection failed.
pub fn refuse_one(stream: &UnixStream, errno: i32) -> bool {
    match read_command(stream) {
        Ok(Some(request)) => reply(stream, &request.header, Err(errno)).is_ok(),
        _ => false,
    }
}

/// The fields of a fixed-size request body, or EINVAL when it is shorter.
fn fields<const N: usize>(body: &[u8], offsets: [usize; N], wide: [bool; N]) -> Result<[u64; N], Refusal> {
    let mut out = [0u64; N];
    for i in 0..N {
        out[i] = if wide[i] { u64_at(body, offsets[i]) } else { u32_at(body, offsets[i]).map(u64::from) }.ok_or(libc::EINVAL)?;
    }
    Ok(out)
}

fn handle<B: ServerBackend + RegionIoFds>(
    command: Command,
    body: &[u8],
    mut fds: Vec<File>,
    shape: &DeviceShape,
    backend: &mut B,
) -> Result<Answer, Refusal> {
    let region = |index: u64| shape.regions.get(index as usize).ok_or(libc::EINVAL);
    Ok(match command {
        Command::Version => {
            let [major] = fields(body, [0], [false]).map(|[v]| [v & 0xffff])?;
            if major != 0 {
                return Err(libc::ENOTSUP);
            }
            let caps = format!(r#"{{"capabilities":{{"max_msg_fds":{MAX_FDS},"max_data_xfer_size":{MAX_TRANSFER}}}}}"#);
            Body::default().u16(0).u16(1).bytes(caps.as_bytes()).bytes(&[0]).0.into()
        }
        Command::DeviceGetInfo => {
            let flags = VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET;
            Body::default().u32(16).u32(flags).u32(shape.regions.len() as u32).u32(shape.irqs.len() as u32).0.into()
        }
        Command::RegionInfo => {
            let [argsz, index] = fields(body, [0, 8], [false, false])?;
            let info = region(index)?.region_info;
            let kind = backend.region_type(index as u32);
            let Some(mmap) = backend.region_mmap(index as u32) else {
                return Ok(protocol::region_info(argsz as usize, info.flags, info.index, info.size, 0, &[], kind).into());
            };
            let flags = info.flags | VFIO_REGION_INFO_FLAG_MMAP;
            let payload = protocol::region_info(argsz as usize, flags, info.index, info.size, mmap.offset, &mmap.areas, kind);
            // The file goes with the reply that lists the areas, the one longer than the fixed
            // part (a short one only says how much room they need).
            let fds = if payload.len() > protocol::REGION_INFO { vec![mmap.fd] } else { Vec::new() };
            Answer { payload, fds }
        }
        Command::RegionIoFds => {
            let [argsz, index] = fields(body, [0, 8], [false, false])?;
            region(index)?;
            let entries = backend.io_eventfds(index as u32);
            let needed = 16 + entries.len() * IO_FD_ENTRY;
            let mut reply = Body::default().u32(needed as u32).u32(0).u32(index as u32).u32(entries.len() as u32);
            // Too small a buffer gets the count and size needed, no entries (as VFIO does).
            if argsz as usize >= needed {
                for (i, e) in entries.iter().enumerate() {
                    reply = reply.u64(e.offset).u64(e.size).u32(i as u32).u32(IO_FD_TYPE_IOEVENTFD).u32(0).u32(0).u64(0);
                }
                return Ok(Answer { payload: reply.0, fds: entries.iter().map(|e| e.fd).collect() });
            }
            reply.0.into()
        }
        Command::IrqInfo => {
            let [index] = fields(body, [8], [false])?;
            let irq = shape.irqs.get(index as usize).ok_or(libc::EINVAL)?;
            Body::default().u32(16).u32(irq.flags).u32(irq.index).u32(irq.count).0.into()
        }
        Command::SetIrqs => {
            let [flags, index, start, count] = fields(body, [4, 8, 12, 16], [false; 4])?;
            backend.set_irqs(index as u32, flags as u32, start as u32, count as u32, fds).map_err(|e| errno(&e))?;
            Vec::new().into()
        }
        Command::RegionRead => {
            let [offset, index, count] = fields(body, [0, 8, 12], [true, false, false])?;
            region(index)?;
            if count as usize > MAX_TRANSFER {
                return Err(libc::E2BIG);
            }
            let mut data = vec![0u8; count as usize];
            backend.region_read(index as u32, offset, &mut data).map_err(|e| errno(&e))?;
            Body::default().u64(offset).u32(index as u32).u32(count as u32).bytes(&data).0.into()
        }
        Command::RegionWrite => {
            let [offset, index, count] = fields(body, [0, 8, 12], [true, false, false])?;
            region(index)?;
            let data = body.get(16..).filter(|d| d.len() == count as usize).ok_or(libc::EINVAL)?;
            backend.region_write(index as u32, offset, data).map_err(|e| errno(&e))?;
            Body::default().u64(offset).u32(index as u32).u32(count as u32).0.into()
        }
        Command::DmaMap => {
            let [flags, file_offset, address, size] = fields(body, [4, 8, 16, 24], [false, true, true, true])?;
            if fds.len() > 1 {
                return Err(libc::EINVAL);
            }
            let flags = DmaMapFlags::from_bits_truncate(flags as u32);
            backend.dma_map(flags, file_offset, address, size, fds.pop()).map_err(|e| errno(&e))?;
            Vec::new().into()
        }
        Command::DmaUnmap => {
            let [argsz, flags, address, size] = fields(body, [0, 4, 8, 16], [false, false, true, true])?;
            backend.dma_unmap(DmaUnmapFlags::from_bits_truncate(flags as u32), address, size).map_err(|e| errno(&e))?;
            Body::default().u32(argsz as u32).u32(flags as u32).u64(address).u64(size).0.into()
        }
        Command::Reset => {
            backend.reset().map_err(|e| errno(&e))?;
            Vec::new().into()
        }
    })
}

/// The ioeventfd entry for `fd` at `offset`, `size` bytes. The backend keeps `fd` open; the
/// reply sends a duplicate of it.
pub fn io_eventfd(offset: u64, size: u64, fd: &impl AsRawFd) -> IoEventFd {
    IoEventFd { offset, size, fd: fd.as_raw_fd() }
}
