//! The repository through the components of a scaled-out deployment: PgBouncer in transaction
//! pooling mode and a streaming replica, both real (`cargo xtask test` starts them next to the
//! throwaway primary and sets `PGBOUNCER_URL`, `REPLICA_URL` and `REPLICA_PGBOUNCER_URL`).

#![allow(clippy::unwrap_used)] // Fixture helpers outside #[test] fail loudly by design.

use std::time::Duration;

use repository::{Conn, Database, DbConfig, Error, Reach, Statements};
use testkit::{TableLock, TestDb, insert_fixtures};

/// Every read of users 1 to 4 (4 does not exist) on one lease, rendered for comparison.
async fn everything(conn: &Conn) -> String {
    let ids = [1_i64, 2, 3, 4];
    let singles = futures::future::join_all(ids.iter().map(|&id| async move {
        let (profile, orders, reviews) =
            tokio::join!(conn.profile(id), conn.orders(id), conn.reviews(id));
        format!("{profile:?} {orders:?} {reviews:?}")
    }))
    .await;
    let batched = format!(
        "{:?} {:?} {:?} {:?}",
        conn.profiles(&ids).await,
        conn.orders_of(&ids).await,
        conn.reviews_of(&ids).await,
        conn.user_summaries(&ids).await.map(|mut all| {
            all.sort_by_key(|summary| summary.profile.id);
            all
        }),
    );
    format!("{singles:?} {batched}")
}

/// Sessions of this database on the primary that sit inside a transaction.
async fn idle_in_transaction(db: &TestDb) -> i64 {
    let admin = repository::connect(&db.admin_config()).await.unwrap();
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND state LIKE 'idle in transaction%'",
            &[&db.name()],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn unnamed_statements_through_pgbouncer_read_what_prepared_ones_read_directly() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    let direct = Database::connect_lazy(&db.config()).unwrap();
    let pooled = Database::connect_lazy(&db.pgbouncer_config()).unwrap();
    let expected = everything(&direct.conn().await.unwrap()).await;
    assert!(expected.contains("ada"), "{expected}");
    assert_eq!(everything(&pooled.conn().await.unwrap()).await, expected);
    // The same without a pooler in between: the mode does not depend on one.
    let unnamed_direct = Database::connect_lazy(&DbConfig {
        statements: Statements::Unnamed,
        ..db.config()
    })
    .unwrap();
    assert_eq!(
        everything(&unnamed_direct.conn().await.unwrap()).await,
        expected
    );
}

#[tokio::test]
async fn many_pipelined_leases_through_pgbouncer_each_get_their_own_rows() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    // More leases at once than PgBouncer has server connections for this database: each lease's
    // pipelined statements must stay on one server connection (one transaction), or answers
    // would reach the wrong lease.
    let pooled = Database::connect_lazy(&DbConfig {
        max_size: 40,
        // Opening 40 connections (SCRAM authentication each) takes a while in a debug build.
        wait_timeout: Duration::from_secs(10),
        create_timeout: Duration::from_secs(10),
        ..db.pgbouncer_config()
    })
    .unwrap();
    let reads = (0..200_i64).map(|i| {
        let pooled = pooled.clone();
        tokio::spawn(async move {
            let id = i % 4 + 1;
            let conn = pooled.conn().await.unwrap();
            let (profile, orders, reviews) =
                tokio::join!(conn.profile(id), conn.orders(id), conn.reviews(id));
            (id, profile.unwrap(), orders.unwrap(), reviews.unwrap())
        })
    });
    for read in futures::future::join_all(reads).await {
        let (id, profile, orders, reviews) = read.unwrap();
        assert_eq!(profile.as_ref().map(|p| p.id), (id <= 3).then_some(id));
        let expected_orders = match id {
            1 => 2,
            3 => 1,
            _ => 0,
        };
        assert_eq!(orders.items.len(), expected_orders, "user {id}");
        assert_eq!(reviews.items.len(), usize::from(id == 1), "user {id}");
    }
    drop(pooled);
    assert_eq!(idle_in_transaction(&db).await, 0);
}

