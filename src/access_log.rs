//! The access log: one line per call (h2 mode) or per client connection (l4 mode), as text
//! or JSON. The data path only hands a record to a bounded queue; a thread of its own
//! formats and writes the lines. Writing therefore never blocks a call: when the queue is
//! full (a slow disk, a pipe nobody reads), the record is dropped and counted in
//! `portshare_access_log_dropped_total`.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use metrics::{Counter, counter};
use serde::Serialize;

use crate::metrics as m;

/// Records that may wait for the writer before new ones are dropped.
pub const QUEUE: usize = 8192;

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, appended to (created if missing).
    File(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Stdout => f.write_str("stdout"),
            Target::Stderr => f.write_str("stderr"),
            Target::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// How a line looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `key=value` pairs after the time, one line each.
    Text,
    /// One JSON object per line.
    Json,
}

/// One finished h2-mode call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallRecord {
    /// When it arrived.
    #[serde(skip)]
    pub at: SystemTime,
    /// The client.
    pub peer: SocketAddr,
    /// `/pkg.Service/Method`.
    pub method: String,
    /// The backend that answered (or was last tried); none if no backend took it.
    pub backend: Option<String>,
    /// The gRPC status the client got.
    pub grpc_status: u32,
    /// Arrival to end of response.
    #[serde(skip)]
    pub duration: Duration,
    /// DATA bytes from the client.
    pub request_bytes: u64,
    /// DATA bytes to the client.
    pub response_bytes: u64,
    /// Sent again to another backend after a refusal.
    pub retried: bool,
    /// Waited for a backend that could take it.
    pub queued: bool,
}

/// One finished l4-mode client connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectionRecord {
    /// When it was accepted.
    #[serde(skip)]
    pub at: SystemTime,
    /// The client.
    pub peer: SocketAddr,
    /// The backend it was connected to; none if none took it.
    pub backend: Option<String>,
    /// Accept to close.
    #[serde(skip)]
    pub duration: Duration,
    /// Bytes client to backend.
    pub to_backend: u64,
    /// Bytes backend to client.
    pub to_client: u64,
    /// How it ended (`closed`, `idle`, `aborted`, `no_backend`, `error`, ...).
    pub end: &'static str,
}

/// A line to write.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// h2 mode.
    Call(CallRecord),
    /// l4 mode.
    Connection(ConnectionRecord),
}

/// The handle the data path logs through; dropping it flushes and stops the writer.
#[derive(Debug)]
pub struct AccessLog {
    queue: Option<SyncSender<Record>>,
    dropped: Counter,
    writer: Option<JoinHandle<()>>,
}

impl AccessLog {
    /// Opens `target` and starts the writer thread.
    pub fn start(target: &Target, format: Format) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(io::stdout()),
            Target::Stderr => Box::new(io::stderr()),
            Target::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        Self::start_with(out, format, QUEUE)
    }

    /// [`AccessLog::start`] onto any writer, with a queue of `capacity` records.
    fn start_with(out: Box<dyn Write + Send>, format: Format, capacity: usize) -> io::Result<Self> {
        let (queue, records) = mpsc::sync_channel(capacity);
        let writer = std::thread::Builder::new()
            .name("portshare-log".to_owned())
            .spawn(move || write_all(records, out, format))?;
        Ok(Self {
            queue: Some(queue),
            dropped: counter!(m::ACCESS_LOG_DROPPED),
            writer: Some(writer),
        })
    }

    /// Queues one record; never waits. A record that does not fit is dropped and counted.
    pub fn log(&self, record: Record) {
        let Some(queue) = &self.queue else { return };
        match queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.increment(1);
            }
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written what is queued.
        self.queue = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: formats and writes every record, flushing whenever the queue runs
/// dry, until the queue is closed. A write error is reported once and the log goes on
/// (the next write may succeed: a full disk gets space again).
fn write_all(records: Receiver<Record>, out: Box<dyn Write + Send>, format: Format) {
    let mut out = BufWriter::new(out);
    let mut failing = false;
    while let Ok(first) = records.recv() {
        let mut next = Some(first);
        while let Some(record) = next {
            let written = write_record(&mut out, format, &record);
            report(&mut failing, written);
            next = records.try_recv().ok();
        }
        report(&mut failing, out.flush());
    }
    report(&mut failing, out.flush());
}

fn report(failing: &mut bool, result: io::Result<()>) {
    match result {
        Ok(()) => *failing = false,
        Err(e) if !*failing => {
            *failing = true;
            tracing::error!(error = %e, "cannot write the access log");
        }
        Err(_) => {}
    }
}

