//! Which read replica a read may use.
//!
//! Each replica is checked in the background of the requests that read (at most every
//! `replica_check_interval`, one check at a time per replica, bounded by the connect and recycle
//! timeouts): it must answer, and be at most `replica_max_lag` behind its primary. The lag is
//! `now() - pg_last_xact_replay_timestamp()`, except when the replica has replayed everything it
//! received, which counts as no lag at all (on a quiet primary the last replayed transaction is
//! old, yet nothing is missing). A replica cut off from its primary (the primary down) therefore
//! keeps serving what it has, which is the point of reading from it then. A server that is not
//! in recovery (a promoted replica) is up to date by definition.
//!
//! A replica starts unchecked, which reads treat as unusable: until its first check answers,
//! reads go to the primary. A statement that finds a replica gone marks it down at once (see
//! [`crate::Conn`]); the next check brings it back.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::database::{Limits, Target};

/// The lag of a replica in milliseconds (0 when it has replayed all it received), or -1 for a
/// server that is not a replica.
const LAG_SQL: &str = "SELECT CASE \
      WHEN NOT pg_is_in_recovery() THEN -1 \
      WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
      ELSE coalesce((extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, 0) \
    END";

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

impl DatabaseState {
    pub(crate) fn primary(answer: Result<(), String>) -> Self {
        Self {
            name: "primary".to_owned(),
            role: Role::Primary,
            reach: if answer.is_ok() {
                Reach::Up
            } else {
                Reach::Down
            },
            lag_ms: None,
            error: answer.err(),
        }
    }
}

const UNCHECKED: u8 = 0;
const UP: u8 = 1;
const LAGGING: u8 = 2;
const DOWN: u8 = 3;

/// One read replica: its pools and what its checks found.
pub(crate) struct Replica {
    name: String,
    pub(crate) target: Target,
    reach: AtomicU8,
    lag_ms: AtomicU64,
    /// When the next check is due (`None`: now).
    due: Mutex<Option<Instant>>,
    checking: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Replica {
    pub(crate) fn new(name: String, target: Target) -> Self {
        Self {
            name,
            target,
            reach: AtomicU8::new(UNCHECKED),
            lag_ms: AtomicU64::new(0),
            due: Mutex::new(None),
            checking: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether reads may go here.
    pub(crate) fn usable(&self) -> bool {
        self.reach.load(Ordering::Relaxed) == UP
    }

    pub(crate) fn never_checked(&self) -> bool {
        self.reach.load(Ordering::Relaxed) == UNCHECKED
    }

    /// Takes the replica out of the reads until its next check answers.
    pub(crate) fn mark_down(&self, reason: &str) {
        if self.reach.swap(DOWN, Ordering::Relaxed) != DOWN {
            tracing::warn!(replica = %self.name, %reason, "read replica unavailable; reading from the primary");
        }
        self.set_error(Some(reason.to_owned()));
    }

    fn set_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.error.lock() {
            *slot = error;
        }
    }

    /// Starts a check in the background when one is due and none is running.
    pub(crate) fn check_if_due(self: &std::sync::Arc<Self>, limits: Limits) {
        let now = Instant::now();
        let due = self
            .due
            .lock()
            .is_ok_and(|due| due.is_none_or(|at| at <= now));
        if !due || self.checking.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(std::sync::Arc::clone(self).check(limits));
        }
    }

    /// Checks the replica now, unless a check is already running, and schedules the next.
    pub(crate) async fn check(self: std::sync::Arc<Self>, limits: Limits) {
        if self.checking.swap(true, Ordering::Relaxed) {
            return;
        }
        let lag = tokio::time::timeout(limits.check_timeout, self.lag()).await;
        let before = self.reach.load(Ordering::Relaxed);
        let (reach, error) = match &lag {
            Ok(Ok(lag)) if *lag > limits.max_lag => (LAGGING, None),
            Ok(Ok(_)) => (UP, None),
            Ok(Err(error)) => (DOWN, Some(error.clone())),
            Err(_) => (
                DOWN,
                Some(format!("no answer within {:?}", limits.check_timeout)),
            ),
        };
        if let Ok(Ok(lag)) = lag {
            self.lag_ms.store(
                u64::try_from(lag.as_millis()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
        self.reach.store(reach, Ordering::Relaxed);
        if before != reach {
            match reach {
                UP => tracing::info!(replica = %self.name, "read replica usable"),
                LAGGING => {
                    tracing::warn!(replica = %self.name, lag_ms = self.lag_ms.load(Ordering::Relaxed), "read replica lagging; skipped")
                }
                _ => {
                    tracing::warn!(replica = %self.name, error = error.as_deref().unwrap_or(""), "read replica unavailable")
                }
            }
        }
        self.set_error(error);
        if let Ok(mut due) = self.due.lock() {
            *due = Some(Instant::now() + limits.check_interval);
        }
        self.checking.store(false, Ordering::Relaxed);
    }

    /// The replica's replay lag (zero for a server that is not in recovery).
    async fn lag(&self) -> Result<Duration, String> {
        let object = self
            .target
            .take_for_check()
            .await
            .map_err(|e| crate::Error::from_pool(e, Duration::ZERO).to_string())?;
        let messages = object.simple_query(LAG_SQL).await.map_err(|e| {
            let error = crate::Error::from(e);
            if matches!(error, crate::Error::Unavailable(_)) {
                drop(deadpool_postgres::Object::take(object));
            }
            error.to_string()
        })?;
        let millis: i64 = messages
            .iter()
            .find_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| "the lag query returned no number".to_owned())?;
        Ok(Duration::from_millis(u64::try_from(millis).unwrap_or(0)))
    }

    /// The replica's state for a readiness report.
    pub(crate) fn state(&self) -> DatabaseState {
        let reach = match self.reach.load(Ordering::Relaxed) {
            UP => Reach::Up,
            LAGGING => Reach::Lagging,
            DOWN => Reach::Down,
            _ => Reach::Unchecked,
        };
        DatabaseState {
            name: self.name.clone(),
            role: Role::Replica,
            reach,
            lag_ms: matches!(reach, Reach::Up | Reach::Lagging)
                .then(|| self.lag_ms.load(Ordering::Relaxed)),
            error: self.error.lock().ok().and_then(|e| e.clone()),
        }
    }
}
