//! Integration tests of the recommendation client against real HTTP servers on loopback: the
//! `upstream` stand-in, started in-process on an ephemeral port, with its faults forced per
//! request so every case is deterministic.
//!
//! Tests about time run on tokio's paused clock. Client and server share the test's runtime, so
//! the server's delays and hangs are virtual too; loopback I/O completes within the kernel before
//! the runtime goes idle, so the clock only jumps when every task is genuinely waiting on a timer.

#![allow(clippy::unwrap_used)]

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use client::{
    BreakerState, ClientConfig, ErrorKind, RecommendationClient, RecommendationError,
    Recommendations,
};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use upstream::{Config, Fault, Reply, Server};

async fn serve(config: Config) -> Server {
    Server::start(config).await.unwrap()
}

fn client_for(server: &Server, tweak: impl FnOnce(&mut ClientConfig)) -> RecommendationClient {
    let mut config = ClientConfig {
        base_url: server.base_url(),
        ..ClientConfig::default()
    };
    tweak(&mut config);
    RecommendationClient::new(config).unwrap()
}

/// What the stand-in answers for `user_id`: its items, passed through as they were sent.
fn expected_items(server: &Server, user_id: i64) -> Recommendations {
    let items = serde_json::to_string(&server.config().items_for(user_id)).unwrap();
    Recommendations::from_json(&items).unwrap()
}

/// Checks the kind and that the message is one line, and returns the message.
fn message_of(error: &RecommendationError, kind: ErrorKind) -> String {
    assert_eq!(error.kind(), kind, "{error:?}");
    let message = error.to_string();
    assert!(!message.contains('\n'), "{message:?}");
    // Only saturation is this client's own doing, and its message must not blame the service.
    let subject = if kind == ErrorKind::Saturated {
        "recommendation client "
    } else {
        "recommendation service "
    };
    assert!(message.starts_with(subject), "{message}");
    message
}

/// Starts `count` calls at once, for users 1, 2, …, in that order: on the test's single-threaded
/// runtime each reaches the in-flight queue in the order it was spawned.
fn spawn_calls(
    client: &RecommendationClient,
    count: i64,
) -> Vec<JoinHandle<Result<Recommendations, RecommendationError>>> {
    (1..=count)
        .map(|user_id| {
            let client = client.clone();
            tokio::spawn(async move { client.recommendations(user_id).await })
        })
        .collect()
}

/// Waits (boundedly) until the server has seen its connections close down to `open`.
async fn until_open_connections(server: &Server, open: u64) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while server.stats().open_connections != open {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("open connections stuck at {:?}", server.stats()));
}

/// How [`CannedServer`] sends its error body.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// With `Content-Length`.
    Announced,
    /// With chunked transfer encoding, in 1 KiB chunks, so the length is unknown up front.
    Chunked,
    /// With `Content-Length`, but only the first 100 bytes are sent; then the connection stalls.
    Stalled,
}

