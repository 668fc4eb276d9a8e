//! Windows process handling for workers. Every worker is put in one Job Object that is set
//! to kill its processes when closed: when portshare exits, however it exits, the handle
//! closes and the workers die with it. Each worker gets its own console process group, so a
//! Ctrl-C in the console reaches portshare alone, which drains before stopping workers.
//!
//! Windows has no SIGTERM for console programs; a worker is stopped with TerminateProcess
//! (after the drain, so no call of portshare's is in flight on it any more).

use std::io;

use tokio::process::{Child, Command};
use win32job::{ExtendedLimitInfo, Job};

/// CREATE_NEW_PROCESS_GROUP from the Windows API.
const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;

/// The Job Object every worker joins.
#[derive(Debug)]
pub struct Guard {
    job: Job,
}

impl Guard {
    /// Creates the kill-on-close job.
    pub fn new() -> io::Result<Self> {
        let mut info = ExtendedLimitInfo::new();
        info.limit_kill_on_job_close();
        let job =
            Job::create_with_limit_info(&info).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { job })
    }

    /// Spawns a worker and puts it in the job. A worker that cannot join the job still
    /// runs (it would merely outlive a killed portshare), so that is only logged.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let child = cmd.spawn()?;
        if let Some(handle) = child.raw_handle()
            && let Err(e) = self.job.assign_process(handle as isize)
        {
            tracing::warn!(error = %e, "cannot tie the worker's lifetime to portshare's");
        }
        Ok(child)
    }

    /// Nothing to do: Windows has no orphan reaping.
    pub fn forget(&self, _pid: Option<u32>) {}
}

/// Sets a command up before it is spawned.
pub fn prepare(cmd: &mut Command) {
    cmd.creation_flags(CREATE_NEW_PROCESS_GROUP);
}

/// Windows has no such signals; nothing sends them there.
pub fn forward(_pid: u32, _signal: super::Forwarded) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no Unix signals on Windows",
    ))
}

/// Asks a worker to stop. Without a console signal to send, this terminates it.
pub fn ask_to_stop(child: &mut Child) -> io::Result<()> {
    child.start_kill()
}

/// Stops a worker now.
pub fn force_stop(child: &mut Child) -> io::Result<()> {
    child.start_kill()
}
