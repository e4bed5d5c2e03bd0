//! The exchange: HTTP/1.1 written and read directly on a tokio `TcpStream`, the
//! way wrk does it.
//!
//! A request is encoded into a buffer the connection reuses and written with one `write`; the
//! answer is read into another reused buffer, its head parsed by `httparse` and its body framed by
//! [`crate::codec`]. A body the generator inspects is handed over as a zero-copy slice of the read
//! buffer. Against hyper's client this saves about 1.8µs of CPU per request (its request channel,
//! response callback, header maps and body channel), which is what lets the generator keep up
//! with wrk on a machine it shares with the server.
//!
//! Connections are HTTP/1.1 keep-alive with one request in flight; the connection is reopened after a
//! `Connection: close`, a body delimited by the close, any error, and a timeout (whose answer
//! could otherwise arrive later and be taken for the next one's).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep},
};

use crate::{
    body::wants_body,
    codec::{self, Chunked, Framing},
    driver::Exchange,
    net::{Bounded, MAX_BODY, arm, io_error},
    requests::Requests,
    stats::{Answer, Outcome, TransportError},
};

/// Spare room the read buffer keeps before each read.
const READ_RESERVE: usize = 16 * 1024;

/// A kept-alive connection idle longer than this (between sends) is checked for a close by the
/// server before it is reused. Under load the next send follows at once and the check, which
/// costs a system call, is skipped.
const IDLE_CHECK: Duration = Duration::from_millis(2);

/// One connection's requests and the socket they travel on.
pub(crate) struct RawExchange {
    addr: SocketAddr,
    requests: Requests,
    stream: Option<TcpStream>,
    /// The encoded request.
    write: Vec<u8>,
    /// Bytes read and not yet consumed.
    read: BytesMut,
    /// A chunked body, decoded.
    decoded: BytesMut,
    /// Armed on the first request; see [`crate::net`].
    watchdog: Option<Pin<Box<Sleep>>>,
    /// The previous request's deadline, to tell how long the connection sat idle.
    previous_deadline: Option<Instant>,
}

impl RawExchange {
    pub(crate) fn new(addr: SocketAddr, requests: Requests) -> Self {
        Self {
            addr,
            requests,
            stream: None,
            write: Vec::with_capacity(256),
            read: BytesMut::with_capacity(READ_RESERVE),
            decoded: BytesMut::new(),
            watchdog: None,
            previous_deadline: None,
        }
    }

    async fn steps(&mut self, deadline: Instant) -> Outcome {
        let Self {
            addr,
            requests,
            stream,
            write,
            read,
            decoded,
            watchdog,
            previous_deadline,
        } = self;
        let watchdog = arm(watchdog, deadline);
        // Deadlines are send time plus the timeout, so their difference is the time between sends.
        let idle = previous_deadline
            .replace(deadline)
            .is_none_or(|previous| deadline.saturating_duration_since(previous) > IDLE_CHECK);
        if idle && let Some(socket) = stream.as_ref() {
            // A server may close a kept-alive connection while it is idle. Nothing was sent on
            // it yet, so that is not an error: find out now and reconnect.
            if !still_open(socket, read) {
                *stream = None;
            }
        }
        if stream.is_none() {
            read.clear();
            // Boxed: connecting is rare, and its future is larger than the rest of a request's.
            let connecting = Box::pin(crate::net::connect(*addr));
            *stream = Some(
                match (Bounded {
                    inner: connecting,
                    watchdog: &mut *watchdog,
                    deadline,
                })
                .await
                {
                    Some(Ok(socket)) => socket,
                    Some(Err(e)) => return Err(e),
                    None => return Err(TransportError::ConnectTimeout),
                },
            );
        }
        let Some(socket) = stream.as_ref() else {
            return Err(TransportError::Closed);
        };
        let kind = requests.draw();
        requests.encode(write);
        let sending = WriteAll {
            stream: socket,
            data: write,
            written: 0,
        };
        match (Bounded {
            inner: sending,
            watchdog: &mut *watchdog,
            deadline,
        })
        .await
        {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(io_error(&e)),
            None => return Err(TransportError::Timeout),
        }

        // The head, after any interim (1xx) answers.
        let head = loop {
            match codec::parse_head(read) {
                Ok(Some(head)) if head.status == 101 => return Err(TransportError::Protocol),
                Ok(Some(head)) if (100..200).contains(&head.status) => read.advance(head.len),
                Ok(Some(head)) => break head,
                Ok(None) => fill_or_closed(socket, read, watchdog, deadline).await?,
                Err(_) => return Err(TransportError::Protocol),
            }
        };
        read.advance(head.len);
        let keep = wants_body(kind, head.status);
        let (body, bytes) = match head.framing {
            Framing::Empty => (Bytes::new(), 0),
            Framing::Length(length) => {
                if length > MAX_BODY {
                    return Err(TransportError::BodyTooLarge);
                }
                // Bounded by MAX_BODY just above.
                let length = usize::try_from(length).map_err(|_| TransportError::BodyTooLarge)?;
                if keep {
                    while read.len() < length {
                        fill_or_closed(socket, read, watchdog, deadline).await?;
                    }
                    (read.split_to(length).freeze(), length as u64)
                } else {
                    let mut remaining = length;
                    loop {
                        let take = remaining.min(read.len());
                        read.advance(take);
                        remaining -= take;
                        if remaining == 0 {
                            break;
                        }
                        fill_or_closed(socket, read, watchdog, deadline).await?;
                    }
                    (Bytes::new(), length as u64)
                }
            }
            Framing::Chunked => {
                let mut decoder = Chunked::new();
                let mut total = 0u64;
                decoded.clear();
                loop {
                    let used = decoder
                        .decode(read, |data| {
                            total += data.len() as u64;
                            if keep && total <= MAX_BODY {
                                decoded.extend_from_slice(data);
                            }
                        })
                        .map_err(|_| TransportError::Protocol)?;
                    read.advance(used);
                    if total > MAX_BODY {
                        return Err(TransportError::BodyTooLarge);
                    }
                    if decoder.is_done() {
                        break;
                    }
                    fill_or_closed(socket, read, watchdog, deadline).await?;
                }
                (decoded.split().freeze(), total)
            }
            Framing::UntilClose => {
                while fill(socket, read, watchdog, deadline).await? > 0 {
                    if read.len() as u64 > MAX_BODY {
                        return Err(TransportError::BodyTooLarge);
                    }
                }
                let total = read.len() as u64;
                let body = if keep {
                    read.split().freeze()
                } else {
                    read.clear();
                    Bytes::new()
                };
                (body, total)
            }
        };
        if !read.is_empty() {
            // More bytes than the one answer asked for: the connection is out of step.
            return Err(TransportError::Protocol);
        }
        if !head.keep_alive {
            *stream = None;
        }
        Ok(Answer {
            kind,
            status: head.status,
            body,
            bytes,
        })
    }
}

