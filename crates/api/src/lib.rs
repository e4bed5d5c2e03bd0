//! The dashboard HTTP API on actix-web: the composition root.
//!
//! [`Application::build`] does what the seed's FastAPI `lifespan` does (section 六), and more:
//! it checks the settings, builds the pool and waits (with backoff, for a bounded time) until the
//! database answers, builds the one recommendation client of the process, then binds the server.
//! [`Application::run`] serves until SIGTERM or SIGINT, lets in-flight requests finish within
//! the grace period, then closes the pool. The application can be built on port 0, which is how
//! the integration tests run the real server.
//!
//! Routes: `GET /api/users/{user_id}/dashboard`, `POST /api/users/batch`, `GET /healthz`,
//! `GET /readyz`, `GET /metrics`, `GET /openapi.json`. Every error is JSON (see [`error`]).

pub mod auth;
pub mod disconnect;
pub mod error;
pub mod metrics;
pub mod middleware;
pub mod openapi;
pub mod routes;
pub mod settings;
pub mod telemetry;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, web};
use service::Service;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::settings::Settings;

/// What every request handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The orchestration layer (pool, client, gate).
    pub service: Service,
    /// The metrics registry.
    pub metrics: Metrics,
    /// The OpenAPI document, rendered once.
    pub openapi: String,
    /// Requests accepted and not yet fully answered.
    pub in_flight: middleware::InFlight,
    /// How long a client may take to send a request's body, from the moment its headers are in
    /// (`server.client_request_timeout`, which actix applies to the headers only).
    pub body_timeout: Duration,
    /// Bearer-token verification (`[auth]`).
    pub auth: auth::Authenticator,
    /// Requests per client, when limited (`[rate_limit]`).
    pub rate_limit: Option<auth::RateLimit>,
}

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting is unusable; the message names the key.
    #[error("{0}")]
    Settings(String),
    /// The database did not answer within `startup.db_wait`.
    #[error("the database at {url} did not answer within {waited:?}: {source}")]
    Database {
        /// The database URL, password masked.
        url: String,
        /// How long start-up waited.
        waited: Duration,
        /// The last error.
        #[source]
        source: service::NotReady,
    },
    /// The listening socket could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

/// A built, bound, not yet running application.
pub struct Application {
    address: SocketAddr,
    server: Server,
    state: web::Data<AppState>,
    grace: Duration,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Builds everything and binds the listening socket; see the crate documentation.
    ///
    /// # Errors
    ///
    /// [`StartupError`] naming what is wrong: a setting, the database, or the address.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        // Every setting is checked before waiting for the database, so a bad key is reported at
        // once rather than after `startup.db_wait`.
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        // One pool and one HTTP client per worker (see `Service::adopt_worker_thread`).
        let service = Service::connect(
            &settings.database,
            settings.recommendations.clone(),
            settings.service.clone(),
            workers,
        )
        .map_err(|e| StartupError::Settings(e.to_string()))?;
        let authenticator = auth::Authenticator::new(&settings.auth)
            .map_err(|e| StartupError::Settings(e.to_string()))?;
        let cors_origins = settings.cors.allowed_origins.clone();
        for origin in &cors_origins {
            if !(origin.starts_with("https://") || origin.starts_with("http://")) {
                return Err(StartupError::Settings(format!(
                    "cors.allowed_origins: {origin:?} is not an origin (scheme://host[:port])"
                )));
            }
        }
        let protected = Protected {
            metrics: authenticator.enabled() && settings.auth.protect_metrics,
            openapi: authenticator.enabled() && settings.auth.protect_openapi,
        };
        check_file_limit(&settings);
        service
            .wait_until_ready(settings.startup.db_wait)
            .await
            .map_err(|source| StartupError::Database {
                url: settings.database.masked_url(),
                waited: settings.startup.db_wait,
                source,
            })?;
        let state = web::Data::new(AppState {
            service,
            metrics: Metrics::new(),
            openapi: openapi::document(authenticator.enabled()),
            in_flight: middleware::InFlight::default(),
            body_timeout: settings.server.client_request_timeout,
            auth: authenticator,
            rate_limit: auth::RateLimit::new(&settings.rate_limit),
        });

