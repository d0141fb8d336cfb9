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
pub mod pool;
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
/// fails. A client gets the ADI opened for it, with `vectors` IMS entries, when it connects,
/// and the device gets them back when it leaves; a client the device or its VM's limits
/// cannot serve has every request refused with the reason's errno.
pub fn serve(listener: &UnixListener, device: Arc<dyn SiovDevice>, adi: AdiId, vectors: u16, pool: &pool::Pool) -> std::io::Error {
    let (regions, irqs) = adi::layout(vectors);
    let shape = server::DeviceShape { regions, irqs };
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => return e,
        };
        let pid = pool::peer_pid(&stream);
        if let Err(e) = pool.take(pid, u32::from(vectors)) {
            log::warn!("ADI {}: {e}", adi.0);
            server::refuse_connection(&stream, libc::EDQUOT);
            continue;
        }
        match adi::AdiBackend::open(device.clone(), adi, vectors) {
            Ok(mut backend) => {
                log::info!("ADI {}: serving VMM pid {pid}", adi.0);
                match server::serve_connection(&stream, &shape, &mut backend) {
                    Ok(()) => log::info!("ADI {}: client left", adi.0),
                    Err(e) => log::warn!("ADI {}: connection ended: {e}", adi.0),
                }
                // Closes the ADI; the device frees its IMS entries and DMA mappings.
                drop(backend);
            }
            Err(e) => {
                log::warn!("ADI {}: refused to VMM pid {pid}: {e}", adi.0);
                let errno = adi::device_error(e).raw_os_error().unwrap_or(libc::EIO);
                server::refuse_connection(&stream, errno);
            }
        }
        pool.give_back(pid, u32::from(vectors));
    }
}
