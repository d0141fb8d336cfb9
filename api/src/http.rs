//! One HTTP/1.1 exchange per connection: the request head parsed by `httparse`, the body
//! framed by `Content-Length`, the answer written with `Connection: close`. Limits bound
//! what a client can make siovmm hold: [`MAX_HEAD`], [`MAX_HEADERS`], [`MAX_BODY`]; a read
//! timeout on the socket (set by the server) bounds how long.

use std::io::{self, Read, Write};

/// The most bytes of request line and headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most headers.
pub const MAX_HEADERS: usize = 32;
/// The most bytes of body (the API's bodies are a few dozen bytes).
pub const MAX_BODY: u64 = 64 * 1024;

/// A request as the endpoints see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The target, query string included.
    pub path: String,
    /// Exactly `Content-Length` bytes.
    pub body: Vec<u8>,
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The client closed the connection before sending anything.
    #[error("the client closed the connection without a request")]
    Closed,
    /// Reading failed (the read timeout included).
    #[error("reading the request")]
    Io(#[source] io::Error),
    /// The head went past [`MAX_HEAD`] without ending.
    #[error("the request head is longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] headers.
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    /// Not HTTP/1.x as `httparse` reads it, or a bad `Content-Length`.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// `Content-Length` past [`MAX_BODY`].
    #[error("a body of {0} bytes; at most {MAX_BODY} are taken")]
    BodyTooLarge(u64),
    /// `Transfer-Encoding` (chunked bodies): the API takes `Content-Length` only.
    #[error("Transfer-Encoding is not supported: send the body with Content-Length")]
    TransferEncoding,
    /// The connection ended inside the body.
    #[error("the connection closed {got} bytes into a {want}-byte body")]
    ShortBody {
        /// Bytes received.
        got: usize,
        /// `Content-Length`.
        want: u64,
    },
}

impl RequestError {
    /// The status to answer with, or `None` when nobody is left to answer (or the socket
    /// failed).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Closed | Self::ShortBody { .. } => None,
            Self::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Some(408),
            Self::Io(_) => None,
            Self::HeadTooLarge | Self::TooManyHeaders => Some(431),
            Self::Malformed(_) => Some(400),
            Self::BodyTooLarge(_) => Some(413),
            Self::TransferEncoding => Some(501),
        }
    }
}

/// Reads one request from `stream`.
pub fn read_request(stream: &mut impl Read) -> Result<Request, RequestError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (method, path, head_len, length) = loop {
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                RequestError::Closed
            } else {
                RequestError::Malformed("the connection closed inside the request head".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) if head_len > MAX_HEAD => return Err(RequestError::HeadTooLarge),
            Ok(httparse::Status::Complete(head_len)) => {
                let length = body_length(req.headers)?;
                // httparse fills both on a complete parse.
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                break (method, path, head_len, length);
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(RequestError::HeadTooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooManyHeaders),
            Err(e) => return Err(RequestError::Malformed(e.to_string())),
        }
    };
    if length > MAX_BODY {
        return Err(RequestError::BodyTooLarge(length));
    }
    // Bounded by MAX_BODY above.
    let want = length as usize;
    let mut body = buf.split_off(head_len);
    while body.len() < want {
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            return Err(RequestError::ShortBody { got: body.len(), want: length });
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if body.len() > want {
        // One request per connection: anything after the body is not ours to read.
        return Err(RequestError::Malformed(format!("{} bytes after the {want}-byte body (one request per connection)", body.len() - want)));
    }
    Ok(Request { method, path, body })
}

fn read_some(stream: &mut impl Read, chunk: &mut [u8]) -> Result<usize, RequestError> {
    loop {
        match stream.read(chunk) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map_err(RequestError::Io),
        }
    }
}

/// `Content-Length` (0 if absent); repeated values must agree.
fn body_length(headers: &[httparse::Header]) -> Result<u64, RequestError> {
    let mut length: Option<u64> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::TransferEncoding);
        }
        if !h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let text = std::str::from_utf8(h.value).map_err(|_| RequestError::Malformed("Content-Length is not text".into()))?;
        let value: u64 = text
            .trim()
            .parse()
            .ok()
            .filter(|_| text.trim().bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| RequestError::Malformed(format!("Content-Length {text:?} is not a number")))?;
        if length.is_some_and(|l| l != value) {
            return Err(RequestError::Malformed("two different Content-Length headers".into()));
        }
        length = Some(value);
    }
    Ok(length.unwrap_or(0))
}

/// The reason phrase of the statuses the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "",
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// Further headers (`Allow` for a 405).
    pub headers: Vec<(&'static str, String)>,
    /// JSON, or empty (204).
    pub body: Vec<u8>,
}

impl Response {
    /// Writes the answer; the connection closes after it.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut head = format!("HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Length: {}\r\n", self.status, reason(self.status), self.body.len());
        if !self.body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(&self.body)?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its bytes a few at a time, as a socket may.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(out.len()).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn parse(bytes: &[u8]) -> Result<Request, RequestError> {
        read_request(&mut Trickle(bytes, 7))
    }

    #[test]
    fn a_request_with_its_body_arriving_in_pieces() {
        let r = parse(b"PUT /api/v1/vm.add-adi HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{\"count\":2}\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str(), r.body.as_slice()), ("PUT", "/api/v1/vm.add-adi", &b"{\"count\":2}\n"[..]));
        let r = parse(b"GET /api/v1/vm.info HTTP/1.0\r\n\r\n").unwrap();
        assert!(r.body.is_empty());
    }

    #[test]
    fn limits_and_bad_framing_are_refused_with_their_status() {
        let status = |bytes: &[u8]| parse(bytes).map(|_| 0).unwrap_or_else(|e| e.status().unwrap_or(0));
        assert_eq!(status(b""), 0, "nothing sent: nobody to answer");
        assert_eq!(status(b"GET / HTTP/1.1\r\n"), 400, "closed inside the head");
        assert_eq!(status(b"\x00\x01 nonsense\r\n\r\n"), 400);
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(long.as_bytes()), 431);
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "b".repeat(MAX_HEAD + 10));
        assert_eq!(status(endless.as_bytes()), 431, "a head that never ends is cut at the limit");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), 431);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"), 413);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 501);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"), 0, "short body: the client left");
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\n\r\nab"), 400, "bytes after the body");
    }

    #[test]
    fn a_read_timeout_is_answered_408() {
        struct Slow;
        impl Read for Slow {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        assert_eq!(read_request(&mut Slow).unwrap_err().status(), Some(408));
    }

    #[test]
    fn answers_carry_their_length_and_type() {
        let mut out = Vec::new();
        Response { status: 405, headers: vec![("Allow", "GET".into())], body: b"{}".to_vec() }.write_to(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 405 Method Not Allowed\r\nConnection: close\r\nContent-Length: 2\r\nContent-Type: application/json\r\nAllow: GET\r\n\r\n{}"
        );
    }
}
