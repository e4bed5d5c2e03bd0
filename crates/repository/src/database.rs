//! The connection pools and the reads the dashboard needs.
//!
//! [`Database`] owns a deadpool-postgres pool for the primary and one for each read replica
//! ([`crate::health`] says which database a read may use). Every method here reads, so every
//! lease goes to a usable replica when there is one and to the primary otherwise; a statement
//! whose replica fails under it runs again on the primary (see [`Conn`]).
//!
//! A caller that wants several reads on one connection takes a [`Conn`]: its methods borrow it
//! shared, so polling them concurrently pipelines the statements on the one socket
//! (tokio-postgres sends each as soon as it is polled). How a statement is sent depends on
//! [`Statements`]: a named statement prepared once per connection and cached, or an unnamed one
//! inside a read-only transaction per lease (for transaction poolers).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Status, Timeouts,
    Transaction,
};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tracing::instrument;

use crate::health::{DatabaseState, Node, Role};
use crate::models::{Order, OrderSummary, Page, Profile, Review, UserSummary};
use crate::tls::Tls;
use crate::{DbConfig, Error, Statements};

/// One statement: its text and its parameters' types (which an unnamed statement sends along).
#[derive(Debug)]
struct Sql {
    text: &'static str,
    types: &'static [Type],
}

const PROFILE: Sql = Sql {
    text: "SELECT id, username, email, avatar FROM users WHERE id = $1",
    types: &[Type::INT8],
};
const ORDERS: Sql = Sql {
    text: "SELECT id, product, amount, created_at FROM orders \
           WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
    types: &[Type::INT8, Type::INT8],
};
const REVIEWS: Sql = Sql {
    text: "SELECT id, product_id, rating, content FROM reviews \
           WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
    types: &[Type::INT8, Type::INT8],
};
// The batched reads: one statement for many users, each user's rows in the same order and with
// the same limit as the single reads above (`LATERAL` keeps the per-user `ORDER BY ... LIMIT`).
const PROFILES: Sql = Sql {
    text: "SELECT id, username, email, avatar FROM users WHERE id = ANY($1)",
    types: &[Type::INT8_ARRAY],
};
const ORDERS_OF: Sql = Sql {
    text: "SELECT u.id, o.id, o.product, o.amount, o.created_at \
           FROM unnest($1::bigint[]) AS u(id) \
           CROSS JOIN LATERAL (SELECT id, product, amount, created_at FROM orders \
                               WHERE user_id = u.id ORDER BY created_at DESC, id DESC LIMIT $2) o",
    types: &[Type::INT8_ARRAY, Type::INT8],
};
const REVIEWS_OF: Sql = Sql {
    text: "SELECT u.id, r.id, r.product_id, r.rating, r.content \
           FROM unnest($1::bigint[]) AS u(id) \
           CROSS JOIN LATERAL (SELECT id, product_id, rating, content FROM reviews \
                               WHERE user_id = u.id ORDER BY id DESC LIMIT $2) r",
    types: &[Type::INT8_ARRAY, Type::INT8],
};
const USER_SUMMARIES: Sql = Sql {
    text: "SELECT u.id, u.username, u.email, u.avatar, s.order_count, s.total_amount \
           FROM users u \
           CROSS JOIN LATERAL (SELECT count(*) AS order_count, \
                                      coalesce(sum(o.amount), 0.00) AS total_amount \
                               FROM orders o WHERE o.user_id = u.id) s \
           WHERE u.id = ANY($1)",
    types: &[Type::INT8_ARRAY],
};

/// The pools of the primary and the replicas, and the typed reads over them. Cheap to clone:
/// clones share the pools.
///
/// Each pool may be split into lanes, one per worker thread
/// ([`Database::connect_lazy_in_lanes`] and [`crate::lane`]); everything else sees one pool of
/// `max_size` connections per database.
#[derive(Clone)]
pub struct Database {
    primary: Arc<Node>,
    replicas: Arc<[Arc<Node>]>,
    /// Which replica the next lease tries first (round robin).
    turn: Arc<AtomicUsize>,
    limits: Limits,
}

/// What each [`Conn`] needs of [`DbConfig`], copied out once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    orders: i64,
    reviews: i64,
    pub(crate) wait: Duration,
    statements: Statements,
    statement_timeout: Duration,
    pub(crate) max_lag: Duration,
    pub(crate) check_interval: Duration,
    /// How long a replica statement may go unanswered before it runs on the primary, and a
    /// replica check may take.
    pub(crate) replica_timeout: Duration,
    /// How long the primary's check may take.
    pub(crate) primary_check_timeout: Duration,
    /// How long a check may take to open its session (`create_timeout`).
    pub(crate) connect_timeout: Duration,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("lanes", &self.primary.target.lanes.len())
            .field("replicas", &self.replicas.len())
            .field("status", &self.status())
            .field("limits", &self.limits)
            .finish()
    }
}

