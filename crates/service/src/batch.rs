//! Batch summaries: profile and order summary for many users, with a concurrency limit.
//!
//! The seed's `BatchProcessor` (section 七) runs two queries per id, twenty ids at a time. Here
//! the ids are first de-duplicated (each is computed once), then cut into chunks that one
//! statement each summarises (`id = ANY($1)`): a thousand ids are twenty statements, not two
//! thousand. The chunks go through the task group's ordered map with the configured limit, so
//! results come back in input order. A failure that concerns one chunk (a slow statement, a busy
//! database) becomes an error entry for each of its ids and the batch goes on; a failure that
//! dooms every chunk (the pool is closed, the server is down) cancels the rest at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use repository::{Profile, UserSummary};
use rust_decimal::Decimal;
use serde::Serialize;
use taskgroup::{GroupErrorKind, Outcome, Policy, TaskGroup};
use tokio::time::Instant;

use crate::kind::{ErrorKind, Limit};
use crate::{Service, SourceError, UserId};

/// The summaries of a batch, in the order the ids were given (each id once).
#[derive(Debug, Clone, Default, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchSummary {
    /// Users that were summarised.
    pub results: Vec<UserSummaryEntry>,
    /// Users that could not be: unknown, or their chunk failed.
    pub errors: Vec<BatchFailure>,
}

/// One user's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserSummaryEntry {
    /// The user's id.
    pub user_id: UserId,
    /// The user's profile.
    pub profile: Profile,
    /// How many orders the user has placed.
    pub order_count: i64,
    /// What they add up to, as a decimal string.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "249.10"))]
    pub total_amount: Decimal,
}

/// Why one user has no summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchFailure {
    /// The user's id.
    pub user_id: UserId,
    /// What kind of failure: `not_found`, `timeout`, `busy`, ...
    pub kind: ErrorKind,
    /// What happened, in one line.
    pub error: String,
}

/// Why a whole batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The request itself is unusable (no ids, or too many).
    #[error("{0}")]
    Invalid(String),
    /// The database is out of reach; the remaining chunks were cancelled.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// No user could be summarised because the database was busy or slow (the ids that are not
    /// unknown users all failed for that reason): an empty "success" would mislead a client that
    /// checks only the status, so this is a failure to retry later.
    #[error("the database is overloaded: no user could be summarised")]
    Overloaded,
    /// The batch's deadline passed.
    #[error("the batch deadline passed")]
    DeadlineExceeded,
    /// A bug: a chunk panicked, or the task group could not be built.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What one chunk produced: one result per id, in the chunk's order.
type ChunkResult = Vec<Result<UserSummaryEntry, BatchFailure>>;

