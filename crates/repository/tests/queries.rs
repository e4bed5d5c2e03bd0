//! The repository's reads and errors against a real PostgreSQL server.
//!
//! Each test gets a fresh migrated database from `testkit` (run with `cargo xtask test`) and inserts
//! the fixtures it asserts on.

#![allow(clippy::unwrap_used)] // Fixture helpers outside #[test] fail loudly by design.

use std::str::FromStr;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use repository::{Database, DbConfig, Error, Order, OrderSummary, Page, Profile, Review};
use rust_decimal::Decimal;
use testkit::TestDb;

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// Users 1 (three orders, two reviews), 2 (no orders, no reviews, no avatar), 3 (one order).
async fn fixtures(db: &TestDb) {
    let client = repository::connect(&db.config()).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO users (id, username, email, avatar) VALUES
                 (1, 'ada', 'ada@example.com', 'https://img/ada.png'),
                 (2, 'bob', 'bob@example.com', NULL),
                 (3, 'cy''s', 'cy@example.com', NULL);
             INSERT INTO orders (user_id, product, amount, created_at) VALUES
                 (1, 'keyboard', 49.99, '2025-01-02 10:00:00+00'),
                 (1, 'mouse',    0.10,  '2025-03-04 10:00:00+00'),
                 (1, 'monitor',  199.01, '2024-12-31 23:59:59+00'),
                 (3, 'lamp',     15.00, '2025-05-05 05:05:05+00');
             INSERT INTO reviews (user_id, product_id, rating, content) VALUES
                 (1, 501, 5, 'great'),
                 (1, 502, 2, 'meh');",
        )
        .await
        .unwrap();
}

/// One profile read on a connection of its own, errors of taking it included.
async fn profile_of(database: &Database, user_id: i64) -> Result<Option<Profile>, Error> {
    database.conn().await?.profile(user_id).await
}

#[tokio::test]
async fn reads_return_exactly_the_fixture_rows() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let database = Database::connect_lazy(&db.config()).unwrap();
    let database = database.conn().await.unwrap();

    assert_eq!(
        database.profile(1).await.unwrap(),
        Some(Profile {
            id: 1,
            username: "ada".into(),
            email: "ada@example.com".into(),
            avatar: Some("https://img/ada.png".into()),
        })
    );
    assert_eq!(database.profile(2).await.unwrap().unwrap().avatar, None);
    assert_eq!(database.profile(3).await.unwrap().unwrap().username, "cy's");

    let orders = database.orders(1).await.unwrap();
    assert!(!orders.more);
    let at = |y, m, d, h, min, s| Utc.with_ymd_and_hms(y, m, d, h, min, s).unwrap();
    assert_eq!(
        orders.items,
        vec![
            Order {
                id: 2,
                product: "mouse".into(),
                amount: dec("0.10"),
                created_at: at(2025, 3, 4, 10, 0, 0),
            },
            Order {
                id: 1,
                product: "keyboard".into(),
                amount: dec("49.99"),
                created_at: at(2025, 1, 2, 10, 0, 0),
            },
            Order {
                id: 3,
                product: "monitor".into(),
                amount: dec("199.01"),
                created_at: at(2024, 12, 31, 23, 59, 59),
            },
        ]
    );
    assert!(database.orders(2).await.unwrap().items.is_empty());

    assert_eq!(
        database.reviews(1).await.unwrap().items,
        vec![
            Review {
                id: 2,
                product_id: 502,
                rating: 2,
                content: "meh".into(),
            },
            Review {
                id: 1,
                product_id: 501,
                rating: 5,
                content: "great".into(),
            },
        ]
    );
    assert!(database.reviews(3).await.unwrap().items.is_empty());

    // Exact decimal arithmetic: 49.99 + 0.10 + 199.01 is 249.10, not 249.09999.
    let summaries = database.user_summaries(&[1, 2]).await.unwrap();
    let summary_of = |id| {
        summaries
            .iter()
            .find(|s| s.profile.id == id)
            .map(|s| s.orders)
    };
    assert_eq!(
        summary_of(1),
        Some(OrderSummary {
            order_count: 3,
            total_amount: dec("249.10"),
        })
    );
    assert_eq!(
        summary_of(2),
        Some(OrderSummary {
            order_count: 0,
            total_amount: Decimal::ZERO,
        })
    );
}

