//! The dashboard: profile, orders, reviews and recommendations fetched at once, in one task group.
//!
//! [`Service::dashboard`] reads as its three steps:
//!
//! 1. **Take the database lease** ([`Service::lease`]): in pipelined mode one pooled connection
//!    (and one slot of the process-wide gate) for the three reads; in pooled mode each read takes
//!    its own, inside its task. The recommendation call needs no database and starts first, so its
//!    round trip overlaps with this wait.
//! 2. **Spawn the sources** into a collect-all group with the dashboard's deadline: each read
//!    with its own timeout, the profile essential (a dashboard without a user is no dashboard: an
//!    unknown user cancels the other sources at once).
//! 3. **Assemble the answer** ([`assemble`]): every source's outcome, including "no connection at
//!    all" from step 1, goes through the one describing function into `errors` and the per-source
//!    timings, and the profile's outcome decides between a dashboard and a [`DashboardError`].
//!
//! Dropping the future (the HTTP client went away) drops the group, which stops every source;
//! abandoned statements are cancelled on the server by the repository.

use client::Recommendations;
use repository::{Order, Page, Profile, Review};
use serde::Serialize;
use std::sync::Arc;
use taskgroup::{ChildContext, Outcome, Policy, TaskGroup, TaskHandle};
use tokio::time::Instant;

use crate::gate::Lease;
use crate::kind::Limit;
use crate::source::{Clocks, SourceFailure, SourceTiming, describe};
use crate::{QueryMode, Service, Source, SourceError, UserId};

/// A user's dashboard, possibly partial: see `errors`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Dashboard {
    /// The user's profile (always present: without it there is no dashboard).
    pub profile: Profile,
    /// The user's most recent orders, newest first, at most `database.orders_limit` (100 by
    /// default); empty when the source failed.
    pub orders: Vec<Order>,
    /// Whether the user has more orders than `orders` lists.
    pub more_orders: bool,
    /// The user's reviews, newest first, at most `database.reviews_limit` (100 by default);
    /// empty when the source failed.
    pub reviews: Vec<Review>,
    /// Whether the user has more reviews than `reviews` lists.
    pub more_reviews: bool,
    /// The recommendation service's `items`, exactly as it sent them (any JSON values); empty
    /// when the source failed.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Value>))]
    pub recommendations: Recommendations,
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
        user_id: UserId,
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

/// What the three database reads go through: one lease shared by all three (pipelined mode), a
/// lease each, taken inside each read (pooled mode), or the worker's shared-read queues
/// (coalesced mode).
enum Db {
    Shared(Arc<Lease>),
    Own,
    Coalesced,
}

/// One dashboard in the making.
struct Run {
    user: UserId,
    deadline: Instant,
    clocks: Clocks,
    group: TaskGroup<SourceError>,
    recommendations: TaskHandle<Recommendations>,
}

/// The handles of the three reads, or why there are none.
enum Reads {
    Spawned {
        profile: TaskHandle<Option<Profile>>,
        orders: TaskHandle<Page<Order>>,
        reviews: TaskHandle<Page<Review>>,
    },
    /// No database connection could be had: every read fails with this.
    NoConnection(SourceError),
}

impl Service {
    /// Builds the dashboard of `user`.
    ///
    /// # Errors
    ///
    /// [`DashboardError`]: the user does not exist, the profile is unavailable, the deadline
    /// passed before the profile was known, or a bug.
    pub async fn dashboard(&self, user: UserId) -> Result<Dashboard, DashboardError> {
        let run = self.start(user)?;
        let reads = match self.lease(run.deadline).await {
            Ok(db) => self.spawn_reads(&run, &db),
            // Without a connection there is no profile: stop the recommendation call too.
            Err(error) => {
                run.group.cancel();
                Reads::NoConnection(error)
            }
        };
        assemble(self, run, reads).await
    }

