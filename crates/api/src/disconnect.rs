//! Noticing that a client went away, so its request's work stops.
//!
//! hyper drops a handler's future when the client disconnects; actix-web's HTTP/1 dispatcher does
//! not, as long as the handler has nothing to write (actix-web issues #1313 and #3462): a
//! dashboard whose client left would keep its task group, its database statements and its
//! recommendation call running to the end. So the server keeps, per connection, a second handle
//! on the socket (a duplicated file descriptor, registered with the worker's reactor), and a
//! handler races its work against [`PeerSocket::closed`]. When the peer closes or resets the
//! connection, the work's future is dropped: the task group aborts every child, and the
//! repository cancels abandoned statements on the server.
//!
//! Only a closed or reset connection counts. A client that half-closes its side after sending
//! its request (allowed by TCP, rare in HTTP clients) is treated as gone, as hyper treats it. Bytes waiting on the socket (a pipelined next
//! request) mean the client is still there; monitoring then stops for that request.

use std::any::Any;
use std::os::fd::AsFd;
use std::sync::Arc;

use actix_web::dev::Extensions;

/// A second handle on a client connection's socket, only ever peeked at.
#[derive(Debug, Clone)]
pub struct PeerSocket(Arc<tokio::net::TcpStream>);

impl PeerSocket {
    /// Resolves when the client has closed or reset the connection; never resolves while it is
    /// connected.
    pub async fn closed(&self) {
        // Wait for the reactor to report the socket readable before peeking. The request's own
        // bytes usually leave that flag set, so a request typically costs one peek that finds
        // nothing (EAGAIN) and then waits on the reactor without further system calls.
        if self.0.ready(tokio::io::Interest::READABLE).await.is_err() {
            return;
        }
        let mut byte = [0u8; 1];
        match self.0.peek(&mut byte).await {
            // End of stream: the client closed its side. An error: the connection was reset.
            Ok(0) | Err(_) => {}
            // Data is waiting: the client is there and pipelining. Peeking again would return at
            // once, so stop watching.
            Ok(_) => std::future::pending().await,
        }
    }
}

/// `HttpServer::on_connect` callback: stores a [`PeerSocket`] in the connection's data.
/// Connections whose socket cannot be duplicated are served without one (and without
/// disconnect detection).
pub fn on_connect(connection: &dyn Any, data: &mut Extensions) {
    let Some(tcp) = connection.downcast_ref::<tokio::net::TcpStream>() else {
        return;
    };
    let Ok(fd) = tcp.as_fd().try_clone_to_owned() else {
        return;
    };
    let socket = std::net::TcpStream::from(fd);
    if socket.set_nonblocking(true).is_err() {
        return;
    }
    if let Ok(socket) = tokio::net::TcpStream::from_std(socket) {
        data.insert(PeerSocket(Arc::new(socket)));
    }
}

/// Runs `work` unless the client behind `request` goes away first; `None` then.
pub async fn unless_disconnected<T>(
    request: &actix_web::HttpRequest,
    work: impl Future<Output = T>,
) -> Option<T> {
    match request.conn_data::<PeerSocket>() {
        Some(peer) => {
            tokio::select! {
                // Biased: a finished answer is sent even if the client is already gone.
                biased;
                output = work => Some(output),
                () = peer.closed() => None,
            }
        }
        None => Some(work.await),
    }
}
