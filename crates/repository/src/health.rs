//! Which database a read may use.
//!
//! Each database is checked in the background of the requests that read (at most every
//! `health_check_interval`, one check at a time per database, each bounded): it must answer,
//! and a replica must be at most `replica_max_lag` behind its primary. The lag is
//! `now() - pg_last_xact_replay_timestamp()`, except when the replica streams from its primary
//! and has replayed everything it received, which counts as no lag at all (on a quiet primary
//! the last replayed transaction is old, yet nothing is missing). A server that is not in
//! recovery (a promoted replica) is up to date by definition.
//!
//! A replica that does not stream (no WAL receiver: its primary is gone, or replication broke)
//! cannot know what it misses, so its lag is the age of its last replayed transaction. When that
//! is over the limit, the check asks the primary: if the primary answers, the replica is
//! lagging and skipped (its rows may be any age); if the primary is down too, the replica keeps
//! serving what it has, which is the point of reading from it then.
//!
//! A replica that answers its checks but not its reads (a lock replayed from the primary, an
//! overloaded disk) costs each read `replica_timeout` before the primary serves it. After
//! [`SLOW_READS`] such leases in a row (a lease's pipelined statements count once) it is left out
//! of the reads for [`SLOW_HOLD`] (readiness shows it down, with why), then tried again: what
//! reads start within one `replica_timeout` after each hold pay for it, not all of them. A check
//! that finds a replica back from down (or lagging) ends a hold: the reads that went unanswered
//! were the outage's.
//!
//! A replica starts unchecked, which reads treat as unusable: until its first check answers,
//! reads go to the primary. A statement that finds a replica gone marks it down at once (see
//! [`crate::Conn`]); the next check brings it back. A replica's check is bounded by
//! `replica_timeout`, as its reads are.
//!
//! The primary is read from unless its check found it down (bounded by `create_timeout`: a
//! loaded primary is slow, not gone). Then, with no usable replica either, a read fails at once
//! with [`crate::Error::Unavailable`] instead of waiting on a server that does not answer (a
//! pooler such as PgBouncer 1.18 makes a connected client wait for a server that is down), until
//! a check finds it back.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tokio_postgres::error::SqlState;

use crate::database::{Limits, Target};

/// The lag of a replica in milliseconds (0 when it streams and has replayed all it received),
/// or -1 for a server that is not a replica; and whether a WAL receiver runs (the view shows its
/// row, if not its details, to roles without `pg_read_all_stats`). A replica that has replayed no
/// transaction since it started has no replay time: no lag while it streams, unknown (a day, so
/// past any limit) when it does not. "All it received" is `receive <= replay`: a restarted
/// replica's receiver starts at the beginning of the segment it replayed into, behind replay.
const LAG_SQL: &str = "SELECT CASE \
      WHEN NOT pg_is_in_recovery() THEN -1 \
      WHEN EXISTS (SELECT FROM pg_stat_wal_receiver) THEN CASE \
        WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0 \
        ELSE coalesce((extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, 0) \
        END \
      ELSE coalesce((extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, 86400000) \
    END, \
    NOT pg_is_in_recovery() OR EXISTS (SELECT FROM pg_stat_wal_receiver)";

/// How a database looked at its last check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// It answers (and, for a replica, is recent enough to read from).
    Up,
    /// A replica that answers but is further behind than `replica_max_lag`: skipped.
    Lagging,
    /// It does not answer.
    Down,
    /// A replica not checked yet: not read from until it is.
    Unchecked,
}

impl Reach {
    /// The wire name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Lagging => "lagging",
            Self::Down => "down",
            Self::Unchecked => "unchecked",
        }
    }
}

/// A database's role in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The primary (`database.url`).
    Primary,
    /// A read replica (`database.replica_urls`).
    Replica,
}

impl Role {
    /// The wire name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
        }
    }
}

/// What a readiness report says about one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseState {
    /// `primary`, or `replica-N` for the N-th of `database.replica_urls`.
    pub name: String,
    /// Primary or replica.
    pub role: Role,
    /// How it looked at the last check.
    pub reach: Reach,
    /// A replica's replay lag at its last successful check, in milliseconds.
    pub lag_ms: Option<u64>,
    /// Why it is down (for logs: it may quote the server).
    pub error: Option<String>,
}

/// How many leases in a row may have a read unanswered within `replica_timeout` before the replica
/// is left out of the reads for [`SLOW_HOLD`].
pub(crate) const SLOW_READS: u32 = 3;
/// How long a replica whose reads go unanswered stays out of the reads.
pub(crate) const SLOW_HOLD: Duration = Duration::from_secs(5);

const UNCHECKED: u8 = 0;
const UP: u8 = 1;
const LAGGING: u8 = 2;
const DOWN: u8 = 3;

