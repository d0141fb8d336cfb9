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

/// Bytes of a REGION_INFO reply before its capabilities (`struct vfio_region_info`: argsz,
/// flags, index, cap_offset, size, offset).
pub const REGION_INFO: usize = 32;
/// The sparse-mmap capability's id (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`) and the version
/// written.
const CAP_SPARSE_MMAP: u16 = 1;
/// The region-type capability's id (`VFIO_REGION_INFO_CAP_TYPE`): a device-specific region
/// says what it is with a (type, subtype) pair.
const CAP_TYPE: u16 = 2;
/// Most mmap-able areas a region may list (a reply is bounded anyway; this bounds the walk).
pub const MAX_SPARSE_AREAS: usize = 64;

/// A REGION_INFO reply: the region's `flags`, `index`, `size` and file `offset`, and, when it
/// has mmap-able `areas` (offset, length in the region), a sparse-mmap capability listing them
/// if the client's `argsz` has room for it; otherwise `argsz` says how much room it needs (as
/// VFIO_DEVICE_GET_REGION_INFO answers), and the client asks again.
///
/// A device-specific region also carries its (type, subtype) in a region-type capability.
pub fn region_info(argsz: usize, flags: u32, index: u32, size: u64, offset: u64, areas: &[(u64, u64)], kind: Option<(u32, u32)>) -> Vec<u8> {
    if areas.is_empty() && kind.is_none() {
        return Body::default().u32(REGION_INFO as u32).u32(flags).u32(index).u32(0).u64(size).u64(offset).0;
    }
    let sparse = if areas.is_empty() { 0 } else { 16 + 16 * areas.len() };
    let typed = if kind.is_some() { 16 } else { 0 };
    let needed = REGION_INFO + sparse + typed;
    let flags = flags | vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_CAPS;
    let fits = argsz >= needed;
    let mut b = Body::default().u32(needed as u32).u32(flags).u32(index).u32(if fits { REGION_INFO as u32 } else { 0 }).u64(size).u64(offset);
    if fits {
        // Each capability's header: id, version 1, the next one's offset (0: the last).
        if !areas.is_empty() {
            let next = if kind.is_some() { (REGION_INFO + sparse) as u32 } else { 0 };
            b = b.u16(CAP_SPARSE_MMAP).u16(1).u32(next).u32(areas.len() as u32).u32(0);
            for &(at, len) in areas {
                b = b.u64(at).u64(len);
            }
        }
        if let Some((kind, subtype)) = kind {
            b = b.u16(CAP_TYPE).u16(1).u32(0).u32(kind).u32(subtype);
        }
    }
    b.0
}

/// The byte where capability `id` starts in a REGION_INFO reply, following the chain from
/// `cap_offset` (bounded: a chain that loops or leaves the reply ends the walk).
fn find_capability(reply: &[u8], id: u16) -> Option<usize> {
    let mut at = u32_at(reply, 12).unwrap_or(0) as usize;
    for _ in 0..16 {
        if at < REGION_INFO {
            break;
        }
        let (Some(found), Some(next)) = (reply.get(at..at + 2), u32_at(reply, at + 4)) else { break };
        if u16::from_le_bytes([found[0], found[1]]) == id {
            return Some(at);
        }
        at = next as usize;
    }
    None
}

/// The areas a REGION_INFO reply's sparse-mmap capability lists. Empty when there is none.
pub fn sparse_areas(reply: &[u8]) -> Vec<(u64, u64)> {
    let Some(at) = find_capability(reply, CAP_SPARSE_MMAP) else { return Vec::new() };
    let n = (u32_at(reply, at + 8).unwrap_or(0) as usize).min(MAX_SPARSE_AREAS);
    (0..n).map_while(|i| Some((u64_at(reply, at + 16 + i * 16)?, u64_at(reply, at + 24 + i * 16)?))).collect()
}

/// The (type, subtype) a REGION_INFO reply's region-type capability names, if it has one.
pub fn region_type(reply: &[u8]) -> Option<(u32, u32)> {
    let at = find_capability(reply, CAP_TYPE)?;
    Some((u32_at(reply, at + 8)?, u32_at(reply, at + 12)?))
}

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


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_info_carries_sparse_areas_when_there_is_room() {
        let areas = [(0x1000, 0x1000), (0x4000, 0x2000)];
        let short = region_info(32, 3 | 4, 0, 0x8000, 0x5000, &areas, None);
        assert_eq!(short.len(), REGION_INFO);
        assert_eq!(u32_at(&short, 0), Some(32 + 16 + 32), "argsz says the room it needs");
        assert_eq!(u32_at(&short, 12), Some(0), "no capability in a short reply");
        assert!(sparse_areas(&short).is_empty());
        let full = region_info(4096, 3 | 4, 0, 0x8000, 0x5000, &areas, None);
        assert_eq!(full.len(), 32 + 16 + 32);
        assert_eq!(u32_at(&full, 4), Some(3 | 4 | 8), "CAPS flagged");
        assert_eq!(u64_at(&full, 24), Some(0x5000));
        assert_eq!(sparse_areas(&full), areas);
        // No areas: the plain 32 bytes.
        assert_eq!(region_info(4096, 3, 7, 256, 0, &[], None).len(), REGION_INFO);
        // A chain that points at itself or past the reply ends the walk.
        let mut looping = full.clone();
        looping[32..34].copy_from_slice(&9u16.to_le_bytes());
        looping[36..40].copy_from_slice(&32u32.to_le_bytes());
        assert!(sparse_areas(&looping).is_empty());
        let mut outside = full;
        outside[12..16].copy_from_slice(&4000u32.to_le_bytes());
        assert!(sparse_areas(&outside).is_empty());
    }

    #[test]
    fn a_device_specific_region_names_its_type_alone_or_after_its_areas() {
        let typed = region_info(4096, 3, 9, 32, 0, &[], Some((0x8000_8086, 1)));
        assert_eq!(typed.len(), 32 + 16);
        assert_eq!(u32_at(&typed, 4), Some(3 | 8), "CAPS flagged");
        assert_eq!(region_type(&typed), Some((0x8000_8086, 1)));
        assert!(sparse_areas(&typed).is_empty());
        let short = region_info(32, 3, 9, 32, 0, &[], Some((0x8000_8086, 1)));
        assert_eq!((short.len(), u32_at(&short, 0)), (REGION_INFO, Some(48)), "argsz says the room it needs");
        assert_eq!(region_type(&short), None);
        let both = region_info(4096, 3, 9, 0x2000, 0, &[(0x1000, 0x1000)], Some((7, 2)));
        assert_eq!((sparse_areas(&both), region_type(&both)), (vec![(0x1000, 0x1000)], Some((7, 2))), "chained");
        assert_eq!(region_type(&region_info(4096, 3, 0, 0x2000, 0, &[(0, 0x1000)], None)), None);
    }
}
