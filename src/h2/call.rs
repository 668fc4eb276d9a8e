//! One call in h2 mode, polled in its client connection's task: shed if too many are in
//! flight, placed on a backend (retried elsewhere only when the first certainly never saw
//! it), then relayed both ways — request body, response head, body and trailers — frame by
//! frame under both sides' flow control until it ends. No task of its own and no body pipe:
//! a call's frames are moved where they arrive.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response, request};
use metrics::counter;
use tokio::time::Instant;

use super::H2Proxy;
use super::methods::Method;
use super::pool::PoolError;
use super::reset;
use super::upload::Upload;
use crate::access_log::{CallRecord, Record};
use crate::backend::{ActiveGuard, Backend, Tried};
use crate::connect::ConnectError;
use crate::grpc::{self, Code};
use crate::metrics as m;
use crate::threads;

/// Calls in flight across the proxy, against `[h2] max_calls`: one atomic, no queue (the
/// excess is shed at once).
#[derive(Debug)]
pub(super) struct InFlight {
    count: AtomicUsize,
    /// A reload may change it; calls beyond a lowered one finish.
    max: AtomicUsize,
}

impl InFlight {
    pub(super) fn new(max: usize) -> Self {
        Self {
            count: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    pub(super) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A place for one more call, unless `max` are in flight.
    fn try_acquire(&self) -> Option<Slot<'_>> {
        let max = self.max.load(Ordering::Relaxed);
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(&self.count))
    }
}

/// One call's place among those in flight, given back when dropped.
#[derive(Debug)]
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a call's placement ended.
enum Placed {
    /// A backend answered with a response head; the rest is still to come.
    Answered {
        response: Response<RecvStream>,
        guard: ActiveGuard,
    },
    /// The proxy answers it itself, with this status (counted against `backend` when one
    /// was involved).
    Failed {
        backend: Option<Arc<Backend>>,
        code: Code,
        message: String,
    },
    /// The client went away first.
    Cancelled { backend: Option<Arc<Backend>> },
}

/// What came first while a call waited for its response head.
enum Waited {
    Head(Result<Response<RecvStream>, h2::Error>),
    ClientGone,
}

impl H2Proxy {
    /// Serves one call until it ends (or its connection task drops it).
    pub(super) async fn call(
        &self,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: SocketAddr,
    ) {
        let mut facts = Facts {
            started: Instant::now(),
            arrived: self.access_log.as_ref().map(|_| SystemTime::now()),
            method: self.methods.get(threads::current(), req.uri().path()),
            peer,
            retried: false,
            queued: false,
        };
        let Some(_slot) = self.in_flight.try_acquire() else {
            counter!(m::CALLS_SHED).increment(1);
            self.reject(
                &mut respond,
                None,
                &facts,
                Code::ResourceExhausted,
                "portshare: too many calls in flight",
                0,
            );
            return;
        };
        let (head, body) = req.into_parts();
        let mut upload = Upload::new(body);
        match self
            .place(&head, &mut upload, &mut respond, &mut facts)
            .await
        {
            Placed::Answered { response, guard } => {
                self.relay(response, guard, upload, respond, facts).await;
            }
            Placed::Failed {
                backend,
                code,
                message,
            } => self.reject(
                &mut respond,
                backend.as_deref(),
                &facts,
                code,
                &message,
                upload.received(),
            ),
            Placed::Cancelled { backend } => {
                let status = Code::Cancelled.as_u32();
                self.finish(&facts, backend.as_deref(), status, upload.received(), 0);
            }
        }
    }

