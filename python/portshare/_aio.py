"""The asyncio variant, for ``grpc.aio``: ``aio_server()`` and ``serve_async()`` do what
``server()`` and ``serve()`` do, on the running event loop."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any, Protocol

import grpc
import grpc.aio

from ._common import (
    DEFAULT_GRACE,
    DEFAULT_HOST,
    PARENT_POLL_INTERVAL,
    ParentWatch,
    bind_shared,
    grace_seconds,
    listen,
    log,
    resolve_shared,
    stop_signals,
)
from ._shared import DRAIN_POLL_INTERVAL, begin_drain, shared_connections
from ._sync import ChannelOption, _serving_status, with_worker_reuseport


def aio_server(*, options: Iterable[ChannelOption] = (), **kwargs: Any) -> grpc.aio.Server:
    """``grpc.aio.server(...)`` with SO_REUSEPORT off, or on in portshare's reuseport
    mode (see ``portshare.server``)."""
    return grpc.aio.server(options=with_worker_reuseport(options), **kwargs)


class AsyncHealth(Protocol):
    """What ``serve_async`` needs of a health servicer
    (``grpc_health.v1.health.aio.HealthServicer``)."""

    async def set(self, service: str, status: Any) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


def _add_health(server: grpc.aio.Server, health: bool | AsyncHealth) -> AsyncHealth | None:
    if not isinstance(health, bool):
        return health
    if not health:
        return None
    try:
        from grpc_health.v1 import health as health_module
        from grpc_health.v1 import health_pb2_grpc
    except ImportError:
        log.info("grpcio-health-checking is not installed: no grpc.health.v1 (use --health tcp)")
        return None
    servicer: AsyncHealth = health_module.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


class _Signals:
    """Turns the stop signals into ``stop.set()`` on the loop while installed.

    ``loop.add_signal_handler`` where the loop has it (Unix), ``signal.signal`` otherwise
    (Windows). After the first signal the previous handlers come back, as in ``serve``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        self._loop = loop
        self._stop = stop
        #: Which signal asked for the stop, for the log.
        self.received: signal.Signals | None = None
        self._on_loop: list[signal.Signals] = []
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("serve_async() is not on the main thread: signals are not handled")
            return
        for sig in stop_signals():
            try:
                self._loop.add_signal_handler(sig, self._handle, sig)
                self._on_loop.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                self._previous[sig] = signal.signal(sig, self._handle_threadsafe)

    def _handle(self, sig: signal.Signals) -> None:
        self.received = sig
        self._stop.set()
        self.restore()

    def _handle_threadsafe(self, signum: int, _frame: FrameType | None) -> None:
        self._loop.call_soon_threadsafe(self._handle, signal.Signals(signum))

    def restore(self) -> None:
        on_loop, self._on_loop = self._on_loop, []
        for sig in on_loop:
            self._loop.remove_signal_handler(sig)
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def serve_async(
    server: grpc.aio.Server,
    port: int | None = None,
    *,
    host: str = DEFAULT_HOST,
    grace: float | None = DEFAULT_GRACE,
    health: bool | AsyncHealth = True,
    health_services: Sequence[str] = (),
    handle_signals: bool = True,
    watch_parent: bool = True,
    stop_event: asyncio.Event | None = None,
    on_serving: Callable[[int], None] | None = None,
) -> int:
    """``serve`` for a ``grpc.aio`` server: the same arguments and behaviour, with an
    ``asyncio.Event`` as ``stop_event`` and ``grpc_health``'s asyncio servicer.

    ``asyncio.run(portshare.serve_async(server))`` returns 0 once the server stopped.
    """
    grace = grace_seconds(grace)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event() if stop_event is None else stop_event
    signals = _Signals(loop, stop)
    if handle_signals:
        signals.install()
    try:
        address, bound = listen(server, host, port)
        shared = resolve_shared()
        shared_port = None if shared is None else bind_shared(server, shared)
        servicer = _add_health(server, health)
        await server.start()
        if servicer is not None:
            for name in ("", *health_services):
                await servicer.set(name, _serving_status("SERVING"))
        log.info(
            "serving on %s%s",
            address,
            "" if shared is None else f" and, shared with the other workers, {shared}",
        )
        if on_serving is not None:
            on_serving(bound)

        watch = ParentWatch.from_environ() if watch_parent else None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), PARENT_POLL_INTERVAL)
            except asyncio.TimeoutError:
                if watch is not None and watch.gone():
                    log.warning("portshare (pid %d) is gone: stopping", watch.pid)
                    break
        if signals.received is not None:
            log.info("%s: stopping (calls in flight get %s s)", signals.received.name, grace)

        if servicer is not None:
            await servicer.enter_graceful_shutdown()
        if shared_port is not None:
            await _leave_and_drain(shared_port, grace)
        await server.stop(grace)
        log.info("stopped")
        return 0
    finally:
        signals.restore()


async def _leave_and_drain(port: int, grace: float | None) -> None:
    """``leave_and_drain`` without blocking the event loop, which serves the calls of
    the connections still open meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + begin_drain(port, grace)
    while shared_connections(port) and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_INTERVAL)
