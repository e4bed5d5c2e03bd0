//! The real exchange: HTTP/1.1 over one keep-alive TCP connection, with hyper's low-level client.
//!
//! hyper's connection object (the part that reads and writes the socket) is polled inside the
//! same task as the request, rather than spawned as a task of its own: a request then costs no
//! cross-task wake-ups, and a connection is exactly one task. The connection is opened on first use
//! and again after any failure; a request that times out takes its connection down with it,
//! because its answer could still arrive later and be mistaken for the next one's.
//!
//! This is the generator's hot path, so it is written to stay small. The steps of a request are
//! hand-written futures of a few dozen bytes, where nested `async` blocks would build (and copy)
//! a future of kilobytes per request. And rather than a fresh timer per request, each connection
//! keeps one *watchdog* timer: it is only re-armed when it fires before the current request's
//! deadline (at most once per timeout period), and a request whose deadline it reaches has timed
//! out.

use std::{
    collections::HashSet,
    fmt::Write as _,
    future::Future,
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::{
    body::{Body as _, Incoming},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep, sleep_until},
};

use crate::{
    Config, Error, RequestKind, Scenario,
    body::wants_body,
    config::Target,
    driver::Exchange,
    ids::IdSampler,
    stats::{Answer, Outcome, TransportError},
};

/// The largest body the generator reads; a larger one is an error, not an unbounded buffer.
const MAX_BODY: u64 = 64 * 1024 * 1024;

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
pub(crate) struct HttpExchange {
    addr: SocketAddr,
    requests: Requests,
    open: Option<Open>,
    buffer: BytesMut,
    /// Armed on the first request; see the module docs.
    watchdog: Option<Pin<Box<Sleep>>>,
}

impl HttpExchange {
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
        let watchdog = watchdog.get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        if watchdog.deadline() > deadline {
            watchdog.as_mut().reset(deadline);
        }
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
        let (kind, request) = requests.next();
        // Paths are built from validated parts, so this cannot fail in practice; count it rather
        // than panic.
        let request = request.map_err(|_| TransportError::Protocol)?;
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

impl Exchange for HttpExchange {
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
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| connect_error(&e))?;
    // Requests are single writes, so Nagle's algorithm could only add delay.
    stream.set_nodelay(true).map_err(|e| connect_error(&e))?;
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| classify(&e))?;
    Ok(Open {
        sender,
        connection: Some(Box::pin(connection)),
    })
}

/// Waits for `inner` unless the watchdog reaches `deadline` first (then `None`).
struct Bounded<'a, F> {
    inner: F,
    watchdog: &'a mut Pin<Box<Sleep>>,
    deadline: Instant,
}

impl<F: Future + Unpin> Future for Bounded<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(output) = Pin::new(&mut this.inner).poll(cx) {
            return Poll::Ready(Some(output));
        }
        loop {
            match this.watchdog.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if this.watchdog.deadline() >= this.deadline => {
                    return Poll::Ready(None);
                }
                // It was armed for an earlier request: re-arm it for this one and wait on.
                Poll::Ready(()) => this.watchdog.as_mut().reset(this.deadline),
            }
        }
    }
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

/// Sorts a connection failure into a report kind.
fn connect_error(error: &io::Error) -> TransportError {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => TransportError::ConnectRefused,
        io::ErrorKind::TimedOut => TransportError::ConnectTimeout,
        _ => TransportError::ConnectFailed,
    }
}

/// Sorts a hyper error into a report kind, looking through its causes for an I/O error.
fn classify(error: &hyper::Error) -> TransportError {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => TransportError::Reset,
                io::ErrorKind::TimedOut => TransportError::Timeout,
                io::ErrorKind::UnexpectedEof => TransportError::Closed,
                _ => TransportError::Io,
            };
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

/// What every connection's requests have in common; each connection draws its own from it.
#[derive(Debug, Clone)]
pub(crate) struct RequestPlan {
    kinds: Kinds,
    ids: IdSampler,
    base_path: String,
    host: HeaderValue,
    batch_size: usize,
    seed: u64,
}