#[tokio::test]
async fn statement_timeout_holds_through_pgbouncer_and_the_lease_leaves_no_open_transaction() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    let pooled = Database::connect_lazy(&DbConfig {
        statement_timeout: Duration::from_millis(200),
        ..db.pgbouncer_config()
    })
    .unwrap();
    let lock = TableLock::take(&db, "users").await;
    let conn = pooled.conn().await.unwrap();
    assert!(matches!(conn.profile(1).await, Err(Error::Timeout)));
    drop(conn);
    lock.release().await;

    // The failed transaction was ended when the lease was: the next lease reads normally (a
    // server connection left in an aborted transaction would refuse every statement).
    let conn = pooled.conn().await.unwrap();
    assert_eq!(conn.profile(1).await.unwrap().unwrap().username, "ada");
    drop(conn);
    // The COMMIT is sent as the lease ends; give it its bounded moment.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
    while idle_in_transaction(&db).await > 0 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "a session stayed in a transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The timeout came from SET LOCAL, not from a setting the role or database carries.
    let direct = repository::connect(&db.config()).await.unwrap();
    let row = direct
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "30s");
}

#[tokio::test]
async fn a_failed_statement_does_not_fail_its_siblings_on_the_same_lease() {
    // With `unnamed`, a lease is one transaction: a statement that fails aborts it, and every
    // sibling pipelined behind it would be refused (25P02) although nothing is wrong with it.
    // Each read must fail or succeed on its own, as it does with `prepared` (autocommit).
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    for config in [
        db.pgbouncer_config(),
        DbConfig {
            statements: Statements::Unnamed,
            ..db.config()
        },
    ] {
        let pooled = Database::connect_lazy(&DbConfig {
            statement_timeout: Duration::from_millis(200),
            ..config
        })
        .unwrap();
        let lock = TableLock::take(&db, "orders").await;
        let conn = pooled.conn().await.unwrap();
        // Polled in this order: the orders read goes out first and the others queue behind it.
        let (orders, reviews, profile, more_orders) = tokio::join!(
            conn.orders(1),
            conn.reviews(1),
            conn.profile(1),
            conn.orders(3)
        );
        lock.release().await;
        assert!(matches!(orders, Err(Error::Timeout)), "{orders:?}");
        assert_eq!(reviews.unwrap().items.len(), 1);
        assert_eq!(profile.unwrap().unwrap().username, "ada");
        // Queued behind the failure too, and reading the table that is free again by now (or
        // failing with its own timeout, never with the sibling's).
        assert!(
            matches!(&more_orders, Ok(page) if page.items.len() == 1)
                || matches!(more_orders, Err(Error::Timeout)),
            "{more_orders:?}"
        );
        // The lease goes on: a later statement on it reads normally.
        assert_eq!(conn.orders(1).await.unwrap().items.len(), 2);
        drop(conn);
        drop(pooled);
    }
    let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
    while idle_in_transaction(&db).await > 0 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "a session stayed in a transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn reads_go_to_a_replica_that_answers_and_give_the_same_rows() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    for through_pgbouncer in [false, true] {
        let replica = db.replica_url(through_pgbouncer).await;
        let base = if through_pgbouncer {
            db.pgbouncer_config()
        } else {
            db.config()
        };
        let database = Database::connect_lazy(&DbConfig {
            replica_urls: vec![replica],
            // A loaded test machine must not make the replica look gone.
            replica_timeout: Duration::from_secs(5),
            ..base
        })
        .unwrap();
        database.check_replicas().await;
        let conn = database.conn().await.unwrap();
        assert!(conn.on_replica());
        let answer = conn
            .client()
            .simple_query("SELECT pg_is_in_recovery()::text")
            .await
            .unwrap();
        let in_recovery = answer.iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(in_recovery.as_deref(), Some("true"));
        let direct = Database::connect_lazy(&db.config()).unwrap();
        assert_eq!(
            everything(&conn).await,
            everything(&direct.conn().await.unwrap()).await
        );
        let states = database.states(Duration::from_secs(2)).await;
        let reaches: Vec<_> = states.iter().map(|s| (s.name.as_str(), s.reach)).collect();
        assert_eq!(reaches, [("primary", Reach::Up), ("replica-1", Reach::Up)]);
    }
}

