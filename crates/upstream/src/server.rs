//! The HTTP server: accept loop, per-connection hyper tasks, routing, fault injection and
//! shutdown.
//!
//! One task accepts; each connection is served by its own task on hyper's HTTP/1 server with
//! keep-alive. All tasks are tracked and watch one cancellation token, so [`Server::shutdown`] can
//! stop accepting, let answers in progress finish, cut delays and hangs short, and know when
//! everyone has gone.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::Error;
use crate::body::ResponseBody;
use crate::catalog::Envelope;
use crate::config::Shape;
use crate::config::{Config, Fault, MAX_DELAY, Reply};
use crate::reset::{ResetSwitch, ResettableStream};

/// Header that forces a fault on one request, e.g. `x-upstream-fault: hang` (see [`Fault`] for the
/// names). Handy with curl; tests that go through a real client use [`Server::script`] or
/// [`Server::set_user_reply`] instead.
pub const FAULT_HEADER: &str = "x-upstream-fault";

/// Header that forces the latency of one request, in milliseconds, e.g. `x-upstream-delay-ms: 250`.
pub const DELAY_HEADER: &str = "x-upstream-delay-ms";

/// How long [`Server::shutdown`] waits for connections to finish before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long the accept loop pauses after an accept error (such as running out of file
/// descriptors) before trying again, so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Counters of a running server, for tests and for the summary printed on shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// TCP connections accepted since start.
    pub connections: u64,
    /// TCP connections open right now.
    pub open_connections: u64,
    /// HTTP requests received since start, on any path.
    pub requests: u64,
    /// Requests that were given a fault (forced or drawn).
    pub faults: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    open_connections: AtomicU64,
    requests: AtomicU64,
    /// Recommendation requests so far; the arrival number of each one seeds its random draw.
    recommendation_requests: AtomicU64,
    faults: AtomicU64,
}

/// State shared by every task of one server.
#[derive(Debug)]
struct Shared {
    config: Config,
    http: http1::Builder,
    token: CancellationToken,
    counters: Counters,
    /// Replies forced on the next requests, in arrival order. `script_len` mirrors its length so
    /// that the hot path can skip the lock when no script is queued.
    script: Mutex<VecDeque<Reply>>,
    script_len: AtomicUsize,
    /// Replies forced for particular users; `overrides_len` plays the same role as `script_len`.
    overrides: RwLock<HashMap<i64, Reply>>,
    overrides_len: AtomicUsize,
}

/// A running stand-in recommendation service.
///
/// It serves `GET /users/{id}/recommendations` with `{"user_id": id, "items": [...]}` (see
/// [`Config::items_for`]). Dropping it stops the server in the background; [`Server::shutdown`]
/// stops it and waits for its connections to close.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    tracker: TaskTracker,
    _stop_on_drop: DropGuard,
}

