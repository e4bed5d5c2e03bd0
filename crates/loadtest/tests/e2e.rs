//! End-to-end runs of the generator against real HTTP servers on loopback.
//!
//! The test server speaks the service's API shapes (dashboard, batch, recommendations) with
//! answers that depend only on the requested id, and counts what it sent; every test checks that
//! the generator's report counts the same. Nothing here asserts on speed: only on counts, and on
//! runs ending even when the server never answers.

#![allow(clippy::unwrap_used)]

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use loadtest::{Checks, Config, Progress, Report, RuntimeFlavor, Scenario};
use tokio::{net::TcpListener, task::JoinHandle};

const USERS: u64 = 1000;

/// What the test server sent.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    ok: AtomicU64,
    not_found: AtomicU64,
    bad: AtomicU64,
    partial: AtomicU64,
    recommendation_timeouts: AtomicU64,
    review_errors: AtomicU64,
    batches: AtomicU64,
    batch_id_errors: AtomicU64,
    recommendations: AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// Answer every request with `Connection: close`.
    close: bool,
    /// Answer dashboards with a body that is not JSON.
    garbage: bool,
    /// Send bodies in two chunks of unannounced length (chunked transfer coding).
    chunked: bool,
}

/// A body sent as two frames with no length given, so hyper's server chunks it.
struct Pieces(Vec<Bytes>);

