//! The workspace's one HTTP/1.1 response reader: the head (parsed by `httparse`), and how the body
//! is framed (RFC 9112 section 6): no body, `Content-Length`, chunked, or until the peer closes.
//! The generator decodes incrementally with [`parse_head`] and [`Chunked`]; the chaos runs and
//! benchmarks take whole answers with [`parse_response`].
//!
//! It is pure (no I/O) so that every framing rule is tested on byte strings, split anywhere.

/// The largest response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;

/// Headers per response head accepted.
const MAX_HEADERS: usize = 64;

/// The longest chunk-size line (size, extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304, or `Content-Length: 0`).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the peer closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection can carry another request afterwards.
    pub keep_alive: bool,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

/// A response the codec cannot accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Not HTTP/1.x, or framing that contradicts itself.
    #[error("malformed HTTP/1.1 response")]
    Malformed,
    /// A head, chunk line, trailer or body beyond the limits.
    #[error("HTTP/1.1 response too large")]
    TooLarge,
}

/// Parses a response head from the start of `buf`: `Ok(None)` until the whole head is there.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, CodecError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(CodecError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(CodecError::TooLarge),
        Err(_) => return Err(CodecError::Malformed),
    };
    let status = response.code.ok_or(CodecError::Malformed)?;
    // HTTP/1.0 closes after each answer unless it says otherwise; HTTP/1.1 keeps the connection
    // unless it says otherwise.
    let http10 = response.version == Some(0);
    let mut close = http10;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_coded = false;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).map_err(|_| CodecError::Malformed)?;
        if header.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value.trim().parse().map_err(|_| CodecError::Malformed)?;
            if length.is_some_and(|m| m != n) {
                return Err(CodecError::Malformed);
            }
            length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_coded = true;
            // Chunked must be the last coding applied; anything else is read until close.
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    close = false;
                }
            }
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if transfer_coded {
        // Transfer-Encoding overrides Content-Length (RFC 9112 section 6.3).
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    Ok(Some(Head {
        status,
        framing,
        keep_alive: !close && framing != Framing::UntilClose,
        len,
    }))
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until a blank one.
    Trailers,
    /// The body is complete.
    Done,
}

/// Decodes a chunked body incrementally, from whatever bytes have arrived.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: ChunkState,
}

impl Chunked {
    /// A decoder at the start of a chunked body.
    #[must_use]
    pub fn new() -> Self {
        Self {
            state: ChunkState::Size,
        }
    }

    /// Whether the last chunk and the trailers have been read.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input`, handing each piece of body data to `data`. Returns how many bytes
    /// of `input` it consumed; the caller drops those and calls again with more.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, CodecError> {
        let mut at = 0;
        loop {
            let rest = &input[at..];
            match self.state {
                ChunkState::Done => return Ok(at),
                ChunkState::Size => {
                    let Some(line) = line(rest)? else {
                        return Ok(at);
                    };
                    let size_text = line.split(|b| *b == b';').next().unwrap_or_default();
                    let size = parse_hex(size_text)?;
                    at += line.len() + 2;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(remaining) => {
                    if rest.is_empty() {
                        return Ok(at);
                    }
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(rest.len());
                    data(&rest[..take]);
                    at += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(at);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(CodecError::Malformed);
                    }
                    at += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(line) = line(rest)? else {
                        return Ok(at);
                    };
                    at += line.len() + 2;
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }
}

impl Default for Chunked {
    fn default() -> Self {
        Self::new()
    }
}

/// A whole response at the start of `buf`: its head, its body (de-chunked) and how many bytes of
/// `buf` it used; `Ok(None)` while more must be read. A body framed by the end of the connection
/// is whole only once the peer has closed (`at_eof`).
///
/// # Errors
///
/// [`CodecError::Malformed`] for what is not HTTP/1.x, [`CodecError::TooLarge`] for a head or a
/// body over the limits (`max_body` bytes for the body).
pub fn parse_response(
    buf: &[u8],
    at_eof: bool,
    max_body: usize,
) -> Result<Option<(Head, Vec<u8>, usize)>, CodecError> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let rest = &buf[head.len..];
    let too_large = |n: usize| {
        if n > max_body {
            Err(CodecError::TooLarge)
        } else {
            Ok(())
        }
    };
    let (body, used) = match head.framing {
        Framing::Empty => (Vec::new(), 0),
        Framing::Length(n) => {
            let n = usize::try_from(n).map_err(|_| CodecError::TooLarge)?;
            too_large(n)?;
            if rest.len() < n {
                return Ok(None);
            }
            (rest[..n].to_vec(), n)
        }
        Framing::Chunked => {
            let mut decoder = Chunked::new();
            let mut body = Vec::new();
            let used = decoder.decode(rest, |data| body.extend_from_slice(data))?;
            too_large(body.len())?;
            if !decoder.is_done() {
                return Ok(None);
            }
            (body, used)
        }
        Framing::UntilClose if at_eof => {
            too_large(rest.len())?;
            (rest.to_vec(), rest.len())
        }
        Framing::UntilClose => {
            too_large(rest.len())?;
            return Ok(None);
        }
    };
    Ok(Some((head, body, head.len + used)))
}

/// The line at the start of `input`, without its CRLF; `None` until the CRLF has arrived.
fn line(input: &[u8]) -> Result<Option<&[u8]>, CodecError> {
    match input.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some(&input[..end])),
        None if input.len() > MAX_LINE => Err(CodecError::TooLarge),
        None => Ok(None),
    }
}

