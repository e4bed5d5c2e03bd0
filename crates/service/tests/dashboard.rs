//! The dashboard against a real PostgreSQL and a real stand-in recommendation server.
//!
//! Time limits here are real (the database cannot run on tokio's paused clock), so each test
//! asserts what happened (which source failed, how, what was cancelled), never how long it took.

#![allow(clippy::unwrap_used)] // A failed step is a failed test; unwrap says where.

mod support;

use std::time::Duration;

use service::{DashboardError, QueryMode, Source, SourceStatus};
use support::{test_config, uid, world, world_with};
use upstream::{Fault, Reply};

/// The recommendation items of a dashboard, parsed.
fn items(recommendations: &service::Recommendations) -> Vec<serde_json::Value> {
    serde_json::from_str(recommendations.as_json()).unwrap()
}

fn status_of(timings: &[service::SourceTiming], source: Source) -> SourceStatus {
    timings
        .iter()
        .find(|t| t.source == source)
        .map(|t| t.status)
        .unwrap()
}

#[tokio::test]
async fn every_source_arrives_in_one_dashboard() {
    for mode in [
        QueryMode::Coalesced,
        QueryMode::Pipelined,
        QueryMode::Pooled,
    ] {
        let mut config = test_config();
        config.query_mode = mode;
        let w = world(config).await;
        let dashboard = w.service.dashboard(uid(1)).await.unwrap();
        assert_eq!(dashboard.profile.username, "ada");
        assert_eq!(
            dashboard
                .orders
                .iter()
                .map(|o| o.product.as_str())
                .collect::<Vec<_>>(),
            vec!["mouse", "keyboard"]
        );
        assert_eq!(dashboard.reviews.len(), 1);
        assert_eq!(items(&dashboard.recommendations).len(), 10);
        assert!(dashboard.errors.is_empty(), "{:?}", dashboard.errors);
        assert_eq!(dashboard.timings.len(), 4);
        assert!(
            dashboard
                .timings
                .iter()
                .all(|t| t.status == SourceStatus::Ok)
        );

        let json = serde_json::to_value(&dashboard).unwrap();
        for key in ["profile", "orders", "reviews", "recommendations", "errors"] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        assert!(json.get("timings").is_none());
        assert_eq!(json["orders"][1]["amount"], "49.99");
    }
}

#[tokio::test]
async fn an_unknown_user_is_not_found_and_cancels_the_other_sources() {
    let mut config = test_config();
    // Longer than any profile read, however busy the machine: the call must end by cancellation.
    config.dashboard.recommendations_timeout = Duration::from_secs(9);
    let w = world(config).await;
    // The recommendation call would take a long time: it must be cancelled, not waited for.
    w.upstream
        .set_user_reply(404, Reply::ok().after(Duration::from_secs(30)));
    let err = w.service.dashboard(uid(404)).await.unwrap_err();
    let DashboardError::NotFound { user_id, timings } = &err else {
        panic!("expected NotFound, got {err:?}");
    };
    assert_eq!(*user_id, 404);
    assert_eq!(
        status_of(timings, Source::Recommendations),
        SourceStatus::Cancelled
    );
    assert_eq!(support::live_children_settled().await, 0);
}

#[tokio::test]
async fn a_hanging_upstream_is_a_recommendations_timeout_in_a_partial_dashboard() {
    let w = world(test_config()).await;
    w.upstream.set_user_reply(1, Reply::fault(Fault::Hang));
    let dashboard = w.service.dashboard(uid(1)).await.unwrap();
    assert_eq!(dashboard.profile.id, 1);
    assert_eq!(dashboard.orders.len(), 2);
    assert!(items(&dashboard.recommendations).is_empty());
    assert_eq!(dashboard.errors.len(), 1);
    let error = &dashboard.errors[0];
    assert_eq!(error.source, Source::Recommendations);
    assert_eq!(error.kind, "timeout");
    assert_eq!(
        error.error,
        "timed out after 300ms (recommendations timeout)"
    );
    assert_eq!(
        status_of(&dashboard.timings, Source::Recommendations),
        SourceStatus::Timeout
    );
}