impl Exchange for RawExchange {
    async fn exchange(&mut self, deadline: Instant) -> Outcome {
        let outcome = self.steps(deadline).await;
        // After a failure the connection's state is unknown (an answer may still be on its way):
        // the next request reconnects.
        if outcome.is_err() {
            self.stream = None;
        }
        outcome
    }
}

/// Whether an idle kept-alive connection is still open: no end of stream, no error, and no
/// unsolicited bytes waiting on it. Costs a system call only if the socket became readable.
fn still_open(socket: &TcpStream, read: &mut BytesMut) -> bool {
    read.reserve(READ_RESERVE);
    match socket.try_read_buf(read) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
        // End of stream, an error, or bytes nobody asked for.
        _ => false,
    }
}

/// Reads more bytes, within the deadline; `Ok(0)` is the end of the stream.
async fn fill(
    socket: &TcpStream,
    read: &mut BytesMut,
    watchdog: &mut Pin<Box<Sleep>>,
    deadline: Instant,
) -> Result<usize, TransportError> {
    if read.capacity() - read.len() < READ_RESERVE / 4 {
        read.reserve(READ_RESERVE);
    }
    let reading = ReadMore { socket, read };
    match (Bounded {
        inner: reading,
        watchdog,
        deadline,
    })
    .await
    {
        Some(Ok(n)) => Ok(n),
        Some(Err(e)) => Err(io_error(&e)),
        None => Err(TransportError::Timeout),
    }
}

/// Reads more bytes, within the deadline; the end of the stream is an error here, since the
/// answer is not complete.
async fn fill_or_closed(
    socket: &TcpStream,
    read: &mut BytesMut,
    watchdog: &mut Pin<Box<Sleep>>,
    deadline: Instant,
) -> Result<(), TransportError> {
    match fill(socket, read, watchdog, deadline).await? {
        0 => Err(TransportError::Closed),
        _ => Ok(()),
    }
}

/// One read into the buffer's spare room, waiting for the socket if need be.
struct ReadMore<'a> {
    socket: &'a TcpStream,
    read: &'a mut BytesMut,
}

impl Future for ReadMore<'_> {
    type Output = io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.socket.try_read_buf(this.read) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
            match this.socket.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Writes all of `data`, waiting for the socket if need be.
struct WriteAll<'a> {
    stream: &'a TcpStream,
    data: &'a [u8],
    written: usize,
}

impl Future for WriteAll<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.written < this.data.len() {
            match this.stream.try_write(&this.data[this.written..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => this.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match this.stream.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}
