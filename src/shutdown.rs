//! Shutdown: the signals that start it; one root token whose children stop the listeners,
//! close the connections and end the background work; the task trackers that every spawned
//! task is on; and the bounded drain and finish that end it.

use std::io;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::Control;
#[cfg(unix)]
use crate::supervisor::Forwarded;
use tokio_util::task::TaskTracker;

/// After the drain timeout, connections still open are told to close; this is how long
/// they get to do so before `run` returns regardless (closing a socket is immediate, so
/// this only covers tasks busy elsewhere).
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// How long the background tasks get to end once everything else has (a worker's output
/// still being relayed, an admin answer being written).
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// The shared shutdown state: cheap to clone, one per process (or per test instance).
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Cancelled last, when nothing needs the background tasks any more; every other token
    /// is its child, so cancelling it ends everything.
    root: CancellationToken,
    /// Cancelled when shutdown begins: listeners stop accepting.
    stop: CancellationToken,
    /// Cancelled when the drain time is over (or on a second signal): open connections close.
    abort: CancellationToken,
    /// Every client connection's task, so the drain can wait for them (and count them).
    tracker: TaskTracker,
    /// Every other spawned task: health checks, the admin listener and its connections,
    /// TLS file watching, metrics upkeep, the workers' output relays, rolling restarts,
    /// the drains of removed backends. They run until the root token is cancelled.
    background: TaskTracker,
}

impl Default for Shutdown {
    fn default() -> Self {
        let root = CancellationToken::new();
        Self {
            stop: root.child_token(),
            abort: root.child_token(),
            root,
            tracker: TaskTracker::new(),
            background: TaskTracker::new(),
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished by itself.
    Clean,
    /// This many connections were still open when the drain timeout ran out.
    Forced(usize),
}

impl Shutdown {
    /// A fresh state: nothing stopped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins a graceful shutdown: listeners stop accepting, open connections go on.
    pub fn begin(&self) {
        self.stop.cancel();
    }

    /// Closes open connections now, without waiting for the drain timeout.
    pub fn abort(&self) {
        self.stop.cancel();
        self.abort.cancel();
    }

    /// Cancelled when shutdown begins.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Cancelled when open connections must close.
    pub fn abort_token(&self) -> &CancellationToken {
        &self.abort
    }

    /// Tracks connection tasks.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Tracks every task that is not a client connection's.
    pub fn background(&self) -> &TaskTracker {
        &self.background
    }

    /// Cancelled when the background tasks must end: at [`Shutdown::finish`].
    pub fn finish_token(&self) -> CancellationToken {
        self.root.child_token()
    }

    /// The last step: cancels the root token, ending every background task, and waits (a
    /// bounded time) until they have.
    pub async fn finish(&self) {
        self.root.cancel();
        self.background.close();
        if tokio::time::timeout(FINISH_GRACE, self.background.wait())
            .await
            .is_err()
        {
            tracing::debug!(
                left = self.background.len(),
                "background tasks still running at exit"
            );
        }
    }

    /// Waits up to `timeout` for every tracked task to finish, then closes what is left.
    pub async fn drain(&self, timeout: Duration) -> Drained {
        self.tracker.close();
        tokio::select! {
            () = self.tracker.wait() => return Drained::Clean,
            () = tokio::time::sleep(timeout) => {}
            () = self.abort.cancelled() => {}
        }
        let left = self.tracker.len();
        self.abort.cancel();
        let _ = tokio::time::timeout(ABORT_GRACE, self.tracker.wait()).await;
        Drained::Forced(left)
    }
}

/// The signals that ask portshare to stop: SIGTERM and SIGINT on Unix, Ctrl-C and
/// Ctrl-Break on Windows; and SIGHUP, which asks for a reload. Created before the listeners are bound, so a signal that arrives
/// as soon as the listening address is logged is already handled.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
    #[cfg(unix)]
    usr1: tokio::signal::unix::Signal,
    #[cfg(unix)]
    usr2: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    ctrl_break: tokio::signal::windows::CtrlBreak,
}

impl Signals {
    /// Installs the handlers; needs a running tokio runtime.
    #[cfg(unix)]
    pub fn new() -> io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Installs the handlers; needs a running tokio runtime.
    #[cfg(windows)]
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            ctrl_c: tokio::signal::windows::ctrl_c()?,
            ctrl_break: tokio::signal::windows::ctrl_break()?,
        })
    }

    /// Waits for the next stop signal and returns its name; meanwhile passes SIGHUP (a
    /// reload) and SIGUSR1/SIGUSR2 (for the workers) on to `controls`.
    #[cfg(unix)]
    async fn recv(&mut self, controls: &mpsc::Sender<Control>) -> &'static str {
        loop {
            let control = tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    tracing::info!(signal = "SIGHUP", "reload requested");
                    Control::Reload(None)
                }
                _ = self.usr1.recv() => Control::Forward(Forwarded::Usr1),
                _ = self.usr2.recv() => Control::Forward(Forwarded::Usr2),
            };
            // A full queue already holds requests of this kind: this one adds nothing.
            let _ = controls.try_send(control);
        }
    }

    /// Waits for the next stop signal and returns its name (Windows has no SIGHUP).
    #[cfg(windows)]
    async fn recv(&mut self, _controls: &mpsc::Sender<Control>) -> &'static str {
        tokio::select! {
            _ = self.ctrl_c.recv() => "Ctrl-C",
            _ = self.ctrl_break.recv() => "Ctrl-Break",
        }
    }

    /// The first signal begins a graceful shutdown; a second one closes everything now,
    /// as people who press Ctrl-C twice expect.
    /// SIGHUP, SIGUSR1 and SIGUSR2 (Unix) become messages on `controls`.
    pub async fn watch(mut self, shutdown: Shutdown, controls: mpsc::Sender<Control>) {
        let first = self.recv(&controls).await;
        tracing::info!(
            signal = first,
            "shutting down: no new connections, open ones may finish"
        );
        shutdown.begin();
        let second = self.recv(&controls).await;
        tracing::warn!(
            signal = second,
            "second signal: closing open connections now"
        );
        shutdown.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn background_work_outlives_the_drain_and_ends_at_finish() {
        let s = Shutdown::new();
        let token = s.finish_token();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ended);
        let work = token.clone();
        s.background().spawn(async move {
            work.cancelled().await;
            flag.store(true, std::sync::atomic::Ordering::Release);
        });
        s.begin();
        assert_eq!(s.drain(Duration::from_secs(1)).await, Drained::Clean);
        assert!(s.stop_token().is_cancelled() && !token.is_cancelled());
        s.finish().await;
        assert!(ended.load(std::sync::atomic::Ordering::Acquire));
        assert!(s.background().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_that_finish_in_time() {
        let s = Shutdown::new();
        s.tracker()
            .spawn(tokio::time::sleep(Duration::from_secs(5)));
        assert_eq!(s.drain(Duration::from_secs(10)).await, Drained::Clean);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_aborts_what_outlives_the_timeout() {
        let s = Shutdown::new();
        let abort = s.abort_token().clone();
        let task = s.tracker().spawn(async move {
            tokio::select! {
                () = abort.cancelled() => "aborted",
                () = tokio::time::sleep(Duration::from_secs(3600)) => "finished",
            }
        });
        assert_eq!(s.drain(Duration::from_secs(1)).await, Drained::Forced(1));
        assert_eq!(task.await.ok(), Some("aborted"));
    }
}
