//! Workers on Unix domain sockets (`[workers] socket_dir`): the directory portshare owns,
//! checked before anything starts (made with mode 0700 when missing; refused when others
//! can write to it, since whoever can could put a socket of theirs in a worker's place),
//! its stale socket files removed, and each worker's socket path per generation (a
//! surge replacement gets a path of its own, so it can bind while the old process serves).

use std::io;
use std::path::{Path, PathBuf};

use super::SupervisorError;
use crate::backend::WorkerIndex;

/// Socket files portshare owns in the directory are named `worker-<i>-<generation>.sock`.
const PREFIX: &str = "worker-";
const SUFFIX: &str = ".sock";

/// The socket of worker `index`'s `generation`-th process placement (0 at start, one more
/// per surge replacement).
pub fn socket_path(dir: &Path, index: WorkerIndex, generation: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{index}-{generation}{SUFFIX}"))
}

/// Whether `name` is one of the socket files portshare names.
#[cfg(any(unix, test))]
fn is_ours(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
        .and_then(|middle| middle.split_once('-'))
        .is_some_and(|(i, g)| {
            !i.is_empty()
                && !g.is_empty()
                && i.bytes().all(|b| b.is_ascii_digit())
                && g.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Removes a worker's socket file once its process is gone; a file already gone is fine.
pub fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(socket = %path.display(), "removed a stopped worker's socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove a worker's socket file")
        }
    }
}

/// Makes `dir` ready for the workers' sockets: created (mode 0700) when missing, refused
/// when it is not a directory, belongs to another user or others can write to it; then
/// the socket files a previous run left behind are removed. A socket of ours that still
/// answers is not stale: another portshare (or its workers) serves from the directory, and
/// that is refused rather than taken from under it.
#[cfg(unix)]
pub fn prepare_dir(dir: &Path) -> Result<(), SupervisorError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};

    let fail = |why: String| SupervisorError::SocketDir {
        dir: dir.to_path_buf(),
        why,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(format!("cannot create it: {e}")))?;
            tracing::info!(dir = %dir.display(), "created the worker socket directory (mode 0700)");
        }
        Err(e) => return Err(fail(e.to_string())),
        Ok(_) => {}
    }
    // Followed now: a symlink to a directory of our own is fine, its target is checked.
    let meta = std::fs::metadata(dir).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("not a directory".to_owned()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(fail(format!(
            "it belongs to user {}, not to portshare's user {me}; use a directory of portshare's own",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(fail(format!(
            "others can write to it (mode {mode:03o}), and could put a socket of theirs in a worker's place; chmod go-w it, or use a directory of portshare's own (created 0700 when missing)"
        )));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| fail(format!("cannot list it: {e}")))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        // Only sockets with our names: nothing else in the directory is touched.
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if is_ours(name) && is_socket {
            let path = entry.path();
            // A connect to a Unix socket is answered at once, listener or not.
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(fail(format!(
                    "{name} is in use: another portshare, or workers it left running, serve from this directory; stop them or use another directory"
                )));
            }
            std::fs::remove_file(&path)
                .map_err(|e| fail(format!("cannot remove the stale socket {name}: {e}")))?;
            tracing::info!(socket = %path.display(), "removed a stale worker socket");
        }
    }
    Ok(())
}

/// Configuration refuses `socket_dir` off Unix; this is the supervisor's word on it.
#[cfg(not(unix))]
pub fn prepare_dir(dir: &Path) -> Result<(), SupervisorError> {
    Err(SupervisorError::SocketDir {
        dir: dir.to_path_buf(),
        why: "Unix domain sockets are not available on this platform".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_names_are_ours() {
        assert!(is_ours("worker-0-0.sock"));
        assert!(is_ours("worker-12-345.sock"));
        for other in [
            "worker-0.sock",
            "worker--1.sock",
            "worker-a-1.sock",
            "worker-0-1.sock.bak",
            "app.sock",
            "worker-0-1-2.sock",
        ] {
            assert!(!is_ours(other), "{other}");
        }
        assert_eq!(
            socket_path(Path::new("/run/app"), WorkerIndex(2), 7),
            Path::new("/run/app/worker-2-7.sock")
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_directory_is_made_private_and_cleaned_of_our_stale_sockets() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::net::UnixListener;

        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path().join("sockets");
        prepare_dir(&dir).expect("created");
        let mode = std::fs::metadata(&dir).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);

        let stale = socket_path(&dir, WorkerIndex(0), 3);
        let listener = UnixListener::bind(&stale).expect("bind");
        drop(listener);
        let theirs = dir.join("app.sock");
        drop(UnixListener::bind(&theirs).expect("bind"));
        let not_a_socket = dir.join("worker-1-0.sock");
        std::fs::write(&not_a_socket, b"keep").expect("write");
        prepare_dir(&dir).expect("prepared again");
        assert!(!stale.exists(), "a stale socket of ours is removed");
        assert!(theirs.exists() && not_a_socket.exists(), "nothing else is");

        let live = UnixListener::bind(socket_path(&dir, WorkerIndex(2), 0)).expect("bind");
        let e = prepare_dir(&dir).expect_err("a live socket");
        assert!(e.to_string().contains("is in use"), "{e}");
        drop(live);
        prepare_dir(&dir).expect("stale once nobody listens");

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = prepare_dir(&dir).expect_err("world-writable");
        assert!(e.to_string().contains("others can write"), "{e}");
        let file = root.path().join("file");
        std::fs::write(&file, b"").expect("write");
        let e = prepare_dir(&file).expect_err("a file");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
}
