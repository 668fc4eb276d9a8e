//! A call's request body on its way from the client's stream to the backend's, under both
//! sides' flow control, with a copy kept (up to a cap) so that a call the backend refused
//! unprocessed (REFUSED_STREAM, or a GOAWAY that excludes it) can be sent again to another
//! backend: the recorded frames first, then the rest of the client's body. Once the copy
//! would exceed the cap, nothing more is kept and the call can no longer be sent again.

use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::HeaderMap;

/// How much of a request body is kept for a retry: a unary call or the start of a stream.
/// Beyond it a refused call fails instead of being retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// One call's request body.
#[derive(Debug)]
pub struct Upload {
    /// The client's side.
    from: RecvStream,
    /// The current attempt's stream to the backend, while it still takes the body.
    to: Option<SendStream<Bytes>>,
    /// The DATA the client sent so far, while it fits [`REPLAY_LIMIT`].
    recorded: Vec<Bytes>,
    /// The client's trailers, once they came.
    trailers: Option<HeaderMap>,
    /// Bytes in `recorded`.
    size: usize,
    /// Set once something the client sent was not kept: a replay would be incomplete.
    overflowed: bool,
    /// DATA bytes the client sent so far.
    received: u64,
    /// Set once the client's side has ended: it is not read again (an ended HTTP/2 stream
    /// is not guaranteed to keep answering "ended").
    ended: bool,
}

impl Upload {
    /// The body of a request whose head has arrived.
    pub fn new(from: RecvStream) -> Self {
        Self {
            ended: from.is_end_stream(),
            from,
            received: 0,
            to: None,
            recorded: Vec::new(),
            trailers: None,
            size: 0,
            overflowed: false,
        }
    }

    /// Whether the request is its head alone (no DATA, no trailers): the head is then sent
    /// with END_STREAM.
    pub fn head_only(&self) -> bool {
        self.ended && self.recorded.is_empty() && self.trailers.is_none() && !self.overflowed
    }

    /// DATA bytes the client sent so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether everything a backend may have received is recorded, so it can be sent again.
    pub fn can_replay(&self) -> bool {
        !self.overflowed
    }

    /// Starts an attempt on `to`, a stream whose head went out with END_STREAM when
    /// `head_ended`: what was recorded goes first, the rest as [`Upload::poll`] reads it.
    pub fn attach(&mut self, mut to: SendStream<Bytes>, head_ended: bool) {
        self.to = None;
        if head_ended {
            return;
        }
        let count = self.recorded.len();
        for (i, chunk) in self.recorded.iter().enumerate() {
            let last = i + 1 == count && self.ended && self.trailers.is_none();
            if to.send_data(chunk.clone(), last).is_err() {
                return;
            }
        }
        if let Some(trailers) = &self.trailers {
            let _ = to.send_trailers(trailers.clone());
            return;
        }
        if self.ended {
            if count == 0 {
                let _ = to.send_data(Bytes::new(), true);
            }
            return;
        }
        self.to = Some(to);
    }

    /// Moves what the client sent on to the backend as far as the backend's window allows.
    /// `Ready(Ok)` once the body is all out (or the backend's stream takes no more: its
    /// answer tells what happened); `Err` when the client's side failed (it reset the
    /// stream, or its connection is gone).
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        loop {
            let Some(to) = self.to.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            // Room for at least one byte before reading on, as hyper's body pipe does: one
            // frame at most waits in h2's buffer for the backend's window.
            to.reserve_capacity(1);
            if to.capacity() == 0 {
                loop {
                    match ready!(to.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => {
                            self.to = None;
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            }
            match ready!(self.from.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = self.from.flow_control().release_capacity(chunk.len());
                    self.received += chunk.len() as u64;
                    self.ended = self.from.is_end_stream();
                    let sent = to.send_data(chunk.clone(), self.ended);
                    self.record(chunk);
                    if sent.is_err() || self.ended {
                        self.to = None;
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {
                    let trailers = ready!(self.from.poll_trailers(cx))?;
                    self.ended = true;
                    match trailers {
                        Some(trailers) => {
                            if !self.overflowed {
                                self.trailers = Some(trailers.clone());
                            }
                            let _ = to.send_trailers(trailers);
                        }
                        None => {
                            let _ = to.send_data(Bytes::new(), true);
                        }
                    }
                    self.to = None;
                }
            }
        }
    }

    fn record(&mut self, chunk: Bytes) {
        if self.overflowed {
            return;
        }
        if self.size + chunk.len() <= REPLAY_LIMIT {
            self.size += chunk.len();
            self.recorded.push(chunk);
        } else {
            self.overflowed = true;
            self.recorded = Vec::new();
        }
    }
}