#[tokio::test]
async fn a_hanging_upstream_opens_the_breaker() {
    // The source's timeout (300 ms) is far shorter than the client's own (5 s). A call cut off
    // by it must still count as a failure in the breaker: otherwise a service that hangs would
    // be waited on by every dashboard for ever, and never skipped.
    let w = world(test_config()).await;
    w.upstream.set_user_reply(1, Reply::fault(Fault::Hang));
    let threshold = client::ClientConfig::default().breaker.failure_threshold;
    for _ in 0..threshold {
        let dashboard = w.service.dashboard(uid(1)).await.unwrap();
        assert_eq!(dashboard.errors.len(), 1, "{:?}", dashboard.errors);
        assert_eq!(dashboard.errors[0].kind, "timeout");
        assert_eq!(
            dashboard.errors[0].error,
            "timed out after 300ms (recommendations timeout)"
        );
        assert_eq!(
            status_of(&dashboard.timings, Source::Recommendations),
            SourceStatus::Timeout
        );
    }
    let gauges = w.service.gauges();
    assert_eq!(gauges.breaker, service::BreakerState::Open, "{gauges:?}");
    // Open: the next dashboard does not wait for the service at all.
    let dashboard = w.service.dashboard(uid(2)).await.unwrap();
    assert_eq!(dashboard.errors.len(), 1, "{:?}", dashboard.errors);
    assert_eq!(dashboard.errors[0].kind, "circuit_open");
}

#[tokio::test]
async fn recommendations_of_either_shape_pass_through_verbatim() {
    for shape in [upstream::Shape::Objects, upstream::Shape::Ids] {
        let w = support::world_with_upstream(
            test_config(),
            upstream::Config {
                shape,
                ..upstream::Config::default()
            },
        )
        .await;
        let dashboard = w.service.dashboard(uid(1)).await.unwrap();
        assert!(
            dashboard.errors.is_empty(),
            "{shape:?}: {:?}",
            dashboard.errors
        );
        let catalogue = w.upstream.config().items_for(1);
        let expected: Vec<serde_json::Value> = match shape {
            upstream::Shape::Objects => catalogue
                .iter()
                .map(|item| serde_json::to_value(item).unwrap())
                .collect(),
            upstream::Shape::Ids => catalogue
                .iter()
                .map(|item| serde_json::json!(item.product_id))
                .collect(),
        };
        assert_eq!(items(&dashboard.recommendations), expected, "{shape:?}");
        // Written into the answer as the service sent them (field order included).
        let sent = match shape {
            upstream::Shape::Objects => serde_json::to_string(&catalogue),
            upstream::Shape::Ids => {
                serde_json::to_string(&catalogue.iter().map(|i| i.product_id).collect::<Vec<_>>())
            }
        }
        .unwrap();
        let json = serde_json::to_string(&dashboard).unwrap();
        assert!(
            json.contains(&format!("\"recommendations\":{sent}")),
            "{json}"
        );
        // Anything but an array under `items` is the service's fault, whatever the shape.
        for fault in [Fault::MissingItems, Fault::ItemsNotArray] {
            w.upstream.set_user_reply(1, Reply::fault(fault));
            let dashboard = w.service.dashboard(uid(1)).await.unwrap();
            assert_eq!(dashboard.errors.len(), 1, "{fault:?}");
            assert_eq!(dashboard.errors[0].kind, "decode", "{fault:?}");
            assert_eq!(dashboard.recommendations.as_json(), "[]");
        }
    }
}

