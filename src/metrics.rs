//! Metric names, described once at start-up, and the Prometheus recorder.
//!
//! Names follow Prometheus conventions: a `portshare_` prefix, base units (`_bytes`,
//! `_seconds`) and `_total` on counters. Everything that records a metric uses these
//! constants, so the list below is the complete catalogue.

use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Client connections accepted by the public listener.
pub const CONNECTIONS_ACCEPTED: &str = "portshare_connections_accepted_total";
/// Client connections open right now.
pub const CONNECTIONS_ACTIVE: &str = "portshare_connections_active";
/// Client connections that ended with an error, by `side` (client/backend) and `reason`.
pub const CONNECTIONS_FAILED: &str = "portshare_connections_failed_total";
/// Errors from `accept` itself (e.g. out of file descriptors).
pub const ACCEPT_ERRORS: &str = "portshare_accept_errors_total";
/// Connections opened to each backend.
pub const BACKEND_CONNECTIONS: &str = "portshare_backend_connections_total";
/// Proxied connections open to each backend right now (read at scrape time).
pub const BACKEND_ACTIVE: &str = "portshare_backend_connections_active";
/// Failed connects to each backend, by `reason` (refused/timeout/other).
pub const BACKEND_CONNECT_ERRORS: &str = "portshare_backend_connect_errors_total";
/// Connects tried again on another backend after a failure the client never saw.
pub const CONNECT_RETRIES: &str = "portshare_connect_retries_total";
/// Times each backend was passively ejected after a failure.
pub const BACKEND_EJECTIONS: &str = "portshare_backend_ejections_total";
/// 1 when a backend may be picked now, 0 when it is ejected (read at scrape time).
pub const BACKEND_UP: &str = "portshare_backend_up";
/// Health checks run, by `backend` and `result` (pass/fail/not_serving).
pub const HEALTH_CHECKS: &str = "portshare_health_checks_total";
/// How long health checks take, by `check` (tcp/grpc).
pub const HEALTH_CHECK_SECONDS: &str = "portshare_health_check_duration_seconds";
/// Times each spawned worker was restarted, by `reason` (exited, rolling, hung, calls,
/// lifetime, memory).
pub const WORKER_RESTARTS: &str = "portshare_worker_restarts_total";
/// Rolling restarts of the spawned workers, by `result` (done/failed).
pub const ROLLING_RESTARTS: &str = "portshare_rolling_restarts_total";
/// Configuration reloads, by result (`ok`, `error`).
pub const CONFIG_RELOADS: &str = "portshare_config_reloads_total";
/// Calls (h2) or client connections (l4) each spawned worker took, over all its processes.
pub const WORKER_CALLS: &str = "portshare_worker_calls_total";
/// Resident memory of each spawned worker's process tree (Linux), sampled every few seconds.
pub const WORKER_MEMORY: &str = "portshare_worker_memory_bytes";
/// 1 while a spawned worker's process runs, else 0.
pub const WORKER_UP: &str = "portshare_worker_up";
/// h2 mode: calls finished, by `backend` and `grpc_status`.
pub const CALLS: &str = "portshare_calls_total";
/// h2 mode: calls finished, by gRPC `method` (the first 200 distinct ones, then `other`)
/// and `grpc_status`.
pub const METHOD_CALLS: &str = "portshare_method_calls_total";
/// h2 mode: how long calls take, from arrival to the end of the response, by `method`.
pub const CALL_DURATION_SECONDS: &str = "portshare_call_duration_seconds";
/// Access-log lines dropped because the writer could not keep up.
pub const ACCESS_LOG_DROPPED: &str = "portshare_access_log_dropped_total";
/// h2 mode: calls in flight.
pub const CALLS_IN_FLIGHT: &str = "portshare_calls_in_flight";
/// h2 mode: calls placed again on another backend that certainly never saw them.
pub const CALL_RETRIES: &str = "portshare_call_retries_total";
/// h2 mode: calls refused at once because too many were in flight.
pub const CALLS_SHED: &str = "portshare_calls_shed_total";
/// Calls (h2) or client connections (l4) waiting for a backend that can take them.
pub const QUEUE_WAITING: &str = "portshare_queue_waiting";
/// How long calls or connections waited for a backend (only those that had to wait).
pub const QUEUE_WAIT_SECONDS: &str = "portshare_queue_wait_seconds";
/// Calls or connections that waited for a backend until their time ran out.
pub const QUEUE_TIMEOUTS: &str = "portshare_queue_timeouts_total";
/// TLS handshakes that failed, by `reason`.
pub const TLS_HANDSHAKE_ERRORS: &str = "portshare_tls_handshake_errors_total";
/// Bytes copied from clients to each backend.
pub const BACKEND_SENT_BYTES: &str = "portshare_backend_sent_bytes_total";
/// Bytes copied from each backend to its clients.
pub const BACKEND_RECEIVED_BYTES: &str = "portshare_backend_received_bytes_total";