/// One database (the primary or a replica): its pools and what its checks found.
pub(crate) struct Node {
    name: String,
    role: Role,
    pub(crate) target: Target,
    reach: AtomicU8,
    lag_ms: AtomicU64,
    /// When the next check is due (`None`: now).
    due: Mutex<Option<Instant>>,
    checking: AtomicBool,
    /// The primary only: a read on it failed, so it is checked until it answers.
    suspect: AtomicBool,
    error: Mutex<Option<String>>,
    /// Where checks connect: a session of their own, apart from the pool, so that a pool whose
    /// connections are all busy (or all stuck behind a pooler) neither delays nor fools them.
    pg: tokio_postgres::Config,
    session: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// A replica's primary, asked when the replica stopped streaming and fell behind.
    primary: Option<std::sync::Arc<Node>>,
    /// Replica reads in a row that got no answer within `replica_timeout`.
    slow_reads: AtomicU32,
    /// Until when (milliseconds after `born`; 0: not) the replica is left out for slow reads.
    held_until: AtomicU64,
    born: Instant,
}

/// What a check found on a database that answered.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// How far behind it is (zero for a primary).
    lag: Duration,
    /// Whether it receives WAL from its primary (always, for a primary).
    streaming: bool,
}

/// Why a check found no answer.
enum Failure {
    /// Nothing within the bound.
    TimedOut(Duration),
    /// The connection or the query failed (the message may quote the server).
    Error(String),
}

