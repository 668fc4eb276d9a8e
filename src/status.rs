//! Asking a running instance over its admin endpoint: `portshare status` (the backends of
//! `/backends` as a table) and `portshare probe` (is `/readyz` 200?, for container health
//! checks that must not need curl).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Deserialize;

/// A status query should answer at once; a hung instance is itself the answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A rolling restart answers when it is over: every worker's replacement booting (up to
/// its `ready_timeout`) and its old process draining (up to twice `stop_grace`). An hour
/// covers dozens of slow workers; the instance bounds each step itself.
const RESTART_WAIT: Duration = Duration::from_secs(3600);

/// Why the status could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing answered, or the connection failed.
    #[error("cannot reach the admin endpoint at {addr}: {source}")]
    Io {
        /// Where we asked.
        addr: SocketAddr,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// It answered, but not as hoped.
    #[error("unexpected answer from {addr}: {what}")]
    Answer {
        /// Where we asked.
        addr: SocketAddr,
        /// What was wrong.
        what: String,
    },
}

/// One row of `/backends`: the fields the table shows.
#[derive(Debug, Deserialize)]
struct Row {
    name: String,
    worker: Option<u64>,
    pid: Option<u64>,
    state: String,
    state_for_s: u64,
    active_connections: u64,
    restarts: u64,
    ejections: u64,
    last_check: Option<String>,
    /// Calls (h2) or connections (l4) its running process took (absent from older versions).
    #[serde(default)]
    calls_served: u64,
    #[serde(default)]
    age_s: Option<u64>,
    #[serde(default)]
    memory_bytes: Option<u64>,
    #[serde(default)]
    recycle_due: Option<String>,
}

/// Bytes as MiB with one decimal, the unit of worker memory.
fn mib(bytes: u64) -> String {
    format!("{:.1}Mi", bytes as f64 / (1024.0 * 1024.0))
}

/// GET `path` from the admin endpoint at `addr`: (status code, body).
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), StatusError> {
    request(addr, "GET", path, TIMEOUT)
}

/// One HTTP/1.1 request without a body to the admin endpoint, answered within `wait`:
/// (status code, body).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    wait: Duration,
) -> Result<(u16, String), StatusError> {
    let io_err = |source| StatusError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(io_err)?;
    stream.set_read_timeout(Some(wait)).map_err(io_err)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: portshare\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(io_err)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io_err)?;
    let text = String::from_utf8_lossy(&raw);
    let answer = |what: &str| StatusError::Answer {
        addr,
        what: what.to_owned(),
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| answer("no HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| answer("no HTTP status"))?;
    Ok((code, body.to_owned()))
}

/// Fetches `/backends` from `addr` and renders the table.
pub fn fetch(addr: SocketAddr) -> Result<String, StatusError> {
    let (code, body) = get(addr, "/backends")?;
    if code != 200 {
        return Err(StatusError::Answer {
            addr,
            what: format!("HTTP {code}"),
        });
    }
    let rows: Vec<Row> = serde_json::from_str(&body).map_err(|e| StatusError::Answer {
        addr,
        what: e.to_string(),
    })?;
    Ok(render(&rows))
}

/// Asks `path` (e.g. `/readyz`) and returns its answer when it is 200, or an error saying
/// what it was instead.
pub fn probe(addr: SocketAddr, path: &str) -> Result<String, StatusError> {
    let (code, body) = get(addr, path)?;
    if code == 200 {
        Ok(body)
    } else {
        Err(StatusError::Answer {
            addr,
            what: format!("{path}: HTTP {code}: {}", body.trim()),
        })
    }
}

/// Asks for a rolling restart of the spawned workers (what SIGHUP does) and waits until it
/// is over: `Err` when a replacement failed.
pub fn restart(addr: SocketAddr) -> Result<String, StatusError> {
    match request(addr, "POST", "/workers/restart", RESTART_WAIT)? {
        (200, body) => Ok(body),
        (code, body) => Err(StatusError::Answer {
            addr,
            what: format!("HTTP {code}: {}", body.trim()),
        }),
    }
}

fn render(rows: &[Row]) -> String {
    let dash = || "-".to_owned();
    let table: Vec<[String; 13]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.worker.map_or_else(dash, |w| w.to_string()),
                r.pid.map_or_else(dash, |p| p.to_string()),
                r.state.clone(),
                humantime::format_duration(Duration::from_secs(r.state_for_s)).to_string(),
                r.active_connections.to_string(),
                r.restarts.to_string(),
                r.ejections.to_string(),
                r.worker.map_or_else(dash, |_| r.calls_served.to_string()),
                r.age_s.map_or_else(dash, |s| {
                    humantime::format_duration(Duration::from_secs(s)).to_string()
                }),
                r.memory_bytes.map_or_else(dash, mib),
                r.recycle_due.clone().unwrap_or_else(dash),
                r.last_check.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    let header = [
        "BACKEND",
        "WORKER",
        "PID",
        "STATE",
        "FOR",
        "ACTIVE",
        "RESTARTS",
        "EJECTIONS",
        "CALLS",
        "AGE",
        "MEMORY",
        "RECYCLE",
        "LAST CHECK",
    ];
    let mut widths = header.map(str::len);
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &table {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_an_aligned_table() {
        let rows: Vec<Row> = serde_json::from_str(
            r#"[{"name":"127.0.0.1:50052","worker":0,"pid":4242,"state":"healthy","state_for_s":65,
                 "active_connections":3,"restarts":1,"ejections":0,"last_check":"ok","ready":true,
                 "calls_served":812,"age_s":3700,"memory_bytes":52428800,"recycle_due":"calls"},
                {"name":"10.0.0.1:7","worker":null,"pid":null,"state":"unhealthy","state_for_s":2,
                 "active_connections":0,"restarts":0,"ejections":2,"last_check":"connect: refused"}]"#,
        )
        .expect("rows");
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("BACKEND"));
        assert!(
            lines[1].contains("4242") && lines[1].contains("1m 5s") && lines[1].contains("healthy")
        );
        assert!(
            lines[1].contains("812")
                && lines[1].contains("1h 1m 40s")
                && lines[1].contains("50.0Mi")
                && lines[1].contains("calls"),
            "{text}"
        );
        assert!(lines[2].contains("unhealthy") && lines[2].contains("connect: refused"));
        let state_col = lines[0].find("STATE").expect("STATE column");
        assert_eq!(lines[1].find("healthy"), Some(state_col));
        assert_eq!(lines[2].find("unhealthy"), Some(state_col));
    }
}