#[derive(Debug, Clone)]
enum Kinds {
    One(RequestKind),
    Weighted {
        table: Vec<(RequestKind, u32)>,
        total: u32,
    },
}

impl RequestPlan {
    /// The plan for a validated configuration.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the URL's host is not a valid `Host` header or the distribution's
    /// parameters are out of range.
    pub(crate) fn new(config: &Config, target: &Target) -> Result<Self, Error> {
        let kinds = match config.scenario {
            Scenario::Dashboard => Kinds::One(RequestKind::Dashboard),
            Scenario::Batch => Kinds::One(RequestKind::Batch),
            Scenario::Recommendations => Kinds::One(RequestKind::Recommendations),
            Scenario::Mixed => {
                let mut running = 0u32;
                let table = config
                    .mix
                    .weights()
                    .iter()
                    .map(|(kind, weight)| {
                        running = running.saturating_add(*weight);
                        (*kind, running)
                    })
                    .collect();
                Kinds::Weighted {
                    table,
                    total: running,
                }
            }
        };
        let host = HeaderValue::from_str(&target.authority).map_err(|_| Error::Config {
            field: "url",
            problem: format!("`{}` is not a valid Host header", target.authority),
        })?;
        let ids = IdSampler::new(config.distribution, config.users).map_err(|e| Error::Config {
            field: "distribution",
            problem: e.to_string(),
        })?;
        let plan = Self {
            kinds,
            ids,
            base_path: target.base_path.clone(),
            host,
            batch_size: config.batch_size,
            seed: config.seed,
        };
        // Build one request of each kind now, so a bad path prefix is a configuration error
        // rather than a run full of failures.
        let mut probe = plan.for_connection(0);
        for kind in [
            RequestKind::Dashboard,
            RequestKind::Batch,
            RequestKind::Recommendations,
        ] {
            if probe.request(kind).is_err() {
                return Err(Error::Config {
                    field: "url",
                    problem: format!("`{}` does not make valid request paths", config.url),
                });
            }
        }
        Ok(plan)
    }

    /// The request maker of connection `index`; the seed and the index fix its whole sequence.
    pub(crate) fn for_connection(&self, index: usize) -> Requests {
        // Spread the connection index over the seed's bits so neighbouring connections get
        // unrelated streams (the PCG seeding expands it further).
        let stream = self.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Requests {
            rng: Pcg64Mcg::seed_from_u64(stream),
            plan: self.clone(),
            path: String::with_capacity(self.base_path.len() + 64),
            json: String::with_capacity(16 + self.batch_size * 8),
            seen: HashSet::with_capacity(self.batch_size),
        }
    }
}

/// Makes one connection's requests: their kinds, ids and bodies, from its own seeded stream.
pub(crate) struct Requests {
    rng: Pcg64Mcg,
    plan: RequestPlan,
    path: String,
    json: String,
    seen: HashSet<u64>,
}

impl Requests {
    fn kind(&mut self) -> RequestKind {
        match &self.plan.kinds {
            Kinds::One(kind) => *kind,
            Kinds::Weighted { table, total } => {
                let draw = self.rng.random_range(0..*total);
                table
                    .iter()
                    .find(|(_, upto)| draw < *upto)
                    .map_or(RequestKind::Dashboard, |(kind, _)| *kind)
            }
        }
    }

    /// The next request and its kind.
    pub(crate) fn next(&mut self) -> (RequestKind, Result<Request<Full<Bytes>>, http::Error>) {
        let kind = self.kind();
        (kind, self.request(kind))
    }

    /// A request of the given kind, with the next ids.
    fn request(&mut self, kind: RequestKind) -> Result<Request<Full<Bytes>>, http::Error> {
        self.path.clear();
        self.path.push_str(&self.plan.base_path);
        let (method, body) = match kind {
            RequestKind::Dashboard => {
                let id = self.plan.ids.sample(&mut self.rng);
                let _ = write!(self.path, "/api/users/{id}/dashboard");
                (Method::GET, Bytes::new())
            }
            RequestKind::Recommendations => {
                let id = self.plan.ids.sample(&mut self.rng);
                let _ = write!(self.path, "/users/{id}/recommendations");
                (Method::GET, Bytes::new())
            }
            RequestKind::Batch => {
                self.path.push_str("/api/users/batch");
                (Method::POST, self.batch_body())
            }
        };
        self.build(method, body)
    }

