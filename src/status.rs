//! Asking a running instance over its admin endpoint: `portshare status` (the backends of
//! `/backends` as a table) and `portshare probe` (is `/readyz` 200?, for container health
//! checks that must not need curl). The requests go through hyper's HTTP/1.1 client, so an
//! answer in any framing HTTP allows (chunked included) reads whole.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::header::{HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

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
    /// The connection opened, but the HTTP exchange on it failed or took too long.
    #[error("no answer from the admin endpoint at {addr}: {what}")]
    Http {
        /// Where we asked.
        addr: SocketAddr,
        /// What went wrong.
        what: String,
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

/// GET `path` from the admin endpoint at `addr`, answered within `wait`: (status code,
/// body). Needs no runtime of its own and may be called from inside one.
pub fn get(addr: SocketAddr, path: &str, wait: Duration) -> Result<(u16, String), StatusError> {
    request(addr, Method::GET, path, wait)
}

/// One request without a body to the admin endpoint, answered within `wait`: (status
/// code, body). It runs on a thread of its own with a one-thread runtime: the command line
/// has no runtime, and the integration tests call it from inside theirs.
fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    wait: Duration,
) -> Result<(u16, String), StatusError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| StatusError::Io { addr, source })?
                .block_on(exchange(addr, method, path, wait))
        })
        .join()
    })
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Connects (within [`TIMEOUT`]), sends the request and reads the whole answer (within
/// `wait`).
async fn exchange(
    addr: SocketAddr,
    method: Method,
    path: &str,
    wait: Duration,
) -> Result<(u16, String), StatusError> {
    let io_err = |source| StatusError::Io { addr, source };
    let http_err = |what: String| StatusError::Http { addr, what };
    let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io_err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))?
        .map_err(io_err)?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http_err(e.to_string()))?;
    // Drives the connection; it ends with the runtime, once the answer is in.
    tokio::spawn(connection);
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().map_err(|e| StatusError::Answer {
        addr,
        what: format!("path {path:?}: {e}"),
    })?;
    req.headers_mut()
        .insert(HOST, HeaderValue::from_static("portshare"));
    let answer = async {
        let response = sender.send_request(req).await?;
        let code = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(wait, answer)
        .await
        .map_err(|_| http_err(format!("no answer within {wait:?}")))?
        .map_err(|e| http_err(e.to_string()))
}

/// Fetches `/backends` from `addr` and renders the table.
pub fn fetch(addr: SocketAddr) -> Result<String, StatusError> {
    let (code, body) = get(addr, "/backends", TIMEOUT)?;
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
    let (code, body) = get(addr, path, TIMEOUT)?;
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
    answer_ok(
        addr,
        request(addr, Method::POST, "/workers/restart", RESTART_WAIT)?,
    )
}

/// Asks a running instance to read its configuration again (`POST /config/reload`): what
/// changed and what needs a restart, or `Err` naming the key when the file is invalid.
pub fn reload(addr: SocketAddr) -> Result<String, StatusError> {
    answer_ok(
        addr,
        request(addr, Method::POST, "/config/reload", TIMEOUT)?,
    )
}

/// The configuration a running instance runs now (`GET /config`), as TOML.
pub fn running_config(addr: SocketAddr) -> Result<String, StatusError> {
    answer_ok(addr, get(addr, "/config", TIMEOUT)?)
}

fn answer_ok(addr: SocketAddr, (code, body): (u16, String)) -> Result<String, StatusError> {
    if code == 200 {
        Ok(body)
    } else {
        Err(StatusError::Answer {
            addr,
            what: format!("HTTP {code}: {}", body.trim()),
        })
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

    /// An admin endpoint stand-in that answers one request with `response`, written as is.
    fn answer_once(response: &'static str) -> SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut head = Vec::new();
            let mut byte = [0u8];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = stream.write_all(response.as_bytes());
        });
        addr
    }

    #[test]
    fn a_chunked_answer_is_read_whole() {
        let addr = answer_once(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             4\r\n[{\"a\r\n3\r\n\": \r\n4\r\n1}]\n\r\n0\r\n\r\n",
        );
        let (code, body) = get(addr, "/backends", TIMEOUT).expect("an answer");
        assert_eq!((code, body.as_str()), (200, "[{\"a\": 1}]\n"));
    }

    #[test]
    fn a_non_200_answer_is_an_error_naming_the_status() {
        let addr =
            answer_once("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\ndraining\n");
        let e = probe(addr, "/readyz").expect_err("not ready");
        assert!(
            e.to_string().ends_with("/readyz: HTTP 503: draining"),
            "{e}"
        );
    }

    #[test]
    fn a_silent_endpoint_is_an_error_within_the_wait() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let wait = Duration::from_millis(200);
        let e = get(addr, "/backends", wait).expect_err("no answer");
        assert!(matches!(e, StatusError::Http { .. }), "{e}");
        drop(listener);
    }

    #[tokio::test]
    async fn it_can_be_asked_from_inside_a_runtime() {
        let addr = answer_once("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(
            get(addr, "/readyz", TIMEOUT).expect("an answer"),
            (200, "ok".into())
        );
    }
}