#[tokio::test]
async fn upstream_faults_are_captured_per_source() {
    let w = world(test_config()).await;
    for (fault, kind) in [
        (Fault::Status(upstream::StatusCode::BAD_GATEWAY), "status"),
        (Fault::Malformed, "decode"),
        (Fault::MissingItems, "decode"),
        (Fault::Oversized { declared: true }, "too_large"),
        (Fault::Reset, "unavailable"),
    ] {
        w.upstream.set_user_reply(1, Reply::fault(fault));
        let dashboard = w.service.dashboard(uid(1)).await.unwrap();
        assert_eq!(
            dashboard.errors.len(),
            1,
            "{fault:?}: {:?}",
            dashboard.errors
        );
        assert_eq!(dashboard.errors[0].source, Source::Recommendations);
        assert_eq!(dashboard.errors[0].kind, kind, "{fault:?}");
        assert_eq!(dashboard.orders.len(), 2);
        if kind == "status" {
            // The upstream's own error body is not passed on to our clients.
            assert_eq!(
                dashboard.errors[0].error,
                "recommendation service answered 502 Bad Gateway"
            );
        }
    }
}

#[tokio::test]
async fn one_failing_query_gives_a_partial_dashboard() {
    let w = world(test_config()).await;
    let admin = repository::connect(&w.db.config()).await.unwrap();
    admin
        .batch_execute("ALTER TABLE orders RENAME TO orders_gone")
        .await
        .unwrap();
    let dashboard = w.service.dashboard(uid(1)).await.unwrap();
    assert_eq!(dashboard.profile.id, 1);
    assert!(dashboard.orders.is_empty());
    assert_eq!(dashboard.reviews.len(), 1);
    assert_eq!(dashboard.errors.len(), 1);
    assert_eq!(dashboard.errors[0].source, Source::Orders);
    assert_eq!(dashboard.errors[0].kind, "query");
    assert_eq!(
        dashboard.errors[0].error,
        "database query failed (SQLSTATE 42P01)"
    );
}

#[tokio::test]
async fn a_database_that_is_down_makes_the_dashboard_unavailable() {
    for mode in [
        QueryMode::Coalesced,
        QueryMode::Pipelined,
        QueryMode::Pooled,
    ] {
        let mut config = test_config();
        config.query_mode = mode;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let w = world_with(config, |db| {
            db.url = format!("postgres://nobody@127.0.0.1:{port}/none");
        })
        .await;
        let err = w.service.dashboard(uid(1)).await.unwrap_err();
        let DashboardError::Unavailable { errors, .. } = &err else {
            panic!("{mode:?}: expected Unavailable, got {err:?}");
        };
        assert_eq!(errors[0].source, Source::Profile);
        assert_eq!(errors[0].kind, "unavailable");
        assert_eq!(support::live_children_settled().await, 0);
    }
}

#[tokio::test]
async fn the_deadline_passing_before_the_profile_is_known_is_deadline_exceeded() {
    let mut config = test_config();
    config.dashboard.deadline = Duration::from_millis(300);
    let w = world(config).await;
    // Another session locks the users table, so the profile read waits on the server.
    let lock = testkit::TableLock::take(&w.db, "users").await;
    let err = w.service.dashboard(uid(1)).await.unwrap_err();
    let DashboardError::DeadlineExceeded { errors, timings } = &err else {
        panic!("expected DeadlineExceeded, got {err:?}");
    };
    let profile = errors.iter().find(|e| e.source == Source::Profile).unwrap();
    assert_eq!(profile.kind, "timeout");
    assert_eq!(profile.error, "timed out after 300ms (dashboard deadline)");
    assert_eq!(status_of(timings, Source::Profile), SourceStatus::Timeout);
    lock.release().await;
}

#[tokio::test]
async fn a_source_timeout_on_the_profile_is_unavailable() {
    let mut config = test_config();
    config.dashboard.profile_timeout = Duration::from_millis(200);
    let w = world(config).await;
    let lock = testkit::TableLock::take(&w.db, "users").await;
    let err = w.service.dashboard(uid(1)).await.unwrap_err();
    let DashboardError::Unavailable { errors, .. } = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert_eq!(errors[0].error, "timed out after 200ms (profile timeout)");
    lock.release().await;
}

