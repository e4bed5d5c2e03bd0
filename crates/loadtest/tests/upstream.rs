//! Runs against the real stand-in recommendation service (`crates/upstream`), the server the
//! loadtest-versus-wrk comparison uses, with faults forced in arrival order.
//!
//! Every fault the server injects must show up in the report under its own kind: an error status,
//! a reset connection, a request that never gets an answer (cut by the generator's timeout).

use std::time::Duration;

use loadtest::{Config, Progress, Scenario};
use upstream::{Fault, Reply, Server, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_are_counted_by_kind() {
    let server = Server::start(upstream::Config::default()).await.unwrap();
    server.script([
        Reply::fault(Fault::Status(StatusCode::SERVICE_UNAVAILABLE)),
        Reply::fault(Fault::Reset),
        Reply::fault(Fault::Hang),
    ]);
    let config = Config {
        url: Some(server.base_url()),
        scenario: Scenario::Recommendations,
        duration: Duration::from_millis(600),
        warmup: Duration::ZERO,
        connections: 4,
        threads: 2,
        timeout: Duration::from_millis(300),
        users: 100,
        ..Config::default()
    };
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        loadtest::run(&config, Progress::Off),
    )
    .await
    .unwrap()
    .unwrap();
    let stats = server.stats();
    server.shutdown().await;
    let m = &report.measured;
    let transport = |kind: &str| m.transport_errors.get(kind).copied().unwrap_or(0);
    assert_eq!(stats.faults, 3);
    assert_eq!(
        m.requests, stats.requests,
        "every request reached the server"
    );
    assert_eq!(m.statuses.get("503"), Some(&1));
    assert_eq!(
        transport("timeout"),
        1,
        "the hung request was cut: {:?}",
        m.transport_errors
    );
    // A reset reads as ECONNRESET, or as an early close if the peer's RST races the read.
    assert_eq!(
        transport("reset") + transport("closed"),
        1,
        "{:?}",
        m.transport_errors
    );
    assert_eq!(m.statuses.get("200").copied(), Some(m.requests - 3));
    assert_eq!(m.errors, 3);
    assert_eq!(report.unfinished, 0);
}
