//! The HTTP API as any local process can reach it (docs/api.md): raw bytes, arriving in
//! pieces of any size, framed by `siovmm_api::http::read_request` and answered by the
//! endpoints against a fake VM of 16 ADIs, the first held by its guest. Checked on every
//! input: an answer's status is one the API documents; a refused request (any status but 2xx)
//! leaves the VM as it was; a successful add or removal changes it by exactly what it says.
#![no_main]

use std::io::Read;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use siovmm_api::http::{read_request, Response};
use siovmm_api::{server, ApiError, DeviceInfo, DeviceKind, RemoveDevice, Removed, VmControl, VmInfo};

/// ADI n at `0000:00:NN.0`; the guest holds 00:01.0 (removal refused).
struct FakeVm {
    adis: Mutex<Vec<u8>>,
    stopped: Mutex<bool>,
}

const CAPACITY: usize = 16;

fn id(slot: u8) -> String {
    format!("0000:00:{slot:02x}.0")
}

impl VmControl for FakeVm {
    fn info(&self) -> Result<VmInfo, ApiError> {
        let devices = self.adis.lock().unwrap().iter().map(|s| DeviceInfo { id: id(*s), kind: DeviceKind::Adi }).collect();
        Ok(VmInfo { vcpus: 1, memory_mib: 64, devices, ims_entries: 0, guest_ims_slots: 0, kvm_routes: 0, overflow_vectors: 0 })
    }
    fn add_adis(&self, count: u32) -> Result<Vec<DeviceInfo>, ApiError> {
        let mut adis = self.adis.lock().unwrap();
        let free: Vec<u8> = (1..=CAPACITY as u8).filter(|s| !adis.contains(s)).take(count as usize).collect();
        if free.len() < count as usize {
            return Err(ApiError::conflict("no room"));
        }
        adis.extend(&free);
        Ok(free.into_iter().map(|s| DeviceInfo { id: id(s), kind: DeviceKind::Adi }).collect())
    }
    fn add_vfio_user(&self, socket: &str) -> Result<DeviceInfo, ApiError> {
        if !socket.starts_with("/run/devd/") {
            return Err(ApiError::forbidden("outside /run/devd"));
        }
        self.add_adis(1).map(|mut d| d.remove(0))
    }
    fn add_vfio(&self, path: &str) -> Result<DeviceInfo, ApiError> {
        if !path.starts_with("/sys/bus/pci/devices/") {
            return Err(ApiError::bad_request("not a sysfs path"));
        }
        self.add_adis(1).map(|mut d| d.remove(0))
    }
    fn remove_device(&self, device: &str, eject_timeout: std::time::Duration) -> Result<Removed, ApiError> {
        if device == id(1) {
            return Err(ApiError::conflict("in use"));
        }
        // The server bounds the timeout before any VM sees it.
        assert!(eject_timeout <= std::time::Duration::from_millis(u64::from(RemoveDevice::MAX_EJECT_TIMEOUT_MS)));
        let mut adis = self.adis.lock().unwrap();
        let at = adis.iter().position(|s| id(*s) == device).ok_or_else(|| ApiError::not_found("no such device"))?;
        adis.remove(at);
        Ok(Removed { id: device.into(), ejected_by_guest: true })
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        *self.stopped.lock().unwrap() = true;
        Ok(())
    }
}

/// Hands out the request in pieces whose sizes the input's first bytes choose.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let size = self.sizes.get(self.next % self.sizes.len().max(1)).map_or(4096, |s| usize::from(*s) + 1);
        self.next += 1;
        let n = size.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

const STATUSES: [u16; 12] = [200, 204, 400, 403, 404, 405, 408, 409, 413, 431, 500, 501];

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let (sizes, request) = rest.split_at(usize::from(n % 8).min(rest.len()));
    let vm = FakeVm { adis: Mutex::new(vec![1]), stopped: Mutex::new(false) };
    let answer: Response = match read_request(&mut Pieces { data: request, sizes, next: 0 }) {
        Ok(req) => {
            let before = vm.adis.lock().unwrap().clone();
            let answer = server::handle(&vm, &req);
            let after = vm.adis.lock().unwrap().clone();
            match answer.status {
                200 if req.path.ends_with("/vm.add-adi") || req.path.ends_with("/vm.add-vfio-user") => {
                    let added: siovmm_api::Added = serde_json::from_slice(&answer.body).expect("an add's answer is its devices");
                    assert_eq!(after.len(), before.len() + added.devices.len());
                }
                204 if req.path.ends_with("/vm.remove-device") => assert_eq!(after.len() + 1, before.len()),
                204 => assert!(*vm.stopped.lock().unwrap(), "only a shutdown answers 204 otherwise"),
                200 => assert_eq!(after, before, "reads change nothing"),
                _ => {
                    assert_eq!(after, before, "a refused request changed the VM");
                    assert!(!*vm.stopped.lock().unwrap());
                    let e: siovmm_api::ErrorBody = serde_json::from_slice(&answer.body).expect("every refusal is an ErrorBody");
                    assert!(!e.error.is_empty() && !e.error.contains('\n'), "one line: {:?}", e.error);
                }
            }
            answer
        }
        Err(e) => match e.status() {
            Some(status) => Response { status, headers: Vec::new(), body: Vec::new() },
            None => return,
        },
    };
    assert!(STATUSES.contains(&answer.status), "status {}", answer.status);
    let mut wire = Vec::new();
    answer.write_to(&mut wire).unwrap();
});
