//! reuseport mode (Linux): portshare opens no data path; the workers listen on the public
//! address themselves with SO_REUSEPORT and the kernel spreads connections over them. This
//! module holds that address for them: bound with SO_REUSEPORT, never listening, for
//! portshare's whole life, so the port stays taken between worker restarts and only
//! sockets of the same user can join the group (Linux's rule for SO_REUSEPORT). It also
//! refuses an address something already listens on, and warns when the kernel would drop
//! a stopping worker's queued connections (`net.ipv4.tcp_migrate_req`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// How long the probe for a listener already on the address may take: a listener on
/// this host answers a connect at once, so a second is only there for a busy machine.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where Linux says whether a closing listener's queued connections move to another
/// listener of its SO_REUSEPORT group (5.14+; per network namespace).
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Why the public address cannot be held for the workers.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Something listens there already: its connections would be mixed with the workers'.
    #[error(
        "cannot share {addr} with the workers (reuseport): something already listens there; a server of the same user would silently join the workers' SO_REUSEPORT group and take a share of the connections. Stop it or choose another listen address"
    )]
    Taken {
        /// The public address.
        addr: SocketAddr,
    },
    /// The address could not be bound.
    #[error("cannot hold {addr} for the workers (reuseport): {source}")]
    Bind {
        /// The public address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The public address, bound with SO_REUSEPORT and not listening, held for the workers.
#[derive(Debug)]
pub struct SharedPort {
    /// Kept open for portshare's life: it reserves the port and never accepts.
    _socket: Socket,
    /// The bound address (port 0 asked for becomes the port the OS picked).
    addr: SocketAddr,
}

impl SharedPort {
    /// Holds `addr` for the workers, refusing it when something already listens there.
    pub fn hold(addr: SocketAddr) -> Result<Self, SharedError> {
        if addr.port() != 0 && listens(addr) {
            return Err(SharedError::Taken { addr });
        }
        let bind_err = |source| SharedError::Bind { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(bind_err)?;
        set_reuse_port(&socket).map_err(bind_err)?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            // As grpcio binds [::]: IPv4 too.
            socket.set_only_v6(false).map_err(bind_err)?;
        }
        socket.bind(&addr.into()).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                SharedError::Taken { addr }
            } else {
                bind_err(source)
            }
        })?;
        let bound = socket
            .local_addr()
            .map_err(bind_err)?
            .as_socket()
            .unwrap_or(addr);
        Ok(Self {
            _socket: socket,
            addr: bound,
        })
    }

    /// The address the workers bind.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

#[cfg(unix)]
fn set_reuse_port(socket: &Socket) -> io::Result<()> {
    socket.set_reuse_port(true)
}

#[cfg(not(unix))]
fn set_reuse_port(_socket: &Socket) -> io::Result<()> {
    // The configuration refuses reuseport mode off Linux; nothing comes here.
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_REUSEPORT balancing needs Linux",
    ))
}

/// Whether a TCP connect to `addr` is answered; for a wildcard address, on loopback, and
/// for `[::]` (which takes IPv4 too) on both families' loopback.
fn listens(addr: SocketAddr) -> bool {
    let ips: Vec<IpAddr> = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => vec![Ipv4Addr::LOCALHOST.into()],
        IpAddr::V6(ip) if ip.is_unspecified() => {
            vec![Ipv6Addr::LOCALHOST.into(), Ipv4Addr::LOCALHOST.into()]
        }
        ip => vec![ip],
    };
    ips.iter().any(|ip| {
        TcpStream::connect_timeout(&SocketAddr::new(*ip, addr.port()), PROBE_TIMEOUT).is_ok()
    })
}

/// What `net.ipv4.tcp_migrate_req` says, as read from `text` (the sysctl file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    /// 1: a stopping worker's queued connections move to the others.
    On,
    /// 0: they are reset.
    Off,
    /// No such setting (before Linux 5.14) or not readable.
    Unknown,
}

impl Migration {
    /// Reads the setting of this process's network namespace.
    pub fn read() -> Self {
        match std::fs::read_to_string(MIGRATE_REQ) {
            Ok(text) => Self::parse(&text),
            Err(_) => Migration::Unknown,
        }
    }

    fn parse(text: &str) -> Self {
        match text.trim() {
            "0" => Migration::Off,
            "" => Migration::Unknown,
            _ => Migration::On,
        }
    }

    /// Warns, once, when restarts may reset connections the kernel queued for a worker.
    pub fn warn(self) {
        match self {
            Migration::On => {
                tracing::info!(
                    "net.ipv4.tcp_migrate_req=1: a stopping worker's queued connections move to the others"
                )
            }
            Migration::Off => tracing::warn!(
                "net.ipv4.tcp_migrate_req is 0: connections queued for a worker that stops (restart, recycling, shutdown) are reset instead of moved to another worker. Set it in this network namespace: sysctl -w net.ipv4.tcp_migrate_req=1 (in a pod: securityContext.sysctls: [{{name: net.ipv4.tcp_migrate_req, value: \"1\"}}]); portshare never changes it"
            ),
            Migration::Unknown => tracing::warn!(
                "{MIGRATE_REQ} cannot be read (Linux before 5.14?): connections queued for a worker that stops may be reset instead of moved to another worker"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sysctl_reads_as_on_off_or_unknown() {
        assert_eq!(Migration::parse("0\n"), Migration::Off);
        assert_eq!(Migration::parse("1\n"), Migration::On);
        assert_eq!(Migration::parse(""), Migration::Unknown);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_held_port_admits_reuseport_listeners_and_refuses_others() {
        let held = SharedPort::hold("127.0.0.1:0".parse().expect("addr")).expect("hold");
        let addr = held.addr();
        assert_ne!(addr.port(), 0);
        // Nothing listens: a connect is refused.
        assert!(!listens(addr));
        // A plain socket (no SO_REUSEPORT) cannot bind the held port.
        assert!(std::net::TcpListener::bind(addr).is_err());
        // A worker's (SO_REUSEPORT, same user) can, and listens.
        let worker = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        worker.set_reuse_port(true).expect("reuseport");
        worker
            .bind(&addr.into())
            .expect("worker binds beside the held socket");
        worker.listen(16).expect("listen");
        assert!(listens(addr));
        // And now that something listens, holding the address again is refused.
        assert!(matches!(
            SharedPort::hold(addr),
            Err(SharedError::Taken { .. })
        ));
        // [::] takes IPv4 too: an IPv4 listener on the port is found (by its loopback).
        let wildcard = SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port()));
        assert!(listens(wildcard));
        assert!(matches!(
            SharedPort::hold(wildcard),
            Err(SharedError::Taken { .. })
        ));
    }
}