    /// Builds the group and starts the recommendation call, which needs no database.
    ///
    /// Its timeout is enforced by the client, not by the group: the client's deadline is the
    /// source's timeout (or the dashboard's deadline, if that comes first). A call cut off from
    /// outside is dropped, and a dropped call tells the client's circuit breaker nothing, so a
    /// service that hangs would never open the breaker; ended by the client's own timer, the call
    /// counts as a failure.
    fn start(&self, user: UserId) -> Result<Run, DashboardError> {
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
        let client = self.inner.client.clone();
        let watch = clocks.watch(Source::Recommendations);
        let (timeout, whole) = (config.recommendations_timeout, config.deadline);
        let recommendations = group
            .child(Source::Recommendations.as_str())
            .spawn(Box::pin(async move {
                let _watch = watch;
                let own = Instant::now() + timeout;
                let (until, limit, after) = if own < deadline {
                    (own, Limit::Source(Source::Recommendations), timeout)
                } else {
                    (deadline, Limit::DashboardDeadline, whole)
                };
                match client
                    .recommendations_with_deadline(user.get(), until)
                    .await
                {
                    Err(client::RecommendationError::Timeout { .. }) => {
                        Err(SourceError::TimedOut { after, limit })
                    }
                    other => Ok(other?),
                }
            }));
        Ok(Run {
            user,
            deadline,
            clocks,
            group,
            recommendations,
        })
    }

    /// Step 1: the database lease of pipelined mode (bounded by the deadline as a whole: the slot
    /// wait is, but taking a pooled connection, perhaps opening one, comes on top of it).
    async fn lease(&self, deadline: Instant) -> Result<Db, SourceError> {
        match self.inner.config.query_mode {
            QueryMode::Pooled => Ok(Db::Own),
            QueryMode::Coalesced => match self.inner.coalescer.lane().alone(self) {
                None => Ok(Db::Coalesced),
                // An idle lane: this dashboard reads as in pipelined mode, holding the round.
                Some(round) => {
                    let mut lease = self.pipelined_lease(deadline).await?;
                    lease.round = Some(round);
                    Ok(Db::Shared(Arc::new(lease)))
                }
            },
            QueryMode::Pipelined => Ok(Db::Shared(Arc::new(self.pipelined_lease(deadline).await?))),
        }
    }

    async fn pipelined_lease(&self, deadline: Instant) -> Result<Lease, SourceError> {
        let lease = self.inner.gate.lease(&self.inner.db, Some(deadline));
        match tokio::time::timeout_at(deadline, lease).await {
            Ok(lease) => lease,
            Err(_) => Err(SourceError::TimedOut {
                after: self.inner.config.dashboard.deadline,
                limit: Limit::DashboardDeadline,
            }),
        }
    }

    /// Step 2: the three reads. The group holds the only other references to a shared lease, so
    /// the connection goes back to the pool when the last read finishes, not when the
    /// recommendation call does.
    fn spawn_reads(&self, run: &Run, db: &Db) -> Reads {
        let user = run.user.get();
        if let Db::Coalesced = db {
            let waiting = self.inner.coalescer.lane().read(self, user);
            return Reads::Spawned {
                profile: self.spawn_source(run, Source::Profile, async move {
                    let profile = waiting.profile.get().await?;
                    profile.map(Some).ok_or(SourceError::NotFound)
                }),
                orders: self.spawn_source(run, Source::Orders, waiting.orders.get()),
                reviews: self.spawn_source(run, Source::Reviews, waiting.reviews.get()),
            };
        }
        Reads::Spawned {
            profile: self.spawn_read(run, db, Source::Profile, move |lease| async move {
                let profile = lease.conn.profile(user).await?;
                profile.map(Some).ok_or(SourceError::NotFound)
            }),
            orders: self.spawn_read(run, db, Source::Orders, move |lease| async move {
                Ok(lease.conn.orders(user).await?)
            }),
            reviews: self.spawn_read(run, db, Source::Reviews, move |lease| async move {
                Ok(lease.conn.reviews(user).await?)
            }),
        }
    }

