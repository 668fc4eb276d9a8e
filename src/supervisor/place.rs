//! Where each worker listens: two TCP ports (its process's and a spare for its surge
//! replacement, see `ports`), or with `socket_dir` a Unix socket per process generation
//! (see `sockets`). The watcher asks its place for the current address, the next one, and
//! what a worker is told about it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ports::{self, WorkerPorts};
use super::sockets;
use super::{SupervisorError, WORKER_HOST, WorkersConfig};
use crate::backend::{BackendAddr, BackendSpec, WorkerIndex};

/// One worker's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerPlace {
    /// TCP ports on loopback.
    Ports(WorkerPorts),
    /// A Unix socket in the socket directory.
    Socket {
        /// The directory (absolute).
        dir: Arc<Path>,
        /// Whose socket.
        index: WorkerIndex,
        /// Of the running process: 0 at start, one more with each surge replacement.
        generation: u64,
    },
}

impl WorkerPlace {
    /// The running process's address.
    pub fn current(&self) -> BackendAddr {
        match self {
            WorkerPlace::Ports(p) => std::net::SocketAddr::from((WORKER_HOST, p.current)).into(),
            WorkerPlace::Socket {
                dir,
                index,
                generation,
            } => BackendAddr::Unix(sockets::socket_path(dir, *index, *generation)),
        }
    }

    /// Its backend's spec.
    pub fn spec(&self, index: WorkerIndex) -> BackendSpec {
        spec(self.current(), index)
    }
}

/// A spawned worker's backend at `addr`.
pub(super) fn spec(addr: BackendAddr, index: WorkerIndex) -> BackendSpec {
    BackendSpec {
        name: addr.to_string(),
        addr,
        worker: Some(index),
    }
}

/// Every worker's place: with `socket_dir`, the directory is prepared (see
/// `sockets::prepare_dir`) and worker i starts on `worker-<i>-0.sock`; otherwise the port
/// plan (see `ports::plan_ports`).
pub fn plan(config: &WorkersConfig) -> Result<Vec<WorkerPlace>, SupervisorError> {
    match &config.socket_dir {
        Some(dir) => {
            sockets::prepare_dir(dir)?;
            let dir: Arc<Path> = Arc::from(dir.as_path());
            Ok((0..config.count)
                .map(|i| WorkerPlace::Socket {
                    dir: Arc::clone(&dir),
                    index: WorkerIndex(i),
                    generation: 0,
                })
                .collect())
        }
        None => Ok(ports::plan_ports(config)?
            .into_iter()
            .map(WorkerPlace::Ports)
            .collect()),
    }
}

/// The path of a socket address, when it is one portshare made for a worker.
pub(super) fn socket_file(addr: &BackendAddr) -> Option<&PathBuf> {
    match addr {
        BackendAddr::Unix(path) => Some(path),
        _ => None,
    }
}
