//! The connection pool and the reads the dashboard needs.
//!
//! [`Database`] owns a deadpool-postgres pool. Each read runs a statement prepared once per
//! connection and kept in that connection's statement cache. A caller that wants several reads
//! on one connection takes a [`Conn`]: its methods borrow it shared, so polling them concurrently
//! pipelines the statements on the one socket (tokio-postgres sends each as soon as it is polled).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Status, Timeouts,
    Transaction,
};
use tokio_postgres::types::FromSql;
use tokio_postgres::{NoTls, Row};
use tracing::instrument;

use crate::models::{Order, OrderSummary, Page, Profile, Review, UserSummary};
use crate::{DbConfig, Error};

const PROFILE: &str = "SELECT id, username, email, avatar FROM users WHERE id = $1";
const ORDERS: &str = "SELECT id, product, amount, created_at FROM orders \
     WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2";
const REVIEWS: &str = "SELECT id, product_id, rating, content FROM reviews \
     WHERE user_id = $1 ORDER BY id DESC LIMIT $2";
/// The batched reads: one statement for many users, each user's rows in the same order and with
/// the same limit as the single reads above (`LATERAL` keeps the per-user `ORDER BY ... LIMIT`).
const PROFILES: &str = "SELECT id, username, email, avatar FROM users WHERE id = ANY($1)";
const ORDERS_OF: &str = "SELECT u.id, o.id, o.product, o.amount, o.created_at \
     FROM unnest($1::bigint[]) AS u(id) \
     CROSS JOIN LATERAL (SELECT id, product, amount, created_at FROM orders \
                         WHERE user_id = u.id ORDER BY created_at DESC, id DESC LIMIT $2) o";
const REVIEWS_OF: &str = "SELECT u.id, r.id, r.product_id, r.rating, r.content \
     FROM unnest($1::bigint[]) AS u(id) \
     CROSS JOIN LATERAL (SELECT id, product_id, rating, content FROM reviews \
                         WHERE user_id = u.id ORDER BY id DESC LIMIT $2) r";
const USER_SUMMARIES: &str = "SELECT u.id, u.username, u.email, u.avatar, s.order_count, s.total_amount \
     FROM users u \
     CROSS JOIN LATERAL (SELECT count(*) AS order_count, coalesce(sum(o.amount), 0.00) AS total_amount \
                         FROM orders o WHERE o.user_id = u.id) s \
     WHERE u.id = ANY($1)";

/// A pool of PostgreSQL connections and the typed reads over it. Cheap to clone: clones share
/// the pool.
///
/// The pool may be split into lanes, one per worker thread ([`Database::connect_lazy_in_lanes`]
/// and [`crate::lane`]); everything else sees one pool of `max_size` connections.
#[derive(Clone)]
pub struct Database {
    lanes: Arc<[Pool]>,
    homes: Arc<[Arc<OnceLock<crate::lane::Home>>]>,
    limits: Limits,
}

/// The per-query row caps and the pool wait, copied out of [`DbConfig`] for each [`Conn`].
#[derive(Debug, Clone, Copy)]
struct Limits {
    orders: i64,
    reviews: i64,
    wait: Duration,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("lanes", &self.lanes.len())
            .field("status", &self.status())
            .field("limits", &self.limits)
            .finish()
    }
}

/// A snapshot of the pool, for `/metrics` and readiness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    /// The most connections the pool will open.
    pub max_size: usize,
    /// Connections open now (idle or in use).
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

impl Database {
    /// Builds the pool. No connection is opened until the first query; call [`Database::ping`]
    /// to check that the server answers.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the settings are unusable.
    pub fn connect_lazy(config: &DbConfig) -> Result<Self, Error> {
        Self::connect_lazy_in_lanes(config, 1)
    }

