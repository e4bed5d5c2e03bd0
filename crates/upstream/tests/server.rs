//! Integration tests of the stand-in recommendation service: a real server on an ephemeral
//! loopback port, spoken to over real TCP with hyper's low-level HTTP/1 client.
//!
//! Anything about time runs on tokio's paused clock; the server lives on the same runtime, so its
//! delays are virtual too and the tests take no wall-clock time to cover seconds of latency.

#![allow(clippy::unwrap_used)]

use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use upstream::{Config, Error, Fault, Reply, Server};

/// One HTTP/1 connection to the server.
struct Connection {
    sender: SendRequest<Empty<Bytes>>,
}

/// A whole answer.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl Connection {
    async fn open(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(connection);
        Self { sender }
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, hyper::Error> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "upstream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .sender
            .send_request(request.body(Empty::new()).unwrap())
            .await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn get(&mut self, path: &str) -> Answer {
        self.send(Method::GET, path, &[]).await.unwrap()
    }
}

/// One request on a fresh connection.
async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, hyper::Error> {
    Connection::open(addr)
        .await
        .send(Method::GET, path, headers)
        .await
}

fn io_kind(error: &hyper::Error) -> Option<io::ErrorKind> {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        source = cause.source();
    }
    None
}

#[tokio::test]
async fn answers_the_deterministic_items_of_each_user() {
    let server = Server::start(Config::default()).await.unwrap();
    let mut connection = Connection::open(server.addr()).await;
    for user_id in [7_i64, -12, 0] {
        let answer = connection
            .get(&format!("/users/{user_id}/recommendations"))
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers["content-type"], "application/json");
        let json = answer.json();
        assert_eq!(json["user_id"], user_id);
        let expected = server.config().items_for(user_id);
        let items = json["items"].as_array().unwrap();
        assert_eq!(items.len(), expected.len());
        for (item, want) in items.iter().zip(&expected) {
            assert_eq!(item["product_id"], want.product_id);
            assert_eq!(item["score"], want.score);
            assert_eq!(item["reason"], want.reason);
        }
    }
    assert_eq!(
        server.stats(),
        upstream::Stats {
            connections: 1,
            open_connections: 1,
            requests: 3,
            faults: 0
        }
    );
    server.shutdown().await;
}

