//! Unix process handling for workers. Each worker leads its own process group, so a signal
//! reaches whatever it started too, and a terminal's Ctrl-C reaches portshare alone, which
//! then drains before it stops the workers. On Linux, the parent-death signal kills a worker
//! when portshare itself dies, even by SIGKILL.
//!
//! This is the crate's one use of `unsafe`: `pre_exec`, to set that signal in the child.
#![allow(unsafe_code)]

use std::io;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::{Child, Command};

/// What outlives one spawn: nothing on Unix (process groups need no handle).
#[derive(Debug, Default)]
pub struct Guard;

impl Guard {
    /// Nothing to set up.
    pub fn new() -> io::Result<Self> {
        Ok(Guard)
    }

    /// Nothing to do: the process group was set at spawn.
    pub fn adopt(&self, _child: &Child) -> io::Result<()> {
        Ok(())
    }
}

/// Sets a command up before it is spawned.
pub fn prepare(cmd: &mut Command) {
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = rustix::process::getpid();
        // SAFETY: the closure runs in the forked child before exec. It makes only
        // async-signal-safe system calls (prctl, getppid) and allocates nothing, as code
        // between fork and exec in a multi-threaded process must. The death signal fires
        // when the *thread* that forked exits; workers are spawned from tokio's worker
        // threads, which live as long as the runtime.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                    .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?;
                // portshare may have died between fork and prctl: then no signal will come.
                if rustix::process::getppid() != Some(parent) {
                    return Err(io::Error::from_raw_os_error(
                        rustix::io::Errno::SRCH.raw_os_error(),
                    ));
                }
                Ok(())
            });
        }
    }
}

fn signal_group(child: &Child, signal: Signal) -> io::Result<()> {
    let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw)
    else {
        return Ok(()); // already reaped
    };
    match kill_process_group(pid, signal) {
        Ok(()) => Ok(()),
        // The group is gone: the worker exited on its own meanwhile.
        Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
        Err(e) => Err(io::Error::from_raw_os_error(e.raw_os_error())),
    }
}

/// Asks a worker (and its process group) to stop: SIGTERM.
pub fn ask_to_stop(child: &mut Child) -> io::Result<()> {
    signal_group(child, Signal::TERM)
}

/// Stops a worker (and its process group) now: SIGKILL.
pub fn force_stop(child: &mut Child) -> io::Result<()> {
    signal_group(child, Signal::KILL)
}
