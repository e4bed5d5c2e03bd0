//! Runs the real application on port 0 against a fresh test database and a real stand-in
//! recommendation server.

#![allow(dead_code, clippy::unwrap_used)] // Each test file uses a different part of this module.

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::web;
use api::settings::Settings;
use api::{AppState, Application, ShutdownHandle};
use testkit::TestDb;

/// A running application and what it talks to.
pub struct TestApp {
    pub address: SocketAddr,
    pub http: reqwest::Client,
    pub db: TestDb,
    pub upstream: upstream::Server,
    pub handle: ShutdownHandle,
    /// Notified, stops the server as SIGTERM does (`Application::run_until`).
    pub stop: std::sync::Arc<tokio::sync::Notify>,
    pub state: web::Data<AppState>,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }
}

/// The shared fixtures (see `testkit::insert_fixtures`).
pub async fn fixtures(db: &TestDb) {
    testkit::insert_fixtures(db).await;
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the app with test settings, adjusted by `tweak`.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let db = TestDb::create().await;
    fixtures(&db).await;
    let upstream = upstream::Server::start(upstream::Config::default())
        .await
        .unwrap();
    let mut settings = Settings::default();
    settings.server.port = 0;
    settings.server.workers = 1;
    settings.server.shutdown_grace = Duration::from_secs(10);
    settings.startup.db_wait = Duration::from_secs(5);
    settings.database = db.config();
    settings.recommendations.base_url = upstream.base_url();
    // Generous database limits, so a loaded machine does not trip them; a short one for the
    // recommendation call, which tests make hang on purpose.
    settings.service.dashboard.deadline = Duration::from_secs(10);
    settings.service.dashboard.profile_timeout = Duration::from_secs(8);
    settings.service.dashboard.orders_timeout = Duration::from_secs(8);
    settings.service.dashboard.reviews_timeout = Duration::from_secs(8);
    settings.service.dashboard.recommendations_timeout = Duration::from_millis(300);
    settings.service.db_slot_wait = Duration::from_secs(5);
    tweak(&mut settings);
    if std::env::var_os("TEST_LOG").is_some() {
        // Logs while debugging a test: TEST_LOG=1 RUST_LOG=debug cargo xtask test -- --nocapture
        api::telemetry::init(&settings.telemetry).unwrap();
    }
    let app = Application::build(settings).await.unwrap();
    let address = app.address();
    let handle = app.shutdown_handle();
    let state = app.state();
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let server = tokio::spawn(app.run_until({
        let stop = stop.clone();
        async move {
            stop.notified().await;
            "test"
        }
    }));
    TestApp {
        address,
        http: reqwest::Client::new(),
        db,
        upstream,
        handle,
        stop,
        state,
        server,
    }
}

/// The process-wide live-children gauge once aborted children have been dropped, polling with a
/// bound (the server's workers run on their own threads).
pub async fn live_children_settled() -> usize {
    for _ in 0..200 {
        if taskgroup::live_children() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    taskgroup::live_children()
}
