//! The API over PgBouncer (transaction pooling, unnamed statements) and a streaming replica:
//! the same answers as straight to the primary, and a readiness report that says which
//! databases answer. Real PgBouncer and replica, started by `cargo xtask test`.

#![allow(clippy::unwrap_used)] // Fixture helpers outside #[test] fail loudly by design.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{TestApp, spawn_app_with};

/// Every dashboard of users 1 to 4 and one batch, as JSON.
async fn answers(app: &TestApp) -> Vec<(u16, Value)> {
    let mut all = Vec::new();
    for id in 1..=4 {
        let response = app.get(&format!("/api/users/{id}/dashboard")).await;
        all.push((response.status().as_u16(), response.json().await.unwrap()));
    }
    let response = app
        .post_json("/api/users/batch", r#"{"user_ids": [1, 2, 3, 4]}"#)
        .await;
    all.push((response.status().as_u16(), response.json().await.unwrap()));
    all
}

async fn readiness(app: &TestApp) -> (u16, Value) {
    let response = app.get("/readyz").await;
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn dashboards_and_batches_are_the_same_through_pgbouncer_and_from_the_replica() {
    let direct = spawn_app_with(|_| {}).await;
    let expected = answers(&direct).await;
    assert_eq!(expected[0].0, 200);
    assert_eq!(expected[3].0, 404);

    let pooled = spawn_app_with(|_| {}).await;
    let replica = pooled.db.replica_url(true).await;
    let through_pgbouncer = spawn_app_with(|settings| {
        settings.database = pooled.db.pgbouncer_config();
    })
    .await;
    let from_replica = spawn_app_with(|settings| {
        settings.database = pooled.db.pgbouncer_config();
        settings.database.replica_urls = vec![replica];
        // A loaded test machine must not make the replica look gone.
        settings.database.replica_timeout = Duration::from_secs(5);
    })
    .await;
    for app in [&through_pgbouncer, &from_replica] {
        assert_eq!(answers(app).await, expected);
    }
    // The replica's reads show in /metrics; the primary served none of them.
    let metrics = from_replica.get("/metrics").await.text().await.unwrap();
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count("db_leases_total{database=\"replica-1\"}") > 0,
        "{metrics}"
    );
    assert_eq!(
        count("db_leases_total{database=\"primary\"}"),
        0,
        "{metrics}"
    );
    let (status, body) = readiness(&from_replica).await;
    assert_eq!(status, 200);
    let databases = body["databases"].as_array().unwrap();
    assert_eq!(
        databases[0],
        serde_json::json!({"name": "primary", "role": "primary", "reach": "up"})
    );
    assert_eq!(databases[1]["name"], "replica-1");
    assert_eq!(databases[1]["role"], "replica");
    assert_eq!(databases[1]["reach"], "up");
    // Other tests write to the primary meanwhile, so the lag need not be exactly zero.
    assert!(databases[1]["lag_ms"].is_u64(), "{body}");
}

#[tokio::test]
async fn readiness_needs_one_database_that_reads_can_use() {
    // The replica answers, the primary does not (nothing listens on port 1): reads still work,
    // and the instance is ready. (Neither answering is a 503: see `http.rs`.)
    let app = spawn_app_with(|_| {}).await;
    let replica = app.db.replica_url(false).await;
    let only_replica = {
        let mut config = app.db.config();
        config.url = format!("postgres://dashboard@127.0.0.1:1/{}", app.db.name());
        config.replica_urls = vec![replica];
        config.replica_timeout = Duration::from_secs(5);
        config.create_timeout = Duration::from_millis(500);
        spawn_app_with(move |settings| settings.database = config).await
    };
    let (status, body) = readiness(&only_replica).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["databases"][0]["reach"], "down");
    assert_eq!(body["databases"][1]["reach"], "up");
    let response = only_replica.get("/api/users/1/dashboard").await;
    assert_eq!(response.status(), 200);
}