impl Node {
    pub(crate) fn new(
        name: String,
        role: Role,
        target: Target,
        pg: tokio_postgres::Config,
        primary: Option<std::sync::Arc<Node>>,
    ) -> Self {
        Self {
            name,
            role,
            target,
            reach: AtomicU8::new(UNCHECKED),
            lag_ms: AtomicU64::new(0),
            due: Mutex::new(None),
            checking: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            error: Mutex::new(None),
            pg,
            session: tokio::sync::Mutex::new(None),
            primary,
            slow_reads: AtomicU32::new(0),
            held_until: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether reads may go to this replica.
    pub(crate) fn usable(&self) -> bool {
        self.reach.load(Ordering::Relaxed) == UP && !self.held()
    }

    /// Whether the replica is left out of the reads for slow reads now.
    fn held(&self) -> bool {
        let until = self.held_until.load(Ordering::Relaxed);
        until != 0 && millis(self.born.elapsed()) < until
    }

    /// A lease on this replica had a read with no answer within `replica_timeout`: the
    /// [`SLOW_READS`]-th such lease in a row leaves it out of the reads for [`SLOW_HOLD`].
    pub(crate) fn read_timed_out(&self, bound: Duration) {
        if self.reach.load(Ordering::Relaxed) != UP {
            // Down or lagging already: out of the reads until a check brings it back.
            return;
        }
        let in_a_row = self.slow_reads.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= SLOW_READS {
            self.slow_reads.store(0, Ordering::Relaxed);
            let until = millis(self.born.elapsed() + SLOW_HOLD);
            if self.held_until.fetch_max(until, Ordering::Relaxed) < until {
                tracing::warn!(
                    database = %self.name,
                    reads = in_a_row,
                    ?bound,
                    hold = ?SLOW_HOLD,
                    "read replica answers no reads in time; left out of the reads for a while"
                );
            }
        }
    }

    /// A read on this replica was answered in time: the count of slow leases starts again.
    pub(crate) fn read_answered(&self) {
        if self.slow_reads.load(Ordering::Relaxed) != 0 {
            self.slow_reads.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the last check found this database not answering.
    pub(crate) fn is_down(&self) -> bool {
        self.reach.load(Ordering::Relaxed) == DOWN
    }

    /// Why it is down, if it is.
    pub(crate) fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }

    /// Takes the database out of the reads until its next check answers.
    fn mark_down(&self, reason: &str) {
        if self.reach.swap(DOWN, Ordering::Relaxed) != DOWN {
            tracing::warn!(database = %self.name, %reason, "database unavailable");
        }
        self.set_error(Some(reason.to_owned()));
    }

    fn set_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.error.lock() {
            *slot = error;
        }
    }

    /// A read on this database failed because it is out of reach: a replica leaves the reads
    /// at once; the primary (which has no stand-in) is checked from now on, and only a check
    /// that finds it down makes reads fail fast.
    pub(crate) fn failed(&self, reason: &str) {
        match self.role {
            Role::Replica => self.mark_down(reason),
            Role::Primary => self.suspect.store(true, Ordering::Relaxed),
        }
    }

    /// Starts a check in the background when this database is watched (a replica always; the
    /// primary after a read on it failed, until a check finds it answering), the check is due,
    /// and none is running. An idle or healthy primary costs no check at all.
    pub(crate) fn check_if_due(self: &std::sync::Arc<Self>, limits: Limits) {
        let watched = self.role == Role::Replica || self.suspect.load(Ordering::Relaxed);
        if !watched || self.checking.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let due = self
            .due
            .lock()
            .is_ok_and(|due| due.is_none_or(|at| at <= now));
        if !due {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(std::sync::Arc::clone(self).check(limits));
        }
    }

    /// Checks the database now unless a check is already running, records what it found, and
    /// schedules the next.
    pub(crate) async fn check(self: std::sync::Arc<Self>, limits: Limits) {
        if self.checking.swap(true, Ordering::Relaxed) {
            return;
        }
        // Cleared however this ends, a dropped future included.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let _running = Running(&self.checking);
        let found = self.ask(self.bound(limits), limits.connect_timeout).await;
        let orphan = self.orphan(limits, &found, None).await;
        self.record(limits, found, orphan.unwrap_or(false));
        if let Ok(mut due) = self.due.lock() {
            *due = Some(Instant::now() + limits.check_interval);
        }
    }

    /// For a readiness report: asks now, within `within` at most. What it finds is recorded,
    /// except no answer within `within` (shorter than a check's own bound, so not proof enough
    /// to make reads fail fast): that is only reported.
    pub(crate) async fn report(&self, limits: Limits, within: Duration) -> DatabaseState {
        let connect = limits.connect_timeout.min(within);
        match self.ask(self.bound(limits).min(within), connect).await {
            Err(Failure::TimedOut(bound)) => {
                // Not proof enough to fail reads fast, but worth a check of its own.
                self.suspect.store(true, Ordering::Relaxed);
                DatabaseState {
                    reach: Reach::Down,
                    lag_ms: None,
                    error: Some(format!("no answer within {bound:?}")),
                    ..self.state()
                }
            }
            found => match self.orphan(limits, &found, Some(within)).await {
                Some(orphan) => {
                    self.record(limits, found, orphan);
                    self.state()
                }
                None => self.state(),
            },
        }
    }

    /// How long a check's question may take: a replica's as long as its reads may go
    /// unanswered; the primary's as long as opening a connection may take (a loaded primary is
    /// slow, not gone).
    fn bound(&self, limits: Limits) -> Duration {
        match self.role {
            Role::Primary => limits.primary_check_timeout,
            Role::Replica => limits.replica_timeout,
        }
    }

    /// Whether `found` is a replica that does not stream, further behind than the limit, whose
    /// primary is down as well: it then keeps serving (see the module's documentation). The
    /// primary is asked now (within `within` at most, for a readiness report; what it answers
    /// is recorded); a report's shorter wait that ends without an answer goes by the primary's
    /// last check instead.
    async fn orphan(
        &self,
        limits: Limits,
        found: &Result<Answer, Failure>,
        within: Option<Duration>,
    ) -> Option<bool> {
        let Some(primary) = &self.primary else {
            return Some(false);
        };
        if !matches!(found, Ok(answer) if !answer.streaming && answer.lag > limits.max_lag) {
            return Some(false);
        }
        let bound = primary.bound(limits);
        let bound = within.map_or(bound, |within| within.min(bound));
        let connect = within.map_or(limits.connect_timeout, |w| w.min(limits.connect_timeout));
        match primary.ask(bound, connect).await {
            // A report's shorter wait ran out: not proof either way. Unless the primary's own
            // checks found it down, the report leaves the replica as it was, for the background
            // check (which waits the primary's full bound) to decide.
            Err(Failure::TimedOut(_)) if within.is_some() => primary.is_down().then_some(true),
            asked => {
                let down = asked.is_err();
                primary.record(limits, asked, false);
                Some(down)
            }
        }
    }

    /// Records what a check found; `orphan`: a replica that may serve however far behind it is
    /// (see [`Node::orphan`]).
    fn record(&self, limits: Limits, found: Result<Answer, Failure>, orphan: bool) {
        let (reach, error) = match found {
            Ok(Answer { lag, .. }) => {
                let millis = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
                self.lag_ms.store(millis, Ordering::Relaxed);
                let reach = if lag > limits.max_lag && !orphan {
                    LAGGING
                } else {
                    UP
                };
                (reach, None)
            }
            Err(Failure::Error(error)) => (DOWN, Some(error)),
            Err(Failure::TimedOut(bound)) => (DOWN, Some(format!("no answer within {bound:?}"))),
        };
        // Watched until a check finds it answering (a primary found down by a readiness report
        // included: nothing else would look at it again while reads fail fast).
        self.suspect.store(reach != UP, Ordering::Relaxed);
        let was = self.reach.swap(reach, Ordering::Relaxed);
        if was != UP && reach == UP {
            // Back from down (or lagging): reads that went unanswered meanwhile were the
            // outage's, not slowness, so a hold they started ends now.
            self.held_until.store(0, Ordering::Relaxed);
            self.slow_reads.store(0, Ordering::Relaxed);
        }
        if was != reach {
            let name = &self.name;
            match reach {
                UP if orphan => {
                    let lag_ms = self.lag_ms.load(Ordering::Relaxed);
                    tracing::warn!(
                        database = %name,
                        lag_ms,
                        "read replica cut off from a primary that is down; serving what it has"
                    );
                }
                UP => tracing::info!(database = %name, "database answers"),
                LAGGING => {
                    let lag_ms = self.lag_ms.load(Ordering::Relaxed);
                    tracing::warn!(database = %name, lag_ms, "read replica lagging; skipped");
                }
                _ => {
                    let error = error.as_deref().unwrap_or("");
                    tracing::warn!(database = %name, error, "database unavailable");
                }
            }
        }
        self.set_error(error);
    }

    /// Asks the database, on the checks' own session, how far behind it is (zero for a server
    /// that is not in recovery): opening the session within `connect_bound` (`create_timeout`, or
    /// a readiness report's shorter wait), the question within `bound`. A server that refuses the session because
    /// it has no connection slot left (53300) answers: it is full, not gone.
    async fn ask(&self, bound: Duration, connect_bound: Duration) -> Result<Answer, Failure> {
        let mut slot = self.session.lock().await;
        // Taken out while in use: a check cut short drops it (closing it) rather than leave a
        // half-answered query for the next check.
        let client = match slot.take() {
            Some(client) if !client.is_closed() => client,
            _ => {
                let connect =
                    tokio::time::timeout(connect_bound, self.target.tls.connect(&self.pg));
                match connect.await {
                    Err(_) => return Err(Failure::TimedOut(connect_bound)),
                    Ok(Err(e)) if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) => {
                        return Ok(Answer {
                            lag: Duration::ZERO,
                            streaming: true,
                        });
                    }
                    Ok(Err(e)) => return Err(Failure::Error(one_line(e))),
                    Ok(Ok((client, connection))) => {
                        tokio::spawn(async move {
                            let _ = connection.await;
                        });
                        client
                    }
                }
            }
        };
        let messages = match tokio::time::timeout(bound, client.simple_query(LAG_SQL)).await {
            Err(_) => return Err(Failure::TimedOut(bound)),
            Ok(Err(e)) => return Err(Failure::Error(one_line(e))),
            Ok(Ok(messages)) => messages,
        };
        *slot = Some(client);
        let row = messages.iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let millis = row
            .and_then(|row| row.get(0))
            .and_then(|text| text.parse::<i64>().ok());
        let streaming = row.and_then(|row| row.get(1));
        match (millis, streaming) {
            (Some(millis), Some(streaming)) => Ok(Answer {
                lag: Duration::from_millis(u64::try_from(millis).unwrap_or(0)),
                streaming: streaming == "t",
            }),
            _ => Err(Failure::Error(
                "the lag query returned no lag and state".to_owned(),
            )),
        }
    }

    /// A statement on this database just succeeded: whatever a check said, it answers.
    pub(crate) fn answered(&self) {
        if self.reach.load(Ordering::Relaxed) == DOWN && self.role == Role::Primary {
            self.reach.store(UP, Ordering::Relaxed);
            self.suspect.store(false, Ordering::Relaxed);
            self.set_error(None);
            tracing::info!(database = %self.name, "database answers");
        }
    }

    /// The database's state for a readiness report.
    pub(crate) fn state(&self) -> DatabaseState {
        let reach = match self.reach.load(Ordering::Relaxed) {
            UP if self.held() => {
                return DatabaseState {
                    name: self.name.clone(),
                    role: self.role,
                    reach: Reach::Down,
                    lag_ms: None,
                    error: Some(format!(
                        "{SLOW_READS} leases in a row had a read with no answer in time; left out \
                         of the reads for {SLOW_HOLD:?}"
                    )),
                };
            }
            UP => Reach::Up,
            LAGGING => Reach::Lagging,
            DOWN => Reach::Down,
            _ => Reach::Unchecked,
        };
        DatabaseState {
            name: self.name.clone(),
            role: self.role,
            reach,
            lag_ms: (self.role == Role::Replica && matches!(reach, Reach::Up | Reach::Lagging))
                .then(|| self.lag_ms.load(Ordering::Relaxed)),
            error: self.error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// A duration in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A driver error as one line, through the repository's error type (no SQL text).
fn one_line(error: tokio_postgres::Error) -> String {
    crate::Error::from(error).to_string()
}
