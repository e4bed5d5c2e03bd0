//! The hyper engine (`--engine hyper`): HTTP/1.1 over one keep-alive TCP connection, with
//! hyper's low-level client. It costs about 1.8µs more CPU per request than the raw engine (hyper's
//! request channel, callback, header maps and body channel), which on a machine shared with the
//! server shows as lower throughput; it is kept as an independent implementation to cross-check
//! the raw engine's counts against.
//!
//! hyper's connection object (the part that reads and writes the socket) is polled inside the
//! same task as the request, rather than spawned as a task of its own: a request then costs no
//! cross-task wake-ups, and a connection is exactly one task. The connection is opened on first use
//! and again after any failure; a request that times out takes its connection down with it,
//! because its answer could still arrive later and be mistaken for the next one's.
//!
//! The steps of a request are hand-written futures of a few dozen bytes, where nested `async`
//! blocks would build (and copy) a future of kilobytes per request; waits are bounded by the
//! connection's watchdog (see [`crate::net`]).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body_util::Full;
use hyper::{
    body::{Body as _, Incoming},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep},
};

use crate::{
    RequestKind,
    body::wants_body,
    driver::Exchange,
    net::{Bounded, MAX_BODY, arm, io_error},
    requests::Requests,
    stats::{Answer, Outcome, TransportError},
};

type Connection = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// An open connection.
struct Open {
    sender: http1::SendRequest<Full<Bytes>>,
    /// The socket's driver; `None` once it has ended, after which hyper forbids polling it.
    connection: Option<Pin<Box<Connection>>>,
}

/// Polls a connection's driver, if it is still running. `Ready` means it has ended, cleanly or
/// with the error given.
fn poll_connection(
    connection: &mut Option<Pin<Box<Connection>>>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), TransportError>> {
    let Some(running) = connection else {
        return Poll::Ready(Ok(()));
    };
    match running.as_mut().poll(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(result) => {
            *connection = None;
            Poll::Ready(result.map_err(|e| classify(&e)))
        }
    }
}

/// One connection's requests and the socket they travel on.
pub(crate) struct HyperExchange {
    addr: SocketAddr,
    requests: Requests,
    open: Option<Open>,
    buffer: BytesMut,
    /// Armed on the first request; see the module docs.
    watchdog: Option<Pin<Box<Sleep>>>,
}

impl HyperExchange {
    pub(crate) fn new(addr: SocketAddr, requests: Requests) -> Self {
        Self {
            addr,
            requests,
            open: None,
            buffer: BytesMut::new(),
            watchdog: None,
        }
    }

    async fn steps(&mut self, deadline: Instant) -> Outcome {
        let Self {
            addr,
            requests,
            open,
            buffer,
            watchdog,
        } = self;
        let watchdog = arm(watchdog, deadline);
        if let Some(reused) = open.as_mut() {
            // A server may close a keep-alive connection between requests (after its quota of
            // requests, or when idle). Nothing was sent on it yet, so that is not an error: find
            // out now and reconnect.
            match (Bounded {
                inner: Usable(reused),
                watchdog: &mut *watchdog,
                deadline,
            })
            .await
            {
                Some(true) => {}
                Some(false) => *open = None,
                None => return Err(TransportError::Timeout),
            }
        }
        if open.is_none() {
            // Boxed: connecting is rare, and its future is larger than the rest of a request's.
            let connect = Box::pin(connect(*addr));
            *open = Some(
                match (Bounded {
                    inner: connect,
                    watchdog: &mut *watchdog,
                    deadline,
                })
                .await
                {
                    Some(Ok(fresh)) => fresh,
                    Some(Err(e)) => return Err(e),
                    None => return Err(TransportError::ConnectTimeout),
                },
            );
            let Some(fresh) = open.as_mut() else {
                return Err(TransportError::Closed);
            };
            match (Bounded {
                inner: Usable(fresh),
                watchdog: &mut *watchdog,
                deadline,
            })
            .await
            {
                Some(true) => {}
                Some(false) => return Err(TransportError::Closed),
                None => return Err(TransportError::ConnectTimeout),
            }
        }
        let Some(Open { sender, connection }) = open.as_mut() else {
            return Err(TransportError::Closed);
        };
        let kind = requests.draw();
        // Paths are built from validated parts, so this cannot fail in practice; count it rather
        // than panic.
        let request = requests
            .hyper_request(kind)
            .map_err(|_| TransportError::Protocol)?;
        let head = pin!(sender.send_request(request));
        let answering = Answering {
            kind,
            head: Some(head),
            connection,
            body: None,
            buffer,
        };
        (Bounded {
            inner: answering,
            watchdog,
            deadline,
        })
        .await
        .unwrap_or(Err(TransportError::Timeout))
    }
}