/// A snapshot of the pools, for `/metrics` and readiness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    /// The most connections the pool opens to one database.
    pub max_size: usize,
    /// Connections open now (idle or in use), to every database together.
    pub size: usize,
    /// Idle connections ready to be handed out.
    pub idle: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

impl From<Status> for PoolStatus {
    fn from(status: Status) -> Self {
        Self {
            max_size: status.max_size,
            size: status.size,
            idle: status.available,
            waiting: status.waiting,
        }
    }
}

/// Where the reads went: see [`Database::lease_counts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCount {
    /// `primary` or `replica-N`.
    pub database: String,
    /// Leases handed out from it.
    pub leases: u64,
    /// Statements that failed on it (a replica gone, or silent past `replica_timeout`) and went
    /// to the primary.
    pub fallbacks: u64,
}

/// One database server: its pool, split into lanes.
pub(crate) struct Target {
    lanes: Vec<Pool>,
    homes: Vec<Arc<OnceLock<crate::lane::Home>>>,
    /// How its connections are made (and cancel requests sent).
    pub(crate) tls: Tls,
    /// Leases handed out from this database, and (a replica's) statements that had to run
    /// again on the primary: what `/metrics` shows of where the reads go.
    leases: AtomicU64,
    fallbacks: AtomicU64,
}

impl Target {
    fn build(pg: &tokio_postgres::Config, config: &DbConfig, count: usize) -> Result<Self, Error> {
        let tls = Tls::for_config(pg, config.tls_ca_file.as_deref())?;
        let mut homes = Vec::with_capacity(count);
        let lanes = (0..count)
            .map(|lane| {
                let connect = crate::lane::HomeConnect {
                    home: Arc::default(),
                    tls: tls.clone(),
                };
                homes.push(Arc::clone(&connect.home));
                let manager = Manager::from_connect(
                    pg.clone(),
                    connect,
                    ManagerConfig {
                        // A connection whose socket the driver saw close is replaced; anything
                        // subtler shows up as an error on the next query, which the caller
                        // already handles.
                        recycling_method: RecyclingMethod::Fast,
                    },
                );
                Pool::builder(manager)
                    .max_size(lanes::share(config.max_size, count, lane))
                    .wait_timeout(Some(config.wait_timeout))
                    .create_timeout(Some(config.create_timeout))
                    .recycle_timeout(Some(config.recycle_timeout))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| Error::Config(format!("cannot build the database pool: {e}")))
            })
            .collect::<Result<Vec<Pool>, Error>>()?;
        Ok(Self {
            lanes,
            homes,
            tls,
            leases: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        })
    }

    /// A connection from lane `lane`, or (with [`Pick::Any`]) from the calling thread's lane if
    /// one is free there (or may be opened), else an idle one from another lane, else the first
    /// to free up in its own lane. Returns the lane it came from.
    async fn take(&self, pick: Pick) -> Result<(Object, usize), PoolError> {
        let count = self.lanes.len();
        let own = match pick {
            Pick::Lane(lane) => lane % count.max(1),
            Pick::Any => lanes::current(count),
        };
        let Some(pool) = self.lanes.get(own) else {
            return Err(PoolError::Closed);
        };
        if count == 1 || matches!(pick, Pick::Lane(_)) {
            return pool.get().await.map(|object| (object, own));
        }
        let at_once = Timeouts {
            wait: Some(Duration::ZERO),
            ..pool.timeouts()
        };
        match pool.timeout_get(&at_once).await {
            Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => {}
            taken => return taken.map(|object| (object, own)),
        }
        for (lane, other) in self.lanes.iter().enumerate() {
            // Only an idle connection: opening one here would put its driver on this thread.
            if lane != own
                && other.status().available > 0
                && let Ok(object) = other.timeout_get(&at_once).await
            {
                return Ok((object, lane));
            }
        }
        pool.get().await.map(|object| (object, own))
    }

    fn claim_home(&self, worker: usize) {
        let Some(home) = self.homes.get(worker % self.homes.len().max(1)) else {
            return;
        };
        if home.get().is_none()
            && let Some(this) = crate::lane::Home::of_current_thread()
        {
            let _ = home.set(this);
        }
    }

    fn status(&self) -> PoolStatus {
        self.lanes
            .iter()
            .map(|pool| PoolStatus::from(pool.status()))
            .fold(PoolStatus::default(), |sum, lane| PoolStatus {
                max_size: sum.max_size + lane.max_size,
                size: sum.size + lane.size,
                idle: sum.idle + lane.idle,
                waiting: sum.waiting + lane.waiting,
            })
    }
}

/// Which lane a lease comes from.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// The caller's own lane first, else an idle connection of any lane.
    Any,
    /// This lane (modulo the number of lanes).
    Lane(usize),
}

impl Database {
    /// Builds the pools. No connection is opened until the first query; call
    /// [`Database::ping`] to check that a database answers.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the settings are unusable.
    pub fn connect_lazy(config: &DbConfig) -> Result<Self, Error> {
        Self::connect_lazy_in_lanes(config, 1)
    }

