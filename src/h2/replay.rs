//! A request body that can be sent twice. It passes the client's body to the backend frame
//! by frame, keeping a copy (up to a cap); if the backend refuses the stream without
//! processing it (REFUSED_STREAM, or a GOAWAY that excludes it), the call is sent again to
//! another backend: the recorded frames first, then the rest of the client's body. Once the
//! copy would exceed the cap, nothing more is kept and the call can no longer be retried.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// How much of a request body is kept for a retry: a unary call or the start of a stream.
/// Beyond it a refused call fails instead of being retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

#[derive(Debug)]
enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

#[derive(Debug)]
struct State {
    /// The client's body; taken by nobody, polled under the lock by the current attempt.
    source: Incoming,
    /// What the source has yielded so far, while it fits the limit.
    recorded: Vec<Recorded>,
    /// Bytes in `recorded`.
    size: usize,
    /// Set once something yielded was not kept: a replay would be incomplete.
    overflowed: bool,
    /// Set once the source has ended: a later attempt must not poll it again (an ended
    /// HTTP/2 stream is not guaranteed to keep answering "ended").
    source_done: bool,
}

/// The shared recording of one call's request body.
#[derive(Debug, Clone)]
pub struct Replay(Arc<Mutex<State>>);

impl Replay {
    /// Wraps a client's request body.
    pub fn new(source: Incoming) -> Self {
        Replay(Arc::new(Mutex::new(State {
            source,
            recorded: Vec::new(),
            size: 0,
            overflowed: false,
            source_done: false,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A body for the next attempt: the recorded frames, then the rest of the source.
    pub fn body(&self) -> ReplayBody {
        ReplayBody {
            replay: self.clone(),
            next: 0,
        }
    }

    /// Whether everything a backend may have received is recorded, so it can be sent again.
    pub fn can_replay(&self) -> bool {
        !self.lock().overflowed
    }
}

/// One attempt's view of the request body.
#[derive(Debug)]
pub struct ReplayBody {
    replay: Replay,
    /// The next recorded frame this attempt sends.
    next: usize,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut state = this.replay.lock();
        if let Some(frame) = state.recorded.get(this.next) {
            let frame = match frame {
                Recorded::Data(b) => Frame::data(b.clone()),
                Recorded::Trailers(t) => Frame::trailers(t.clone()),
            };
            this.next += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if state.source_done {
            return Poll::Ready(None);
        }
        let polled = ready!(Pin::new(&mut state.source).poll_frame(cx));
        if polled.is_none() {
            state.source_done = true;
        }
        if let Some(Ok(frame)) = &polled {
            let size = frame.data_ref().map_or(0, Bytes::len);
            if !state.overflowed && state.size + size <= REPLAY_LIMIT {
                let copy = match (frame.data_ref(), frame.trailers_ref()) {
                    (Some(d), _) => Some(Recorded::Data(d.clone())),
                    (None, Some(t)) => Some(Recorded::Trailers(t.clone())),
                    _ => None,
                };
                if let Some(copy) = copy {
                    state.recorded.push(copy);
                    state.size += size;
                    this.next = state.recorded.len();
                }
            } else {
                state.overflowed = true;
                state.recorded.clear();
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        let state = self.replay.lock();
        self.next >= state.recorded.len() && (state.source_done || state.source.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let state = self.replay.lock();
        if self.next >= state.recorded.len() {
            state.source.size_hint()
        } else {
            SizeHint::default()
        }
    }
}