    /// Builds the pool split into `lanes` pools of `max_size / lanes` connections each (at most
    /// `max_size` lanes), one per worker thread; see [`crate::lane`]. One lane is one pool.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the settings are unusable.
    pub fn connect_lazy_in_lanes(config: &DbConfig, lanes: usize) -> Result<Self, Error> {
        let pg = config.pg_config()?;
        let count = lanes.clamp(1, config.max_size.max(1));
        let mut homes = Vec::with_capacity(count);
        let lanes = (0..count)
            .map(|lane| {
                let connect = crate::lane::HomeConnect::default();
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
            .collect::<Result<Arc<[Pool]>, Error>>()?;
        Ok(Self {
            lanes,
            homes: homes.into(),
            limits: Limits {
                orders: config.orders_limit,
                reviews: config.reviews_limit,
                wait: config.wait_timeout,
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

    /// Claims the calling thread's lane for the current runtime, if the thread is bound and the
    /// lane has no home yet; see [`Database::adopt_thread`]. Done at every connection request;
    /// a server calls it earlier too (when its worker accepts a connection), so that no other
    /// worker opens connections of this lane on its own runtime before the first request here.
    pub fn claim_home(&self) {
        let Some(worker) = lanes::bound() else {
            return;
        };
        let Some(home) = self.homes.get(worker % self.homes.len().max(1)) else {
            return;
        };
        if home.get().is_none()
            && let Some(this) = crate::lane::Home::of_current_thread()
        {
            let _ = home.set(this);
        }
    }

    /// Takes a connection out of the pool, waiting at most the configured `wait_timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::PoolTimeout`] when none became free in time, [`Error::Unavailable`] when a new
    /// connection could not be opened, [`Error::Closed`] after [`Database::close`].
    pub async fn conn(&self) -> Result<Conn, Error> {
        self.claim_home();
        let taken = self.take().await;
        self.wrap(taken)
    }

    /// Takes a connection out of lane `lane` (modulo the number of lanes), waiting at most the
    /// configured `wait_timeout`. For a caller that keeps its own per-lane accounting of
    /// connections, such as a concurrency limit split the same way ([`lanes::share`]).
    ///
    /// # Errors
    ///
    /// As [`Database::conn`].
    pub async fn conn_in_lane(&self, lane: usize) -> Result<Conn, Error> {
        self.claim_home();
        let taken = match self.lanes.get(lane % self.lanes.len().max(1)) {
            Some(pool) => pool.get().await,
            None => Err(PoolError::Closed),
        };
        self.wrap(taken)
    }

    fn wrap(&self, taken: Result<Object, PoolError>) -> Result<Conn, Error> {
        let client = taken.map_err(|e| Error::from_pool(e, self.limits.wait))?;
        Ok(Conn {
            client: Some(client),
            limits: self.limits,
            broken: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            held: None,
        })
    }

    /// A connection from the calling thread's lane if one is free there (or may be opened), else
    /// an idle one from another lane, else the first to free up in its own lane.
    async fn take(&self) -> Result<Object, PoolError> {
        let own = lanes::current(self.lanes.len());
        let Some(pool) = self.lanes.get(own) else {
            return Err(PoolError::Closed);
        };
        if self.lanes.len() == 1 {
            return pool.get().await;
        }
        let at_once = Timeouts {
            wait: Some(Duration::ZERO),
            ..pool.timeouts()
        };
        match pool.timeout_get(&at_once).await {
            Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => {}
            taken => return taken,
        }
        for (lane, other) in self.lanes.iter().enumerate() {
            // Only an idle connection: opening one here would put its driver on this thread.
            if lane != own
                && other.status().available > 0
                && let Ok(object) = other.timeout_get(&at_once).await
            {
                return Ok(object);
            }
        }
        pool.get().await
    }

    /// Closes the idle connections of every lane. An application calls this after start-up
    /// checks made on a thread that will not serve requests, so that the connections they
    /// opened (whose driver tasks run there) are not used by the workers.
    pub fn close_idle(&self) {
        for pool in self.lanes.iter() {
            pool.retain(|_, _| false);
        }
    }

    /// Checks that the server answers a trivial query.
    ///
    /// # Errors
    ///
    /// As [`Database::conn`], or any error of the query.
    pub async fn ping(&self) -> Result<(), Error> {
        let conn = self.conn().await?;
        conn.track(conn.client().simple_query("SELECT 1").await)?;
        Ok(())
    }

    /// The pool's current size, idle connections and waiters (all lanes together).
    pub fn status(&self) -> PoolStatus {
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

    /// The number of lanes (pools, one per worker thread).
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Closes the pool: waiters and later callers get [`Error::Closed`], and idle connections are
    /// closed now. Connections in use close when they are returned.
    pub fn close(&self) {
        for pool in self.lanes.iter() {
            pool.close();
        }
    }

    /// Whether [`Database::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lanes.iter().all(Pool::is_closed)
    }
}

/// One pooled connection, returned to the pool when dropped.
///
/// Methods take `&self`, so several reads polled at once share the connection: tokio-postgres
/// pipelines them, sending each statement without waiting for the previous answer.
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
/// request for its running statement and is closed; since it is never handed out again, the
/// cancel cannot hit somebody else's statement.
pub struct Conn {
    /// Always `Some` until dropped.
    client: Option<Object>,
    limits: Limits,
    broken: AtomicBool,
    abandoned: AtomicBool,
    /// Released only when the connection is released (after settling, if it must settle).
    held: Option<Box<dyn Send + Sync>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(object) = self.client.take() else {
            return;
        };
        let held = self.held.take();
        if self.broken.load(Ordering::Relaxed) {
            // Detached from the pool: the slot frees up and the connection closes.
            drop(Object::take(object));
        } else if self.abandoned.load(Ordering::Relaxed) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(settle(object, held));
                }
                Err(_) => drop(Object::take(object)),
            }
        }
    }
}

/// How long a connection with abandoned statements may take to become idle on its own before
/// they are cancelled and the connection is closed.
pub const SETTLE_TIMEOUT: Duration = Duration::from_millis(100);

/// Waits for a connection's abandoned statements to finish, then lets it go back to the pool;
/// cancels them and closes the connection if they take longer than [`SETTLE_TIMEOUT`].
async fn settle(object: Object, held: Option<Box<dyn Send + Sync>>) {
    match tokio::time::timeout(SETTLE_TIMEOUT, object.simple_query("")).await {
        // Idle again: dropping the object returns it to the pool.
        Ok(Ok(_)) => drop(object),
        _ => {
            let token = object.cancel_token();
            let client = Object::take(object);
            // Bounded: a server that does not answer must not keep this task alive.
            let sent = tokio::time::timeout(CANCEL_TIMEOUT, token.cancel_query(NoTls)).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("could not send a cancel request for an abandoned statement");
            }
            drop(client);
        }
    }
    drop(held);
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Conn {
    /// The profile of one user, or `None` when there is no such user.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    pub async fn profile(&self, user_id: i64) -> Result<Option<Profile>, Error> {
        let rows = self.statement(PROFILE, &[&user_id]).await?;
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
        let rows = self.statement(ORDERS, &[&user_id, &(limit + 1)]).await?;
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
        let rows = self.statement(REVIEWS, &[&user_id, &(limit + 1)]).await?;
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
        let rows = self.statement(USER_SUMMARIES, &[&user_ids]).await?;
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
        let rows = self.statement(PROFILES, &[&user_ids]).await?;
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
            .statement(ORDERS_OF, &[&user_ids, &(limit + 1)])
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
            .statement(REVIEWS_OF, &[&user_ids, &(limit + 1)])
            .await?;
        pages(user_ids, &rows, limit, |row| review_from(row, 1))
    }

    /// Starts a transaction on this connection (for tests and tools that write).
    ///
    /// # Errors
    ///
    /// Any [`Error`] from `BEGIN`.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        let result = self.client.as_mut().map(|c| c.transaction());
        match result {
            Some(begin) => Ok(begin.await?),
            None => Err(Error::Closed),
        }
    }

