//! Connection resets on demand: a TCP stream wrapper whose close can be made abortive.
//!
//! hyper owns the connection's stream, so the handler that decides to inject a reset cannot reach
//! the socket. It flips a shared switch instead and returns an error; hyper then drops the stream,
//! and the wrapper's `Drop` sets `SO_LINGER` to zero just before the socket closes, which makes the
//! kernel send RST instead of FIN. Nothing changes for connections that are not reset.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

/// The handler's side: arms the reset of its connection.
#[derive(Debug, Clone)]
pub(crate) struct ResetSwitch(Arc<AtomicBool>);

impl ResetSwitch {
    /// Makes the connection's close, which the caller triggers next, send RST.
    pub(crate) fn arm(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A `TcpStream` that closes with RST once its [`ResetSwitch`] is armed.
#[derive(Debug)]
pub(crate) struct ResettableStream {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl ResettableStream {
    pub(crate) fn new(stream: TcpStream) -> (Self, ResetSwitch) {
        let reset = Arc::new(AtomicBool::new(false));
        (
            Self {
                stream,
                reset: reset.clone(),
            },
            ResetSwitch(reset),
        )
    }
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Acquire) {
            // `self.stream` closes right after this, with the option in effect.
            if let Err(error) =
                socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO))
            {
                debug!(%error, "could not set SO_LINGER; the reset will be a plain close");
            }
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
