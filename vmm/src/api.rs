//! `--api-socket PATH`: the HTTP API (siovmm-api's endpoints, docs/api.md) acting on the
//! running VM through its [`VmHandle`], served on a thread of its own (`siovmm-api`, under the
//! `api` seccomp filter).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::pci::Bdf;
use devices::ExitReason;
use siovmm_api::{ApiError, DeviceInfo, DeviceKind, Removed, VmControl, VmInfo};
use siovmm_seccomp::ThreadKind;
use vmm_sys_util::eventfd::EventFd;

use crate::vm::VmHandle;
use crate::{one_line, Error};

/// The socket, bound before the VM is built so that a bad path fails first.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    /// Binds `path`; refuses one that exists (it is never removed for the user: it may be
    /// another VM's).
    pub fn bind(path: &Path) -> Result<Self, String> {
        if path.symlink_metadata().is_ok() {
            return Err(format!("--api-socket {}: already exists (another VM's socket? remove it, or choose another path)", path.display()));
        }
        let listener = UnixListener::bind(path).map_err(|e| format!("--api-socket {}: {e}", path.display()))?;
        Ok(Self { listener, path: path.to_path_buf() })
    }
}

/// The API thread; dropping it stops the thread, which removes the socket.
#[derive(Debug)]
pub struct ApiThread {
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiThread {
    /// Serves `socket` for `vm` until dropped.
    pub fn spawn(socket: ApiSocket, vm: VmApi) -> Result<Self, Error> {
        let stop = Arc::new(EventFd::new(libc::EFD_CLOEXEC).map_err(|e| Error::Io("eventfd for the API thread".into(), e))?);
        let thread = {
            let stop = stop.clone();
            siovmm_seccomp::spawn(ThreadKind::Api, "siovmm-api".into(), move || {
                if let Err(e) = siovmm_api::server::serve(&socket.listener, &vm, stop.as_ref(), siovmm_api::server::REQUEST_TIMEOUT) {
                    log::error!("api: serving {}: {e}; the API is gone, the VM runs on", socket.path.display());
                }
                // Here rather than in the event loop, whose filter has no unlink.
                if let Err(e) = std::fs::remove_file(&socket.path) {
                    log::warn!("api: removing {}: {e}", socket.path.display());
                }
            })
            .map_err(|e| Error::Io("spawning the API thread".into(), e))?
        };
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for ApiThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("api: stopping the API thread: {e}");
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The VM as the API sees it.
#[derive(Debug)]
pub struct VmApi {
    handle: VmHandle,
    vcpus: u8,
    memory_mib: u64,
    /// Where vfio-user sockets may be taken from (canonical), if anywhere.
    vfio_user_dir: Option<PathBuf>,
    /// The VM has a vIOMMU, which kernel VFIO devices cannot sit behind (docs/vfio.md).
    viommu: bool,
    /// How kernel VFIO devices reach the host IOMMU (`--vfio-iommu`): what the checks of an
    /// added device look for.
    vfio_iommu: siovmm_vfio::host::Iommu,
}

impl VmApi {
    /// For the VM behind `handle`, built as `config` says.
    pub fn new(handle: VmHandle, config: &crate::config::VmConfig) -> Self {
        Self {
            handle,
            vcpus: config.cpus,
            memory_mib: config.memory >> 20,
            vfio_user_dir: config.vfio_user_dir.clone(),
            viommu: config.siov.viommu,
            vfio_iommu: config.vfio_iommu,
        }
    }

    /// `socket` resolved (symbolic links, `..`) and checked to lie under `--vfio-user-dir`
    /// and to be a socket.
    fn allowed_socket(&self, socket: &str) -> Result<PathBuf, ApiError> {
        use std::os::unix::fs::FileTypeExt;
        let Some(dir) = &self.vfio_user_dir else {
            return Err(ApiError::conflict("this VM was started without --vfio-user-dir: it takes no vfio-user device through the API"));
        };
        let path = Path::new(socket);
        if !path.is_absolute() {
            return Err(ApiError::bad_request(format!("{socket:?}: not an absolute path")));
        }
        let real = std::fs::canonicalize(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ApiError::not_found(format!("{socket}: no such socket")),
            _ => ApiError::bad_request(format!("{socket}: {e}")),
        })?;
        if !real.starts_with(dir) {
            return Err(ApiError::forbidden(format!("{socket}: outside {} (--vfio-user-dir)", dir.display())));
        }
        match std::fs::metadata(&real) {
            Ok(m) if m.file_type().is_socket() => Ok(real),
            Ok(_) => Err(ApiError::bad_request(format!("{socket}: not a UNIX socket"))),
            Err(e) => Err(ApiError::not_found(format!("{socket}: {e}"))),
        }
    }
}

/// `SSSS:BB:DD.F` (segment 0, the only one) or `BB:DD.F`, hexadecimal as Linux prints them.
fn parse_bdf(id: &str) -> Option<Bdf> {
    let rest = match id.split_once(':') {
        Some((segment, rest)) if segment.len() == 4 && rest.contains(':') => {
            (u16::from_str_radix(segment, 16).ok()? == 0).then_some(rest)?
        }
        _ => id,
    };
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let hex = |s: &str, digits: usize| (s.len() == digits).then(|| u8::from_str_radix(s, 16).ok()).flatten();
    let (bus, device, function) = (hex(bus, 2)?, hex(device, 2)?, hex(function, 1)?);
    (device < 32 && function < 8).then(|| Bdf::new(bus, device, function))
}

fn id(bdf: Bdf) -> String {
    format!("0000:{bdf}")
}

/// An error of the VM's as the API's: the user's fault (404, 409, 501) or siovmm's (500).
fn api_error(e: Error) -> ApiError {
    match &e {
        Error::NoFreeAdis { .. } | Error::Released => ApiError::conflict(one_line(&e)),
        Error::Adis(siovmm_vdcm::Error::TooMany(_) | siovmm_vdcm::Error::Placement(..)) => ApiError::conflict(one_line(&e)),
        Error::Adis(siovmm_vdcm::Error::NoSuchFunction(bdf)) => ApiError::not_found(format!("no device {}", id(*bdf))),
        Error::NoDevice(_) => ApiError::not_found(one_line(&e)),
        Error::InUse(_) | Error::FunctionZeroLast { .. } => ApiError::conflict(one_line(&e)),
        _ => ApiError::internal(one_line(&e)),
    }
}

impl VmControl for VmApi {
    fn info(&self) -> Result<VmInfo, ApiError> {
        let usage = self.handle.usage().map_err(api_error)?;
        let devices = self.handle.devices_list().map_err(api_error)?;
        Ok(VmInfo {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            devices: devices.into_iter().map(|(bdf, kind)| DeviceInfo { id: id(bdf), kind }).collect(),
            ims_entries: usage.ims_entries,
            guest_ims_slots: usage.guest_ims_slots,
            kvm_routes: usage.msi_routes,
            overflow_vectors: usage.overflow_vectors,
        })
    }

    fn add_adis(&self, count: u32) -> Result<Vec<DeviceInfo>, ApiError> {
        let added = self.handle.add_adis(count).map_err(api_error)?;
        log::info!("api: added {} ADIs", added.len());
        Ok(added.into_iter().map(|bdf| DeviceInfo { id: id(bdf), kind: DeviceKind::Adi }).collect())
    }

    fn add_vfio_user(&self, socket: &str) -> Result<DeviceInfo, ApiError> {
        let real = self.allowed_socket(socket)?;
        if self.handle.has_vfio_user(&real).map_err(api_error)? {
            return Err(ApiError::conflict(format!("{socket}: already in this VM")));
        }
        // The server's refusal (its per-VM limit, say) is the operator's to act on.
        let bdf = self.handle.add_vfio_user(&real).map_err(|e| match e {
            Error::Vfio(crate::passthrough::Error::User { .. }) => ApiError::conflict(one_line(&e)),
            other => api_error(other),
        })?;
        log::info!("api: added the vfio-user device {} at {}", real.display(), id(bdf));
        Ok(DeviceInfo { id: id(bdf), kind: DeviceKind::VfioUser })
    }

    fn add_vfio(&self, path: &str) -> Result<DeviceInfo, ApiError> {
        use siovmm_vfio::host::HostError;
        if self.viommu {
            return Err(ApiError::conflict(format!(
                "{path}: this VM has a vIOMMU (--viommu), and a kernel VFIO device would DMA untranslated behind it"
            )));
        }
        // Before the checks, which would find the group busy: this VM holds it.
        let name = std::fs::canonicalize(path).ok().and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()));
        if let Some(name) = name {
            if self.handle.has_vfio(&name).map_err(api_error)? {
                return Err(ApiError::conflict(format!("{path}: already in this VM")));
            }
        }
        let host = siovmm_vfio::host::check(Path::new(path), Path::new(crate::cli::VFIO_DEV), self.vfio_iommu).map_err(|e| match e {
            HostError::NotFound(_) => ApiError::not_found(e.to_string()),
            HostError::Busy { .. } => ApiError::conflict(e.to_string()),
            _ => ApiError::bad_request(e.to_string()),
        })?;
        // Another user holding the group (another VM) makes VFIO refuse it: the operator's to
        // resolve, as for a vfio-user server's refusal.
        let bdf = self.handle.add_vfio(&host).map_err(|e| match e {
            Error::Vfio(crate::passthrough::Error::Vfio { .. }) => ApiError::conflict(one_line(&e)),
            other => api_error(other),
        })?;
        log::info!("api: passed {} through at {}", host.name, id(bdf));
        Ok(DeviceInfo { id: id(bdf), kind: DeviceKind::Vfio })
    }