    /// The underlying driver client, for statements this crate does not wrap.
    pub fn client(&self) -> &tokio_postgres::Client {
        self.object()
    }

    /// A token that asks the server to cancel whatever this connection is running.
    pub fn cancel_token(&self) -> tokio_postgres::CancelToken {
        self.object().cancel_token()
    }

    /// Runs a cached prepared statement, watching it for abandonment and connection failure.
    async fn statement(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let flight = self.in_flight();
        let result = async {
            let statement = self.track(self.object().prepare_cached(sql).await)?;
            self.track(self.object().query(&statement, params).await)
        }
        .await;
        flight.finish(result)
    }

    /// Marks the connection as not to be reused.
    pub fn discard(&self) {
        self.broken.store(true, Ordering::Relaxed);
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

    fn object(&self) -> &Object {
        // Only `Drop` takes the object out.
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("Conn used after drop"))
    }

    /// Keeps `guard` alive until this connection is released, including the time it may spend
    /// settling after an abandoned statement (so a concurrency slot is not handed on before the
    /// connection it stands for is free).
    pub fn hold(&mut self, guard: impl Send + Sync + 'static) {
        self.held = Some(Box::new(guard));
    }

    /// Converts a driver result, marking the connection broken when the connection failed.
    fn track<T>(&self, result: Result<T, tokio_postgres::Error>) -> Result<T, Error> {
        result.map_err(|e| {
            let error = Error::from(e);
            if matches!(error, Error::Unavailable(_)) {
                self.discard();
            }
            error
        })
    }
}

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
