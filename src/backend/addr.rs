//! Where a backend is reached: a TCP address, or a Unix domain socket (a path, or on Linux
//! a name in the abstract namespace). The type is the same on every platform, so that
//! `/backends` and the data path's types do not change shape; which kinds can be
//! configured (and connected to) depends on the platform (see [`BackendAddr::supported`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The written prefix of a Unix socket path backend.
pub const UNIX_PREFIX: &str = "unix:";
/// The written prefix of a Linux abstract-namespace socket backend.
pub const UNIX_ABSTRACT_PREFIX: &str = "unix-abstract:";

/// A backend's address, resolved once when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket at this path (Linux, macOS).
    Unix(PathBuf),
    /// A socket in Linux's abstract namespace: a name, no file.
    UnixAbstract(String),
}

impl BackendAddr {
    /// Whether this platform can connect to this kind of address: Unix sockets need a Unix,
    /// the abstract namespace needs Linux.
    pub fn supported(&self) -> bool {
        match self {
            BackendAddr::Tcp(_) => true,
            BackendAddr::Unix(_) => cfg!(unix),
            BackendAddr::UnixAbstract(_) => cfg!(target_os = "linux"),
        }
    }

    /// The TCP address, if it is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            BackendAddr::Tcp(a) => Some(*a),
            _ => None,
        }
    }

    /// The `:authority` an HTTP/2 request to this backend carries: the address for TCP,
    /// and for a Unix socket `localhost`, as gRPC's own clients send it (a path is not a
    /// valid authority). Written by hand for TCP because `SocketAddr`'s `Display` adds an
    /// IPv6 scope id (`%2`), which is not valid in an authority either.
    pub fn authority(&self) -> String {
        match self {
            BackendAddr::Tcp(SocketAddr::V4(a)) => format!("{}:{}", a.ip(), a.port()),
            BackendAddr::Tcp(SocketAddr::V6(a)) => format!("[{}]:{}", a.ip(), a.port()),
            BackendAddr::Unix(_) | BackendAddr::UnixAbstract(_) => "localhost".to_owned(),
        }
    }
}

impl From<SocketAddr> for BackendAddr {
    fn from(a: SocketAddr) -> Self {
        BackendAddr::Tcp(a)
    }
}

/// As written in the configuration: `127.0.0.1:50052`, `unix:/run/app/w0.sock`,
/// `unix-abstract:app-w0`.
impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddr::Tcp(a) => a.fmt(f),
            BackendAddr::Unix(p) => write!(f, "{UNIX_PREFIX}{}", p.display()),
            BackendAddr::UnixAbstract(name) => write!(f, "{UNIX_ABSTRACT_PREFIX}{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, SocketAddrV6};

    #[test]
    fn shown_as_written() {
        let tcp = BackendAddr::from(SocketAddr::from(([127, 0, 0, 1], 50052)));
        assert_eq!(tcp.to_string(), "127.0.0.1:50052");
        assert_eq!(
            BackendAddr::Unix(PathBuf::from("/run/app/w0.sock")).to_string(),
            "unix:/run/app/w0.sock"
        );
        assert_eq!(
            BackendAddr::UnixAbstract("app-w0".into()).to_string(),
            "unix-abstract:app-w0"
        );
    }

    #[test]
    fn authority_is_valid_for_every_kind() {
        let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 50051, 0, 2));
        assert_eq!(BackendAddr::Tcp(v6).authority(), "[::1]:50051");
        assert_eq!(
            BackendAddr::Unix(PathBuf::from("/tmp/a.sock")).authority(),
            "localhost"
        );
    }

    #[test]
    fn platform_support() {
        assert!(BackendAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 1))).supported());
        assert_eq!(BackendAddr::Unix("/a".into()).supported(), cfg!(unix));
        assert_eq!(
            BackendAddr::UnixAbstract("a".into()).supported(),
            cfg!(target_os = "linux")
        );
    }
}