impl Server {
    /// Starts a server on an ephemeral port of 127.0.0.1, for tests.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if `config` does not validate, [`Error::Bind`] if no port could be
    /// bound.
    pub async fn start(config: Config) -> Result<Self, Error> {
        Self::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// Starts a server on `addr` (port 0 picks a free port) on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if `config` does not validate, [`Error::Bind`] if `addr` cannot be
    /// bound (in use, not local, no permission).
    pub async fn bind(addr: SocketAddr, config: Config) -> Result<Self, Error> {
        config.validate()?;
        let bind_error = |source| Error::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;

        let mut http = http1::Builder::new();
        // The timer drives hyper's header-read timeout (30 s by default), so a client that opens a
        // connection and sends half a request cannot hold it forever.
        http.timer(TokioTimer::new()).keep_alive(true);

        let token = CancellationToken::new();
        let shared = Arc::new(Shared {
            config,
            http,
            token: token.clone(),
            counters: Counters::default(),
            script: Mutex::new(VecDeque::new()),
            script_len: AtomicUsize::new(0),
            overrides: RwLock::new(HashMap::new()),
            overrides_len: AtomicUsize::new(0),
        });
        let tracker = TaskTracker::new();
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), tracker.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
            tracker,
            _stop_on_drop: token.drop_guard(),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to give a client, e.g. `http://127.0.0.1:40123`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            connections: c.connections.load(Ordering::Relaxed),
            open_connections: c.open_connections.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
        }
    }

    /// Forces the replies of the next recommendation requests, one per request in arrival order,
    /// after any already queued. Requests with a [`FAULT_HEADER`] or [`DELAY_HEADER`] do not
    /// consume the script; script entries take precedence over [`Server::set_user_reply`].
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        let mut script = self
            .shared
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        script.extend(replies);
        self.shared
            .script_len
            .store(script.len(), Ordering::Release);
    }

    /// Forces every reply for `user_id` until cleared: a deterministic way to make one user's
    /// recommendations slow or failing in an end-to-end test.
    pub fn set_user_reply(&self, user_id: i64, reply: Reply) {
        let mut overrides = self
            .shared
            .overrides
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        overrides.insert(user_id, reply);
        self.shared
            .overrides_len
            .store(overrides.len(), Ordering::Release);
    }

    /// Removes the override of `user_id`, if any.
    pub fn clear_user_reply(&self, user_id: i64) {
        let mut overrides = self
            .shared
            .overrides
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        overrides.remove(&user_id);
        self.shared
            .overrides_len
            .store(overrides.len(), Ordering::Release);
    }

    /// Stops accepting, ends delays and hangs in progress, lets answers being written finish, and
    /// waits (at most 5 s) for every connection to close.
    pub async fn shutdown(self) {
        self.shared.token.cancel();
        if let Err(error) = self.accept.await {
            warn!(%error, "upstream accept loop failed");
        }
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.tracker.len(),
                "upstream connections still open after the shutdown grace period"
            );
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            () = shared.token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                tracker.spawn(serve_connection(shared.clone(), stream));
            }
            Err(error) => {
                // Accept errors are per connection (aborted handshakes) or resource exhaustion
                // (EMFILE); neither is a reason to stop serving, but the latter must not spin.
                warn!(%error, "upstream accept failed");
                tokio::select! {
                    () = shared.token.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Keeps `open_connections` right however the connection task ends.
struct OpenConnection<'a>(&'a Counters);

impl<'a> OpenConnection<'a> {
    fn new(counters: &'a Counters) -> Self {
        counters.connections.fetch_add(1, Ordering::Relaxed);
        counters.open_connections.fetch_add(1, Ordering::Relaxed);
        Self(counters)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let _open = OpenConnection::new(&shared.counters);
    // Answers are small and written in one go; Nagle's algorithm would only add latency.
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%error, "could not set TCP_NODELAY");
    }
    let (stream, reset) = ResettableStream::new(stream);
    let service = {
        let shared = shared.clone();
        service_fn(move |request| handle(shared.clone(), reset.clone(), request))
    };
    let connection = shared.http.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shared.token.cancelled() => {
            // Finish the answer in progress (delays and hangs end at once on the same token),
            // then close instead of waiting for the next request.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%error, "upstream connection closed with an error");
    }
}

/// Why the server drops a connection without answering. Returning it from the service makes
/// hyper close the connection.
#[derive(Debug, thiserror::Error)]
enum Abort {
    #[error("connection reset on purpose (fault injection)")]
    Reset,
    #[error("hanging request reached the hang limit")]
    HangLimit,
    #[error("server shutting down")]
    Shutdown,
}

/// What one recommendation request will get.
#[derive(Debug, Clone, Copy)]
struct Decided {
    delay: Duration,
    fault: Option<Fault>,
}

impl Shared {
    fn decide(&self, user_id: i64, headers: &HeaderMap) -> Result<Decided, Rejection> {
        let n = self
            .counters
            .recommendation_requests
            .fetch_add(1, Ordering::Relaxed);
        let drawn = self.config.draw(n);
        let forced = match header_reply(headers)? {
            Some(reply) => Some(reply),
            None => self.next_scripted().or_else(|| self.user_override(user_id)),
        };
        let forced = forced.unwrap_or_default();
        Ok(Decided {
            delay: forced.delay.unwrap_or(drawn.delay),
            fault: forced.fault.unwrap_or(drawn.fault),
        })
    }

    fn next_scripted(&self) -> Option<Reply> {
        if self.script_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut script = self.script.lock().unwrap_or_else(PoisonError::into_inner);
        let reply = script.pop_front();
        self.script_len.store(script.len(), Ordering::Release);
        reply
    }

    fn user_override(&self, user_id: i64) -> Option<Reply> {
        if self.overrides_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let overrides = self
            .overrides
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        overrides.get(&user_id).copied()
    }

    /// Sleeps for `duration`, or until shutdown.
    async fn wait(&self, duration: Duration) -> Result<(), Abort> {
        tokio::select! {
            () = self.token.cancelled() => Err(Abort::Shutdown),
            () = tokio::time::sleep(duration) => Ok(()),
        }
    }
}

