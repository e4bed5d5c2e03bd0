//! [`RecommendationClient`]: one pooled HTTP client per process, with a time budget per call, a
//! body cap, a circuit breaker, optional hedging and optional connect retries.
//!
//! A call goes through these steps, all within one deadline (the configured timeout, or the
//! caller's deadline if earlier), so no wait inside can outlive it:
//!
//! 1. the circuit breaker may refuse the call at once, without touching the network or waiting
//!    for anything;
//! 2. a slot among `max_in_flight` is taken, bounding connections and memory. A call whose
//!    deadline passes while it waits fails with `Saturated`: it never reached the service, so the
//!    breaker does not hear of it;
//! 3. the breaker gives the call its permit (the probe's, if the circuit is half-open), so that
//!    only calls that really send a request report to it;
//! 4. the request is sent on a pooled keep-alive connection (connect failures retried if
//!    configured), hedged by a second request if enabled and slow;
//! 5. the answer is checked (status, size) and decoded. An error answer's body is read for the
//!    message and, if small, to its end, so that its connection goes back to the pool.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_LENGTH, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::debug;

use crate::breaker::{Breaker, BreakerSnapshot, Outcome};
use crate::config::ClientConfig;
use crate::error::{ConfigError, ErrorKind, RecommendationError, one_line_excerpt};

/// How much of a non-200 body is kept for the error message. The excerpt shown is shorter; the
/// slack absorbs whitespace and multi-byte characters.
const STATUS_BODY_PREFIX: usize = 1024;

/// The largest non-200 body read to its end (and then discarded) so that its keep-alive
/// connection can be reused. An abandoned body closes its connection, and during a storm of
/// errors a new connection per error (handshake, slow start, a socket in `TIME_WAIT`) costs more
/// than reading a few KiB: typical error pages, JSON or a proxy's HTML, are well below this. A
/// larger body, announced or found out while reading, is abandoned after the excerpt.
const STATUS_BODY_DRAIN: usize = 64 * 1024;

const USER_AGENT_VALUE: &str = concat!("dashboard-recommendations/", env!("CARGO_PKG_VERSION"));

/// The recommendation service's `items`, exactly as it sent them.
///
/// What an item is (a product id, an object, anything) is the service's business: the client
/// checks only that `items` is a JSON array (within the body cap), keeps its text, and the
/// dashboard writes that text into its answer without decoding or re-encoding it.
#[derive(Debug, Clone, Default)]
pub struct Recommendations(Option<Box<RawValue>>);

impl Recommendations {
    /// The array's JSON text, verbatim (`[]` for none).
    pub fn as_json(&self) -> &str {
        self.0.as_deref().map_or("[]", RawValue::get)
    }

    /// Items from their JSON text, which must be an array.
    ///
    /// # Errors
    ///
    /// When `items` is not JSON, or not an array.
    pub fn from_json(items: &str) -> Result<Self, serde_json::Error> {
        let raw: Box<RawValue> = serde_json::from_str(items)?;
        if !raw.get().starts_with('[') {
            return Err(<serde_json::Error as serde::de::Error>::custom(
                "`items` is not an array",
            ));
        }
        Ok(Recommendations(Some(raw)))
    }

    /// Takes `items` out of the service's answer: any JSON array; anything else (not JSON, no
    /// `items`, `items` not an array) is an error.
    pub(crate) fn from_answer(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            items: &'a RawValue,
        }
        let envelope: Envelope<'_> = serde_json::from_slice(bytes)?;
        if !envelope.items.get().starts_with('[') {
            return Err(<serde_json::Error as serde::de::Error>::custom(
                "`items` is not an array",
            ));
        }
        Ok(Recommendations(Some(envelope.items.to_owned())))
    }
}

impl PartialEq for Recommendations {
    fn eq(&self, other: &Self) -> bool {
        self.as_json() == other.as_json()
    }
}

impl Serialize for Recommendations {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(raw) => raw.serialize(serializer),
            None => serializer.collect_seq(std::iter::empty::<()>()),
        }
    }
}

