//! The resident memory of a worker's process tree, for `[workers] max_memory` and
//! `/backends`.
//!
//! Linux: from /proc, every process in the worker's process group (a worker leads its own,
//! see the platform modules, so what it starts is counted with it unless it moves itself
//! out). macOS and Windows: through `sysinfo`, the worker and its descendants by parent
//! pid. Other platforms measure nothing (the configuration says so at start).

/// Whether resident memory can be measured on this platform.
pub(super) const MEASURED: bool = cfg!(any(target_os = "linux", target_os = "macos", windows));

/// The resident memory, in bytes, of every process in the process group led by `pid`;
/// `None` when it cannot be measured (or the group is gone).
#[cfg(target_os = "linux")]
pub(super) fn tree_rss(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    let mut found = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(member) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{member}/stat")) else {
            continue;
        };
        if group_of(&stat) != Some(pid) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{member}/status")) else {
            continue;
        };
        if let Some(rss) = rss_of(&status) {
            total += rss;
            found = true;
        }
    }
    found.then_some(total)
}

/// macOS and Windows: the worker and every descendant, found by parent pid.
#[cfg(any(target_os = "macos", windows))]
pub(super) fn tree_rss(pid: u32) -> Option<u64> {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let mut system = System::new().ok()?;
    system.refresh_processes_specifics(
        ProcessesToUpdate::All,
        true,
        ProcessRefreshKind::nothing().with_memory(),
    );
    let root = Pid::from_u32(pid);
    let processes = system.processes();
    processes.get(&root)?;
    let total = processes
        .iter()
        .filter(|(p, _)| {
            // Up the parent chain, bounded (a pid cycle must not hang the supervisor).
            let mut at = Some(**p);
            for _ in 0..64 {
                match at {
                    Some(q) if q == root => return true,
                    Some(q) => at = processes.get(&q).and_then(|proc_| proc_.parent()),
                    None => return false,
                }
            }
            false
        })
        .map(|(_, proc_)| proc_.memory())
        .sum();
    Some(total)
}

/// Elsewhere: not measured.
#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
pub(super) fn tree_rss(_pid: u32) -> Option<u64> {
    None
}

/// The process group id in a `/proc/<pid>/stat` line: "pid (comm) state ppid pgrp ...";
/// comm may hold spaces and parentheses, so the fields are read after the last ')'.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn group_of(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes (absent for kernel threads and zombies).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn rss_of(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_is_read_after_the_command_name() {
        let stat = "4242 (python3 (w) x) S 4000 4100 4100 0 -1 4194560 1234 0 0 0 5 1 0 0 20 0 3 0 99 1000 2500 18446744073709551615";
        assert_eq!(group_of(stat), Some(4100));
        assert_eq!(group_of("garbage"), None);
    }

    #[test]
    fn resident_memory_is_read_in_bytes() {
        let status = "Name:\tpython3\nVmPeak:\t  20000 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(rss_of(status), Some(10240 * 1024));
        assert_eq!(rss_of("Name:\tkthreadd\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_group_has_memory() {
        let me = std::process::id();
        let group = std::fs::read_to_string(format!("/proc/{me}/stat"))
            .ok()
            .and_then(|s| group_of(&s));
        let Some(group) = group else {
            panic!("cannot read this process's group");
        };
        assert!(tree_rss(group).is_some_and(|b| b > 1024 * 1024));
    }
}