#[tokio::test]
async fn refuses_other_paths_methods_and_bad_forcing_headers() {
    let server = Server::start(Config::default()).await.unwrap();
    let mut connection = Connection::open(server.addr()).await;

    /// Method, path, headers, expected status, expected words in the error message.
    type Case = (
        Method,
        &'static str,
        &'static [(&'static str, &'static str)],
        StatusCode,
        &'static str,
    );
    let cases: [Case; 6] = [
        (Method::GET, "/", &[], StatusCode::NOT_FOUND, "not found"),
        (
            Method::GET,
            "/users/7/recommendations/extra",
            &[],
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            Method::GET,
            "/users/seven/recommendations",
            &[],
            StatusCode::BAD_REQUEST,
            "64-bit integer",
        ),
        (
            Method::POST,
            "/users/7/recommendations",
            &[],
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET",
        ),
        (
            Method::GET,
            "/users/7/recommendations",
            &[("x-upstream-fault", "explode")],
            StatusCode::BAD_REQUEST,
            "x-upstream-fault",
        ),
        (
            Method::GET,
            "/users/7/recommendations",
            &[("x-upstream-delay-ms", "soon")],
            StatusCode::BAD_REQUEST,
            "x-upstream-delay-ms",
        ),
    ];
    for (method, path, headers, status, message) in cases {
        let answer = connection
            .send(method.clone(), path, headers)
            .await
            .unwrap();
        assert_eq!(answer.status, status, "{method} {path}");
        let error = answer.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(message), "{method} {path}: {error}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(answer.headers["allow"], "GET");
        }
    }
    // Refusals answer on the same keep-alive connection and inject nothing.
    assert_eq!(server.stats().connections, 1);
    assert_eq!(server.stats().faults, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn the_fault_header_forces_each_kind_of_bad_answer() {
    let config = Config {
        oversized_bytes: 300_000,
        ..Config::default()
    };
    let server = Server::start(config).await.unwrap();
    let path = "/users/7/recommendations";

    let answer = get(server.addr(), path, &[("x-upstream-fault", "error")])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.json()["error"], "injected failure");

    let answer = get(server.addr(), path, &[("x-upstream-fault", "error:502")])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);

    let answer = get(server.addr(), path, &[("x-upstream-fault", "malformed")])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(serde_json::from_slice::<serde_json::Value>(&answer.body).is_err());
    assert!(answer.body.starts_with(br#"{"user_id":7,"items":["#));

    let answer = get(server.addr(), path, &[("x-upstream-fault", "no-items")])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json(), serde_json::json!({ "user_id": 7 }));

    let answer = get(server.addr(), path, &[("x-upstream-fault", "oversized")])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-length"], "300000");
    assert_eq!(answer.body.len(), 300_000);
    assert_eq!(answer.json()["items"], serde_json::json!([]));

    let answer = get(
        server.addr(),
        path,
        &[("x-upstream-fault", "oversized-chunked")],
    )
    .await
    .unwrap();
    assert!(answer.headers.get("content-length").is_none());
    assert_eq!(answer.headers["transfer-encoding"], "chunked");
    assert_eq!(answer.body.len(), 300_000);

    let error = get(server.addr(), path, &[("x-upstream-fault", "reset")])
        .await
        .unwrap_err();
    assert_eq!(
        io_kind(&error),
        Some(io::ErrorKind::ConnectionReset),
        "{error:?}"
    );

    assert_eq!(server.stats().faults, 7);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hanging_request_is_never_answered_until_the_hang_limit() {
    let config = Config {
        hang_limit: Duration::from_secs(120),
        ..Config::default()
    };
    let server = Server::start(config).await.unwrap();
    let started = Instant::now();
    let request = get(
        server.addr(),
        "/users/7/recommendations",
        &[("x-upstream-fault", "hang")],
    );
    let mut request = std::pin::pin!(request);

    // A minute of (virtual) silence: no answer at all.
    let waited = tokio::time::timeout(Duration::from_secs(60), request.as_mut()).await;
    assert!(
        waited.is_err(),
        "a hanging request was answered: {waited:?}"
    );
    assert_eq!(server.stats().open_connections, 1);

    // At the hang limit the server gives up on the connection instead of holding it forever.
    let error = request.await.unwrap_err();
    assert!(error.is_incomplete_message(), "{error:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(120));
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn latency_follows_the_configuration_and_the_delay_header() {
    let config = Config {
        delay: Duration::from_millis(50),
        ..Config::default()
    };
    let server = Server::start(config).await.unwrap();
    let mut connection = Connection::open(server.addr()).await;

    let started = Instant::now();
    let answer = connection.get("/users/7/recommendations").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(started.elapsed(), Duration::from_millis(50));

    let started = Instant::now();
    let answer = connection
        .send(
            Method::GET,
            "/users/7/recommendations",
            &[("x-upstream-delay-ms", "1500")],
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(started.elapsed(), Duration::from_millis(1500));
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn jitter_and_the_slow_tail_stay_within_their_bounds() {
    let config = Config {
        delay: Duration::from_millis(10),
        jitter: Duration::from_millis(20),
        slow_rate: 0.2,
        slow_delay: Duration::from_secs(3),
        ..Config::default()
    };
    let server = Server::start(config).await.unwrap();
    let mut connection = Connection::open(server.addr()).await;
    let mut slow = 0;
    for _ in 0..100 {
        let started = Instant::now();
        connection.get("/users/1/recommendations").await;
        let elapsed = started.elapsed();
        if elapsed == Duration::from_secs(3) {
            slow += 1;
        } else {
            assert!(elapsed >= Duration::from_millis(10), "{elapsed:?}");
            // The paused clock advances in whole milliseconds, so allow one of rounding.
            assert!(elapsed <= Duration::from_millis(31), "{elapsed:?}");
        }
    }
    // The draw is seeded: this is the same count on every run, and close to 20 %.
    assert!((10..=30).contains(&slow), "{slow} slow answers out of 100");
    server.shutdown().await;
}

#[tokio::test]
async fn scripted_replies_apply_in_order_then_the_configuration_resumes() {
    let server = Server::start(Config::default()).await.unwrap();
    server.script([
        Reply::fault(Fault::Status(StatusCode::INTERNAL_SERVER_ERROR)),
        Reply::fault(Fault::MissingItems),
    ]);
    let mut connection = Connection::open(server.addr()).await;
    let path = "/users/3/recommendations";

    // A request with a forcing header does not use up the script.
    let answer = connection
        .send(Method::GET, path, &[("x-upstream-fault", "error:418")])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::IM_A_TEAPOT);
    // Neither does a refused request.
    assert_eq!(
        connection.get("/elsewhere").await.status,
        StatusCode::NOT_FOUND
    );

    assert_eq!(
        connection.get(path).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        connection.get(path).await.json(),
        serde_json::json!({ "user_id": 3 })
    );
    assert_eq!(connection.get(path).await.status, StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn user_overrides_apply_to_that_user_until_cleared() {
    let server = Server::start(Config::default()).await.unwrap();
    server.set_user_reply(13, Reply::fault(Fault::Status(StatusCode::BAD_GATEWAY)));
    let mut connection = Connection::open(server.addr()).await;
    for _ in 0..3 {
        assert_eq!(
            connection.get("/users/13/recommendations").await.status,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            connection.get("/users/14/recommendations").await.status,
            StatusCode::OK
        );
    }
    // A script entry wins over the override while it lasts.
    server.script([Reply::ok()]);
    assert_eq!(
        connection.get("/users/13/recommendations").await.status,
        StatusCode::OK
    );
    assert_eq!(
        connection.get("/users/13/recommendations").await.status,
        StatusCode::BAD_GATEWAY
    );
    server.clear_user_reply(13);
    assert_eq!(
        connection.get("/users/13/recommendations").await.status,
        StatusCode::OK
    );
    server.shutdown().await;
}

async fn status_sequence(seed: u64) -> Vec<StatusCode> {
    let config = Config {
        error_rate: 0.3,
        seed,
        ..Config::default()
    };
    let server = Server::start(config).await.unwrap();
    let mut connection = Connection::open(server.addr()).await;
    let mut statuses = Vec::new();
    for user_id in 0..200 {
        statuses.push(
            connection
                .get(&format!("/users/{user_id}/recommendations"))
                .await
                .status,
        );
    }
    server.shutdown().await;
    statuses
}

#[tokio::test]
async fn random_faults_are_reproducible_from_the_seed() {
    let first = status_sequence(42).await;
    let errors = first.iter().filter(|s| **s != StatusCode::OK).count();
    assert!(
        (30..=90).contains(&errors),
        "{errors} errors out of 200 at a 30 % rate"
    );
    assert_eq!(first, status_sequence(42).await);
    assert_ne!(first, status_sequence(43).await);
}

#[tokio::test]
async fn counts_connections_and_notices_when_they_close() {
    let server = Server::start(Config::default()).await.unwrap();
    let mut first = Connection::open(server.addr()).await;
    first.get("/users/1/recommendations").await;
    first.get("/users/1/recommendations").await;
    let mut second = Connection::open(server.addr()).await;
    second.get("/users/2/recommendations").await;
    let stats = server.stats();
    assert_eq!(
        (stats.connections, stats.open_connections, stats.requests),
        (2, 2, 3)
    );

    drop(first);
    drop(second);
    // The server learns about the close asynchronously; wait for it, boundedly.
    tokio::time::timeout(Duration::from_secs(5), async {
        while server.stats().open_connections != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(server.stats().connections, 2);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_hanging_and_delayed_requests_and_stops_accepting() {
    let server = Server::start(Config::default()).await.unwrap();
    let addr = server.addr();
    let hanging = tokio::spawn({
        let request = get(
            server.addr(),
            "/users/1/recommendations",
            &[("x-upstream-fault", "hang")],
        );
        async move { request.await.map(|answer| answer.status) }
    });
    let delayed = tokio::spawn({
        let request = get(
            server.addr(),
            "/users/1/recommendations",
            &[("x-upstream-delay-ms", "600000")],
        );
        async move { request.await.map(|answer| answer.status) }
    });
    // Let both requests reach the server.
    while server.stats().requests < 2 {
        tokio::task::yield_now().await;
    }

    // The requests would take for ever (hang) or ten minutes; a shutdown that waited for them
    // would run into this bound, which only guards the test run.
    tokio::time::timeout(Duration::from_secs(60), server.shutdown())
        .await
        .expect("shutdown waited for the requests in flight");
    assert!(hanging.await.unwrap().is_err());
    assert!(delayed.await.unwrap().is_err());
    let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn start_reports_bad_configuration_and_busy_ports() {
    let config = Config {
        reset_rate: 2.0,
        ..Config::default()
    };
    let error = Server::start(config).await.unwrap_err();
    assert!(matches!(error, Error::InvalidConfig(_)));
    assert!(error.to_string().contains("reset_rate"), "{error}");

    let server = Server::start(Config::default()).await.unwrap();
    let error = Server::bind(server.addr(), Config::default())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Bind { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&server.addr().to_string()),
        "{error}"
    );
    server.shutdown().await;
}