impl Exchange for HyperExchange {
    async fn exchange(&mut self, deadline: Instant) -> Outcome {
        let outcome = self.steps(deadline).await;
        // After a failure the connection's state is unknown (an answer may still be on its way),
        // and after its driver ended it is unusable: either way, the next request reconnects.
        if outcome.is_err() || self.open.as_ref().is_some_and(|o| o.connection.is_none()) {
            self.open = None;
        }
        outcome
    }
}

async fn connect(addr: SocketAddr) -> Result<Open, TransportError> {
    let stream = crate::net::connect(addr).await?;
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| classify(&e))?;
    Ok(Open {
        sender,
        connection: Some(Box::pin(connection)),
    })
}

/// Whether an open connection can take a request: its driver is running and its sender ready.
struct Usable<'a>(&'a mut Open);

impl Future for Usable<'_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let open = &mut *self.get_mut().0;
        // Poll the driver first: it is what notices a close and stops the sender.
        if poll_connection(&mut open.connection, cx).is_ready() {
            return Poll::Ready(false);
        }
        open.sender.poll_ready(cx).map(|ready| ready.is_ok())
    }
}

/// A sent request, until its whole answer is read. It polls the connection's driver alongside,
/// since in this task nothing else does.
struct Answering<'a, H> {
    kind: RequestKind,
    /// The answer's head, until it arrives.
    head: Option<Pin<&'a mut H>>,
    connection: &'a mut Option<Pin<Box<Connection>>>,
    body: Option<BodyRead>,
    buffer: &'a mut BytesMut,
}

/// The body being read.
struct BodyRead {
    incoming: Incoming,
    status: u16,
    /// Whether the body is kept for inspection or only counted.
    keep: bool,
    bytes: u64,
    /// A body that came in a single frame is kept as that frame, without a copy.
    single: Option<Bytes>,
}

impl<H> Answering<'_, H>
where
    H: Future<Output = hyper::Result<Response<Incoming>>>,
{
    /// Advances as far as it can without the connection's driver.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        loop {
            if let Some(head) = self.head.as_mut() {
                let response = match head.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(classify(&e))),
                    Poll::Ready(Ok(response)) => response,
                };
                self.head = None;
                let status = response.status().as_u16();
                self.buffer.clear();
                self.body = Some(BodyRead {
                    incoming: response.into_body(),
                    status,
                    keep: wants_body(self.kind, status),
                    bytes: 0,
                    single: None,
                });
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Err(TransportError::Closed));
            };
            let data = match Pin::new(&mut body.incoming).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(classify(&e))),
                Poll::Ready(None) => {
                    let kept = match body.single.take() {
                        Some(frame) => frame,
                        // Splitting hands the bytes over; the buffer's allocation is reclaimed
                        // once they are dropped.
                        None => self.buffer.split().freeze(),
                    };
                    return Poll::Ready(Ok(Answer {
                        kind: self.kind,
                        status: body.status,
                        body: kept,
                        bytes: body.bytes,
                    }));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_trailers) => continue,
                },
            };
            body.bytes += data.len() as u64;
            if body.bytes > MAX_BODY {
                return Poll::Ready(Err(TransportError::BodyTooLarge));
            }
            if !body.keep {
                continue;
            }
            if body.single.is_none() && self.buffer.is_empty() {
                body.single = Some(data);
            } else {
                if let Some(first) = body.single.take() {
                    self.buffer.extend_from_slice(&first);
                }
                self.buffer.extend_from_slice(&data);
            }
        }
    }
}

impl<H> Future for Answering<'_, H>
where
    H: Future<Output = hyper::Result<Response<Incoming>>>,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        if let Poll::Ready(outcome) = this.step(cx) {
            return Poll::Ready(outcome);
        }
        match poll_connection(this.connection, cx) {
            // The driver may have just handed the answer over; look at once rather than after a
            // second trip through the scheduler.
            Poll::Pending => this.step(cx),
            Poll::Ready(ended) => match this.step(cx) {
                Poll::Ready(outcome) => Poll::Ready(outcome),
                // The connection is gone and the request is still unanswered.
                Poll::Pending => Poll::Ready(Err(ended.err().unwrap_or(TransportError::Closed))),
            },
        }
    }
}

/// Sorts a hyper error into a report kind, looking through its causes for an I/O error.
fn classify(error: &hyper::Error) -> TransportError {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return io_error(io);
        }
        source = cause.source();
    }
    if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
        TransportError::Protocol
    } else if error.is_timeout() {
        TransportError::Timeout
    } else if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
        TransportError::Closed
    } else {
        TransportError::Io
    }
}
