//! The admin listener (HTTP/1.1): `/healthz` (the process is alive), `/readyz` (it can
//! serve: not draining and at least one backend usable), `/backends` (JSON) and `/metrics`
//! (Prometheus text).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::BackendSet;
use crate::backoff::Backoff;
use crate::control::Control;
use crate::supervisor::RestartOutcome;
use tokio::sync::oneshot;

/// A scraper or probe that has not sent its request headers by then is cut off, so idle
/// admin connections cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The backends, for `/readyz` and `/backends`.
    pub backends: Arc<BackendSet>,
    /// Renders `/metrics`; `None` when no recorder is installed (library use, tests).
    pub prometheus: Option<PrometheusHandle>,
    /// Cancelled when shutdown begins: `/readyz` then answers 503, so orchestrators stop
    /// sending new work while the drain runs.
    pub draining: CancellationToken,
    /// Asks for a rolling restart of spawned workers; `None` when there are none.
    pub restart: Option<tokio::sync::mpsc::Sender<Control>>,
    /// Asks for a configuration reload, or the running configuration.
    pub control: tokio::sync::mpsc::Sender<Control>,
}

/// Serves the admin endpoints until `stop` is cancelled, each connection a task on `tasks`;
/// those in the middle of an answer finish it.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let state = Arc::new(state);
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => { backoff.reset(); s }
                Err(e) => {
                    let pause = backoff.next_delay();
                    tracing::warn!(error = %e, pause = ?pause, "admin accept failed");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        let stop = stop.clone();
        tasks.spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move {
                    Ok::<_, Infallible>(match req.uri().path() {
                        "/workers/restart" => restart_workers(&state, &req).await,
                        "/config/reload" => reload_config(&state, &req).await,
                        "/config" => show_config(&state, &req).await,
                        _ => route(&state, &req),
                    })
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    let now = Instant::now();
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.draining.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.backends.ready(now) == 0 {
                text(StatusCode::SERVICE_UNAVAILABLE, "no backend is ready\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        "/backends" => match serde_json::to_vec_pretty(&state.backends.statuses(now)) {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/metrics" => match &state.prometheus {
            Some(handle) => {
                state.backends.publish_gauges(now);
                handle.run_upkeep();
                let mut r = text(StatusCode::OK, handle.render());
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /backends, /metrics, /config, POST /config/reload or POST /workers/restart\n",
        ),
    }
}

/// `POST /workers/restart`: what SIGHUP does, for platforms without it; answers once the
/// rolling restart is over: 200 when every running worker was replaced, 500 when a
/// replacement failed (its old process keeps serving), 409 when one is under way already.
async fn restart_workers(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    let Some(tx) = &state.restart else {
        return text(StatusCode::CONFLICT, "no spawned workers to restart\n");
    };
    let (done_tx, done_rx) = oneshot::channel();
    if tx.try_send(Control::Reload(Some(done_tx))).is_err() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests waiting; try again\n",
        );
    }
    match done_rx.await {
        Ok(RestartOutcome::Done(what)) => {
            text(StatusCode::OK, format!("rolling restart done: {what}\n"))
        }
        Ok(RestartOutcome::Failed(why)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rolling restart failed: {why}\n"),
        ),
        Ok(RestartOutcome::AlreadyRunning) => text(
            StatusCode::CONFLICT,
            "a rolling restart is already under way\n",
        ),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "portshare is stopping\n"),
    }
}

/// Hands `ask` a reply channel on the control channel and waits for the answer; `Err` is
/// the response to give when there is none.
async fn ask<T>(
    state: &AdminState,
    ask: impl FnOnce(oneshot::Sender<T>) -> Control,
) -> Result<T, Response<Full<Bytes>>> {
    let (tx, rx) = oneshot::channel();
    if state.control.try_send(ask(tx)).is_err() {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests waiting; try again\n",
        ));
    }
    rx.await
        .map_err(|_| text(StatusCode::SERVICE_UNAVAILABLE, "portshare is stopping\n"))
}

/// `POST /config/reload`: reads the configuration file and environment again and applies
/// them (what SIGHUP does, less the workers' rolling restart): 200 with what changed and
/// what needs a restart, 422 with the key and the problem when it does not validate.
async fn reload_config(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    match ask(state, Control::ReloadConfig).await {
        Ok(Ok(report)) => text(StatusCode::OK, format!("reloaded\n{report}")),
        Ok(Err(e)) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("not reloaded: {e}; the running configuration is kept\n"),
        ),
        Err(response) => response,
    }
}

/// `GET /config`: the configuration running now, as `portshare check` prints it.
async fn show_config(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match ask(state, Control::ShowConfig).await {
        Ok(toml) => {
            let mut r = text(StatusCode::OK, toml);
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/toml; charset=utf-8"),
            );
            r
        }
        Err(response) => response,
    }
}