    /// Finds a backend that answers the call with a response head, or says why none did.
    async fn place(
        &self,
        head: &request::Parts,
        upload: &mut Upload,
        respond: &mut SendResponse<Bytes>,
        facts: &mut Facts<'_>,
    ) -> Placed {
        let started = facts.started;
        let deadline = grpc::timeout_in(&head.headers).map(|t| started + t);
        let (queue_timeout, cap, attempts) = {
            let config = self.config.load();
            (
                config.queue_timeout,
                config.max_calls_per_backend,
                config.attempts,
            )
        };
        let queue_until = started + queue_timeout;
        let wait_until = deadline.map_or(queue_until, |d| d.min(queue_until));
        // A refused call is sent again at most once.
        let mut replayed = false;
        let mut tried = Tried::new();
        let mut last = String::from("no backend is ready");
        for attempt in 0..attempts {
            let picked = match self.backends.pick(&self.balancer, &tried, cap) {
                Some(guard) => Ok(guard),
                None => {
                    facts.queued = true;
                    self.backends
                        .pick_or_wait(&self.balancer, &tried, cap, wait_until)
                        .await
                }
            };
            let guard = match picked {
                Ok(guard) => guard,
                Err(unplaced) => {
                    let waited = format!("{:.1?}", unplaced.waited);
                    let (code, why) = if deadline.is_some_and(|d| d <= queue_until) {
                        (Code::DeadlineExceeded, "deadline exceeded")
                    } else {
                        (Code::Unavailable, "no backend could take the call")
                    };
                    let detail = if tried.is_empty() {
                        unplaced.why
                    } else {
                        format!("{}; last: {last}", unplaced.why)
                    };
                    return Placed::Failed {
                        backend: None,
                        code,
                        message: format!("portshare: {why} after waiting {waited} ({detail})"),
                    };
                }
            };
            let backend = Arc::clone(guard.backend());
            if attempt > 0 {
                facts.retried = true;
                counter!(m::CALL_RETRIES).increment(1);
            }
            // Recorded as tried only when it failed: every way out of this loop's body that
            // does not return is a failure.
            let deadline_passed = |what: &str| Placed::Failed {
                backend: Some(Arc::clone(&backend)),
                code: Code::DeadlineExceeded,
                message: format!("portshare: deadline exceeded {what}"),
            };
            let got = by_deadline(deadline, self.pool().get(&self.backends, &backend)).await;
            let mut send = match got {
                None => return deadline_passed("while connecting to a backend"),
                Some(Ok(send)) => send,
                Some(Err(PoolError::Connect(ConnectError::Local(e)))) => {
                    // Out of descriptors or ports here: no backend is at fault, and another
                    // would fail the same way.
                    return Placed::Failed {
                        backend: None,
                        code: Code::Unavailable,
                        message: format!("portshare: cannot connect to a backend here: {e}"),
                    };
                }
                Some(Err(e)) => {
                    // Reported to the set already (counted, maybe ejected): try another.
                    last = format!("{}: {e}", backend.name());
                    tried.add(&backend);
                    continue;
                }
            };
            // A handle that never opened a stream is ready at once, unless the connection
            // is gone.
            let Some(ready) = by_deadline(deadline, poll_fn(|cx| send.poll_ready(cx))).await else {
                return deadline_passed("waiting for the backend");
            };
            let head_only = upload.head_only();
            let opened = ready.and_then(|()| send.send_request(request_head(head), head_only));
            let (response, stream) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    // The connection takes no new stream (it failed, or the backend sent
                    // GOAWAY): the call never left, and the next one gets a fresh connection.
                    self.pool().invalidate(&backend);
                    last = format!("{}: {e}", backend.name());
                    tried.add(&backend);
                    continue;
                }
            };
            upload.attach(stream, head_only);
            let waited = by_deadline(deadline, wait_for_head(response, upload, respond)).await;
            match waited {
                None => return deadline_passed("waiting for the backend"),
                Some(Waited::ClientGone) => {
                    return Placed::Cancelled {
                        backend: Some(backend),
                    };
                }
                Some(Waited::Head(Ok(response))) => return Placed::Answered { response, guard },
                Some(Waited::Head(Err(e)))
                    if !replayed && reset::never_processed(&e) && upload.can_replay() =>
                {
                    // Refused unprocessed (REFUSED_STREAM, or beyond a GOAWAY's last
                    // stream), and all it was sent is recorded: once more, elsewhere. Only a
                    // GOAWAY retires the connection; REFUSED_STREAM concerns one stream.
                    replayed = true;
                    if e.is_go_away() {
                        self.pool().invalidate(&backend);
                    }
                    tracing::debug!(backend = backend.name(), error = %e, "backend refused the call unprocessed; sending it elsewhere");
                    last = format!("{}: {e}", backend.name());
                    tried.add(&backend);
                }
                Some(Waited::Head(Err(e))) => {
                    tracing::debug!(backend = backend.name(), error = %e, detail = ?e, "backend failed the call");
                    return Placed::Failed {
                        code: reset::code_for(&e),
                        message: format!(
                            "portshare: backend {} failed the call: {e}",
                            backend.name()
                        ),
                        backend: Some(backend),
                    };
                }
            }
        }
        Placed::Failed {
            backend: None,
            code: Code::Unavailable,
            message: format!("portshare: no backend could take the call ({last})"),
        }
    }

    /// Passes the backend's answer to the client, and the rest of the request to the
    /// backend, until the call ends; the call stays counted against its backend until then.
    async fn relay(
        &self,
        response: Response<RecvStream>,
        guard: ActiveGuard,
        mut upload: Upload,
        mut respond: SendResponse<Bytes>,
        facts: Facts<'_>,
    ) {
        let (head, from) = response.into_parts();
        self.metrics.in_flight.increment(1.0);
        let mut call = Call {
            // A Trailers-Only answer has its status in the head; any other has it in the
            // trailers.
            status: if from.is_end_stream() {
                grpc::status(&head.headers)
            } else {
                None
            },
            proxy: self,
            facts,
            guard,
            request_bytes: upload.received(),
            response_bytes: 0,
        };
        let end_stream = from.is_end_stream();
        let to = match respond.send_response(Response::from_parts(head, ()), end_stream) {
            Ok(to) => to,
            Err(e) => {
                tracing::debug!(error = %e, "the client's stream took no response");
                call.status = None;
                return;
            }
        };
        if end_stream {
            return;
        }
        let mut download = Download { from, to };
        poll_fn(|cx| {
            // The client may still be sending (a streaming call), and may leave at any time:
            // dropping both sides then resets the backend's stream.
            if let Poll::Ready(Err(_)) = upload.poll(cx) {
                call.status = None;
                return Poll::Ready(());
            }
            download.poll(cx, &mut call)
        })
        .await;
        call.request_bytes = upload.received();
    }

    /// Answers a call with a Trailers-Only status of the proxy's own.
    fn reject(
        &self,
        respond: &mut SendResponse<Bytes>,
        backend: Option<&Backend>,
        facts: &Facts<'_>,
        code: Code,
        message: &str,
        request_bytes: u64,
    ) {
        self.finish(facts, backend, code.as_u32(), request_bytes, 0);
        if let Err(e) = respond.send_response(grpc::trailers_only(code, message), true) {
            tracing::debug!(error = %e, "the client's stream took no answer");
        }
    }

    /// Counts a call that ended, against `backend` when one was involved, and writes its
    /// access-log line.
    fn finish(
        &self,
        facts: &Facts<'_>,
        backend: Option<&Backend>,
        status: u32,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        match backend {
            Some(b) => b.count_call(status),
            None => {
                counter!(m::CALLS, "backend" => "none", "grpc_status" => status.to_string())
                    .increment(1);
            }
        }
        let duration = facts.started.elapsed();
        facts.method.record(status, duration.as_secs_f64());
        if let (Some(log), Some(at)) = (&self.access_log, facts.arrived) {
            log.log(Record::Call(CallRecord {
                at,
                peer: facts.peer,
                method: facts.method.name().to_owned(),
                backend: backend.map(|b| b.name().to_owned()),
                grpc_status: status,
                duration,
                request_bytes,
                response_bytes,
                retried: facts.retried,
                queued: facts.queued,
            }));
        }
    }
}

