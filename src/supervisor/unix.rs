//! Unix process handling for workers. Each worker leads its own process group, so a signal
//! reaches whatever it started too, and a terminal's Ctrl-C reaches portshare alone, which
//! then drains before it stops the workers. On Linux, the parent-death signal kills a worker
//! when portshare itself dies, even by SIGKILL.
//!
//! Also on Linux, portshare is a child subreaper: processes that a worker starts and
//! abandons are re-parented to portshare instead of to PID 1, and portshare reaps them when
//! they exit, as an init such as tini would (and as PID 1 in a container it must).
//!
//! This is the crate's one use of `unsafe`: `pre_exec`, to set that signal in the child.
#![allow(unsafe_code)]

use std::io;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::{Child, Command};

/// Process control that lives as long as the supervisor: on Linux, the orphan reaper.
#[derive(Debug)]
pub struct Guard {
    #[cfg(target_os = "linux")]
    reaper: reaper::Reaper,
}

impl Guard {
    /// Sets up process control (Linux: becomes a subreaper and starts reaping orphans).
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            #[cfg(target_os = "linux")]
            reaper: reaper::Reaper::start()?,
        })
    }

    /// Spawns a worker, so that the orphan reaper never takes a worker's exit status.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        #[cfg(target_os = "linux")]
        return self.reaper.spawn(cmd);
        #[cfg(not(target_os = "linux"))]
        return cmd.spawn();
    }

    /// A worker was waited for: its pid may now be reused by anyone.
    pub fn forget(&self, _pid: Option<u32>) {
        #[cfg(target_os = "linux")]
        if let Some(pid) = _pid {
            self.reaper.forget(pid);
        }
    }
}

#[cfg(target_os = "linux")]
mod reaper {
    use std::collections::HashSet;
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::Duration;

    use rustix::process::{Pid, WaitOptions, waitpid};
    use tokio::process::{Child, Command};
    use tokio::signal::unix::{SignalKind, signal};
    use tokio_util::sync::CancellationToken;

    /// Signals can coalesce; a slow sweep catches what a lost SIGCHLD would leave.
    const SWEEP_EVERY: Duration = Duration::from_secs(5);

    /// Reaps exited processes that were re-parented to portshare, never its own workers.
    #[derive(Debug)]
    pub struct Reaper {
        /// Pids of the workers: their exit statuses belong to tokio's `Child::wait`.
        /// Spawning happens under this lock, so a worker that exits at once is never
        /// mistaken for an orphan.
        workers: Arc<Mutex<HashSet<i32>>>,
        /// Ends the reaping task when the supervisor goes.
        stop: CancellationToken,
    }

    impl Reaper {
        pub fn start() -> io::Result<Self> {
            rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
                .map_err(io::Error::from)?;
            let mut sigchld = signal(SignalKind::child())?;
            let workers: Arc<Mutex<HashSet<i32>>> = Arc::default();
            let stop = CancellationToken::new();
            let (known, done) = (Arc::clone(&workers), stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = done.cancelled() => return,
                        _ = sigchld.recv() => {}
                        () = tokio::time::sleep(SWEEP_EVERY) => {}
                    }
                    let reaped = reap_orphans(&known);
                    if reaped > 0 {
                        tracing::debug!(reaped, "reaped exited orphan processes");
                    }
                }
            });
            Ok(Self { workers, stop })
        }

        pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
            let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
            let child = cmd.spawn()?;
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                workers.insert(pid);
            }
            Ok(child)
        }

        pub fn forget(&self, pid: u32) {
            if let Ok(pid) = i32::try_from(pid) {
                self.workers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&pid);
            }
        }
    }

    impl Drop for Reaper {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    /// Waits for every zombie child of this process that is not a worker; returns how many.
    fn reap_orphans(workers: &Mutex<HashSet<i32>>) -> usize {
        let me = std::process::id();
        let workers = workers.lock().unwrap_or_else(PoisonError::into_inner);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return 0;
        };
        let mut reaped = 0;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if workers.contains(&pid) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so the
            // fields are read after the last ')'.
            let mut fields = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace())
                .into_iter()
                .flatten();
            let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else {
                continue;
            };
            if state == "Z"
                && ppid.parse::<u32>() == Ok(me)
                && let Some(pid) = Pid::from_raw(pid)
                && let Ok(Some(_)) = waitpid(Some(pid), WaitOptions::NOHANG)
            {
                reaped += 1;
            }
        }
        reaped
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

/// Passes a signal on to a worker's process group.
pub fn forward(pid: u32, signal: super::Forwarded) -> io::Result<()> {
    let signal = match signal {
        super::Forwarded::Usr1 => Signal::USR1,
        super::Forwarded::Usr2 => Signal::USR2,
    };
    signal_pid_group(Some(pid), signal)
}

fn signal_group(child: &Child, signal: Signal) -> io::Result<()> {
    signal_pid_group(child.id(), signal)
}

fn signal_pid_group(pid: Option<u32>, signal: Signal) -> io::Result<()> {
    let Some(pid) = pid
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