    /// Builds the pools, each split into `lanes` pools of `max_size / lanes` connections (at
    /// most `max_size` lanes), one per worker thread; see [`crate::lane`]. One lane is one pool.
    /// Every database (the primary and each replica) gets `max_size` connections.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the settings are unusable.
    pub fn connect_lazy_in_lanes(config: &DbConfig, lanes: usize) -> Result<Self, Error> {
        let count = lanes.clamp(1, config.max_size.max(1));
        let pg = config.pg_config()?;
        let primary = Target::build(&pg, config, count)?;
        let primary = Arc::new(Node::new(
            "primary".to_owned(),
            Role::Primary,
            primary,
            pg,
            None,
        ));
        let replicas = config
            .replica_pg_configs()?
            .iter()
            .enumerate()
            .map(|(i, pg)| {
                let target = Target::build(pg, config, count)?;
                let name = format!("replica-{}", i + 1);
                let primary = Some(Arc::clone(&primary));
                Ok(Arc::new(Node::new(
                    name,
                    Role::Replica,
                    target,
                    pg.clone(),
                    primary,
                )))
            })
            .collect::<Result<Arc<[_]>, Error>>()?;
        Ok(Self {
            primary,
            replicas,
            turn: Arc::new(AtomicUsize::new(0)),
            limits: Limits {
                orders: config.orders_limit,
                reviews: config.reviews_limit,
                wait: config.wait_timeout,
                statements: config.statements,
                statement_timeout: config.statement_timeout,
                max_lag: config.replica_max_lag,
                check_interval: config.health_check_interval,
                replica_timeout: config.replica_timeout,
                primary_check_timeout: config.create_timeout,
                connect_timeout: config.create_timeout,
            },
        })
    }

    /// Makes the calling thread (a server worker) the home of lane `worker % lanes`: it takes
    /// connections from that lane, and from its first request for a connection (made on the
    /// runtime that serves its requests) the lane's connections are opened and driven on that
    /// runtime, whoever asks for them. The first thread to claim a lane keeps it. See
    /// [`crate::lane`].
    ///
    /// The home runtime is taken at the first request rather than here because a server may run
    /// its workers' set-up code on another runtime (actix-server does, inside an existing tokio
    /// runtime).
    pub fn adopt_thread(&self, worker: usize) {
        lanes::bind_thread(worker);
    }

    /// Claims the calling thread's lane (of every database) for the current runtime, if the
    /// thread is bound and the lane has no home yet; see [`Database::adopt_thread`]. Done at
    /// every connection request; a server calls it earlier too (when its worker accepts a
    /// connection), so that no other worker opens connections of this lane on its own runtime
    /// before the first request here.
    pub fn claim_home(&self) {
        let Some(worker) = lanes::bound() else {
            return;
        };
        for replica in std::iter::once(&self.primary).chain(self.replicas.iter()) {
            replica.target.claim_home(worker);
        }
    }

    /// Takes a connection for reading, waiting at most the configured `wait_timeout`: from a
    /// usable replica if there is one (see [`crate::health`]), else from the primary.
    ///
    /// # Errors
    ///
    /// [`Error::PoolTimeout`] when none became free in time, [`Error::Unavailable`] when a new
    /// connection could not be opened, [`Error::Closed`] after [`Database::close`].
    pub async fn conn(&self) -> Result<Conn, Error> {
        self.lease(Pick::Any).await
    }

    /// Takes a connection out of lane `lane` (modulo the number of lanes), waiting at most the
    /// configured `wait_timeout`. For a caller that keeps its own per-lane accounting of
    /// connections, such as a concurrency limit split the same way ([`lanes::share`]).
    ///
    /// # Errors
    ///
    /// As [`Database::conn`].
    pub async fn conn_in_lane(&self, lane: usize) -> Result<Conn, Error> {
        self.lease(Pick::Lane(lane)).await
    }

    async fn lease(&self, pick: Pick) -> Result<Conn, Error> {
        self.claim_home();
        if let Some(replica) = self.usable_replica() {
            match replica
                .target
                .take(pick)
                .await
                .map_err(|e| self.pool_error(e))
            {
                Ok((object, lane)) => return Ok(self.wrap(object, lane, Some(replica))),
                // The replica is out of reach: the primary serves, and a check brings it back.
                Err(Error::Unavailable(reason)) => replica.failed(&reason),
                Err(other) => return Err(other),
            }
        }
        self.primary.check_if_due(self.limits);
        if self.primary.is_down() {
            // Known down and no replica to read from: fail now rather than wait on it.
            let why = self.primary.error().unwrap_or_default();
            return Err(Error::Unavailable(format!(
                "no database answers (primary: {why})"
            )));
        }
        let taken = self.primary.target.take(pick).await;
        let (object, lane) = taken.map_err(|e| {
            let error = self.pool_error(e);
            if let Error::Unavailable(reason) = &error {
                self.primary.failed(reason);
            }
            error
        })?;
        Ok(self.wrap(object, lane, None))
    }

