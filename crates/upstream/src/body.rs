//! The response body type: either one buffer, or a large padded document streamed from a static
//! buffer so that an oversized answer costs no memory.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// The padding chunk of oversized bodies. Streaming it repeatedly keeps a 1 GiB answer cheap.
static PADDING: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// A response body.
#[derive(Debug)]
pub(crate) enum ResponseBody {
    /// A whole body; `None` once sent.
    Full(Option<Bytes>),
    /// `head`, then `padding` bytes of `x`, then `tail`.
    Padded {
        head: Option<Bytes>,
        padding: usize,
        tail: Option<Bytes>,
        /// Whether the exact length is announced up front (`Content-Length`) or left to chunked
        /// encoding.
        declared: bool,
    },
}

impl ResponseBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }

    /// A valid JSON document of exactly `total` bytes (or slightly more when `total` is smaller
    /// than the JSON scaffolding): `{"items":[],"padding":"xxx…"}`.
    pub(crate) fn oversized(total: usize, declared: bool) -> Self {
        const HEAD: &[u8] = br#"{"items":[],"padding":""#;
        const TAIL: &[u8] = br#""}"#;
        Self::Padded {
            head: Some(Bytes::from_static(HEAD)),
            padding: total.saturating_sub(HEAD.len() + TAIL.len()),
            tail: Some(Bytes::from_static(TAIL)),
            declared,
        }
    }

    fn remaining(&self) -> usize {
        match self {
            Self::Full(bytes) => bytes.as_ref().map_or(0, Bytes::len),
            Self::Padded {
                head,
                padding,
                tail,
                ..
            } => {
                head.as_ref().map_or(0, Bytes::len) + padding + tail.as_ref().map_or(0, Bytes::len)
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let next = match self.get_mut() {
            Self::Full(bytes) => bytes.take(),
            Self::Padded {
                head,
                padding,
                tail,
                ..
            } => {
                if let Some(head) = head.take() {
                    Some(head)
                } else if *padding > 0 {
                    let n = (*padding).min(PADDING.len());
                    *padding -= n;
                    Some(Bytes::from_static(&PADDING[..n]))
                } else {
                    tail.take()
                }
            }
        };
        Poll::Ready(next.map(|bytes| Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining() == 0
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Padded {
                declared: false, ..
            } => SizeHint::default(),
            // An exact hint makes hyper send `Content-Length`.
            _ => SizeHint::with_exact(self.remaining() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn drain(mut body: ResponseBody) -> Vec<u8> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert!(body.is_end_stream());
        out
    }

    #[test]
    fn oversized_bodies_are_valid_json_of_the_requested_size() {
        for total in [100, 64 * 1024 + 7, 300_000] {
            let body = ResponseBody::oversized(total, true);
            assert_eq!(body.size_hint().exact(), Some(total as u64));
            let bytes = drain(body);
            assert_eq!(bytes.len(), total);
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(value["items"], serde_json::json!([]));
        }
    }

    #[test]
    fn chunked_bodies_announce_no_length() {
        let body = ResponseBody::oversized(1000, false);
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(drain(body).len(), 1000);
    }

    #[test]
    fn full_bodies_are_sent_once() {
        let body = ResponseBody::full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(drain(body), b"hello");
    }
}
