//! A pool split into lanes, one per worker thread, against a real PostgreSQL server.

#![allow(clippy::unwrap_used)] // Fixture helpers outside #[test] fail loudly by design.

use std::time::Duration;

use repository::{Database, DbConfig};
use testkit::TestDb;

fn config(db: &TestDb, max_size: usize) -> DbConfig {
    DbConfig {
        max_size,
        ..db.config()
    }
}

/// A worker thread with a single-threaded runtime of its own, as actix-web runs them: it adopts
/// lane `worker` of `database` and serves until told to stop, then drops its runtime.
struct Worker {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    async fn start(database: &Database, worker: usize) -> Self {
        let database = database.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                database.adopt_thread(worker);
                database.claim_home();
                ready.send(()).unwrap();
                let _ = stopped.await;
            });
        });
        is_ready.await.unwrap();
        Self { stop, thread }
    }

    fn stop(self) {
        self.stop.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

#[tokio::test]
async fn lanes_split_the_pool_and_report_it_as_one() {
    let db = TestDb::create().await;
    let database = Database::connect_lazy_in_lanes(&config(&db, 5), 2).unwrap();
    assert_eq!(database.lanes(), 2);
    assert_eq!(database.status().max_size, 5);
    // More lanes than connections: one connection per lane.
    let narrow = Database::connect_lazy_in_lanes(&config(&db, 3), 8).unwrap();
    assert_eq!(narrow.lanes(), 3);
    assert_eq!(narrow.status().max_size, 3);

    let conns = [
        database.conn_in_lane(0).await.unwrap(),
        database.conn_in_lane(1).await.unwrap(),
    ];
    for conn in &conns {
        conn.client().simple_query("SELECT 1").await.unwrap();
    }
    let status = database.status();
    assert_eq!((status.size, status.idle), (2, 0));
    drop(conns);
    assert_eq!(database.status().idle, 2);
    database.close_idle();
    assert_eq!(database.status().size, 0);
}

#[tokio::test]
async fn a_lane_s_connections_are_driven_by_its_home_runtime_whoever_asks() {
    let db = TestDb::create().await;
    let database = Database::connect_lazy_in_lanes(&config(&db, 4), 2).unwrap();
    let home = Worker::start(&database, 1).await;

    // This thread asks for a connection of lane 1: it is opened on the worker's runtime.
    let borrowed = database.conn_in_lane(1).await.unwrap();
    borrowed.client().simple_query("SELECT 1").await.unwrap();
    // And one of lane 0, which has no home: opened here.
    let local = database.conn_in_lane(0).await.unwrap();
    local.client().simple_query("SELECT 1").await.unwrap();

    // When the worker's runtime goes, the driver of its lane's connection goes with it.
    home.stop();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !borrowed.client().is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the connection of lane 1 was driven by this thread, not by its home");
    assert!(!local.client().is_closed());
    local.client().simple_query("SELECT 1").await.unwrap();

    // With its home gone, lane 1 opens connections where it is asked (start-up or shutdown).
    borrowed.discard();
    drop(borrowed);
    let reopened = database.conn_in_lane(1).await.unwrap();
    reopened.client().simple_query("SELECT 1").await.unwrap();
}