/// Error counts by kind, indexed in the order of [`ErrorKind::ALL`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts([u64; ErrorKind::ALL.len()]);

impl ErrorCounts {
    /// Calls that failed with `kind`.
    pub fn get(&self, kind: ErrorKind) -> u64 {
        self.0[kind.index()]
    }

    /// Every kind with its count, zeros included, in the order of [`ErrorKind::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (ErrorKind, u64)> + '_ {
        ErrorKind::ALL.iter().map(|kind| (*kind, self.get(*kind)))
    }

    /// Failed calls of any kind.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// The client's counters at one moment, for `/metrics`. All totals count since the client was
/// built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// Calls started. `calls - successes - errors.total()` are in progress or were cancelled by
    /// their caller.
    pub calls: u64,
    /// Calls that returned recommendations.
    pub successes: u64,
    /// Calls that returned an error, by kind.
    pub errors: ErrorCounts,
    /// HTTP requests sent, including hedges and connect retries.
    pub requests_sent: u64,
    /// Hedge requests sent.
    pub hedges: u64,
    /// Calls answered by their hedge rather than by the first request.
    pub hedge_wins: u64,
    /// Requests retried after a failed connect.
    pub connect_retries: u64,
    /// Requests in flight right now.
    pub in_flight: usize,
    /// The circuit breaker.
    pub breaker: BreakerSnapshot,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    successes: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    requests_sent: AtomicU64,
    hedges: AtomicU64,
    hedge_wins: AtomicU64,
    connect_retries: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The client of the recommendation service.
///
/// Build one per process and share it (it is a cheap `Clone` of an `Arc`): all clones use the
/// same connection pool, in-flight limit, breaker and counters. Calls must run on a tokio
/// runtime.
///
/// ```
/// use client::{ClientConfig, ErrorKind, RecommendationClient};
///
/// # // The paused clock makes the server's delay, and the budget below, exact.
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // A local stand-in service on an ephemeral port.
/// let server = upstream::Server::start(upstream::Config::default()).await?;
/// let client = RecommendationClient::new(ClientConfig {
///     base_url: server.base_url(),
///     ..ClientConfig::default()
/// })?;
///
/// let items = client.recommendations(7).await?;
/// assert!(items.as_json().starts_with(r#"[{"product_id":"#)); // as the service sent them
///
/// // The caller's deadline wins when it is shorter than the configured timeout.
/// server.script([upstream::Reply::ok().after(std::time::Duration::from_secs(1))]);
/// let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
/// let error = client.recommendations_with_deadline(7, deadline).await.unwrap_err();
/// assert_eq!(error.kind(), ErrorKind::Timeout);
/// assert_eq!(error.to_string(), "recommendation service did not answer within 20ms");
/// # server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RecommendationClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// One pooled client per lane (worker thread); see [`crate::lane`].
    http: Box<[Client<HttpConnector, Empty<Bytes>>]>,
    /// `base_url` without its trailing `/`.
    base: String,
    config: ClientConfig,
    in_flight: Semaphore,
    breaker: Breaker,
    counters: Counters,
}

impl RecommendationClient {
    /// Builds the client and its (initially empty) connection pool. No connection is made yet.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if `base_url` is not an `http://` URL with a host, or a setting is out of
    /// range (zero timeouts, limits or threshold).
    pub fn new(config: ClientConfig) -> Result<Self, ConfigError> {
        Self::in_lanes(config, 1)
    }

