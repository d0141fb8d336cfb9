//! siovmm-devd: the SIOV device as its own process. It owns one software SIOV device (the
//! DSA-like device of `siovmm_vfio::soft`: IMS entries in either storage mode, worker threads)
//! and serves each ADI as a vfio-user device on its own UNIX socket, so VMMs — siovmm, or any
//! vfio-user client — take ADIs from one host-wide device.
//!
//! What it does: every ADI's socket accepts one client at a time, all of them served by a
//! few threads ([`reactor`], the protocol in [`server`]); while connected, the ADI is open on
//! the device with its IMS entries allocated ([`adi::AdiBackend`]);
//! when the client leaves or dies (the socket closes), the ADI is closed and its IMS entries
//! and DMA mappings go back to the device before the next client is accepted. The ADI's
//! doorbell is offered as an ioeventfd (GET_REGION_IO_FDS), so a guest's submissions go from
//! KVM to the device's worker without crossing the VMM or the socket.
//!
//! What it does not do yet (issue 11): IMS for enlightened guests (trap window, hypercall),
//! a daemon restart that keeps clients.

pub mod adi;
pub mod dma;
pub mod pool;
pub mod reactor;
pub mod server;

use std::path::{Path, PathBuf};

/// The most ADIs one daemon serves (`--adis`): every one holds a listening socket while free,
/// and while a client has it, the connection, a share of a doorbell eventfd and a mapping of the
/// client's guest RAM.
pub const MAX_ADIS: u32 = 16_384;

/// Where ADI `adi`'s socket is in `dir`.
pub fn socket_path(dir: &Path, adi: u32) -> PathBuf {
    dir.join(format!("adi-{adi}.sock"))
}

/// Whether the daemon whose PID is `pid` serves `dir`: its status file names it, and the
/// daemon writes that file first once every ADI's socket listens. Sockets and a status file
/// that a killed daemon left say nothing (docs/devd.md, "Ready").
pub fn serving(dir: &Path, pid: u32) -> bool {
    std::fs::read_to_string(dir.join("status")).is_ok_and(|s| s.lines().next() == Some(format!("pid {pid}").as_str()))
}