/// Writes one line.
fn write_record(out: &mut impl Write, format: Format, record: &Record) -> io::Result<()> {
    let (at, duration) = match record {
        Record::Call(c) => (c.at, c.duration),
        Record::Connection(c) => (c.at, c.duration),
    };
    let time = humantime::format_rfc3339_millis(at);
    let ms = duration.as_secs_f64() * 1000.0;
    match format {
        Format::Json => {
            #[derive(Serialize)]
            struct Line<'a, T: Serialize> {
                time: String,
                kind: &'static str,
                duration_ms: f64,
                #[serde(flatten)]
                record: &'a T,
            }
            let line = match record {
                Record::Call(c) => serde_json::to_string(&Line {
                    time: time.to_string(),
                    kind: "call",
                    duration_ms: ms,
                    record: c,
                }),
                Record::Connection(c) => serde_json::to_string(&Line {
                    time: time.to_string(),
                    kind: "connection",
                    duration_ms: ms,
                    record: c,
                }),
            }
            .map_err(io::Error::other)?;
            writeln!(out, "{line}")
        }
        Format::Text => {
            let backend = |b: &Option<String>| b.clone().unwrap_or_else(|| "-".to_owned());
            match record {
                Record::Call(c) => writeln!(
                    out,
                    "{time} call peer={} method={} backend={} grpc_status={} duration_ms={ms:.3} \
                     request_bytes={} response_bytes={} retried={} queued={}",
                    c.peer,
                    c.method,
                    backend(&c.backend),
                    c.grpc_status,
                    c.request_bytes,
                    c.response_bytes,
                    c.retried,
                    c.queued
                ),
                Record::Connection(c) => writeln!(
                    out,
                    "{time} connection peer={} backend={} duration_ms={ms:.3} to_backend={} \
                     to_client={} end={}",
                    c.peer,
                    backend(&c.backend),
                    c.to_backend,
                    c.to_client,
                    c.end
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;

    fn call(status: u32) -> Record {
        Record::Call(CallRecord {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_650_000),
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
            method: "/portshare.test.Echo/Unary".to_owned(),
            backend: Some("127.0.0.1:50052".to_owned()),
            grpc_status: status,
            duration: Duration::from_micros(1500),
            request_bytes: 12,
            response_bytes: 14,
            retried: false,
            queued: true,
        })
    }

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(out: &Shared) -> Vec<String> {
        let bytes = out.0.lock().expect("lock").clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_record_is_one_json_line() {
        let out = Shared::default();
        let log = AccessLog::start_with(Box::new(out.clone()), Format::Json, 2000).expect("start");
        for i in 0..1000 {
            log.log(call(i % 3));
        }
        drop(log);
        let lines = lines(&out);
        assert_eq!(lines.len(), 1000);
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
            assert_eq!(v["grpc_status"], u64::try_from(i % 3).expect("small"));
            assert_eq!(v["kind"], "call");
            assert_eq!(v["method"], "/portshare.test.Echo/Unary");
            assert_eq!(v["duration_ms"], 1.5);
            assert_eq!(v["time"], "2025-12-02T04:33:20.000Z");
        }
    }

    #[test]
    fn text_lines_name_every_field() {
        let out = Shared::default();
        let log = AccessLog::start_with(Box::new(out.clone()), Format::Text, 10).expect("start");
        log.log(call(14));
        log.log(Record::Connection(ConnectionRecord {
            at: SystemTime::UNIX_EPOCH,
            peer: SocketAddr::from(([127, 0, 0, 1], 40001)),
            backend: None,
            duration: Duration::from_millis(2),
            to_backend: 5,
            to_client: 7,
            end: "no_backend",
        }));
        drop(log);
        assert_eq!(
            lines(&out),
            [
                "2025-12-02T04:33:20.000Z call peer=127.0.0.1:40000 method=/portshare.test.Echo/Unary \
                 backend=127.0.0.1:50052 grpc_status=14 duration_ms=1.500 request_bytes=12 \
                 response_bytes=14 retried=false queued=true",
                "1970-01-01T00:00:00.000Z connection peer=127.0.0.1:40001 backend=- duration_ms=2.000 \
                 to_backend=5 to_client=7 end=no_backend",
            ]
        );
    }

    /// A writer stuck until the test lets it go (a pipe nobody reads), then passing
    /// everything on to `out`.
    struct Stuck {
        gate: Arc<(Mutex<bool>, Condvar)>,
        out: Shared,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, opened) = &*self.gate;
            let mut open = open.lock().expect("lock");
            while !*open {
                open = opened.wait(open).expect("wait");
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_destination_drops_lines_instead_of_waiting() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Shared::default();
        let stuck = Stuck {
            gate: Arc::clone(&gate),
            out: out.clone(),
        };
        let log = AccessLog::start_with(Box::new(stuck), Format::Text, 4).expect("start");
        // Threads block here, not tokio tasks: wall-clock time is what must stay short.
        #[expect(clippy::disallowed_methods, reason = "no tokio runtime; real threads")]
        let started = std::time::Instant::now();
        // The writer takes what fits its buffer, then waits on the destination; 4 more wait
        // in the queue; the rest cannot fit, and log() must return at once for each.
        for i in 0..10_000 {
            log.log(call(i));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "logging waited for the destination"
        );
        *gate.0.lock().expect("lock") = true;
        gate.1.notify_all();
        drop(log);
        let written = lines(&out).len();
        assert!(written > 0 && written < 10_000, "{written} lines written");
    }
}