    /// Builds the client with one connection pool per lane (worker thread), `max_idle_per_host`
    /// split between them; see [`crate::lane`]. One lane is [`RecommendationClient::new`].
    ///
    /// # Errors
    ///
    /// As [`RecommendationClient::new`].
    pub fn in_lanes(config: ClientConfig, lanes: usize) -> Result<Self, ConfigError> {
        let base = validate(&config)?;
        let lanes = lanes.max(1);
        let http = (0..lanes)
            .map(|_| {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(config.connect_timeout));
                // Requests are small and answered in one go; Nagle's algorithm would only add
                // latency.
                connector.set_nodelay(true);
                Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(config.max_idle_per_host.div_ceil(lanes))
                    .pool_idle_timeout(config.idle_timeout)
                    // Without a timer the pool never expires idle connections.
                    .pool_timer(TokioTimer::new())
                    .build(connector)
            })
            .collect();

        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base,
                in_flight: Semaphore::new(config.max_in_flight),
                breaker: Breaker::new(config.breaker.clone()),
                config,
                counters: Counters::default(),
            }),
        })
    }

    /// Fetches the recommendations of `user_id`, within the configured timeout.
    ///
    /// Cancel-safe: dropping the future abandons the call and its connection.
    ///
    /// # Errors
    ///
    /// A [`RecommendationError`] saying what went wrong; see [`RecommendationError::kind`].
    pub async fn recommendations(
        &self,
        user_id: i64,
    ) -> Result<Recommendations, RecommendationError> {
        self.call(user_id, None).await
    }

    /// Fetches the recommendations of `user_id`, giving up at `deadline` or after the configured
    /// timeout, whichever comes first. A deadline already past fails at once with
    /// [`RecommendationError::Timeout`] without sending anything (and without counting against
    /// the service in the breaker).
    ///
    /// A timeout set by this deadline counts against the service in the breaker like one set by
    /// the configured timeout, however much shorter it is (see
    /// [`RecommendationError::is_service_failure`]): pass the time an answer is worth waiting
    /// for, not a guess at how fast the service is.
    ///
    /// # Errors
    ///
    /// A [`RecommendationError`] saying what went wrong; see [`RecommendationError::kind`].
    pub async fn recommendations_with_deadline(
        &self,
        user_id: i64,
        deadline: Instant,
    ) -> Result<Recommendations, RecommendationError> {
        self.call(user_id, Some(deadline)).await
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// A snapshot of the counters and of the breaker, for metrics.
    pub fn stats(&self) -> ClientStats {
        let inner = &*self.inner;
        let c = &inner.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ClientStats {
            calls: load(&c.calls),
            successes: load(&c.successes),
            errors: ErrorCounts(c.errors.each_ref().map(load)),
            requests_sent: load(&c.requests_sent),
            hedges: load(&c.hedges),
            hedge_wins: load(&c.hedge_wins),
            connect_retries: load(&c.connect_retries),
            in_flight: inner
                .config
                .max_in_flight
                .saturating_sub(inner.in_flight.available_permits()),
            breaker: inner.breaker.snapshot(),
        }
    }

    async fn call(
        &self,
        user_id: i64,
        deadline: Option<Instant>,
    ) -> Result<Recommendations, RecommendationError> {
        let inner = &*self.inner;
        bump(&inner.counters.calls);
        let result = inner.call(user_id, deadline).await;
        match &result {
            Ok(_) => bump(&inner.counters.successes),
            Err(error) => bump(&inner.counters.errors[error.kind().index()]),
        }
        result
    }
}

