//! siovmm-devd: the SIOV device as its own process. It owns one software SIOV device (the
//! DSA-like device of `siovmm_vfio::soft`: IMS entries in either storage mode, worker threads)
//! and serves each ADI as a vfio-user device on its own UNIX socket, so VMMs — siovmm, or any
//! vfio-user client — take ADIs from one host-wide device.
//!
//! What it does: per ADI, a thread accepts one client at a time (`vfio_user::Server`); while
//! connected, the ADI is open on the device with its IMS entries allocated ([`adi::AdiBackend`]);
//! when the client leaves or dies (the socket closes), the ADI is closed and its IMS entries
//! and DMA mappings go back to the device before the next client is accepted.
//!
//! What it does not do yet (issue 11): the doorbell ioeventfd fast path (the crate has no
//! GET_REGION_IO_FDS), per-VM limits, IMS for enlightened guests (trap window, hypercall), a
//! daemon restart that keeps clients.

pub mod adi;
pub mod dma;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use siovmm_vfio::siov::{AdiId, SiovDevice};
use vfio_user::Server;

/// Where ADI `adi`'s socket is in `dir`.
pub fn socket_path(dir: &Path, adi: u32) -> PathBuf {
    dir.join(format!("adi-{adi}.sock"))
}

/// Serves ADI `adi` of `device` on `server`, one client after another, until accepting fails.
pub fn serve(server: &Server, device: Arc<dyn SiovDevice>, adi: AdiId, vectors: u16) -> vfio_user::Error {
    loop {
        let mut backend = match adi::AdiBackend::open(device.clone(), adi, vectors) {
            Ok(b) => b,
            Err(e) => {
                // The device has no IMS entries left for it: wait for a client to leave.
                log::warn!("ADI {}: {e}; retrying in 1 s", adi.0);
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        match server.run(&mut backend) {
            Ok(()) => log::info!("ADI {}: client left", adi.0),
            Err(vfio_user::Error::SocketAccept(e)) => return vfio_user::Error::SocketAccept(e),
            Err(e) => log::warn!("ADI {}: connection ended: {e}", adi.0),
        }
        // Dropping the backend closes the ADI and frees its IMS entries.
    }
}