    /// The next usable replica in turn, starting the checks that are due.
    fn usable_replica(&self) -> Option<Arc<Node>> {
        if self.replicas.is_empty() {
            return None;
        }
        for replica in self.replicas.iter() {
            replica.check_if_due(self.limits);
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let count = self.replicas.len();
        (0..count)
            .map(|k| &self.replicas[(start + k) % count])
            .find(|replica| replica.usable())
            .cloned()
    }

    fn pool_error(&self, error: PoolError) -> Error {
        Error::from_pool(error, self.limits.wait)
    }

    fn wrap(&self, object: Object, lane: usize, replica: Option<Arc<Node>>) -> Conn {
        let target = &replica.as_ref().unwrap_or(&self.primary).target;
        target.leases.fetch_add(1, Ordering::Relaxed);
        Conn {
            main: Link::new(object, target.tls.clone()),
            fallback: tokio::sync::OnceCell::new(),
            primary: Arc::clone(&self.primary),
            lane,
            replica,
            limits: self.limits,
            abandoned: AtomicBool::new(false),
            held: None,
        }
    }

    /// Closes the idle connections of every lane of every database. An application calls this
    /// after start-up checks made on a thread that will not serve requests, so that the
    /// connections they opened (whose driver tasks run there) are not used by the workers.
    pub fn close_idle(&self) {
        for target in self.targets() {
            for pool in &target.lanes {
                pool.retain(|_, _| false);
            }
        }
    }

    fn targets(&self) -> impl Iterator<Item = &Target> {
        std::iter::once(&self.primary)
            .chain(self.replicas.iter())
            .map(|node| &node.target)
    }

    /// Checks that a database answers a trivial query, the way a read would reach it (a usable
    /// replica, else the primary).
    ///
    /// # Errors
    ///
    /// As [`Database::conn`], or any error of the query.
    pub async fn ping(&self) -> Result<(), Error> {
        let conn = self.conn().await?;
        conn.main
            .track(conn.client().simple_query("SELECT 1").await)?;
        Ok(())
    }

    /// Checks every replica now (each bounded by the check timeout), so that reads use them from
    /// the start rather than after the first background check.
    pub async fn check_replicas(&self) {
        let checks = self
            .replicas
            .iter()
            .map(|replica| Arc::clone(replica).check(self.limits));
        futures::future::join_all(checks).await;
    }

    /// What each database looks like now, for a readiness report: each asked now, on the
    /// checks' own session, within `within` (see the `health` module).
    pub async fn states(&self, within: Duration) -> Vec<DatabaseState> {
        let reports = std::iter::once(&self.primary)
            .chain(self.replicas.iter())
            .map(|node| node.report(self.limits, within));
        futures::future::join_all(reports).await
    }

    /// The pools' current size, idle connections and waiters (all lanes and databases
    /// together); `max_size` is the most one database gets.
    pub fn status(&self) -> PoolStatus {
        let max_size = self.primary.target.status().max_size;
        let sum = self
            .targets()
            .map(Target::status)
            .fold(PoolStatus::default(), |sum, one| PoolStatus {
                max_size,
                size: sum.size + one.size,
                idle: sum.idle + one.idle,
                waiting: sum.waiting + one.waiting,
            });
        PoolStatus { max_size, ..sum }
    }

    /// The number of lanes (pools per database, one per worker thread).
    pub fn lanes(&self) -> usize {
        self.primary.target.lanes.len()
    }

    /// For each database (`primary`, `replica-N`): the leases it handed out, and the statements
    /// that failed on it and ran again on the primary, since start.
    pub fn lease_counts(&self) -> Vec<LeaseCount> {
        std::iter::once(&self.primary)
            .chain(self.replicas.iter())
            .map(|node| LeaseCount {
                database: node.name().to_owned(),
                leases: node.target.leases.load(Ordering::Relaxed),
                fallbacks: node.target.fallbacks.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Closes the pools: waiters and later callers get [`Error::Closed`], and idle connections
    /// are closed now. Connections in use close when they are returned.
    pub fn close(&self) {
        for target in self.targets() {
            for pool in &target.lanes {
                pool.close();
            }
        }
    }

    /// Whether [`Database::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.targets()
            .all(|target| target.lanes.iter().all(Pool::is_closed))
    }
}

/// One server session a [`Conn`] uses: the pooled connection, whether it is in the lease's
/// transaction ([`Statements::Unnamed`]) and whether it failed.
struct Link {
    /// Always `Some` until released.
    object: Option<Object>,
    begun: AtomicBool,
    broken: AtomicBool,
    /// How many times the lease's transaction was rolled back and begun again after a statement
    /// failed in it ([`Statements::Unnamed`]); see [`Link::restart`].
    restarts: AtomicU64,
    /// Held while one statement restarts the transaction, so its siblings do not restart it too.
    restarting: tokio::sync::Mutex<()>,
    /// How a cancel request reaches the server.
    tls: Tls,
}

impl Link {
    fn new(object: Object, tls: Tls) -> Self {
        Self {
            tls,
            object: Some(object),
            begun: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
            restarting: tokio::sync::Mutex::new(()),
        }
    }

    /// Ends the lease's aborted transaction and begins a new one with `begin`, unless a sibling
    /// statement already did so since `seen` was read (before the caller's statement was sent).
    ///
    /// A statement that fails (a statement timeout, say) aborts the transaction, and everything
    /// pipelined behind it is refused with 25P02 until it ends. Each refused statement comes
    /// here; the first one restarts the transaction and the others find it restarted. The
    /// ROLLBACK and BEGIN go in one message, so a transaction pooler keeps the server
    /// connection (it sees the session idle only at the message's end, and then it is in the
    /// new transaction).
    async fn restart(&self, seen: u64, begin: &str) -> Result<(), tokio_postgres::Error> {
        let _turn = self.restarting.lock().await;
        if self.restarts.load(Ordering::Acquire) == seen {
            self.client()
                .batch_execute(&format!("ROLLBACK; {begin}"))
                .await?;
            self.restarts.fetch_add(1, Ordering::Release);
        }
        Ok(())
    }

    fn client(&self) -> &Object {
        // Only `Conn`'s drop takes the object out.
        self.object
            .as_ref()
            .unwrap_or_else(|| unreachable!("Conn used after drop"))
    }

    /// Converts a driver result, marking the link broken when the connection failed.
    fn track<T>(&self, result: Result<T, tokio_postgres::Error>) -> Result<T, Error> {
        result.map_err(|e| {
            let error = Error::from(e);
            if matches!(error, Error::Unavailable(_)) {
                self.broken.store(true, Ordering::Relaxed);
            }
            error
        })
    }

    /// Whether the connection must be waited on before it goes back to the pool: statements of
    /// it were abandoned, or its transaction must be committed.
    fn must_settle(&self, abandoned: bool) -> bool {
        !self.broken.load(Ordering::Relaxed) && (abandoned || self.begun.load(Ordering::Relaxed))
    }

    /// Gives the connection back now: to the pool, or (broken) detached from it, which closes it.
    fn release(mut self) {
        if let Some(object) = self.object.take()
            && self.broken.load(Ordering::Relaxed)
        {
            drop(Object::take(object));
        }
    }

    /// Waits for the connection's abandoned statements to finish, and ends its transaction, then
    /// lets it go back to the pool; cancels them and closes the connection if that takes longer
    /// than [`SETTLE_TIMEOUT`].
    async fn settle(mut self, cancel: bool) {
        let Some(object) = self.object.take() else {
            return;
        };
        if self.broken.load(Ordering::Relaxed) {
            drop(Object::take(object));
            return;
        }
        // An empty query (or the COMMIT) is answered only after everything queued before it.
        let last = if self.begun.load(Ordering::Relaxed) {
            "COMMIT"
        } else {
            ""
        };
        match tokio::time::timeout(SETTLE_TIMEOUT, object.simple_query(last)).await {
            // Idle again: dropping the object returns it to the pool.
            Ok(Ok(_)) => drop(object),
            _ => {
                let token = object.cancel_token();
                let client = Object::take(object);
                if cancel {
                    // Bounded: a server that does not answer must not keep this task alive.
                    let sent = tokio::time::timeout(CANCEL_TIMEOUT, self.tls.cancel(&token)).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        tracing::debug!(
                            "could not send a cancel request for an abandoned statement"
                        );
                    }
                }
                drop(client);
            }
        }
    }
}

/// One pooled connection, returned to the pool when dropped.
///
/// Methods take `&self`, so several reads polled at once share the connection: tokio-postgres
/// pipelines them, sending each statement without waiting for the previous answer.
///
/// With [`Statements::Unnamed`], the first statement goes out pipelined behind `BEGIN READ ONLY;
/// SET LOCAL statement_timeout = …`, and the lease's release sends `COMMIT` before the connection
/// goes back to the pool: a transaction pooler keeps one server connection for the whole lease,
/// and the timeout holds without a start-up option. A statement that fails aborts that
/// transaction; the siblings refused for it (25P02) are sent again in a new one, so each read
/// fails or succeeds on its own, as with [`Statements::Prepared`].
///
/// A connection to a replica whose statement fails because the replica went away (stopped,
/// restarted, or its pooler cannot reach it) marks the replica down, and that statement and the
/// lease's later ones run on a connection to the primary, taken once (reads can be repeated).
///
/// A connection on which a statement failed because the connection itself failed is not returned
/// to the pool but closed: the driver may not have noticed the dead socket yet, and the pool's
/// cheap recycling check would hand it to the next caller.
///
/// A statement whose future is dropped before it finished (its task group was cancelled, or the
/// client of the HTTP request went away) keeps running on the server. Nothing is done about it
/// while the connection is still in use: a pipelined sibling (the profile, say) may be running on
/// the same connection, and a cancel request would cancel whatever runs at that moment. When the
/// connection is dropped, it is kept out of the pool until it is idle again, for at most
/// [`SETTLE_TIMEOUT`]: an empty query, answered only after everything queued before it, tells when
/// the abandoned statements are done. A connection that settles in time goes back to the pool
/// (the common case: a user not found cancels two quick reads). One that does not gets a cancel
/// request for its running statement (with [`Statements::Prepared`]; through a pooler the session
/// closing ends it) and is closed; since it is never handed out again, the cancel cannot hit
/// somebody else's statement.
pub struct Conn {
    main: Link,
    /// The primary's connection, once a statement on the replica failed.
    fallback: tokio::sync::OnceCell<Link>,
    /// The replica `main` is connected to, if it is one.
    replica: Option<Arc<Node>>,
    /// The primary (where a fallback comes from, in the lane of `main`, and which is told when a
    /// read on it fails).
    primary: Arc<Node>,
    lane: usize,
    limits: Limits,
    abandoned: AtomicBool,
    /// Released only when the connection is released (after settling, if it must settle).
    held: Option<Box<dyn Send + Sync>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let placeholder = Link {
            object: None,
            begun: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
            restarting: tokio::sync::Mutex::new(()),
            tls: Tls::Off,
        };
        let links = [
            Some(std::mem::replace(&mut self.main, placeholder)),
            self.fallback.take(),
        ];
        let held = self.held.take();
        let abandoned = self.abandoned.load(Ordering::Relaxed);
        // Through a transaction pooler (unnamed statements) an abandoned statement is not
        // cancelled but its session closed, which ends it there, and SET LOCAL statement_timeout
        // bounds it on the server: PgBouncer 1.18.0 crashes on a cancel request from a client
        // that closes its cancel socket at once, as tokio-postgres does (pgbouncer#801, fixed in
        // 1.19.1; seen here under `cargo xtask cluster chaos`).
        let cancel = self.limits.statements == Statements::Prepared;
        let settle = links
            .iter()
            .flatten()
            .any(|link| link.must_settle(abandoned));
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if settle => {
                runtime.spawn(async move {
                    for link in links.into_iter().flatten() {
                        if link.must_settle(abandoned) {
                            link.settle(cancel).await;
                        } else {
                            link.release();
                        }
                    }
                    drop(held);
                });
            }
            _ => {
                for link in links.into_iter().flatten() {
                    if settle {
                        // No runtime to wait on: the connection cannot be trusted back.
                        link.broken.store(true, Ordering::Relaxed);
                    }
                    link.release();
                }
            }
        }
    }
}

