//! One middleware around every request: request id, tracing span, metrics, access log, the
//! in-flight count that graceful shutdown waits on, and a deadline on receiving the body.
//!
//! An incoming `X-Request-Id` that looks like an id (at most 128 characters of letters, digits and
//! `-_.:`) is kept, anything else is replaced by a fresh one; either way it is returned in the
//! response's `X-Request-Id` and recorded on the request's span, so every log line of the request
//! carries it. Metrics are labelled by route pattern (`/api/users/{user_id}/dashboard`), never by
//! raw path or arbitrary method, so hostile requests cannot grow the label set.
//!
//! actix-web cuts off a client that is slow to send its headers (`client_request_timeout`) but
//! not one that sends its body a byte at a time: such a client would hold a connection and a
//! handler for as long as it liked. So a request with a body must deliver all of it within the
//! same timeout, counted from the moment its headers are in; after that, reading the body fails
//! with [`BODY_TIMED_OUT`] and the request is answered 408 (see [`crate::error::json_error`]).

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::{
    CONTENT_ENCODING, CONTENT_LENGTH, HOST, HeaderName, HeaderValue, TRANSFER_ENCODING,
};
use actix_web::http::{ConnectionType, Method, Version};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage as _, ResponseError as _, web};
use futures::Stream;
use tracing::Instrument as _;

use crate::AppState;
use crate::error::ApiError;

/// The request id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn usable(id: &HeaderValue) -> Option<&str> {
    let text = id.to_str().ok()?;
    let ok = !text.is_empty()
        && text.len() <= 128
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then_some(text)
}

/// A fresh id: 16 hex digits of a per-thread splitmix64 sequence, seeded once per thread from the
/// operating system's randomness. Unpredictable enough for correlating logs (an id is not a
/// secret), and a fraction of the cost of `format!` over a `rand::random` (about 400 instructions
/// per request, measured with callgrind).
fn fresh_id() -> String {
    thread_local! {
        static NEXT: std::cell::Cell<u64> = std::cell::Cell::new(rand::random());
    }
    let mut x = NEXT.with(|next| {
        let x = next.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        next.set(x);
        x
    });
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits: Vec<u8> = (0..16)
        .rev()
        .map(|i| HEX[((x >> (i * 4)) & 0xf) as usize])
        .collect();
    String::from_utf8(digits).unwrap_or_default()
}

/// The method as a metric label: one of the standard methods, or `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Requests accepted and not yet fully answered, and whether the server is draining them.
///
/// A request counts from the moment the middleware sees it until its response body has been
/// written out and dropped, so a drained count means every accepted request got its whole answer.
/// While draining, every response closes its connection (see [`crate::ShutdownHandle`]).
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    count: Arc<AtomicUsize>,
    draining: Arc<AtomicBool>,
}

impl InFlight {
    /// Requests in flight now.
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// From now on, every response closes its connection.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether the server is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn enter(&self) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.count.clone())
    }
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it is dropped, which the
    /// server does once the body has been written out (or the connection failed).
    pub struct Tracked<B> {
        #[pin]
        body: B,
        guard: Option<InFlightGuard>,
    }
}

impl<B: MessageBody> MessageBody for Tracked<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<bytes::Bytes, Self::Error>>> {
        self.project().body.poll_next(cx)
    }
}

/// The message of the I/O error a body that took too long to arrive ends with.
pub const BODY_TIMED_OUT: &str = "the request body did not arrive in time";

pin_project_lite::pin_project! {
    /// A request body that fails once its deadline has passed.
    pub struct BodyDeadline<S> {
        #[pin]
        body: S,
        #[pin]
        deadline: tokio::time::Sleep,
        expired: bool,
    }
}

impl<S> BodyDeadline<S> {
    /// Wraps `body`, which must end within `timeout` from now.
    pub fn new(body: S, timeout: std::time::Duration) -> Self {
        Self {
            body,
            deadline: tokio::time::sleep(timeout),
            expired: false,
        }
    }
}

impl<S: Stream<Item = Result<bytes::Bytes, PayloadError>>> Stream for BodyDeadline<S> {
    type Item = Result<bytes::Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        // Data already there wins over the deadline, as with `tokio::time::timeout`.
        if let Poll::Ready(item) = this.body.poll_next(cx) {
            return Poll::Ready(item);
        }
        if this.deadline.poll(cx).is_ready() {
            *this.expired = true;
            return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                BODY_TIMED_OUT,
            )))));
        }
        Poll::Pending
    }
}

