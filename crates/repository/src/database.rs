//! The connection pool and the reads the dashboard needs.
//!
//! [`Database`] owns a deadpool-postgres pool. Each read runs a statement prepared once per
//! connection and kept in that connection's statement cache. A caller that wants several reads
//! on one connection takes a [`Conn`]: its methods borrow it shared, so polling them concurrently
//! pipelines the statements on the one socket (tokio-postgres sends each as soon as it is polled).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Status, Transaction,
};
use rust_decimal::Decimal;
use tokio_postgres::types::FromSql;
use tokio_postgres::{NoTls, Row};
use tracing::instrument;

use crate::models::{Order, OrderSummary, Profile, Review, UserSummary};
use crate::{DbConfig, Error};

const PROFILE: &str = "SELECT id, username, email, avatar FROM users WHERE id = $1";
const ORDERS: &str = "SELECT id, product, amount, created_at FROM orders \
     WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2";
const REVIEWS: &str = "SELECT id, product_id, rating, content FROM reviews \
     WHERE user_id = $1 ORDER BY id DESC LIMIT $2";
const ORDER_SUMMARY: &str =
    "SELECT count(*), coalesce(sum(amount), 0.00) FROM orders WHERE user_id = $1";
const USER_SUMMARIES: &str = "SELECT u.id, u.username, u.email, u.avatar, s.order_count, s.total_amount \
     FROM users u \
     CROSS JOIN LATERAL (SELECT count(*) AS order_count, coalesce(sum(o.amount), 0.00) AS total_amount \
                         FROM orders o WHERE o.user_id = u.id) s \
     WHERE u.id = ANY($1)";

/// A pool of PostgreSQL connections and the typed reads over it. Cheap to clone: clones share
/// the pool.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
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
            .field("status", &self.pool.status())
            .field("limits", &self.limits)
            .finish()
    }
}

/// A snapshot of the pool, for `/metrics` and readiness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        let pg = config.pg_config()?;
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                // A connection whose socket the driver saw close is replaced; anything subtler
                // shows up as an error on the next query, which the caller already handles.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.max_size)
            .wait_timeout(Some(config.wait_timeout))
            .create_timeout(Some(config.create_timeout))
            .recycle_timeout(Some(config.recycle_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the database pool: {e}")))?;
        Ok(Self {
            pool,
            limits: Limits {
                orders: config.orders_limit,
                reviews: config.reviews_limit,
                wait: config.wait_timeout,
            },
        })
    }

    /// Takes a connection out of the pool, waiting at most the configured `wait_timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::PoolTimeout`] when none became free in time, [`Error::Unavailable`] when a new
    /// connection could not be opened, [`Error::Closed`] after [`Database::close`].
    pub async fn conn(&self) -> Result<Conn, Error> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Error::from_pool(e, self.limits.wait))?;
        Ok(Conn {
            client: Some(client),
            limits: self.limits,
            broken: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            held: None,
        })
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

    /// The profile of one user, or `None` when there is no such user.
    ///
    /// # Errors
    ///
    /// Any [`Error`] from taking a connection or running the query.
    pub async fn profile(&self, user_id: i64) -> Result<Option<Profile>, Error> {
        self.conn().await?.profile(user_id).await
    }

    /// A user's orders, newest first, at most `orders_limit` of them.
    ///
    /// # Errors
    ///
    /// Any [`Error`] from taking a connection or running the query.
    pub async fn orders(&self, user_id: i64) -> Result<Vec<Order>, Error> {
        self.conn().await?.orders(user_id).await
    }

    /// A user's reviews, newest first, at most `reviews_limit` of them.
    ///
    /// # Errors
    ///
    /// Any [`Error`] from taking a connection or running the query.
    pub async fn reviews(&self, user_id: i64) -> Result<Vec<Review>, Error> {
        self.conn().await?.reviews(user_id).await
    }

    /// The count and total of all a user's orders.
    ///
    /// # Errors
    ///
    /// Any [`Error`] from taking a connection or running the query.
    pub async fn order_summary(&self, user_id: i64) -> Result<OrderSummary, Error> {
        self.conn().await?.order_summary(user_id).await
    }

    /// Profile and order summary of every listed user that exists, in one statement.
    ///
    /// # Errors
    ///
    /// Any [`Error`] from taking a connection or running the query.
    pub async fn user_summaries(&self, user_ids: &[i64]) -> Result<Vec<UserSummary>, Error> {
        self.conn().await?.user_summaries(user_ids).await
    }

    /// The pool's current size, idle connections and waiters.
    pub fn status(&self) -> PoolStatus {
        self.pool.status().into()
    }

    /// Closes the pool: waiters and later callers get [`Error::Closed`], and idle connections are
    /// closed now. Connections in use close when they are returned.
    pub fn close(&self) {
        self.pool.close();
    }

    /// Whether [`Database::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.pool.is_closed()
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
    #[instrument(level = "debug", skip(self))]
    pub async fn profile(&self, user_id: i64) -> Result<Option<Profile>, Error> {
        let rows = self.statement(PROFILE, &[&user_id]).await?;
        rows.first().map(|row| profile_from(row, 0)).transpose()
    }

    /// A user's orders, newest first, at most `orders_limit` of them.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    #[instrument(level = "debug", skip(self))]
    pub async fn orders(&self, user_id: i64) -> Result<Vec<Order>, Error> {
        let rows = self
            .statement(ORDERS, &[&user_id, &self.limits.orders])
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Order {
                    id: get(row, 0)?,
                    product: get(row, 1)?,
                    amount: get(row, 2)?,
                    created_at: get(row, 3)?,
                })
            })
            .collect()
    }

    /// A user's reviews, newest first, at most `reviews_limit` of them.
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    #[instrument(level = "debug", skip(self))]
    pub async fn reviews(&self, user_id: i64) -> Result<Vec<Review>, Error> {
        let rows = self
            .statement(REVIEWS, &[&user_id, &self.limits.reviews])
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Review {
                    id: get(row, 0)?,
                    product_id: get(row, 1)?,
                    rating: get(row, 2)?,
                    content: get(row, 3)?,
                })
            })
            .collect()
    }

    /// The count and total of all a user's orders; zero and zero for a user with none (or no
    /// such user).
    ///
    /// # Errors
    ///
    /// Any [`Error`] of the query.
    #[instrument(level = "debug", skip(self))]
    pub async fn order_summary(&self, user_id: i64) -> Result<OrderSummary, Error> {
        let rows = self.statement(ORDER_SUMMARY, &[&user_id]).await?;
        let row = rows.first().ok_or_else(|| Error::Query {
            code: "XX000".to_owned(),
            message: "an aggregate returned no row".to_owned(),
        })?;
        Ok(OrderSummary {
            order_count: get(row, 0)?,
            total_amount: get::<Decimal>(row, 1)?,
        })
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

fn profile_from(row: &Row, first: usize) -> Result<Profile, Error> {
    Ok(Profile {
        id: get(row, first)?,
        username: get(row, first + 1)?,
        email: get(row, first + 2)?,
        avatar: get(row, first + 3)?,
    })
}

/// Reads a column, turning a type mismatch into an error instead of the driver's panic.
fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, Error> {
    row.try_get(index).map_err(|e| Error::Query {
        code: "XX000".to_owned(),
        message: format!("column {index} has an unexpected type: {e}"),
    })
}