/// What is known of a call for its metrics and its access-log line.
struct Facts<'a> {
    method: &'a Method,
    started: Instant,
    /// The wall-clock time it arrived, when there is an access log to write it in.
    arrived: Option<SystemTime>,
    peer: SocketAddr,
    /// Sent again to another backend.
    retried: bool,
    /// Waited for a backend that could take it.
    queued: bool,
}

/// The request head as sent to a backend: the client's, unchanged.
fn request_head(head: &request::Parts) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = head.method.clone();
    *r.uri_mut() = head.uri.clone();
    *r.version_mut() = head.version;
    *r.headers_mut() = head.headers.clone();
    r
}

/// Waits for the backend's response head while the request body goes out, watching for
/// the client leaving.
fn wait_for_head<'a>(
    mut response: ResponseFuture,
    upload: &'a mut Upload,
    respond: &'a mut SendResponse<Bytes>,
) -> impl Future<Output = Waited> + 'a {
    poll_fn(move |cx| {
        if let Poll::Ready(Err(_)) = upload.poll(cx) {
            return Poll::Ready(Waited::ClientGone);
        }
        if let Poll::Ready(head) = Pin::new(&mut response).poll(cx) {
            return Poll::Ready(Waited::Head(head));
        }
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(Waited::ClientGone);
        }
        Poll::Pending
    })
}