/// Installs the process-wide Prometheus recorder and describes every metric once.
/// Call it once, before any component records; the handle renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        // Real histogram buckets (not a summary), so checks can be aggregated across
        // instances; from a loopback connect (~0.1 ms) to the default 1 s timeout.
        .set_buckets_for_metric(
            Matcher::Full(HEALTH_CHECK_SECONDS.to_owned()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(CALL_DURATION_SECONDS.to_owned()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ],
        )?
        // Waits last from a worker's restart (a second or so) to the queue timeout.
        .set_buckets_for_metric(
            Matcher::Full(QUEUE_WAIT_SECONDS.to_owned()),
            &[
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ],
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// How often recorded histogram samples are folded into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every [`UPKEEP_INTERVAL`] until
/// `stop`. The recorder queues every sample until upkeep runs; a scrape runs it too, but
/// without one (no admin listener, or nobody scraping) the queue would grow by every call
/// for good.
pub async fn upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    let mut every = tokio::time::interval(UPKEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => handle.run_upkeep(),
        }
    }
}

fn describe() {
    describe_counter!(
        TLS_HANDSHAKE_ERRORS,
        "TLS handshakes that failed, by reason."
    );
    describe_counter!(
        CALLS,
        "Calls finished (h2 mode), by backend and grpc_status."
    );
    describe_counter!(
        METHOD_CALLS,
        "Calls finished (h2 mode), by gRPC method (the first 200 distinct, then \"other\") and grpc_status."
    );
    describe_histogram!(
        CALL_DURATION_SECONDS,
        Unit::Seconds,
        "Call duration (h2 mode), arrival to end of response, by gRPC method."
    );
    describe_gauge!(CALLS_IN_FLIGHT, "Calls in flight (h2 mode).");
    describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access-log lines dropped because the destination could not keep up."
    );
    describe_counter!(
        CALL_RETRIES,
        "Calls placed again on another backend that never saw them (h2 mode)."
    );
    describe_counter!(
        CALLS_SHED,
        "Calls refused at once: too many in flight (h2 mode)."
    );
    describe_gauge!(
        QUEUE_WAITING,
        "Calls (h2) or connections (l4) waiting for a backend that can take them."
    );
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "How long calls or connections waited for a backend."
    );
    describe_counter!(
        QUEUE_TIMEOUTS,
        "Calls or connections that waited for a backend until their time ran out."
    );
    describe_counter!(HEALTH_CHECKS, "Health checks run, by backend and result.");
    describe_histogram!(
        HEALTH_CHECK_SECONDS,
        Unit::Seconds,
        "How long health checks take."
    );
    describe_counter!(
        WORKER_RESTARTS,
        "Times each spawned worker was restarted, by reason (exited, rolling, hung, calls, lifetime, memory)."
    );
    describe_counter!(
        WORKER_CALLS,
        "Calls (h2) or connections (l4) each spawned worker took."
    );
    describe_gauge!(
        WORKER_MEMORY,
        Unit::Bytes,
        "Resident memory of each spawned worker's process tree."
    );
    describe_counter!(
        ROLLING_RESTARTS,
        "Rolling restarts of the spawned workers, by result (done/failed)."
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Configuration reloads (SIGHUP, POST /config/reload), by result (ok/error)."
    );
    describe_gauge!(
        WORKER_UP,
        "1 while a spawned worker's process runs, else 0."
    );
    describe_counter!(CONNECTIONS_ACCEPTED, "Client connections accepted.");
    describe_gauge!(CONNECTIONS_ACTIVE, "Client connections open now.");
    describe_counter!(
        CONNECTIONS_FAILED,
        "Client connections that ended with an error, by side and reason."
    );
    describe_counter!(ACCEPT_ERRORS, "Errors returned by accept.");
    describe_counter!(BACKEND_CONNECTIONS, "Connections opened to each backend.");
    describe_gauge!(
        BACKEND_ACTIVE,
        "Proxied connections open to each backend now."
    );
    describe_counter!(
        BACKEND_CONNECT_ERRORS,
        "Failed connects to each backend, by reason."
    );
    describe_counter!(
        CONNECT_RETRIES,
        "Connects retried on another backend after a failure."
    );
    describe_counter!(BACKEND_EJECTIONS, "Passive ejections of each backend.");
    describe_gauge!(BACKEND_UP, "1 if the backend may be picked now, else 0.");
    describe_counter!(
        BACKEND_SENT_BYTES,
        Unit::Bytes,
        "Bytes copied from clients to each backend."
    );
    describe_counter!(
        BACKEND_RECEIVED_BYTES,
        Unit::Bytes,
        "Bytes copied from each backend to clients."
    );
}
