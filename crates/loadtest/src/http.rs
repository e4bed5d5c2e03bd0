//! The real exchange: HTTP/1.1 over one keep-alive TCP connection, with hyper's low-level client.
//!
//! hyper's connection object (the part that reads and writes the socket) is polled inside the
//! same task as the request, rather than spawned as a task of its own: a request then costs no
//! cross-task wake-ups, and a connection is exactly one task. The connection is opened on first use
//! and again after any failure; a request that times out takes its connection down with it,
//! because its answer could still arrive later and be mistaken for the next one's.

use std::{
    collections::HashSet,
    fmt::Write as _,
    future::{Future, poll_fn},
    io,
    net::SocketAddr,
    pin::{Pin, pin},
    task::Poll,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use tokio::{net::TcpStream, time::Instant};

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

struct Open {
    sender: http1::SendRequest<Full<Bytes>>,
    connection: Pin<Box<Connection>>,
}

/// What the exchange was doing when its deadline passed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connecting,
    Exchanging,
}

/// One connection's requests and the socket they travel on.
pub(crate) struct HttpExchange {
    addr: SocketAddr,
    requests: Requests,
    open: Option<Open>,
    stage: Stage,
    buffer: BytesMut,
}

impl HttpExchange {
    pub(crate) fn new(addr: SocketAddr, requests: Requests) -> Self {
        Self {
            addr,
            requests,
            open: None,
            stage: Stage::Connecting,
            buffer: BytesMut::new(),
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
            connection: Box::pin(connection),
        })
    }

    async fn exchange_inner(
        &mut self,
        kind: RequestKind,
        request: Request<Full<Bytes>>,
    ) -> Outcome {
        if let Some(open) = self.open.as_mut() {
            // A server may close a keep-alive connection between requests (after its quota of
            // requests, or when idle). Nothing was sent on it yet, so that is not an error: find
            // out now and reconnect.
            if !still_usable(open).await {
                self.open = None;
            }
        }
        if self.open.is_none() {
            self.stage = Stage::Connecting;
            self.open = Some(Self::connect(self.addr).await?);
        }
        self.stage = Stage::Exchanging;
        let Self { open, buffer, .. } = self;
        let Some(Open { sender, connection }) = open.as_mut() else {
            return Err(TransportError::Closed);
        };
        let work = async move {
            sender.ready().await.map_err(|e| classify(&e))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| classify(&e))?;
            let status = response.status().as_u16();
            let keep = wants_body(kind, status);
            let (body, bytes) = read_body(response.into_body(), buffer, keep).await?;
            Ok(Answer {
                kind,
                status,
                body,
                bytes,
            })
        };
        let (outcome, connection_ended) = drive_with(work, connection.as_mut()).await;
        if connection_ended || outcome.is_err() {
            self.open = None;
        }
        outcome
    }
}

impl Exchange for HttpExchange {
    async fn exchange(&mut self, deadline: Instant) -> Outcome {
        let (kind, request) = self.requests.next();
        let request = match request {
            Ok(request) => request,
            // Paths are built from validated parts, so this is unreachable in practice; count it
            // rather than panic.
            Err(_) => return Err(TransportError::Protocol),
        };
        match tokio::time::timeout_at(deadline, self.exchange_inner(kind, request)).await {
            Ok(outcome) => outcome,
            Err(_elapsed) => {
                self.open = None;
                Err(match self.stage {
                    Stage::Connecting => TransportError::ConnectTimeout,
                    Stage::Exchanging => TransportError::Timeout,
                })
            }
        }
    }
}

/// Whether an open connection can take another request: its sender is ready and its connection
/// has not ended.
async fn still_usable(open: &mut Open) -> bool {
    let Open { sender, connection } = open;
    poll_fn(|cx| {
        // Poll the connection first: it is what notices a close and stops the sender.
        if connection.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        sender.poll_ready(cx).map(|ready| ready.is_ok())
    })
    .await
}

/// Polls the request's future and its connection together in this task until the request ends.
/// Also says whether the connection ended, after which it must not be polled again.
async fn drive_with(
    work: impl Future<Output = Outcome>,
    mut connection: Pin<&mut Connection>,
) -> (Outcome, bool) {
    let mut work = pin!(work);
    let mut connection_ended = false;
    let outcome = poll_fn(|cx| {
        if let Poll::Ready(outcome) = work.as_mut().poll(cx) {
            return Poll::Ready(outcome);
        }
        if connection_ended {
            return Poll::Pending;
        }
        match connection.as_mut().poll(cx) {
            // The connection may have just handed the answer over; look at once rather than
            // after a second trip through the scheduler.
            Poll::Pending => work.as_mut().poll(cx),
            Poll::Ready(result) => {
                connection_ended = true;
                match work.as_mut().poll(cx) {
                    Poll::Ready(outcome) => Poll::Ready(outcome),
                    // The connection is gone and the request is still unanswered.
                    Poll::Pending => Poll::Ready(Err(match result {
                        Ok(()) => TransportError::Closed,
                        Err(e) => classify(&e),
                    })),
                }
            }
        }
    })
    .await;
    (outcome, connection_ended)
}

/// Reads a whole body, keeping it only when `keep`; a single-frame body is kept without a copy.
async fn read_body(
    mut body: hyper::body::Incoming,
    buffer: &mut BytesMut,
    keep: bool,
) -> Result<(Bytes, u64), TransportError> {
    let mut total = 0u64;
    let mut single: Option<Bytes> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| classify(&e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > MAX_BODY {
            return Err(TransportError::BodyTooLarge);
        }
        if !keep {
            continue;
        }
        if single.is_none() && buffer.is_empty() {
            single = Some(data);
        } else {
            if let Some(first) = single.take() {
                buffer.extend_from_slice(&first);
            }
            buffer.extend_from_slice(&data);
        }
    }
    let body = match single {
        Some(data) => data,
        // Splitting hands the bytes over; the buffer's allocation is reclaimed once they drop.
        None => buffer.split().freeze(),
    };
    Ok((body, total))
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
        let is_post = method == Method::POST;
        let mut builder = Request::builder()
            .method(method)
            .uri(Uri::try_from(self.path.as_str())?)
            .header(header::HOST, self.plan.host.clone());
        if is_post {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        builder.body(Full::new(body))
    }
}

#[cfg(test)]
mod tests {
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