/// How long a connection with abandoned statements (or a transaction to commit) may take to
/// become idle on its own before they are cancelled and the connection is closed.
pub const SETTLE_TIMEOUT: Duration = Duration::from_millis(100);

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("on_replica", &self.replica.is_some())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// The profile of one user, or `None` when there is no such user.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    pub async fn profile(&self, user_id: i64) -> Result<Option<Profile>, Error> {
        let rows = self.statement(&PROFILE, &[&user_id]).await?;
        rows.first().map(|row| profile_from(row, 0)).transpose()
    }

    /// A user's orders, newest first, at most `orders_limit` of them, and whether there are
    /// more.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    pub async fn orders(&self, user_id: i64) -> Result<Page<Order>, Error> {
        let limit = self.limits.orders;
        let rows = self.statement(&ORDERS, &[&user_id, &(limit + 1)]).await?;
        Page::of(rows, limit, |row| order_from(row, 0))
    }

    /// A user's reviews, newest first, at most `reviews_limit` of them, and whether there are
    /// more.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    pub async fn reviews(&self, user_id: i64) -> Result<Page<Review>, Error> {
        let limit = self.limits.reviews;
        let rows = self.statement(&REVIEWS, &[&user_id, &(limit + 1)]).await?;
        Page::of(rows, limit, |row| review_from(row, 0))
    }

    /// Profile and order summary of every listed user that exists, in one statement
    /// (`id = ANY($1)`). Users that do not exist are absent from the result; the order of the
    /// result is unspecified.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    #[instrument(level = "debug", skip(self, user_ids), fields(ids = user_ids.len()))]
    pub async fn user_summaries(&self, user_ids: &[i64]) -> Result<Vec<UserSummary>, Error> {
        let rows = self.statement(&USER_SUMMARIES, &[&user_ids]).await?;
        rows.iter()
            .map(|row| {
                Ok(UserSummary {
                    profile: profile_from(row, 0)?,
                    orders: OrderSummary {
                        order_count: get(row, 4)?,
                        total_amount: get(row, 5)?,
                    },
                })
            })
            .collect()
    }

    /// The profiles of every listed user that exists, in one statement, keyed by id.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    pub async fn profiles(&self, user_ids: &[i64]) -> Result<Vec<Profile>, Error> {
        let rows = self.statement(&PROFILES, &[&user_ids]).await?;
        rows.iter().map(|row| profile_from(row, 0)).collect()
    }

    /// The orders of every listed user (distinct ids), in one statement: for each user, exactly
    /// the page [`Conn::orders`] would read, paired with the user's id.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    pub async fn orders_of(&self, user_ids: &[i64]) -> Result<Vec<(i64, Page<Order>)>, Error> {
        let limit = self.limits.orders;
        let rows = self
            .statement(&ORDERS_OF, &[&user_ids, &(limit + 1)])
            .await?;
        // Column 0 is the user's id.
        pages(user_ids, &rows, limit, |row| order_from(row, 1))
    }

    /// The reviews of every listed user (distinct ids), in one statement: for each user, exactly
    /// the page [`Conn::reviews`] would read, paired with the user's id.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    pub async fn reviews_of(&self, user_ids: &[i64]) -> Result<Vec<(i64, Page<Review>)>, Error> {
        let limit = self.limits.reviews;
        let rows = self
            .statement(&REVIEWS_OF, &[&user_ids, &(limit + 1)])
            .await?;
        pages(user_ids, &rows, limit, |row| review_from(row, 1))
    }

    /// Starts a transaction on this connection (for tests and tools that write; with
    /// [`Statements::Prepared`]).
    ///
    /// # Errors
    ///
    /// Any [`Error`] from `BEGIN`.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        let result = self.main.object.as_mut().map(|c| c.transaction());
        match result {
            Some(begin) => Ok(begin.await?),
            None => Err(Error::Closed),
        }
    }

    /// The underlying driver client, for statements this crate does not wrap.
    pub fn client(&self) -> &tokio_postgres::Client {
        self.main.client()
    }

    /// A token that asks the server to cancel whatever this connection is running.
    pub fn cancel_token(&self) -> tokio_postgres::CancelToken {
        self.main.client().cancel_token()
    }

    /// Whether this lease reads from a replica (and has not fallen back to the primary).
    pub fn on_replica(&self) -> bool {
        self.replica.is_some() && self.fallback.get().is_none()
    }

    /// Runs one statement, watching it for abandonment and connection failure; on a replica
    /// that fails under it, runs it again on the primary.
    async fn statement(
        &self,
        sql: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let flight = self.in_flight();
        let result = async {
            if let Some(link) = self.fallback.get() {
                return self.run(link, sql, params).await;
            }
            let Some(replica) = &self.replica else {
                return self.run(&self.main, sql, params).await;
            };
            let bound = self.limits.replica_timeout;
            match tokio::time::timeout(bound, self.run(&self.main, sql, params)).await {
                Ok(Err(Error::Unavailable(reason))) => replica.failed(&reason),
                // Not answered (a replica gone behind a pooler makes statements wait): the
                // session is not used again, its statement abandoned, and the read goes to the
                // primary. A slow replica is not a gone one: it stays in the reads, its check
                // (bounded the same way) decides, unless reads keep going unanswered (see the
                // `health` module).
                Err(_) => {
                    // Counted once per lease: the statements pipelined behind a slow one time
                    // out with it.
                    if !self.main.broken.swap(true, Ordering::Relaxed) {
                        replica.read_timed_out(bound);
                    }
                }
                Ok(result) => {
                    replica.read_answered();
                    return result;
                }
            }
            replica.target.fallbacks.fetch_add(1, Ordering::Relaxed);
            let link = self
                .fallback
                .get_or_try_init(|| self.primary_link())
                .await?;
            self.run(link, sql, params).await
        }
        .await;
        flight.finish(result)
    }

    /// Sends one statement on `link` the configured way (see [`Statements`]).
    async fn run(
        &self,
        link: &Link,
        sql: &Sql,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let client = link.client();
        let result = match self.limits.statements {
            Statements::Prepared => match client.prepare_cached(sql.text).await {
                Ok(statement) => client.query(&statement, params).await,
                Err(error) => Err(error),
            },
            Statements::Unnamed => {
                let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
                    .iter()
                    .zip(sql.types)
                    .map(|(param, ty)| (*param, ty.clone()))
                    .collect();
                let mut refused = 0;
                loop {
                    let seen = link.restarts.load(Ordering::Acquire);
                    let result = if link.begun.swap(true, Ordering::Relaxed) {
                        client.query_typed(sql.text, &typed).await
                    } else {
                        // Polled in this order, so BEGIN goes out first; a sibling statement
                        // polled later queues behind both.
                        let begin = self.begin();
                        let (begun, rows) = tokio::join!(
                            client.batch_execute(&begin),
                            client.query_typed(sql.text, &typed)
                        );
                        begun.and(rows)
                    };
                    // Refused because a sibling's failure aborted the transaction: in a new one,
                    // again. Bounded: a statement refused again after a restart it did not do
                    // itself (a second sibling failed) may restart once more, no further.
                    match result {
                        Err(e)
                            if refused < ABORTED_RETRIES
                                && e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) =>
                        {
                            refused += 1;
                            if let Err(e) = link.restart(seen, &self.begin()).await {
                                break Err(e);
                            }
                        }
                        other => break other,
                    }
                }
            }
        };
        let result = link.track(result);
        if self.replica.is_none() || !std::ptr::eq(link, &self.main) {
            match &result {
                Err(Error::Unavailable(reason)) => self.primary.failed(reason),
                Ok(_) => self.primary.answered(),
                Err(_) => {}
            }
        }
        result
    }

    /// What starts a lease's transaction with [`Statements::Unnamed`].
    fn begin(&self) -> String {
        format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
            self.limits.statement_timeout.as_millis()
        )
    }

    /// A connection to the primary, in the lane of this lease.
    async fn primary_link(&self) -> Result<Link, Error> {
        let taken = self.primary.target.take(Pick::Lane(self.lane)).await;
        let (object, _) = taken.map_err(|e| {
            let error = Error::from_pool(e, self.limits.wait);
            if let Error::Unavailable(reason) = &error {
                self.primary.failed(reason);
            }
            error
        })?;
        Ok(Link::new(object, self.primary.target.tls.clone()))
    }

    /// Marks the connection as not to be reused.
    pub fn discard(&self) {
        self.main.broken.store(true, Ordering::Relaxed);
    }

    /// Whether a statement on this connection was abandoned mid-flight.
    pub fn was_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Starts watching one statement; see [`InFlight`].
    fn in_flight(&self) -> InFlight<'_> {
        InFlight {
            conn: self,
            finished: false,
        }
    }

    /// Called when a statement's future was dropped before it finished; see [`Conn`].
    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    /// Keeps `guard` alive until this connection is released, including the time it may spend
    /// settling after an abandoned statement (so a concurrency slot is not handed on before the
    /// connection it stands for is free).
    pub fn hold(&mut self, guard: impl Send + Sync + 'static) {
        self.held = Some(Box::new(guard));
    }
}

