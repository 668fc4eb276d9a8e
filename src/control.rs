//! Requests from outside to the running proxy: SIGHUP and `POST /workers/restart` ask for
//! a reload, SIGUSR1/SIGUSR2 are passed on to workers. Signals and the admin endpoint send
//! them; [`crate::run`] carries them out.

use tokio::sync::{mpsc, oneshot};

use crate::reload::Report;
use crate::supervisor::{Forwarded, RestartOutcome};

/// Requests from outside to the running proxy, from signals and the admin endpoint.
#[derive(Debug)]
pub enum Control {
    /// Reload the configuration (the TLS files with it) and replace spawned workers one at
    /// a time: SIGHUP, or
    /// `POST /workers/restart` (the way on Windows, which has no SIGHUP), which waits to
    /// hear how the restart ended.
    Reload(Option<oneshot::Sender<RestartOutcome>>),
    /// Read the configuration again and apply it (`POST /config/reload`): the answer is
    /// what changed, or why nothing did.
    ReloadConfig(oneshot::Sender<Result<Report, String>>),
    /// The configuration running now, as `portshare check` prints it (`GET /config`).
    ShowConfig(oneshot::Sender<String>),
    /// Pass a signal on to every spawned worker (SIGUSR1/SIGUSR2), as an init would.
    Forward(Forwarded),
}

/// The channel that carries [`Control`] requests into [`crate::run`].
#[derive(Debug)]
pub struct Controls {
    tx: mpsc::Sender<Control>,
    rx: mpsc::Receiver<Control>,
}

impl Default for Controls {
    fn default() -> Self {
        // A few pending requests at most: a reload that waits behind another adds nothing.
        let (tx, rx) = mpsc::channel(8);
        Self { tx, rx }
    }
}

impl Controls {
    /// A fresh channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where requests are sent from (the signal watcher).
    pub fn sender(&self) -> mpsc::Sender<Control> {
        self.tx.clone()
    }

    /// The sending and receiving halves, for [`crate::run`].
    pub(crate) fn into_parts(self) -> (mpsc::Sender<Control>, mpsc::Receiver<Control>) {
        (self.tx, self.rx)
    }
}
