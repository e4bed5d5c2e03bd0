//! Shared set-up for the service's integration tests: a fresh database with fixtures, a real
//! stand-in recommendation server, and a service over both.

#![allow(dead_code, clippy::unwrap_used)] // Each test file uses a different part of this module.

use std::time::Duration;

use client::{ClientConfig, RecommendationClient};
use repository::{Database, DbConfig};
use service::{Service, ServiceConfig};
use testkit::TestDb;

/// Everything one test needs; dropping it drops the database and stops the server.
pub struct World {
    pub db: TestDb,
    pub upstream: upstream::Server,
    pub service: Service,
    /// The pool the service uses (the same pool: a clone).
    pub database: Database,
}

impl World {
    /// Another service over the same pool and stand-in, with other settings.
    pub fn service_with(&self, config: ServiceConfig) -> Service {
        let client = RecommendationClient::new(ClientConfig {
            base_url: self.upstream.base_url(),
            ..ClientConfig::default()
        })
        .unwrap();
        Service::new(self.database.clone(), client, config).unwrap()
    }
}

/// The shared fixtures (see `testkit::insert_fixtures`).
pub async fn fixtures(db: &TestDb) {
    testkit::insert_fixtures(db).await;
}

/// Generous limits for the database (so a loaded machine does not trip them) and a short one
/// for the recommendation call, which tests make hang on purpose.
pub fn test_config() -> ServiceConfig {
    let mut config = ServiceConfig::default();
    config.dashboard.deadline = Duration::from_secs(10);
    config.dashboard.profile_timeout = Duration::from_secs(8);
    config.dashboard.orders_timeout = Duration::from_secs(8);
    config.dashboard.reviews_timeout = Duration::from_secs(8);
    config.dashboard.recommendations_timeout = Duration::from_millis(300);
    config.db_slot_wait = Duration::from_secs(5);
    config
}

pub async fn world(config: ServiceConfig) -> World {
    world_with(config, |_| {}).await
}

pub async fn world_with(config: ServiceConfig, db_config: impl FnOnce(&mut DbConfig)) -> World {
    world_of(config, db_config, upstream::Config::default()).await
}

/// A world whose stand-in answers as `upstream` says.
pub async fn world_with_upstream(config: ServiceConfig, upstream: upstream::Config) -> World {
    world_of(config, |_| {}, upstream).await
}

async fn world_of(
    config: ServiceConfig,
    db_config: impl FnOnce(&mut DbConfig),
    upstream: upstream::Config,
) -> World {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let upstream = upstream::Server::start(upstream).await.unwrap();
    let mut settings = db.config();
    db_config(&mut settings);
    let database = Database::connect_lazy(&settings).unwrap();
    let client = RecommendationClient::new(ClientConfig {
        base_url: upstream.base_url(),
        ..ClientConfig::default()
    })
    .unwrap();
    let service = Service::new(database.clone(), client, config).unwrap();
    World {
        db,
        upstream,
        service,
        database,
    }
}

/// The live-children gauge once aborted children have been dropped: an aborted task is dropped
/// the next time the runtime reaches it, so yield (a bounded number of times) until it settles.
pub async fn live_children_settled() -> usize {
    for _ in 0..1000 {
        if taskgroup::live_children() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    taskgroup::live_children()
}

/// A user id from a test's literal.
pub fn uid(id: i64) -> service::UserId {
    service::UserId::new(id).unwrap()
}

/// User ids from a test's literals (any value: the batch decides what to do with each).
pub fn uids(ids: &[i64]) -> Vec<service::UserId> {
    ids.iter().map(|&id| uid(id)).collect()
}
