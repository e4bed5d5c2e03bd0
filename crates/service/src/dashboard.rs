//! The dashboard: profile, orders, reviews and recommendations fetched at once, in one task group.
//!
//! This is the seed's `get_user_dashboard` (section 五) with its gaps closed:
//!
//! - Each source's failure lands in `errors` and the response is partial, not failed, unless the
//!   failing source is the profile, which is essential: a dashboard without a user is no dashboard.
//!   A profile that shows no such user cancels the other sources at once (`NotFound`); a profile
//!   that fails otherwise cancels them too and the call is `Unavailable`.
//! - Every source has its own timeout and the whole dashboard a deadline; a source cut off by
//!   either is reported as a timeout that names the limit.
//! - Database work goes through the process-wide gate (see [`crate::gate`]), not a semaphore made
//!   per request.
//! - Dropping the future (the HTTP client went away) drops the group, which aborts every source;
//!   abandoned statements are cancelled on the server by the repository.
//!
//! The group is collect-all, with the profile marked essential: an optional source failing does
//! not disturb its siblings, the profile failing stops them all.

use std::sync::Arc;

use client::Recommendation;
use repository::{Order, Profile, Review};
use serde::Serialize;
use taskgroup::{ChildContext, Limit, Outcome, Policy, TaskGroup, TaskHandle};
use tokio::time::Instant;

use crate::gate::Lease;
use crate::source::{Clocks, SourceFailure, SourceStatus, SourceTiming, describe};
use crate::{QueryMode, Service, Source, SourceError};

/// A user's dashboard, possibly partial: see `errors`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Dashboard {
    /// The user's profile (always present: without it there is no dashboard).
    pub profile: Profile,
    /// The user's most recent orders, newest first (empty when the source failed).
    pub orders: Vec<Order>,
    /// The user's reviews, newest first (empty when the source failed).
    pub reviews: Vec<Review>,
    /// Recommended products (empty when the source failed).
    pub recommendations: Vec<Recommendation>,
    /// One entry per source that failed or was cut off.
    pub errors: Vec<SourceFailure>,
    /// How long each source took and how it ended (not serialised; for `Server-Timing` and
    /// metrics).
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub timings: Vec<SourceTiming>,
}

/// Why there is no dashboard. Every variant carries the per-source timings, so the caller can
/// still report them.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The profile shows no such user; the other sources were cancelled.
    #[error("user {user_id} not found")]
    NotFound {
        /// The id asked for.
        user_id: i64,
        /// Per-source timings.
        timings: Vec<SourceTiming>,
    },
    /// The profile could not be read (database down, busy, or too slow); the other sources were
    /// cancelled.
    #[error("the user's profile is unavailable: {}", first_error(.errors))]
    Unavailable {
        /// What failed, the profile first.
        errors: Vec<SourceFailure>,
        /// Per-source timings.
        timings: Vec<SourceTiming>,
    },
    /// The dashboard's deadline passed before the profile was known.
    #[error("the dashboard deadline passed before the profile was known")]
    DeadlineExceeded {
        /// What failed or was cut off.
        errors: Vec<SourceFailure>,
        /// Per-source timings.
        timings: Vec<SourceTiming>,
    },
    /// A bug: a source panicked, or the task group could not be built.
    #[error("internal error: {message}")]
    Internal {
        /// What happened (for logs, not for clients).
        message: String,
        /// Per-source timings.
        timings: Vec<SourceTiming>,
    },
}

fn first_error(errors: &[SourceFailure]) -> &str {
    errors.first().map_or("unknown error", |e| e.error.as_str())
}

impl DashboardError {
    /// Per-source timings of the failed dashboard.
    pub fn timings(&self) -> &[SourceTiming] {
        match self {
            DashboardError::NotFound { timings, .. }
            | DashboardError::Unavailable { timings, .. }
            | DashboardError::DeadlineExceeded { timings, .. }
            | DashboardError::Internal { timings, .. } => timings,
        }
    }

    /// The per-source errors collected before the dashboard failed.
    pub fn errors(&self) -> &[SourceFailure] {
        match self {
            DashboardError::Unavailable { errors, .. }
            | DashboardError::DeadlineExceeded { errors, .. } => errors,
            DashboardError::NotFound { .. } | DashboardError::Internal { .. } => &[],
        }
    }
}

