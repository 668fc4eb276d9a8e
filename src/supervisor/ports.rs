//! The worker port plan: each worker has two ports, its process's and a spare for its
//! replacement in a surge restart; both are checked free before anything starts.

use std::io;
use std::net::{SocketAddr, TcpListener};

use super::{SupervisorError, WORKER_HOST, WorkersConfig};
use crate::backend::WorkerIndex;

/// Checks that a port is free by binding it, as a worker will; the socket is closed at once.
pub(super) fn port_is_free(port: u16) -> io::Result<()> {
    TcpListener::bind(SocketAddr::from((WORKER_HOST, port))).map(drop)
}

/// Where one worker listens: the port of its process now, and the spare port its
/// replacement takes in a surge restart (the two swap after each one), so the replacement
/// can start and become ready while the old process still serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerPorts {
    /// The running process's port.
    pub current: u16,
    /// The next replacement's port.
    pub spare: u16,
}

/// The port plan: worker i listens on `port_base + i`, its replacement on
/// `port_base + count + i` (`2 × count` ports in all, each checked free); with `port_base`
/// 0, free ports picked by the OS. Warns when they lie in Linux's ephemeral range.
pub fn plan_ports(config: &WorkersConfig) -> Result<Vec<WorkerPorts>, SupervisorError> {
    let count = config.count;
    let ports: Vec<u16> = if config.port_base == 0 {
        // Hold every listener until all are bound, so no port is handed out twice.
        let held: Vec<TcpListener> = (0..2 * count)
            .map(|_| TcpListener::bind(SocketAddr::from((WORKER_HOST, 0))))
            .collect::<io::Result<_>>()
            .map_err(SupervisorError::NoFreePorts)?;
        held.iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<io::Result<_>>()
            .map_err(SupervisorError::NoFreePorts)?
    } else {
        let ports: Vec<u16> = (0..2 * count)
            .map(|i| config.port_base.saturating_add(i as u16))
            .collect();
        for (i, port) in ports.iter().enumerate() {
            port_is_free(*port).map_err(|source| SupervisorError::PortTaken {
                index: WorkerIndex(i % count),
                port: *port,
                spare: i >= count,
                source,
            })?;
        }
        ports
    };
    warn_if_ephemeral(&ports);
    Ok((0..count)
        .map(|i| WorkerPorts {
            current: ports[i],
            spare: ports[count + i],
        })
        .collect())
}

/// A free port for a replacement whose planned spare port was taken meanwhile (only with
/// free ports, `port_base` 0: a fixed plan does not wander off it).
pub(super) fn free_port() -> io::Result<u16> {
    TcpListener::bind(SocketAddr::from((WORKER_HOST, 0)))?
        .local_addr()
        .map(|a| a.port())
}

/// Linux hands out outgoing-connection ports from a range (32768-60999 by default); a worker
/// port inside it can be taken by one while the worker restarts.
#[cfg(target_os = "linux")]
fn warn_if_ephemeral(ports: &[u16]) {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut bounds = range
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (bounds.next(), bounds.next()) else {
        return;
    };
    let reserved =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    let is_reserved = |p: u16| {
        reserved
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= p) && b.parse::<u16>().is_ok_and(|b| p <= b)
                }
                None => r.parse::<u16>() == Ok(p),
            })
    };
    let exposed: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| (lo..=hi).contains(p) && !is_reserved(*p))
        .collect();
    if let (Some(first), Some(last)) = (exposed.iter().min(), exposed.iter().max()) {
        tracing::warn!(
            ports = ?exposed,
            ephemeral_range = %format!("{lo}-{hi}"),
            "worker ports lie in the ephemeral port range: an outgoing connection can take one while its worker restarts. Reserve them (sysctl -w net.ipv4.ip_local_reserved_ports={first}-{last}) or use a --worker-port-base below {lo}"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn warn_if_ephemeral(_ports: &[u16]) {}
