//! The endpoints and the loop that serves them.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /api/v1/vmm.ping | — | 200 [`Ping`] |
//! | GET | /api/v1/vm.info | — | 200 [`VmInfo`] |
//! | PUT | /api/v1/vm.add-adi | [`AddAdis`] | 200 [`Added`] |
//! | PUT | /api/v1/vm.add-vfio-user | [`AddVfioUser`] | 200 [`Added`] |
//! | PUT | /api/v1/vm.add-vfio | [`AddVfio`] | 200, [`Added`] |
//! | PUT | /api/v1/vm.remove-device | [`RemoveDevice`] | 200, [`Removed`] |
//! | PUT | /api/v1/vm.shutdown | — | 204 |
//!
//! Every error is a status and an [`ErrorBody`]. Connections are served one at a time, each
//! for one request, with [`REQUEST_TIMEOUT`] to send it: a client that stalls holds the API
//! that long at most.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::{self, Request, Response};
use crate::{AddAdis, AddVfio, AddVfioUser, Added, ApiError, ErrorBody, Ping, RemoveDevice, Removed, VmControl, PREFIX};

/// How long a client has to send its request, and to take the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoints: name after [`PREFIX`], and method.
pub const ENDPOINTS: [(&str, &str); 7] = [
    ("vmm.ping", "GET"),
    ("vm.info", "GET"),
    ("vm.add-adi", "PUT"),
    ("vm.add-vfio-user", "PUT"),
    ("vm.add-vfio", "PUT"),
    ("vm.remove-device", "PUT"),
    ("vm.shutdown", "PUT"),
];

/// Answers `req`, acting on `vm`.
pub fn handle(vm: &dyn VmControl, req: &Request) -> Response {
    match route(vm, req) {
        Ok(r) => r,
        Err((e, allow)) => {
            let mut r = json(e.status, &ErrorBody { error: one_line(&e.message) });
            if let Some(method) = allow {
                r.headers.push(("Allow", method.to_string()));
            }
            r
        }
    }
}

/// `message` with its control characters escaped (`\n` as the two characters `\` `n`): an
/// error names the bad value, and a client's value may hold newlines (an unknown JSON field
/// `"a\nb"`, found by the `api_request` fuzz target); an error stays one line.
fn one_line(message: &str) -> String {
    message.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// An error, and for a 405 the method the endpoint takes.
type Refusal = (ApiError, Option<&'static str>);

fn route(vm: &dyn VmControl, req: &Request) -> Result<Response, Refusal> {
    let name = req.path.strip_prefix(PREFIX).and_then(|p| p.strip_prefix('/')).unwrap_or("");
    let Some(&(name, method)) = ENDPOINTS.iter().find(|(n, _)| *n == name) else {
        let known: Vec<String> = ENDPOINTS.iter().map(|(n, m)| format!("{m} {PREFIX}/{n}")).collect();
        return Err((ApiError::not_found(format!("no endpoint {:?}; there are: {}", req.path, known.join(", "))), None));
    };
    if req.method != method {
        return Err((ApiError { status: 405, message: format!("{} {PREFIX}/{name}: the endpoint takes {method}", req.method) }, Some(method)));
    }
    let plain = |e: ApiError| (e, None);
    match name {
        "vmm.ping" => {
            no_body(name, req).map_err(plain)?;
            Ok(json(200, &Ping { version: env!("CARGO_PKG_VERSION").into() }))
        }
        "vm.info" => {
            no_body(name, req).map_err(plain)?;
            Ok(json(200, &vm.info().map_err(plain)?))
        }
        "vm.add-adi" => {
            let add: AddAdis = body(name, req).map_err(plain)?;
            if !(1..=AddAdis::MAX).contains(&add.count) {
                return Err(plain(ApiError::bad_request(format!("count {}: 1 to {} ADIs per request", add.count, AddAdis::MAX))));
            }
            Ok(json(200, &Added { devices: vm.add_adis(add.count).map_err(plain)? }))
        }
        "vm.add-vfio-user" => {
            let add: AddVfioUser = body(name, req).map_err(plain)?;
            Ok(json(200, &Added { devices: vec![vm.add_vfio_user(&add.socket).map_err(plain)?] }))
        }
        "vm.add-vfio" => {
            let add: AddVfio = body(name, req).map_err(plain)?;
            Ok(json(200, &Added { devices: vec![vm.add_vfio(&add.path).map_err(plain)?] }))
        }
        "vm.remove-device" => {
            let remove: RemoveDevice = body(name, req).map_err(plain)?;
            let ms = remove.eject_timeout_ms.unwrap_or(RemoveDevice::EJECT_TIMEOUT_MS);
            if ms > RemoveDevice::MAX_EJECT_TIMEOUT_MS {
                return Err(plain(ApiError::bad_request(format!(
                    "eject_timeout_ms {ms}: at most {} (ten minutes)",
                    RemoveDevice::MAX_EJECT_TIMEOUT_MS
                ))));
            }
            let removed: Removed = vm.remove_device(&remove.id, std::time::Duration::from_millis(u64::from(ms))).map_err(plain)?;
            Ok(json(200, &removed))
        }
        _ => {
            no_body(name, req).map_err(plain)?;
            vm.shutdown().map_err(plain)?;
            Ok(empty())
        }
    }
}

fn no_body(name: &str, req: &Request) -> Result<(), ApiError> {
    if req.body.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("{name} takes no body ({} bytes sent)", req.body.len())))
    }
}

