//! A lean HTTP/1.1 client for the load generator: one keep-alive connection, one request at
//! a time, the request bytes built by the caller into a reused buffer, the response head
//! parsed by `httparse` (hyper's own parser) and the body framed by `Content-Length`,
//! chunked transfer coding or the end of the connection.
//!
//! Why not hyper's client: it costs a connection task, a channel and a wake-up per request
//! — ~11–13 µs of CPU per request on the same two cores as the server under test, which
//! then measures the load generator as much as the server. wrk, the reference the issue
//! quotes, is this lean. Both systems in a side-by-side run are driven by the same client.
//!
//! Responses are bounded ([`MAX_HEAD_BYTES`], [`MAX_BODY_BYTES`]); anything malformed is an
//! error, never a panic, and the connection is then dropped.

use std::fmt;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Largest response body accepted.
pub const MAX_BODY_BYTES: usize = 16 << 20;
const MAX_HEADERS: usize = 64;

#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    /// The response is not HTTP/1.x as this client reads it.
    Malformed(&'static str),
    /// The response is larger than the bounds above.
    TooLarge,
    /// The server closed the connection before the response was complete.
    Closed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(err) => write!(f, "connection error: {err}"),
            Error::Malformed(what) => write!(f, "malformed HTTP response: {what}"),
            Error::TooLarge => write!(f, "HTTP response over the size limit"),
            Error::Closed => write!(f, "the server closed the connection mid-response"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Io(err)
    }
}

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(usize),
    Chunked,
    /// No length and not chunked: the body is the rest of the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head, the blank line included.
    pub len: usize,
    pub framing: Framing,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// Parses a response head from the start of `buf`: `Ok(None)` while incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(Error::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Error::Malformed("unparsable head")),
    };
    let status = response.code.ok_or(Error::Malformed("no status"))?;
    let mut close = response.version == Some(0);
    let (mut length, mut chunked) = (None, false);
    for header in response.headers.iter() {
        let value =
            std::str::from_utf8(header.value).map_err(|_| Error::Malformed("a header is not text"))?;
        if header.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.trim().parse().map_err(|_| Error::Malformed("bad content-length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(Error::Malformed("conflicting content-length"));
            }
            length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(Error::Malformed("a transfer coding other than chunked"));
            }
            chunked = true;
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
    }
    let framing = if status / 100 == 1 || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        if length.is_some() {
            return Err(Error::Malformed("both content-length and chunked"));
        }
        Framing::Chunked
    } else {
        match length {
            Some(n) if n > MAX_BODY_BYTES => return Err(Error::TooLarge),
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    Ok(Some(Head { status, len, framing, close }))
}

/// The length of a complete chunked body at the start of `buf` (chunks, last chunk and
/// trailers): `Ok(None)` while incomplete.
pub fn chunked_len(buf: &[u8]) -> Result<Option<usize>, Error> {
    let mut at = 0;
    let mut data = 0usize;
    loop {
        let Some(line_end) = find_crlf(&buf[at..]) else {
            return if buf.len() - at > 1024 {
                Err(Error::Malformed("chunk size line too long"))
            } else {
                Ok(None)
            };
        };
        let line = &buf[at..at + line_end];
        let size_text = line.split(|&b| b == b';').next().unwrap_or(b"");
        let size_text =
            std::str::from_utf8(size_text).map_err(|_| Error::Malformed("bad chunk size"))?.trim();
        if size_text.is_empty() || size_text.len() > 8 {
            return Err(Error::Malformed("bad chunk size"));
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|_| Error::Malformed("bad chunk size"))?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, then a blank line.
            loop {
                let Some(end) = find_crlf(&buf[at..]) else {
                    return if buf.len() - at > MAX_HEAD_BYTES { Err(Error::TooLarge) } else { Ok(None) };
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some(at));
                }
            }
        }
        data += size;
        if data > MAX_BODY_BYTES {
            return Err(Error::TooLarge);
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(Error::Malformed("chunk not followed by CRLF"));
        }
        at += size + 2;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Where a complete response ends in `buf`, given its head: `Ok(None)` while incomplete.
/// `eof`: the connection has closed.
pub fn response_len(buf: &[u8], head: &Head, eof: bool) -> Result<Option<usize>, Error> {
    let body = &buf[head.len..];
    match head.framing {
        Framing::Length(n) => Ok((body.len() >= n).then_some(head.len + n)),
        Framing::Chunked => Ok(chunked_len(body)?.map(|n| head.len + n)),
        Framing::UntilClose if body.len() > MAX_BODY_BYTES => Err(Error::TooLarge),
        Framing::UntilClose => Ok(eof.then_some(buf.len())),
    }
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server said it would close after the last response.
    closing: bool,
}

/// What the caller learns of a response: its status and (for error messages) the start of
/// its body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body_start: Vec<u8>,
}

