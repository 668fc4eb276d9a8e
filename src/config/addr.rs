//! Addresses as written in the configuration: `HOST:PORT` (IPv6 hosts in brackets),
//! backends' `HOST:P1-P2` port ranges and Unix sockets (`unix:PATH`, `unix-abstract:NAME`),
//! and the resolving of host names, with errors that name the key.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use super::{ConfigError, err};
use crate::backend::{BackendAddr, BackendSpec, UNIX_ABSTRACT_PREFIX, UNIX_PREFIX};

/// A port range longer than this is almost certainly a typo (`5000-50000`), and would
/// open tens of thousands of backends.
const MAX_RANGE_PORTS: u32 = 1024;

/// Splits `HOST:PORT` (IPv6 hosts in brackets) into host and port text.
fn split_host_port<'a>(key: &str, s: &'a str) -> Result<(&'a str, &'a str), ConfigError> {
    let bad = |why: &str| err(key, format!("{s:?} is not HOST:PORT ({why})"));
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("no closing bracket"))?;
        let port = after.strip_prefix(':').ok_or_else(|| bad("no port"))?;
        Ok((host, port))
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        if host.contains(':') {
            return Err(bad("an IPv6 address goes in brackets, e.g. [::1]:50052"));
        }
        Ok((host, port))
    }
}

fn parse_port(key: &str, whole: &str, text: &str, zero_ok: bool) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(0) if !zero_ok => Err(err(key, format!("{whole:?}: port 0 is not a backend port"))),
        Ok(p) => Ok(p),
        Err(_) => Err(err(
            key,
            format!("{whole:?}: {text:?} is not a port (1-65535)"),
        )),
    }
}

/// Resolves a host name (never an IP address) and port to addresses.
pub(crate) type Lookup = fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>;

/// The system's resolver (`getaddrinfo`, which also reads the hosts file).
pub(crate) fn system_lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

fn resolve(
    key: &str,
    whole: &str,
    host: &str,
    port: u16,
    lookup: Lookup,
) -> Result<SocketAddr, ConfigError> {
    if host.is_empty() {
        return Err(err(key, format!("{whole:?} has no host")));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    lookup(host, port)
        .map_err(|e| err(key, format!("cannot resolve {host:?}: {e}")))?
        .into_iter()
        .next()
        .ok_or_else(|| err(key, format!("{host:?} resolves to no address")))
}

/// One `HOST:PORT` address.
pub(crate) fn resolve_one(
    key: &str,
    s: &str,
    zero_ok: bool,
    lookup: Lookup,
) -> Result<SocketAddr, ConfigError> {
    let (host, port) = split_host_port(key, s.trim())?;
    let port = parse_port(key, s, port, zero_ok)?;
    resolve(key, s, host, port, lookup)
}

/// The longest Unix socket path the platform takes: `sun_path` holds 108 bytes on Linux
/// and 104 on macOS and the BSDs, a NUL included.
pub(crate) const MAX_SOCKET_PATH: usize = if cfg!(target_os = "linux") { 107 } else { 103 };

/// Checks that a Unix socket path fits the platform's socket address.
pub(crate) fn check_socket_path(key: &str, path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(err(
            key,
            format!(
                "the socket path {} is {len} bytes; this platform takes at most {MAX_SOCKET_PATH}",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A `unix:PATH` or `unix-abstract:NAME` backend, if `s` is one; refused where the
/// platform has no such sockets.
fn parse_unix_backend(key: &str, s: &str) -> Option<Result<BackendSpec, ConfigError>> {
    let spec = |addr: BackendAddr| BackendSpec {
        name: s.to_owned(),
        addr,
        worker: None,
    };
    if let Some(name) = s.strip_prefix(UNIX_ABSTRACT_PREFIX) {
        if !cfg!(target_os = "linux") {
            return Some(Err(err(
                key,
                format!("{s:?}: abstract-namespace sockets exist on Linux only; use unix:PATH"),
            )));
        }
        if name.is_empty() {
            return Some(Err(err(
                key,
                format!("{s:?}: no name after {UNIX_ABSTRACT_PREFIX}"),
            )));
        }
        if name.contains('\0') {
            return Some(Err(err(key, format!("{s:?}: the name holds a NUL byte"))));
        }
        if name.len() > MAX_SOCKET_PATH {
            return Some(Err(err(
                key,
                format!("{s:?}: the name is longer than {MAX_SOCKET_PATH} bytes"),
            )));
        }
        return Some(Ok(spec(BackendAddr::UnixAbstract(name.to_owned()))));
    }
    let path = s.strip_prefix(UNIX_PREFIX)?;
    if !cfg!(unix) {
        return Some(Err(err(
            key,
            format!(
                "{s:?}: Unix domain socket backends are not supported on this platform; use HOST:PORT"
            ),
        )));
    }
    if path.is_empty() {
        return Some(Err(err(key, format!("{s:?}: no path after {UNIX_PREFIX}"))));
    }
    let path = PathBuf::from(path);
    Some(check_socket_path(key, &path).map(|()| spec(BackendAddr::Unix(path))))
}

/// One `backends` entry: `HOST:PORT`, `HOST:P1-P2`, `unix:PATH` or `unix-abstract:NAME`.
pub(crate) fn parse_backend(
    key: &str,
    s: &str,
    lookup: Lookup,
) -> Result<Vec<BackendSpec>, ConfigError> {
    let s = s.trim();
    if let Some(unix) = parse_unix_backend(key, s) {
        return unix.map(|spec| vec![spec]);
    }
    let (host, ports) = split_host_port(key, s)?;
    let (first, last) = match ports.split_once('-') {
        Some((a, b)) => (parse_port(key, s, a, false)?, parse_port(key, s, b, false)?),
        None => {
            let p = parse_port(key, s, ports, false)?;
            (p, p)
        }
    };
    if first > last {
        return Err(err(
            key,
            format!("{s:?}: the range {first}-{last} runs backwards"),
        ));
    }
    if u32::from(last - first) >= MAX_RANGE_PORTS {
        return Err(err(
            key,
            format!("{s:?}: a range of more than {MAX_RANGE_PORTS} ports is not allowed"),
        ));
    }
    let shown_host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let base = resolve(key, s, host, first, lookup)?;
    Ok((first..=last)
        .map(|port| BackendSpec {
            name: format!("{shown_host}:{port}"),
            addr: SocketAddr::new(base.ip(), port).into(),
            worker: None,
        })
        .collect())
}