#[tokio::test]
async fn database_slots_are_shared_by_all_requests() {
    // (In pooled mode each read waits for its own slot, and the profile's failure cancels the
    // other two before theirs runs out.)
    for mode in [QueryMode::Coalesced, QueryMode::Pipelined] {
        let mut config = test_config();
        config.query_mode = mode;
        config.db_concurrency = 1;
        config.db_slot_wait = Duration::from_millis(100);
        let w = world(config).await;
        let lock = testkit::TableLock::take(&w.db, "users").await;

        // The first dashboard takes the only slot and waits on the lock.
        let first = tokio::spawn({
            let service = w.service.clone();
            async move { service.dashboard(uid(1)).await }
        });
        while w.service.gauges().slots_in_use == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The second cannot get a slot and says so instead of queueing without bound.
        let err = w.service.dashboard(uid(2)).await.unwrap_err();
        let DashboardError::Unavailable { errors, timings } = &err else {
            panic!("expected Unavailable, got {err:?}");
        };
        assert_eq!(errors[0].kind, "busy");
        assert_eq!(
            errors[0].error,
            "database busy: no connection slot free within 100ms"
        );
        // The database sources failed, and their statuses say so (not "never ran"); the
        // recommendation call, which needs no database, either finished first (the stand-in answers
        // at once) or was cancelled with the rest.
        let statuses: Vec<_> = timings.iter().map(|t| (t.source, t.status)).collect();
        assert_eq!(
            statuses[..3],
            [
                (Source::Profile, SourceStatus::Error),
                (Source::Orders, SourceStatus::Error),
                (Source::Reviews, SourceStatus::Error),
            ]
        );
        assert!(matches!(
            statuses[3],
            (
                Source::Recommendations,
                SourceStatus::Ok | SourceStatus::Cancelled
            )
        ));

        lock.release().await;
        assert_eq!(first.await.unwrap().unwrap().profile.id, 1);
        assert_eq!(w.service.gauges().slots_in_use, 0);
    }
}

#[tokio::test]
async fn dropping_a_dashboard_mid_flight_leaves_no_child_and_no_statement() {
    let w = world(test_config()).await;
    w.upstream
        .set_user_reply(1, Reply::ok().after(Duration::from_secs(30)));
    let lock = testkit::TableLock::take(&w.db, "users").await;

    let before = taskgroup::live_children();
    let abandoned =
        tokio::time::timeout(Duration::from_millis(200), w.service.dashboard(uid(1))).await;
    assert!(abandoned.is_err());
    // Aborted children are dropped the next time the runtime reaches them.
    for _ in 0..100 {
        if taskgroup::live_children() == before {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(taskgroup::live_children(), before);
    // The slot is released with the connection: after the abandoned statement is cancelled
    // (it cannot finish on its own while the lock is held). Poll, with a bound.
    for _ in 0..200 {
        if w.service.gauges().slots_in_use == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w.service.gauges().slots_in_use, 0);
    assert_eq!(
        w.database.status().size,
        0,
        "the stuck connection was closed"
    );
    lock.release().await;
}

#[tokio::test]
async fn an_unknown_user_keeps_its_pipelined_connection() {
    // The profile says "not found" while orders and reviews are still on the wire; their
    // answers come in a moment later, and the connection goes back to the pool instead of
    // being replaced (a crawler of unknown ids must not cost a new connection per request).
    let w = world(test_config()).await;
    let pid = |database: repository::Database| async move {
        let conn = database.conn().await.unwrap();
        let row = conn
            .client()
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap();
        row.get::<_, i32>(0)
    };
    let first = pid(w.database.clone()).await;
    for _ in 0..20 {
        assert!(matches!(
            w.service.dashboard(uid(404)).await,
            Err(service::DashboardError::NotFound { .. })
        ));
        for _ in 0..200 {
            if w.service.gauges().slots_in_use == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(w.database.status().size, 1);
    assert_eq!(
        pid(w.database.clone()).await,
        first,
        "the connection was replaced"
    );
}