#[tokio::test]
async fn unknown_users_are_none_and_empty() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let database = Database::connect_lazy(&db.config()).unwrap();
    let database = database.conn().await.unwrap();
    assert_eq!(database.profile(404).await.unwrap(), None);
    assert_eq!(database.profile(i64::MAX).await.unwrap(), None);
    assert_eq!(database.profile(-1).await.unwrap(), None);
    assert_eq!(database.orders(404).await.unwrap(), Page::default());
    assert_eq!(database.reviews(404).await.unwrap(), Page::default());
    assert!(database.user_summaries(&[404]).await.unwrap().is_empty());
}

#[tokio::test]
async fn summaries_for_many_ids_in_one_statement() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let database = Database::connect_lazy(&db.config()).unwrap();
    let database = database.conn().await.unwrap();
    let mut summaries = database.user_summaries(&[3, 1, 999, 2, 1]).await.unwrap();
    summaries.sort_by_key(|s| s.profile.id);
    let brief: Vec<(i64, i64, Decimal)> = summaries
        .iter()
        .map(|s| (s.profile.id, s.orders.order_count, s.orders.total_amount))
        .collect();
    assert_eq!(
        brief,
        vec![
            (1, 3, dec("249.10")),
            (2, 0, Decimal::ZERO),
            (3, 1, dec("15.00")),
        ]
    );
    assert!(database.user_summaries(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn lists_are_capped_by_the_configured_limits() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let config = DbConfig {
        orders_limit: 2,
        reviews_limit: 1,
        ..db.config()
    };
    let database = Database::connect_lazy(&config).unwrap();
    let database = database.conn().await.unwrap();
    let orders = database.orders(1).await.unwrap();
    assert_eq!(
        orders.items.iter().map(|o| o.id).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert!(orders.more, "a third order exists beyond the limit");
    let reviews = database.reviews(1).await.unwrap();
    assert_eq!(reviews.items.len(), 1);
    assert!(reviews.more);
    // The summary counts every order, not just the capped list.
    let summaries = database.user_summaries(&[1]).await.unwrap();
    assert_eq!(summaries[0].orders.order_count, 3);
}

#[tokio::test]
async fn money_serialises_as_an_exact_string() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let database = Database::connect_lazy(&db.config()).unwrap();
    let orders = database.conn().await.unwrap().orders(1).await.unwrap();
    let json = serde_json::to_value(orders.items).unwrap();
    assert_eq!(json[0]["amount"], "0.10");
    assert_eq!(json[0]["created_at"], "2025-03-04T10:00:00Z");
}

#[tokio::test]
async fn pipelined_reads_on_one_connection_agree_with_separate_ones() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let database = Database::connect_lazy(&db.config()).unwrap();
    let conn = database.conn().await.unwrap();
    let (profile, orders, reviews) =
        tokio::try_join!(conn.profile(1), conn.orders(1), conn.reviews(1)).unwrap();
    let other = database.conn().await.unwrap();
    assert_eq!(profile, other.profile(1).await.unwrap());
    assert_eq!(orders, other.orders(1).await.unwrap());
    assert_eq!(reviews, other.reviews(1).await.unwrap());
}

#[tokio::test]
async fn a_statement_past_statement_timeout_is_a_timeout() {
    let db = TestDb::create().await;
    let config = DbConfig {
        statement_timeout: Duration::from_millis(50),
        ..db.config()
    };
    let database = Database::connect_lazy(&config).unwrap();
    let conn = database.conn().await.unwrap();
    let err = conn
        .client()
        .simple_query("SELECT pg_sleep(5)")
        .await
        .map_err(Error::from)
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    assert_eq!(err.kind(), "timeout");
    // The connection survives a cancelled statement.
    assert!(conn.profile(1).await.unwrap().is_none());
}

#[tokio::test]
async fn a_cancel_request_is_reported_as_cancelled() {
    let db = TestDb::create().await;
    let database = Database::connect_lazy(&db.config()).unwrap();
    let conn = database.conn().await.unwrap();
    let token = conn.cancel_token();
    let sleep = conn.client().simple_query("SELECT pg_sleep(30)");
    let cancel = async {
        // Give the statement time to reach the server before cancelling it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    };
    let (result, ()) = tokio::join!(sleep, cancel);
    let err = Error::from(result.unwrap_err());
    assert!(matches!(err, Error::Cancelled), "{err:?}");
}

#[tokio::test]
async fn an_exhausted_pool_times_out_after_the_configured_wait() {
    let db = TestDb::create().await;
    let config = DbConfig {
        max_size: 2,
        wait_timeout: Duration::from_millis(750),
        ..db.config()
    };
    let database = Database::connect_lazy(&config).unwrap();
    let _held = (
        database.conn().await.unwrap(),
        database.conn().await.unwrap(),
    );
    assert_eq!(database.status().size, 2);
    assert_eq!(database.status().idle, 0);

    // The connections are open; from here on only the pool's own timer matters, so the test
    // runs on tokio's paused clock and measures virtual time, not the machine's speed.
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    let err = database.conn().await.unwrap_err();
    assert!(matches!(err, Error::PoolTimeout(_)), "{err:?}");
    // Virtual time: exactly the configured wait, give or take the timer wheel's 1 ms tick.
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(750)..=Duration::from_millis(751)).contains(&waited),
        "{waited:?}"
    );
    assert!(err.is_unavailable());
    assert_eq!(database.status().waiting, 0);
}