impl Connection {
    pub async fn connect(host: &str) -> Result<Connection, Error> {
        let stream = TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream, buf: Vec::with_capacity(8 << 10), closing: false })
    }

    /// Whether the connection can carry another request.
    pub fn is_reusable(&self) -> bool {
        !self.closing
    }

    /// Sends `request` (a whole HTTP/1.1 request) and reads its response.
    pub async fn round_trip(&mut self, request: &[u8]) -> Result<Response, Error> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let mut eof = false;
        let mut head = None;
        loop {
            if head.is_none() {
                head = parse_head(&self.buf)?;
                // An interim 1xx response (100 Continue) precedes the real one.
                if let Some(h) = &head
                    && h.status / 100 == 1
                {
                    self.buf.drain(..h.len);
                    head = None;
                    continue;
                }
            }
            if let Some(h) = &head
                && let Some(end) = response_len(&self.buf, h, eof)?
            {
                let body = &self.buf[h.len..end];
                let response =
                    Response { status: h.status, body_start: body[..body.len().min(200)].to_vec() };
                self.closing = h.close || h.framing == Framing::UntilClose;
                return Ok(response);
            }
            if eof {
                return Err(Error::Closed);
            }
            if self.buf.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES {
                return Err(Error::TooLarge);
            }
            let len = self.buf.len();
            self.buf.resize(len + (16 << 10), 0);
            let n = self.stream.read(&mut self.buf[len..]).await?;
            self.buf.truncate(len + n);
            eof = n == 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `bytes` in the given pieces, as reads would deliver them: the response is found
    /// complete exactly once all of it has arrived, whatever the split.
    fn complete_at(bytes: &[u8], cuts: &[usize]) -> Result<Option<(Head, usize, usize)>, Error> {
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        ends.push(bytes.len());
        ends.sort_unstable();
        for end in ends {
            let buf = &bytes[..end];
            if let Some(head) = parse_head(buf)?
                && let Some(len) = response_len(buf, &head, false)?
            {
                return Ok(Some((head, len, end)));
            }
        }
        Ok(None)
    }

    #[test]
    fn a_content_length_response_is_framed_by_its_length() {
        let raw =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1";
        let head = parse_head(raw).unwrap().unwrap();
        assert_eq!((head.status, head.framing, head.close), (200, Framing::Length(5), false));
        assert_eq!(response_len(raw, &head, false).unwrap(), Some(head.len + 5));
        assert!(parse_head(&raw[..20]).unwrap().is_none());
    }

    #[test]
    fn a_chunked_response_ends_after_its_last_chunk_and_trailers() {
        let raw = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nX-T: 1\r\n\r\n";
        let head = parse_head(raw).unwrap().unwrap();
        assert_eq!((head.status, head.framing), (400, Framing::Chunked));
        assert_eq!(response_len(raw, &head, false).unwrap(), Some(raw.len()));
        assert_eq!(response_len(&raw[..raw.len() - 1], &head, false).unwrap(), None);
    }

    #[test]
    fn http_1_0_and_connection_close_end_the_connection() {
        let head = parse_head(b"HTTP/1.0 200 OK\r\n\r\nbody").unwrap().unwrap();
        assert!(head.close);
        assert_eq!(head.framing, Framing::UntilClose);
        assert_eq!(response_len(b"HTTP/1.0 200 OK\r\n\r\nbody", &head, false).unwrap(), None);
        assert_eq!(response_len(b"HTTP/1.0 200 OK\r\n\r\nbody", &head, true).unwrap(), Some(23));
        let head =
            parse_head(b"HTTP/1.1 204 No Content\r\nConnection: keep-alive, close\r\n\r\n").unwrap().unwrap();
        assert!(head.close);
        assert_eq!(head.framing, Framing::Length(0));
    }

    #[test]
    fn malformed_and_oversized_responses_are_errors() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"HTTX/1.1 200 OK\r\n\r\n",
        ] {
            assert!(matches!(parse_head(raw), Err(Error::Malformed(_))), "{}", String::from_utf8_lossy(raw));
        }
        let huge = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
        assert!(matches!(parse_head(huge.as_bytes()), Err(Error::TooLarge)));
        let endless = [b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD_BYTES]].concat();
        assert!(matches!(parse_head(&endless), Err(Error::TooLarge)));
        for bad in [&b"zz\r\n"[..], b"4\r\nabcdXY", b"123456789\r\n", b"\r\n"] {
            assert!(matches!(chunked_len(bad), Err(Error::Malformed(_))), "{}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(chunked_len(b"fffffff\r\n"), Err(Error::TooLarge)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), eof: bool) {
            if let Ok(Some(head)) = parse_head(&bytes) {
                let _ = response_len(&bytes, &head, eof);
            }
            let _ = chunked_len(&bytes);
        }

        #[test]
        fn a_response_split_anywhere_is_complete_exactly_when_whole(
            // 204 and 304 carry no body, whatever their headers say.
            status in (200u16..600).prop_filter("bodyless status", |s| *s != 204 && *s != 304),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            chunk in 1usize..64,
            chunked: bool,
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let mut raw = format!("HTTP/1.1 {status} X\r\nServer: t\r\n").into_bytes();
            if chunked {
                raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for piece in body.chunks(chunk) {
                    raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    raw.extend_from_slice(piece);
                    raw.extend_from_slice(b"\r\n");
                }
                raw.extend_from_slice(b"0\r\n\r\n");
            } else {
                raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                raw.extend_from_slice(&body);
            }
            let (head, len, seen) = complete_at(&raw, &cuts).unwrap().unwrap();
            prop_assert_eq!(head.status, status);
            prop_assert_eq!(len, raw.len());
            prop_assert_eq!(seen, raw.len());
            if !chunked {
                prop_assert_eq!(&raw[head.len..len], &body[..]);
            }
        }
    }
}