/// Reads the forcing headers of one request. An invalid value is answered with 400 rather than
/// ignored, so that a typo in a manual experiment is noticed.
fn header_reply(headers: &HeaderMap) -> Result<Option<Reply>, Rejection> {
    let fault = headers.get(FAULT_HEADER);
    let delay = headers.get(DELAY_HEADER);
    if fault.is_none() && delay.is_none() {
        return Ok(None);
    }
    let mut reply = Reply::default();
    if let Some(value) = fault {
        let fault = value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<Fault>().ok())
            .ok_or(Rejection::bad_request(
                "invalid x-upstream-fault; expected error, error:<status>, hang, malformed, no-items, items-not-array, oversized, oversized-chunked or reset",
            ))?;
        reply.fault = Some(Some(fault));
    }
    if let Some(value) = delay {
        let millis = value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .filter(|millis| u128::from(*millis) <= MAX_DELAY.as_millis())
            .ok_or(Rejection::bad_request(
                "invalid x-upstream-delay-ms; expected whole milliseconds, at most 600000",
            ))?;
        reply.delay = Some(Duration::from_millis(millis));
    }
    Ok(Some(reply))
}

/// Parses `/users/{id}/recommendations`, answering anything else with the right error.
fn route(method: &Method, path: &str) -> Result<i64, Rejection> {
    let Some(id) = path
        .strip_prefix("/users/")
        .and_then(|rest| rest.strip_suffix("/recommendations"))
    else {
        return Err(Rejection {
            status: StatusCode::NOT_FOUND,
            message: "not found; the only resource is /users/{id}/recommendations",
        });
    };
    let Ok(user_id) = id.parse::<i64>() else {
        return Err(Rejection::bad_request(
            "the user id must be a 64-bit integer",
        ));
    };
    if method != Method::GET {
        return Err(Rejection {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: "only GET is allowed",
        });
    }
    Ok(user_id)
}

/// A request the server refuses before doing any work for it.
#[derive(Debug, Clone, Copy)]
struct Rejection {
    status: StatusCode,
    message: &'static str,
}

impl Rejection {
    const fn bad_request(message: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }

    fn into_response(self) -> Response<ResponseBody> {
        let mut response = error_response(self.status, self.message);
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
        }
        response
    }
}

async fn handle(
    shared: Arc<Shared>,
    reset: ResetSwitch,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Abort> {
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let user_id = match route(request.method(), request.uri().path()) {
        Ok(user_id) => user_id,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let decided = match shared.decide(user_id, request.headers()) {
        Ok(decided) => decided,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    if decided.fault.is_some() {
        shared.counters.faults.fetch_add(1, Ordering::Relaxed);
    }
    if !decided.delay.is_zero() {
        shared.wait(decided.delay).await?;
    }
    let config = &shared.config;
    let response = match decided.fault {
        None => json_response(StatusCode::OK, recommendations_json(config, user_id)),
        Some(Fault::Status(status)) => error_response(status, "injected failure"),
        Some(Fault::Hang) => {
            shared.wait(config.hang_limit).await?;
            return Err(Abort::HangLimit);
        }
        Some(Fault::Malformed) => {
            // A document cut in half: what a crashed or proxied upstream really sends.
            let mut body = recommendations_json(config, user_id);
            body.truncate(body.len() / 2);
            json_response(StatusCode::OK, body)
        }
        Some(Fault::MissingItems) => json_response(
            StatusCode::OK,
            format!("{{\"user_id\":{user_id}}}").into_bytes(),
        ),
        Some(Fault::ItemsNotArray) => json_response(
            StatusCode::OK,
            format!("{{\"user_id\":{user_id},\"items\":{{\"product_id\":1}}}}").into_bytes(),
        ),
        Some(Fault::Oversized { declared }) => json_body_response(
            StatusCode::OK,
            ResponseBody::oversized(config.oversized_bytes, declared),
        ),
        Some(Fault::Reset) => {
            reset.arm();
            return Err(Abort::Reset);
        }
    };
    Ok(response)
}

fn recommendations_json(config: &Config, user_id: i64) -> Vec<u8> {
    let items = config.items_for(user_id);
    // Serialising plain structs of integers, floats and static strings cannot fail; should it
    // ever, an empty body still makes the client report a decode error rather than hang.
    match config.shape {
        Shape::Objects => serde_json::to_vec(&Envelope {
            user_id,
            items: &items,
        }),
        Shape::Ids => serde_json::to_vec(&Envelope {
            user_id,
            items: &items.iter().map(|item| item.product_id).collect::<Vec<_>>(),
        }),
    }
    .unwrap_or_default()
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<ResponseBody> {
    json_body_response(status, ResponseBody::full(Bytes::from(body)))
}

fn json_body_response(status: StatusCode, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({ "error": message }).to_string();
    json_response(status, body.into_bytes())
}