impl Inner {
    async fn call(
        &self,
        user_id: i64,
        deadline: Option<Instant>,
    ) -> Result<Recommendations, RecommendationError> {
        let started = Instant::now();
        let configured = started + self.config.timeout;
        let deadline = deadline.map_or(configured, |deadline| deadline.min(configured));
        let budget = deadline.saturating_duration_since(started);
        if budget.is_zero() {
            return Err(RecommendationError::Timeout {
                after: budget,
                queued: budget,
            });
        }
        let uri = self.uri(user_id)?;
        let circuit_open = |retry_in| RecommendationError::CircuitOpen { retry_in };
        // An open circuit answers at once, before the call queues behind busy slots.
        self.breaker.check().map_err(circuit_open)?;

        // Waiting for a slot is waiting on this process, not on the service: a call that runs
        // out of time here was never sent, and must not count as the service's failure.
        let slot = match tokio::time::timeout_at(deadline, self.in_flight.acquire()).await {
            Ok(Ok(slot)) if Instant::now() < deadline => slot,
            // The semaphore is never closed; should it be, the call cannot be made.
            Ok(Err(closed)) => return Err(RecommendationError::unavailable(closed)),
            // Out of time while waiting, or a slot handed over at the deadline itself, which
            // leaves no time to send anything.
            Ok(Ok(_)) | Err(_) => {
                let error = RecommendationError::Saturated { after: budget };
                debug!(user_id, kind = %error.kind(), %error, "recommendation call failed");
                return Err(error);
            }
        };
        // The circuit may have opened while the call queued. Dropping the slot on this path
        // hands it to the next call in line.
        let permit = self.breaker.try_acquire().map_err(circuit_open)?;
        let queued = started.elapsed();

        let result = match tokio::time::timeout_at(deadline, self.fetch(&uri, deadline)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(RecommendationError::Timeout {
                after: budget,
                queued,
            }),
        };
        permit.record(match &result {
            Ok(_) => Outcome::Success,
            Err(error) if error.is_service_failure() => Outcome::Failure,
            Err(_) => Outcome::Neutral,
        });
        // Released only now, so that a call woken by this slot (at once, on a multi-threaded
        // runtime) already sees the circuit this outcome may have opened.
        drop(slot);
        if let Err(error) = &result {
            debug!(user_id, kind = %error.kind(), %error, "recommendation call failed");
        }
        result
    }

    fn uri(&self, user_id: i64) -> Result<Uri, RecommendationError> {
        // `validate` proved that the base URL with any user id parses, so this cannot fail.
        Uri::try_from(format!("{}/users/{user_id}/recommendations", self.base))
            .map_err(RecommendationError::unavailable)
    }

    /// The request, on the slot the caller holds, with hedging if enabled.
    async fn fetch(
        &self,
        uri: &Uri,
        deadline: Instant,
    ) -> Result<Recommendations, RecommendationError> {
        let first = self.attempt(uri, deadline);
        if !self.config.hedge.enabled {
            return first.await;
        }
        let mut first = pin!(first);
        tokio::select! {
            biased;
            result = &mut first => return result,
            () = tokio::time::sleep(self.config.hedge.delay) => {}
        }
        // A hedge must not add load to a client that is already at its limit, where it would
        // only queue behind the requests it is meant to overtake.
        let Ok(_hedge_slot) = self.in_flight.try_acquire() else {
            return first.await;
        };
        bump(&self.counters.hedges);
        let mut second = pin!(self.attempt(uri, deadline));
        // The first good answer wins and the loser is dropped, which closes its connection. If
        // one fails, the other may still succeed within the deadline.
        tokio::select! {
            result = &mut first => match result {
                Ok(items) => Ok(items),
                Err(_) => self.hedge_outcome(second.await),
            },
            result = &mut second => match result {
                Ok(items) => self.hedge_outcome(Ok(items)),
                Err(_) => first.await,
            },
        }
    }

    fn hedge_outcome(
        &self,
        result: Result<Recommendations, RecommendationError>,
    ) -> Result<Recommendations, RecommendationError> {
        if result.is_ok() {
            bump(&self.counters.hedge_wins);
        }
        result
    }

    /// One HTTP exchange, body read included; the caller holds its in-flight slot.
    async fn attempt(
        &self,
        uri: &Uri,
        deadline: Instant,
    ) -> Result<Recommendations, RecommendationError> {
        let (parts, body) = self.send(uri).await?.into_parts();
        if parts.status != StatusCode::OK {
            let announced = content_length(&parts.headers);
            let start = read_error_body(body, announced, deadline).await;
            return Err(RecommendationError::Status {
                status: parts.status,
                body: one_line_excerpt(&start),
            });
        }
        let limit = self.config.body_limit;
        if content_length(&parts.headers).is_some_and(|length| length > limit as u64) {
            // Refused without reading a byte; dropping the body closes the connection.
            return Err(RecommendationError::TooLarge { limit });
        }
        let bytes = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<LengthLimitError>() => {
                return Err(RecommendationError::TooLarge { limit });
            }
            Err(error) => return Err(RecommendationError::unavailable(error)),
        };
        Recommendations::from_answer(&bytes)
            .map_err(|source| RecommendationError::Decode { source })
    }

    /// Sends the request, retrying failed connects as configured.
    async fn send(&self, uri: &Uri) -> Result<Response<Incoming>, RecommendationError> {
        let mut retries = 0;
        loop {
            bump(&self.counters.requests_sent);
            let http = &self.http[lanes::current(self.http.len())];
            match http.request(request(uri)).await {
                Ok(response) => return Ok(response),
                Err(error) if error.is_connect() && retries < self.config.connect_retries => {
                    retries += 1;
                    bump(&self.counters.connect_retries);
                    debug!(%error, retries, "connecting to the recommendation service failed; retrying");
                    let pause = self.config.connect_retry_backoff.saturating_mul(retries);
                    tokio::time::sleep(pause).await;
                }
                Err(error) => return Err(RecommendationError::unavailable(error)),
            }
        }
    }
}