/// How many times a statement refused because a sibling's failure aborted the lease's
/// transaction ([`Statements::Unnamed`]) is sent again, each time in a new transaction.
const ABORTED_RETRIES: usize = 2;

/// How long sending a cancel request for an abandoned statement may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Guards one statement: dropped before [`InFlight::finish`], it abandons the statement.
struct InFlight<'a> {
    conn: &'a Conn,
    finished: bool,
}

impl InFlight<'_> {
    fn finish<T>(mut self, value: T) -> T {
        self.finished = true;
        value
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.abandon();
        }
    }
}

/// Splits rows of `(user id, row...)` into one page per user of `user_ids` (users without rows
/// get an empty page), each at most `limit` rows, in the statement's order.
fn pages<T>(
    user_ids: &[i64],
    rows: &[Row],
    limit: i64,
    each: impl Fn(&Row) -> Result<T, Error>,
) -> Result<Vec<(i64, Page<T>)>, Error> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut pages: Vec<(i64, Page<T>)> = user_ids.iter().map(|&id| (id, Page::default())).collect();
    let at: std::collections::HashMap<i64, usize> = user_ids
        .iter()
        .enumerate()
        .map(|(index, &id)| (id, index))
        .collect();
    for row in rows {
        let id: i64 = get(row, 0)?;
        let Some(&index) = at.get(&id) else {
            continue;
        };
        let page = &mut pages[index].1;
        if page.items.len() < limit {
            page.items.push(each(row)?);
        } else {
            page.more = true;
        }
    }
    Ok(pages)
}

fn profile_from(row: &Row, first: usize) -> Result<Profile, Error> {
    Ok(Profile {
        id: get(row, first)?,
        username: get(row, first + 1)?,
        email: get(row, first + 2)?,
        avatar: get(row, first + 3)?,
    })
}

fn order_from(row: &Row, first: usize) -> Result<Order, Error> {
    Ok(Order {
        id: get(row, first)?,
        product: get(row, first + 1)?,
        amount: get(row, first + 2)?,
        created_at: get(row, first + 3)?,
    })
}

fn review_from(row: &Row, first: usize) -> Result<Review, Error> {
    Ok(Review {
        id: get(row, first)?,
        product_id: get(row, first + 1)?,
        rating: get(row, first + 2)?,
        content: get(row, first + 3)?,
    })
}

/// Reads a column, turning a type mismatch into an error instead of the driver's panic.
fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, Error> {
    row.try_get(index).map_err(|e| Error::Query {
        code: "XX000".to_owned(),
        message: format!("column {index} has an unexpected type: {e}"),
    })
}
