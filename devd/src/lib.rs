//! siovmm-devd: the SIOV device as its own process. It owns one software SIOV device (the
//! DSA-like device of `siovmm_vfio::soft`: IMS entries in either storage mode, worker threads)
//! and serves each ADI as a vfio-user device on its own UNIX socket, so VMMs — siovmm, or any
//! vfio-user client — take ADIs from one host-wide device.
//!
//! What it does: per ADI, a thread accepts one client at a time ([`server`]); while
//! connected, the ADI is open on the device with its IMS entries allocated ([`adi::AdiBackend`]);
//! when the client leaves or dies (the socket closes), the ADI is closed and its IMS entries
//! and DMA mappings go back to the device before the next client is accepted. The ADI's
//! doorbell is offered as an ioeventfd (GET_REGION_IO_FDS), so a guest's submissions go from
//! KVM to the device's worker without crossing the VMM or the socket.
//!
//! What it does not do yet (issue 11): per-VM limits, IMS for enlightened guests (trap
//! window, hypercall), one thread for many sockets, a daemon restart that keeps clients.

pub mod adi;
pub mod dma;
pub mod server;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use siovmm_vfio::siov::{AdiId, SiovDevice};

/// Where ADI `adi`'s socket is in `dir`.
pub fn socket_path(dir: &Path, adi: u32) -> PathBuf {
    dir.join(format!("adi-{adi}.sock"))
}

/// Serves ADI `adi` of `device` on `listener`, one client after another, until accepting
/// fails.
pub fn serve(listener: &UnixListener, device: Arc<dyn SiovDevice>, adi: AdiId, vectors: u16) -> std::io::Error {
    let (regions, irqs) = adi::layout(vectors);
    let shape = server::DeviceShape { regions, irqs };
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
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => return e,
        };
        match server::serve_connection(&stream, &shape, &mut backend) {
            Ok(()) => log::info!("ADI {}: client left", adi.0),
            Err(e) => log::warn!("ADI {}: connection ended: {e}", adi.0),
        }
        // Dropping the backend closes the ADI and frees its IMS entries.
    }
}
