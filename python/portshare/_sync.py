"""The blocking variant: ``server()`` builds a grpcio server fit to be a portshare worker,
``serve()`` runs one until a signal, or portshare's exit, stops it gracefully."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from types import FrameType
from typing import Any, Protocol

import grpc

from ._common import (
    DEFAULT_GRACE,
    DEFAULT_HOST,
    PARENT_POLL_INTERVAL,
    REUSEPORT_OFF,
    ParentWatch,
    bind_shared,
    grace_seconds,
    listen,
    log,
    resolve_shared,
    reuseport_option,
    stop_signals,
)
from ._shared import leave_and_drain

ChannelOption = tuple[str, Any]

#: How often the main thread looks whether the stop has finished. Short, because a signal
#: handler on Windows runs only when the main thread's wait returns.
_STOP_POLL_INTERVAL = 0.1


def with_reuseport_off(options: Iterable[ChannelOption] = ()) -> list[ChannelOption]:
    """``options`` with ``grpc.so_reuseport`` set to 0 (replacing any value given)."""
    return [opt for opt in options if opt[0] != REUSEPORT_OFF[0]] + [REUSEPORT_OFF]


def with_worker_reuseport(options: Iterable[ChannelOption] = ()) -> list[ChannelOption]:
    """``options`` with ``grpc.so_reuseport`` as a portshare worker needs it (replacing any
    value given): on in reuseport mode (``$PORTSHARE_SHARED_ADDR`` set), else off."""
    wanted = reuseport_option()
    return [opt for opt in options if opt[0] != wanted[0]] + [wanted]


def server(
    max_workers: int = 8,
    *,
    options: Iterable[ChannelOption] = (),
    **kwargs: Any,
) -> grpc.Server:
    """``grpc.server(ThreadPoolExecutor(max_workers), ...)`` with SO_REUSEPORT off.

    Options can only be given when a grpcio server is built, so this is the way to be sure
    that no *later* server can quietly share this one's port. Under portshare's reuseport
    mode (``$PORTSHARE_SHARED_ADDR`` set) SO_REUSEPORT is on instead, since the workers
    share the public address; portshare holds it so that no one else joins. Other keyword
    arguments go to ``grpc.server`` as they are (``interceptors``,
    ``maximum_concurrent_rpcs``, ...).
    """
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=with_worker_reuseport(options),
        **kwargs,
    )


class SyncHealth(Protocol):
    """What ``serve`` needs of a health servicer (``grpc_health.v1.health.HealthServicer``)."""

    def set(self, service: str, status: Any) -> None: ...

    def enter_graceful_shutdown(self) -> None: ...


def _add_health(server: grpc.Server, health: bool | SyncHealth) -> SyncHealth | None:
    if not isinstance(health, bool):
        return health  # the application's own, already added to the server
    if not health:
        return None
    try:
        from grpc_health.v1 import health as health_module
        from grpc_health.v1 import health_pb2_grpc
    except ImportError:
        log.info("grpcio-health-checking is not installed: no grpc.health.v1 (use --health tcp)")
        return None
    servicer: SyncHealth = health_module.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def _serving_status(name: str) -> Any:
    from grpc_health.v1 import health_pb2

    return getattr(health_pb2.HealthCheckResponse, name)


class _Signals:
    """Turns the stop signals into ``stop.set()`` while installed.

    The handler only sets the event; the main thread does the stop. After the first
    signal the previous handlers come back, so a second one does what it would have done
    without this module (for SIGINT and SIGTERM by default: stop at once).
    """

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        #: Which signal asked for the stop, for the log.
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("serve() is not on the main thread: signals are not handled")
            return
        for sig in stop_signals():
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        self._stop.set()
        self.restore()

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    server: grpc.Server,
    port: int | None = None,
    *,
    host: str = DEFAULT_HOST,
    grace: float | None = DEFAULT_GRACE,
    health: bool | SyncHealth = True,
    health_services: Sequence[str] = (),
    handle_signals: bool = True,
    watch_parent: bool = True,
    stop_event: threading.Event | None = None,
    on_serving: Callable[[int], None] | None = None,
) -> int:
    """Binds, starts and runs ``server`` as a portshare worker; returns 0 once it stopped.

    - Listens on ``host:port``; ``port`` defaults to ``--port N`` on the command line,
      then ``$PORTSHARE_PORT`` (see ``resolve_port``); or, when portshare runs its workers
      on Unix sockets, on ``unix:$PORTSHARE_SOCKET`` (see ``resolve_socket``; ``host`` is
      then unused, and ``on_serving`` gets port 0). Raises ``BindError`` if the port is
      taken, even by a server with SO_REUSEPORT (see ``check_port_free``); build the
      server with ``portshare.server()`` so that no later one can share it either.
    - In portshare's reuseport mode (``$PORTSHARE_SHARED_ADDR`` set) it also listens on
      that public address, which every worker binds with SO_REUSEPORT; the server must
      be built with ``grpc.so_reuseport`` on, as ``portshare.server()`` then does.
    - ``health``: True registers ``grpc.health.v1`` (if grpcio-health-checking is
      installed), SERVING for ``""`` and every name in ``health_services`` once started;
      or pass your own ``HealthServicer``, already added to the server. Every service
      turns NOT_SERVING as soon as a stop begins.
    - Stops on SIGTERM or SIGINT (plus Ctrl-Break on Windows) if ``handle_signals`` and
      this is the main thread; when portshare (``$PORTSHARE_PID``) is gone, if
      ``watch_parent``; or when ``stop_event`` is set.
    - The stop: health NOT_SERVING, no new calls, the calls in flight get ``grace``
      seconds (``None``: cancelled at once), then they are cancelled.
    - ``on_serving(port)`` is called with the bound port once the server is started.
    """
    grace = grace_seconds(grace)
    stop = threading.Event() if stop_event is None else stop_event
    signals = _Signals(stop)
    if handle_signals:
        signals.install()  # before binding: a SIGTERM at start-up must not be lost
    try:
        address, bound = listen(server, host, port)
        shared = resolve_shared()
        shared_port = None if shared is None else bind_shared(server, shared)
        servicer = _add_health(server, health)
        server.start()
        if servicer is not None:
            for name in ("", *health_services):
                servicer.set(name, _serving_status("SERVING"))
        log.info(
            "serving on %s%s",
            address,
            "" if shared is None else f" and, shared with the other workers, {shared}",
        )
        if on_serving is not None:
            on_serving(bound)

        watch = ParentWatch.from_environ() if watch_parent else None
        while not stop.wait(PARENT_POLL_INTERVAL):
            if watch is not None and watch.gone():
                log.warning("portshare (pid %d) is gone: stopping", watch.pid)
                break
        if signals.received is not None:
            log.info("%s: stopping (calls in flight get %s s)", signals.received.name, grace)

        if servicer is not None:
            servicer.enter_graceful_shutdown()
        if shared_port is not None:
            leave_and_drain(shared_port, grace)
        done = server.stop(grace)
        while not done.wait(_STOP_POLL_INTERVAL):
            pass
        log.info("stopped")
        return 0
    finally:
        signals.restore()
