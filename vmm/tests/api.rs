//! The HTTP API (`--api-socket`, docs/api.md) of a running siovmm, through `siovmm-ctl`: a
//! tiny guest spins while ADIs are added and removed, bad requests are refused with one line
//! and change nothing, and the API thread runs under its seccomp filter (every call it makes
//! for adding and removing ADIs is in its list, or siovmm would stop).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use siovmm_sandbox::{kvm_test, kvm_test_needs};

kvm_test_needs!(env!("CARGO_BIN_EXE_siovmm"));
kvm_test_needs!(env!("CARGO_BIN_EXE_siovmm-ctl"));

#[path = "support/tiny_kernel.rs"]
mod tiny_kernel;

fn tmp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("siovmm-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `siovmm-ctl --api-socket SOCKET ARGS...`: exit status, stdout, stderr.
fn ctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_siovmm-ctl")).arg("--api-socket").arg(socket).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// `info`'s devices, as `id kind` words.
fn devices(socket: &Path) -> Vec<String> {
    let (code, out, err) = ctl(socket, &["info"]);
    assert_eq!(code, 0, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    info["devices"].as_array().unwrap().iter().map(|d| format!("{} {}", d["id"].as_str().unwrap(), d["kind"].as_str().unwrap())).collect()
}

fn info_number(socket: &Path, key: &str) -> u64 {
    let (_, out, _) = ctl(socket, &["info"]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    info[key].as_u64().unwrap_or_else(|| panic!("{key} in {out}"))
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A siovmm with `args` serving its API, its guest spinning; returns once the API answers.
/// Everything lives in a directory of its own (the tests of this binary run side by side).
/// With `log`, siovmm logs at info level to a pipe the test reads at the end (so only for a
/// few requests: a pipe nobody reads would stall siovmm); without, its stderr is dropped.
struct ApiVm {
    dir: PathBuf,
    socket: PathBuf,
    child: KillOnDrop,
}

impl ApiVm {
    fn start(name: &str, args: &[&str], log: bool) -> Self {
        let dir = tmp_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("k-spin");
        std::fs::write(&kernel, tiny_kernel::elf(&[0xeb, 0xfe])).unwrap();
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_siovmm"))
                .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64M", "--cpus", "2"])
                .args(args)
                .arg("--api-socket")
                .arg(&socket)
                .env("SIOVMM_LOG", if log { "info" } else { "warn" })
                .stdin(Stdio::null())
                .stderr(if log { Stdio::piped() } else { Stdio::null() })
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while siovmm_api::client::call(&socket, "GET", "/api/v1/vmm.ping", None).is_err() {
            assert!(child.0.try_wait().unwrap().is_none(), "siovmm ended");
            assert!(Instant::now() < deadline, "no API at {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { dir, socket, child }
    }
}

kvm_test! {
    fn adis_come_and_go_through_the_api_and_bad_requests_change_nothing() {
        let ApiVm { dir, socket, mut child } = ApiVm::start("come-and-go", &["--adi", "2", "--siov-adis", "8"], true);
        let (_, version, _) = ctl(&socket, &["ping"]);
        assert_eq!(version, format!(r#"{{"version":"{}"}}"#, env!("CARGO_PKG_VERSION")));

        // The two ADIs of --adi, then three more (a slot of their own: functions of a slot
        // are composed together), then one removed.
        assert_eq!(devices(&socket), ["0000:00:01.0 adi", "0000:00:01.1 adi"]);
        let ims_before = info_number(&socket, "ims_entries");
        let (code, out, err) = ctl(&socket, &["add-adi", "3"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, r#"{"devices":[{"id":"0000:00:02.0","kind":"adi"},{"id":"0000:00:02.1","kind":"adi"},{"id":"0000:00:02.2","kind":"adi"}]}"#);
        assert_eq!(devices(&socket).len(), 5);
        let ims_five = info_number(&socket, "ims_entries");
        assert!(ims_five > ims_before, "IMS entries of the new ADIs: {ims_before} -> {ims_five}");
        // The tiny guest takes no hotplug events (no ACPI: the event device's pin stays
        // masked), so it is not asked; its ADIs are not in use, so they go at once.
        let removed = r#"{"id":"0000:00:01.1","ejected_by_guest":false}"#;
        assert_eq!(ctl(&socket, &["remove", "0000:00:01.1"]), (0, removed.to_string(), String::new()));
        // Function 0 of a slot with functions left is refused.
        let (code, _, err) = ctl(&socket, &["remove", "0000:00:02.0"]);
        assert_eq!((code, err.as_str()), (1, "siovmm-ctl: 409: 0000:00:02.0 is function 0 of a slot whose other functions (0000:00:02.1, 0000:00:02.2) stay: a guest finds a slot's functions through function 0, so it leaves last"));
        assert_eq!(devices(&socket), ["0000:00:01.0 adi", "0000:00:02.0 adi", "0000:00:02.1 adi", "0000:00:02.2 adi"]);
        assert_eq!(info_number(&socket, "ims_entries"), ims_five / 5 * 4, "the removed ADI's entries went back");

        // Bad requests: one line each, exit 1, nothing changed.
        let before = devices(&socket);
        let refused: [(&[&str], &str); 9] = [
            (&["add-adi", "0"], "siovmm-ctl: 400: count 0: 1 to 3968 ADIs per request"),
            (&["add-adi", "5"], "siovmm-ctl: 409: 5 ADIs requested; the SIOV device has 4 this VM does not already hold"),
            (&["remove", "0000:00:1f.0"], "siovmm-ctl: 404: no device 0000:00:1f.0"),
            (&["remove", "0000:00:01.1"], "siovmm-ctl: 404: no device 0000:00:01.1"),
            (&["remove", "01.0"], "siovmm-ctl: 400: \"01.0\" is not a PCI address (SSSS:BB:DD.F)"),
            (&["request", "PUT", "/api/v1/vm.add-adi", "{\"count\": 1"], "siovmm-ctl: 400: the body of vm.add-adi: EOF while parsing an object at line 1 column 11"),
            (&["request", "PUT", "/api/v1/vm.add-adi", "{\"count\": 1, \"from\": \"/dev/vfio/7\"}"], "siovmm-ctl: 400: the body of vm.add-adi: unknown field `from`, expected `count` at line 1 column 19"),
            (&["request", "DELETE", "/api/v1/vm.info"], "siovmm-ctl: 405: DELETE /api/v1/vm.info: the endpoint takes GET"),
            (&["request", "GET", "/api/v1/../../etc/passwd"], "siovmm-ctl: 404: no endpoint \"/api/v1/../../etc/passwd\"; there are: GET /api/v1/vmm.ping, GET /api/v1/vm.info, PUT /api/v1/vm.add-adi, PUT /api/v1/vm.add-vfio-user, PUT /api/v1/vm.add-vfio, PUT /api/v1/vm.remove-device, PUT /api/v1/vm.shutdown"),
        ];
        for (args, line) in refused {
            assert_eq!(ctl(&socket, args), (1, String::new(), line.to_string()), "{args:?}");
        }
        assert_eq!(devices(&socket), before, "refused requests changed nothing");

        // The API thread has its filter (one, in filter mode), as every other thread.
        let census = siovmm_seccomp::thread_filters_settled(child.0.id(), Duration::from_secs(10), |c| c.iter().any(|(n, s)| n == "siovmm-api" && s == "2 1"));
        assert!(census.iter().any(|(n, s)| n == "siovmm-api" && s == "2 1"), "{census:?}");

        // Stop through the API: exit 0, the socket gone, the log naming what the API did.
        assert_eq!(ctl(&socket, &["shutdown"]), (0, String::new(), String::new()));
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "siovmm did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(!socket.exists(), "the socket is removed at exit");
        for line in ["siovmm: info: api: added 3 ADIs", "siovmm: info: api: removed the device at 0000:00:01.1, without the guest's eject", "siovmm: info: api: stopping the VM"] {
            assert!(err.lines().any(|l| l == line), "{line:?} in:\n{err}");
        }
        assert!(!err.contains("seccomp"), "{err}");
        let (code, _, e) = ctl(&socket, &["info"]);
        assert_eq!((code, e), (1, format!("siovmm-ctl: connecting to {}: No such file or directory (os error 2)", socket.display())));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Open file descriptors and resident memory (KiB) of process `pid`.
fn footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").parse().ok()).unwrap();
    (fds, rss)
}

kvm_test! {
    sandbox_idle_secs: 10;
    /// 1,000 ADIs added and removed one at a time through the API of one running siovmm:
    /// file descriptors, IMS entries and KVM routes come back to where they were, and
    /// resident memory stays flat (within 1 MiB, after 50 cycles to warm up allocators).
    fn a_thousand_add_remove_cycles_through_the_api_leave_nothing_behind() {
        use siovmm_api::client::call;
        // No ADI at start: the first comes through the API (the SIOV device is opened at
        // build all the same, by the unfiltered main thread).
        let ApiVm { dir, socket, child } = ApiVm::start("cycles", &["--adi", "0"], false);
        let pid = child.0.id();
        let info = || -> (u64, u64, usize) {
            let (status, body) = call(&socket, "GET", "/api/v1/vm.info", None).unwrap();
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            (v["ims_entries"].as_u64().unwrap(), v["kvm_routes"].as_u64().unwrap(), v["devices"].as_array().unwrap().len())
        };
        let (mut adding, mut removing) = (Duration::ZERO, Duration::ZERO);
        let mut cycle = || {
            let t = Instant::now();
            let (status, body) = call(&socket, "PUT", "/api/v1/vm.add-adi", Some(r#"{"count":1}"#)).unwrap();
            assert_eq!(status, 200, "{body}");
            adding += t.elapsed();
            let added: siovmm_api::Added = serde_json::from_str(&body).unwrap();
            let remove = serde_json::to_string(&siovmm_api::RemoveDevice { id: added.devices[0].id.clone(), eject_timeout_ms: None }).unwrap();
            let t = Instant::now();
            let (status, body) = call(&socket, "PUT", "/api/v1/vm.remove-device", Some(&remove)).unwrap();
            assert_eq!(status, 200, "{body}");
            removing += t.elapsed();
        };
        for _ in 0..50 {
            cycle();
        }
        let (before, held_before) = (footprint(pid), info());
        let start = Instant::now();
        for _ in 0..1000 {
            cycle();
        }
        let took = start.elapsed();
        let (after, held_after) = (footprint(pid), info());
        println!(
            "1,000 API add/remove cycles in {:.1} s (all 1,050: adding {:.1} ms, removing {:.1} ms each): fds {} -> {}, RSS {} -> {} KiB, \
             (IMS entries, KVM routes, devices) {held_before:?} -> {held_after:?}",
            took.as_secs_f64(),
            adding.as_secs_f64() * 1000.0 / 1050.0,
            removing.as_secs_f64() * 1000.0 / 1050.0,
            before.0,
            after.0,
            before.1,
            after.1
        );
        assert_eq!(held_after, held_before, "IMS entries, routes and devices");
        assert_eq!(after.0, before.0, "file descriptors");
        assert!(after.1 <= before.1 + 1024, "resident memory grew {} KiB", after.1 - before.1);
        drop(child);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_bad_api_socket_is_refused_before_the_vm_exists() {
    let dir = tmp_dir().join("bad-socket");
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("k");
    std::fs::write(&kernel, tiny_kernel::elf(&[0xeb, 0xfe])).unwrap();
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let cases = [
        (taken.clone(), format!("siovmm: --api-socket {}: already exists (another VM's socket? remove it, or choose another path)", taken.display())),
        (dir.join("none/api.sock"), format!("siovmm: --api-socket {}: No such file or directory (os error 2)", dir.join("none/api.sock").display())),
    ];
    for (path, line) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_siovmm"))
            .args(["--kernel", kernel.to_str().unwrap(), "--memory", "64M"])
            .arg("--api-socket")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), line);
    }
    assert!(taken.exists(), "a path that was there is left alone");
    std::fs::remove_dir_all(&dir).unwrap();
}