fn parse_hex(text: &[u8]) -> Result<u64, CodecError> {
    let text = text.trim_ascii();
    if text.is_empty() || text.len() > 15 {
        return Err(CodecError::Malformed);
    }
    let mut value = 0u64;
    for &b in text {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(CodecError::Malformed),
        };
        value = value * 16 + u64::from(digit);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn heads_and_their_framing() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nhello world!");
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (200, Framing::Length(12), true)
        );
        assert_eq!(h.len, "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n".len());
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked);
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head(
            "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
        );
        assert_eq!((h.status, h.keep_alive), (503, false));
        assert_eq!(
            head("HTTP/1.1 204 No Content\r\n\r\n").framing,
            Framing::Empty
        );
        assert_eq!(
            head("HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n").framing,
            Framing::Empty
        );
        assert_eq!(
            head("HTTP/1.1 100 Continue\r\n\r\n").framing,
            Framing::Empty
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").framing,
            Framing::Empty
        );
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        // HTTP/1.0 closes unless asked to keep alive.
        assert!(!head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").keep_alive);
        assert!(
            head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n")
                .keep_alive
        );
    }

    #[test]
    fn partial_and_bad_heads() {
        let full = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse_head(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_head(b"garbage\r\n\r\n"), Err(CodecError::Malformed));
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"),
            Err(CodecError::Malformed)
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"),
            Err(CodecError::Malformed)
        );
        let endless = [b"HTTP/1.1 200 OK\r\nx: ".as_slice(), &[b'a'; MAX_HEAD]].concat();
        assert_eq!(parse_head(&endless), Err(CodecError::TooLarge));
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse_head(many.as_bytes()), Err(CodecError::TooLarge));
    }

    /// Decodes `input` fed in pieces of `step` bytes, as reads would deliver it.
    fn decode_in_pieces(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), CodecError> {
        let mut decoder = Chunked::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut body = Vec::new();
        let mut fed = 0;
        while !decoder.is_done() {
            if fed == input.len() {
                return Err(CodecError::Malformed);
            }
            let next = (fed + step).min(input.len());
            pending.extend_from_slice(&input[fed..next]);
            fed = next;
            let used = decoder.decode(&pending, |data| body.extend_from_slice(data))?;
            pending.drain(..used);
        }
        Ok((body, pending.len() + input.len() - fed))
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let input = b"5;name=value\r\nhello\r\n7\r\n, world\r\n0\r\nexpires: never\r\n\r\nNEXT";
        for step in 1..=input.len() {
            let (body, left) = decode_in_pieces(input, step).unwrap();
            assert_eq!(body, b"hello, world", "step {step}");
            assert_eq!(
                left, 4,
                "the bytes after the body are left alone (step {step})"
            );
        }
        let (body, _) = decode_in_pieces(b"A\r\n0123456789\r\n0\r\n\r\n", 3).unwrap();
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn bad_chunks_are_rejected() {
        for bad in [
            b"x\r\nhello\r\n0\r\n\r\n".as_slice(),
            b"5\r\nhelloXX0\r\n\r\n",
            b"\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(
                decode_in_pieces(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_line = [b"5;".as_slice(), &[b'x'; MAX_LINE + 10]].concat();
        assert_eq!(
            Chunked::new().decode(&long_line, |_| {}),
            Err(CodecError::TooLarge)
        );
    }
}