fn request(uri: &Uri) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = uri.clone();
    let headers = request.headers_mut();
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    request
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Reads the start of an error answer's body for the message, and drains the rest if the whole
/// body is at most [`STATUS_BODY_DRAIN`] bytes, so that its keep-alive connection can be reused.
///
/// The status is already known, so this never fails: it stops early at a read error, at a body
/// that turns out larger than the drain cap (dropping it then closes the connection), or at
/// `deadline`, and returns what it has. Stopping at the deadline itself, rather than leaving it
/// to the call's timer, keeps a body that dribbles in from turning a known `503` into a timeout:
/// at the same instant this inner timer is polled first, as it sits inside the call's future.
async fn read_error_body(mut body: Incoming, announced: Option<u64>, deadline: Instant) -> Vec<u8> {
    let drain = announced.is_none_or(|length| length <= STATUS_BODY_DRAIN as u64);
    let mut start = Vec::new();
    let read = async {
        let mut seen = 0;
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                // Trailers carry nothing for the message.
                continue;
            };
            let take = data
                .len()
                .min(STATUS_BODY_PREFIX.saturating_sub(start.len()));
            start.extend_from_slice(&data[..take]);
            seen += data.len();
            let excerpt_done = start.len() >= STATUS_BODY_PREFIX;
            if excerpt_done && (!drain || seen > STATUS_BODY_DRAIN) {
                break;
            }
        }
    };
    // Running out of time is one of the ways to stop; what was read is still the excerpt.
    let _ = tokio::time::timeout_at(deadline, read).await;
    start
}