impl Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop().map(|piece| Ok(Frame::data(piece))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

type Reply = Response<BoxBody<Bytes, Infallible>>;

struct Server {
    url: String,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(status: u16, body: String, behaviour: Behaviour) -> Reply {
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if behaviour.close {
        response = response.header("connection", "close");
    }
    let body = if behaviour.chunked {
        let mut first = body.into_bytes();
        let second = first.split_off(first.len() / 2);
        Pieces(vec![Bytes::from(second), Bytes::from(first)]).boxed()
    } else {
        Full::new(Bytes::from(body)).boxed()
    };
    response.body(body).unwrap()
}

async fn answer(
    request: Request<Incoming>,
    counts: Arc<Counts>,
    behaviour: Behaviour,
) -> Result<Reply, Infallible> {
    counts.requests.fetch_add(1, Relaxed);
    let path = request.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id = |text: &str| {
        text.parse::<u64>()
            .ok()
            .filter(|id| (1..=USERS).contains(id))
    };
    let response = match parts.as_slice() {
        ["api", "users", "batch"] => {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let ids: Vec<u64> = value["user_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            if ids.iter().any(|i| id(&i.to_string()).is_none()) {
                counts.bad.fetch_add(1, Relaxed);
                return Ok(json(400, r#"{"status":"error","error":{"code":"bad_request","message":"id out of range"}}"#.into(), behaviour));
            }
            let errors: Vec<String> = ids
                .iter()
                .filter(|i| *i % 4 == 0)
                .map(|i| format!(r#"{{"user_id":{i},"error":"user not found"}}"#))
                .collect();
            counts.batches.fetch_add(1, Relaxed);
            counts.ok.fetch_add(1, Relaxed);
            counts
                .batch_id_errors
                .fetch_add(errors.len() as u64, Relaxed);
            json(
                200,
                format!(
                    r#"{{"status":"success","data":{{"results":[],"errors":[{}]}}}}"#,
                    errors.join(",")
                ),
                behaviour,
            )
        }
        ["api", "users", user, "dashboard"] => match id(user) {
            None => {
                counts.bad.fetch_add(1, Relaxed);
                json(
                    400,
                    r#"{"status":"error","error":{"code":"bad_request","message":"bad id"}}"#
                        .into(),
                    behaviour,
                )
            }
            Some(user) if user % 7 == 0 => {
                counts.not_found.fetch_add(1, Relaxed);
                json(
                    404,
                    format!(
                        r#"{{"status":"error","error":{{"code":"not_found","message":"no user {user}"}}}}"#
                    ),
                    behaviour,
                )
            }
            Some(_) if behaviour.garbage => {
                counts.ok.fetch_add(1, Relaxed);
                json(200, "<html>oops</html>".into(), behaviour)
            }
            Some(user) => {
                let mut errors = Vec::new();
                if user % 3 == 0 {
                    counts.recommendation_timeouts.fetch_add(1, Relaxed);
                    errors.push(r#"{"source":"recommendations","kind":"timeout","error":"timed out after 250ms"}"#);
                }
                if user % 5 == 0 {
                    counts.review_errors.fetch_add(1, Relaxed);
                    errors.push(r#"{"source":"reviews","error":"pool exhausted"}"#);
                }
                if !errors.is_empty() {
                    counts.partial.fetch_add(1, Relaxed);
                }
                counts.ok.fetch_add(1, Relaxed);
                json(
                    200,
                    format!(
                        r#"{{"status":"success","data":{{"profile":{{"id":{user},"name":"user \"{user}\""}},"orders":[{{"id":1}}],"reviews":[],"recommendations":[],"errors":[{}]}}}}"#,
                        errors.join(",")
                    ),
                    behaviour,
                )
            }
        },
        ["users", user, "recommendations"] if id(user).is_some() => {
            counts.recommendations.fetch_add(1, Relaxed);
            counts.ok.fetch_add(1, Relaxed);
            json(
                200,
                r#"[{"id":1,"score":0.9},{"id":2,"score":0.8}]"#.into(),
                behaviour,
            )
        }
        _ => {
            counts.bad.fetch_add(1, Relaxed);
            json(
                404,
                r#"{"status":"error","error":{"code":"no_route","message":"no route"}}"#.into(),
                behaviour,
            )
        }
    };
    Ok(response)
}

async fn serve(behaviour: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counts = Arc::new(Counts::default());
    let shared = Arc::clone(&counts);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counts = Arc::clone(&shared);
            tokio::spawn(async move {
                let service =
                    service_fn(move |request| answer(request, Arc::clone(&counts), behaviour));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server { url, counts, task }
}

fn config(url: &str, scenario: Scenario) -> Config {
    Config {
        url: Some(url.to_owned()),
        scenario,
        duration: Duration::from_millis(400),
        warmup: Duration::ZERO,
        connections: 8,
        threads: 2,
        users: USERS,
        batch_size: 10,
        timeout: Duration::from_secs(30),
        ..Config::default()
    }
}

/// Runs the generator, bounded so that a hang fails the test instead of stalling it.
async fn run(config: &Config) -> Report {
    tokio::time::timeout(
        Duration::from_secs(60),
        loadtest::run(config, Progress::Off),
    )
    .await
    .expect("the run ended")
    .unwrap()
}

/// The head of the answer to one GET, sent by hand.
async fn raw_get(url: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn status(report: &Report, code: &str) -> u64 {
    report.measured.statuses.get(code).copied().unwrap_or(0)
}

fn source_errors(report: &Report, source: &str, kind: &str) -> u64 {
    report
        .measured
        .source_errors
        .iter()
        .filter(|e| e.source == source && e.kind == kind)
        .map(|e| e.count)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_counts_match_what_the_server_sent() {
    let server = serve(Behaviour::default()).await;
    let report = run(&config(&server.url, Scenario::Dashboard)).await;
    let c = &server.counts;
    let m = &report.measured;
    assert!(m.requests > 0);
    assert_eq!(m.requests, c.requests.load(Relaxed));
    assert_eq!(c.bad.load(Relaxed), 0, "every id was in 1..=users");
    assert_eq!(status(&report, "200"), c.ok.load(Relaxed));
    assert_eq!(status(&report, "404"), c.not_found.load(Relaxed));
    assert_eq!(
        m.error_codes.get("404 not_found").copied().unwrap_or(0),
        c.not_found.load(Relaxed)
    );
    assert_eq!(m.errors, c.not_found.load(Relaxed));
    assert_eq!(
        source_errors(&report, "recommendations", "timeout"),
        c.recommendation_timeouts.load(Relaxed)
    );
    // The reviews errors carry no kind: they are counted under their error text.
    assert_eq!(
        source_errors(&report, "reviews", "pool exhausted"),
        c.review_errors.load(Relaxed)
    );
    assert_eq!(m.partial_answers, c.partial.load(Relaxed));
    assert_eq!(m.undecodable_bodies, 0);
    assert!(m.transport_errors.is_empty(), "{:?}", m.transport_errors);
    assert_eq!(m.latency.count, m.responses);
    assert_eq!(report.unfinished, 0);
    assert_eq!(report.warmup.requests, 0);
    assert!(report.summary().contains("recommendations: timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_answers_are_read_and_inspected() {
    let server = serve(Behaviour {
        chunked: true,
        ..Behaviour::default()
    })
    .await;
    // The server does chunk its answers (user 1's dashboard is a plain 200).
    let head = raw_get(&server.url, "/api/users/1/dashboard").await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    server.counts.requests.store(0, Relaxed);
    server.counts.ok.store(0, Relaxed);
    let report = run(&config(&server.url, Scenario::Dashboard)).await;
    let c = &server.counts;
    let m = &report.measured;
    assert!(m.requests > 0);
    assert_eq!(m.requests, c.requests.load(Relaxed));
    assert!(m.transport_errors.is_empty(), "{:?}", m.transport_errors);
    assert_eq!(
        m.undecodable_bodies, 0,
        "bodies reassembled from their chunks"
    );
    assert_eq!(status(&report, "404"), c.not_found.load(Relaxed));
    assert_eq!(
        m.error_codes.get("404 not_found").copied().unwrap_or(0),
        c.not_found.load(Relaxed)
    );
    assert_eq!(
        source_errors(&report, "recommendations", "timeout"),
        c.recommendation_timeouts.load(Relaxed)
    );
    assert_eq!(m.partial_answers, c.partial.load(Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_per_id_errors_are_counted() {
    let server = serve(Behaviour::default()).await;
    let report = run(&config(&server.url, Scenario::Batch)).await;
    let c = &server.counts;
    let m = &report.measured;
    assert!(m.requests > 0);
    assert_eq!(c.bad.load(Relaxed), 0);
    assert_eq!(status(&report, "200"), c.batches.load(Relaxed));
    assert_eq!(m.batch_id_errors.total, c.batch_id_errors.load(Relaxed));
    assert_eq!(
        m.batch_id_errors
            .by_error
            .get("user not found")
            .copied()
            .unwrap_or(0),
        c.batch_id_errors.load(Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_runs_send_both_kinds() {
    let server = serve(Behaviour::default()).await;
    let mut config = config(&server.url, Scenario::Mixed);
    config.mix = "dashboard=1,batch=1".parse().unwrap();
    let report = run(&config).await;
    let c = &server.counts;
    assert!(c.batches.load(Relaxed) > 0);
    assert!(
        c.ok.load(Relaxed) > c.batches.load(Relaxed),
        "dashboards too"
    );
    assert_eq!(report.measured.requests, c.requests.load(Relaxed));
    assert_eq!(
        report.measured.batch_id_errors.total,
        c.batch_id_errors.load(Relaxed)
    );
    assert_eq!(
        source_errors(&report, "recommendations", "timeout"),
        c.recommendation_timeouts.load(Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_its_schedule() {
    let server = serve(Behaviour::default()).await;
    let mut config = config(&server.url, Scenario::Recommendations);
    config.rate = Some(500.0);
    let report = run(&config).await;
    let open = report.open_loop.as_ref().unwrap();
    // 500 req/s for 0.4s is 200 sends, whatever the machine's speed: sent or missed.
    assert_eq!(open.scheduled, 200);
    assert_eq!(open.sent + open.missed, 200);
    assert_eq!(open.sent, server.counts.recommendations.load(Relaxed));
    assert_eq!(status(&report, "200"), open.sent);
    assert_eq!(open.send_lag.count, open.sent);
    assert!(report.measured.bytes_received > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_requests_are_kept_apart() {
    let server = serve(Behaviour::default()).await;
    let mut config = config(&server.url, Scenario::Recommendations);
    config.warmup = Duration::from_millis(200);
    config.duration = Duration::from_millis(200);
    let report = run(&config).await;
    assert!(report.warmup.requests > 0);
    assert!(report.measured.requests > 0);
    assert_eq!(
        report.warmup.requests + report.measured.requests,
        server.counts.requests.load(Relaxed)
    );
    assert_eq!(report.measured.latency.count, report.measured.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_multi_thread_runtime_counts_the_same_way() {
    let server = serve(Behaviour::default()).await;
    let mut config = config(&server.url, Scenario::Dashboard);
    config.runtime = RuntimeFlavor::MultiThread;
    let report = run(&config).await;
    let c = &server.counts;
    assert!(report.measured.requests > 0);
    assert_eq!(report.measured.requests, c.requests.load(Relaxed));
    assert_eq!(status(&report, "404"), c.not_found.load(Relaxed));
    assert_eq!(report.measured.partial_answers, c.partial.load(Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_server_are_reopened_without_errors() {
    let server = serve(Behaviour {
        close: true,
        ..Behaviour::default()
    })
    .await;
    let report = run(&config(&server.url, Scenario::Recommendations)).await;
    let m = &report.measured;
    assert!(
        m.requests > 8,
        "more requests than connections: reconnects happened"
    );
    assert_eq!(m.requests, server.counts.requests.load(Relaxed));
    assert_eq!(status(&report, "200"), m.requests);
    assert!(m.transport_errors.is_empty(), "{:?}", m.transport_errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_the_server_closed_are_reopened_without_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers one request per connection, keep-alive by its headers, then closes the idle
    // connection 10ms later: what a server's idle timeout does.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&served);
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Relaxed);
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
                let _ = stream.write_all(answer).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            });
        }
    });
    // 20 req/s over 2 connections: each sits idle 100ms between its sends.
    let mut config = config(&url, Scenario::Recommendations);
    config.connections = 2;
    config.rate = Some(20.0);
    config.duration = Duration::from_millis(600);
    let report = run(&config).await;
    server.abort();
    let m = &report.measured;
    assert!(m.requests >= 6, "{} requests", m.requests);
    assert!(m.transport_errors.is_empty(), "{:?}", m.transport_errors);
    assert_eq!(status(&report, "200"), m.requests);
    assert_eq!(served.load(Relaxed), m.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_json_are_counted() {
    let server = serve(Behaviour {
        garbage: true,
        ..Behaviour::default()
    })
    .await;
    let report = run(&config(&server.url, Scenario::Dashboard)).await;
    assert!(report.measured.undecodable_bodies > 0);
    assert_eq!(
        report.measured.undecodable_bodies,
        server.counts.ok.load(Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_is_cut_by_the_timeout() {
    // Accepts connections and reads requests, but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hang = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut config = config(&url, Scenario::Dashboard);
    config.connections = 2;
    config.duration = Duration::from_millis(500);
    config.timeout = Duration::from_millis(300);
    let report = run(&config).await;
    hang.abort();
    let m = &report.measured;
    assert!(m.requests >= 2, "each connection sent at least once");
    assert_eq!(m.responses, 0);
    assert_eq!(m.transport_errors.get("timeout").copied(), Some(m.requests));
    assert_eq!(m.error_rate, 1.0);
    // The per-request timeout ended every request, not the drain deadline.
    assert_eq!(report.unfinished, 0);
    assert!(report.summary().contains("no answers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_counted_by_kind() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut config = config(&url, Scenario::Dashboard);
    config.duration = Duration::from_millis(200);
    let report = run(&config).await;
    let m = &report.measured;
    assert!(m.requests > 0);
    assert_eq!(
        m.transport_errors.get("connect_refused").copied(),
        Some(m.requests)
    );
    assert_eq!(m.errors, m.requests);
    // Refusals are attempts, not throughput: nothing was answered.
    assert_eq!(m.throughput_rps, 0.0);
    assert!(m.attempts_rps > 0.0);
    let outcomes = "rps>=1".parse::<Checks>().unwrap().evaluate(&report);
    assert!(!outcomes[0].passed, "{outcomes:?}");
    // Each refusal counts in the latency at the timeout (within the histogram's three
    // significant digits): none was a fast answer.
    assert_eq!(m.latency.count, m.requests);
    assert!(m.latency.min_ms >= 29_970.0, "{}", m.latency.min_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_fails_the_checks_and_is_named_the_bottleneck() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers its first 40 requests at once, then reads requests and never answers: the
    // stall starts after a count, not a time, so the test does not depend on speed.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answered = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&answered);
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    request.clear();
                    if count.fetch_add(1, Relaxed) >= 40 {
                        // Hold the connection open, unanswered, until the client leaves.
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                        }
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut config = config(&url, Scenario::Recommendations);
    config.connections = 4;
    config.rate = Some(100.0);
    config.duration = Duration::from_secs(1);
    config.timeout = Duration::from_millis(300);
    let report = run(&config).await;
    server.abort();
    let m = &report.measured;
    let open = report.open_loop.as_ref().unwrap();
    eprintln!("{}", report.summary());
    assert_eq!(open.scheduled, 100);
    assert_eq!(open.sent + open.missed, 100);
    assert_eq!(m.responses, 40);
    assert!(m.missed > 0, "the stall held sends back");
    assert!(open.missed_on_busy_connections > 0);
    assert!(open.achieved_ratio <= 1.0);
    // Every request sent and every send missed is in the latency and, unless answered, in
    // the errors.
    assert_eq!(m.latency.count, m.requests + m.missed);
    assert_eq!(m.errors, m.requests - m.responses + m.missed);
    assert_eq!(m.success_latency.count, 40);
    assert!(m.latency.p99_ms >= 300.0, "p99 {}", m.latency.p99_ms);
    assert!(m.transport_errors.get("timeout").copied().unwrap_or(0) > 0);
    assert!(!open.kept_up);
    assert!(
        open.statement
            .starts_with("The server is the bottleneck, not the generator"),
        "{}",
        open.statement
    );
    let outcomes = "p99<250ms,error_rate<5%"
        .parse::<Checks>()
        .unwrap()
        .evaluate(&report);
    assert_eq!(outcomes.len(), 3);
    assert!(outcomes.iter().all(|o| !o.passed), "{outcomes:?}");
    assert_eq!(outcomes[2].expression, "kept_up");
}

#[tokio::test]
async fn bad_configurations_fail_before_any_request() {
    let mut config = config("https://127.0.0.1:1", Scenario::Dashboard);
    let err = loadtest::run(&config, Progress::Off).await.unwrap_err();
    assert!(err.to_string().contains("https is not supported"), "{err}");
    config.url = Some("http://127.0.0.1:1".to_owned());
    config.threads = 0;
    let err = loadtest::run(&config, Progress::Off).await.unwrap_err();
    assert!(
        matches!(
            err,
            loadtest::Error::Config {
                field: "threads",
                ..
            }
        ),
        "{err}"
    );
}