/// Whether the request announces a body.
fn has_body(request: &ServiceRequest) -> bool {
    let headers = request.headers();
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// The route pattern a resource is registered under, as resource data: the metrics label, read
/// without matching the path again.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

/// The middleware function; see the module documentation.
///
/// # Errors
///
/// Passes on the inner service's error.
pub async fn observe(
    mut request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let state = request.app_data::<web::Data<AppState>>().cloned();
    let guard = state.as_ref().map(|state| state.in_flight.enter());
    if let Some(state) = state.as_ref().filter(|_| has_body(&request)) {
        let body = request.take_payload();
        request.set_payload(Payload::Stream {
            payload: Box::pin(BodyDeadline::new(body, state.body_timeout)),
        });
    }
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(usable)
        .map_or_else(fresh_id, ToOwned::to_owned);
    let method = method_label(request.method());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method,
        path = %request.path(),
    );
    let closing = request
        .conn_data::<Closing>()
        .map(|closing| Rc::clone(&closing.0));
    let client_closes = request.head().connection_type() == ConnectionType::Close;
    let refused = if closing.as_ref().is_some_and(|closing| closing.get()) {
        // Pipelined behind a request after which this connection closes (actix-http would
        // still serve it): not run, whatever it is.
        Some(ApiError::bad_request(
            "connection_closing",
            "this connection closes after an earlier request; send this one on a new connection",
        ))
    } else {
        framing_problem(&request)
    };
    let result = match &refused {
        Some(error) => {
            let response = error.error_response();
            Ok(request.into_response(response).map_into_right_body())
        }
        None => next
            .call(request)
            .instrument(span.clone())
            .await
            .map(ServiceResponse::map_into_left_body),
    };
    let elapsed = started.elapsed();
    let _entered = span.enter();
    match result {
        Ok(mut response) => {
            let status = response.status();
            let route = response
                .request()
                .app_data::<RouteLabel>()
                .map_or("unmatched", |label| label.0);
            if let Some(state) = &state {
                state
                    .metrics
                    .observe_request(route, method, status.as_u16(), elapsed);
            }
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            if refused.is_some()
                || state
                    .as_ref()
                    .is_some_and(|state| state.in_flight.is_draining())
            {
                // Shutting down, or a request whose framing cannot be trusted (whatever follows
                // it on the connection might be a smuggled request): this connection takes no
                // further request.
                response
                    .response_mut()
                    .head_mut()
                    .set_connection_type(ConnectionType::Close);
            }
            if let Some(closing) = &closing
                && (client_closes
                    || response.response().head().connection_type() == ConnectionType::Close)
            {
                closing.set(true);
            }
            let millis = elapsed.as_secs_f64() * 1000.0;
            if status.is_server_error() {
                tracing::warn!(status = status.as_u16(), millis, %route, "request failed");
            } else {
                tracing::debug!(status = status.as_u16(), millis, %route, "request finished");
            }
            Ok(response.map_body(move |_, body| Tracked { body, guard }))
        }
        Err(error) => {
            let status = error.as_response_error().status_code();
            if let Some(state) = &state {
                state
                    .metrics
                    .observe_request("unmatched", method, status.as_u16(), elapsed);
            }
            tracing::warn!(status = status.as_u16(), %error, "request failed");
            Err(error)
        }
    }
}

/// Per connection (stored by the server's `on_connect`): set once a request on the connection
/// was answered with `Connection: close` or asked for it, so that requests pipelined behind it
/// are not run (RFC 9112 section 9.6). actix-http writes the close and still serves requests it
/// had already read from the socket.
#[derive(Debug, Default)]
pub struct Closing(Rc<Cell<bool>>);

/// A request that names its body length two ways, or its host zero or several times, is refused
/// (RFC 9112 sections 6.1 and 3.2), and so is an encoded body. Both are what request smuggling through a proxy relies on:
/// a proxy that frames by `Content-Length` sees one request where this server, framing by
/// `Transfer-Encoding`, would see two.
fn framing_problem(request: &ServiceRequest) -> Option<ApiError> {
    let headers = request.headers();
    if headers.contains_key(TRANSFER_ENCODING) && headers.contains_key(CONTENT_LENGTH) {
        return Some(ApiError::bad_request(
            "ambiguous_framing",
            "a request may not carry both Content-Length and Transfer-Encoding",
        ));
    }
    // A body this server would read as-is although the client says it is encoded (gzip, br):
    // refused rather than misread (RFC 9110 section 15.5.16).
    if let Some(encoding) = headers.get(CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Some(ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding",
            "request bodies are read as sent: Content-Encoding is not supported",
        ));
    }
    let hosts = headers.get_all(HOST).count();
    if request.version() == Version::HTTP_11 && hosts != 1 {
        return Some(ApiError::bad_request(
            "invalid_host",
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_id_like_values_are_kept() {
        let keep = HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(usable(&keep), Some("abc-123_x.y:z"));
        for bad in ["", "has space", "semi;colon", "quote\"", "<script>"] {
            assert_eq!(
                usable(&HeaderValue::from_str(bad).unwrap()),
                None,
                "{bad:?}"
            );
        }
        let long = HeaderValue::from_str(&"a".repeat(129)).unwrap();
        assert_eq!(usable(&long), None);
        assert_eq!(fresh_id().len(), 16);
    }

    #[test]
    fn unusual_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