/// A real HTTP/1.1 server on loopback, written by hand so it can send what the `upstream`
/// stand-in does not: error pages of any size (proxies send HTML pages of several KiB), chunked
/// or announced, or cut short. It answers every request on a keep-alive connection with
/// `503 Service Unavailable` and the same body, and counts connections and requests.
struct CannedServer {
    url: String,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl CannedServer {
    /// The 503 page: `page ` followed by `x` up to `size` bytes.
    fn body(size: usize) -> Vec<u8> {
        let mut body = b"page ".to_vec();
        body.resize(size.max(body.len()), b'x');
        body
    }

    async fn start(size: usize, framing: Framing) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let body = Self::body(size);
        let head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/html\r\n";
        let response: Arc<[u8]> = match framing {
            Framing::Announced | Framing::Stalled => {
                let mut response = format!("{head}content-length: {size}\r\n\r\n").into_bytes();
                let sent = if matches!(framing, Framing::Stalled) {
                    100
                } else {
                    size
                };
                response.extend_from_slice(&body[..sent]);
                response.into()
            }
            Framing::Chunked => {
                let mut response = format!("{head}transfer-encoding: chunked\r\n\r\n").into_bytes();
                for chunk in body.chunks(1024) {
                    response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    response.extend_from_slice(chunk);
                    response.extend_from_slice(b"\r\n");
                }
                response.extend_from_slice(b"0\r\n\r\n");
                response.into()
            }
        };
        let stall = matches!(framing, Framing::Stalled);
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn({
            let (connections, requests) = (connections.clone(), requests.clone());
            async move {
                loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    connections.fetch_add(1, Ordering::Relaxed);
                    let (response, requests) = (response.clone(), requests.clone());
                    tokio::spawn(async move {
                        // The client's requests are GETs without a body: a head ends the request.
                        let mut buffer = Vec::new();
                        let mut chunk = [0; 4096];
                        loop {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                            if !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                                continue;
                            }
                            buffer.clear();
                            requests.fetch_add(1, Ordering::Relaxed);
                            if stream.write_all(&response).await.is_err() {
                                return;
                            }
                            if stall {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self {
            url,
            connections,
            requests,
            accept,
        }
    }

    /// (connections accepted, requests answered).
    fn counts(&self) -> (u64, u64) {
        (
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }
}

/// A client of `server`, without a breaker, which would stop calling it after five 503s.
fn canned_client(
    server: &CannedServer,
    tweak: impl FnOnce(&mut ClientConfig),
) -> RecommendationClient {
    let mut config = ClientConfig {
        base_url: server.url.clone(),
        ..ClientConfig::default()
    };
    config.breaker.enabled = false;
    tweak(&mut config);
    RecommendationClient::new(config).unwrap()
}

impl Drop for CannedServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A loopback port with nothing listening on it.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn fetches_and_decodes_the_items_ignoring_unknown_fields() {
    let server = serve(Config::default()).await;
    // A trailing slash in the base URL is tolerated.
    let client = client_for(&server, |c| c.base_url.push('/'));

    let items = client.recommendations(7).await.unwrap();
    // The server also sends a `reason` per item and a top-level `user_id`; both are ignored.
    assert_eq!(items, expected_items(&server, 7));
    assert_eq!(
        client.recommendations(-4).await.unwrap(),
        expected_items(&server, -4)
    );

    let stats = client.stats();
    assert_eq!(
        (stats.calls, stats.successes, stats.errors.total()),
        (2, 2, 0)
    );
    assert_eq!(stats.requests_sent, 2);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.breaker.state, BreakerState::Closed);
    server.shutdown().await;
}

#[tokio::test]
async fn a_non_200_answer_is_a_status_error_with_the_start_of_the_body() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |_| {});
    server.script([Reply::fault(Fault::Status(StatusCode::SERVICE_UNAVAILABLE))]);

    let error = client.recommendations(7).await.unwrap_err();
    let message = message_of(&error, ErrorKind::Status);
    assert_eq!(
        message,
        r#"recommendation service answered 503 Service Unavailable: {"error":"injected failure"}"#
    );
    assert!(matches!(
        error,
        RecommendationError::Status { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE
    ));
    assert_eq!(client.stats().errors.get(ErrorKind::Status), 1);
    assert_eq!(client.stats().breaker.consecutive_failures, 1);

    // A 4xx is about the request, not the service's health: the breaker does not count it.
    server.script([Reply::fault(Fault::Status(StatusCode::NOT_FOUND))]);
    let error = client.recommendations(7).await.unwrap_err();
    assert!(message_of(&error, ErrorKind::Status).contains("404 Not Found"));
    assert_eq!(client.stats().breaker.consecutive_failures, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_json_and_a_missing_items_list_are_decode_errors() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |_| {});
    server.script([
        Reply::fault(Fault::Malformed),
        Reply::fault(Fault::MissingItems),
    ]);

    let error = client.recommendations(7).await.unwrap_err();
    let message = message_of(&error, ErrorKind::Decode);
    assert!(
        message.starts_with("recommendation service sent an invalid response: EOF while parsing"),
        "{message}"
    );
    assert!(error.source().is_some());

    let error = client.recommendations(7).await.unwrap_err();
    let message = message_of(&error, ErrorKind::Decode);
    assert!(message.contains("missing field `items`"), "{message}");
    assert_eq!(client.stats().errors.get(ErrorKind::Decode), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_announced_or_streamed() {
    let limit = 4096;
    for (declared, name) in [(true, "Content-Length"), (false, "chunked")] {
        let fault = Reply::fault(Fault::Oversized { declared });
        for (size, accepted) in [(limit, true), (limit + 1, false), (4 << 20, false)] {
            let server = serve(Config {
                oversized_bytes: size,
                ..Config::default()
            })
            .await;
            let client = client_for(&server, |c| c.body_limit = limit);
            server.script([fault]);
            let result = client.recommendations(7).await;
            if accepted {
                // The padded document has an empty item list.
                assert_eq!(result.unwrap().as_json(), "[]", "{name}, {size} bytes");
            } else {
                let error = result.unwrap_err();
                assert_eq!(
                    message_of(&error, ErrorKind::TooLarge),
                    "recommendation service sent a response larger than the 4096-byte limit",
                    "{name}, {size} bytes"
                );
            }
            server.shutdown().await;
        }
    }
}

#[tokio::test]
async fn a_reset_or_refused_connection_is_unavailable() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |_| {});
    server.script([Reply::fault(Fault::Reset)]);
    let error = client.recommendations(7).await.unwrap_err();
    assert_eq!(
        message_of(&error, ErrorKind::Unavailable),
        "recommendation service unavailable: connection reset"
    );
    // The pool recovers: the next call opens a fresh connection and succeeds.
    assert_eq!(
        client.recommendations(7).await.unwrap(),
        expected_items(&server, 7)
    );
    server.shutdown().await;

    let client = RecommendationClient::new(ClientConfig {
        base_url: closed_port_url().await,
        ..ClientConfig::default()
    })
    .unwrap();
    let error = client.recommendations(7).await.unwrap_err();
    assert_eq!(
        message_of(&error, ErrorKind::Unavailable),
        "recommendation service unavailable: connection refused"
    );
    assert_eq!(client.stats().errors.get(ErrorKind::Unavailable), 1);
}

#[tokio::test(start_paused = true)]
async fn connect_failures_are_retried_with_backoff_when_configured() {
    let client = RecommendationClient::new(ClientConfig {
        base_url: closed_port_url().await,
        connect_retries: 2,
        connect_retry_backoff: Duration::from_millis(50),
        ..ClientConfig::default()
    })
    .unwrap();
    let started = Instant::now();
    let error = client.recommendations(7).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    // 50 ms before the first retry, 100 ms before the second.
    assert_eq!(started.elapsed(), Duration::from_millis(150));
    let stats = client.stats();
    assert_eq!((stats.requests_sent, stats.connect_retries), (3, 2));
    // One failed call, however many connects it tried.
    assert_eq!(stats.breaker.consecutive_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn a_server_that_never_answers_times_out_after_the_configured_timeout() {
    let server = serve(Config {
        hang_rate: 1.0,
        ..Config::default()
    })
    .await;
    let client = client_for(&server, |_| {});

    let started = Instant::now();
    let error = client.recommendations(7).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(
        message_of(&error, ErrorKind::Timeout),
        "recommendation service did not answer within 5s"
    );
    assert!(matches!(
        error,
        RecommendationError::Timeout { after, queued }
            if after == Duration::from_secs(5) && queued.is_zero()
    ));
    // Giving up closes the connection, which frees the server's side of it too.
    until_open_connections(&server, 0).await;
    assert_eq!(client.stats().in_flight, 0);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_caller_deadline_shortens_the_budget_and_a_past_one_sends_nothing() {
    let server = serve(Config {
        delay: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    let client = client_for(&server, |_| {});

    let started = Instant::now();
    let error = client
        .recommendations_with_deadline(7, started + Duration::from_millis(250))
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert_eq!(
        message_of(&error, ErrorKind::Timeout),
        "recommendation service did not answer within 250ms"
    );
    // A caller's deadline, even one much shorter than the configured timeout, is how long an
    // answer is worth waiting for: a request sent at once and not answered by then counts against
    // the service (the API's dashboard relies on this to open the breaker on a hanging service).
    assert_eq!(client.stats().breaker.consecutive_failures, 1);

    // A deadline later than the configured timeout does not extend it.
    let client = client_for(&server, |c| c.timeout = Duration::from_millis(400));
    let started = Instant::now();
    let error = client
        .recommendations_with_deadline(7, started + Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(400));
    assert_eq!(error.kind(), ErrorKind::Timeout);

    // A budget that is already spent fails at once, without a request or a breaker failure.
    let requests = server.stats().requests;
    let error = client
        .recommendations_with_deadline(7, Instant::now())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(server.stats().requests, requests);
    assert_eq!(client.stats().breaker.consecutive_failures, 1);

    // And a deadline with room for the 1 s answer (under the default 5 s timeout) succeeds.
    let client = client_for(&server, |_| {});
    let started = Instant::now();
    let items = client
        .recommendations_with_deadline(7, Instant::now() + Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(items, expected_items(&server, 7));
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    server.shutdown().await;
}

#[tokio::test]
async fn sequential_calls_reuse_one_keep_alive_connection() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |_| {});
    for user_id in 0..100 {
        assert_eq!(
            client.recommendations(user_id).await.unwrap(),
            expected_items(&server, user_id)
        );
    }
    let stats = server.stats();
    assert_eq!(stats.requests, 100);
    assert_eq!(stats.connections, 1);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| c.idle_timeout = Duration::from_secs(1));
    client.recommendations(1).await.unwrap();
    assert_eq!(server.stats().open_connections, 1);

    // The pool checks on an interval of the idle timeout, so allow two of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    until_open_connections(&server, 0).await;
    client.recommendations(1).await.unwrap();
    assert_eq!(server.stats().connections, 2);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn requests_in_flight_are_capped_and_the_rest_wait_their_turn() {
    let server = serve(Config {
        delay: Duration::from_millis(100),
        ..Config::default()
    })
    .await;
    let client = client_for(&server, |c| c.max_in_flight = 2);

    let started = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|user_id| {
            let client = client.clone();
            tokio::spawn(async move { client.recommendations(user_id).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // Ten 100 ms answers, two at a time.
    assert_eq!(started.elapsed(), Duration::from_millis(500));
    assert_eq!(server.stats().connections, 2);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_fails_fast_and_closes_after_a_successful_probe() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| {
        c.breaker.failure_threshold = 3;
        c.breaker.cooldown = Duration::from_secs(10);
    });
    let failure = Reply::fault(Fault::Status(StatusCode::INTERNAL_SERVER_ERROR));
    server.script([failure; 3]);
    for _ in 0..3 {
        let error = client.recommendations(7).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Status);
    }
    let breaker = client.stats().breaker;
    assert_eq!(breaker.state, BreakerState::Open);
    assert_eq!(breaker.opened_total, 1);

    // Open: calls fail at once, and the server hears nothing.
    tokio::time::advance(Duration::from_secs(4)).await;
    let started = Instant::now();
    let error = client.recommendations(7).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(
        message_of(&error, ErrorKind::CircuitOpen),
        "recommendation service temporarily skipped after repeated failures"
    );
    assert!(matches!(
        error,
        RecommendationError::CircuitOpen { retry_in } if retry_in == Duration::from_secs(6)
    ));
    assert_eq!(server.stats().requests, 3);

    // After the cool-down one probe goes through; its success closes the circuit.
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(
        client.recommendations(7).await.unwrap(),
        expected_items(&server, 7)
    );
    let stats = client.stats();
    assert_eq!(stats.breaker.state, BreakerState::Closed);
    assert_eq!(stats.breaker.consecutive_failures, 0);
    assert_eq!(stats.breaker.probes_total, 1);
    assert_eq!(stats.breaker.rejected_total, 1);
    assert_eq!(stats.errors.get(ErrorKind::CircuitOpen), 1);
    client.recommendations(8).await.unwrap();
    assert_eq!(server.stats().requests, 5);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_and_other_calls_fail_fast_while_it_runs() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| {
        c.breaker.failure_threshold = 1;
        c.breaker.cooldown = Duration::from_secs(10);
    });
    server.script([
        Reply::fault(Fault::Status(StatusCode::BAD_GATEWAY)),
        // The probe: slow, then failing.
        Reply::fault(Fault::Status(StatusCode::BAD_GATEWAY)).after(Duration::from_secs(1)),
    ]);
    client.recommendations(7).await.unwrap_err();
    tokio::time::advance(Duration::from_secs(10)).await;

    let probe = tokio::spawn({
        let client = client.clone();
        async move { client.recommendations(7).await }
    });
    while server.stats().requests < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(client.stats().breaker.state, BreakerState::HalfOpen);
    let error = client.recommendations(8).await.unwrap_err();
    assert!(matches!(error, RecommendationError::CircuitOpen { retry_in } if retry_in.is_zero()));

    assert_eq!(probe.await.unwrap().unwrap_err().kind(), ErrorKind::Status);
    let breaker = client.stats().breaker;
    assert_eq!(breaker.state, BreakerState::Open);
    assert_eq!(breaker.opened_total, 2);
    assert_eq!(server.stats().requests, 2);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hedge_takes_the_faster_answer_and_cancels_the_slow_one() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| {
        c.hedge.enabled = true;
        c.hedge.delay = Duration::from_millis(50);
    });
    // The first request would fail after a second; the hedge, sent at 50 ms, answers at once.
    server.script([
        Reply::fault(Fault::Status(StatusCode::INTERNAL_SERVER_ERROR))
            .after(Duration::from_secs(1)),
    ]);

    let started = Instant::now();
    let items = client.recommendations(7).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    assert_eq!(items, expected_items(&server, 7));
    let stats = client.stats();
    assert_eq!(
        (stats.requests_sent, stats.hedges, stats.hedge_wins),
        (2, 1, 1)
    );
    assert_eq!(stats.breaker.consecutive_failures, 0);
    assert_eq!(server.stats().requests, 2);

    // The slow request was abandoned: its connection closes and only the hedge's stays pooled.
    until_open_connections(&server, 1).await;
    assert_eq!(server.stats().connections, 2);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn no_hedge_is_sent_when_the_answer_comes_before_the_hedge_delay() {
    let server = serve(Config {
        delay: Duration::from_millis(20),
        ..Config::default()
    })
    .await;
    let client = client_for(&server, |c| {
        c.hedge.enabled = true;
        c.hedge.delay = Duration::from_millis(50);
    });
    for user_id in 0..10 {
        client.recommendations(user_id).await.unwrap();
    }
    let stats = client.stats();
    assert_eq!((stats.requests_sent, stats.hedges), (10, 0));
    assert_eq!(server.stats().requests, 10);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_hedge_leaves_the_first_request_to_answer() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| {
        c.hedge.enabled = true;
        c.hedge.delay = Duration::from_millis(50);
    });
    server.script([
        Reply::ok().after(Duration::from_millis(200)),
        Reply::fault(Fault::Status(StatusCode::SERVICE_UNAVAILABLE)),
    ]);
    let started = Instant::now();
    let items = client.recommendations(7).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    assert_eq!(items, expected_items(&server, 7));
    let stats = client.stats();
    assert_eq!((stats.hedges, stats.hedge_wins), (1, 0));
    server.shutdown().await;
}

#[tokio::test]
async fn sequential_503s_reuse_one_keep_alive_connection() {
    // The stand-in's own error body is small.
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| c.breaker.enabled = false);
    server.script([Reply::fault(Fault::Status(StatusCode::SERVICE_UNAVAILABLE)); 20]);
    for _ in 0..20 {
        let error = client.recommendations(7).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Status);
    }
    let stats = server.stats();
    assert_eq!((stats.connections, stats.requests), (1, 20));
    server.shutdown().await;

    // Error pages of tens of KiB, announced or chunked, are read to their end so that the
    // connection goes back to the pool instead of being closed: a 5xx storm must not also
    // become a storm of new TCP connections.
    for framing in [Framing::Announced, Framing::Chunked] {
        let server = CannedServer::start(32 * 1024, framing).await;
        let client = canned_client(&server, |_| {});
        for _ in 0..20 {
            let error = client.recommendations(7).await.unwrap_err();
            let message = message_of(&error, ErrorKind::Status);
            assert!(
                message.starts_with(
                    "recommendation service answered 503 Service Unavailable: page xxx"
                ),
                "{message}"
            );
            assert!(message.ends_with('…'), "{message}");
        }
        assert_eq!(server.counts(), (1, 20), "{framing:?}");
    }
}

#[tokio::test]
async fn large_error_bodies_are_not_drained() {
    // Past the drain cap, reading on costs more than a new connection: the body is abandoned after
    // the excerpt, whether its length was announced or found out by reading.
    for framing in [Framing::Announced, Framing::Chunked] {
        let server = CannedServer::start(1 << 20, framing).await;
        let client = canned_client(&server, |_| {});
        for _ in 0..3 {
            let error = client.recommendations(7).await.unwrap_err();
            message_of(&error, ErrorKind::Status);
        }
        assert_eq!(server.counts(), (3, 3), "{framing:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_error_body_that_stalls_still_gives_the_status_at_the_deadline() {
    // The head announces a 4 KiB page, but only its first 100 bytes ever come.
    let server = CannedServer::start(4096, Framing::Stalled).await;
    let client = canned_client(&server, |c| c.timeout = Duration::from_millis(300));
    let started = Instant::now();
    let error = client.recommendations(7).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    // The service did answer, with a 503: that, not a timeout, is what the call reports.
    let excerpt = String::from_utf8(CannedServer::body(100)).unwrap();
    assert_eq!(
        message_of(&error, ErrorKind::Status),
        format!("recommendation service answered 503 Service Unavailable: {excerpt}")
    );
    assert_eq!(server.counts(), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn calls_that_run_out_of_time_queueing_here_are_saturated_not_service_failures() {
    // A healthy service that answers in 200 ms, a 300 ms budget, one request at a time, and
    // eight calls at once.
    let server = serve(Config {
        delay: Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    let client = client_for(&server, |c| {
        c.timeout = Duration::from_millis(300);
        c.max_in_flight = 1;
    });
    let started = Instant::now();
    let mut calls = spawn_calls(&client, 8).into_iter();

    // The first call has the slot and is answered.
    let first = calls.next().unwrap().await.unwrap().unwrap();
    assert_eq!(first, expected_items(&server, 1));
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    // The second gets the slot at 200 ms and is sent, but the service, asked with only 100 ms of
    // the budget left, cannot make it. Its message says where the time went, and, as the service
    // had less than half of the budget, it does not count against it.
    let error = calls.next().unwrap().await.unwrap().unwrap_err();
    assert_eq!(
        message_of(&error, ErrorKind::Timeout),
        "recommendation service did not answer within 300ms (200ms of it waiting for a connection slot)"
    );
    assert!(!error.is_service_failure());
    // The other six never got a slot, so nothing was sent for them.
    for call in calls {
        let error = call.await.unwrap().unwrap_err();
        assert_eq!(
            message_of(&error, ErrorKind::Saturated),
            "recommendation client saturated: no connection slot within 300ms"
        );
        assert!(matches!(
            error,
            RecommendationError::Saturated { after } if after == Duration::from_millis(300)
        ));
    }
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(server.stats().requests, 2);

    let stats = client.stats();
    assert_eq!(stats.errors.get(ErrorKind::Saturated), 6);
    assert_eq!(stats.errors.get(ErrorKind::Timeout), 1);
    assert_eq!(stats.in_flight, 0);
    // The breaker heard of two requests, one answered and one it cannot judge: the service is
    // healthy, and the next call goes through.
    assert_eq!(stats.breaker.state, BreakerState::Closed);
    assert_eq!(stats.breaker.consecutive_failures, 0);
    assert_eq!(
        client.recommendations(99).await.unwrap(),
        expected_items(&server, 99)
    );
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_timeout_after_a_short_wait_for_a_slot_counts_against_the_service() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| {
        c.timeout = Duration::from_millis(300);
        c.max_in_flight = 1;
    });
    server.script([
        Reply::ok().after(Duration::from_millis(100)),
        Reply::ok().after(Duration::from_secs(1)),
    ]);
    let mut calls = spawn_calls(&client, 2).into_iter();
    calls.next().unwrap().await.unwrap().unwrap();
    // Sent after 100 ms in the queue, the second request had 200 ms, most of its budget.
    let error = calls.next().unwrap().await.unwrap().unwrap_err();
    assert_eq!(
        message_of(&error, ErrorKind::Timeout),
        "recommendation service did not answer within 300ms (100ms of it waiting for a connection slot)"
    );
    assert_eq!(client.stats().breaker.consecutive_failures, 1);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_circuit_that_opens_while_a_call_queues_stops_it_before_it_is_sent() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| {
        c.max_in_flight = 1;
        c.breaker.failure_threshold = 1;
    });
    server.script([
        Reply::fault(Fault::Status(StatusCode::BAD_GATEWAY)).after(Duration::from_millis(100))
    ]);
    let started = Instant::now();
    let mut calls = spawn_calls(&client, 2).into_iter();
    let error = calls.next().unwrap().await.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Status);
    // The second call queued behind the failure that opened the circuit: when it gets the slot,
    // the breaker refuses it, and the service hears nothing.
    let error = calls.next().unwrap().await.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CircuitOpen);
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(server.stats().requests, 1);
    let stats = client.stats();
    assert_eq!(
        (stats.breaker.opened_total, stats.breaker.rejected_total),
        (1, 1)
    );
    assert_eq!(stats.in_flight, 0);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_fails_fast_even_when_every_slot_is_busy() {
    let server = serve(Config::default()).await;
    let client = client_for(&server, |c| {
        c.max_in_flight = 2;
        c.breaker.failure_threshold = 1;
        c.breaker.cooldown = Duration::from_secs(1);
    });
    server.script([
        // A slow call that started before the circuit opened, and outlives the cool-down.
        Reply::ok().after(Duration::from_secs(3)),
        Reply::fault(Fault::Status(StatusCode::BAD_GATEWAY)),
        // The probe, slow too.
        Reply::ok().after(Duration::from_secs(2)),
    ]);
    let slow = spawn_calls(&client, 1);
    while server.stats().requests < 1 {
        tokio::task::yield_now().await;
    }
    client.recommendations(2).await.unwrap_err();
    assert_eq!(client.stats().breaker.state, BreakerState::Open);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let probe = spawn_calls(&client, 1);
    while server.stats().requests < 3 {
        tokio::task::yield_now().await;
    }
    assert_eq!(client.stats().breaker.state, BreakerState::HalfOpen);
    assert_eq!(client.stats().in_flight, 2);

    // Both slots are busy and the probe is out: a new call is refused at once rather than
    // queueing for a slot to learn that.
    let started = Instant::now();
    let error = client.recommendations(4).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(matches!(error, RecommendationError::CircuitOpen { retry_in } if retry_in.is_zero()));

    for call in slow.into_iter().chain(probe) {
        call.await.unwrap().unwrap();
    }
    assert_eq!(client.stats().breaker.state, BreakerState::Closed);
    assert_eq!(server.stats().requests, 3);
    server.shutdown().await;
}