/// Checks the configuration and returns the base URL without its trailing `/`.
fn validate(config: &ClientConfig) -> Result<String, ConfigError> {
    let url = &config.base_url;
    let bad_url = |reason| ConfigError::BaseUrl {
        url: url.clone(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|_| bad_url("not a valid URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad_url("https is not supported; use http")),
        _ => return Err(bad_url("must start with http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad_url("has no host"));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(bad_url("must not have a query or fragment"));
    }
    let base = url.trim_end_matches('/').to_owned();
    // Every user id renders with the same characters, so the widest one proves them all.
    Uri::try_from(format!("{base}/users/{}/recommendations", i64::MIN))
        .map_err(|_| bad_url("cannot be extended with /users/{id}/recommendations"))?;

    let value = |field, reason| Err(ConfigError::Value { field, reason });
    if config.timeout.is_zero() {
        return value("timeout", "must be greater than zero");
    }
    if config.connect_timeout.is_zero() {
        return value("connect_timeout", "must be greater than zero");
    }
    if config.max_in_flight == 0 || config.max_in_flight > Semaphore::MAX_PERMITS {
        return value("max_in_flight", "must be at least 1 (and reasonably small)");
    }
    if config.body_limit == 0 {
        return value("body_limit", "must be at least 1 byte");
    }
    if config.breaker.failure_threshold == 0 {
        return value("breaker.failure_threshold", "must be at least 1");
    }
    if config.hedge.enabled && config.hedge.delay.is_zero() {
        return value(
            "hedge.delay",
            "must be greater than zero when hedging is enabled (zero would double every request)",
        );
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn with_base(url: &str) -> ClientConfig {
        ClientConfig {
            base_url: url.to_owned(),
            ..ClientConfig::default()
        }
    }

    #[test]
    fn base_urls_are_validated_and_normalised() {
        assert_eq!(
            validate(&with_base("http://127.0.0.1:9100")).unwrap(),
            "http://127.0.0.1:9100"
        );
        assert_eq!(
            validate(&with_base("http://recs.internal/api/v2/")).unwrap(),
            "http://recs.internal/api/v2"
        );
        for (url, reason) in [
            ("", "valid URL"),
            ("127.0.0.1:9100", "http://"),
            ("https://recs.example", "https"),
            ("ftp://recs.example", "http://"),
            ("http://recs.example/?q=1", "query"),
            ("http://recs example", "valid URL"),
        ] {
            let error = validate(&with_base(url)).unwrap_err();
            let message = error.to_string();
            assert!(message.contains(reason), "{url:?}: {message}");
            assert!(
                message.starts_with("invalid recommendations.base_url"),
                "{message}"
            );
        }
    }

    #[test]
    fn the_default_configuration_builds_without_a_runtime() {
        // The API builds its client while reading its settings, before serving anything.
        let client = RecommendationClient::new(ClientConfig::default()).unwrap();
        assert_eq!(client.config(), &ClientConfig::default());
        assert_eq!(client.stats().calls, 0);
    }

    #[test]
    fn zero_limits_are_refused_with_the_field_name() {
        let cases = [
            (
                ClientConfig {
                    timeout: Duration::ZERO,
                    ..ClientConfig::default()
                },
                "recommendations.timeout",
            ),
            (
                ClientConfig {
                    max_in_flight: 0,
                    ..ClientConfig::default()
                },
                "recommendations.max_in_flight",
            ),
            (
                ClientConfig {
                    body_limit: 0,
                    ..ClientConfig::default()
                },
                "recommendations.body_limit",
            ),
        ];
        for (config, field) in cases {
            let message = RecommendationClient::new(config).unwrap_err().to_string();
            assert!(
                message.starts_with(&format!("invalid {field}:")),
                "{message}"
            );
        }
        let mut config = ClientConfig::default();
        config.breaker.failure_threshold = 0;
        assert!(RecommendationClient::new(config).is_err());
        let mut config = ClientConfig::default();
        config.hedge.enabled = true;
        config.hedge.delay = Duration::ZERO;
        assert!(RecommendationClient::new(config).is_err());
    }

    #[test]
    fn items_of_any_shape_pass_through_verbatim_and_anything_else_is_a_decode_error() {
        for items in [
            "[101,202,303]",
            r#"[{"product_id":42,"score":0.5,"reason":"because"}]"#,
            r#"[1,"two",{"three":3},[4],null,true,5.5]"#,
            "[]",
            "[ 1 , 2 ]",
        ] {
            let answer = format!(r#"{{"user_id":7,"items":{items},"next":null}}"#);
            let decoded = Recommendations::from_answer(answer.as_bytes()).unwrap();
            assert_eq!(decoded.as_json(), items);
            assert_eq!(serde_json::to_string(&decoded).unwrap(), items);
        }
        for bad in [
            r#"{"user_id":7}"#,
            r#"{"items":{"a":1}}"#,
            r#"{"items":null}"#,
            r#"{"items":"[1]"}"#,
            r#"{"items":[1,2"#,
            "[1,2]",
            "",
        ] {
            assert!(
                Recommendations::from_answer(bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            serde_json::to_string(&Recommendations::default()).unwrap(),
            "[]"
        );
    }

    #[test]
    fn error_counts_list_every_kind() {
        let mut counts = ErrorCounts::default();
        counts.0[ErrorKind::Decode.index()] = 3;
        counts.0[ErrorKind::Timeout.index()] = 2;
        assert_eq!(counts.get(ErrorKind::Decode), 3);
        assert_eq!(counts.total(), 5);
        assert_eq!(counts.iter().count(), ErrorKind::ALL.len());
        assert_eq!(counts.iter().next(), Some((ErrorKind::Timeout, 2)));
    }
}