    /// Spawns one database read: on the shared lease, or on a lease of its own taken inside the
    /// child (so waiting for it counts against the source's timeout).
    fn spawn_read<T, F, Fut>(&self, run: &Run, db: &Db, source: Source, read: F) -> TaskHandle<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Lease>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, SourceError>> + Send + 'static,
    {
        let shared = match db {
            Db::Shared(lease) => Some(Arc::clone(lease)),
            Db::Own | Db::Coalesced => None,
        };
        let service = self.clone();
        self.spawn_source(run, source, async move {
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

    /// Spawns one source into the group: with its own timeout and stopwatch, the profile
    /// essential.
    fn spawn_source<T, Fut>(&self, run: &Run, source: Source, read: Fut) -> TaskHandle<T>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, SourceError>> + Send + 'static,
    {
        let watch = run.clocks.watch(source);
        // Boxed once here, the read moves as a pointer through the group's spawn path and into
        // its task (callgrind: 231 000 -> 219 000 instructions per dashboard, boxing the
        // recommendation call as well: 217 000; the allocation is cheaper than the copies).
        let read = Box::pin(read);
        run.group
            .child(source.as_str())
            .timeout(self.inner.config.dashboard.timeout(source))
            .essential(source == Source::Profile)
            .spawn(async move {
                let _watch = watch;
                read.await
            })
    }
}

/// Step 3: joins the group and turns every source's outcome into the answer.
async fn assemble(service: &Service, run: Run, reads: Reads) -> Result<Dashboard, DashboardError> {
    let config = &service.inner.config.dashboard;
    let report = match run.group.join().await {
        Ok(report) => report,
        Err(error) => error.into_report(),
    };
    // Without a connection, every read ends with the lease's error.
    let (handles, no_connection) = match reads {
        Reads::Spawned {
            profile,
            orders,
            reviews,
        } => (Some((profile, orders, reviews)), None),
        Reads::NoConnection(error) => (None, Some(Outcome::Err(error))),
    };
    // A child missing from its own group's report cannot happen; it would read as cancelled.
    let missing = Outcome::Cancelled(taskgroup::CancelReason::RuntimeShutdown);
    let outcome = |index: Option<usize>| -> &Outcome<(), SourceError> {
        no_connection.as_ref().unwrap_or_else(|| {
            index
                .and_then(|index| report.get_index(index))
                .map_or(&missing, |child| &child.outcome)
        })
    };
    let (profile_at, orders_at, reviews_at) =
        handles.as_ref().map_or((None, None, None), |(p, o, r)| {
            (p.index(), o.index(), r.index())
        });
    let recommendations_outcome = run
        .recommendations
        .index()
        .and_then(|index| report.get_index(index))
        .map_or(&missing, |child| &child.outcome);
    let outcomes = [
        (Source::Profile, outcome(profile_at)),
        (Source::Orders, outcome(orders_at)),
        (Source::Reviews, outcome(reviews_at)),
        (Source::Recommendations, recommendations_outcome),
    ];
    let deadline = (Limit::DashboardDeadline, config.deadline);
    let mut errors = Vec::new();
    let mut timings = Vec::with_capacity(outcomes.len());
    for (source, outcome) in outcomes {
        let (status, failure) = describe(source, outcome, (config.timeout(source), deadline));
        errors.extend(failure);
        timings.push(SourceTiming {
            source,
            elapsed: run.clocks.elapsed(source),
            status,
        });
    }

    match outcome(profile_at) {
        Outcome::Ok(()) => {}
        Outcome::Err(SourceError::NotFound) => {
            return Err(DashboardError::NotFound {
                user_id: run.user,
                timings,
            });
        }
        Outcome::TimedOut(taskgroup::Timeout {
            limit: taskgroup::Limit::Group,
            ..
        })
        | Outcome::Err(SourceError::TimedOut {
            limit: Limit::DashboardDeadline,
            ..
        }) => return Err(DashboardError::DeadlineExceeded { errors, timings }),
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
    let Some((profile, orders, reviews)) = handles else {
        return Err(DashboardError::Internal {
            message: "a profile without a read".to_owned(),
            timings,
        });
    };
    let Ok(Some(profile)) = profile.output() else {
        return Err(DashboardError::Internal {
            message: "the profile read succeeded without an output".to_owned(),
            timings,
        });
    };
    let orders = orders.output().unwrap_or_default();
    let reviews = reviews.output().unwrap_or_default();
    Ok(Dashboard {
        profile,
        orders: orders.items,
        more_orders: orders.more,
        reviews: reviews.items,
        more_reviews: reviews.more,
        recommendations: run.recommendations.output().unwrap_or_default(),
        errors,
        timings,
    })
}