impl Service {
    /// Summarises the users `user_ids`: results in input order, duplicates computed once.
    ///
    /// # Errors
    ///
    /// [`BatchError`]: the ids are unusable, the database is unavailable or overloaded, the
    /// deadline passed, or a bug.
    pub async fn summaries(&self, user_ids: &[UserId]) -> Result<BatchSummary, BatchError> {
        let config = &self.inner.config.batch;
        if user_ids.is_empty() {
            return Err(BatchError::Invalid("user_ids must not be empty".into()));
        }
        if user_ids.len() > config.max_ids {
            return Err(BatchError::Invalid(format!(
                "user_ids has {} ids; at most {} are allowed",
                user_ids.len(),
                config.max_ids
            )));
        }
        let mut seen = HashSet::with_capacity(user_ids.len());
        let unique: Vec<UserId> = user_ids
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect();

        let deadline = Instant::now() + config.deadline;
        let group = TaskGroup::<SourceError>::builder()
            .name("batch")
            .policy(Policy::FailFast)
            .limit(config.concurrency)
            .deadline(deadline)
            .build()
            .map_err(|e| BatchError::Internal(e.to_string()))?;
        let chunks: Vec<Vec<UserId>> = unique
            .chunks(config.chunk_size)
            .map(<[UserId]>::to_vec)
            .collect();
        let outcomes = group
            .map(chunks, |chunk| {
                let service = self.clone();
                async move { service.summarise_chunk(chunk, deadline).await }
            })
            .await
            .map_err(|error| match error.kind() {
                GroupErrorKind::DeadlineExceeded => BatchError::DeadlineExceeded,
                _ => match error.cause().map(|cause| &cause.outcome) {
                    Some(Outcome::Err(cause)) => BatchError::Unavailable(cause.public_message()),
                    Some(other) => BatchError::Internal(other.to_string()),
                    None => BatchError::Internal(error.to_string()),
                },
            })?;

        let mut summary = BatchSummary::default();
        for outcome in outcomes {
            match outcome {
                Outcome::Ok(results) => {
                    for result in results {
                        match result {
                            Ok(entry) => summary.results.push(entry),
                            Err(failure) => summary.errors.push(failure),
                        }
                    }
                }
                // Under fail-fast, a successful map holds only `Ok` outcomes.
                other => return Err(BatchError::Internal(other.to_string())),
            }
        }
        let overloaded = |failure: &BatchFailure| failure.kind.is_overload();
        if summary.results.is_empty() && summary.errors.iter().any(overloaded) {
            tracing::warn!(
                ids = summary.errors.len(),
                "batch summarised no user: database busy or slow"
            );
            return Err(BatchError::Overloaded);
        }
        Ok(summary)
    }

    /// Summarises one chunk in one statement. Failures that concern this chunk become per-id
    /// errors; failures that doom the batch are returned as `Err`, which stops the group.
    async fn summarise_chunk(
        &self,
        chunk: Vec<UserId>,
        deadline: Instant,
    ) -> Result<ChunkResult, SourceError> {
        let config = &self.inner.config;
        let cut_off = (Instant::now() + config.batch.chunk_timeout).min(deadline);
        let fetched = async {
            // Batches share half the database slots, so a burst of them leaves room for
            // dashboards. A chunk may wait for its share as long as its own time limit allows:
            // a batch is bulk work, whose caller expects to wait longer than for a dashboard.
            let wait = cut_off.saturating_duration_since(Instant::now());
            let _share =
                tokio::time::timeout(wait, Arc::clone(&self.inner.batch_slots).acquire_owned())
                    .await
                    .map_err(|_| SourceError::Busy(wait))?
                    .map_err(|_| SourceError::Database(repository::Error::Closed))?;
            let lease = self.inner.gate.lease(&self.inner.db, Some(cut_off)).await?;
            let ids: Vec<i64> = chunk.iter().map(|id| id.get()).collect();
            Ok::<_, SourceError>(lease.conn.user_summaries(&ids).await?)
        };
        let fetched = tokio::time::timeout_at(cut_off, fetched)
            .await
            .unwrap_or(Err(SourceError::TimedOut {
                after: config.batch.chunk_timeout,
                limit: Limit::BatchChunk,
            }));
        let rows = match fetched {
            Ok(rows) => rows,
            Err(error) if error.dooms_every_read() => return Err(error),
            Err(error) => {
                error.log("batch");
                let (kind, message) = (error.kind(), error.public_message());
                return Ok(chunk
                    .into_iter()
                    .map(|user_id| {
                        Err(BatchFailure {
                            user_id,
                            kind,
                            error: message.clone(),
                        })
                    })
                    .collect());
            }
        };
        let mut by_id: HashMap<i64, UserSummary> =
            rows.into_iter().map(|row| (row.profile.id, row)).collect();
        Ok(chunk
            .into_iter()
            .map(|user_id| match by_id.remove(&user_id.get()) {
                Some(row) => Ok(UserSummaryEntry {
                    user_id,
                    profile: row.profile,
                    order_count: row.orders.order_count,
                    total_amount: row.orders.total_amount,
                }),
                None => Err(BatchFailure {
                    user_id,
                    kind: ErrorKind::NotFound,
                    error: "user not found".to_owned(),
                }),
            })
            .collect())
    }
}