fn body<T: DeserializeOwned>(name: &str, req: &Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body).map_err(|e| ApiError::bad_request(format!("the body of {name}: {e}")))
}

fn json(status: u16, value: &impl Serialize) -> Response {
    // Serializing these plain structs cannot fail; an empty body would say so if it did.
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response { status, headers: Vec::new(), body }
}

fn empty() -> Response {
    Response { status: 204, headers: Vec::new(), body: Vec::new() }
}

/// Serves `listener` for `vm` until `stop` is readable (an eventfd the VMM signals when the
/// VM is released), giving each client `timeout` ([`REQUEST_TIMEOUT`]) to send its request.
/// Fails only if waiting itself fails; a client's failure is logged.
pub fn serve(listener: &UnixListener, vm: &dyn VmControl, stop: &impl AsRawFd, timeout: Duration) -> io::Result<()> {
    // A client that connects and vanishes before accept must not block the loop.
    listener.set_nonblocking(true)?;
    loop {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        match listener.accept() {
            Ok((stream, _)) => serve_one(stream, vm, timeout),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => log::warn!("api: accepting a connection: {e}"),
        }
    }
}

fn serve_one(mut stream: std::os::unix::net::UnixStream, vm: &dyn VmControl, timeout: Duration) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .and_then(|()| stream.set_write_timeout(Some(timeout)));
    if let Err(e) = setup {
        log::warn!("api: setting up a connection: {e}");
        return;
    }
    let (line, answer) = match http::read_request(&mut stream) {
        Ok(req) => {
            let answer = handle(vm, &req);
            (format!("{} {}", req.method, req.path), Some(answer))
        }
        Err(e) => {
            let answer = e.status().map(|status| json(status, &ErrorBody { error: e.to_string() }));
            (format!("unreadable request ({e})"), answer)
        }
    };
    if let Some(answer) = answer {
        log::info!("api: {line}: {}", answer.status);
        if let Err(e) = answer.write_to(&mut stream) {
            log::warn!("api: answering {line}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceInfo, DeviceKind, VmInfo};
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    /// A VM of ADIs at 00:01.0 onwards; the ones listed in `busy` are in use by the guest.
    #[derive(Default)]
    struct FakeVm {
        adis: Mutex<Vec<String>>,
        busy: Vec<String>,
        stopped: Mutex<bool>,
        capacity: u32,
    }

    impl FakeVm {
        /// One passed-through device of `kind` in the next slot.
        fn plug(&self, kind: DeviceKind) -> DeviceInfo {
            let mut devices = self.adis.lock().unwrap();
            let id = format!("0000:00:{:02x}.0", devices.len() + 1);
            devices.push(id.clone());
            DeviceInfo { id, kind }
        }
    }

    impl VmControl for FakeVm {
        fn info(&self) -> Result<VmInfo, ApiError> {
            let devices = self.adis.lock().unwrap().iter().map(|id| DeviceInfo { id: id.clone(), kind: DeviceKind::Adi }).collect();
            Ok(VmInfo { vcpus: 2, memory_mib: 512, devices, ims_entries: 0, guest_ims_slots: 0, kvm_routes: 0, overflow_vectors: 0 })
        }
        fn add_adis(&self, count: u32) -> Result<Vec<DeviceInfo>, ApiError> {
            let mut adis = self.adis.lock().unwrap();
            if adis.len() as u32 + count > self.capacity {
                return Err(ApiError::conflict(format!("{count} ADIs: {} left", self.capacity - adis.len() as u32)));
            }
            let first = adis.len();
            let new: Vec<String> = (first..first + count as usize).map(|i| format!("0000:00:{:02x}.0", i + 1)).collect();
            adis.extend(new.iter().cloned());
            Ok(new.into_iter().map(|id| DeviceInfo { id, kind: DeviceKind::Adi }).collect())
        }
        fn add_vfio_user(&self, socket: &str) -> Result<DeviceInfo, ApiError> {
            if !socket.starts_with("/run/devd/") {
                return Err(ApiError::forbidden(format!("{socket}: outside /run/devd")));
            }
            Ok(self.plug(DeviceKind::VfioUser))
        }
        fn add_vfio(&self, path: &str) -> Result<DeviceInfo, ApiError> {
            if !path.starts_with("/sys/bus/pci/devices/") {
                return Err(ApiError::bad_request(format!("{path}: not a PCI device's sysfs directory")));
            }
            Ok(self.plug(DeviceKind::Vfio))
        }
        fn remove_device(&self, id: &str, eject_timeout: std::time::Duration) -> Result<Removed, ApiError> {
            if self.busy.iter().any(|b| b == id) {
                return Err(ApiError::conflict(format!("{id} is in use by the guest")));
            }
            let mut adis = self.adis.lock().unwrap();
            let at = adis.iter().position(|a| a == id).ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
            adis.remove(at);
            // The fake guest ejects whatever it is given time for.
            Ok(Removed { id: id.into(), ejected_by_guest: !eject_timeout.is_zero() })
        }
        fn shutdown(&self) -> Result<(), ApiError> {
            *self.stopped.lock().unwrap() = true;
            Ok(())
        }
    }

    fn call(vm: &FakeVm, method: &str, path: &str, body: &str) -> (u16, String) {
        let r = handle(vm, &Request { method: method.into(), path: path.into(), body: body.as_bytes().to_vec() });
        (r.status, String::from_utf8(r.body).unwrap())
    }

    fn error(text: &str) -> String {
        serde_json::from_str::<ErrorBody>(text).unwrap().error
    }

    #[test]
    fn adis_are_added_listed_and_removed() {
        let vm = FakeVm { capacity: 4, ..Default::default() };
        let (status, body) = call(&vm, "PUT", "/api/v1/vm.add-adi", r#"{"count": 2}"#);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, r#"{"devices":[{"id":"0000:00:01.0","kind":"adi"},{"id":"0000:00:02.0","kind":"adi"}]}"#);
        let (status, body) = call(&vm, "GET", "/api/v1/vm.info", "");
        assert_eq!(status, 200);
        let info: VmInfo = serde_json::from_str(&body).unwrap();
        assert_eq!(info.devices.len(), 2);
        assert_eq!(
            call(&vm, "PUT", "/api/v1/vm.remove-device", r#"{"id":"0000:00:01.0"}"#),
            (200, r#"{"id":"0000:00:01.0","ejected_by_guest":true}"#.into())
        );
        assert_eq!(*vm.adis.lock().unwrap(), ["0000:00:02.0"]);
        assert_eq!(call(&vm, "PUT", "/api/v1/vm.shutdown", ""), (204, String::new()));
        assert!(*vm.stopped.lock().unwrap());
        let (status, body) = call(&vm, "GET", "/api/v1/vmm.ping", "");
        assert_eq!((status, body), (200, format!(r#"{{"version":"{}"}}"#, env!("CARGO_PKG_VERSION"))));
    }

    #[test]
    fn bad_requests_get_one_clear_error_and_change_nothing() {
        let vm = FakeVm { capacity: 4, busy: vec!["0000:00:01.0".into()], ..Default::default() };
        vm.add_adis(1).unwrap();
        let cases: [(&str, &str, &str, u16, &str); 17] = [
            ("PUT", "/api/v1/vm.add-vfio-user", r#"{"socket": "/etc/passwd"}"#, 403, "/etc/passwd: outside /run/devd"),
            ("PUT", "/api/v1/vm.add-vfio-user", r#"{"path": "/run/devd/adi-0.sock"}"#, 400, "the body of vm.add-vfio-user: unknown field `path`, expected `socket` at line 1 column 7"),
            ("PUT", "/api/v1/vm.add-adi", "{\"count\": 2", 400, "the body of vm.add-adi: EOF while parsing an object at line 1 column 11"),
            ("PUT", "/api/v1/vm.add-adi", "", 400, "the body of vm.add-adi: EOF while parsing a value at line 1 column 0"),
            ("PUT", "/api/v1/vm.add-adi", r#"{"count": -1}"#, 400, "the body of vm.add-adi: invalid value: integer `-1`, expected u32 at line 1 column 12"),
            ("PUT", "/api/v1/vm.add-adi", r#"{"count": 1, "kind": "nvme"}"#, 400, "the body of vm.add-adi: unknown field `kind`, expected `count` at line 1 column 19"),
            ("PUT", "/api/v1/vm.add-adi", r#"{"count": 0}"#, 400, "count 0: 1 to 3968 ADIs per request"),
            ("PUT", "/api/v1/vm.add-adi", r#"{"count": 4}"#, 409, "4 ADIs: 3 left"),
            ("PUT", "/api/v1/vm.remove-device", r#"{"id": "0000:00:07.0"}"#, 404, "no device 0000:00:07.0"),
            ("PUT", "/api/v1/vm.add-vfio", r#"{"path": "/dev/nvme0"}"#, 400, "/dev/nvme0: not a PCI device's sysfs directory"),
            ("PUT", "/api/v1/vm.remove-device", r#"{"id": "0000:00:01.0"}"#, 409, "0000:00:01.0 is in use by the guest"),
            ("PUT", "/api/v1/vm.remove-device", r#"{"id": "0000:00:02.0", "eject_timeout_ms": 600001}"#, 400, "eject_timeout_ms 600001: at most 600000 (ten minutes)"),
            ("PUT", "/api/v1/vm.remove-device", r#"{"id": "0000:00:02.0", "eject_timeout_ms": -1}"#, 400, "the body of vm.remove-device: invalid value: integer `-1`, expected u32 at line 1 column 45"),
            ("GET", "/api/v1/vm.add-adi", "", 405, "GET /api/v1/vm.add-adi: the endpoint takes PUT"),
            ("GET", "/api/v1/vm.info", "{}", 400, "vm.info takes no body (2 bytes sent)"),
            ("PUT", "/api/v1/vm.shutdown", "now", 400, "vm.shutdown takes no body (3 bytes sent)"),
            ("GET", "/api/v2/vm.info", "", 404, "no endpoint \"/api/v2/vm.info\"; there are: GET /api/v1/vmm.ping, GET /api/v1/vm.info, PUT /api/v1/vm.add-adi, PUT /api/v1/vm.add-vfio-user, PUT /api/v1/vm.add-vfio, PUT /api/v1/vm.remove-device, PUT /api/v1/vm.shutdown"),
        ];
        for (method, path, body, status, message) in cases {
            let (got, text) = call(&vm, method, path, body);
            assert_eq!((got, error(&text).as_str()), (status, message), "{method} {path} {body}");
        }
        // A value with a newline in it is named on one line.
        let (status, text) = call(&vm, "PUT", "/api/v1/vm.add-adi", "{\"c2\\nt\":6}");
        assert_eq!((status, error(&text).as_str()), (400, "the body of vm.add-adi: unknown field `c2\\nt`, expected `count` at line 1 column 8"));
        assert_eq!(*vm.adis.lock().unwrap(), ["0000:00:01.0"], "nothing changed");
        assert!(!*vm.stopped.lock().unwrap());
        let r = handle(&vm, &Request { method: "PUT".into(), path: "/api/v1/vm.info".into(), body: Vec::new() });
        assert_eq!(r.headers, [("Allow", "GET".to_string())]);
    }

    /// docs/api.yaml (the OpenAPI description) names every endpoint with its method, and no
    /// other path.
    #[test]
    fn the_openapi_description_lists_the_endpoints() {
        let yaml = include_str!("../../docs/api.yaml");
        let paths: Vec<&str> = yaml.lines().filter_map(|l| l.strip_prefix("  /")?.strip_suffix(':')).collect();
        let names: Vec<&str> = ENDPOINTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(paths, names);
        for (name, method) in ENDPOINTS {
            let at = yaml.find(&format!("\n  /{name}:\n")).unwrap();
            let next = yaml[at + 1..].find("\n  /").map_or(yaml.len(), |n| at + 1 + n);
            assert!(yaml[at..next].contains(&format!("\n    {}:\n", method.to_lowercase())), "{name} {method}");
        }
    }

    #[test]
    fn the_loop_serves_clients_and_stops_when_told() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("siovmm-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let vm = std::sync::Arc::new(FakeVm { capacity: 8, ..Default::default() });
        let stop = EventFd::new(0).unwrap();
        let server = {
            let (vm, stop) = (vm.clone(), stop.try_clone().unwrap());
            std::thread::spawn(move || serve(&listener, vm.as_ref(), &stop, Duration::from_millis(200)))
        };
        // A client that connects and says nothing is cut off at the timeout; meanwhile the
        // others wait, then are served.
        let mut silent = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (status, body) = crate::client::call(&path, "PUT", "/api/v1/vm.add-adi", Some(r#"{"count":3}"#)).unwrap();
        assert_eq!(status, 200, "{body}");
        let mut answer = String::new();
        silent.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
        // Raw garbage gets a 400 and the loop goes on.
        let mut raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
        raw.write_all(b"\x16\x03\x01 hello\r\n\r\n").unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
        assert_eq!(vm.adis.lock().unwrap().len(), 3);
        stop.write(1).unwrap();
        server.join().unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
