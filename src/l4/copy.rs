//! l4's copy: bytes both ways between client and backend, holding memory only for bytes in
//! transit; the activity clock the idle timeout reads; per-side byte counting and failure
//! tracking.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes read but not yet written on: kept on the heap only while the writer pushes back.
#[derive(Debug, Default)]
struct Pump {
    /// Unwritten bytes (`start..`), when a write could not take everything at once.
    pending: Option<(Box<[u8]>, usize)>,
    /// The reader reached EOF; the writer gets a shutdown once `pending` is written.
    read_done: bool,
    /// Data was written since the last flush.
    need_flush: bool,
    /// The writer was shut down: this direction is finished.
    done: bool,
}

/// Read chunk size: one stack buffer per poll, never part of a connection's idle state.
const CHUNK: usize = 16 * 1024;

impl Pump {
    /// Moves bytes from `r` to `w` until `r` is exhausted and `w` shut down (half-close passed
    /// on). An idle connection holds no buffer: reads go through a stack buffer, and only
    /// what the writer cannot take at once is copied to the heap, until it is written.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some((buf, start)) = &mut self.pending {
                while *start < buf.len() {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[*start..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *start += n;
                    self.need_flush = true;
                }
                self.pending = None;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // Uninitialized: zeroing 16 KiB on every read showed up in profiles.
            let mut chunk = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut rb = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    // Nothing more to read now: make sure what was written goes out.
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let read = rb.filled();
            let n = read.len();
            if n == 0 {
                self.read_done = true;
                continue;
            }
            // Try to hand the bytes straight on; keep only what the writer refuses.
            let written = match Pin::new(&mut *w).poll_write(cx, read) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(m)) => m,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => 0,
            };
            if written > 0 {
                self.need_flush = true;
            }
            if written < n {
                self.pending = Some((read[written..].into(), 0));
            }
        }
    }
}

/// Copies both ways until both directions are finished (each reader at EOF and its writer
/// shut down), like `tokio::io::copy_bidirectional`, but holding memory only for bytes in
/// transit, so that thousands of idle connections cost next to nothing.
pub(super) async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Pump::default();
    let mut b_to_a = Pump::default();
    std::future::poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, a, b)?;
        let backward = b_to_a.poll_copy(cx, b, a)?;
        match (forward, backward) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
}

/// When bytes last moved on a connection, in milliseconds since it started; both copy
/// directions update it, and the idle watchdog reads it.
#[derive(Debug)]
pub(super) struct Activity {
    /// The connection's start.
    start: Instant,
    /// Milliseconds from `start` to the last read that returned data.
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    pub(super) async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that notes activity, counts the bytes read from it and remembers whether it failed.
pub(super) struct Tracked<'a, S> {
    inner: S,
    activity: &'a Activity,
    /// Adds read bytes to the backend's byte counter for this direction.
    report_to: &'a (dyn Fn(u64) + Sync),
    /// Bytes read so far.
    pub(super) total: u64,
    /// Bytes read but not yet added to the backend's byte counter; flushed in batches so a
    /// stream of small frames does not touch the shared counter on every read.
    unreported: u64,
    /// Whether a read or write on this side returned an error.
    pub(super) failed: bool,
}

/// Byte counts are flushed to the metrics at least this often (in bytes), so long-lived
/// connections show up in `/metrics` while they run, not only when they close.
const REPORT_EVERY: u64 = 64 * 1024;

impl<'a, S> Tracked<'a, S> {
    pub(super) fn new(
        inner: S,
        activity: &'a Activity,
        report_to: &'a (dyn Fn(u64) + Sync),
    ) -> Self {
        Self {
            inner,
            activity,
            report_to,
            total: 0,
            unreported: 0,
            failed: false,
        }
    }

    /// Hands the bytes not yet reported to the metric.
    pub(super) fn report(&mut self) {
        if self.unreported > 0 {
            (self.report_to)(self.unreported);
            self.unreported = 0;
        }
    }

    fn note<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.failed = true;
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.activity.touch();
            this.total += n;
            this.unreported += n;
            if this.unreported >= REPORT_EVERY {
                this.report();
            }
        }
        Poll::Ready(this.note(r))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_write(cx, buf));
        Poll::Ready(this.note(r))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        Poll::Ready(this.note(r))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
        Poll::Ready(this.note(r))
    }
}
