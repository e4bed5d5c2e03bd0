//! What a connection needs besides HTTP: opening a connection, sorting I/O errors into report kinds, and the
//! per-connection watchdog that bounds every wait.
//!
//! Rather than a fresh timer per request, each connection keeps one *watchdog* timer. It is only
//! re-armed when it fires before the current request's deadline (at most once per timeout period,
//! since deadlines only move forward), and a wait that reaches its deadline has timed out. That
//! saves inserting and removing a timer on every request.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    net::TcpStream,
    time::{Instant, Sleep, sleep_until},
};

use crate::stats::TransportError;

/// The largest body the generator reads; a larger one is an error, not an unbounded buffer.
pub(crate) const MAX_BODY: u64 = 64 * 1024 * 1024;

/// Opens a TCP connection with Nagle's algorithm off.
pub(crate) async fn connect(addr: SocketAddr) -> Result<TcpStream, TransportError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| connect_error(&e))?;
    // Requests are single writes, so Nagle's algorithm could only add delay.
    stream.set_nodelay(true).map_err(|e| connect_error(&e))?;
    Ok(stream)
}

/// Sorts a connection failure into a report kind.
pub(crate) fn connect_error(error: &io::Error) -> TransportError {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => TransportError::ConnectRefused,
        io::ErrorKind::TimedOut => TransportError::ConnectTimeout,
        _ => TransportError::ConnectFailed,
    }
}

/// Sorts an I/O failure on an open connection into a report kind.
pub(crate) fn io_error(error: &io::Error) -> TransportError {
    match error.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TransportError::Reset,
        io::ErrorKind::TimedOut => TransportError::Timeout,
        io::ErrorKind::UnexpectedEof => TransportError::Closed,
        _ => TransportError::Io,
    }
}

/// The connection's watchdog, armed for `deadline` (created on first use).
pub(crate) fn arm(
    watchdog: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
) -> &mut Pin<Box<Sleep>> {
    let watchdog = watchdog.get_or_insert_with(|| Box::pin(sleep_until(deadline)));
    if watchdog.deadline() > deadline {
        watchdog.as_mut().reset(deadline);
    }
    watchdog
}

/// Waits for `inner` unless the watchdog reaches `deadline` first (then `None`).
pub(crate) struct Bounded<'a, F> {
    pub inner: F,
    pub watchdog: &'a mut Pin<Box<Sleep>>,
    pub deadline: Instant,
}

impl<F: Future + Unpin> Future for Bounded<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(output) = Pin::new(&mut this.inner).poll(cx) {
            return Poll::Ready(Some(output));
        }
        loop {
            match this.watchdog.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if this.watchdog.deadline() >= this.deadline => {
                    return Poll::Ready(None);
                }
                // It was armed for an earlier request: re-arm it for this one and wait on.
                Poll::Ready(()) => this.watchdog.as_mut().reset(this.deadline),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A future that is ready at a given instant of the paused clock.
    struct At(Pin<Box<Sleep>>);

    impl Future for At {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.as_mut().poll(cx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_cuts_at_each_deadline_and_rearms_lazily() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut watchdog = None;
        // First wait: deadline 100ms, the work would take 50ms.
        let w = arm(&mut watchdog, start + ms(100));
        let work = At(Box::pin(sleep_until(start + ms(50))));
        assert_eq!(
            Bounded {
                inner: work,
                watchdog: w,
                deadline: start + ms(100)
            }
            .await,
            Some(())
        );
        // Second wait: deadline 150ms, the work would take 200ms. The watchdog, still armed for
        // 100ms, fires early, is re-armed, and cuts the wait at exactly 150ms.
        let w = arm(&mut watchdog, start + ms(150));
        assert_eq!(w.deadline(), start + ms(100));
        let work = At(Box::pin(sleep_until(start + ms(200))));
        assert_eq!(
            Bounded {
                inner: work,
                watchdog: w,
                deadline: start + ms(150)
            }
            .await,
            None
        );
        assert_eq!(Instant::now(), start + ms(150));
        // A deadline earlier than the armed one re-arms it at once.
        let mut fresh = None;
        arm(&mut fresh, start + ms(500));
        assert_eq!(arm(&mut fresh, start + ms(170)).deadline(), start + ms(170));
    }

    #[test]
    fn io_errors_are_sorted() {
        let kind = |k| io_error(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::ConnectionReset), TransportError::Reset);
        assert_eq!(kind(io::ErrorKind::BrokenPipe), TransportError::Reset);
        assert_eq!(kind(io::ErrorKind::UnexpectedEof), TransportError::Closed);
        assert_eq!(kind(io::ErrorKind::Other), TransportError::Io);
        let connect = |k| connect_error(&io::Error::from(k));
        assert_eq!(
            connect(io::ErrorKind::ConnectionRefused),
            TransportError::ConnectRefused
        );
        assert_eq!(
            connect(io::ErrorKind::AddrNotAvailable),
            TransportError::ConnectFailed
        );
    }
}