#[tokio::test]
async fn a_server_that_is_not_there_is_unavailable() {
    // Bind and release a port so that nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = DbConfig::with_url(format!("postgres://nobody@127.0.0.1:{port}/none"));
    let database = Database::connect_lazy(&config).unwrap();
    let err = profile_of(&database, 1).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.is_unavailable());
    let err = database.ping().await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn a_connection_killed_by_the_server_is_unavailable_then_replaced() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let database = Database::connect_lazy(&DbConfig {
        max_size: 1,
        ..db.config()
    })
    .unwrap();
    let conn = database.conn().await.unwrap();
    let pid: i32 = conn
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let admin = repository::connect(&db.admin_config()).await.unwrap();
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = conn.profile(1).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    drop(conn);
    // The pool notices the dead connection when it comes back and opens a new one.
    assert_eq!(profile_of(&database, 1).await.unwrap().unwrap().id, 1);
}

#[tokio::test]
async fn a_closed_pool_refuses_with_closed() {
    let db = TestDb::create().await;
    let database = Database::connect_lazy(&db.config()).unwrap();
    database.ping().await.unwrap();
    database.close();
    assert!(database.is_closed());
    let err = profile_of(&database, 1).await.unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
}

#[tokio::test]
async fn sql_in_inputs_is_inert() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    // Parameters never become SQL: a username full of SQL is stored and read back verbatim.
    let hostile = "'); DROP TABLE users; --";
    let client = repository::connect(&db.config()).await.unwrap();
    client
        .execute(
            "INSERT INTO users (id, username, email) VALUES (10, $1, $1)",
            &[&hostile],
        )
        .await
        .unwrap();
    let database = Database::connect_lazy(&db.config()).unwrap();
    assert_eq!(
        profile_of(&database, 10).await.unwrap().unwrap().username,
        hostile
    );
    assert_eq!(
        profile_of(&database, 1).await.unwrap().unwrap().username,
        "ada"
    );
}

#[tokio::test]
async fn a_query_error_carries_its_sqlstate_and_no_sql() {
    let db = TestDb::create().await;
    let database = Database::connect_lazy(&db.config()).unwrap();
    let conn = database.conn().await.unwrap();
    let err = Error::from(
        conn.client()
            .simple_query("SELECT * FROM no_such_table")
            .await
            .unwrap_err(),
    );
    match &err {
        Error::Query { code, .. } => assert_eq!(code, "42P01"),
        other => panic!("expected a query error, got {other:?}"),
    }
    assert!(!err.to_string().contains("SELECT"), "{err}");
}

#[tokio::test]
async fn an_abandoned_statement_is_cancelled_on_the_server_and_its_connection_closed() {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let config = DbConfig {
        application_name: "abandon-test".into(),
        ..db.config()
    };
    let database = Database::connect_lazy(&config).unwrap();

    // Another session holds a lock that makes the profile read wait on the server.
    let lock = testkit::TableLock::take(&db, "users").await;

    let conn = database.conn().await.unwrap();
    let abandoned = tokio::time::timeout(Duration::from_millis(200), conn.profile(1)).await;
    assert!(abandoned.is_err(), "the read should still be waiting");
    assert!(conn.was_abandoned());
    drop(conn);

    // The server stops the statement: nothing of ours stays active. Poll for the effect, with a
    // bound, instead of asserting how fast it happens.
    let admin = repository::connect(&db.admin_config()).await.unwrap();
    let mut active: i64 = -1;
    for _ in 0..100 {
        active = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'abandon-test' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(active, 0, "the abandoned statement is still running");
    // The connection was closed, not returned to the pool.
    assert_eq!(database.status().size, 0);

    lock.release().await;
    assert_eq!(profile_of(&database, 1).await.unwrap().unwrap().id, 1);
}