#[tokio::test]
async fn a_replica_that_does_not_answer_is_skipped_and_reads_fall_back_to_the_primary() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    // Nothing listens on port 1.
    let database = Database::connect_lazy(&DbConfig {
        replica_urls: vec![format!("postgres://dashboard@127.0.0.1:1/{}", db.name())],
        create_timeout: Duration::from_millis(500),
        ..db.config()
    })
    .unwrap();
    // Before its first check, a replica is not used.
    let conn = database.conn().await.unwrap();
    assert!(!conn.on_replica());
    drop(conn);
    database.check_replicas().await;
    let conn = database.conn().await.unwrap();
    assert!(!conn.on_replica());
    assert_eq!(conn.profile(1).await.unwrap().unwrap().username, "ada");
    let states = database.states(Duration::from_secs(2)).await;
    assert_eq!(states[0].reach, Reach::Up);
    assert_eq!(states[1].reach, Reach::Down);
    assert!(states[1].error.is_some());
}

#[tokio::test]
async fn a_replica_lost_in_the_middle_of_a_lease_is_read_again_from_the_primary() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    let replica = db.replica_url(false).await;
    let database = Database::connect_lazy(&DbConfig {
        replica_urls: vec![replica.clone()],
        replica_timeout: Duration::from_secs(5),
        ..db.config()
    })
    .unwrap();
    database.check_replicas().await;
    let conn = database.conn().await.unwrap();
    assert!(conn.on_replica());
    let pid: i32 = conn
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The replica ends this session (as a replica restart would).
    let admin = DbConfig::with_url(replica);
    let killer = repository::connect(&admin).await.unwrap();
    killer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // The next statement finds the session gone and runs on the primary instead.
    assert_eq!(conn.profile(1).await.unwrap().unwrap().username, "ada");
    assert!(!conn.on_replica());
    assert_eq!(conn.orders(1).await.unwrap().items.len(), 2);
    drop(conn);
    // The replica is out of the reads until its next check.
    assert!(!database.conn().await.unwrap().on_replica());
    database.check_replicas().await;
    assert!(database.conn().await.unwrap().on_replica());
}

