//! The vfio-user wire format, shared by siovmm's client ([`super::UserDevice`]) and the device
//! daemon's server: the 16-byte header, little-endian bodies, and messages with descriptors
//! attached (SCM_RIGHTS). QEMU's docs, interop/vfio-user.rst, is the specification.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// SCM_MAX_FD (linux include/net/scm.h): no more descriptors travel in one message.
pub const SCM_MAX_FD: usize = 253;

/// Bytes of a message header: id, command, size (header included), flags, error.
pub const HEADER: usize = 16;
/// Flags bits 3:0: the message type.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Type 1: a reply (0 is a command).
pub const FLAG_REPLY: u32 = 1;
/// Bit 4: the sender wants no reply.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Bit 5: the request failed; `error` holds the errno.
pub const FLAG_ERROR: u32 = 1 << 5;
/// The default largest region access (`max_data_xfer_size`), which siovmm's client and
/// server both keep to.
pub const MAX_TRANSFER: usize = 1 << 20;
/// GET_REGION_IO_FDS sub-region type: an ioeventfd.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// Bytes of one GET_REGION_IO_FDS sub-region.
pub const IO_FD_ENTRY: usize = 40;

/// Commands (vfio-user.rst, "Commands").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// VERSION.
    Version = 1,
    /// DMA_MAP.
    DmaMap = 2,
    /// DMA_UNMAP.
    DmaUnmap = 3,
    /// DEVICE_GET_INFO.
    DeviceGetInfo = 4,
    /// DEVICE_GET_REGION_INFO.
    RegionInfo = 5,
    /// DEVICE_GET_REGION_IO_FDS.
    RegionIoFds = 6,
    /// DEVICE_GET_IRQ_INFO.
    IrqInfo = 7,
    /// DEVICE_SET_IRQS.
    SetIrqs = 8,
    /// REGION_READ.
    RegionRead = 9,
    /// REGION_WRITE.
    RegionWrite = 10,
    /// DEVICE_RESET.
    Reset = 13,
}

impl Command {
    /// The command numbered `n`, if this module knows it.
    pub fn from_u16(n: u16) -> Option<Self> {
        Some(match n {
            1 => Self::Version,
            2 => Self::DmaMap,
            3 => Self::DmaUnmap,
            4 => Self::DeviceGetInfo,
            5 => Self::RegionInfo,
            6 => Self::RegionIoFds,
            7 => Self::IrqInfo,
            8 => Self::SetIrqs,
            9 => Self::RegionRead,
            10 => Self::RegionWrite,
            13 => Self::Reset,
            _ => return None,
        })
    }
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message id; a reply carries its request's.
    pub id: u16,
    /// Command.
    pub command: u16,
    /// Bytes of the whole message, header included.
    pub size: u32,
    /// Type (bits 3:0), no-reply, error.
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// Its 16 bytes.
    pub fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// Read back from its 16 bytes.
    pub fn decode(b: &[u8; HEADER]) -> Self {
        Self {
            id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32_at(b, 4).unwrap_or(0),
            flags: u32_at(b, 8).unwrap_or(0),
            error: u32_at(b, 12).unwrap_or(0),
        }
    }
}

/// Little-endian field writer for a message body.
#[derive(Debug, Default)]
pub struct Body(pub Vec<u8>);

impl Body {
    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// Appends bytes.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The u32 at byte `at` of a payload, if it is that long.
pub fn u32_at(payload: &[u8], at: usize) -> Option<u32> {
    payload.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The u64 at byte `at` of a payload, if it is that long.
pub fn u64_at(payload: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32_at(payload, at)?) | u64::from(u32_at(payload, at + 4)?) << 32)
}

/// Writes `parts` as one message, `fds` attached to its first bytes.
pub fn send(stream: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> std::io::Result<()> {
    let message: Vec<u8> = parts.concat();
    // sendmsg with MSG_NOSIGNAL: a daemon that died gives EPIPE, not SIGPIPE.
    let sent = stream.send_with_fds(&[message.as_slice()], fds).map_err(std::io::Error::from)?;
    // A stream socket may take part of a message; the descriptors went with the first byte.
    (&*stream).write_all(&message[sent..])
}

/// Reads a message header, collecting any descriptors that came with it.
pub fn recv_header(stream: &UnixStream, header: &mut [u8; HEADER]) -> std::io::Result<Vec<OwnedFd>> {
    let mut fds = [-1 as RawFd; SCM_MAX_FD];
    let mut iov = [libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: HEADER }];
    // SAFETY: the iovec covers `header`, which lives through the call; `fds` has room for
    // SCM_MAX_FD descriptors, as many as one message can carry.
    let (read, count) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.map_err(std::io::Error::from)?;
    let received = fds[..count.min(SCM_MAX_FD)]
        .iter()
        .filter(|&&fd| fd >= 0)
        // SAFETY: the kernel installed these descriptors in this process for this message;
        // nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if read == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    (&*stream).read_exact(&mut header[read..])?;
    Ok(received)
}