        let server_settings = &settings.server;
        let address = SocketAddr::new(server_settings.host, server_settings.port);
        let listener = listen(address, server_settings.backlog)
            .map_err(|source| StartupError::Bind { address, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { address, source })?;
        let json_limit = server_settings.json_limit;
        let app_state = state.clone();
        let connected_state = state.clone();
        let next_worker = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = HttpServer::new(move || {
            bind_worker(&next_worker, &app_state.service);
            App::new()
                .app_data(app_state.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(json_limit)
                        .error_handler(error::json_error),
                )
                .app_data(web::PathConfig::default().error_handler(error::path_error))
                .app_data(web::QueryConfig::default().error_handler(error::query_error))
                .wrap(cors(&cors_origins))
                .wrap(actix_web::middleware::from_fn(middleware::observe))
                .configure(|config| routes_config(config, protected))
                .default_service(web::to(error::not_found))
        })
        .on_connect(move |connection, data| {
            // Runs on the worker's own runtime (unlike the app factory above).
            connected_state.service.worker_serving();
            data.insert(middleware::Closing::default());
            disconnect::on_connect(connection, data);
        })
        .workers(workers)
        .backlog(server_settings.backlog)
        .max_connections(server_settings.max_connections_per_worker)
        .keep_alive(server_settings.keep_alive)
        .client_request_timeout(server_settings.client_request_timeout)
        .client_disconnect_timeout(server_settings.client_disconnect_timeout)
        .shutdown_timeout(server_settings.shutdown_grace.as_secs().max(1))
        // Signals are handled in `run`, so that SIGINT is as graceful as SIGTERM, and shutdown
        // drains requests itself (see `Application::shutdown`).
        .disable_signals()
        .listen(listener)
        .map_err(|source| StartupError::Bind { address, source })?
        .run();
        tracing::info!(
            %address,
            workers,
            database = %settings.database.masked_url(),
            recommendations = %settings.recommendations.base_url,
            "listening"
        );
        Ok(Self {
            address,
            server,
            state,
            grace: server_settings.shutdown_grace,
        })
    }

