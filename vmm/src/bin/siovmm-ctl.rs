//! siovmm-ctl: siovmm's API from the shell (docs/api.md).
//!
//! Prints the answer's JSON on stdout and exits 0 when siovmm did it; prints siovmm's error
//! line on stderr and exits 1 when it refused or could not be reached; exits 2 on bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

use siovmm_api::{client, AddAdis, AddVfio, AddVfioUser, ErrorBody, RemoveDevice, PREFIX};

const USAGE: &str = "usage: siovmm-ctl --api-socket PATH COMMAND
commands:
  ping                    siovmm's version (is the API up?)
  info                    vCPUs, memory, devices, IMS entries and KVM routes in use
  add-adi N               add N ADIs (all or none); prints their PCI addresses
  add-vfio-user SOCKET    add the vfio-user device served on SOCKET (under the VM's
                          --vfio-user-dir), such as an ADI of siovmm-devd
  add-vfio PATH           pass the host device at PATH (/sys/bus/pci/devices/DDDD:BB:DD.F,
                          bound to vfio-pci) through with kernel VFIO
  remove DEVICE [MS]      remove a device by its PCI address (SSSS:BB:DD.F): the guest is
                          asked to eject it and given MS milliseconds (default 10000)
  shutdown                stop the VM
  request METHOD PATH [BODY]
                          any request, BODY sent as is (for testing the API)
";

/// A request: method, path, body.
type Call = (String, String, Option<String>);

/// Plain structs of numbers and strings: serializing them cannot fail.
fn json(serialized: serde_json::Result<String>) -> String {
    serialized.unwrap_or_default()
}

fn parse(args: &[String]) -> Result<(PathBuf, Call), String> {
    let (socket, rest) = match args {
        [flag, path, rest @ ..] if flag == "--api-socket" => (PathBuf::from(path), rest),
        _ => return Err("--api-socket PATH comes first".into()),
    };
    let call = match rest {
        [c] if c == "ping" => ("GET".into(), format!("{PREFIX}/vmm.ping"), None),
        [c] if c == "info" => ("GET".into(), format!("{PREFIX}/vm.info"), None),
        [c, n] if c == "add-adi" => {
            let count: u32 = n.parse().map_err(|_| format!("add-adi {n:?}: not a number of ADIs"))?;
            ("PUT".into(), format!("{PREFIX}/vm.add-adi"), Some(json(serde_json::to_string(&AddAdis { count }))))
        }
        [c, socket] if c == "add-vfio-user" => {
            ("PUT".into(), format!("{PREFIX}/vm.add-vfio-user"), Some(json(serde_json::to_string(&AddVfioUser { socket: socket.clone() }))))
        }
        [c, path] if c == "add-vfio" => {
            ("PUT".into(), format!("{PREFIX}/vm.add-vfio"), Some(json(serde_json::to_string(&AddVfio { path: path.clone() }))))
        }
        [c, id, ms @ ..] if c == "remove" && ms.len() <= 1 => {
            let eject_timeout_ms = match ms {
                [ms] => Some(ms.parse().map_err(|_| format!("remove {id} {ms:?}: not a number of milliseconds"))?),
                _ => None,
            };
            let remove = RemoveDevice { id: id.clone(), eject_timeout_ms };
            ("PUT".into(), format!("{PREFIX}/vm.remove-device"), Some(json(serde_json::to_string(&remove))))
        }
        [c] if c == "shutdown" => ("PUT".into(), format!("{PREFIX}/vm.shutdown"), None),
        [c, method, path] if c == "request" => (method.clone(), path.clone(), None),
        [c, method, path, body] if c == "request" => (method.clone(), path.clone(), Some(body.clone())),
        [] => return Err("no command".into()),
        [c, ..] => return Err(format!("{c:?}: not a command, or wrong arguments for it")),
    };
    Ok((socket, call))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let (socket, (method, path, body)) = match parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("siovmm-ctl: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match client::call(&socket, &method, &path, body.as_deref()) {
        Ok((status, body)) if (200..300).contains(&status) => {
            if !body.is_empty() {
                println!("{body}");
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let message = serde_json::from_str::<ErrorBody>(&body).map(|e| e.error).unwrap_or(body);
            eprintln!("siovmm-ctl: {status}: {message}");
            ExitCode::from(1)
        }
        Err(e) => {
            let mut line = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                line.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("siovmm-ctl: {line}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn commands_become_requests() {
        let (socket, call) = parse(&args("--api-socket /run/a.sock add-adi 64")).unwrap();
        assert_eq!(socket, PathBuf::from("/run/a.sock"));
        assert_eq!(call, ("PUT".into(), "/api/v1/vm.add-adi".into(), Some(r#"{"count":64}"#.into())));
        let (_, call) = parse(&args("--api-socket s remove 0000:01:02.3")).unwrap();
        assert_eq!(call.2.as_deref(), Some(r#"{"id":"0000:01:02.3"}"#));
        let (_, call) = parse(&args("--api-socket s remove 0000:01:02.3 500")).unwrap();
        assert_eq!(call.2.as_deref(), Some(r#"{"id":"0000:01:02.3","eject_timeout_ms":500}"#));
        assert_eq!(parse(&args("--api-socket s remove 0000:01:02.3 soon")).unwrap_err(), "remove 0000:01:02.3 \"soon\": not a number of milliseconds");
        let (_, call) = parse(&args("--api-socket s add-vfio /sys/bus/pci/devices/0000:00:04.0")).unwrap();
        assert_eq!(call.2.as_deref(), Some(r#"{"path":"/sys/bus/pci/devices/0000:00:04.0"}"#));
        assert_eq!(parse(&args("--api-socket s add-adi many")).unwrap_err(), "add-adi \"many\": not a number of ADIs");
        assert_eq!(parse(&args("info")).unwrap_err(), "--api-socket PATH comes first");
        assert_eq!(parse(&args("--api-socket s reboot")).unwrap_err(), "\"reboot\": not a command, or wrong arguments for it");
    }
}