    fn remove_device(&self, device: &str, eject_timeout: std::time::Duration) -> Result<Removed, ApiError> {
        let bdf = parse_bdf(device).ok_or_else(|| ApiError::bad_request(format!("{device:?} is not a PCI address (SSSS:BB:DD.F)")))?;
        let removal = self.handle.remove_device(bdf, eject_timeout).map_err(api_error)?;
        let how = if removal.ejected_by_guest { "ejected by the guest" } else { "without the guest's eject" };
        log::info!("api: removed the device at {}, {how}", id(bdf));
        Ok(Removed { id: id(bdf), ejected_by_guest: removal.ejected_by_guest })
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        log::info!("api: stopping the VM");
        self.handle.stop(ExitReason::PowerOff);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_pci_addresses() {
        assert_eq!(parse_bdf("0000:01:1f.7"), Some(Bdf::new(1, 31, 7)));
        assert_eq!(parse_bdf("00:01.0"), Some(Bdf::new(0, 1, 0)));
        assert_eq!(id(Bdf::new(4, 2, 1)), "0000:04:02.1");
        for bad in ["", "0001:00:01.0", "00:20.0", "00:01.8", "0:1.0", "00:01", "zz:01.0", "0000:00:01.0.1", "00:01.0 "] {
            assert_eq!(parse_bdf(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_socket_path_that_exists_is_refused_and_kept() {
        let dir = std::env::temp_dir().join(format!("siovmm-api-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("taken");
        std::fs::write(&path, b"someone's").unwrap();
        let e = ApiSocket::bind(&path).unwrap_err();
        assert_eq!(e, format!("--api-socket {}: already exists (another VM's socket? remove it, or choose another path)", path.display()));
        assert_eq!(std::fs::read(&path).unwrap(), b"someone's");
        let e = ApiSocket::bind(&dir.join("no-such-dir/api.sock")).unwrap_err();
        assert!(e.ends_with("No such file or directory (os error 2)"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