#[tokio::test]
async fn a_replica_further_behind_than_the_limit_is_skipped() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    let replica = db.replica_url(false).await;
    let database = Database::connect_lazy(&DbConfig {
        replica_urls: vec![replica.clone()],
        replica_max_lag: Duration::from_millis(1),
        replica_timeout: Duration::from_secs(5),
        ..db.config()
    })
    .unwrap();
    // Other tests write meanwhile, so the replica may be a millisecond behind now and then:
    // check until it is caught up (bounded).
    let mut caught_up = false;
    for _ in 0..200 {
        database.check_replicas().await;
        if database.conn().await.unwrap().on_replica() {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(caught_up, "the replica never caught up within 1 ms");

    // Replay paused on the replica while the primary writes: the replica receives WAL it has
    // not applied, and its last applied transaction grows old.
    let admin = repository::connect(&DbConfig::with_url(replica))
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let resume = async {
        admin
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .unwrap();
    };
    let primary = repository::connect(&db.config()).await.unwrap();
    primary
        .batch_execute("INSERT INTO users (id, username, email) VALUES (9, 'late', 'l@x')")
        .await
        .unwrap();
    // The pause takes effect and the WAL arrives unapplied within moments; checked until then
    // (bounded).
    let mut states = Vec::new();
    for _ in 0..100 {
        database.check_replicas().await;
        states = database.states(Duration::from_secs(2)).await;
        if states[1].reach == Reach::Lagging {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let used_replica = database.conn().await.unwrap().on_replica();
    resume.await;
    assert_eq!(states[1].reach, Reach::Lagging, "{states:?}");
    assert!(states[1].lag_ms.is_some_and(|lag| lag >= 1));
    assert!(!used_replica);
}

/// Sets the replica's `primary_conninfo` (through `url`, a superuser's) and reloads it.
async fn set_conninfo(url: &str, value: &str) {
    let admin = repository::connect(&DbConfig::with_url(url.to_owned()))
        .await
        .unwrap();
    let statement: String = admin
        .query_one(
            "SELECT format('ALTER SYSTEM SET primary_conninfo = %L', $1::text)",
            &[&value],
        )
        .await
        .unwrap()
        .get(0);
    admin.batch_execute(&statement).await.unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
}

/// Puts the shared replica's `primary_conninfo` back when dropped, on a thread with a runtime of
/// its own (so also while a failing test unwinds).
struct ConninfoRestore {
    url: String,
    conninfo: String,
}

impl Drop for ConninfoRestore {
    fn drop(&mut self) {
        let (url, conninfo) = (self.url.clone(), self.conninfo.clone());
        let restored = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(set_conninfo(&url, &conninfo));
        })
        .join();
        assert!(
            restored.is_ok() || std::thread::panicking(),
            "could not restore the replica's primary_conninfo"
        );
    }
}

#[tokio::test]
async fn a_replica_that_stopped_streaming_is_skipped_while_its_primary_answers_and_serves_when_it_does_not()
 {
    // A replica cut off from its primary has replayed all it received, yet may miss any amount:
    // with the primary answering, it must not serve once its last replayed transaction is older
    // than the limit.
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    let replica = db.replica_url(false).await;
    let database = Database::connect_lazy(&DbConfig {
        replica_urls: vec![replica.clone()],
        replica_max_lag: Duration::from_millis(100),
        replica_timeout: Duration::from_secs(5),
        ..db.config()
    })
    .unwrap();
    let admin = repository::connect(&DbConfig::with_url(replica.clone()))
        .await
        .unwrap();
    let receiving = async || -> bool {
        admin
            .query_one("SELECT EXISTS (SELECT FROM pg_stat_wal_receiver)", &[])
            .await
            .unwrap()
            .get(0)
    };
    // Streaming now (bounded: another test may have cut it off a moment ago).
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while !receiving().await {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the replica never streamed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Replication broken (as by a wrong password or a lost network path): without its
    // `primary_conninfo` the replica stops its WAL receiver and keeps what it has. Restored at
    // once after, before any assertion: the replica is every test's.
    let conninfo: String = admin
        .query_one("SHOW primary_conninfo", &[])
        .await
        .unwrap()
        .get(0);
    set_conninfo(&replica, "").await;
    // Put back when this ends, a failing assertion or a panic included.
    let restore = ConninfoRestore {
        url: replica.clone(),
        conninfo: conninfo.clone(),
    };
    let mut seen = Vec::new();
    let mut skipped = false;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < give_up {
        database.check_replicas().await;
        let state = database.states(Duration::from_secs(2)).await[1].clone();
        seen.push(state.reach);
        if state.reach == Reach::Lagging {
            skipped = !database.conn().await.unwrap().on_replica();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same replica for an application whose primary is gone as well: what it has is the
    // best there is, so it serves.
    let orphaned = Database::connect_lazy(&DbConfig {
        url: format!("postgres://dashboard@127.0.0.1:1/{}", db.name()),
        replica_urls: vec![replica.clone()],
        replica_max_lag: Duration::from_millis(100),
        replica_timeout: Duration::from_secs(5),
        ..db.config()
    })
    .unwrap();
    orphaned.check_replicas().await;
    let orphan_states = orphaned.states(Duration::from_secs(2)).await;
    let orphan_reads = orphaned.conn().await.map(|conn| conn.on_replica());
    drop(restore);
    assert_eq!(
        orphan_states
            .iter()
            .map(|state| state.reach)
            .collect::<Vec<_>>(),
        [Reach::Down, Reach::Up],
        "{orphan_states:?}"
    );
    assert!(matches!(orphan_reads, Ok(true)), "{orphan_reads:?}");
    assert!(skipped, "never skipped while cut off: {seen:?}");
    // Streaming again, it serves again (bounded).
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        database.check_replicas().await;
        if database.conn().await.unwrap().on_replica() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the replica never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_replica_read_that_gets_no_answer_in_time_is_read_from_the_primary() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    // Standing in for a replica that makes reads wait (a replica gone behind PgBouncer does):
    // another database with the same rows, not in recovery (so "up to date"), its table locked.
    let slow = TestDb::create().await;
    insert_fixtures(&slow).await;
    let database = Database::connect_lazy(&DbConfig {
        replica_urls: vec![slow.url().to_owned()],
        replica_timeout: Duration::from_millis(200),
        ..db.config()
    })
    .unwrap();
    database.check_replicas().await;
    let lock = TableLock::take(&slow, "users").await;
    let conn = database.conn().await.unwrap();
    assert!(conn.on_replica());
    let (profile, orders) = tokio::join!(conn.profile(1), conn.orders(1));
    assert_eq!(profile.unwrap().unwrap().username, "ada");
    assert_eq!(orders.unwrap().items.len(), 2);
    assert!(!conn.on_replica());
    drop(conn);
    // A slow replica is not a gone one: it stays in the reads.
    let states = database.states(Duration::from_secs(2)).await;
    assert_eq!(states[1].reach, Reach::Up);
    let counts = database.lease_counts();
    assert!(counts[1].fallbacks >= 1, "{counts:?}");
    lock.release().await;
}

#[tokio::test]
async fn a_replica_whose_reads_keep_going_unanswered_is_left_out_for_a_while() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    // As above: a stand-in replica that answers its checks, but whose reads wait on a lock.
    let slow = TestDb::create().await;
    insert_fixtures(&slow).await;
    let database = Database::connect_lazy(&DbConfig {
        replica_urls: vec![slow.url().to_owned()],
        replica_timeout: Duration::from_millis(200),
        ..db.config()
    })
    .unwrap();
    database.check_replicas().await;
    let mut locks = Vec::new();
    for table in ["users", "orders", "reviews"] {
        locks.push(TableLock::take(&slow, table).await);
    }
    // A lease whose three pipelined reads all wait out replica_timeout (each then served by the
    // primary) counts once: the replica stays in the reads.
    let conn = database.conn().await.unwrap();
    assert!(conn.on_replica());
    let (profile, orders, reviews) = tokio::join!(conn.profile(1), conn.orders(1), conn.reviews(1));
    assert_eq!(profile.unwrap().unwrap().username, "ada");
    assert_eq!(orders.unwrap().items.len(), 2);
    assert_eq!(reviews.unwrap().items.len(), 1);
    assert!(!conn.on_replica());
    drop(conn);
    // Two more such leases make three in a row.
    for _ in 0..2 {
        let conn = database.conn().await.unwrap();
        assert!(conn.on_replica());
        assert_eq!(conn.profile(1).await.unwrap().unwrap().username, "ada");
        assert!(!conn.on_replica());
    }
    // Then the replica is left out: the next lease goes to the primary without waiting, and
    // readiness says why, although the replica's check still answers.
    let conn = database.conn().await.unwrap();
    assert!(!conn.on_replica());
    drop(conn);
    database.check_replicas().await;
    let states = database.states(Duration::from_secs(2)).await;
    assert_eq!(states[1].reach, Reach::Down, "{states:?}");
    assert!(
        states[1]
            .error
            .as_deref()
            .is_some_and(|why| why.contains("no answer in time")),
        "{states:?}"
    );
    for lock in locks {
        lock.release().await;
    }
    // After the hold (5 s) it is read from again (bounded).
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        database.check_replicas().await;
        if database.conn().await.unwrap().on_replica() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "never read from again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = database.conn().await.unwrap();
    assert!(conn.on_replica());
    assert_eq!(conn.profile(1).await.unwrap().unwrap().username, "ada");
    assert!(conn.on_replica());
}

#[tokio::test]
async fn once_no_database_answers_reads_fail_at_once_until_one_does() {
    // A server that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let database = Database::connect_lazy(&DbConfig {
        create_timeout: Duration::from_millis(300),
        ..DbConfig::with_url(format!("postgres://dashboard@{address}/x"))
    })
    .unwrap();
    // The first read waits for its connection, bounded.
    assert!(matches!(database.conn().await, Err(Error::Unavailable(_))));
    // Readiness says so at once.
    let states = database.states(Duration::from_secs(2)).await;
    assert_eq!(states[0].reach, Reach::Down);
    // The failed read made the primary watched: a background check (within
    // health_check_interval) finds it down, and from then on a read does not wait at all.
    let mut fast = None;
    for _ in 0..40 {
        match database.conn().await {
            Err(Error::Unavailable(reason)) if reason.contains("no database answers") => {
                fast = Some(reason);
                break;
            }
            Err(Error::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert!(
        fast.is_some(),
        "reads kept waiting on a primary known to be down"
    );
    held.abort();
}