    /// The address the server listens on (with the real port when built on port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A handle to shut the server down gracefully, as SIGTERM does.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            server: self.server.handle(),
            in_flight: self.state.in_flight.clone(),
            grace: self.grace,
        }
    }

    /// The state the handlers share (for tests and embedding).
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Serves until SIGTERM or SIGINT (or a [`ShutdownHandle`]), lets in-flight requests finish
    /// within the grace period, then closes the pool.
    ///
    /// # Errors
    ///
    /// When the server fails.
    pub async fn run(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` resolves (to a word saying why, for the log) or a [`ShutdownHandle`]
    /// stops the server, then shuts down as on SIGTERM: see [`ShutdownHandle::shutdown`]. The pool
    /// is closed once the server has stopped.
    ///
    /// # Errors
    ///
    /// When the server fails.
    pub async fn run_until(
        self,
        stop: impl Future<Output = &'static str> + Send + 'static,
    ) -> std::io::Result<()> {
        let handle = self.shutdown_handle();
        let signals = tokio::spawn(async move {
            let reason = stop.await;
            tracing::info!(
                reason,
                "shutting down: no new connections, finishing in-flight requests"
            );
            handle.shutdown().await;
        });
        let served = self.server.await;
        signals.abort();
        self.state.service.close();
        tracing::info!("shut down: pool closed");
        served
    }
}

/// Shuts the server down gracefully: stop accepting connections, let every request already
/// accepted finish (within the grace period), then close the remaining idle connections.
///
/// actix-server's own graceful stop is not used to drain: it stops its accept thread and its
/// workers at the same time, and a worker that notices the accept thread gone before it sees the
/// stop message exits at once, dropping the requests it was serving (actix-server 2.6). So
/// accepting is paused first, requests are counted out by the middleware (until each response
/// body has been written), and only then are the workers stopped.
///
/// Pausing the accept loop does not stop keep-alive clients from sending more requests on the
/// connections they have, and under steady load some request is always in flight: the count
/// would never reach zero, and the grace period would end by cutting requests off. So while
/// draining, every response says `Connection: close`, and each connection closes after the
/// answer it is working on.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    server: ServerHandle,
    in_flight: middleware::InFlight,
    grace: Duration,
}

impl ShutdownHandle {
    /// Drains and stops the server; returns once it has stopped.
    pub async fn shutdown(&self) {
        self.in_flight.start_draining();
        self.server.pause().await;
        let give_up = Instant::now() + self.grace;
        while self.in_flight.get() > 0 && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.in_flight.get();
        if left > 0 {
            tracing::warn!(left, grace = ?self.grace, "grace period over; closing unfinished requests");
        }
        self.server.stop(false).await;
    }
}

/// Registers the routes. A GET route answers HEAD too (monitors and load balancers probe with
/// it); a known path called with another method answers 405 in JSON, with `Allow`.
/// The routes answering GET, as their metric labels.
pub(crate) const ROUTES: [&str; 5] = [
    "/api/users/{user_id}/dashboard",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

/// Which operations routes need a token (`auth.protect_metrics`, `auth.protect_openapi`).
#[derive(Debug, Clone, Copy)]
struct Protected {
    metrics: bool,
    openapi: bool,
}

fn routes_config(config: &mut web::ServiceConfig, protected: Protected) {
    use actix_web::middleware::{Condition, DefaultHeaders, from_fn};
    use auth::Access;
    // People's orders and reviews are never stored by a cache on the way.
    let no_store =
        || DefaultHeaders::new().add((actix_web::http::header::CACHE_CONTROL, "no-store"));
    config
        .service(
            web::resource("/api/users/batch")
                .app_data(middleware::RouteLabel("/api/users/batch"))
                .route(web::post().to(routes::batch))
                .default_service(web::to(|| error::method_not_allowed("POST")))
                .wrap(from_fn(|request, next| {
                    auth::guard(request, next, Access::Batch)
                }))
                .wrap(no_store()),
        )
        .service(
            get_resource("/api/users/{user_id}/dashboard", routes::dashboard)
                .wrap(from_fn(|request, next| {
                    auth::guard(request, next, Access::Dashboard)
                }))
                .wrap(no_store()),
        )
        .service(get_resource("/healthz", routes::healthz))
        .service(get_resource("/readyz", routes::readyz))
        .service(
            get_resource("/metrics", routes::metrics).wrap(Condition::new(
                protected.metrics,
                from_fn(|request, next| auth::guard(request, next, Access::Ops)),
            )),
        )
        .service(
            get_resource("/openapi.json", routes::openapi).wrap(Condition::new(
                protected.openapi,
                from_fn(|request, next| auth::guard(request, next, Access::Ops)),
            )),
        );
}

/// CORS for the configured origins; with none, no CORS headers at all (browsers then refuse
/// cross-origin calls, the safe default).
fn cors(origins: &[String]) -> actix_web::middleware::Condition<actix_cors::Cors> {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "HEAD", "POST"])
        .allowed_headers([
            actix_web::http::header::AUTHORIZATION,
            actix_web::http::header::CONTENT_TYPE,
        ])
        .expose_headers(["x-request-id", "retry-after", "server-timing"])
        .max_age(600);
    for origin in origins {
        cors = cors.allowed_origin(origin);
    }
    actix_web::middleware::Condition::new(!origins.is_empty(), cors)
}

/// A resource answering GET and HEAD with `handler` (actix-web sends no body for HEAD).
fn get_resource<F, Args>(path: &'static str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args> + Clone,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .app_data(middleware::RouteLabel(path))
        .route(web::get().to(handler.clone()))
        .route(web::head().to(handler))
        .default_service(web::to(|| error::method_not_allowed("GET, HEAD")))
}

/// Warns when the connection limits could run the process out of file descriptors: each client
/// connection takes two (the socket and the duplicate that notices disconnects), on top of the
/// pool and the recommendation client's connections.
fn check_file_limit(settings: &Settings) {
    let Some(limit) = open_files_limit() else {
        return;
    };
    let workers = match settings.server.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let needed = workers * settings.server.max_connections_per_worker * 2
        + settings.database.max_size
        + settings.recommendations.max_in_flight
        + 64;
    if needed as u64 > limit {
        tracing::warn!(
            limit,
            needed,
            "the open-files limit is below what server.max_connections_per_worker allows; \
             raise it (ulimit -n) or lower the connection limit"
        );
    }
}

/// The soft limit on open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Gives the calling worker thread the next worker index, once: actix-web calls the app factory
/// on each worker thread as it starts, and again on the same thread if it restarts a service.
fn bind_worker(next: &std::sync::atomic::AtomicUsize, service: &service::Service) {
    thread_local! {
        static BOUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !BOUND.with(|bound| bound.replace(true)) {
        service.adopt_worker_thread(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    }
}

/// A listening socket with `backlog` pending connections at most. (`TcpListener::bind` listens
/// with 128, and actix's own backlog setting only applies to the sockets it binds itself: a burst
/// of connections beyond 128 was refused or timed out behind nginx.)
fn listen(address: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // As std does on Unix: a restarted server can bind while old connections linger.
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// Waits for SIGTERM or SIGINT and says which. The handlers are installed at the first poll, so
/// a process that awaits this beside its start-up (the wait for the database) stops on SIGTERM
/// then too: as the first process of a container it has no default handling of it.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_listening_socket_has_the_configured_backlog() {
        let listener = super::listen("127.0.0.1:0".parse().unwrap(), 777).unwrap();
        let port = listener.local_addr().unwrap().port();
        // `ss` shows a listening socket's backlog as its Send-Q.
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let send_q: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(send_q.get(2), Some(&"777"), "{text}");
    }
}