/// Runs `f`, bounded by the call's deadline when it has one; `None` once the deadline passed.
async fn by_deadline<F: Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// A call the backend answered: counted against it, with its status, when it ends.
struct Call<'a> {
    proxy: &'a H2Proxy,
    facts: Facts<'a>,
    /// Counts the call against its backend (p2c reads that).
    guard: ActiveGuard,
    /// The gRPC status, once seen; none when the call ended without one (the client went
    /// away, or the backend's stream ended bare).
    status: Option<u32>,
    /// DATA bytes from the client and to it.
    request_bytes: u64,
    response_bytes: u64,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.proxy.metrics.in_flight.decrement(1.0);
        let status = self.status.unwrap_or(Code::Cancelled.as_u32());
        self.proxy.finish(
            &self.facts,
            Some(self.guard.backend()),
            status,
            self.request_bytes,
            self.response_bytes,
        );
    }
}

/// The backend's response body and trailers on their way to the client.
struct Download {
    from: RecvStream,
    to: SendStream<Bytes>,
}

impl Download {
    /// Moves what the backend sent on to the client as far as the client's window allows;
    /// `Ready` once the call has ended, one way or another.
    fn poll(&mut self, cx: &mut Context<'_>, call: &mut Call<'_>) -> Poll<()> {
        loop {
            self.to.reserve_capacity(1);
            if self.to.capacity() == 0 {
                loop {
                    match ready!(self.to.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return self.client_gone(call),
                    }
                }
            } else if self.to.poll_reset(cx).is_ready() {
                return self.client_gone(call);
            }
            match ready!(self.from.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = self.from.flow_control().release_capacity(chunk.len());
                    call.response_bytes += chunk.len() as u64;
                    let end_stream = self.from.is_end_stream();
                    if self.to.send_data(chunk, end_stream).is_err() {
                        return self.client_gone(call);
                    }
                    if end_stream {
                        return Poll::Ready(());
                    }
                }
                Some(Err(e)) => return self.backend_failed(&e, call),
                None => match ready!(self.from.poll_trailers(cx)) {
                    Ok(Some(trailers)) => {
                        call.status = grpc::status(&trailers);
                        if self.to.send_trailers(trailers).is_err() {
                            return self.client_gone(call);
                        }
                        return Poll::Ready(());
                    }
                    Ok(None) => {
                        let _ = self.to.send_data(Bytes::new(), true);
                        return Poll::Ready(());
                    }
                    Err(e) => return self.backend_failed(&e, call),
                },
            }
        }
    }

    fn client_gone(&mut self, call: &mut Call<'_>) -> Poll<()> {
        call.status = None;
        Poll::Ready(())
    }

    /// The backend failed mid-call (reset, or its connection died): the call ends with the
    /// matching gRPC status rather than a bare reset.
    fn backend_failed(&mut self, e: &h2::Error, call: &mut Call<'_>) -> Poll<()> {
        let code = reset::code_for(e);
        call.status = Some(code.as_u32());
        let backend = call.guard.backend().name();
        tracing::debug!(backend, error = %e, "backend failed mid-call");
        let message = format!("portshare: backend {backend} failed mid-call: {e}");
        let _ = self.to.send_trailers(grpc::status_trailers(code, &message));
        Poll::Ready(())
    }
}