/// What a database source reads through: its own lease (pooled mode) or one shared with its
/// siblings (pipelined mode).
enum Db {
    Shared(Arc<Lease>),
    Own,
}

impl Service {
    /// Builds the dashboard of `user_id`.
    ///
    /// # Errors
    ///
    /// [`DashboardError`]: the user does not exist, the profile is unavailable, the deadline
    /// passed before the profile was known, or a bug.
    pub async fn dashboard(&self, user_id: i64) -> Result<Dashboard, DashboardError> {
        let config = &self.inner.config.dashboard;
        let started = Instant::now();
        let deadline = started + config.deadline;
        let clocks = Clocks::new(started);
        let group = TaskGroup::<SourceError>::builder()
            .name("dashboard")
            .policy(Policy::CollectAll)
            .deadline(deadline)
            .build()
            .map_err(|e| DashboardError::Internal {
                message: e.to_string(),
                timings: Vec::new(),
            })?;

        // The recommendation call needs no database: it starts first, so its network round trip
        // overlaps with waiting for a connection.
        //
        // Its timeout is enforced by the client, not by the group: the client's deadline is the
        // source's timeout (or the dashboard's deadline, if that comes first). A call cut off from
        // outside is dropped, and a dropped call tells the client's circuit breaker nothing, so a
        // service that hangs would never open the breaker and every dashboard would wait the full
        // timeout for it. Ended by the client's own timer, the call counts as a failure.
        let recommendations = {
            let client = self.inner.client.clone();
            let watch = clocks.watch(Source::Recommendations);
            let timeout = config.recommendations_timeout;
            let dashboard_deadline = config.deadline;
            group
                .child(Source::Recommendations.as_str())
                .spawn(async move {
                    let _watch = watch;
                    let own = Instant::now() + timeout;
                    let (until, limit, after) = if own < deadline {
                        (own, "recommendations timeout", timeout)
                    } else {
                        (deadline, "dashboard deadline", dashboard_deadline)
                    };
                    match client.recommendations_with_deadline(user_id, until).await {
                        Ok(items) => Ok(items),
                        Err(client::RecommendationError::Timeout { .. }) => {
                            Err(SourceError::TimedOut { after, limit })
                        }
                        Err(error) => Err(error.into()),
                    }
                })
        };

        let db = match self.inner.config.query_mode {
            QueryMode::Pooled => Db::Own,
            QueryMode::Pipelined => {
                // Bounded by the deadline as a whole: the slot wait is, but taking a pooled
                // connection (and perhaps opening one) comes on top of it.
                let leased = tokio::time::timeout_at(
                    deadline,
                    self.inner.gate.lease(&self.inner.db, Some(deadline)),
                )
                .await
                .unwrap_or(Err(SourceError::TimedOut {
                    after: config.deadline,
                    limit: "dashboard deadline",
                }));
                match leased {
                    Ok(lease) => Db::Shared(Arc::new(lease)),
                    Err(error) => {
                        // Without a connection there is no profile: stop the recommendation call
                        // and report every database source as failed by the same cause.
                        drop(group);
                        let failure = |source| SourceFailure {
                            source,
                            kind: error.kind(),
                            error: error.public_message(),
                        };
                        let errors = vec![
                            failure(Source::Profile),
                            failure(Source::Orders),
                            failure(Source::Reviews),
                        ];
                        // The database sources failed (they are in `errors`), and say so in
                        // their status too, so that a dashboard of statuses sees the overload.
                        let failed = if matches!(error, SourceError::TimedOut { .. }) {
                            SourceStatus::Timeout
                        } else {
                            SourceStatus::Error
                        };
                        let timings = Source::ALL
                            .iter()
                            .map(|&source| SourceTiming {
                                source,
                                elapsed: clocks.elapsed(source),
                                status: if source == Source::Recommendations {
                                    SourceStatus::Cancelled
                                } else {
                                    failed
                                },
                            })
                            .collect();
                        if matches!(error, SourceError::TimedOut { .. }) {
                            return Err(DashboardError::DeadlineExceeded { errors, timings });
                        }
                        return Err(DashboardError::Unavailable { errors, timings });
                    }
                }
            }
        };

        let profile = self.spawn_read(
            &group,
            &clocks,
            &db,
            Source::Profile,
            config.profile_timeout,
            move |lease| async move {
                lease
                    .conn
                    .profile(user_id)
                    .await?
                    .ok_or(SourceError::NotFound)
            },
        );
        let orders = self.spawn_read(
            &group,
            &clocks,
            &db,
            Source::Orders,
            config.orders_timeout,
            move |lease| async move { Ok(lease.conn.orders(user_id).await?) },
        );
        let reviews = self.spawn_read(
            &group,
            &clocks,
            &db,
            Source::Reviews,
            config.reviews_timeout,
            move |lease| async move { Ok(lease.conn.reviews(user_id).await?) },
        );
        // The group owns the only other references to a shared lease; the connection goes back to
        // the pool as soon as the last read finishes, not when the recommendation call does.
        drop(db);

        let report = match group.join().await {
            Ok(report) => report,
            Err(error) => error.into_report(),
        };
        let missing = Outcome::Cancelled(taskgroup::CancelReason::RuntimeShutdown);
        let outcome = |handle_index: Option<usize>| {
            handle_index
                .and_then(|index| report.get_index(index))
                .map_or(&missing, |child| &child.outcome)
        };
        let outcomes = [
            (Source::Profile, outcome(profile.index())),
            (Source::Orders, outcome(orders.index())),
            (Source::Reviews, outcome(reviews.index())),
            (Source::Recommendations, outcome(recommendations.index())),
        ];
        let mut errors = Vec::new();
        let mut timings = Vec::with_capacity(4);
        for (source, outcome) in outcomes {
            let (status, failure) =
                describe(source, outcome, ("dashboard deadline", config.deadline));
            errors.extend(failure);
            timings.push(SourceTiming {
                source,
                elapsed: clocks.elapsed(source),
                status,
            });
        }

        match outcome(profile.index()) {
            Outcome::Ok(()) => {}
            Outcome::Err(SourceError::NotFound) => {
                return Err(DashboardError::NotFound { user_id, timings });
            }
            Outcome::TimedOut(timeout) if timeout.limit == Limit::Group => {
                return Err(DashboardError::DeadlineExceeded { errors, timings });
            }
            Outcome::Err(_) | Outcome::TimedOut(_) => {
                return Err(DashboardError::Unavailable { errors, timings });
            }
            Outcome::Panicked(panic) => {
                return Err(DashboardError::Internal {
                    message: format!("the profile read panicked: {}", panic.message()),
                    timings,
                });
            }
            Outcome::Cancelled(reason) => {
                return Err(DashboardError::Internal {
                    message: format!("the profile read was cancelled: {reason}"),
                    timings,
                });
            }
        }
        let Ok(profile) = profile.output() else {
            return Err(DashboardError::Internal {
                message: "the profile read succeeded without an output".to_owned(),
                timings,
            });
        };
        Ok(Dashboard {
            profile,
            orders: orders.output().unwrap_or_default(),
            reviews: reviews.output().unwrap_or_default(),
            recommendations: recommendations.output().unwrap_or_default(),
            errors,
            timings,
        })
    }

    /// Spawns one database read: on the shared lease, or on a lease of its own taken inside the
    /// child (so waiting for it counts against the source's timeout).
    fn spawn_read<T, F, Fut>(
        &self,
        group: &TaskGroup<SourceError>,
        clocks: &Clocks,
        db: &Db,
        source: Source,
        timeout: std::time::Duration,
        read: F,
    ) -> TaskHandle<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Lease>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, SourceError>> + Send + 'static,
    {
        let watch = clocks.watch(source);
        let shared = match db {
            Db::Shared(lease) => Some(Arc::clone(lease)),
            Db::Own => None,
        };
        let service = self.clone();
        group
            .child(source.as_str())
            .timeout(timeout)
            .essential(source == Source::Profile)
            .spawn(async move {
                let _watch = watch;
                let lease = match shared {
                    Some(lease) => lease,
                    None => {
                        let deadline = ChildContext::current().and_then(|c| c.deadline());
                        Arc::new(
                            service
                                .inner
                                .gate
                                .lease(&service.inner.db, deadline)
                                .await?,
                        )
                    }
                };
                read(lease).await
            })
    }
}
