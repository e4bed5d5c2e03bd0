//! The database's lanes: one pool per worker thread, so a request's statements never cross
//! threads. Which lane a thread is in comes from the `lanes` crate; this module adds what is
//! particular to PostgreSQL: where a lane's connections are opened and driven.
//!
//! A tokio-postgres connection is a client handle plus a driver task, and the driver task runs on
//! the runtime that opened the connection. Under a server with one single-threaded runtime per
//! worker (actix-web's model), a request on worker A that borrows a connection opened on worker
//! B hands every statement to B's thread and gets every answer back from it: two cross-thread
//! wake-ups (an `eventfd` write and a context switch each) per round trip. Measured on the
//! dashboard before lanes: 3.8 such wake-ups among about 12 system calls per request.
//!
//! A [`Database`](crate::Database) built with several lanes keeps one pool per lane, each its
//! [`lanes::share`] of `max_size` connections. A worker thread that called
//! [`Database::adopt_thread`](crate::Database::adopt_thread) becomes its lane's home: it takes
//! connections from that lane, and (from its first request for one, or
//! [`Database::claim_home`](crate::Database::claim_home)) every connection of that lane is opened
//! on its runtime, even when another thread asked for it, so the driver task lives there.
//!
//! Which lane a caller takes from: [`Database::conn_in_lane`](crate::Database::conn_in_lane) is
//! for a caller that splits its own limit the same way (the service's database gate, which lends
//! a free slot of another lane rather than make a caller wait); [`Database::conn`](crate::Database::conn)
//! takes from the caller's lane when it has something free, else an idle connection of another
//! lane, else waits on its own lane.

use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;

use deadpool_postgres::Connect;
use futures::future::BoxFuture;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config};

use crate::tls::Tls;

/// The runtime (and thread) where a lane's connections are opened and driven.
#[derive(Debug)]
pub(crate) struct Home {
    handle: Handle,
    thread: ThreadId,
}

impl Home {
    pub(crate) fn of_current_thread() -> Option<Self> {
        Some(Self {
            handle: Handle::try_current().ok()?,
            thread: std::thread::current().id(),
        })
    }
}

/// Opens a lane's connections on the lane's home runtime once it has one, on the caller's
/// runtime before (start-up checks) or if the home runtime is gone.
#[derive(Debug)]
pub(crate) struct HomeConnect {
    pub(crate) home: Arc<OnceLock<Home>>,
    pub(crate) tls: Tls,
}

impl Connect for HomeConnect {
    fn connect(
        &self,
        pg_config: &Config,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        let config = pg_config.clone();
        let tls = self.tls.clone();
        let home = self
            .home
            .get()
            .filter(|home| home.thread != std::thread::current().id())
            .map(|home| home.handle.clone());
        Box::pin(async move {
            if let Some(handle) = home {
                // A task on the home runtime opens the socket there (registering it with that
                // runtime's reactor) and spawns the driver there.
                if let Ok(opened) = handle.spawn(open(config.clone(), tls.clone())).await {
                    return opened;
                }
                // The home runtime shut down (the server is stopping): open it here.
            }
            open(config, tls).await
        })
    }
}

/// Opens one connection and spawns its driver task on the current runtime.
async fn open(config: Config, tls: Tls) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let (client, connection) = tls.connect(&config).await?;
    let driver = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "pooled database connection ended");
        }
    });
    Ok((client, driver))
}