    /// `{"user_ids":[...]}` with `batch_size` distinct ids.
    fn batch_body(&mut self) -> Bytes {
        self.seen.clear();
        self.json.clear();
        self.json.push_str(r#"{"user_ids":["#);
        // Distinct ids: a skewed distribution repeats hot ids, so draw until the batch is full,
        // with a bound in case the distribution is too skewed to fill it in reasonable time.
        let mut attempts = 0usize;
        while self.seen.len() < self.plan.batch_size && attempts < self.plan.batch_size * 64 {
            attempts += 1;
            let id = self.plan.ids.sample(&mut self.rng);
            if self.seen.insert(id) {
                if self.seen.len() > 1 {
                    self.json.push(',');
                }
                let _ = write!(self.json, "{id}");
            }
        }
        self.json.push_str("]}");
        Bytes::copy_from_slice(self.json.as_bytes())
    }

    fn build(&self, method: Method, body: Bytes) -> Result<Request<Full<Bytes>>, http::Error> {
        // Assembled in place rather than through `Request::builder`, which moves the whole
        // request through a `Result` at every step: this runs once per request.
        let is_post = method == Method::POST;
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = Uri::try_from(self.path.as_str())?;
        let headers = request.headers_mut();
        headers.insert(header::HOST, self.plan.host.clone());
        if is_post {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::Distribution;

    fn requests(scenario: Scenario, seed: u64, index: usize) -> Requests {
        let config = Config {
            url: "http://localhost:1/prefix".to_owned(),
            scenario,
            mix: "dashboard=3,batch=1".parse().unwrap(),
            distribution: Distribution::Zipf { exponent: 1.1 },
            users: 1000,
            batch_size: 20,
            seed,
            ..Config::default()
        };
        let target = config.validate().unwrap();
        RequestPlan::new(&config, &target)
            .unwrap()
            .for_connection(index)
    }

    fn paths(mut r: Requests, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| r.next().1.unwrap().uri().to_string())
            .collect()
    }

    #[test]
    fn sequences_are_reproducible_per_connection() {
        let a = paths(requests(Scenario::Dashboard, 9, 0), 50);
        assert_eq!(a, paths(requests(Scenario::Dashboard, 9, 0), 50));
        assert_ne!(a, paths(requests(Scenario::Dashboard, 9, 1), 50));
        assert_ne!(a, paths(requests(Scenario::Dashboard, 10, 0), 50));
        assert!(a[0].starts_with("/prefix/api/users/"));
        assert!(a[0].ends_with("/dashboard"));
        let r = paths(requests(Scenario::Recommendations, 9, 0), 1);
        assert!(r[0].starts_with("/prefix/users/") && r[0].ends_with("/recommendations"));
    }

    #[test]
    fn mixes_follow_their_weights() {
        let mut r = requests(Scenario::Mixed, 1, 0);
        let mut batches = 0;
        for _ in 0..4000 {
            let (kind, request) = r.next();
            let request = request.unwrap();
            if kind == RequestKind::Batch {
                batches += 1;
                assert_eq!(request.method(), Method::POST);
                assert_eq!(request.uri(), "/prefix/api/users/batch");
                assert_eq!(request.headers()[header::HOST], "localhost:1");
            }
        }
        assert!((900..1100).contains(&batches), "{batches} batches of 4000");
    }

    #[tokio::test]
    async fn batch_bodies_hold_distinct_ids() {
        let mut r = requests(Scenario::Batch, 1, 0);
        let request = r.next().1.unwrap();
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let ids: Vec<u64> = value["user_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let distinct: HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(ids.len(), 20);
        assert_eq!(distinct.len(), 20);
        assert!(ids.iter().all(|id| (1..=1000).contains(id)));
    }
}
