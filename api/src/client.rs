//! One request to siovmm's API socket and its answer.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the answer may take: adding thousands of ADIs is seconds of work.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// The most bytes of answer taken (the info of a VM with thousands of devices is ~100 KiB).
const MAX_ANSWER: u64 = 16 << 20;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("connecting to {0}")]
    Connect(PathBuf, #[source] io::Error),
    /// Sending or receiving failed.
    #[error("talking to the API")]
    Io(#[source] io::Error),
    /// The answer is not HTTP.
    #[error("the answer is not HTTP: {0}")]
    Malformed(String),
}

/// Sends `method path` with `body` (JSON) to the API at `socket`; returns the status and the
/// body of the answer.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.to_path_buf(), e))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(ClientError::Io)?;
    let body = body.unwrap_or("");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).map_err(ClientError::Io)?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut answer).map_err(ClientError::Io)?;
    parse_answer(&answer)
}

fn parse_answer(answer: &[u8]) -> Result<(u16, String), ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(answer) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(ClientError::Malformed("the answer ended inside its head".into())),
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = response.code.unwrap_or_default();
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
    let rest = &answer[head..];
    let body = match length {
        Some(n) if n <= rest.len() => &rest[..n],
        Some(n) => return Err(ClientError::Malformed(format!("{} of {n} body bytes", rest.len()))),
        None => rest,
    };
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_by_their_length() {
        let (status, body) = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((status, body.as_str()), (200, "{}"));
        let (status, body) = parse_answer(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((status, body.as_str()), (204, ""));
        assert!(matches!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}"), Err(ClientError::Malformed(m)) if m == "2 of 5 body bytes"));
        assert!(matches!(parse_answer(b"HTTP/1.1 200"), Err(ClientError::Malformed(_))));
        assert!(matches!(parse_answer(b"SSH-2.0\r\n\r\n"), Err(ClientError::Malformed(_))));
    }

    #[test]
    fn a_missing_socket_is_named() {
        let e = call(Path::new("/nonexistent/api.sock"), "GET", "/api/v1/vm.info", None).unwrap_err();
        assert_eq!(e.to_string(), "connecting to /nonexistent/api.sock");
    }
}
