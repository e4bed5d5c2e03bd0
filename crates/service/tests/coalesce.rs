//! Coalesced reads give every dashboard exactly what per-request reads give it: the bodies are
//! byte-identical between the modes over thousands of users (unknown ones included), read
//! concurrently so that statements are shared; and a read that stops waiting leaves its batch
//! without disturbing the others.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use futures::StreamExt;
use service::{DashboardError, QueryMode, Service};
use support::{test_config, uid, world_with};

const USERS: i64 = 1_500;

/// Users 10 and up, with 0 to 120 orders and 0 to 110 reviews each (some over the 100 limit),
/// some orders sharing a timestamp so that the tie-break is exercised too.
async fn many_users(w: &support::World) {
    let client = repository::connect(&w.db.config()).await.unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO users (id, username, email, avatar)
                 SELECT g, 'user' || g, 'user' || g || '@example.com',
                        CASE WHEN g % 3 = 0 THEN NULL ELSE 'https://img/' || g || '.png' END
                 FROM generate_series(10, {USERS}) g;
             INSERT INTO orders (user_id, product, amount, created_at)
                 SELECT u, 'product ' || n, (u * n % 10000) / 100.0,
                        timestamptz '2025-01-01' + ((n / 2) || ' hours')::interval
                 FROM generate_series(10, {USERS}) u, generate_series(1, (u * 7) % 121) n;
             INSERT INTO reviews (user_id, product_id, rating, content)
                 SELECT u, u * 100 + n, 1 + (u + n) % 5, 'review ' || n || ' by ' || u
                 FROM generate_series(10, {USERS}) u, generate_series(1, (u * 11) % 111) n;"
        ))
        .await
        .unwrap();
}

/// Every dashboard of users 1 to `USERS + 100`, 64 at a time, as JSON (or the error's kind).
async fn bodies(service: &Service) -> Vec<String> {
    futures::stream::iter(1..=USERS + 100)
        .map(|id| {
            let service = service.clone();
            async move {
                match service.dashboard(uid(id)).await {
                    Ok(dashboard) => {
                        assert!(dashboard.errors.is_empty(), "{id}: {:?}", dashboard.errors);
                        serde_json::to_string(&dashboard).unwrap()
                    }
                    Err(DashboardError::NotFound { .. }) => "not found".to_owned(),
                    Err(other) => panic!("{id}: {other}"),
                }
            }
        })
        .buffered(64)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_reads_give_every_dashboard_the_same_body_as_per_request_reads() {
    let mut config = test_config();
    // 64 dashboards at a time on a test machine: no source may time out.
    config.dashboard.recommendations_timeout = Duration::from_secs(8);
    let w = world_with(config.clone(), |db| db.max_size = 20).await;
    many_users(&w).await;
    let per_request = bodies(&w.service).await;

    let mut coalesced_config = config;
    coalesced_config.query_mode = QueryMode::Coalesced;
    let coalesced_service = w.service_with(coalesced_config);
    let coalesced = bodies(&coalesced_service).await;

    let gauges = coalesced_service.gauges();
    assert!(
        gauges.coalesced_statements * 2 < gauges.coalesced_reads,
        "statements were shared: {} statements for {} reads",
        gauges.coalesced_statements,
        gauges.coalesced_reads
    );
    assert_eq!(per_request.len(), coalesced.len());
    let unknown = per_request.iter().filter(|b| *b == "not found").count();
    assert!(unknown >= 100, "{unknown} unknown users");
    assert!(
        per_request
            .iter()
            .any(|b| b.contains("\"more_orders\":true"))
    );
    assert!(
        per_request
            .iter()
            .any(|b| b.contains("\"more_reviews\":true"))
    );
    for (id, (a, b)) in per_request.iter().zip(&coalesced).enumerate() {
        assert_eq!(a, b, "user {}", id + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_read_that_stops_waiting_leaves_the_others_their_answer() {
    let mut config = test_config();
    config.query_mode = QueryMode::Coalesced;
    let w = world_with(config, |_| {}).await;
    let lock = testkit::TableLock::take(&w.db, "orders").await;
    // One dashboard waits on the locked table; others gather behind its statement.
    let first = tokio::spawn({
        let service = w.service.clone();
        async move { service.dashboard(uid(1)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let impatient = tokio::spawn({
        let service = w.service.clone();
        async move { service.dashboard(uid(3)).await }
    });
    let patient = tokio::spawn({
        let service = w.service.clone();
        async move { service.dashboard(uid(1)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    impatient.abort();
    assert!(impatient.await.unwrap_err().is_cancelled());
    lock.release().await;
    for dashboard in [
        first.await.unwrap().unwrap(),
        patient.await.unwrap().unwrap(),
    ] {
        assert_eq!(dashboard.profile.id, 1);
        assert_eq!(dashboard.orders.len(), 2);
        assert!(dashboard.errors.is_empty(), "{:?}", dashboard.errors);
    }
}

#[tokio::test]
async fn reads_behind_stalled_rounds_fail_busy_after_the_slot_wait() {
    let mut config = test_config();
    config.query_mode = QueryMode::Coalesced;
    config.db_slot_wait = Duration::from_millis(100);
    let w = world_with(config, |_| {}).await;
    let lock = testkit::TableLock::take(&w.db, "users").await;
    // A dashboard whose round stalls on the lock.
    let stalled = tokio::spawn({
        let service = w.service.clone();
        async move { service.dashboard(uid(1)).await }
    });
    tokio::time::timeout(Duration::from_secs(5), async {
        while w.service.gauges().slots_in_use < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the round went out");
    // The next waits for a round, not for its 8 s profile timeout: "busy" after the slot wait.
    let err = w.service.dashboard(uid(2)).await.unwrap_err();
    let DashboardError::Unavailable { errors, .. } = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert_eq!(errors[0].kind, "busy", "{errors:?}");
    // The bound that fired is the slot wait, not a timeout.
    assert_eq!(
        errors[0].error,
        "database busy: no connection slot free within 100ms"
    );
    lock.release().await;
    assert_eq!(stalled.await.unwrap().unwrap().profile.id, 1);
}
